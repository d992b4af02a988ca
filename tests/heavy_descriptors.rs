//! Running out of file descriptors: the accept loop must back off instead
//! of spinning on EMFILE, keep serving the connections it has, and recover
//! once descriptors free up. The limit is lowered on the real binary with
//! `prlimit` (util-linux). Heavy: runs alone (see `.config/nextest.toml`).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::hostile::{self, Recorder, health};
use common::{ProxyProcess, config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET /health` on an open keep-alive connection.
async fn health_on(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf))
        .await
        .expect("/health on a held connection within 1 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_descriptor_exhaustion_backs_off_and_recovers() {
    let recorder = Recorder::start().await;
    let mut proxy = ProxyProcess::start(&config(
        &[("a.test", &recorder.url())],
        "header_read_timeout_secs = 60\nidle_timeout_secs = 60",
        "",
    ));
    let mut control = TcpStream::connect(proxy.addr).await.expect("connect");
    health_on(&mut control).await;
    let baseline = hostile::rss_now(&proxy);

    let pid = proxy.pid();
    let limit = hostile::open_fds(pid) + 20;
    let status = Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");

    // More connections than descriptors: the kernel completes them all (the
    // listen backlog), the proxy accepts until EMFILE.
    let mut clients = Vec::new();
    for _ in 0..60 {
        clients.push(TcpStream::connect(proxy.addr).await.expect("connect"));
    }
    proxy.wait_for_line(
        |l| l.contains("accept failed") && l.contains("backing off"),
        Duration::from_secs(5),
    );
    eprintln!(
        "out of descriptors: {} open, limit {limit}",
        hostile::open_fds(pid)
    );

    // No busy loop: CPU over a 3 s window while accept keeps failing.
    let before = hostile::cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = hostile::cpu_ticks(pid) - before;
    eprintln!("proxy CPU while out of descriptors: {used} ticks in 3 s");
    assert!(
        used < 15,
        "{used} ticks of CPU in 3 s: the accept loop spins"
    );
    // Connections it already has are still served.
    health_on(&mut control).await;

    // Descriptors free up: new connections are accepted again.
    drop(clients);
    let started = Instant::now();
    let latency = health(proxy.addr, Duration::from_secs(5)).await;
    eprintln!(
        "recovered: /health answered {:?} after descriptors were freed",
        started.elapsed()
    );
    assert!(latency < Duration::from_secs(3));
    proxy.wait_for_line(
        |l| l.contains("accepting connections again"),
        Duration::from_secs(2),
    );
    let reply = common::get(proxy.addr, "a.test", "/after").await;
    assert_eq!(reply.status, 200);
    hostile::assert_rss_near(&proxy, baseline, "descriptor exhaustion");
}

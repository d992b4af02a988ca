//! Resources running out: a log destination that cannot be written, and the
//! connection limit.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::hostile::{Recorder, health};
use common::{ProxyProcess, config, status_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const COMPLAINT: &str = "cannot be written";

/// Starts the proxy with `access_log` at `dir/access.log`, after `prepare`
/// has set that path up.
fn start_logging_to(recorder: &Recorder, prepare: impl FnOnce(&std::path::Path)) -> ProxyProcess {
    let dir = tempfile::tempdir().expect("tempdir");
    prepare(dir.path());
    let log = dir.path().join("access.log");
    let toml = config(
        &[("a.test", &recorder.url())],
        &format!("access_log = \"{}\"", log.display()),
        common::NO_RATE_LIMIT,
    );
    std::fs::write(dir.path().join("config.toml"), toml).expect("config");
    ProxyProcess::start_in(dir, &[])
}

/// 200 requests, each answered promptly; returns the slowest.
async fn serve_many(proxy: &ProxyProcess) -> Duration {
    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let t = Instant::now();
        let reply = common::get(proxy.addr, "a.test", &format!("/r{i}")).await;
        assert_eq!(reply.status, 200);
        slowest = slowest.max(t.elapsed());
    }
    slowest
}

#[tokio::test]
async fn full_log_disk_never_stops_requests() {
    let recorder = Recorder::start().await;
    // /dev/full accepts the open and fails every write with ENOSPC.
    let proxy = start_logging_to(&recorder, |dir| {
        std::os::unix::fs::symlink("/dev/full", dir.join("access.log")).expect("symlink");
    });
    let slowest = serve_many(&proxy).await;
    assert!(slowest < Duration::from_millis(500), "slowest {slowest:?}");
    health(proxy.addr, Duration::from_secs(1)).await;
    assert_eq!(recorder.seen().len(), 200);
    let complaints = proxy.wait_for_count(|l| l.contains(COMPLAINT), 1, Duration::from_secs(2));
    assert!(complaints[0].contains("No space left"), "{}", complaints[0]);
    // Rate limited: one complaint, not one per lost line.
    std::thread::sleep(Duration::from_millis(300));
    let count = proxy
        .lines()
        .iter()
        .filter(|l| l.contains(COMPLAINT))
        .count();
    assert_eq!(count, 1, "{:#?}", proxy.lines());
}

#[tokio::test]
async fn log_filesystem_filling_up_never_stops_requests() {
    // A real file system that fills up: a 16 KiB tmpfs (needs the right to
    // mount, which the test suite has when run as root).
    let mount_point = tempfile::tempdir().expect("tempdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k", "tmpfs"])
        .arg(mount_point.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mount_point.path());
    let log = mount_point.path().join("access.log");
    let recorder = Recorder::start().await;
    let toml = config(
        &[("a.test", &recorder.url())],
        &format!("access_log = \"{}\"", log.display()),
        common::NO_RATE_LIMIT,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("config.toml"), toml).expect("config");
    let proxy = ProxyProcess::start_in(dir, &[]);
    // 200 access lines are well over 16 KiB.
    let slowest = serve_many(&proxy).await;
    assert!(slowest < Duration::from_millis(500), "slowest {slowest:?}");
    health(proxy.addr, Duration::from_secs(1)).await;
    proxy.wait_for_count(|l| l.contains(COMPLAINT), 1, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    let count = proxy
        .lines()
        .iter()
        .filter(|l| l.contains(COMPLAINT))
        .count();
    assert_eq!(count, 1, "{:#?}", proxy.lines());
    // What fitted was written, as whole lines.
    let written = std::fs::read_to_string(&log).expect("log");
    assert!(written.lines().count() > 10, "{written}");
    drop(proxy);
}

/// Sends a keep-alive request and reads one response (small, with a
/// content-length) without closing.
async fn request_on(stream: &mut TcpStream, path: &str, within: Duration) -> Option<u16> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out);
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if out.len() >= end + 4 + len {
                    return status_of(&text);
                }
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test]
async fn max_connections_is_enforced() {
    let recorder = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &recorder.url())],
        "max_connections = 4\nheader_read_timeout_secs = 30\nidle_timeout_secs = 30",
        "",
    ));
    let mut held = Vec::new();
    for i in 0..4 {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        let status = request_on(&mut stream, &format!("/held{i}"), Duration::from_secs(2)).await;
        assert_eq!(status, Some(200));
        held.push(stream);
    }
    // The fifth connects (the kernel's backlog takes it) but is not served.
    let mut fifth = TcpStream::connect(proxy.addr).await.expect("connect");
    assert_eq!(
        request_on(&mut fifth, "/fifth", Duration::from_secs(1)).await,
        None,
        "served beyond max_connections"
    );
    assert_eq!(recorder.seen().len(), 4);
    // The held connections keep working meanwhile.
    let status = request_on(&mut held[0], "/health", Duration::from_secs(1)).await;
    assert_eq!(status, Some(200));
    // A slot frees: the waiting connection is served.
    drop(held.pop());
    let started = Instant::now();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut out))
        .await
        .expect("served once a slot freed")
        .expect("read");
    let text = String::from_utf8_lossy(&out[..n]);
    assert_eq!(status_of(&text), Some(200), "{text}");
    eprintln!(
        "waiting connection served {:?} after a slot freed",
        started.elapsed()
    );
    assert_eq!(recorder.paths().last().map(String::as_str), Some("/fifth"));
}

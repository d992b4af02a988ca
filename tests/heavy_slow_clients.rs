//! 500 slow clients at once — half trickling a request head (slowloris),
//! half trickling a request body — while normal clients keep being served
//! promptly. Heavy: runs alone (see `.config/nextest.toml`).

mod common;

use std::time::{Duration, Instant};

use common::hostile::{self, Recorder, health};
use common::{ProxyProcess, config};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SLOW_HEADS: usize = 250;
const SLOW_BODIES: usize = 250;

/// Opens a connection and sends `first`; then one byte of `drip` per
/// second until the proxy closes it or `stop` fires.
async fn slow_client(
    addr: std::net::SocketAddr,
    first: &'static [u8],
    drip: u8,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(first).await.is_err() {
        return false;
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if stream.write_all(&[drip]).await.is_err() {
                    return false;
                }
            }
            _ = stop.changed() => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_500_slow_clients_do_not_delay_normal_ones() {
    let recorder = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &recorder.url())],
        "header_read_timeout_secs = 60\nbody_read_timeout_secs = 60",
        common::NO_RATE_LIMIT,
    ));
    health(proxy.addr, Duration::from_secs(1)).await;
    let baseline = hostile::rss_now(&proxy);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut clients = Vec::new();
    for i in 0..SLOW_HEADS + SLOW_BODIES {
        let (first, drip): (&'static [u8], u8) = if i < SLOW_HEADS {
            (b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: ", b'a')
        } else {
            (
                b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n",
                b'b',
            )
        };
        clients.push(tokio::spawn(slow_client(
            proxy.addr,
            first,
            drip,
            stop_rx.clone(),
        )));
    }
    // Let every slow client connect and start dripping.
    let started = Instant::now();
    while hostile::open_fds(proxy.pid()) < SLOW_HEADS + SLOW_BODIES {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "only {} descriptors open in the proxy",
            hostile::open_fds(proxy.pid())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut latencies = Vec::new();
    for i in 0..60 {
        let t = Instant::now();
        if i % 2 == 0 {
            health(proxy.addr, Duration::from_secs(2)).await;
        } else {
            let reply = common::get(proxy.addr, "a.test", "/normal").await;
            assert_eq!(reply.status, 200);
        }
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p95 = latencies[latencies.len() * 95 / 100];
    let max = latencies[latencies.len() - 1];
    eprintln!(
        "with {} slow clients: normal requests p50 {p50:?}, p95 {p95:?}, max {max:?}",
        SLOW_HEADS + SLOW_BODIES
    );
    assert!(p95 < Duration::from_millis(100), "p95 {p95:?}");
    assert!(max < Duration::from_millis(500), "max {max:?}");
    hostile::assert_rss_near(&proxy, baseline, "500 slow clients");

    stop_tx.send(true).expect("stop");
    let mut still_open = 0;
    for client in clients {
        if client.await.expect("client task") {
            still_open += 1;
        }
    }
    // They were held (not cut off early: the timeouts are 60 s here).
    assert_eq!(still_open, SLOW_HEADS + SLOW_BODIES);
    // None of the slow bodies was completed at the upstream.
    assert!(
        recorder
            .seen()
            .iter()
            .all(|s| s.path == "/normal" || s.body.is_none()),
        "upstream saw a slow request complete"
    );
    health(proxy.addr, Duration::from_secs(1)).await;
}

//! Reloads while traffic flows: no request fails, new requests follow the
//! new configuration at once, and WebSockets and long downloads that began
//! before a reload finish intact on the configuration they started with.
//!
//! Heavy (a request loop, a 50 MiB body): run these serially.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::{Bytes, BytesMut};
use common::lifecycle::{ProxyClient, client_to, ws_connect, ws_echo, ws_roundtrip};
use common::{ProxyProcess, Upstream, config};
use http::header::CONNECTION;
use http_body_util::BodyExt;
use tokio::sync::Notify;

const HOST: &str = "app.test";
const RELOADS: usize = 20;
/// Requests the load sends at least between two reloads.
const PER_RELOAD: usize = 100;

/// The site config pointing at `upstream`. Access lines are left out of
/// stdout: thousands of them would only slow down the line matching.
fn site_config(upstream: &Upstream) -> String {
    config(&[(HOST, &upstream.url())], "", common::NO_RATE_LIMIT)
        .replace("log_level = \"info\"", "log_level = \"info,access=warn\"")
}

/// Runs a blocking wait (on the proxy's output) without stalling the
/// runtime the upstreams and clients run on.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[derive(Default)]
struct Tally {
    sent: AtomicUsize,
    /// Requests sent, by [`Kind`].
    by_kind: [AtomicUsize; 3],
    failed: AtomicUsize,
    failures: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut failures = self.failures.lock().expect("lock");
        if failures.len() < 10 {
            failures.push(what);
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    /// HTTP/1.1, one connection reused for every request.
    KeepAlive,
    /// HTTP/1.1 with `Connection: close`: a new connection per request.
    Close,
    /// HTTP/2, one connection, requests one after another.
    Http2,
}

async fn load(kind: Kind, proxy: std::net::SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let client = client_to(proxy, matches!(kind, Kind::Http2));
    let url = format!("http://{HOST}:{}/load", proxy.port());
    while !stop.load(Ordering::SeqCst) {
        let mut req = http::Request::get(&url);
        if matches!(kind, Kind::Close) {
            req = req.header(CONNECTION, "close");
        }
        let req = req.body(Body::empty()).expect("request");
        tally.sent.fetch_add(1, Ordering::SeqCst);
        tally.by_kind[kind as usize].fetch_add(1, Ordering::SeqCst);
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            let response = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            Ok::<_, String>((status, body.to_bytes()))
        })
        .await;
        match result {
            Ok(Ok((status, body)))
                if status == 200 && (body.starts_with(b"A\n") || body.starts_with(b"B\n")) => {}
            Ok(Ok((status, body))) => tally.fail(format!(
                "{kind:?}: {status} {}",
                String::from_utf8_lossy(&body)
            )),
            Ok(Err(e)) => tally.fail(format!("{kind:?}: {e}")),
            Err(_) => tally.fail(format!("{kind:?}: no answer within 10 s")),
        }
    }
}

/// Which upstream a request sent now reaches.
async fn served_by(client: &ProxyClient, proxy: std::net::SocketAddr) -> String {
    let url = format!("http://{HOST}:{}/check", proxy.port());
    let response = client
        .get(url.parse().expect("url"))
        .await
        .expect("response");
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_fails_no_request() {
    let a = Upstream::echo("A").await;
    let b = Upstream::echo("B").await;
    let proxy = ProxyProcess::start(&site_config(&a));
    let addr = proxy.addr;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let kinds = [
        Kind::KeepAlive,
        Kind::KeepAlive,
        Kind::KeepAlive,
        Kind::Close,
        Kind::Close,
        Kind::Http2,
    ];
    let workers: Vec<_> = kinds
        .into_iter()
        .map(|kind| tokio::spawn(load(kind, addr, Arc::clone(&tally), Arc::clone(&stop))))
        .collect();

    // A keep-alive connection opened before the reloads must follow them.
    let kept = client_to(addr, false);
    assert_eq!(served_by(&kept, addr).await, "A");
    let started = Instant::now();
    for i in 1..=RELOADS {
        let (next, name) = if i % 2 == 1 { (&b, "B") } else { (&a, "A") };
        let line = blocking(|| proxy.reload_with(&site_config(next)));
        assert!(
            line.contains("status=success sites=1"),
            "reload {i}: {line}"
        );
        assert_eq!(
            served_by(&kept, addr).await,
            name,
            "reload {i}, kept connection"
        );
        assert_eq!(
            served_by(&client_to(addr, false), addr).await,
            name,
            "reload {i}, new connection"
        );
        assert_eq!(
            served_by(&client_to(addr, true), addr).await,
            name,
            "reload {i}, HTTP/2"
        );
        // Let the load run on this configuration for a while.
        let target = tally.sent.load(Ordering::SeqCst) + PER_RELOAD;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tally.sent.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "load stalled after reload {i}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.expect("load worker");
    }

    let sent = tally.sent.load(Ordering::SeqCst);
    let failed = tally.failed.load(Ordering::SeqCst);
    let [keep_alive, close, http2] = tally.by_kind.each_ref().map(|n| n.load(Ordering::SeqCst));
    eprintln!(
        "reload under load: {sent} requests (HTTP/1.1 keep-alive {keep_alive}, HTTP/1.1 Connection: close {close}, \
         HTTP/2 {http2}) from {} clients, {RELOADS} reloads in {:.1} s, {failed} failed",
        kinds.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        failed,
        0,
        "failures: {:?}",
        tally.failures.lock().expect("lock")
    );
    assert!(sent >= RELOADS * PER_RELOAD, "only {sent} requests");
    assert!(
        a.hits() > RELOADS * 10 && b.hits() > RELOADS * 10,
        "A {} B {}",
        a.hits(),
        b.hits()
    );
    assert_eq!(
        blocking(|| proxy.count_lines(|l| l.contains("status=error"))),
        0
    );
}

const CHUNK: usize = 256 * 1024;
const CHUNKS: usize = 200; // 50 MiB
const GATE_AT: usize = CHUNKS / 2;

/// Chunk `k` of the download: a fixed pattern stamped with its index, so
/// that a lost, repeated or reordered chunk is noticed.
fn chunk(base: &Bytes, k: usize) -> Bytes {
    let mut c = BytesMut::from(&base[..]);
    c[..8].copy_from_slice(&(k as u64).to_le_bytes());
    c.freeze()
}

fn pattern() -> Bytes {
    (0..CHUNK)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_and_download_survive_reload() {
    let base = pattern();
    let gate = Arc::new(Notify::new());
    let download = {
        let (base, gate) = (base.clone(), Arc::clone(&gate));
        move || {
            let (base, gate) = (base.clone(), Arc::clone(&gate));
            async move {
                let stream = futures_util::stream::unfold(0usize, move |k| {
                    let (base, gate) = (base.clone(), Arc::clone(&gate));
                    async move {
                        if k == CHUNKS {
                            return None;
                        }
                        if k == GATE_AT {
                            // Hold the second half until the test has reloaded.
                            gate.notified().await;
                        }
                        Some((Ok::<_, std::io::Error>(chunk(&base, k)), k + 1))
                    }
                });
                Body::from_stream(stream)
            }
        }
    };
    let a = Upstream::start(
        Router::new()
            .route("/ws", get(ws_echo))
            .route("/big", get(download)),
    )
    .await;
    let b = Upstream::echo("B").await;
    let proxy = ProxyProcess::start(&site_config(&a));

    let mut ws = ws_connect(proxy.addr, &format!("ws://{HOST}/ws")).await;
    ws_roundtrip(&mut ws, "before the reload").await;

    let client = client_to(proxy.addr, false);
    let url = format!("http://{HOST}:{}/big", proxy.addr.port());
    let response = client
        .get(url.parse().expect("url"))
        .await
        .expect("download");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0usize;
    let mut pending = BytesMut::new();
    let mut check = |data: &[u8], received: &mut usize| {
        pending.extend_from_slice(data);
        while pending.len() >= CHUNK {
            let got = pending.split_to(CHUNK);
            let k = *received / CHUNK;
            assert!(got[..] == chunk(&base, k)[..], "chunk {k} differs");
            *received += CHUNK;
        }
    };
    while received < GATE_AT * CHUNK {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("download progress within 20 s")
            .expect("first half ends early")
            .expect("frame");
        if let Ok(data) = frame.into_data() {
            check(&data, &mut received);
        }
    }

    // Both streams are open; the site moves to another upstream.
    let line = blocking(|| proxy.reload_with(&site_config(&b)));
    assert!(line.contains("status=success"), "{line}");
    assert_eq!(
        served_by(&client_to(proxy.addr, false), proxy.addr).await,
        "B"
    );
    ws_roundtrip(&mut ws, "after the reload").await;

    gate.notify_one();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(20), body.frame())
        .await
        .expect("download progress within 20 s")
    {
        if let Ok(data) = frame.expect("frame").into_data() {
            check(&data, &mut received);
        }
    }
    assert!(pending.is_empty(), "{} trailing bytes", pending.len());
    assert_eq!(received, CHUNKS * CHUNK);

    ws_roundtrip(&mut ws, "still open").await;
    ws.close(None).await.expect("ws close");
}

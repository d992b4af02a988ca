//! Large bodies stream through without being buffered: 256 MiB each way
//! while the proxy's peak RSS stays small. Heavy: runs alone (see
//! `.config/nextest.toml`).

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::{get, post};
use bytes::Bytes;
use common::{ProxyProcess, Upstream, config};
use futures_util::StreamExt;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

const SIZE: usize = 256 << 20;
const CHUNK: usize = 64 << 10;
const RSS_LIMIT_KIB: u64 = 64 << 10;

/// Distinct chunks, cycled; a prime count so that a dropped, repeated or
/// reordered chunk changes the hash.
const DISTINCT: usize = 61;

static CHUNKS: std::sync::LazyLock<Vec<Bytes>> = std::sync::LazyLock::new(|| {
    (0..DISTINCT)
        .map(|i| {
            let buf: Vec<u8> = (0..CHUNK).map(|j| ((i * 31 + j * 7) % 251) as u8).collect();
            Bytes::from(buf)
        })
        .collect()
});

fn chunk(i: usize) -> Bytes {
    CHUNKS[i % DISTINCT].clone()
}

fn expected_hash() -> String {
    let mut h = Sha256::new();
    for i in 0..SIZE / CHUNK {
        h.update(chunk(i));
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn body_stream() -> Body {
    let stream =
        futures_util::stream::iter(0..SIZE / CHUNK).map(|i| Ok::<_, std::io::Error>(chunk(i)));
    Body::from_stream(stream)
}

async fn hash_body(body: Body) -> String {
    let mut h = Sha256::new();
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        h.update(frame.expect("body frame"));
    }
    hex(&h.finalize())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_256_mib_each_way_with_bounded_memory() {
    let upstream = Upstream::start(
        Router::new()
            .route(
                "/upload",
                post(|req: Request| async move { hash_body(req.into_body()).await }),
            )
            .route("/download", get(|| async { body_stream() })),
    )
    .await;
    let proxy = ProxyProcess::start(&config(&[("big.test", &upstream.url())], "", ""));
    let expected = expected_hash();
    let client = common::http1_client();

    let req = http::Request::post(format!("http://{}/upload", proxy.addr))
        .header("host", "big.test")
        .body(body_stream())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(120), client.request(req))
        .await
        .expect("upload within 120 s")
        .expect("upload response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), expected, "upload hash");

    let req = http::Request::get(format!("http://{}/download", proxy.addr))
        .header("host", "big.test")
        .body(Body::empty())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(120), client.request(req))
        .await
        .expect("download within 120 s")
        .expect("download response");
    assert_eq!(resp.status(), 200);
    let got = tokio::time::timeout(
        Duration::from_secs(120),
        hash_body(Body::new(resp.into_body())),
    )
    .await
    .expect("download body within 120 s");
    assert_eq!(got, expected, "download hash");

    let (peak, _) = proxy.rss_kib();
    eprintln!("proxy peak RSS while streaming 2 x 256 MiB: {peak} KiB");
    assert!(
        peak < RSS_LIMIT_KIB,
        "peak RSS {peak} KiB exceeds {RSS_LIMIT_KIB} KiB"
    );
}

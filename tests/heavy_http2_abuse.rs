//! HTTP/2 abuse, frame by frame: the advertised limits, too many streams,
//! oversized header blocks, rapid reset (CVE-2023-44487) and CONTINUATION
//! floods (CVE-2024-27316 and relatives). Each attack must end quickly,
//! cost little CPU, reach the upstream at most within the advertised
//! limits, and leave `/health` answering and memory where it was. Heavy:
//! runs alone (see `.config/nextest.toml`).

mod common;

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use common::hostile::{self, health};
use common::{ProxyProcess, Upstream, config, h2frames};
use h2frames::Frame;
use tokio::io::AsyncWriteExt;

/// An upstream whose `/slow` answers after a while, so streams stay open.
async fn upstream() -> Upstream {
    Upstream::start(
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "slow"
                }),
            )
            .fallback(|| async { "ok" }),
    )
    .await
}

fn start(upstream: &Upstream) -> ProxyProcess {
    ProxyProcess::start(&config(&[("a.test", &upstream.url())], "", ""))
}

/// Sends `attack` on a fresh connection while reading, and returns the
/// frames up to the first GOAWAY (if one came within 10 s) and how long it
/// took.
async fn flood(proxy: &ProxyProcess, attack: Vec<u8>) -> (Vec<Frame>, Option<Frame>, Duration) {
    let stream = h2frames::connect(proxy.addr).await;
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    // The proxy may hang up in the middle of the flood.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&attack).await;
        write
    });
    let (frames, _) = h2frames::read_until(&mut read, Duration::from_secs(10), |f| {
        f.kind == h2frames::GOAWAY
    })
    .await;
    let elapsed = started.elapsed();
    writer.abort();
    let goaway = frames.iter().find(|f| f.kind == h2frames::GOAWAY).cloned();
    (frames, goaway, elapsed)
}

#[tokio::test]
async fn heavy_advertised_limits_and_excess_streams() {
    let up = upstream().await;
    let proxy = start(&up);
    let mut stream = h2frames::connect(proxy.addr).await;
    let (frames, found) = h2frames::read_until(&mut stream, Duration::from_secs(2), |f| {
        f.kind == h2frames::SETTINGS && f.flags & h2frames::ACK == 0
    })
    .await;
    assert!(found, "no SETTINGS from the proxy: {frames:?}");
    let settings = frames.last().expect("settings").settings();
    let get_setting = |id| settings.iter().find(|(k, _)| *k == id).map(|(_, v)| *v);
    assert_eq!(
        get_setting(h2frames::SETTINGS_MAX_CONCURRENT_STREAMS),
        Some(128),
        "{settings:?}"
    );
    assert_eq!(
        get_setting(h2frames::SETTINGS_MAX_HEADER_LIST_SIZE),
        Some(65536),
        "{settings:?}"
    );

    // Open 200 slow streams at once: beyond 128 they are refused, and the
    // upstream never sees more than 128.
    let mut burst = h2frames::frame(h2frames::SETTINGS, h2frames::ACK, 0, &[]);
    for i in 0..200 {
        burst.extend(h2frames::get(1 + 2 * i, "a.test", "/slow"));
    }
    stream.write_all(&burst).await.expect("burst");
    let mut refused = 0;
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused + answered < 200 && Instant::now() < deadline {
        let Some(frame) = h2frames::read_frame(&mut stream, Duration::from_secs(5)).await else {
            break;
        };
        match frame.kind {
            h2frames::RST_STREAM => refused += 1,
            h2frames::HEADERS => answered += 1,
            h2frames::GOAWAY => panic!("GOAWAY {:?}", frame.goaway()),
            _ => {}
        }
    }
    eprintln!("200 concurrent streams: {answered} answered, {refused} refused");
    assert_eq!(answered + refused, 200);
    assert!(answered <= 128, "{answered} answered");
    assert!(up.hits() <= 128, "upstream saw {}", up.hits());
    health(proxy.addr, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn heavy_oversized_header_block_gets_431() {
    let up = upstream().await;
    let proxy = start(&up);
    let mut stream = h2frames::connect(proxy.addr).await;
    // 80 KiB of fields in one header block, split into CONTINUATIONs.
    let value = "b".repeat(1000);
    let fields: Vec<(String, &str)> = (0..80)
        .map(|i| (format!("x-{i}"), value.as_str()))
        .collect();
    let refs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let block = h2frames::request_block("a.test", "/big", &refs);
    let chunks: Vec<&[u8]> = block.chunks(16_000).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let flags = if last { h2frames::END_HEADERS } else { 0 };
        if i == 0 {
            out.extend(h2frames::frame(
                h2frames::HEADERS,
                flags | h2frames::END_STREAM,
                1,
                chunk,
            ));
        } else {
            out.extend(h2frames::frame(h2frames::CONTINUATION, flags, 1, chunk));
        }
    }
    out.extend(h2frames::get(3, "a.test", "/after"));
    stream.write_all(&out).await.expect("send");
    let mut statuses = Vec::new();
    while statuses.len() < 2 {
        let frame = h2frames::read_frame(&mut stream, Duration::from_secs(5))
            .await
            .expect("response frames");
        if frame.kind == h2frames::HEADERS {
            statuses.push((frame.stream, h2frames::status_of(&frame.payload)));
        }
    }
    statuses.sort();
    assert_eq!(statuses, [(1, Some(431)), (3, Some(200))]);
    assert_eq!(up.hits(), 1, "only /after reaches the upstream");
    health(proxy.addr, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn heavy_rapid_reset_ends_in_goaway() {
    let up = upstream().await;
    let proxy = start(&up);
    health(proxy.addr, Duration::from_secs(1)).await;
    let baseline = hostile::rss_now(&proxy);
    let cpu_before = hostile::cpu_ticks(proxy.pid());

    const STREAMS: u32 = 20_000;
    let mut attack = Vec::new();
    for i in 0..STREAMS {
        let id = 1 + 2 * i;
        attack.extend(h2frames::get(id, "a.test", "/slow"));
        attack.extend(h2frames::rst_stream(id, h2frames::CANCEL));
    }
    let (_, goaway, elapsed) = flood(&proxy, attack).await;
    let goaway = goaway.expect("no GOAWAY after a rapid-reset flood");
    let (last_stream, code) = goaway.goaway();
    let cpu = hostile::cpu_ticks(proxy.pid()) - cpu_before;
    eprintln!(
        "rapid reset: GOAWAY code {code} after {elapsed:?}, last stream {last_stream} of {}, proxy CPU {cpu} ticks",
        2 * STREAMS - 1
    );
    assert_eq!(code, h2frames::ENHANCE_YOUR_CALM);
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    // Cut off within a bounded number of streams, not at the end of the flood.
    assert!(last_stream < 1000, "processed up to stream {last_stream}");
    assert!(cpu < 100, "proxy used {cpu} ticks of CPU");
    assert!(u64::try_from(up.hits()).expect("hits") <= u64::from(last_stream / 2 + 1));
    health(proxy.addr, Duration::from_secs(1)).await;
    hostile::assert_rss_near(&proxy, baseline, "rapid reset");
}

#[tokio::test]
async fn heavy_continuation_flood_ends_in_goaway() {
    let up = upstream().await;
    let proxy = start(&up);
    health(proxy.addr, Duration::from_secs(1)).await;
    let baseline = hostile::rss_now(&proxy);
    let cpu_before = hostile::cpu_ticks(proxy.pid());

    // Two shapes: CONTINUATIONs carrying new fields (the header list grows)
    // and empty ones (only the frame count grows). END_HEADERS never comes.
    for (name, payload) in [("fields", true), ("empty", false)] {
        let mut attack = h2frames::frame(
            h2frames::HEADERS,
            h2frames::END_STREAM,
            1,
            &h2frames::request_block("a.test", "/", &[]),
        );
        for i in 0..100_000 {
            let fragment = if payload {
                let mut f = vec![0u8];
                let name = format!("x-{i}");
                f.push(u8::try_from(name.len()).expect("short"));
                f.extend_from_slice(name.as_bytes());
                f.push(1);
                f.push(b'v');
                f
            } else {
                Vec::new()
            };
            attack.extend(h2frames::frame(h2frames::CONTINUATION, 0, 1, &fragment));
        }
        let (_, goaway, elapsed) = flood(&proxy, attack).await;
        let goaway = goaway.unwrap_or_else(|| panic!("{name}: no GOAWAY"));
        let (_, code) = goaway.goaway();
        eprintln!("CONTINUATION flood ({name}): GOAWAY code {code} after {elapsed:?}");
        assert_eq!(code, h2frames::ENHANCE_YOUR_CALM, "{name}");
        assert!(elapsed < Duration::from_secs(2), "{name}: took {elapsed:?}");
    }
    let cpu = hostile::cpu_ticks(proxy.pid()) - cpu_before;
    eprintln!("CONTINUATION floods: proxy CPU {cpu} ticks");
    assert!(cpu < 100, "proxy used {cpu} ticks of CPU");
    assert_eq!(up.hits(), 0);
    health(proxy.addr, Duration::from_secs(1)).await;
    hostile::assert_rss_near(&proxy, baseline, "CONTINUATION floods");
}

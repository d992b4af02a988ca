//! Clients that are slow or send too much: they are cut off, and everyone
//! else is still served meanwhile.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use bytes::Bytes;
use common::hostile::{self, Recorder, health};
use common::{ProxyProcess, Upstream, config, h2frames, status_of};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn slowloris_is_cut_off_after_header_read_timeout() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url())],
        "header_read_timeout_secs = 2",
        "",
    ));
    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_after = None;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // Meanwhile, a normal client is served promptly.
        let t = Instant::now();
        assert_eq!(common::get(proxy.addr, "a.test", "/").await.status, 200);
        assert!(t.elapsed() < Duration::from_secs(1));
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => {
                // hyper may answer 408 before closing; that is fine too.
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            }
            Err(_) => {}
        }
    }
    let closed_after = closed_after.expect("slow client was never cut off");
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(5),
        "cut off after {closed_after:?}"
    );
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let mut req = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 << 10));
    req.extend_from_slice(b"\r\n\r\n");
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    // The proxy may answer and close before the whole head is written.
    let _ = stream.write_all(&req).await;
    let out = common::read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(431), "{out}");

    let mut many = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let out = common::raw(proxy.addr, &many, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(431), "{out}");
    assert_eq!(a.hits(), 0);
    assert_eq!(common::get(proxy.addr, "a.test", "/").await.status, 200);
}

/// `max_header_bytes` (64 KiB by default) is exact whether the head
/// arrives in one piece or many: a head of that size is served, one byte
/// more gets 431, however much of the rest was already in the socket.
#[tokio::test]
async fn max_header_bytes_is_exact() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let head = |len: usize| {
        let start = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\nX-Pad: ".as_slice();
        let end = b"\r\n\r\n".as_slice();
        let mut head = start.to_vec();
        head.resize(len - end.len(), b'p');
        head.extend_from_slice(end);
        head
    };
    for (len, want) in [(65536, 200), (65537, 431), (80_000, 431)] {
        // At once, then in 4 KiB pieces.
        for piece in [len, 4096] {
            let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
            for chunk in head(len).chunks(piece) {
                // The proxy may answer and close before the whole head is in.
                if stream.write_all(chunk).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let out = common::read_until_close(&mut stream, Duration::from_secs(5)).await;
            assert_eq!(
                status_of(&out),
                Some(want),
                "{len} bytes in {piece}: {out:.200}"
            );
        }
    }
    assert_eq!(a.hits(), 2);
}

/// Reads until the server closes; returns what was read and when it closed
/// (`None` if it had not closed within `timeout`).
async fn read_to_close(stream: &mut TcpStream, timeout: Duration) -> (String, Option<Instant>) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test]
async fn stalled_request_body_is_cut_off_with_408() {
    let recorder = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &recorder.url())],
        "body_read_timeout_secs = 1",
        "",
    ));
    for (name, head, partial) in [
        (
            "content-length",
            "POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000\r\n\r\n",
            "0123456789",
        ),
        (
            "chunked",
            "POST /upload HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
            "a\r\n0123456789\r\n64\r\n01234",
        ),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream.write_all(head.as_bytes()).await.expect("head");
        stream.write_all(partial.as_bytes()).await.expect("part");
        let started = Instant::now();
        let (out, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(status_of(&out), Some(408), "{name}: {out}");
        let closed = closed.unwrap_or_else(|| panic!("{name}: connection left open"));
        let after = closed - started;
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(3),
            "{name}: cut off after {after:?}"
        );
        health(proxy.addr, Duration::from_secs(1)).await;
    }
    proxy.wait_for_count(|l| l.contains(" BODY_TIMEOUT "), 2, Duration::from_secs(2));
    proxy.wait_for_count(
        |l| l.contains(" REQUEST ") && l.contains("status=408"),
        2,
        Duration::from_secs(2),
    );
    // The upstream never received a complete body.
    for seen in recorder.seen() {
        assert_eq!(seen.body, None, "{seen:?}");
    }
}

#[tokio::test]
async fn slow_but_flowing_body_is_not_cut_off() {
    let recorder = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &recorder.url())],
        "body_read_timeout_secs = 1",
        "",
    ));
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 8\r\nConnection: close\r\n\r\n")
        .await
        .expect("head");
    // 8 bytes over 2.8 s: far longer than the timeout in total, but never a
    // gap as long as it.
    for byte in b"abcdefgh" {
        tokio::time::sleep(Duration::from_millis(400)).await;
        stream.write_all(&[*byte]).await.expect("body byte");
    }
    let (out, _) = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    let seen = recorder.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.as_deref(), Some(&b"abcdefgh"[..]));
}

/// Serves one request on a fresh connection with these `[server]`
/// settings, then leaves it idle: how long until the proxy closes it.
async fn idle_http1_close_after(server_extra: &str) -> Duration {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], server_extra, ""));
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let started = Instant::now();
    let (out, closed) = read_to_close(&mut stream, Duration::from_secs(8)).await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    health(proxy.addr, Duration::from_secs(1)).await;
    closed.expect("idle connection left open") - started
}

#[tokio::test]
async fn idle_http1_connection_closes_at_idle_timeout() {
    let after =
        idle_http1_close_after("idle_timeout_secs = 2\nheader_read_timeout_secs = 30").await;
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn idle_http1_connection_outlives_a_shorter_header_read_timeout() {
    let after = idle_http1_close_after("idle_timeout_secs = 3\nheader_read_timeout_secs = 1").await;
    assert!(
        after >= Duration::from_millis(2800) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
}

/// `[server]` settings where only the head timeout (1 s) can close a
/// connection within the tests below.
const HEAD_TIMEOUT_ONLY: &str = "idle_timeout_secs = 30\nheader_read_timeout_secs = 1";

/// Reads until the proxy closes `stream` and asserts that it did so at the
/// 1 s head timeout, counted from now. Returns what was read.
async fn closed_at_head_timeout(stream: &mut TcpStream, what: &str) -> String {
    let started = Instant::now();
    let (out, closed) = read_to_close(stream, Duration::from_secs(6)).await;
    let after = closed.unwrap_or_else(|| panic!("{what}: left open")) - started;
    assert!(
        after >= Duration::from_millis(800) && after < Duration::from_secs(3),
        "{what}: closed after {after:?}: {out}"
    );
    out
}

#[tokio::test]
async fn head_clock_starts_with_the_first_byte_of_a_later_head() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], HEAD_TIMEOUT_ONLY, ""));
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    let mut first = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&first).contains("site-a") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "closed before the response");
        first.extend_from_slice(&buf[..n]);
    }
    // Idle for longer than the head timeout: that is allowed.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a.")
        .await
        .expect("connection still open after idling");
    closed_at_head_timeout(&mut stream, "half a head").await;
    assert_eq!(
        a.hits(),
        1,
        "only the complete request reached the upstream"
    );
}

#[tokio::test]
async fn a_connection_that_never_sends_a_head_is_closed_at_header_read_timeout() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], HEAD_TIMEOUT_ONLY, ""));
    // Nothing at all; half an HTTP/2 preface (still undecided between the
    // two versions); half an HTTP/1 head.
    for start in [&b""[..], b"PRI * HTTP/2.0\r\n", b"GET / HT"] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream.write_all(start).await.expect("write");
        let out = closed_at_head_timeout(&mut stream, &format!("{start:?}")).await;
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 408"), "{out}");
    }
    health(proxy.addr, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn idle_http2_connection_closes_at_idle_timeout() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url())],
        "idle_timeout_secs = 2",
        "",
    ));
    // A well-behaved client: one request, then nothing but acknowledging.
    // Another that answers nothing at all and sends PINGs of its own, which
    // must not count as activity.
    for pinging in [false, true] {
        let mut stream = h2frames::connect(proxy.addr).await;
        stream
            .write_all(&h2frames::get(1, "a.test", "/"))
            .await
            .expect("request");
        let started = Instant::now();
        let mut goaway_at = None;
        let mut closed_at = None;
        let mut status = None;
        let deadline = started + Duration::from_secs(12);
        let mut next_ping = started;
        while Instant::now() < deadline {
            if pinging && Instant::now() >= next_ping {
                next_ping += Duration::from_millis(300);
                if stream
                    .write_all(&h2frames::frame(h2frames::PING, 0, 0, &[7; 8]))
                    .await
                    .is_err()
                {
                    closed_at = Some(Instant::now());
                    break;
                }
            }
            let Some(frame) = h2frames::read_frame(&mut stream, Duration::from_millis(300)).await
            else {
                // Either a quiet moment or the end: tell them apart.
                let mut probe = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(1), stream.peek(&mut probe)).await
                {
                    Ok(Ok(0) | Err(_)) => {
                        closed_at = Some(Instant::now());
                        break;
                    }
                    _ => continue,
                }
            };
            match frame.kind {
                h2frames::HEADERS if frame.stream == 1 => {
                    status = h2frames::status_of(&frame.payload);
                }
                h2frames::GOAWAY => {
                    goaway_at.get_or_insert(Instant::now());
                }
                h2frames::SETTINGS if frame.flags & h2frames::ACK == 0 && !pinging => {
                    let ack = h2frames::frame(h2frames::SETTINGS, h2frames::ACK, 0, &[]);
                    stream.write_all(&ack).await.ok();
                }
                h2frames::PING if frame.flags & h2frames::ACK == 0 && !pinging => {
                    let ack = h2frames::frame(h2frames::PING, h2frames::ACK, 0, &frame.payload);
                    stream.write_all(&ack).await.ok();
                }
                _ => {}
            }
        }
        assert_eq!(status, Some(200), "pinging={pinging}");
        let goaway = goaway_at.expect("no GOAWAY") - started;
        assert!(
            goaway >= Duration::from_millis(1800) && goaway < Duration::from_secs(4),
            "pinging={pinging}: GOAWAY after {goaway:?}"
        );
        // A client that does not finish the goodbye is dropped after a grace.
        let closed = closed_at.expect("idle HTTP/2 connection left open") - started;
        assert!(
            closed < Duration::from_secs(10),
            "pinging={pinging}: closed after {closed:?}"
        );
    }
    health(proxy.addr, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn client_that_stops_reading_does_not_pin_memory() {
    // The upstream streams without end and counts what it produced; hyper's
    // backpressure must stop it once the socket buffers are full.
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&produced);
    let upstream = Upstream::start(Router::new().route(
        "/endless",
        get(move || {
            let counter = Arc::clone(&counter);
            async move {
                let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                let stream = futures_util::stream::repeat(chunk).map(move |c| {
                    counter.fetch_add(c.len(), Ordering::Relaxed);
                    Ok::<_, std::io::Error>(c)
                });
                Body::from_stream(stream)
            }
        }),
    ))
    .await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &upstream.url())], "", ""));
    health(proxy.addr, Duration::from_secs(1)).await;
    let baseline = hostile::rss_now(&proxy);

    // Four over HTTP/1.1, four over HTTP/2 granting all the flow control
    // window there is: for both, the socket is what must hold the proxy back.
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream
            .write_all(b"GET /endless HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .expect("write");
        readers.push(stream);
        let mut stream = h2frames::connect_open_window(proxy.addr).await;
        stream
            .write_all(&h2frames::get(1, "a.test", "/endless"))
            .await
            .expect("write");
        readers.push(stream);
    }
    // Wait for the buffers to fill: production stops growing.
    let mut last = 0;
    let mut stable_since = Instant::now();
    let started = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(2) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "upstream kept producing: {} MiB",
            produced.load(Ordering::Relaxed) >> 20
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = produced.load(Ordering::Relaxed);
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    eprintln!(
        "8 clients not reading an endless body: upstream stalled after {} KiB",
        last >> 10
    );
    // What is in flight is what the kernel's socket buffers hold (a few
    // MiB per hop on loopback), not the body.
    assert!(last < 8 * (32 << 20), "produced {} MiB", last >> 20);
    let latency = health(proxy.addr, Duration::from_secs(1)).await;
    assert!(
        latency < Duration::from_millis(100),
        "/health took {latency:?}"
    );
    hostile::assert_rss_near(&proxy, baseline, "8 clients that stopped reading");
    drop(readers);
}

/// Sets its flag when dropped: the upstream's response stream is dropped
/// when the proxy gives up on delivering it.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn client_that_stops_reading_is_disconnected_after_idle_timeout() {
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let upstream = Upstream::start(Router::new().route(
        "/endless",
        get(move || {
            let guard = DropFlag(Arc::clone(&flag));
            async move {
                let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                let stream = futures_util::stream::repeat(chunk).map(move |c| {
                    let _alive = &guard;
                    Ok::<_, std::io::Error>(c)
                });
                Body::from_stream(stream)
            }
        }),
    ))
    .await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &upstream.url())],
        "idle_timeout_secs = 2",
        "",
    ));
    // HTTP/1.1: the socket fills up. HTTP/2: the client grants no flow
    // control window beyond the initial one, or all there is, so that the
    // socket fills up there too.
    for client in ["HTTP/1.1", "HTTP/2", "HTTP/2, open window"] {
        dropped.store(false, Ordering::SeqCst);
        let mut stream = match client {
            "HTTP/1.1" => TcpStream::connect(proxy.addr).await.expect("connect"),
            "HTTP/2" => h2frames::connect(proxy.addr).await,
            _ => h2frames::connect_open_window(proxy.addr).await,
        };
        let request = if client == "HTTP/1.1" {
            b"GET /endless HTTP/1.1\r\nHost: a.test\r\n\r\n".to_vec()
        } else {
            h2frames::get(1, "a.test", "/endless")
        };
        stream.write_all(&request).await.expect("write");
        let started = Instant::now();
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{client}: a client that reads nothing is still being served"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let after = started.elapsed();
        eprintln!("{client}: client that stopped reading cut off after {after:?}");
        assert!(after >= Duration::from_secs(2), "{client}: after {after:?}");
        drop(stream);
        health(proxy.addr, Duration::from_secs(1)).await;
    }
}

//! SIGTERM/SIGINT: the listener closes at once, what is in flight may
//! finish within `shutdown_timeout_secs`, what outlives it is cut, and a
//! second signal exits at once.

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::routing::get;
use common::lifecycle::{client_to, ws_connect, ws_echo, ws_roundtrip};
use common::{ProxyProcess, Upstream, config, field, read_until_close, status_of};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "app.test";
const SLOW_BODY: usize = 256 * 1024;

async fn upstream() -> Upstream {
    Upstream::start(
        Router::new()
            .route("/fast", get(|| async { "ok" }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "s".repeat(SLOW_BODY)
                }),
            )
            .route(
                "/hang",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    "too late"
                }),
            )
            .route(
                "/endless",
                get(|| async {
                    let piece = Bytes::from(vec![b'e'; 64 * 1024]);
                    let pieces = futures_util::stream::repeat_with(move || {
                        Ok::<_, std::io::Error>(piece.clone())
                    });
                    Body::from_stream(pieces)
                }),
            )
            .route("/ws", get(ws_echo)),
    )
    .await
}

fn start(upstream: &Upstream, shutdown_timeout_secs: u64) -> ProxyProcess {
    ProxyProcess::start(&config(
        &[(HOST, &upstream.url())],
        &format!("shutdown_timeout_secs = {shutdown_timeout_secs}"),
        "",
    ))
}

/// Sends a request on a new connection without waiting for the answer.
async fn send_raw(proxy: &ProxyProcess, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    stream
}

async fn wait_for_hits(upstream: &Upstream, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.hits() < n {
        assert!(
            Instant::now() < deadline,
            "upstream got {} of {n} requests",
            upstream.hits()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits for the line saying the listener is closed, and checks that a new
/// connection is refused by the kernel, not queued.
fn assert_listener_closed(proxy: &mut ProxyProcess) -> String {
    let line = proxy.wait_for_line(|l| l.contains(" LISTENERS_CLOSED "), Duration::from_secs(5));
    let refused = std::net::TcpStream::connect_timeout(&proxy.addr, Duration::from_secs(2))
        .expect_err("connection accepted after the stop signal");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish() {
    let upstream = upstream().await;
    let mut proxy = start(&upstream, 30);

    // An idle keep-alive connection, which must be closed right away.
    let mut idle = send_raw(&proxy, "/fast").await;
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\nok") {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("answer within 5 s")
            .expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    wait_for_hits(&upstream, 1).await;

    // In flight: one HTTP/1.1 request (keep-alive by default) and one
    // HTTP/2 request, both answered after 2 s.
    let mut h1 = send_raw(&proxy, "/slow").await;
    let h1 = tokio::spawn(async move { read_until_close(&mut h1, Duration::from_secs(20)).await });
    let client = client_to(proxy.addr, true);
    let url = format!("http://{HOST}:{}/slow", proxy.addr.port());
    let h2 = tokio::spawn(async move {
        let response = client
            .get(url.parse().expect("url"))
            .await
            .expect("h2 response");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("h2 body")
            .to_bytes();
        (status, body.len())
    });
    wait_for_hits(&upstream, 3).await;

    let signalled = Instant::now();
    proxy.signal("TERM");
    let line = assert_listener_closed(&mut proxy);
    // The idle connection may already be gone by then; the busy ones are not.
    let open: usize = field(&line, "connections").parse().expect("count");
    assert!((2..=3).contains(&open), "{line}");

    // Closed at once: before the busy connections have their answers.
    let closed = read_until_close(&mut idle, Duration::from_secs(5)).await;
    assert!(closed.is_empty(), "{closed}");
    assert!(
        !h1.is_finished(),
        "idle connection closed only after the drain"
    );

    let h1 = h1.await.expect("h1 task");
    assert_eq!(status_of(&h1), Some(200), "{h1}");
    let (head, body) = h1.split_once("\r\n\r\n").expect("response head");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(body.len(), SLOW_BODY);
    assert_eq!(
        h2.await.expect("h2 task"),
        (http::StatusCode::OK, SLOW_BODY)
    );

    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        signalled.elapsed()
    );
    let stopped = proxy.wait_for_line(|l| l.contains(" STOPPED "), Duration::from_secs(5));
    assert!(
        stopped.contains(" INFO STOPPED cut_connections=0 cut_tunnels=0 "),
        "{stopped}"
    );
    assert_eq!(upstream.hits(), 3);
}

/// The proxy, signalled at `signalled` with a 2 s shutdown timeout, exited
/// at the deadline and reports cutting one connection.
fn assert_one_cut_at_the_deadline(proxy: &mut ProxyProcess, signalled: Instant) {
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(6),
        "exit after {took:?}, expected at the 2 s deadline"
    );
    let stopped = proxy.wait_for_line(|l| l.contains(" STOPPED "), Duration::from_secs(5));
    assert!(
        stopped.contains(" WARN STOPPED cut_connections=1 cut_tunnels=0 "),
        "{stopped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_outliving_the_deadline_are_cut() {
    let upstream = upstream().await;
    let mut proxy = start(&upstream, 2);
    let mut hanging = send_raw(&proxy, "/hang").await;
    wait_for_hits(&upstream, 1).await;

    let signalled = Instant::now();
    proxy.signal("TERM");
    assert_listener_closed(&mut proxy);
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert_one_cut_at_the_deadline(&mut proxy, signalled);
    // The client gets no answer, only the closed connection.
    let out = read_until_close(&mut hanging, Duration::from_secs(5)).await;
    assert!(out.is_empty(), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_at_the_deadline() {
    let upstream = upstream().await;
    let mut proxy = start(&upstream, 2);
    // Asks for a body without end and never reads it: the proxy's writes
    // to it soon cannot go on.
    let _stuck = send_raw(&proxy, "/endless").await;
    wait_for_hits(&upstream, 1).await;

    let signalled = Instant::now();
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert_one_cut_at_the_deadline(&mut proxy, signalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_still_arriving_is_cut_at_the_deadline() {
    let upstream = upstream().await;
    let mut proxy = start(&upstream, 2);
    // A whole request, and behind it the start of another that is never
    // finished: once the first is answered, the proxy holds the second's
    // head, incomplete, long before its 10 s head timeout.
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let requests =
        format!("GET /fast HTTP/1.1\r\nHost: {HOST}\r\n\r\nGET /fast HTTP/1.1\r\nHost: {HOST}\r\n");
    stream.write_all(requests.as_bytes()).await.expect("write");
    let mut first = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        let mut piece = [0; 1024];
        while !first.ends_with(b"\r\n\r\nok") {
            let n = stream.read(&mut piece).await.expect("read");
            assert!(n > 0, "closed before the first answer");
            first.extend_from_slice(&piece[..n]);
        }
    })
    .await;
    assert!(answered.is_ok(), "{}", String::from_utf8_lossy(&first));

    let signalled = Instant::now();
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    assert_one_cut_at_the_deadline(&mut proxy, signalled);
    let rest = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert!(rest.is_empty(), "{rest}");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_websocket_gets_the_grace_period_then_is_cut() {
    let upstream = upstream().await;
    let mut proxy = start(&upstream, 2);
    let mut ws = ws_connect(proxy.addr, &format!("ws://{HOST}/ws")).await;
    ws_roundtrip(&mut ws, "before").await;

    let signalled = Instant::now();
    proxy.signal("TERM");
    let line = assert_listener_closed(&mut proxy);
    assert_eq!(field(&line, "tunnels"), "1", "{line}");
    // Still usable while the proxy drains.
    ws_roundtrip(&mut ws, "while draining").await;

    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "tunnel cut early, after {took:?}"
    );
    let stopped = proxy.wait_for_line(|l| l.contains(" STOPPED "), Duration::from_secs(5));
    assert!(
        stopped.contains(" WARN STOPPED cut_connections=1 cut_tunnels=1 "),
        "{stopped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_stop_signal_exits_at_once() {
    let upstream = upstream().await;
    let mut proxy = start(&upstream, 30);
    let _hanging = send_raw(&proxy, "/hang").await;
    wait_for_hits(&upstream, 1).await;

    proxy.signal("TERM");
    assert_listener_closed(&mut proxy);
    // A reload request during the drain changes nothing.
    proxy.signal("HUP");
    let again = Instant::now();
    proxy.signal("INT");
    assert_eq!(proxy.wait_exit(Duration::from_secs(5)), Some(1));
    assert!(
        again.elapsed() < Duration::from_secs(3),
        "took {:?}",
        again.elapsed()
    );
    let line = proxy.wait_for_line(|l| l.contains(" ABORTED "), Duration::from_secs(5));
    assert!(line.contains(" ERROR "), "{line}");
    assert_eq!(proxy.count_lines(|l| l.contains(" CONFIG_RELOAD ")), 0);
}

//! HTTP/1.1 on the wire, as a raw client sees it: how response bodies are
//! delimited, keep-alive and `Connection: close`, pipelined requests, and a
//! connection whose later requests carry bodies (which hyper serves once
//! the connection is handed to it) after bodiless ones.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::routing::{any, get};
use common::{NO_RATE_LIMIT, ProxyProcess, Upstream, config};
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the proxy may take to answer everything a test sends.
const BOUND: Duration = Duration::from_secs(5);
const KIB: usize = 1024;

/// One response as it came over the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    /// Field lines, names lowercased.
    fields: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits `raw` into responses, delimiting each body the way its head says
/// (`HEAD` answers, 204 and 304 have none). `heads` says, per response,
/// whether it answers a HEAD request.
fn responses(mut raw: &[u8], heads: &[bool]) -> Vec<Wire> {
    let mut out = Vec::new();
    for &is_head in heads {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(raw)));
        let head = std::str::from_utf8(&raw[..end]).expect("ASCII head");
        raw = &raw[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("status line");
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let fields: Vec<(String, String)> = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("field line");
                (name.to_ascii_lowercase(), value.trim().to_owned())
            })
            .collect();
        let mut wire = Wire {
            status,
            fields,
            body: Vec::new(),
        };
        if is_head || status == 204 || status == 304 {
            out.push(wire);
            continue;
        }
        if let Some(len) = wire.field("content-length") {
            let len: usize = len.parse().expect("a length");
            wire.body = raw[..len].to_vec();
            raw = &raw[len..];
        } else {
            assert_eq!(wire.field("transfer-encoding"), Some("chunked"), "{wire:?}");
            loop {
                let line_end = raw
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("size line");
                let size = std::str::from_utf8(&raw[..line_end]).expect("hex");
                let size = usize::from_str_radix(size, 16).expect("a chunk size");
                raw = &raw[line_end + 2..];
                if size == 0 {
                    assert!(raw.starts_with(b"\r\n"), "no trailers expected");
                    raw = &raw[2..];
                    break;
                }
                wire.body.extend_from_slice(&raw[..size]);
                assert_eq!(&raw[size..size + 2], b"\r\n", "chunk end");
                raw = &raw[size + 2..];
            }
        }
        out.push(wire);
    }
    assert!(
        raw.is_empty(),
        "unexpected bytes after the responses: {:?}",
        String::from_utf8_lossy(raw)
    );
    out
}

/// Sends `bytes` in one write and reads until the proxy closes.
async fn exchange(proxy: &ProxyProcess, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.write_all(bytes).await.expect("send");
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut raw))
        .await
        .expect("the proxy closes the connection in time")
        .expect("read");
    raw
}

/// An upstream that answers `/fixed` with 1 KiB of a known length,
/// `/stream` with 3 pieces of unknown length, `/empty` with 204, `/reason`
/// with a reason phrase of its own, and
/// anything else with the method, path and request body.
async fn upstream() -> Upstream {
    Upstream::start(
        Router::new()
            .route("/fixed", get(|| async { vec![b'f'; KIB] }))
            .route(
                "/stream",
                get(|| async {
                    let pieces = ["one ", "two ", "three"]
                        .map(|p| Ok::<_, std::io::Error>(Bytes::from_static(p.as_bytes())));
                    Body::from_stream(futures_util::stream::iter(pieces))
                }),
            )
            .route("/empty", get(|| async { StatusCode::NO_CONTENT }))
            .route(
                "/reason",
                get(|| async {
                    let mut response = axum::response::Response::new(Body::from("ok"));
                    response
                        .extensions_mut()
                        .insert(hyper::ext::ReasonPhrase::from_static(b"Fine Thanks"));
                    response
                }),
            )
            .fallback(any(|req: Request| async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.expect("request body").to_bytes();
                format!(
                    "{} {} {}",
                    parts.method,
                    parts.uri.path(),
                    String::from_utf8_lossy(&body)
                )
            })),
    )
    .await
}

async fn proxy_to(upstream: &Upstream) -> ProxyProcess {
    ProxyProcess::start(&config(&[("a.test", &upstream.url())], "", NO_RATE_LIMIT))
}

#[tokio::test]
async fn bodies_are_delimited_as_their_heads_say_on_one_connection() {
    let upstream = upstream().await;
    let proxy = proxy_to(&upstream).await;
    let raw = exchange(
        &proxy,
        concat!(
            "GET /fixed HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "HEAD /fixed HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "GET /stream HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "GET /empty HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "GET /fixed HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        )
        .as_bytes(),
    )
    .await;
    let got = responses(&raw, &[false, true, false, false, false]);

    assert_eq!(got[0].status, 200);
    assert_eq!(got[0].body, vec![b'f'; KIB]);
    assert!(got[0].field("date").is_some(), "{:?}", got[0]);

    // HEAD: the length of what GET would send, and no body.
    assert_eq!(got[1].status, 200);
    assert_eq!(got[1].field("content-length"), Some("1024"));

    // No length known in advance: chunked.
    assert_eq!(got[2].status, 200);
    assert_eq!(got[2].field("content-length"), None);
    assert_eq!(got[2].body, b"one two three");

    // 204: neither a length nor a body.
    assert_eq!(got[3].status, 204);
    assert_eq!(got[3].field("content-length"), None);
    assert_eq!(got[3].field("transfer-encoding"), None);

    assert_eq!(got[4].status, 200);
    assert_eq!(got[4].field("connection"), Some("close"));
    assert_eq!(got[4].body, vec![b'f'; KIB]);
    assert_eq!(upstream.hits(), 5);
}

#[tokio::test]
async fn requests_with_bodies_after_bodiless_ones_on_one_connection() {
    let upstream = upstream().await;
    let proxy = proxy_to(&upstream).await;
    let raw = exchange(
        &proxy,
        concat!(
            "GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "POST /second HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello",
            "GET /third HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "PUT /fourth HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n",
            "3\r\nabc\r\n0\r\n\r\n",
            "GET /fifth HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        )
        .as_bytes(),
    )
    .await;
    let got = responses(&raw, &[false; 5]);
    let bodies: Vec<String> = got
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{r:?}");
            String::from_utf8_lossy(&r.body).into_owned()
        })
        .collect();
    assert_eq!(
        bodies,
        [
            "GET /first ",
            "POST /second hello",
            "GET /third ",
            "PUT /fourth abc",
            "GET /fifth ",
        ]
    );
}

/// A client that half-closes (`shutdown(SHUT_WR)`, as `nc -N` does) is
/// taken to have gone, as hyper and nginx take it (nginx logs `499`): the
/// request being waited for when the end of its input shows is abandoned.
/// Requests it sent ahead of that one are still answered, in order.
#[tokio::test]
async fn a_half_close_abandons_only_the_request_it_is_noticed_behind() {
    // `/b` answers only long after the half-close has arrived, however
    // slowly the test runs: answered, it would show as a second response,
    // or as a read that outlasts `BOUND`. (Whether `/b` reaches the
    // upstream before the half-close is noticed is up to timing.)
    let upstream = Upstream::start(
        Router::new()
            .route("/a", get(|| async { "GET /a " }))
            .route(
                "/b",
                get(|| async {
                    tokio::time::sleep(BOUND * 2).await;
                    "late"
                }),
            ),
    )
    .await;
    let proxy = proxy_to(&upstream).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(
            concat!(
                "GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n",
                "GET /b HTTP/1.1\r\nHost: a.test\r\n\r\n",
            )
            .as_bytes(),
        )
        .await
        .expect("send");
    stream.shutdown().await.expect("shutdown");
    let raw = read_to_close(&mut stream).await;
    let got = responses(&raw, &[false]);
    assert_eq!(got[0].body, b"GET /a ");
}

#[tokio::test]
async fn a_head_that_arrives_in_pieces_is_answered() {
    let upstream = upstream().await;
    let proxy = proxy_to(&upstream).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = b"GET /pieces HTTP/1.1\r\nHost: a.test\r\nUser-Agent: slow-but-fine\r\nConnection: close\r\n\r\n";
    for piece in head.chunks(7) {
        stream.write_all(piece).await.expect("send");
        stream.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let raw = read_to_close(&mut stream).await;
    let got = responses(&raw, &[false]);
    assert_eq!(got[0].status, 200);
    assert_eq!(got[0].body, b"GET /pieces ");
}

#[tokio::test]
async fn responses_a_client_takes_late_arrive_whole_and_in_order() {
    let upstream = upstream().await;
    let proxy = proxy_to(&upstream).await;
    // Far more response bytes than a small receive window and the proxy's
    // send buffer hold, and a client that starts reading only after a
    // while: the proxy's writes wait for it. (Which write first finds the
    // socket full is up to the kernel; a unit test in `h1` covers a
    // response taken in part.)
    const REQUESTS: usize = 192;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4 * 1024).expect("SO_RCVBUF");
    let mut stream = socket.connect(proxy.addr).await.expect("connect");
    let path = |i: usize| match i % 3 {
        0 => "/fixed".to_owned(),
        1 => "/stream".to_owned(),
        _ => format!("/echo{i}"),
    };
    let mut requests = String::new();
    for i in 0..REQUESTS {
        requests.push_str(&format!("GET {} HTTP/1.1\r\nHost: a.test\r\n\r\n", path(i)));
    }
    requests.push_str("GET /last HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    stream.write_all(requests.as_bytes()).await.expect("send");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let raw = read_to_close(&mut stream).await;
    let got = responses(&raw, &[false; REQUESTS + 1]);
    for (i, response) in got[..REQUESTS].iter().enumerate() {
        assert_eq!(response.status, 200, "response {i}");
        let want = match i % 3 {
            0 => vec![b'f'; KIB],
            1 => b"one two three".to_vec(),
            _ => format!("GET {} ", path(i)).into_bytes(),
        };
        assert_eq!(response.body, want, "response {i}");
    }
    assert_eq!(got[REQUESTS].body, b"GET /last ");
}

#[tokio::test]
async fn keep_alive_connection_serves_requests_sent_one_after_another() {
    let upstream = upstream().await;
    let proxy = proxy_to(&upstream).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    for i in 0..3 {
        let request = format!("GET /n{i} HTTP/1.1\r\nHost: a.test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let expected = format!("GET /n{i} ");
        let mut raw = Vec::new();
        let mut buf = [0; 4096];
        let wire = tokio::time::timeout(BOUND, async {
            loop {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed after {i} responses");
                raw.extend_from_slice(&buf[..n]);
                if raw.ends_with(expected.as_bytes()) {
                    return responses(&raw, &[false]).remove(0);
                }
            }
        })
        .await
        .expect("a response in time");
        assert_eq!(wire.status, 200);
        assert_eq!(wire.field("connection"), None, "{wire:?}");
    }
}

/// Waits (bounded) until `done` holds.
async fn wait_for(what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(BOUND, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not in time"));
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_client_that_leaves_before_its_response_cancels_the_upstream_request() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let slow = Upstream::start(Router::new().route(
        "/slow",
        get(move || {
            let flag = DropFlag(Arc::clone(&flag));
            async move {
                let _flag = flag;
                tokio::time::sleep(BOUND * 2).await;
                "late"
            }
        }),
    ))
    .await;
    let proxy = proxy_to(&slow).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("send");
    wait_for("the request reaches the upstream", || slow.hits() > 0).await;
    drop(stream);
    // The proxy gives up the upstream exchange, so the upstream's handler
    // is dropped long before it would have answered.
    wait_for("the upstream request is cancelled", || {
        dropped.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn a_client_that_leaves_during_a_quiet_response_body_releases_it() {
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&dropped);
    let quiet = Upstream::start(Router::new().route(
        "/events",
        get(move || {
            let flag = DropFlag(Arc::clone(&flag));
            async move {
                // One event, then nothing for as long as the body lives.
                let first = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(Bytes::from_static(b"event: one"))
                });
                let quiet = futures_util::stream::poll_fn(move |_| {
                    let _held = &flag;
                    std::task::Poll::Pending
                });
                Body::from_stream(futures_util::StreamExt::chain(first, quiet))
            }
        }),
    ))
    .await;
    let proxy = proxy_to(&quiet).await;
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("send");
    let mut raw = Vec::new();
    let mut buf = [0; 4096];
    tokio::time::timeout(BOUND, async {
        while !raw.windows(10).any(|w| w == b"event: one") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed early");
            raw.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first event in time");
    drop(stream);
    wait_for("the upstream response is given up", || {
        dropped.load(Ordering::SeqCst)
    })
    .await;
}

#[tokio::test]
async fn an_upstream_reason_phrase_is_passed_on() {
    let upstream = upstream().await;
    let proxy = proxy_to(&upstream).await;
    let raw = exchange(
        &proxy,
        b"GET /reason HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        raw.starts_with(b"HTTP/1.1 200 Fine Thanks\r\n"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
}

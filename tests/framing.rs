//! Request smuggling: every request whose framing is ambiguous or malformed
//! is refused and its connection closed, and nothing written after it on
//! that connection reaches an upstream. Each case is sent over a raw socket
//! followed by a second request (`/smuggled`) that must never arrive.

mod common;

use std::time::{Duration, Instant};

use common::hostile::{Recorder, health};
use common::{ProxyProcess, config, status_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n";
/// How long the proxy may take to answer and close.
const BOUND: Duration = Duration::from_secs(2);

struct Outcome {
    text: String,
    closed: bool,
    elapsed: Duration,
}

/// Sends `head` + `body` + a smuggled request, then reads until the proxy
/// closes the connection (or 5 s pass).
async fn attempt(proxy: &ProxyProcess, head: &str, body: &str) -> Outcome {
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    let bytes = format!("{head}\r\n{body}{SMUGGLED}");
    // The proxy may close before reading everything.
    let _ = stream.write_all(bytes.as_bytes()).await;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .is_ok();
    Outcome {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
        elapsed: started.elapsed(),
    }
}

async fn assert_refused(proxy: &ProxyProcess, name: &str, head: &str, body: &str, status: u16) {
    let out = attempt(proxy, head, body).await;
    assert_eq!(status_of(&out.text), Some(status), "{name}: {}", out.text);
    assert_eq!(
        out.text.matches("HTTP/1.1 ").count(),
        1,
        "{name}: one response only: {}",
        out.text
    );
    assert!(out.closed, "{name}: connection left open");
    assert!(out.elapsed < BOUND, "{name}: took {:?}", out.elapsed);
}

/// `/health` still answers, and no request reached the upstream.
async fn assert_nothing_forwarded(proxy: &ProxyProcess, recorder: &Recorder) {
    health(proxy.addr, BOUND).await;
    assert_eq!(
        recorder.paths(),
        Vec::<String>::new(),
        "reached the upstream"
    );
}

fn start(recorder: &Recorder) -> ProxyProcess {
    ProxyProcess::start(&config(&[("a.test", &recorder.url())], "", ""))
}

#[tokio::test]
async fn malformed_or_conflicting_content_length_is_refused() {
    let recorder = Recorder::start().await;
    let proxy = start(&recorder);
    let post = "POST /upload HTTP/1.1\r\nHost: a.test\r\n";
    for (name, fields) in [
        ("sign", "Content-Length: +5\r\n"),
        ("list", "Content-Length: 1,2\r\n"),
        ("repeated in a list", "Content-Length: 5, 5\r\n"),
        (
            "two differing",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
        ),
        ("negative", "Content-Length: -1\r\n"),
        ("hex", "Content-Length: 0x5\r\n"),
        ("inner space", "Content-Length: 5 5\r\n"),
        ("huge", "Content-Length: 99999999999999999999999\r\n"),
    ] {
        assert_refused(&proxy, name, &format!("{post}{fields}"), "hello", 400).await;
    }
    assert_nothing_forwarded(&proxy, &recorder).await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let recorder = Recorder::start().await;
    let mut proxy = start(&recorder);
    let post = "POST /upload HTTP/1.1\r\nHost: a.test\r\n";
    for (name, fields) in [
        (
            "CL first",
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "TE first",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        ),
        (
            "other spelling",
            "transfer-encoding: CHUNKED\r\ncontent-length: 4\r\n",
        ),
        (
            "codings list",
            "Content-Length: 4\r\nTransfer-Encoding: gzip, chunked\r\n",
        ),
        (
            "zero length",
            "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        assert_refused(
            &proxy,
            name,
            &format!("{post}{fields}"),
            "5\r\nhello\r\n0\r\n\r\n",
            400,
        )
        .await;
    }
    // Two equal lengths are not ambiguous by RFC 9110 §8.6, but nginx
    // refuses them too: an upstream that took the first of two differing
    // values is how such pairs get exploited.
    assert_refused(
        &proxy,
        "repeated",
        &format!("{post}Content-Length: 5\r\nContent-Length: 5\r\n"),
        "hello",
        400,
    )
    .await;
    assert_nothing_forwarded(&proxy, &recorder).await;
    let line = proxy.wait_for_line(
        |l| l.contains("FRAMING_REFUSED") && l.contains("repeated content-length"),
        BOUND,
    );
    assert!(line.contains("client_ip=127.0.0.1"), "{line}");
    let refused = proxy
        .lines()
        .iter()
        .filter(|l| l.contains("FRAMING_REFUSED"))
        .count();
    assert_eq!(refused, 6, "one line per refused request");
}

#[tokio::test]
async fn pipelined_requests_before_a_refused_one_are_answered() {
    let recorder = Recorder::start().await;
    let proxy = start(&recorder);
    // A body that looks like a conflicting head must stay a body: only
    // heads are inspected.
    let lookalike = "GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    let first = format!(
        "POST /one HTTP/1.1\r\nHost: a.test\r\nContent-Length: {}\r\n\r\n{lookalike}",
        lookalike.len()
    );
    let second = "POST /two HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n";
    let third = "POST /three HTTP/1.1\r\nHost: a.test\r\n\
                 Content-Length: 4\r\nTransfer-Encoding: chunked\r\n";
    let out = attempt(
        &proxy,
        &format!("{first}{second}{third}"),
        "5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let statuses: Vec<&str> = out
        .text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &out.text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "400"], "{}", out.text);
    assert!(out.closed, "connection left open");
    let seen = recorder.seen();
    let got: Vec<(&str, Option<&[u8]>)> = seen
        .iter()
        .map(|s| (s.path.as_str(), s.body.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            ("/one", Some(lookalike.as_bytes())),
            ("/two", Some(&b"abcde"[..]))
        ]
    );
}

#[tokio::test]
async fn a_conflicting_head_sent_in_pieces_is_refused() {
    let recorder = Recorder::start().await;
    let proxy = start(&recorder);
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
    );
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    for piece in request.as_bytes().chunks(7) {
        if stream.write_all(piece).await.is_err() {
            break;
        }
        // Let each piece leave as its own segment.
        tokio::task::yield_now().await;
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&text), Some(400), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert_nothing_forwarded(&proxy, &recorder).await;
}

#[tokio::test]
async fn unknown_transfer_codings_are_refused() {
    let recorder = Recorder::start().await;
    let mut proxy = start(&recorder);
    let post = "POST /upload HTTP/1.1\r\nHost: a.test\r\n";
    let chunked = "5\r\nhello\r\n0\r\n\r\n";
    // hyper refuses codings that do not end in `chunked`.
    for (name, head) in [
        ("gzip", format!("{post}Transfer-Encoding: gzip\r\n")),
        ("identity", format!("{post}Transfer-Encoding: identity\r\n")),
        (
            "lookalike",
            format!("{post}Transfer-Encoding: xchunked\r\n"),
        ),
        (
            "HTTP/1.0",
            "POST /upload HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n".to_owned(),
        ),
    ] {
        assert_refused(&proxy, name, &head, chunked, 400).await;
    }
    // The proxy refuses chunked combined with anything else: the other
    // coding would be lost on the way to the upstream.
    for (name, head) in [
        (
            "gzip, chunked",
            format!("{post}Transfer-Encoding: gzip, chunked\r\n"),
        ),
        (
            "chunked twice",
            format!("{post}Transfer-Encoding: chunked, chunked\r\n"),
        ),
        (
            "two fields",
            format!("{post}Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n"),
        ),
    ] {
        assert_refused(&proxy, name, &head, chunked, 501).await;
    }
    proxy.wait_for_line(
        |l| l.contains(" REQUEST ") && l.contains("status=501"),
        BOUND,
    );
    assert_nothing_forwarded(&proxy, &recorder).await;
}

#[tokio::test]
async fn malformed_header_lines_are_refused() {
    let recorder = Recorder::start().await;
    let proxy = start(&recorder);
    let get = "GET / HTTP/1.1\r\nHost: a.test\r\n";
    for (name, head) in [
        ("obs-fold space", format!("{get}X-A: one\r\n two\r\n")),
        ("obs-fold tab", format!("{get}X-A: one\r\n\ttwo\r\n")),
        ("space before colon", format!("{get}X-A : one\r\n")),
        (
            "space before colon on TE",
            "POST / HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n".to_owned(),
        ),
        ("NUL in value", format!("{get}X-A: o\0ne\r\n")),
        ("CR in value", format!("{get}X-A: o\rne\r\n")),
        ("control in value", format!("{get}X-A: o\x01ne\r\n")),
        ("LF in name", format!("{get}X-\nA: one\r\n")),
        (
            "folded first field",
            "GET / HTTP/1.1\r\n Host: a.test\r\n".to_owned(),
        ),
        ("no colon", format!("{get}X-A one\r\n")),
    ] {
        assert_refused(&proxy, name, &head, "", 400).await;
    }
    assert_nothing_forwarded(&proxy, &recorder).await;
}

#[tokio::test]
async fn oversized_heads_get_431() {
    let recorder = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &recorder.url())],
        "max_header_bytes = 16384",
        "",
    ));
    let get = "GET / HTTP/1.1\r\nHost: a.test\r\n";
    let big = format!("{get}X-Big: {}\r\n", "a".repeat(20 << 10));
    assert_refused(&proxy, "over max_header_bytes", &big, "", 431).await;
    let mut many = get.to_owned();
    for i in 0..100 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    assert_refused(&proxy, "101 fields", &many, "", 431).await;
    assert_nothing_forwarded(&proxy, &recorder).await;

    // Within both limits is fine (the upstream, hyper too, allows 100
    // fields, including the four forwarding headers the proxy adds).
    let mut fine = get.to_owned();
    for i in 0..90 {
        fine.push_str(&format!("X-H{i}: v\r\n"));
    }
    fine.push_str("Connection: close\r\n");
    let out = attempt(&proxy, &fine, "").await;
    assert_eq!(status_of(&out.text), Some(200), "{}", out.text);
}

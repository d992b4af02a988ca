//! Header rewriting toward the upstream, and upstream failures.

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use axum::Router;
use axum::routing::any;
use common::{ProxyProcess, Upstream, config, field, raw, status_of};

#[tokio::test]
async fn hop_by_hop_removed_and_forwarding_headers_set() {
    let a = Upstream::echo("site-a").await;
    let mut proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let req = "GET /h HTTP/1.1\r\nHost: a.test\r\nConnection: close, X-Hop\r\nX-Hop: secret\r\n\
               Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
               Upgrade: h2c\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
               X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\nX-Custom: kept\r\n\r\n";
    let echoed = echoed_by_site_a(proxy.addr, req).await;
    for gone in [
        "x-hop:",
        "keep-alive:",
        "proxy-connection:",
        "te:",
        "upgrade:",
        "connection: close",
    ] {
        assert!(
            !echoed.lines().any(|l| l.starts_with(gone)),
            "{gone} forwarded:\n{echoed}"
        );
    }
    assert_has_lines(
        &echoed,
        &[
            "host: a.test",
            "x-custom: kept",
            "x-forwarded-for: 6.6.6.6, 127.0.0.1",
            "x-real-ip: 127.0.0.1",
            "x-forwarded-proto: http",
            "x-forwarded-host: a.test",
        ],
    );
    assert_forwarded_once(&echoed);
    let line = proxy.wait_for_line(
        |l| l.contains(" REQUEST ") && l.contains("path=/h "),
        Duration::from_secs(5),
    );
    assert_eq!(field(&line, "client_ip"), "127.0.0.1");
}

/// The forwarding fields replace what a client sent, whichever way the
/// request is served: a plain GET (the proxy's own HTTP/1.1 on both
/// sides), a GET whose `Connection` names a field (hyper's server, the
/// proxy's own client), and a POST with a body (hyper's on both sides).
#[tokio::test]
async fn client_forwarding_fields_are_replaced_on_every_path() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let spoofed = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
                   X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n\
                   x-forwarded-for: 7.7.7.7\r\nX-Custom: kept\r\n";
    for (start, connection, body) in [
        ("GET /g", "close", ""),
        ("GET /h", "close, X-Hop", ""),
        ("POST /p", "close", "Content-Length: 2\r\n\r\nhi"),
    ] {
        let req = format!(
            "{start} HTTP/1.1\r\nHost: a.test\r\nConnection: {connection}\r\n{spoofed}{}",
            if body.is_empty() { "\r\n" } else { body }
        );
        let echoed = echoed_by_site_a(proxy.addr, &req).await;
        assert_has_lines(
            &echoed,
            &[
                "x-custom: kept",
                "x-forwarded-for: 6.6.6.6, 7.7.7.7, 127.0.0.1",
                "x-real-ip: 127.0.0.1",
                "x-forwarded-proto: http",
                "x-forwarded-host: a.test",
            ],
        );
        assert_forwarded_once(&echoed);
    }
}

/// Asserts that each forwarding field reached the upstream once.
fn assert_forwarded_once(echoed: &str) {
    for name in [
        "x-forwarded-for:",
        "x-real-ip:",
        "x-forwarded-proto:",
        "x-forwarded-host:",
    ] {
        let count = echoed.lines().filter(|l| l.starts_with(name)).count();
        assert_eq!(count, 1, "{name} {count} times:\n{echoed}");
    }
}

/// Sends `req` through the proxy at `addr` to the echoing upstream
/// `site-a`, and returns the request as it arrived there, lower-cased.
async fn echoed_by_site_a(addr: std::net::SocketAddr, req: &str) -> String {
    let out = raw(addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    out.split("site-a\n")
        .nth(1)
        .expect("echo body")
        .to_ascii_lowercase()
}

/// Asserts that each of `expected` is one whole line of `text`.
fn assert_has_lines(text: &str, expected: &[&str]) {
    for expected in expected {
        assert!(
            text.lines().any(|l| l == *expected),
            "missing {expected}:\n{text}"
        );
    }
}

#[tokio::test]
async fn client_behind_a_trusted_proxy_is_the_real_ip() {
    let a = Upstream::echo("site-a").await;
    let mut proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url())],
        "",
        "[proxy]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    ));
    let req = "GET /t HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\
               X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n\r\n";
    let out = raw(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    let echoed = out.split("site-a\n").nth(1).expect("echo body");
    assert_has_lines(
        echoed,
        &[
            "x-forwarded-for: 6.6.6.6, 203.0.113.7, 127.0.0.1",
            "x-real-ip: 203.0.113.7",
        ],
    );
    let line = proxy.wait_for_line(
        |l| l.contains(" REQUEST ") && l.contains("path=/t "),
        Duration::from_secs(5),
    );
    assert_eq!(field(&line, "client_ip"), "203.0.113.7");
}

#[tokio::test]
async fn upstream_down_is_bad_gateway() {
    // A port that was free a moment ago: nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let mut proxy = ProxyProcess::start(&config(&[("a.test", &format!("http://{dead}"))], "", ""));
    let r = common::get(proxy.addr, "a.test", "/").await;
    assert_eq!(r.status, 502);
    let line = proxy.wait_for_line(|l| l.contains(" UPSTREAM_ERROR "), Duration::from_secs(5));
    assert!(
        line.contains(" WARN UPSTREAM_ERROR host=a.test upstream="),
        "{line}"
    );
    assert!(line.ends_with("error=\"connection refused\""), "{line}");
    proxy.wait_for_line(
        |l| l.contains(" REQUEST ") && l.contains("status=502"),
        Duration::from_secs(5),
    );
}

#[tokio::test]
async fn silent_upstream_is_gateway_timeout() {
    let silent = Upstream::start(Router::new().fallback(any(|| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        "too late"
    })))
    .await;
    let mut proxy = ProxyProcess::start(&config(
        &[("a.test", &silent.url())],
        "",
        "[proxy]\nresponse_timeout_secs = 1\n",
    ));
    let started = Instant::now();
    let r = common::get(proxy.addr, "a.test", "/").await;
    let took = started.elapsed();
    assert_eq!(r.status, 504);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let line = proxy.wait_for_line(|l| l.contains(" UPSTREAM_ERROR "), Duration::from_secs(5));
    assert!(line.contains("error=\"no response within 1 s\""), "{line}");
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let client = common::http1_client();
    for _ in 0..5 {
        let req = http::Request::get(format!("http://{}/", proxy.addr))
            .header("host", "a.test")
            .body(axum::body::Body::empty())
            .expect("request");
        let r = common::send(&client, req).await;
        assert_eq!(r.status, 200);
    }
    let connections = established_from(proxy.pid(), a.addr.port());
    assert_eq!(
        connections, 1,
        "sequential requests should share one pooled connection"
    );
}

/// Established TCP connections of process `pid` to local port `port`.
fn established_from(pid: u32, port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "established", &format!("dport = :{port}")])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .count()
}

/// The upstream connection of a response the client stopped reading still
/// carries the rest of that response; it must not serve the next request.
#[tokio::test]
async fn an_abandoned_response_does_not_reach_the_next_request() {
    let big = vec![b'x'; 4 << 20];
    let upstream = Upstream::start(
        Router::new()
            .route("/big", any(move || std::future::ready(big.clone())))
            .route("/small", any(|| async { "small" })),
    )
    .await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &upstream.url())], "", ""));
    for _ in 0..3 {
        let mut client = tokio::net::TcpStream::connect(proxy.addr)
            .await
            .expect("connect");
        client
            .write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .expect("write");
        let mut first = vec![0u8; 64 * 1024];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut first))
            .await
            .expect("the first 64 KiB within 5 s")
            .expect("read");
        drop(client);
        for _ in 0..5 {
            let r = common::get(proxy.addr, "a.test", "/small").await;
            assert_eq!((r.status.as_u16(), r.text()), (200, "small".to_owned()));
        }
    }
}

/// An upstream may answer before it has read the request body (a `413`,
/// say) and then read the rest, keeping the connection. The client gets the
/// answer, the upload still reaches the upstream whole, and the connection
/// goes on serving once the upload is over.
#[tokio::test]
async fn an_answer_before_the_upload_ends_leaves_the_proxy_serving() {
    const UPLOAD: usize = 1 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_addr = listener.local_addr().expect("addr");
    let (uploaded_tx, uploaded) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut uploaded_tx = Some(uploaded_tx);
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            let uploaded_tx = uploaded_tx.take();
            tokio::spawn(early_answering_upstream(socket, uploaded_tx));
        }
    });
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &format!("http://{upstream_addr}"))],
        "",
        "",
    ));
    let mut client = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let head = format!("POST /upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: {UPLOAD}\r\n\r\n");
    client.write_all(head.as_bytes()).await.expect("write");
    client.write_all(&vec![b'u'; UPLOAD]).await.expect("upload");
    let mut response = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut response))
        .await
        .expect("a response within 5 s")
        .expect("read");
    let response = String::from_utf8_lossy(&response[..n]).into_owned();
    assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
    let received = tokio::time::timeout(Duration::from_secs(5), uploaded)
        .await
        .expect("the upload within 5 s")
        .expect("upstream");
    assert_eq!(received, UPLOAD);
    drop(client);
    for _ in 0..5 {
        let r = common::get(proxy.addr, "a.test", "/small").await;
        assert_eq!((r.status.as_u16(), r.text()), (200, "small".to_owned()));
    }
}

/// Serves one upstream connection: `POST /upload` is answered `413` at
/// once, then its body is read and its length reported; anything else gets
/// `small`.
async fn early_answering_upstream(
    mut socket: tokio::net::TcpStream,
    mut uploaded: Option<tokio::sync::oneshot::Sender<usize>>,
) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut more = [0u8; 16 * 1024];
            match socket.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&more[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        buf.drain(..head_end);
        if !head.starts_with("post /upload ") {
            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nsmall";
            if socket.write_all(reply).await.is_err() {
                return;
            }
            continue;
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        let reply = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large";
        if socket.write_all(reply).await.is_err() {
            return;
        }
        while buf.len() < length {
            let mut more = [0u8; 64 * 1024];
            match socket.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&more[..n]),
            }
        }
        buf.drain(..length);
        if let Some(tx) = uploaded.take() {
            let _ = tx.send(length);
        }
    }
}

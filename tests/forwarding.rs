//! Header rewriting toward the upstream, and upstream failures.

mod common;

use std::time::{Duration, Instant};

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
    let out = raw(proxy.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    let echoed = out
        .split("site-a\n")
        .nth(1)
        .expect("echo body")
        .to_ascii_lowercase();
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
    for expected in [
        "host: a.test",
        "x-custom: kept",
        "x-forwarded-for: 6.6.6.6, 127.0.0.1",
        "x-real-ip: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: a.test",
    ] {
        assert!(
            echoed.lines().any(|l| l == expected),
            "missing {expected}:\n{echoed}"
        );
    }
    let line = proxy.wait_for_line(
        |l| l.contains(" REQUEST ") && l.contains("path=/h "),
        Duration::from_secs(5),
    );
    assert_eq!(field(&line, "client_ip"), "127.0.0.1");
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

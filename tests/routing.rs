//! Host-keyed routing through the real binary.

mod common;

use std::time::Duration;

use axum::body::Body;
use common::{ProxyProcess, Upstream, config, get, header_of, raw, status_of};

#[tokio::test]
async fn routes_by_host_case_insensitive_and_with_port() {
    let a = Upstream::echo("site-a").await;
    let b = Upstream::echo("site-b").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url()), ("b.test", &b.url())],
        "",
        "",
    ));

    let r = get(proxy.addr, "a.test", "/x?y=1").await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("site-a\nGET /x?y=1\n"), "{}", r.text());
    let r = get(proxy.addr, "B.Test:8080", "/").await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("site-b\n"), "{}", r.text());
    // The upstream sees the Host the client sent.
    assert!(r.text().contains("\nhost: B.Test:8080\n"), "{}", r.text());
    let r = get(proxy.addr, "a.test.", "/").await;
    assert!(
        r.text().starts_with("site-a\n"),
        "trailing dot: {}",
        r.text()
    );
    assert_eq!((a.hits(), b.hits()), (2, 1));
}

#[tokio::test]
async fn unknown_host_is_misdirected_and_reaches_no_upstream() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    for host in ["c.test", "a.test.evil", "127.0.0.1"] {
        let r = get(proxy.addr, host, "/").await;
        assert_eq!(r.status, 421, "{host}");
    }
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn missing_or_malformed_host_is_bad_request() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let timeout = Duration::from_secs(5);
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        timeout,
    )
    .await;
    assert_eq!(status_of(&out), Some(400), "{out}");
    for host in ["a.test:x", "u@a.test", "a.test:70000"] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let out = raw(proxy.addr, req.as_bytes(), timeout).await;
        assert_eq!(status_of(&out), Some(400), "{host}: {out}");
    }
    let out = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        timeout,
    )
    .await;
    assert_eq!(status_of(&out), Some(400), "{out}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn absolute_form_routes_by_its_own_authority() {
    let a = Upstream::echo("site-a").await;
    let b = Upstream::echo("site-b").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url()), ("b.test", &b.url())],
        "",
        "",
    ));
    let out = raw(
        proxy.addr,
        b"GET http://b.test/p HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    assert!(out.contains("site-b\nGET /p\n"), "{out}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn http2_prior_knowledge_routes_by_authority() {
    let a = Upstream::echo("site-a").await;
    let b = Upstream::echo("site-b").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url()), ("b.test", &b.url())],
        "",
        "",
    ));
    let stream = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    for (authority, expected) in [("b.test", "site-b"), ("A.TEST:443", "site-a")] {
        let req = http::Request::get(format!("http://{authority}/h2"))
            .body(Body::empty())
            .expect("request");
        let resp = sender.send_request(req).await.expect("h2 response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.starts_with(&format!("{expected}\nGET /h2\n")),
            "{text}"
        );
    }
}

#[tokio::test]
async fn health_answers_for_any_host_without_upstreams() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    for host in ["a.test", "unknown.test"] {
        let r = get(proxy.addr, host, "/health").await;
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
    }
    let out = raw(
        proxy.addr,
        b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    assert_eq!(a.hits(), 0);
}

#[tokio::test]
async fn health_is_exactly_one_path_for_get_and_head() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let ask = |request: &'static str| {
        let request = format!("{request}\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        async move { raw(proxy.addr, request.as_bytes(), Duration::from_secs(5)).await }
    };

    for request in ["HEAD /health HTTP/1.1", "GET /health?probe=1 HTTP/1.1"] {
        let out = ask(request).await;
        assert_eq!(status_of(&out), Some(200), "{request}: {out}");
        assert_eq!(
            header_of(&out, "content-length").as_deref(),
            Some("0"),
            "{out}"
        );
    }
    let out = ask("POST /health HTTP/1.1").await;
    assert_eq!(status_of(&out), Some(405), "{out}");
    assert_eq!(
        header_of(&out, "allow").as_deref(),
        Some("GET,HEAD"),
        "{out}"
    );
    assert_eq!(a.hits(), 0);

    // Anything else under that name belongs to the site.
    for path in ["/health/", "/healthz", "/Health", "/%68ealth"] {
        let r = get(proxy.addr, "a.test", path).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(
            r.text().starts_with(&format!("site-a\nGET {path}\n")),
            "{}",
            r.text()
        );
    }
    assert_eq!(a.hits(), 4);
}

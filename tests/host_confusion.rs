//! Which site a request is for must never be ambiguous: an absolute-form
//! target routes by its own authority, a malformed `Host` is refused, and
//! on HTTP/2 a `Host` that differs from `:authority` is refused.

mod common;

use std::time::Duration;

use common::hostile::{Recorder, health};
use common::{ProxyProcess, config, h2frames, raw, status_of};
use tokio::io::AsyncWriteExt;

const BOUND: Duration = Duration::from_secs(2);

#[tokio::test]
async fn absolute_form_target_beats_a_conflicting_host() {
    let a = Recorder::start().await;
    let b = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url()), ("b.test", &b.url())],
        "",
        "",
    ));
    for target in ["http://b.test/x", "http://B.TEST:8080/x"] {
        let out = raw(
            proxy.addr,
            format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            BOUND,
        )
        .await;
        assert_eq!(status_of(&out), Some(200), "{target}: {out}");
    }
    // An absolute-form target for an unknown site is misdirected, whatever
    // the Host says.
    let out = raw(
        proxy.addr,
        b"GET http://c.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        BOUND,
    )
    .await;
    assert_eq!(status_of(&out), Some(421), "{out}");

    let seen = b.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].path, "/x");
    // The upstream is told the authority the request was routed by.
    assert_eq!(seen[0].host, "b.test");
    assert_eq!(seen[1].host, "B.TEST:8080");
    assert!(a.seen().is_empty(), "site a got {:?}", a.seen());
    health(proxy.addr, BOUND).await;
}

#[tokio::test]
async fn invalid_host_is_refused() {
    let a = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    for (name, fields) in [
        ("port too large", "Host: a.test:99999\r\n"),
        ("port not a number", "Host: a.test:x\r\n"),
        ("empty port", "Host: a.test:\r\n"),
        ("userinfo", "Host: user@a.test\r\n"),
        ("userinfo and password", "Host: u:p@a.test\r\n"),
        ("space inside", "Host: a .test\r\n"),
        ("two names", "Host: a.test b.test\r\n"),
        ("path", "Host: a.test/x\r\n"),
        ("empty", "Host: \r\n"),
        ("underscore", "Host: a_b.test\r\n"),
        ("bad IPv6", "Host: [::g]\r\n"),
        ("two Host fields", "Host: a.test\r\nHost: a.test\r\n"),
        ("missing", ""),
    ] {
        let out = raw(
            proxy.addr,
            format!("GET / HTTP/1.1\r\n{fields}Connection: close\r\n\r\n").as_bytes(),
            BOUND,
        )
        .await;
        assert_eq!(status_of(&out), Some(400), "{name}: {out}");
    }
    health(proxy.addr, BOUND).await;
    assert!(a.seen().is_empty(), "upstream got {:?}", a.seen());
}

/// Sends one HTTP/2 request, built frame by frame, with `:authority` and
/// an optional `host` field, and returns the response status.
async fn h2_status(proxy: &ProxyProcess, authority: &str, path: &str, host: Option<&str>) -> u16 {
    let mut stream = h2frames::connect(proxy.addr).await;
    let extra: Vec<(&str, &str)> = host.iter().map(|h| ("host", *h)).collect();
    let block = h2frames::request_block(authority, path, &extra);
    stream
        .write_all(&h2frames::frame(
            h2frames::HEADERS,
            h2frames::END_HEADERS | h2frames::END_STREAM,
            1,
            &block,
        ))
        .await
        .expect("send request");
    let (frames, found) = h2frames::read_until(&mut stream, BOUND, |f| {
        f.kind == h2frames::HEADERS && f.stream == 1
    })
    .await;
    assert!(found, "no response: {frames:?}");
    let block = &frames.last().expect("frame").payload;
    h2frames::status_of(block).unwrap_or_else(|| panic!("status of {block:02x?}"))
}

#[tokio::test]
async fn http2_host_differing_from_authority_is_refused() {
    let a = Recorder::start().await;
    let b = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url()), ("b.test", &b.url())],
        "",
        "",
    ));
    assert_eq!(h2_status(&proxy, "a.test", "/x", Some("b.test")).await, 400);
    assert_eq!(h2_status(&proxy, "b.test", "/x", Some("a.test")).await, 400);
    assert_eq!(
        h2_status(&proxy, "a.test", "/x", Some("a.test:80")).await,
        400,
        "a port makes it a different authority"
    );
    assert_eq!(
        h2_status(&proxy, "a.test", "/x", Some("a.test:x")).await,
        400
    );
    assert!(a.seen().is_empty(), "site a got {:?}", a.seen());
    assert!(b.seen().is_empty(), "site b got {:?}", b.seen());

    // Agreeing (case aside) is fine, and so is no Host at all.
    assert_eq!(h2_status(&proxy, "a.test", "/y", Some("A.test")).await, 200);
    assert_eq!(h2_status(&proxy, "a.test", "/z", None).await, 200);
    assert_eq!(a.paths(), ["/y", "/z"]);
    health(proxy.addr, BOUND).await;
}

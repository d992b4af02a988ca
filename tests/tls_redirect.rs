//! `http_bind_addr`: the plain-HTTP listener that sends configured sites to
//! https, answers `/health`, and refuses to redirect unknown hosts.

mod common;

use std::time::Duration;

use common::tls::{self, TestCa, manual_config, write_cert};
use common::{ProxyProcess, Upstream, get, raw, status_of};
use http::StatusCode;

#[tokio::test]
async fn plain_http_is_redirected_to_https_for_configured_sites() {
    let ca = TestCa::new("redirect CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_cert(dir.path(), "a", &ca.issue(&["a.test"], 60));
    let site = Upstream::echo("a").await;
    let config = manual_config(
        &[(&["a.test"], &files)],
        &[("a.test", site.url())],
        "http_bind_addr = \"127.0.0.1:0\"",
    );
    let mut proxy = ProxyProcess::start(&config);
    let https = proxy.addr;
    let http = proxy.listen_addr("redirect");
    assert_ne!(http, https);

    let reply = get(http, "a.test", "/x?y=1").await;
    assert_eq!(reply.status, StatusCode::PERMANENT_REDIRECT);
    // Not port 443, so the port is part of the target.
    let expected = format!("https://a.test:{}/x?y=1", https.port());
    assert_eq!(reply.headers["location"], expected.as_str());
    proxy.wait_for_line(
        |l| l.contains(" REQUEST ") && l.contains("host=a.test") && l.contains("status=308"),
        Duration::from_secs(5),
    );

    // The host is matched case-insensitively and written lower-case; the
    // method is kept by 308, so a POST is redirected the same way.
    let answer = raw(
        http,
        b"POST /form HTTP/1.1\r\nHost: A.Test:80\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&answer), Some(308), "{answer}");
    let location = format!("location: https://a.test:{}/form\r\n", https.port());
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");

    // The target works: same path and query, over TLS, to the site.
    let roots = tls::roots(&ca.pem());
    let (_, reply) = tls::https_get(
        https,
        "a.test",
        tls::default_client(&roots, &["h2"]),
        "/x?y=1",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.text().starts_with("a\nGET /x?y=1\n"),
        "{}",
        reply.text()
    );
    assert!(
        reply.text().contains("x-forwarded-proto: https\n"),
        "{}",
        reply.text()
    );

    // /health is answered here for any host; unknown hosts are not
    // redirected anywhere; no Host at all is a bad request.
    assert_eq!(
        get(http, "elsewhere.test", "/health").await.status,
        StatusCode::OK
    );
    let reply = get(http, "evil.test", "/x").await;
    assert_eq!(reply.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(!reply.headers.contains_key("location"));
    let answer = raw(
        http,
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&answer), Some(400), "{answer}");
    assert_eq!(site.hits(), 1, "only the https request reached the site");
}

//! `mode = "acme"` against Debian's `pebble` ACME server on loopback: one
//! SAN certificate obtained with TLS-ALPN-01 on the proxy's own port,
//! served over HTTP/2 and HTTP/1.1, reused from the cache after a restart;
//! and a CA that is down at start.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::routing::any;
use common::pebble::{Pebble, free_port};
use common::tls::{self, TestCa};
use common::{ProxyProcess, Upstream, field, get};
use http::{StatusCode, Version};

async fn upstream(name: &'static str) -> Upstream {
    Upstream::start(Router::new().fallback(any(move |req: Request| async move {
        format!("{name} {:?}", req.version())
    })))
    .await
}

/// ACME mode on 127.0.0.1:`port` for a.test and b.test (listed out of
/// order), with the plain-HTTP listener on a free port.
fn acme_config(
    port: u16,
    directory: &str,
    ca_root: &Path,
    cache_dir: &Path,
    a: &Upstream,
    b: &Upstream,
) -> String {
    format!(
        r#"[server]
bind_addr = "127.0.0.1:{port}"
http_bind_addr = "127.0.0.1:0"
log_level = "info"
shutdown_timeout_secs = 5

[server.tls]
mode = "acme"
acme_domains = ["b.test", "a.test"]
acme_contact = ["mailto:ops@a.test"]
acme_directory = "{directory}"
acme_ca_root = "{}"
acme_cache_dir = "{}"

[[sites]]
host = "a.test"
upstream = "{}"

[[sites]]
host = "b.test"
upstream = "{}"
"#,
        ca_root.display(),
        cache_dir.display(),
        a.url(),
        b.url(),
    )
}

#[tokio::test]
async fn acme_issues_one_san_certificate_and_a_restart_reuses_it() {
    let port = free_port();
    let pebble = Pebble::start(port).await;
    let state = tempfile::tempdir().expect("tempdir");
    let cache_dir = state.path().join("acme-cache");
    let (a, b) = (upstream("a").await, upstream("b").await);
    let config = acme_config(
        port,
        &pebble.directory_url,
        &pebble.api_ca,
        &cache_dir,
        &a,
        &b,
    );

    let started = Instant::now();
    let mut proxy = ProxyProcess::start(&config);
    assert_eq!(proxy.addr.port(), port);
    let order = proxy.wait_for_line(
        |l| l.contains("ACME_ORDER_STARTED"),
        Duration::from_secs(10),
    );
    assert!(order.contains("domains=a.test,b.test"), "{order}");
    let deployed = proxy.wait_for_line(
        |l| l.contains("ACME_CERT_DEPLOYED"),
        Duration::from_secs(60),
    );
    let issued_in = started.elapsed();
    println!(
        "issuance against pebble: {issued_in:?} from start; proxy reports issue_ms={}",
        field(&deployed, "issue_ms")
    );
    assert!(deployed.contains(" INFO "), "{deployed}");
    assert!(
        field(&deployed, "not_after").starts_with("20"),
        "{deployed}"
    );
    // pebble connected to the proxy's port once per name to validate.
    for name in ["a.test", "b.test"] {
        proxy.wait_for_line(
            |l| l.contains("ACME_CHALLENGE") && l.contains(&format!("sni={name}")),
            Duration::from_secs(5),
        );
    }
    assert_eq!(
        pebble.count("/order-plz"),
        1,
        "one order for both names:\n{}",
        pebble.output()
    );

    // One certificate naming both sites, trusted through pebble's root.
    let roots = tls::roots(&pebble.issuing_root().await);
    let h2 = tls::default_client(&roots, &["h2", "http/1.1"]);
    let h1 = tls::default_client(&roots, &["http/1.1"]);
    let stream = tls::connect(proxy.addr, "a.test", h2.clone())
        .await
        .expect("a.test handshake");
    assert_eq!(tls::peer_names(&stream), ["a.test", "b.test"]);
    let (version, reply) = tls::get(stream, "a.test", "/").await;
    assert_eq!((version, reply.status), (Version::HTTP_2, StatusCode::OK));
    assert_eq!(reply.text(), "a HTTP/1.1");
    let stream = tls::connect(proxy.addr, "b.test", h1)
        .await
        .expect("b.test handshake");
    assert_eq!(tls::peer_names(&stream), ["a.test", "b.test"]);
    let (version, reply) = tls::get(stream, "b.test", "/").await;
    assert_eq!((version, reply.status), (Version::HTTP_11, StatusCode::OK));
    assert_eq!(reply.text(), "b HTTP/1.1");
    let (version, reply) = tls::https_get(proxy.addr, "b.test", h2.clone(), "/").await;
    assert_eq!(
        (version, reply.text().as_str()),
        (Version::HTTP_2, "b HTTP/1.1")
    );

    // A name outside the certificate gets no certificate at all.
    let err = tls::connect(proxy.addr, "c.test", h2.clone())
        .await
        .expect_err("c.test refused");
    assert_eq!(tls::tls_error(&err), "AlertReceived(UnrecognisedName)");

    // The cache holds private keys: only this user may enter it.
    let mode = std::fs::metadata(&cache_dir)
        .expect("cache dir")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    // Restart: the cached certificate is served at once, pebble hears nothing.
    let api_calls = pebble.count("calling handler");
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0));
    let mut proxy = ProxyProcess::start(&config);
    let loaded = proxy.wait_for_line(|l| l.contains("ACME_CERT_LOADED"), Duration::from_secs(10));
    assert_eq!(field(&loaded, "not_after"), field(&deployed, "not_after"));
    let (version, reply) = tls::https_get(proxy.addr, "a.test", h2, "/").await;
    assert_eq!(
        (version, reply.text().as_str()),
        (Version::HTTP_2, "a HTTP/1.1")
    );
    // Nothing to wait for when nothing should happen: give a stray order
    // a moment to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        pebble.count("calling handler"),
        api_calls,
        "ACME traffic after restart:\n{}",
        pebble.output()
    );
    assert!(
        !proxy
            .lines()
            .iter()
            .any(|l| l.contains("ACME_ORDER_STARTED")),
        "restart ordered a certificate"
    );
}

#[tokio::test]
async fn acme_server_down_at_start_is_retried_while_serving_continues() {
    let state = tempfile::tempdir().expect("tempdir");
    let ca_root = state.path().join("ca.pem");
    std::fs::write(&ca_root, TestCa::new("unreachable CA").pem()).expect("write");
    // Nothing listens there.
    let directory = format!("https://127.0.0.1:{}/dir", free_port());
    let (a, b) = (upstream("a").await, upstream("b").await);
    let config = acme_config(0, &directory, &ca_root, &state.path().join("cache"), &a, &b);

    let mut proxy = ProxyProcess::start(&config);
    let errors = proxy.wait_for_count(|l| l.contains("ACME_ERROR"), 2, Duration::from_secs(20));
    for line in &errors {
        assert!(line.contains(" ERROR "), "{line}");
        assert!(
            line.contains("stage=order") && line.contains("retrying"),
            "{line}"
        );
        assert!(line.contains("cannot reach the ACME server"), "{line}");
        assert!(line.contains("domains=a.test,b.test"), "{line}");
    }
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "the proxy exited"
    );

    let http = proxy.listen_addr("redirect");
    assert_eq!(get(http, "a.test", "/health").await.status, StatusCode::OK);
    // Without a certificate, handshakes are refused cleanly, with a reason.
    let roots = tls::roots(&TestCa::new("any").pem());
    let err = tls::connect(proxy.addr, "a.test", tls::default_client(&roots, &["h2"]))
        .await
        .expect_err("no certificate yet");
    assert_eq!(tls::tls_error(&err), "AlertReceived(InternalError)");
    let line = proxy.wait_for_line(
        |l| l.contains("TLS_HANDSHAKE_FAILED"),
        Duration::from_secs(5),
    );
    assert!(
        line.contains("sni=a.test") && line.contains("no certificate obtained"),
        "{line}"
    );
    assert_eq!(get(http, "b.test", "/health").await.status, StatusCode::OK);
}

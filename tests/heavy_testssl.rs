//! The TLS configuration as an outside scanner sees it: `testssl.sh`
//! (Debian package `testssl.sh`) against the real binary in manual mode on
//! loopback. Slow (tens of seconds), hence `heavy_`.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use common::tls::{self, TestCa, manual_config, write_cert};
use common::{ProxyProcess, Upstream};
use http::StatusCode;

/// testssl.sh's findings, by check id (`TLS1_2`, `ALPN_HTTP2`, ...).
fn findings(json: &str) -> HashMap<String, String> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(json).expect("testssl JSON");
    entries
        .iter()
        .filter_map(|e| {
            Some((
                e["id"].as_str()?.to_owned(),
                e["finding"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

#[tokio::test]
async fn heavy_testssl() {
    let ca = TestCa::new("testssl CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_cert(dir.path(), "a", &ca.issue(&["a.test"], 60));
    let upstream = Upstream::echo("a").await;
    let config = manual_config(&[(&["a.test"], &files)], &[("a.test", upstream.url())], "");
    let proxy = ProxyProcess::start(&config);
    let port = proxy.addr.port();

    // Protocols and ALPN (-p), cipher categories (-s), forward secrecy (-f).
    // `--ip` and `--nodns none`: connect to loopback, resolve nothing, yet
    // send `a.test` as SNI.
    let json = dir.path().join("testssl.json");
    let started = Instant::now();
    let out = Command::new("timeout")
        .arg("240")
        .arg("testssl")
        .args(["--quiet", "--color", "0", "--warnings", "batch"])
        .args(["--nodns", "none", "--ip", "127.0.0.1"])
        .args(["--connect-timeout", "10", "--openssl-timeout", "10"])
        .arg("--jsonfile")
        .arg(&json)
        .args(["-p", "-s", "-f"])
        .arg(format!("https://a.test:{port}/"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("testssl (apt-get install testssl.sh)");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "testssl failed ({:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("testssl -p -s -f took {took:?}\n{stdout}");
    let found = findings(&std::fs::read_to_string(&json).expect("testssl JSON file"));
    let finding = |id: &str| {
        found
            .get(id)
            .unwrap_or_else(|| panic!("no {id} in testssl's findings:\n{stdout}"))
            .as_str()
    };

    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert_eq!(finding(id), "not offered", "{id}");
    }
    assert_eq!(finding("TLS1_2"), "offered");
    assert!(finding("TLS1_3").starts_with("offered"), "TLS1_3");
    assert_eq!(finding("ALPN_HTTP2"), "h2");
    assert!(finding("ALPN").contains("http/1.1"), "ALPN");
    assert_eq!(finding("NPN"), "not offered");
    // Nothing weak, nothing CBC: AEAD ciphers only, all with forward secrecy.
    for id in [
        "cipherlist_NULL",
        "cipherlist_aNULL",
        "cipherlist_EXPORT",
        "cipherlist_LOW",
        "cipherlist_3DES_IDEA",
        "cipherlist_AVERAGE",
    ] {
        assert_eq!(finding(id), "not offered", "{id}");
    }
    assert_eq!(finding("cipherlist_STRONG"), "offered");
    assert_eq!(finding("PFS"), "offered");

    // Hundreds of refused and odd handshakes later, the proxy still serves.
    assert!(
        proxy
            .lines()
            .iter()
            .any(|l| l.contains("TLS_HANDSHAKE_FAILED")),
        "the scan's refused handshakes are logged"
    );
    let roots = tls::roots(&ca.pem());
    let client = tls::default_client(&roots, &["h2", "http/1.1"]);
    let (_, reply) = tls::https_get(proxy.addr, "a.test", client, "/health").await;
    assert_eq!(reply.status, StatusCode::OK);
}

//! `mode = "manual"`: certificate files chosen by SNI, real handshakes on
//! loopback against the real binary, and clients that misbehave.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::routing::any;
use common::tls::{self, Files, TestCa, manual_config, write_cert};
use common::{ProxyProcess, Upstream, run_binary, write_file};
use http::{StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream that answers with its name and the HTTP version it got.
async fn upstream(name: &'static str) -> Upstream {
    Upstream::start(Router::new().fallback(any(move |req: Request| async move {
        format!("{name} {:?}", req.version())
    })))
    .await
}

/// Two sites with their own certificates (`a.test`, and `*.b.test` for
/// `x.b.test`), issued by `ca`, served by the real binary.
struct TwoSites {
    ca: TestCa,
    _dir: tempfile::TempDir,
    a: Upstream,
    b: Upstream,
    proxy: ProxyProcess,
}

async fn two_sites(server_extra: &str) -> TwoSites {
    let ca = TestCa::new("manual test CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let a_files = write_cert(dir.path(), "a", &ca.issue(&["a.test"], 60));
    let b_files = write_cert(dir.path(), "b", &ca.issue(&["*.b.test"], 60));
    let a = upstream("a").await;
    let b = upstream("b").await;
    let config = manual_config(
        &[(&["a.test"], &a_files), (&["*.B.test"], &b_files)],
        &[("a.test", a.url()), ("x.b.test", b.url())],
        server_extra,
    );
    let proxy = ProxyProcess::start(&config);
    assert!(
        proxy
            .lines()
            .iter()
            .any(|l| l.contains(" LISTEN ") && l.contains("proto=https")),
        "main listener is not TLS"
    );
    TwoSites {
        ca,
        _dir: dir,
        a,
        b,
        proxy,
    }
}

#[tokio::test]
async fn each_sni_gets_its_own_certificate_over_h2_and_h1() {
    let s = two_sites("").await;
    let roots = tls::roots(&s.ca.pem());
    let h2 = tls::default_client(&roots, &["h2", "http/1.1"]);
    let h1 = tls::default_client(&roots, &["http/1.1"]);
    let no_alpn = tls::default_client(&roots, &[]);

    let stream = tls::connect(s.proxy.addr, "a.test", h2.clone())
        .await
        .expect("handshake a.test");
    assert_eq!(tls::peer_names(&stream), ["a.test"]);
    assert_eq!(tls::alpn(&stream).as_deref(), Some("h2"));
    let (version, reply) = tls::get(stream, "a.test", "/").await;
    assert_eq!((version, reply.status), (Version::HTTP_2, StatusCode::OK));
    assert_eq!(
        reply.text(),
        "a HTTP/1.1",
        "upstream gets HTTP/1.1 whatever the client spoke"
    );

    // The wildcard entry, written in mixed case in the file, and an SNI in
    // mixed case: names are case-insensitive.
    let stream = tls::connect(s.proxy.addr, "X.B.Test", h1)
        .await
        .expect("handshake x.b.test");
    assert_eq!(tls::peer_names(&stream), ["*.b.test"]);
    assert_eq!(tls::alpn(&stream).as_deref(), Some("http/1.1"));
    let (version, reply) = tls::get(stream, "x.b.test", "/").await;
    assert_eq!((version, reply.status), (Version::HTTP_11, StatusCode::OK));
    assert_eq!(reply.text(), "b HTTP/1.1");

    // A client offering no ALPN gets none and is served HTTP/1.1.
    let stream = tls::connect(s.proxy.addr, "a.test", no_alpn)
        .await
        .expect("handshake");
    assert_eq!(tls::alpn(&stream), None);
    let (version, reply) = tls::get(stream, "a.test", "/health").await;
    assert_eq!((version, reply.status), (Version::HTTP_11, StatusCode::OK));
}

#[tokio::test]
async fn unknown_or_missing_sni_is_refused_with_unrecognized_name() {
    let mut s = two_sites("").await;
    let roots = tls::roots(&s.ca.pem());
    let client = tls::default_client(&roots, &["h2", "http/1.1"]);
    for (name, expected_sni) in [
        ("c.test", "c.test"),
        ("y.x.b.test", "y.x.b.test"),
        ("127.0.0.1", "-"),
    ] {
        let err = tls::connect(s.proxy.addr, name, client.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: handshake succeeded"));
        assert_eq!(
            tls::tls_error(&err),
            "AlertReceived(UnrecognisedName)",
            "{name}: refused with the wrong error"
        );
        let line = s.proxy.wait_for_line(
            |l| l.contains("TLS_HANDSHAKE_FAILED") && l.contains(&format!(" sni={expected_sni} ")),
            Duration::from_secs(5),
        );
        assert!(line.contains(" INFO "), "{line}");
        assert!(line.contains("client_ip=127.0.0.1"), "{line}");
        assert!(line.contains("reason="), "{line}");
    }
    // Served names still work, and the refused handshakes reached nobody.
    let (_, reply) = tls::https_get(s.proxy.addr, "a.test", client, "/").await;
    assert_eq!(reply.text(), "a HTTP/1.1");
    assert_eq!((s.a.hits(), s.b.hits()), (1, 0));
}

/// Sends `hello` and returns everything the proxy answers before closing.
async fn answer_to(addr: std::net::SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(hello).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("closed in time");
    answer
}

#[tokio::test]
async fn tls_1_0_and_1_1_are_refused_and_1_2_works() {
    let mut s = two_sites("").await;
    for (version, label) in [(0x0301u16, "1.0"), (0x0302, "1.1")] {
        // As old clients send it: refused before any version talk, since
        // it lacks what TLS 1.2 requires.
        let answer = answer_to(
            s.proxy.addr,
            &tls::legacy_client_hello(version, "a.test", false),
        )
        .await;
        assert_eq!(
            answer,
            [0x15, 3, 3, 0, 2, 2, 40],
            "TLS {label}: expected a handshake_failure alert"
        );
        // With every TLS 1.2 extension but the old version: protocol_version.
        let answer = answer_to(
            s.proxy.addr,
            &tls::legacy_client_hello(version, "a.test", true),
        )
        .await;
        assert_eq!(
            answer,
            [0x15, 3, 3, 0, 2, 2, 70],
            "TLS {label}: expected a protocol_version alert"
        );
    }
    let line = s.proxy.wait_for_line(
        |l| l.contains("TLS_HANDSHAKE_FAILED"),
        Duration::from_secs(5),
    );
    assert!(
        line.contains("sni=a.test") && line.contains("Tls12NotOffered"),
        "{line}"
    );

    // A real TLS 1.1 client (OpenSSL, with its security level lowered so it
    // is willing to try at all).
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &s.proxy.addr.to_string(),
            "-servername",
            "a.test",
        ])
        .args(["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (apt-get install openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "openssl -tls1_1 connected:\n{text}");
    assert!(text.contains("alert handshake failure"), "{text}");

    let roots = tls::roots(&s.ca.pem());
    let tls12 = tls::client(&roots, &["h2"], &[&rustls::version::TLS12]);
    let stream = tls::connect(s.proxy.addr, "a.test", tls12)
        .await
        .expect("TLS 1.2 handshake");
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let (version, reply) = tls::get(stream, "a.test", "/").await;
    assert_eq!((version, reply.status), (Version::HTTP_2, StatusCode::OK));
}

#[tokio::test]
async fn silent_client_is_closed_after_the_handshake_timeout() {
    let s = two_sites("header_read_timeout_secs = 1").await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(s.proxy.addr).await.expect("connect");
    let mut buf = Vec::new();
    // EOF or a reset: either way the proxy closed it.
    let _ = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf))
        .await
        .expect("the proxy closed the connection");
    let elapsed = started.elapsed();
    assert!(
        buf.is_empty(),
        "nothing is sent to a client that said nothing: {buf:x?}"
    );
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "closed after {elapsed:?}, expected about 1 s"
    );
}

#[tokio::test]
async fn sni_of_one_site_with_host_of_another_is_misdirected() {
    let mut s = two_sites("").await;
    let roots = tls::roots(&s.ca.pem());
    for alpn in ["h2", "http/1.1"] {
        let client = tls::default_client(&roots, &[alpn]);
        let stream = tls::connect(s.proxy.addr, "a.test", client)
            .await
            .expect("handshake a.test");
        assert_eq!(tls::alpn(&stream).as_deref(), Some(alpn));
        // One connection: its own host, another configured host (in any
        // spelling), then its own host again, which still works.
        let replies = tls::get_each(
            stream,
            &[
                ("a.test", "/"),
                ("x.b.test", "/"),
                ("X.B.test.:443", "/"),
                ("a.test:443", "/"),
            ],
        )
        .await;
        let statuses: Vec<u16> = replies.iter().map(|r| r.status.as_u16()).collect();
        assert_eq!(statuses, [200, 421, 421, 200], "{alpn}");
        assert_eq!(replies[0].text(), "a HTTP/1.1");
        assert!(
            replies[1]
                .text()
                .contains("the TLS server name differs from the requested host"),
            "{alpn}: {}",
            replies[1].text()
        );
    }

    // The other way round: the wildcard certificate's site asked for a.test.
    let client = tls::default_client(&roots, &["http/1.1"]);
    let stream = tls::connect(s.proxy.addr, "x.b.test", client.clone())
        .await
        .expect("handshake x.b.test");
    let replies = tls::get_each(stream, &[("a.test", "/"), ("x.b.test", "/")]).await;
    assert_eq!(replies[0].status, StatusCode::MISDIRECTED_REQUEST);
    assert_eq!(replies[1].text(), "b HTTP/1.1");

    // An absolute-form target is routed by its authority, so it is held
    // against the SNI too, whatever `Host` says.
    let mut stream = tls::connect(s.proxy.addr, "a.test", client)
        .await
        .expect("handshake a.test");
    let answer = exchange(
        &mut stream,
        b"GET https://x.b.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 421 "), "{answer}");

    assert_eq!(s.b.hits(), 1, "only the request made under b's own SNI");
    assert_eq!(s.a.hits(), 4, "two per protocol under a's own SNI");
    let line = s.proxy.wait_for_line(
        |l| l.contains(" REQUEST ") && l.contains("host=x.b.test") && l.contains("status=421"),
        Duration::from_secs(5),
    );
    assert!(line.contains("upstream=- "), "{line}");
}

#[tokio::test]
async fn conflicting_framing_over_tls_is_refused() {
    let s = two_sites("").await;
    let client = tls::default_client(&tls::roots(&s.ca.pem()), &["http/1.1"]);
    let mut stream = tls::connect(s.proxy.addr, "a.test", client)
        .await
        .expect("handshake a.test");
    let answer = exchange(
        &mut stream,
        b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n\
          GET /smuggled HTTP/1.1\r\nHost: a.test\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert_eq!(s.a.hits(), 0, "reached the upstream");
}

/// Writes `request` on an HTTP/1.1 TLS stream and reads until the proxy
/// closes it (a close without `close_notify` still ends the answer).
async fn exchange(
    stream: &mut tokio_rustls::client::TlsStream<TcpStream>,
    request: &[u8],
) -> String {
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered in time");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn half_a_client_hello_is_closed_after_the_handshake_timeout() {
    let s = two_sites("header_read_timeout_secs = 1").await;
    let roots = tls::roots(&s.ca.pem());
    let client = tls::default_client(&roots, &["h2", "http/1.1"]);
    let hello = tls::client_hello(client.clone(), "a.test");
    assert!(
        hello.len() > 100,
        "a real ClientHello: {} bytes",
        hello.len()
    );
    // A record header alone, half a hello, all of it but the last byte.
    let prefixes = [
        &hello[..5],
        &hello[..hello.len() / 2],
        &hello[..hello.len() - 1],
    ];

    let started = Instant::now();
    let mut stalled = Vec::new();
    for prefix in prefixes.iter().cycle().take(30) {
        let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
        stream.write_all(prefix).await.expect("write");
        stalled.push(tokio::spawn(async move {
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
                .await
                .expect("the proxy closed the connection");
            (started.elapsed(), answer)
        }));
    }

    // Others are served while the stalled handshakes wait.
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(800) {
        let asked = Instant::now();
        let (_, reply) = tls::https_get(s.proxy.addr, "a.test", client.clone(), "/health").await;
        assert_eq!(reply.status, StatusCode::OK);
        slowest = slowest.max(asked.elapsed());
    }
    println!("slowest /health (new TLS connection) during the stall: {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "/health took {slowest:?} during the stall"
    );

    for task in stalled {
        let (elapsed, answer) = task.await.expect("task");
        assert!(
            answer.is_empty(),
            "nothing is sent before a complete ClientHello: {answer:x?}"
        );
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
            "closed after {elapsed:?}, expected about 1 s"
        );
    }
    let (_, reply) = tls::https_get(s.proxy.addr, "a.test", client, "/").await;
    assert_eq!(reply.text(), "a HTTP/1.1");
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_closed_without_affecting_others() {
    let s = two_sites("").await;
    let roots = tls::roots(&s.ca.pem());
    let client = tls::default_client(&roots, &["http/1.1"]);
    // A client mid-connection before the garbage arrives.
    let before = tls::connect(s.proxy.addr, "a.test", client.clone())
        .await
        .expect("handshake");

    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &[0u8; 64][..],
    ] {
        let started = Instant::now();
        let mut stream = TcpStream::connect(s.proxy.addr).await.expect("connect");
        stream.write_all(garbage).await.expect("write");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
            .await
            .expect("garbage connection closed in time");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "closed only after {:?}",
            started.elapsed()
        );
        assert!(
            !String::from_utf8_lossy(&answer).contains("HTTP/1.1"),
            "no HTTP on the TLS port: {answer:x?}"
        );
    }
    let (_, reply) = tls::get(before, "a.test", "/").await;
    assert_eq!(reply.text(), "a HTTP/1.1");
    let (_, reply) = tls::https_get(s.proxy.addr, "a.test", client, "/").await;
    assert_eq!(reply.text(), "a HTTP/1.1");
}

fn validate(config: &str, dir: &Path) -> (i32, String, String) {
    let path = write_file(dir, "config.toml", config);
    run_binary(&["--validate", "--config", path.to_str().expect("utf-8")])
}

#[test]
fn validate_flags_a_mismatched_key_and_an_expired_certificate() {
    let ca = TestCa::new("validate CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let a = ca.issue(&["a.test"], 60);
    let other = ca.issue(&["a.test"], 60);
    let mismatched = Files {
        cert: write_file(dir.path(), "a.pem", &a.cert_pem),
        key: write_file(dir.path(), "other.key", &other.key_pem),
    };
    let expired = write_cert(dir.path(), "b", &ca.issue(&["b.test"], -1));
    let config = manual_config(
        &[(&["a.test"], &mismatched), (&["b.test"], &expired)],
        &[
            ("a.test", "http://127.0.0.1:1".into()),
            ("b.test", "http://127.0.0.1:2".into()),
        ],
        "",
    );
    let (code, out, err) = validate(&config, dir.path());
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("error: server.tls.certs[0].key: the key in")
            && err.contains("does not match the certificate"),
        "{err}"
    );
    assert!(
        err.contains("error: server.tls.certs[1].cert: certificate expired on"),
        "{err}"
    );
    assert!(err.contains("config invalid: 2 error(s)"), "{err}");

    // Files that are not what they claim to be.
    let not_pem = Files {
        cert: write_file(dir.path(), "junk.pem", "not a certificate\n"),
        key: mismatched.key.clone(),
    };
    let config = manual_config(
        &[(&["a.test"], &not_pem)],
        &[("a.test", "http://127.0.0.1:1".into())],
        "",
    );
    let (code, _, err) = validate(&config, dir.path());
    assert_eq!(code, 2);
    assert!(
        err.contains("server.tls.certs[0].cert:") && err.contains("no PEM \"CERTIFICATE\""),
        "{err}"
    );

    // The binary refuses to start on the same problems, with the same words.
    let config = manual_config(
        &[(&["a.test"], &mismatched)],
        &[("a.test", "http://127.0.0.1:1".into())],
        "",
    );
    let path = write_file(dir.path(), "start.toml", &config);
    let (code, _, err) = run_binary(&["--config", path.to_str().expect("utf-8")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("server.tls.certs[0].key"), "{err}");
}

#[test]
fn validate_warns_about_uncovered_hosts_and_near_expiry() {
    let ca = TestCa::new("validate CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let soon = write_cert(dir.path(), "a", &ca.issue(&["a.test"], 5));
    let config = manual_config(
        &[(&["a.test", "c.test"], &soon)],
        &[
            ("a.test", "http://127.0.0.1:1".into()),
            ("c.test", "http://127.0.0.1:2".into()),
        ],
        "",
    );
    let (code, out, err) = validate(&config, dir.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "config OK: 2 sites");
    assert!(
        err.contains("warning: server.tls.certs[0].cert: certificate expires on"),
        "{err}"
    );
    assert!(
        err.contains("in 4 day(s)") || err.contains("in 5 day(s)"),
        "{err}"
    );
    assert!(
        err.contains("warning: server.tls.certs[0].hosts: certificate is not valid for \"c.test\""),
        "{err}"
    );
}

#[tokio::test]
async fn reload_reads_certificate_files_again() {
    use reverse_proxy::config::{Config, TlsConfig};
    use reverse_proxy::daemon::Running;

    let ca = TestCa::new("reload CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_cert(dir.path(), "a", &ca.issue(&["a.test"], 60));
    let a = upstream("a").await;
    let config = manual_config(&[(&["a.test"], &files)], &[("a.test", a.url())], "");
    let config = Config::parse(&config).expect("config");
    let TlsConfig::Manual(entries) = config.server.tls.clone() else {
        panic!("manual mode");
    };
    let running = Running::start(config).await.expect("start");
    let roots = tls::roots(&ca.pem());
    let client = tls::default_client(&roots, &["http/1.1"]);
    let not_after = |running: &Running| running.certificates().current()[0].not_after_unix;
    let first = not_after(&running);

    // Renewed files: a later notAfter, served by new handshakes.
    let renewed = ca.issue(&["a.test"], 80);
    std::fs::write(&files.cert, &renewed.cert_pem).expect("write");
    std::fs::write(&files.key, &renewed.key_pem).expect("write");
    let resolver = running.manual_certificates().expect("manual mode");
    assert_eq!(resolver.reload(&entries).expect("reload"), 1);
    let second = not_after(&running);
    assert!(second - first >= 19 * 86_400, "{first} -> {second}");
    let stream = tls::connect(running.local_addr(), "a.test", client.clone())
        .await
        .expect("handshake");
    let served = stream.get_ref().1.peer_certificates().expect("certs")[0].clone();
    let served = reverse_proxy::tls::certs::Leaf::parse(&served).expect("leaf");
    assert_eq!(served.not_after_unix, second);

    // A broken file is refused and the certificate already served stays.
    std::fs::write(&files.key, "broken").expect("write");
    let err = resolver
        .reload(&entries)
        .expect_err("broken key must be refused");
    assert!(
        err.to_string().starts_with("server.tls.certs[0].key:"),
        "{err}"
    );
    assert_eq!(not_after(&running), second);
    let (_, reply) = tls::https_get(running.local_addr(), "a.test", client, "/").await;
    assert_eq!(reply.text(), "a HTTP/1.1");
    running.shutdown().await;
}

/// A configuration reload (what SIGHUP runs) reads the certificate files
/// again together with the rest of the file, and a broken certificate
/// rejects the whole reload: neither the new sites nor the new files apply.
#[tokio::test]
async fn config_reload_applies_certificates_and_sites_together() {
    use reverse_proxy::config::Config;
    use reverse_proxy::daemon::Running;
    use reverse_proxy::lifecycle::reload;

    let ca = TestCa::new("config reload CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_cert(dir.path(), "a", &ca.issue(&["a.test", "b.test"], 60));
    let (a, b) = (upstream("a").await, upstream("b").await);
    let one_site = manual_config(
        &[(&["a.test", "b.test"], &files)],
        &[("a.test", a.url())],
        "",
    );
    let two_sites = manual_config(
        &[(&["a.test", "b.test"], &files)],
        &[("a.test", a.url()), ("b.test", b.url())],
        "",
    );
    let path = write_file(dir.path(), "config.toml", &one_site);
    let running = Running::start(Config::parse(&one_site).expect("config"))
        .await
        .expect("start");
    let resolver = running.manual_certificates().expect("manual mode");
    let not_after = |running: &Running| running.certificates().current()[0].not_after_unix;
    let first = not_after(&running);

    // Broken key plus a new site: refused as a whole.
    std::fs::write(&path, &two_sites).expect("write");
    std::fs::write(&files.key, "broken").expect("write");
    let err = reload::reload(
        running.state(),
        &path,
        running.static_config(),
        Some(resolver),
    )
    .await
    .expect_err("a broken key rejects the reload");
    assert!(err.to_string().contains("server.tls.certs[0].key"), "{err}");
    assert_eq!(running.state().snapshot().config.sites.len(), 1);
    assert_eq!(not_after(&running), first);

    // Renewed files plus the new site: both apply.
    let renewed = ca.issue(&["a.test", "b.test"], 90);
    std::fs::write(&files.cert, &renewed.cert_pem).expect("write");
    std::fs::write(&files.key, &renewed.key_pem).expect("write");
    let sites = reload::reload(
        running.state(),
        &path,
        running.static_config(),
        Some(resolver),
    )
    .await
    .expect("reload");
    assert_eq!(sites, 2);
    assert!(not_after(&running) - first >= 29 * 86_400);
    let roots = tls::roots(&ca.pem());
    let client = tls::default_client(&roots, &["http/1.1"]);
    let (_, reply) = tls::https_get(running.local_addr(), "b.test", client, "/").await;
    assert_eq!(reply.text(), "b HTTP/1.1");
    running.shutdown().await;
}

/// What the TLS layer knows reaches `/metrics` through the real binary:
/// each served certificate's notAfter, and handshakes by outcome.
#[tokio::test]
async fn certificate_expiry_and_handshakes_reach_the_metrics() {
    let ca = TestCa::new("metrics CA");
    let dir = tempfile::tempdir().expect("tempdir");
    let issued = ca.issue(&["a.test"], 45);
    let files = write_cert(dir.path(), "a", &issued);
    let a = upstream("a").await;
    let config = manual_config(&[(&["a.test"], &files)], &[("a.test", a.url())], "")
        + "[admin]\nbind_addr = \"127.0.0.1:0\"\n";
    let mut proxy = ProxyProcess::start(&config);
    let admin = proxy.admin_addr();
    let roots = tls::roots(&ca.pem());
    let client = tls::default_client(&roots, &["http/1.1"]);
    let (_, reply) = tls::https_get(proxy.addr, "a.test", client.clone(), "/").await;
    assert_eq!(reply.text(), "a HTTP/1.1");
    assert!(
        tls::connect(proxy.addr, "unknown.test", client)
            .await
            .is_err()
    );

    let expected = reverse_proxy::tls::certs::Leaf::from_pem(issued.cert_pem.as_bytes())
        .expect("leaf")
        .not_after_unix;
    let samples = common::samples(&common::scrape(admin).await);
    let not_after = samples
        .iter()
        .find(|(series, _)| {
            series.starts_with("reverse_proxy_certificate_not_after_timestamp_seconds{")
        })
        .map(|(series, value)| (series.clone(), *value));
    let (series, value) = not_after.expect("certificate series");
    assert!(series.contains("a.test"), "{series}");
    #[allow(clippy::cast_precision_loss)]
    let expected = expected as f64;
    assert!((value - expected).abs() < 0.5, "{value} != {expected}");
    let handshakes = |result: &str| {
        samples
            .get(&format!(
                "reverse_proxy_tls_handshakes_total{{result=\"{result}\"}}"
            ))
            .copied()
            .unwrap_or(0.0)
    };
    assert!(handshakes("success") >= 1.0, "{samples:?}");
    assert!(handshakes("failure") >= 1.0, "{samples:?}");
}

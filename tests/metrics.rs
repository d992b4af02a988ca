//! The admin listener and its Prometheus metrics, against the real binary:
//! exact counts after a known mix of requests, connection states, reloads,
//! readiness, and that none of it leaks onto the public listener.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::any;
use common::{ProxyProcess, Upstream, config, free_port, get, samples, scrape, send};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "[admin]\nbind_addr = \"127.0.0.1:0\"\n";

fn with_admin(sites: &[(&str, &str)]) -> String {
    config(sites, "", ADMIN)
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series} in:\n{samples:#?}"))
}

/// Scrapes until `check` accepts the samples (state changes land a moment
/// after the client sees them), or fails with the last exposition.
async fn scrape_until(
    admin: SocketAddr,
    check: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(admin).await;
        let s = samples(&text);
        if check(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "metrics never matched:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post(addr: SocketAddr, host: &str, path: &str, body: Vec<u8>) -> common::Reply {
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .body(Body::from(body))
        .expect("request");
    send(&common::http1_client(), req).await
}

#[tokio::test]
async fn counters_equal_a_known_mix_of_requests() {
    let site_a = Upstream::start(Router::new().route("/ok", any(|| async { "hello" }))).await;
    let down = format!("http://127.0.0.1:{}", free_port());
    let mut proxy =
        ProxyProcess::start(&with_admin(&[("a.test", &site_a.url()), ("b.test", &down)]));
    let admin = proxy.admin_addr();
    let addr = proxy.addr;

    let mut sent: HashMap<&str, usize> = HashMap::new();
    let mut expect = |host: &'static str, reply: common::Reply, status: StatusCode| {
        assert_eq!(reply.status, status, "{host}: {}", reply.text());
        *sent.entry(host).or_default() += reply.body.len();
    };
    for _ in 0..3 {
        expect("a.test", get(addr, "a.test", "/ok").await, StatusCode::OK);
    }
    for _ in 0..2 {
        expect(
            "a.test",
            get(addr, "A.test:80", "/missing").await,
            StatusCode::NOT_FOUND,
        );
    }
    expect(
        "a.test",
        post(addr, "a.test", "/ok", vec![b'x'; 1000]).await,
        StatusCode::OK,
    );
    for _ in 0..2 {
        expect(
            "b.test",
            get(addr, "b.test", "/").await,
            StatusCode::BAD_GATEWAY,
        );
    }
    expect(
        "_unknown",
        get(addr, "c.test", "/").await,
        StatusCode::MISDIRECTED_REQUEST,
    );
    // Accounting happens when a response body is done; the access line is
    // written right after, so nine lines mean nine accounted requests.
    proxy.wait_for_count(|l| l.contains(" REQUEST "), 9, Duration::from_secs(10));

    let s = samples(&scrape(admin).await);
    let requests = |host: &str, method: &str, status: u16| {
        value(
            &s,
            &format!(
                "reverse_proxy_http_requests_total{{host=\"{host}\",method=\"{method}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(requests("a.test", "GET", 200), 3.0);
    assert_eq!(requests("a.test", "POST", 200), 1.0);
    assert_eq!(requests("a.test", "GET", 404), 2.0);
    assert_eq!(requests("b.test", "GET", 502), 2.0);
    assert_eq!(requests("_unknown", "GET", 421), 1.0);
    let total: f64 = s
        .iter()
        .filter(|(k, _)| k.starts_with("reverse_proxy_http_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, 9.0);

    for (host, count) in [("a.test", 6.0), ("b.test", 2.0), ("_unknown", 1.0)] {
        let count_series =
            format!("reverse_proxy_http_request_duration_seconds_count{{host=\"{host}\"}}");
        assert_eq!(value(&s, &count_series), count, "{host}");
        let inf = format!(
            "reverse_proxy_http_request_duration_seconds_bucket{{host=\"{host}\",le=\"+Inf\"}}"
        );
        assert_eq!(value(&s, &inf), count, "{host}");
        let bytes = format!("reverse_proxy_http_response_bytes_total{{host=\"{host}\"}}");
        assert_eq!(value(&s, &bytes), sent[host] as f64, "{host}");
    }
    assert_eq!(
        value(
            &s,
            "reverse_proxy_http_request_bytes_total{host=\"a.test\"}"
        ),
        1000.0
    );
    assert_eq!(
        value(
            &s,
            "reverse_proxy_http_request_bytes_total{host=\"b.test\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "reverse_proxy_upstream_request_duration_seconds_count{host=\"a.test\"}"
        ),
        6.0
    );
    assert_eq!(
        value(
            &s,
            "reverse_proxy_upstream_errors_total{host=\"b.test\",kind=\"connect\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &s,
            "reverse_proxy_upstream_errors_total{host=\"b.test\",kind=\"timeout\"}"
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "reverse_proxy_upstream_errors_total{host=\"a.test\",kind=\"connect\"}"
        ),
        0.0
    );
    assert_eq!(
        value(&s, "reverse_proxy_rate_limited_total{host=\"a.test\"}"),
        0.0
    );
    // Every request above came on a connection of its own.
    assert_eq!(value(&s, "reverse_proxy_connections_accepted_total"), 9.0);
    assert_eq!(
        value(&s, "reverse_proxy_config_reloads_total{result=\"success\"}"),
        0.0
    );
    assert_eq!(
        value(&s, "reverse_proxy_config_last_reload_successful"),
        1.0
    );
    let version = format!(
        "reverse_proxy_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(value(&s, &version), 1.0);
    assert_eq!(value(&s, "reverse_proxy_upstream_up{host=\"a.test\"}"), 1.0);
    assert_eq!(value(&s, "reverse_proxy_upstream_up{host=\"b.test\"}"), 0.0);
    assert_eq!(
        site_a.hits(),
        6,
        "scrapes and readiness checks send no HTTP to upstreams"
    );
}

#[tokio::test]
async fn exposition_passes_promtool_check_metrics() {
    let site = Upstream::echo("a").await;
    let mut proxy = ProxyProcess::start(&with_admin(&[("a.test", &site.url())]));
    let admin = proxy.admin_addr();
    get(proxy.addr, "a.test", "/").await;
    get(proxy.addr, "nope.test", "/").await;
    proxy.wait_for_count(|l| l.contains(" REQUEST "), 2, Duration::from_secs(10));
    let text = scrape(admin).await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    let mut stdin = promtool.stdin.take().expect("stdin");
    std::io::Write::write_all(&mut stdin, text.as_bytes()).expect("write to promtool");
    drop(stdin);
    let out = promtool.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}\n{text}"
    );
    assert!(
        report.trim().is_empty(),
        "promtool found problems:\n{report}"
    );
}

#[tokio::test]
async fn connection_states_follow_nginx_stub_status() {
    let (release, released) = tokio::sync::watch::channel(false);
    let slow = Upstream::start(Router::new().route(
        "/slow",
        any(move || {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                "done"
            }
        }),
    ))
    .await;
    let mut proxy = ProxyProcess::start(&with_admin(&[("a.test", &slow.url())]));
    let admin = proxy.admin_addr();
    let state = |s: &HashMap<String, f64>, name: &str| {
        value(
            s,
            &format!("reverse_proxy_connections_active{{state=\"{name}\"}}"),
        )
    };
    let states = |reading: f64, writing: f64, idle: f64| {
        move |s: &HashMap<String, f64>| {
            state(s, "reading") == reading
                && state(s, "writing") == writing
                && state(s, "idle") == idle
        }
    };
    scrape_until(admin, states(0.0, 0.0, 0.0)).await;

    // Connected, nothing sent yet: reading.
    let mut silent = TcpStream::connect(proxy.addr).await.expect("connect");
    scrape_until(admin, states(1.0, 0.0, 0.0)).await;

    // A request waiting on its upstream: writing.
    let mut waiting = TcpStream::connect(proxy.addr).await.expect("connect");
    waiting
        .write_all(b"GET /slow HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .expect("write");
    scrape_until(admin, states(1.0, 1.0, 0.0)).await;

    // Its response done, the keep-alive connection waits: idle.
    release.send(true).expect("release");
    let mut buf = [0u8; 1024];
    let n = waiting.read(&mut buf).await.expect("read response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    scrape_until(admin, states(1.0, 0.0, 1.0)).await;

    // The first bytes of the next request: reading again.
    waiting
        .write_all(b"GET /slow HTTP/1.1\r\n")
        .await
        .expect("write");
    scrape_until(admin, states(2.0, 0.0, 0.0)).await;

    silent.shutdown().await.ok();
    drop(silent);
    drop(waiting);
    let s = scrape_until(admin, states(0.0, 0.0, 0.0)).await;
    assert_eq!(value(&s, "reverse_proxy_connections_accepted_total"), 2.0);
}

#[tokio::test]
async fn reloads_are_counted_and_new_sites_get_their_label() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let mut proxy = ProxyProcess::start(&with_admin(&[("a.test", &a.url())]));
    let admin = proxy.admin_addr();
    let before = value(
        &samples(&scrape(admin).await),
        "reverse_proxy_config_last_reload_success_timestamp_seconds",
    );

    // Before the reload, b.test is unknown.
    assert_eq!(
        get(proxy.addr, "b.test", "/").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    std::fs::write(
        proxy.config_path(),
        with_admin(&[("a.test", &a.url()), ("b.test", &b.url())]),
    )
    .expect("write");
    proxy.signal("HUP");
    proxy.wait_for_line(
        |l| l.contains("CONFIG_RELOAD status=success"),
        Duration::from_secs(10),
    );
    assert_eq!(get(proxy.addr, "b.test", "/").await.status, StatusCode::OK);
    proxy.wait_for_count(|l| l.contains(" REQUEST "), 2, Duration::from_secs(10));
    let s = samples(&scrape(admin).await);
    assert_eq!(
        value(&s, "reverse_proxy_config_reloads_total{result=\"success\"}"),
        1.0
    );
    assert_eq!(
        value(&s, "reverse_proxy_config_reloads_total{result=\"failure\"}"),
        0.0
    );
    assert!(
        value(
            &s,
            "reverse_proxy_config_last_reload_success_timestamp_seconds"
        ) > before
    );
    assert_eq!(
        value(
            &s,
            "reverse_proxy_http_requests_total{host=\"_unknown\",method=\"GET\",status=\"421\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "reverse_proxy_http_requests_total{host=\"b.test\",method=\"GET\",status=\"200\"}"
        ),
        1.0
    );
    assert_eq!(value(&s, "reverse_proxy_upstream_up{host=\"b.test\"}"), 1.0);

    // A broken file is counted as a failure and changes nothing else.
    std::fs::write(proxy.config_path(), "[server\n").expect("write");
    proxy.signal("HUP");
    proxy.wait_for_line(
        |l| l.contains("CONFIG_RELOAD status=error"),
        Duration::from_secs(10),
    );
    let s = samples(&scrape(admin).await);
    assert_eq!(
        value(&s, "reverse_proxy_config_reloads_total{result=\"failure\"}"),
        1.0
    );
    assert_eq!(
        value(&s, "reverse_proxy_config_reloads_total{result=\"success\"}"),
        1.0
    );
    assert_eq!(
        value(&s, "reverse_proxy_config_last_reload_successful"),
        0.0
    );

    // Dropping a site drops its readiness series, so no alert stays stuck.
    std::fs::write(proxy.config_path(), with_admin(&[("a.test", &a.url())])).expect("write");
    proxy.signal("HUP");
    proxy.wait_for_count(
        |l| l.contains("CONFIG_RELOAD status=success"),
        2,
        Duration::from_secs(10),
    );
    let text = scrape(admin).await;
    let s = samples(&text);
    assert_eq!(
        value(&s, "reverse_proxy_config_last_reload_successful"),
        1.0
    );
    assert!(
        !text.contains("reverse_proxy_upstream_up{host=\"b.test\"}"),
        "{text}"
    );
}

#[tokio::test]
async fn readiness_names_the_site_whose_upstream_is_down() {
    let a = Upstream::echo("a").await;
    let b = Upstream::echo("b").await;
    let b_addr = b.addr;
    let mut proxy = ProxyProcess::start(&with_admin(&[("a.test", &a.url()), ("b.test", &b.url())]));
    let admin = proxy.admin_addr();

    let ready = get(admin, "localhost", "/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.text(), "ready\n");

    b.stop();
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let down = loop {
        let reply = get(admin, "localhost", "/health/ready").await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply;
        }
        assert!(
            Instant::now() < deadline,
            "still ready after b.test's upstream stopped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let text = down.text();
    assert_eq!(
        text,
        format!("not ready\nsite b.test: upstream {b_addr}: connection refused\n"),
    );
    assert_eq!(
        down.headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("text/plain; charset=utf-8")
    );
    // Liveness is not readiness.
    assert_eq!(
        get(admin, "localhost", "/health").await.status,
        StatusCode::OK
    );

    let _b = Upstream::start_on(b_addr, Router::new().fallback(any(|| async { "b" }))).await;
    let ready = get(admin, "localhost", "/health/ready").await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
}

#[tokio::test]
async fn admin_routes_are_not_served_on_the_public_listener() {
    let site = Upstream::echo("site-a").await;
    let mut proxy = ProxyProcess::start(&with_admin(&[("a.test", &site.url())]));
    let admin = proxy.admin_addr();
    for path in ["/metrics", "/health/ready"] {
        let proxied = get(proxy.addr, "a.test", path).await;
        assert_eq!(proxied.status, StatusCode::OK);
        assert!(
            proxied.text().starts_with(&format!("site-a\nGET {path}\n")),
            "{path} was not proxied: {}",
            proxied.text()
        );
        let unknown = get(proxy.addr, "metrics.test", path).await;
        assert_eq!(unknown.status, StatusCode::MISDIRECTED_REQUEST);
        assert!(
            !unknown.text().contains("reverse_proxy_"),
            "{}",
            unknown.text()
        );
    }
    assert_eq!(site.hits(), 2);
    // And the admin listener serves nothing but its own routes.
    let other = get(admin, "a.test", "/anything").await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    assert_eq!(site.hits(), 2);
}

#[tokio::test]
async fn without_admin_nothing_listens_and_nothing_is_recorded() {
    let site = Upstream::echo("a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &site.url())], "", ""));
    assert_eq!(get(proxy.addr, "a.test", "/").await.status, StatusCode::OK);
    let lines = proxy.lines();
    assert!(
        !lines.iter().any(|l| l.contains("proto=admin")),
        "{lines:#?}"
    );
}

#[test]
fn bad_admin_address_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::write_file(
        dir.path(),
        "config.toml",
        &config(
            &[("a.test", "http://127.0.0.1:1")],
            "",
            "[admin]\nbind_addr = \"localhost:metrics\"\n",
        ),
    );
    let (code, _, err) =
        common::run_binary(&["--validate", "--config", path.to_str().expect("path")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("admin.bind_addr"), "{err}");
}

#[test]
fn admin_address_in_use_fails_the_start() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = held.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::write_file(
        dir.path(),
        "config.toml",
        &config(
            &[("a.test", "http://127.0.0.1:1")],
            "",
            &format!("[admin]\nbind_addr = \"{taken}\"\n"),
        ),
    );
    let out = Command::new(common::BIN)
        .args(["--config", path.to_str().expect("path")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("admin.bind_addr") && err.contains(&taken.to_string()),
        "{err}"
    );
}

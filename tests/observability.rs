//! What operators plug the proxy into: a real Prometheus server scraping
//! the admin listener and evaluating the shipped alert rules, `promtool` on
//! the shipped files, the Grafana dashboard's metric names, and the
//! certificate expiry gauge.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, UNIX_EPOCH};

use common::{ProxyProcess, Upstream, config, free_port, get, samples, scrape};
use http::StatusCode;
use reverse_proxy::config::Config;
use reverse_proxy::daemon::Running;
use reverse_proxy::metrics::Metrics;
use serde_json::Value;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/grafana")
        .join(file)
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A Prometheus server on loopback with its storage in a temp dir; killed
/// when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: reverse-proxy\n    scrape_timeout: 1s\n    static_configs:\n      - targets: [\"{target}\"]\n",
            deploy("alerts.yml").display()
        );
        let config_path = common::write_file(dir.path(), "prometheus.yml", &config);
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path; `None` while the server is not answering yet.
    async fn api(&self, path_and_query: &str) -> Option<Value> {
        let req = http::Request::get(format!("http://{}{path_and_query}", self.addr))
            .body(axum::body::Body::empty())
            .expect("request");
        let resp =
            tokio::time::timeout(Duration::from_secs(5), common::http1_client().request(req))
                .await
                .ok()?
                .ok()?;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    }

    /// Polls until `check` finds what it wants in an API answer.
    async fn wait_for<T>(
        &mut self,
        path_and_query: &str,
        check: impl Fn(&Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut last = None;
        loop {
            if let Some(answer) = self.api(path_and_query).await {
                if let Some(found) = check(&answer) {
                    return found;
                }
                last = Some(answer);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus never answered {path_and_query} as expected; last answer: {last:?}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_admin_listener_and_evaluates_the_alerts() {
    let site = Upstream::echo("a").await;
    let down = format!("http://127.0.0.1:{}", free_port());
    let mut proxy = ProxyProcess::start(&config(
        &[("a.test", &site.url()), ("b.test", &down)],
        "",
        "[admin]\nbind_addr = \"127.0.0.1:0\"\n",
    ));
    let admin = proxy.admin_addr();
    for _ in 0..5 {
        assert_eq!(get(proxy.addr, "a.test", "/").await.status, StatusCode::OK);
    }
    assert_eq!(
        get(proxy.addr, "b.test", "/").await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        get(proxy.addr, "c.test", "/").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );
    proxy.wait_for_count(|l| l.contains(" REQUEST "), 7, Duration::from_secs(10));

    let mut prometheus = Prometheus::start(admin);
    let total = prometheus
        .wait_for(
            "/api/v1/query?query=sum(reverse_proxy_http_requests_total)",
            |answer| {
                answer["data"]["result"][0]["value"][1]
                    .as_str()
                    .map(str::to_owned)
            },
        )
        .await;
    assert_eq!(total, "7");

    // The shipped rules load and evaluate without errors against real data,
    // and UpstreamDown catches b.test (pending for its `for:` duration).
    let alert = prometheus
        .wait_for("/api/v1/alerts", |answer| {
            answer["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == "UpstreamDown")
                .cloned()
        })
        .await;
    assert_eq!(alert["labels"]["host"], "b.test", "{alert}");
    let rules = prometheus.api("/api/v1/rules").await.expect("rules answer");
    let group = &rules["data"]["groups"][0];
    for rule in group["rules"].as_array().expect("rules") {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
}

#[test]
fn shipped_alert_rules_and_scrape_config_pass_promtool() {
    let rules = deploy("alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().expect("path")]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
    let text = std::fs::read_to_string(&rules).expect("alerts.yml");
    for alert in [
        "CertificateExpiresSoon",
        "ReloadFailed",
        "UpstreamDown",
        "High5xxRatio",
    ] {
        assert!(
            text.contains(&format!("- alert: {alert}\n")),
            "{alert} missing"
        );
    }
    let scrape_config = deploy("prometheus.yml");
    let (ok, out) = promtool(&["check", "config", scrape_config.to_str().expect("path")]);
    assert!(ok, "{out}");
}

#[test]
fn broken_rules_are_caught_by_the_same_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = common::write_file(
        dir.path(),
        "alerts.yml",
        "groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(rate(reverse_proxy_http_requests_total[5m]) >\n",
    );
    let (ok, out) = promtool(&["check", "rules", broken.to_str().expect("path")]);
    assert!(!ok, "{out}");
}

/// Every `reverse_proxy_*` name in `text`, with histogram series suffixes
/// taken back to their family.
fn referenced(text: &str, families: &BTreeSet<String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("reverse_proxy_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| name.strip_suffix(suffix))
            .find(|base| families.contains(*base))
            .unwrap_or(name);
        names.insert(family.to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test]
async fn dashboard_and_alerts_reference_only_exported_metrics() {
    let families: BTreeSet<String> = Metrics::new()
        .expect("metrics")
        .names()
        .iter()
        .cloned()
        .collect();
    // The list is the one the running proxy exposes: every family in a
    // real scrape is in it.
    let site = Upstream::echo("a").await;
    let mut proxy = ProxyProcess::start(&config(
        &[("a.test", &site.url())],
        "",
        "[admin]\nbind_addr = \"127.0.0.1:0\"\n",
    ));
    let admin = proxy.admin_addr();
    get(proxy.addr, "a.test", "/").await;
    proxy.wait_for_count(|l| l.contains(" REQUEST "), 1, Duration::from_secs(10));
    let exposed = referenced(&scrape(admin).await, &families);
    assert!(
        exposed.is_subset(&families),
        "exposed but not listed: {:?}",
        exposed.difference(&families)
    );

    let dashboard_text = std::fs::read_to_string(deploy("dashboard.json")).expect("dashboard.json");
    let dashboard: Value = serde_json::from_str(&dashboard_text).expect("dashboard.json is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
    let used = referenced(&dashboard_text, &families);
    let unknown: Vec<_> = used.difference(&families).collect();
    assert!(
        unknown.is_empty(),
        "dashboard uses metrics the proxy does not export: {unknown:?}"
    );
    for needed in [
        "reverse_proxy_http_requests_total",
        "reverse_proxy_http_request_duration_seconds",
        "reverse_proxy_http_response_bytes_total",
        "reverse_proxy_connections_active",
        "reverse_proxy_rate_limited_total",
        "reverse_proxy_upstream_errors_total",
        "reverse_proxy_certificate_not_after_timestamp_seconds",
        "reverse_proxy_config_reloads_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }

    let alerts = std::fs::read_to_string(deploy("alerts.yml")).expect("alerts.yml");
    let used = referenced(&alerts, &families);
    let unknown: Vec<_> = used.difference(&families).collect();
    assert!(
        unknown.is_empty(),
        "alert rules use metrics the proxy does not export: {unknown:?}"
    );
}

#[test]
fn the_name_check_catches_a_misspelt_metric() {
    let families: BTreeSet<String> = Metrics::new()
        .expect("metrics")
        .names()
        .iter()
        .cloned()
        .collect();
    let used = referenced(
        r#"{"expr": "rate(reverse_proxy_http_request_total[5m]) + reverse_proxy_http_request_duration_seconds_bucket"}"#,
        &families,
    );
    let unknown: Vec<_> = used.difference(&families).cloned().collect();
    assert_eq!(unknown, ["reverse_proxy_http_request_total"]);
}

/// notAfter of a PEM certificate as Unix seconds, read by openssl and date.
fn not_after(cert: &Path) -> u64 {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(cert)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let date = text
        .trim()
        .strip_prefix("notAfter=")
        .expect("notAfter line");
    let out = Command::new("date")
        .args(["-u", "+%s", "-d", date])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("unix seconds")
}

/// The gauge TLS code feeds: the value set for a certificate is the
/// certificate's notAfter, exactly, on `/metrics`.
#[tokio::test]
async fn certificate_expiry_is_the_certificates_not_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = dir.path().join("cert.pem");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "47",
            "-subj",
            "/CN=a.test",
        ])
        .arg("-keyout")
        .arg(dir.path().join("key.pem"))
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let expires = not_after(&cert);

    let config = Config::parse(&config(
        &[("a.test", "http://127.0.0.1:1")],
        "",
        "[admin]\nbind_addr = \"127.0.0.1:0\"\n",
    ))
    .expect("config");
    let running = Running::start(config).await.expect("start");
    let admin = running.admin_addr().expect("admin listener");
    let metrics = running.metrics().expect("metrics with [admin]");
    metrics.set_certificate_not_after("a.test", UNIX_EPOCH + Duration::from_secs(expires));
    let s = samples(&scrape(admin).await);
    let series = "reverse_proxy_certificate_not_after_timestamp_seconds{name=\"a.test\"}";
    assert_eq!(s.get(series).copied(), Some(expires as f64), "{s:#?}");
    // About 47 days from now, as the certificate says.
    let days = (expires as f64
        - std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64())
        / 86400.0;
    assert!((46.0..=47.0).contains(&days), "{days}");
    assert_eq!(running.shutdown().await, 0);
}

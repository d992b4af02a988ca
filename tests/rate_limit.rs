//! Per-client rate limiting as clients see it: nginx `limit_req ... nodelay`
//! bursts, 429 with Retry-After, one bucket per client (IPv6 per /64),
//! trusted proxies, `/health` exempt, reloads, eviction, the `RATE_LIMIT`
//! log line and the fail2ban filter run by the real `fail2ban-regex`.

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use axum::body::Body;
use common::{
    ProxyProcess, Upstream, config, connect_from, connect_many, field, header_of, read_until_close,
    send_each, simultaneous, status_of, write_file,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reverse_proxy::config::Config;
use reverse_proxy::daemon::Running;
use reverse_proxy::lifecycle::reload::reload;
use tokio::io::AsyncWriteExt;

const V4: &str = "127.0.0.1";
const V4_OTHER: &str = "127.0.0.2";
const V6: &str = "::1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A config for site `a.test` with `[rate_limit]` settings (and any other
/// sections) in `extra`.
fn site_config(upstream: &Upstream, server_extra: &str, extra: &str) -> String {
    config(&[("a.test", &upstream.url())], server_extra, extra)
}

/// The same, listening on `[::]:0`: one socket for IPv4 and IPv6 clients.
fn dual_stack(toml: String) -> String {
    toml.replace("bind_addr = \"127.0.0.1:0\"", "bind_addr = \"[::]:0\"")
}

fn limits(rps: u32, burst: u32) -> String {
    format!("[rate_limit]\nrequests_per_second = {rps}\nburst = {burst}\n")
}

async fn start(toml: &str) -> Running {
    let config = Config::parse(toml).expect("valid config");
    Running::start(config).await.expect("proxy starts")
}

/// Where a client on `local` reaches the proxy listening on `listen`.
fn target(listen: SocketAddr, local: IpAddr) -> SocketAddr {
    let dest = if local.is_ipv4() { ip(V4) } else { ip(V6) };
    SocketAddr::new(dest, listen.port())
}

fn request(host: &str, path: &str, extra_headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra_headers}\r\n")
}

/// `n` requests for `a.test/` sent at once from `local`; the statuses.
async fn burst(listen: SocketAddr, local: &str, n: usize, extra_headers: &str) -> Vec<u16> {
    let local = ip(local);
    let responses = simultaneous(local, target(listen, local), n, |_| {
        request("a.test", "/", extra_headers)
    })
    .await;
    responses
        .iter()
        .map(|r| status_of(r).unwrap_or(0))
        .collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// Asserts that of `statuses`, `expected` (or one more, for a token that
/// refilled while the requests went out) passed and every other got 429.
fn assert_admitted(statuses: &[u16], expected: usize) -> usize {
    let ok = count(statuses, 200);
    assert!(
        (expected..=expected + 1).contains(&ok),
        "expected {expected} (+1) admitted, got {ok}: {statuses:?}"
    );
    assert_eq!(ok + count(statuses, 429), statuses.len(), "{statuses:?}");
    ok
}

#[tokio::test]
async fn burst_of_21_then_10_per_second() {
    let upstream = Upstream::echo("a").await;
    let proxy = start(&site_config(&upstream, "", &limits(10, 20))).await;
    let addr = proxy.local_addr();

    let local = ip(V4);
    let first = connect_many(local, addr, 30).await;
    let sent = tokio::time::Instant::now();
    let responses = send_each(first, |_| request("a.test", "/", "")).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| status_of(r).unwrap_or(0))
        .collect();
    let admitted = assert_admitted(&statuses, 21);
    assert_eq!(
        upstream.hits(),
        admitted,
        "refused requests must never reach the upstream"
    );
    let refused = responses
        .iter()
        .find(|r| status_of(r) == Some(429))
        .expect("a 429");
    assert_eq!(
        header_of(refused, "retry-after").as_deref(),
        Some("1"),
        "{refused}"
    );
    assert_eq!(
        header_of(refused, "content-type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        refused.ends_with("too many requests: slow down and retry after the time in Retry-After\n"),
        "{refused}"
    );

    // A second later, 10 tokens are back (the margin keeps the count from
    // depending on exactly when each batch was read).
    let second = connect_many(local, addr, 30).await;
    tokio::time::sleep_until(sent + Duration::from_millis(1050)).await;
    let responses = send_each(second, |_| request("a.test", "/", "")).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| status_of(r).unwrap_or(0))
        .collect();
    let again = assert_admitted(&statuses, 10);
    assert_eq!(upstream.hits(), admitted + again);
    proxy.shutdown().await;
}

#[tokio::test]
async fn http2_streams_share_their_clients_bucket() {
    let upstream = Upstream::echo("a").await;
    // 1 r/s: the streams may be spread over a few hundred milliseconds.
    let proxy = start(&site_config(&upstream, "", &limits(1, 20))).await;
    let stream = connect_from(ip(V4), proxy.local_addr()).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let requests = (0..30).map(|_| {
        let mut sender = sender.clone();
        let req = http::Request::get("http://a.test/")
            .body(Body::empty())
            .expect("request");
        async move {
            let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
                .await
                .expect("response within 30 s")
                .expect("response");
            response.status().as_u16()
        }
    });
    let statuses = futures_util::future::join_all(requests).await;
    let admitted = assert_admitted(&statuses, 21);
    assert_eq!(upstream.hits(), admitted);
    proxy.shutdown().await;
}

#[tokio::test]
async fn clients_have_their_own_buckets() {
    let upstream = Upstream::echo("a").await;
    let proxy = start(&dual_stack(site_config(&upstream, "", &limits(1, 20)))).await;
    let addr = proxy.local_addr();

    // IPv4 clients reach the dual-stack socket as ::ffff:127.0.0.x and are
    // limited as plain IPv4 addresses.
    assert_admitted(&burst(addr, V4, 30, "").await, 21);
    assert_admitted(&burst(addr, V4_OTHER, 30, "").await, 21);
    assert_admitted(&burst(addr, V6, 30, "").await, 21);
    // The first client is still limited.
    assert_eq!(burst(addr, V4, 1, "").await, [429]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn health_is_never_limited_and_unknown_hosts_count() {
    let upstream = Upstream::echo("a").await;
    let proxy = start(&site_config(&upstream, "", &limits(1, 2))).await;
    let addr = proxy.local_addr();
    let local = ip(V4);

    let responses = simultaneous(local, addr, 5, |_| request("unknown.test", "/", "")).await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| status_of(r).unwrap_or(0))
        .collect();
    assert_eq!(count(&statuses, 421), 3, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 2, "{statuses:?}");
    // The unknown-host requests used up the client's bucket.
    assert_eq!(burst(addr, V4, 1, "").await, [429]);
    assert_eq!(upstream.hits(), 0);

    let responses = simultaneous(local, addr, 30, |_| request("a.test", "/health", "")).await;
    for r in &responses {
        assert_eq!(status_of(r), Some(200), "{r}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn disabled_limits_nothing() {
    let upstream = Upstream::echo("a").await;
    let toml = site_config(
        &upstream,
        "",
        "[rate_limit]\nenabled = false\nrequests_per_second = 1\nburst = 1\n",
    );
    let proxy = start(&toml).await;
    assert!(proxy.state().snapshot().limiter.is_none());
    let statuses = burst(proxy.local_addr(), V4, 50, "").await;
    assert_eq!(count(&statuses, 200), 50, "{statuses:?}");
    proxy.shutdown().await;
}

/// A forwarding hop on 127.0.0.1 that the config trusts.
const TRUST_LOCALHOST: &str = "[proxy]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";

#[tokio::test]
async fn same_ipv6_prefix_shares_a_bucket_via_trusted_proxy() {
    let upstream = Upstream::echo("a").await;
    let extra = format!("{TRUST_LOCALHOST}{}", limits(1, 20));
    let proxy = start(&site_config(&upstream, "", &extra)).await;
    let addr = proxy.local_addr();

    let xff = |client: &str| format!("X-Forwarded-For: {client}\r\n");
    assert_admitted(&burst(addr, V4, 30, &xff("2001:db8:1:2::1")).await, 21);
    // Another address of the same /64 finds the bucket empty...
    assert_eq!(
        burst(addr, V4, 1, &xff("2001:db8:1:2:ffff::99")).await,
        [429]
    );
    // ...another /64 has its own, and so has the trusted hop itself.
    assert_admitted(&burst(addr, V4, 30, &xff("2001:db8:1:3::1")).await, 21);
    assert_eq!(burst(addr, V4, 1, "").await, [200]);
    proxy.shutdown().await;
}

/// Addresses added to `lo` for one test and removed afterwards.
struct LoopbackAddrs(Vec<String>);

impl LoopbackAddrs {
    /// Adds `addrs` (with their /64) to `lo`; `None` where that is not
    /// permitted (no CAP_NET_ADMIN).
    fn add(addrs: &[String]) -> Option<Self> {
        let mut added = Self(Vec::new());
        for addr in addrs {
            let ok = Command::new("ip")
                .args([
                    "-6",
                    "addr",
                    "add",
                    &format!("{addr}/64"),
                    "dev",
                    "lo",
                    "nodad",
                ])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return None;
            }
            added.0.push(addr.clone());
        }
        Some(added)
    }
}

impl Drop for LoopbackAddrs {
    fn drop(&mut self) {
        for addr in &self.0 {
            let _ = Command::new("ip")
                .args(["-6", "addr", "del", &format!("{addr}/64"), "dev", "lo"])
                .status();
        }
    }
}

#[tokio::test]
async fn same_ipv6_prefix_shares_a_bucket_on_real_sockets() {
    // A /64 of the documentation range that no other test run uses.
    let net = format!(
        "2001:db8:{:x}:{:x}",
        std::process::id() & 0xffff,
        std::process::id() >> 16
    );
    let (a, b) = (format!("{net}::a"), format!("{net}::b"));
    let Some(_addrs) = LoopbackAddrs::add(&[a.clone(), b.clone()]) else {
        eprintln!(
            "skipped: cannot add addresses to lo (needs CAP_NET_ADMIN); \
             same_ipv6_prefix_shares_a_bucket_via_trusted_proxy covers the same rule"
        );
        return;
    };
    let upstream = Upstream::echo("a").await;
    let proxy = start(&dual_stack(site_config(&upstream, "", &limits(1, 20)))).await;
    let addr = proxy.local_addr();

    assert_admitted(&burst(addr, &a, 30, "").await, 21);
    assert_eq!(burst(addr, &b, 1, "").await, [429]);
    assert_admitted(&burst(addr, V6, 30, "").await, 21);
    proxy.shutdown().await;
}

#[tokio::test]
async fn reload_changes_the_admitted_rate() {
    let upstream = Upstream::echo("a").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let slow = site_config(&upstream, "", &limits(1, 20));
    let path = write_file(dir.path(), "config.toml", &slow);
    let proxy = start(&slow).await;
    let addr = proxy.local_addr();
    let settings = proxy.static_config().clone();

    assert_admitted(&burst(addr, V4, 30, "").await, 21);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&burst(addr, V4, 10, "").await, 200),
        0,
        "1 r/s: nothing new after 0.5 s"
    );

    // A reload that leaves [rate_limit] alone keeps every bucket.
    let more_sites = format!(
        "{slow}\n[[sites]]\nhost = \"b.test\"\nupstream = \"{}\"\n",
        upstream.url()
    );
    write_file(dir.path(), "config.toml", &more_sites);
    assert_eq!(
        reload(proxy.state(), &path, &settings, None)
            .await
            .expect("reload"),
        2
    );
    assert_eq!(burst(addr, V4, 3, "").await, [429, 429, 429]);

    // A new rate starts from fresh buckets and admits 10 per second.
    write_file(
        dir.path(),
        "config.toml",
        &site_config(&upstream, "", &limits(10, 20)),
    );
    reload(proxy.state(), &path, &settings, None)
        .await
        .expect("reload");
    assert_admitted(&burst(addr, V4, 30, "").await, 21);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let statuses = burst(addr, V4, 10, "").await;
    let waited = started.elapsed().as_millis();
    let admitted = count(&statuses, 200);
    assert!(
        (4..=7).contains(&admitted),
        "10 r/s for ~{waited} ms should admit about 5, got {admitted}: {statuses:?}"
    );

    // And rate limiting can be switched off by a reload.
    write_file(
        dir.path(),
        "config.toml",
        &site_config(&upstream, "", "[rate_limit]\nenabled = false\n"),
    );
    reload(proxy.state(), &path, &settings, None)
        .await
        .expect("reload");
    assert_eq!(count(&burst(addr, V4, 30, "").await, 200), 30);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_clients_are_evicted_by_the_background_task() {
    let upstream = Upstream::echo("a").await;
    let extra = "[rate_limit]\neviction_interval_secs = 1\neviction_age_secs = 1\n";
    let proxy = start(&dual_stack(site_config(&upstream, "", extra))).await;
    let addr = proxy.local_addr();
    let limiter = proxy.state().snapshot().limiter.clone().expect("limiter");

    burst(addr, V4, 3, "").await;
    burst(addr, V4_OTHER, 3, "").await;
    burst(addr, V6, 3, "").await;
    assert_eq!(limiter.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !limiter.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} clients still tracked after 10 s",
            limiter.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.shutdown().await;
}

fn is_rate_limit(line: &str) -> bool {
    line.contains("  WARN RATE_LIMIT ")
}

#[tokio::test]
async fn trusted_proxy_forwarded_client_is_limited_and_logged() {
    let upstream = Upstream::echo("a").await;
    let extra = format!("{TRUST_LOCALHOST}{}", limits(1, 20));
    let proxy = ProxyProcess::start(&site_config(&upstream, "", &extra));
    let addr = proxy.addr;

    // Through the trusted hop, the forwarded address is the client.
    let forwarded = "X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n";
    assert_admitted(&burst(addr, V4, 30, forwarded).await, 21);
    let refused = |line: &str| is_rate_limit(line) && line.contains("client_ip=203.0.113.7 ");
    let lines = proxy.wait_for_count(refused, 9, Duration::from_secs(10));
    for line in &lines {
        assert!(
            line.ends_with(" WARN RATE_LIMIT client_ip=203.0.113.7 host=a.test path=/ status=429"),
            "{line}"
        );
    }
    proxy.wait_for_count(
        |l| l.contains(" REQUEST client_ip=203.0.113.7 host=a.test "),
        21,
        Duration::from_secs(10),
    );
    // The hop itself is another client.
    assert_eq!(burst(addr, V4, 1, "").await, [200]);

    // From an untrusted peer the header changes nothing: every request
    // claims another address, and all count against the peer.
    let local = ip(V4_OTHER);
    let responses = simultaneous(local, addr, 30, |i| {
        request(
            "a.test",
            "/",
            &format!("X-Forwarded-For: 203.0.113.{}\r\n", 100 + i),
        )
    })
    .await;
    let statuses: Vec<u16> = responses
        .iter()
        .map(|r| status_of(r).unwrap_or(0))
        .collect();
    let admitted = assert_admitted(&statuses, 21);
    let lines = proxy.wait_for_count(
        |l| is_rate_limit(l) && l.contains("client_ip=127.0.0.2 "),
        30 - admitted,
        Duration::from_secs(10),
    );
    assert!(lines.iter().all(|l| field(l, "client_ip") == V4_OTHER));
    // Nothing was logged, or limited, under the forged addresses.
    assert!(
        !proxy
            .lines()
            .iter()
            .any(|l| l.contains("client_ip=203.0.113.1") && !l.contains("client_ip=203.0.113.7")),
        "a forged X-Forwarded-For from an untrusted peer was believed"
    );
}

/// The lines `fail2ban-regex` prints with `-o TOKEN` for `log` and the
/// project's filter.
fn fail2ban_regex(log: &Path, token: &str) -> Vec<String> {
    let filter = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fail2ban/filter.d/reverse-proxy.conf"
    );
    let out = Command::new("fail2ban-regex")
        .args(["-o", token])
        .arg(log)
        .arg(filter)
        .output()
        .expect("run fail2ban-regex (Debian package fail2ban)");
    assert!(
        out.status.success(),
        "fail2ban-regex failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn log_injection_yields_one_line_with_the_real_client() {
    let upstream = Upstream::echo("a").await;
    let proxy = ProxyProcess::start(&site_config(
        &upstream,
        "access_log = \"$DIR/access.log\"",
        &limits(1, 1),
    ));
    let log = proxy.dir.path().join("access.log");
    let addr = proxy.addr;

    assert_admitted(&burst(addr, V4, 2, "").await, 2);
    let evil = "/login%0d%0a2026-01-01T00:00:00.000000Z%20%20WARN%20RATE_LIMIT%20client_ip=1.2.3.4%20x\"y\\z";
    let mut stream = connect_from(ip(V4), addr).await;
    stream
        .write_all(request("a.test", evil, "").as_bytes())
        .await
        .expect("write");
    let response = read_until_close(&mut stream, Duration::from_secs(10)).await;
    assert_eq!(status_of(&response), Some(429), "{response}");

    let lines = common::wait_for_file_lines(&log, 3);
    // Give a forged extra line the chance to show up before counting.
    proxy.wait_for_count(is_rate_limit, 1, Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200));
    let lines_now = common::wait_for_file_lines(&log, 3);
    assert_eq!(lines_now, lines);
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let refused: Vec<&String> = lines.iter().filter(|l| is_rate_limit(l)).collect();
    assert_eq!(refused.len(), 1, "{lines:#?}");
    let expected = " WARN RATE_LIMIT client_ip=127.0.0.1 host=a.test path=\"/login%0d%0a2026-01-01T00:00:00.000000Z%20%20WARN%20RATE_LIMIT%20client_ip=1.2.3.4%20x\\\"y\\\\z\" status=429";
    assert!(refused[0].ends_with(expected), "{}", refused[0]);
    assert_eq!(fail2ban_regex(&log, "ip"), ["127.0.0.1"]);
}

#[tokio::test]
async fn fail2ban_regex_matches_exactly_the_limited_clients() {
    let upstream = Upstream::echo("a").await;
    let toml = dual_stack(site_config(
        &upstream,
        "access_log = \"$DIR/access.log\"",
        &format!("{TRUST_LOCALHOST}{}", limits(1, 2)),
    ));
    let proxy = ProxyProcess::start(&toml);
    let log = proxy.dir.path().join("access.log");
    let listen = proxy.addr;

    // Not limited: three requests that only mention rate limits in their
    // path, and an unknown host.
    let local = ip(V4);
    let quiet = simultaneous(local, target(listen, local), 3, |i| match i {
        0 => request("a.test", "/x%20RATE_LIMIT%20client_ip=6.6.6.6", ""),
        1 => request("unknown.test", "/", ""),
        _ => request("a.test", "/", ""),
    })
    .await;
    assert!(quiet.iter().all(|r| status_of(r) != Some(429)), "{quiet:?}");

    // Limited: an IPv4 client, an IPv6 client, and an IPv6 client behind
    // the trusted hop.
    let mut limited = BTreeSet::new();
    let mut expected_refusals = 0;
    for (local, xff, client) in [
        (V4_OTHER, "", V4_OTHER),
        (V6, "", V6),
        (V4, "X-Forwarded-For: 2001:db8::7\r\n", "2001:db8::7"),
    ] {
        let statuses = burst(listen, local, 6, xff).await;
        let admitted = assert_admitted(&statuses, 3);
        expected_refusals += 6 - admitted;
        limited.insert(client.to_owned());
    }
    let total = 3 + 3 * 6;
    let lines = common::wait_for_file_lines(&log, total);
    assert_eq!(lines.len(), total, "{lines:#?}");
    let refusals: Vec<&String> = lines.iter().filter(|l| is_rate_limit(l)).collect();
    assert_eq!(refusals.len(), expected_refusals, "{lines:#?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("  INFO REQUEST "))
            .count(),
        total - expected_refusals
    );

    // Every RATE_LIMIT line matched and nothing else.
    let matched = fail2ban_regex(&log, "msg");
    let refusal_texts: Vec<String> = refusals.iter().map(|l| (*l).clone()).collect();
    assert_eq!(matched, refusal_texts);
    // The captured hosts are the limited clients, each match its line's.
    let ips = fail2ban_regex(&log, "ip");
    let logged: Vec<String> = refusals.iter().map(|l| field(l, "client_ip")).collect();
    assert_eq!(ips, logged);
    assert_eq!(ips.into_iter().collect::<BTreeSet<_>>(), limited);
}

#[test]
fn bad_rate_limit_settings_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = "[server.tls]\nmode = \"off\"\n\
        [proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"not-a-cidr\"]\n\
        [rate_limit]\nrequests_per_second = 0\nburst = 1000001\nipv6_prefix_len = 129\n\
        eviction_interval_secs = 90000\neviction_age_secs = 0\n\
        [[sites]]\nhost = \"a.test\"\nupstream = \"http://127.0.0.1:1\"\n";
    let path = write_file(dir.path(), "bad.toml", bad);
    let (code, _, err) =
        common::run_binary(&["--validate", "--config", path.to_str().expect("path")]);
    assert_eq!(code, 2, "{err}");
    for expected in [
        "proxy.trusted_proxies[1]: not an IP address or CIDR: \"not-a-cidr\"",
        "rate_limit.requests_per_second: must be between 1 and 1000000, got 0",
        "rate_limit.burst: must be between 1 and 1000000, got 1000001",
        "rate_limit.ipv6_prefix_len: must be between 1 and 128, got 129",
        "rate_limit.eviction_interval_secs: must be between 1 and 86400, got 90000",
        "rate_limit.eviction_age_secs: must be between 1 and 86400, got 0",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }

    let typo = "[server.tls]\nmode = \"off\"\n[rate_limit]\nenabled = \"yes\"\n\
        [[sites]]\nhost = \"a.test\"\nupstream = \"http://127.0.0.1:1\"\n";
    let path = write_file(dir.path(), "typo.toml", typo);
    let (code, _, err) =
        common::run_binary(&["--validate", "--config", path.to_str().expect("path")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("expected a boolean"), "{err}");
}

#[tokio::test]
async fn a_bad_reload_keeps_the_running_limiter_and_its_buckets() {
    let upstream = Upstream::echo("a").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good = site_config(&upstream, "", &limits(1, 20));
    let path = write_file(dir.path(), "config.toml", &good);
    let proxy = start(&good).await;
    let addr = proxy.local_addr();
    let before = proxy.state().snapshot().limiter.clone().expect("limiter");

    assert_admitted(&burst(addr, V4, 30, "").await, 21);
    write_file(
        dir.path(),
        "config.toml",
        &site_config(&upstream, "", &limits(0, 20)),
    );
    assert!(
        reload(proxy.state(), &path, proxy.static_config(), None)
            .await
            .is_err()
    );
    let after = proxy.state().snapshot().limiter.clone().expect("limiter");
    assert!(std::sync::Arc::ptr_eq(&before, &after));
    assert_eq!(burst(addr, V4, 3, "").await, [429, 429, 429]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn refusals_are_counted_in_metrics() {
    let upstream = Upstream::echo("a").await;
    let extra = format!("[admin]\nbind_addr = \"127.0.0.1:0\"\n{}", limits(1, 2));
    let proxy = start(&site_config(&upstream, "", &extra)).await;
    let addr = proxy.local_addr();
    let admin = proxy.admin_addr().expect("admin listener");

    let statuses = burst(addr, V4, 5, "").await;
    let refused = 5 - assert_admitted(&statuses, 3);
    let responses = simultaneous(ip(V4_OTHER), addr, 5, |_| request("unknown.test", "/", "")).await;
    let unknown_refused = responses
        .iter()
        .filter(|r| status_of(r) == Some(429))
        .count();
    assert!(unknown_refused >= 1, "{responses:?}");

    // Counted when the 429's body is done, which the client has seen.
    let metrics = common::samples(&common::scrape(admin).await);
    let value = |series: &str| metrics.get(series).copied().unwrap_or(-1.0);
    assert_eq!(
        value("reverse_proxy_rate_limited_total{host=\"a.test\"}"),
        refused as f64
    );
    assert_eq!(
        value("reverse_proxy_http_requests_total{host=\"a.test\",method=\"GET\",status=\"429\"}"),
        refused as f64
    );
    assert_eq!(
        value("reverse_proxy_rate_limited_total{host=\"_unknown\"}"),
        unknown_refused as f64
    );
    proxy.shutdown().await;
}

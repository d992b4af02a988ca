//! Helpers for the adversarial tests: an upstream that records exactly what
//! reached it, liveness and resource probes of the proxy process.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::routing::any;
use http_body_util::BodyExt;

use super::{ProxyProcess, Upstream, get};

/// What an upstream received: one entry per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub host: String,
    /// The body as received, or `None` if reading it failed (the proxy
    /// aborted it).
    pub body: Option<Vec<u8>>,
}

/// An upstream that reads every request body to the end and records the
/// request; it answers `200 ok`.
pub struct Recorder {
    pub upstream: Upstream,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    pub async fn start() -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = Arc::clone(&seen);
        let upstream = Upstream::start(Router::new().fallback(any(move |req: Request| {
            let log = Arc::clone(&log);
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.ok().map(|b| b.to_bytes().to_vec());
                log.lock().expect("lock").push(Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    host: parts
                        .headers
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned(),
                    body,
                });
                "ok"
            }
        })))
        .await;
        Self { upstream, seen }
    }

    pub fn url(&self) -> String {
        self.upstream.url()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.path).collect()
    }
}

/// `GET /health` on a fresh connection must answer 200 within `within`;
/// returns how long it took.
pub async fn health(addr: SocketAddr, within: Duration) -> Duration {
    let started = Instant::now();
    let reply = tokio::time::timeout(within, get(addr, "health.invalid", "/health"))
        .await
        .unwrap_or_else(|_| panic!("/health did not answer within {within:?}"));
    assert_eq!(reply.status, 200, "/health");
    started.elapsed()
}

/// CPU time (user + system) the process has used so far, in clock ticks
/// (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // The command name (field 2) may contain spaces; fields after it are
    // counted from its closing parenthesis. utime and stime are fields 14
    // and 15, i.e. the 12th and 13th after the name.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().expect("utime");
    let stime: u64 = fields[12].parse().expect("stime");
    utime + stime
}

/// Current resident memory of the proxy in KiB.
pub fn rss_now(proxy: &ProxyProcess) -> u64 {
    proxy.rss_kib().1
}

/// Asserts the proxy's resident memory is within 32 MiB of `baseline_kib`.
pub fn assert_rss_near(proxy: &ProxyProcess, baseline_kib: u64, what: &str) {
    let now = rss_now(proxy);
    eprintln!("RSS after {what}: {now} KiB (baseline {baseline_kib} KiB)");
    assert!(
        now <= baseline_kib + (32 << 10),
        "RSS {now} KiB after {what} exceeds baseline {baseline_kib} KiB + 32 MiB"
    );
}

/// Open descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

//! Test harness: upstream servers, the proxy (as the real binary or in
//! process) with a config built in code, and clients that can send what
//! browsers would not.

#![allow(dead_code)]

pub mod h2frames;
pub mod hostile;
pub mod lifecycle;
pub mod pebble;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::any;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_reverse-proxy");

/// An upstream HTTP server on 127.0.0.1 that counts the requests it gets.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Serves `router`; every request is counted first.
    pub async fn start(router: Router) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let router = router.layer(axum::middleware::from_fn(
            move |req: Request, next: axum::middleware::Next| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                next.run(req)
            },
        ));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.ok();
        });
        Self { addr, hits, task }
    }

    /// Serves `router` on `addr`, e.g. the address of an upstream stopped
    /// earlier, to bring it back.
    pub async fn start_on(addr: SocketAddr, router: Router) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind upstream again");
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.ok();
        });
        Self { addr, hits, task }
    }

    /// Answers every request with `name`, then the request line and headers
    /// it received, one per line (`name: value`).
    pub async fn echo(name: &'static str) -> Self {
        Self::start(Router::new().fallback(any(move |req: Request| async move {
            let mut text = format!("{name}\n{} {}\n", req.method(), req.uri());
            for (k, v) in req.headers() {
                text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            text
        })))
        .await
    }

    pub fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config with plain HTTP on 127.0.0.1:0, the given sites, and `extra`
/// TOML appended (whole sections, e.g. `[proxy]\nresponse_timeout_secs = 1`).
pub fn config(sites: &[(&str, &str)], server_extra: &str, extra: &str) -> String {
    let mut toml = format!(
        "[server]\nbind_addr = \"127.0.0.1:0\"\nlog_level = \"info\"\n{server_extra}\n\n[server.tls]\nmode = \"off\"\n\n"
    );
    for (host, upstream) in sites {
        toml.push_str(&format!(
            "[[sites]]\nhost = \"{host}\"\nupstream = \"{upstream}\"\n\n"
        ));
    }
    toml.push_str(extra);
    toml
}

/// `extra` for tests that send more than a burst of requests from
/// 127.0.0.1: every test client shares that address, and so one
/// rate-limit bucket (21 requests at once, then 10 per second).
pub const NO_RATE_LIMIT: &str = "[rate_limit]\nenabled = false\n";

/// The real binary, started on a config file, with its output captured.
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl ProxyProcess {
    /// Starts the binary and waits for its `LISTEN` line.
    pub fn start(config: &str) -> Self {
        Self::start_with(config, &[])
    }

    pub fn start_with(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        let config = config.replace("$DIR", dir.path().to_str().expect("utf-8 path"));
        std::fs::write(&path, config).expect("write config");
        Self::start_in(dir, env)
    }

    /// Starts the binary on `dir/config.toml`.
    pub fn start_in(dir: tempfile::TempDir, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn reverse-proxy");
        let lines: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let (store, cv) = &*lines;
                    store.lock().expect("lock").push(line);
                    cv.notify_all();
                }
            });
        }
        let mut proxy = Self {
            child,
            addr: "0.0.0.0:0".parse().expect("addr"),
            dir,
            lines,
        };
        let listen = proxy.wait_for_line(
            |l| l.contains(" LISTEN ") && l.contains("proto=http"),
            Duration::from_secs(20),
        );
        proxy.addr = field(&listen, "addr").parse().expect("LISTEN addr");
        proxy
    }

    /// The admin listener's address, from its `LISTEN ... proto=admin` line.
    pub fn admin_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_line(
            |l| l.contains(" LISTEN ") && l.contains("proto=admin"),
            Duration::from_secs(20),
        );
        field(&line, "addr").parse().expect("admin LISTEN addr")
    }

    /// The address of the extra listener whose `LISTEN` line has
    /// `role=<role>` (e.g. `redirect` for `http_bind_addr`).
    pub fn listen_addr(&mut self, role: &str) -> SocketAddr {
        let tag = format!(" role={role}");
        let line = self.wait_for_line(
            |l| l.contains(" LISTEN ") && l.contains(&tag),
            Duration::from_secs(20),
        );
        field(&line, "addr").parse().expect("LISTEN addr")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every line printed so far (stdout and stderr).
    pub fn lines(&self) -> Vec<String> {
        self.lines.0.lock().expect("lock").clone()
    }

    /// Waits for a line matching `pred`, panicking with the output so far
    /// if none comes within `timeout`.
    pub fn wait_for_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (store, cv) = &*self.lines;
        let mut guard = store.lock().expect("lock");
        loop {
            if let Some(line) = guard.iter().find(|l| pred(l)) {
                return line.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                let out = guard.join("\n");
                drop(guard);
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "expected log line did not appear within {timeout:?} (exit: {status:?}); output:\n{out}"
                );
            }
            guard = cv.wait_timeout(guard, deadline - now).expect("wait").0;
        }
    }

    /// Waits until `n` lines match `pred`.
    pub fn wait_for_count(
        &self,
        pred: impl Fn(&str) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let (store, cv) = &*self.lines;
        let mut guard = store.lock().expect("lock");
        loop {
            let found: Vec<String> = guard.iter().filter(|l| pred(l)).cloned().collect();
            if found.len() >= n {
                return found;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "only {} of {n} lines within {timeout:?}:\n{}",
                found.len(),
                guard.join("\n")
            );
            guard = cv.wait_timeout(guard, deadline - now).expect("wait").0;
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak and current resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        let get = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (get("VmHWM:"), get("VmRSS:"))
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The value of `key=` in a log line (unquoted values only).
pub fn field(line: &str, key: &str) -> String {
    let needle = format!(" {key}=");
    let start = line
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + needle.len();
    line[start..].split(' ').next().unwrap_or("").to_owned()
}

/// Runs `reverse-proxy` with `args`, returning (exit code, stdout, stderr).
pub fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Writes `text` to a file in `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write file");
    path
}

/// A plain HTTP/1.1 client that keeps connections alive.
pub fn http1_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 prior-knowledge client.
pub fn http2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// GET `path` with a `Host` header through an HTTP/1.1 client.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .header(http::header::HOST, host)
        .body(Body::empty())
        .expect("request");
    send(&http1_client(), req).await
}

pub async fn send(client: &Client<HttpConnector, Body>, req: http::Request<Body>) -> Reply {
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .expect("response within 30 s")
        .expect("response");
    collect_reply(resp).await
}

/// Reads a whole response (status, headers, body) within 30 s.
pub async fn collect_reply(response: http::Response<hyper::body::Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .expect("body within 30 s")
        .expect("body")
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Waits until the file at `path` has at least `n` lines (log writers are
/// asynchronous), and returns them; panics after 10 s.
pub fn wait_for_file_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} of {n} lines after 10 s:\n{text}",
            path.display(),
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends raw bytes on a new connection and reads until the server closes
/// or `timeout` passes. Returns what was read.
pub async fn raw(addr: SocketAddr, request: &[u8], timeout: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    read_until_close(&mut stream, timeout).await
}

pub async fn read_until_close(stream: &mut TcpStream, timeout: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in raw HTTP/1.1 output.
pub fn status_of(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
}

/// Fetches `/metrics` from an admin listener and returns the text.
pub async fn scrape(admin: SocketAddr) -> String {
    let reply = get(admin, "localhost", "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.text()
}

/// The samples of a Prometheus text exposition, keyed by the series as
/// written (`name{label="value",...}`), with labels in the order exposed.
pub fn samples(exposition: &str) -> std::collections::HashMap<String, f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A free port on 127.0.0.1 for a program that cannot be told to pick one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A TCP connection to `addr` from the local address `local`: 127.0.0.2
/// (or any address on `lo`) acts as a second client on the same machine.
pub async fn connect_from(local: std::net::IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .expect("client socket");
    socket
        .bind(SocketAddr::new(local, 0))
        .expect("bind client address");
    tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .expect("connect within 10 s")
        .expect("connect")
}

/// Opens `n` connections from `local` first, then writes `request(i)` on
/// connection `i` back to back, so the proxy sees all requests within a
/// millisecond or so; returns each raw response, in order. Requests should
/// carry `Connection: close`.
pub async fn simultaneous(
    local: std::net::IpAddr,
    addr: SocketAddr,
    n: usize,
    request: impl Fn(usize) -> String,
) -> Vec<String> {
    send_each(connect_many(local, addr, n).await, request).await
}

/// `n` connections from `local` to `addr`.
pub async fn connect_many(local: std::net::IpAddr, addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(connect_from(local, addr).await);
    }
    streams
}

/// Writes `request(i)` on `streams[i]`, all before reading any response,
/// then reads each response until the server closes.
pub async fn send_each(
    mut streams: Vec<TcpStream>,
    request: impl Fn(usize) -> String,
) -> Vec<String> {
    let requests: Vec<String> = (0..streams.len()).map(request).collect();
    for (stream, req) in streams.iter_mut().zip(&requests) {
        stream
            .write_all(req.as_bytes())
            .await
            .expect("write request");
    }
    let mut responses = Vec::with_capacity(streams.len());
    for stream in &mut streams {
        responses.push(read_until_close(stream, Duration::from_secs(30)).await);
    }
    responses
}

/// A header's value in raw HTTP/1.1 output (first response, any case).
pub fn header_of(raw: &str, name: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

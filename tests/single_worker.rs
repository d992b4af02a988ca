//! `worker_threads = 1` (the benchmark's setting) runs on a current-thread
//! runtime, and log lines are written in batches: the proxy must still
//! serve, log every request, shut down cleanly with its lines written, and
//! keep serving when its stdout is gone.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, ProxyProcess, Upstream, config, field, get, run_binary, write_file};

fn access_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" REQUEST "))
        .map(str::to_owned)
        .collect()
}

/// Polls the access log until it holds `n` request lines.
fn wait_for_access_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = access_lines(path);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn single_worker_serves_logs_every_request_and_stops_cleanly() {
    let a = Upstream::echo("site-a").await;
    let mut proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url())],
        "worker_threads = 1\naccess_log = \"$DIR/access.log\"",
        common::NO_RATE_LIMIT,
    ));
    let log = proxy.dir.path().join("access.log");
    let addr = proxy.addr;
    let requests = (0..50)
        .map(|i| tokio::spawn(async move { get(addr, "a.test", &format!("/n{i}")).await.status }));
    for request in requests {
        assert_eq!(request.await.expect("task"), 200);
    }
    let lines = wait_for_access_lines(&log, 50);
    assert_eq!(lines.len(), 50, "{lines:#?}");
    for i in 0..50 {
        let path = format!("/n{i}");
        assert!(
            lines.iter().any(|l| field(l, "path") == path),
            "no line for {path}"
        );
    }

    // Lines logged just before SIGTERM are written before the process exits.
    assert_eq!(get(addr, "a.test", "/last").await.status, 200);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(15)), Some(0));
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 51);
    assert_eq!(field(&lines[50], "path"), "/last");
}

#[tokio::test]
async fn a_closed_stdout_does_not_stop_requests_or_the_access_log() {
    let a = Upstream::echo("site-a").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let toml = config(
        &[("a.test", &a.url())],
        &format!("worker_threads = 1\naccess_log = \"{}\"", log.display()),
        common::NO_RATE_LIMIT,
    );
    let conf = write_file(dir.path(), "config.toml", &toml);
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_remove("RUST_LOG")
        .spawn()
        .expect("spawn");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    while !line.contains(" LISTEN ") {
        line.clear();
        assert!(stdout.read_line(&mut line).expect("read") > 0, "no LISTEN");
    }
    let addr: SocketAddr = field(line.trim_end(), "addr").parse().expect("addr");
    // Whoever read the proxy's stdout (journald, a terminal) is gone: every
    // later write to it fails.
    drop(stdout);

    for i in 0..30 {
        assert_eq!(get(addr, "a.test", &format!("/after{i}")).await.status, 200);
    }
    assert_eq!(wait_for_access_lines(&log, 30).len(), 30);
    child.kill().ok();
    child.wait().ok();
}

#[test]
fn zero_worker_threads_is_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(
        &[("a.test", "http://127.0.0.1:9")],
        "worker_threads = 0",
        "",
    );
    let conf = write_file(dir.path(), "config.toml", &toml);
    let (code, _, stderr) = run_binary(&["--validate", "--config", conf.to_str().expect("path")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("server.worker_threads"), "{stderr}");
}

#[tokio::test]
async fn each_access_line_is_written_once_whichever_layer_formats_it() {
    let a = Upstream::echo("site-a").await;
    // The second filter hides access lines from stdout but keeps the LISTEN
    // line the harness waits for.
    for level in ["info", "warn,reverse_proxy::daemon=info"] {
        let toml = config(
            &[("a.test", &a.url())],
            "worker_threads = 1\naccess_log = \"$DIR/access.log\"",
            "",
        );
        let mut proxy = ProxyProcess::start_with(&toml, &[("RUST_LOG", level)]);
        let log = proxy.dir.path().join("access.log");
        for i in 0..10 {
            assert_eq!(
                get(proxy.addr, "a.test", &format!("/{level}{i}"))
                    .await
                    .status,
                200
            );
        }
        proxy.signal("TERM");
        assert_eq!(proxy.wait_exit(Duration::from_secs(15)), Some(0));
        let lines = access_lines(&log);
        assert_eq!(lines.len(), 10, "log_level {level}: {lines:#?}");
        let on_stdout = proxy
            .lines()
            .iter()
            .filter(|l| l.contains(" REQUEST "))
            .count();
        // stdout shows access lines at info, not at warn.
        assert_eq!(on_stdout, if level == "info" { 10 } else { 0 }, "{level}");
    }
}

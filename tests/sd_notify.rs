//! systemd notifications (`Type=notify`), received on a unix datagram
//! socket the way systemd receives them.

mod common;

use std::time::Duration;

use common::lifecycle::NotifySocket;
use common::{ProxyProcess, config, raw, status_of};

const WAIT: Duration = Duration::from_secs(10);

fn assert_has(message: &[String], line: &str) {
    assert!(
        message.iter().any(|l| l == line),
        "{line} not in {message:?}"
    );
}

fn value<'a>(message: &'a [String], key: &str) -> &'a str {
    message
        .iter()
        .find_map(|l| l.strip_prefix(key).and_then(|l| l.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {message:?}"))
}

/// Expects `RELOADING=1` with a `MONOTONIC_USEC`, then `READY=1`; returns
/// the timestamp and the status that came with `READY=1`.
fn assert_reload_cycle(notify: &NotifySocket) -> (u64, String) {
    let reloading = notify.recv(WAIT);
    assert_has(&reloading, "RELOADING=1");
    let usec: u64 = value(&reloading, "MONOTONIC_USEC")
        .parse()
        .expect("MONOTONIC_USEC is a number");
    let ready = notify.recv(WAIT);
    assert_has(&ready, "READY=1");
    (usec, value(&ready, "STATUS").to_owned())
}

#[test]
fn notifications_follow_the_lifecycle() {
    let notify = NotifySocket::bind();
    let good = config(&[("a.test", "http://127.0.0.1:9")], "", "");
    let mut proxy = ProxyProcess::start_with(&good, &[notify.env()]);

    let ready = notify.recv(WAIT);
    assert_has(&ready, "READY=1");
    assert_eq!(value(&ready, "STATUS"), "serving 1 site(s)");

    let two = config(
        &[
            ("a.test", "http://127.0.0.1:9"),
            ("b.test", "http://127.0.0.1:9"),
        ],
        "",
        "",
    );
    proxy.write_config(&two);
    proxy.signal("HUP");
    let (first, status) = assert_reload_cycle(&notify);
    assert_eq!(status, "serving 2 site(s); last reload succeeded");
    assert!(first > 0);

    // A failing reload is announced the same way, so that `systemctl
    // reload` returns; the status says it failed.
    proxy.write_config("[server\n");
    proxy.signal("HUP");
    let (second, status) = assert_reload_cycle(&notify);
    assert_eq!(
        status,
        "serving 2 site(s); last reload FAILED, old configuration kept"
    );
    assert!(
        second > first,
        "MONOTONIC_USEC went from {first} to {second}"
    );
    proxy.wait_for_line(|l| l.contains("status=error"), WAIT);

    proxy.signal("TERM");
    let stopping = notify.recv(WAIT);
    assert_has(&stopping, "STOPPING=1");
    assert_eq!(proxy.wait_exit(WAIT), Some(0));
}

#[tokio::test]
async fn unreachable_notify_socket_is_harmless() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no-such.sock");
    let good = config(&[("a.test", "http://127.0.0.1:9")], "", "");
    let mut proxy = ProxyProcess::start_with(
        &good,
        &[("NOTIFY_SOCKET", missing.to_str().expect("utf-8"))],
    );
    let health = raw(
        proxy.addr,
        b"GET /health HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        WAIT,
    )
    .await;
    assert_eq!(status_of(&health), Some(200), "{health}");
    let line = proxy.sighup_and_wait();
    assert!(line.contains("status=success"), "{line}");
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(WAIT), Some(0));
}

//! Where access lines go and what they look like: one `[::]` listener for
//! both address families, and the `access_log` file for fail2ban.

mod common;

use std::time::Duration;

use common::{ProxyProcess, Upstream, config, get};
use regex_lite::Regex;

#[tokio::test]
async fn dual_stack_listener_logs_plain_ipv4() {
    let a = Upstream::echo("site-a").await;
    let mut toml = config(&[("a.test", &a.url())], "", "");
    toml = toml.replace("bind_addr = \"127.0.0.1:0\"", "bind_addr = \"[::]:0\"");
    let proxy = ProxyProcess::start(&toml);
    let port = proxy.addr.port();
    for (addr, logged) in [
        (format!("127.0.0.1:{port}"), "127.0.0.1"),
        (format!("[::1]:{port}"), "::1"),
    ] {
        let r = get(
            addr.parse().expect("addr"),
            "a.test",
            &format!("/from-{logged}"),
        )
        .await;
        assert_eq!(r.status, 200);
        let line = proxy.wait_for_count(
            |l| l.contains(&format!("path=/from-{logged} ")),
            1,
            Duration::from_secs(5),
        );
        assert!(
            line[0].contains(&format!(" client_ip={logged} ")),
            "{}",
            line[0]
        );
        // The upstream is told the same address.
        assert!(
            r.text().contains(&format!("\nx-real-ip: {logged}\n")),
            "{}",
            r.text()
        );
    }
}

#[tokio::test]
async fn access_log_file_holds_exactly_the_request_lines() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url())],
        "access_log = \"$DIR/access.log\"",
        "",
    ));
    let paths = ["/", "/user/repo", "/a%20b", "/q"];
    for path in paths {
        assert_eq!(get(proxy.addr, "a.test", path).await.status, 200);
    }
    assert_eq!(get(proxy.addr, "nope.test", "/x").await.status, 421);
    assert_eq!(get(proxy.addr, "a.test", "/health").await.status, 200);
    let log_path = proxy.dir.path().join("access.log");
    let expected = paths.len() + 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.lines().count() >= expected || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected, "{text}");
    let line_re = Regex::new(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z  INFO REQUEST client_ip=127\.0\.0\.1 host=(\S+) method=GET path=(\S+) status=(\d{3}) upstream=(\S+) duration_ms=\d+ bytes_sent=\d+ .*$",
    )
    .expect("regex");
    for (line, path) in lines.iter().zip(paths) {
        let c = line_re
            .captures(line)
            .unwrap_or_else(|| panic!("bad line: {line}"));
        assert_eq!((&c[1], &c[2], &c[3]), ("a.test", path, "200"));
        assert_eq!(&c[4], a.addr.to_string());
    }
    let c = line_re.captures(lines[expected - 1]).expect("421 line");
    assert_eq!(
        (&c[1], &c[2], &c[3], &c[4]),
        ("nope.test", "/x", "421", "-")
    );
}

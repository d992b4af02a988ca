//! SIGHUP: the configuration is reloaded as a whole or not at all, the
//! access log is reopened, and the process never exits on it.

mod common;

use std::time::{Duration, Instant};

use common::{ProxyProcess, Upstream, config, field, get};

const HOST: &str = "app.test";

fn assert_alive(proxy: &mut ProxyProcess) {
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "the proxy exited:\n{}",
        proxy.lines().join("\n")
    );
}

async fn served_by(proxy: &ProxyProcess, host: &str) -> String {
    let reply = get(proxy.addr, host, "/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.text().lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_the_old_config_serving() {
    let a = Upstream::echo("A").await;
    let b = Upstream::echo("B").await;
    let good_a = config(&[(HOST, &a.url())], "", "");
    let mut proxy = ProxyProcess::start(&good_a);
    assert_eq!(served_by(&proxy, HOST).await, "A");

    // A TOML syntax error: the line names where it is.
    let broken = good_a.replace("[[sites]]", "[[sites]");
    let line = proxy.reload_with(&broken);
    assert!(
        line.contains(" ERROR CONFIG_RELOAD status=error "),
        "{line}"
    );
    assert!(line.contains("line "), "{line}");
    assert!(line.contains("column"), "{line}");
    assert_alive(&mut proxy);
    assert_eq!(served_by(&proxy, HOST).await, "A");

    // Well-formed but invalid: the field path is named, as by --validate.
    let semantic = good_a.replace(&a.url(), "ftp://127.0.0.1:21");
    let line = proxy.reload_with(&semantic);
    assert!(line.contains("status=error"), "{line}");
    assert!(line.contains("sites[0].upstream"), "{line}");
    assert_alive(&mut proxy);
    assert_eq!(served_by(&proxy, HOST).await, "A");

    // Several problems at once are all reported, in one line.
    let two = config(
        &[(HOST, &b.url()), ("APP.test", &b.url())],
        "",
        "[rate_limit]\nrequests_per_second = 0\n",
    );
    let line = proxy.reload_with(&two);
    assert!(line.contains("status=error"), "{line}");
    assert!(line.contains("sites[1].host"), "{line}");
    assert!(line.contains("rate_limit.requests_per_second"), "{line}");
    assert_eq!(served_by(&proxy, HOST).await, "A");

    // The file disappears (a deploy tool mid-way): same, old config stays.
    std::fs::remove_file(proxy.config_path()).expect("remove config");
    let line = proxy.sighup_and_wait();
    assert!(line.contains("status=error"), "{line}");
    assert!(line.contains("cannot read config file"), "{line}");
    assert_alive(&mut proxy);
    assert_eq!(served_by(&proxy, HOST).await, "A");

    // Fixed: applied.
    let line = proxy.reload_with(&config(&[(HOST, &b.url())], "", ""));
    assert!(
        line.contains(" INFO CONFIG_RELOAD status=success sites=1"),
        "{line}"
    );
    assert_eq!(served_by(&proxy, HOST).await, "B");
    assert_alive(&mut proxy);
    assert_eq!(a.hits(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_names_what_changed_and_what_needs_a_restart() {
    let a = Upstream::echo("A").await;
    let b = Upstream::echo("B").await;
    let before = config(
        &[
            ("keep.test", &a.url()),
            ("move.test", &a.url()),
            ("gone.test", &a.url()),
        ],
        "shutdown_timeout_secs = 30",
        "",
    );
    let proxy = ProxyProcess::start(&before);
    let after = config(
        &[
            ("keep.test", &a.url()),
            ("move.test", &b.url()),
            ("new.test", &b.url()),
        ],
        "shutdown_timeout_secs = 5\nidle_timeout_secs = 30",
        "[rate_limit]\nrequests_per_second = 50\n",
    );
    let line = proxy.reload_with(&after);
    assert!(line.contains("status=success sites=3"), "{line}");

    let changes = proxy.wait_for_count(
        |l| l.contains(" CONFIG_CHANGES "),
        1,
        Duration::from_secs(5),
    );
    let changes = &changes[0];
    assert_eq!(field(changes, "added"), "new.test", "{changes}");
    assert_eq!(field(changes, "removed"), "gone.test", "{changes}");
    assert_eq!(field(changes, "changed"), "move.test", "{changes}");
    assert_eq!(field(changes, "proxy"), "unchanged", "{changes}");
    assert_eq!(field(changes, "rate_limit"), "changed", "{changes}");

    let restart = proxy.wait_for_count(
        |l| l.contains(" RESTART_NEEDED "),
        1,
        Duration::from_secs(5),
    );
    let restart = &restart[0];
    assert!(restart.contains(" WARN "), "{restart}");
    assert_eq!(
        field(restart, "fields"),
        "server.shutdown_timeout_secs,server.idle_timeout_secs",
        "{restart}"
    );

    // The dynamic part was applied regardless.
    assert_eq!(served_by(&proxy, "new.test").await, "B");
    assert_eq!(served_by(&proxy, "move.test").await, "B");
    assert_eq!(served_by(&proxy, "keep.test").await, "A");
    assert_eq!(get(proxy.addr, "gone.test", "/").await.status, 421);
}

/// Waits until `path` holds a line containing `needle`.
fn wait_for_file_line(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{needle} did not reach {} within 10 s; it holds:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_reopened_on_sighup() {
    let a = Upstream::echo("A").await;
    let toml = config(
        &[(HOST, &a.url())],
        "access_log = \"$DIR/logs/access.log\"",
        "",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("logs")).expect("mkdir");
    let toml = toml.replace("$DIR", dir.path().to_str().expect("utf-8"));
    std::fs::write(dir.path().join("config.toml"), &toml).expect("write config");
    let mut proxy = ProxyProcess::start_in(dir, &[]);
    let logs = proxy.dir.path().join("logs");
    let live = logs.join("access.log");
    let rotated = logs.join("access.log.1");

    assert_eq!(get(proxy.addr, HOST, "/before-rotation").await.status, 200);
    wait_for_file_line(&live, "path=/before-rotation");

    // What logrotate does: rename, then reload. Until the reload, lines
    // still go to the renamed file.
    std::fs::rename(&live, &rotated).expect("rotate");
    assert_eq!(get(proxy.addr, HOST, "/between").await.status, 200);
    wait_for_file_line(&rotated, "path=/between");
    assert!(!live.exists());

    let line = proxy.sighup_and_wait();
    assert!(line.contains("status=success"), "{line}");
    assert_eq!(get(proxy.addr, HOST, "/after-rotation").await.status, 200);
    let fresh = wait_for_file_line(&live, "path=/after-rotation");
    assert!(
        fresh.contains(" REQUEST client_ip=127.0.0.1 host=app.test "),
        "{fresh}"
    );
    let new_file = std::fs::read_to_string(&live).expect("read new log");
    assert!(
        !new_file.contains("/before-rotation") && !new_file.contains("/between"),
        "{new_file}"
    );
    let old_file = std::fs::read_to_string(&rotated).expect("read rotated log");
    assert!(!old_file.contains("/after-rotation"), "{old_file}");

    // The log directory becomes unusable: the reopen fails, which is
    // reported, and requests are still served.
    std::fs::rename(&logs, proxy.dir.path().join("logs.gone")).expect("move dir");
    std::fs::write(&logs, "not a directory").expect("block path");
    let line = proxy.sighup_and_wait();
    assert!(line.contains("status=success"), "{line}");
    assert_eq!(get(proxy.addr, HOST, "/while-broken").await.status, 200);
    let complaint = proxy.wait_for_line(
        |l| l.contains("access log") && l.contains("cannot be reopened"),
        Duration::from_secs(10),
    );
    assert!(
        complaint.contains("requests are still served"),
        "{complaint}"
    );
    assert_alive(&mut proxy);

    // Repaired: the next SIGHUP creates the file again.
    std::fs::remove_file(&logs).expect("unblock path");
    std::fs::create_dir(&logs).expect("mkdir");
    proxy.sighup_and_wait();
    assert_eq!(get(proxy.addr, HOST, "/repaired").await.status, 200);
    wait_for_file_line(&live, "path=/repaired");
}

/// The logrotate snippet from `deploy/`, run by the real logrotate against
/// a running proxy. Only its paths and the reload command are changed: no
/// systemd here, so the postrotate script sends SIGHUP itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_snippet_rotates_and_the_proxy_follows() {
    let a = Upstream::echo("A").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).expect("mkdir");
    let toml = config(
        &[(HOST, &a.url())],
        &format!("access_log = \"{}/access.log\"", logs.display()),
        "",
    );
    std::fs::write(dir.path().join("config.toml"), &toml).expect("write config");
    let mut proxy = ProxyProcess::start_in(dir, &[]);
    let live = logs.join("access.log");

    assert_eq!(get(proxy.addr, HOST, "/day-one").await.status, 200);
    wait_for_file_line(&live, "path=/day-one");

    let snippet = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/logrotate/reverse-proxy"
    ))
    .expect("read snippet");
    let (head, rest) = snippet.split_once("    postrotate\n").expect("postrotate");
    let (_, tail) = rest.split_once("    endscript\n").expect("endscript");
    let conf = format!(
        "{}    postrotate\n        kill -HUP {}\n    endscript\n{tail}",
        head.replace("/var/log/reverse-proxy", logs.to_str().expect("utf-8")),
        proxy.pid()
    );
    let conf_path = proxy.dir.path().join("logrotate.conf");
    std::fs::write(&conf_path, conf).expect("write logrotate conf");
    let reloads = proxy.count_lines(|l| l.contains(" CONFIG_RELOAD "));
    let out = std::process::Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(proxy.dir.path().join("logrotate.state"))
        .arg(&conf_path)
        .output()
        .expect("run logrotate (Debian package logrotate)");
    assert!(
        out.status.success(),
        "logrotate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    proxy.wait_for_count(
        |l| l.contains(" CONFIG_RELOAD status=success"),
        reloads + 1,
        Duration::from_secs(10),
    );

    assert_eq!(get(proxy.addr, HOST, "/day-two").await.status, 200);
    wait_for_file_line(&live, "path=/day-two");
    // delaycompress: yesterday's file stays readable for fail2ban.
    let rotated = std::fs::read_to_string(logs.join("access.log.1")).expect("access.log.1");
    assert!(rotated.contains("path=/day-one"), "{rotated}");
    assert!(!rotated.contains("path=/day-two"), "{rotated}");
    let today = std::fs::read_to_string(&live).expect("access.log");
    assert!(!today.contains("path=/day-one"), "{today}");
    assert_alive(&mut proxy);
}

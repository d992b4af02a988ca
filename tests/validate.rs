//! `reverse-proxy --validate` and the CLI's exit codes, run as the real binary.

mod common;

use common::{run_binary, write_file};

fn validate(toml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "config.toml", toml);
    run_binary(&["--validate", "--config", path.to_str().expect("path")])
}

const GOOD: &str = r#"
[server]
bind_addr = "127.0.0.1:1"
[server.tls]
mode = "off"
[[sites]]
host = "a.test"
upstream = "http://127.0.0.1:3000"
[[sites]]
host = "b.test"
upstream = "http://127.0.0.1:8080"
"#;

#[test]
fn example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/config.example.toml");
    let (code, out, err) = run_binary(&["--validate", "--config", example]);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out.trim(), "config OK: 2 sites");
}

#[test]
fn good_config_never_binds() {
    // The address is in use (we hold it), which --validate must not notice.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let (code, out, err) = validate(&GOOD.replace("127.0.0.1:1", &addr.to_string()));
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out.trim(), "config OK: 2 sites");
}

#[test]
fn syntax_error_names_line_and_column() {
    let (code, _, err) = validate("[server]\nbind_addr = \"x\"\n[server.tls\nmode = \"off\"\n");
    assert_eq!(code, 2);
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("column"), "{err}");
}

#[test]
fn unknown_field_is_rejected() {
    let (code, _, err) = validate(&GOOD.replace(
        "upstream = \"http://127.0.0.1:3000\"",
        "upstrem = \"http://127.0.0.1:3000\"",
    ));
    assert_eq!(code, 2);
    assert!(err.contains("unknown field `upstrem`"), "{err}");
    assert!(err.contains("line 8"), "{err}");
}

#[test]
fn duplicate_host_differing_in_case() {
    let (code, _, err) = validate(&GOOD.replace("host = \"b.test\"", "host = \"A.Test\""));
    assert_eq!(code, 2);
    assert!(
        err.contains("error: sites[1].host: duplicate of sites[0].host \"a.test\""),
        "{err}"
    );
}

#[test]
fn bad_upstream_url() {
    for (bad, expected) in [
        ("https://127.0.0.1:3000", "scheme must be http"),
        ("127.0.0.1:3000", "must be an http:// URL"),
        ("http://127.0.0.1:3000/app", "no path or query"),
        ("http://user@127.0.0.1:3000", "user information"),
        ("http://[::1", "not a URL"),
        (
            "http://a=b:3000",
            "\"a=b:3000\" is not a host name or IP address",
        ),
        ("http://a!b", "not a host name or IP address"),
        ("http://backend:=x", "with an optional port number"),
    ] {
        let (code, _, err) = validate(&GOOD.replace("http://127.0.0.1:8080", bad));
        assert_eq!(code, 2, "{bad}");
        assert!(err.contains("sites[1].upstream: "), "{bad}: {err}");
        assert!(err.contains(expected), "{bad}: {err}");
    }
}

#[test]
fn zero_rate_is_out_of_range() {
    let (code, _, err) = validate(&format!(
        "{GOOD}\n[rate_limit]\nrequests_per_second = 0\nburst = 0\n"
    ));
    assert_eq!(code, 2);
    assert!(
        err.contains("rate_limit.requests_per_second: must be between 1 and 1000000, got 0"),
        "{err}"
    );
    assert!(
        err.contains("rate_limit.burst: must be between 1 and 1000000, got 0"),
        "{err}"
    );
}

#[test]
fn missing_sites() {
    let cut = GOOD.find("[[sites]]").expect("sites");
    let (code, _, err) = validate(&GOOD[..cut]);
    assert_eq!(code, 2);
    assert!(
        err.contains("sites: at least one [[sites]] entry is required"),
        "{err}"
    );
}

#[test]
fn every_error_is_reported() {
    let toml = GOOD
        .replace("127.0.0.1:1", "nowhere")
        .replace("host = \"b.test\"", "host = \"b test\"")
        + "\n[proxy]\ntrusted_proxies = [\"10.0.0.0/40\"]\n";
    let (code, _, err) = validate(&toml);
    assert_eq!(code, 2);
    for field in [
        "server.bind_addr: ",
        "sites[1].host: ",
        "proxy.trusted_proxies[0]: ",
    ] {
        assert!(err.contains(field), "missing {field}: {err}");
    }
    assert!(err.contains("config invalid: 3 error(s)"), "{err}");
}

#[test]
fn acme_and_manual_modes_validate() {
    let acme = GOOD.replace(
        "mode = \"off\"",
        "mode = \"acme\"\nacme_domains = [\"b.test\", \"a.test\"]\nacme_contact = [\"ops@example.org\"]",
    );
    let (code, _, err) = validate(&acme);
    assert_eq!(code, 2);
    assert!(
        err.contains("server.tls.acme_contact[0]: must be a \"mailto:\" address"),
        "{err}"
    );

    let uncovered = GOOD.replace(
        "mode = \"off\"",
        "mode = \"acme\"\nacme_domains = [\"a.test\", \"c.test\"]",
    );
    let (code, _, err) = validate(&uncovered);
    assert_eq!(code, 2);
    assert!(
        err.contains("server.tls.acme_domains[1]: \"c.test\" has no [[sites]] entry"),
        "{err}"
    );
    assert!(
        err.contains("site host \"b.test\" is not in the certificate"),
        "{err}"
    );

    let manual = GOOD.replace(
        "mode = \"off\"",
        "mode = \"manual\"\n[[server.tls.certs]]\nhosts = [\"*.test\"]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"",
    );
    let (code, _, err) = validate(&manual);
    assert_eq!(code, 2);
    assert!(
        err.contains("server.tls.certs[0].cert: file /nonexistent/cert.pem does not exist"),
        "{err}"
    );
}

#[test]
fn missing_file_is_one_readable_line() {
    let (code, _, err) = run_binary(&["--validate", "--config", "/nonexistent/config.toml"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read config file /nonexistent/config.toml"),
        "{err}"
    );
    let (code, _, err) = run_binary(&["--config", "/nonexistent/config.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn usage_help_and_version() {
    let (code, out, _) = run_binary(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--validate") && out.contains("--config"),
        "{out}"
    );
    let (code, out, _) = run_binary(&["--version"]);
    assert_eq!(code, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")), "{out}");
    let (code, _, err) = run_binary(&["--frobnicate"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn bind_failure_is_a_runtime_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(
        dir.path(),
        "config.toml",
        &GOOD.replace("127.0.0.1:1", &addr.to_string()),
    );
    let (code, _, err) = run_binary(&["--config", path.to_str().expect("path")]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot listen on {addr} (server.bind_addr)")),
        "{err}"
    );
}

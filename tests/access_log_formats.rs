//! The access log's two formats, as the real binary writes them: `kv`
//! (the spec's fields first, in order, which fail2ban relies on) and `json`
//! (one object per line, whatever a client puts in a path or header).

mod common;

use std::time::Duration;

use axum::body::Body;
use common::{ProxyProcess, Upstream, config, free_port, get, raw};
use http::StatusCode;
use serde_json::Value;

const REQUEST_FIELDS: [&str; 11] = [
    "client_ip",
    "host",
    "method",
    "path",
    "status",
    "upstream",
    "duration_ms",
    "bytes_sent",
    "user_agent",
    "tls_version",
    "http_version",
];

/// GET `uri` over HTTP/2 (prior knowledge) on a connection to `addr`, so
/// that `:authority` can name a site while the socket goes to the proxy.
async fn h2_get(addr: std::net::SocketAddr, uri: &str) -> StatusCode {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get(uri)
        .body(Body::empty())
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("h2 response in time")
        .expect("h2 response");
    let status = resp.status();
    http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("h2 body");
    status
}

fn json_config(site: &str, down: &str) -> String {
    config(
        &[("a.test", site), ("b.test", down)],
        "access_log = \"$DIR/access.log\"\naccess_log_format = \"json\"",
        "",
    )
}

#[tokio::test]
async fn json_lines_parse_and_carry_every_field() {
    let site = Upstream::echo("a").await;
    let down = format!("http://127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&json_config(&site.url(), &down));
    let log = proxy.dir.path().join("access.log");

    let plain = get(proxy.addr, "a.test", "/plain?q=1").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(
        h2_get(proxy.addr, "http://a.test/over-h2").await,
        StatusCode::OK
    );
    // What a hostile client can put in a path and a header: quotes,
    // backslashes, braces, a tab and a byte that is not UTF-8.
    let nasty = raw(
        proxy.addr,
        b"GET /q\"uote\\back{\"x\":1}%0A HTTP/1.1\r\nHost: a.test\r\nUser-Agent: ev\"il\t\\agent\xff\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(nasty.starts_with("HTTP/1.1 200"), "{nasty}");
    assert_eq!(
        get(proxy.addr, "b.test", "/").await.status,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        get(proxy.addr, "c.test", "/").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );

    // Five REQUEST lines and one UPSTREAM_ERROR.
    let lines = common::wait_for_file_lines(&log, 6);
    assert_eq!(lines.len(), 6, "{lines:#?}");
    let objects: Vec<serde_json::Map<String, Value>> = lines
        .iter()
        .map(|line| match serde_json::from_str(line) {
            Ok(Value::Object(map)) => map,
            other => panic!("not one JSON object: {line}\n{other:?}"),
        })
        .collect();
    let requests: Vec<_> = objects.iter().filter(|o| o["event"] == "REQUEST").collect();
    assert_eq!(requests.len(), 5);
    for r in &requests {
        for field in REQUEST_FIELDS {
            assert!(r.contains_key(field), "{field} missing from {r:?}");
        }
        let ts = r["ts"].as_str().expect("ts is a string");
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
        assert_eq!(r["level"], "INFO");
        assert_eq!(r["client_ip"], "127.0.0.1");
        assert!(
            r["status"].is_u64() && r["duration_ms"].is_u64() && r["bytes_sent"].is_u64(),
            "{r:?}"
        );
        assert_eq!(
            r["tls_version"],
            Value::Null,
            "plain HTTP has no TLS version"
        );
    }
    let by_path = |path: &str| {
        *requests
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {requests:#?}"))
    };
    let first = by_path("/plain");
    assert_eq!(first["host"], "a.test");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream"], site.addr.to_string());
    assert_eq!(first["bytes_sent"], plain.body.len() as u64);
    assert_eq!(first["http_version"], "HTTP/1.1");
    assert_eq!(
        first["user_agent"],
        Value::Null,
        "the harness client sends no User-Agent"
    );
    assert_eq!(by_path("/over-h2")["http_version"], "HTTP/2.0");
    let hostile = by_path("/q\"uote\\back{\"x\":1}%0A");
    assert_eq!(hostile["user_agent"], "ev\"il\t\\agent\u{fffd}");
    let gateway = objects
        .iter()
        .find(|o| o["event"] == "REQUEST" && o["host"] == "b.test")
        .expect("b.test line");
    assert_eq!(gateway["status"], 502);
    let unknown = objects
        .iter()
        .find(|o| o["host"] == "c.test")
        .expect("c.test line");
    assert_eq!(unknown["status"], 421);
    assert_eq!(unknown["upstream"], Value::Null);
    let error = objects
        .iter()
        .find(|o| o["event"] == "UPSTREAM_ERROR")
        .expect("UPSTREAM_ERROR line");
    assert_eq!(error["level"], "WARN");
    assert_eq!(error["error"], "connection refused");

    // stdout (journald) keeps the key=value format.
    let stdout = proxy.lines();
    assert!(
        stdout
            .iter()
            .any(|l| l
                .contains(" INFO REQUEST client_ip=127.0.0.1 host=a.test method=GET path=/plain ")),
        "{stdout:#?}"
    );
    assert!(!stdout.iter().any(|l| l.contains("{\"ts\"")), "{stdout:#?}");
}

/// The keys of a `key=value` line after its tag, in order.
fn keys(line: &str, tag: &str) -> Vec<String> {
    let rest = &line[line.find(tag).expect("tag") + tag.len()..];
    let mut keys = Vec::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ' ' {
            continue;
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        keys.push(key);
        // Skip the value, quoted (with escapes) or bare.
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '"' => break,
                    _ => {}
                }
            }
        } else {
            while chars.peek().is_some_and(|c| *c != ' ') {
                chars.next();
            }
        }
    }
    keys
}

#[tokio::test]
async fn kv_request_line_keeps_the_spec_fields_first_and_in_order() {
    let site = Upstream::echo("a").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &site.url())],
        "access_log = \"$DIR/access.log\"\naccess_log_format = \"kv\"",
        "",
    ));
    let reply = raw(
        proxy.addr,
        b"GET /a%20b HTTP/1.1\r\nHost: a.test\r\nUser-Agent: Mozilla/5.0 (X11; Linux) \"quoted\"\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let body_len = reply.split("\r\n\r\n").nth(1).map_or(0, str::len);
    let lines = common::wait_for_file_lines(&proxy.dir.path().join("access.log"), 1);
    let line = &lines[0];
    assert!(
        line.contains(
            " INFO REQUEST client_ip=127.0.0.1 host=a.test method=GET path=/a%20b status=200 "
        ),
        "{line}"
    );
    assert_eq!(keys(line, "REQUEST"), REQUEST_FIELDS, "{line}");
    assert!(line.contains(&format!(" bytes_sent={body_len} ")), "{line}");
    assert!(
        line.ends_with(" user_agent=\"Mozilla/5.0 (X11; Linux) \\\"quoted\\\"\" tls_version=- http_version=HTTP/1.1"),
        "{line}"
    );
}

#[tokio::test]
async fn bytes_sent_is_what_a_streamed_body_delivered() {
    // No Content-Length: the body streams in chunks, so only counting what
    // was sent gives the size.
    let chunks = Upstream::start(axum::Router::new().route(
        "/stream",
        axum::routing::get(|| async {
            let parts = (0..50).map(|i| {
                Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'a' + (i % 26) as u8; 1000]))
            });
            Body::from_stream(futures_util::stream::iter(parts))
        }),
    ))
    .await;
    let proxy = ProxyProcess::start(&json_config(&chunks.url(), "http://127.0.0.1:1"));
    let reply = get(proxy.addr, "a.test", "/stream").await;
    assert_eq!(reply.body.len(), 50_000);
    let lines = common::wait_for_file_lines(&proxy.dir.path().join("access.log"), 1);
    let line: Value = serde_json::from_str(&lines[0]).expect("json");
    assert_eq!(line["bytes_sent"], 50_000);
}

#[test]
fn unknown_format_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = common::write_file(
        dir.path(),
        "config.toml",
        &config(
            &[("a.test", "http://127.0.0.1:1")],
            "access_log_format = \"xml\"",
            "",
        ),
    );
    let (code, _, err) =
        common::run_binary(&["--validate", "--config", path.to_str().expect("path")]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("server.access_log_format"), "{err}");
}

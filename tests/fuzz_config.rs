//! Property tests ("fuzzing" on stable Rust) for the configuration parser
//! and validator: whatever the file says, parsing never panics, and every
//! validation error names the field it is about.
//!
//! The default run is short (proptest's 256 cases per property). A longer
//! one: `PROPTEST_CASES=100000 cargo test --release --test fuzz_config`.

use proptest::prelude::*;
use reverse_proxy::config::{Config, ConfigError, check_dns_name};

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Any TOML value a user might put in a field, right type or not.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (-5i64..100_000).prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        text().prop_map(|s| toml_str(&s)),
        prop::collection::vec(text(), 0..3).prop_map(|v| {
            let items: Vec<String> = v.iter().map(|s| toml_str(s)).collect();
            format!("[{}]", items.join(", "))
        }),
    ]
}

/// Strings that look like what goes in config fields, and some that do not.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9.-]{1,20}",
        "[a-z]{1,8}\\.(test|org)(:[0-9]{1,6})?",
        "http://[a-z0-9.:@/\\[\\]_-]{0,30}",
        "(https|ftp|http)://127\\.0\\.0\\.1:[0-9]{1,6}(/[a-z]*)?",
        "\\[?[0-9a-f:.]{0,20}\\]?(:[0-9]{1,5})?(/[0-9]{1,3})?",
        "(mailto:)?[a-z@.]{0,12}",
        "(acme|manual|off|kv|json|info|debug,foo=trace|letsencrypt|letsencrypt-staging)",
        ".{0,24}",
    ]
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Int,
    Str,
    List,
    Bool,
}

/// Mostly the right type for the field (so validation is reached), now
/// and then anything at all.
fn value_for(kind: Kind) -> BoxedStrategy<String> {
    let right = match kind {
        Kind::Int => prop_oneof![
            4 => (0i64..100).prop_map(|n| n.to_string()),
            2 => (-5i64..2_000_000).prop_map(|n| n.to_string()),
            1 => any::<i64>().prop_map(|n| n.to_string()),
        ]
        .boxed(),
        Kind::Str => text().prop_map(|s| toml_str(&s)).boxed(),
        Kind::List => prop::collection::vec(text(), 0..3)
            .prop_map(|v| {
                let items: Vec<String> = v.iter().map(|s| toml_str(s)).collect();
                format!("[{}]", items.join(", "))
            })
            .boxed(),
        Kind::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
    };
    prop_oneof![9 => right, 1 => value()].boxed()
}

const SERVER_FIELDS: &[(&str, Kind)] = &[
    ("bind_addr", Kind::Str),
    ("http_bind_addr", Kind::Str),
    ("log_level", Kind::Str),
    ("access_log_format", Kind::Str),
    ("worker_threads", Kind::Int),
    ("shutdown_timeout_secs", Kind::Int),
    ("header_read_timeout_secs", Kind::Int),
    ("idle_timeout_secs", Kind::Int),
    ("max_header_bytes", Kind::Int),
    ("max_connections", Kind::Int),
    ("body_read_timeout_secs", Kind::Int),
    ("no_such_field", Kind::Int),
];
const TLS_FIELDS: &[(&str, Kind)] = &[
    ("acme_domains", Kind::List),
    ("acme_contact", Kind::List),
    ("acme_directory", Kind::Str),
    ("acme_cache_dir", Kind::Str),
];
const PROXY_FIELDS: &[(&str, Kind)] = &[
    ("connect_timeout_secs", Kind::Int),
    ("response_timeout_secs", Kind::Int),
    ("trusted_proxies", Kind::List),
];
const RATE_FIELDS: &[(&str, Kind)] = &[
    ("enabled", Kind::Bool),
    ("requests_per_second", Kind::Int),
    ("burst", Kind::Int),
    ("ipv6_prefix_len", Kind::Int),
    ("eviction_interval_secs", Kind::Int),
    ("eviction_age_secs", Kind::Int),
];

/// Some of `fields` (each at most once), each with a value.
fn section(fields: &'static [(&'static str, Kind)]) -> impl Strategy<Value = String> {
    prop::sample::subsequence(fields, 0..=fields.len().min(6)).prop_flat_map(|chosen| {
        chosen
            .into_iter()
            .map(|(name, kind)| value_for(kind).prop_map(move |v| format!("{name} = {v}\n")))
            .collect::<Vec<_>>()
            .prop_map(|lines| lines.concat())
    })
}

/// A site: mostly a plausible host and upstream.
fn site() -> impl Strategy<Value = (String, String)> {
    (
        prop_oneof![3 => "[a-z]{1,6}\\.(test|org)", 1 => text()],
        prop_oneof![3 => (1u16..65535).prop_map(|p| format!("http://127.0.0.1:{p}")), 1 => text()],
    )
}

/// A whole file built from the real sections, with random contents.
fn config_file() -> impl Strategy<Value = String> {
    (
        section(SERVER_FIELDS),
        prop_oneof![
            6 => Just(Some("off".to_owned())),
            1 => Just(Some("acme".to_owned())),
            1 => Just(Some("manual".to_owned())),
            1 => prop::option::of(text()),
        ],
        section(TLS_FIELDS),
        prop::option::of(section(PROXY_FIELDS)),
        prop::option::of(section(RATE_FIELDS)),
        prop::collection::vec(site(), 0..4),
    )
        .prop_map(|(server, mode, tls, proxy, rate, sites)| {
            let mut file = format!("[server]\n{server}\n[server.tls]\n");
            if let Some(mode) = mode {
                file.push_str(&format!("mode = {}\n", toml_str(&mode)));
            }
            file.push_str(&tls);
            if let Some(proxy) = proxy {
                file.push_str(&format!("\n[proxy]\n{proxy}"));
            }
            if let Some(rate) = rate {
                file.push_str(&format!("\n[rate_limit]\n{rate}"));
            }
            for (host, upstream) in sites {
                file.push_str(&format!(
                    "\n[[sites]]\nhost = {}\nupstream = {}\n",
                    toml_str(&host),
                    toml_str(&upstream)
                ));
            }
            file
        })
}

/// A field path such as `server.tls.acme_domains[0]` or `sites[2].host`.
fn is_field_path(field: &str) -> bool {
    let known_root = ["server", "admin", "proxy", "rate_limit", "sites", "config"]
        .iter()
        .any(|root| {
            field == *root
                || field.starts_with(&format!("{root}."))
                || field.starts_with(&format!("{root}["))
        });
    let well_formed = field.split('.').all(|part| {
        let name = part.split('[').next().unwrap_or("");
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && part[name.len()..].split_terminator(']').all(|index| {
                index
                    .strip_prefix('[')
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            })
    });
    known_root && well_formed
}

fn check(file: &str) -> Result<(), TestCaseError> {
    match Config::parse(file) {
        Ok(config) => {
            prop_assert!(!config.dynamic.sites.is_empty());
            for host in config.dynamic.sites.keys() {
                prop_assert!(check_dns_name(host).is_ok(), "accepted host {host:?}");
            }
        }
        Err(ConfigError::Invalid(errors)) => {
            prop_assert!(!errors.is_empty());
            for e in errors {
                prop_assert!(is_field_path(&e.field), "error without a field path: {e}");
                prop_assert!(!e.message.is_empty(), "empty message for {}", e.field);
            }
        }
        Err(ConfigError::Syntax(message)) => {
            // TOML and type errors point at the place in the file.
            prop_assert!(message.contains("line"), "no position: {message}");
        }
        Err(e @ ConfigError::Read { .. }) => prop_assert!(false, "read error from text: {e}"),
    }
    Ok(())
}

proptest! {
    #[test]
    fn structured_config_never_panics_and_names_fields(file in config_file()) {
        check(&file)?;
    }

    #[test]
    fn arbitrary_text_never_panics(file in ".{0,400}") {
        check(&file)?;
    }
}

#[test]
fn field_paths_are_recognised() {
    assert!(is_field_path("sites[1].upstream"));
    assert!(is_field_path("server.tls.acme_domains[0]"));
    assert!(is_field_path("sites"));
    assert!(!is_field_path(""));
    assert!(!is_field_path("sites[x].host"));
    assert!(!is_field_path("Server.bind_addr"));
    assert!(is_field_path("rate_limit.ipv6_prefix_len"));
}

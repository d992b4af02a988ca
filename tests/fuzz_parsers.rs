//! Property tests ("fuzzing" on stable Rust) for the parsers that read what
//! clients send: the request's host (`Host`, `:authority`, absolute-form
//! targets) and `X-Forwarded-For`. Whatever the client writes, they never
//! panic, and what they accept is well-formed and can only come from where
//! it is allowed to.
//!
//! The default run is short (proptest's 256 cases per property). A longer
//! one: `PROPTEST_CASES=100000 cargo test --release --test fuzz_parsers`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, Version};
use ipnet::IpNet;
use proptest::prelude::*;
use reverse_proxy::client_ip::client_ip;
use reverse_proxy::config::check_dns_name;
use reverse_proxy::proxy::host::request_host;

/// Bytes a client could put in a header value (hyper has already refused
/// control characters), biased towards host-like text.
fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9.-]{0,20}(:[0-9a-z]{0,7})?",
        "[a-z0-9]{1,5}@[a-z.]{1,10}(:[0-9]{1,5})?",
        "\\[[0-9a-fA-F:.]{0,40}\\](:[0-9]{0,6})?",
        "[0-9.]{1,16}(:[0-9]{1,6})?",
        "[ -~]{0,40}",
        "[ -~\u{80}-\u{ff}]{0,20}",
    ]
}

fn request(version: Version, target: &str, hosts: &[String]) -> Option<Request<()>> {
    let mut builder = Request::builder().version(version).uri(target);
    for h in hosts {
        builder = builder.header(HOST, HeaderValue::from_str(h).ok()?);
    }
    builder.body(()).ok()
}

/// Accepted names are lower-case DNS names or bracketed IPv6 addresses,
/// never carrying a port, user information or anything else.
fn assert_well_formed(name: &str) -> Result<(), TestCaseError> {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(ip) => prop_assert!(ip.parse::<Ipv6Addr>().is_ok(), "{name:?}"),
        None => prop_assert!(check_dns_name(name).is_ok(), "{name:?}"),
    }
    Ok(())
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s))),
        // IPv4-mapped, and a few fixed ones so that trusted lists match.
        any::<[u8; 4]>().prop_map(|o| IpAddr::V6(Ipv4Addr::from(o).to_ipv6_mapped())),
        prop::sample::select(vec![
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 1, 2, 3]),
            IpAddr::from([192, 0, 2, 7]),
            "2001:db8::1".parse().expect("ip"),
        ]),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    (ip(), 0u8..=128).prop_map(|(ip, len)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        IpNet::new(ip, len % (max + 1))
            .expect("prefix in range")
            .trunc()
    })
}

/// One `X-Forwarded-For` element: an address (maybe with a port) or junk.
fn hop() -> impl Strategy<Value = String> {
    prop_oneof![
        ip().prop_map(|ip| ip.to_string()),
        (ip(), any::<u16>()).prop_map(|(ip, port)| std::net::SocketAddr::new(ip, port).to_string()),
        "[ -~]{0,12}",
    ]
}

fn xff_values() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::collection::vec(hop(), 1..4).prop_map(|hops| hops.join(", ")),
        0..3,
    )
}

proptest! {
    #[test]
    fn host_header_never_panics_and_accepts_only_names(
        host in header_text(),
        second in prop::option::of(header_text()),
        h2 in any::<bool>(),
    ) {
        let mut hosts = vec![host];
        hosts.extend(second);
        let version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        if let Some(req) = request(version, "/", &hosts)
            && let Ok(found) = request_host(&req)
        {
            prop_assert_eq!(hosts.len(), 1, "two Host fields accepted");
            assert_well_formed(&found.name)?;
            // The name is the Host's own, lower-cased (IPv6 literals
            // come out in canonical form).
            if !found.name.starts_with('[') {
                prop_assert!(
                    hosts[0].to_ascii_lowercase().starts_with(&found.name),
                    "{:?} from {:?}", found.name, hosts[0]
                );
            }
        }
    }

    #[test]
    fn authority_and_host_must_agree(
        authority in header_text(),
        host in prop::option::of(header_text()),
        h2 in any::<bool>(),
    ) {
        let version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
        let target = format!("http://{authority}/x");
        let hosts: Vec<String> = host.iter().cloned().collect();
        if let Some(req) = request(version, &target, &hosts)
            && let Ok(found) = request_host(&req)
        {
            assert_well_formed(&found.name)?;
            // Routed by the target's authority, whatever Host says...
            let target_authority = req.uri().authority().map(|a| a.as_str().to_owned());
            prop_assert_eq!(found.authority.to_str().ok().map(str::to_owned), target_authority);
            // ...and on HTTP/2 a Host beside it must be the same.
            if h2 && let Some(host) = &host {
                prop_assert!(host.as_bytes().eq_ignore_ascii_case(found.authority.as_bytes()),
                    "h2 :authority {:?} with Host {:?} accepted", found.authority, host);
            }
        }
    }

    #[test]
    fn valid_names_and_ports_are_accepted(
        labels in prop::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 1..4),
        upper in any::<bool>(),
        port in prop::option::of(any::<u16>()),
    ) {
        let name = labels.join(".");
        let mut host = if upper { name.to_ascii_uppercase() } else { name.clone() };
        if let Some(port) = port {
            host.push_str(&format!(":{port}"));
        }
        let req = request(Version::HTTP_11, "/", &[host.clone()]).expect("request");
        let found = request_host(&req).map_err(|e| TestCaseError::fail(format!("{host:?}: {e}")))?;
        prop_assert_eq!(found.name, name);
        prop_assert_eq!(found.authority.as_bytes(), host.as_bytes());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers(
        peer in ip(),
        values in xff_values(),
        trusted in prop::collection::vec(net(), 0..4),
    ) {
        let mut headers = HeaderMap::new();
        for v in &values {
            if let Ok(v) = HeaderValue::from_str(v) {
                headers.append("x-forwarded-for", v);
            }
        }
        let found = client_ip(peer, &headers, &trusted);
        // Always reported as users think of it: never IPv4-mapped.
        prop_assert_eq!(found, found.to_canonical());
        let peer_trusted = trusted.iter().any(|n| n.contains(&peer.to_canonical()));
        if !peer_trusted {
            prop_assert_eq!(found, peer.to_canonical());
        } else if found != peer.to_canonical() {
            // Only an address the header really carries can come out.
            let carried = values.iter().flat_map(|v| v.split(',')).any(|hop| {
                let hop = hop.trim();
                hop.parse::<IpAddr>().ok()
                    .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
                    .is_some_and(|ip| ip.to_canonical() == found)
            });
            prop_assert!(carried, "{found} is not in {values:?}");
        }
    }
}

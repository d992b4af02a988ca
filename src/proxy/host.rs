//! Which site a request is for. HTTP/1.1 names it in `Host`, HTTP/2 in
//! `:authority`, and an absolute-form target in the request line; the three
//! must never disagree silently, or one site's rules could be applied to
//! another site's request.

use http::header::HOST;
use http::uri::Authority;
use http::{HeaderValue, Request, Version};

use crate::config::check_dns_name;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("missing Host header")]
    Missing,
    #[error("more than one Host header")]
    Repeated,
    #[error("malformed Host")]
    Malformed,
    #[error("Host differs from the request's authority")]
    Conflicting,
}

/// The request's host, lower-cased, without port or trailing dot, with the
/// authority as the client wrote it (what the upstream gets as `Host`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHost {
    pub name: String,
    pub authority: HeaderValue,
}

pub fn request_host<B>(req: &Request<B>) -> Result<RequestHost, HostError> {
    let mut host_headers = req.headers().get_all(HOST).iter();
    let header = host_headers.next();
    if host_headers.next().is_some() {
        return Err(HostError::Repeated);
    }
    let Some(target) = req.uri().authority() else {
        // The usual HTTP/1.1 request: `Host` alone names the site, and the
        // upstream gets it as it came.
        let header = header.ok_or(HostError::Missing)?;
        let name = normalize(header.as_bytes())?;
        return Ok(RequestHost {
            name,
            authority: header.clone(),
        });
    };
    if let Some(header) = header {
        let header = header
            .to_str()
            .ok()
            .and_then(|s| s.parse::<Authority>().ok())
            .ok_or(HostError::Malformed)?;
        // HTTP/2 carries `:authority`; a `Host` beside it must agree. An
        // absolute-form target wins over `Host` (RFC 9112 §3.2.2).
        if req.version() == Version::HTTP_2 && !same_authority(target, &header) {
            return Err(HostError::Conflicting);
        }
    }
    let name = normalize(target.as_str().as_bytes())?;
    let authority = HeaderValue::from_str(target.as_str()).map_err(|_| HostError::Malformed)?;
    Ok(RequestHost { name, authority })
}

/// Whether a request for `host` may be served on a connection whose TLS
/// handshake asked for `sni`. Without TLS, or without SNI (a client that
/// connected by IP address), there is nothing to compare. A client that
/// asked for one site must not be handed another over that connection (RFC
/// 9110 §15.5.20: 421), or a certificate valid for one name would vouch for
/// content of another.
pub fn sni_matches(sni: Option<&str>, host: &str) -> bool {
    sni.is_none_or(|sni| {
        let sni = sni.strip_suffix('.').unwrap_or(sni);
        sni.eq_ignore_ascii_case(host)
    })
}

fn same_authority(a: &Authority, b: &Authority) -> bool {
    // Compared as written, case aside: `port_u16` and `port` are `None` for
    // a malformed port as well as for none at all, which would make
    // `a.test:x` agree with `a.test`.
    a.as_str().eq_ignore_ascii_case(b.as_str())
}

/// The site key for an authority as written (`host[:port]`): one pass to
/// split off and check the port, then the name checked as configured site
/// names are. This runs for every request, so it reads the bytes directly
/// instead of building an `Authority` and asking it for its parts.
fn normalize(authority: &[u8]) -> Result<String, HostError> {
    let host_end = if authority.first() == Some(&b'[') {
        authority
            .iter()
            .position(|&b| b == b']')
            .map_or(authority.len(), |end| end + 1)
    } else {
        authority
            .iter()
            .position(|&b| b == b':')
            .unwrap_or(authority.len())
    };
    let (host, port) = authority.split_at(host_end);
    // `Authority` accepts an empty, signed or non-numeric port; a Host must
    // not.
    if !port.is_empty() && !port.strip_prefix(b":").is_some_and(is_port) {
        return Err(HostError::Malformed);
    }
    let host = std::str::from_utf8(host).map_err(|_| HostError::Malformed)?;
    if let Some(inner) = host.strip_prefix('[') {
        return inner
            .strip_suffix(']')
            .and_then(|inner| inner.parse::<std::net::Ipv6Addr>().ok())
            .map(|ip| format!("[{ip}]"))
            .ok_or(HostError::Malformed);
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let name = host.to_ascii_lowercase();
    check_dns_name(&name).map_err(|_| HostError::Malformed)?;
    Ok(name)
}

/// Decimal digits for a number up to 65535 (leading zeros allowed).
fn is_port(digits: &[u8]) -> bool {
    !digits.is_empty()
        && digits
            .iter()
            .try_fold(0u16, |port, &b| {
                b.is_ascii_digit()
                    .then(|| port.checked_mul(10)?.checked_add(u16::from(b - b'0')))
                    .flatten()
            })
            .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h1(target: &str, hosts: &[&str]) -> Result<RequestHost, HostError> {
        let mut b = Request::builder().uri(target);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        request_host(&b.body(()).expect("request"))
    }

    #[test]
    fn host_header_case_and_port() {
        let h = h1("/", &["Git.Example.ORG:8443"]).expect("host");
        assert_eq!(h.name, "git.example.org");
        assert_eq!(h.authority, "Git.Example.ORG:8443");
    }

    #[test]
    fn missing_repeated_malformed() {
        assert_eq!(h1("/", &[]), Err(HostError::Missing));
        assert_eq!(h1("/", &["a.test", "b.test"]), Err(HostError::Repeated));
        for bad in [
            "a.test:",
            "a.test:x",
            "a.test:+80",
            "a.test:80:81",
            "u@a.test",
            "a b",
            "a.test:99999",
            "",
            ":80",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[a.test]",
            "a..test",
            "caf\u{e9}.test",
        ] {
            assert_eq!(h1("/", &[bad]), Err(HostError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn name_is_the_site_key_and_authority_is_kept_as_written() {
        for (written, name) in [
            ("A.Test.:0080", "a.test"),
            ("127.0.0.1:8080", "127.0.0.1"),
            ("[0:0::1]:443", "[::1]"),
            ("[::1]", "[::1]"),
        ] {
            let h = h1("/", &[written]).expect(written);
            assert_eq!(
                (h.name.as_str(), h.authority.as_bytes()),
                (name, written.as_bytes())
            );
        }
    }

    #[test]
    fn absolute_form_wins() {
        let h = h1("http://b.test/x", &["a.test"]).expect("host");
        assert_eq!(h.name, "b.test");
    }

    #[test]
    fn sni_must_name_the_host() {
        assert!(sni_matches(None, "a.test"));
        assert!(sni_matches(Some("a.test"), "a.test"));
        assert!(sni_matches(Some("A.Test."), "a.test"));
        assert!(!sni_matches(Some("b.test"), "a.test"));
        assert!(!sni_matches(Some("a.test"), "[::1]"));
    }

    #[test]
    fn h2_conflict() {
        let req = Request::builder()
            .version(Version::HTTP_2)
            .uri("https://a.test/")
            .header(HOST, "b.test")
            .body(())
            .expect("request");
        assert_eq!(request_host(&req), Err(HostError::Conflicting));
        for host in ["a.test:x", "a.test:", "a.test:443"] {
            let req = Request::builder()
                .version(Version::HTTP_2)
                .uri("https://a.test/")
                .header(HOST, host)
                .body(())
                .expect("request");
            assert_eq!(request_host(&req), Err(HostError::Conflicting), "{host}");
        }
    }
}

//! Which site a request is for. HTTP/1.1 names it in `Host`, HTTP/2 in
//! `:authority`, and an absolute-form target in the request line; the three
//! must never disagree silently, or one site's rules could be applied to
//! another site's request.

use http::header::HOST;
use http::uri::Authority;
use http::{Request, Version};

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
    pub authority: Authority,
}

pub fn request_host<B>(req: &Request<B>) -> Result<RequestHost, HostError> {
    let mut host_headers = req.headers().get_all(HOST).iter();
    let header = host_headers.next();
    if host_headers.next().is_some() {
        return Err(HostError::Repeated);
    }
    let header = match header {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|s| s.parse::<Authority>().ok())
                .ok_or(HostError::Malformed)?,
        ),
        None => None,
    };
    let authority = match (req.uri().authority(), header) {
        // HTTP/2 carries `:authority`; a `Host` beside it must agree.
        (Some(target), Some(header)) if req.version() == Version::HTTP_2 => {
            if !same_authority(target, &header) {
                return Err(HostError::Conflicting);
            }
            target.clone()
        }
        // An absolute-form target wins over `Host` (RFC 9112 §3.2.2).
        (Some(target), _) => target.clone(),
        (None, Some(header)) => header,
        (None, None) => return Err(HostError::Missing),
    };
    let name = normalize(&authority)?;
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

fn normalize(authority: &Authority) -> Result<String, HostError> {
    let text = authority.as_str();
    if text.contains('@') {
        return Err(HostError::Malformed);
    }
    let host = authority.host();
    // `Authority` accepts an empty or non-numeric port; a Host must not.
    let port = &text[host.len()..];
    if !port.is_empty()
        && port
            .strip_prefix(':')
            .and_then(|p| p.parse::<u16>().ok())
            .is_none()
    {
        return Err(HostError::Malformed);
    }
    if host.starts_with('[') {
        let inner = host.trim_start_matches('[').trim_end_matches(']');
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|ip| format!("[{ip}]"))
            .map_err(|_| HostError::Malformed);
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let name = host.to_ascii_lowercase();
    check_dns_name(&name).map_err(|_| HostError::Malformed)?;
    Ok(name)
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
        assert_eq!(h.authority.as_str(), "Git.Example.ORG:8443");
    }

    #[test]
    fn missing_repeated_malformed() {
        assert_eq!(h1("/", &[]), Err(HostError::Missing));
        assert_eq!(h1("/", &["a.test", "b.test"]), Err(HostError::Repeated));
        for bad in ["a.test:", "a.test:x", "u@a.test", "a b", "a.test:99999", ""] {
            assert_eq!(h1("/", &[bad]), Err(HostError::Malformed), "{bad:?}");
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

//! Who the client is: the socket peer, or — only when that peer is a
//! trusted proxy — the right-most address in `X-Forwarded-For` that is not
//! itself a trusted proxy. Everything else a client sends about its address
//! is ignored, because anyone can write any header.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use http::header::HeaderName;
use ipnet::IpNet;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The client's address for one request, worked out once by the
/// rate-limit layer and left in the request's extensions for the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// An address as users think of it: `::ffff:203.0.113.7` is `203.0.113.7`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The client's address for logs and rate limiting.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut current = peer.to_canonical();
    if trusted.is_empty() || !is_trusted(&current) {
        return current;
    }
    // Walk the chain from the nearest hop outward; each trusted hop vouches
    // for the address it appended, nothing further.
    let hops = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .rev()
        .flat_map(|value| value.to_str().unwrap_or("").rsplit(','));
    for hop in hops {
        let Some(ip) = parse_hop(hop) else {
            return current;
        };
        current = ip;
        if !is_trusted(&current) {
            return current;
        }
    }
    current
}

/// One `X-Forwarded-For` element: an address, possibly with a port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().filter_map(|s| s.parse().ok()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(&X_FORWARDED_FOR, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let h = xff(&["203.0.113.7"]);
        assert_eq!(client_ip(ip("198.51.100.1"), &h, &[]), ip("198.51.100.1"));
        let t = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("198.51.100.1"), &h, &t), ip("198.51.100.1"));
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted() {
        let t = nets(&["10.0.0.0/8"]);
        let h = xff(&["6.6.6.6, 203.0.113.7", "10.1.1.1"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &t), ip("203.0.113.7"));
    }

    #[test]
    fn mapped_and_garbage() {
        let t = nets(&["127.0.0.1/32"]);
        assert_eq!(
            client_ip(ip("::ffff:127.0.0.1"), &xff(&["::ffff:203.0.113.9"]), &t),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("127.0.0.1"), &xff(&["nonsense"]), &t),
            ip("127.0.0.1")
        );
        assert_eq!(
            client_ip(ip("127.0.0.1"), &xff(&["203.0.113.1:4711"]), &t),
            ip("203.0.113.1")
        );
    }
}

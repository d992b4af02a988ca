//! Who the client is: the socket peer, or — only when that peer is a
//! trusted proxy — the right-most address in `X-Forwarded-For` that is not
//! itself a trusted proxy. Everything else a client sends about its address
//! is ignored, because anyone can write any header.

use std::net::{IpAddr, SocketAddr};

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// An address as users think of it: `::ffff:203.0.113.7` is `203.0.113.7`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An address as a header value.
pub fn ip_header(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_bytes(IpText::new(ip).as_bytes())
        .unwrap_or(HeaderValue::from_static("unknown"))
}

/// Every octet's decimal text followed by a dot, padded to four bytes, and
/// the length of the text with its dot: the access line writes the
/// client's address for every request.
const OCTETS: [([u8; 4], u8); 256] = {
    let mut table = [([0; 4], 0); 256];
    let mut n = 0;
    while n < 256 {
        let digits = [
            b'0' + (n / 100) as u8,
            b'0' + (n / 10 % 10) as u8,
            b'0' + (n % 10) as u8,
        ];
        table[n] = match n {
            0..=9 => ([digits[2], b'.', 0, 0], 2),
            10..=99 => ([digits[1], digits[2], b'.', 0], 3),
            _ => ([digits[0], digits[1], digits[2], b'.'], 4),
        };
        n += 1;
    }
    table
};

/// An address as text, formatted on the stack. Every proxied request
/// writes its client's address into two headers and the access line, and
/// the standard library's `Display` for addresses goes through the general
/// formatting machinery octet by octet.
pub struct IpText {
    buf: [u8; IpText::MAX],
    len: usize,
}

impl IpText {
    /// The longest address text: an IPv6 address with an embedded IPv4 one.
    const MAX: usize = 45;

    pub fn new(ip: IpAddr) -> Self {
        let mut text = Self {
            buf: [0; Self::MAX],
            len: 0,
        };
        match ip {
            IpAddr::V4(v4) => {
                // Each octet with its dot, four bytes at a time; the last
                // dot is dropped.
                for octet in v4.octets() {
                    let (dotted, len) = OCTETS[usize::from(octet)];
                    text.buf[text.len..][..4].copy_from_slice(&dotted);
                    text.len += usize::from(len);
                }
                text.len -= 1;
            }
            IpAddr::V6(v6) => {
                let mut rest = &mut text.buf[..];
                // Cannot fail: the text fits by construction.
                let _ = std::io::Write::write_fmt(&mut rest, format_args!("{v6}"));
                text.len = Self::MAX - rest.len();
            }
        }
        text
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
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

    #[test]
    fn ip_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "::",
            "::1",
            "2001:db8::7",
            "::ffff:192.0.2.1",
            "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255",
            "1:2:3:4:5:6:7:8",
        ] {
            let ip: IpAddr = ip.parse().expect("address");
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
        for a in 0..=255u8 {
            let ip = IpAddr::from([a, a, 0, 255 - a]);
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
    }

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

//! Header rewriting between client and upstream: hop-by-hop headers belong
//! to one connection and must not be forwarded (RFC 9110 §7.6.1), and the
//! upstream learns who the client was from headers this proxy sets itself.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::client_ip::{X_FORWARDED_FOR, ip_header};
use crate::conn_info::ConnInfo;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The headers that belong to one connection. `Connection` may name more.
static HOP_BY_HOP: [&HeaderName; 7] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// Removes hop-by-hop headers. For an upgrade the `Upgrade` header and a
/// `Connection: upgrade` are kept, since they are the request itself.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one look at each name costs less than
    // hashing every hop-by-hop name for a removal.
    if headers.keys().any(|name| HOP_BY_HOP.contains(&name)) {
        strip_hop_by_hop(headers, upgrade);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    for name in HOP_BY_HOP {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
}

/// Whether a request asks to switch protocols (`Connection: upgrade` plus
/// an `Upgrade` header), as WebSocket does.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| lists_token(v.as_bytes(), b"upgrade"))
}

/// Whether a comma-separated field value such as `Connection`'s lists
/// `token` (compared without regard to case).
pub fn lists_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a request's `Transfer-Encoding`, if any, is exactly `chunked`.
/// hyper removes the chunked framing and refuses codings that do not end in
/// `chunked`, but lets `gzip, chunked` or `chunked, chunked` through: their
/// remaining codings would silently vanish when the body is re-framed for
/// the upstream, so such requests are refused (RFC 9112 §6.1: 501).
pub fn transfer_coding_is_chunked_only(headers: &HeaderMap) -> bool {
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty());
    match codings.next() {
        None => true,
        Some(first) => first.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// The fields the proxy sets on a request for its upstream. The peer is
/// appended to any `X-Forwarded-For` the client sent (the upstream may
/// read the chain, but the proxy itself believes it only from trusted
/// peers); the others replace what the client sent.
///
/// Worked out once, then either put in the request's map (for hyper's
/// client) or written after the request's own fields when its head is
/// encoded (`client::encode`), which spares four insertions into the map
/// for nearly every request.
pub struct Forwarding {
    forwarded_for: HeaderValue,
    proto: HeaderValue,
    host: HeaderValue,
    real_ip: HeaderValue,
}

impl Forwarding {
    /// The fields for a request with `headers` from `client` on `conn`,
    /// for `host` (the authority the upstream gets).
    pub fn new(headers: &HeaderMap, conn: &ConnInfo, client: IpAddr, host: &HeaderValue) -> Self {
        let forwarded_for = match headers.get(&X_FORWARDED_FOR) {
            None => conn.peer_header.clone(),
            Some(_) => {
                let mut chain = headers
                    .get_all(&X_FORWARDED_FOR)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join(", ");
                chain.push_str(", ");
                chain.push_str(conn.peer_header.to_str().unwrap_or_default());
                HeaderValue::from_str(&chain).unwrap_or_else(|_| conn.peer_header.clone())
            }
        };
        let real_ip = if client == conn.peer.ip() {
            conn.peer_header.clone()
        } else {
            ip_header(client)
        };
        Self {
            forwarded_for,
            proto: HeaderValue::from_static(if conn.https { "https" } else { "http" }),
            host: host.clone(),
            real_ip,
        }
    }

    /// Whether the proxy sets `name` itself: a client's field of that name
    /// is not passed on as it came.
    pub fn replaces(name: &HeaderName) -> bool {
        // Standard names are none of these, and tell so at once.
        [
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &X_REAL_IP,
        ]
        .contains(&name)
    }

    /// How many fields the proxy sets.
    pub const COUNT: usize = 4;

    /// The fields, in the order they are written.
    pub fn fields(&self) -> [(&HeaderName, &HeaderValue); Self::COUNT] {
        [
            (&X_FORWARDED_FOR, &self.forwarded_for),
            (&X_FORWARDED_PROTO, &self.proto),
            (&X_FORWARDED_HOST, &self.host),
            (&X_REAL_IP, &self.real_ip),
        ]
    }

    /// Puts the fields in `headers`, in place of the client's.
    pub fn insert_into(self, headers: &mut HeaderMap) {
        headers.insert(&X_FORWARDED_FOR, self.forwarded_for);
        headers.insert(&X_FORWARDED_PROTO, self.proto);
        headers.insert(&X_FORWARDED_HOST, self.host);
        headers.insert(&X_REAL_IP, self.real_ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn leaves_end_to_end_headers_alone() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert("x-connection", HeaderValue::from_static("keep-alive"));
        let before = h.clone();
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h.len(), before.len() + 1);
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn upgrade_keeps_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn only_plain_chunked_is_accepted() {
        let te = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            transfer_coding_is_chunked_only(&h)
        };
        assert!(te(&[]));
        assert!(te(&["chunked"]));
        assert!(te(&["Chunked "]));
        assert!(!te(&["gzip, chunked"]));
        assert!(!te(&["chunked, chunked"]));
        assert!(!te(&["gzip", "chunked"]));
        assert!(!te(&["identity"]));
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("7.7.7.7"));
        let mut conn = ConnInfo::new("127.0.0.1:40000".parse().expect("addr"));
        conn.https = true;
        let peer = conn.peer.ip();
        Forwarding::new(&h, &conn, peer, &HeaderValue::from_static("a.test")).insert_into(&mut h);
        assert_eq!(h[&X_FORWARDED_FOR], "6.6.6.6, 7.7.7.7, 127.0.0.1");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "a.test");
        assert_eq!(h[&X_REAL_IP], "127.0.0.1");
    }

    #[test]
    fn the_forwarding_fields_are_the_ones_replaced() {
        let conn = ConnInfo::new("127.0.0.1:40000".parse().expect("addr"));
        let forwarding = Forwarding::new(
            &HeaderMap::new(),
            &conn,
            conn.peer.ip(),
            &HeaderValue::from_static("a.test"),
        );
        for (name, _) in forwarding.fields() {
            assert!(Forwarding::replaces(name), "{name}");
        }
        for name in [
            header::HOST,
            header::FORWARDED,
            HeaderName::from_static("x-forwarded-port"),
        ] {
            assert!(!Forwarding::replaces(&name), "{name}");
        }
    }

    #[test]
    fn forwarding_values_for_ipv6_and_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.test:8443"));
        let conn = ConnInfo::new("[2001:db8::1]:40000".parse().expect("addr"));
        let widest: IpAddr = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
            .parse()
            .expect("ip");
        Forwarding::new(&h, &conn, widest, &HeaderValue::from_static("a.test:8443"))
            .insert_into(&mut h);
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::1");
        assert_eq!(h[&X_FORWARDED_HOST], "a.test:8443");
        assert_eq!(h[&X_REAL_IP], widest.to_string().as_str());
    }
}

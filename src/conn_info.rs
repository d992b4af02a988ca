//! What the listener knows about a connection that its requests need: the
//! peer's address and whether TLS was used (and for which name). The
//! listener hands it to the proxy pipeline with every request, and to the
//! redirect and admin routers as a request extension.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;

use crate::client_ip::{canonical, ip_header};

#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The socket peer, IPv4-mapped addresses already shown as IPv4.
    pub peer: SocketAddr,
    /// The peer's address as a header value. Every forwarded request copies
    /// it into `X-Forwarded-For`, and usually into `X-Real-IP`: made once
    /// per connection, those are shared rather than formatted and
    /// allocated twice per request.
    pub peer_header: HeaderValue,
    pub https: bool,
    /// The TLS server name the client asked for, if any.
    pub sni: Option<Arc<str>>,
    /// The negotiated TLS version as nginx's `$ssl_protocol` writes it
    /// (`TLSv1.3`), for the access log; `None` on plain connections.
    pub tls_version: Option<&'static str>,
}

impl ConnInfo {
    /// A plain-TCP connection from `peer` (TLS details are added once its
    /// handshake is done).
    pub fn new(peer: SocketAddr) -> Self {
        let peer = canonical(peer);
        Self {
            peer,
            peer_header: ip_header(peer.ip()),
            https: false,
            sni: None,
            tls_version: None,
        }
    }
}

//! What the listener knows about a connection that its requests need: the
//! peer's address and whether TLS was used (and for which name). The
//! listener hands it to the proxy pipeline with every request, and to the
//! redirect and admin routers as a request extension.

use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The socket peer, IPv4-mapped addresses already shown as IPv4.
    pub peer: SocketAddr,
    pub https: bool,
    /// The TLS server name the client asked for, if any.
    pub sni: Option<Arc<str>>,
    /// The negotiated TLS version as nginx's `$ssl_protocol` writes it
    /// (`TLSv1.3`), for the access log; `None` on plain connections.
    pub tls_version: Option<&'static str>,
}

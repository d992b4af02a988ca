//! The TLS handshake of one connection, bounded by a deadline.
//!
//! The ClientHello is read before any configuration is chosen, so that an
//! ACME challenge, a normal client and a name we do not serve can each be
//! answered differently. Failures are the client's business (scanners,
//! old clients, typos), so they are logged as one line at info (refused
//! after a ClientHello) or debug (no usable ClientHello at all), never as
//! errors.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Level, debug, event, info};

use super::{Decision, Tls};

/// A fatal alert as a plaintext record: content type alert, legacy version
/// TLS 1.2, length 2, level fatal, `description`. rustls has no way to
/// refuse a ClientHello with a chosen alert (it sends `access_denied` when
/// no certificate resolves), so refusals write the record themselves,
/// before any configuration is involved.
fn fatal_alert(description: u8) -> [u8; 7] {
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}

/// A completed handshake, ready for HTTP.
pub struct Handshaken {
    pub stream: TlsStream<TcpStream>,
    /// The SNI name, lower-cased.
    pub sni: Option<Arc<str>>,
}

/// Why a connection ended during its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// An ACME TLS-ALPN-01 validation, answered as it should be.
    Challenge,
    /// Refused (unknown name, old protocol) or broken (garbage, protocol error).
    Failed,
    /// The handshake did not finish in time.
    TimedOut,
}

/// Runs the handshake on `tcp` within `limit`. Returns why the connection
/// is done when it ended there: refused, failed, timed out, or an ACME
/// challenge answered.
pub async fn accept(
    tcp: TcpStream,
    tls: &Tls,
    peer: SocketAddr,
    limit: Duration,
) -> Result<Handshaken, Ended> {
    let deadline = Instant::now() + limit;
    let client_ip = peer.ip();
    let start = match timeout_at(deadline, LazyConfigAcceptor::new(Default::default(), tcp)).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            failed(Level::DEBUG, client_ip, None, &reason(&e));
            return Err(Ended::Failed);
        }
        Err(_) => {
            failed(
                Level::DEBUG,
                client_ip,
                None,
                "no ClientHello before the handshake timeout",
            );
            return Err(Ended::TimedOut);
        }
    };
    let hello = start.client_hello();
    let sni: Option<Arc<str>> = hello
        .server_name()
        .map(|s| Arc::from(s.to_ascii_lowercase()));
    let decision = tls.decide(&hello, sni.as_deref());
    let config = match decision {
        Decision::Serve(config) => config,
        Decision::Challenge(config) => {
            let result = timeout_at(deadline, start.into_stream(config)).await;
            match result {
                Ok(Ok(mut stream)) => {
                    info!(client_ip = %client_ip, sni = sni.as_deref().unwrap_or("-"), "ACME_CHALLENGE");
                    let _ = timeout_at(deadline, stream.shutdown()).await;
                }
                Ok(Err(e)) => failed(Level::INFO, client_ip, sni.as_deref(), &reason(&e)),
                Err(_) => failed(Level::INFO, client_ip, sni.as_deref(), "handshake timeout"),
            }
            return Err(Ended::Challenge);
        }
        Decision::Refuse(refusal) => {
            refuse(start.io, refusal.alert(), deadline).await;
            failed(Level::INFO, client_ip, sni.as_deref(), refusal.reason());
            return Err(Ended::Failed);
        }
    };
    match timeout_at(deadline, start.into_stream(config)).await {
        Ok(Ok(stream)) => Ok(Handshaken { stream, sni }),
        Ok(Err(e)) => {
            failed(Level::INFO, client_ip, sni.as_deref(), &reason(&e));
            Err(Ended::Failed)
        }
        Err(_) => {
            failed(Level::DEBUG, client_ip, sni.as_deref(), "handshake timeout");
            Err(Ended::TimedOut)
        }
    }
}

async fn refuse(mut io: TcpStream, description: u8, deadline: Instant) {
    let sent = timeout_at(deadline, async {
        io.write_all(&fatal_alert(description)).await?;
        io.shutdown().await
    })
    .await;
    if let Ok(Err(e)) = sent {
        debug!("sending alert {description}: {e}");
    }
}

fn failed(level: Level, client_ip: std::net::IpAddr, sni: Option<&str>, reason: &str) {
    let sni = sni.unwrap_or("-");
    if level == Level::INFO {
        event!(Level::INFO, client_ip = %client_ip, sni, reason, "TLS_HANDSHAKE_FAILED");
    } else {
        event!(Level::DEBUG, client_ip = %client_ip, sni, reason, "TLS_HANDSHAKE_FAILED");
    }
}

/// The rustls error inside an I/O error, which says what the client did
/// wrong; otherwise the I/O error itself.
fn reason(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None if e.kind() == io::ErrorKind::UnexpectedEof => {
            "connection closed during the handshake".to_owned()
        }
        None => e.to_string(),
    }
}

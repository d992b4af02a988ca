//! TLS on the main listener.
//!
//! Every connection goes through one path ([`handshake`]): the ClientHello
//! is read first, then [`Tls::decide`] picks what to do with it: answer an
//! ACME TLS-ALPN-01 challenge and close, serve the site with the serving
//! configuration (ALPN `h2` and `http/1.1`, TLS 1.2 at least), or refuse a
//! name we do not serve with an `unrecognized_name` alert, so a client never
//! gets another host's certificate.
//!
//! Certificates come from [`acme`] (one SAN certificate for every site,
//! obtained and renewed by rustls-acme) or from files chosen by SNI
//! ([`manual`]). aws-lc-rs is the only crypto provider in the build; it is
//! installed as the process default at start and passed explicitly to every
//! configuration built here.

pub mod acme;
pub mod certs;
pub mod handshake;
pub mod manual;

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};

/// Protocols offered by ALPN, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Manual(#[from] manual::ManualError),
    #[error("{0}")]
    Acme(#[from] acme::AcmeSetupError),
}

/// Makes aws-lc-rs the process-wide rustls provider. Idempotent.
pub fn install_provider() {
    // An error only means a provider is installed already, which is the
    // state this call wants.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The provider every configuration is built with.
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// The configuration real clients get: TLS 1.3 and 1.2 (nothing older is
/// implemented by rustls at all), ALPN h2 and http/1.1.
fn serving_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// How the main listener does TLS.
#[derive(Clone)]
pub enum Tls {
    Acme(Arc<acme::Acme>),
    Manual(manual::Resolver),
}

/// What to do with a ClientHello.
pub enum Decision {
    /// A normal client for a name we serve.
    Serve(Arc<ServerConfig>),
    /// An ACME server validating a TLS-ALPN-01 challenge: complete the
    /// handshake (which is the answer) and close.
    Challenge(Arc<ServerConfig>),
    /// Close with an alert: `unrecognized_name` for a name we do not serve.
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NoServerName,
    UnknownServerName,
    /// ACME mode before the first certificate arrived.
    NoCertificateYet,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NoServerName => "no SNI in the ClientHello",
            Self::UnknownServerName => "no certificate for this SNI",
            Self::NoCertificateYet => "no certificate obtained from the ACME CA yet",
        }
    }

    /// The TLS alert description sent (RFC 8446 §6.2).
    pub fn alert(self) -> u8 {
        match self {
            // unrecognized_name
            Self::NoServerName | Self::UnknownServerName => 112,
            // internal_error: nothing the client did wrong
            Self::NoCertificateYet => 80,
        }
    }
}

impl Tls {
    /// Chooses the configuration for a ClientHello whose SNI, lower-cased,
    /// is `sni`.
    pub fn decide(&self, hello: &ClientHello<'_>, sni: Option<&str>) -> Decision {
        let Some(sni) = sni else {
            return Decision::Refuse(Refusal::NoServerName);
        };
        match self {
            Self::Acme(acme) => acme.decide(hello, sni),
            Self::Manual(resolver) => resolver.lookup(sni).map_or(
                Decision::Refuse(Refusal::UnknownServerName),
                Decision::Serve,
            ),
        }
    }
}

/// Where a served certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertSource {
    Acme,
    Manual,
}

/// One certificate the listener serves, for expiry monitoring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// The names it is served for, comma-separated (unique per certificate).
    pub name: String,
    pub hosts: Vec<String>,
    pub source: CertSource,
    pub not_after_unix: i64,
}

/// The certificates currently served, updated as ACME deploys new ones or
/// manual certificates are reloaded. Cheap to clone; readers never block.
#[derive(Clone, Default)]
pub struct Certificates {
    inner: Arc<ArcSwap<Vec<CertificateInfo>>>,
}

impl Certificates {
    pub fn current(&self) -> Arc<Vec<CertificateInfo>> {
        self.inner.load_full()
    }

    fn replace(&self, certificates: Vec<CertificateInfo>) {
        self.inner.store(Arc::new(certificates));
    }
}

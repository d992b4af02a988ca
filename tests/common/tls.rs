//! TLS for tests: a private CA that issues certificates (rcgen), TLS
//! clients that can be limited to one protocol version or ALPN list, and
//! HTTP/1.1 and HTTP/2 requests over them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::Version;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::Reply;

/// A certificate authority that exists only for one test.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, PEM-encoded.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        Self { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid
    /// for 90 days ending `days` days from now (negative: expired).
    pub fn issue(&self, names: &[&str], days: i64) -> Issued {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("params");
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        let now = time::OffsetDateTime::now_utc();
        params.not_after = now + time::Duration::days(days);
        params.not_before = params.not_after - time::Duration::days(90);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

pub fn roots(pem: &str) -> RootCertStore {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        store.add(cert.expect("PEM root")).expect("add root");
    }
    store
}

/// A client trusting `roots`, offering `alpn`, speaking only `versions`.
pub fn client(
    roots: &RootCertStore,
    alpn: &[&str],
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A client with TLS 1.3 and 1.2.
pub fn default_client(roots: &RootCertStore, alpn: &[&str]) -> Arc<ClientConfig> {
    client(roots, alpn, rustls::ALL_VERSIONS)
}

/// Connects and handshakes with `server_name` as SNI (an IP address sends
/// no SNI, as browsers do).
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timeout"))?
}

/// The rustls error a failed handshake ended with, as text (e.g.
/// `received fatal alert: UnrecognisedName`).
pub fn tls_error(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("{tls:?}"),
        None => format!("io: {e}"),
    }
}

/// The DNS names of the certificate the server presented.
pub fn peer_names(stream: &TlsStream<TcpStream>) -> Vec<String> {
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates");
    reverse_proxy::tls::certs::Leaf::parse(&certs[0])
        .expect("leaf")
        .names
}

/// The ALPN protocol the server chose, as text.
pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<String> {
    stream
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// One GET over an established TLS stream: HTTP/2 when ALPN chose `h2`,
/// else HTTP/1.1. Returns the response and the HTTP version it came in.
pub async fn get(stream: TlsStream<TcpStream>, host: &str, path: &str) -> (Version, Reply) {
    let h2 = alpn(&stream).as_deref() == Some("h2");
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let req = http::Request::get(format!("https://{host}{path}"))
            .body(Body::empty())
            .expect("request");
        send.send_request(req).await
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Body::empty())
            .expect("request");
        send.send_request(req).await
    };
    let response = response.expect("response");
    let version = response.version();
    (version, super::collect_reply(response).await)
}

/// GETs each `(host, path)` in turn on one established TLS stream
/// (HTTP/2 when ALPN chose `h2`, else HTTP/1.1 keep-alive), so that
/// requests for different hosts share the connection and its SNI.
pub async fn get_each(stream: TlsStream<TcpStream>, requests: &[(&str, &str)]) -> Vec<Reply> {
    let h2 = alpn(&stream).as_deref() == Some("h2");
    let io = TokioIo::new(stream);
    let mut replies = Vec::new();
    if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        for (host, path) in requests {
            let req = http::Request::get(format!("https://{host}{path}"))
                .body(Body::empty())
                .expect("request");
            replies
                .push(super::collect_reply(send.send_request(req).await.expect("response")).await);
        }
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        for (host, path) in requests {
            let req = http::Request::get(*path)
                .header(http::header::HOST, *host)
                .body(Body::empty())
                .expect("request");
            replies
                .push(super::collect_reply(send.send_request(req).await.expect("response")).await);
        }
    }
    replies
}

/// The first flight a real client sends: a complete ClientHello record,
/// as `config` would send it for `sni`.
pub fn client_hello(config: Arc<ClientConfig>, sni: &str) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let mut conn = rustls::ClientConnection::new(config, name).expect("client connection");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("write to a Vec");
    }
    hello
}

/// Connects with `sni`, then GETs `path`.
pub async fn https_get(
    addr: SocketAddr,
    sni: &str,
    config: Arc<ClientConfig>,
    path: &str,
) -> (Version, Reply) {
    let stream = connect(addr, sni, config).await.expect("TLS handshake");
    get(stream, sni, path).await
}

/// A ClientHello as a TLS 1.0/1.1 client sends it: `version` (`0x0301`,
/// `0x0302`) and no supported_versions extension. With `modern_extensions`
/// it also carries what a TLS 1.2 client would (signature algorithms,
/// groups), so that only the version is wrong.
pub fn legacy_client_hello(version: u16, sni: &str, modern_extensions: bool) -> Vec<u8> {
    let [vh, vl] = version.to_be_bytes();
    let name = sni.as_bytes();
    let name_len = u16::try_from(name.len()).expect("short name");
    let mut sni_ext = Vec::new();
    sni_ext.extend_from_slice(&(name_len + 3).to_be_bytes()); // server_name_list length
    sni_ext.push(0); // host_name
    sni_ext.extend_from_slice(&name_len.to_be_bytes());
    sni_ext.extend_from_slice(name);
    let mut extensions = Vec::new();
    extensions.extend_from_slice(&[0x00, 0x00]); // server_name
    extensions.extend_from_slice(&u16::try_from(sni_ext.len()).expect("len").to_be_bytes());
    extensions.extend_from_slice(&sni_ext);
    if modern_extensions {
        // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256
        extensions.extend_from_slice(&[0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x08, 0x04]);
        // supported_groups: x25519, secp256r1
        extensions.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
        // ec_point_formats: uncompressed
        extensions.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    }
    let mut body = vec![vh, vl];
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    // ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, ECDHE_RSA_WITH_AES_128_CBC_SHA,
    // RSA_WITH_AES_128_CBC_SHA
    body.extend_from_slice(&[0x00, 0x06, 0xc0, 0x2b, 0xc0, 0x13, 0x00, 0x2f]);
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    body.extend_from_slice(&u16::try_from(extensions.len()).expect("len").to_be_bytes());
    body.extend_from_slice(&extensions);
    let body_len = u32::try_from(body.len()).expect("len").to_be_bytes();
    let mut handshake = vec![0x01, body_len[1], body_len[2], body_len[3]];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(handshake.len()).expect("len").to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Certificate files written to a directory.
pub struct Files {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn write_cert(dir: &Path, name: &str, issued: &Issued) -> Files {
    Files {
        cert: super::write_file(dir, &format!("{name}.pem"), &issued.cert_pem),
        key: super::write_file(dir, &format!("{name}.key"), &issued.key_pem),
    }
}

/// A manual-mode config: `entries` are (hosts, files), `sites` (host, upstream).
pub fn manual_config(
    entries: &[(&[&str], &Files)],
    sites: &[(&str, String)],
    server_extra: &str,
) -> String {
    let mut toml = format!(
        "[server]\nbind_addr = \"127.0.0.1:0\"\nlog_level = \"info\"\n{server_extra}\n\n[server.tls]\nmode = \"manual\"\n\n"
    );
    for (hosts, files) in entries {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
        toml.push_str(&format!(
            "[[server.tls.certs]]\nhosts = [{}]\ncert = {:?}\nkey = {:?}\n\n",
            hosts.join(", "),
            files.cert.display().to_string(),
            files.key.display().to_string(),
        ));
    }
    for (host, upstream) in sites {
        toml.push_str(&format!(
            "[[sites]]\nhost = \"{host}\"\nupstream = \"{upstream}\"\n\n"
        ));
    }
    toml
}

//! Configuration: the TOML file parsed once into validated types.
//!
//! The file is split along what a reload can change. [`StaticConfig`] holds
//! what needs a restart (sockets, TLS, logging); [`DynamicConfig`] holds what a
//! SIGHUP swaps in (sites, proxy behaviour, rate limits). Validation happens
//! completely before either is used, so a bad file never half-applies.

mod error;
mod raw;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::Authority;
use ipnet::IpNet;

pub use error::{ConfigError, FieldError};
pub use validate::{check_dns_name, host_matches, parse_cidr};

/// A whole configuration file, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: StaticConfig,
    pub dynamic: DynamicConfig,
    /// Problems that do not stop the proxy but deserve an operator's eye.
    pub warnings: Vec<FieldError>,
}

/// Settings that are read once at start; changing them needs a restart.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticConfig {
    pub bind_addr: SocketAddr,
    pub http_bind_addr: Option<SocketAddr>,
    pub log_level: String,
    pub access_log: Option<PathBuf>,
    pub access_log_format: AccessLogFormat,
    pub worker_threads: Option<NonZeroUsize>,
    pub shutdown_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub body_read_timeout: Duration,
    pub tls: TlsConfig,
    pub admin: Option<AdminConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// `key=value` lines with a leading tag; what the fail2ban filter reads.
    Kv,
    /// One JSON object per line, for Loki and similar pipelines.
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TlsConfig {
    /// Plain HTTP on `bind_addr`: for tests and for running behind a TLS edge.
    Off,
    Acme(AcmeConfig),
    Manual(Vec<CertFiles>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// Sorted and de-duplicated, so that reordering the file does not change
    /// the certificate (rustls-acme keys its cache by the domain order).
    pub domains: Vec<String>,
    pub contact: Vec<String>,
    pub cache_dir: PathBuf,
    pub directory: AcmeDirectory,
    pub ca_root: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcmeDirectory {
    LetsEncrypt,
    LetsEncryptStaging,
    Url(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// Lower-cased names; `*.example.org` matches exactly one label.
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind_addr: SocketAddr,
}

/// Settings a reload can change without dropping a connection.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicConfig {
    /// Keyed by the lower-cased host name.
    pub sites: HashMap<String, Site>,
    pub proxy: ProxySettings,
    pub rate_limit: RateLimitSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub host: String,
    pub upstream: Upstream,
}

/// Where a site's requests go: an `http://host:port` origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub authority: Authority,
}

impl Upstream {
    /// `host:port` to connect to: the URL's port, or 80 for http.
    pub fn connect_target(&self) -> String {
        match self.authority.port_u16() {
            Some(_) => self.authority.as_str().to_owned(),
            None => format!("{}:80", self.authority.as_str()),
        }
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.authority.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub requests_per_second: u32,
    pub burst: u32,
    pub ipv6_prefix_len: u8,
    pub eviction_interval: Duration,
    pub eviction_age: Duration,
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        validate::validate(raw)
    }
}

impl DynamicConfig {
    /// The site for a request's host, which must already be lower-case and
    /// without a port.
    pub fn site(&self, host: &str) -> Option<&Site> {
        self.sites.get(host)
    }
}

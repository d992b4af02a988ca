//! The configuration file exactly as written: serde types that mirror the
//! TOML, with no meaning attached yet. Numbers are read as `i64` so that a
//! negative or zero value reaches validation and gets a message naming its
//! field, instead of a type error from the parser.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub sites: Vec<RawSite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub bind_addr: Option<String>,
    pub http_bind_addr: Option<String>,
    pub log_level: Option<String>,
    pub access_log: Option<String>,
    pub access_log_format: Option<String>,
    pub worker_threads: Option<i64>,
    pub shutdown_timeout_secs: Option<i64>,
    pub header_read_timeout_secs: Option<i64>,
    pub idle_timeout_secs: Option<i64>,
    pub max_header_bytes: Option<i64>,
    pub max_connections: Option<i64>,
    pub body_read_timeout_secs: Option<i64>,
    pub tls: RawTls,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub mode: String,
    pub acme_domains: Option<Vec<String>>,
    pub acme_contact: Option<Vec<String>>,
    pub acme_cache_dir: Option<String>,
    pub acme_directory: Option<String>,
    pub acme_ca_root: Option<String>,
    pub certs: Option<Vec<RawCert>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub hosts: Vec<String>,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind_addr: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    pub connect_timeout_secs: Option<i64>,
    pub response_timeout_secs: Option<i64>,
    pub trusted_proxies: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub enabled: Option<bool>,
    pub requests_per_second: Option<i64>,
    pub burst: Option<i64>,
    pub ipv6_prefix_len: Option<i64>,
    pub eviction_interval_secs: Option<i64>,
    pub eviction_age_secs: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSite {
    pub host: String,
    pub upstream: String,
}

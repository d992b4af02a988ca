//! Turns the raw file into validated types, collecting every problem with
//! the path of the field it concerns.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http::Uri;
use http::uri::Authority;
use ipnet::IpNet;

use super::raw::{RawConfig, RawProxy, RawRateLimit, RawServer, RawSite, RawTls};
use super::{
    AccessLogFormat, AcmeConfig, AcmeDirectory, AdminConfig, CertFiles, Config, ConfigError,
    DynamicConfig, FieldError, ProxySettings, RateLimitSettings, Site, StaticConfig, TlsConfig,
    Upstream,
};
use crate::tls::certs::{self, Concern};

const DEFAULT_ACME_CACHE_DIR: &str = "/var/lib/reverse-proxy/acme-cache";

pub(super) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut v = Validator::default();
    let sites = v.sites(&raw.sites);
    let server = v.server(raw.server, &sites);
    let admin = raw.admin.and_then(|a| {
        v.socket_addr("admin.bind_addr", &a.bind_addr)
            .map(|bind_addr| AdminConfig { bind_addr })
    });
    let proxy = v.proxy(&raw.proxy);
    let rate_limit = v.rate_limit(&raw.rate_limit);
    if !v.errors.is_empty() {
        return Err(ConfigError::Invalid(v.errors));
    }
    match (server, proxy, rate_limit) {
        (Some(mut server), Some(proxy), Some(rate_limit)) => {
            server.admin = admin;
            Ok(Config {
                server,
                dynamic: DynamicConfig {
                    sites,
                    proxy,
                    rate_limit,
                },
                warnings: v.warnings,
            })
        }
        // Every `None` above pushed an error, so this is unreachable in
        // practice; report it rather than panic all the same.
        _ => Err(ConfigError::Invalid(vec![FieldError {
            field: "config".into(),
            message: "invalid".into(),
        }])),
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
}

impl Validator {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// An integer field with a default and an inclusive range.
    fn int(&mut self, field: &str, value: Option<i64>, default: i64, min: i64, max: i64) -> i64 {
        match value {
            None => default,
            Some(n) if (min..=max).contains(&n) => n,
            Some(n) => {
                self.error(field, format!("must be between {min} and {max}, got {n}"));
                default
            }
        }
    }

    fn secs(
        &mut self,
        field: &str,
        value: Option<i64>,
        default: u64,
        min: u64,
        max: u64,
    ) -> Duration {
        #[allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)]
        let n = self.int(field, value, default as i64, min as i64, max as i64) as u64;
        Duration::from_secs(n)
    }

    fn socket_addr(&mut self, field: &str, value: &str) -> Option<SocketAddr> {
        match SocketAddr::from_str(value) {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    field,
                    format!(
                        "not a socket address: {value:?} (expected e.g. \"[::]:443\" or \"127.0.0.1:8080\")"
                    ),
                );
                None
            }
        }
    }

    fn server(&mut self, raw: RawServer, sites: &HashMap<String, Site>) -> Option<StaticConfig> {
        let bind_addr = self.socket_addr(
            "server.bind_addr",
            raw.bind_addr.as_deref().unwrap_or("[::]:443"),
        );
        let http_bind_addr = match &raw.http_bind_addr {
            Some(a) => Some(self.socket_addr("server.http_bind_addr", a)?),
            None => None,
        };
        let log_level = raw.log_level.unwrap_or_else(|| "info".to_owned());
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&log_level) {
            self.error(
                "server.log_level",
                format!("not a level or tracing filter: {log_level:?} ({e})"),
            );
        }
        let access_log_format = match raw.access_log_format.as_deref() {
            None | Some("kv") => AccessLogFormat::Kv,
            Some("json") => AccessLogFormat::Json,
            Some(other) => {
                self.error(
                    "server.access_log_format",
                    format!("must be \"kv\" or \"json\", got {other:?}"),
                );
                AccessLogFormat::Kv
            }
        };
        let access_log = raw.access_log.map(PathBuf::from);
        if access_log
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            self.error(
                "server.access_log",
                "must not be empty (omit it to log to stdout only)",
            );
        }
        let worker_threads = raw.worker_threads.map(|_| {
            let n = self.int("server.worker_threads", raw.worker_threads, 1, 1, 1024);
            NonZeroUsize::new(usize::try_from(n).unwrap_or(1)).unwrap_or(NonZeroUsize::MIN)
        });
        let shutdown_timeout = self.secs(
            "server.shutdown_timeout_secs",
            raw.shutdown_timeout_secs,
            30,
            0,
            3600,
        );
        let header_read_timeout = self.secs(
            "server.header_read_timeout_secs",
            raw.header_read_timeout_secs,
            10,
            1,
            3600,
        );
        let idle_timeout = self.secs(
            "server.idle_timeout_secs",
            raw.idle_timeout_secs,
            60,
            1,
            3600,
        );
        let body_read_timeout = self.secs(
            "server.body_read_timeout_secs",
            raw.body_read_timeout_secs,
            60,
            1,
            3600,
        );
        // hyper needs at least 8 KiB of read buffer.
        let max_header_bytes = self.int(
            "server.max_header_bytes",
            raw.max_header_bytes,
            65536,
            8192,
            1 << 20,
        );
        let max_connections = self.int(
            "server.max_connections",
            raw.max_connections,
            10_000,
            1,
            1_000_000,
        );
        let tls = self.tls(raw.tls, sites);
        Some(StaticConfig {
            bind_addr: bind_addr?,
            http_bind_addr,
            log_level,
            access_log,
            access_log_format,
            worker_threads,
            shutdown_timeout,
            header_read_timeout,
            idle_timeout,
            max_header_bytes: usize::try_from(max_header_bytes).ok()?,
            max_connections: usize::try_from(max_connections).ok()?,
            body_read_timeout,
            tls: tls?,
            admin: None,
        })
    }

    fn tls(&mut self, raw: RawTls, sites: &HashMap<String, Site>) -> Option<TlsConfig> {
        let acme_fields = [
            ("acme_domains", raw.acme_domains.is_some()),
            ("acme_contact", raw.acme_contact.is_some()),
            ("acme_cache_dir", raw.acme_cache_dir.is_some()),
            ("acme_directory", raw.acme_directory.is_some()),
            ("acme_ca_root", raw.acme_ca_root.is_some()),
        ];
        let misplaced = |v: &mut Self, fields: &[(&str, bool)], mode: &str| {
            for (name, present) in fields {
                if *present {
                    v.error(
                        format!("server.tls.{name}"),
                        format!("only used when mode = \"{mode}\""),
                    );
                }
            }
        };
        match raw.mode.as_str() {
            "off" => {
                misplaced(self, &acme_fields, "acme");
                misplaced(self, &[("certs", raw.certs.is_some())], "manual");
                Some(TlsConfig::Off)
            }
            "acme" => {
                misplaced(self, &[("certs", raw.certs.is_some())], "manual");
                self.acme(raw, sites).map(TlsConfig::Acme)
            }
            "manual" => {
                misplaced(self, &acme_fields, "acme");
                self.manual(raw.certs.unwrap_or_default(), sites)
                    .map(TlsConfig::Manual)
            }
            other => {
                self.error(
                    "server.tls.mode",
                    format!("must be \"acme\", \"manual\" or \"off\", got {other:?}"),
                );
                None
            }
        }
    }

    fn acme(&mut self, raw: RawTls, sites: &HashMap<String, Site>) -> Option<AcmeConfig> {
        let mut domains = Vec::new();
        for (i, d) in raw.acme_domains.unwrap_or_default().iter().enumerate() {
            let field = format!("server.tls.acme_domains[{i}]");
            let Some(name) = self.host_name(&field, d, false) else {
                continue;
            };
            if !sites.contains_key(&name) {
                self.error(&field, format!("{name:?} has no [[sites]] entry"));
            }
            domains.push(name);
        }
        domains.sort();
        domains.dedup();
        if domains.is_empty() {
            self.error(
                "server.tls.acme_domains",
                "mode = \"acme\" needs at least one domain",
            );
        }
        let mut uncovered: Vec<&str> = sites
            .keys()
            .filter(|h| domains.binary_search(h).is_err())
            .map(String::as_str)
            .collect();
        uncovered.sort_unstable();
        for host in uncovered {
            self.error(
                "server.tls.acme_domains",
                format!("site host {host:?} is not in the certificate; add it here"),
            );
        }
        let contact = raw.acme_contact.unwrap_or_default();
        for (i, c) in contact.iter().enumerate() {
            if !c.starts_with("mailto:") || c.len() <= "mailto:".len() {
                self.error(
                    format!("server.tls.acme_contact[{i}]"),
                    format!("must be a \"mailto:\" address, got {c:?}"),
                );
            }
        }
        let directory = match raw.acme_directory.as_deref() {
            None | Some("letsencrypt") => AcmeDirectory::LetsEncrypt,
            Some("letsencrypt-staging") => AcmeDirectory::LetsEncryptStaging,
            Some(url) if url.starts_with("https://") && url.parse::<Uri>().is_ok() => {
                AcmeDirectory::Url(url.to_owned())
            }
            Some(other) => {
                self.error(
                    "server.tls.acme_directory",
                    format!(
                        "must be \"letsencrypt\", \"letsencrypt-staging\" or an https:// URL, got {other:?}"
                    ),
                );
                AcmeDirectory::LetsEncrypt
            }
        };
        let cache_dir = PathBuf::from(
            raw.acme_cache_dir
                .as_deref()
                .unwrap_or(DEFAULT_ACME_CACHE_DIR),
        );
        if cache_dir.as_os_str().is_empty() {
            self.error("server.tls.acme_cache_dir", "must not be empty");
        }
        let ca_root = raw.acme_ca_root.map(PathBuf::from);
        if let Some(path) = &ca_root
            && !path.is_file()
        {
            self.error(
                "server.tls.acme_ca_root",
                format!("file {} does not exist", path.display()),
            );
        }
        Some(AcmeConfig {
            domains,
            contact,
            cache_dir,
            directory,
            ca_root,
        })
    }

    fn manual(
        &mut self,
        raw: Vec<super::raw::RawCert>,
        sites: &HashMap<String, Site>,
    ) -> Option<Vec<CertFiles>> {
        if raw.is_empty() {
            self.error(
                "server.tls.certs",
                "mode = \"manual\" needs at least one [[server.tls.certs]] entry",
            );
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut certs = Vec::new();
        for (i, c) in raw.into_iter().enumerate() {
            let mut hosts = Vec::new();
            if c.hosts.is_empty() {
                self.error(format!("server.tls.certs[{i}].hosts"), "must not be empty");
            }
            for (j, h) in c.hosts.iter().enumerate() {
                let field = format!("server.tls.certs[{i}].hosts[{j}]");
                let Some(name) = self.host_name(&field, h, true) else {
                    continue;
                };
                if let Some(prev) = seen.insert(name.clone(), i) {
                    self.error(
                        &field,
                        format!("{name:?} is already served by server.tls.certs[{prev}]"),
                    );
                }
                hosts.push(name);
            }
            let mut files_exist = true;
            for (name, path) in [("cert", &c.cert), ("key", &c.key)] {
                if !PathBuf::from(path).is_file() {
                    files_exist = false;
                    self.error(
                        format!("server.tls.certs[{i}].{name}"),
                        format!("file {path} does not exist"),
                    );
                }
            }
            let files = CertFiles {
                hosts,
                cert: c.cert.into(),
                key: c.key.into(),
            };
            if files_exist {
                self.cert_files(i, &files);
            }
            certs.push(files);
        }
        let mut uncovered: Vec<&String> = sites
            .keys()
            .filter(|site| {
                !certs
                    .iter()
                    .any(|c| c.hosts.iter().any(|h| host_matches(h, site)))
            })
            .collect();
        uncovered.sort_unstable();
        for host in uncovered {
            self.warn(
                "server.tls.certs",
                format!(
                    "no certificate entry covers site host {host:?}; its TLS handshakes will fail"
                ),
            );
        }
        Some(certs)
    }

    /// Parses a manual certificate entry's files: they must parse, the key
    /// must match, and the certificate must not have expired.
    fn cert_files(&mut self, i: usize, files: &CertFiles) {
        match certs::load(files) {
            Ok(loaded) => {
                for concern in certs::concerns(&loaded.leaf, &files.hosts, certs::now_unix()) {
                    let message = concern.to_string();
                    match concern {
                        Concern::Expired { .. } => {
                            self.error(format!("server.tls.certs[{i}].cert"), message);
                        }
                        Concern::ExpiresSoon { .. } => {
                            self.warn(format!("server.tls.certs[{i}].cert"), message);
                        }
                        Concern::Uncovered { .. } => {
                            self.warn(format!("server.tls.certs[{i}].hosts"), message);
                        }
                    }
                }
            }
            Err(e) => self.error(
                format!("server.tls.certs[{i}].{}", e.part().field()),
                e.to_string(),
            ),
        }
    }

    /// A DNS host name, lower-cased. `wildcard` allows a leading `*.` label.
    fn host_name(&mut self, field: &str, value: &str, wildcard: bool) -> Option<String> {
        let name = value.to_ascii_lowercase();
        let bare = if wildcard {
            name.strip_prefix("*.").unwrap_or(&name)
        } else {
            &name
        };
        match check_dns_name(bare) {
            Ok(()) => Some(name),
            Err(why) => {
                self.error(field, format!("{value:?} is not a valid host name: {why}"));
                None
            }
        }
    }

    fn sites(&mut self, raw: &[RawSite]) -> HashMap<String, Site> {
        if raw.is_empty() {
            self.error("sites", "at least one [[sites]] entry is required");
        }
        let mut sites = HashMap::new();
        let mut index_of: HashMap<String, usize> = HashMap::new();
        for (i, s) in raw.iter().enumerate() {
            let host = self.host_name(&format!("sites[{i}].host"), &s.host, false);
            let upstream = self.upstream(&format!("sites[{i}].upstream"), &s.upstream);
            let Some(host) = host else { continue };
            if let Some(first) = index_of.get(&host) {
                self.error(
                    format!("sites[{i}].host"),
                    format!(
                        "duplicate of sites[{first}].host {host:?} (hosts are case-insensitive)"
                    ),
                );
                continue;
            }
            index_of.insert(host.clone(), i);
            if let Some(upstream) = upstream {
                sites.insert(host.clone(), Site { host, upstream });
            }
        }
        sites
    }

    fn upstream(&mut self, field: &str, value: &str) -> Option<Upstream> {
        let uri = match value.parse::<Uri>() {
            Ok(uri) => uri,
            Err(e) => {
                self.error(field, format!("not a URL: {value:?} ({e})"));
                return None;
            }
        };
        let problem = match (uri.scheme_str(), uri.authority()) {
            (Some("http"), Some(a)) if a.as_str().contains('@') => {
                Some("must not contain user information".to_owned())
            }
            (Some("http"), Some(a)) if a.host().is_empty() => Some("has no host".to_owned()),
            (Some("http"), Some(a)) if !is_upstream_authority(a) => Some(format!(
                "{:?} is not a host name or IP address (letters, digits, '-', '_' and '.') \
                 with an optional port number",
                a.as_str()
            )),
            (Some("http"), Some(_)) if !matches!(uri.path(), "" | "/") || uri.query().is_some() => {
                Some(
                    "must be an origin like \"http://127.0.0.1:3000\" (no path or query)"
                        .to_owned(),
                )
            }
            (Some("http"), Some(_)) => None,
            (Some(other), _) => Some(format!("scheme must be http, got {other:?}")),
            (None, _) => Some(format!(
                "must be an http:// URL like \"http://127.0.0.1:3000\", got {value:?}"
            )),
        };
        if let Some(problem) = problem {
            self.error(field, problem);
            return None;
        }
        let authority = uri.authority()?.clone();
        Some(Upstream { authority })
    }

    fn proxy(&mut self, raw: &RawProxy) -> Option<ProxySettings> {
        let connect_timeout = self.secs(
            "proxy.connect_timeout_secs",
            raw.connect_timeout_secs,
            5,
            1,
            300,
        );
        let response_timeout = self.secs(
            "proxy.response_timeout_secs",
            raw.response_timeout_secs,
            60,
            1,
            3600,
        );
        let mut trusted_proxies = Vec::new();
        for (i, entry) in raw.trusted_proxies.iter().flatten().enumerate() {
            match parse_cidr(entry) {
                Some(net) => trusted_proxies.push(net),
                None => self.error(
                    format!("proxy.trusted_proxies[{i}]"),
                    format!("not an IP address or CIDR: {entry:?} (expected e.g. \"10.0.0.0/8\")"),
                ),
            }
        }
        Some(ProxySettings {
            connect_timeout,
            response_timeout,
            trusted_proxies,
        })
    }

    fn rate_limit(&mut self, raw: &RawRateLimit) -> Option<RateLimitSettings> {
        let rps = self.int(
            "rate_limit.requests_per_second",
            raw.requests_per_second,
            10,
            1,
            1_000_000,
        );
        let burst = self.int("rate_limit.burst", raw.burst, 20, 1, 1_000_000);
        let prefix = self.int(
            "rate_limit.ipv6_prefix_len",
            raw.ipv6_prefix_len,
            64,
            1,
            128,
        );
        let eviction_interval = self.secs(
            "rate_limit.eviction_interval_secs",
            raw.eviction_interval_secs,
            60,
            1,
            86_400,
        );
        let eviction_age = self.secs(
            "rate_limit.eviction_age_secs",
            raw.eviction_age_secs,
            300,
            1,
            86_400,
        );
        Some(RateLimitSettings {
            enabled: raw.enabled.unwrap_or(true),
            requests_per_second: u32::try_from(rps).ok()?,
            burst: u32::try_from(burst).ok()?,
            ipv6_prefix_len: u8::try_from(prefix).ok()?,
            eviction_interval,
            eviction_age,
        })
    }
}

/// A CIDR (`10.0.0.0/8`) or a bare address, which means just that address.
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let s = s.trim();
    IpNet::from_str(s)
        .ok()
        .map(|n| n.trunc())
        .or_else(|| IpAddr::from_str(s).ok().map(IpNet::from))
}

/// Whether a certificate name (possibly `*.example.org`) covers a host.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == host,
    }
}

/// An upstream's authority: a host that is a name of letters, digits, `-`,
/// `_` and `.` (looser than [`check_dns_name`]: container and service
/// names carry `_`), an IPv4 address or an IPv6 one in brackets, and then
/// nothing or a port number. Access lines write it as it is, which is
/// safe only because nothing else gets through.
fn is_upstream_authority(authority: &Authority) -> bool {
    let host = authority.host();
    let host_ok = match host.strip_prefix('[') {
        Some(inner) => inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
    };
    host_ok && (authority.as_str() == host || authority.port_u16().is_some())
}

/// Checks a lower-cased DNS name (RFC 1123 labels). Every request's host is
/// checked here too, hence bytes rather than `str` searching.
pub fn check_dns_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty");
    }
    if name.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in name.as_bytes().split(|&b| b == b'.') {
        if label.is_empty() {
            return Err("empty label");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if !label
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only letters, digits, '-' and '.' are allowed (no port, scheme or path)");
        }
        if label.starts_with(b"-") || label.ends_with(b"-") {
            return Err("a label must not start or end with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matches_one_label() {
        assert!(host_matches("*.example.org", "git.example.org"));
        assert!(!host_matches("*.example.org", "example.org"));
        assert!(!host_matches("*.example.org", "a.b.example.org"));
        assert!(host_matches("example.org", "example.org"));
    }

    #[test]
    fn cidr_accepts_bare_addresses() {
        assert_eq!(parse_cidr("10.1.2.3/8"), IpNet::from_str("10.0.0.0/8").ok());
        assert_eq!(parse_cidr("::1"), IpNet::from_str("::1/128").ok());
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("example"), None);
    }

    #[test]
    fn dns_names() {
        assert!(check_dns_name("git.example.org").is_ok());
        assert!(check_dns_name("localhost").is_ok());
        assert!(check_dns_name("example.org:443").is_err());
        assert!(check_dns_name("-a.org").is_err());
        assert!(check_dns_name("a..org").is_err());
    }
}

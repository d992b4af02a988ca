//! Reload as a transaction: read, validate completely, build the new
//! snapshot, swap. Any failure leaves the running configuration untouched.
//!
//! Everything that can fail happens in [`prepare`], off the async runtime
//! (it reads files); [`commit`] cannot fail and only swaps. Whatever else a
//! reload has to rebuild from files (such as a certificate resolver for
//! manual TLS) belongs in `prepare`, so that one bad file rejects the whole
//! reload instead of applying half of it.

use std::path::Path;

use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, DynamicConfig, StaticConfig, TlsConfig};
use crate::state::AppState;
use crate::tls::manual::{ManualError, Resolver};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{}", .0.lines().join("; "))]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Certificates(#[from] ManualError),
    #[error("the reload task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Reloads the dynamic part of the configuration at `path` into `state`,
/// logging the outcome. With manual TLS, `certificates` is the running
/// resolver: its certificate files are read again too. Returns the new
/// number of sites.
pub async fn reload(
    state: &AppState,
    path: &Path,
    running: &StaticConfig,
    certificates: Option<&Resolver>,
) -> Result<usize, ReloadError> {
    let path = path.to_owned();
    let resolver = certificates.cloned();
    let prepared = tokio::task::spawn_blocking(move || prepare(&path, resolver.as_ref()))
        .await
        .map_err(ReloadError::from)
        .and_then(|config| config);
    match prepared {
        Ok(config) => Ok(commit(state, running, config)),
        Err(e) => {
            error!(
                status = "error",
                error = e.to_string().as_str(),
                "CONFIG_RELOAD"
            );
            if let Some(metrics) = state.metrics() {
                metrics.reload_failed();
            }
            Err(e)
        }
    }
}

/// Reads and validates the file completely, then loads the manual-mode
/// certificates it names. Nothing is changed unless all of that worked;
/// the certificates are the only part swapped here (all of them or none).
pub fn prepare(path: &Path, certificates: Option<&Resolver>) -> Result<Config, ReloadError> {
    let config = Config::load(path)?;
    if let (Some(resolver), TlsConfig::Manual(entries)) = (certificates, &config.server.tls) {
        let loaded = resolver.reload(entries)?;
        info!(certificates = loaded, "TLS_RELOAD");
    }
    Ok(config)
}

/// Makes a prepared configuration the one new requests see, and says what
/// changed. Returns the new number of sites.
pub fn commit(state: &AppState, running: &StaticConfig, config: Config) -> usize {
    for w in &config.warnings {
        warn!(
            field = w.field.as_str(),
            problem = w.message.as_str(),
            "CONFIG_WARNING"
        );
    }
    let sites = config.dynamic.sites.len();
    let changes = dynamic_changes(&state.snapshot().config, &config.dynamic);
    state.replace(config.dynamic);
    if let Some(metrics) = state.metrics() {
        metrics.reload_succeeded();
    }
    info!(status = "success", sites, "CONFIG_RELOAD");
    info!(
        added = list(&changes.added).as_str(),
        removed = list(&changes.removed).as_str(),
        changed = list(&changes.changed).as_str(),
        proxy = changed(changes.proxy),
        rate_limit = changed(changes.rate_limit),
        "CONFIG_CHANGES"
    );
    let restart_needed = static_changes(running, &config.server);
    if !restart_needed.is_empty() {
        warn!(
            fields = restart_needed.join(",").as_str(),
            detail = "these settings need a restart to take effect; everything else was applied",
            "RESTART_NEEDED"
        );
    }
    sites
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub proxy: bool,
    pub rate_limit: bool,
}

pub fn dynamic_changes(old: &DynamicConfig, new: &DynamicConfig) -> Changes {
    let mut c = Changes::default();
    for (host, site) in &new.sites {
        match old.sites.get(host) {
            None => c.added.push(host.clone()),
            Some(prev) if prev != site => c.changed.push(host.clone()),
            Some(_) => {}
        }
    }
    c.removed = old
        .sites
        .keys()
        .filter(|h| !new.sites.contains_key(*h))
        .cloned()
        .collect();
    c.added.sort();
    c.removed.sort();
    c.changed.sort();
    c.proxy = old.proxy != new.proxy;
    c.rate_limit = old.rate_limit != new.rate_limit;
    c
}

/// The static fields that differ, by their names in the file.
pub fn static_changes(old: &StaticConfig, new: &StaticConfig) -> Vec<&'static str> {
    let checks = [
        ("server.bind_addr", old.bind_addr == new.bind_addr),
        (
            "server.http_bind_addr",
            old.http_bind_addr == new.http_bind_addr,
        ),
        ("server.log_level", old.log_level == new.log_level),
        ("server.access_log", old.access_log == new.access_log),
        (
            "server.access_log_format",
            old.access_log_format == new.access_log_format,
        ),
        (
            "server.worker_threads",
            old.worker_threads == new.worker_threads,
        ),
        (
            "server.shutdown_timeout_secs",
            old.shutdown_timeout == new.shutdown_timeout,
        ),
        (
            "server.header_read_timeout_secs",
            old.header_read_timeout == new.header_read_timeout,
        ),
        (
            "server.idle_timeout_secs",
            old.idle_timeout == new.idle_timeout,
        ),
        (
            "server.max_header_bytes",
            old.max_header_bytes == new.max_header_bytes,
        ),
        (
            "server.max_connections",
            old.max_connections == new.max_connections,
        ),
        (
            "server.body_read_timeout_secs",
            old.body_read_timeout == new.body_read_timeout,
        ),
        // Manual certificates are read again on reload; switching modes
        // or changing ACME settings needs a restart.
        ("server.tls", same_tls_setup(&old.tls, &new.tls)),
        ("admin", old.admin == new.admin),
    ];
    checks
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect()
}

fn same_tls_setup(old: &TlsConfig, new: &TlsConfig) -> bool {
    matches!((old, new), (TlsConfig::Manual(_), TlsConfig::Manual(_))) || old == new
}

fn list(hosts: &[String]) -> String {
    if hosts.is_empty() {
        "-".to_owned()
    } else {
        hosts.join(",")
    }
}

fn changed(flag: bool) -> &'static str {
    if flag { "changed" } else { "unchanged" }
}

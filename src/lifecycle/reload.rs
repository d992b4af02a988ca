//! Reload as a transaction: read, validate completely, build the new
//! snapshot, swap. Any failure leaves the running configuration untouched.

use std::path::Path;

use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, DynamicConfig, StaticConfig};
use crate::state::AppState;

/// Reloads the dynamic part of the configuration at `path` into `state`.
/// Returns the new number of sites.
pub fn reload(state: &AppState, path: &Path, running: &StaticConfig) -> Result<usize, ConfigError> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            let error = e.lines().join("; ");
            error!(status = "error", error = error.as_str(), "CONFIG_RELOAD");
            return Err(e);
        }
    };
    for w in &config.warnings {
        warn!(field = w.field.as_str(), problem = w.message.as_str(), "CONFIG_WARNING");
    }
    let restart_needed = static_changes(running, &config.server);
    if !restart_needed.is_empty() {
        warn!(
            fields = restart_needed.join(",").as_str(),
            "RESTART_NEEDED static settings changed; they take effect after a restart, the rest was applied"
        );
    }
    let sites = config.dynamic.sites.len();
    let changes = dynamic_changes(&state.snapshot().config, &config.dynamic);
    state.replace(config.dynamic);
    info!(status = "success", sites, "CONFIG_RELOAD");
    info!(
        added = list(&changes.added).as_str(),
        removed = list(&changes.removed).as_str(),
        changed = list(&changes.changed).as_str(),
        proxy = changed(changes.proxy),
        rate_limit = changed(changes.rate_limit),
        "CONFIG_CHANGES"
    );
    Ok(sites)
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
        ("server.http_bind_addr", old.http_bind_addr == new.http_bind_addr),
        ("server.log_level", old.log_level == new.log_level),
        ("server.access_log", old.access_log == new.access_log),
        ("server.access_log_format", old.access_log_format == new.access_log_format),
        ("server.worker_threads", old.worker_threads == new.worker_threads),
        ("server.shutdown_timeout_secs", old.shutdown_timeout == new.shutdown_timeout),
        ("server.header_read_timeout_secs", old.header_read_timeout == new.header_read_timeout),
        ("server.idle_timeout_secs", old.idle_timeout == new.idle_timeout),
        ("server.max_header_bytes", old.max_header_bytes == new.max_header_bytes),
        ("server.max_connections", old.max_connections == new.max_connections),
        ("server.body_read_timeout_secs", old.body_read_timeout == new.body_read_timeout),
        ("server.tls", old.tls == new.tls),
        ("admin", old.admin == new.admin),
    ];
    checks
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect()
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

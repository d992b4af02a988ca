//! Manual mode: certificate files chosen by SNI.
//!
//! Each `[[server.tls.certs]]` entry becomes one serving configuration. A
//! name is looked up exactly first, then as a `*.` wildcard one label up.
//! The table sits behind an `ArcSwap`, so [`Resolver::reload`] can replace
//! every certificate at once (e.g. on SIGHUP after a renewal) while
//! handshakes in progress finish with the configuration they started with.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::certs::{self, CertError};
use super::{CertSource, CertificateInfo, Certificates, serving_config};
use crate::config::CertFiles;

#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error("server.tls.certs[{index}].{}: {source}", source.part().field())]
    Cert { index: usize, source: CertError },
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Finds the serving configuration for an SNI name.
#[derive(Clone)]
pub struct Resolver {
    table: Arc<ArcSwap<Table>>,
    certificates: Certificates,
}

#[derive(Default)]
struct Table {
    /// Exact names.
    exact: HashMap<String, Arc<ServerConfig>>,
    /// `*.example.org` entries, keyed by `example.org`.
    wildcard: HashMap<String, Arc<ServerConfig>>,
}

impl Resolver {
    /// Loads every entry; fails on the first that cannot be served.
    pub fn load(entries: &[CertFiles], certificates: Certificates) -> Result<Self, ManualError> {
        let (table, infos) = build(entries)?;
        certificates.replace(infos);
        Ok(Self {
            table: Arc::new(ArcSwap::from_pointee(table)),
            certificates,
        })
    }

    /// Reads the files again and swaps them in, all or nothing: on error the
    /// certificates already served stay. Returns the number of entries.
    pub fn reload(&self, entries: &[CertFiles]) -> Result<usize, ManualError> {
        let (table, infos) = build(entries)?;
        self.table.store(Arc::new(table));
        self.certificates.replace(infos);
        Ok(entries.len())
    }

    /// The configuration for a lower-cased SNI name, if any entry covers it.
    pub fn lookup(&self, name: &str) -> Option<Arc<ServerConfig>> {
        let table = self.table.load();
        if let Some(config) = table.exact.get(name) {
            return Some(Arc::clone(config));
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        table.wildcard.get(parent).cloned()
    }
}

fn build(entries: &[CertFiles]) -> Result<(Table, Vec<CertificateInfo>), ManualError> {
    let mut table = Table::default();
    let mut infos = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let loaded = certs::load(entry).map_err(|source| ManualError::Cert { index, source })?;
        let config = Arc::new(serving_config(Arc::new(Fixed(loaded.key)))?);
        for host in &entry.hosts {
            match host.strip_prefix("*.") {
                Some(parent) => table
                    .wildcard
                    .insert(parent.to_owned(), Arc::clone(&config)),
                None => table.exact.insert(host.clone(), Arc::clone(&config)),
            };
        }
        infos.push(CertificateInfo {
            name: entry.hosts.join(","),
            hosts: entry.hosts.clone(),
            source: CertSource::Manual,
            not_after_unix: loaded.leaf.not_after_unix,
        });
    }
    Ok((table, infos))
}

/// Always the one certificate: the SNI was matched before this
/// configuration was chosen.
struct Fixed(Arc<CertifiedKey>);

impl fmt::Debug for Fixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Fixed")
    }
}

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

//! Certificate files: reading a PEM chain and key, and what the leaf
//! certificate says about itself (names, validity). Shared by manual mode
//! (loading and `--validate`) and by ACME mode (the notAfter of what it
//! deployed), so both report the same facts the same way.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

use crate::config::{CertFiles, host_matches};

/// Which of an entry's two files a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Cert,
    Key,
}

impl Part {
    /// The field name in `[[server.tls.certs]]`.
    pub fn field(self) -> &'static str {
        match self {
            Self::Cert => "cert",
            Self::Key => "key",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        part: Part,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM \"CERTIFICATE\" block", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key", path.display())]
    NoKey { path: PathBuf },
    #[error("{} is not valid PEM: {reason}", path.display())]
    Pem {
        part: Part,
        path: PathBuf,
        reason: String,
    },
    #[error("the first certificate in {} does not parse: {reason}", path.display())]
    Certificate { path: PathBuf, reason: String },
    #[error("the key in {} is not usable: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
    #[error("the key in {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
}

impl CertError {
    /// The file the problem is in, for error messages that name a field.
    pub fn part(&self) -> Part {
        match self {
            Self::Read { part, .. } | Self::Pem { part, .. } => *part,
            Self::NoCertificate { .. } | Self::Certificate { .. } => Part::Cert,
            Self::NoKey { .. } | Self::Key { .. } | Self::KeyMismatch { .. } => Part::Key,
        }
    }
}

/// Validity and names of a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    /// DNS names from the subjectAltName extension, lower-cased.
    pub names: Vec<String>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl Leaf {
    /// Parses a DER certificate.
    pub fn parse(der: &[u8]) -> Result<Self, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(format!("subjectAltName: {e}")),
        };
        let validity = cert.validity();
        Ok(Self {
            names,
            not_before_unix: validity.not_before.timestamp(),
            not_after_unix: validity.not_after.timestamp(),
        })
    }

    /// The first certificate of a PEM bundle (ACME's cache holds the key
    /// first, then the chain; other sections are skipped).
    pub fn from_pem(pem: &[u8]) -> Option<Self> {
        let der = CertificateDer::pem_slice_iter(pem).next()?.ok()?;
        Self::parse(&der).ok()
    }

    /// Whether the certificate is valid for `host` (which may itself be a
    /// `*.` wildcard, which then needs the same wildcard in the certificate).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|name| host_matches(name, host))
    }
}

/// A certificate chain with its key, ready to serve.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub leaf: Leaf,
}

impl fmt::Debug for Loaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("leaf", &self.leaf)
            .finish_non_exhaustive()
    }
}

/// Reads an entry's files and checks that they belong together.
pub fn load(files: &CertFiles) -> Result<Loaded, CertError> {
    let cert_pem = read(Part::Cert, &files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(Part::Cert, &files.cert, e))?;
    let Some(first) = chain.first() else {
        return Err(CertError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let leaf = Leaf::parse(first).map_err(|reason| CertError::Certificate {
        path: files.cert.clone(),
        reason,
    })?;
    let key_pem = read(Part::Key, &files.key)?;
    let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(CertError::NoKey {
                path: files.key.clone(),
            });
        }
        Err(e) => return Err(pem_error(Part::Key, &files.key, e)),
    };
    let key = CertifiedKey::from_der(chain, key, &super::provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        other => CertError::Key {
            path: files.key.clone(),
            reason: other.to_string(),
        },
    })?;
    Ok(Loaded {
        key: Arc::new(key),
        leaf,
    })
}

fn read(part: Part, path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        part,
        path: path.to_owned(),
        source,
    })
}

fn pem_error(part: Part, path: &Path, e: pem::Error) -> CertError {
    CertError::Pem {
        part,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// A certificate expiring within this many days gets a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// What `--validate` (and every config load) reports about a loaded
/// certificate beyond "it parses and the key matches".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concern {
    /// An error: clients would reject it.
    Expired {
        not_after: String,
    },
    ExpiresSoon {
        not_after: String,
        days: i64,
    },
    /// A `hosts` entry the certificate is not valid for.
    Uncovered {
        host: String,
    },
}

impl fmt::Display for Concern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Expired { not_after } => {
                write!(
                    f,
                    "certificate expired on {not_after}; clients will refuse it"
                )
            }
            Self::ExpiresSoon { not_after, days } => {
                write!(
                    f,
                    "certificate expires on {not_after}, in {days} day(s); renew it"
                )
            }
            Self::Uncovered { host } => write!(
                f,
                "certificate is not valid for {host:?} (its subjectAltName does not list it); clients will refuse it"
            ),
        }
    }
}

/// Expiry and coverage of `hosts`, as of `now` (Unix seconds).
pub fn concerns(leaf: &Leaf, hosts: &[String], now: i64) -> Vec<Concern> {
    let mut out = Vec::new();
    let not_after = format_unix(leaf.not_after_unix);
    if leaf.not_after_unix <= now {
        out.push(Concern::Expired { not_after });
    } else if leaf.not_after_unix - now < EXPIRY_WARNING_DAYS * 86_400 {
        let days = (leaf.not_after_unix - now) / 86_400;
        out.push(Concern::ExpiresSoon { not_after, days });
    }
    for host in hosts {
        if !leaf.covers(host) {
            out.push(Concern::Uncovered { host: host.clone() });
        }
    }
    out
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A Unix time as RFC 3339 (`2026-11-21T11:42:00Z`), for logs and messages.
pub fn format_unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_follows_wildcard_rules() {
        let leaf = Leaf {
            names: vec!["a.test".into(), "*.b.test".into()],
            not_before_unix: 0,
            not_after_unix: 0,
        };
        assert!(leaf.covers("a.test"));
        assert!(leaf.covers("x.b.test"));
        assert!(leaf.covers("*.b.test"));
        assert!(!leaf.covers("b.test"));
        assert!(!leaf.covers("x.y.b.test"));
        assert!(!leaf.covers("*.a.test"));
    }

    #[test]
    fn concerns_report_expiry_and_coverage() {
        let now = 1_800_000_000;
        let leaf = |days: i64| Leaf {
            names: vec!["a.test".into()],
            not_before_unix: now - 86_400,
            not_after_unix: now + days * 86_400,
        };
        assert_eq!(concerns(&leaf(30), &["a.test".into()], now), vec![]);
        assert!(matches!(
            concerns(&leaf(3), &["a.test".into()], now)[..],
            [Concern::ExpiresSoon { days: 3, .. }]
        ));
        assert!(matches!(
            concerns(&leaf(-1), &["a.test".into(), "b.test".into()], now)[..],
            [Concern::Expired { .. }, Concern::Uncovered { .. }]
        ));
    }

    #[test]
    fn unix_times_format_as_rfc3339() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix(1_795_000_000), "2026-11-18T11:06:40Z");
    }
}

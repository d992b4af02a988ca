//! ACME mode: one certificate for every site, from an ACME CA (Let's
//! Encrypt by default) with the TLS-ALPN-01 challenge, through rustls-acme.
//!
//! rustls-acme's state machine does the work (account, order, challenge,
//! finalize, renewal at two thirds of the lifetime, exponential back-off
//! after a failure) but only while it is polled, so [`Acme::start`] returns
//! a driver future that the daemon runs for the life of the process. The
//! driver turns the machine's events into log lines and keeps
//! [`Certificates`] current. The account key and certificate are cached in
//! `acme_cache_dir`, so a restart serves the cached certificate at once
//! without talking to the CA.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use futures_util::StreamExt;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::ClientHello;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_acme::acme::{
    AcmeError, LETS_ENCRYPT_PRODUCTION_DIRECTORY, LETS_ENCRYPT_STAGING_DIRECTORY, Problem,
};
use rustls_acme::caches::DirCache;
use rustls_acme::{
    AccountCache, AcmeState, CertCache, EventError, EventOk, OrderError, is_tls_alpn_challenge,
};
use tracing::{debug, error, info, warn};

use super::certs::{Leaf, format_unix, now_unix};
use super::{
    CertSource, CertificateInfo, Certificates, Decision, Refusal, provider, serving_config,
};
use crate::config::{AcmeConfig, AcmeDirectory};

#[derive(Debug, thiserror::Error)]
pub enum AcmeSetupError {
    #[error("server.tls.acme_cache_dir: cannot prepare {}: {source}", path.display())]
    CacheDir { path: PathBuf, source: io::Error },
    #[error("server.tls.acme_ca_root: {}: {reason}", path.display())]
    CaRoot { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The TLS side of ACME mode: which names we answer for, and the two
/// configurations a handshake can get.
pub struct Acme {
    /// Sorted, lower-cased.
    domains: Vec<String>,
    /// Set once a certificate is deployed; until then normal handshakes are
    /// refused with a reason rather than failing inside rustls.
    ready: Arc<AtomicBool>,
    serving: Arc<ServerConfig>,
    challenge: Arc<ServerConfig>,
}

type State = AcmeState<io::Error, io::Error>;

impl Acme {
    /// Prepares the cache directory and the configurations, and returns the
    /// driver that must be polled for certificates to be obtained at all.
    pub fn start(
        config: &AcmeConfig,
        certificates: Certificates,
    ) -> Result<(Arc<Self>, impl Future<Output = ()> + Send + 'static), AcmeSetupError> {
        prepare_cache_dir(&config.cache_dir)?;
        let domains = config.domains.clone();
        let base = match &config.ca_root {
            Some(path) => rustls_acme::AcmeConfig::new_with_client_config(
                &domains,
                Arc::new(api_client_config(path)?),
            ),
            None => rustls_acme::AcmeConfig::new_with_provider(&domains, provider()),
        };
        let ready = Arc::new(AtomicBool::new(false));
        let observed = Arc::new(Observed {
            domains: domains.join(","),
            ready: Arc::clone(&ready),
            leaf: Mutex::new(None),
            order_started: Mutex::new(None),
        });
        let state: State = base
            .contact(&config.contact)
            .directory(directory_url(&config.directory))
            .cache(ObservedCache {
                dir: DirCache::new(config.cache_dir.clone()),
                observed: Arc::clone(&observed),
            })
            .state();
        let acme = Arc::new(Self {
            serving: Arc::new(serving_config(state.resolver())?),
            challenge: state.challenge_rustls_config_with_provider(provider()),
            domains: domains.clone(),
            ready,
        });
        info!(
            domains = observed.domains.as_str(),
            directory = directory_url(&config.directory),
            cache_dir = %config.cache_dir.display(),
            "ACME_START"
        );
        let driver = drive(state, observed, certificates, domains);
        Ok((acme, driver))
    }

    pub(super) fn decide(&self, hello: &ClientHello<'_>, sni: &str) -> Decision {
        if self
            .domains
            .binary_search_by(|d| d.as_str().cmp(sni))
            .is_err()
        {
            return Decision::Refuse(Refusal::UnknownServerName);
        }
        if is_tls_alpn_challenge(hello) {
            Decision::Challenge(Arc::clone(&self.challenge))
        } else if self.ready.load(Ordering::Acquire) {
            Decision::Serve(Arc::clone(&self.serving))
        } else {
            Decision::Refuse(Refusal::NoCertificateYet)
        }
    }
}

fn directory_url(directory: &AcmeDirectory) -> &str {
    match directory {
        AcmeDirectory::LetsEncrypt => LETS_ENCRYPT_PRODUCTION_DIRECTORY,
        AcmeDirectory::LetsEncryptStaging => LETS_ENCRYPT_STAGING_DIRECTORY,
        AcmeDirectory::Url(url) => url,
    }
}

/// Creates the cache directory private to this user: rustls-acme writes
/// the account and certificate keys with the default file mode, so the
/// directory is what keeps them private.
fn prepare_cache_dir(path: &Path) -> Result<(), AcmeSetupError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let fail = |source| AcmeSetupError::CacheDir {
        path: path.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(fail)?;
    let mode = std::fs::metadata(path).map_err(fail)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
        warn!(
            path = %path.display(),
            was = format!("{:o}", mode & 0o777).as_str(),
            "ACME cache directory was readable by others; set to 700"
        );
    }
    Ok(())
}

/// The client configuration for the ACME API when the CA is private: trust
/// exactly the roots in `path`.
fn api_client_config(path: &Path) -> Result<ClientConfig, AcmeSetupError> {
    let fail = |reason: String| AcmeSetupError::CaRoot {
        path: path.to_owned(),
        reason,
    };
    let roots = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| fail(e.to_string()))?;
    if roots.is_empty() {
        return Err(fail("no PEM certificate in the file".to_owned()));
    }
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root).map_err(|e| fail(e.to_string()))?;
    }
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(store)
        .with_no_client_auth())
}

/// What the driver learns from the cache: rustls-acme's events do not say
/// which certificate was deployed, but every certificate it deploys passes
/// through the cache (loaded at start, or stored right after issuance).
struct Observed {
    domains: String,
    ready: Arc<AtomicBool>,
    leaf: Mutex<Option<Leaf>>,
    order_started: Mutex<Option<Instant>>,
}

impl Observed {
    fn record(&self, pem: &[u8]) {
        *self.leaf.lock().unwrap_or_else(PoisonError::into_inner) = Leaf::from_pem(pem);
    }

    fn leaf(&self) -> Option<Leaf> {
        self.leaf
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn order_starting(&self, reason: &str) {
        *self
            .order_started
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        info!(
            domains = self.domains.as_str(),
            reason, "ACME_ORDER_STARTED"
        );
    }

    fn order_elapsed_ms(&self) -> Option<u128> {
        self.order_started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .map(|t| t.elapsed().as_millis())
    }
}

/// rustls-acme's directory cache, watched by [`Observed`].
struct ObservedCache {
    dir: DirCache<PathBuf>,
    observed: Arc<Observed>,
}

#[async_trait]
impl CertCache for ObservedCache {
    type EC = io::Error;

    async fn load_cert(
        &self,
        domains: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        let loaded = self.dir.load_cert(domains, directory_url).await;
        match &loaded {
            Ok(Some(pem)) => self.observed.record(pem),
            // The state machine orders right after an empty cache load.
            Ok(None) => self.observed.order_starting("no cached certificate"),
            // Reported by the state machine as an event.
            Err(_) => {}
        }
        loaded
    }

    async fn store_cert(
        &self,
        domains: &[String],
        directory_url: &str,
        cert: &[u8],
    ) -> Result<(), io::Error> {
        self.observed.record(cert);
        self.dir.store_cert(domains, directory_url, cert).await
    }
}

#[async_trait]
impl AccountCache for ObservedCache {
    type EA = io::Error;

    async fn load_account(
        &self,
        contact: &[String],
        directory_url: &str,
    ) -> Result<Option<Vec<u8>>, io::Error> {
        self.dir.load_account(contact, directory_url).await
    }

    async fn store_account(
        &self,
        contact: &[String],
        directory_url: &str,
        account: &[u8],
    ) -> Result<(), io::Error> {
        self.dir
            .store_account(contact, directory_url, account)
            .await
    }
}

/// Polls the state machine forever, logging what it does.
async fn drive(
    mut state: State,
    observed: Arc<Observed>,
    certificates: Certificates,
    domains: Vec<String>,
) {
    let mut renew_at: Option<tokio::time::Instant> = None;
    loop {
        let renewal = async {
            match renew_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            event = state.next() => event,
            () = renewal => {
                renew_at = None;
                observed.order_starting("renewal due");
                continue;
            }
        };
        match event {
            Some(Ok(EventOk::DeployedCachedCert)) => {
                observed.ready.store(true, Ordering::Release);
                renew_at = deployed(&observed, &certificates, &domains, "ACME_CERT_LOADED");
            }
            // Logged once stored, when the cache has shown us the certificate.
            Some(Ok(EventOk::DeployedNewCert)) => {
                observed.ready.store(true, Ordering::Release);
                debug!("ACME certificate issued");
            }
            Some(Ok(EventOk::CertCacheStore)) => {
                renew_at = deployed(&observed, &certificates, &domains, "ACME_CERT_DEPLOYED");
            }
            Some(Ok(EventOk::AccountCacheStore)) => debug!("ACME account key cached"),
            Some(Err(e)) => {
                report(&observed.domains, &e);
                match e {
                    EventError::CertCacheStore(_) => {
                        renew_at =
                            deployed(&observed, &certificates, &domains, "ACME_CERT_DEPLOYED");
                    }
                    EventError::CertCacheLoad(_) | EventError::CachedCertParse(_) => {
                        observed.order_starting("cached certificate unusable");
                    }
                    _ => {}
                }
            }
            // The stream never ends; if it did, there would be nothing to drive.
            None => return,
        }
    }
}

/// Logs a deployed certificate, publishes its expiry, and returns when the
/// state machine will renew it (two thirds into its lifetime).
fn deployed(
    observed: &Observed,
    certificates: &Certificates,
    domains: &[String],
    tag: &'static str,
) -> Option<tokio::time::Instant> {
    let Some(leaf) = observed.leaf() else {
        warn!(
            domains = observed.domains.as_str(),
            "ACME certificate deployed but could not be parsed"
        );
        return None;
    };
    let renew_unix = leaf.not_after_unix - (leaf.not_after_unix - leaf.not_before_unix) / 3;
    let elapsed = observed.order_elapsed_ms();
    info!(
        domains = observed.domains.as_str(),
        not_after = format_unix(leaf.not_after_unix).as_str(),
        renew_after = format_unix(renew_unix).as_str(),
        issue_ms = elapsed
            .map(|ms| ms.to_string())
            .unwrap_or_else(|| "-".to_owned())
            .as_str(),
        "{tag}"
    );
    certificates.replace(vec![CertificateInfo {
        name: observed.domains.clone(),
        hosts: domains.to_vec(),
        source: CertSource::Acme,
        not_after_unix: leaf.not_after_unix,
    }]);
    let wait = u64::try_from(renew_unix - now_unix()).unwrap_or(0);
    tokio::time::Instant::now().checked_add(std::time::Duration::from_secs(wait))
}

fn report(domains: &str, e: &EventError<io::Error, io::Error>) {
    let (stage, message, problem) = describe(e);
    let (problem_type, detail) = problem
        .map(|p| (p.typ.unwrap_or_default(), p.detail.unwrap_or_default()))
        .unwrap_or_default();
    error!(
        domains,
        stage,
        error = message.as_str(),
        problem = if problem_type.is_empty() {
            "-"
        } else {
            problem_type.as_str()
        },
        detail = if detail.is_empty() {
            "-"
        } else {
            detail.as_str()
        },
        "ACME_ERROR"
    );
}

/// Where it failed, what failed, and the CA's problem document if it sent one.
fn describe(e: &EventError<io::Error, io::Error>) -> (&'static str, String, Option<Problem>) {
    match e {
        EventError::CertCacheLoad(e) => (
            "cache",
            format!("cannot read the cached certificate: {e}"),
            None,
        ),
        EventError::AccountCacheLoad(e) => (
            "cache",
            format!("cannot read the cached account key: {e}"),
            None,
        ),
        EventError::CertCacheStore(e) => {
            ("cache", format!("cannot store the certificate: {e}"), None)
        }
        EventError::AccountCacheStore(e) => {
            ("cache", format!("cannot store the account key: {e}"), None)
        }
        EventError::CachedCertParse(e) => (
            "cache",
            format!("the cached certificate is unusable: {e}"),
            None,
        ),
        EventError::NewCertParse(e) => (
            "order",
            format!("the issued certificate is unusable: {e}"),
            None,
        ),
        EventError::Order(e) => {
            let (message, problem) = describe_order(e);
            (
                "order",
                format!("{message}; retrying with back-off"),
                problem,
            )
        }
    }
}

fn describe_order(e: &OrderError) -> (String, Option<Problem>) {
    match e {
        OrderError::BadAuth(auth) => {
            let rustls_acme::acme::Identifier::Dns(name) = &auth.identifier;
            (
                format!("authorization for {name} failed ({:?})", auth.status),
                auth.challenges.iter().find_map(|c| c.error.clone()),
            )
        }
        OrderError::BadOrder(order) => (
            "the CA marked the order invalid".to_owned(),
            order.error.clone(),
        ),
        OrderError::ProcessingTimeout(order) => (e.to_string(), order.error.clone()),
        OrderError::Acme(AcmeError::HttpRequest(request)) => http_failure(&request.to_string()),
        other => (innermost(other), None),
    }
}

/// rustls-acme reports a refused API request as text: `non 2xx http
/// status: 400 "<problem JSON>"` (the body in Rust string syntax). The
/// problem document is the useful part, so recover it when possible.
fn http_failure(text: &str) -> (String, Option<Problem>) {
    let parsed = text.strip_prefix("non 2xx http status: ").and_then(|rest| {
        let (status, body) = rest.split_once(' ')?;
        let body: String = serde_json::from_str(body).ok()?;
        let problem: Problem = serde_json::from_str(&body).ok()?;
        Some((format!("the CA answered HTTP {status}"), Some(problem)))
    });
    parsed.unwrap_or_else(|| {
        let message = match text
            .strip_prefix("http error: ")
            .or_else(|| text.strip_prefix("io error: "))
        {
            Some(cause) => format!("cannot reach the ACME server: {cause}"),
            None => format!("ACME request failed: {text}"),
        };
        (message, None)
    })
}

/// The deepest cause, which is usually the readable one.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(source) = last.source() {
        last = source;
    }
    last.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_documents_are_recovered_from_refusals() {
        let text = r#"non 2xx http status: 400 "{\"type\":\"urn:ietf:params:acme:error:malformed\",\"detail\":\"bad nonce\",\"status\":400}""#;
        let (message, problem) = http_failure(text);
        assert_eq!(message, "the CA answered HTTP 400");
        let problem = problem.expect("problem");
        assert_eq!(
            problem.typ.as_deref(),
            Some("urn:ietf:params:acme:error:malformed")
        );
        assert_eq!(problem.detail.as_deref(), Some("bad nonce"));
        let (message, problem) = http_failure("io error: refused");
        assert_eq!(message, "cannot reach the ACME server: refused");
        assert!(problem.is_none());
    }
}

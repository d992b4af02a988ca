//! The admin listener (`[admin] bind_addr`): Prometheus `/metrics`,
//! `/health` and `/health/ready`. It has a socket of its own, so none of
//! this is reachable through the public listeners, whose pipeline has no
//! such routes.
//!
//! Readiness means: the configuration is loaded (it always is once the
//! process serves), the public listeners still accept (not shutting down),
//! and every site's upstream accepts a TCP connection within a short
//! timeout. The same upstream check runs on every scrape and feeds
//! `reverse_proxy_upstream_up`, so an upstream that is down is visible to
//! alerting even when no traffic reaches it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::future::join_all;
use http::{StatusCode, header};
use tokio::net::TcpStream;

use crate::metrics::{self, Metrics};
use crate::proxy::plain;
use crate::server::Server;
use crate::state::{AppState, Snapshot};
use crate::tls::Certificates;

/// Upper bound of one upstream connect check; shorter when
/// `proxy.connect_timeout_secs` is.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Admin {
    pub state: AppState,
    pub metrics: Arc<Metrics>,
    /// The public server, whose listeners readiness checks.
    pub server: Server,
    /// The certificates served, whose expiry each scrape reports.
    pub certificates: Certificates,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/health", get(health))
        .route("/health/ready", get(ready))
        .with_state(admin)
}

async fn health() {}

async fn scrape(State(admin): State<Admin>) -> Response {
    let probes = probe_upstreams(&admin.state.snapshot()).await;
    admin
        .metrics
        .set_upstreams_up(probes.iter().map(|p| (p.host.as_str(), p.error.is_none())));
    for cert in admin.certificates.current().iter() {
        let not_after = u64::try_from(cert.not_after_unix)
            .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs));
        admin
            .metrics
            .set_certificate_not_after(&cert.name, not_after);
    }
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        admin.metrics.encode(),
    )
        .into_response()
}

async fn ready(State(admin): State<Admin>) -> Response {
    let probes = probe_upstreams(&admin.state.snapshot()).await;
    admin
        .metrics
        .set_upstreams_up(probes.iter().map(|p| (p.host.as_str(), p.error.is_none())));
    let mut failures = String::new();
    if !admin.server.is_accepting() {
        failures.push_str("listeners: shutting down\n");
    }
    for probe in probes {
        if let Some(error) = probe.error {
            let _ = writeln!(
                failures,
                "site {}: upstream {}: {error}",
                probe.host, probe.upstream
            );
        }
    }
    let (status, body) = if failures.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{failures}"),
        )
    };
    plain(status, &body)
}

struct Probe {
    host: String,
    upstream: String,
    /// Why the upstream is not reachable; `None` when it is.
    error: Option<String>,
}

/// Opens (and closes) one TCP connection to every site's upstream, all at
/// once, sorted by host so the failure list reads the same every time.
async fn probe_upstreams(snapshot: &Snapshot) -> Vec<Probe> {
    let timeout = snapshot.config.proxy.connect_timeout.min(PROBE_TIMEOUT);
    let mut sites: Vec<_> = snapshot.config.sites.iter().collect();
    sites.sort_by_key(|(host, _)| *host);
    join_all(sites.into_iter().map(|(host, site)| async move {
        let upstream = site.upstream.connect_target();
        let error = match tokio::time::timeout(timeout, TcpStream::connect(&upstream)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.kind().to_string()),
            Err(_) => Some(format!("no connection within {} ms", timeout.as_millis())),
        };
        Probe {
            host: host.clone(),
            upstream,
            error,
        }
    }))
    .await
}

//! The state every request reads: the current [`Snapshot`] of the dynamic
//! configuration behind an `ArcSwap`, so a reload replaces it atomically and
//! requests in flight finish on the snapshot they started with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DynamicConfig;
use crate::metrics::{Metrics, SiteMetrics, SiteTable};
use crate::proxy::upstream::Upstreams;
use crate::ratelimit::Limiter;

/// One consistent view of what requests are served with.
pub struct Snapshot {
    pub config: DynamicConfig,
    pub upstreams: Upstreams,
    /// Per-site metric handles for this config; `None` without `[admin]`.
    pub metrics: Option<SiteTable>,
    /// `None` when rate limiting is off.
    pub limiter: Option<Arc<Limiter>>,
}

impl Snapshot {
    /// Builds a snapshot, reusing the previous one's upstream pools and
    /// rate-limit buckets when the settings they were built from did not
    /// change (so a reload does not hand every client a fresh burst).
    pub fn new(
        config: DynamicConfig,
        previous: Option<&Snapshot>,
        metrics: Option<&Metrics>,
    ) -> Self {
        let upstreams = Upstreams::new(
            &config,
            previous.map(|prev| (&prev.config, &prev.upstreams)),
        );
        let metrics = metrics.map(|m| m.sites(&config));
        let limiter = match previous.and_then(|prev| prev.limiter.as_ref()) {
            Some(limiter) if limiter.fits(&config.rate_limit) => Some(Arc::clone(limiter)),
            _ => Limiter::from_settings(&config.rate_limit).map(Arc::new),
        };
        Self {
            config,
            upstreams,
            metrics,
            limiter,
        }
    }

    /// The metric handles for a lower-cased host (`None`: no usable host).
    pub fn site_metrics(&self, host: Option<&str>) -> Option<&Arc<SiteMetrics>> {
        self.metrics.as_ref().map(|table| table.get(host))
    }
}

/// Shared by the router, the listeners and the lifecycle code.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    snapshot: ArcSwap<Snapshot>,
    metrics: Option<Arc<Metrics>>,
    tunnels: TaskTracker,
    close_tunnels: CancellationToken,
}

impl AppState {
    /// `metrics` is `None` when nothing can read them (no `[admin]`).
    pub fn new(config: DynamicConfig, metrics: Option<Arc<Metrics>>) -> Self {
        let snapshot = Snapshot::new(config, None, metrics.as_deref());
        Self {
            inner: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(snapshot),
                metrics,
                tunnels: TaskTracker::new(),
                close_tunnels: CancellationToken::new(),
            }),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// Makes `config` the one new requests see.
    pub fn replace(&self, config: DynamicConfig) {
        let previous = self.inner.snapshot.load();
        let next = Snapshot::new(config, Some(&previous), self.metrics().map(Arc::as_ref));
        self.inner.snapshot.store(Arc::new(next));
    }

    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.inner.metrics.as_ref()
    }

    /// Upgraded connections (WebSocket tunnels), which outlive their request.
    pub fn tunnels(&self) -> &TaskTracker {
        &self.inner.tunnels
    }

    /// Cancelled when shutdown's grace period ends, closing every tunnel.
    pub fn close_tunnels(&self) -> &CancellationToken {
        &self.inner.close_tunnels
    }
}

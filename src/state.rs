//! The state every request reads: the current [`Snapshot`] of the dynamic
//! configuration behind an `ArcSwap`, so a reload replaces it atomically and
//! requests in flight finish on the snapshot they started with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DynamicConfig;
use crate::proxy::upstream::{self, UpstreamClient};

/// One consistent view of what requests are served with.
pub struct Snapshot {
    pub config: DynamicConfig,
    pub upstream: UpstreamClient,
}

impl Snapshot {
    /// Builds a snapshot, reusing the previous one's upstream pool when the
    /// settings it was built from did not change.
    pub fn new(config: DynamicConfig, previous: Option<&Snapshot>) -> Self {
        let upstream = match previous {
            Some(prev) if prev.config.proxy == config.proxy => prev.upstream.clone(),
            _ => upstream::client(&config.proxy),
        };
        Self { config, upstream }
    }
}

/// Shared by the router, the listeners and the lifecycle code.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    snapshot: ArcSwap<Snapshot>,
    tunnels: TaskTracker,
    close_tunnels: CancellationToken,
}

impl AppState {
    pub fn new(config: DynamicConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                snapshot: ArcSwap::from_pointee(Snapshot::new(config, None)),
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
        let next = Snapshot::new(config, Some(&previous));
        self.inner.snapshot.store(Arc::new(next));
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

//! reverse-proxy: a TLS-terminating reverse proxy for a few self-hosted
//! sites on one machine.
//!
//! The path of a request, and the module that handles each step:
//!
//! - [`server`]: accept (connection limit, accept back-off), HTTP/1.1
//!   (bodiless GET and HEAD by the proxy's own code, the rest by hyper)
//!   and HTTP/2 via hyper-util, ambiguous HTTP/1 framing refused before
//!   hyper parses it, timeouts, idle close, graceful drain.
//! - [`tls`]: the TLS handshake on the main listener, certificates from
//!   ACME or from files chosen by SNI.
//! - [`router`]: the request pipeline: `/health`, the rate limit, the proxy.
//! - [`client_ip`]: who the client is (trusted proxies, `X-Forwarded-For`).
//! - [`ratelimit`]: per-client token buckets in front of the proxy (`429`).
//! - [`proxy`]: host routing, header rewriting, streaming to the upstream
//!   over pooled connections (bodiless GET and HEAD by the proxy's own
//!   HTTP/1.1 client, the rest by hyper's), upgrades.
//! - [`body_timeout`]: request bodies that stop arriving are cut off.
//! - [`logging`]: the access lines and where they go.
//! - [`metrics`]: Prometheus counters and histograms, recorded along the
//!   way when the [`admin`] listener (`/metrics`, `/health/ready`) is on.
//! - [`redirect`]: the optional plain-HTTP listener that sends clients to
//!   `https://`.
//!
//! Around it: [`config`] (the file, validated into static and dynamic parts),
//! [`state`] (the current dynamic snapshot, swapped on reload), [`daemon`]
//! (binding and starting everything), [`lifecycle`] (signals, reload,
//! systemd notifications, shutdown), [`cli`] (arguments and exit codes) and
//! `spare` (the per-request buffers and header maps each thread keeps for
//! reuse).

pub mod admin;
mod body_framing;
pub mod body_timeout;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod conn_info;
pub mod daemon;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod redirect;
pub mod router;
pub mod server;
mod spare;
pub mod state;
pub mod tls;

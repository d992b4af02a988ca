//! The request pipeline, in the order a request meets it.

use axum::Router;
use axum::handler::Handler;
use axum::routing::get;
use tower::Layer;

use crate::proxy;
use crate::ratelimit::RateLimitLayer;
use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    // The rate limiter wraps the proxy handler only, not the whole router:
    // `/health` (routed first) must answer load balancers and systemd
    // however busy a client is, while every request that reaches the
    // proxy, for a configured host or not, counts against its client. The
    // layer also works out the client IP once for the proxy to use.
    let proxy = RateLimitLayer::new(state.clone()).layer(proxy::handle.with_state(state.clone()));
    Router::new()
        // Liveness for load balancers and systemd checks: answered here for
        // any host, before anything that could refuse or forward it.
        .route("/health", get(health))
        // Everything else belongs to a site.
        .fallback_service(proxy)
        .with_state(state)
}

async fn health() {}

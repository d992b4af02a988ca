//! The request pipeline, in the order a request meets it.

use axum::Router;
use axum::routing::get;

use crate::proxy;
use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    Router::new()
        // Liveness for load balancers and systemd checks: answered here for
        // any host, before anything that could refuse or forward it.
        .route("/health", get(health))
        // Everything else belongs to a site.
        .fallback(proxy::handle)
        .with_state(state)
}

async fn health() {}

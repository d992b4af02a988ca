//! The public listener's request pipeline, in the order a request meets
//! it: `/health`, the client's rate limit, the proxy.
//!
//! Written out as plain calls rather than a general router and middleware
//! stack: with one fixed route, routing is a string comparison, and the
//! connection's details and the client's address go down as arguments
//! instead of through the request's type-keyed extensions, which cost a
//! proxied request a dozen allocations and hashes.

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::header::{ALLOW, CONTENT_LENGTH};
use http::{HeaderValue, Method, StatusCode};

use crate::client_ip::client_ip;
use crate::conn_info::ConnInfo;
use crate::proxy;
use crate::ratelimit;
use crate::state::AppState;

/// Liveness for load balancers and systemd checks, answered for any host.
const HEALTH: &str = "/health";

#[derive(Clone)]
pub struct Pipeline {
    state: AppState,
}

impl Pipeline {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// Answers one request that arrived on `conn`. `/health` and the rate
    /// limit are settled at once; only a forwarded request has anything to
    /// wait for. Either way the answer is one pointer, small and cheap to
    /// move, which a waiting connection keeps instead of a whole response.
    pub fn serve(&self, conn: &ConnInfo, req: Request) -> proxy::Answer {
        // Before anything that could refuse or forward it: `/health` must
        // answer however busy a client is, and never uses up its allowance.
        if req.uri().path() == HEALTH {
            return proxy::at_once(health(req.method()));
        }
        // Every other request counts against its client, for a configured
        // host or not.
        let snapshot = self.state.snapshot();
        let client = client_ip(
            conn.peer.ip(),
            req.headers(),
            &snapshot.config.proxy.trusted_proxies,
        );
        if let Some(refused) = ratelimit::refuse(&snapshot, client, &req) {
            return proxy::at_once(refused);
        }
        proxy::handle(&self.state, &snapshot, conn, client, req)
    }
}

fn health(method: &Method) -> Response {
    let mut response = Response::new(Body::empty());
    // Said outright: for HEAD, nothing else would tell the body's size.
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
    if method != Method::GET && method != Method::HEAD {
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET,HEAD"));
    }
    response
}

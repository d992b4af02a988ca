//! The optional plain-HTTP listener (`http_bind_addr`): browsers that type a
//! bare name arrive on port 80, and are sent to the same URL over HTTPS
//! with `308` (which keeps the method and body). Only configured sites are
//! redirected, so the listener cannot be used to bounce clients to an
//! arbitrary host; `/health` is answered here as on the main listener.

use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::uri::PathAndQuery;
use http::{HeaderValue, StatusCode, header};
use tracing::info;

use crate::client_ip::client_ip;
use crate::conn_info::ConnInfo;
use crate::logging::ACCESS;
use crate::proxy::host::request_host;
use crate::proxy::plain;
use crate::state::AppState;

#[derive(Clone)]
struct Redirect {
    state: AppState,
    /// The port of the HTTPS listener, written into `Location` unless 443.
    https_port: u16,
}

pub fn router(state: AppState, https_port: u16) -> Router {
    Router::new()
        .route("/health", get(health))
        .fallback(redirect)
        .with_state(Redirect { state, https_port })
}

async fn health() {}

async fn redirect(State(r): State<Redirect>, req: Request) -> Response {
    let started = Instant::now();
    let snapshot = r.state.snapshot();
    let client = req.extensions().get::<ConnInfo>().map(|conn| {
        client_ip(
            conn.peer.ip(),
            req.headers(),
            &snapshot.config.proxy.trusted_proxies,
        )
    });
    let (host, response) = match request_host(&req) {
        Err(e) => (
            None,
            plain(StatusCode::BAD_REQUEST, &format!("bad request: {e}\n")),
        ),
        Ok(host) if snapshot.config.site(&host.name).is_none() => (
            Some(host.name),
            plain(
                StatusCode::MISDIRECTED_REQUEST,
                "misdirected request: no site is configured for this host\n",
            ),
        ),
        Ok(host) => {
            let target = location(&host.name, r.https_port, req.uri().path_and_query());
            let response = match HeaderValue::from_str(&target) {
                Ok(value) => (
                    StatusCode::PERMANENT_REDIRECT,
                    [(header::LOCATION, value)],
                    format!("moved to {target}\n"),
                )
                    .into_response(),
                Err(_) => plain(StatusCode::BAD_REQUEST, "bad request: request target\n"),
            };
            (Some(host.name), response)
        }
    };
    info!(
        target: ACCESS,
        client_ip = client.map_or_else(|| "-".to_owned(), |ip| ip.to_string()).as_str(),
        host = host.as_deref().unwrap_or("-"),
        method = req.method().as_str(),
        path = req.uri().path(),
        status = response.status().as_u16(),
        upstream = "-",
        duration_ms = started.elapsed().as_millis() as u64,
        "REQUEST"
    );
    response
}

/// `https://host[:port]/path?query` for a lower-cased host name.
pub fn location(host: &str, https_port: u16, path_and_query: Option<&PathAndQuery>) -> String {
    let path = path_and_query.map_or("/", PathAndQuery::as_str);
    if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_443_is_left_out() {
        let pq = PathAndQuery::from_static("/x?y=1");
        assert_eq!(location("a.test", 443, Some(&pq)), "https://a.test/x?y=1");
        assert_eq!(
            location("a.test", 8443, Some(&pq)),
            "https://a.test:8443/x?y=1"
        );
        assert_eq!(location("a.test", 443, None), "https://a.test/");
    }
}

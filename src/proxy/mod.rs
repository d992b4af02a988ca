//! The host-keyed proxy handler: find the site, rewrite the request for its
//! upstream, stream both bodies, and log one access line.

pub mod headers;
pub mod host;
pub mod upgrade;
pub mod upstream;

use std::error::Error as _;
use std::net::IpAddr;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Method, StatusCode, Uri, Version, header};
use tracing::{info, warn};

use crate::client_ip::client_ip;
use crate::config::Site;
use crate::conn_info::ConnInfo;
use crate::logging::ACCESS;
use crate::state::AppState;
use host::{RequestHost, request_host};

/// Serves one proxied request.
pub async fn handle(State(state): State<AppState>, req: Request) -> Response {
    let started = Instant::now();
    let Some(conn) = req.extensions().get::<ConnInfo>().cloned() else {
        // Every listener attaches ConnInfo; without it the request did not
        // come through one, which is a programming error, not a client's.
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
    };
    let snapshot = state.snapshot();
    let client = client_ip(
        conn.peer.ip(),
        req.headers(),
        &snapshot.config.proxy.trusted_proxies,
    );
    let method = req.method().clone();
    let uri = req.uri().clone();
    let log = AccessLine {
        client,
        method: &method,
        path: uri.path(),
        started,
    };
    let host = match request_host(&req) {
        Ok(host) => host,
        Err(e) => {
            let response = plain(StatusCode::BAD_REQUEST, &format!("bad request: {e}\n"));
            log.emit("-", response.status(), "-");
            return response;
        }
    };
    let Some(site) = snapshot.config.site(&host.name) else {
        let response = plain(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected request: no site is configured for this host\n",
        );
        log.emit(&host.name, response.status(), "-");
        return response;
    };
    let response = forward(&state, &snapshot, site, &host, &conn, client, req).await;
    log.emit(
        &host.name,
        response.status(),
        site.upstream.authority.as_str(),
    );
    response
}

/// The parts of an access line known before the response.
struct AccessLine<'a> {
    client: IpAddr,
    method: &'a Method,
    path: &'a str,
    started: Instant,
}

impl AccessLine<'_> {
    fn emit(&self, host: &str, status: StatusCode, upstream: &str) {
        info!(
            target: ACCESS,
            client_ip = %self.client,
            host,
            method = self.method.as_str(),
            path = self.path,
            status = status.as_u16(),
            upstream,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "REQUEST"
        );
    }
}

async fn forward(
    state: &AppState,
    snapshot: &crate::state::Snapshot,
    site: &Site,
    host: &RequestHost,
    conn: &ConnInfo,
    client: IpAddr,
    req: Request,
) -> Response {
    let wants_upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let (mut parts, body) = req.into_parts();
    let client_upgrade = if wants_upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let mut uri_parts = http::uri::Parts::default();
    uri_parts.scheme = Some(Scheme::HTTP);
    uri_parts.authority = Some(site.upstream.authority.clone());
    uri_parts.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.uri = match Uri::from_parts(uri_parts) {
        Ok(uri) => uri,
        Err(_) => return plain(StatusCode::BAD_REQUEST, "bad request: request target\n"),
    };
    // Upstreams speak HTTP/1.1 whatever the client spoke.
    parts.version = Version::HTTP_11;
    headers::remove_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
    // An HTTP/1.1 request already carries this exact Host; rewriting it
    // would copy it for nothing.
    let host_is_authority = parts
        .headers
        .get(header::HOST)
        .is_some_and(|v| v.as_bytes() == host.authority.as_str().as_bytes());
    if !host_is_authority {
        match HeaderValue::from_str(host.authority.as_str()) {
            Ok(value) => parts.headers.insert(header::HOST, value),
            Err(_) => return plain(StatusCode::BAD_REQUEST, "bad request: Host\n"),
        };
    }
    headers::set_forwarding(
        &mut parts.headers,
        conn.peer.ip(),
        client,
        conn.https,
        host.authority.as_str(),
    );

    let timeout = snapshot.config.proxy.response_timeout;
    let sent = tokio::time::timeout(
        timeout,
        snapshot.upstream.request(Request::from_parts(parts, body)),
    )
    .await;
    let mut response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            let status = StatusCode::BAD_GATEWAY;
            upstream_error(site, &describe(&e));
            return plain(status, "bad gateway: the upstream could not be reached\n");
        }
        Err(_) => {
            upstream_error(site, &format!("no response within {} s", timeout.as_secs()));
            return plain(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway timeout: the upstream did not answer in time\n",
            );
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            upstream_error(
                site,
                "101 Switching Protocols to a request that did not ask to upgrade",
            );
            return plain(StatusCode::BAD_GATEWAY, "bad gateway\n");
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        upgrade::spawn_tunnel(
            state.tunnels(),
            state.close_tunnels().clone(),
            client_upgrade,
            upstream_upgrade,
        );
        return response.map(Body::new);
    }
    headers::remove_hop_by_hop(response.headers_mut(), false);
    response.map(Body::new)
}

fn upstream_error(site: &Site, error: &str) {
    warn!(
        target: ACCESS,
        host = site.host.as_str(),
        upstream = site.upstream.authority.as_str(),
        error,
        "UPSTREAM_ERROR"
    );
}

/// A short cause for logs: the innermost error, e.g. "connection refused".
fn describe(error: &hyper_util::client::legacy::Error) -> String {
    let mut source = error.source();
    let mut last: &dyn std::error::Error = error;
    while let Some(inner) = source {
        last = inner;
        source = inner.source();
    }
    match last.downcast_ref::<std::io::Error>() {
        Some(io) => io.kind().to_string(),
        None => last.to_string(),
    }
}

fn plain(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_owned(),
    )
        .into_response()
}

//! The host-keyed proxy handler: find the site, rewrite the request for its
//! upstream, stream both bodies, and account for the exchange ([`access`]).

pub mod access;
pub mod client;
pub mod headers;
pub mod host;
pub mod pool;
pub mod upgrade;
pub mod upstream;

use std::error::Error as _;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::future::ready;
use hyper::upgrade::OnUpgrade;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, Uri, Version, header};
use tracing::{info, warn};

use crate::body_timeout::BodyStalled;
use crate::conn_info::ConnInfo;
use crate::logging::ACCESS;
use crate::metrics::{SiteMetrics, UpstreamErrorKind};
use crate::state::{AppState, Snapshot};
use access::{CountedBody, Exchange};
use headers::Forwarding;
use host::{RequestHost, request_host};
use pool::{Outgoing, PooledBody, UpstreamError, UpstreamPool};

/// A request's answer to come, whether it was made at once or waits for
/// the upstream: one pointer, which a connection's task can keep while it
/// waits at little cost.
pub type Answer = Pin<Box<dyn Future<Output = Response> + Send>>;

/// An answer made at once (`/health`, `429`, `421` and the like).
pub fn at_once(response: Response) -> Answer {
    Box::pin(ready(response))
}

/// Serves one proxied request from `client` (the address the rate limit
/// counted it against), with the configuration `snapshot` it was counted
/// under.
///
/// Everything up to sending is decided here, before any future exists; the
/// future returned only waits for the upstream. Nesting one async function
/// in another would keep the request in each of them; this way the future
/// holds the encoded head instead of the request, and stays under the
/// 1,032 bytes that glibc's per-thread cache takes. It is boxed here,
/// where it is made: it lives as long as the upstream takes, and is moved
/// once, into its box, rather than once per caller.
pub fn handle(
    state: &AppState,
    snapshot: &Snapshot,
    conn: &ConnInfo,
    client: IpAddr,
    req: Request,
) -> Answer {
    let started = Instant::now();
    let exchange = Exchange::new(&req, conn, client, started);
    if !headers::transfer_coding_is_chunked_only(req.headers()) {
        // hyper has decoded the chunked framing; any other coding would be
        // lost on the way to the upstream, which would misread the body.
        let response = closing(
            StatusCode::NOT_IMPLEMENTED,
            "not implemented: only the chunked transfer coding is supported\n",
        );
        let metrics = snapshot.site_metrics(None).cloned();
        return at_once(exchange.finish(response, "-".to_owned(), None, metrics));
    }
    let host = match request_host(&req) {
        Ok(host) => host,
        Err(e) => {
            let response = plain(StatusCode::BAD_REQUEST, &format!("bad request: {e}\n"));
            let metrics = snapshot.site_metrics(None).cloned();
            return at_once(exchange.finish(response, "-".to_owned(), None, metrics));
        }
    };
    let metrics = snapshot.site_metrics(Some(&host.name)).cloned();
    if !host::sni_matches(conn.sni.as_deref(), &host.name) {
        // TLS was set up for one site; serving another on that connection
        // would let a client reach it under the wrong certificate's trust.
        let response = plain(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected request: the TLS server name differs from the requested host\n",
        );
        return at_once(exchange.finish(response, host.name, None, metrics));
    }
    let Some(pool) = snapshot.upstreams.get(&host.name).cloned() else {
        let response = plain(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected request: no site is configured for this host\n",
        );
        return at_once(exchange.finish(response, host.name, None, metrics));
    };
    let (request, client_upgrade) = upstream_request(&host, conn, client, req, metrics.as_deref());
    let timeout = snapshot.config.proxy.response_timeout;
    let state = state.clone();
    Box::pin(async move {
        // Read here, not on arrival: an HTTP/2 stream's future is first
        // polled by its own task, which may wait in the runtime's queue.
        // One reading serves for the deadline and the latency.
        let sent_at = Instant::now();
        let sent = pool.send(request, (sent_at + timeout).into()).await;
        let upstream = Some(pool.authority().clone());
        let forwarded = Forwarded {
            state: &state,
            pool: &pool,
            metrics: metrics.as_deref(),
            host: &host,
            client,
        };
        match forwarded.response(sent, sent_at, timeout, client_upgrade) {
            Ok(response) => exchange.finish(response, host.name, upstream, metrics),
            Err(response) => exchange.finish(response, host.name, upstream, metrics),
        }
    })
}

/// The request as the upstream gets it, and the client's side of an
/// upgrade it asks for.
fn upstream_request(
    host: &RequestHost,
    conn: &ConnInfo,
    client: IpAddr,
    req: Request,
    metrics: Option<&SiteMetrics>,
) -> (Outgoing, Option<OnUpgrade>) {
    let from_http1 = req.version() < Version::HTTP_2;
    let wants_upgrade = req.version() == Version::HTTP_11 && headers::wants_upgrade(req.headers());
    let (mut parts, body) = req.into_parts();
    let client_upgrade = if wants_upgrade {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    // The upstream gets the origin form (`/path?query`), which is what an
    // HTTP/1.1 client usually sent; an absolute-form or HTTP/2 target is
    // cut down to it.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .cloned()
            .map_or_else(|| Uri::from_static("/"), Uri::from);
    }
    // Upstreams speak HTTP/1.1 whatever the client spoke.
    parts.version = Version::HTTP_11;
    headers::remove_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
    // An HTTP/1.1 request usually carries this exact Host already.
    let host_is_authority = parts
        .headers
        .get(header::HOST)
        .is_some_and(|v| v == host.authority);
    if !host_is_authority {
        parts.headers.insert(header::HOST, host.authority.clone());
    }
    let forwarding = Forwarding::new(&parts.headers, conn, client, &host.authority);
    let body = CountedBody::wrap(body, metrics);
    let request = Request::from_parts(parts, body);
    // Only an upgrade still carries `Upgrade`: the hop-by-hop fields went
    // above.
    let upgrading = client_upgrade.is_some();
    let outgoing = Outgoing::new(request, forwarding, from_http1, upgrading);
    (outgoing, client_upgrade)
}

/// A request sent to its upstream: what turning the outcome into the
/// client's response needs to know.
struct Forwarded<'a> {
    state: &'a AppState,
    pool: &'a UpstreamPool,
    metrics: Option<&'a SiteMetrics>,
    host: &'a RequestHost,
    client: IpAddr,
}

impl Forwarded<'_> {
    /// The upstream's response, ready for the client; `Err` is a response
    /// made here because the upstream could not give one.
    #[expect(
        clippy::result_large_err,
        reason = "both sides are responses of about the same size; boxing one would only add an allocation"
    )]
    fn response(
        &self,
        sent: Result<http::Response<PooledBody>, UpstreamError>,
        sent_at: Instant,
        timeout: Duration,
        client_upgrade: Option<OnUpgrade>,
    ) -> Result<http::Response<PooledBody>, Response> {
        let Self {
            state,
            pool,
            metrics,
            host,
            client,
        } = *self;
        let mut response = match sent {
            Ok(response) => {
                if let Some(m) = metrics {
                    m.upstream_responded(sent_at.elapsed());
                }
                response
            }
            Err(UpstreamError::TimedOut) => {
                upstream_error(
                    host,
                    pool,
                    metrics,
                    UpstreamErrorKind::Timeout,
                    &format!("no response within {} s", timeout.as_secs()),
                );
                return Err(plain(
                    StatusCode::GATEWAY_TIMEOUT,
                    "gateway timeout: the upstream did not answer in time\n",
                ));
            }
            Err(e) => {
                if let Some(BodyStalled(after)) = BodyStalled::find(&e) {
                    // The client's fault, not the upstream's: the upstream
                    // request was aborted because the body stopped arriving.
                    info!(
                        client_ip = %client,
                        host = host.name.as_str(),
                        timeout_secs = after.as_secs(),
                        "BODY_TIMEOUT"
                    );
                    return Err(closing(
                        StatusCode::REQUEST_TIMEOUT,
                        "request timeout: the request body stopped arriving\n",
                    ));
                }
                let kind = if e.is_connect() {
                    UpstreamErrorKind::Connect
                } else {
                    UpstreamErrorKind::Reset
                };
                upstream_error(host, pool, metrics, kind, &describe(&e));
                return Err(plain(
                    StatusCode::BAD_GATEWAY,
                    "bad gateway: the upstream could not be reached\n",
                ));
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                upstream_error(
                    host,
                    pool,
                    metrics,
                    UpstreamErrorKind::Reset,
                    "101 Switching Protocols to a request that did not ask to upgrade",
                );
                return Err(plain(StatusCode::BAD_GATEWAY, "bad gateway\n"));
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            upgrade::spawn_tunnel(
                state.tunnels(),
                state.close_tunnels().clone(),
                client_upgrade,
                upstream_upgrade,
            );
            return Ok(response);
        }
        let fields = response.headers_mut();
        if fields.contains_key(header::TRANSFER_ENCODING) {
            // The transfer coding framed the body, and it goes as the
            // client's side frames it: a length sent along would be the
            // upstream's other, ignored, claim (RFC 9112 §6.3 has a proxy
            // remove it).
            fields.remove(header::CONTENT_LENGTH);
        }
        headers::remove_hop_by_hop(fields, false);
        Ok(response)
    }
}

fn upstream_error(
    host: &RequestHost,
    pool: &UpstreamPool,
    metrics: Option<&SiteMetrics>,
    kind: UpstreamErrorKind,
    error: &str,
) {
    if let Some(m) = metrics {
        m.upstream_error(kind);
    }
    warn!(
        target: ACCESS,
        host = host.name.as_str(),
        upstream = pool.authority().as_str(),
        error,
        "UPSTREAM_ERROR"
    );
}

/// A short cause for logs: the innermost error, e.g. "connection refused".
fn describe(error: &UpstreamError) -> String {
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

/// [`plain`], and the connection closed after it: what remains of the
/// request's body cannot be trusted to be read as the next request.
fn closing(status: StatusCode, body: &str) -> Response {
    let mut response = plain(status, body);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A short plain-text response, for answers the proxy makes itself.
pub(crate) fn plain(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.to_owned(),
    )
        .into_response()
}

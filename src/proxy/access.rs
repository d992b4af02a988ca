//! Accounting for a request once its response is over: the `REQUEST`
//! access line and the per-site request metrics.
//!
//! Both wait for the end of the response body, as nginx does, so that
//! `duration_ms` covers the whole exchange and `bytes_sent` is what was
//! really handed to the connection, not a `Content-Length` promise. The
//! response body is wrapped once; dropping it (finished, failed, or the
//! client gone) is what writes the line.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Method, StatusCode, Uri, Version, header};
use http_body::{Body as _, Frame, SizeHint};
use prometheus::IntCounter;

use crate::client_ip::IpText;
use crate::conn_info::ConnInfo;
use crate::logging::RequestLine;
use crate::metrics::SiteMetrics;
use crate::state::Snapshot;

/// What is known about a request when it arrives.
pub struct Exchange {
    client: IpAddr,
    method: Method,
    uri: Uri,
    user_agent: Option<HeaderValue>,
    version: Version,
    tls_version: Option<&'static str>,
    started: Instant,
}

impl Exchange {
    pub fn new(req: &Request, conn: &ConnInfo, client: IpAddr, started: Instant) -> Self {
        Self {
            client,
            method: req.method().clone(),
            uri: req.uri().clone(),
            user_agent: req.headers().get(header::USER_AGENT).cloned(),
            version: req.version(),
            tls_version: conn.tls_version,
            started,
        }
    }

    /// Attaches the access line and the metrics to `response`'s body.
    /// `host` is what the client asked for (`-` if nothing usable).
    pub fn finish<B>(
        self,
        response: http::Response<B>,
        host: String,
        upstream: Option<Authority>,
        site: Option<Arc<SiteMetrics>>,
    ) -> Response
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<axum::BoxError>,
    {
        let status = response.status();
        let done = Done {
            method: self.method.clone(),
            status,
            started: self.started,
            site,
            line: Some(Line {
                exchange: self,
                host,
                upstream,
            }),
        };
        response.map(|body| Body::new(AccountedBody::new(body, done)))
    }
}

/// The rest of a `REQUEST` line.
struct Line {
    exchange: Exchange,
    host: String,
    upstream: Option<Authority>,
}

/// Counts a response that the pipeline made before the proxy — the
/// rate limiter's 429, which logs its own `RATE_LIMIT` line instead of
/// `REQUEST` — in `rate_limited_total` and in the per-site request
/// metrics. `host` is the lower-cased host the client asked for.
pub fn count_rate_limited(
    snapshot: &Snapshot,
    host: Option<&str>,
    method: &Method,
    started: Instant,
    response: Response,
) -> Response {
    let Some(site) = snapshot.site_metrics(host) else {
        return response;
    };
    site.rate_limited();
    let done = Done {
        method: method.clone(),
        status: response.status(),
        started,
        site: Some(Arc::clone(site)),
        line: None,
    };
    response.map(|body| Body::new(AccountedBody::new(body, done)))
}

struct Done {
    method: Method,
    status: StatusCode,
    started: Instant,
    site: Option<Arc<SiteMetrics>>,
    line: Option<Line>,
}

/// A response body that counts its bytes and accounts for the request
/// when it is dropped.
struct AccountedBody<B> {
    inner: B,
    sent: u64,
    bytes: Option<IntCounter>,
    done: Done,
}

impl<B> AccountedBody<B> {
    fn new(inner: B, done: Done) -> Self {
        Self {
            inner,
            sent: 0,
            bytes: done.site.as_ref().map(|s| s.response_bytes().clone()),
            done,
        }
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for AccountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let n = data.len() as u64;
            self.sent += n;
            if let Some(bytes) = &self.bytes {
                bytes.inc_by(n);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for AccountedBody<B> {
    fn drop(&mut self) {
        // Read where it lies: taken out of an `Option`, it was copied (312
        // bytes, and the line's details 256 more) on every request.
        let done = &self.done;
        let ended = Instant::now();
        let elapsed = ended.saturating_duration_since(done.started);
        if let Some(site) = &done.site {
            site.request_done(&done.method, done.status, elapsed);
        }
        let Some(line) = done.line.as_ref().filter(|_| RequestLine::wanted()) else {
            return;
        };
        let e = &line.exchange;
        RequestLine {
            client_ip: IpText::new(e.client).as_bytes(),
            host: line.host.as_str(),
            // Only a request for a configured site reaches an upstream.
            site: line.upstream.is_some(),
            method: &e.method,
            path: e.uri.path(),
            status: done.status,
            upstream: line.upstream.as_ref().map_or("-", Authority::as_str),
            duration: elapsed,
            ended,
            bytes_sent: self.sent,
            user_agent: e.user_agent.as_ref().map(HeaderValue::as_bytes),
            tls_version: e.tls_version,
            http_version: e.version,
        }
        .emit();
    }
}

/// A request body that counts the bytes forwarded to the upstream.
pub struct CountedBody {
    inner: Body,
    bytes: IntCounter,
}

impl CountedBody {
    /// Wraps `body` unless it is known to be empty, which most requests are.
    pub fn wrap(body: Body, site: Option<&SiteMetrics>) -> Body {
        match site {
            Some(site) if !body.is_end_stream() => Body::new(Self {
                inner: body,
                bytes: site.request_bytes().clone(),
            }),
            _ => body,
        }
    }
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use axum::response::IntoResponse;
    use http_body_util::BodyExt;

    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;

    /// The rate limiter's side of the contract: its 429 counts as a
    /// request of its site, with its bytes, and as rate limited.
    #[tokio::test]
    async fn rate_limited_responses_count_for_their_site() {
        let config = Config::parse(
            "[server]\n[server.tls]\nmode = \"off\"\n[[sites]]\nhost = \"a.test\"\nupstream = \"http://127.0.0.1:1\"\n",
        )
        .expect("config");
        let metrics = Metrics::new().expect("metrics");
        let snapshot = Snapshot::new(config.dynamic, None, Some(&metrics));
        let refused = (StatusCode::TOO_MANY_REQUESTS, "too many requests\n").into_response();
        let counted = count_rate_limited(
            &snapshot,
            Some("a.test"),
            &Method::POST,
            Instant::now(),
            refused,
        );
        let body = counted
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body.len(), 18);
        let text = metrics.encode();
        for line in [
            "reverse_proxy_rate_limited_total{host=\"a.test\"} 1\n",
            "reverse_proxy_http_requests_total{host=\"a.test\",method=\"POST\",status=\"429\"} 1\n",
            "reverse_proxy_http_response_bytes_total{host=\"a.test\"} 18\n",
            "reverse_proxy_http_request_duration_seconds_count{host=\"a.test\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}

//! Prometheus metrics: the families the admin listener's `/metrics` serves
//! and the handles the request path records into.
//!
//! Metrics exist only when `[admin]` is configured: without a listener
//! nobody could read them, so nothing is recorded and the request path pays
//! nothing. Label cardinality is bounded by the configuration: `host` is a
//! configured site or [`UNKNOWN_HOST`], `method` a standard method or
//! `OTHER`, `status` the numeric code. Per-site handles ([`SiteMetrics`]) are
//! resolved when a configuration snapshot is built, so a request touches
//! atomics only, plus one read-locked lookup for its `{method, status}`
//! counter.
//!
//! The exposition is the Prometheus text format 0.0.4, which every
//! Prometheus version scrapes and `promtool check metrics` lints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use prometheus::core::Collector;
use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::config::DynamicConfig;

/// The `host` label of requests that matched no configured site.
pub const UNKNOWN_HOST: &str = "_unknown";

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// From a cached 1 ms answer to a 60 s long poll.
const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot set up metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Why a request to an upstream failed, as the `kind` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    // The discriminants index `UpstreamMetrics::errors`, in `ALL` order.
    /// The TCP connection could not be opened (refused, unreachable, timed out).
    Connect = 0,
    /// No response head within `response_timeout_secs`.
    Timeout = 1,
    /// The connection broke after it was opened, or the upstream answered
    /// with something that is not a usable response.
    Reset = 2,
}

impl UpstreamErrorKind {
    const ALL: [Self; 3] = [Self::Connect, Self::Timeout, Self::Reset];

    fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
        }
    }
}

/// How a TLS handshake ended, as the `result` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsHandshake {
    Success,
    /// The client or the handshake itself failed (bad hello, no certificate
    /// for the name, protocol error).
    Failure,
    /// The handshake did not finish within the header read timeout.
    Timeout,
}

impl TlsHandshake {
    fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Timeout => "timeout",
        }
    }
}

/// Every metric family of one proxy process.
pub struct Metrics {
    registry: Registry,
    names: Vec<String>,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    response_bytes: IntCounterVec,
    request_bytes: IntCounterVec,
    connections: ConnectionGauges,
    reading: IntGauge,
    open_connections: Mutex<Vec<OpenConnections>>,
    accepted: IntCounter,
    tls_handshakes: IntCounterVec,
    rate_limited: IntCounterVec,
    upstream_errors: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_up: IntGaugeVec,
    probed_hosts: Mutex<Vec<String>>,
    reload_success: IntCounter,
    reload_failure: IntCounter,
    last_reload_success: Gauge,
    last_reload_successful: IntGauge,
    certificate_not_after: IntGaugeVec,
}

/// Counts a listener's open connections (handshaking ones included).
pub type OpenConnections = Box<dyn Fn() -> usize + Send + Sync>;

impl Metrics {
    /// Registers every family. The configuration counts as loaded now.
    pub fn new() -> Result<Self, MetricsError> {
        let mut families = Families::default();
        let requests = families.counter_vec(
            "reverse_proxy_http_requests_total",
            "Requests answered, by site, method and status code.",
            &["host", "method", "status"],
        )?;
        let request_duration = families.histogram_vec(
            "reverse_proxy_http_request_duration_seconds",
            "Time from a request's arrival until its response body was sent, by site.",
            &["host"],
        )?;
        let response_bytes = families.counter_vec(
            "reverse_proxy_http_response_bytes_total",
            "Response body bytes sent to clients, by site.",
            &["host"],
        )?;
        let request_bytes = families.counter_vec(
            "reverse_proxy_http_request_bytes_total",
            "Request body bytes received from clients and forwarded, by site.",
            &["host"],
        )?;
        let connections_vec = families.gauge_vec(
            "reverse_proxy_connections_active",
            "Open client connections: reading a request head (or handshaking), writing (a request in flight), idle (keep-alive, nothing in flight).",
            &["state"],
        )?;
        let accepted = families.counter(
            "reverse_proxy_connections_accepted_total",
            "Client connections accepted.",
        )?;
        let tls_handshakes = families.counter_vec(
            "reverse_proxy_tls_handshakes_total",
            "TLS handshakes, by result (success, failure, timeout).",
            &["result"],
        )?;
        let rate_limited = families.counter_vec(
            "reverse_proxy_rate_limited_total",
            "Requests refused with 429 by the per-client rate limit, by site.",
            &["host"],
        )?;
        let upstream_errors = families.counter_vec(
            "reverse_proxy_upstream_errors_total",
            "Failed upstream requests, by site and kind (connect, timeout, reset).",
            &["host", "kind"],
        )?;
        let upstream_duration = families.histogram_vec(
            "reverse_proxy_upstream_request_duration_seconds",
            "Time until an upstream's response head arrived, by site.",
            &["host"],
        )?;
        let upstream_up = families.gauge_vec(
            "reverse_proxy_upstream_up",
            "Whether a site's upstream accepted a TCP connection at the last scrape or readiness check (1) or not (0).",
            &["host"],
        )?;
        let reloads = families.counter_vec(
            "reverse_proxy_config_reloads_total",
            "Configuration reloads (SIGHUP), by result (success, failure).",
            &["result"],
        )?;
        let last_reload_success = families.gauge(
            "reverse_proxy_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load (start or reload).",
        )?;
        let last_reload_successful = families.int_gauge(
            "reverse_proxy_config_last_reload_successful",
            "Whether the last configuration load succeeded (1) or was rejected (0).",
        )?;
        let certificate_not_after = families.gauge_vec(
            "reverse_proxy_certificate_not_after_timestamp_seconds",
            "Unix time at which a served certificate expires, by its first name.",
            &["name"],
        )?;
        let build_info = families.gauge_vec(
            "reverse_proxy_build_info",
            "Always 1; the labels describe the running build.",
            &["version"],
        )?;
        build_info
            .get_metric_with_label_values(&[env!("CARGO_PKG_VERSION")])?
            .set(1);
        let connections = ConnectionGauges {
            writing: connections_vec.get_metric_with_label_values(&["writing"])?,
            idle: connections_vec.get_metric_with_label_values(&["idle"])?,
        };
        let reading = connections_vec.get_metric_with_label_values(&["reading"])?;
        let reload_success = reloads.get_metric_with_label_values(&["success"])?;
        let reload_failure = reloads.get_metric_with_label_values(&["failure"])?;
        let metrics = Self {
            registry: families.registry,
            names: families.names,
            requests,
            request_duration,
            response_bytes,
            request_bytes,
            connections,
            reading,
            open_connections: Mutex::default(),
            accepted,
            tls_handshakes,
            rate_limited,
            upstream_errors,
            upstream_duration,
            upstream_up,
            probed_hosts: Mutex::default(),
            reload_success,
            reload_failure,
            last_reload_success,
            last_reload_successful,
            certificate_not_after,
        };
        metrics.mark_loaded();
        Ok(metrics)
    }

    /// The names of every family, as they appear in the exposition (the
    /// `_bucket`, `_sum` and `_count` series of histograms not listed).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Resolves the per-site handles for a configuration.
    pub fn sites(&self, config: &DynamicConfig) -> SiteTable {
        SiteTable {
            sites: config
                .sites
                .keys()
                .map(|host| (host.clone(), Arc::new(self.site(host))))
                .collect(),
            unknown: Arc::new(self.site(UNKNOWN_HOST)),
        }
    }

    // `with_label_values` panics only when the number of values differs
    // from the family's label names, which is fixed right here.
    fn site(&self, host: &str) -> SiteMetrics {
        SiteMetrics {
            host: host.to_owned(),
            requests: self.requests.clone(),
            duration: self.request_duration.with_label_values(&[host]),
            response_bytes: self.response_bytes.with_label_values(&[host]),
            request_bytes: self.request_bytes.with_label_values(&[host]),
            rate_limited: self.rate_limited.with_label_values(&[host]),
            // Requests for unknown hosts never reach an upstream.
            upstream: (host != UNKNOWN_HOST).then(|| UpstreamMetrics {
                errors: UpstreamErrorKind::ALL.map(|kind| {
                    self.upstream_errors
                        .with_label_values(&[host, kind.label()])
                }),
                duration: self.upstream_duration.with_label_values(&[host]),
            }),
        }
    }

    /// The gauges one connection moves between as its state changes.
    pub fn connection_gauges(&self) -> ConnectionGauges {
        self.connections.clone()
    }

    /// Adds a listener's open-connection count; connections that are open
    /// but neither writing nor idle are the ones reading.
    pub fn count_open_connections(&self, source: OpenConnections) {
        self.open_connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(source);
    }

    pub fn connection_accepted(&self) {
        self.accepted.inc();
    }

    /// Counts a finished TLS handshake. Called by the TLS accept path.
    pub fn tls_handshake(&self, outcome: TlsHandshake) {
        if let Ok(counter) = self
            .tls_handshakes
            .get_metric_with_label_values(&[outcome.label()])
        {
            counter.inc();
        }
    }

    pub fn reload_succeeded(&self) {
        self.reload_success.inc();
        self.mark_loaded();
    }

    pub fn reload_failed(&self) {
        self.reload_failure.inc();
        self.last_reload_successful.set(0);
    }

    fn mark_loaded(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        self.last_reload_success.set(now.as_secs_f64());
        self.last_reload_successful.set(1);
    }

    /// Records when the certificate named `name` (its first DNS name)
    /// expires. Called whenever a certificate is loaded or renewed.
    pub fn set_certificate_not_after(&self, name: &str, not_after: SystemTime) {
        let secs = match not_after.duration_since(UNIX_EPOCH) {
            Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_secs()).unwrap_or(i64::MAX),
        };
        if let Ok(gauge) = self
            .certificate_not_after
            .get_metric_with_label_values(&[name])
        {
            gauge.set(secs);
        }
    }

    /// Records which sites' upstreams accepted a connection; sites no
    /// longer configured are dropped, so a removed site cannot keep an
    /// alert firing.
    pub fn set_upstreams_up<'a>(&self, results: impl IntoIterator<Item = (&'a str, bool)>) {
        let mut probed = self
            .probed_hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut now = Vec::new();
        for (host, up) in results {
            if let Ok(gauge) = self.upstream_up.get_metric_with_label_values(&[host]) {
                gauge.set(i64::from(up));
            }
            now.push(host.to_owned());
        }
        for gone in probed.iter().filter(|h| !now.contains(h)) {
            // Absent already is fine: nothing to drop.
            let _ = self.upstream_up.remove_label_values(&[gone.as_str()]);
        }
        *probed = now;
    }

    /// The text exposition of every family.
    pub fn encode(&self) -> String {
        let open: usize = self
            .open_connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|count| count())
            .sum();
        let busy = self.connections.writing.get() + self.connections.idle.get();
        let open = i64::try_from(open).unwrap_or(i64::MAX);
        // The counts are read one after another, so a connection closing in
        // between could make this briefly negative.
        self.reading.set((open - busy).max(0));
        let mut text = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!("encoding metrics: {e}");
        }
        text
    }
}

/// Registers families while keeping their names.
#[derive(Default)]
struct Families {
    registry: Registry,
    names: Vec<String>,
}

impl Families {
    fn add<C: Collector + Clone + 'static>(&mut self, collector: C) -> Result<C, MetricsError> {
        for desc in collector.desc() {
            self.names.push(desc.fq_name.clone());
        }
        self.registry.register(Box::new(collector.clone()))?;
        Ok(collector)
    }

    fn counter(&mut self, name: &str, help: &str) -> Result<IntCounter, MetricsError> {
        self.add(IntCounter::with_opts(Opts::new(name, help))?)
    }

    fn counter_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    fn gauge(&mut self, name: &str, help: &str) -> Result<Gauge, MetricsError> {
        self.add(Gauge::with_opts(Opts::new(name, help))?)
    }

    fn int_gauge(&mut self, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
        self.add(IntGauge::with_opts(Opts::new(name, help))?)
    }

    fn gauge_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels)?)
    }

    fn histogram_vec(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<HistogramVec, MetricsError> {
        let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
        self.add(HistogramVec::new(opts, labels)?)
    }
}

/// The two connection states tracked per connection; the third, reading,
/// is what remains of the open connections.
#[derive(Clone)]
pub struct ConnectionGauges {
    pub writing: IntGauge,
    pub idle: IntGauge,
}

/// The handles of every configured site, plus [`UNKNOWN_HOST`].
pub struct SiteTable {
    sites: HashMap<String, Arc<SiteMetrics>>,
    unknown: Arc<SiteMetrics>,
}

impl SiteTable {
    /// The handles for a lower-cased host name; unknown or missing hosts
    /// share the [`UNKNOWN_HOST`] ones.
    pub fn get(&self, host: Option<&str>) -> &Arc<SiteMetrics> {
        host.and_then(|h| self.sites.get(h))
            .unwrap_or(&self.unknown)
    }
}

/// One site's handles, resolved when the configuration was loaded.
pub struct SiteMetrics {
    host: String,
    requests: IntCounterVec,
    duration: Histogram,
    response_bytes: IntCounter,
    request_bytes: IntCounter,
    rate_limited: IntCounter,
    upstream: Option<UpstreamMetrics>,
}

struct UpstreamMetrics {
    errors: [IntCounter; 3],
    duration: Histogram,
}

impl SiteMetrics {
    /// Counts an answered request once its response body is done.
    pub fn request_done(&self, method: &Method, status: StatusCode, elapsed: Duration) {
        let labels = [self.host.as_str(), method_label(method), status.as_str()];
        if let Ok(counter) = self.requests.get_metric_with_label_values(&labels) {
            counter.inc();
        }
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counted as the body streams, so a long download shows as bandwidth
    /// while it runs rather than as a spike at its end.
    pub fn response_bytes(&self) -> &IntCounter {
        &self.response_bytes
    }

    pub fn request_bytes(&self) -> &IntCounter {
        &self.request_bytes
    }

    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        if let Some(upstream) = &self.upstream {
            upstream.errors[kind as usize].inc();
        }
    }

    pub fn upstream_responded(&self, elapsed: Duration) {
        if let Some(upstream) = &self.upstream {
            upstream.duration.observe(elapsed.as_secs_f64());
        }
    }
}

/// The `method` label: standard methods by name, anything else `OTHER`, so
/// a client cannot create series at will.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonstandard_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        let odd = Method::from_bytes(b"PROPFIND").expect("method");
        assert_eq!(method_label(&odd), "OTHER");
    }

    #[test]
    fn certificate_expiry_is_whole_unix_seconds() {
        let metrics = Metrics::new().expect("metrics");
        let at = UNIX_EPOCH + Duration::from_secs(1_893_456_000);
        metrics.set_certificate_not_after("a.test", at);
        let text = metrics.encode();
        assert!(
            text.contains(
                "reverse_proxy_certificate_not_after_timestamp_seconds{name=\"a.test\"} 1893456000\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn upstream_up_forgets_removed_sites() {
        let metrics = Metrics::new().expect("metrics");
        metrics.set_upstreams_up([("a.test", true), ("b.test", false)]);
        metrics.set_upstreams_up([("a.test", true)]);
        let text = metrics.encode();
        assert!(
            text.contains("reverse_proxy_upstream_up{host=\"a.test\"} 1"),
            "{text}"
        );
        assert!(!text.contains("b.test"), "{text}");
    }
}

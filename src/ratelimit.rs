//! Per-client rate limiting with nginx `limit_req rate=R burst=B nodelay`
//! semantics: a fresh client may send `B + 1` requests at once, then `R` per
//! second; anything above that is answered `429` with `Retry-After` at once
//! and never reaches an upstream.
//!
//! Clients are keyed by their IP ([`crate::client_ip`]); IPv6 clients share
//! one bucket per `ipv6_prefix_len` prefix, because one host usually owns a
//! whole /64 and per-address limits would be trivial to dodge. The limiter
//! lives in the reloadable [`Snapshot`](crate::state::Snapshot); a
//! background task drops clients that have been idle for
//! `eviction_age_secs`, so memory stays bounded under floods of addresses.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use futures_util::future::{Either, Ready, ready};
use governor::clock::{Clock, MonotonicClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::{Quota, RateLimiter};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};
use tokio::time::{Instant, MissedTickBehavior};
use tower::{Layer, Service};
use tracing::{debug, warn};

use crate::client_ip::{ClientIp, client_ip};
use crate::config::RateLimitSettings;
use crate::conn_info::ConnInfo;
use crate::logging::ACCESS;
use crate::proxy::access::count_rate_limited;
use crate::proxy::host::request_host;
use crate::state::AppState;

/// Token buckets for every client seen recently, with the quota they are
/// measured against.
///
/// The clock is `std::time::Instant` rather than governor's default TSC
/// clock (quanta): requests are checked on several worker threads, and on
/// virtual machines the TSC read on one CPU can be behind another's by
/// a microsecond or more. A request timed that way finds its client's last
/// token "not yet" there, so a fresh client could get one request less than
/// `burst + 1`. The kernel's monotonic clock never goes back across CPUs.
pub struct Limiter<C: Clock = MonotonicClock> {
    limiter: RateLimiter<IpAddr, Buckets, C, NoOpMiddleware<C::Instant>>,
    /// The same map the limiter updates, kept here so eviction can apply its
    /// own age: governor's `RateLimiter::retain_recent` only knows "as good
    /// as fresh", which ignores `eviction_age_secs`.
    buckets: Buckets,
    /// Read just after the limiter took its own start time. Bucket states
    /// are times relative to that start; measuring from this slightly later
    /// instant can only make eviction keep a client longer, never drop one
    /// early.
    start: C::Instant,
    shape: Shape,
    ipv6_mask: u128,
}

/// The settings that give bucket contents their meaning. While they stay
/// the same, a reload keeps every client's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    requests_per_second: u32,
    burst: u32,
    ipv6_prefix_len: u8,
}

impl Shape {
    fn of(settings: &RateLimitSettings) -> Self {
        Self {
            requests_per_second: settings.requests_per_second,
            burst: settings.burst,
            ipv6_prefix_len: settings.ipv6_prefix_len,
        }
    }
}

/// How long a refused client should wait, in whole seconds (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(u64);

impl RetryAfter {
    /// Rounds up, so a client that waits this long is admitted.
    pub fn from_wait(wait: Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Self(secs.max(1))
    }

    pub fn secs(self) -> u64 {
        self.0
    }
}

impl Limiter {
    /// The limiter `settings` ask for, or `None` when rate limiting is off.
    pub fn from_settings(settings: &RateLimitSettings) -> Option<Self> {
        settings
            .enabled
            .then(|| Self::with_clock(settings, MonotonicClock))
    }
}

impl<C: Clock> Limiter<C> {
    /// A limiter on `clock` (tests use a fake one), whatever `enabled` says.
    pub fn with_clock(settings: &RateLimitSettings, clock: C) -> Self {
        let shape = Shape::of(settings);
        let rate = NonZeroU32::new(shape.requests_per_second).unwrap_or(NonZeroU32::MIN);
        // nginx admits the request that finds the bucket full plus `burst`
        // more; governor's burst is the whole capacity.
        let capacity = NonZeroU32::new(shape.burst.saturating_add(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(rate).allow_burst(capacity);
        let buckets = Buckets::default();
        let limiter = RateLimiter::new(quota, buckets.clone(), clock);
        let start = limiter.clock().now();
        Self {
            limiter,
            buckets,
            start,
            shape,
            ipv6_mask: ipv6_mask(shape.ipv6_prefix_len),
        }
    }

    /// Whether this limiter's buckets still mean the same under `settings`.
    pub fn fits(&self, settings: &RateLimitSettings) -> bool {
        settings.enabled && self.shape == Shape::of(settings)
    }

    /// Takes one token from `client`'s bucket, or says when one will be there.
    pub fn check(&self, client: IpAddr) -> Result<(), RetryAfter> {
        self.limiter
            .check_key(&bucket_key(client, self.ipv6_mask))
            .map_err(|not_until| {
                RetryAfter::from_wait(not_until.wait_time_from(self.limiter.clock().now()))
            })
    }

    /// Drops every client with no admitted request for longer than `age`
    /// and gives the memory back. Returns how many clients are left.
    ///
    /// A bucket's state is the time it will be full again, and it is only
    /// dropped once that time is `age` in the past: the client has been idle
    /// that long and its bucket is as good as fresh, so forgetting it never
    /// hands an abusive client a new burst.
    pub fn evict(&self, age: Duration) -> usize {
        let elapsed = self.limiter.clock().now().duration_since(self.start);
        let drop_below = elapsed.saturating_sub(Nanos::from(age));
        ShrinkableKeyedStateStore::retain_recent(&*self.buckets.0, drop_below);
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.buckets.0);
        self.len()
    }

    /// Clients (or IPv6 prefixes) currently tracked.
    pub fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&*self.buckets.0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buckets the map has room for without growing; eviction shrinks it.
    pub fn capacity(&self) -> usize {
        self.buckets.0.capacity()
    }
}

/// governor's concurrent map of bucket states, shared between the limiter
/// and [`Limiter::evict`].
#[derive(Clone, Default)]
struct Buckets(Arc<DashMapStateStore<IpAddr>>);

impl StateStore for Buckets {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

/// The bucket a client's requests count against: IPv4 addresses as they
/// are, IPv6 addresses cut to their prefix (`ipv6_mask`).
pub fn bucket_key(client: IpAddr, ipv6_mask: u128) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & ipv6_mask)),
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// The netmask of an IPv6 prefix length.
pub fn ipv6_mask(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0)
}

/// Puts the rate limit in front of a service (the proxy handler). It also
/// works out the client IP once and leaves it in the request's extensions
/// as [`ClientIp`], so the proxy logs and forwards the address that was
/// limited.
#[derive(Clone)]
pub struct RateLimitLayer {
    state: AppState,
}

impl RateLimitLayer {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for RateLimit<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let Some(peer) = req.extensions().get::<ConnInfo>().map(|c| c.peer.ip()) else {
            // Not from a listener; the handler answers that itself.
            return Either::Right(self.inner.call(req));
        };
        let snapshot = self.state.snapshot();
        let client = client_ip(peer, req.headers(), &snapshot.config.proxy.trusted_proxies);
        if let Some(limiter) = &snapshot.limiter {
            if let Err(retry) = limiter.check(client) {
                let host = request_host(&req).ok().map(|h| h.name);
                log_refusal(client, host.as_deref(), req.uri().path());
                let response = count_rate_limited(
                    &snapshot,
                    host.as_deref(),
                    req.method(),
                    std::time::Instant::now(),
                    too_many_requests(retry),
                );
                return Either::Left(ready(Ok(response)));
            }
        }
        req.extensions_mut().insert(ClientIp(client));
        Either::Right(self.inner.call(req))
    }
}

fn log_refusal(client: IpAddr, host: Option<&str>, path: &str) {
    warn!(
        target: ACCESS,
        client_ip = %client,
        host = host.unwrap_or("-"),
        path,
        status = StatusCode::TOO_MANY_REQUESTS.as_u16(),
        "RATE_LIMIT"
    );
}

fn too_many_requests(retry: RetryAfter) -> Response {
    let mut response = Response::new(Body::from(
        "too many requests: slow down and retry after the time in Retry-After\n",
    ));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(RETRY_AFTER, HeaderValue::from(retry.secs()));
    response
}

/// Drops idle clients from the current snapshot's limiter every
/// `eviction_interval_secs`, until the task is aborted (the daemon runs it
/// with its background work, which stops with the server).
pub async fn evict_periodically(state: AppState) {
    // Wakes every second and reads the interval from the current snapshot,
    // so a reload that shortens `eviction_interval_secs` applies within a
    // second instead of after the old interval.
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_run = Instant::now();
    loop {
        ticks.tick().await;
        let (limiter, age) = {
            let snapshot = state.snapshot();
            let settings = &snapshot.config.rate_limit;
            if last_run.elapsed() < settings.eviction_interval {
                continue;
            }
            let Some(limiter) = snapshot.limiter.clone() else {
                continue;
            };
            (limiter, settings.eviction_age)
        };
        last_run = Instant::now();
        let before = limiter.len();
        // Scanning a million clients takes about 10 ms: off the workers
        // that serve requests.
        match tokio::task::spawn_blocking(move || limiter.evict(age)).await {
            Ok(left) => debug!(
                evicted = before.saturating_sub(left),
                clients = left,
                "RATE_LIMIT_EVICTION"
            ),
            Err(e) => warn!("rate-limit eviction failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::net::Ipv4Addr;

    fn settings(rps: u32, burst: u32) -> RateLimitSettings {
        RateLimitSettings {
            enabled: true,
            requests_per_second: rps,
            burst,
            ipv6_prefix_len: 64,
            eviction_interval: Duration::from_secs(60),
            eviction_age: Duration::from_secs(300),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn admitted(limiter: &Limiter<FakeRelativeClock>, client: IpAddr, n: usize) -> usize {
        (0..n).filter(|_| limiter.check(client).is_ok()).count()
    }

    #[test]
    fn nginx_burst_then_rate() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(&settings(10, 20), clock.clone());
        let client = ip("203.0.113.7");
        assert_eq!(admitted(&limiter, client, 30), 21);
        clock.advance(Duration::from_millis(100));
        assert_eq!(admitted(&limiter, client, 5), 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(admitted(&limiter, client, 30), 10);
        clock.advance(Duration::from_secs(60));
        assert_eq!(admitted(&limiter, client, 30), 21);
    }

    /// Threads racing for the last tokens of a bucket: exactly `burst + 1`
    /// pass, however their clock readings and updates interleave.
    #[test]
    fn concurrent_checks_admit_exactly_the_burst() {
        for trial in 0..500 {
            let limiter = Limiter::from_settings(&settings(1, 1)).expect("enabled");
            let client = ip("192.0.2.1");
            let start = std::sync::Barrier::new(4);
            let admitted: usize = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..4)
                    .map(|_| {
                        scope.spawn(|| {
                            start.wait();
                            usize::from(limiter.check(client).is_ok())
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().expect("worker")).sum()
            });
            assert_eq!(admitted, 2, "trial {trial}");
        }
    }

    #[test]
    fn burst_of_one_is_two_at_once() {
        let limiter = Limiter::with_clock(&settings(1, 1), FakeRelativeClock::default());
        assert_eq!(admitted(&limiter, ip("192.0.2.1"), 10), 2);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(&settings(10, 1), clock.clone());
        let client = ip("192.0.2.1");
        assert_eq!(admitted(&limiter, client, 2), 2);
        assert_eq!(limiter.check(client), Err(RetryAfter(1)));
        assert_eq!(RetryAfter::from_wait(Duration::from_millis(1)).secs(), 1);
        assert_eq!(RetryAfter::from_wait(Duration::from_millis(1001)).secs(), 2);
        assert_eq!(RetryAfter::from_wait(Duration::from_secs(3)).secs(), 3);
        assert_eq!(RetryAfter::from_wait(Duration::ZERO).secs(), 1);
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_prefix() {
        let mask = ipv6_mask(64);
        assert_eq!(
            bucket_key(ip("2001:db8:1:2:aaaa::1"), mask),
            bucket_key(ip("2001:db8:1:2:ffff::9"), mask)
        );
        assert_ne!(
            bucket_key(ip("2001:db8:1:2::1"), mask),
            bucket_key(ip("2001:db8:1:3::1"), mask)
        );
        assert_eq!(
            bucket_key(ip("2001:db8:1:2::1"), mask),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            bucket_key(ip("2001:db8::1"), ipv6_mask(128)),
            ip("2001:db8::1")
        );
        assert_eq!(bucket_key(ip("2001:db8:ff::1"), ipv6_mask(1)), ip("::"));
        assert_eq!(
            bucket_key(ip("2001:db8:ff::1"), ipv6_mask(48)),
            ip("2001:db8:ff::")
        );
    }

    #[test]
    fn ipv4_and_mapped_ipv4_are_one_client() {
        let mask = ipv6_mask(64);
        assert_eq!(
            bucket_key(ip("::ffff:203.0.113.7"), mask),
            ip("203.0.113.7")
        );
        // Two IPv4 clients in what would be one /64 if IPv4 were masked.
        assert_ne!(
            bucket_key(ip("203.0.113.7"), mask),
            bucket_key(ip("203.0.113.8"), mask)
        );

        let limiter = Limiter::with_clock(&settings(1, 1), FakeRelativeClock::default());
        assert_eq!(admitted(&limiter, ip("::ffff:203.0.113.7"), 1), 1);
        assert_eq!(admitted(&limiter, ip("203.0.113.7"), 5), 1);
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn same_prefix_shares_and_other_prefix_does_not() {
        let limiter = Limiter::with_clock(&settings(1, 1), FakeRelativeClock::default());
        assert_eq!(admitted(&limiter, ip("2001:db8:7::1"), 1), 1);
        assert_eq!(admitted(&limiter, ip("2001:db8:7::2"), 5), 1);
        assert_eq!(admitted(&limiter, ip("2001:db8:8::1"), 5), 2);
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn eviction_drops_100k_idle_clients_and_shrinks() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(&settings(10, 20), clock.clone());
        let hot = IpAddr::V4(Ipv4Addr::new(10, 255, 255, 255));
        for i in 0..100_000u32 {
            assert!(
                limiter
                    .check(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
                    .is_ok()
            );
        }
        assert!(limiter.check(hot).is_ok());
        assert_eq!(limiter.len(), 100_001);
        let grown = limiter.capacity();

        // Younger than the age: nothing goes.
        let age = Duration::from_secs(300);
        clock.advance(Duration::from_secs(299));
        assert_eq!(limiter.evict(age), 100_001);

        // One client stays busy; the rest have been idle for longer than
        // the age.
        clock.advance(Duration::from_secs(2));
        assert!(limiter.check(hot).is_ok());
        assert_eq!(limiter.evict(age), 1);
        assert!(
            limiter.capacity() < grown / 100,
            "capacity {} not given back (was {grown})",
            limiter.capacity()
        );

        // An evicted client starts with a full bucket, as it would have anyway.
        assert_eq!(admitted(&limiter, ip("10.0.0.1"), 30), 21);
    }

    #[test]
    fn eviction_never_forgets_a_client_whose_bucket_is_not_full() {
        let clock = FakeRelativeClock::default();
        let limiter = Limiter::with_clock(&settings(1, 20), clock.clone());
        let client = ip("192.0.2.9");
        assert_eq!(admitted(&limiter, client, 30), 21);
        // Idle for 5 s, longer than the age, but the bucket needs 21 s to
        // fill up again: forgetting it now would grant a fresh burst.
        clock.advance(Duration::from_secs(5));
        assert_eq!(limiter.evict(Duration::from_secs(1)), 1);
        assert_eq!(admitted(&limiter, client, 30), 5);
        clock.advance(Duration::from_secs(60));
        assert_eq!(limiter.evict(Duration::from_secs(1)), 0);
    }

    #[test]
    fn reload_keeps_buckets_only_for_the_same_shape() {
        let limiter = Limiter::with_clock(&settings(10, 20), FakeRelativeClock::default());
        let mut same = settings(10, 20);
        same.eviction_age = Duration::from_secs(5);
        same.eviction_interval = Duration::from_secs(1);
        assert!(limiter.fits(&same));
        assert!(!limiter.fits(&settings(11, 20)));
        assert!(!limiter.fits(&settings(10, 21)));
        let mut prefix = settings(10, 20);
        prefix.ipv6_prefix_len = 56;
        assert!(!limiter.fits(&prefix));
        let mut off = settings(10, 20);
        off.enabled = false;
        assert!(!limiter.fits(&off));
        assert!(Limiter::from_settings(&off).is_none());
    }
}

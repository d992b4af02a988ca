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

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use dashmap::DashMap;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, StatusCode};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, warn};

use crate::config::RateLimitSettings;
use crate::logging::ACCESS;
use crate::proxy::access::count_rate_limited;
use crate::proxy::host::request_host;
use crate::state::{AppState, Snapshot};

/// Where a limiter reads the time: nanoseconds since it was created.
pub trait Clock: Send + Sync {
    fn nanos(&self) -> u64;
}

/// The kernel's monotonic clock (`std::time::Instant`).
///
/// Not the CPU's time-stamp counter read directly: requests are checked on
/// several worker threads, and on virtual machines the counter read on one
/// CPU can be behind another's by a microsecond or more. The kernel's
/// monotonic clock never goes back across CPUs, which [`Limiter::check`]
/// relies on.
pub struct MonotonicClock(std::time::Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        Self(std::time::Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn nanos(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Token buckets for every client seen recently, with the quota they are
/// measured against.
///
/// Each bucket is one number, GCRA's "theoretical arrival time": the clock
/// reading at which the bucket is full again (0 for a new client). A
/// request at `now` takes a token if that time is at most `tolerance`
/// ahead of `now`, and pushes it `interval` further.
pub struct Limiter<C: Clock = MonotonicClock> {
    buckets: DashMap<IpAddr, AtomicU64>,
    clock: C,
    /// Nanoseconds for one token to come back (1 s / requests_per_second).
    interval: u64,
    /// How far ahead a full bucket may be pushed: `burst` intervals, so a
    /// fresh client gets `burst + 1` requests at once.
    tolerance: u64,
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
            .then(|| Self::with_clock(settings, MonotonicClock::default()))
    }
}

impl<C: Clock> Limiter<C> {
    /// A limiter on `clock` (tests use a fake one), whatever `enabled` says.
    pub fn with_clock(settings: &RateLimitSettings, clock: C) -> Self {
        let shape = Shape::of(settings);
        // At least a nanosecond: a zero interval would admit everything.
        let interval = (1_000_000_000 / u64::from(shape.requests_per_second.max(1))).max(1);
        Self {
            buckets: DashMap::new(),
            clock,
            interval,
            tolerance: interval.saturating_mul(u64::from(shape.burst)),
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
        let key = bucket_key(client, self.ipv6_mask);
        if let Some(bucket) = self.buckets.get(&key) {
            return self.take(&bucket);
        }
        self.take(&self.buckets.entry(key).or_default())
    }

    /// The clock is read after every load of the bucket, so a request that
    /// finds another one's update has a reading no earlier than the time
    /// that update was made with. Reading it once up front would let two
    /// requests that arrive together update in the opposite order to their
    /// readings, and the one with the earlier reading would find the last
    /// token of a burst "not yet" there.
    fn take(&self, bucket: &AtomicU64) -> Result<(), RetryAfter> {
        let mut full_at = bucket.load(Ordering::Acquire);
        loop {
            let now = self.clock.nanos();
            let earliest = full_at.saturating_sub(self.tolerance);
            if now < earliest {
                return Err(RetryAfter::from_wait(Duration::from_nanos(earliest - now)));
            }
            let next = full_at.max(now).saturating_add(self.interval);
            match bucket.compare_exchange_weak(full_at, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }

    /// Drops every client with no admitted request for longer than `age`
    /// and gives the memory back. Returns how many clients are left.
    ///
    /// A bucket is only dropped once the time it is full again is `age` in
    /// the past: the client has been idle that long and its bucket is as
    /// good as fresh, so forgetting it never hands an abusive client a new
    /// burst.
    pub fn evict(&self, age: Duration) -> usize {
        let age = u64::try_from(age.as_nanos()).unwrap_or(u64::MAX);
        let drop_below = self.clock.nanos().saturating_sub(age);
        self.buckets
            .retain(|_, full_at| *full_at.get_mut() > drop_below);
        self.buckets.shrink_to_fit();
        self.len()
    }

    /// Clients (or IPv6 prefixes) currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Buckets the map has room for without growing; eviction shrinks it.
    pub fn capacity(&self) -> usize {
        self.buckets.capacity()
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

/// Takes a token from `client`'s bucket for `req`, or, when it has none
/// left, logs the refusal and returns the `429` to answer instead. `None`
/// also when rate limiting is off.
pub fn refuse(snapshot: &Snapshot, client: IpAddr, req: &Request) -> Option<Response> {
    let retry = snapshot.limiter.as_ref()?.check(client).err()?;
    let host = request_host(req).ok().map(|h| h.name);
    log_refusal(client, host.as_deref(), req.uri().path());
    Some(count_rate_limited(
        snapshot,
        host.as_deref(),
        req.method(),
        std::time::Instant::now(),
        too_many_requests(retry),
    ))
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
    use std::net::Ipv4Addr;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};

    /// How long the race test waits for either of its two requests.
    const WAIT: Duration = Duration::from_secs(10);

    /// A clock that moves only when told to, or by `step` nanoseconds at
    /// every reading, and can run a hook at its next reading.
    #[derive(Clone, Default)]
    struct TestClock(Arc<TestClockState>);

    #[derive(Default)]
    struct TestClockState {
        now: AtomicU64,
        step: u64,
        on_next_read: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl TestClock {
        fn stepping() -> Self {
            Self(Arc::new(TestClockState {
                step: 1,
                ..TestClockState::default()
            }))
        }

        fn advance(&self, by: Duration) {
            let by = u64::try_from(by.as_nanos()).expect("short test durations");
            self.0.now.fetch_add(by, Ordering::SeqCst);
        }

        /// Runs `hook` after the next reading is taken, before it is
        /// returned: as if the reader were paused there.
        fn on_next_read(&self, hook: impl FnOnce() + Send + 'static) {
            *self.0.on_next_read.lock().expect("lock") = Some(Box::new(hook));
        }
    }

    impl Clock for TestClock {
        fn nanos(&self) -> u64 {
            let now = self.0.now.fetch_add(self.0.step, Ordering::SeqCst);
            let hook = self.0.on_next_read.lock().expect("lock").take();
            if let Some(hook) = hook {
                hook();
            }
            now
        }
    }

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

    fn admitted(limiter: &Limiter<TestClock>, client: IpAddr, n: usize) -> usize {
        (0..n).filter(|_| limiter.check(client).is_ok()).count()
    }

    #[test]
    fn nginx_burst_then_rate() {
        let clock = TestClock::default();
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

    /// The deterministic form of the race above: a request reads the
    /// clock, and before it updates the bucket another request takes a
    /// token with a later reading. Both get one of the two tokens.
    #[test]
    fn a_request_overtaken_after_reading_the_clock_still_gets_its_token() {
        let clock = TestClock::stepping();
        let limiter = Limiter::with_clock(&settings(1, 1), clock.clone());
        let client = ip("192.0.2.1");
        // An existing client whose bucket has refilled: the check below
        // finds it without creating it.
        assert_eq!(admitted(&limiter, client, 1), 1);
        clock.advance(Duration::from_secs(5));

        let (overtake, overtaking) = mpsc::channel::<()>();
        let (overtaken, done) = mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let limiter = &limiter;
            let other = scope.spawn(move || {
                overtaking
                    .recv_timeout(WAIT)
                    .expect("paused request's signal");
                let result = limiter.check(client);
                overtaken.send(()).expect("signal back");
                result
            });
            clock.on_next_read(move || {
                overtake.send(()).expect("signal");
                // Bounded: were the other request ever to wait for this
                // one's lock, the test fails instead of hanging.
                done.recv_timeout(WAIT).expect("the other request finished");
            });
            assert_eq!(limiter.check(client), Ok(()), "the overtaken request");
            assert_eq!(other.join().expect("thread"), Ok(()), "the other one");
        });
        assert_eq!(limiter.check(client), Err(RetryAfter(1)));
    }

    #[test]
    fn burst_of_one_is_two_at_once() {
        let limiter = Limiter::with_clock(&settings(1, 1), TestClock::default());
        assert_eq!(admitted(&limiter, ip("192.0.2.1"), 10), 2);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let clock = TestClock::default();
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

        let limiter = Limiter::with_clock(&settings(1, 1), TestClock::default());
        assert_eq!(admitted(&limiter, ip("::ffff:203.0.113.7"), 1), 1);
        assert_eq!(admitted(&limiter, ip("203.0.113.7"), 5), 1);
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn same_prefix_shares_and_other_prefix_does_not() {
        let limiter = Limiter::with_clock(&settings(1, 1), TestClock::default());
        assert_eq!(admitted(&limiter, ip("2001:db8:7::1"), 1), 1);
        assert_eq!(admitted(&limiter, ip("2001:db8:7::2"), 5), 1);
        assert_eq!(admitted(&limiter, ip("2001:db8:8::1"), 5), 2);
        assert_eq!(limiter.len(), 2);
    }

    #[test]
    fn eviction_drops_100k_idle_clients_and_shrinks() {
        let clock = TestClock::default();
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
        let clock = TestClock::default();
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
        let limiter = Limiter::with_clock(&settings(10, 20), TestClock::default());
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

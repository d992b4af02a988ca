//! Per-connection activity, for the idle timeout: how many requests on the
//! connection are still being answered, and when the last one finished. A
//! connection is idle only when nothing is in flight — a slow upstream or a
//! long download is not idleness.
//!
//! Bytes on the wire deliberately do not count toward idleness: HTTP/2
//! keep-alive PINGs (our own and their acknowledgements) would otherwise
//! keep an unused connection open for ever, and a client could do the same
//! with a trickle of control frames. A request head that is still arriving
//! is bounded by the header read timeout instead.
//!
//! The opposite stall is tracked too: a client that stops reading its
//! response. hyper then stops taking frames from the response body
//! (backpressure), so a body frame that has been handed over and not
//! followed by another pull for a long time means the client side is stuck.
//!
//! The same events drive the `connections_active{state}` gauges, as nginx's
//! `stub_status` counts them: writing while a request is in flight, idle
//! between requests, reading again once bytes of the next request arrive.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

use crate::metrics::ConnectionGauges;

const READING: u8 = 0;
const WRITING: u8 = 1;
const IDLE: u8 = 2;

pub struct Activity {
    origin: Instant,
    /// Milliseconds since `origin` when the last request finished (or the
    /// connection opened).
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Response bodies whose last frame was handed to hyper and which have
    /// not been asked for the next one yet.
    handed_off: AtomicUsize,
    /// Milliseconds since `origin` when hyper last asked a response body on
    /// this connection for a frame.
    last_pull_ms: AtomicU64,
    /// READING, WRITING or IDLE; only kept up when `gauges` is set.
    state: AtomicU8,
    gauges: Option<ConnectionGauges>,
}

impl Activity {
    pub fn new(gauges: Option<ConnectionGauges>) -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            handed_off: AtomicUsize::new(0),
            last_pull_ms: AtomicU64::new(0),
            state: AtomicU8::new(READING),
            gauges,
        })
    }

    /// When the connection opened.
    pub fn opened(&self) -> Instant {
        self.origin
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes of a request arrived: an idle connection is reading again.
    fn bytes_read(&self) {
        if self.gauges.is_some() && self.state.load(Ordering::Relaxed) == IDLE {
            self.enter(IDLE, READING);
        }
    }

    /// Moves the connection to `to` if it is in `from` (`None`: any state),
    /// keeping the gauges in step with the stored state.
    fn enter_from(&self, from: Option<u8>, to: u8) {
        let Some(gauges) = &self.gauges else { return };
        let previous = match from {
            Some(from) => {
                match self
                    .state
                    .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(previous) => previous,
                    Err(_) => return,
                }
            }
            None => self.state.swap(to, Ordering::Relaxed),
        };
        if previous == to {
            return;
        }
        if let Some(g) = gauge(gauges, previous) {
            g.dec();
        }
        if let Some(g) = gauge(gauges, to) {
            g.inc();
        }
    }

    fn enter(&self, from: u8, to: u8) {
        self.enter_from(Some(from), to);
    }

    /// When the client counts as having stopped reading if no response
    /// body is pulled before then; `None` while nothing waits on it.
    pub fn write_stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.handed_off.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_pull_ms.load(Ordering::Relaxed));
        Some(self.origin + last + timeout)
    }

    /// When the connection counts as idle if no request starts before then;
    /// `None` while a request is in flight.
    pub fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.origin + last + idle)
    }

    /// Whether a request on the connection is being answered.
    pub fn answering(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    pub fn start_request(self: &Arc<Self>) -> InFlight {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.enter_from(None, WRITING);
        }
        InFlight(Arc::clone(self))
    }
}

/// Reading has no gauge of its own: it is what remains of the open
/// connections (see `Metrics::encode`), which also covers TLS handshakes.
fn gauge(gauges: &ConnectionGauges, state: u8) -> Option<&prometheus::IntGauge> {
    match state {
        WRITING => Some(&gauges.writing),
        IDLE => Some(&gauges.idle),
        _ => None,
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.enter_from(None, READING);
    }
}

/// Held until a response body has been sent (or dropped).
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.enter(WRITING, IDLE);
            // An HTTP/2 stream may have started between the two steps.
            if self.0.in_flight.load(Ordering::Relaxed) > 0 {
                self.0.enter(IDLE, WRITING);
            }
        }
    }
}

/// A response body that keeps its request counted as in flight and reports
/// when the client side stops pulling it.
pub struct TrackedBody {
    inner: axum::body::Body,
    in_flight: InFlight,
    /// A frame was handed over and the next one not asked for yet.
    handed_off: bool,
}

impl TrackedBody {
    pub fn new(inner: axum::body::Body, in_flight: InFlight) -> Self {
        Self {
            inner,
            in_flight,
            handed_off: false,
        }
    }

    fn set_handed_off(&mut self, handed_off: bool) {
        if self.handed_off == handed_off {
            return;
        }
        self.handed_off = handed_off;
        let counter = &self.in_flight.0.handed_off;
        if handed_off {
            counter.fetch_add(1, Ordering::Relaxed);
        } else {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let activity = &self.in_flight.0;
        activity
            .last_pull_ms
            .store(activity.now_ms(), Ordering::Relaxed);
        self.set_handed_off(false);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) {
            self.set_handed_off(true);
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

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.set_handed_off(false);
    }
}

/// An I/O stream that notices request bytes arriving, for the connection
/// state gauges. Writes pass straight through.
pub struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> TrackedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        result
    }
}

write_through!(TrackedIo);

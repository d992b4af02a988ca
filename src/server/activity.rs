//! Per-connection activity, for the idle timeout: when the connection last
//! moved a byte, and how many requests on it are still being answered. A
//! connection is idle only when nothing is in flight and nothing moved —
//! a slow upstream or a long download is not idleness.
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
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::ConnectionGauges;

const READING: u8 = 0;
const WRITING: u8 = 1;
const IDLE: u8 = 2;

pub struct Activity {
    origin: Instant,
    /// Milliseconds since `origin` of the last byte read or written.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
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
            state: AtomicU8::new(READING),
            gauges,
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn touch_read(&self) {
        self.touch();
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

    /// When the connection counts as idle if nothing happens before then;
    /// `None` while a request is in flight.
    pub fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.origin + last + idle)
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

/// A response body that keeps its request counted as in flight.
pub struct TrackedBody {
    pub inner: axum::body::Body,
    pub _in_flight: InFlight,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An I/O stream that records when bytes last moved.
pub struct TrackedIo<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> TrackedIo<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        activity.touch();
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
            self.activity.touch_read();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

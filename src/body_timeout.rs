//! Request bodies that stop arriving. A client that sends a request head
//! and then a trickle of body (or nothing) would otherwise hold a
//! connection, an upstream connection and the upstream's worker for as long
//! as it likes. [`TimedBody`] ends such a body with [`BodyStalled`] once no
//! data has arrived for `body_read_timeout_secs`; the proxy recognises that
//! error and answers `408`.
//!
//! Only time spent waiting on the client counts: while the upstream is not
//! reading (backpressure), the body is not polled and no clock runs. A body
//! that keeps flowing, however slowly overall, is never cut.

use std::error::Error;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn Error + Send + Sync>;

/// The error a stalled body ends with.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no request body data from the client for {} s", .0.as_secs())]
pub struct BodyStalled(pub Duration);

impl BodyStalled {
    /// Finds a `BodyStalled` anywhere in an error's source chain (the
    /// upstream client wraps the body's error in its own).
    pub fn find(error: &(dyn Error + 'static)) -> Option<Self> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(stalled) = e.downcast_ref::<Self>() {
                return Some(*stalled);
            }
            current = e.source();
        }
        None
    }
}

/// A request body with a limit on the gap between two frames.
pub struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    /// Created at the first wait, so bodiless requests allocate nothing.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether the clock is running for the frame being waited for.
    waiting: bool,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: None,
            waiting: false,
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let deadline = Instant::now() + this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.waiting {
            this.waiting = true;
            sleep.as_mut().reset(deadline);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
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
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    type Frames =
        Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>> + Send>>;

    /// A body fed frame by frame through a channel.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>,
        StreamBody<Frames>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        (tx, StreamBody::new(Box::pin(frames)))
    }

    #[tokio::test(start_paused = true)]
    async fn flowing_body_is_not_cut_but_a_gap_is() {
        let (tx, body) = channel_body();
        let mut body = TimedBody::new(body, Duration::from_secs(10));
        for _ in 0..5 {
            // 8 s gaps: each under the limit, 40 s in total.
            let send = async {
                tokio::time::sleep(Duration::from_secs(8)).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                    .await
                    .ok();
            };
            let (frame, ()) = tokio::join!(body.frame(), send);
            assert!(frame.expect("frame").is_ok());
        }
        let started = Instant::now();
        let err = body.frame().await.expect("frame").expect_err("stalled");
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(BodyStalled::find(err.as_ref()).is_some());
    }
}

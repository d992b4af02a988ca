//! Gathers what an HTTP/2 connection writes during one poll into one write.
//!
//! h2 keeps a DATA frame of 256 bytes or more apart from its buffer and
//! flushes before it encodes the next frame, so each response went to the
//! socket on its own: over TLS its own record and its own `writev`, where
//! ten streams answered in one poll could share one. [`Gathering`] is the
//! socket as hyper sees it: writes land in a buffer and flushes wait;
//! [`Gathered`] is the connection as the server polls it: after each poll
//! of hyper's connection it writes out what was gathered, so nothing waits
//! longer than the poll that wrote it. The buffer is bounded ([`LIMIT`]):
//! past it a write first waits for the socket, so a client that stops
//! reading holds the connection back as it did before.
//!
//! The buffer is allocated at the first write it keeps (h2's SETTINGS,
//! so at once) and kept for the connection's life, as h2 keeps its own:
//! [`LIMIT`] bytes per HTTP/2 connection.
//!
//! Both halves share the socket behind a mutex. The connection and the
//! server's loop are polled by the same task, so the lock is never
//! contended and is never held across a poll of anything but the socket.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Gathered bytes beyond which a write goes out first: one full TLS record.
const LIMIT: usize = 16 * 1024;

/// Wraps `io` for a connection: hyper gets the [`Gathering`] half, and the
/// other half goes into [`Gathered::new`] with hyper's connection.
pub fn gather<T>(io: T) -> (Gathering<T>, Outlet<T>) {
    let shared = Arc::new(Mutex::new(Shared {
        io,
        pending: Vec::new(),
        unflushed: false,
        failed: None,
    }));
    (Gathering(Arc::clone(&shared)), Outlet(shared))
}

/// The socket as hyper's connection sees it.
pub struct Gathering<T>(Arc<Mutex<Shared<T>>>);

/// The server's side of the socket: where what was gathered goes out.
pub struct Outlet<T>(Arc<Mutex<Shared<T>>>);

/// A connection whose gathered writes go out after each of its polls.
pub struct Gathered<C, T> {
    conn: C,
    outlet: Outlet<T>,
    /// How hyper's connection ended, kept while its last bytes go out.
    ended: Option<hyper::Result<()>>,
}

struct Shared<T> {
    io: T,
    /// Accepted from the connection, not yet given to the socket.
    pending: Vec<u8>,
    /// Something went to the socket since it was last flushed.
    unflushed: bool,
    /// A failure to write out after the connection's poll; the
    /// connection's next read or write reports it.
    failed: Option<io::Error>,
}

fn lock<T>(shared: &Mutex<Shared<T>>) -> MutexGuard<'_, Shared<T>> {
    // Nothing between lock and unlock leaves the state half-changed, so a
    // panic elsewhere while it was held does not make it unusable.
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: AsyncWrite + Unpin> Shared<T> {
    fn take_failure(&mut self) -> io::Result<()> {
        self.failed.take().map_or(Ok(()), Err)
    }

    /// Keeps `buf` to write out later; [`Self::poll_room`] made room for it.
    fn keep(&mut self, buf: &[u8]) {
        if self.pending.capacity() == 0 {
            // Sized once for the connection: it never holds more.
            self.pending.reserve_exact(LIMIT);
        }
        self.pending.extend_from_slice(buf);
    }

    /// Gives everything gathered to the socket.
    fn poll_give(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
            self.unflushed = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Gives everything gathered to the socket and flushes it.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_give(cx))?;
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Makes room for `len` more bytes. `Ready(false)` means they go
    /// straight to the socket: there is nothing gathered to keep them
    /// behind, and gathering them would only copy them.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        self.take_failure()?;
        if self.pending.len() + len <= LIMIT {
            return Poll::Ready(Ok(true));
        }
        ready!(self.poll_give(cx))?;
        Poll::Ready(Ok(len < LIMIT))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Gathering<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        shared.take_failure()?;
        Pin::new(&mut shared.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gathering<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut shared = lock(&self.0);
        if ready!(shared.poll_room(cx, buf.len()))? {
            shared.keep(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(&mut shared.io).poll_write(cx, buf))?;
        shared.unflushed = true;
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|buf| buf.len()).sum();
        let mut shared = lock(&self.0);
        if ready!(shared.poll_room(cx, len))? {
            for buf in bufs {
                shared.keep(buf);
            }
            return Poll::Ready(Ok(len));
        }
        let n = ready!(Pin::new(&mut shared.io).poll_write_vectored(cx, bufs))?;
        shared.unflushed = true;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // [`Gathered`] flushes once the connection's poll is over.
        Poll::Ready(lock(&self.0).take_failure())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut shared = lock(&self.0);
        shared.take_failure()?;
        ready!(shared.poll_write_out(cx))?;
        Pin::new(&mut shared.io).poll_shutdown(cx)
    }
}

impl<C, T> Gathered<C, T> {
    pub fn new(conn: C, outlet: Outlet<T>) -> Self {
        Self {
            conn,
            outlet,
            ended: None,
        }
    }

    pub fn conn(&mut self) -> &mut C {
        &mut self.conn
    }
}

impl<C, T> Future for Gathered<C, T>
where
    C: Future<Output = hyper::Result<()>> + Unpin,
    T: AsyncWrite + Unpin,
{
    type Output = hyper::Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<hyper::Result<()>> {
        let this = &mut *self;
        if this.ended.is_none() {
            match this.conn.poll_unpin(cx) {
                Poll::Ready(output) => this.ended = Some(output),
                Poll::Pending => {
                    let mut shared = lock(&this.outlet.0);
                    if shared.failed.is_none()
                        && let Poll::Ready(Err(e)) = shared.poll_write_out(cx)
                    {
                        shared.failed = Some(e);
                        // Poll the connection again, so that it learns of
                        // the failure from its next read or write.
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            }
        }
        // hyper's connection may end without shutting the socket down (h2
        // does when the client's side closed first): what it wrote last
        // still goes out, or fails to, before the connection counts as
        // ended. The server's stall and idle timers bound the wait.
        let mut shared = lock(&this.outlet.0);
        if shared.failed.is_none() {
            // A failure here changes nothing: the connection is over.
            let _ = ready!(shared.poll_write_out(cx));
        }
        drop(shared);
        match this.ended.take() {
            Some(output) => Poll::Ready(output),
            None => Poll::Pending,
        }
    }
}

//! Where HTTP/1 request heads begin and end, below hyper: ambiguous
//! framing is refused there, and a head gets `header_read_timeout_secs` to
//! arrive.
//!
//! hyper settles a request that carries both `Content-Length` and
//! `Transfer-Encoding` the way RFC 9112 §6.1 allows (the transfer coding
//! wins, the length is dropped), and it merges repeated identical
//! `Content-Length` fields. Either way the request is forwarded and no trace
//! of the conflict reaches the proxy. Such requests are the classic
//! smuggling vector between a front proxy and an upstream that settles them
//! differently, so the proxy refuses them as nginx and HAProxy do: `400`,
//! the connection closed, nothing forwarded.
//!
//! The guard follows message boundaries in the bytes hyper reads (heads,
//! fixed-length and chunked bodies) and parses each head with httparse, the
//! parser hyper uses. Bytes pass through at once; a head that arrives in
//! pieces is copied aside until it is complete. The rest of a refused head
//! is replaced by bytes no HTTP parser accepts: hyper answers every earlier
//! pipelined request, then `400` for the refused one, then closes. Whatever
//! the guard does not follow (upgrades, HTTP/2, input hyper rejects by
//! itself) ends the inspection, and hyper's own checks apply from there.
//!
//! The head timeout lives here too, because hyper's own runs from the end
//! of one response to the end of the next head: it would also close every
//! idle keep-alive connection after `header_read_timeout_secs`, long before
//! `idle_timeout_secs`. Here, as in nginx, the clock starts when the
//! connection is ready for its first request, or when the first byte of a
//! later head arrives; waiting between requests is the idle timeout's
//! business. A head not complete in time ends the connection.

use std::cmp::min;
use std::io;
use std::mem::{MaybeUninit, take};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info};

use super::activity::Activity;

use super::MAX_HEADERS;
use crate::body_framing::{Chunk, Step, parse_length};

/// What hyper is handed instead of (the rest of) a refused head. A NUL is
/// invalid at every position of a request head, so hyper fails to parse
/// whatever part of the head it already holds followed by this, and answers
/// `400` and closes.
const UNPARSABLE: &[u8] = b"\0\r\n\r\n";
/// How often one head that arrives in pieces is parsed again before the
/// guard stops inspecting the connection, so a client trickling a large
/// head costs linear time. hyper's own limits still apply to such a head.
const MAX_PARSES_PER_HEAD: u32 = 64;

/// An HTTP/1 connection's byte stream with request framing checked.
pub struct FramingGuard<I> {
    inner: I,
    state: State,
    /// A copy of a request head that is not complete yet (hyper has it too).
    partial: Vec<u8>,
    /// Times the head in `partial` was parsed.
    parses: u32,
    max_head: usize,
    peer: IpAddr,
    head_timeout: Duration,
    /// Set while a head is awaited: the first one, or one that has begun.
    head_deadline: Option<Instant>,
    /// The timer for `head_deadline`, made when first needed.
    timer: Option<Pin<Box<Sleep>>>,
    activity: Arc<Activity>,
}

enum State {
    Head,
    Fixed(u64),
    Chunked(Chunk),
    /// Not inspecting (any more): bytes go straight through.
    Off,
    /// A request was refused: the unparsable head is handed over from this
    /// offset, then the stream ends.
    Refused(usize),
}

/// The outcome of inspecting a run of bytes.
enum Inspected {
    /// Everything may go to hyper.
    Clear,
    /// Bytes before the offset may go; a head starts there and is incomplete.
    Incomplete(usize),
    /// Bytes before the offset may go; the head starting there is refused.
    Refused(usize),
}

/// Why a head was refused, as the log line says it.
#[derive(Clone, Copy)]
enum Refusal {
    LengthAndTransferEncoding,
    RepeatedLength,
    InvalidLength,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::LengthAndTransferEncoding => "content-length with transfer-encoding",
            Self::RepeatedLength => "repeated content-length",
            Self::InvalidLength => "invalid content-length",
        }
    }
}

/// What one complete head means for the bytes after it.
enum Framing {
    Next(State),
    Refuse(Refusal),
}

impl<I> FramingGuard<I> {
    /// `max_head` is the largest head hyper accepts; a longer one is left to
    /// hyper, which answers it with `431`. The first head is due at
    /// `first_head_due`, later ones `head_timeout` after their first byte.
    /// `activity` tells whether a response is still being written when a
    /// head is late.
    pub fn new(
        inner: I,
        max_head: usize,
        peer: IpAddr,
        head_timeout: Duration,
        first_head_due: Instant,
        activity: Arc<Activity>,
    ) -> Self {
        Self {
            inner,
            state: State::Head,
            partial: Vec::new(),
            parses: 0,
            max_head,
            peer,
            head_timeout,
            head_deadline: Some(first_head_due),
            timer: None,
            activity,
        }
    }

    /// Keeps the head clock in step with what `check` found: running while
    /// a head is incomplete, stopped otherwise.
    fn time_head(&mut self) {
        let waiting = !self.partial.is_empty();
        match (waiting, self.head_deadline) {
            (true, None) => self.head_deadline = Some(Instant::now() + self.head_timeout),
            (false, Some(_)) => self.head_deadline = None,
            _ => {}
        }
    }

    /// Whether the awaited head is late. A late head is forgiven while a
    /// response is still being written (a pipelining client may send its
    /// next head early and slowly): the clock then starts over.
    fn head_late(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = self.head_deadline else {
            return false;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if self.activity.answering() {
            let later = Instant::now() + self.head_timeout;
            self.head_deadline = Some(later);
            timer.as_mut().reset(later);
            // Registers the waker for the new deadline.
            return timer.as_mut().poll(cx).is_ready();
        }
        true
    }

    /// Walks `bytes` through the message framing, advancing the state.
    fn inspect(&mut self, bytes: &[u8]) -> Inspected {
        let mut at = 0;
        while at < bytes.len() {
            match &mut self.state {
                State::Off | State::Refused(_) => return Inspected::Clear,
                State::Fixed(left) => {
                    let n = min(*left, (bytes.len() - at) as u64);
                    *left -= n;
                    // `n` is at most `bytes.len() - at`, so it fits.
                    at += n as usize;
                    if *left == 0 {
                        self.state = State::Head;
                    }
                }
                State::Chunked(chunk) => {
                    let (used, next) = chunk.feed(&bytes[at..]);
                    at += used;
                    if let Some(next) = next {
                        self.state = next;
                    }
                }
                State::Head => {
                    let (len, framing) = match parse_head(&bytes[at..]) {
                        Ok(Some(parsed)) => parsed,
                        Ok(None) => return Inspected::Incomplete(at),
                        Err(()) => {
                            self.state = State::Off;
                            return Inspected::Clear;
                        }
                    };
                    match framing {
                        Framing::Next(next) => {
                            self.state = next;
                            at += len;
                        }
                        Framing::Refuse(why) => {
                            info!(client_ip = %self.peer, reason = why.as_str(), "FRAMING_REFUSED");
                            self.state = State::Refused(0);
                            return Inspected::Refused(at);
                        }
                    }
                }
            }
        }
        Inspected::Clear
    }

    /// Stops passing bytes from `keep` on and hands hyper as much of the
    /// unparsable head as fits.
    fn refuse(&mut self, buf: &mut ReadBuf<'_>, keep: usize) {
        buf.set_filled(keep);
        let n = min(buf.remaining(), UNPARSABLE.len());
        buf.put_slice(&UNPARSABLE[..n]);
        self.state = State::Refused(n);
        self.partial = Vec::new();
    }

    /// Checks the bytes just read into `buf` from `start` on.
    fn check(&mut self, buf: &mut ReadBuf<'_>, start: usize) {
        let fresh = &buf.filled()[start..];
        if self.partial.is_empty() {
            match self.inspect(fresh) {
                Inspected::Clear => {}
                Inspected::Incomplete(at) => {
                    self.partial = fresh[at..].to_vec();
                    self.parses = 0;
                }
                Inspected::Refused(at) => self.refuse(buf, start + at),
            }
            return;
        }
        // A head that started in earlier reads continues; hyper already
        // holds its beginning.
        let delivered = self.partial.len();
        self.partial.extend_from_slice(fresh);
        if self.partial.len() > self.max_head {
            self.state = State::Off;
            self.partial = Vec::new();
            return;
        }
        // Parsing again is only worth it once the head may be over.
        if !may_end_head(&self.partial[delivered.saturating_sub(3)..]) {
            return;
        }
        self.parses += 1;
        if self.parses > MAX_PARSES_PER_HEAD {
            self.state = State::Off;
            self.partial = Vec::new();
            return;
        }
        let partial = take(&mut self.partial);
        match self.inspect(&partial) {
            Inspected::Clear => {}
            Inspected::Incomplete(0) => self.partial = partial,
            Inspected::Incomplete(at) => {
                self.partial = partial[at..].to_vec();
                self.parses = 0;
            }
            // The refused head is either the one whose beginning hyper
            // holds (`at` is 0): the unparsable bytes then follow that
            // beginning, which hyper fails on just the same; or one that
            // starts in the fresh bytes.
            Inspected::Refused(at) => self.refuse(buf, start + at.saturating_sub(delivered)),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FramingGuard<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.state {
            State::Off => return Pin::new(&mut this.inner).poll_read(cx, buf),
            State::Refused(sent) => {
                // The rest of the unparsable head, then end of stream.
                let n = min(buf.remaining(), UNPARSABLE.len() - sent);
                buf.put_slice(&UNPARSABLE[sent..sent + n]);
                this.state = State::Refused(sent + n);
                return Poll::Ready(Ok(()));
            }
            State::Head | State::Fixed(_) | State::Chunked(_) => {}
        }
        let start = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            Poll::Pending => {
                if this.head_late(cx) {
                    debug!(client_ip = %this.peer, "request head not complete in time; closing");
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                return Poll::Pending;
            }
            other => return other,
        }
        if buf.filled().len() > start {
            this.check(buf, start);
            this.time_head();
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(FramingGuard);

/// Whether `bytes` hold the blank line that ends a head (httparse accepts
/// bare LF line ends as well as CRLF).
fn may_end_head(bytes: &[u8]) -> bool {
    bytes.windows(2).any(|w| w == b"\n\n") || bytes.windows(3).any(|w| w == b"\n\r\n")
}

/// Parses one request head at the start of `bytes`: its length and what
/// follows it, `None` while incomplete, `Err` for anything hyper rejects or
/// that the guard does not follow.
fn parse_head(bytes: &[u8]) -> Result<Option<(usize, Framing)>, ()> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        bytes,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    if request.method == Some("CONNECT") {
        return Err(());
    }
    let mut length: Option<&[u8]> = None;
    let mut lengths = 0;
    let mut chunked = None;
    for field in request.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = Some(field.value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // As hyper: the body is chunked when the last coding is.
            let last = field
                .value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            // After a `101` the bytes are no longer HTTP; the guard cannot
            // tell whether it comes, so it stops here.
            return Err(());
        }
    }
    let framing = match (length, chunked) {
        (Some(_), Some(_)) => Framing::Refuse(Refusal::LengthAndTransferEncoding),
        (Some(_), None) if lengths > 1 => Framing::Refuse(Refusal::RepeatedLength),
        (Some(value), None) => match parse_length(value) {
            Some(0) => Framing::Next(State::Head),
            Some(n) => Framing::Next(State::Fixed(n)),
            None => Framing::Refuse(Refusal::InvalidLength),
        },
        (None, Some(true)) => Framing::Next(State::Chunked(Chunk::Start)),
        // hyper refuses a transfer coding that does not end in chunked.
        (None, Some(false)) => return Err(()),
        (None, None) => Framing::Next(State::Head),
    };
    Ok(Some((len, framing)))
}

impl Chunk {
    /// Follows a chunked body through `bytes`. Returns the bytes used and,
    /// when the body ended (or broke the grammar, which hyper refuses), the
    /// state for what follows.
    fn feed(&mut self, bytes: &[u8]) -> (usize, Option<State>) {
        let mut at = 0;
        while at < bytes.len() {
            if let Chunk::Data(left) = self {
                let n = min(*left, (bytes.len() - at) as u64);
                *left -= n;
                // `n` is at most `bytes.len() - at`, so it fits.
                at += n as usize;
                if *left == 0 {
                    *self = Chunk::DataCr;
                }
                continue;
            }
            let byte = bytes[at];
            at += 1;
            match self.step(byte) {
                Some(Step::Next(next)) => *self = next,
                Some(Step::Done) => return (at, Some(State::Head)),
                None => return (at, Some(State::Off)),
            }
        }
        (at, None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::net::Ipv4Addr;

    use tokio::io::AsyncReadExt;

    use super::*;

    /// A stream that hands out its bytes in the given pieces, one per read.
    struct Pieces(VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = min(piece.len(), buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What hyper would read through the guard when `input` arrives in
    /// pieces of `size` bytes and hyper reads at most `read` at a time.
    async fn through(input: &[u8], size: usize, read: usize) -> Vec<u8> {
        let pieces = input.chunks(size).map(<[u8]>::to_vec).collect();
        let mut guard = FramingGuard::new(
            Pieces(pieces),
            1024,
            Ipv4Addr::LOCALHOST.into(),
            Duration::from_secs(10),
            Instant::now() + Duration::from_secs(10),
            Activity::new(None),
        );
        let mut out = Vec::new();
        let mut buf = vec![0; read];
        loop {
            let n = guard.read(&mut buf).await.expect("read");
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    const CLEAN: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
        POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
        POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
        5;x=\"y\"\r\nhello\r\n3 \r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
        POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 65\r\n\r\n\
        GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n\
        GET /d HTTP/1.1\r\nHost: a\r\n\r\n";

    #[tokio::test]
    async fn clean_streams_pass_unchanged_however_they_are_split() {
        for size in 1..=CLEAN.len() {
            for read in [1, 7, 64, 8192] {
                assert_eq!(through(CLEAN, size, read).await, CLEAN, "{size}/{read}");
            }
        }
    }

    const REFUSED: &[u8] =
        b"POST /e HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";

    /// hyper's view: the parser fails on `bytes` (not merely incomplete).
    fn unparsable(bytes: &[u8]) -> bool {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        httparse::Request::new(&mut fields).parse(bytes).is_err()
    }

    #[tokio::test]
    async fn a_refused_head_becomes_unparsable_after_the_clean_ones() {
        let input = [
            CLEAN,
            REFUSED,
            b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        ]
        .concat();
        for size in 1..=input.len() {
            for read in [1, 7, 8192] {
                let out = through(&input, size, read).await;
                let rest = out.strip_prefix(CLEAN).expect("clean requests pass");
                let held = rest.strip_suffix(UNPARSABLE).expect("ends unparsable");
                assert!(
                    held.len() < REFUSED.len() && REFUSED.starts_with(held),
                    "{size}/{read}: {held:?}"
                );
                assert!(unparsable(rest), "{size}/{read}");
            }
        }
    }

    #[test]
    fn every_beginning_of_a_head_is_unparsable_with_the_replacement() {
        for head in [
            CLEAN,
            REFUSED,
            b"\r\nGET http://a:1/x?y HTTP/1.0\r\nA:\tb c\r\n\r\n",
        ] {
            let end = head
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("head")
                + 4;
            for cut in 0..end {
                let bytes = [&head[..cut], UNPARSABLE].concat();
                assert!(unparsable(&bytes), "{:?}", String::from_utf8_lossy(&bytes));
            }
        }
    }

    #[tokio::test]
    async fn what_the_guard_does_not_follow_passes_unchanged() {
        for input in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
        ] {
            for size in [1, 5, input.len()] {
                assert_eq!(through(input, size, 8192).await, input, "{size}");
            }
        }
    }

    #[tokio::test]
    async fn a_head_over_the_limit_is_left_to_hyper() {
        let mut input = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 2000));
        input.extend_from_slice(b"\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(through(&input, 100, 8192).await, input);
    }
}

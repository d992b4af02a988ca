//! The upstream side of a request without a body, done by the request's
//! own task.
//!
//! Nearly every request a site gets is a GET or HEAD without a body.
//! hyper's client gives each upstream connection a task of its own: a
//! request crosses a channel to it, the response crosses back, and each
//! piece of the body crosses again. Here the request's task writes the
//! head, reads the response itself, and when the whole response came in
//! with its head (as a small page does) the connection is back in the pool
//! before the response is passed on. Requests with a body or an upgrade
//! stay with hyper's client ([`super::pool`]): sending a body while the
//! response may already be arriving, and handing a connection over to a
//! tunnel, are what it is for.
//!
//! A response is read as hyper's client reads one (RFC 9112 §6.3): `1xx`
//! answers other than `101` are passed over, HEAD and `204`/`304` answers
//! have no body, a `Transfer-Encoding` ending in `chunked` wins over any
//! `Content-Length`, other codings and a missing length mean the body runs
//! to the end of the connection, and a malformed or disagreeing
//! `Content-Length` fails the exchange when it is what frames the body. A
//! connection goes back to the pool only when its response had no body or
//! one framed by length or chunks, was read to the end with nothing after
//! it, and did not ask for the connection to close (an HTTP/1.0 answer
//! always does here). Trailers are read past and dropped, as the HTTP/1.1
//! server drops them.

use std::cmp::min;
use std::future::poll_fn;
use std::io;
use std::mem::{MaybeUninit, take};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use hyper::ext::ReasonPhrase;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::task::coop::unconstrained;
use tokio::time::{Instant, Sleep};

use super::headers::{Forwarding, lists_token};
use super::pool::UpstreamPool;
use crate::body_framing::{Chunk, Decoded, parse_length};
use crate::spare;

/// The first read's size, as hyper's; later reads of a long body grow
/// while they fill their buffer, up to [`MAX_READ`].
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// The largest response head taken, and the most fields in it: hyper's
/// client defaults, so that no upstream answer accepted before is refused.
const MAX_HEAD: usize = 8 * 1024 + 4096 * 100;
const MAX_FIELDS: usize = 100;
/// Room per request field when the head is encoded, so that most heads
/// fit at the first try.
const HEAD_ROOM: usize = 64;
const FIELD_ROOM: usize = 48;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the request: {0}")]
    Write(#[source] io::Error),
    #[error("reading the response: {0}")]
    Read(#[source] io::Error),
    /// A read failed before any of the response came.
    #[error("reading the response: {0}")]
    Unanswered(#[source] io::Error),
    #[error("connection closed before the response")]
    Closed,
    #[error("connection closed before the response ended")]
    Truncated,
    #[error("malformed response head: {0}")]
    Parse(httparse::Error),
    #[error("malformed response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD} bytes or over {MAX_FIELDS} fields")]
    HeadTooLarge,
    #[error("malformed chunked response body")]
    Chunked,
    #[error("no response head before the deadline")]
    TimedOut,
}

impl Error {
    /// Whether the upstream closed the connection before sending a byte
    /// of the response: a connection that sat idle in the pool may have
    /// been closed just as the request went out, and a GET or HEAD is
    /// safe to send again.
    pub fn unanswered(&self) -> bool {
        match self {
            Self::Closed => true,
            Self::Write(e) | Self::Unanswered(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// A plain connection to an upstream, with the timer that bounds the wait
/// for each of its responses.
///
/// A timer made per request would be entered into the runtime's timer
/// wheel and taken out again, under the wheel's lock, for every request.
/// This one is left set for an earlier request's deadline, and is moved on
/// only when it fires before the present one ([`within`]): every request
/// waits with the same timeout, so on a busy connection that is once per
/// timeout rather than once per request.
pub struct Connection {
    pub(super) stream: TcpStream,
    timer: Pin<Box<Sleep>>,
}

impl Connection {
    /// `stream`, with `timer` (the one its connecting waited under).
    pub(super) fn new(stream: TcpStream, timer: Pin<Box<Sleep>>) -> Self {
        Self { stream, timer }
    }
}

/// `future`'s output, or `None` if it is not ready by `deadline`. `timer`
/// may be set for an earlier time (see [`Connection`]), or a later one if
/// the timeout was shortened since; both are pinned by the caller, so that
/// the future waited for is kept once, in the caller's state.
pub(super) fn within<'a, F: Future>(
    mut timer: Pin<&'a mut Sleep>,
    deadline: Instant,
    mut future: Pin<&'a mut F>,
) -> impl Future<Output = Option<F::Output>> + 'a {
    if timer.deadline() > deadline {
        timer.as_mut().reset(deadline);
    }
    poll_fn(move |cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        while poll_timer(timer.as_mut(), cx).is_ready() {
            if timer.deadline() >= deadline {
                return Poll::Ready(None);
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    })
}

/// Polls `timer` outside the task's cooperative budget. A future that
/// uses up the budget on every poll (an upstream sending `1xx` answers
/// without end) would otherwise keep the timer from ever being seen to
/// fire; `tokio::time::timeout` guards against the same.
fn poll_timer(timer: Pin<&mut Sleep>, cx: &mut Context<'_>) -> Poll<()> {
    pin!(unconstrained(timer)).poll(cx)
}

/// Whether `req` is exchanged here: a GET or HEAD without a body, and not
/// `upgrading`.
pub fn takes(req: &Request<Body>, upgrading: bool) -> bool {
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && req.body().is_end_stream()
        && !upgrading
}

/// `req`'s head as it goes on the wire, with the `forwarding` fields in
/// place of any the client sent; its target is in origin form.
pub fn encode(req: &Request<Body>, forwarding: &Forwarding) -> spare::Buffer {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let fields = req.headers().len() + Forwarding::COUNT;
    let mut out = spare::head_buffer(HEAD_ROOM + target.len() + fields * FIELD_ROOM);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let own = req
        .headers()
        .iter()
        .filter(|(name, _)| !Forwarding::replaces(name));
    for (name, value) in own.chain(forwarding.fields()) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends `request` (from [`encode`]) on `conn` and reads the response
/// head, by `deadline`. The connection goes back to `home` once the
/// response has been read to its end, if it can take another request.
pub async fn exchange(
    mut conn: Connection,
    request: &[u8],
    head_only: bool,
    deadline: Instant,
    home: &Arc<UpstreamPool>,
) -> Result<Response<ResponseBody>, Error> {
    let (head, rest) = {
        let reading = pin!(read_head(&mut conn.stream, request, head_only));
        within(conn.timer.as_mut(), deadline, reading).await
    }
    .ok_or(Error::TimedOut)??;
    // The timer stays set, but wakes no task once it fires: the task
    // waiting until now may end long before the connection is used again,
    // and its memory would be kept for the waker until then.
    let _ = poll_timer(conn.timer.as_mut(), &mut Context::from_waker(Waker::noop()));
    Ok(head.respond(conn, rest, home))
}

/// [`exchange`] up to the end of the response head: the head, and what
/// came after it.
async fn read_head(
    stream: &mut TcpStream,
    request: &[u8],
    head_only: bool,
) -> Result<(Head, Bytes), Error> {
    stream.write_all(request).await.map_err(Error::Write)?;
    // The first read lands in one of the thread's spare buffers, which
    // goes back to the spares once the response's last slice is dropped.
    // It is taken only once the answer is there to read: a request waiting
    // for its upstream holds no buffer.
    let first = loop {
        stream.readable().await.map_err(Error::Unanswered)?;
        let mut buffer = spare::read_buffer(FIRST_READ);
        match read_arrived(stream, &mut *buffer) {
            Ok(0) => return Err(Error::Closed),
            Ok(_) => break buffer,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::Unanswered(e)),
        }
    };
    let mut bytes = first.freeze();
    loop {
        loop {
            match parse(&bytes, head_only)? {
                Parsed::Partial if bytes.len() >= MAX_HEAD => return Err(Error::HeadTooLarge),
                Parsed::Partial => break,
                Parsed::Interim(len) => {
                    let _ = bytes.split_to(len);
                }
                Parsed::Final(head, len) => {
                    let rest = bytes.slice(len..);
                    drop(bytes);
                    return Ok((head, rest));
                }
            }
        }
        // A head that came in pieces. The first time, what came is copied
        // out of the spare buffer; after that nothing else holds these
        // bytes (a `1xx` passed over was dropped), so it is a move.
        let mut buf = BytesMut::from(bytes);
        buf.reserve(FIRST_READ);
        match poll_fn(|cx| poll_read_arrived(stream, cx, &mut buf)).await {
            Ok(0) => return Err(Error::Truncated),
            Ok(_) => {}
            Err(e) => return Err(Error::Read(e)),
        }
        bytes = buf.split().freeze();
    }
}

/// Reads what has arrived on `stream` into `buf`, as `try_read_buf` does.
///
/// A read that leaves room in `buf` took everything there was, so it also
/// marks the stream as not readable, as a read that found nothing would:
/// the rule tokio's own `AsyncRead` for a socket follows. Otherwise the
/// stream stays marked readable after the response's last read, and the
/// pool's check that an idle connection is still open ([`super::pool`])
/// would cost a system call on every reuse. The mark is cleared only if
/// nothing arrived since the read began, and an end of stream seen by the
/// runtime is never cleared.
fn read_arrived<B: BufMut>(stream: &TcpStream, buf: &mut B) -> io::Result<usize> {
    // What `try_read_buf` reads into.
    let room = buf.chunk_mut().len();
    let mut read = None;
    let result = stream.try_io(Interest::READABLE, || {
        let n = stream.try_read_buf(buf)?;
        read = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    read.map_or(result, Ok)
}

/// [`read_arrived`], waiting for something to arrive.
fn poll_read_arrived(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        match read_arrived(stream, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            read => return Poll::Ready(read),
        }
    }
}

/// How a response's body ends.
#[derive(Clone, Copy)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunk),
    /// At the end of the connection.
    Close,
}

/// A final response head.
struct Head {
    response: Response<()>,
    framing: Framing,
    /// Whether the connection can take another request after this response.
    reusable: bool,
}

enum Parsed {
    Partial,
    /// A `1xx` answer of this length, to pass over.
    Interim(usize),
    Final(Head, usize),
}

/// Parses the response head at the start of `bytes`. Field values and the
/// reason phrase become slices of `bytes`, not copies.
fn parse(bytes: &Bytes, head_only: bool) -> Result<Parsed, Error> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut head = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut head,
        bytes,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge),
        Err(e) => return Err(Error::Parse(e)),
    };
    let code = head.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| Error::Head("invalid status code"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Parsed::Interim(len));
    }
    let version = if head.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut close = version == Version::HTTP_10;
    let mut chunked = None;
    let mut length = None;
    let mut headers = spare::header_map(head.headers.len());
    for field in head.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| Error::Head("invalid field name"))?;
        if name == CONNECTION {
            close |= lists_token(field.value, b"close");
        } else if name == TRANSFER_ENCODING {
            chunked = Some(last_token_is(field.value, b"chunked"));
        } else if name == CONTENT_LENGTH {
            // Judged only if the length is what frames the body, as hyper
            // does: a HEAD answer or a chunked one may carry any.
            length = Some(merge_length(length, field.value));
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(field.value))
            .map_err(|_| Error::Head("invalid field value"))?;
        headers.append(name, value);
    }
    let framing = if status == StatusCode::SWITCHING_PROTOCOLS {
        // A GET or HEAD sent here never asks to upgrade; the proxy refuses
        // this answer, and the connection is not used again.
        close = true;
        Framing::Empty
    } else if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Empty
    } else if let Some(chunked) = chunked {
        if version == Version::HTTP_10 {
            return Err(Error::Head("transfer-encoding in an HTTP/1.0 response"));
        }
        // Both framings named: the body is chunked, but where the upstream
        // thinks it ends is in doubt, so the connection is not used again.
        close |= length.is_some();
        if chunked {
            Framing::Chunked(Chunk::Start)
        } else {
            Framing::Close
        }
    } else if let Some(length) = length {
        Framing::Length(length.map_err(Error::Head)?)
    } else {
        Framing::Close
    };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    if let Some(reason) = head.reason
        && status.canonical_reason() != Some(reason)
        && let Ok(reason) = ReasonPhrase::try_from(bytes.slice_ref(reason.as_bytes()))
    {
        response.extensions_mut().insert(reason);
    }
    let reusable = !close && !matches!(framing, Framing::Close);
    Ok(Parsed::Final(
        Head {
            response,
            framing,
            reusable,
        },
        len,
    ))
}

/// The length named by a `Content-Length` field and those before it
/// (`earlier`): every value, also within a comma-separated list, must be
/// the same number.
fn merge_length(
    earlier: Option<Result<u64, &'static str>>,
    value: &[u8],
) -> Result<u64, &'static str> {
    let mut length = earlier.transpose()?;
    for item in value.split(|&b| b == b',') {
        let item = parse_length(item).ok_or("invalid content-length")?;
        if length.is_some_and(|length| length != item) {
            return Err("differing content-length values");
        }
        length = Some(item);
    }
    length.ok_or("invalid content-length")
}

/// Whether a comma-separated field value's last item is `token`.
fn last_token_is(value: &[u8], token: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

impl Head {
    /// The response, with `rest` (what was read after the head) as the
    /// start of its body.
    fn respond(
        self,
        conn: Connection,
        mut rest: Bytes,
        home: &Arc<UpstreamPool>,
    ) -> Response<ResponseBody> {
        let Self {
            response,
            framing,
            reusable,
        } = self;
        // Read in full already: the connection goes back at once, unless
        // the upstream sent more than its response.
        let whole = match framing {
            Framing::Empty => Some(Bytes::new()),
            Framing::Length(len) if rest.len() as u64 >= len => {
                // At most `rest.len()`, so it fits.
                Some(rest.split_to(len as usize))
            }
            _ => None,
        };
        let body = match whole {
            Some(body) => {
                if reusable && rest.is_empty() {
                    home.put_plain(conn);
                }
                ResponseBody(State::Whole(body))
            }
            None => ResponseBody(State::Reading(Reading {
                conn,
                pending: rest,
                buf: BytesMut::new(),
                read: FIRST_READ,
                framing,
                home: reusable.then(|| Arc::clone(home)),
            })),
        };
        response.map(|()| body)
    }
}

/// A response body from [`exchange`].
pub struct ResponseBody(State);

#[derive(Default)]
enum State {
    /// All of it, or nothing once taken.
    Whole(Bytes),
    Reading(Reading),
    #[default]
    Done,
}

/// A body still arriving on its connection.
struct Reading {
    conn: Connection,
    /// Read, not yet passed on.
    pending: Bytes,
    /// Where reads land; spare room is kept for the next read.
    buf: BytesMut,
    /// How much the next read may take.
    read: usize,
    framing: Framing,
    /// Where the connection goes back to once the body has ended; `None`
    /// if it cannot be used again.
    home: Option<Arc<UpstreamPool>>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let state = &mut self.0;
        let polled = match state {
            State::Whole(data) if data.is_empty() => None,
            State::Whole(data) => Some(Ok(take(data))),
            State::Reading(reading) => match ready!(reading.poll_data(cx)) {
                Ok(Some(data)) => {
                    // A server that learns from `is_end_stream` that this
                    // was the last data drops the body without asking for
                    // more: the connection goes back now.
                    if let Framing::Length(0) = reading.framing
                        && let State::Reading(reading) = take(state)
                    {
                        reading.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(None) => {
                    if let State::Reading(reading) = take(state) {
                        reading.finish();
                    }
                    None
                }
                Err(e) => Some(Err(e)),
            },
            State::Done => None,
        };
        *state = State::Done;
        Poll::Ready(polled.map(|data| data.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            State::Whole(data) => data.is_empty(),
            State::Reading(reading) => matches!(reading.framing, Framing::Length(0)),
            State::Done => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            State::Whole(data) => SizeHint::with_exact(data.len() as u64),
            State::Reading(Reading {
                framing: Framing::Length(left),
                ..
            }) => SizeHint::with_exact(*left),
            State::Reading(_) => SizeHint::default(),
            State::Done => SizeHint::with_exact(0),
        }
    }
}

impl Reading {
    /// The next run of body data; `None` at the body's end.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Error>> {
        loop {
            match &mut self.framing {
                Framing::Empty | Framing::Length(0) => return Poll::Ready(Ok(None)),
                Framing::Length(left) => {
                    if !self.pending.is_empty() {
                        // At most `pending.len()`, so it fits.
                        let n = min(*left, self.pending.len() as u64) as usize;
                        *left -= n as u64;
                        return Poll::Ready(Ok(Some(self.pending.split_to(n))));
                    }
                }
                Framing::Chunked(chunk) => match chunk.decode(&mut self.pending) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Ok(Some(data))),
                    Ok(Decoded::End) => {
                        self.framing = Framing::Empty;
                        return Poll::Ready(Ok(None));
                    }
                    Ok(Decoded::More) => {}
                    Err(_) => return Poll::Ready(Err(Error::Chunked)),
                },
                Framing::Close => {
                    if !self.pending.is_empty() {
                        return Poll::Ready(Ok(Some(take(&mut self.pending))));
                    }
                }
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(match self.framing {
                    Framing::Close => Ok(None),
                    _ => Err(Error::Truncated),
                });
            }
        }
    }

    /// Reads into `pending`, which is empty; `0` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        self.buf.reserve(self.read);
        let n =
            ready!(poll_read_arrived(&self.conn.stream, cx, &mut self.buf)).map_err(Error::Read)?;
        // A read that fills its room says the body is arriving faster than
        // it is read: the next may take more. One that takes less than
        // half lets the room shrink back.
        if n >= self.read {
            self.read = min(self.read * 2, MAX_READ);
        } else if n < self.read / 2 {
            self.read = (self.read / 2).max(FIRST_READ);
        }
        self.pending = self.buf.split().freeze();
        Poll::Ready(Ok(n))
    }

    /// Gives the connection back if nothing follows the body on it.
    fn finish(self) {
        if let Some(home) = self.home
            && self.pending.is_empty()
        {
            home.put_plain(self.conn);
        }
    }
}

//! HTTP/1.1 for the public listener's everyday requests, served without
//! hyper's server in between.
//!
//! Nearly every request a self-hosted site gets is a GET or HEAD without a
//! body. hyper's HTTP/1 server keeps two 8 KiB buffers per connection for
//! the connection's whole life, idle ones too, and each head it reads is
//! parsed a second time by `framing`. Here a connection holds no buffer
//! between requests: a read lands on the stack and is kept only while a
//! head is incomplete, a complete head becomes the request without another
//! copy, and the response head leaves in the same write as a small body.
//!
//! Only requests that are plainly simple are served here: HTTP/1.1, GET or
//! HEAD, an origin-form target, no body (neither `Content-Length` nor
//! `Transfer-Encoding`), no `Expect`, no `Upgrade`, and a `Connection` that
//! says at most `keep-alive` or `close`. At the first head that is anything
//! else, including one httparse refuses and one too large, the connection
//! goes to hyper (behind `framing`) with the bytes read so far put back in
//! front, and hyper serves it to its end. Every error answer, request body,
//! upgrade and `100 Continue` therefore stays hyper's.
//!
//! The timeouts mean what they mean for hyper's connections: a head is due
//! `header_read_timeout` after the connection is ready or after its first
//! byte, a connection with nothing to do is closed after `idle_timeout`,
//! and a client that takes no response bytes for `idle_timeout` is
//! dropped.

use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use futures_util::future::poll_fn;
use http::header::{
    CONNECTION, CONTENT_LENGTH, DATE, EXPECT, HeaderName, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::debug;

use super::activity::Activity;
use super::date;
use super::{Inner, MAX_HEADERS};
use crate::body_framing::parse_length;
use crate::conn_info::ConnInfo;
use crate::proxy::headers::lists_token;
use crate::router::Pipeline;
use crate::spare;

/// Bytes one read may take. A request head is usually a few hundred bytes;
/// a larger one takes more reads.
const READ_CHUNK: usize = 4096;
/// How often one head that arrives in pieces is parsed again before the
/// connection goes to hyper, so a client trickling a large head costs
/// linear time here.
const MAX_PARSES_PER_HEAD: u32 = 64;
/// Response bytes gathered before they are written: the head and a small
/// body go out together, a large body frame goes out on its own.
const GATHER: usize = 16 * 1024;

/// A response head's status line, `Date` and framing fields fit in this,
/// and each further field in about `FIELD_ROOM`.
const HEAD_ROOM: usize = 128;
const FIELD_ROOM: usize = 48;

/// What a connection served here needs from its server.
pub struct Conn<'a> {
    /// Timeouts, limits and the shutdown signals.
    pub server: &'a Inner,
    pub pipeline: &'a Pipeline,
    pub info: &'a ConnInfo,
    pub activity: &'a Arc<Activity>,
}

/// How a connection left this server.
pub enum Outcome<I> {
    /// It is over.
    Closed,
    /// hyper takes it from here: the stream, with what was read of it and
    /// not served put back, and when the head in those bytes is due.
    HandOver(Replay<I>, Instant),
}

/// Serves `io` until it closes or a request needs hyper.
///
/// A task keeps room for the largest state its future ever has, for as
/// long as it lives. What a connection needs between requests (the
/// stream, its timer and the shutdown signals) is therefore nearly all
/// that this future holds: the pipeline's answer is a pointer while it is
/// awaited, a response that can go at once is written with no state kept
/// across a wait, and one that cannot is finished from a box. An async fn
/// would also keep its arguments beside their moved copies, hence the
/// `async move` block.
pub fn serve<'a, I>(
    io: I,
    conn: Conn<'a>,
    first_head_due: Instant,
) -> impl Future<Output = Outcome<I>> + 'a
where
    I: AsyncRead + AsyncWrite + Unpin + 'a,
{
    let mut link = Link {
        io,
        pending: BytesMut::new(),
        head_due: Some(first_head_due),
        idle_due: Instant::now() + conn.server.idle_timeout,
        parses: 0,
    };
    async move {
        // One timer for every wait of the connection, moved rather than
        // made anew: a head or idle deadline, or a response write's stall
        // limit. Each wait sets it before it is polled.
        let mut timer = pin!(sleep_until(link.idle_due));
        let mut shutdown = Shutdown {
            waiting: pin!(conn.server.stop.cancelled()),
            stop: &conn.server.stop,
            kill: &conn.server.kill,
            killing: false,
            registered: None,
        };
        loop {
            let head = loop {
                if !link.pending.is_empty() {
                    match parse(link.pending.split().freeze(), conn.server.max_header_bytes) {
                        Parsed::Simple(head) => break head,
                        Parsed::Partial(bytes) if link.parses < MAX_PARSES_PER_HEAD => {
                            link.pending = BytesMut::from(bytes);
                            link.parses += 1;
                        }
                        Parsed::Partial(bytes) | Parsed::Other(bytes) => {
                            let due = link.head_due.unwrap_or_else(Instant::now);
                            return Outcome::HandOver(Replay::new(link.io, bytes), due);
                        }
                    }
                }
                match wait(&mut link, &conn, timer.as_mut(), &mut shutdown).await {
                    Waited::Bytes => {}
                    Waited::Close => {
                        Box::pin(close(&mut link.io)).await;
                        return Outcome::Closed;
                    }
                    Waited::Closed => return Outcome::Closed,
                }
            };
            // Taken apart in a block of its own: the connection's state
            // keeps no room for the request while its answer is awaited.
            let (answer, in_flight, keep_alive, method_is_head) = {
                let Head {
                    request,
                    keep_alive,
                    rest,
                } = head;
                link.parses = 0;
                link.head_due = None;
                link.pending = rest;
                let method_is_head = request.method() == Method::HEAD;
                let in_flight = conn.activity.start_request();
                let answer = conn.pipeline.serve(conn.info, request);
                (answer, in_flight, keep_alive, method_is_head)
            };
            // While the answer is awaited, the client's side is read too: a
            // client that goes away cancels its request, as with hyper.
            // Only while nothing is buffered: requests sent ahead are
            // answered even if the client has stopped sending (half-closed)
            // after them.
            let response = {
                let mut answer = answer;
                loop {
                    let watch = link.pending.is_empty();
                    tokio::select! {
                        biased;
                        response = &mut answer => break response,
                        () = poll_fn(|cx| shutdown.poll_kill(cx)) => return Outcome::Closed,
                        read = read_some(&mut link.io, &mut link.pending), if watch => match read {
                            Ok(0) => {
                                let peer = conn.info.peer;
                                debug!(%peer, "client closed the connection before its response");
                                return Outcome::Closed;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let peer = conn.info.peer;
                                debug!(%peer, "connection: {e}");
                                return Outcome::Closed;
                            }
                        },
                    }
                }
            };
            let keep_alive = keep_alive && !conn.server.stop.is_cancelled();
            let client = Client {
                io: &mut link.io,
                pending: &mut link.pending,
                stall: conn.server.idle_timeout,
                timer: timer.as_mut(),
                shutdown: &mut shutdown,
            };
            let sent = match start_sending(client, response, method_is_head, keep_alive) {
                Ok(sent) => sent,
                Err(sending) => sending.await,
            };
            drop(in_flight);
            match sent {
                Sent::KeepAlive => {}
                Sent::Close => {
                    Box::pin(close(&mut link.io)).await;
                    return Outcome::Closed;
                }
                Sent::Failed(why) => {
                    let peer = conn.info.peer;
                    debug!(%peer, "response: {why}");
                    return Outcome::Closed;
                }
            }
            // From when the request ended, as just recorded (in whole
            // milliseconds) for the idle timeout, rather than from another
            // reading of the clock.
            link.idle_due = conn
                .activity
                .idle_deadline(conn.server.idle_timeout)
                .map_or_else(
                    || Instant::now() + conn.server.idle_timeout,
                    Instant::from_std,
                );
            if link.pending.is_empty() {
                // Between requests the connection keeps no buffer at all.
                link.pending = BytesMut::new();
            } else {
                link.head_due = Some(Instant::now() + conn.server.header_read_timeout);
            }
        }
    }
}

/// What a connection keeps between its requests.
struct Link<I> {
    io: I,
    /// Bytes read and not yet served: a head still arriving, or requests
    /// sent ahead (pipelined).
    pending: BytesMut,
    /// When the head being awaited is due; `None` between requests, when
    /// the idle timeout applies instead.
    head_due: Option<Instant>,
    idle_due: Instant,
    /// How often the head now arriving was parsed.
    parses: u32,
}

/// A connection's wait for the server's shutdown signals, with one
/// registration for both: with `stop` until it comes, then with `kill`,
/// which never comes before it.
///
/// Polling a registered wait takes two locks that every connection shares
/// (the token's and its `Notify`'s), so once the task's waker is
/// registered, a poll only reads the token's flag (the first lock alone);
/// the registration is polled again when the waker changes.
struct Shutdown<'p, 't> {
    waiting: Pin<&'p mut WaitForCancellationFuture<'t>>,
    stop: &'t CancellationToken,
    kill: &'t CancellationToken,
    /// Whether `waiting` is `kill`'s.
    killing: bool,
    /// The waker `waiting` holds, once it is registered.
    registered: Option<Waker>,
}

impl Shutdown<'_, '_> {
    /// Whether the server has stopped (the connection is to close when it
    /// has nothing in progress), as of the last `poll_kill`, whose waker
    /// is registered for `stop` until then.
    fn stopped(&self) -> bool {
        self.killing
    }

    /// Ready once the server's grace period is over: the connection is to
    /// close whatever it is doing.
    fn poll_kill(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.killing {
            ready!(self.poll_waiting(self.stop, cx));
            self.waiting.set(self.kill.cancelled());
            self.killing = true;
            self.registered = None;
        }
        self.poll_waiting(self.kill, cx)
    }

    /// Polls `waiting`, which waits for `token`.
    fn poll_waiting(&mut self, token: &CancellationToken, cx: &mut Context<'_>) -> Poll<()> {
        if self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            // The token's flag is set before its waiters are woken.
            return if token.is_cancelled() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        let poll = self.waiting.as_mut().poll(cx);
        if poll.is_pending() {
            self.registered = Some(cx.waker().clone());
        }
        poll
    }
}

/// How a wait for the client's bytes ended.
enum Waited {
    /// Some arrived.
    Bytes,
    /// The connection is to be closed the orderly way.
    Close,
    /// It is over.
    Closed,
}

/// Waits for the client's next bytes: a new request, or more of a head.
/// A hand-made future rather than an async fn, which would keep its
/// arguments twice in the state of an idle connection.
fn wait<'a, I: AsyncRead + Unpin>(
    link: &'a mut Link<I>,
    conn: &'a Conn<'_>,
    mut timer: Pin<&'a mut Sleep>,
    shutdown: &'a mut Shutdown<'_, '_>,
) -> impl Future<Output = Waited> + 'a {
    let waiting_idle = link.pending.is_empty();
    timer.as_mut().reset(link.head_due.unwrap_or(link.idle_due));
    poll_fn(move |cx| {
        let peer = conn.info.peer;
        if let Poll::Ready(read) = poll_read_some(&mut link.io, &mut link.pending, cx) {
            return Poll::Ready(match read {
                Ok(0) => Waited::Closed,
                Ok(_) => {
                    if link.head_due.is_none() {
                        link.head_due = Some(Instant::now() + conn.server.header_read_timeout);
                    }
                    Waited::Bytes
                }
                Err(e) => {
                    debug!(%peer, "connection: {e}");
                    Waited::Closed
                }
            });
        }
        if shutdown.poll_kill(cx).is_ready() {
            return Poll::Ready(Waited::Closed);
        }
        if waiting_idle && shutdown.stopped() {
            return Poll::Ready(Waited::Close);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(if link.head_due.is_some() {
            debug!(%peer, "request head not complete in time; closing");
            Waited::Closed
        } else {
            debug!(%peer, "idle connection; closing");
            Waited::Close
        })
    })
}

/// Reads what the client has sent into `pending`, through a buffer on the
/// stack: a connection waiting for its next request keeps none.
fn read_some<'a, I: AsyncRead + Unpin>(
    io: &'a mut I,
    pending: &'a mut BytesMut,
) -> impl Future<Output = io::Result<usize>> + 'a {
    poll_fn(move |cx| poll_read_some(io, pending, cx))
}

fn poll_read_some<I: AsyncRead + Unpin>(
    io: &mut I,
    pending: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut buf = ReadBuf::uninit(&mut chunk);
    ready!(Pin::new(io).poll_read(cx, &mut buf))?;
    pending.extend_from_slice(buf.filled());
    Poll::Ready(Ok(buf.filled().len()))
}

/// Ends the connection the way a finished HTTP/1.1 connection ends (TLS's
/// `close_notify`, then FIN), within the time a write may take.
async fn close<I: AsyncWrite + Unpin>(io: &mut I) {
    let _ = timeout(CLOSE_TIMEOUT, io.shutdown()).await;
}

/// A closing connection gets this long to take its last bytes.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request head served here.
struct Head {
    request: Request<Body>,
    /// Whether the client lets the connection stay open after it.
    keep_alive: bool,
    /// The bytes after the head.
    rest: BytesMut,
}

// A value returned once per head and taken apart at once: boxing the large
// variant would cost every request an allocation.
#[expect(clippy::large_enum_variant)]
enum Parsed {
    Simple(Head),
    /// More bytes are needed; here they are back.
    Partial(Bytes),
    /// hyper's to serve; here they are back.
    Other(Bytes),
}

/// Parses the head at the start of `bytes`. A head served here becomes its
/// request without a copy: the target and the field values are slices of
/// `bytes`.
fn parse(bytes: Bytes, max_head: usize) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut head,
        &bytes,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= max_head => len,
        Ok(httparse::Status::Partial) if bytes.len() < max_head => {
            return Parsed::Partial(bytes);
        }
        _ => return Parsed::Other(bytes),
    };
    let method = match head.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Parsed::Other(bytes),
    };
    let Some(path) = head.path.filter(|path| path.starts_with('/')) else {
        return Parsed::Other(bytes);
    };
    if head.version != Some(1) {
        return Parsed::Other(bytes);
    }
    let Ok(uri) = Uri::from_maybe_shared(bytes.slice_ref(path.as_bytes())) else {
        return Parsed::Other(bytes);
    };
    let mut keep_alive = true;
    // No room for the forwarding fields: they are written when the head is
    // encoded for the upstream, not put in the map.
    let mut headers = spare::header_map(head.headers.len());
    for field in head.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return Parsed::Other(bytes);
        };
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == EXPECT || name == UPGRADE
        {
            return Parsed::Other(bytes);
        }
        if name == CONNECTION {
            match connection(field.value) {
                Some(keep) => keep_alive &= keep,
                None => return Parsed::Other(bytes),
            }
        }
        let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice_ref(field.value)) else {
            return Parsed::Other(bytes);
        };
        headers.append(name, value);
    }
    let mut request = Request::new(Body::empty());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Parsed::Simple(Head {
        request,
        keep_alive,
        rest: BytesMut::from(&bytes[len..]),
    })
}

/// What a request's `Connection` field asks for: `Some(true)` to keep the
/// connection, `Some(false)` to close it after the response, `None` for
/// anything else (hop-by-hop field names), which is hyper's to handle.
fn connection(value: &[u8]) -> Option<bool> {
    let value = value.trim_ascii();
    if value.eq_ignore_ascii_case(b"keep-alive") {
        Some(true)
    } else if value.eq_ignore_ascii_case(b"close") {
        Some(false)
    } else {
        None
    }
}

/// How a response ended on the wire.
enum Sent {
    KeepAlive,
    /// Complete, and the connection is to close.
    Close,
    /// Not complete; the connection cannot be used again.
    Failed(&'static str),
}

/// How a response body is delimited.
#[derive(Clone, Copy)]
enum Framing {
    /// No body goes on the wire (HEAD, 204, 304).
    Empty,
    Length(u64),
    Chunked,
}

/// The client's side of a connection while a response is written to it.
struct Client<'a, 'p, 't, I> {
    io: &'a mut I,
    /// Where bytes the client sends ahead go.
    pending: &'a mut BytesMut,
    /// A client that takes no response bytes for this long is given up on.
    stall: Duration,
    /// Measures `stall`.
    timer: Pin<&'a mut Sleep>,
    /// Ends the response at once.
    shutdown: &'a mut Shutdown<'p, 't>,
}

/// A response on its way to the client.
struct Sending {
    /// Gathered and not yet written: the head, then body frames.
    out: spare::Buffer,
    /// The body still to come; `None` once all of it is in `out`.
    body: Option<Body>,
    framing: Framing,
    /// Body bytes the head's `Content-Length` still owes.
    remaining: u64,
    /// Whether the connection closes after this response.
    close: bool,
}

impl Sending {
    /// Encodes the head of `response`, and chooses how its body goes.
    fn new(response: Response, method_is_head: bool, keep_alive: bool) -> Self {
        let (mut parts, body) = response.into_parts();
        let exact = body.size_hint().exact();
        // Room for the head, and for the body if it goes out with the head.
        let body_room = exact
            .and_then(|len| usize::try_from(len).ok())
            .filter(|&len| len <= GATHER)
            .unwrap_or(0);
        let mut out =
            spare::response_buffer(HEAD_ROOM + parts.headers.len() * FIELD_ROOM + body_room);
        let (framing, close) = encode_head(&mut out, &parts, exact, method_is_head, !keep_alive);
        spare::give_back(std::mem::take(&mut parts.headers));
        let (body, remaining) = match framing {
            Framing::Empty => (None, 0),
            Framing::Length(len) => (Some(body), len),
            Framing::Chunked => (Some(body), u64::MAX),
        };
        Self {
            out,
            body,
            framing,
            remaining,
            close,
        }
    }

    /// What is left for [`send`] when the body is not all there or not
    /// plain: `body`, and `first`, the frame taken from it and not dealt
    /// with.
    fn hand_over(mut self, body: Body, first: Option<BodyFrame>) -> Unsent {
        self.body = Some(body);
        Unsent {
            sending: self,
            first,
            written: 0,
        }
    }

    fn sent(&self) -> Sent {
        if self.close {
            Sent::Close
        } else {
            Sent::KeepAlive
        }
    }
}

/// A frame of a response body, as polled.
type BodyFrame = Option<Result<http_body::Frame<Bytes>, axum::Error>>;

/// What [`send_now`] left for [`send`].
struct Unsent {
    sending: Sending,
    /// A frame taken from the body and not dealt with.
    first: Option<BodyFrame>,
    /// How much of `out` is written; only ever more than 0 once the whole
    /// body is in it.
    written: usize,
}

/// Sends a response without waiting, when it can: its head and a body that
/// is all there now, gathered into one buffer that the socket takes whole.
/// That is most responses, and they then need no state kept across a wait.
/// Whatever is not ready is left to [`send`]. The polls here are given a
/// waker that does nothing; `send` polls again first, with the task's.
#[expect(
    clippy::result_large_err,
    reason = "returned once per response; the rare `Unsent` is moved into a box at once"
)]
fn send_now<I: AsyncWrite + Unpin>(
    io: &mut I,
    response: Response,
    method_is_head: bool,
    keep_alive: bool,
) -> Result<Sent, Unsent> {
    let mut sending = Sending::new(response, method_is_head, keep_alive);
    let mut cx = Context::from_waker(Waker::noop());
    if let Some(mut body) = sending.body.take() {
        loop {
            let Some(frame) = poll_ready_frame(&mut body, &mut cx) else {
                return Err(sending.hand_over(body, None));
            };
            let data = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    // An empty chunk would end a chunked body.
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => data,
                    // Trailers: HTTP/1.1 responses here carry none.
                    Err(_) => continue,
                },
                None if matches!(sending.framing, Framing::Length(_)) && sending.remaining > 0 => {
                    return Err(sending.hand_over(body, Some(None)));
                }
                None => break,
                Some(Err(e)) => return Err(sending.hand_over(body, Some(Some(Err(e))))),
            };
            let len = data.len() as u64;
            let chunked = matches!(sending.framing, Framing::Chunked);
            let line = if chunked { CHUNK_LINE_ROOM } else { 0 };
            let fits = sending.out.len() + line + data.len() <= GATHER;
            if !fits || len > sending.remaining {
                let frame = http_body::Frame::data(data);
                return Err(sending.hand_over(body, Some(Some(Ok(frame)))));
            }
            if chunked {
                // Writing into a Vec cannot fail.
                let _ = write!(sending.out, "{len:x}\r\n");
                sending.out.extend_from_slice(&data);
                sending.out.extend_from_slice(b"\r\n");
            } else {
                sending.remaining -= len;
                sending.out.extend_from_slice(&data);
            }
        }
        if let Framing::Chunked = sending.framing {
            sending.out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    let mut written = 0;
    while written < sending.out.len() {
        match Pin::new(&mut *io).poll_write(&mut cx, &sending.out[written..]) {
            Poll::Ready(Ok(0) | Err(_)) => return Ok(Sent::Failed(CLIENT_FAILED)),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Pending => {
                return Err(Unsent {
                    sending,
                    first: None,
                    written,
                });
            }
        }
    }
    match Pin::new(io).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok(sending.sent()),
        Poll::Ready(Err(_)) => Ok(Sent::Failed(CLIENT_FAILED)),
        Poll::Pending => Err(Unsent {
            sending,
            first: None,
            written,
        }),
    }
}

/// Room a chunk's size line takes at most (16 hex digits and CRLF), and
/// the CRLF after its data.
const CHUNK_LINE_ROOM: usize = 20;

const CLIENT_FAILED: &str = "client connection failed";

/// Sends `response` to `client` at once if it can, or else returns the
/// rest of the work boxed: the state of a write in progress would
/// otherwise be room kept in every connection's task, idle ones included.
fn start_sending<'a, I: AsyncRead + AsyncWrite + Unpin>(
    client: Client<'a, '_, '_, I>,
    response: Response,
    method_is_head: bool,
    keep_alive: bool,
) -> Result<Sent, Pin<Box<impl Future<Output = Sent> + 'a>>> {
    match send_now(client.io, response, method_is_head, keep_alive) {
        Ok(sent) => Ok(sent),
        Err(unsent) => Err(Box::pin(send(client, unsent))),
    }
}

/// Finishes writing what [`send_now`] could not to `client`. A client that
/// closes while the body is awaited is noticed.
async fn send<I: AsyncRead + AsyncWrite + Unpin>(
    mut client: Client<'_, '_, '_, I>,
    unsent: Unsent,
) -> Sent {
    let Unsent {
        sending,
        mut first,
        written,
    } = unsent;
    let Sending {
        mut out,
        body,
        framing,
        mut remaining,
        close,
    } = sending;
    let Some(mut body) = body else {
        // All of it is in `out`.
        return match client.write(&out[written..]).await {
            Ok(()) if close => Sent::Close,
            Ok(()) => Sent::KeepAlive,
            Err(why) => Sent::Failed(why),
        };
    };
    loop {
        // A frame that is ready joins what is gathered; before waiting for
        // one, what is gathered goes out.
        let ready = match first.take() {
            Some(frame) => Some(frame),
            None => poll_fn(|cx| Poll::Ready(poll_ready_frame(&mut body, cx))).await,
        };
        let frame = match ready {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    if let Err(why) = client.write(&out).await {
                        return Sent::Failed(why);
                    }
                    out.clear();
                }
                loop {
                    let watch = client.pending.is_empty();
                    tokio::select! {
                        biased;
                        frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => break frame,
                        () = poll_fn(|cx| client.shutdown.poll_kill(cx)) => {
                            return Sent::Failed("closed at shutdown");
                        }
                        read = read_some(client.io, client.pending), if watch => match read {
                            Ok(0) | Err(_) => return Sent::Failed("client closed the connection"),
                            Ok(_) => {}
                        },
                    }
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: HTTP/1.1 responses here carry none.
                Err(_) => continue,
            },
            Some(Err(_)) => {
                // Whatever was gathered still goes out; the client sees
                // the body end early.
                let _ = client.write(&out).await;
                return Sent::Failed("response body failed");
            }
        };
        if data.is_empty() {
            continue;
        }
        let len = data.len() as u64;
        if let Framing::Length(_) = framing {
            if len > remaining {
                let _ = client.write(&out).await;
                return Sent::Failed("response body longer than its content-length");
            }
            remaining -= len;
        } else {
            // Writing into a Vec cannot fail.
            let _ = write!(out, "{len:x}\r\n");
        }
        if out.len() + data.len() <= GATHER {
            out.extend_from_slice(&data);
        } else {
            if let Err(why) = client.write(&out).await {
                return Sent::Failed(why);
            }
            out.clear();
            if let Err(why) = client.write(&data).await {
                return Sent::Failed(why);
            }
        }
        if let Framing::Chunked = framing {
            out.extend_from_slice(b"\r\n");
        }
    }
    drop(body);
    match framing {
        Framing::Length(_) if remaining > 0 => {
            let _ = client.write(&out).await;
            return Sent::Failed("response body shorter than its content-length");
        }
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(_) | Framing::Empty => {}
    }
    if let Err(why) = client.write(&out).await {
        return Sent::Failed(why);
    }
    if close { Sent::Close } else { Sent::KeepAlive }
}

/// The body's next frame if it is there now; `None` if it must be waited
/// for (the waker is registered all the same).
fn poll_ready_frame(
    body: &mut Body,
    cx: &mut Context<'_>,
) -> Option<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(frame) => Some(frame),
        Poll::Pending => None,
    }
}

impl<I: AsyncWrite + Unpin> Client<'_, '_, '_, I> {
    /// Writes and flushes `bytes`, unless the client takes none of them for
    /// `stall` or `kill` fires. Most writes are taken at once; the timer is
    /// set only for one that is not, and set again whenever the client
    /// takes some.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), &'static str> {
        let mut written = 0;
        let mut armed = false;
        poll_fn(|cx| {
            loop {
                let progress = if written < bytes.len() {
                    match Pin::new(&mut *self.io).poll_write(cx, &bytes[written..]) {
                        Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(CLIENT_FAILED)),
                        Poll::Ready(Ok(n)) => {
                            written += n;
                            true
                        }
                        Poll::Pending => false,
                    }
                } else {
                    match Pin::new(&mut *self.io).poll_flush(cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                        Poll::Ready(Err(_)) => return Poll::Ready(Err(CLIENT_FAILED)),
                        Poll::Pending => false,
                    }
                };
                if progress {
                    armed = false;
                    continue;
                }
                if self.shutdown.poll_kill(cx).is_ready() {
                    return Poll::Ready(Err("closed at shutdown"));
                }
                if !armed {
                    self.timer.as_mut().reset(Instant::now() + self.stall);
                    armed = true;
                }
                return match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err("client stopped reading its response")),
                    Poll::Pending => Poll::Pending,
                };
            }
        })
        .await
    }
}

/// Writes the status line and header fields into `out`, and chooses how
/// the body is delimited, as hyper's server does: the response's own
/// `Content-Length`, else the body's known length, else chunked. Returns
/// the framing and whether the connection closes after this response.
fn encode_head(
    out: &mut Vec<u8>,
    head: &http::response::Parts,
    exact: Option<u64>,
    method_is_head: bool,
    mut close: bool,
) -> (Framing, bool) {
    let status = head.status;
    let headers = &head.headers;
    // An upstream's own reason phrase, which hyper's client keeps only
    // when it is not the usual one for the status.
    let reason = head.extensions.get::<hyper::ext::ReasonPhrase>();
    let code = status.as_u16();
    let no_length = status.is_informational() || code == 204;
    let bodyless = method_is_head || no_length || code == 304;
    if status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            None => {
                let canonical = status.canonical_reason().unwrap_or("<none>");
                out.extend_from_slice(canonical.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
    }
    let mut length = None;
    let mut has_date = false;
    let mut says_close = false;
    for (name, value) in headers {
        if *name == CONTENT_LENGTH {
            if no_length || length.is_some() {
                continue;
            }
            match parse_length(value.as_bytes()) {
                Some(len) => length = Some(len),
                None => continue,
            }
        } else if *name == TRANSFER_ENCODING {
            // The body's delimiting is chosen here.
            continue;
        } else if *name == CONNECTION {
            says_close |= lists_token(value.as_bytes(), b"close");
        } else if *name == DATE {
            has_date = true;
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let framing = match (length, exact) {
        _ if bodyless && length.is_none() && exact == Some(0) => Framing::Empty,
        (Some(len), _) => Framing::Length(len),
        (None, Some(len)) => {
            if !no_length {
                let mut digits = itoa::Buffer::new();
                field(out, b"content-length", digits.format(len).as_bytes());
            }
            Framing::Length(len)
        }
        (None, None) if bodyless => Framing::Empty,
        (None, None) => {
            field(out, b"transfer-encoding", b"chunked");
            Framing::Chunked
        }
    };
    if close && !says_close {
        field(out, b"connection", b"close");
    }
    close |= says_close;
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::extend(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let framing = if bodyless { Framing::Empty } else { framing };
    (framing, close)
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A stream with bytes already read from it put back in front.
pub struct Replay<I> {
    inner: I,
    replay: Bytes,
}

impl<I> Replay<I> {
    pub fn new(inner: I, replay: Bytes) -> Self {
        Self { inner, replay }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Replay<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replay.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.replay.len().min(buf.remaining());
        buf.put_slice(&this.replay[..n]);
        this.replay.advance(n);
        if this.replay.is_empty() {
            // An emptied slice would still keep its whole buffer alive.
            this.replay = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(Replay);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, duplex};

    use super::*;

    #[tokio::test]
    async fn an_empty_frame_does_not_end_a_chunked_body() {
        let (mut peer, mut proxy) = duplex(4096);
        let pieces =
            ["one ", "", "two"].map(|p| Ok::<_, io::Error>(Bytes::from_static(p.as_bytes())));
        let body = Body::from_stream(futures_util::stream::iter(pieces));
        let sent = send_now(&mut proxy, Response::new(body), false, true);
        assert!(
            matches!(sent, Ok(Sent::KeepAlive)),
            "the body was all there"
        );
        drop(proxy);
        let mut all = Vec::new();
        peer.read_to_end(&mut all).await.expect("read");
        let all = String::from_utf8(all).expect("ASCII");
        assert!(all.contains("\r\ntransfer-encoding: chunked\r\n"), "{all}");
        assert!(
            all.ends_with("\r\n\r\n4\r\none \r\n3\r\ntwo\r\n0\r\n\r\n"),
            "{all:?}"
        );
    }

    /// A response the socket takes only part of at once is finished by
    /// `send`, from where `send_now` stopped.
    #[tokio::test]
    async fn a_response_taken_in_part_is_finished_from_where_it_stopped() {
        const LEN: usize = 1024;
        // Writes to `proxy` wait once 64 bytes are not yet read.
        let (mut peer, mut proxy) = duplex(64);
        let response = Response::new(Body::from(vec![b'x'; LEN]));
        let Err(unsent) = send_now(&mut proxy, response, false, true) else {
            panic!("a 64-byte pipe took the whole response at once");
        };
        assert_eq!(unsent.written, 64);
        assert!(unsent.sending.body.is_none(), "the body was all there");

        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).await.expect("read");
            all
        });
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();
        let mut shutdown = Shutdown {
            waiting: pin!(stop.cancelled()),
            stop: &stop,
            kill: &kill,
            killing: false,
            registered: None,
        };
        let mut timer = pin!(sleep_until(Instant::now() + Duration::from_secs(5)));
        let mut pending = BytesMut::new();
        let client = Client {
            io: &mut proxy,
            pending: &mut pending,
            stall: Duration::from_secs(5),
            timer: timer.as_mut(),
            shutdown: &mut shutdown,
        };
        assert!(matches!(send(client, unsent).await, Sent::KeepAlive));
        drop(proxy);

        let all = reader.await.expect("reader");
        let head_end = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a whole head")
            + 4;
        let head = String::from_utf8_lossy(&all[..head_end]);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        // Written once each: nothing sent twice, nothing left out.
        assert_eq!(head.matches("HTTP/1.1").count(), 1, "{head}");
        assert_eq!(
            head.matches("content-length: 1024\r\n").count(),
            1,
            "{head}"
        );
        assert_eq!(&all[head_end..], &[b'x'; LEN][..]);
    }
}

//! Keep-alive connections to one upstream, reused from request to request.
//!
//! Upstreams speak HTTP/1.1, one exchange per connection at a time, so a
//! pool is a stack of idle connections: a request takes the one used most
//! recently (the least likely to have been closed by the upstream) or opens
//! a new one, and the response body gives it back once the upstream has sent
//! all of it. There are two stacks: plain connections for GET and HEAD
//! requests without a body, which the request's task drives itself
//! ([`super::client`]), and connections driven by hyper's client for the
//! rest. Each upstream's pool is found together with its site
//! ([`super::upstream`]), so taking and returning a connection is a pop and a
//! push under an uncontended lock: no key to hash, and no task per request
//! to wait for the connection to become idle, which is what a general
//! pooled client (hyper-util's) spends about a tenth of a proxied request on.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use futures_util::future::Either;
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::sleep_until;

use super::client;
use super::headers::Forwarding;
use crate::config::Upstream;
use crate::spare;

/// How long an unused connection is kept. Upstreams such as Forgejo (Go's
/// net/http) close idle connections after 90 s or more; closing first means
/// a request is not sent on a connection the upstream is closing.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per upstream; beyond this, a connection that
/// finishes an exchange is closed.
pub const MAX_IDLE: usize = 256;

/// Why an upstream gave no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream: {0}")]
    Connect(#[source] io::Error),
    #[error("no connection within {} s", .0.as_secs())]
    ConnectTimeout(Duration),
    #[error("exchange with the upstream: {0}")]
    Exchange(#[source] hyper::Error),
    #[error("exchange with the upstream: {0}")]
    Plain(#[source] client::Error),
    /// Connecting included.
    #[error("no response head before the deadline")]
    TimedOut,
}

impl UpstreamError {
    /// Whether the TCP connection could not be opened (nothing was sent).
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::ConnectTimeout(_))
    }
}

/// A request ready for [`UpstreamPool::send`].
///
/// Made before the request's future is: a request's future is allocated
/// and moved whole, and holding the encoded head instead of the request
/// keeps it a fifth smaller, small enough for the allocator's per-thread
/// cache.
pub enum Outgoing {
    /// For [`client`]: the encoded head, and whether the method is HEAD.
    Plain {
        head: spare::Buffer,
        head_only: bool,
    },
    /// For hyper's client; boxed, as the rarer and larger.
    Hyper(Box<Request<Body>>),
}

impl Outgoing {
    /// `req` as it goes upstream, with the `forwarding` fields. `from_http1`
    /// says the client sent it over HTTP/1, so that its header map may be
    /// kept for reuse (see [`spare::give_back`]); `upgrading`, that it asks
    /// to upgrade.
    pub fn new(
        mut req: Request<Body>,
        forwarding: Forwarding,
        from_http1: bool,
        upgrading: bool,
    ) -> Self {
        if client::takes(&req, upgrading) {
            // Encoded once, in case an idle connection turns out to be
            // closed and it must go again on another.
            let head_only = req.method() == Method::HEAD;
            let head = client::encode(&req, &forwarding);
            if from_http1 {
                spare::give_back(req.into_parts().0.headers);
            }
            Self::Plain { head, head_only }
        } else {
            forwarding.insert_into(req.headers_mut());
            Self::Hyper(Box::new(req))
        }
    }
}

/// The connections to one upstream.
pub struct UpstreamPool {
    authority: Authority,
    /// `host:port` as dialled (port 80 when the URL names none).
    target: String,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Idle>,
    sweeper_started: AtomicBool,
}

/// The idle connections, oldest first; requests take from the back.
#[derive(Default)]
struct Idle {
    hyper: VecDeque<Parked<SendRequest<Body>>>,
    plain: VecDeque<Parked<client::Connection>>,
}

struct Parked<C> {
    conn: C,
    since: Instant,
}

impl UpstreamPool {
    pub fn new(upstream: &Upstream, connect_timeout: Duration) -> Arc<Self> {
        Self::with_idle_timeout(upstream, connect_timeout, IDLE_TIMEOUT)
    }

    fn with_idle_timeout(
        upstream: &Upstream,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            authority: upstream.authority.clone(),
            target: upstream.connect_target(),
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Idle::default()),
            sweeper_started: AtomicBool::new(false),
        })
    }

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Sends `req` (origin-form target, `Host` set) on an idle connection,
    /// or on a new one when none is idle, and waits for the response head
    /// until `deadline` ([`UpstreamError::TimedOut`] after it). An idle
    /// connection may have been closed by the upstream just then: a request
    /// it failed to take before writing any of it goes on to the next
    /// connection, and a GET or HEAD that got no byte of answer on it is
    /// sent once more, on a new connection.
    pub fn send(
        self: &Arc<Self>,
        req: Outgoing,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = Result<Response<PooledBody>, UpstreamError>> + Send + '_ {
        match req {
            Outgoing::Plain { head, head_only } => {
                Either::Left(self.send_plain(head, head_only, deadline))
            }
            // Boxed: hyper's exchange is the larger future by far, and the
            // requests that need it are the few.
            Outgoing::Hyper(req) => Either::Right(Box::pin(async move {
                tokio::time::timeout_at(deadline, self.send_hyper(*req))
                    .await
                    .unwrap_or(Err(UpstreamError::TimedOut))
            })),
        }
    }

    /// [`send`](Self::send) through hyper's client.
    async fn send_hyper(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: dialling (name lookup, TCP connect, handshake) is most
                // of this future's size, and most requests never get there.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    // After a 101 the connection belongs to the tunnel.
                    let back =
                        (response.status() != StatusCode::SWITCHING_PROTOCOLS).then(|| Returning {
                            pool: Arc::clone(self),
                            sender,
                        });
                    return Ok(response.map(|inner| {
                        PooledBody(Kind::Hyper(HyperBody {
                            inner,
                            ended: false,
                            back,
                        }))
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(UpstreamError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// [`send`](Self::send) for a request [`client`] takes, encoded.
    async fn send_plain(
        self: &Arc<Self>,
        request: spare::Buffer,
        head_only: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let mut pooled = self.checkout_plain();
        loop {
            let reused = pooled.is_some();
            let conn = match pooled.take() {
                Some(conn) => conn,
                None => Box::pin(self.connect_by(deadline)).await?,
            };
            match client::exchange(conn, &request, head_only, deadline, self).await {
                Ok(response) => return Ok(response.map(|body| PooledBody(Kind::Plain(body)))),
                // Once only, and never on another pooled connection: an
                // upstream that closes without answering this request
                // runs it at most twice.
                Err(e) if reused && e.unanswered() => {}
                Err(client::Error::TimedOut) => return Err(UpstreamError::TimedOut),
                Err(e) => return Err(UpstreamError::Plain(e)),
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Idle> {
        // The stacks hold no invariant a panic could break halfway.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection that can take a request now;
    /// closed or expired ones met on the way are dropped.
    fn checkout(&self) -> Option<SendRequest<Body>> {
        take_newest(
            &mut self.lock().hyper,
            self.idle_timeout,
            SendRequest::is_ready,
        )
    }

    /// [`checkout`](Self::checkout) for plain connections.
    fn checkout_plain(&self) -> Option<client::Connection> {
        take_newest(&mut self.lock().plain, self.idle_timeout, open)
    }

    /// Gives back a plain connection whose response has been read to the
    /// end.
    pub(super) fn put_plain(&self, conn: client::Connection) {
        park(&mut self.lock().plain, conn);
    }

    /// Gives back a connection whose last response has been read to the
    /// end. It is ready at once unless its request body is still being
    /// sent (the upstream answered before reading all of it); then a task
    /// waits for that, as it would otherwise hold up the next request.
    fn put(self: Arc<Self>, mut sender: SendRequest<Body>) {
        if sender.is_ready() {
            self.put_ready(sender);
        } else if !sender.is_closed()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    self.put_ready(sender);
                }
            });
        }
    }

    fn put_ready(&self, sender: SendRequest<Body>) {
        park(&mut self.lock().hyper, sender);
    }

    async fn connect(self: &Arc<Self>) -> Result<SendRequest<Body>, UpstreamError> {
        let stream = self.connect_plain().await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Exchange)?;
        // The connection's errors reach the request in flight through
        // `sender`; when it ends, nothing is left to report.
        tokio::spawn(connection.with_upgrades());
        Ok(sender)
    }

    /// A new plain connection, opened by `deadline`. The timer that waits
    /// for it is kept with it.
    async fn connect_by(
        self: &Arc<Self>,
        deadline: tokio::time::Instant,
    ) -> Result<client::Connection, UpstreamError> {
        let mut timer = Box::pin(sleep_until(deadline));
        let connecting = pin!(self.connect_plain());
        let stream = client::within(timer.as_mut(), deadline, connecting)
            .await
            .ok_or(UpstreamError::TimedOut)??;
        Ok(client::Connection::new(stream, timer))
    }

    async fn connect_plain(self: &Arc<Self>) -> Result<TcpStream, UpstreamError> {
        let stream = self.dial().await?;
        stream.set_nodelay(true).map_err(UpstreamError::Connect)?;
        self.start_sweeper();
        Ok(stream)
    }

    /// Opens a TCP connection to the upstream. A name is resolved first
    /// and its addresses tried in turn, each with an equal share of the
    /// connect timeout, so an address that drops packets leaves time for
    /// the next.
    async fn dial(&self) -> Result<TcpStream, UpstreamError> {
        let addresses: Vec<SocketAddr> = match self.target.parse() {
            Ok(address) => vec![address],
            Err(_) => tokio::net::lookup_host(self.target.as_str())
                .await
                .map_err(UpstreamError::Connect)?
                .collect(),
        };
        let share = self.connect_timeout / u32::try_from(addresses.len().max(1)).unwrap_or(1);
        let mut failure = UpstreamError::Connect(io::Error::new(
            io::ErrorKind::NotFound,
            "the upstream's name has no address",
        ));
        for address in addresses {
            match tokio::time::timeout(share, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) => failure = UpstreamError::Connect(e),
                Err(_) => failure = UpstreamError::ConnectTimeout(self.connect_timeout),
            }
        }
        Err(failure)
    }

    /// Closes connections idle for longer than the idle timeout, checked a
    /// few times per timeout, for as long as the pool is in use.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let idle_timeout = self.idle_timeout;
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout / 4);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let Some(cutoff) = Instant::now().checked_sub(idle_timeout) else {
                    continue;
                };
                let mut idle = pool.lock();
                idle.hyper
                    .retain(|entry| entry.since > cutoff && !entry.conn.is_closed());
                idle.plain
                    .retain(|entry| entry.since > cutoff && open(&entry.conn));
            }
        });
    }
}

/// The most recently parked connection that is younger than `max_age`
/// and `usable`; the others met on the way are dropped.
fn take_newest<C>(
    stack: &mut VecDeque<Parked<C>>,
    max_age: Duration,
    usable: impl Fn(&C) -> bool,
) -> Option<C> {
    while let Some(entry) = stack.pop_back() {
        if usable(&entry.conn) && entry.since.elapsed() < max_age {
            return Some(entry.conn);
        }
    }
    None
}

/// Parks `conn` on top of `stack`, unless [`MAX_IDLE`] are parked already.
fn park<C>(stack: &mut VecDeque<Parked<C>>, conn: C) {
    if stack.len() < MAX_IDLE {
        stack.push_back(Parked {
            conn,
            since: Instant::now(),
        });
    }
}

/// Whether an idle plain connection is still open: nothing has arrived on
/// it, not even the upstream's close. This costs no system call unless
/// something arrived since its last read, which left the connection
/// marked as drained (`client::read_arrived`).
fn open(conn: &client::Connection) -> bool {
    matches!(conn.stream.try_read(&mut [0; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Where a connection goes back to.
struct Returning {
    pool: Arc<UpstreamPool>,
    sender: SendRequest<Body>,
}

/// An upstream response body that returns its connection to the pool
/// once it has been read to the end. Dropped earlier (the client went
/// away) or after an error, the connection is closed instead: the rest of
/// that response would still be on it.
pub struct PooledBody(Kind);

enum Kind {
    Hyper(HyperBody),
    Plain(client::ResponseBody),
}

/// Why a response body broke off.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    Plain(#[from] client::Error),
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.0 {
            Kind::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
            Kind::Plain(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Hyper(body) => body.is_end_stream(),
            Kind::Plain(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Hyper(body) => body.size_hint(),
            Kind::Plain(body) => body.size_hint(),
        }
    }
}

/// A body from hyper's client; its connection goes back when it is dropped
/// after its end.
struct HyperBody {
    inner: Incoming,
    /// Whether the body said it has no more frames.
    ended: bool,
    back: Option<Returning>,
}

impl http_body::Body for HyperBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
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

impl Drop for HyperBody {
    fn drop(&mut self) {
        if (self.ended || self.inner.is_end_stream())
            && let Some(back) = self.back.take()
        {
            back.pool.put(back.sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::conn_info::ConnInfo;

    const WAIT: Duration = Duration::from_secs(5);

    fn upstream(addr: std::net::SocketAddr) -> Upstream {
        Upstream {
            authority: addr.to_string().parse().expect("authority"),
        }
    }

    /// A listener standing in for an upstream, and a pool of connections
    /// to it.
    async fn listening_upstream() -> (TcpListener, Arc<UpstreamPool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let pool = UpstreamPool::new(&upstream(listener.local_addr().expect("addr")), WAIT);
        (listener, pool)
    }

    /// A GET goes on a plain connection, a POST (even without a body) on
    /// one of hyper's.
    const METHODS: [Method; 2] = [Method::GET, Method::POST];

    fn request(method: &Method, path: &str) -> Outgoing {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "a.test")
            .body(Body::empty())
            .expect("request");
        let conn = ConnInfo::new("127.0.0.1:40000".parse().expect("addr"));
        let host = http::HeaderValue::from_static("a.test");
        let forwarding = Forwarding::new(req.headers(), &conn, conn.peer.ip(), &host);
        Outgoing::new(req, forwarding, true, false)
    }

    /// A deadline no test reaches.
    fn later() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(60)
    }

    fn get(path: &str) -> Outgoing {
        request(&Method::GET, path)
    }

    /// Reads one request head from `socket`; `None` at end of stream.
    async fn read_head(socket: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(WAIT, socket.read(&mut byte))
                .await
                .expect("upstream read timed out")
                .expect("upstream read");
            if n == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8_lossy(&head).into_owned())
    }

    /// Answers one request with `200` and `body`.
    async fn respond(socket: &mut TcpStream, body: &str) {
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        socket.write_all(reply.as_bytes()).await.expect("write");
    }

    async fn body_of(response: Response<PooledBody>) -> Bytes {
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
    }

    #[tokio::test]
    async fn a_connection_is_reused_and_closed_after_the_idle_timeout() {
        for method in METHODS {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let pool = UpstreamPool::with_idle_timeout(
                &upstream(listener.local_addr().expect("addr")),
                WAIT,
                Duration::from_millis(200),
            );
            let client = {
                let pool = Arc::clone(&pool);
                let method = method.clone();
                tokio::spawn(async move {
                    for path in ["/one", "/two"] {
                        let response = pool
                            .send(request(&method, path), later())
                            .await
                            .expect("response");
                        assert_eq!(body_of(response).await, "ok");
                    }
                })
            };
            let (mut socket, _) = listener.accept().await.expect("accept");
            for path in ["/one", "/two"] {
                let head = read_head(&mut socket).await.expect("a request");
                assert!(
                    head.starts_with(&format!("{method} {path} HTTP/1.1\r\n")),
                    "{head}"
                );
                respond(&mut socket, "ok").await;
            }
            client.await.expect("client");
            // Both requests came on the one connection; now idle, it is
            // closed by the pool within the timeout and a quarter.
            let started = Instant::now();
            assert_eq!(read_head(&mut socket).await, None);
            assert!(started.elapsed() < Duration::from_secs(2), "{method}");
        }
    }

    #[tokio::test]
    async fn a_response_head_in_pieces_after_an_interim_answer_is_read_whole() {
        let (listener, pool) = listening_upstream().await;
        let client = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                for path in ["/pieces", "/after"] {
                    let response = pool.send(get(path), later()).await.expect("response");
                    assert_eq!(response.status(), StatusCode::OK);
                    assert_eq!(response.headers()["x-piece"], "three");
                    assert_eq!(body_of(response).await, "ok");
                }
            })
        };
        let (mut socket, _) = listener.accept().await.expect("accept");
        read_head(&mut socket).await.expect("a request");
        // Each piece goes out after a pause, so that the first read takes
        // the interim answer and only the start of the final head.
        let pieces: [&[u8]; 3] = [
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nx-pie",
            b"ce: three\r\ncontent-le",
            b"ngth: 2\r\n\r\nok",
        ];
        for piece in pieces {
            socket.write_all(piece).await.expect("write");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The connection went back to the pool: the next request comes on it.
        read_head(&mut socket).await.expect("the next request");
        socket
            .write_all(b"HTTP/1.1 200 OK\r\nx-piece: three\r\ncontent-length: 2\r\n\r\nok")
            .await
            .expect("write");
        client.await.expect("client");
    }

    #[tokio::test]
    async fn a_response_not_read_to_the_end_does_not_return_its_connection() {
        for method in METHODS {
            let (listener, pool) = listening_upstream().await;
            let client = {
                let pool = Arc::clone(&pool);
                let method = method.clone();
                tokio::spawn(async move {
                    let mut response = pool
                        .send(request(&method, "/partial"), later())
                        .await
                        .expect("response");
                    let first = response.body_mut().frame().await.expect("a frame");
                    assert_eq!(first.expect("data").into_data().expect("data"), "part");
                    drop(response);
                    let response = pool
                        .send(request(&method, "/next"), later())
                        .await
                        .expect("response");
                    assert_eq!(body_of(response).await, "next");
                })
            };
            let (mut first, _) = listener.accept().await.expect("accept");
            read_head(&mut first).await.expect("a request");
            first
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\npart")
                .await
                .expect("write");
            // The rest of that body is never sent: the next request must
            // come on a new connection, and this one is closed.
            let (mut second, _) = listener.accept().await.expect("accept");
            let head = read_head(&mut second).await.expect("a request");
            assert!(
                head.starts_with(&format!("{method} /next HTTP/1.1\r\n")),
                "{head}"
            );
            respond(&mut second, "next").await;
            client.await.expect("client");
            assert_eq!(read_head(&mut first).await, None, "{method}");
        }
    }

    #[tokio::test]
    async fn an_upstream_that_closes_after_every_response_is_dialled_again() {
        for method in METHODS {
            let (listener, pool) = listening_upstream().await;
            let upstream = tokio::spawn(async move {
                // Each connection answers one request and is then closed,
                // as an upstream may do to an idle connection at any
                // moment.
                for _ in 0..3 {
                    let (mut socket, _) = listener.accept().await.expect("accept");
                    read_head(&mut socket).await.expect("a request");
                    respond(&mut socket, "ok").await;
                }
            });
            for _ in 0..3 {
                let response = pool
                    .send(request(&method, "/"), later())
                    .await
                    .expect("response");
                assert_eq!(body_of(response).await, "ok", "{method}");
            }
            upstream.await.expect("upstream");
        }
    }

    /// Reads a request for `path` from `socket`.
    async fn expect_request(socket: &mut TcpStream, path: &str) {
        let head = read_head(socket).await.expect("a request");
        assert!(
            head.starts_with(&format!("GET {path} HTTP/1.1\r\n")),
            "{head}"
        );
    }

    /// Sends a GET for `path` that the upstream leaves unanswered, and
    /// checks that it is given up at its deadline, `timeout` from now.
    async fn times_out(pool: &Arc<UpstreamPool>, path: &str, timeout: Duration) {
        let started = Instant::now();
        let error = pool.send(get(path), (started + timeout).into()).await.err();
        assert!(
            matches!(error, Some(UpstreamError::TimedOut)),
            "{path}: {error:?}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= timeout && waited < timeout + WAIT,
            "{path}: {waited:?}"
        );
    }

    #[tokio::test]
    async fn each_request_on_a_kept_connection_waits_until_its_own_deadline() {
        let (listener, pool) = listening_upstream().await;
        // Long enough for a request answered at once to be in by then on a
        // loaded machine.
        let short = Duration::from_secs(1);
        let client = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move {
                let ok = async |path: &str, timeout: Duration| {
                    let response = pool.send(get(path), (Instant::now() + timeout).into());
                    assert_eq!(body_of(response.await.expect(path)).await, "ok");
                };
                // The connection's timer is left set for this deadline.
                ok("/first", short).await;
                // Answered after that deadline, before its own: the timer
                // fires early and is moved on.
                ok("/slow", WAIT * 4).await;
                // A deadline earlier than the timer's (a timeout shortened
                // by a reload) holds as well.
                times_out(&pool, "/silent", short).await;
                // On a new connection: a request still unanswered when the
                // timer fires early is given up at its own deadline.
                ok("/again", short).await;
                times_out(&pool, "/late", short * 2).await;
            })
        };
        let (mut socket, _) = listener.accept().await.expect("accept");
        expect_request(&mut socket, "/first").await;
        respond(&mut socket, "ok").await;
        expect_request(&mut socket, "/slow").await;
        tokio::time::sleep(short * 2).await;
        respond(&mut socket, "ok").await;
        expect_request(&mut socket, "/silent").await;
        // The timed-out exchange closed its connection.
        assert_eq!(read_head(&mut socket).await, None);
        let (mut socket, _) = listener.accept().await.expect("accept");
        expect_request(&mut socket, "/again").await;
        respond(&mut socket, "ok").await;
        expect_request(&mut socket, "/late").await;
        tokio::time::timeout(WAIT * 4, client)
            .await
            .expect("the client ended")
            .expect("client");
        assert_eq!(read_head(&mut socket).await, None);
    }

    #[tokio::test]
    async fn an_upstream_sending_interim_answers_without_end_is_given_up_at_the_deadline() {
        let (listener, pool) = listening_upstream().await;
        let client = {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { times_out(&pool, "/", Duration::from_secs(1)).await })
        };
        let (mut socket, _) = listener.accept().await.expect("accept");
        expect_request(&mut socket, "/").await;
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(4096);
        // Until the pool gives up and closes the connection.
        while socket.write_all(&interim).await.is_ok() {}
        tokio::time::timeout(WAIT * 2, client)
            .await
            .expect("the client ended")
            .expect("client");
    }

    #[tokio::test]
    async fn a_wait_that_uses_up_the_task_budget_still_ends_at_the_deadline() {
        let mut timer = std::pin::pin!(sleep_until(
            (Instant::now() + Duration::from_millis(100)).into()
        ));
        let deadline = timer.deadline();
        let busy = std::pin::pin!(async {
            loop {
                tokio::task::coop::consume_budget().await;
            }
        });
        let waited =
            tokio::time::timeout(WAIT, client::within(timer.as_mut(), deadline, busy)).await;
        assert!(matches!(waited, Ok(None)), "the deadline was not seen");
    }

    #[tokio::test]
    async fn a_connect_that_hangs_times_out() {
        // A listener whose accept queue is full drops further SYNs, so a
        // connection to it neither opens nor fails.
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("inet");
        let mut queued = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
                Ok(connected) => queued.push(connected.expect("connect")),
                Err(_) => break,
            }
        }
        let pool = UpstreamPool::new(&upstream(addr), Duration::from_secs(1));
        let started = Instant::now();
        let error = pool.send(get("/"), later()).await.err().expect("an error");
        assert!(matches!(error, UpstreamError::ConnectTimeout(_)), "{error}");
        assert_eq!(error.to_string(), "no connection within 1 s");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn connect_failures_say_so() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = UpstreamPool::new(&upstream(addr), WAIT);
        let error = pool.send(get("/"), later()).await.err().expect("an error");
        assert!(error.is_connect(), "{error}");
        assert!(
            matches!(&error, UpstreamError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused)
        );
    }
}

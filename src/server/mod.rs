//! Accepting connections and serving HTTP on them.
//!
//! The accept loop enforces `max_connections` (beyond it, connections wait
//! in the kernel backlog), survives accept errors (resets are ignored,
//! descriptor exhaustion backs off instead of spinning), and serves each
//! connection in the HTTP version its first bytes ask for (`version`). The
//! public listener's HTTP/1.1 requests without a body are served by `h1`;
//! at the first request that is anything else, the connection goes to
//! hyper's HTTP/1.1 server, behind a check that refuses ambiguous framing
//! (`framing`). HTTP/2 is hyper's throughout, with what it writes in one
//! poll gathered into one write (`coalesce`). Shutdown
//! happens in three steps: stop accepting, ask every connection to finish
//! (`Connection: close` / GOAWAY), and close what is left at the deadline.

/// `AsyncWrite` for a stream wrapper that only watches what is read: every
/// write goes straight to its `inner` stream.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

mod activity;
mod coalesce;
mod date;
mod framing;
mod h1;
pub mod listener;
mod version;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::Request;
use hyper::body::Incoming;
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, error, info};

use crate::body_timeout::TimedBody;
use crate::config::StaticConfig;
use crate::conn_info::ConnInfo;
use crate::metrics::{Metrics, TlsHandshake};
use crate::proxy;
use crate::router::Pipeline;
use crate::tls::{Tls, handshake};
use activity::{Activity, TrackedBody, TrackedIo};
use coalesce::{Gathered, Gathering};
use framing::FramingGuard;
use version::{Prefixed, Version};

/// HTTP/2 streams one connection may have open at once (Envoy and the h2
/// CVE advisories recommend at most 100–128).
const MAX_CONCURRENT_STREAMS: u32 = 128;
/// Header fields one HTTP/1.1 request may carry; more get 431.
const MAX_HEADERS: usize = 100;
/// After an idle connection was asked to close (GOAWAY), how long the client
/// gets to finish the exchange before the socket is simply dropped: a client
/// that never acknowledges must not keep it open.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);
/// First pause after an accept error (descriptors or memory exhausted); it
/// doubles up to [`MAX_BACKOFF`] while the error persists.
const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a server answers requests with.
#[derive(Clone)]
pub enum App {
    /// The public listener's pipeline, on every proxied request's path.
    Proxy(Pipeline),
    /// A small axum router (the redirect and admin listeners), which finds
    /// the connection's [`ConnInfo`] in the request's extensions.
    Router(Router),
}

impl From<Pipeline> for App {
    fn from(pipeline: Pipeline) -> Self {
        Self::Proxy(pipeline)
    }
}

impl From<Router> for App {
    fn from(router: Router) -> Self {
        Self::Router(router)
    }
}

/// Serves connections for one or more listeners and drains them on stop.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    app: App,
    idle_timeout: Duration,
    body_read_timeout: Duration,
    max_header_bytes: usize,
    header_read_timeout: Duration,
    connections: TaskTracker,
    limit: Arc<Semaphore>,
    /// Stop accepting; connections finish their current request.
    stop: CancellationToken,
    /// The grace period is over: close whatever is left. Only ever
    /// cancelled after `stop` (see `drain`), which `h1` relies on to wait
    /// for both with one registration.
    kill: CancellationToken,
    metrics: Option<Arc<Metrics>>,
    /// Permits held by accept loops waiting for a connection, which are not
    /// open connections.
    waiting: Arc<AtomicUsize>,
}

/// Counts an accept loop as waiting while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    pub fn new(settings: &StaticConfig, app: impl Into<App>) -> Self {
        Self::with_metrics(settings, app, None)
    }

    /// A server whose connections are counted in `metrics`.
    pub fn with_metrics(
        settings: &StaticConfig,
        app: impl Into<App>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // The head timeout is `framing`'s: hyper's would also cut idle
            // keep-alive connections short.
            .header_read_timeout(None)
            .keep_alive(true)
            .max_buf_size(settings.max_header_bytes)
            // The buffer limit alone is loose: one read may carry a head
            // past it. This one counts the parsed head itself.
            .max_header_size(settings.max_header_bytes)
            .max_headers(MAX_HEADERS);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        let limit = Arc::new(Semaphore::new(settings.max_connections));
        let waiting = Arc::new(AtomicUsize::new(0));
        if let Some(metrics) = &metrics {
            // A connection holds a permit from accept (before any TLS
            // handshake) until it closes.
            let max = settings.max_connections;
            let permits = Arc::downgrade(&limit);
            let waiting = Arc::clone(&waiting);
            metrics.count_open_connections(Box::new(move || {
                permits.upgrade().map_or(0, |p| {
                    max.saturating_sub(p.available_permits())
                        .saturating_sub(waiting.load(Ordering::Relaxed))
                })
            }));
        }
        Self {
            inner: Arc::new(Inner {
                http1,
                http2,
                app: app.into(),
                idle_timeout: settings.idle_timeout,
                body_read_timeout: settings.body_read_timeout,
                max_header_bytes: settings.max_header_bytes,
                header_read_timeout: settings.header_read_timeout,
                connections: TaskTracker::new(),
                limit,
                stop: CancellationToken::new(),
                kill: CancellationToken::new(),
                metrics,
                waiting,
            }),
        }
    }

    /// Counts a finished TLS handshake; for the TLS accept path.
    pub fn record_tls_handshake(&self, outcome: TlsHandshake) {
        if let Some(metrics) = &self.inner.metrics {
            metrics.tls_handshake(outcome);
        }
    }

    /// Whether the listeners still accept (false once stopping).
    pub fn is_accepting(&self) -> bool {
        !self.inner.stop.is_cancelled()
    }

    /// Accepts plain-TCP connections until [`Server::stop`] is called.
    pub async fn serve_plain(&self, listener: TcpListener) {
        self.accept_loop(listener, |server, stream, info, permit| {
            server.spawn_connection(stream, info, permit);
        })
        .await;
    }

    /// Accepts TLS connections until [`Server::stop`] is called. Each
    /// handshake runs in its own task, bounded by `handshake_timeout`, so a
    /// slow or silent client holds up nobody else.
    pub async fn serve_tls(&self, listener: TcpListener, tls: Tls, handshake_timeout: Duration) {
        self.accept_loop(listener, |server, stream, info, permit| {
            let server = server.clone();
            let tls = tls.clone();
            self.inner.connections.spawn(async move {
                let handshake = handshake::accept(stream, &tls, info.peer, handshake_timeout);
                let done = tokio::select! {
                    done = handshake => done,
                    () = server.inner.stop.cancelled() => return,
                };
                match done {
                    Ok(done) => {
                        server.record_tls_handshake(TlsHandshake::Success);
                        let tls_version = match done.stream.get_ref().1.protocol_version() {
                            Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
                            Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
                            _ => None,
                        };
                        let info = ConnInfo {
                            https: true,
                            sni: done.sni,
                            tls_version,
                            ..info
                        };
                        server.spawn_connection(done.stream, info, permit);
                    }
                    Err(handshake::Ended::Challenge) => {}
                    Err(handshake::Ended::Failed) => {
                        server.record_tls_handshake(TlsHandshake::Failure);
                    }
                    Err(handshake::Ended::TimedOut) => {
                        server.record_tls_handshake(TlsHandshake::Timeout);
                    }
                }
            });
        })
        .await;
    }

    /// The accept loop shared by every kind of listener. `on_accept` gets
    /// the TCP stream and starts whatever comes next (TLS, then HTTP).
    pub async fn accept_loop<F>(&self, listener: TcpListener, on_accept: F)
    where
        F: Fn(&Server, tokio::net::TcpStream, ConnInfo, OwnedSemaphorePermit),
    {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&self.inner.limit).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = self.inner.stop.cancelled() => return,
            };
            let waiting = Waiting::new(&self.inner.waiting);
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = self.inner.stop.cancelled() => return,
            };
            drop(waiting);
            match accepted {
                Ok((stream, peer)) => {
                    if backoff > INITIAL_BACKOFF {
                        info!("accepting connections again");
                        backoff = INITIAL_BACKOFF;
                    }
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!("set TCP_NODELAY: {e}");
                    }
                    if let Some(metrics) = &self.inner.metrics {
                        metrics.connection_accepted();
                    }
                    on_accept(self, stream, ConnInfo::new(peer), permit);
                }
                Err(e) if is_connection_error(&e) => debug!("accept: {e}"),
                Err(e) => {
                    // Out of descriptors or memory: accepting again at once
                    // would spin. Wait, and let existing connections finish.
                    if backoff == INITIAL_BACKOFF {
                        error!("accept failed: {e}; backing off");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.inner.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Serves HTTP on an accepted (and, for TLS, handshaken) stream.
    pub fn spawn_connection<I>(&self, io: I, info: ConnInfo, permit: OwnedSemaphorePermit)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Boxed, the stream (over 1 KiB with TLS) is a pointer in the
        // connection's task.
        let connection = self.clone().connection(Box::new(io), info, permit);
        self.inner.connections.spawn(connection);
    }

    /// A connection's task, which holds `permit` until the connection ends.
    ///
    /// A task keeps room for the largest state its future ever has for as
    /// long as it lives, so this future holds only what an idle HTTP/1.1
    /// connection needs. The stages that need more are boxed while they
    /// last: reading the first bytes, hyper's connection, and in `h1` a
    /// response that cannot be written at once. An async fn would also
    /// keep its arguments beside their moved copies, hence the `async
    /// move` block.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep its arguments twice for the connection's life"
    )]
    fn connection<I>(
        self,
        io: Box<I>,
        info: ConnInfo,
        permit: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        async move {
            let activity =
                Activity::new(self.inner.metrics.as_ref().map(|m| m.connection_gauges()));
            let io = TrackedIo::new(io, Arc::clone(&activity));
            let Some((version, io)) = Box::pin(first_bytes(&self.inner, io, info.peer)).await
            else {
                return;
            };
            // From when the connection's task began (the activity record's
            // start), which is not worth 16 more bytes of its state.
            let first_head_due =
                Instant::from_std(activity.opened()) + self.inner.header_read_timeout;
            let (io, head_due) = match (version, &self.inner.app) {
                (Version::Http1, App::Proxy(pipeline)) => {
                    let conn = h1::Conn {
                        server: &self.inner,
                        pipeline,
                        info: &info,
                        activity: &activity,
                    };
                    match h1::serve(io, conn, first_head_due).await {
                        h1::Outcome::Closed => return,
                        h1::Outcome::HandOver(io, head_due) => (io, head_due),
                    }
                }
                _ => (h1::Replay::new(io, Bytes::new()), first_head_due),
            };
            Box::pin(hyper_connection(
                &self.inner,
                io,
                head_due,
                version,
                &info,
                activity,
            ))
            .await;
            // The connection's place under `max_connections` goes with it:
            // here, or with this future after an earlier return. Naming the
            // permit here is what moves it into the future at all.
            drop(permit);
        }
    }

    /// Stops accepting on every listener of this server.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }

    /// Connections being served right now (upgraded tunnels not included:
    /// their HTTP connection ended with the upgrade).
    pub fn open_connections(&self) -> usize {
        self.inner.connections.len()
    }

    /// Waits until `deadline` for open connections to finish, then closes
    /// the rest. Returns how many were cut.
    pub async fn drain(&self, deadline: Instant) -> usize {
        self.stop();
        self.inner.connections.close();
        if tokio::time::timeout_at(deadline, self.inner.connections.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let cut = self.inner.connections.len();
        self.inner.kill.cancel();
        self.inner.connections.wait().await;
        cut
    }
}

/// Reads a connection's first bytes, which tell HTTP/2 from HTTP/1. The
/// first bytes belong to the first head and get its time. The framing
/// check's own timer does not cover a beginning of the HTTP/2 preface,
/// which it leaves alone as not HTTP/1.
async fn first_bytes<I: AsyncRead + Unpin>(
    inner: &Inner,
    io: I,
    peer: SocketAddr,
) -> Option<(Version, Prefixed<I>)> {
    let first_bytes_due = inner.header_read_timeout.min(inner.idle_timeout);
    let detected = tokio::select! {
        detected = version::detect(io) => detected,
        () = tokio::time::sleep(first_bytes_due) => {
            debug!(%peer, "no request in time; closing");
            return None;
        }
        () = inner.stop.cancelled() => return None,
        () = inner.kill.cancelled() => return None,
    };
    match detected {
        Ok(detected) => Some(detected),
        Err(e) => {
            debug!(%peer, "connection: {e}");
            None
        }
    }
}

/// Serves a connection with hyper's server from here on: HTTP/2, the
/// small routers' HTTP/1.1, and the proxy's HTTP/1.1 from the first request
/// `h1` does not serve, behind the framing check.
async fn hyper_connection<I>(
    inner: &Inner,
    io: h1::Replay<Prefixed<TrackedIo<Box<I>>>>,
    head_due: Instant,
    version: Version,
    info: &ConnInfo,
    activity: Arc<Activity>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let io = FramingGuard::new(
        io,
        inner.max_header_bytes,
        peer.ip(),
        inner.header_read_timeout,
        head_due,
        Arc::clone(&activity),
    );
    let app = inner.app.clone();
    let requests = Arc::clone(&activity);
    let body_read_timeout = inner.body_read_timeout;
    let service = service_fn(move |req: Request<Incoming>| {
        let req = req.map(|body| Body::new(TimedBody::new(body, body_read_timeout)));
        let in_flight = requests.start_request();
        // Both answers come boxed (`proxy::Answer`), so what hyper keeps per
        // request, and moves into each HTTP/2 stream's task, is a pointer
        // and the guard rather than room for the routers' larger future.
        let response: proxy::Answer = match &app {
            App::Proxy(pipeline) => pipeline.serve(info, req),
            App::Router(router) => {
                let mut req = req;
                req.extensions_mut().insert(info.clone());
                Box::pin(router.clone().oneshot(req).map(|response| match response {
                    Ok(response) => response,
                    Err(never) => match never {},
                }))
            }
        };
        response.map(move |response| {
            Ok::<_, Infallible>(response.map(|inner| TrackedBody::new(inner, in_flight)))
        })
    });
    // Each version's connection in its own box, so that an HTTP/1 one
    // (the common case) is not the size of the larger HTTP/2 one.
    let mut conn: HttpConnection<_, _, _> = match version {
        Version::Http1 => Either::Left(Box::pin(
            inner
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        )),
        Version::Http2 => {
            let (io, outlet) = coalesce::gather(io);
            let conn = inner.http2.serve_connection(TokioIo::new(io), service);
            Either::Right(Gathered::new(Box::pin(conn), outlet))
        }
    };
    // Set once the connection was asked to close because it was idle:
    // past this instant, if it is still idle, it is dropped.
    let mut drop_at: Option<Instant> = None;
    let mut closing = false;
    loop {
        let stall = activity
            .write_stall_deadline(inner.idle_timeout)
            .map(Instant::from_std);
        let check = match drop_at {
            Some(at) => at,
            None => activity
                .idle_deadline(inner.idle_timeout)
                .map_or_else(|| Instant::now() + inner.idle_timeout, Instant::from_std),
        };
        let check = stall.map_or(check, |stall| stall.min(check));
        tokio::select! {
            result = &mut conn => {
                if let Err(e) = result {
                    debug!(%peer, "connection: {e}");
                }
                return;
            }
            () = tokio::time::sleep_until(check) => {
                let stalled = activity
                    .write_stall_deadline(inner.idle_timeout)
                    .is_some_and(|at| at <= std::time::Instant::now());
                if stalled {
                    // Its response cannot be delivered; holding the
                    // connection (and the upstream's) helps nobody.
                    debug!(%peer, "client stopped reading its response; closing");
                    return;
                }
                let idle = activity
                    .idle_deadline(inner.idle_timeout)
                    .is_some_and(|at| at <= std::time::Instant::now());
                if !idle {
                    drop_at = drop_at.map(|_| Instant::now() + IDLE_CLOSE_GRACE);
                } else if drop_at.is_some() {
                    debug!(%peer, "idle connection did not close; dropping it");
                    return;
                } else {
                    if !closing {
                        graceful_shutdown(&mut conn);
                        closing = true;
                    }
                    drop_at = Some(Instant::now() + IDLE_CLOSE_GRACE);
                }
            }
            () = inner.stop.cancelled(), if !closing => {
                graceful_shutdown(&mut conn);
                closing = true;
            }
            () = inner.kill.cancelled() => return,
        }
    }
}

/// hyper's connection for whichever version the client speaks; HTTP/2's
/// writes are gathered (`coalesce`).
type HttpConnection<I, S, E> = Either<
    Pin<Box<http1::UpgradeableConnection<TokioIo<I>, S>>>,
    Gathered<Pin<Box<http2::Connection<TokioIo<Gathering<I>>, S, E>>>, I>,
>;

/// Asks an HTTP/1 connection to close after its current response, or an
/// HTTP/2 one to send GOAWAY and finish its open streams.
fn graceful_shutdown<I, S, E, B>(conn: &mut HttpConnection<I, S, E>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Http2ServerConnExec<S::Future, B>,
{
    match conn {
        Either::Left(http1) => http1.as_mut().graceful_shutdown(),
        Either::Right(http2) => http2.conn().as_mut().graceful_shutdown(),
    }
}

/// Errors that concern one connection, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

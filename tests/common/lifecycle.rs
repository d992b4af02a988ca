//! Helpers for the lifecycle tests: rewriting a running proxy's config and
//! reloading it, a stand-in for systemd's notify socket, clients that reach
//! the proxy under a site's name, and WebSockets.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message as WsMessage, WebSocketUpgrade};
use axum::response::IntoResponse;
use futures_util::{SinkExt, StreamExt};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::ProxyProcess;

impl ProxyProcess {
    /// Replaces the config file the way a deploy tool would (write a new
    /// file, rename it over the old one), with `$DIR` expanded.
    pub fn write_config(&self, toml: &str) {
        let toml = toml.replace("$DIR", self.dir.path().to_str().expect("utf-8 path"));
        let next = self.dir.path().join("config.toml.next");
        std::fs::write(&next, toml).expect("write config");
        std::fs::rename(&next, self.config_path()).expect("rename config");
    }

    /// How many lines printed so far match `pred`.
    pub fn count_lines(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines().iter().filter(|l| pred(l)).count()
    }

    /// Sends SIGHUP and waits for the `CONFIG_RELOAD` line it causes,
    /// which is returned.
    pub fn sighup_and_wait(&self) -> String {
        let before = self.count_lines(is_reload_line);
        self.signal("HUP");
        let lines = self.wait_for_count(is_reload_line, before + 1, Duration::from_secs(10));
        lines[before].clone()
    }

    /// Rewrites the config, sends SIGHUP, and waits for the result line.
    pub fn reload_with(&self, toml: &str) -> String {
        self.write_config(toml);
        self.sighup_and_wait()
    }
}

fn is_reload_line(line: &str) -> bool {
    line.contains(" CONFIG_RELOAD ")
}

/// A unix datagram socket standing in for systemd's `NOTIFY_SOCKET`.
pub struct NotifySocket {
    socket: UnixDatagram,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    pub fn bind() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        Self {
            socket,
            path,
            _dir: dir,
        }
    }

    pub fn env(&self) -> (&'static str, &str) {
        ("NOTIFY_SOCKET", self.path.to_str().expect("utf-8 path"))
    }

    /// The next message, as its `KEY=VALUE` lines.
    pub fn recv(&self, timeout: Duration) -> Vec<String> {
        self.socket
            .set_read_timeout(Some(timeout))
            .expect("set timeout");
        let mut buf = [0u8; 4096];
        let n = self
            .socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no sd_notify message within {timeout:?}: {e}"));
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// Resolves every name to the proxy, so that a client can use a site's
/// name in its URLs (HTTP/2 takes `:authority` from the URL, not `Host`).
#[derive(Clone)]
pub struct ToProxy(pub SocketAddr);

impl tower::Service<Name> for ToProxy {
    type Response = std::iter::Once<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(std::iter::once(self.0)))
    }
}

pub type ProxyClient = Client<HttpConnector<ToProxy>, Body>;

/// A client whose every connection goes to the proxy at `addr`; URLs name
/// the site, with the proxy's port (`http://app.test:PORT/path`).
pub fn client_to(addr: SocketAddr, http2: bool) -> ProxyClient {
    let connector = HttpConnector::new_with_resolver(ToProxy(addr));
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build(connector)
}

/// An upstream WebSocket handler that echoes every message.
pub async fn ws_echo(ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, WsMessage::Close(_)) || socket.send(msg).await.is_err() {
                break;
            }
        }
    })
}

/// Opens a WebSocket through the proxy to `url` (`ws://site/path`).
pub async fn ws_connect(addr: SocketAddr, url: &str) -> WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let request = url.into_client_request().expect("ws request");
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("ws handshake within 10 s")
    .expect("ws handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// Sends `text` and expects it back.
pub async fn ws_roundtrip(ws: &mut WebSocketStream<TcpStream>, text: &str) {
    ws.send(Message::text(text)).await.expect("ws send");
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("ws echo within 10 s")
        .expect("ws frame")
        .expect("ws frame ok");
    assert_eq!(echoed.into_text().expect("text").as_str(), text);
}

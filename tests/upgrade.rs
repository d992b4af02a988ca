//! WebSocket and other HTTP/1.1 upgrades through the proxy.

mod common;

use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use common::{ProxyProcess, Upstream, config, read_until_close, status_of};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn ws_echo(ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.on_upgrade(|mut socket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if matches!(msg, AxMessage::Close(_)) || socket.send(msg).await.is_err() {
                break;
            }
        }
    })
}

#[tokio::test]
async fn websocket_echo_through_proxy() {
    let upstream = Upstream::start(Router::new().route("/ws", get(ws_echo))).await;
    let proxy = ProxyProcess::start(&config(&[("ws.test", &upstream.url())], "", ""));
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    let request = "ws://ws.test/ws".into_client_request().expect("request");
    let (mut ws, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .expect("handshake within 5 s")
    .expect("handshake");
    assert_eq!(response.status(), 101);
    for text in ["hello", "second frame"] {
        ws.send(Message::text(text)).await.expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo within 5 s")
            .expect("frame")
            .expect("frame ok");
        assert_eq!(echoed.into_text().expect("text"), text);
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .expect("send");
    let echoed = ws.next().await.expect("frame").expect("ok");
    assert_eq!(echoed.into_data().as_ref(), &[0u8, 1, 2, 255]);
    ws.close(None).await.expect("close");
}

#[tokio::test]
async fn refused_upgrade_is_not_tunnelled() {
    // This upstream answers 200 to an upgrade request: the connection must
    // stay HTTP, so the next request on it is parsed as HTTP again.
    let upstream = Upstream::start(Router::new().fallback(any(|| async { "plain answer" }))).await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &upstream.url())], "", ""));
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\
              GET /second HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
    let out = read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(200), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn unsolicited_switching_protocols_is_refused() {
    // A raw upstream that answers 101 to a plain request and then sends
    // bytes that must never reach the client.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: evil\r\n\r\nSMUGGLED")
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
    });
    let mut proxy = ProxyProcess::start(&config(&[("a.test", &format!("http://{addr}"))], "", ""));
    let out = common::raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&out), Some(502), "{out}");
    assert!(!out.contains("SMUGGLED"), "{out}");
    proxy.wait_for_line(
        |l| l.contains(" UPSTREAM_ERROR ") && l.contains("did not ask to upgrade"),
        Duration::from_secs(5),
    );
}

//! WebSocket and other HTTP/1.1 upgrades through the proxy.

mod common;

use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message as AxMessage, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use common::{ProxyProcess, Upstream, config, h2frames, read_until_close, status_of};
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

    // HTTP/2 has no upgrades at all: the same answer to an h2 request is
    // refused too, and nothing of it reaches the client.
    let mut h2 = h2frames::connect(proxy.addr).await;
    h2.write_all(&h2frames::get(1, "a.test", "/"))
        .await
        .expect("h2 request");
    let (frames, _) = h2frames::read_until(&mut h2, Duration::from_secs(5), |f| {
        f.kind == h2frames::DATA && f.stream == 1 && f.flags & h2frames::END_STREAM != 0
    })
    .await;
    let head = frames
        .iter()
        .find(|f| f.kind == h2frames::HEADERS && f.stream == 1)
        .expect("h2 response");
    assert_eq!(h2frames::status_of(&head.payload), Some(502));
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == h2frames::DATA)
        .flat_map(|f| f.payload.clone())
        .collect();
    assert!(!String::from_utf8_lossy(&body).contains("SMUGGLED"));
}

#[tokio::test]
async fn no_bytes_are_tunnelled_before_the_upstreams_101() {
    // A raw upstream: after the request head it waits, noting anything that
    // arrives before it has answered; then it switches protocols and echoes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (early_tx, early_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
                .await
                .expect("read head");
            assert!(n > 0, "closed before the head");
            head.extend_from_slice(&buf[..n]);
        }
        let end = head.windows(4).position(|w| w == b"\r\n\r\n").expect("end") + 4;
        let mut early = head.split_off(end);
        if let Ok(Ok(n)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::io::AsyncReadExt::read(&mut s, &mut buf),
        )
        .await
        {
            early.extend_from_slice(&buf[..n]);
        }
        early_tx.send(early).ok();
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n",
        )
        .await
        .expect("101");
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .expect("tunnel read");
        let mut echo = b"ECHO:".to_vec();
        echo.extend_from_slice(&buf[..n]);
        s.write_all(&echo).await.expect("echo");
    });
    let proxy = ProxyProcess::start(&config(&[("a.test", &format!("http://{addr}"))], "", ""));
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    stream
        .write_all(
            b"GET /t HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: test\r\n\r\nEARLY",
        )
        .await
        .expect("write");
    let early = tokio::time::timeout(Duration::from_secs(5), early_rx)
        .await
        .expect("upstream got the head")
        .expect("early bytes");
    assert!(
        early.is_empty(),
        "tunnelled before 101: {:?}",
        String::from_utf8_lossy(&early)
    );
    let out = read_until_close(&mut stream, Duration::from_secs(2)).await;
    assert_eq!(status_of(&out), Some(101), "{out}");
    assert!(out.ends_with("\r\n\r\nECHO:EARLY"), "{out}");
}

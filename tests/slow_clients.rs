//! Clients that are slow or send too much: they are cut off, and everyone
//! else is still served meanwhile.

mod common;

use std::time::{Duration, Instant};

use common::{ProxyProcess, Upstream, config, get, status_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn slowloris_is_cut_off_after_header_read_timeout() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(
        &[("a.test", &a.url())],
        "header_read_timeout_secs = 2",
        "",
    ));
    let mut slow = TcpStream::connect(proxy.addr).await.expect("connect");
    let started = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_after = None;
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // Meanwhile, a normal client is served promptly.
        let t = Instant::now();
        assert_eq!(get(proxy.addr, "a.test", "/").await.status, 200);
        assert!(t.elapsed() < Duration::from_secs(1));
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => {
                // hyper may answer 408 before closing; that is fine too.
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            }
            Err(_) => {}
        }
    }
    let closed_after = closed_after.expect("slow client was never cut off");
    assert!(
        closed_after >= Duration::from_millis(1500) && closed_after < Duration::from_secs(5),
        "cut off after {closed_after:?}"
    );
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let a = Upstream::echo("site-a").await;
    let proxy = ProxyProcess::start(&config(&[("a.test", &a.url())], "", ""));
    let mut req = b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 100 << 10));
    req.extend_from_slice(b"\r\n\r\n");
    let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
    // The proxy may answer and close before the whole head is written.
    let _ = stream.write_all(&req).await;
    let out = common::read_until_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(431), "{out}");

    let mut many = b"GET / HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for i in 0..150 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let out = common::raw(proxy.addr, &many, Duration::from_secs(5)).await;
    assert_eq!(status_of(&out), Some(431), "{out}");
    assert_eq!(a.hits(), 0);
    assert_eq!(get(proxy.addr, "a.test", "/").await.status, 200);
}

//! The benchmark's upstream: answers every request from memory, so that the
//! proxies in `bench/run.sh` are measured rather than the origin behind them.
//!
//! `GET /10m` returns 10 MiB, anything else 1 KiB. One thread, HTTP/1.1
//! keep-alive, no logging, no file system: the cheapest origin the same
//! load generator can drive directly, which makes the "direct" row the
//! ceiling the proxies are compared against.
//!
//! Usage: `bench_upstream 127.0.0.1:PORT`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

const SMALL: usize = 1024;
const LARGE: usize = 10 * 1024 * 1024;

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> std::io::Result<()> {
    let small = Bytes::from(vec![b'x'; SMALL]);
    let large = Bytes::from(vec![b'y'; LARGE]);
    let listener = TcpListener::bind(addr).await?;
    println!("LISTEN addr={}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (small, large) = (small.clone(), large.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let body = if req.uri().path() == "/10m" {
                    large.clone()
                } else {
                    small.clone()
                };
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            // A client closing mid-response is normal under load.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

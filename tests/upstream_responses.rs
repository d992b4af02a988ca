//! How upstream answers to GET and HEAD requests are read: every way an
//! upstream may delimit a response, which connections are used again,
//! a pooled connection the upstream closed or spoke on unasked, and
//! answers that are broken.
//! The upstream here is a raw socket that writes exactly the bytes a test
//! scripts.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use common::{NO_RATE_LIMIT, ProxyProcess, Reply, config};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// How long one step of a test may take.
const BOUND: Duration = Duration::from_secs(5);

/// What the scripted upstream does with one request.
enum Answer {
    /// Writes these bytes and waits for the next request.
    Reply(&'static [u8]),
    /// Writes these bytes and closes the connection.
    ReplyAndClose(&'static [u8]),
    /// Closes the connection without a word.
    Close,
}

/// A raw upstream that answers requests with scripted answers, in order,
/// whichever connection they come on.
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// The request lines it received, in order.
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Scripted {
    async fn start(answers: Vec<Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let task = {
            let accepted = Arc::clone(&accepted);
            let requests = Arc::clone(&requests);
            tokio::spawn(async move {
                loop {
                    let Ok((socket, _)) = listener.accept().await else {
                        return;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(socket, Arc::clone(&answers), Arc::clone(&requests)));
                }
            })
        };
        Self {
            addr,
            accepted,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut socket: TcpStream,
    answers: Arc<Mutex<VecDeque<Answer>>>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    while let Some(line) = read_request(&mut socket).await {
        requests.lock().expect("requests").push(line);
        let next = answers.lock().expect("answers").pop_front();
        match next {
            Some(Answer::Reply(bytes)) => {
                if socket.write_all(bytes).await.is_err() {
                    return;
                }
            }
            Some(Answer::ReplyAndClose(bytes)) => {
                let _ = socket.write_all(bytes).await;
                return;
            }
            Some(Answer::Close) | None => return,
        }
    }
}

/// Reads one request head; its request line, or `None` at end of stream.
async fn read_request(socket: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(BOUND, socket.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    head.lines().next().map(str::to_owned)
}

fn proxy_to(upstream: &Scripted) -> ProxyProcess {
    ProxyProcess::start(&config(&[("a.test", &upstream.url())], "", NO_RATE_LIMIT))
}

fn request(proxy: &ProxyProcess, method: Method, path: &str) -> http::Request<Body> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", proxy.addr))
        .header(http::header::HOST, "a.test")
        .body(Body::empty())
        .expect("request")
}

async fn get(proxy: &ProxyProcess, path: &str) -> Reply {
    common::send(&common::http1_client(), request(proxy, Method::GET, path)).await
}

#[tokio::test]
async fn every_framing_is_read_and_the_connection_kept_when_it_can_be() {
    let upstream = Scripted::start(vec![
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfixed"),
        Answer::Reply(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
              8;name=value\r\nchunked \r\n4\r\nbody\r\n0\r\nX-Trailer: dropped\r\n\r\n",
        ),
        Answer::Reply(
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nafter hints",
        ),
        Answer::Reply(b"HTTP/1.1 204 No Content\r\n\r\n"),
        // A HEAD answer names the length of what a GET would get.
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"),
        Answer::Reply(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"),
        // No length: the body is what comes until the upstream closes.
        Answer::ReplyAndClose(b"HTTP/1.1 200 OK\r\nX-Kind: until close\r\n\r\nuntil close"),
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnew"),
    ])
    .await;
    let proxy = proxy_to(&upstream);
    let client = common::http1_client();

    let fixed = get(&proxy, "/fixed").await;
    assert_eq!(
        (fixed.status.as_u16(), fixed.text().as_str()),
        (200, "fixed")
    );
    let chunked = get(&proxy, "/chunked").await;
    assert_eq!(chunked.text(), "chunked body");
    assert!(chunked.headers.get("x-trailer").is_none());
    let hinted = get(&proxy, "/hinted").await;
    assert_eq!(
        (hinted.status.as_u16(), hinted.text().as_str()),
        (200, "after hints")
    );
    let empty = get(&proxy, "/empty").await;
    assert_eq!((empty.status.as_u16(), empty.body.len()), (204, 0));
    let head = common::send(&client, request(&proxy, Method::HEAD, "/head")).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-length"], "100");
    assert!(head.body.is_empty());
    let unchanged = get(&proxy, "/unchanged").await;
    assert_eq!(unchanged.status, 304);
    assert_eq!(upstream.accepted(), 1, "all of these on one connection");

    let until_close = get(&proxy, "/until-close").await;
    assert_eq!(until_close.text(), "until close");
    // That connection ended with its response; the next request needs a
    // new one.
    let after = get(&proxy, "/after").await;
    assert_eq!(after.text(), "new");
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_upstream_is_replaced_unseen() {
    let upstream = Scripted::start(vec![
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"),
        // The upstream closes the idle connection just as the next request
        // arrives on it, as a server whose keep-alive timer ran out does.
        Answer::Close,
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"),
    ])
    .await;
    let proxy = proxy_to(&upstream);
    assert_eq!(get(&proxy, "/one").await.text(), "first");
    let second = get(&proxy, "/two").await;
    assert_eq!(
        (second.status.as_u16(), second.text().as_str()),
        (200, "second")
    );
    assert_eq!(upstream.accepted(), 2);
    assert_eq!(
        upstream.requests(),
        [
            "GET /one HTTP/1.1",
            "GET /two HTTP/1.1",
            "GET /two HTTP/1.1"
        ]
    );
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_spoke_on_unasked_is_not_used_again() {
    // Some servers answer `408` on an idle keep-alive connection before
    // they close it. Those bytes arrive after the response was read to its
    // end; the next request must not take them for its answer.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (speak, spoken) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let upstream = {
        let (speak, spoken) = (Arc::clone(&speak), Arc::clone(&spoken));
        tokio::spawn(async move {
            let (mut idle, _) = listener.accept().await.expect("accept");
            read_request(&mut idle).await.expect("first request");
            idle.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
                .await
                .expect("first answer");
            speak.notified().await;
            idle.write_all(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
                .await
                .expect("unasked answer");
            spoken.notify_one();
            let (mut fresh, _) = listener.accept().await.expect("second accept");
            read_request(&mut fresh).await.expect("second request");
            fresh
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                .await
                .expect("second answer");
            // Neither connection closes before the second answer is out.
            (idle, fresh)
        })
    };
    let proxy = ProxyProcess::start(&config(&[("a.test", &url)], "", NO_RATE_LIMIT));
    assert_eq!(get(&proxy, "/one").await.text(), "first");
    speak.notify_one();
    tokio::time::timeout(BOUND, spoken.notified())
        .await
        .expect("the upstream spoke");
    let second = get(&proxy, "/two").await;
    assert_eq!(
        (second.status.as_u16(), second.text().as_str()),
        (200, "second")
    );
    tokio::time::timeout(BOUND, upstream)
        .await
        .expect("upstream done")
        .expect("upstream task");
}

#[tokio::test]
async fn a_connection_whose_response_ended_in_doubt_is_not_used_again() {
    let cases: [(&[u8], &str); 4] = [
        // More bytes than the response.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
            "ok",
        ),
        // Said so.
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            "ok",
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "ok"),
        // Both framings: the chunks are followed, but the upstream may
        // have meant the length.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n",
            "ok",
        ),
    ];
    for (answer, body) in cases {
        let upstream = Scripted::start(vec![
            Answer::Reply(answer),
            Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean"),
        ])
        .await;
        let proxy = proxy_to(&upstream);
        assert_eq!(get(&proxy, "/one").await.text(), body);
        assert_eq!(get(&proxy, "/two").await.text(), "clean");
        assert_eq!(upstream.accepted(), 2);
    }
}

/// `path` over HTTP/2, which takes the site from the URL.
async fn get_h2(proxy: &ProxyProcess, path: &str) -> Reply {
    let h2 = common::lifecycle::client_to(proxy.addr, true);
    let req = http::Request::get(format!("http://a.test:{}{path}", proxy.addr.port()))
        .body(Body::empty())
        .expect("request");
    let response = tokio::time::timeout(BOUND, h2.request(req))
        .await
        .expect("response in time")
        .expect("response");
    common::collect_reply(response).await
}

/// A 2 MiB body, and two answers that carry it: in chunks of many sizes,
/// and with its length.
struct Long {
    body: Vec<u8>,
    chunked: Vec<u8>,
    sized: Vec<u8>,
}

fn long() -> &'static Long {
    static LONG: std::sync::OnceLock<Long> = std::sync::OnceLock::new();
    LONG.get_or_init(|| {
        let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut body = Vec::new();
        let mut size = 1;
        while body.len() < 2 * 1024 * 1024 {
            let chunk: Vec<u8> = (0..size).map(|i| (i * 7 + body.len()) as u8).collect();
            chunked.extend_from_slice(format!("{size:x}\r\n").as_bytes());
            chunked.extend_from_slice(&chunk);
            chunked.extend_from_slice(b"\r\n");
            body.extend_from_slice(&chunk);
            size = size * 3 % 70_001 + 1;
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        let mut sized =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        sized.extend_from_slice(&body);
        Long {
            body,
            chunked,
            sized,
        }
    })
}

#[tokio::test]
async fn long_bodies_arrive_whole_over_http1_and_http2_and_free_their_connection() {
    let long = long();
    let upstream = Scripted::start(vec![
        Answer::Reply(&long.chunked),
        Answer::Reply(&long.chunked),
        Answer::Reply(&long.sized),
        Answer::Reply(&long.sized),
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlast"),
    ])
    .await;
    let proxy = proxy_to(&upstream);
    assert!(
        get(&proxy, "/chunked").await.body == long.body,
        "HTTP/1.1, chunked"
    );
    assert!(
        get_h2(&proxy, "/chunked").await.body == long.body,
        "HTTP/2, chunked"
    );
    assert!(
        get(&proxy, "/sized").await.body == long.body,
        "HTTP/1.1, sized"
    );
    // HTTP/2 drops a body once it says it has ended, without asking for
    // more: the connection must go back all the same.
    assert!(
        get_h2(&proxy, "/sized").await.body == long.body,
        "HTTP/2, sized"
    );
    assert_eq!(get(&proxy, "/last").await.text(), "last");
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test]
async fn a_request_partly_answered_is_not_sent_again() {
    let upstream = Scripted::start(vec![
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"),
        Answer::ReplyAndClose(b"HTTP/1.1 103 Early Hints\r\n\r\n"),
        Answer::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthird"),
    ])
    .await;
    let mut proxy = proxy_to(&upstream);
    assert_eq!(get(&proxy, "/one").await.text(), "first");
    assert_eq!(get(&proxy, "/two").await.status, 502);
    let line = proxy.wait_for_line(|l| l.contains(" UPSTREAM_ERROR "), BOUND);
    assert!(
        line.contains("connection closed before the response ended"),
        "{line}"
    );
    assert_eq!(get(&proxy, "/three").await.text(), "third");
    assert_eq!(
        upstream.requests(),
        [
            "GET /one HTTP/1.1",
            "GET /two HTTP/1.1",
            "GET /three HTTP/1.1"
        ]
    );
}

/// A response head with 101 fields.
fn many_fields() -> &'static [u8] {
    static HEAD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    HEAD.get_or_init(|| {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..101 {
            head.extend_from_slice(format!("X-Field-{i}: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        head
    })
}

#[tokio::test]
async fn broken_response_heads_are_bad_gateway() {
    let cases: [(&[u8], &str); 6] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            "invalid content-length",
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            "differing content-length values",
        ),
        (b"HTTP/1.1 2OO OK\r\n\r\n", "malformed response head"),
        (
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "transfer-encoding in an HTTP/1.0 response",
        ),
        (b"", "connection closed before the response"),
        (many_fields(), "over 100 fields"),
    ];
    for (answer, error) in cases {
        let answer = if answer.is_empty() {
            Answer::Close
        } else {
            Answer::ReplyAndClose(answer)
        };
        let upstream = Scripted::start(vec![answer]).await;
        let mut proxy = proxy_to(&upstream);
        let reply = get(&proxy, "/").await;
        assert_eq!(reply.status, 502, "{error}");
        let line = proxy.wait_for_line(|l| l.contains(" UPSTREAM_ERROR "), BOUND);
        assert!(line.contains(error), "{error}: {line}");
    }
}

#[tokio::test]
async fn a_body_cut_short_ends_the_client_connection_early() {
    // The upstream's answer, and how the client's copy ends: with the
    // data that came, and without what would complete the message.
    let cases: [(&[u8], &str); 2] = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcd", "abcd"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\nzz\r\n",
            "4\r\nabcd\r\n",
        ),
    ];
    for (answer, end) in cases {
        let upstream = Scripted::start(vec![Answer::ReplyAndClose(answer)]).await;
        let proxy = proxy_to(&upstream);
        // Two requests on one connection: the first response cannot be
        // completed, so the connection ends and the second is never
        // answered.
        let raw = common::raw(
            proxy.addr,
            b"GET /a HTTP/1.1\r\nHost: a.test\r\n\r\nGET /b HTTP/1.1\r\nHost: a.test\r\n\r\n",
            BOUND,
        )
        .await;
        assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
        assert_eq!(raw.matches("HTTP/1.1").count(), 1, "{raw}");
        assert!(raw.ends_with(end), "{raw:?}");
    }
}

//! Telling HTTP/2 from HTTP/1 on a new connection, without costing the
//! connection memory for the rest of its life.
//!
//! A connection speaks HTTP/2 when it opens with the 24-byte preface
//! (prior knowledge in plain text, or after ALPN `h2`); anything else is
//! HTTP/1. hyper-util's auto builder reads those bytes and hands them to
//! hyper on their own, so hyper sees every connection's first head arrive
//! in two pieces and, to make room for the rest, doubles its read buffer to
//! 16 KiB, which each keep-alive connection then keeps. [`Prefixed`] gives
//! back the bytes it read together with whatever else the socket already
//! holds, in one read, so a head that arrived whole reaches hyper whole and
//! its read buffer stays at 8 KiB.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

/// Reads until the first bytes either are the HTTP/2 preface or cannot be
/// (a connection closed before sending anything counts as HTTP/1, whose
/// side reports the end). Returns the stream with those bytes put back.
pub async fn detect<I: AsyncRead + Unpin>(mut io: I) -> io::Result<(Version, Prefixed<I>)> {
    let mut seen = [0; H2_PREFACE.len()];
    let mut len = 0;
    let version = loop {
        let n = io.read(&mut seen[len..]).await?;
        let read = &seen[len..len + n];
        len += n;
        if n == 0 || read != &H2_PREFACE[len - n..len] {
            break Version::Http1;
        }
        if len == H2_PREFACE.len() {
            break Version::Http2;
        }
    };
    Ok((
        version,
        Prefixed {
            inner: io,
            seen,
            len,
            given: 0,
            deferred: None,
        },
    ))
}

/// A stream with the bytes [`detect`] read put back in front.
pub struct Prefixed<I> {
    inner: I,
    seen: [u8; H2_PREFACE.len()],
    len: usize,
    /// How many of `seen` have been read back.
    given: usize,
    /// An error met while reading on past `seen`, for the next read.
    deferred: Option<io::Error>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Err(e));
        }
        if this.given == this.len {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = (this.len - this.given).min(buf.remaining());
        buf.put_slice(&this.seen[this.given..this.given + n]);
        this.given += n;
        if this.given == this.len && buf.remaining() > 0 {
            // The rest of what arrived with these bytes, in the same read;
            // if nothing more is there yet, the bytes alone are the answer.
            if let Poll::Ready(Err(e)) = Pin::new(&mut this.inner).poll_read(cx, buf) {
                this.deferred = Some(e);
            }
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(Prefixed);

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Sends `chunks` with a flush between them, then closes.
    async fn detect_sent(chunks: &[&[u8]]) -> (Version, Vec<u8>, usize) {
        let (mut client, server) = duplex(4096);
        let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for chunk in chunks {
                client.write_all(&chunk).await.expect("write");
                client.flush().await.expect("flush");
                tokio::task::yield_now().await;
            }
        });
        let (version, mut io) = detect(server).await.expect("detect");
        // The first read after detection, into a buffer as large as hyper's.
        let mut first = vec![0; 8192];
        let n = io.read(&mut first).await.expect("read");
        writer.await.expect("writer");
        let mut all = first[..n].to_vec();
        io.read_to_end(&mut all).await.expect("read rest");
        (version, all, n)
    }

    #[tokio::test]
    async fn an_http1_head_comes_back_whole_in_one_read() {
        let head = b"GET /some/longer/path HTTP/1.1\r\nHost: a.test\r\nUser-Agent: t\r\n\r\n";
        let (version, all, first) = detect_sent(&[head]).await;
        assert_eq!(version, Version::Http1);
        assert_eq!(all, head);
        assert_eq!(
            first,
            head.len(),
            "the head arrived whole; one read gives it whole"
        );
    }

    #[tokio::test]
    async fn the_http2_preface_is_recognised_even_in_pieces() {
        let (version, all, _) =
            detect_sent(&[b"PRI * HTTP/2.0\r", b"\n\r\nSM\r\n", b"\r\nframes"]).await;
        assert_eq!(version, Version::Http2);
        assert_eq!(all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nframes");
    }

    #[tokio::test]
    async fn a_partial_preface_that_turns_into_something_else_is_http1() {
        let (version, all, _) = detect_sent(&[b"PRI * HTTP/2.0\r", b"\nGET"]).await;
        assert_eq!(version, Version::Http1);
        assert_eq!(all, b"PRI * HTTP/2.0\r\nGET");
    }

    #[tokio::test]
    async fn a_silent_close_is_http1_with_nothing_to_read() {
        let (version, all, first) = detect_sent(&[]).await;
        assert_eq!(version, Version::Http1);
        assert!(all.is_empty());
        assert_eq!(first, 0);
    }

    #[tokio::test]
    async fn a_small_reader_gets_the_put_back_bytes_in_order() {
        let (mut client, server) = duplex(4096);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .await
            .expect("write");
        drop(client);
        let (_, mut io) = detect(server).await.expect("detect");
        let mut all = Vec::new();
        let mut piece = [0; 5];
        loop {
            let n = io.read(&mut piece).await.expect("read");
            if n == 0 {
                break;
            }
            all.extend_from_slice(&piece[..n]);
        }
        assert_eq!(all, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
    }
}

//! Hand-built HTTP/2 frames (RFC 9113) for clients that misbehave on
//! purpose: floods, resets, oversized header blocks. Header blocks use only
//! HPACK static-table entries and literals without indexing, so no encoder
//! state is needed.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// SETTINGS parameters as (identifier, value) pairs.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect()
    }

    /// (last stream id, error code) of a GOAWAY.
    pub fn goaway(&self) -> (u32, u32) {
        let p = &self.payload;
        (
            u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & 0x7fff_ffff,
            u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
        )
    }
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn settings(params: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in params {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// The largest flow-control window HTTP/2 allows.
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

/// A client connection whose every stream, and the connection itself, may
/// be sent as much as the protocol allows without a further WINDOW_UPDATE:
/// what stops the server is the socket, not flow control.
pub async fn connect_open_window(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut hello = PREFACE.to_vec();
    hello.extend(settings(&[(SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW)]));
    // The connection's window starts at 65,535 whatever SETTINGS say.
    hello.extend(window_update(0, MAX_WINDOW - 65_535));
    stream.write_all(&hello).await.expect("preface");
    stream
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// An HPACK integer with an `prefix`-bit prefix, first byte or-ed with `first`.
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(first | u8::try_from(n).expect("small"));
        return;
    }
    out.push(first | u8::try_from(max).expect("small"));
    n -= max;
    while n >= 128 {
        out.push(u8::try_from(n % 128).expect("small") | 0x80);
        n /= 128;
    }
    out.push(u8::try_from(n).expect("small"));
}

fn hpack_str(out: &mut Vec<u8>, s: &str) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// The header block of `GET path` for `authority`, plus `extra` fields.
pub fn request_block(authority: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    // :method GET, :scheme http (static table 2 and 6).
    let mut out = vec![0x82, 0x86];
    // :path (4) and :authority (1) as literals with an indexed name.
    hpack_int(&mut out, 0, 4, 4);
    hpack_str(&mut out, path);
    hpack_int(&mut out, 0, 4, 1);
    hpack_str(&mut out, authority);
    for (name, value) in extra {
        out.push(0);
        hpack_str(&mut out, name);
        hpack_str(&mut out, value);
    }
    out
}

/// A complete GET request on `stream`.
pub fn get(stream: u32, authority: &str, path: &str) -> Vec<u8> {
    frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        stream,
        &request_block(authority, path, &[]),
    )
}

/// The `:status` of a response header block, for the encodings hyper's
/// HPACK encoder uses for a status first in a block (static-table entry, or
/// a literal with the `:status` name, Huffman-coded or not).
pub fn status_of(block: &[u8]) -> Option<u16> {
    let first = *block.first()?;
    if first & 0x80 != 0 {
        return match first & 0x7f {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    // Literal with incremental indexing (0x48), without (0x08) or never
    // indexed (0x18), name = static entry 8 (:status).
    if !matches!(first, 0x48 | 0x08 | 0x18) {
        return None;
    }
    let len_byte = *block.get(1)?;
    let value = block.get(2..2 + usize::from(len_byte & 0x7f))?;
    let digits = if len_byte & 0x80 == 0 {
        String::from_utf8(value.to_vec()).ok()?
    } else {
        huffman_digits(value)?
    };
    digits.parse().ok()
}

/// Decodes a Huffman-coded string of ASCII digits (RFC 7541 Appendix B).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    const CODES: [(u32, u32); 10] = [
        (0b00000, 5),
        (0b00001, 5),
        (0b00010, 5),
        (0b011001, 6),
        (0b011010, 6),
        (0b011011, 6),
        (0b011100, 6),
        (0b011101, 6),
        (0b011110, 6),
        (0b011111, 6),
    ];
    let bits: Vec<u32> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| u32::from(b >> i & 1)))
        .collect();
    let mut out = String::new();
    let mut pos = 0;
    'next: while pos < bits.len() {
        for (digit, (code, len)) in CODES.iter().enumerate() {
            let len = *len as usize;
            if pos + len <= bits.len() {
                let value = bits[pos..pos + len].iter().fold(0, |acc, b| acc << 1 | b);
                if value == *code {
                    out.push(char::from(b'0' + u8::try_from(digit).ok()?));
                    pos += len;
                    continue 'next;
                }
            }
        }
        // What is left must be EOS padding: fewer than 8 one-bits.
        return (bits.len() - pos < 8 && bits[pos..].iter().all(|b| *b == 1)).then_some(out);
    }
    Some(out)
}

/// A client connection that has sent the preface and an empty SETTINGS.
pub async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut hello = PREFACE.to_vec();
    hello.extend(settings(&[]));
    stream.write_all(&hello).await.expect("preface");
    stream
}

/// Reads one frame; `None` at EOF, reset or after `timeout`.
pub async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> Option<Frame> {
    tokio::time::timeout(timeout, async {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).await.ok()?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
        })
    })
    .await
    .ok()
    .flatten()
}

/// Reads frames until `stop` matches one (returned with all frames read),
/// the connection ends, or `timeout` passes.
pub async fn read_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
    stop: impl Fn(&Frame) -> bool,
) -> (Vec<Frame>, bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(frame) = read_frame(stream, left).await else {
            return (frames, false);
        };
        let done = stop(&frame);
        frames.push(frame);
        if done {
            return (frames, true);
        }
    }
}

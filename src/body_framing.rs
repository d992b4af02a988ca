//! Where an HTTP/1.1 body ends: `Content-Length` values and the chunked
//! coding's grammar, read the way hyper reads them.
//!
//! Two places follow bodies below hyper and must agree with it on where a
//! body ends: the request side's framing check ([`crate::server`]), which
//! only follows a chunked body to find the next head, and the upstream
//! side's response reader ([`crate::proxy`]), which also takes the data
//! out. hyper also caps chunk extensions and trailers at 16 KiB, because it
//! keeps them; here they are stepped over and kept nowhere, so they cost no
//! memory however long they are.

use std::cmp::min;

use bytes::{Buf, Bytes};

/// A `Content-Length` value: decimal digits only, no sign, no list.
pub(crate) fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |length, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        length.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// Where a chunked body is, named after hyper's decoder states; the size or
/// the bytes of data left ride along where they matter.
#[derive(Clone, Copy)]
pub(crate) enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// What one byte of framing leads to.
pub(crate) enum Step {
    Next(Chunk),
    /// The body, trailers included, has ended with this byte.
    Done,
}

/// What [`Chunk::decode`] found.
pub(crate) enum Decoded {
    Data(Bytes),
    /// The body has ended; what follows it is left in the input.
    End,
    /// The input is used up and the body goes on.
    More,
}

/// A chunked body that breaks hyper's grammar.
#[derive(Debug)]
pub(crate) struct Malformed;

impl Chunk {
    /// One byte of chunk framing, by hyper's grammar; `None` where hyper
    /// fails the body.
    pub(crate) fn step(self, byte: u8) -> Option<Step> {
        let next = match (self, byte) {
            (Chunk::Start, _) => Chunk::Size(hex_digit(byte)?),
            (Chunk::Size(size), b'\t' | b' ') => Chunk::SizeLws(size),
            (Chunk::Size(size) | Chunk::SizeLws(size), b';') => Chunk::Extension(size),
            (Chunk::Size(size) | Chunk::SizeLws(size) | Chunk::Extension(size), b'\r') => {
                Chunk::SizeLf(size)
            }
            (Chunk::Size(size), _) => {
                Chunk::Size(size.checked_mul(16)?.checked_add(hex_digit(byte)?)?)
            }
            (Chunk::SizeLws(size), b'\t' | b' ') => Chunk::SizeLws(size),
            (Chunk::Extension(_), b'\n') => return None,
            (Chunk::Extension(size), _) => Chunk::Extension(size),
            (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
            (Chunk::SizeLf(size), b'\n') => Chunk::Data(size),
            (Chunk::DataCr, b'\r') => Chunk::DataLf,
            (Chunk::DataLf, b'\n') => Chunk::Start,
            (Chunk::EndCr, b'\r') => Chunk::EndLf,
            (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
            (Chunk::EndCr | Chunk::Trailer, _) => Chunk::Trailer,
            (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
            (Chunk::EndLf, b'\n') => return Some(Step::Done),
            _ => return None,
        };
        Some(Step::Next(next))
    }

    /// Takes the next run of data out of `input`, stepping over the framing
    /// before it; what it used is removed from `input`. Data comes out as
    /// slices of `input`, and trailers are stepped over like framing.
    pub(crate) fn decode(&mut self, input: &mut Bytes) -> Result<Decoded, Malformed> {
        let mut at = 0;
        while at < input.len() {
            if let Chunk::Data(left) = *self {
                input.advance(at);
                // At most `input.len()`, so it fits.
                let n = min(left, input.len() as u64) as usize;
                *self = match left - n as u64 {
                    0 => Chunk::DataCr,
                    rest => Chunk::Data(rest),
                };
                return Ok(Decoded::Data(input.split_to(n)));
            }
            let byte = input[at];
            at += 1;
            match self.step(byte).ok_or(Malformed)? {
                Step::Next(next) => *self = next,
                Step::Done => {
                    input.advance(at);
                    return Ok(Decoded::End);
                }
            }
        }
        input.advance(at);
        Ok(Decoded::More)
    }
}

fn hex_digit(byte: u8) -> Option<u64> {
    char::from(byte).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_values() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b" 42 "), Some(42));
        for bad in [
            &b""[..],
            b"+5",
            b"-1",
            b"1,2",
            b"5 5",
            b"0x5",
            b"99999999999999999999999",
        ] {
            assert_eq!(parse_length(bad), None, "{bad:?}");
        }
    }

    /// A body's data, and what follows the body.
    type Split = (Vec<u8>, Vec<u8>);

    /// `input` fed in pieces of `size`, split; `Ok(None)` when the body
    /// has not ended.
    fn decoded(input: &[u8], size: usize) -> Result<Option<Split>, Malformed> {
        let mut chunk = Chunk::Start;
        let mut data = Vec::new();
        let mut fed = 0;
        for piece in input.chunks(size) {
            fed += piece.len();
            let mut piece = Bytes::copy_from_slice(piece);
            loop {
                match chunk.decode(&mut piece)? {
                    Decoded::Data(bytes) => data.extend_from_slice(&bytes),
                    Decoded::More => break,
                    Decoded::End => {
                        let mut rest = piece.to_vec();
                        rest.extend_from_slice(&input[fed..]);
                        return Ok(Some((data, rest)));
                    }
                }
            }
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body = b"5;name=\"v\"\r\nhello\r\n6 \r\n world\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        for size in 1..=body.len() {
            let (data, rest) = decoded(body, size).expect("well formed").expect("a body");
            assert_eq!(data, b"hello world", "{size}");
            assert_eq!(rest, b"NEXT", "{size}");
        }
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        for bad in [
            &b"x\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5;ext\n",
            b"fffffffffffffffffff\r\n",
            b"0\r\n\r\r",
        ] {
            assert!(decoded(bad, bad.len()).is_err(), "{bad:?}");
        }
    }
}

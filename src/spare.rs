//! Memory that every proxied request needs, kept per thread for the next
//! request instead of going back to the allocator.
//!
//! A request on the everyday path (see `server::h1` and `proxy::client`)
//! needs two header maps (the request's and the response's, each two heap
//! blocks), its head encoded for the upstream, a buffer for the upstream's
//! answer and one for the response it writes. Taken from the heap and given
//! back for every request, they cost over a tenth of a request's
//! instructions. The read buffer (8 KiB) and most response buffers are
//! larger than glibc's per-thread cache, so they always took the
//! allocator's slow path. The encoded heads are held while upstreams
//! answer, so with many requests waiting they come back in bursts larger
//! than that cache holds (seven blocks of a size).
//!
//! Each thread keeps some of each kind, emptied, bounded in number and in
//! size (see [`MAPS`] and the buffer kinds below): 160 KiB of buffers
//! per thread at most, and four maps. Memory given back on another thread than the one it
//! came from stays there; nothing crosses threads.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

use bytes::Bytes;
use http::HeaderMap;

/// A thread's spares of one kind.
type Spares<T> = RefCell<Vec<T>>;

thread_local! {
    static HEADER_MAPS: Spares<HeaderMap> = const { RefCell::new(Vec::new()) };
    static HEAD_BUFFERS: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static READ_BUFFERS: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static RESPONSE_BUFFERS: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A kind of memory a thread keeps spares of, and how much of it.
struct Kind<T: 'static> {
    spares: &'static LocalKey<Spares<T>>,
    /// How many a thread keeps.
    max: usize,
    /// Larger ones (grown for an unusual request) are freed, not kept.
    max_capacity: usize,
}

/// Request and response maps: both are given back before the response is
/// written, so a thread rarely has more than a couple out at once. A map's
/// capacity counts the fields it has room for; HTTP/2 requests' maps are
/// not given back (see [`give_back`]).
static MAPS: Kind<HeaderMap> = Kind {
    spares: &HEADER_MAPS,
    max: 4,
    max_capacity: 64,
};

/// Encoded request heads are held while the upstream answers: a thread
/// has as many out as it has requests waiting.
static HEADS: Kind<Vec<u8>> = Kind {
    spares: &HEAD_BUFFERS,
    max: 32,
    max_capacity: 2 * 1024,
};

/// Upstream read buffers take one read each and do not grow; they are
/// given back when the response's last slice of them is dropped, before
/// the response is written.
static READS: Kind<Vec<u8>> = Kind {
    spares: &READ_BUFFERS,
    max: 4,
    max_capacity: 16 * 1024,
};

/// A response is gathered and written before the next one starts on the
/// thread: one spare is enough. Twice what `server::h1` gathers at most.
static RESPONSES: Kind<Vec<u8>> = Kind {
    spares: &RESPONSE_BUFFERS,
    max: 1,
    max_capacity: 32 * 1024,
};

impl<T> Kind<T> {
    /// One of the thread's spares, if it has one.
    fn take(&self) -> Option<T> {
        self.spares
            .try_with(|spares| spares.borrow_mut().pop())
            .ok()
            .flatten()
    }

    /// Keeps `spare` for later if the thread has room for it; otherwise,
    /// and while the thread's locals are torn down, it is freed.
    fn keep(&self, spare: T) {
        let _ = self.spares.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < self.max {
                spares.push(spare);
            }
        });
    }
}

/// An empty header map with room for `fields`.
pub fn header_map(fields: usize) -> HeaderMap {
    match MAPS.take() {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Keeps `map` for a later [`header_map`], emptied. Only for maps of
/// HTTP/1 messages, which carry at most 100 fields: `capacity` does not
/// count the room a map keeps for repeated fields, and an HTTP/2 request
/// may have sent thousands of them.
pub fn give_back(mut map: HeaderMap) {
    if map.capacity() <= MAPS.max_capacity {
        // Emptied before the spares are borrowed: a value's drop may give
        // a read buffer back to its own spares.
        map.clear();
        MAPS.keep(map);
    }
}

/// An empty buffer for an encoded request head, with room for `len`
/// bytes.
pub fn head_buffer(len: usize) -> Buffer {
    Buffer::take(&HEADS, len)
}

/// An empty buffer for reading an upstream's answer, with room for `len`
/// bytes.
pub fn read_buffer(len: usize) -> Buffer {
    Buffer::take(&READS, len)
}

/// An empty buffer for gathering a response's bytes before they are
/// written, with room for `len` bytes.
pub fn response_buffer(len: usize) -> Buffer {
    Buffer::take(&RESPONSES, len)
}

/// A buffer that goes back to its thread's spares of its kind when
/// dropped. As the owner of a [`Bytes`] ([`Buffer::freeze`]) it goes back
/// once the last slice of it (a field value, a piece of a body) is
/// dropped.
pub struct Buffer {
    bytes: Vec<u8>,
    kind: &'static Kind<Vec<u8>>,
}

impl Buffer {
    fn take(kind: &'static Kind<Vec<u8>>, len: usize) -> Self {
        let mut bytes = kind.take().unwrap_or_default();
        bytes.reserve(len);
        Self { bytes, kind }
    }

    /// The bytes in the buffer, shared: slices of them are taken without
    /// a copy.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl Deref for Buffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.bytes
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if self.bytes.capacity() <= self.kind.max_capacity {
            let mut bytes = std::mem::take(&mut self.bytes);
            bytes.clear();
            self.kind.keep(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::HOST;

    #[test]
    fn a_map_given_back_comes_back_empty_with_its_room() {
        let mut map = header_map(8);
        map.insert(HOST, HeaderValue::from_static("example.org"));
        let room = map.capacity();
        give_back(map);
        let again = header_map(2);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
    }

    #[test]
    fn a_large_map_is_not_kept() {
        give_back(header_map(4 * MAPS.max_capacity));
        assert!(header_map(1).capacity() <= MAPS.max_capacity);
    }

    #[test]
    fn a_buffer_comes_back_empty() {
        let mut head = head_buffer(100);
        head.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let place = head.as_ptr();
        drop(head);
        let again = head_buffer(10);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), place);
    }

    #[test]
    fn a_grown_buffer_is_not_kept() {
        let mut response = response_buffer(10);
        response.reserve(2 * RESPONSES.max_capacity);
        drop(response);
        let kept = RESPONSE_BUFFERS.with(|spares| spares.borrow().len());
        assert_eq!(kept, 0);
    }

    #[test]
    fn at_most_so_many_are_kept() {
        let heads: Vec<Buffer> = (0..HEADS.max + 5).map(|_| head_buffer(64)).collect();
        drop(heads);
        let kept = HEAD_BUFFERS.with(|spares| spares.borrow().len());
        assert_eq!(kept, HEADS.max);
    }

    #[test]
    fn a_frozen_buffer_comes_back_when_its_last_slice_is_dropped() {
        let mut buffer = read_buffer(1024);
        buffer.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nhello");
        let place = buffer.as_ptr();
        let bytes = buffer.freeze();
        let body = bytes.slice(19..);
        drop(bytes);
        // Still held by the body: a fresh buffer is handed out.
        let other = read_buffer(1024);
        assert_ne!(other.as_ptr(), place);
        drop(other);
        assert_eq!(&body[..], b"hello");
        drop(body);
        let again = read_buffer(1024);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), place, "back in the spares");
    }
}

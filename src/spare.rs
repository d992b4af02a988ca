//! Memory that every proxied request needs, kept per thread for the next
//! request instead of going back to the allocator.
//!
//! A request on the everyday path (see `server::h1` and `proxy::client`)
//! needs two header maps (the request's and the response's, each two heap
//! blocks), its head encoded for the upstream, and a buffer for the
//! upstream's answer. Taken from the heap and given back for every request,
//! they cost about a tenth of a request's instructions. The read buffer is
//! larger than glibc's per-thread cache, so it always took the allocator's
//! slow path. The encoded heads are held while upstreams answer, so with
//! many requests waiting they come back in bursts larger than that cache
//! holds (seven blocks of a size).
//!
//! Each thread keeps some of each, emptied and bounded in number and size,
//! so that spares never hold much memory: at most four maps of up to
//! [`MAX_MAP_CAPACITY`] fields, four read buffers of up to
//! [`MAX_READ_CAPACITY`] bytes and 32 heads of up to [`MAX_HEAD_CAPACITY`]
//! bytes: under 200 KiB per thread in all. Memory given back on another thread than
//! the one it came from stays there; nothing crosses threads.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::thread::LocalKey;

use bytes::Bytes;
use http::HeaderMap;

/// A thread's spares of one kind.
type Spares<T> = RefCell<Vec<T>>;

thread_local! {
    static HEADER_MAPS: Spares<HeaderMap> = const { RefCell::new(Vec::new()) };
    static READ_BUFFERS: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static HEAD_BUFFERS: Spares<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Maps and read buffers are given back before the response is written,
/// so a thread rarely has more than a couple out at once.
const MAX_MAPS: usize = 4;
const MAX_READ_BUFFERS: usize = 4;
/// Encoded heads are held while the upstream answers: a thread has as many
/// out as it has requests waiting.
const MAX_HEADS: usize = 32;

/// Larger maps (a request with many fields) are freed, not kept.
const MAX_MAP_CAPACITY: usize = 64;
/// The size of a fresh read buffer, as hyper's first read.
const READ_CAPACITY: usize = 8 * 1024;
/// Read buffers that grew past this are freed, not kept.
const MAX_READ_CAPACITY: usize = 2 * READ_CAPACITY;
/// Larger heads are freed, not kept.
const MAX_HEAD_CAPACITY: usize = 2 * 1024;

/// One of the thread's spares of a kind, if it has one.
fn take<T: 'static>(spares: &'static LocalKey<Spares<T>>) -> Option<T> {
    spares
        .try_with(|spares| spares.borrow_mut().pop())
        .ok()
        .flatten()
}

/// Keeps `spare` for later, if the thread has fewer than `max` of its kind;
/// otherwise, and while the thread's locals are torn down, it is freed.
fn keep<T: 'static>(spares: &'static LocalKey<Spares<T>>, spare: T, max: usize) {
    let _ = spares.try_with(|spares| {
        let mut spares = spares.borrow_mut();
        if spares.len() < max {
            spares.push(spare);
        }
    });
}

/// An empty header map with room for `fields`.
pub fn header_map(fields: usize) -> HeaderMap {
    match take(&HEADER_MAPS) {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Keeps `map` for a later [`header_map`], emptied.
pub fn give_back(mut map: HeaderMap) {
    if map.capacity() <= MAX_MAP_CAPACITY {
        // Emptied before the spares are borrowed: a value's drop may give
        // a read buffer back to its own spares.
        map.clear();
        keep(&HEADER_MAPS, map, MAX_MAPS);
    }
}

/// An empty buffer for an encoded request head, with room for `len` bytes.
pub fn head_buffer(len: usize) -> HeadBuffer {
    let mut buffer = take(&HEAD_BUFFERS).unwrap_or_default();
    buffer.reserve(len);
    HeadBuffer(buffer)
}

/// An encoded request head, which goes back to its thread's spares when
/// dropped.
pub struct HeadBuffer(Vec<u8>);

impl Deref for HeadBuffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for HeadBuffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl Drop for HeadBuffer {
    fn drop(&mut self) {
        give_back_buffer(&mut self.0, &HEAD_BUFFERS, MAX_HEAD_CAPACITY, MAX_HEADS);
    }
}

/// An empty buffer for reading an upstream's answer, with room for at
/// least a first read.
pub fn read_buffer() -> ReadBuffer {
    ReadBuffer(take(&READ_BUFFERS).unwrap_or_else(|| Vec::with_capacity(READ_CAPACITY)))
}

/// A read buffer, which goes back to its thread's spares when dropped. As
/// the owner of a [`Bytes`] ([`ReadBuffer::freeze`]) it goes back once the
/// last slice of it (a field value, a piece of the body) is dropped.
pub struct ReadBuffer(Vec<u8>);

impl ReadBuffer {
    /// Where reads land.
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }

    /// The bytes read, shared: slices of them are taken without a copy.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for ReadBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ReadBuffer {
    fn drop(&mut self) {
        give_back_buffer(
            &mut self.0,
            &READ_BUFFERS,
            MAX_READ_CAPACITY,
            MAX_READ_BUFFERS,
        );
    }
}

/// Keeps `buffer`'s memory, emptied, unless it grew past `max_capacity`.
fn give_back_buffer(
    buffer: &mut Vec<u8>,
    spares: &'static LocalKey<Spares<Vec<u8>>>,
    max_capacity: usize,
    max: usize,
) {
    if buffer.capacity() <= max_capacity {
        let mut buffer = std::mem::take(buffer);
        buffer.clear();
        keep(spares, buffer, max);
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
        give_back(header_map(4 * MAX_MAP_CAPACITY));
        assert!(header_map(1).capacity() <= MAX_MAP_CAPACITY);
    }

    #[test]
    fn a_head_buffer_comes_back_empty() {
        let mut head = head_buffer(100);
        head.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let place = head.as_ptr();
        drop(head);
        let again = head_buffer(10);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), place);
    }

    #[test]
    fn at_most_so_many_heads_are_kept() {
        let heads: Vec<HeadBuffer> = (0..MAX_HEADS + 5).map(|_| head_buffer(64)).collect();
        drop(heads);
        let kept = HEAD_BUFFERS.with(|spares| spares.borrow().len());
        assert_eq!(kept, MAX_HEADS);
    }

    #[test]
    fn a_read_buffer_comes_back_when_its_last_slice_is_dropped() {
        let mut buffer = read_buffer();
        buffer
            .bytes_mut()
            .extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nhello");
        let place = buffer.bytes_mut().as_ptr();
        let bytes = buffer.freeze();
        let body = bytes.slice(19..);
        drop(bytes);
        // Still held by the body: a fresh buffer is handed out.
        let mut other = read_buffer();
        assert_ne!(other.bytes_mut().as_ptr(), place);
        drop(other);
        assert_eq!(&body[..], b"hello");
        drop(body);
        let mut again = read_buffer();
        assert!(again.bytes_mut().is_empty());
        assert_eq!(again.bytes_mut().as_ptr(), place, "back in the spares");
    }
}

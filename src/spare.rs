//! Memory that every proxied request needs, kept per thread for the next
//! request instead of going back to the allocator.
//!
//! A request on the everyday path (see `server::h1` and `proxy::client`)
//! needs two header maps (the request's and the response's, each two heap
//! blocks) and a buffer for the upstream's answer. Taken from the heap and
//! given back for every request, they were a tenth of a request's
//! instructions: the read buffer is larger than the allocator's per-thread
//! cache, so it always took the slow path. Here each thread keeps a few of
//! each, emptied, and bounded in number and size so that a spare never
//! holds much memory: a thread keeps at most [`MAX_SPARES`] of each kind,
//! maps of up to [`MAX_MAP_CAPACITY`] fields and buffers of up to
//! [`MAX_READ_CAPACITY`] bytes. Memory given back on another thread than
//! the one it came from is kept there; nothing crosses threads.

use std::cell::RefCell;

use bytes::Bytes;
use http::HeaderMap;

/// How many of each kind a thread keeps. A request takes one of each and
/// gives it back before its response is written, so a thread rarely has
/// more than a couple out at once.
const MAX_SPARES: usize = 4;
/// Larger maps (a request with many fields) are freed, not kept.
const MAX_MAP_CAPACITY: usize = 64;
/// The size of a fresh read buffer, as hyper's first read.
const READ_CAPACITY: usize = 8 * 1024;
/// Buffers that grew past this (a large head read in pieces) are freed.
const MAX_READ_CAPACITY: usize = 2 * READ_CAPACITY;

thread_local! {
    static HEADER_MAPS: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    static READ_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An empty header map with room for `fields`.
pub fn header_map(fields: usize) -> HeaderMap {
    let spare = HEADER_MAPS
        .try_with(|maps| maps.borrow_mut().pop())
        .ok()
        .flatten();
    match spare {
        Some(mut map) => {
            map.reserve(fields);
            map
        }
        None => HeaderMap::with_capacity(fields),
    }
}

/// Keeps `map` for a later [`header_map`], emptied, if there is room.
pub fn give_back(mut map: HeaderMap) {
    if map.capacity() > MAX_MAP_CAPACITY {
        return;
    }
    // Emptied before the list is borrowed: a value's drop may give a read
    // buffer back to its own list.
    map.clear();
    // While the thread's locals are torn down, the map is freed instead.
    let _ = HEADER_MAPS.try_with(|maps| {
        let mut maps = maps.borrow_mut();
        if maps.len() < MAX_SPARES {
            maps.push(map);
        }
    });
}

/// An empty buffer for reading an upstream's answer, with room for at
/// least a first read.
pub fn read_buffer() -> ReadBuffer {
    let spare = READ_BUFFERS
        .try_with(|buffers| buffers.borrow_mut().pop())
        .ok()
        .flatten();
    ReadBuffer(spare.unwrap_or_else(|| Vec::with_capacity(READ_CAPACITY)))
}

/// A read buffer that goes back to its thread's spares when dropped. As
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
        if self.0.capacity() > MAX_READ_CAPACITY {
            return;
        }
        let mut buffer = std::mem::take(&mut self.0);
        buffer.clear();
        // While the thread's locals are torn down, the buffer is freed.
        let _ = READ_BUFFERS.try_with(|buffers| {
            let mut buffers = buffers.borrow_mut();
            if buffers.len() < MAX_SPARES {
                buffers.push(buffer);
            }
        });
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
        let big = header_map(4 * MAX_MAP_CAPACITY);
        give_back(big);
        assert!(header_map(1).capacity() <= MAX_MAP_CAPACITY);
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
        let other = read_buffer();
        assert_ne!(other.0.as_ptr(), place);
        drop(other);
        assert_eq!(&body[..], b"hello");
        drop(body);
        let mut again = read_buffer();
        assert!(again.bytes_mut().is_empty());
        assert_eq!(again.0.as_ptr(), place, "back in the thread's spares");
    }
}

//! A log sink that never makes a request wait for I/O and costs one write
//! system call per batch of lines rather than one per line.
//!
//! A request task appends its formatted line to a shared buffer (a memcpy
//! under an uncontended lock) and, only when the buffer was empty, wakes
//! the writer thread. That thread waits [`BATCH_DELAY`] so the lines of a
//! busy moment arrive together, then writes them all at once. An idle proxy
//! wakes nobody. When the output cannot keep up (a stalled terminal, a full
//! disk), lines beyond [`MAX_PENDING`] bytes are dropped and counted on
//! stderr instead of stalling requests or growing without bound.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first one of a batch: short
/// enough for fail2ban and `journalctl -f`, long enough that a busy second
/// costs tens of writes, not tens of thousands.
const BATCH_DELAY: Duration = Duration::from_millis(10);
/// Bytes that may wait for the writer; a line that would go beyond is
/// dropped (formatted in place first, so the buffer's capacity may grow
/// past this once).
pub(super) const MAX_PENDING: usize = 8 * 1024 * 1024;
/// What the writer's spare buffer shrinks back to after a burst.
const KEEP_CAPACITY: usize = 256 * 1024;

/// The handle formatters write into; cheap to clone.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Writes out what is pending and stops the writer thread when dropped.
pub struct BatchGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    dropped: u64,
    closing: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts the writer thread for `out`.
pub fn batch<W: Write + Send + 'static>(
    name: &str,
    out: W,
) -> io::Result<(BatchWriter, BatchGuard)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
    });
    let for_thread = Arc::clone(&shared);
    let thread = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || run(&for_thread, out))?;
    Ok((
        BatchWriter {
            shared: Arc::clone(&shared),
        },
        BatchGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let mut pending = shared.lock();
        while pending.buf.is_empty() && !pending.closing {
            pending = shared
                .wake
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if !pending.closing {
            drop(pending);
            thread::sleep(BATCH_DELAY);
            pending = shared.lock();
        }
        std::mem::swap(&mut pending.buf, &mut spare);
        let dropped = std::mem::take(&mut pending.dropped);
        let closing = pending.closing;
        drop(pending);

        // The sinks report their own failures (the access log file) or have
        // nowhere to report them (stdout); either way requests go on.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        if dropped > 0 {
            eprintln!("WARN log output fell behind; {dropped} line(s) dropped");
        }
        spare.clear();
        spare.shrink_to(KEEP_CAPACITY);
        if closing {
            return;
        }
    }
}

impl BatchWriter {
    /// Queues one formatted line (formatters write a whole line at once).
    pub fn append(&self, line: &[u8]) {
        self.append_with(|buf| {
            buf.extend_from_slice(line);
            Ok(())
        });
    }

    /// Queues the line that `write` appends to the buffer it is given:
    /// formatted in place, it is not copied. `write` runs under the
    /// buffer's lock, so it should only format. A line that fails to
    /// format, or would take the buffer beyond [`MAX_PENDING`], is
    /// dropped.
    pub fn append_with(&self, write: impl FnOnce(&mut Vec<u8>) -> fmt::Result) {
        let mut pending = self.shared.lock();
        let start = pending.buf.len();
        let written = start < MAX_PENDING && write(&mut pending.buf).is_ok();
        if !written || pending.buf.len() > MAX_PENDING {
            pending.buf.truncate(start);
            pending.dropped += 1;
            return;
        }
        drop(pending);
        if start == 0 {
            self.shared.wake.notify_one();
        }
    }
}

impl Write for &BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.append(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Outputs for tests of the batched writers and of what writes to them.
#[cfg(test)]
pub(super) mod testing {
    use super::*;

    #[derive(Clone, Default)]
    pub struct Sink(pub Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut s = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            s.0.extend_from_slice(buf);
            s.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A sink whose writes wait until the test opens it.
    #[derive(Clone, Default)]
    pub struct Gated {
        pub out: Sink,
        /// (writer is waiting, open)
        state: Arc<(Mutex<(bool, bool)>, Condvar)>,
    }

    impl Gated {
        pub fn set(&self, change: impl FnOnce(&mut (bool, bool))) {
            let (lock, cond) = &*self.state;
            change(&mut lock.lock().unwrap_or_else(PoisonError::into_inner));
            cond.notify_all();
        }

        pub fn wait_for(&self, done: impl Fn(&(bool, bool)) -> bool) {
            let (lock, cond) = &*self.state;
            let state = lock.lock().unwrap_or_else(PoisonError::into_inner);
            let (_state, timeout) = cond
                .wait_timeout_while(state, Duration::from_secs(10), |s| !done(s))
                .unwrap_or_else(PoisonError::into_inner);
            assert!(!timeout.timed_out(), "the writer never got there");
        }
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.set(|s| s.0 = true);
            self.wait_for(|s| s.1);
            self.out.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{Gated, Sink};
    use super::*;

    #[test]
    fn lines_arrive_in_order_in_few_writes_and_all_by_drop() {
        let sink = Sink::default();
        let (writer, guard) = batch("test-log", sink.clone()).expect("thread");
        let mut expected = Vec::new();
        for i in 0..1000 {
            let line = format!("line {i}\n");
            writer
                .make_writer()
                .write_all(line.as_bytes())
                .expect("write");
            expected.extend_from_slice(line.as_bytes());
        }
        drop(guard);
        let s = sink.0.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(s.0, expected);
        assert!(s.1 < 100, "{} writes for 1000 lines", s.1);
    }

    #[test]
    fn a_stalled_output_keeps_what_fits_and_drops_the_rest() {
        let sink = Gated::default();
        let (writer, guard) = batch("test-log", sink.clone()).expect("thread");
        writer.append(b"first\n");
        sink.wait_for(|s| s.0);
        // The writer is stuck in its first write: exactly what fits waits.
        let line = [b'x'; 1023].into_iter().chain([b'\n']).collect::<Vec<_>>();
        let fits = MAX_PENDING / line.len();
        for _ in 0..fits + 10 {
            writer.append_with(|out| {
                out.extend_from_slice(&line);
                Ok(())
            });
        }
        sink.set(|s| s.1 = true);
        drop(guard);
        let s = sink.out.0.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(s.0.len(), "first\n".len() + fits * line.len());
    }

    #[test]
    fn a_line_that_fails_to_format_leaves_nothing() {
        let sink = Sink::default();
        let (writer, guard) = batch("test-log", sink.clone()).expect("thread");
        writer.append(b"one\n");
        writer.append_with(|out| {
            out.extend_from_slice(b"half a li");
            Err(fmt::Error)
        });
        writer.append(b"two\n");
        drop(guard);
        let s = sink.0.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(s.0, b"one\ntwo\n");
    }
}

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

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the writer gathers lines after the first one of a batch: short
/// enough for fail2ban and `journalctl -f`, long enough that a busy second
/// costs tens of writes, not tens of thousands.
const BATCH_DELAY: Duration = Duration::from_millis(10);
/// Bytes that may wait for the writer; a line that would go beyond is dropped.
const MAX_PENDING: usize = 8 * 1024 * 1024;
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
        let mut pending = self.shared.lock();
        if pending.buf.len() + line.len() > MAX_PENDING {
            pending.dropped += 1;
            return;
        }
        let was_empty = pending.buf.is_empty();
        pending.buf.extend_from_slice(line);
        drop(pending);
        if was_empty {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

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
}

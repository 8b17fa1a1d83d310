//! The log's writer: lines go to stderr from a thread of their own,
//! through a bounded queue, so a reader that stalls (a pipe nobody drains,
//! a container log driver in blocking mode) costs log lines, never a
//! request or the shutdown, as Envoy's access-log flush thread does.
//!
//! weir's own rather than `tracing-appender`'s: that one's guard prints to
//! stdout when its queue is full at exit, which is when stderr is stuck,
//! and can then block or panic (stdout full or closed too).

// The log thread and the guard's wait run on plain threads, by the plain
// clock: tokio's reads a paused test runtime's, which `std::thread::sleep`
// never moves.
#![allow(clippy::disallowed_types)]

use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

/// What the log thread is sent.
enum Msg {
    Line(Vec<u8>),
    /// Write out what is buffered, then say so.
    Flush(SyncSender<()>),
}

/// What the writer and the log thread both count.
#[derive(Debug, Default)]
struct Counts {
    /// Lines dropped since the thread last said so.
    dropped: AtomicU64,
    /// Bytes of the lines queued and not yet written.
    queued: AtomicUsize,
}

/// Where `tracing`'s formatter writes each line (one `write_all` an
/// event): a queue to the log thread. A line that finds the queue full, in
/// lines or in bytes, is dropped, and the thread says how many were once
/// it has caught up.
#[derive(Debug)]
pub struct LogWriter {
    queue: SyncSender<Msg>,
    counts: Arc<Counts>,
    max_bytes: usize,
}

/// Flushes the log when dropped: the lines still queued go out, waiting at
/// most [`FLUSH_WAIT`] for a reader that is stuck. Keep it until the
/// process is about to exit.
#[derive(Debug)]
pub struct LogGuard {
    queue: SyncSender<Msg>,
}

/// How long the guard's drop waits for the log thread at exit.
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// How much the log may hold back: at most `lines` lines and `bytes` bytes
/// queued, and a write buffer of `buffer` bytes (written whenever the
/// queue is empty).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub lines: usize,
    pub bytes: usize,
    pub buffer: usize,
}

/// Starts the log thread writing to `out` within `limits`.
pub fn spawn(
    out: impl Write + Send + 'static,
    limits: Limits,
) -> io::Result<(LogWriter, LogGuard)> {
    let (queue, received) = mpsc::sync_channel(limits.lines);
    let counts = Arc::new(Counts::default());
    let thread_counts = counts.clone();
    std::thread::Builder::new()
        .name("weir-log".to_owned())
        .spawn(move || {
            let out = BufWriter::with_capacity(limits.buffer, out);
            write_lines(received, out, &thread_counts);
        })?;
    let writer = LogWriter {
        queue: queue.clone(),
        counts,
        max_bytes: limits.bytes,
    };
    Ok((writer, LogGuard { queue }))
}

/// The log thread: writes each batch of queued lines, then flushes. A
/// write that fails (stderr closed, a full disk) loses its line, as nginx
/// loses it. Lines dropped meanwhile are logged once the queue is empty
/// (through `tracing`, in the log's format).
fn write_lines(received: Receiver<Msg>, mut out: BufWriter<impl Write>, counts: &Counts) {
    let write = |msg: Msg, out: &mut BufWriter<_>| match msg {
        Msg::Line(line) => {
            let _ = out.write_all(&line);
            counts.queued.fetch_sub(line.len(), Ordering::Relaxed);
        }
        Msg::Flush(done) => {
            let _ = out.flush();
            let _ = done.send(());
        }
    };
    while let Ok(first) = received.recv() {
        write(first, &mut out);
        while let Ok(next) = received.try_recv() {
            write(next, &mut out);
        }
        let _ = out.flush();
        let dropped = counts.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(dropped, "log lines dropped: stderr did not keep up");
        }
    }
}

impl Write for &LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let len = line.len();
        let queued = self.counts.queued.fetch_add(len, Ordering::Relaxed);
        // Within the bytes, then within the lines (or the thread gone).
        let sent = queued.saturating_add(len) <= self.max_bytes
            && self.queue.try_send(Msg::Line(line.to_vec())).is_ok();
        if !sent {
            self.counts.queued.fetch_sub(len, Ordering::Relaxed);
            self.counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(len)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = &'a LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        let (done, flushed) = mpsc::sync_channel(1);
        let mut msg = Msg::Flush(done);
        // The queue may be full behind a stuck reader: a place in it is
        // waited for as long as the flush would be.
        loop {
            match self.queue.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Full(_)) => return,
            }
        }
        let _ = flushed.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer that keeps what it is given, or blocks until `open`.
    #[derive(Clone)]
    struct Sink {
        kept: Arc<Mutex<Vec<u8>>>,
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut is_open = open.lock().unwrap();
            while !*is_open {
                is_open = opened.wait(is_open).unwrap();
            }
            self.kept.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        /// Lets the writes through.
        fn open_up(&self) {
            let (open, opened) = &*self.open;
            *open.lock().unwrap() = true;
            opened.notify_all();
        }
    }

    fn limits(lines: usize, bytes: usize, buffer: usize) -> Limits {
        Limits {
            lines,
            bytes,
            buffer,
        }
    }

    fn sink(open: bool) -> Sink {
        Sink {
            kept: Arc::default(),
            open: Arc::new((Mutex::new(open), std::sync::Condvar::new())),
        }
    }

    #[test]
    fn lines_are_written_in_order_and_flushed_by_the_guard() {
        let out = sink(true);
        let (writer, guard) = spawn(out.clone(), limits(16, 1 << 20, 1024)).unwrap();
        for i in 0..10 {
            (&writer)
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let kept = String::from_utf8(out.kept.lock().unwrap().clone()).unwrap();
        let expected: String = (0..10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(kept, expected);
        assert_eq!(writer.counts.dropped.load(Ordering::Relaxed), 0);
    }

    /// A stuck reader: lines past the queue are dropped at once, writing
    /// never blocks, and the guard gives up after [`FLUSH_WAIT`].
    #[test]
    fn a_stuck_reader_costs_lines_not_time() {
        let out = sink(false);
        let (writer, guard) = spawn(out.clone(), limits(4, 1 << 20, 16)).unwrap();
        for _ in 0..100 {
            (&writer).write_all(b"a line that waits\n").unwrap();
        }
        // The thread holds one line in its write; the queue four more.
        let dropped = writer.counts.dropped.load(Ordering::Relaxed);
        assert!(dropped >= 95, "{dropped}");
        let started = Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(waited >= FLUSH_WAIT, "{waited:?}");
        assert!(waited < FLUSH_WAIT * 10, "{waited:?}");
        out.open_up();
    }

    /// The queue's bytes are bounded too: lines that would take it past
    /// them are dropped (long request paths cannot pile up megabytes
    /// behind a stuck reader).
    #[test]
    fn the_queued_bytes_are_bounded() {
        let out = sink(false);
        let (writer, guard) = spawn(out.clone(), limits(100, 50, 8)).unwrap();
        for _ in 0..10 {
            (&writer).write_all(b"twenty bytes a line\n").unwrap();
        }
        assert_eq!(writer.counts.dropped.load(Ordering::Relaxed), 8);
        out.open_up();
        drop(guard);
        assert_eq!(out.kept.lock().unwrap().len(), 40);
        assert_eq!(writer.counts.queued.load(Ordering::Relaxed), 0);
    }
}

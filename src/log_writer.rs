//! The log's writer: lines go to stderr from a thread of their own,
//! through a bounded queue, so a reader that stalls (a pipe nobody drains,
//! a container log driver in blocking mode) costs log lines, never a
//! request or the shutdown, as Envoy's access-log flush thread does.
//!
//! weir's own rather than `tracing-appender`'s: that one's guard prints to
//! stdout when its queue is full at exit, which is when stderr is stuck,
//! and can then block or panic (stdout full or closed too).

use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;
use tokio::time::Instant;

/// What the log thread is sent.
enum Msg {
    Line(Vec<u8>),
    /// Write out what is buffered, then say so.
    Flush(SyncSender<()>),
}

/// Where `tracing`'s formatter writes each line: a queue to the log
/// thread. A line that finds the queue full is dropped (and counted).
#[derive(Debug)]
pub struct LogWriter {
    queue: SyncSender<Msg>,
    dropped: AtomicU64,
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

/// Starts the log thread writing to `out` through a buffer of `buffer`
/// bytes (written whenever the queue is empty), with a queue of `lines`.
pub fn spawn(
    out: impl Write + Send + 'static,
    lines: usize,
    buffer: usize,
) -> io::Result<(LogWriter, LogGuard)> {
    let (queue, received) = mpsc::sync_channel(lines);
    std::thread::Builder::new()
        .name("weir-log".to_owned())
        .spawn(move || write_lines(received, BufWriter::with_capacity(buffer, out)))?;
    let writer = LogWriter {
        queue: queue.clone(),
        dropped: AtomicU64::new(0),
    };
    Ok((writer, LogGuard { queue }))
}

/// The log thread: writes each batch of queued lines, then flushes. A
/// write that fails (stderr closed, a full disk) loses its line, as nginx
/// loses it.
fn write_lines(received: Receiver<Msg>, mut out: BufWriter<impl Write>) {
    let write = |msg: Msg, out: &mut BufWriter<_>| match msg {
        Msg::Line(line) => {
            let _ = out.write_all(&line);
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
    }
}

impl LogWriter {
    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Write for &LogWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(Msg::Line(line.to_vec()))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
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

    fn sink(open: bool) -> Sink {
        Sink {
            kept: Arc::default(),
            open: Arc::new((Mutex::new(open), std::sync::Condvar::new())),
        }
    }

    #[test]
    fn lines_are_written_in_order_and_flushed_by_the_guard() {
        let out = sink(true);
        let (writer, guard) = spawn(out.clone(), 16, 1024).unwrap();
        for i in 0..10 {
            (&writer)
                .write_all(format!("line {i}\n").as_bytes())
                .unwrap();
        }
        drop(guard);
        let kept = String::from_utf8(out.kept.lock().unwrap().clone()).unwrap();
        let expected: String = (0..10).map(|i| format!("line {i}\n")).collect();
        assert_eq!(kept, expected);
        assert_eq!(writer.dropped(), 0);
    }

    /// A stuck reader: lines past the queue are dropped at once, writing
    /// never blocks, and the guard gives up after [`FLUSH_WAIT`].
    #[test]
    fn a_stuck_reader_costs_lines_not_time() {
        let out = sink(false);
        let (writer, guard) = spawn(out.clone(), 4, 16).unwrap();
        for _ in 0..100 {
            (&writer).write_all(b"a line that waits\n").unwrap();
        }
        // The thread holds one line in its write; the queue four more.
        assert!(writer.dropped() >= 95, "{}", writer.dropped());
        let started = Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(waited >= FLUSH_WAIT, "{waited:?}");
        assert!(waited < FLUSH_WAIT * 10, "{waited:?}");
        let (open, opened) = &*out.open;
        *open.lock().unwrap() = true;
        opened.notify_all();
    }
}

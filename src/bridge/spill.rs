//! A per-channel queue that never blocks its producer: the cure for
//! russh's head-of-line blocking.
//!
//! russh's client grants window credit when data *arrives* and its session
//! loop awaits each channel's bounded queue (russh#730, #392). A channel
//! whose local reader stalls would therefore freeze the whole upstream
//! connection. So every upstream channel is drained at once into one of
//! these queues. Payload stays in memory up to a per-channel and a global
//! budget, beyond which it goes to an unlinked temporary file (as nginx
//! buffers slow clients), up to a per-channel disk cap. A reader that is slow
//! but progressing loses nothing: at the cap the pump waits for it
//! (backpressure); one that stops for good there has its channel closed
//! with a message rather than stalling everyone else.
//!
//! We chose this over moving heavy channels to extra upstream connections
//! because a second connection is not always possible (one-time passwords)
//! and because it keeps one connection, which is what users come for.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use russh::Sig;
use tokio::sync::Notify;

/// In-memory payload one channel may hold before it spills to disk: all of
/// [`GLOBAL_MEMORY`] when it is alone. An sftp download keeps 64 requests
/// of 32 KiB in flight, so when the local leg is the slower one (through
/// the endpoint sshshim encrypts again) up to 2 MiB wait here; with 1 MiB,
/// part of every such download went through the spill file.
pub const CHANNEL_MEMORY: usize = 2 * 1024 * 1024;
/// In-memory payload all channels together may hold before spilling. Kept
/// small: past it the backlog goes to the spill file, whose pages are the
/// kernel's cache, not our resident memory. 50 concurrent 16 MiB downloads
/// through a client's `-L` peaked at 66.7 MiB RSS with 64 MiB here, about
/// 27 MiB with 8 MiB and about 22 MiB with 2 MiB; a single bulk channel
/// still gets its whole [`CHANNEL_MEMORY`] (scripts/bench.sh).
pub const GLOBAL_MEMORY: usize = 2 * 1024 * 1024;
/// Disk one channel may use for a slow reader (1 GiB; the environment
/// variable `SSHSHIM_SPILL_DISK_MIB` changes it, e.g. for a small /tmp).
/// Past it the pump waits for the reader (backpressure) and closes the
/// channel only if the reader makes no progress at all.
pub fn channel_disk() -> u64 {
    static CAP: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        std::env::var("SSHSHIM_SPILL_DISK_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&m| m > 0)
            .map_or(1024 * 1024 * 1024, |m| m << 20)
    })
}

/// Payload bytes held in memory by all queues together.
static IN_MEMORY: AtomicUsize = AtomicUsize::new(0);

/// What flows from upstream to a local channel, in order.
#[derive(Debug)]
pub enum Event {
    /// Channel data.
    Data(Bytes),
    /// Extended data (1 = stderr).
    Ext(u32, Bytes),
    /// The remote will send no more data.
    Eof,
    /// The remote command exited.
    ExitStatus(u32),
    /// The remote command was killed by a signal.
    ExitSignal {
        /// The signal.
        signal: Sig,
        /// Whether it dumped core.
        core_dumped: bool,
        /// Message for the user.
        message: String,
        /// Language tag of the message.
        lang: String,
    },
    /// The channel is closed; nothing follows.
    Close,
}

/// A queued item: an event, or data whose bytes are in the spill file.
enum Item {
    /// Held in memory.
    Event(Event),
    /// `len` bytes at the spill file's read offset.
    Spilled { ext: Option<u32>, len: usize },
}

/// The state behind the queue's lock.
#[derive(Default)]
struct Inner {
    /// Items in order.
    items: VecDeque<Item>,
    /// Payload bytes of in-memory items.
    mem: usize,
    /// The spill file, created on first need.
    file: Option<File>,
    /// Next write position in the spill file.
    write_off: u64,
    /// Next read position in the spill file.
    read_off: u64,
    /// The consumer is gone: drop what comes.
    reader_gone: bool,
}

/// Why a push was refused.
#[derive(Debug)]
pub enum PushError {
    /// The channel's disk cap is reached; the event is handed back so it
    /// can be pushed again once the reader has made room.
    Full(Event),
    /// The spill file could not be written.
    Io(std::io::Error),
}

/// An unbounded-producer, spill-to-disk FIFO of [`Event`]s.
#[derive(Default)]
pub struct SpillQueue {
    /// Items and spill state.
    inner: Mutex<Inner>,
    /// Wakes the consumer.
    ready: Notify,
    /// Wakes a producer waiting for room: the consumer took something.
    progress: Notify,
}

impl SpillQueue {
    /// A new, empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends an event; never waits. Data goes to disk only while the
    /// memory budgets are used: once the reader has made room, new data
    /// is held in memory again even if the file still has unread bytes
    /// (the deque keeps the order; spilled items are read back in turn).
    /// Staying on disk until the file drained sent nearly every byte of a
    /// download whose reader runs a little slower than the upstream (sftp
    /// get through the endpoint: 64 requests of 32 KiB in flight) through
    /// a write and a read of the spill file.
    pub fn push(&self, ev: Event) -> Result<(), PushError> {
        let mut g = self.inner.lock().unwrap();
        if g.reader_gone {
            return Ok(());
        }
        let (ext, data) = match &ev {
            Event::Data(d) => (None, d),
            Event::Ext(e, d) => (Some(*e), d),
            _ => {
                g.items.push_back(Item::Event(ev));
                drop(g);
                self.ready.notify_one();
                return Ok(());
            }
        };
        let len = data.len();
        let spilling =
            g.mem + len > CHANNEL_MEMORY || IN_MEMORY.load(Ordering::Relaxed) + len > GLOBAL_MEMORY;
        if spilling {
            if g.write_off - g.read_off + len as u64 > channel_disk() {
                drop(g);
                return Err(PushError::Full(ev));
            }
            if g.file.is_none() {
                g.file = Some(tempfile::tempfile().map_err(PushError::Io)?);
            }
            let off = g.write_off;
            g.file
                .as_ref()
                .expect("created above")
                .write_all_at(data, off)
                .map_err(PushError::Io)?;
            g.write_off += len as u64;
            g.items.push_back(Item::Spilled { ext, len });
        } else {
            g.mem += len;
            IN_MEMORY.fetch_add(len, Ordering::Relaxed);
            g.items.push_back(Item::Event(ev));
        }
        drop(g);
        self.ready.notify_one();
        Ok(())
    }

    /// Appends an event even past the caps (for the final message and
    /// close after an overflow).
    pub fn push_control(&self, ev: Event) {
        let mut g = self.inner.lock().unwrap();
        if !g.reader_gone {
            // Counted like any payload held in memory: `try_pop` subtracts it.
            if let Event::Data(d) | Event::Ext(_, d) = &ev {
                g.mem += d.len();
                IN_MEMORY.fetch_add(d.len(), Ordering::Relaxed);
            }
            g.items.push_back(Item::Event(ev));
        }
        drop(g);
        self.ready.notify_one();
    }

    /// Takes the next event, waiting for one.
    pub async fn pop(&self) -> std::io::Result<Event> {
        loop {
            let notified = self.ready.notified();
            if let Some(ev) = self.try_pop()? {
                return Ok(ev);
            }
            notified.await;
        }
    }

    /// Waits until the consumer takes an event (or has taken one since the
    /// last call), for a producer refused with [`PushError::Full`].
    pub async fn progressed(&self) {
        self.progress.notified().await;
    }

    /// Takes the next event if there is one.
    fn try_pop(&self) -> std::io::Result<Option<Event>> {
        let mut g = self.inner.lock().unwrap();
        let Some(item) = g.items.pop_front() else {
            return Ok(None);
        };
        self.progress.notify_one();
        Ok(Some(match item {
            Item::Event(ev) => {
                if let Event::Data(d) | Event::Ext(_, d) = &ev {
                    g.mem -= d.len();
                    IN_MEMORY.fetch_sub(d.len(), Ordering::Relaxed);
                }
                ev
            }
            Item::Spilled { ext, len } => {
                let mut buf = vec![0u8; len];
                let off = g.read_off;
                g.file
                    .as_ref()
                    .expect("spilled items imply a file")
                    .read_exact_at(&mut buf, off)?;
                g.read_off += len as u64;
                if g.read_off == g.write_off {
                    // Drained: start over at the front, freeing the blocks.
                    g.read_off = 0;
                    g.write_off = 0;
                    if let Some(f) = &g.file {
                        let _ = f.set_len(0);
                    }
                }
                let data = Bytes::from(buf);
                match ext {
                    None => Event::Data(data),
                    Some(e) => Event::Ext(e, data),
                }
            }
        }))
    }

    /// Bytes waiting in the spill file.
    #[cfg(test)]
    pub fn spilled(&self) -> u64 {
        let g = self.inner.lock().unwrap();
        g.write_off - g.read_off
    }

    /// The consumer is gone: free everything and drop further pushes.
    pub fn close_reader(&self) {
        let mut g = self.inner.lock().unwrap();
        g.reader_gone = true;
        g.items.clear();
        IN_MEMORY.fetch_sub(g.mem, Ordering::Relaxed);
        g.mem = 0;
        g.file = None;
    }
}

impl Drop for SpillQueue {
    fn drop(&mut self) {
        self.close_reader();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The memory budget is global: tests that fill it take turns.
    static BUDGET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn order_is_kept_across_memory_and_disk() {
        let _turn = BUDGET.lock().await;
        let q = SpillQueue::new();
        let chunk = Bytes::from(vec![7u8; 300 * 1024]);
        let mut expected = Vec::new();
        for i in 0..20u8 {
            let mut v = chunk.to_vec();
            v[0] = i;
            expected.extend_from_slice(&v);
            let ev = if i % 3 == 0 {
                Event::Ext(1, Bytes::from(v))
            } else {
                Event::Data(Bytes::from(v))
            };
            q.push(ev).unwrap();
        }
        assert!(q.spilled() > 0, "20 x 300 KiB must spill past 2 MiB");
        q.push(Event::ExitStatus(3)).unwrap();
        q.push(Event::Close).unwrap();
        let mut got = Vec::new();
        let mut stderr_chunks = 0;
        loop {
            match q.pop().await.unwrap() {
                Event::Data(d) => got.extend_from_slice(&d),
                Event::Ext(1, d) => {
                    stderr_chunks += 1;
                    got.extend_from_slice(&d)
                }
                Event::ExitStatus(s) => assert_eq!(s, 3),
                Event::Close => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, expected);
        assert_eq!(stderr_chunks, 7);
        assert_eq!(q.spilled(), 0);
    }

    #[tokio::test]
    async fn memory_is_used_again_while_the_file_has_unread_bytes() {
        let _turn = BUDGET.lock().await;
        let q = SpillQueue::new();
        const N: usize = CHANNEL_MEMORY / 4;
        let chunk = |i: u8| Bytes::from(vec![i; N]);
        // 4 chunks fill the channel's memory; the 5th and 6th spill.
        for i in 0..6 {
            q.push(Event::Data(chunk(i))).unwrap();
        }
        let on_disk = q.spilled();
        assert_eq!(on_disk, 2 * N as u64);
        // The reader takes one chunk: the next push fits in memory again,
        // behind the spilled ones, and the file does not grow.
        assert!(matches!(q.pop().await.unwrap(), Event::Data(d) if d[0] == 0));
        q.push(Event::Data(chunk(6))).unwrap();
        assert_eq!(
            q.spilled(),
            on_disk,
            "went to disk although memory had room"
        );
        for i in 1..7u8 {
            match q.pop().await.unwrap() {
                Event::Data(d) => assert!(d.len() == N && d.iter().all(|&b| b == i)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(q.spilled(), 0);
        assert_eq!(q.inner.lock().unwrap().mem, 0);
    }

    #[tokio::test]
    async fn control_messages_are_counted_like_data() {
        let q = SpillQueue::new();
        q.push_control(Event::Ext(1, Bytes::from_static(b"closed\r\n")));
        q.push_control(Event::Close);
        assert!(matches!(q.pop().await.unwrap(), Event::Ext(1, _)));
        assert!(matches!(q.pop().await.unwrap(), Event::Close));
        assert_eq!(q.inner.lock().unwrap().mem, 0);
    }

    #[tokio::test]
    async fn reader_gone_drops_everything() {
        let q = SpillQueue::new();
        q.push(Event::Data(Bytes::from_static(b"x"))).unwrap();
        q.close_reader();
        q.push(Event::Data(Bytes::from_static(b"y"))).unwrap();
        assert!(q.try_pop().unwrap().is_none());
    }
}

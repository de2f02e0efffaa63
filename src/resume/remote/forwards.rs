//! The forwarded TCP connections a forwards helper carries (issue 24):
//! every connection to a target, its replay buffers, and what goes to the
//! attachment for it. The daemon ([`super::daemon`]) owns the attachment
//! and hands this module the `Conn` frames.
//!
//! Each target connection has a reader and a writer task (no thread): the
//! reader stops while the connection's unacknowledged output is at the
//! spec's `buffer`; the writer writes the client's bytes in order and
//! reports each write, so input is acknowledged once written. Output goes
//! out round robin, one chunk per connection in turn, while the
//! attachment has room, so a bulk download does not starve the others.
//!
//! Beyond the wire module's description:
//! - `Resumed{have_in}` counts what the helper received (all of it is
//!   written to the target, in order).
//! - After a wrapped `Resumed`, `Started` is repeated for an open
//!   connection on which nothing has flowed yet either way (the first
//!   one may have been lost with the old attachment): a client ignores a
//!   `Started` for a connection it has open.
//! - Nothing is sent for a connection on a new attachment until the
//!   client resumed it; its `Eof` and `Closed` are sent again after the
//!   replay (the client ignores duplicates).
//! - An `OpenFailed` ends the connection (no `Done` expected). A failed
//!   read (reset) ends both ways; a failed write drops further input (as
//!   sshd does) while reading goes on.
//! - A protocol error on one connection (data skipping ahead, an ack
//!   beyond what was sent) closes that target connection and answers
//!   `Refused`; data for an unknown connection is answered `Refused`,
//!   its acks, `Done` and `Hangup` are ignored.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;

use super::connect::{self, OpenFailure};
use crate::resume::wire::{self, Frame, Inbox, Outbox, Secret, StartSpec, Stream, WireError};

/// Bytes written to a target between two acks while more is queued (so
/// the client's window refills before the queue runs dry).
const ACK_EVERY: u64 = 128 * 1024;

/// Where frames for the client go: the current attachment.
pub trait Link {
    /// Queues a frame.
    fn send(&self, f: &Frame);
    /// Whether more data frames may be queued now.
    fn has_room(&self) -> bool;
}

/// What a target connection's tasks report; each carries the connection's
/// number and generation (a later connection may reuse the number).
enum TargetEvent {
    /// The connect finished.
    Connected(u32, u64, Result<TcpStream, OpenFailure>),
    /// Bytes read from the target.
    Read(u32, u64, Bytes),
    /// Reading ended: `true` when it failed (the connection is dead).
    ReadEnd(u32, u64, bool),
    /// This many bytes were written to the target.
    Wrote(u32, u64, usize),
    /// Writing ended: `true` when a write failed, else after shutdown.
    WriteEnd(u32, u64, bool),
}

/// What the writer task is given.
enum ToTarget {
    /// Bytes to write.
    Data(Bytes),
    /// The client's EOF: shut down our sending side.
    Shutdown,
}

/// How far a target connection's open got.
enum Phase {
    /// Resolving or connecting.
    Connecting,
    /// Connected.
    Open,
    /// Could not connect: the answer to give.
    Failed(OpenFailure),
}

/// How much output the reader may hold before it waits for acks.
struct Credit {
    /// Bytes read and not yet acknowledged.
    used: AtomicUsize,
    /// The spec's `buffer`.
    limit: usize,
    /// Signalled when acks freed some.
    room: Notify,
}

impl Credit {
    /// `n` bytes were acknowledged.
    fn release(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
            self.room.notify_one();
        }
    }
}

/// One forwarded connection.
struct Target {
    /// Tells its tasks' events from a later connection's of that number.
    generation: u64,
    /// The open's progress.
    phase: Phase,
    /// Whether the client resumed (or opened) it on this attachment;
    /// nothing is sent for it before.
    attached: bool,
    /// Whether `Started` went out on this attachment.
    answered: bool,
    /// Input received.
    inbox: Inbox,
    /// To the writer task, until writing ended.
    writer: Option<mpsc::UnboundedSender<ToTarget>>,
    /// The writer task's end, until it is spawned on connect.
    writer_rx: Option<mpsc::UnboundedReceiver<ToTarget>>,
    /// Input bytes given to the writer and not yet written.
    unwritten: u64,
    /// Input acknowledged so far.
    acked_in: u64,
    /// Where the client's input ends, once it said.
    stdin_eof: Option<u64>,
    /// Whether the writer was told to shut down.
    shut: bool,
    /// Writing ended (shut down after the client's EOF, or failed).
    write_done: bool,
    /// Output from the target, kept until acknowledged.
    out: Outbox,
    /// Shared with the reader task.
    credit: Arc<Credit>,
    /// Whether the output's EOF went out on this attachment.
    eof_told: bool,
    /// Whether `Closed` went out on this attachment.
    closed_told: bool,
    /// Whether it is in the send queue.
    queued: bool,
    /// Its tasks, aborted when it is forgotten (which closes the socket).
    tasks: Vec<AbortHandle>,
}

impl Drop for Target {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Every forwarded connection of one helper.
pub struct Forwards {
    /// The helper's spec: secret, owner, run, timeout, buffer.
    spec: StartSpec,
    /// By the client's numbers.
    targets: HashMap<u32, Target>,
    /// Connections with something to send, in turn.
    ready: VecDeque<u32>,
    /// Given to the tasks.
    events_tx: mpsc::UnboundedSender<TargetEvent>,
    /// What the tasks report.
    events: mpsc::UnboundedReceiver<TargetEvent>,
    /// The next connection's generation.
    next_gen: u64,
}

/// What one turn of a connection in the send queue left.
enum Turn {
    /// It may have more to send.
    More,
    /// Nothing more for now.
    Idle,
    /// Its story is told: forget it.
    Forget,
}

/// Something for the main loop to handle: see [`Forwards::next`].
pub struct Pending(TargetEvent);

impl Forwards {
    /// No connections yet.
    pub fn new(spec: StartSpec) -> Forwards {
        let (events_tx, events) = mpsc::unbounded_channel();
        Forwards {
            spec,
            targets: HashMap::new(),
            ready: VecDeque::new(),
            events_tx,
            events,
            next_gen: 0,
        }
    }

    /// The spec the helper was started with.
    pub fn spec(&self) -> &StartSpec {
        &self.spec
    }

    /// Waits for the next report of a connection's tasks.
    pub async fn next(&mut self) -> Pending {
        match self.events.recv().await {
            Some(ev) => Pending(ev),
            // We hold a sender: never.
            None => std::future::pending().await,
        }
    }

    /// Whether a connection has something to send.
    pub fn wants_to_send(&self) -> bool {
        !self.ready.is_empty()
    }

    /// A new attachment: nothing goes out for a connection until the
    /// client resumes it there.
    pub fn reattach(&mut self) {
        for t in self.targets.values_mut() {
            t.attached = false;
        }
    }

    /// Closes every target connection.
    pub fn close_all(&mut self) {
        self.targets.clear();
        self.ready.clear();
    }

    /// Queues connection `c` for a turn at sending.
    fn mark(&mut self, c: u32) {
        if let Some(t) = self.targets.get_mut(&c)
            && !t.queued
        {
            t.queued = true;
            self.ready.push_back(c);
        }
    }

    /// Sends what is due, one chunk per connection in turn, while the
    /// attachment has room.
    pub fn pump(&mut self, link: &impl Link) {
        while link.has_room() {
            let Some(c) = self.ready.pop_front() else {
                break;
            };
            let Some(t) = self.targets.get_mut(&c) else {
                continue;
            };
            t.queued = false;
            match t.turn(c, link) {
                Turn::More => {
                    t.queued = true;
                    self.ready.push_back(c);
                }
                Turn::Idle => {}
                Turn::Forget => {
                    self.targets.remove(&c);
                }
            }
        }
    }

    /// A report of a connection's tasks.
    pub fn handle(&mut self, Pending(ev): Pending) {
        let (c, generation) = match &ev {
            TargetEvent::Connected(c, g, _)
            | TargetEvent::Read(c, g, _)
            | TargetEvent::ReadEnd(c, g, _)
            | TargetEvent::Wrote(c, g, _)
            | TargetEvent::WriteEnd(c, g, _) => (*c, *g),
        };
        let Some(t) = self.targets.get_mut(&c) else {
            return;
        };
        if t.generation != generation {
            return;
        }
        match ev {
            TargetEvent::Connected(_, _, r) => match r {
                Ok(stream) => t.open(c, generation, stream, &self.events_tx),
                Err(why) => t.phase = Phase::Failed(why),
            },
            TargetEvent::Read(_, _, b) => t.out.push(b),
            TargetEvent::ReadEnd(_, _, failed) => {
                t.out.close();
                if failed {
                    // Reset: the connection is dead both ways.
                    t.stop_writing();
                }
            }
            TargetEvent::Wrote(_, _, n) => {
                t.unwritten = t.unwritten.saturating_sub(n as u64);
                t.maybe_shut();
            }
            TargetEvent::WriteEnd(_, _, failed) => {
                if failed {
                    t.stop_writing();
                }
                t.write_done = true;
            }
        }
        self.mark(c);
    }

    /// A frame about connection `c` from the client.
    pub fn frame(&mut self, c: u32, f: Frame, link: &impl Link) {
        let reply = |f: Frame| {
            link.send(&Frame::Conn {
                conn: c,
                frame: Box::new(f),
            })
        };
        let r = match f {
            Frame::Connect { host, port } => {
                self.connect(c, host, port, link);
                Ok(())
            }
            Frame::Resume {
                secret, have_out, ..
            } => {
                self.resume(c, &secret, have_out, link);
                Ok(())
            }
            Frame::Done | Frame::Hangup => {
                // Done: the client has it all; Hangup: its end is gone.
                // Either way the socket closes as it is dropped.
                self.targets.remove(&c);
                Ok(())
            }
            Frame::Data {
                stream: Stream::Stdin,
                offset,
                data,
            } => match self.targets.get_mut(&c) {
                Some(t) => t.input(offset, data),
                None => Err(WireError::Malformed("no such connection")),
            },
            Frame::Eof {
                stream: Stream::Stdin,
                at,
            } => match self.targets.get_mut(&c) {
                Some(t) => {
                    t.stdin_eof = Some(at);
                    t.maybe_shut();
                    Ok(())
                }
                None => Err(WireError::Malformed("no such connection")),
            },
            Frame::Ack {
                stream: Stream::Stdout,
                upto,
            } => match self.targets.get_mut(&c) {
                Some(t) => t.acked(upto),
                None => Ok(()),
            },
            _ => Err(WireError::Malformed("unexpected frame for a connection")),
        };
        match r {
            Ok(()) => self.mark(c),
            Err(e) => {
                // That connection's protocol is broken: end it, say why.
                self.targets.remove(&c);
                reply(Frame::Refused(e.to_string()));
            }
        }
    }

    /// `Connect`: starts connecting; the answer comes from `pump`.
    fn connect(&mut self, c: u32, host: String, port: u32, link: &impl Link) {
        if self
            .targets
            .get(&c)
            .is_some_and(|t| !matches!(t.phase, Phase::Failed(_)))
        {
            link.send(&Frame::Conn {
                conn: c,
                frame: Box::new(Frame::OpenFailed {
                    code: connect::CONNECT_FAILED,
                    reason: format!("connection number {c} is in use"),
                }),
            });
            return;
        }
        let generation = self.next_gen;
        self.next_gen += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let events = self.events_tx.clone();
        let task = tokio::spawn(async move {
            let r = connect::connect(&host, port).await;
            let _ = events.send(TargetEvent::Connected(c, generation, r));
        });
        let t = Target {
            generation,
            phase: Phase::Connecting,
            attached: true,
            answered: false,
            inbox: Inbox::default(),
            writer: Some(tx),
            writer_rx: Some(rx),
            unwritten: 0,
            acked_in: 0,
            stdin_eof: None,
            shut: false,
            write_done: false,
            out: Outbox::default(),
            credit: Arc::new(Credit {
                used: AtomicUsize::new(0),
                limit: (self.spec.buffer as usize).max(wire::CHUNK),
                room: Notify::new(),
            }),
            eof_told: false,
            closed_told: false,
            queued: false,
            tasks: vec![task.abort_handle()],
        };
        // Replaces a failed connection of that number the client reuses.
        self.targets.insert(c, t);
    }

    /// A wrapped `Resume`: the client has output up to `have_out`.
    fn resume(&mut self, c: u32, secret: &Secret, have_out: u64, link: &impl Link) {
        let reply = |f: Frame| {
            link.send(&Frame::Conn {
                conn: c,
                frame: Box::new(f),
            })
        };
        if !self.spec.secret.matches(secret) {
            reply(Frame::Refused("wrong secret".into()));
            return;
        }
        let Some(t) = self.targets.get_mut(&c) else {
            reply(Frame::Refused("no such connection".into()));
            return;
        };
        let before = t.out.buffered();
        if let Err(e) = t.out.rewind(have_out) {
            self.targets.remove(&c);
            reply(Frame::Refused(format!("cannot resume: {e}")));
            return;
        }
        t.credit.release(before - t.out.buffered());
        reply(Frame::Resumed {
            have_in: t.inbox.have,
        });
        t.attached = true;
        t.eof_told = false;
        t.closed_told = false;
        if matches!(t.phase, Phase::Open) {
            // Data either way proves the client had `Started`.
            t.answered = t.inbox.have > 0 || have_out > 0;
        }
    }
}

impl Target {
    /// Connected: the reader and writer tasks start.
    fn open(
        &mut self,
        c: u32,
        generation: u64,
        stream: TcpStream,
        events: &mpsc::UnboundedSender<TargetEvent>,
    ) {
        self.phase = Phase::Open;
        let (rd, wr) = stream.into_split();
        let reader = tokio::spawn(read_target(
            c,
            generation,
            rd,
            self.credit.clone(),
            events.clone(),
        ));
        self.tasks.push(reader.abort_handle());
        if let Some(rx) = self.writer_rx.take() {
            let writer = tokio::spawn(write_target(c, generation, wr, rx, events.clone()));
            self.tasks.push(writer.abort_handle());
        }
    }

    /// Input from the client: queued for the writer (dropped once writing
    /// failed, as sshd drops it).
    fn input(&mut self, offset: u64, data: Bytes) -> Result<(), WireError> {
        let fresh = self.inbox.accept(offset, data)?;
        if fresh.is_empty() || self.shut {
            return Ok(());
        }
        if let Some(w) = &self.writer {
            let n = fresh.len() as u64;
            if w.send(ToTarget::Data(fresh)).is_ok() {
                self.unwritten += n;
            }
        }
        self.maybe_shut();
        Ok(())
    }

    /// Tells the writer to shut down once all input up to the client's
    /// EOF was given to it (it writes in order).
    fn maybe_shut(&mut self) {
        if self.shut || self.stdin_eof.is_none_or(|at| self.inbox.have < at) {
            return;
        }
        self.shut = true;
        if let Some(w) = &self.writer {
            let _ = w.send(ToTarget::Shutdown);
        }
    }

    /// Writing failed (or the connection is dead): the rest of the input
    /// is dropped and counts as written.
    fn stop_writing(&mut self) {
        self.writer = None;
        self.writer_rx = None;
        self.unwritten = 0;
        self.write_done = true;
    }

    /// `Ack` from the client for the output.
    fn acked(&mut self, upto: u64) -> Result<(), WireError> {
        let before = self.out.buffered();
        self.out.ack(upto)?;
        self.credit.release(before - self.out.buffered());
        Ok(())
    }

    /// One turn at sending: the open's answer, the input's ack, one chunk
    /// of output, then its EOF and `Closed`.
    fn turn(&mut self, c: u32, link: &impl Link) -> Turn {
        if !self.attached {
            return Turn::Idle;
        }
        let send = |f: Frame| {
            link.send(&Frame::Conn {
                conn: c,
                frame: Box::new(f),
            })
        };
        if !self.answered {
            match &self.phase {
                Phase::Connecting => return Turn::Idle,
                Phase::Open => send(Frame::Started),
                Phase::Failed(why) => {
                    send(Frame::OpenFailed {
                        code: why.code,
                        reason: why.reason.clone(),
                    });
                    return Turn::Forget;
                }
            }
            self.answered = true;
        }
        // Input is acknowledged once written: when the queue drains, and
        // every ACK_EVERY bytes while it does not.
        let written = self.inbox.have - self.unwritten;
        if written > self.acked_in && (self.unwritten == 0 || written - self.acked_in >= ACK_EVERY)
        {
            send(Frame::Ack {
                stream: Stream::Stdin,
                upto: written,
            });
            self.acked_in = written;
        }
        // At most a window beyond what the client's reader took.
        if self.out.in_flight() < wire::WINDOW
            && let Some((offset, data)) = self.out.next_chunk()
        {
            send(Frame::Data {
                stream: Stream::Stdout,
                offset,
                data,
            });
            return Turn::More;
        }
        if !self.eof_told && self.out.eof_due() {
            send(Frame::Eof {
                stream: Stream::Stdout,
                at: self.out.end(),
            });
            self.eof_told = true;
        }
        if self.eof_told && self.write_done && !self.closed_told {
            send(Frame::Closed);
            self.closed_told = true;
        }
        Turn::Idle
    }
}

/// A target's reader task: what it reads, while the connection's output
/// buffer has room, then how reading ended.
async fn read_target(
    c: u32,
    generation: u64,
    rd: OwnedReadHalf,
    credit: Arc<Credit>,
    events: mpsc::UnboundedSender<TargetEvent>,
) {
    loop {
        while credit.used.load(Ordering::Relaxed) >= credit.limit {
            credit.room.notified().await;
        }
        let r = match rd.readable().await {
            Ok(()) => try_read_chunk(&rd),
            Err(e) => Err(e),
        };
        let ev = match r {
            Ok(None) => continue,
            Ok(Some(b)) if b.is_empty() => TargetEvent::ReadEnd(c, generation, false),
            Ok(Some(b)) => {
                credit.used.fetch_add(b.len(), Ordering::Relaxed);
                TargetEvent::Read(c, generation, b)
            }
            Err(_) => TargetEvent::ReadEnd(c, generation, true),
        };
        let end = matches!(ev, TargetEvent::ReadEnd(..));
        if events.send(ev).is_err() || end {
            return;
        }
    }
}

/// Reads what is there, up to a chunk: `Some(empty)` at EOF, `None` when
/// nothing was (a spurious wakeup). The buffer lives only during the
/// call, so an idle connection holds no read buffer.
fn try_read_chunk(rd: &OwnedReadHalf) -> io::Result<Option<Bytes>> {
    let mut buf = [0u8; wire::CHUNK];
    match rd.try_read(&mut buf) {
        Ok(n) => Ok(Some(Bytes::copy_from_slice(&buf[..n]))),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A target's writer task: writes the client's bytes in order, reports
/// each write, shuts down on the client's EOF.
async fn write_target(
    c: u32,
    generation: u64,
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<ToTarget>,
    events: mpsc::UnboundedSender<TargetEvent>,
) {
    while let Some(m) = rx.recv().await {
        let ev = match m {
            ToTarget::Data(b) => match wr.write_all(&b).await {
                Ok(()) => TargetEvent::Wrote(c, generation, b.len()),
                Err(_) => TargetEvent::WriteEnd(c, generation, true),
            },
            ToTarget::Shutdown => {
                let failed = wr.shutdown().await.is_err();
                TargetEvent::WriteEnd(c, generation, failed)
            }
        };
        let end = matches!(ev, TargetEvent::WriteEnd(..));
        if events.send(ev).is_err() || end {
            return;
        }
    }
}

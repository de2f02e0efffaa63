//! One session's daemon: owns the command, buffers its output, and serves
//! the attachments that relays make to its socket, one at a time.
//!
//! A relay hands its channel's stdin and stdout over ([`handover`]), and
//! the daemon speaks on them itself (a peer that does not, such as
//! `reap`, speaks on the socket). Every connection is greeted (MAGIC,
//! `Hello`); it becomes the attachment with `Start` (a fresh session) or
//! a `Resume` with the right secret, which replaces any earlier attachment
//! (a blackholed one may still look alive). Each connection has its own
//! task that reads and writes, so acks and input are read while a write
//! is blocked. With no attachment, the
//! session is held for the spec's timeout, then ended as sshd would end
//! it for a vanished client.
//!
//! A `Start` for [`wire::Command::Forwards`] makes it a forwards helper
//! instead ([`forwarding`]).

mod forwarding;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Buf;
use bytes::{Bytes, BytesMut};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

use super::child::{self, Spawned};
use super::handover::{self, First};
use super::rundir::check_peer;
use crate::resume::wire::{
    self, Command, Exit, Frame, Inbox, Outbox, SessionId, StartSpec, Stream, WireError,
};

/// Encoded bytes queued to one connection beyond which no more data
/// frames are made (the rest waits in the outboxes).
const QUEUE_LIMIT: usize = 256 * 1024;

/// The size asked for the channel's pipes (64 KiB by default).
const CHANNEL_PIPE: libc::c_int = 256 * 1024;

/// Output read but not yet sent beyond which an attached session stops
/// reading the command's output until the connection takes more.
const READ_AHEAD: u64 = wire::CHUNK as u64;

/// Room for each read of a connection's frames.
const READ_ROOM: usize = 128 * 1024;

/// The most pieces one write takes (a data frame is two).
const MAX_IOV: usize = 64;

/// Input written to the command between two acks while more is queued
/// (so the client's window refills before the queue runs dry).
const ACK_EVERY: u64 = 512 * 1024;

/// How long a command may take to exit after SIGHUP before its process
/// group gets SIGKILL.
const KILL_AFTER: Duration = Duration::from_secs(5);

/// How long the last frames may take to go out when the daemon ends.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the daemon for `listener` until its session ends; the socket at
/// `path` is removed in any case. With `spec` (from `start`'s argument)
/// the command starts at once, and the first connection is attached to
/// it without waiting for a `Start` frame.
pub fn run(
    listener: std::os::unix::net::UnixListener,
    path: PathBuf,
    id: SessionId,
    spec: Option<StartSpec>,
) {
    /// Removes the socket when the daemon ends, however it ends.
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(path);
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    rt.block_on(async move {
        if listener.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(listener) = UnixListener::from_std(listener) else {
            return;
        };
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut d = Daemon {
            id,
            listener,
            events_tx,
            events,
            pending: HashMap::new(),
            attached: None,
            next_gen: 0,
            session: None,
            timer: None,
            ending: false,
            early: None,
            forwarding: false,
        };
        if let Some(spec) = spec {
            d.start_early(spec);
        }
        d.serve().await;
        d.flush().await;
    });
}

/// What a connection's tasks report.
enum Event {
    /// A frame arrived on connection `gen`.
    Frame(u64, Frame),
    /// Connection `gen` closed, failed or sent a malformed frame.
    Closed(u64),
}

/// One connection to the socket.
struct Conn {
    /// Tells its events apart from a later connection's.
    generation: u64,
    /// Encoded frames (a data frame as its header and its data) for its task.
    tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes queued and not yet written.
    queued: Arc<AtomicUsize>,
    /// Signalled when the task wrote a batch.
    drained: Arc<Notify>,
    /// Cancelled when the connection is dropped: reading stops, and what
    /// is queued has [`FLUSH_TIMEOUT`] to go out (a blackholed attachment
    /// never takes it).
    stop: CancellationToken,
    /// Its task, which ends once `tx` is dropped and all is out.
    task: JoinHandle<()>,
}

impl Conn {
    /// Queues a frame.
    fn send(&self, f: &Frame) {
        self.push(f.to_bytes());
    }

    /// Queues a data frame; the data is not copied.
    fn send_data(&self, stream: Stream, offset: u64, data: Bytes) {
        let header = wire::data_header(stream, offset, data.len());
        self.push(Bytes::copy_from_slice(&header));
        self.push(data);
    }

    /// Queues bytes.
    fn push(&self, b: Bytes) {
        self.queued.fetch_add(b.len(), Ordering::Relaxed);
        let _ = self.tx.send(b);
    }

    /// Whether more data frames may be queued now.
    fn has_room(&self) -> bool {
        self.queued.load(Ordering::Relaxed) < QUEUE_LIMIT
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The running command and its streams.
struct Session {
    /// Secret, owner, run, timeout, buffer size.
    spec: StartSpec,
    /// The command (also its process group).
    child: tokio::process::Child,
    /// Its pid; its process group has the same id.
    pid: i32,
    /// How it ended, once it did.
    exit: Option<Exit>,
    /// Our end of its input, until closed.
    stdin: Option<AsyncFd<OwnedFd>>,
    /// Input received and not yet written.
    stdin_queue: VecDeque<Bytes>,
    /// Bytes in `stdin_queue`.
    stdin_queued: usize,
    /// Input acknowledged so far (written to the command, or dropped
    /// after it closed its input).
    stdin_acked: u64,
    /// Where input ends (`Eof` from the client), once known.
    stdin_eof: Option<u64>,
    /// Input received so far.
    inbox: Inbox,
    /// Its output streams (stdout, stderr), until EOF.
    readers: [Option<AsyncFd<OwnedFd>>; 2],
    /// Output to send, kept until acknowledged.
    out: [Outbox; 2],
    /// Where each output stream is read into (empty between reads).
    scratch: [BytesMut; 2],
    /// Whether each output EOF went out on the current attachment.
    eof_sent: [bool; 2],
    /// Whether the exit went out on the current attachment.
    exit_sent: bool,
    /// The pty master, with a pty.
    pty: Option<OwnedFd>,
}

/// The daemon's state.
struct Daemon {
    /// This session's id.
    id: SessionId,
    /// The session's socket.
    listener: UnixListener,
    /// Given to each connection's tasks.
    events_tx: mpsc::UnboundedSender<Event>,
    /// What the connections report.
    events: mpsc::UnboundedReceiver<Event>,
    /// Connections greeted but not (yet) attached, by generation.
    pending: HashMap<u64, Conn>,
    /// The current attachment.
    attached: Option<Conn>,
    /// The next connection's generation.
    next_gen: u64,
    /// Once started.
    session: Option<Session>,
    /// Runs while nobody is attached: the hold's end.
    timer: Option<Pin<Box<Sleep>>>,
    /// Set when the daemon should end.
    ending: bool,
    /// A command started from `start`'s argument, until its first
    /// connection attaches (`Ok`) or is told why it could not start.
    early: Option<Result<(), String>>,
    /// Serving forwarded connections (a started helper with no command).
    forwarding: bool,
}

/// Whether the session's secret is still to come: a session started from
/// `start`'s argument learns it from the first attachment's `Start`.
fn secret_pending(s: &Session) -> bool {
    s.spec.secret.matches(&wire::Secret([0; 32]))
}

impl Daemon {
    /// The main loop, until the session ends.
    async fn serve(&mut self) {
        while !self.ending {
            self.pump();
            let attached_waits = self.attached.as_ref().is_some_and(|c| !c.has_room())
                && self.session.as_ref().is_some_and(Session::wants_to_send);
            let drained = self.attached.as_ref().map(|c| c.drained.clone());
            let Some(s) = self.session.as_mut() else {
                // Not started: only connections and their frames.
                tokio::select! {
                    acc = self.listener.accept() => {
                        if let Ok((stream, _)) = acc {
                            self.accepted(stream);
                        }
                    }
                    Some(ev) = self.events.recv() => self.event(ev).await,
                }
                continue;
            };
            // Attached, output is read only as fast as it goes out: then
            // each read takes what piled up in the pipe meanwhile, instead
            // of a frame and a wake-up per small write of the command.
            // Detached, it is read ahead into the buffer.
            let attached = self.attached.is_some();
            let can_read = [0, 1].map(|i| {
                s.readers[i].is_some()
                    && s.out[i].buffered() < s.spec.buffer as usize
                    && (!attached || s.out[i].unsent() < READ_AHEAD)
            });
            let can_write = s.stdin.is_some() && !s.stdin_queue.is_empty();
            let running = s.exit.is_none();
            let [scratch_out, scratch_err] = &mut s.scratch;
            tokio::select! {
                acc = self.listener.accept() => {
                    if let Ok((stream, _)) = acc {
                        self.accepted(stream);
                    }
                }
                Some(ev) = self.events.recv() => self.event(ev).await,
                () = notified(drained), if attached_waits => {}
                r = read_some(s.readers[0].as_ref(), scratch_out), if can_read[0] => {
                    s.output(0, r);
                }
                r = read_some(s.readers[1].as_ref(), scratch_err), if can_read[1] => {
                    s.output(1, r);
                }
                r = write_some(s.stdin.as_ref(), s.stdin_queue.front()), if can_write => {
                    s.wrote(r);
                }
                st = s.child.wait(), if running => {
                    s.exit = Some(match st {
                        Ok(st) => exit_of(st),
                        Err(_) => Exit::Status(255),
                    });
                }
                () = sleep_opt(self.timer.as_mut()), if self.timer.is_some() => {
                    // Nobody came back in time.
                    self.end_command().await;
                    self.ending = true;
                }
            }
        }
    }

    /// Sends what is due on the attachment: the input's ack, output,
    /// EOFs, the exit.
    fn pump(&mut self) {
        let (Some(c), Some(s)) = (self.attached.as_ref(), self.session.as_mut()) else {
            return;
        };
        // Input is acknowledged once written: when the queue drains, and
        // every ACK_EVERY bytes while it does not.
        let written = s.inbox.have - s.stdin_queued as u64;
        if written > s.stdin_acked && (s.stdin_queued == 0 || written - s.stdin_acked >= ACK_EVERY)
        {
            c.send(&Frame::Ack {
                stream: Stream::Stdin,
                upto: written,
            });
            s.stdin_acked = written;
        }
        let streams = [Stream::Stdout, Stream::Stderr];
        let mut more = true;
        while more && c.has_room() {
            more = false;
            for (i, stream) in streams.iter().enumerate() {
                if s.out[i].in_flight() >= wire::WINDOW {
                    continue;
                }
                if let Some((offset, data)) = s.out[i].next_chunk() {
                    c.send_data(*stream, offset, data);
                    more = true;
                }
            }
        }
        for (i, stream) in streams.iter().enumerate() {
            if !s.eof_sent[i] && s.out[i].eof_due() {
                c.send(&Frame::Eof {
                    stream: *stream,
                    at: s.out[i].end(),
                });
                s.eof_sent[i] = true;
            }
        }
        if let Some(exit) = &s.exit
            && !s.exit_sent
            && s.eof_sent == [true, true]
        {
            c.send(&Frame::Exit(exit.clone()));
            s.exit_sent = true;
        }
    }

    /// Starts the command from `start`'s argument, before anyone connects.
    fn start_early(&mut self, spec: StartSpec) {
        let started = child::spawn(&spec)
            .map_err(|e| e.to_string())
            .and_then(|sp| {
                Session::new(spec, sp).map_err(|e| format!("cannot watch the command: {e}"))
            });
        self.early = Some(match started {
            Ok(s) => {
                self.session = Some(s);
                Ok(())
            }
            Err(why) => Err(why),
        });
    }

    /// A new connection: greeted, then pending until it starts or resumes.
    fn accepted(&mut self, stream: tokio::net::UnixStream) {
        if check_peer(&stream).is_err() {
            return;
        }
        let generation = self.next_gen;
        self.next_gen += 1;
        let early = self.early.take();
        let mut greeting = BytesMut::from(&wire::MAGIC[..]);
        Frame::Hello {
            version: wire::VERSION,
            session: self.id,
            fresh: (self.session.is_none() && !self.forwarding) || early.is_some(),
        }
        .encode(&mut greeting);
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let drained = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(connection(
            generation,
            stream,
            greeting.freeze(),
            Queue {
                rx,
                queued: queued.clone(),
                drained: drained.clone(),
            },
            self.events_tx.clone(),
            stop.clone(),
        ));
        let conn = Conn {
            generation,
            tx,
            queued,
            drained,
            stop,
            task,
        };
        match early {
            // The relay that started us: it has the command already.
            Some(Ok(())) => {
                conn.send(&Frame::Started);
                self.attached = Some(conn);
            }
            Some(Err(why)) => {
                conn.send(&Frame::Refused(why));
                // Kept so `flush` lets the refusal out.
                self.pending.insert(generation, conn);
                self.ending = true;
            }
            None => {
                self.pending.insert(generation, conn);
            }
        }
    }

    /// A connection's event.
    async fn event(&mut self, ev: Event) {
        match ev {
            Event::Closed(g) => {
                self.pending.remove(&g);
                if self.attached.as_ref().is_some_and(|c| c.generation == g) {
                    self.detach();
                }
                if self.session.is_none() && self.pending.is_empty() {
                    // Whoever started `start` is gone before `Start`.
                    self.ending = true;
                }
            }
            Event::Frame(g, f) => {
                if self.attached.as_ref().is_some_and(|c| c.generation == g) {
                    self.attached_frame(f).await;
                } else if let Some(c) = self.pending.remove(&g) {
                    self.pending_frame(c, f).await;
                }
            }
        }
    }

    /// The attachment is gone: hold the session for its timeout. A
    /// session never started has nothing to hold.
    fn detach(&mut self) {
        self.attached = None;
        match &self.session {
            Some(s) => {
                // Without its secret nobody can resume it: end it now.
                let secs = if secret_pending(s) {
                    0
                } else {
                    u64::from(s.spec.timeout_secs)
                };
                self.timer = Some(Box::pin(tokio::time::sleep(Duration::from_secs(secs))));
            }
            None => self.ending = true,
        }
    }

    /// A frame on a connection that is not the attachment.
    async fn pending_frame(&mut self, c: Conn, f: Frame) {
        match f {
            Frame::Start(spec) if self.session.is_none() && spec.command == Command::Forwards => {
                Box::pin(self.serve_forwards(*spec, c)).await;
                self.ending = true;
            }
            Frame::Start(spec) if self.session.is_none() => match child::spawn(&spec) {
                Ok(sp) => match Session::new(*spec, sp) {
                    Ok(s) => {
                        self.session = Some(s);
                        c.send(&Frame::Started);
                        self.attached = Some(c);
                    }
                    Err(e) => {
                        c.send(&Frame::Refused(format!("cannot watch the command: {e}")));
                        self.pending.insert(c.generation, c);
                        self.ending = true;
                    }
                },
                Err(why) => {
                    c.send(&Frame::Refused(why.to_string()));
                    // Kept so `flush` lets the refusal out.
                    self.pending.insert(c.generation, c);
                    self.ending = true;
                }
            },
            Frame::Resume {
                secret,
                have_out,
                have_err,
            } => {
                let Some(s) = self.session.as_mut() else {
                    c.send(&Frame::Refused("the session was never started".into()));
                    return;
                };
                if secret_pending(s) || !s.spec.secret.matches(&secret) {
                    c.send(&Frame::Refused("wrong secret".into()));
                    return;
                }
                if let Err(e) = s.resume(have_out, have_err) {
                    c.send(&Frame::Refused(format!("cannot resume: {e}")));
                    return;
                }
                c.send(&Frame::Resumed {
                    have_in: s.inbox.have,
                });
                // Replaces (and closes) any earlier attachment.
                self.attached = Some(c);
                self.timer = None;
            }
            Frame::Reap { owner, run } => self.reap(owner, run).await,
            Frame::Start(_) => c.send(&Frame::Refused("the session was already started".into())),
            // Anything else before attaching: the connection is dropped.
            _ => {}
        }
    }

    /// `Reap`: ends the session if it is `owner`'s, from another run.
    async fn reap(&mut self, owner: wire::Owner, run: wire::Run) {
        if let Some(s) = &self.session
            && s.spec.owner == owner
            && s.spec.run != run
        {
            self.end_command().await;
            self.ending = true;
        }
    }

    /// A frame on the attachment.
    async fn attached_frame(&mut self, f: Frame) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let ok = match f {
            Frame::Data {
                stream: Stream::Stdin,
                offset,
                data,
            } => s.input(offset, data),
            Frame::Eof {
                stream: Stream::Stdin,
                at,
            } => {
                s.stdin_eof = Some(at);
                s.maybe_close_stdin();
                Ok(())
            }
            Frame::Ack { stream, upto } if stream != Stream::Stdin => {
                s.out[stream as usize - 1].ack(upto)
            }
            Frame::Window { cols, rows, px, py } => {
                if let Some(p) = &s.pty {
                    let _ = child::set_window(p.as_raw_fd(), cols, rows, px, py);
                }
                Ok(())
            }
            Frame::Signal(name) => {
                if let (None, Some(sig)) = (&s.exit, child::signal_number(&name)) {
                    child::kill(s.pid, sig);
                }
                Ok(())
            }
            Frame::Start(spec)
                if secret_pending(s) && !spec.secret.matches(&wire::Secret([0; 32])) =>
            {
                s.spec.secret = spec.secret.clone();
                Ok(())
            }
            Frame::Hangup | Frame::Done => {
                // `Done` comes after the exit: nothing left to end then.
                self.end_command().await;
                self.ending = true;
                Ok(())
            }
            Frame::Reap { owner, run } => {
                self.reap(owner, run).await;
                Ok(())
            }
            _ => Err(WireError::Malformed("unexpected frame")),
        };
        if ok.is_err() {
            // A protocol error: drop the attachment; the client may resume.
            self.detach();
        }
    }

    /// Ends the command as sshd does for a vanished client: SIGHUP to its
    /// process group, its input (or pty) closed; SIGKILL for the group if
    /// it has not exited after [`KILL_AFTER`].
    async fn end_command(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.exit.is_some() {
            return;
        }
        child::kill(-s.pid, libc::SIGHUP);
        s.stdin = None;
        s.stdin_queue.clear();
        s.stdin_queued = 0;
        s.readers = [None, None];
        s.pty = None;
        if tokio::time::timeout(KILL_AFTER, s.child.wait())
            .await
            .is_err()
        {
            child::kill(-s.pid, libc::SIGKILL);
            let _ = s.child.wait().await;
        }
    }

    /// Lets the last frames (a refusal) go out before the daemon ends.
    async fn flush(&mut self) {
        let conns: Vec<Conn> = self
            .pending
            .drain()
            .map(|(_, c)| c)
            .chain(self.attached.take())
            .collect();
        let writers: Vec<JoinHandle<()>> = conns
            .into_iter()
            .map(|mut c| {
                let (tx, _) = mpsc::unbounded_channel();
                drop(std::mem::replace(&mut c.tx, tx));
                // The old sender is gone: the task ends once it is done.
                std::mem::replace(&mut c.task, tokio::spawn(async {}))
            })
            .collect();
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, async {
            for w in writers {
                let _ = w.await;
            }
        })
        .await;
    }
}

impl Session {
    /// Watches a spawned command's streams.
    fn new(spec: StartSpec, sp: Spawned) -> io::Result<Session> {
        let pid = sp.child.id().map_or(0, |p| p as i32);
        let mut out = [Outbox::default(), Outbox::default()];
        let stderr = match sp.stderr {
            Some(fd) => Some(watch(fd)?),
            None => {
                // With a pty there is no stderr: it ends at once.
                out[1].close();
                None
            }
        };
        Ok(Session {
            spec,
            child: sp.child,
            pid,
            exit: None,
            stdin: Some(watch(sp.stdin)?),
            stdin_queue: VecDeque::new(),
            stdin_queued: 0,
            stdin_acked: 0,
            stdin_eof: None,
            inbox: Inbox::default(),
            readers: [Some(watch(sp.stdout)?), stderr],
            out,
            scratch: [BytesMut::new(), BytesMut::new()],
            eof_sent: [false, false],
            exit_sent: false,
            pty: sp.pty,
        })
    }

    /// Whether output is waiting to go out.
    fn wants_to_send(&self) -> bool {
        self.out.iter().any(|o| o.buffered() > 0 || o.eof_due())
    }

    /// A new attachment has output up to these offsets.
    fn resume(&mut self, have_out: u64, have_err: u64) -> Result<(), WireError> {
        self.out[0].rewind(have_out)?;
        self.out[1].rewind(have_err)?;
        // Resent after the replay; the client ignores duplicates.
        self.eof_sent = [false, false];
        self.exit_sent = false;
        Ok(())
    }

    /// Output read from stream `i` (`None`: its end).
    fn output(&mut self, i: usize, r: io::Result<Option<Bytes>>) {
        match r {
            Ok(Some(b)) => self.out[i].push(b),
            // EOF, or EIO from a pty master whose command side is gone.
            Ok(None) | Err(_) => {
                self.readers[i] = None;
                self.out[i].close();
            }
        }
    }

    /// Input from the client.
    fn input(&mut self, offset: u64, data: Bytes) -> Result<(), WireError> {
        let fresh = self.inbox.accept(offset, data)?;
        if !fresh.is_empty() && self.stdin.is_some() {
            self.stdin_queued += fresh.len();
            self.stdin_queue.push_back(fresh);
        }
        Ok(())
    }

    /// The result of a write to the command's input.
    fn wrote(&mut self, r: io::Result<usize>) {
        match r {
            Ok(n) => {
                self.stdin_queued -= n;
                if let Some(front) = self.stdin_queue.front_mut() {
                    if n >= front.len() {
                        self.stdin_queue.pop_front();
                    } else {
                        let _ = front.split_to(n);
                    }
                }
            }
            Err(_) => {
                // The command closed its input (EPIPE): the rest is
                // dropped, as sshd drops it.
                self.stdin = None;
                self.stdin_queue.clear();
                self.stdin_queued = 0;
            }
        }
        self.maybe_close_stdin();
    }

    /// Closes the command's input once everything up to the client's EOF
    /// was written; not with a pty (sshd does not close a tty on EOF).
    fn maybe_close_stdin(&mut self) {
        if self.pty.is_none()
            && self.stdin_queue.is_empty()
            && self.stdin_eof.is_some_and(|at| self.inbox.have >= at)
        {
            self.stdin = None;
        }
    }
}

/// Registers `fd` with the runtime.
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor: it stays open and is not
    // replaced while registered, and is closed only after deregistering.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

/// The wire's form of how a process ended.
fn exit_of(st: ExitStatus) -> Exit {
    match (st.code(), st.signal()) {
        (Some(c), _) => Exit::Status(c as u32),
        (None, Some(sig)) => Exit::Signal {
            name: child::signal_name(sig),
            core_dumped: st.core_dumped(),
        },
        (None, None) => Exit::Status(255),
    }
}

/// Waits for a notification, if there is a notifier.
async fn notified(n: Option<Arc<Notify>>) {
    match n {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// Waits for the timer, if set.
async fn sleep_opt(t: Option<&mut Pin<Box<Sleep>>>) {
    match t {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Reads what is there from `fd` into `scratch`'s spare room: `None` at
/// its end. Small reads share one allocation (a line does not pin a
/// whole chunk's memory while it waits for its ack).
async fn read_some(
    fd: Option<&AsyncFd<OwnedFd>>,
    scratch: &mut BytesMut,
) -> io::Result<Option<Bytes>> {
    let Some(fd) = fd else {
        return std::future::pending().await;
    };
    scratch.reserve(wire::CHUNK);
    match read_into(fd, scratch, wire::CHUNK).await? {
        0 => Ok(None),
        n => Ok(Some(scratch.split_to(n).freeze())),
    }
}

/// Reads what is there from `fd` into `buf`'s spare room (which must not
/// be empty), at most `max` bytes: how many, 0 at its end. The read
/// happens in the poll that completes, so cancelling loses nothing.
async fn read_into(fd: &AsyncFd<OwnedFd>, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    loop {
        let mut g = fd.readable().await?;
        let spare = buf.spare_capacity_mut();
        let room = spare.len().min(max);
        let r = g.try_io(|inner| {
            // SAFETY: `spare` is valid for writing `room` bytes.
            let n = unsafe { libc::read(inner.as_raw_fd(), spare.as_mut_ptr().cast(), room) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Ok(n)) => {
                // SAFETY: read initialised the first `n` spare bytes.
                unsafe { buf.set_len(buf.len() + n) };
                return Ok(n);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
}

/// Writes some of `data` to `fd`.
async fn write_some(fd: Option<&AsyncFd<OwnedFd>>, data: Option<&Bytes>) -> io::Result<usize> {
    let (Some(fd), Some(data)) = (fd, data) else {
        return std::future::pending().await;
    };
    // SAFETY: `data` is valid for reading `data.len()` bytes.
    write_with(fd, |raw| unsafe {
        libc::write(raw, data.as_ptr().cast(), data.len())
    })
    .await
}

/// Runs the write `op` on `fd` once it is writable, again until it does
/// not block: how many bytes it wrote.
async fn write_with(
    fd: &AsyncFd<OwnedFd>,
    mut op: impl FnMut(std::os::fd::RawFd) -> isize,
) -> io::Result<usize> {
    loop {
        let mut g = fd.writable().await?;
        let r = g.try_io(|inner| {
            let n = op(inner.as_raw_fd());
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(r) => return r,
            Err(_would_block) => {}
        }
    }
}

/// A connection's queue of encoded frames, from the daemon to its task.
struct Queue {
    /// The bytes to write, in order.
    rx: mpsc::UnboundedReceiver<Bytes>,
    /// Bytes queued and not yet written.
    queued: Arc<AtomicUsize>,
    /// Signalled after each write.
    drained: Arc<Notify>,
}

/// How a connection carries frames: the channel's own stdin and stdout,
/// handed over by a relay, or the socket itself (`reap`, other versions).
struct Transport {
    /// Where frames come from.
    rd: AsyncFd<OwnedFd>,
    /// Where frames go.
    wr: AsyncFd<OwnedFd>,
    /// Bytes of frames already read.
    read: Vec<u8>,
    /// With a handover, the socket: the relay lives (and sshd keeps the
    /// channel) until it closes.
    relay: Option<tokio::net::UnixStream>,
    /// Whether the greeting still has to go out on `wr`.
    greet: bool,
}

/// A connection's task: greets it, takes the channel if a relay hands it
/// over, then reads frames (to the daemon, then `Closed`) and writes the
/// queued ones until the daemon drops it.
async fn connection(
    g: u64,
    stream: tokio::net::UnixStream,
    greeting: Bytes,
    queue: Queue,
    events: mpsc::UnboundedSender<Event>,
    stop: CancellationToken,
) {
    let t = tokio::select! {
        t = transport(stream, &greeting) => t,
        () = stop.cancelled() => return,
    };
    let Ok(t) = t else {
        let _ = events.send(Event::Closed(g));
        return;
    };
    let Transport {
        rd,
        wr,
        read,
        relay,
        greet,
    } = t;
    let reading = async {
        tokio::select! {
            () = read_frames(g, rd, read, &events) => {}
            () = stop.cancelled() => {}
        }
    };
    let give_up = async {
        stop.cancelled().await;
        tokio::time::sleep(FLUSH_TIMEOUT).await;
    };
    let writing = async {
        tokio::select! {
            () = write_frames(g, wr, greet.then_some(greeting.clone()), queue, &events) => {}
            () = give_up => {}
        }
    };
    tokio::join!(reading, writing);
    // Closing the socket lets the relay exit.
    drop(relay);
}

/// Greets a connection on the socket (a peer that speaks on it waits for
/// that) and reads its first bytes: a relay's handover, or frames.
async fn transport(mut stream: tokio::net::UnixStream, greeting: &[u8]) -> io::Result<Transport> {
    stream.write_all(greeting).await?;
    let first = stream
        .async_io(Interest::READABLE, || handover::receive(stream.as_raw_fd()))
        .await?;
    match first {
        First::Channel(rd, wr) => {
            for fd in [&rd, &wr] {
                child::set_nonblocking(fd.as_raw_fd())?;
                // Fewer wakeups on both sides; sshd may give sockets instead
                // of pipes, which keep their own buffers.
                // SAFETY: fcntl on a descriptor we own.
                unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, CHANNEL_PIPE) };
            }
            Ok(Transport {
                rd: watch(rd)?,
                wr: watch(wr)?,
                read: Vec::new(),
                relay: Some(stream),
                greet: true,
            })
        }
        First::Bytes(read) if read.is_empty() => Err(io::ErrorKind::UnexpectedEof.into()),
        First::Bytes(read) => {
            let wr = OwnedFd::from(stream.into_std()?);
            let rd = wr.try_clone()?;
            Ok(Transport {
                rd: watch(rd)?,
                wr: watch(wr)?,
                read,
                relay: None,
                greet: false,
            })
        }
    }
}

/// Reads frames off `rd` to the daemon, then `Closed`.
async fn read_frames(
    g: u64,
    rd: AsyncFd<OwnedFd>,
    read: Vec<u8>,
    events: &mpsc::UnboundedSender<Event>,
) {
    let mut buf = BytesMut::with_capacity(READ_ROOM);
    buf.extend_from_slice(&read);
    loop {
        loop {
            match Frame::decode(&mut buf) {
                Ok(Some(f)) => {
                    if events.send(Event::Frame(g, f)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    let _ = events.send(Event::Closed(g));
                    return;
                }
            }
        }
        buf.reserve(READ_ROOM);
        match read_into(&rd, &mut buf, READ_ROOM).await {
            Ok(0) | Err(_) => {
                let _ = events.send(Event::Closed(g));
                return;
            }
            Ok(_) => {}
        }
    }
}

/// Writes `first`, then the queued bytes, several at a time and without
/// copying them, until the queue's sender is dropped (or a write fails:
/// then `Closed`).
async fn write_frames(
    g: u64,
    wr: AsyncFd<OwnedFd>,
    first: Option<Bytes>,
    mut queue: Queue,
    events: &mpsc::UnboundedSender<Event>,
) {
    // The greeting is not counted in `queued`.
    let mut uncounted = first.as_ref().map_or(0, Bytes::len);
    let mut out: VecDeque<Bytes> = first.into_iter().collect();
    loop {
        if out.is_empty() {
            match queue.rx.recv().await {
                Some(b) => out.push_back(b),
                None => return,
            }
        }
        while out.len() < MAX_IOV {
            match queue.rx.try_recv() {
                Ok(b) => out.push_back(b),
                Err(_) => break,
            }
        }
        let n = match writev_some(&wr, &out).await {
            Ok(n) => n,
            Err(_) => {
                let _ = events.send(Event::Closed(g));
                return;
            }
        };
        let mut left = n;
        while left > 0 {
            let front = out.front_mut().expect("written bytes were queued");
            if left >= front.len() {
                left -= front.len();
                out.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
        let greeting = uncounted.min(n);
        uncounted -= greeting;
        queue.queued.fetch_sub(n - greeting, Ordering::Relaxed);
        queue.drained.notify_one();
    }
}

/// Writes some of `bufs` to `fd` with one writev.
async fn writev_some(fd: &AsyncFd<OwnedFd>, bufs: &VecDeque<Bytes>) -> io::Result<usize> {
    write_with(fd, |raw| {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .take(MAX_IOV)
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live `Bytes` of `bufs`, which
        // is not touched during the call.
        unsafe { libc::writev(raw, iov.as_ptr(), iov.len() as i32) }
    })
    .await
}

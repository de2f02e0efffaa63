//! Channel bridging: carries one local channel's traffic to its upstream
//! channel and back, byte for byte, with EOF, exit status and close in order.
//!
//! The local end is anything that implements [`LocalIn`] and [`LocalOut`]
//! (the implementations are side by side in [`ends`]): a channel of the
//! local SSH endpoint, a socket, or descriptors passed over the
//! multiplexing socket. No local protocol's types appear in this file, so
//! the spill and backpressure logic exists once, below that seam. Every
//! bridge is started through [`Opener`] ([`open`]), which opens the
//! upstream channel and holds the settings bridges share.
//!
//! Three tasks per bridged channel:
//! - the *pump* drains the upstream channel at once into a [`SpillQueue`]
//!   (so no upstream channel can stall the shared connection) and routes
//!   request replies;
//! - the *forwarder* moves events from the queue to the local end, at the
//!   local reader's pace;
//! - the *uplink* moves local input upstream, at the upstream's pace; it
//!   blocks only its own local end, which is what backpressure should do.

pub mod ends;
pub mod open;
pub mod spill;
pub mod upstream;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::ChannelMsg;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::stats::ChannelMeter;
use spill::{Event, PushError, SpillQueue};
pub use upstream::{UpRead, UpWrite, Upstream};

pub use open::{OpenChannel, Opener, Refused};
pub use spill::Event as Output;

/// What the local end sends towards the server.
pub enum Input {
    /// Channel data (a session's stdin).
    Data(Bytes),
    /// Extended data.
    Ext(u32, Bytes),
    /// The local end will send no more data.
    Eof,
}

/// The local end's input side: what the bridge reads from it.
pub trait LocalIn: Send + 'static {
    /// The next input; `None` once the local end is closed or gone (the
    /// remote command then ends). A local end that only half-closed (sent
    /// [`Input::Eof`]) and still takes output should never return instead:
    /// the bridge stops reading it once the channel is finished.
    fn recv(&mut self) -> impl Future<Output = Option<Input>> + Send;
}

/// The local end's output side: what the bridge delivers to it. Each call
/// returns when the local end has taken the item (this is where a slow
/// reader makes the bridge wait); an error means it is gone.
pub trait LocalOut: Send + 'static {
    /// Delivers one event ([`Output::Close`] last).
    fn send(&mut self, ev: Output) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// A channel request that needs the upstream's answer.
pub enum Request {
    /// `pty-req`.
    Pty {
        /// TERM.
        term: String,
        /// Width in characters.
        cols: u32,
        /// Height in rows.
        rows: u32,
        /// Width in pixels.
        pix_width: u32,
        /// Height in pixels.
        pix_height: u32,
        /// Terminal modes.
        modes: Vec<(russh::Pty, u32)>,
    },
    /// `shell`.
    Shell,
    /// `exec` with the command.
    Exec(Vec<u8>),
    /// `subsystem` with its name.
    Subsystem(String),
    /// `auth-agent-req@openssh.com`.
    AgentForward,
}

/// Settings of one bridged channel (built by [`OpenChannel::bridge`]).
struct Options {
    /// A session channel: if the upstream connection is lost, its client is
    /// told so on stderr before the channel closes.
    session: bool,
    /// Names the channel in logs.
    what: String,
    /// Counts its traffic.
    meter: ChannelMeter,
    /// Held until the upstream channel is gone (e.g. its connection's load count).
    hold: Option<Box<dyn Send + Sync>>,
    /// How long a local reader whose buffer is full may take nothing
    /// before the channel is closed.
    stall_limit: Duration,
    /// Counts, for the upstream connection, channels whose pump waits for
    /// a stalled reader (the connection takes no new channels meanwhile).
    congestion: Option<Arc<AtomicUsize>>,
}

/// The upstream write side of a bridged channel, shared by the local end's
/// handler (requests, window changes, signals) and the bridge tasks.
pub struct Bridge {
    /// Writes to the upstream channel (or resumable session).
    pub write: UpWrite,
    /// Replies we are waiting for, in request order (SSH answers in order).
    replies: Mutex<VecDeque<oneshot::Sender<bool>>>,
    /// A session channel (the only kind OpenSSH sends `eow@openssh.com` on).
    session: bool,
    /// Set when the local client can take no more output
    /// (`eow@openssh.com`): stdout is dropped, stderr and exit status still
    /// delivered, and a local close no longer ends the remote command.
    eow: CancellationToken,
    /// Set when the server reported the remote command's end (exit status
    /// or signal).
    exited: CancellationToken,
    /// Set when the upstream channel is gone (the pump ended).
    upstream_gone: CancellationToken,
    /// Set when the forwarder has ended: the local end got its close or
    /// is gone (after eow, once the upstream channel is gone too).
    finished: CancellationToken,
    /// Set when we close the upstream channel ourselves. russh then drops
    /// everything the server still sends on it, including its close, so the
    /// pump must stop on this instead of waiting for a close that never comes.
    closing: CancellationToken,
}

impl Bridge {
    /// Wraps the write half of a freshly opened upstream channel.
    fn new(write: UpWrite, session: bool) -> Arc<Self> {
        Arc::new(Bridge {
            write,
            replies: Mutex::new(VecDeque::new()),
            session,
            eow: CancellationToken::new(),
            exited: CancellationToken::new(),
            upstream_gone: CancellationToken::new(),
            finished: CancellationToken::new(),
            closing: CancellationToken::new(),
        })
    }

    /// Whether this is a session channel.
    pub fn is_session(&self) -> bool {
        self.session
    }

    /// Whether the bridge is done with the local end: its close was
    /// delivered, or it is gone. Its channel id may then be reused by the
    /// local connection.
    pub fn is_finished(&self) -> bool {
        self.finished.is_cancelled()
    }

    /// Waits until [`Bridge::is_finished`].
    pub async fn finished(&self) {
        self.finished.cancelled().await
    }

    /// Sends a request upstream with want-reply and waits for the verdict:
    /// `false` when refused or when the channel died first.
    pub async fn request(&self, req: Request) -> bool {
        self.send_request(req).await.await.unwrap_or(false)
    }

    /// Sends a request upstream with want-reply and returns where its
    /// verdict will arrive, so several requests can be in flight at once
    /// (SSH answers them in order). The receiver yields an error if the
    /// channel died first.
    pub async fn send_request(&self, req: Request) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        self.replies.lock().unwrap().push_back(tx);
        let w = &self.write;
        let sent = match req {
            Request::Pty {
                term,
                cols,
                rows,
                pix_width,
                pix_height,
                modes,
            } => {
                w.request_pty(true, &term, cols, rows, pix_width, pix_height, &modes)
                    .await
            }
            Request::Shell => w.request_shell(true).await,
            Request::Exec(cmd) => w.exec(true, cmd).await,
            Request::Subsystem(name) => w.request_subsystem(true, name).await,
            Request::AgentForward => w.agent_forward(true).await,
        };
        if sent.is_err() {
            // Drop our sender: the receiver then reports the failure.
            self.replies.lock().unwrap().pop_back();
        }
        rx
    }

    /// The local client can take no more output (`eow@openssh.com`). sshd
    /// closes only the command's stdout then; russh cannot send that request
    /// upstream, so we come as close as we can: stdout is dropped, and the
    /// first stdout the command writes afterwards (where sshd would give it
    /// EPIPE) closes the channel, which ends `yes | head` promptly. A command
    /// that writes only stderr (a nohup'd server) lives on, as with sshd,
    /// even after the local client goes away: the upstream channel then
    /// stays open, its stdin ended, until the command exits (sshd, told of
    /// the close, keeps the channel's stderr until then too).
    pub fn output_closed(&self) {
        self.eow.cancel();
    }

    /// Whether the local client sent `eow@openssh.com`.
    pub fn is_output_closed(&self) -> bool {
        self.eow.is_cancelled()
    }

    /// Closes the upstream channel (once) and stops its pump.
    pub async fn close(&self) {
        if !self.closing.is_cancelled() {
            self.closing.cancel();
            let _ = self.write.close().await;
        }
    }

    /// Hands a reply to the oldest waiting request.
    fn reply(&self, ok: bool) {
        if let Some(tx) = self.replies.lock().unwrap().pop_front() {
            let _ = tx.send(ok);
        }
    }
}

/// Bridges a local end to an upstream channel until both are closed.
/// Returns the [`Bridge`] so the local end's handler can forward requests.
/// Called only by [`OpenChannel::bridge`].
fn spawn(
    local_in: impl LocalIn,
    local_out: impl LocalOut,
    upstream: impl Into<Upstream>,
    opts: Options,
    tasks: &TaskTracker,
) -> Arc<Bridge> {
    let Upstream {
        read: up_read,
        write: up_write,
    } = upstream.into();
    let bridge = Bridge::new(up_write, opts.session);
    let queue = Arc::new(SpillQueue::new());
    let meter = Arc::new(opts.meter);
    let meter_up = meter.clone();
    let span = tracing::debug_span!("channel", what = %opts.what);

    let pump_ctx = Pump {
        bridge: bridge.clone(),
        queue: queue.clone(),
        session: opts.session,
        stall_limit: opts.stall_limit,
        congestion: opts.congestion,
    };
    let hold = opts.hold;
    let gone = bridge.upstream_gone.clone();
    tasks.spawn(
        async move {
            pump_ctx.run(up_read).await;
            gone.cancel();
            // The upstream channel is gone: it no longer loads its connection.
            drop(hold);
        }
        .instrument(span.clone()),
    );
    let b = bridge.clone();
    tasks.spawn(
        async move {
            forwarder(local_out, queue, b.clone(), meter.clone()).await;
            b.finished.cancel();
        }
        .instrument(span.clone()),
    );
    tasks.spawn(uplink(local_in, bridge.clone(), meter_up).instrument(span));
    bridge
}

/// Forwarder: queue -> local end, at the local reader's pace. When the
/// local end is gone the remote command ends too, unless the client said
/// `eow@openssh.com` first (see [`Bridge::output_closed`]).
async fn forwarder(
    mut out: impl LocalOut,
    q: Arc<SpillQueue>,
    b: Arc<Bridge>,
    meter: Arc<ChannelMeter>,
) {
    let mut gone = false;
    loop {
        let ev = match q.pop().await {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!("reading buffered data failed: {e}");
                break;
            }
        };
        let last = matches!(ev, Event::Close);
        let output = match &ev {
            Event::Data(d) => Some((None, d.len())),
            Event::Ext(e, d) => Some((Some(*e), d.len())),
            _ => None,
        };
        match ev {
            // The client discards stdout after eow@openssh.com and stops
            // granting window for it: never wait on it.
            Event::Data(_) if b.eow.is_cancelled() => {}
            _ if gone => {}
            Event::Data(d) => {
                meter.add_in(d.len());
                let sent = tokio::select! {
                    r = out.send(Event::Data(d)) => r,
                    _ = b.eow.cancelled() => Ok(()),
                };
                gone = sent.is_err();
            }
            ev => gone = out.send(ev).await.is_err(),
        }
        if let Some((ext, n)) = output {
            b.write.taken(ext, n);
        }
        if last {
            return;
        }
        if gone && !b.eow.is_cancelled() {
            break;
        }
    }
    // Local end gone: stop buffering and end the remote command at once.
    q.close_reader();
    b.close().await;
}

/// Uplink: local end -> upstream, at the upstream's pace.
async fn uplink(mut input: impl LocalIn, b: Arc<Bridge>, meter: Arc<ChannelMeter>) {
    let mut eof_sent = false;
    loop {
        let msg = tokio::select! {
            m = input.recv() => m,
            // We delivered the local close: russh passes on no answer to a
            // close we sent first, so stop here or wait (and count the
            // channel as open) for as long as the local connection lasts.
            _ = b.finished.cancelled() => None,
        };
        let Some(msg) = msg else { break };
        let ok = match msg {
            Input::Data(data) => {
                meter.add_out(data.len());
                b.write.data_bytes(data).await.is_ok()
            }
            Input::Ext(ext, data) => b.write.extended_data_bytes(ext, data).await.is_ok(),
            Input::Eof => {
                eof_sent = true;
                b.write.eof().await.is_ok()
            }
        };
        if !ok {
            break;
        }
    }
    if b.eow.is_cancelled() {
        // After eow the local client's going away is not the command's
        // end: sshd keeps the channel, with the command's stderr open,
        // while the command runs, and drops it when the command exits.
        tracing::debug!("local end gone after eow: the remote command keeps running");
        if !eof_sent {
            let _ = b.write.eof().await;
        }
        tokio::select! {
            _ = b.exited.cancelled() => {}
            _ = b.upstream_gone.cancelled() => return,
        }
        tracing::debug!("the remote command exited after eow: closing the channel");
    }
    b.close().await;
}

/// The pump's state.
struct Pump {
    /// The channel.
    bridge: Arc<Bridge>,
    /// Where upstream events wait for the local reader.
    queue: Arc<SpillQueue>,
    /// Session channels are told when the connection is lost.
    session: bool,
    /// See [`Options::stall_limit`].
    stall_limit: Duration,
    /// See [`Options::congestion`].
    congestion: Option<Arc<AtomicUsize>>,
}

impl Pump {
    /// Drains an upstream channel into the queue as fast as it delivers,
    /// routing request replies. Ends with a `Close` event.
    async fn run(self, mut up_read: UpRead) {
        let (u, q) = (&self.bridge, &self.queue);
        let mut overflowed = false;
        loop {
            let msg = tokio::select! {
                m = up_read.wait() => m,
                _ = u.closing.cancelled() => None,
            };
            let Some(msg) = msg else {
                // No Close from the server and not closed by us: the whole
                // upstream connection went away under this channel.
                if self.session && !u.closing.is_cancelled() && !overflowed {
                    q.push_control(Event::Ext(
                        1,
                        "sshshim: the upstream connection was lost; this session has ended\r\n"
                            .into(),
                    ));
                }
                break;
            };
            let ev = match msg {
                ChannelMsg::Data { .. } if u.eow.is_cancelled() => {
                    // Where sshd would answer this write with EPIPE.
                    tracing::debug!("stdout after eow@openssh.com: closing the channel");
                    u.close().await;
                    continue;
                }
                ChannelMsg::Data { data } => Event::Data(data),
                ChannelMsg::ExtendedData { ext, data } => Event::Ext(ext, data),
                ChannelMsg::Eof => Event::Eof,
                ChannelMsg::ExitStatus { exit_status } => {
                    u.exited.cancel();
                    Event::ExitStatus(exit_status)
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    u.exited.cancel();
                    Event::ExitSignal {
                        signal: signal_name,
                        core_dumped,
                        message: error_message,
                        lang: lang_tag,
                    }
                }
                ChannelMsg::Success => {
                    u.reply(true);
                    continue;
                }
                ChannelMsg::Failure => {
                    u.reply(false);
                    continue;
                }
                ChannelMsg::Close => break,
                _ => continue,
            };
            if overflowed {
                continue;
            }
            if let Err(e) = self.push_or_wait(ev).await {
                // The local reader stopped for good (or the disk failed): end
                // this channel rather than hold the connection or disk for it.
                let why = match e {
                    PushError::Full(_) => format!(
                        "the local reader stopped reading: nothing taken for {}s with {} MiB \
                         buffered (sshshim --stall-limit)",
                        self.stall_limit.as_secs_f32(),
                        spill::channel_disk() >> 20
                    ),
                    PushError::Io(e) => format!("cannot buffer for a slow reader: {e}"),
                };
                tracing::warn!("closing channel: {why}");
                q.push_control(Event::Ext(
                    1,
                    format!("\r\nsshshim: channel closed: {why}\r\n").into(),
                ));
                q.push_control(Event::Close);
                overflowed = true;
                u.close().await;
            }
        }
        tracing::trace!("upstream channel closed");
        // Wake any request still waiting: the channel is gone.
        u.replies.lock().unwrap().clear();
        q.push_control(Event::Close);
    }

    /// Queues `ev`; when the channel's buffer is full, waits for the local
    /// reader to take something and tries again. That wait is backpressure:
    /// a slow download gets through at the reader's pace instead of being cut
    /// off. While the pump waits here the shared upstream connection waits
    /// too (russh reads no further until this channel takes its message), so
    /// the connection is marked congested meanwhile. Fails with `Full` only
    /// if the reader makes no progress for the stall limit.
    async fn push_or_wait(&self, mut ev: Event) -> Result<(), PushError> {
        loop {
            match self.queue.push(ev) {
                Err(PushError::Full(back)) => {
                    tracing::debug!("channel buffer full: waiting for the local reader");
                    let _congested = self.congestion.as_ref().map(|c| Congested::new(c.clone()));
                    if tokio::time::timeout(self.stall_limit, self.queue.progressed())
                        .await
                        .is_err()
                    {
                        return Err(PushError::Full(back));
                    }
                    ev = back;
                }
                done => return done,
            }
        }
    }
}

/// Marks a connection congested while alive.
struct Congested(Arc<AtomicUsize>);

impl Congested {
    /// Counts one waiting pump.
    fn new(c: Arc<AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Congested(c)
    }
}

impl Drop for Congested {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

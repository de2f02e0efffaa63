//! Forwarded TCP connections that survive the network (issue 24), on
//! sshshim's side.
//!
//! One helper per sshshim process, started on the first resumable
//! forwarded connection (`remote-helper start` with [`Command::Forwards`]),
//! carries every forwarded connection over its one channel: the
//! [`Mux`] task owns that attachment, numbers the connections, writes the
//! frames of all of them (one writer, taking turns, so a bulk upload does
//! not starve the others) and hands each connection the frames the helper
//! sends it. When the channel is lost it waits for the reconnect, attaches
//! again and resumes each connection where it stopped; the helper holds
//! the target connections meanwhile.
//!
//! To the bridge a connection looks like any upstream channel:
//! [`ConnRead`] yields data, EOF and close, [`ConnWrite`] takes data, EOF
//! and close. Input waits for credits (what may be kept for replay), so
//! the mux's queue stays bounded; output is acknowledged once the bridge
//! took it, so the helper's buffer bounds what waits here.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use russh::ChannelMsg;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::session::{ATTACH_TIMEOUT, AttachErr, Attachment, HelloErr, attach, short};
use super::wire::{self, Command, Frame, Inbox, Outbox, Secret, Stream};
use super::{Helper, Resume};
use crate::upstream::Open;

/// How long consumed output may wait for its acknowledgement.
const ACK_DELAY: Duration = Duration::from_millis(20);

/// Output consumed unacknowledged (per connection) that is acknowledged at once.
const ACK_EVERY: u64 = 256 * 1024;

/// Frames the mux writes before it looks at what arrived again.
const TURN: usize = 16;

/// How long a connection's last word (`Done`, `Hangup`) is kept, to be
/// said again after a reconnect: it may have been lost with a channel that
/// looked alive (a blackhole is noticed only after the keepalives).
const LAST_WORD_KEEP: Duration = Duration::from_secs(120);

/// What the local ends and [`Resume`] ask of the mux.
pub(super) enum Msg {
    /// Open a connection to `host:port` on the server.
    Open {
        /// Target host, as the client asked.
        host: String,
        /// Target port.
        port: u32,
        /// Where the answer goes.
        reply: oneshot::Sender<Opened>,
    },
    /// Bytes for the target (credits already taken).
    Data(u32, Bytes),
    /// The local client will send no more.
    Eof(u32),
    /// The local end is gone.
    Close(u32),
    /// The local end took output: time to acknowledge it.
    Consumed(u32),
}

/// The answer to an open.
pub enum Opened {
    /// The helper connected to the target.
    Open(ConnRead, ConnWrite),
    /// The helper could not connect: the channel-open failure sshd gives.
    Failed {
        /// The SSH reason code.
        code: u32,
        /// The helper's words.
        reason: String,
    },
    /// The forwards helper cannot take it now (or at all): open it as a
    /// plain `direct-tcpip` channel.
    Plain,
}

/// Counts for status, shared by the mux and [`Resume`].
#[derive(Default)]
pub(super) struct Counts {
    /// Connections the helper carries.
    pub(super) conns: AtomicUsize,
    /// Whether the helper's channel is there (else it holds them, waiting).
    pub(super) attached: AtomicBool,
}

/// The read side of a forwarded connection: what the target sent.
pub struct ConnRead {
    /// From the mux.
    rx: mpsc::UnboundedReceiver<ChannelMsg>,
}

impl ConnRead {
    /// The next message; `None` once the connection is gone.
    pub async fn wait(&mut self) -> Option<ChannelMsg> {
        self.rx.recv().await
    }
}

/// The write side: what the local client sends to the target.
pub struct ConnWrite {
    /// The connection's number.
    c: u32,
    /// To the mux.
    tx: mpsc::UnboundedSender<Msg>,
    /// Bytes of input that may be kept for replay.
    credits: Arc<Semaphore>,
    /// Output the local end took (what is acknowledged).
    consumed: Arc<AtomicU64>,
    /// Set while input waits for credits: output is then acknowledged as
    /// it arrives (see `take_credits` for the cycle this breaks).
    input_waits: Arc<AtomicBool>,
}

/// The connection is gone.
#[derive(Debug)]
pub struct Gone;

impl ConnWrite {
    /// Data for the target; waits while the replay buffer is full.
    pub async fn data(&self, mut data: Bytes) -> Result<(), Gone> {
        while !data.is_empty() {
            let n = data.len().min(super::BUFFER as usize);
            let part = data.split_to(n);
            super::take_credits(&self.credits, n as u32, &self.input_waits, || {
                let _ = self.tx.send(Msg::Consumed(self.c));
            })
            .await
            .map_err(|_| Gone)?;
            self.tx.send(Msg::Data(self.c, part)).map_err(|_| Gone)?;
        }
        Ok(())
    }

    /// The local end took `n` bytes of output (or dropped them): the
    /// helper may forget them.
    pub fn taken(&self, n: usize) {
        self.consumed.fetch_add(n as u64, Ordering::Relaxed);
        let _ = self.tx.send(Msg::Consumed(self.c));
    }

    /// The local client sends no more (half-close).
    pub fn eof(&self) -> Result<(), Gone> {
        self.tx.send(Msg::Eof(self.c)).map_err(|_| Gone)
    }

    /// The local end is gone: the helper closes the target connection.
    pub fn close(&self) {
        let _ = self.tx.send(Msg::Close(self.c));
        self.credits.close();
    }
}

impl Drop for ConnWrite {
    fn drop(&mut self) {
        // However the bridge ends, the helper must not hold the target.
        self.close();
    }
}

/// Why the forwards helper did not start.
pub(super) struct StartErr {
    /// In words.
    pub(super) why: String,
    /// Worth trying again with the next connection (the upstream failed
    /// meanwhile), rather than a verdict about the server.
    pub(super) transient: bool,
}

/// Starts the forwards helper on a new channel; the mux runs until the
/// helper is gone for good.
pub(super) async fn start(
    resume: Arc<Resume>,
    helper: Arc<Helper>,
    counts: Arc<Counts>,
) -> Result<mpsc::UnboundedSender<Msg>, StartErr> {
    let transient = |why: String| StartErr {
        why,
        transient: true,
    };
    let opened = resume
        .pool
        .open(Open::Session)
        .await
        .map_err(|e| transient(e.to_string()))?;
    let mut att = Attachment::new(opened.channel, Box::new(opened.load));
    let secret = Secret::random();
    let id = match tokio::time::timeout(ATTACH_TIMEOUT, launch(&mut att, &resume, &helper, &secret))
        .await
    {
        Ok(r) => r?,
        Err(_) => return Err(transient("the helper did not answer in time".into())),
    };
    tracing::info!(
        "forwarded connections are resumable: helper {} carries them",
        short(&id)
    );
    let (tx, rx) = mpsc::unbounded_channel();
    counts.attached.store(true, Ordering::Relaxed);
    let mux = Mux {
        resume,
        helper,
        secret,
        id,
        tx: tx.clone(),
        rx,
        conns: HashMap::new(),
        next: 1,
        ready: VecDeque::new(),
        acks: Vec::new(),
        last_words: VecDeque::new(),
        counts,
    };
    tokio::spawn(mux.run(att));
    Ok(tx)
}

/// Runs `remote-helper start` with [`Command::Forwards`] on `att`.
async fn launch(
    att: &mut Attachment,
    resume: &Resume,
    helper: &Helper,
    secret: &Secret,
) -> Result<wire::SessionId, StartErr> {
    let broken = |why: String| StartErr {
        why,
        transient: true,
    };
    let verdict = |why: String| StartErr {
        why,
        transient: false,
    };
    att.wr
        .exec(true, helper.command("start"))
        .await
        .map_err(|e| broken(e.to_string()))?;
    // Sent at once: it waits in the channel until the helper reads it.
    let spec = wire::StartSpec {
        secret: secret.clone(),
        owner: resume.owner,
        run: resume.run,
        command: Command::Forwards,
        pty: None,
        timeout_secs: resume.settings.timeout.as_secs().min(u32::MAX as u64) as u32,
        buffer: super::BUFFER,
    };
    att.send(&Frame::Start(Box::new(spec)))
        .await
        .map_err(|e| broken(e.to_string()))?;
    let id = match att.hello().await {
        Ok((id, true)) => id,
        Ok(_) => return Err(verdict("the helper did not start a new session".into())),
        Err(HelloErr::Refused(why)) => return Err(verdict(why)),
        Err(HelloErr::Broken(why)) => return Err(broken(why)),
    };
    match att.next().await {
        Ok(Some(Frame::Started)) => Ok(id),
        Ok(Some(Frame::Refused(why))) => Err(verdict(why)),
        Ok(None) => Err(broken("the helper's channel closed".into())),
        Ok(Some(other)) => Err(verdict(format!("unexpected answer {other:?}"))),
        Err(e) => Err(verdict(e.to_string())),
    }
}

/// One forwarded connection, as the mux keeps it.
struct Conn {
    /// Until the helper answered the `Connect`: where the answer goes.
    opening: Option<oneshot::Sender<Opened>>,
    /// The target, for a `Connect` sent again.
    target: (String, u32),
    /// To its [`ConnRead`].
    out: mpsc::UnboundedSender<ChannelMsg>,
    /// Taken by [`ConnRead`] once open.
    rx: Option<mpsc::UnboundedReceiver<ChannelMsg>>,
    /// Input, kept until acknowledged.
    input: Outbox,
    /// Output received.
    output: Inbox,
    /// Output the local end took (what is acknowledged).
    consumed: Arc<AtomicU64>,
    /// See [`ConnWrite::input_waits`].
    input_waits: Arc<AtomicBool>,
    /// Output acknowledged so far.
    acked: u64,
    /// Where the output ends, once the helper said.
    eof_at: Option<u64>,
    /// The EOF went to the local end.
    eof_emitted: bool,
    /// The input's EOF went out on this attachment.
    eof_sent: bool,
    /// Freed as the helper acknowledges input.
    credits: Arc<Semaphore>,
    /// The local end is gone: hang up once the input went out.
    hangup: bool,
    /// Whether the input's position holds on this attachment (after
    /// reattaching, only once the helper said where it got to).
    synced: bool,
    /// In the mux's `ready` queue.
    queued: bool,
    /// In the mux's `acks` list.
    ack_queued: bool,
}

impl Conn {
    /// A connection being opened.
    fn new(host: String, port: u32, reply: oneshot::Sender<Opened>) -> Conn {
        let (out, rx) = mpsc::unbounded_channel();
        Conn {
            opening: Some(reply),
            target: (host, port),
            out,
            rx: Some(rx),
            input: Outbox::default(),
            output: Inbox::default(),
            consumed: Arc::default(),
            input_waits: Arc::default(),
            acked: 0,
            eof_at: None,
            eof_emitted: false,
            eof_sent: false,
            credits: Arc::new(Semaphore::new(super::BUFFER as usize)),
            hangup: false,
            synced: true,
            queued: false,
            ack_queued: false,
        }
    }

    /// Passes the EOF on once all the output arrived.
    fn emit_eof(&mut self) {
        if !self.eof_emitted && self.eof_at == Some(self.output.have) {
            self.eof_emitted = true;
            let _ = self.out.send(ChannelMsg::Eof);
        }
    }

    /// Ends the local side: EOF if not yet sent, then close.
    fn finish(&mut self) {
        if !self.eof_emitted {
            self.eof_emitted = true;
            let _ = self.out.send(ChannelMsg::Eof);
        }
        let _ = self.out.send(ChannelMsg::Close);
        self.credits.close();
    }
}

/// How an attachment ended.
enum Ended {
    /// The helper is gone or broke the protocol: nothing to resume.
    Over,
    /// The channel went away: reattach.
    Lost,
}

/// The task that owns the forwards helper's attachment.
struct Mux {
    /// The profile's resumable work.
    resume: Arc<Resume>,
    /// The helper.
    helper: Arc<Helper>,
    /// Proves this sshshim started the helper.
    secret: Secret,
    /// The helper's session.
    id: wire::SessionId,
    /// Handed to each connection's ends.
    tx: mpsc::UnboundedSender<Msg>,
    /// From the ends.
    rx: mpsc::UnboundedReceiver<Msg>,
    /// Live connections by number.
    conns: HashMap<u32, Conn>,
    /// The next connection's number.
    next: u32,
    /// Connections with something to write, in turn.
    ready: VecDeque<u32>,
    /// Connections with consumed output to acknowledge.
    acks: Vec<u32>,
    /// Connections ended lately, with their last frame (see [`LAST_WORD_KEEP`]).
    last_words: VecDeque<(u32, bool, Instant)>,
    /// For status.
    counts: Arc<Counts>,
}

/// A frame for connection `c`.
fn conn(c: u32, frame: Frame) -> Frame {
    Frame::Conn {
        conn: c,
        frame: Box::new(frame),
    }
}

impl Mux {
    /// Carries the connections until the helper is gone for good.
    async fn run(mut self, mut att: Attachment) {
        loop {
            let ended = self.attached(&mut att).await;
            drop(att);
            self.counts.attached.store(false, Ordering::Relaxed);
            if let Ended::Over = ended {
                break;
            }
            match self.reattach().await {
                Some(a) => att = a,
                None => break,
            }
            self.counts.attached.store(true, Ordering::Relaxed);
        }
        for (_, mut c) in self.conns.drain() {
            match c.opening.take() {
                Some(reply) => {
                    let _ = reply.send(Opened::Plain);
                }
                None => c.finish(),
            }
        }
        self.counts.conns.store(0, Ordering::Relaxed);
    }

    /// Runs the connections on an attachment until it is lost or the
    /// helper is gone.
    async fn attached(&mut self, att: &mut Attachment) -> Ended {
        let mut ack_at: Option<tokio::time::Instant> = None;
        loop {
            self.counts.conns.store(self.conns.len(), Ordering::Relaxed);
            if self.write_turn(att).await.is_err() {
                return Ended::Lost;
            }
            let more = !self.ready.is_empty();
            let ack_due = async move {
                match ack_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let sent = tokio::select! {
                m = self.rx.recv() => match m {
                    Some(m) => self.on_msg(m, att).await,
                    None => return Ended::Over,
                },
                f = att.next() => match f {
                    Ok(Some(f)) => match self.on_frame(f, att).await {
                        Some(ended) => return ended,
                        None => Ok(()),
                    },
                    Ok(None) => return Ended::Lost,
                    Err(e) => {
                        tracing::warn!("forwarded connections: protocol error: {e}");
                        return Ended::Over;
                    }
                },
                () = ack_due => {
                    ack_at = None;
                    self.send_acks(att, 0).await
                }
                () = async {}, if more => Ok(()),
            };
            if sent.is_err() {
                return Ended::Lost;
            }
            if self.send_acks(att, ACK_EVERY).await.is_err() {
                return Ended::Lost;
            }
            if !self.acks.is_empty() && ack_at.is_none() {
                ack_at = Some(tokio::time::Instant::now() + ACK_DELAY);
            }
        }
    }

    /// Writes up to [`TURN`] frames, one connection after another, in one
    /// write (a frame is a little over an SSH packet: written one by one,
    /// each would cost a packet of its own for its last bytes).
    async fn write_turn(&mut self, att: &Attachment) -> Result<(), russh::Error> {
        let mut out = BytesMut::new();
        let mut budget = TURN;
        while budget > 0
            && let Some(c) = self.ready.pop_front()
        {
            let Some(k) = self.conns.get_mut(&c) else {
                continue;
            };
            k.queued = false;
            if !k.synced {
                continue;
            }
            if let Some((offset, data)) = k.input.next_chunk() {
                budget -= 1;
                let f = Frame::Data {
                    stream: Stream::Stdin,
                    offset,
                    data,
                };
                k.queued = true;
                self.ready.push_back(c);
                conn(c, f).encode(&mut out);
                continue;
            }
            if k.input.eof_due() && !k.eof_sent {
                k.eof_sent = true;
                budget -= 1;
                let at = k.input.end();
                let eof = Frame::Eof {
                    stream: Stream::Stdin,
                    at,
                };
                conn(c, eof).encode(&mut out);
            }
            if k.hangup && k.opening.is_none() {
                budget -= 1;
                self.last_word(c, false).encode(&mut out);
            }
        }
        if out.is_empty() {
            return Ok(());
        }
        att.send_bytes(out.freeze()).await
    }

    /// Forgets connection `c` and returns its last frame, `Done` (all of
    /// it arrived) or `Hangup` (the local end is gone), kept a while to be
    /// said again after a reconnect.
    fn last_word(&mut self, c: u32, done: bool) -> Frame {
        self.conns.remove(&c);
        let now = Instant::now();
        while self
            .last_words
            .front()
            .is_some_and(|(_, _, t)| now.duration_since(*t) > LAST_WORD_KEEP)
        {
            self.last_words.pop_front();
        }
        self.last_words.push_back((c, done, now));
        conn(c, if done { Frame::Done } else { Frame::Hangup })
    }

    /// Queues connection `c` for a write turn.
    fn wake(&mut self, c: u32) {
        if let Some(k) = self.conns.get_mut(&c)
            && !k.queued
        {
            k.queued = true;
            self.ready.push_back(c);
        }
    }

    /// Lists connection `c` for an acknowledgement.
    fn want_ack(&mut self, c: u32) {
        if let Some(k) = self.conns.get_mut(&c)
            && !k.ack_queued
        {
            k.ack_queued = true;
            self.acks.push(c);
        }
    }

    /// A message from a local end (or an open) while attached.
    async fn on_msg(&mut self, m: Msg, att: &Attachment) -> Result<(), russh::Error> {
        match m {
            Msg::Open { host, port, reply } => {
                let c = self.next;
                self.next = self.next.wrapping_add(1).max(1);
                let f = conn(
                    c,
                    Frame::Connect {
                        host: host.clone(),
                        port,
                    },
                );
                self.conns.insert(c, Conn::new(host, port, reply));
                return att.send(&f).await;
            }
            m => self.keep(m),
        }
        Ok(())
    }

    /// Takes a local end's data, EOF, close or consumption into its
    /// connection's state (to be written on the next turn).
    fn keep(&mut self, m: Msg) {
        let (c, k) = match &m {
            Msg::Data(c, _) | Msg::Eof(c) | Msg::Close(c) | Msg::Consumed(c) => {
                match self.conns.get_mut(c) {
                    Some(k) => (*c, k),
                    None => return,
                }
            }
            Msg::Open { .. } => return,
        };
        match m {
            Msg::Data(_, d) => k.input.push(d),
            Msg::Eof(_) => k.input.close(),
            Msg::Close(_) => k.hangup = true,
            Msg::Consumed(_) => {
                self.want_ack(c);
                return;
            }
            Msg::Open { .. } => {}
        }
        self.wake(c);
    }

    /// Acknowledges consumed output of connections with at least `min`
    /// bytes unacknowledged.
    async fn send_acks(&mut self, att: &Attachment, min: u64) -> Result<(), russh::Error> {
        let mut i = 0;
        while i < self.acks.len() {
            let c = self.acks[i];
            let Some(k) = self.conns.get_mut(&c) else {
                self.acks.swap_remove(i);
                continue;
            };
            let upto = if k.input_waits.load(Ordering::Relaxed) {
                k.output.have
            } else {
                k.consumed.load(Ordering::Relaxed)
            };
            if upto > k.acked && upto - k.acked >= min.max(1) {
                k.acked = upto;
                k.ack_queued = false;
                self.acks.swap_remove(i);
                att.send(&conn(
                    c,
                    Frame::Ack {
                        stream: Stream::Stdout,
                        upto,
                    },
                ))
                .await?;
            } else if upto <= k.acked {
                k.ack_queued = false;
                self.acks.swap_remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// A frame from the helper; `Some` when the attachment ends.
    async fn on_frame(&mut self, f: Frame, att: &Attachment) -> Option<Ended> {
        let (c, f) = match f {
            Frame::Conn { conn, frame } => (conn, *frame),
            Frame::Refused(why) => {
                tracing::warn!(
                    "forwarded connections: the helper ended: {}",
                    crate::term::clean(&why)
                );
                return Some(Ended::Over);
            }
            _ => return None,
        };
        let k = self.conns.get_mut(&c)?;
        let protocol = |e: wire::WireError| {
            tracing::warn!("forwarded connections: protocol error: {e}");
            Some(Ended::Over)
        };
        match f {
            Frame::Data {
                stream: Stream::Stdout,
                offset,
                data,
            } => match k.output.accept(offset, data) {
                Ok(new) if !new.is_empty() => {
                    let _ = k.out.send(ChannelMsg::Data { data: new });
                    if k.input_waits.load(Ordering::Relaxed) {
                        self.want_ack(c);
                    }
                }
                Ok(_) => {}
                Err(e) => return protocol(e),
            },
            Frame::Ack {
                stream: Stream::Stdin,
                upto,
            } => {
                let before = k.input.buffered();
                if let Err(e) = k.input.ack(upto) {
                    return protocol(e);
                }
                k.credits.add_permits(before - k.input.buffered());
            }
            Frame::Eof {
                stream: Stream::Stdout,
                at,
            } => {
                k.eof_at = Some(at);
                k.emit_eof();
            }
            Frame::Resumed { have_in } => {
                let before = k.input.buffered();
                if let Err(e) = k.input.rewind(have_in) {
                    return protocol(e);
                }
                k.credits.add_permits(before - k.input.buffered());
                k.synced = true;
                self.wake(c);
            }
            f => return self.on_conn_state(c, f, att).await,
        }
        None
    }

    /// A connection's open, failure, close or refusal.
    async fn on_conn_state(&mut self, c: u32, f: Frame, att: &Attachment) -> Option<Ended> {
        let k = self.conns.get_mut(&c)?;
        match f {
            Frame::Started => {
                let (Some(reply), Some(rx)) = (k.opening.take(), k.rx.take()) else {
                    return None;
                };
                let read = ConnRead { rx };
                let write = ConnWrite {
                    c,
                    tx: self.tx.clone(),
                    credits: k.credits.clone(),
                    consumed: k.consumed.clone(),
                    input_waits: k.input_waits.clone(),
                };
                // An opener that gave up drops the ends, which hangs up.
                let _ = reply.send(Opened::Open(read, write));
            }
            Frame::OpenFailed { code, reason } => {
                if let Some(mut k) = self.conns.remove(&c)
                    && let Some(reply) = k.opening.take()
                {
                    let _ = reply.send(Opened::Failed { code, reason });
                }
            }
            Frame::Closed => {
                k.finish();
                if att.send(&self.last_word(c, true)).await.is_err() {
                    return Some(Ended::Lost);
                }
            }
            Frame::Refused(why) if k.opening.is_some() => {
                // The helper never got the Connect (lost with the channel).
                tracing::debug!(
                    "connection {c}: {}; connecting again",
                    crate::term::clean(&why)
                );
                let (host, port) = k.target.clone();
                k.synced = true;
                if att
                    .send(&conn(c, Frame::Connect { host, port }))
                    .await
                    .is_err()
                {
                    return Some(Ended::Lost);
                }
            }
            Frame::Refused(why) => {
                tracing::info!(
                    "forwarded connection {c} could not be resumed: {}",
                    crate::term::clean(&why)
                );
                k.finish();
                self.conns.remove(&c);
            }
            _ => {}
        }
        None
    }

    /// Waits for the upstream and attaches to the helper again, resuming
    /// every connection; `None` when the helper is gone for good.
    async fn reattach(&mut self) -> Option<Attachment> {
        let lost_at = Instant::now();
        let timeout = self.resume.settings.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        tracing::info!(
            "forwarded connections: the upstream connection was lost; the server holds {} \
             connection(s) (up to {}s)",
            self.conns.len(),
            timeout.as_secs()
        );
        let mut att = loop {
            let attempt = attach(
                self.resume.clone(),
                self.helper.clone(),
                self.id,
                self.secret.clone(),
                0,
                0,
            );
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = tokio::time::timeout_at(deadline, &mut attempt) => break r,
                    m = self.rx.recv() => self.while_detached(m),
                }
            };
            match result {
                Err(_) => {
                    tracing::warn!(
                        "forwarded connections ended: they were held for {}s (--resume-timeout)",
                        timeout.as_secs()
                    );
                    return None;
                }
                Ok(Ok((att, _))) => break att,
                Ok(Err(AttachErr::Gone(why))) => {
                    tracing::warn!("forwarded connections ended: {}", crate::term::clean(&why));
                    return None;
                }
                Ok(Err(AttachErr::Retry(why))) => {
                    tracing::debug!("resuming forwarded connections: {why}");
                    let pause = tokio::time::sleep(Duration::from_secs(1));
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            () = &mut pause => break,
                            m = self.rx.recv() => self.while_detached(m),
                        }
                    }
                }
            }
        };
        if self.resume_conns(&mut att).await.is_err() {
            // Lost again at once: the next round reattaches.
            tracing::debug!("forwarded connections: lost again while resuming");
        }
        tracing::info!(
            "forwarded connections resumed after {:.1}s",
            lost_at.elapsed().as_secs_f64()
        );
        Some(att)
    }

    /// Asks the helper for each connection where it got to, and hangs up
    /// those whose local end went away meanwhile.
    async fn resume_conns(&mut self, att: &mut Attachment) -> Result<(), russh::Error> {
        // Said again: the helper ignores them for connections it forgot.
        for (c, done, _) in std::mem::take(&mut self.last_words) {
            att.send(&self.last_word(c, done)).await?;
        }
        let nums: Vec<u32> = self.conns.keys().copied().collect();
        for c in nums {
            let Some(k) = self.conns.get_mut(&c) else {
                continue;
            };
            k.synced = false;
            k.eof_sent = false;
            if k.hangup && k.opening.is_none() {
                att.send(&self.last_word(c, false)).await?;
                continue;
            }
            let f = Frame::Resume {
                secret: self.secret.clone(),
                have_out: k.output.have,
                have_err: 0,
            };
            if k.consumed.load(Ordering::Relaxed) > k.acked || k.input_waits.load(Ordering::Relaxed)
            {
                self.want_ack(c);
            }
            att.send(&conn(c, f)).await?;
        }
        Ok(())
    }

    /// A message while detached: kept for the next attachment; a new
    /// connection goes the plain way (no waiting here for the upstream).
    fn while_detached(&mut self, m: Option<Msg>) {
        match m {
            Some(Msg::Open { reply, .. }) => {
                let _ = reply.send(Opened::Plain);
            }
            Some(m) => self.keep(m),
            None => {}
        }
    }
}

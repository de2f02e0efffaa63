//! One resumable session on sshshim's side.
//!
//! The bridge sees it as an upstream channel: [`SessionWrite`] takes what
//! the local client sends (data, EOF, requests, window changes, signals),
//! [`SessionRead`] yields what a server channel would (data, EOF, exit
//! status, close, request replies). Behind them a task runs the session
//! on the remote helper over one upstream channel after another: when the
//! connection drops it waits for the reconnect, attaches to the helper
//! again, and both sides replay what the other has not acknowledged.
//!
//! Until the client asks for a command, requests go to the channel opened
//! for the session (environment, agent), except the pty, which the helper
//! allocates itself so that sshd's hang-up of a dead session never reaches
//! the command.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use russh::{ChannelMsg, ChannelWriteHalf, Sig, client};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::wire::{self, Command, Exit, Frame, Inbox, Outbox, PtySpec, Secret, Stream};
use super::{HeldGuard, HeldStatus, Helper, Resume, hex, unix_now};
use crate::upstream::Open;

/// How long received output may wait for its acknowledgement when no more
/// arrives (acknowledgements free the helper's buffer).
const ACK_DELAY: Duration = Duration::from_millis(20);

/// How long the helper may take to end the channel after the last frame.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// Output taken by the local side and not yet acknowledged that triggers
/// an acknowledgement at once (a quarter of the helper's window, so it
/// never waits for the timer while the local reader keeps up).
const ACK_EVERY: u64 = wire::WINDOW / 4;

/// The longest spec passed on the helper's command line (Linux takes at
/// most 128 KiB per argument); a longer one goes in the `Start` frame.
const MAX_SPEC_ARG: usize = 64 * 1024;

/// What the local side asks of the session.
enum Cmd {
    /// Stdin bytes (credits already taken).
    Data(Bytes),
    /// Stdin ends.
    Eof,
    /// `pty-req`.
    Pty(PtySpec),
    /// `env` (no reply).
    Env(String, String),
    /// `auth-agent-req@openssh.com`.
    Agent,
    /// `shell`, `exec` or `subsystem`.
    Command(Command),
    /// `window-change`.
    Window(u32, u32, u32, u32),
    /// `signal`.
    Signal(String),
}

/// The write side of a resumable session (see the module docs).
pub struct SessionWrite {
    /// To the task; dropped (closed) when the local side closes.
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<Cmd>>>,
    /// Bytes of input that may be buffered for replay.
    credits: Arc<Semaphore>,
    /// What the local side took, for the task's acknowledgements.
    flow: Arc<Flow>,
}

/// How far the local side got, shared with the task. Output is
/// acknowledged to the helper once the local client took it, so a slow
/// reader slows the command (as with sshd) instead of piling output up
/// in sshshim. One exception breaks the cycle that would make: while the
/// local side's input waits for credits, a local endpoint reads nothing
/// else from that client's connection (its window adjustments included),
/// so the output it could take waits on input that waits on the command,
/// which waits on its output; then output is acknowledged on arrival.
#[derive(Default)]
struct Flow {
    /// Stdout and stderr bytes the local side took (or dropped).
    taken: [std::sync::atomic::AtomicU64; 2],
    /// Set while input waits for credits.
    input_waits: std::sync::atomic::AtomicBool,
    /// Wakes the task when either changes.
    wake: tokio::sync::Notify,
}

/// The read side: what the session yields, as a server channel would.
pub struct SessionRead {
    /// From the task.
    rx: mpsc::Receiver<ChannelMsg>,
}

impl SessionRead {
    /// The next message; `None` when the session is gone.
    pub async fn wait(&mut self) -> Option<ChannelMsg> {
        self.rx.recv().await
    }
}

/// The session's task went away (the session ended).
#[derive(Debug)]
pub struct Gone;

impl SessionWrite {
    /// Hands a command to the task.
    fn send(&self, c: Cmd) -> Result<(), Gone> {
        match &*self.tx.lock().unwrap() {
            Some(tx) => tx.send(c).map_err(|_| Gone),
            None => Err(Gone),
        }
    }

    /// Stdin data; waits while the replay buffer is full.
    pub async fn data(&self, mut data: Bytes) -> Result<(), Gone> {
        while !data.is_empty() {
            let n = data.len().min(super::BUFFER as usize);
            let part = data.split_to(n);
            super::take_credits(&self.credits, n as u32, &self.flow.input_waits, || {
                self.flow.wake.notify_one()
            })
            .await
            .map_err(|_| Gone)?;
            self.send(Cmd::Data(part))?;
        }
        Ok(())
    }

    /// The local side took `n` bytes of output (`ext` 1: stderr), or
    /// dropped them: the helper may forget them.
    pub fn taken(&self, ext: Option<u32>, n: usize) {
        let i = match ext {
            None => 0,
            Some(1) => 1,
            Some(_) => return,
        };
        self.flow.taken[i].fetch_add(n as u64, Ordering::Relaxed);
        self.flow.wake.notify_one();
    }

    /// Stdin ends.
    pub fn eof(&self) -> Result<(), Gone> {
        self.send(Cmd::Eof)
    }

    /// Ends the session (the local client is gone): the command is hung up.
    pub fn close(&self) {
        self.tx.lock().unwrap().take();
        self.credits.close();
    }

    /// `pty-req`.
    pub fn pty(&self, spec: PtySpec) -> Result<(), Gone> {
        self.send(Cmd::Pty(spec))
    }

    /// `env`.
    pub fn env(&self, name: &str, value: &str) -> Result<(), Gone> {
        self.send(Cmd::Env(name.to_owned(), value.to_owned()))
    }

    /// `auth-agent-req@openssh.com`.
    pub fn agent(&self) -> Result<(), Gone> {
        self.send(Cmd::Agent)
    }

    /// `shell`, `exec` or `subsystem`.
    pub fn command(&self, c: Command) -> Result<(), Gone> {
        self.send(Cmd::Command(c))
    }

    /// `window-change`.
    pub fn window(&self, cols: u32, rows: u32, px: u32, py: u32) -> Result<(), Gone> {
        self.send(Cmd::Window(cols, rows, px, py))
    }

    /// `signal`.
    pub fn signal(&self, sig: &Sig) -> Result<(), Gone> {
        self.send(Cmd::Signal(sig_name(sig)))
    }
}

/// The SSH name of a signal.
fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(c) => c,
    }
    .to_owned()
}

/// The signal of an SSH name.
fn sig_of(name: &str) -> Sig {
    match name {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        x => Sig::Custom(x.to_owned()),
    }
}

/// Starts a resumable session on a freshly opened session channel, with
/// the helper found on the server. The task runs until the session ends.
pub fn start(
    resume: Arc<Resume>,
    helper: Arc<Helper>,
    channel: russh::Channel<client::Msg>,
    hold: Box<dyn Send + Sync>,
) -> (SessionRead, SessionWrite) {
    let (tx, cmds) = mpsc::unbounded_channel();
    let (out, rx) = mpsc::channel(8);
    let credits = Arc::new(Semaphore::new(super::BUFFER as usize));
    let flow = Arc::new(Flow::default());
    let task = Task {
        flow: flow.clone(),
        resume,
        helper,
        cmds,
        out,
        credits: credits.clone(),
        secret: Secret::random(),
        session: None,
        input: Outbox::default(),
        stdout: Inbox::default(),
        stderr: Inbox::default(),
        eof_out: None,
        eof_err: None,
        eof_emitted: false,
        window: None,
        window_dirty: false,
        signals: Vec::new(),
        hangup: false,
        held: None,
        resumes: 0,
    };
    tokio::spawn(task.run(channel, hold));
    (
        SessionRead { rx },
        SessionWrite {
            tx: std::sync::Mutex::new(Some(tx)),
            credits,
            flow,
        },
    )
}

/// How an attachment ended.
enum Ended {
    /// The session is over (finished, hung up or refused): nothing to resume.
    Over,
    /// The upstream channel went away: wait for the reconnect and resume.
    Lost,
}

/// One upstream channel running the helper.
pub(super) struct Attachment {
    /// Its messages, read ahead by a task. Unbounded on purpose: russh
    /// stalls the whole connection (window adjustments included) while a
    /// channel's queue is full, so a write waiting for window must never
    /// also be what drains it. What arrives is bounded by the helper, which
    /// sends at most its buffer beyond what we acknowledged.
    msgs: mpsc::UnboundedReceiver<ChannelMsg>,
    /// Writes to it.
    pub(super) wr: ChannelWriteHalf<client::Msg>,
    /// Set when the channel is gone. russh's writes wait for window
    /// forever when the connection dies under them, so every write races it.
    lost: CancellationToken,
    /// The reading task.
    reader: tokio::task::JoinHandle<()>,
    /// Counts it on its connection.
    _load: Box<dyn Send + Sync>,
    /// Bytes received and not yet decoded.
    buf: BytesMut,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Attachment {
    /// Takes over a freshly opened channel.
    pub(super) fn new(
        channel: russh::Channel<client::Msg>,
        load: Box<dyn Send + Sync>,
    ) -> Attachment {
        let (mut rd, wr) = channel.split();
        let (tx, msgs) = mpsc::unbounded_channel();
        let lost = CancellationToken::new();
        let gone = lost.clone();
        let reader = tokio::spawn(async move {
            while let Some(m) = rd.wait().await {
                let close = matches!(m, ChannelMsg::Close);
                if tx.send(m).is_err() || close {
                    break;
                }
            }
            gone.cancel();
        });
        Attachment {
            msgs,
            wr,
            lost,
            reader,
            _load: load,
            buf: BytesMut::new(),
        }
    }

    /// Sends the last frame (`Done`, `Hangup`) and lets the helper end the
    /// channel: closing it at once could lose the frame (sshd tears the
    /// relay down while the frame is still on its way to the helper).
    pub(super) async fn finish(&self, f: &Frame) {
        if self.send(f).await.is_ok() {
            let _ = tokio::time::timeout(FINISH_WAIT, self.lost.cancelled()).await;
        }
        let _ = self.wr.close().await;
    }

    /// Sends one frame; fails if the channel is lost meanwhile.
    pub(super) async fn send(&self, f: &Frame) -> Result<(), russh::Error> {
        self.send_bytes(f.to_bytes()).await
    }

    /// Sends encoded frames; fails if the channel is lost meanwhile.
    pub(super) async fn send_bytes(&self, frames: Bytes) -> Result<(), russh::Error> {
        tokio::select! {
            r = self.wr.data_bytes(frames) => r,
            () = self.lost.cancelled() => Err(russh::Error::Disconnect),
        }
    }

    /// The next frame; `None` when the channel is gone. The helper's
    /// stderr goes to the log.
    pub(super) async fn next(&mut self) -> Result<Option<Frame>, wire::WireError> {
        loop {
            if let Some(f) = Frame::decode(&mut self.buf)? {
                return Ok(Some(f));
            }
            match self.msgs.recv().await {
                Some(ChannelMsg::Data { data }) => self.buf.extend_from_slice(&data),
                Some(ChannelMsg::ExtendedData { data, .. }) => tracing::debug!(
                    "remote helper: {}",
                    crate::term::clean(String::from_utf8_lossy(&data).trim())
                ),
                Some(ChannelMsg::Close) | None => return Ok(None),
                Some(_) => {}
            }
        }
    }

    /// Reads up to the helper's [`wire::MAGIC`] and its `Hello`: `Err` with
    /// what arrived instead.
    pub(super) async fn hello(&mut self) -> Result<(wire::SessionId, bool), HelloErr> {
        let broken = |s: String| Err(HelloErr::Broken(s));
        while self.buf.len() < wire::MAGIC.len() {
            match self.msgs.recv().await {
                Some(ChannelMsg::Data { data }) => self.buf.extend_from_slice(&data),
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    return broken(crate::term::clean(String::from_utf8_lossy(&data).trim()));
                }
                Some(ChannelMsg::Failure) => return broken("the exec request was refused".into()),
                Some(ChannelMsg::Close) | None => {
                    return broken("the helper's channel closed before it spoke".into());
                }
                Some(_) => {}
            }
        }
        if &self.buf[..wire::MAGIC.len()] != wire::MAGIC {
            return broken(format!(
                "something else answered instead of the helper: {:?}",
                crate::term::clean(&String::from_utf8_lossy(&self.buf))
            ));
        }
        let _ = self.buf.split_to(wire::MAGIC.len());
        match self.next().await {
            Ok(Some(Frame::Hello {
                version,
                session,
                fresh,
            })) if version == wire::VERSION => Ok((session, fresh)),
            Ok(Some(Frame::Refused(why))) => Err(HelloErr::Refused(why)),
            Ok(Some(f)) => broken(format!("unexpected first frame {f:?}")),
            Ok(None) => broken("the helper's channel closed".into()),
            Err(e) => broken(e.to_string()),
        }
    }
}

/// The session's task.
struct Task {
    /// The profile's resumable sessions.
    resume: Arc<Resume>,
    /// The helper.
    helper: Arc<Helper>,
    /// From [`SessionWrite`].
    cmds: mpsc::UnboundedReceiver<Cmd>,
    /// To [`SessionRead`].
    out: mpsc::Sender<ChannelMsg>,
    /// Freed as the helper acknowledges input.
    credits: Arc<Semaphore>,
    /// What the local side took.
    flow: Arc<Flow>,
    /// Proves this sshshim started the session.
    secret: Secret,
    /// The helper's session, once started.
    session: Option<wire::SessionId>,
    /// Stdin, kept until acknowledged.
    input: Outbox,
    /// Stdout received.
    stdout: Inbox,
    /// Stderr received.
    stderr: Inbox,
    /// Where stdout ends, once the helper said.
    eof_out: Option<u64>,
    /// Where stderr ends, once the helper said.
    eof_err: Option<u64>,
    /// Whether the EOF went to the local side.
    eof_emitted: bool,
    /// The latest window size.
    window: Option<(u32, u32, u32, u32)>,
    /// The window changed while detached.
    window_dirty: bool,
    /// Signals asked while detached.
    signals: Vec<String>,
    /// The local side is gone: end the command.
    hangup: bool,
    /// The status entry.
    held: Option<HeldGuard>,
    /// Times resumed.
    resumes: u64,
}

impl Task {
    /// Runs the session to its end.
    async fn run(mut self, channel: russh::Channel<client::Msg>, hold: Box<dyn Send + Sync>) {
        let Some((att, command, pty)) = self.before_command(channel, hold).await else {
            return;
        };
        if let Command::Subsystem(name) = &command {
            let why = match (&self.helper.sftp, name.as_str()) {
                (Ok(_), "sftp") => None,
                (Err(why), "sftp") => Some(why.to_string()),
                _ => Some("the helper runs only the sftp subsystem".to_owned()),
            };
            if let Some(why) = why {
                tracing::info!("subsystem {name:?} runs as a plain session (not resumable): {why}");
                return self.plain(att, command, pty).await;
            }
        }
        let Some(mut att) = self.launch(att, command, pty).await else {
            return;
        };
        loop {
            match self.attached(&mut att).await {
                Ended::Over => return,
                Ended::Lost => {}
            }
            drop(att);
            match self.reattach().await {
                Some(a) => att = a,
                None => return,
            }
        }
    }

    /// Emits to the local side; false when it is gone.
    async fn emit(&self, m: ChannelMsg) -> bool {
        self.out.send(m).await.is_ok()
    }

    /// Until the command: pty, environment and agent requests; input is
    /// kept for the command.
    async fn before_command(
        &mut self,
        channel: russh::Channel<client::Msg>,
        hold: Box<dyn Send + Sync>,
    ) -> Option<(Attachment, Command, Option<PtySpec>)> {
        let mut att = Attachment::new(channel, hold);
        let mut pty = None;
        loop {
            let cmd = tokio::select! {
                c = self.cmds.recv() => c,
                m = att.msgs.recv() => match m {
                    Some(ChannelMsg::Close) | None => {
                        // The connection died before the command: as a plain
                        // session would.
                        return None;
                    }
                    _ => continue,
                },
            };
            match cmd? {
                Cmd::Data(d) => self.input.push(d),
                Cmd::Eof => self.input.close(),
                Cmd::Pty(spec) => {
                    pty = Some(spec);
                    self.emit(ChannelMsg::Success).await;
                }
                Cmd::Env(n, v) => {
                    let _ = att.wr.set_env(false, n, v).await;
                }
                Cmd::Agent => {
                    let ok = att.wr.agent_forward(true).await.is_ok() && reply(&mut att.msgs).await;
                    self.emit(if ok {
                        ChannelMsg::Success
                    } else {
                        ChannelMsg::Failure
                    })
                    .await;
                }
                Cmd::Window(c, r, x, y) => {
                    if let Some(p) = &mut pty {
                        (p.cols, p.rows, p.px, p.py) = (c, r, x, y);
                    }
                }
                Cmd::Signal(_) => {}
                Cmd::Command(c) => {
                    if let Some(p) = &pty {
                        self.window = Some((p.cols, p.rows, p.px, p.py));
                    }
                    return Some((att, c, pty));
                }
            }
        }
    }

    /// Runs a command as a plain channel on the session's channel (the
    /// helper cannot run it): a pass-through until it ends.
    async fn plain(mut self, mut att: Attachment, command: Command, pty: Option<PtySpec>) {
        let (rd, wr, lost) = (&mut att.msgs, &att.wr, att.lost.clone());
        if let Some(p) = pty {
            let modes: Vec<(russh::Pty, u32)> = p
                .modes
                .iter()
                .filter_map(|(op, v)| russh::Pty::from_u8(*op).map(|m| (m, *v)))
                .collect();
            let sent = wr
                .request_pty(true, &p.term, p.cols, p.rows, p.px, p.py, &modes)
                .await;
            // The client had its answer; this one is the server's.
            if sent.is_err() || !reply(rd).await {
                tracing::debug!("the server refused the pty of a plain session");
            }
        }
        let sent = match command {
            Command::Shell => wr.request_shell(true).await,
            Command::Exec(c) => wr.exec(true, c).await,
            Command::Subsystem(n) => wr.request_subsystem(true, n).await,
            // Never asked by a local client.
            Command::Forwards => Err(russh::Error::RequestDenied),
        };
        if sent.is_err() {
            self.emit(ChannelMsg::Failure).await;
            return;
        }
        while let Some((_, chunk)) = self.input.next_chunk() {
            self.credits.add_permits(chunk.len());
            let _ = wr.data_bytes(chunk).await;
        }
        if self.input.is_closed() {
            let _ = wr.eof().await;
        }
        loop {
            tokio::select! {
                c = self.cmds.recv() => match c {
                    None => {
                        let _ = wr.close().await;
                        return;
                    }
                    Some(Cmd::Data(d)) => {
                        self.credits.add_permits(d.len());
                        // A write waits for window forever on a dead connection.
                        tokio::select! {
                            _ = wr.data_bytes(d) => {}
                            () = lost.cancelled() => return,
                        }
                    }
                    Some(Cmd::Eof) => {
                        let _ = wr.eof().await;
                    }
                    Some(Cmd::Window(c, r, x, y)) => {
                        let _ = wr.window_change(c, r, x, y).await;
                    }
                    Some(Cmd::Signal(s)) => {
                        let _ = wr.signal(sig_of(&s)).await;
                    }
                    Some(Cmd::Env(n, v)) => {
                        let _ = wr.set_env(false, n, v).await;
                    }
                    Some(Cmd::Agent | Cmd::Pty(_) | Cmd::Command(_)) => {
                        self.emit(ChannelMsg::Failure).await;
                    }
                },
                m = rd.recv() => match m {
                    None => return,
                    Some(m) => {
                        let last = matches!(m, ChannelMsg::Close);
                        if !self.emit(m).await || last {
                            return;
                        }
                    }
                },
            }
        }
    }

    /// Starts the command under the helper on the session's channel and
    /// answers the client's request; `None` if it could not start.
    async fn launch(
        &mut self,
        mut att: Attachment,
        command: Command,
        pty: Option<PtySpec>,
    ) -> Option<Attachment> {
        let kind = match &command {
            Command::Shell => "shell",
            Command::Exec(_) => "exec",
            Command::Subsystem(_) => "subsystem",
            Command::Forwards => "forwards",
        };
        let started = async {
            let spec = wire::StartSpec {
                secret: self.secret.clone(),
                owner: self.resume.owner,
                run: self.resume.run,
                command,
                pty,
                timeout_secs: self.resume.settings.timeout.as_secs().min(u32::MAX as u64) as u32,
                buffer: super::BUFFER,
            };
            // The spec (all but the secret) rides on the exec, so the command
            // starts before sshd opens the channel's window: a `Start` frame
            // alone would wait for that window, a round trip more.
            let arg = spec.to_arg();
            let args = if arg.len() <= MAX_SPEC_ARG {
                format!("start {arg}")
            } else {
                "start".to_owned()
            };
            att.wr
                .exec(true, self.helper.command(&args))
                .await
                .map_err(|e| e.to_string())?;
            // Then the secret (or, for a long command, the whole spec).
            att.send(&Frame::Start(Box::new(spec)))
                .await
                .map_err(|e| e.to_string())?;
            let id = match att.hello().await {
                Ok((id, true)) => id,
                Ok(_) => return Err("the helper did not start a new session".to_owned()),
                Err(HelloErr::Refused(why) | HelloErr::Broken(why)) => return Err(why),
            };
            match att.next().await {
                Ok(Some(Frame::Started)) => Ok(id),
                Ok(Some(Frame::Refused(why))) => Err(why),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            }
        };
        match started.await {
            Ok(id) => {
                self.session = Some(id);
                tracing::debug!("session {} runs under the remote helper", short(&id));
                self.held = Some(self.resume.register(HeldStatus {
                    session: short(&id),
                    kind: kind.to_owned(),
                    state: "attached".to_owned(),
                    since: unix_now(),
                    unacked_input_bytes: 0,
                    output_bytes: 0,
                    resumes: 0,
                }));
                self.emit(ChannelMsg::Success).await;
                Some(att)
            }
            Err(why) => {
                tracing::warn!(
                    "the remote helper could not start a {kind} session: {}",
                    crate::term::clean(&why)
                );
                self.emit(ChannelMsg::Failure).await;
                None
            }
        }
    }

    /// Updates the status entry.
    fn status(&self, state: Option<&str>) {
        if let Some(h) = &self.held {
            let (input, output) = (
                self.input.buffered() as u64,
                self.stdout.have + self.stderr.have,
            );
            let resumes = self.resumes;
            h.update(|st| {
                if let Some(s) = state {
                    st.state = s.to_owned();
                    st.since = unix_now();
                }
                st.unacked_input_bytes = input;
                st.output_bytes = output;
                st.resumes = resumes;
            });
        }
    }

    /// Sends the input not yet sent on this attachment, and its EOF when due.
    async fn send_input(&mut self, att: &Attachment) -> Result<(), russh::Error> {
        while let Some((offset, data)) = self.input.next_chunk() {
            att.send(&Frame::Data {
                stream: Stream::Stdin,
                offset,
                data,
            })
            .await?;
        }
        if self.input.eof_due() {
            att.send(&Frame::Eof {
                stream: Stream::Stdin,
                at: self.input.end(),
            })
            .await?;
        }
        Ok(())
    }

    /// How far each output stream may be acknowledged (see [`Flow`]).
    fn ack_limits(&self) -> [u64; 2] {
        if self.flow.input_waits.load(Ordering::Relaxed) {
            [u64::MAX; 2]
        } else {
            [0, 1].map(|i| self.flow.taken[i].load(Ordering::Relaxed))
        }
    }

    /// Output that may be acknowledged now.
    fn ackable(&self) -> u64 {
        let [out, err] = self.ack_limits();
        self.stdout.ackable(out) + self.stderr.ackable(err)
    }

    /// Acknowledges the output the local side took.
    async fn send_acks(&mut self, att: &Attachment) -> Result<(), russh::Error> {
        let limits = self.ack_limits();
        for (i, (stream, inbox)) in [
            (Stream::Stdout, &mut self.stdout),
            (Stream::Stderr, &mut self.stderr),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(upto) = inbox.take_ack(limits[i]) {
                att.send(&Frame::Ack { stream, upto }).await?;
            }
        }
        Ok(())
    }

    /// Runs the session on an attachment until it ends or the channel is lost.
    async fn attached(&mut self, att: &mut Attachment) -> Ended {
        self.status(Some("attached"));
        if self.hangup {
            att.finish(&Frame::Hangup).await;
            return Ended::Over;
        }
        let mut setup = Vec::new();
        if std::mem::take(&mut self.window_dirty)
            && let Some((cols, rows, px, py)) = self.window
        {
            setup.push(Frame::Window { cols, rows, px, py });
        }
        setup.extend(self.signals.drain(..).map(Frame::Signal));
        for f in &setup {
            if att.send(f).await.is_err() {
                return Ended::Lost;
            }
        }
        if self.send_input(att).await.is_err() {
            return Ended::Lost;
        }
        let mut ack_at: Option<tokio::time::Instant> = None;
        loop {
            let ack_due = async move {
                match ack_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            let sent = tokio::select! {
                c = self.cmds.recv() => match c {
                    None => {
                        // The local client is gone: end the command as sshd would.
                        tracing::debug!("resumable session: the local client is gone: hanging up");
                        att.finish(&Frame::Hangup).await;
                        return Ended::Over;
                    }
                    Some(c) => self.on_command(c, att).await,
                },
                f = att.next() => match f {
                    Ok(Some(f)) => match self.on_frame(f, att).await {
                        Some(ended) => return ended,
                        None => Ok(()),
                    },
                    Ok(None) => return Ended::Lost,
                    Err(e) => {
                        tracing::warn!("resumable session: protocol error: {e}");
                        self.give_up("the remote helper broke the protocol").await;
                        return Ended::Over;
                    }
                },
                () = ack_due => {
                    ack_at = None;
                    self.send_acks(att).await
                }
                () = self.flow.wake.notified() => Ok(()),
            };
            if sent.is_err() {
                return Ended::Lost;
            }
            let unacked = self.ackable();
            if unacked >= ACK_EVERY {
                ack_at = None;
                if self.send_acks(att).await.is_err() {
                    return Ended::Lost;
                }
            } else if unacked > 0 && ack_at.is_none() {
                ack_at = Some(tokio::time::Instant::now() + ACK_DELAY);
            }
        }
    }

    /// A local request while attached.
    async fn on_command(&mut self, c: Cmd, att: &Attachment) -> Result<(), russh::Error> {
        match c {
            Cmd::Data(d) => {
                self.input.push(d);
                self.send_input(att).await
            }
            Cmd::Eof => {
                self.input.close();
                self.send_input(att).await
            }
            Cmd::Window(cols, rows, px, py) => {
                self.window = Some((cols, rows, px, py));
                att.send(&Frame::Window { cols, rows, px, py }).await
            }
            Cmd::Signal(s) => att.send(&Frame::Signal(s)).await,
            Cmd::Env(..) => Ok(()),
            Cmd::Agent | Cmd::Pty(_) | Cmd::Command(_) => {
                self.emit(ChannelMsg::Failure).await;
                Ok(())
            }
        }
    }

    /// A frame from the helper; `Some` when the attachment ends.
    async fn on_frame(&mut self, f: Frame, att: &Attachment) -> Option<Ended> {
        let protocol = |e: wire::WireError| {
            tracing::warn!("resumable session: protocol error: {e}");
            Ended::Over
        };
        match f {
            Frame::Data {
                stream: stream @ (Stream::Stdout | Stream::Stderr),
                offset,
                data,
            } => {
                let inbox = if stream == Stream::Stdout {
                    &mut self.stdout
                } else {
                    &mut self.stderr
                };
                let new = match inbox.accept(offset, data) {
                    Ok(n) => n,
                    Err(e) => return Some(protocol(e)),
                };
                if !new.is_empty() {
                    let m = if stream == Stream::Stdout {
                        ChannelMsg::Data { data: new }
                    } else {
                        ChannelMsg::ExtendedData { data: new, ext: 1 }
                    };
                    if !self.emit(m).await {
                        // The local side stopped taking output: it is gone.
                        tracing::debug!(
                            "resumable session: the local side took no output: hanging up"
                        );
                        att.finish(&Frame::Hangup).await;
                        return Some(Ended::Over);
                    }
                }
            }
            Frame::Ack {
                stream: Stream::Stdin,
                upto,
            } => {
                let before = self.input.buffered();
                if let Err(e) = self.input.ack(upto) {
                    return Some(protocol(e));
                }
                self.credits.add_permits(before - self.input.buffered());
            }
            Frame::Eof { stream, at } => {
                match stream {
                    Stream::Stdout => self.eof_out = Some(at),
                    Stream::Stderr => self.eof_err = Some(at),
                    Stream::Stdin => {}
                }
                self.emit_eof().await;
            }
            Frame::Exit(exit) => {
                self.emit_eof().await;
                let m = match exit {
                    Exit::Status(exit_status) => ChannelMsg::ExitStatus { exit_status },
                    Exit::Signal { name, core_dumped } => ChannelMsg::ExitSignal {
                        signal_name: sig_of(&name),
                        core_dumped,
                        error_message: String::new(),
                        lang_tag: String::new(),
                    },
                };
                self.emit(m).await;
                let _ = self.send_acks(att).await;
                // The client has it all: the close need not wait for the helper.
                self.emit(ChannelMsg::Close).await;
                att.finish(&Frame::Done).await;
                return Some(Ended::Over);
            }
            Frame::Refused(why) => {
                self.give_up(&why).await;
                return Some(Ended::Over);
            }
            _ => {}
        }
        self.status(None);
        None
    }

    /// Passes the EOF on once both output streams are complete.
    async fn emit_eof(&mut self) {
        if !self.eof_emitted
            && self.eof_out == Some(self.stdout.have)
            && self.eof_err == Some(self.stderr.have)
        {
            self.eof_emitted = true;
            self.emit(ChannelMsg::Eof).await;
        }
    }

    /// The session is lost for good: says so on the client's stderr and
    /// closes, as a plain session does when its connection goes.
    async fn give_up(&mut self, why: &str) {
        if let Some(id) = &self.session {
            tracing::warn!("session {} ended: {}", short(id), crate::term::clean(why));
        }
        let text = format!(
            "sshshim: the upstream connection was lost and this session could not be resumed: \
             {}\r\n",
            crate::term::clean(why)
        );
        self.emit(ChannelMsg::ExtendedData {
            data: text.into(),
            ext: 1,
        })
        .await;
        self.emit(ChannelMsg::Close).await;
    }

    /// Waits for the upstream and attaches to the helper again; `None`
    /// when the session cannot be resumed (the error went to the client).
    async fn reattach(&mut self) -> Option<Attachment> {
        let id = self.session?;
        let lost_at = Instant::now();
        let timeout = self.resume.settings.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        self.status(Some("waiting"));
        tracing::info!(
            "session {}: the upstream connection was lost; the server holds the session \
             (up to {}s)",
            short(&id),
            timeout.as_secs()
        );
        loop {
            let attempt = attach(
                self.resume.clone(),
                self.helper.clone(),
                id,
                self.secret.clone(),
                self.stdout.have,
                self.stderr.have,
            );
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = tokio::time::timeout_at(deadline, &mut attempt) => break r,
                    c = self.cmds.recv() => self.while_detached(c),
                }
            };
            match result {
                Err(_) => {
                    self.give_up(&format!(
                        "it was held for {}s (--resume-timeout)",
                        timeout.as_secs()
                    ))
                    .await;
                    return None;
                }
                Ok(Ok((att, have_in))) => {
                    let before = self.input.buffered();
                    if let Err(e) = self.input.rewind(have_in) {
                        tracing::warn!("resumable session: protocol error: {e}");
                        self.give_up("the remote helper lost acknowledged input")
                            .await;
                        return None;
                    }
                    self.credits.add_permits(before - self.input.buffered());
                    self.resumes += 1;
                    tracing::info!(
                        "session {} resumed after {:.1}s",
                        short(&id),
                        lost_at.elapsed().as_secs_f64()
                    );
                    return Some(att);
                }
                Ok(Err(AttachErr::Gone(why))) => {
                    self.give_up(&why).await;
                    return None;
                }
                Ok(Err(AttachErr::Retry(why))) => {
                    tracing::debug!("resuming session {}: {why}", short(&id));
                    let pause = tokio::time::sleep(Duration::from_secs(1));
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            () = &mut pause => break,
                            c = self.cmds.recv() => self.while_detached(c),
                        }
                    }
                }
            }
        }
    }

    /// A local request while detached: kept for the next attachment.
    fn while_detached(&mut self, c: Option<Cmd>) {
        match c {
            None => self.hangup = true,
            Some(Cmd::Data(d)) => self.input.push(d),
            Some(Cmd::Eof) => self.input.close(),
            Some(Cmd::Window(c, r, x, y)) => {
                self.window = Some((c, r, x, y));
                self.window_dirty = true;
            }
            Some(Cmd::Signal(s)) => self.signals.push(s),
            Some(_) => {}
        }
        self.status(None);
    }
}

/// Why the helper's first words were not a greeting.
pub(super) enum HelloErr {
    /// The helper refused (e.g. the session ended).
    Refused(String),
    /// Something else answered, or the channel broke.
    Broken(String),
}

/// Why an attach attempt failed.
pub(super) enum AttachErr {
    /// The session is gone on the server.
    Gone(String),
    /// Worth another try (no connection yet, a broken attempt).
    Retry(String),
}

/// How long one attach attempt may take once a connection is there.
pub(super) const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a channel, runs the helper's `attach` and resumes: the
/// attachment and how far the helper has the input.
pub(super) async fn attach(
    resume: Arc<Resume>,
    helper: Arc<Helper>,
    id: wire::SessionId,
    secret: Secret,
    have_out: u64,
    have_err: u64,
) -> Result<(Attachment, u64), AttachErr> {
    let opened = resume
        .pool
        .open(Open::Session)
        .await
        .map_err(|e| AttachErr::Retry(e.to_string()))?;
    let mut att = Attachment::new(opened.channel, Box::new(opened.load));
    let work = async {
        att.wr
            .exec(true, helper.command(&format!("attach {}", hex(&id))))
            .await
            .map_err(|e| AttachErr::Retry(e.to_string()))?;
        // At once: the helper reads it after its greeting.
        att.send(&Frame::Resume {
            secret,
            have_out,
            have_err,
        })
        .await
        .map_err(|e| AttachErr::Retry(e.to_string()))?;
        match att.hello().await {
            Ok((sid, false)) if sid == id => {}
            Ok(_) => {
                return Err(AttachErr::Gone(
                    "the server has another session there".into(),
                ));
            }
            Err(HelloErr::Refused(why)) => return Err(AttachErr::Gone(why)),
            Err(HelloErr::Broken(why)) => return Err(AttachErr::Retry(why)),
        }
        match att.next().await {
            Ok(Some(Frame::Resumed { have_in })) => Ok(have_in),
            Ok(Some(Frame::Refused(why))) => Err(AttachErr::Gone(why)),
            Ok(other) => Err(AttachErr::Retry(format!("unexpected answer {other:?}"))),
            Err(e) => Err(AttachErr::Retry(e.to_string())),
        }
    };
    match tokio::time::timeout(ATTACH_TIMEOUT, work).await {
        Ok(Ok(have_in)) => Ok((att, have_in)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(AttachErr::Retry("the helper did not answer in time".into())),
    }
}

/// A session's id as logs and status show it.
pub(super) fn short(id: &wire::SessionId) -> String {
    hex(&id[..4])
}

/// Waits for the reply to a want-reply request on a channel not yet running
/// anything.
async fn reply(rd: &mut mpsc::UnboundedReceiver<ChannelMsg>) -> bool {
    loop {
        match rd.recv().await {
            Some(ChannelMsg::Success) => return true,
            Some(ChannelMsg::Failure) | Some(ChannelMsg::Close) | None => return false,
            Some(_) => {}
        }
    }
}

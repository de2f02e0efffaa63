//! The multiplexing master: serves OpenSSH's ControlMaster protocol (the
//! requests [`crate::mux`] decodes) with the upstream pool, so `ssh`,
//! `scp`, `sftp`, `rsync` and `git` with `ControlPath` set to sshshim's
//! socket reach the server with no local handshake and no local crypto.
//!
//! Unlike OpenSSH's master, this one does not die with its connection: a
//! new session during an outage waits for the reconnect (up to the connect
//! timeout, then fails saying why), forwards opened through the socket are
//! sshshim's own and replayed after a reconnect, and sessions past the
//! server's MaxSessions go to another upstream connection.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::bridge::{self, Bridge, Input, LocalIn, LocalOut, Output, Request};
use crate::forward::local::{self, Target};
use crate::forward::{AgentTarget, FwdState, Registry};
use crate::mux::{
    ClientInfo, FdReader, FdWriter, Forward, ForwardKind, ForwardReply, MuxAddr, MuxEvent,
    MuxRequest, NewSession, SessionControl, SessionFds, StdioControl, StdioFds, StdioReply,
    TtyInfo,
};
use crate::spec::{Addr, ForwardSpec, Kind};
use crate::upstream::{Open, Pool};

/// The master's state, shared by every request it serves.
pub struct Master {
    /// The upstream side.
    pool: Arc<Pool>,
    /// sshshim's forwards (remote forwards opened here are its own).
    registry: Arc<Registry>,
    /// Where sessions, bridges and forwards run (waited for on shutdown).
    tasks: TaskTracker,
    /// See `bridge::Options::stall_limit`.
    stall_limit: Duration,
    /// How long a new session waits for the upstream during an outage.
    connect_timeout: Duration,
    /// Stops the whole profile (`ssh -O exit`).
    stop_profile: CancellationToken,
    /// Stops accepting on the socket (`ssh -O stop`).
    stop_listening: CancellationToken,
    /// Stops everything the master started (profile shutdown).
    shutdown: CancellationToken,
    /// Tty sessions, for SIGWINCH.
    ttys: Mutex<Vec<Tty>>,
    /// Local and dynamic forwards opened through the socket.
    forwards: Mutex<HashMap<String, CancellationToken>>,
    /// sshshim's own agent, for sessions that ask (as ControlMaster does).
    agent: Option<PathBuf>,
    /// Resumable sessions (`--resume`), if on.
    resume: Option<Arc<crate::resume::Resume>>,
}

/// A tty session, for window-size changes.
struct Tty {
    /// Its bridge (gone when the session ends).
    bridge: Weak<Bridge>,
    /// A duplicate of the client's terminal, to read its size from.
    fd: OwnedFd,
    /// The last size sent.
    last: Mutex<crate::mux::WindowSize>,
}

/// What [`Master::new`] needs.
pub struct MasterOptions {
    /// The upstream side.
    pub pool: Arc<Pool>,
    /// sshshim's forward registry.
    pub registry: Arc<Registry>,
    /// The profile's task tracker.
    pub tasks: TaskTracker,
    /// See `bridge::Options::stall_limit`.
    pub stall_limit: Duration,
    /// The profile's connect timeout.
    pub connect_timeout: Duration,
    /// Cancelled by `ssh -O exit`: stops the profile.
    pub stop_profile: CancellationToken,
    /// Cancelled by `ssh -O stop`: stops accepting on the socket.
    pub stop_listening: CancellationToken,
    /// The profile's shutdown.
    pub shutdown: CancellationToken,
    /// Resumable sessions (`--resume`), if on.
    pub resume: Option<Arc<crate::resume::Resume>>,
}

impl Master {
    /// A master for one profile.
    pub fn new(o: MasterOptions) -> Arc<Self> {
        Arc::new(Master {
            pool: o.pool,
            registry: o.registry,
            tasks: o.tasks,
            stall_limit: o.stall_limit,
            connect_timeout: o.connect_timeout,
            stop_profile: o.stop_profile,
            stop_listening: o.stop_listening,
            shutdown: o.shutdown,
            resume: o.resume,
            ttys: Mutex::default(),
            forwards: Mutex::default(),
            agent: std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        })
    }

    /// Serves the mux layer's requests until shutdown.
    pub async fn serve(self: Arc<Self>, mut events: mpsc::Receiver<MuxEvent>) {
        let winch = self.clone();
        self.tasks
            .spawn(async move { winch.follow_window_changes().await }.in_current_span());
        loop {
            let ev = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = self.shutdown.cancelled() => return,
            };
            let me = self.clone();
            let span = tracing::info_span!("mux", conn = ev.client.conn_id, pid = ?ev.client.pid);
            self.tasks
                .spawn(async move { me.handle(ev).await }.instrument(span));
        }
    }

    /// Serves one request.
    async fn handle(self: Arc<Self>, ev: MuxEvent) {
        let client = ev.client;
        match ev.request {
            MuxRequest::NewSession {
                session,
                fds,
                tty,
                reply,
            } => self.session(client, session, fds, tty, reply).await,
            MuxRequest::StdioForward { target, fds, reply } => {
                self.stdio(client, target, fds, reply).await
            }
            MuxRequest::OpenForward { forward, reply } => self.open_forward(forward, reply).await,
            MuxRequest::CloseForward { forward, reply } => {
                if self.close_forward(&forward) {
                    reply.ok();
                } else {
                    reply.failure("port not forwarded");
                }
            }
            MuxRequest::Terminate { reply } => {
                tracing::info!("ssh -O exit: stopping");
                reply.ok();
                self.stop_profile.cancel();
            }
            MuxRequest::StopListening { reply } => {
                tracing::info!("ssh -O stop: no longer accepting on the multiplexing socket");
                reply.ok();
                self.stop_listening.cancel();
            }
            MuxRequest::Info { reply, .. } => reply.unsupported("unsupported request"),
        }
    }

    /// NEW_SESSION: opens an upstream session (waiting for a reconnect if
    /// need be), sends the client's requests at once, and bridges its
    /// descriptors.
    async fn session(
        self: Arc<Self>,
        client: ClientInfo,
        s: NewSession,
        fds: SessionFds,
        tty: Option<TtyInfo>,
        reply: crate::mux::SessionReply,
    ) {
        let opened = tokio::select! {
            r = self.pool.open(Open::Session) => r,
            _ = client.closed() => return,
        };
        let opened = match opened {
            Ok(o) => o,
            Err(e) => {
                // A refused NEW_SESSION makes ssh connect directly without a
                // word; fail loudly instead, on the client's stderr.
                tracing::warn!("refusing a session: {e}");
                let ctl = reply.opened();
                let mut err = FdWriter::new(fds.stderr).ok();
                drop((fds.stdin, fds.stdout));
                if let Some(w) = err.as_mut() {
                    let _ = w.write_all(format!("sshshim: {e}\r\n").as_bytes()).await;
                    let _ = w.flush().await;
                }
                drop(err);
                ctl.exit(255);
                return;
            }
        };
        let is_tty = s.want_tty && tty.is_some();
        let cell: Arc<OnceLock<Arc<Bridge>>> = Arc::default();
        let tty_fd = if is_tty {
            fds.stdin.as_fd().try_clone_to_owned().ok()
        } else {
            None
        };
        let help_fd = fds.stderr.try_clone().ok();
        let (stdin, stdout, stderr) = match (
            FdReader::new(fds.stdin),
            FdWriter::new(fds.stdout),
            FdWriter::new(fds.stderr),
        ) {
            (Ok(i), Ok(o), Ok(e)) => (i, o, e),
            _ => {
                tracing::warn!("unusable descriptors from a mux client");
                return reply.failure("sshshim cannot use the passed descriptors");
            }
        };
        let ctl: Arc<Mutex<Option<SessionControl>>> = Arc::default();
        let input = FdIn {
            reader: stdin,
            client: client.clone(),
            eof: false,
            escape: match (is_tty, s.escape_char) {
                (true, Some(c)) => Some(Escape::new(c, help_fd)),
                _ => None,
            },
            cell: cell.clone(),
            tty: is_tty,
        };
        let output = SessionOut {
            stdout: Some(stdout),
            stderr: Some(stderr),
            status: None,
            ctl: ctl.clone(),
            cell: cell.clone(),
        };
        let generation = opened.generation;
        let (upstream, hold, congestion) =
            bridge::upstream::prepare(opened, true, self.resume.as_ref()).await;
        let opts = bridge::Options {
            session: true,
            what: "mux session".into(),
            meter: self.pool.stats().open("session"),
            hold,
            stall_limit: self.stall_limit,
            congestion,
        };
        let b = bridge::spawn(input, output, upstream, opts, &self.tasks);
        let _ = cell.set(b.clone());
        // Followed for SIGWINCH before any request goes out: the client may
        // resize as soon as the shell's first output reaches it.
        if let (true, Some(fd)) = (is_tty, tty_fd) {
            let size = tty.as_ref().map(|t| t.size).unwrap_or_default();
            self.ttys.lock().unwrap().push(Tty {
                bridge: Arc::downgrade(&b),
                fd,
                last: Mutex::new(size),
            });
        }

        // The client's requests go out at once, in its order; SSH answers
        // them in order, so nothing waits for a round trip in between.
        let pty = match (&tty, is_tty) {
            (Some(t), true) => Some(
                b.send_request(Request::Pty {
                    term: s.term.clone(),
                    cols: t.size.cols,
                    rows: t.size.rows,
                    pix_width: t.size.xpixel,
                    pix_height: t.size.ypixel,
                    modes: t.modes.clone(),
                })
                .await,
            ),
            _ => None,
        };
        for (name, value) in &s.env {
            let _ = b.write.set_env(false, name.as_str(), value.as_str()).await;
        }
        let agent = match (&self.agent, s.want_agent) {
            (Some(sock), true) => Some((sock.clone(), b.send_request(Request::AgentForward).await)),
            _ => None,
        };
        let command = if s.subsystem {
            Request::Subsystem(String::from_utf8_lossy(&s.command).into_owned())
        } else if s.command.is_empty() {
            Request::Shell
        } else {
            Request::Exec(s.command.clone())
        };
        let started = b.send_request(command).await;
        let session_ctl = reply.opened();
        let session_id = session_ctl.id();
        *ctl.lock().unwrap() = Some(session_ctl);
        tracing::debug!("session {session_id} opened");

        if let Some(pty) = pty
            && !pty.await.unwrap_or(false)
            && let Some(c) = ctl.lock().unwrap().as_ref()
        {
            c.tty_alloc_failed();
        }
        if let Some((sock, granted)) = agent
            && granted.await.unwrap_or(false)
        {
            let guard = self
                .registry
                .add_agent_route(generation, AgentTarget::Socket(sock));
            let b2 = b.clone();
            self.tasks.spawn(async move {
                b2.finished().await;
                drop(guard);
            });
        }
        if !started.await.unwrap_or(false) {
            let what = if s.subsystem {
                "subsystem request failed"
            } else if s.command.is_empty() {
                "shell request failed"
            } else {
                "exec request failed"
            };
            tracing::info!("session {session_id}: {what}");
            let _ = b.close().await;
        }
    }

    /// NEW_STDIO_FWD (`ssh -W`): a direct channel bridged to the client's
    /// stdin and stdout. A refusal is fatal for the client, which says why.
    async fn stdio(
        self: Arc<Self>,
        client: ClientInfo,
        target: MuxAddr,
        fds: StdioFds,
        reply: StdioReply,
    ) {
        let open = match &target {
            MuxAddr::Tcp(h, p) => Open::DirectTcpip {
                host: h.clone(),
                port: *p as u32,
                originator: "127.0.0.1".into(),
                originator_port: 0,
            },
            MuxAddr::Unix(p) => Open::DirectStreamlocal(p.clone()),
        };
        let kind = open.kind();
        let opened = tokio::select! {
            r = self.pool.open(open) => r,
            _ = client.closed() => return,
        };
        let opened = match opened {
            Ok(o) => o,
            Err(e) => return reply.failure(&format!("{target}: {}", e.reason().description())),
        };
        let (Ok(input), Ok(output)) = (FdReader::new(fds.input), FdWriter::new(fds.output)) else {
            return reply.failure("sshshim cannot use the passed descriptors");
        };
        let ctl = reply.opened();
        let local_in = FdIn {
            reader: input,
            client,
            eof: false,
            escape: None,
            cell: Arc::default(),
            tty: false,
        };
        let local_out = StdioOut {
            output: Some(output),
            ctl: Some(ctl),
        };
        let opts = bridge::Options {
            session: false,
            what: format!("-W {target}"),
            meter: self.pool.stats().open(kind),
            hold: Some(Box::new(opened.load)),
            stall_limit: self.stall_limit,
            congestion: Some(opened.congestion),
        };
        bridge::spawn(local_in, local_out, opened.channel, opts, &self.tasks);
    }

    /// OPEN_FWD: a forward owned by sshshim from now on (it outlives the
    /// client, as with ControlMaster, and is replayed after reconnects).
    async fn open_forward(self: Arc<Self>, f: Forward, reply: ForwardReply) {
        let key = forward_key(&f);
        let listen = addr(&f.listen);
        match f.kind {
            ForwardKind::Local | ForwardKind::Dynamic => {
                if self.forwards.lock().unwrap().contains_key(&key) {
                    return reply.ok();
                }
                let (target, what) = match (&f.kind, &f.connect) {
                    (ForwardKind::Local, Some(c)) => {
                        (Target::Fixed(addr(c)), format!("-L {listen}:{}", addr(c)))
                    }
                    _ => (Target::Socks, format!("-D {listen}")),
                };
                let listener = match local::bind(&listen).await {
                    Ok(l) => l,
                    Err(e) => return reply.failure(&e),
                };
                let token = self.shutdown.child_token();
                self.forwards.lock().unwrap().insert(key, token.clone());
                self.tasks.spawn(
                    local::serve(listener, what, target, self.registry.clone(), token)
                        .in_current_span(),
                );
                reply.ok();
            }
            ForwardKind::Remote => {
                let Some(connect) = &f.connect else {
                    return reply.failure("a remote forward needs a target");
                };
                let spec = ForwardSpec {
                    kind: Kind::Remote,
                    listen: listen.clone(),
                    target: addr(connect),
                };
                let id = match self.registry.find_owned_remote(&spec.listen, &spec.target) {
                    Some(id) => id,
                    None => self.registry.open_owned_remote(&spec),
                };
                // Wait for the server's answer, so `ssh -O forward -R 0:…`
                // prints the port (and a refusal is reported).
                let deadline = tokio::time::Instant::now() + self.connect_timeout;
                loop {
                    match self.registry.state_of(id) {
                        Some((FwdState::Active, bound)) => {
                            return match (&listen, bound) {
                                (Addr::Tcp(_, 0), Some(p)) => reply.remote_port(p),
                                _ => reply.ok(),
                            };
                        }
                        Some((FwdState::Retrying(why), _)) => {
                            self.registry.remove_and_cancel(id);
                            return reply.failure(&why);
                        }
                        Some((FwdState::Pending, _)) => {}
                        None => return reply.failure("the forward was removed"),
                    }
                    if tokio::time::Instant::now() >= deadline {
                        // Kept: it is requested as soon as the upstream is
                        // back, as sshshim's other forwards are.
                        return reply.ok();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// CLOSE_FWD (`ssh -O cancel`), matched on the spec as it was opened.
    fn close_forward(&self, f: &Forward) -> bool {
        match f.kind {
            ForwardKind::Local | ForwardKind::Dynamic => {
                match self.forwards.lock().unwrap().remove(&forward_key(f)) {
                    Some(token) => {
                        token.cancel();
                        true
                    }
                    None => false,
                }
            }
            ForwardKind::Remote => {
                let Some(connect) = &f.connect else {
                    return false;
                };
                match self
                    .registry
                    .find_owned_remote(&addr(&f.listen), &addr(connect))
                {
                    Some(id) => self.registry.remove_and_cancel(id),
                    None => false,
                }
            }
        }
    }

    /// On SIGWINCH (clients send it to our pid), sends the new size of
    /// every tty session whose terminal changed.
    async fn follow_window_changes(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut winch) = signal(SignalKind::window_change()) else {
            tracing::warn!("cannot watch SIGWINCH: terminal resizes will not be passed on");
            return;
        };
        loop {
            tokio::select! {
                r = winch.recv() => if r.is_none() { return },
                _ = self.shutdown.cancelled() => return,
            }
            let changed: Vec<(Arc<Bridge>, crate::mux::WindowSize)> = {
                let mut ttys = self.ttys.lock().unwrap();
                ttys.retain(|t| t.bridge.upgrade().is_some_and(|b| !b.is_finished()));
                ttys.iter()
                    .filter_map(|t| {
                        let size = crate::mux::fds::window_size(t.fd.as_fd()).ok()?;
                        let mut last = t.last.lock().unwrap();
                        if *last == size {
                            return None;
                        }
                        *last = size;
                        Some((t.bridge.upgrade()?, size))
                    })
                    .collect()
            };
            for (b, s) in changed {
                let _ = b
                    .write
                    .window_change(s.cols, s.rows, s.xpixel, s.ypixel)
                    .await;
            }
        }
    }
}

/// A mux address as a forward address.
fn addr(a: &MuxAddr) -> Addr {
    match a {
        MuxAddr::Tcp(h, p) => Addr::Tcp(h.clone(), *p),
        MuxAddr::Unix(p) => Addr::Unix(p.clone()),
    }
}

/// The identity of a local or dynamic forward, for CLOSE_FWD.
fn forward_key(f: &Forward) -> String {
    f.to_string()
}

/// A client's input descriptor as the bridge's input: its stdin (with the
/// escape filter on a tty), ending when the client goes away.
struct FdIn {
    /// The descriptor.
    reader: FdReader,
    /// The control connection (its close means the client is gone).
    client: ClientInfo,
    /// EOF was passed on.
    eof: bool,
    /// The `~.` escape filter, for tty sessions.
    escape: Option<Escape>,
    /// The bridge, once spawned.
    cell: Arc<OnceLock<Arc<Bridge>>>,
    /// A tty session: a client that goes away ends the remote command, as
    /// sshd hangs up a pty whose channel closes.
    tty: bool,
}

impl FdIn {
    /// The client went away. OpenSSH's master turns that into
    /// `eow@openssh.com` plus close; sshd then keeps a non-tty command
    /// running with its stderr open. So do we (see `Bridge::output_closed`).
    fn gone(&self) -> Option<Input> {
        if !self.tty
            && let Some(b) = self.cell.get()
        {
            b.output_closed();
        }
        None
    }
}

impl LocalIn for FdIn {
    async fn recv(&mut self) -> Option<Input> {
        loop {
            if self.eof {
                // Half-closed: output goes on until the client leaves.
                self.client.closed().await;
                return self.gone();
            }
            let mut buf = BytesMut::with_capacity(32 * 1024);
            let n = tokio::select! {
                r = self.reader.read_buf(&mut buf) => r,
                _ = self.client.closed() => return self.gone(),
            };
            match n {
                Ok(0) | Err(_) => {
                    self.eof = true;
                    return Some(Input::Eof);
                }
                Ok(_) => {}
            }
            let data = buf.freeze();
            let data = match &mut self.escape {
                Some(esc) => match esc.filter(&data) {
                    Filtered::Data(d) if d.is_empty() => continue,
                    Filtered::Data(d) => d,
                    // `~.`: end the session now, as ssh does.
                    Filtered::Disconnect => return None,
                },
                None => data,
            };
            return Some(Input::Data(data));
        }
    }
}

/// What the escape filter made of some input.
enum Filtered {
    /// Bytes to send on (possibly none).
    Data(Bytes),
    /// `~.`: disconnect.
    Disconnect,
}

/// OpenSSH's escape sequences at the start of a line: `~.` disconnects,
/// `~?` lists the escapes, `~~` sends one `~`; the rest are passed on.
struct Escape {
    /// The escape character (`~` unless the client set another).
    ch: u8,
    /// The last byte was a newline (or nothing was typed yet).
    at_line_start: bool,
    /// The escape character was typed at a line start.
    pending: bool,
    /// The client's stderr, for the `~?` help.
    help: Option<OwnedFd>,
}

impl Escape {
    /// A filter for escape character `ch`.
    fn new(ch: u8, help: Option<OwnedFd>) -> Self {
        Escape {
            ch,
            at_line_start: true,
            pending: false,
            help,
        }
    }

    /// Filters one chunk of typed input.
    fn filter(&mut self, input: &[u8]) -> Filtered {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'.' => return Filtered::Disconnect,
                    b'?' => self.help(),
                    c if c == self.ch => out.push(c),
                    c => {
                        out.push(self.ch);
                        out.push(c);
                    }
                }
                self.at_line_start = false;
                continue;
            }
            if self.at_line_start && b == self.ch {
                self.pending = true;
                continue;
            }
            out.push(b);
            self.at_line_start = b == b'\r' || b == b'\n';
        }
        Filtered::Data(Bytes::from(out))
    }

    /// Writes the list of supported escapes to the client's terminal.
    fn help(&self) {
        let Some(fd) = &self.help else { return };
        let c = self.ch as char;
        let text = format!(
            "\r\nSupported escape sequences (sshshim multiplexing master):\r\n \
             {c}.   - terminate session\r\n \
             {c}?   - this message\r\n \
             {c}{c}   - send the escape character by typing it twice\r\n\
             (Note that escapes are only recognized immediately after newline.)\r\n"
        );
        if let Ok(dup) = fd.try_clone() {
            let mut f = std::fs::File::from(dup);
            let _ = std::io::Write::write_all(&mut f, text.as_bytes());
        }
    }
}

/// A session's output descriptors as the bridge's output.
struct SessionOut {
    /// The client's stdout (dropped once it fails).
    stdout: Option<FdWriter>,
    /// The client's stderr.
    stderr: Option<FdWriter>,
    /// The exit status, once known.
    status: Option<u32>,
    /// The control connection, once SESSION_OPENED was sent.
    ctl: Arc<Mutex<Option<SessionControl>>>,
    /// The bridge, once spawned.
    cell: Arc<OnceLock<Arc<Bridge>>>,
}

impl LocalOut for SessionOut {
    async fn send(&mut self, ev: Output) -> std::io::Result<()> {
        match ev {
            Output::Data(d) => {
                let Some(w) = self.stdout.as_mut() else {
                    return Ok(());
                };
                if w.write_all(&d).await.is_err() {
                    // What OpenSSH's master turns into eow@openssh.com:
                    // stdout is gone (`| head`), stderr still works.
                    self.stdout = None;
                    if let Some(b) = self.cell.get() {
                        b.output_closed();
                    }
                }
                Ok(())
            }
            Output::Ext(_, d) => {
                if let Some(w) = self.stderr.as_mut()
                    && w.write_all(&d).await.is_err()
                {
                    self.stderr = None;
                }
                Ok(())
            }
            Output::Eof => {
                if let Some(w) = self.stdout.as_mut() {
                    let _ = w.flush().await;
                }
                Ok(())
            }
            Output::ExitStatus(s) => {
                self.status = Some(s);
                Ok(())
            }
            // OpenSSH's master does not relay exit signals either: the
            // client exits 255 (README says so).
            Output::ExitSignal { .. } => Ok(()),
            Output::Close => {
                // Every byte reaches the descriptors before the exit
                // message, and the control connection closes last.
                for w in [self.stdout.take(), self.stderr.take()]
                    .into_iter()
                    .flatten()
                {
                    let mut w = w;
                    let _ = w.flush().await;
                }
                let ctl = self.ctl.lock().unwrap().take();
                if let Some(ctl) = ctl {
                    match self.status {
                        Some(s) => ctl.exit(s),
                        None => ctl.close(),
                    }
                }
                Ok(())
            }
        }
    }
}

/// A stdio forward's output descriptor as the bridge's output.
struct StdioOut {
    /// The client's stdout.
    output: Option<FdWriter>,
    /// The control connection.
    ctl: Option<StdioControl>,
}

impl LocalOut for StdioOut {
    async fn send(&mut self, ev: Output) -> std::io::Result<()> {
        match ev {
            Output::Data(d) => match self.output.as_mut() {
                Some(w) => w.write_all(&d).await,
                None => Ok(()),
            },
            Output::Eof => {
                if let Some(mut w) = self.output.take() {
                    let _ = w.flush().await;
                }
                Ok(())
            }
            Output::Close => {
                if let Some(mut w) = self.output.take() {
                    let _ = w.flush().await;
                }
                if let Some(c) = self.ctl.take() {
                    c.close();
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(esc: &mut Escape, s: &[u8]) -> Option<Vec<u8>> {
        match esc.filter(s) {
            Filtered::Data(d) => Some(d.to_vec()),
            Filtered::Disconnect => None,
        }
    }

    #[test]
    fn escapes_only_at_line_start() {
        let mut e = Escape::new(b'~', None);
        assert_eq!(run(&mut e, b"a~b\r"), Some(b"a~b\r".to_vec()));
        assert_eq!(run(&mut e, b"~~x"), Some(b"~x".to_vec()));
        assert_eq!(run(&mut e, b"\r~q"), Some(b"\r~q".to_vec()));
        assert_eq!(run(&mut e, b"\n~"), Some(b"\n".to_vec()));
        // The pending escape carries over to the next chunk.
        assert_eq!(run(&mut e, b"."), None);
        let mut e = Escape::new(b'~', None);
        assert_eq!(run(&mut e, b"~?"), Some(Vec::new()));
        assert_eq!(run(&mut e, b"ls\r~.rest"), None);
    }
}

//! Per-connection driver of the mux protocol, and the interface a higher
//! layer implements sessions and forwards on. (A little over 900 lines: the
//! contract below and the one-reply-per-request handles that enforce it
//! belong in one place.)
//!
//! # What the driver does by itself
//! - Sends HELLO (version 4) as soon as a client connects, whatever state
//!   the upstream is in, and requires the client's HELLO first.
//! - Answers ALIVE_CHECK with [`MuxConfig::alive_pid`]; the client later
//!   sends SIGWINCH to that pid.
//! - Answers PROXY, unknown types, and EXT_INFO (unless
//!   [`MuxConfig::info_extension`]) with FAILURE "unsupported request",
//!   and malformed-but-framed requests with FAILURE and OpenSSH's reason.
//! - Receives the descriptors of NEW_SESSION (3) and NEW_STDIO_FWD (2),
//!   reads the terminal's modes and size at once for a tty session (the
//!   client switches to raw mode right after SESSION_OPENED), and refuses a
//!   second session on one connection ("Multiple sessions not supported").
//! - Closes the connection on malformed packets, as OpenSSH does.
//!
//! # What the higher layer does
//! Everything else arrives as a [`MuxEvent`] on the `mpsc` channel given to
//! [`MuxServer::new`] / [`serve_connection`]. Each request carries a reply
//! handle whose methods consume it and send exactly one reply with the
//! request id; dropping a handle unanswered sends FAILURE. The driver reads
//! nothing more from that client until the reply is sent (OpenSSH's
//! masters do the same), but it notices a client that hangs up meanwhile:
//! [`ClientInfo::closed`] fires, so a slow open can be abandoned.
//!
//! A session, step by step (`MuxRequest::NewSession { session, fds, tty, reply }`):
//! 1. Open the upstream session channel. For a tty, request a pty with
//!    `session.term`, `tty.size` and `tty.modes`; send `session.env` with
//!    `set_env`; then `exec(session.command)`, `request_subsystem` if
//!    `session.subsystem`, or a shell if the command is empty.
//!    (`want_x11` / `want_agent` are flags only: the master uses its own
//!    display and agent.)
//! 2. `let ctl = reply.opened();` (or `reply.failure(reason)`) once the
//!    channel is open and its requests are sent.
//! 3. Wrap the descriptors: [`FdReader::new`]`(fds.stdin)`,
//!    [`FdWriter::new`]`(fds.stdout)` and `(fds.stderr)`, and pump them
//!    to and from the channel (stdin EOF -> channel EOF; extended data ->
//!    stderr). If the pty request fails, call
//!    [`SessionControl::tty_alloc_failed`].
//! 4. For a tty session with `session.escape_char`, filter stdin for the
//!    `~.` style escapes: the master runs the escape filter, not the client.
//! 5. On SIGWINCH (to our pid), re-read [`window_size`] on each tty
//!    session's stdin (`FdReader` is `AsFd`) and send window-change.
//! 6. When the channel closes: finish writing, `flush()` and drop the
//!    writers FIRST, then [`SessionControl::exit`]`(status)` (or
//!    [`SessionControl::close`] when there is no exit status, e.g. the
//!    command died of a signal: the client then exits 255). The control
//!    connection is closed last, after the exit message.
//! 7. If [`SessionControl::closed`] fires first, the client is gone: close
//!    the channel and drop the descriptors.
//!
//! A stdio forward (`ssh -W`, `MuxRequest::StdioForward`) is the same
//! without pty, env or exit status: [`StdioReply::opened`], pump
//! `fds.input` / `fds.output`, then [`StdioControl::close`]. Any message
//! after SESSION_OPENED is fatal for a `-W` client, so none can be sent.
//!
//! Forwards opened with OPEN_FWD outlive the control connection that asked
//! (as with OpenSSH) until CLOSE_FWD or shutdown. For a remote forward
//! with listen port 0, answer [`ForwardReply::remote_port`] with the port
//! the server chose (`ssh -O forward` prints it).
//!
//! [`FdReader::new`]: super::fds::FdReader::new
//! [`FdWriter::new`]: super::fds::FdWriter::new
//! [`window_size`]: super::fds::window_size

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::fdpass::{self, ControlError, PacketReader};
use super::fds::{self, WindowSize};
use super::listener::MuxListener;
use super::proto::{self, ClientMessage, DecodeError, Forward, MuxAddr, NewSession, ServerMessage};

/// Settings of the protocol driver.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// The pid sent in ALIVE replies; clients send SIGWINCH to it.
    pub alive_pid: u32,
    /// Advertise the `info` extension and pass EXT_INFO requests on as
    /// [`MuxRequest::Info`]; otherwise they get FAILURE.
    pub info_extension: bool,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            alive_pid: std::process::id(),
            info_extension: false,
        }
    }
}

/// The descriptors of a NEW_SESSION: the client's stdin, stdout, stderr.
#[derive(Debug)]
pub struct SessionFds {
    /// Read: what the user types or pipes in.
    pub stdin: OwnedFd,
    /// Write: the remote stdout.
    pub stdout: OwnedFd,
    /// Write: the remote stderr.
    pub stderr: OwnedFd,
}

/// The descriptors of a NEW_STDIO_FWD.
#[derive(Debug)]
pub struct StdioFds {
    /// Read: bytes for the forwarded connection.
    pub input: OwnedFd,
    /// Write: bytes from the forwarded connection.
    pub output: OwnedFd,
}

/// The client's terminal, read when the descriptors arrived.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TtyInfo {
    /// Modes for the pty-req (empty if stdin is not a terminal).
    pub modes: Vec<(russh::Pty, u32)>,
    /// Size for the pty-req (zero if stdin is not a terminal).
    pub size: WindowSize,
}

/// Who sent a request, and whether they are still there.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Serial number of the control connection (for logs).
    pub conn_id: u64,
    /// The client's pid, from SO_PEERCRED.
    pub pid: Option<i32>,
    /// Cancelled when the connection closes or fails.
    closed: CancellationToken,
}

impl ClientInfo {
    /// Whether the control connection is closed (or closing).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the control connection closes: the client hung up or
    /// misbehaved, or the layer closed it.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }
}

/// A request for the higher layer, with who sent it.
#[derive(Debug)]
pub struct MuxEvent {
    /// The requesting connection.
    pub client: ClientInfo,
    /// What it asks.
    pub request: MuxRequest,
}

/// The requests the driver hands on.
#[derive(Debug)]
pub enum MuxRequest {
    /// NEW_SESSION: `ssh host [cmd]`, scp, sftp, rsync, git.
    NewSession {
        /// Command, flags, TERM, environment.
        session: NewSession,
        /// The client's stdin, stdout, stderr.
        fds: SessionFds,
        /// Terminal modes and size when `session.want_tty`.
        tty: Option<TtyInfo>,
        /// SESSION_OPENED or an error.
        reply: SessionReply,
    },
    /// NEW_STDIO_FWD: `ssh -W target`.
    StdioForward {
        /// Where to connect from the server.
        target: MuxAddr,
        /// The client's stdin and stdout.
        fds: StdioFds,
        /// SESSION_OPENED or an error.
        reply: StdioReply,
    },
    /// OPEN_FWD: `-L`/`-R`/`-D` on a mux command line, `ssh -O forward`.
    OpenForward {
        /// The forward.
        forward: Forward,
        /// OK, REMOTE_PORT or an error.
        reply: ForwardReply,
    },
    /// CLOSE_FWD: `ssh -O cancel`.
    CloseForward {
        /// The forward, as it was opened.
        forward: Forward,
        /// OK, or FAILURE "port not forwarded".
        reply: Reply,
    },
    /// TERMINATE: `ssh -O exit`.
    Terminate {
        /// OK or PERMISSION_DENIED.
        reply: Reply,
    },
    /// STOP_LISTENING: `ssh -O stop`. To comply, answer OK and cancel
    /// [`MuxServer::stop_token`]: the socket goes away, sessions stay.
    StopListening {
        /// OK or PERMISSION_DENIED.
        reply: Reply,
    },
    /// EXT_INFO (only with [`MuxConfig::info_extension`]).
    Info {
        /// `connection` or `channels`.
        what: String,
        /// The text to print.
        reply: InfoReply,
    },
}

/// Replies the reader may have queued but not yet written: a client that
/// sends requests without reading the answers stops being read, instead of
/// growing the queue.
const MAX_UNWRITTEN: usize = 64;

/// What the writer task sends.
#[derive(Debug)]
enum Outbound {
    /// A framed packet, with the reader's credit for it if the reader
    /// queued it (released once written).
    Packet(Vec<u8>, Option<OwnedSemaphorePermit>),
    /// Close the connection after what is queued.
    Close,
}

/// The way to answer one request: its id and the connection's queue.
#[derive(Debug)]
struct Slot {
    /// Request id to echo.
    rid: u32,
    /// The connection's outbound queue.
    out: mpsc::UnboundedSender<Outbound>,
    /// Tells the reader the reply is queued, so it may read on.
    done: oneshot::Sender<()>,
    /// The connection's closed token, for session controls.
    closed: CancellationToken,
}

impl Slot {
    /// Queues `msg`, then lets the reader continue.
    fn send(self, msg: ServerMessage) -> (mpsc::UnboundedSender<Outbound>, CancellationToken) {
        // A closed queue means the connection is gone; nothing to tell.
        let _ = self.out.send(Outbound::Packet(msg.encode(), None));
        let _ = self.done.send(());
        (self.out, self.closed)
    }

    /// FAILURE with `reason`.
    fn failure(self, reason: &str) {
        let rid = self.rid;
        self.send(ServerMessage::Failure {
            rid,
            reason: reason.to_string(),
        });
    }

    /// PERMISSION_DENIED with `reason`.
    fn denied(self, reason: &str) {
        let rid = self.rid;
        self.send(ServerMessage::PermissionDenied {
            rid,
            reason: reason.to_string(),
        });
    }
}

/// Reply to a request answered with OK or an error.
#[derive(Debug)]
pub struct Reply(Slot);

impl Reply {
    /// OK.
    pub fn ok(self) {
        let rid = self.0.rid;
        self.0.send(ServerMessage::Ok { rid });
    }

    /// FAILURE; the client prints `reason`.
    pub fn failure(self, reason: &str) {
        self.0.failure(reason)
    }

    /// PERMISSION_DENIED; the client prints `reason`.
    pub fn permission_denied(self, reason: &str) {
        self.0.denied(reason)
    }
}

/// Reply to OPEN_FWD.
#[derive(Debug)]
pub struct ForwardReply(Slot);

impl ForwardReply {
    /// OK: the forward is set up (or already was).
    pub fn ok(self) {
        let rid = self.0.rid;
        self.0.send(ServerMessage::Ok { rid });
    }

    /// REMOTE_PORT: the port the server allocated for a `-R 0:...` forward.
    pub fn remote_port(self, port: u16) {
        let rid = self.0.rid;
        self.0.send(ServerMessage::RemotePort {
            rid,
            port: port.into(),
        });
    }

    /// FAILURE; the client prints `reason`.
    pub fn failure(self, reason: &str) {
        self.0.failure(reason)
    }

    /// PERMISSION_DENIED; the client prints `reason`.
    pub fn permission_denied(self, reason: &str) {
        self.0.denied(reason)
    }
}

/// Reply to EXT_INFO.
#[derive(Debug)]
pub struct InfoReply(Slot);

impl InfoReply {
    /// The information (the client prints it as is).
    pub fn info(self, text: &str) {
        let rid = self.0.rid;
        self.0.send(ServerMessage::ExtInfo {
            rid,
            ok: true,
            message: text.to_string(),
        });
    }

    /// Not available; the client prints `text`.
    pub fn unsupported(self, text: &str) {
        let rid = self.0.rid;
        self.0.send(ServerMessage::ExtInfo {
            rid,
            ok: false,
            message: text.to_string(),
        });
    }
}

/// Session ids: unique in the process, echoed in EXIT_MESSAGE.
static NEXT_SESSION: AtomicU32 = AtomicU32::new(1);
/// Connection serial numbers.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// Reply to NEW_SESSION.
#[derive(Debug)]
pub struct SessionReply(Slot);

impl SessionReply {
    /// SESSION_OPENED; returns the handle for the rest of the session.
    pub fn opened(self) -> SessionControl {
        let rid = self.0.rid;
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let (out, closed) = self.0.send(ServerMessage::SessionOpened {
            rid,
            session_id: id,
        });
        SessionControl {
            id,
            out: Some(out),
            closed,
        }
    }

    /// FAILURE; the client prints `reason`. (OpenSSH clients then connect
    /// directly, without the master.)
    pub fn failure(self, reason: &str) {
        self.0.failure(reason)
    }

    /// PERMISSION_DENIED; the client prints `reason`.
    pub fn permission_denied(self, reason: &str) {
        self.0.denied(reason)
    }
}

/// Reply to NEW_STDIO_FWD.
#[derive(Debug)]
pub struct StdioReply(Slot);

impl StdioReply {
    /// SESSION_OPENED; returns the handle for the rest of the forward.
    pub fn opened(self) -> StdioControl {
        let rid = self.0.rid;
        let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
        let (out, closed) = self.0.send(ServerMessage::SessionOpened {
            rid,
            session_id: id,
        });
        StdioControl {
            out: Some(out),
            closed,
        }
    }

    /// FAILURE (fatal for the client, which prints `reason`).
    pub fn failure(self, reason: &str) {
        self.0.failure(reason)
    }

    /// PERMISSION_DENIED (fatal for the client, which prints `reason`).
    pub fn permission_denied(self, reason: &str) {
        self.0.denied(reason)
    }
}

/// The open session's side of the control connection. Dropping it closes
/// the connection without an exit status (the client exits 255).
#[derive(Debug)]
pub struct SessionControl {
    /// The session id the client knows.
    id: u32,
    /// The connection's queue; `None` once closed.
    out: Option<mpsc::UnboundedSender<Outbound>>,
    /// The connection's closed token.
    closed: CancellationToken,
}

impl SessionControl {
    /// The session id sent in SESSION_OPENED.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// TTY_ALLOC_FAIL: the server refused the pty; the client leaves raw
    /// mode.
    pub fn tty_alloc_failed(&self) {
        if let Some(out) = &self.out {
            let _ = out.send(Outbound::Packet(
                ServerMessage::TtyAllocFail {
                    session_id: self.id,
                }
                .encode(),
                None,
            ));
        }
    }

    /// EXIT_MESSAGE with `status`, then closes the control connection; the
    /// client exits with `status`. Flush and drop the output writers first.
    pub fn exit(mut self, status: u32) {
        if let Some(out) = self.out.take() {
            let _ = out.send(Outbound::Packet(
                ServerMessage::ExitMessage {
                    session_id: self.id,
                    exit_value: status,
                }
                .encode(),
                None,
            ));
            let _ = out.send(Outbound::Close);
        }
    }

    /// Closes the control connection without an exit status (the client
    /// exits 255), e.g. when the command died of a signal or the upstream
    /// was lost.
    pub fn close(mut self) {
        if let Some(out) = self.out.take() {
            let _ = out.send(Outbound::Close);
        }
    }

    /// Whether the control connection is closed (the client is gone).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the control connection closes.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }
}

impl Drop for SessionControl {
    fn drop(&mut self) {
        if let Some(out) = self.out.take() {
            let _ = out.send(Outbound::Close);
        }
    }
}

/// The open stdio forward's side of the control connection. Closing (or
/// dropping) it ends the client.
#[derive(Debug)]
pub struct StdioControl {
    /// The connection's queue; `None` once closed.
    out: Option<mpsc::UnboundedSender<Outbound>>,
    /// The connection's closed token.
    closed: CancellationToken,
}

impl StdioControl {
    /// Closes the control connection; the client exits 0.
    pub fn close(mut self) {
        if let Some(out) = self.out.take() {
            let _ = out.send(Outbound::Close);
        }
    }

    /// Whether the control connection is closed (the client is gone).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the control connection closes.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }
}

impl Drop for StdioControl {
    fn drop(&mut self) {
        if let Some(out) = self.out.take() {
            let _ = out.send(Outbound::Close);
        }
    }
}

/// Accepts mux clients on a [`MuxListener`] and drives each connection.
#[derive(Debug)]
pub struct MuxServer {
    /// The control socket.
    listener: MuxListener,
    /// Driver settings.
    config: Arc<MuxConfig>,
    /// Where requests go.
    events: mpsc::Sender<MuxEvent>,
    /// Cancelled to stop listening.
    stop: CancellationToken,
}

impl MuxServer {
    /// A server handing requests to `events`.
    pub fn new(listener: MuxListener, events: mpsc::Sender<MuxEvent>) -> MuxServer {
        MuxServer {
            listener,
            config: Arc::new(MuxConfig::default()),
            events,
            stop: CancellationToken::new(),
        }
    }

    /// Replaces the default [`MuxConfig`].
    pub fn with_config(mut self, config: MuxConfig) -> MuxServer {
        self.config = Arc::new(config);
        self
    }

    /// Cancel this token to stop accepting (e.g. after STOP_LISTENING):
    /// [`run`](Self::run) returns and removes the socket; open
    /// connections and their sessions carry on.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Accepts until stopped or until the event receiver is dropped, each
    /// connection on its own task. Removes the socket file on return.
    pub async fn run(self) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = self.events.closed() => break,
                r = self.listener.accept() => match r {
                    Ok(stream) => {
                        tokio::spawn(serve_connection(
                            stream,
                            self.config.clone(),
                            self.events.clone(),
                        ));
                    }
                    Err(e) => {
                        // Transient (e.g. EMFILE): back off rather than spin.
                        tracing::warn!("mux socket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}

/// Why a connection ended early.
#[derive(Debug)]
enum ConnEnd {
    /// Socket-level failure or a hostile stream.
    Control(ControlError),
    /// A packet that does not parse.
    Decode(DecodeError),
    /// A protocol violation.
    Protocol(String),
    /// The client hung up while a request was pending.
    Left,
}

impl fmt::Display for ConnEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnEnd::Control(e) => e.fmt(f),
            ConnEnd::Decode(e) => write!(f, "malformed request: {e}"),
            ConnEnd::Protocol(s) => f.write_str(s),
            ConnEnd::Left => f.write_str("client left while its request was pending"),
        }
    }
}

impl From<ControlError> for ConnEnd {
    fn from(e: ControlError) -> Self {
        ConnEnd::Control(e)
    }
}

/// Drives one accepted control connection (peer already checked) until the
/// client stops talking. Replies and session messages are written by a
/// separate task that lives as long as any reply or control handle does.
pub async fn serve_connection(
    stream: UnixStream,
    config: Arc<MuxConfig>,
    events: mpsc::Sender<MuxEvent>,
) {
    let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    let pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let stream = Arc::new(stream);
    let closed = CancellationToken::new();
    let (out, out_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_loop(stream.clone(), out_rx, closed.clone()));
    let mut extensions = Vec::new();
    if config.info_extension {
        extensions.push(("info".to_string(), b"0".to_vec()));
    }
    let _ = out.send(Outbound::Packet(
        ServerMessage::Hello { extensions }.encode(),
        None,
    ));
    let mut conn = Conn {
        stream,
        out,
        events,
        config,
        client: ClientInfo {
            conn_id,
            pid,
            closed: closed.clone(),
        },
        reader: PacketReader::new(),
        credit: Arc::new(Semaphore::new(MAX_UNWRITTEN)),
        permit: None,
        hello: false,
        session: false,
    };
    match conn.run().await {
        Ok(()) => tracing::debug!(conn_id, "mux client disconnected"),
        Err(e @ (ConnEnd::Left | ConnEnd::Control(ControlError::ClosedMidPacket))) => {
            tracing::debug!(conn_id, "mux client: {e}")
        }
        Err(e) => tracing::warn!(conn_id, ?pid, "closing mux client connection: {e}"),
    }
    closed.cancel();
}

/// Writes queued packets; on Close, a write error or when every sender is
/// gone, shuts the socket down (waking the reader and the client).
async fn write_loop(
    stream: Arc<UnixStream>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    closed: CancellationToken,
) {
    while let Some(o) = rx.recv().await {
        match o {
            // The reader's credit, if any, is released after the write.
            Outbound::Packet(p, _credit) => {
                if let Err(e) = fdpass::write_all(&stream, &p).await {
                    tracing::debug!("mux client write failed: {e}");
                    break;
                }
            }
            Outbound::Close => break,
        }
    }
    // SAFETY: shutdown on a descriptor the Arc keeps open.
    unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR) };
    closed.cancel();
}

/// The reader side of one connection.
struct Conn {
    /// The control socket (shared with the writer).
    stream: Arc<UnixStream>,
    /// Outbound queue.
    out: mpsc::UnboundedSender<Outbound>,
    /// Where requests go.
    events: mpsc::Sender<MuxEvent>,
    /// Driver settings.
    config: Arc<MuxConfig>,
    /// Handed out with each event.
    client: ClientInfo,
    /// Packet reassembly.
    reader: PacketReader,
    /// Bounds the replies queued by the reader and not yet written.
    credit: Arc<Semaphore>,
    /// Credit for the reply to the packet being handled.
    permit: Option<OwnedSemaphorePermit>,
    /// The client's HELLO arrived.
    hello: bool,
    /// A session or stdio forward was requested on this connection.
    session: bool,
}

impl Conn {
    /// Reads and handles requests until the client hangs up.
    async fn run(&mut self) -> Result<(), ConnEnd> {
        loop {
            // Wait for the writer to catch up before reading more.
            self.permit = self.credit.clone().acquire_owned().await.ok();
            let Some(body) = self.reader.read_packet(&self.stream).await? else {
                return Ok(());
            };
            let m = proto::decode_client(&body).map_err(ConnEnd::Decode)?;
            if !self.hello {
                match m {
                    ClientMessage::Hello { version, .. } if version == proto::MUX_VERSION => {
                        self.hello = true;
                        continue;
                    }
                    ClientMessage::Hello { version, .. } => {
                        return Err(ConnEnd::Protocol(format!(
                            "client speaks mux protocol version {version}, not {}",
                            proto::MUX_VERSION
                        )));
                    }
                    _ => return Err(ConnEnd::Protocol("request before HELLO".into())),
                }
            }
            self.handle(m).await?;
        }
    }

    /// Handles one request after HELLO.
    async fn handle(&mut self, m: ClientMessage) -> Result<(), ConnEnd> {
        let fds_following = m.fds_following();
        match m {
            ClientMessage::Hello { .. } => Err(ConnEnd::Protocol("HELLO received twice".into())),
            ClientMessage::AliveCheck { rid } => {
                self.send(ServerMessage::Alive {
                    rid,
                    pid: self.config.alive_pid,
                });
                Ok(())
            }
            ClientMessage::Proxy { rid } | ClientMessage::Unknown { rid, .. } => {
                self.fail(rid, "unsupported request");
                Ok(())
            }
            ClientMessage::ExtInfo { rid, what } => {
                if !self.config.info_extension {
                    self.fail(rid, "unsupported request");
                    return Ok(());
                }
                self.dispatch(rid, |s| MuxRequest::Info {
                    what,
                    reply: InfoReply(s),
                })
                .await
            }
            ClientMessage::Invalid { rid, reason, .. } => {
                // Descriptors may still follow: take them so the stream
                // stays in step, then close them.
                let fds = self.recv_fds(rid, fds_following).await?;
                drop(fds);
                self.fail(rid, reason);
                Ok(())
            }
            ClientMessage::NewSession { rid, session } => {
                let mut fds = self.recv_fds(rid, 3).await?.into_iter();
                let (Some(stdin), Some(stdout), Some(stderr)) =
                    (fds.next(), fds.next(), fds.next())
                else {
                    return Err(ConnEnd::Protocol("descriptors missing".into()));
                };
                if self.session {
                    self.fail(rid, "Multiple sessions not supported");
                    return Ok(());
                }
                self.session = true;
                let tty = session.want_tty.then(|| tty_info(&stdin));
                let fds = SessionFds {
                    stdin,
                    stdout,
                    stderr,
                };
                self.dispatch(rid, |s| MuxRequest::NewSession {
                    session,
                    fds,
                    tty,
                    reply: SessionReply(s),
                })
                .await
            }
            ClientMessage::NewStdioFwd { rid, target } => {
                let mut fds = self.recv_fds(rid, 2).await?.into_iter();
                let (Some(input), Some(output)) = (fds.next(), fds.next()) else {
                    return Err(ConnEnd::Protocol("descriptors missing".into()));
                };
                if self.session {
                    self.fail(rid, "Multiple sessions not supported");
                    return Ok(());
                }
                self.session = true;
                self.dispatch(rid, |s| MuxRequest::StdioForward {
                    target,
                    fds: StdioFds { input, output },
                    reply: StdioReply(s),
                })
                .await
            }
            ClientMessage::OpenFwd { rid, forward } => {
                self.dispatch(rid, |s| MuxRequest::OpenForward {
                    forward,
                    reply: ForwardReply(s),
                })
                .await
            }
            ClientMessage::CloseFwd { rid, forward } => {
                self.dispatch(rid, |s| MuxRequest::CloseForward {
                    forward,
                    reply: Reply(s),
                })
                .await
            }
            ClientMessage::Terminate { rid } => {
                self.dispatch(rid, |s| MuxRequest::Terminate { reply: Reply(s) })
                    .await
            }
            ClientMessage::StopListening { rid } => {
                self.dispatch(rid, |s| MuxRequest::StopListening { reply: Reply(s) })
                    .await
            }
        }
    }

    /// Queues a reply, with the credit taken for this packet.
    fn send(&mut self, m: ServerMessage) {
        let _ = self
            .out
            .send(Outbound::Packet(m.encode(), self.permit.take()));
    }

    /// Queues FAILURE.
    fn fail(&mut self, rid: u32, reason: &str) {
        self.send(ServerMessage::Failure {
            rid,
            reason: reason.to_string(),
        });
    }

    /// Receives `n` descriptors; on failure answers as OpenSSH does and
    /// ends the connection.
    async fn recv_fds(&mut self, rid: u32, n: usize) -> Result<Vec<OwnedFd>, ConnEnd> {
        let mut fds = Vec::with_capacity(n);
        for _ in 0..n {
            match fdpass::recv_fd(&self.stream).await {
                Ok(fd) => fds.push(fd),
                Err(e) => {
                    self.fail(rid, "did not receive file descriptors");
                    return Err(e.into());
                }
            }
        }
        Ok(fds)
    }

    /// Hands a request to the layer and waits until it is answered,
    /// watching for the client hanging up meanwhile.
    async fn dispatch(
        &mut self,
        rid: u32,
        make: impl FnOnce(Slot) -> MuxRequest,
    ) -> Result<(), ConnEnd> {
        let (done, mut answered) = oneshot::channel();
        let slot = Slot {
            rid,
            out: self.out.clone(),
            done,
            closed: self.client.closed.clone(),
        };
        let event = MuxEvent {
            client: self.client.clone(),
            request: make(slot),
        };
        if self.events.send(event).await.is_err() {
            // The event (and its reply slot) came back and was dropped.
            self.fail(rid, "sshshim is shutting down");
            return Ok(());
        }
        let mut watch = true;
        loop {
            tokio::select! {
                r = &mut answered => {
                    if r.is_err() {
                        self.fail(rid, "request dropped by sshshim");
                    }
                    return Ok(());
                }
                r = fdpass::wait_readable_or_eof(&self.stream), if watch => match r {
                    Ok(false) => watch = false, // more requests queued: read them later
                    Ok(true) | Err(_) => {
                        self.client.closed.cancel();
                        return Err(ConnEnd::Left);
                    }
                },
            }
        }
    }
}

/// The terminal facts of a tty session's stdin, read right away.
fn tty_info(stdin: &OwnedFd) -> TtyInfo {
    let fd = stdin.as_fd();
    if !fds::is_tty(fd) {
        return TtyInfo::default();
    }
    let modes = fds::terminal_modes(fd).unwrap_or_else(|e| {
        tracing::debug!("cannot read the client's terminal modes: {e}");
        Vec::new()
    });
    let size = fds::window_size(fd).unwrap_or_default();
    TtyInfo { modes, size }
}

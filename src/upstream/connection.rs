//! One authenticated upstream SSH connection: its russh callbacks (which
//! only turn into events), its keepalive monitor, and its load count.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::PublicKeyOrCertificate;
use tokio::sync::{mpsc, watch};

use super::UpstreamError;
use super::known_hosts::HostKeyVerifier;

/// A channel the server opened towards us. The upstream only reports
/// these; whoever consumes the events (forwarding) decides where they go
/// and must answer `reply`.
pub struct ServerOpen {
    /// What kind of channel.
    pub kind: ServerOpenKind,
    /// The channel.
    pub channel: russh::Channel<client::Msg>,
    /// Accept or refuse.
    pub reply: client::ChannelOpenHandle,
    /// Which upstream connection it came on (sshd keeps one agent socket
    /// per connection).
    pub generation: u64,
    /// That connection's congestion counter (see `bridge::Options`).
    pub congestion: Arc<AtomicUsize>,
    /// Counts the channel against the connection's cap on server-opened
    /// channels until dropped: hold it as long as the channel lives.
    pub slot: ServerSlot,
}

/// One server-opened channel counted against
/// [`crate::tuning::MAX_SERVER_CHANNELS`]; frees its place when dropped.
pub struct ServerSlot(Arc<AtomicUsize>);

impl ServerSlot {
    /// Takes a place in `count` unless all `max` are taken.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<ServerSlot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ServerSlot(count.clone()))
    }
}

impl Drop for ServerSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The kinds of channel a server opens.
pub enum ServerOpenKind {
    /// A connection to a remote (`-R`) forward's TCP port.
    ForwardedTcpip {
        /// The address the server listens on, as it reports it.
        connected_address: String,
        /// The port the server listens on.
        connected_port: u32,
        /// Who connected to it.
        originator_address: String,
        /// Their port.
        originator_port: u32,
    },
    /// A connection to a remote forward's Unix socket.
    ForwardedStreamlocal {
        /// The socket the server listens on.
        socket_path: String,
    },
    /// A remote process talking to the forwarded agent.
    Agent,
}

/// russh callbacks for the upstream connection.
pub struct ClientHandler {
    /// Checks the server's host key.
    pub(super) verifier: HostKeyVerifier,
    /// Where channels the server opens are reported; `None` on a jump host,
    /// whose channels are refused.
    pub(super) events: Option<mpsc::Sender<ServerOpen>>,
    /// The generation of the connection this handler serves.
    pub(super) generation: u64,
    /// The congestion counter of that connection.
    pub(super) congestion: Arc<AtomicUsize>,
    /// Told when the connection ends, with the reason.
    pub(super) closed: watch::Sender<Option<String>>,
    /// The server's version string, learnt during the handshake.
    pub(super) server_version: Arc<Mutex<String>>,
    /// Server-opened channels of this connection open or being routed now.
    pub(super) server_channels: Arc<AtomicUsize>,
    /// Channels of a kind we never ask for that the server opened (they are
    /// refused; only the first is logged above debug level).
    pub(super) unasked: u64,
}

impl ClientHandler {
    /// Reports a channel the server opened; refuses it when nobody listens
    /// or too many are waiting (the session loop must not wait here).
    async fn report(
        &self,
        kind: ServerOpenKind,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
    ) {
        let Some(tx) = &self.events else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        };
        let Some(slot) =
            ServerSlot::take(&self.server_channels, crate::tuning::MAX_SERVER_CHANNELS)
        else {
            tracing::warn!(
                "refusing a channel the server opened: {} are open already",
                crate::tuning::MAX_SERVER_CHANNELS
            );
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return;
        };
        let ev = ServerOpen {
            kind,
            channel,
            reply,
            generation: self.generation,
            congestion: self.congestion.clone(),
            slot,
        };
        if let Err(e) = tx.try_send(ev) {
            let ev = match e {
                mpsc::error::TrySendError::Full(ev) | mpsc::error::TrySendError::Closed(ev) => ev,
            };
            tracing::warn!("refusing a channel the server opened: too many waiting");
            ev.reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
        }
    }

    /// Refuses a channel of a kind sshshim never asks the server for
    /// (a session, direct-tcpip or direct-streamlocal towards us, X11: we
    /// never request X11 forwarding). russh would accept these by default.
    async fn refuse_unasked(&mut self, kind: &str, reply: client::ChannelOpenHandle) {
        self.unasked += 1;
        if self.unasked == 1 {
            tracing::warn!("the server opened a {kind} channel sshshim never asked for: refused");
        } else {
            tracing::debug!("refused an unasked-for {kind} channel from the server");
        }
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
    }
}

impl client::Handler for ClientHandler {
    type Error = UpstreamError;

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        _names: &russh::Names,
        session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        *self.server_version.lock().unwrap() =
            String::from_utf8_lossy(session.remote_sshid()).into_owned();
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            // We never ask for certificates, so a server must not send one.
            _ => return Ok(false),
        };
        self.verifier.verify(&key).map_err(UpstreamError::HostKey)?;
        Ok(true)
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.report(ServerOpenKind::Agent, channel, reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let kind = ServerOpenKind::ForwardedTcpip {
            connected_address: connected_address.to_owned(),
            connected_port,
            originator_address: originator_address.to_owned(),
            originator_port,
        };
        self.report(kind, channel, reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: russh::Channel<client::Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let kind = ServerOpenKind::ForwardedStreamlocal {
            socket_path: socket_path.to_owned(),
        };
        self.report(kind, channel, reply).await;
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse_unasked("session", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse_unasked("direct-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse_unasked("direct-streamlocal", reply).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.refuse_unasked("x11", reply).await;
        Ok(())
    }

    // Said explicitly although it is russh's default: a channel type russh
    // does not know is answered "unknown channel type" and never created.
    async fn should_accept_unknown_server_channel(
        &mut self,
        _id: russh::ChannelId,
        channel_type: &str,
    ) -> bool {
        tracing::debug!(
            "refused a channel of unknown type {:?} from the server",
            channel_type.escape_debug().to_string()
        );
        false
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let why = match reason {
            client::DisconnectReason::ReceivedDisconnect(_) => {
                "the server closed the connection".into()
            }
            client::DisconnectReason::Error(e) => e.to_string(),
        };
        let _ = self.closed.send(Some(why));
        Ok(())
    }
}

/// One authenticated upstream SSH connection.
pub struct Connection {
    /// The russh handle; channels are opened through it.
    pub handle: client::Handle<ClientHandler>,
    /// Becomes `Some(reason)` when the connection is gone.
    pub(super) closed: watch::Receiver<Option<String>>,
    /// Lets the keepalive monitor declare the connection dead.
    pub(super) kill: watch::Sender<Option<String>>,
    /// A second handle on the socket: shutting it down ends russh's session
    /// at once even when a write is stuck on a dead path.
    pub(super) socket: std::net::TcpStream,
    /// Monotonic id, so owners can tell a reconnect happened.
    pub generation: u64,
    /// The server's version string.
    pub server_version: String,
    /// Round-trip time of the last answered keepalive.
    pub rtt: Mutex<Option<Duration>>,
    /// Session channels open on this connection (for placing new ones).
    pub(super) sessions: AtomicUsize,
    /// Channels of any kind open on this connection (an extra connection
    /// closes when this stays 0).
    pub(super) channels: AtomicUsize,
    /// Channels whose pump waits for a stalled local reader: while any
    /// does, the connection's reads wait too, so it takes no new channels.
    pub(super) congestion: Arc<AtomicUsize>,
    /// Connections to the jump hosts this one runs through (kept alive).
    pub(super) _jumps: Vec<client::Handle<ClientHandler>>,
    /// A session channel opened in advance (see [`Connection::replenish`]).
    pub(super) spare: Mutex<Spare>,
    /// Asks the keepalive monitor for a probe now (the network changed).
    pub(super) probe: tokio::sync::Notify,
}

/// The spare session channel of a connection. A new session takes it and
/// sends its requests at once, so its output arrives one round trip later
/// instead of two.
#[derive(Default)]
pub(super) struct Spare {
    /// The channel, if one is ready.
    chan: Option<russh::Channel<client::Msg>>,
    /// An open is under way.
    opening: bool,
    /// Spares in a row the server closed before they were used (an idle
    /// policy such as OpenSSH's `ChannelTimeout session=...`).
    dead: u32,
    /// Given up keeping one on this connection.
    off: bool,
}

/// Spares in a row found closed by the server after which a connection
/// stops keeping one: an admin's idle policy must not become a loop.
const MAX_DEAD_SPARES: u32 = 3;

/// A byte stream an SSH connection can run over: a TCP socket, or a channel
/// through a jump host.
pub(super) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Counts one channel against its connection while alive.
pub struct LoadGuard {
    /// The connection.
    conn: Arc<Connection>,
    /// Whether it is a session (counted for MaxSessions placement).
    session: bool,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.conn.channels.fetch_sub(1, Ordering::Relaxed);
        if self.session {
            self.conn.sessions.fetch_sub(1, Ordering::Relaxed);
            // A spare refused at MaxSessions may fit now.
            if tokio::runtime::Handle::try_current().is_ok() {
                self.conn.replenish();
            }
        }
    }
}

/// A channel to open upstream.
pub enum Open {
    /// A session (shell, exec, subsystem).
    Session,
    /// `direct-tcpip` (`-L`, `-D`, `-W`).
    DirectTcpip {
        /// Host to connect to, from the server.
        host: String,
        /// Its port.
        port: u32,
        /// Who asked, for the server's logs.
        originator: String,
        /// Their port.
        originator_port: u32,
    },
    /// `direct-streamlocal@openssh.com`: a Unix socket on the server.
    DirectStreamlocal(String),
}

impl Open {
    /// Whether this is a session (which MaxSessions limits).
    pub fn is_session(&self) -> bool {
        matches!(self, Open::Session)
    }

    /// The SSH channel type, for logs and meters.
    pub fn kind(&self) -> &'static str {
        match self {
            Open::Session => "session",
            Open::DirectTcpip { .. } => "direct-tcpip",
            Open::DirectStreamlocal(_) => "direct-streamlocal",
        }
    }
}

/// A channel opened upstream, with what its bridge must hold and report.
pub struct Opened {
    /// The channel.
    pub channel: russh::Channel<client::Msg>,
    /// Counts it against its connection until dropped.
    pub load: LoadGuard,
    /// The connection's congestion counter (see `bridge::Options`).
    pub congestion: Arc<AtomicUsize>,
    /// Which connection it is on.
    pub generation: u64,
}

/// Why there is no live upstream connection to use (see
/// [`super::Pool::connection`]); the text is what a client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// Still reconnecting when the connect timeout ran out.
    #[error("upstream unavailable: reconnecting (attempt {attempt}, last error: {last_error})")]
    Reconnecting {
        /// The attempt under way or next.
        attempt: u32,
        /// Why the last attempt or connection failed.
        last_error: String,
    },
    /// Given up for good (host key changed, credentials rejected, shut
    /// down): the reason.
    #[error("upstream unavailable: {0}")]
    Failed(String),
    /// The pool is being dropped.
    #[error("upstream unavailable: shutting down")]
    ShuttingDown,
    /// The connection closed as the timeout ran out, before a new one.
    #[error("upstream unavailable: connection just closed")]
    JustClosed,
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No live upstream connection within the connect timeout; the text
    /// says why ("upstream unavailable: reconnecting (attempt N, ...)").
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// The server refused (or the connection failed during the open).
    #[error("{0}")]
    Refused(russh::Error),
}

impl OpenError {
    /// The refusal to pass on to the matching local channel: the server's
    /// code with sshd's text for it, or "connect failed" with why there is
    /// no upstream ("upstream unavailable: reconnecting ...").
    pub fn reason(&self) -> russh::ChannelOpenFailure {
        let (code, text) = match self {
            OpenError::Unavailable(why) => (2, why.to_string()),
            OpenError::Refused(russh::Error::ChannelOpenFailure(f)) => {
                (f.code(), open_failure_text(f).to_owned())
            }
            OpenError::Refused(e) => (2, format!("upstream channel open failed: {e}")),
        };
        russh::ChannelOpenFailure::Other { code, reason: text }
    }
}

/// The text sshd sends with each refusal code. russh 0.65 drops the
/// server's own text and keeps only the code, so this is sshd's usual text
/// for it: a refused `-L` target reads "open failed: connect failed:
/// Connection refused" on the client, as it does against sshd.
fn open_failure_text(code: &russh::ChannelOpenFailure) -> &str {
    use russh::ChannelOpenFailure as F;
    match code {
        F::AdministrativelyProhibited => "administratively prohibited",
        F::ConnectFailed => "Connection refused",
        F::UnknownChannelType => "unknown channel type",
        F::ResourceShortage => "resource shortage",
        other => other.description(),
    }
}

/// Whether a session open was refused because the connection is full.
/// sshd answers "no more sessions" with "connect failed"; other servers say
/// "administratively prohibited" or "resource shortage". A session open has
/// nothing else to connect to, so all mean "full".
pub(super) fn refused(e: &russh::Error) -> bool {
    use russh::ChannelOpenFailure as F;
    matches!(
        e,
        russh::Error::ChannelOpenFailure(
            F::AdministrativelyProhibited | F::ConnectFailed | F::ResourceShortage
        )
    )
}

impl Connection {
    /// Session channels currently open on this connection.
    pub fn load(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Channels of any kind currently open on this connection.
    pub fn channel_count(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    /// Opens a spare session channel in the background if there is none
    /// (after a spare was taken, after connecting, when a session ends). A
    /// refusal (the spare counts against sshd's MaxSessions) is not an
    /// error: the pool opens another connection when a real session needs
    /// one. After spares the server closed unused, the next waits 2^n s.
    pub fn replenish(self: &Arc<Self>) {
        let delay = {
            let mut s = self.spare.lock().unwrap();
            if s.off || s.opening || s.chan.is_some() || !self.is_alive() {
                return;
            }
            s.opening = true;
            Duration::from_secs(if s.dead == 0 { 0 } else { 1 << s.dead })
        };
        let conn = self.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let r = conn.handle.channel_open_session().await;
            let mut s = conn.spare.lock().unwrap();
            s.opening = false;
            match r {
                Ok(ch) => s.chan = Some(ch),
                Err(e) => tracing::debug!("no spare session channel for now: {e}"),
            }
        });
    }

    /// Takes the spare session channel if there is a live one. One the
    /// server closed meanwhile has its close already queued: it is
    /// discarded (the caller opens a fresh channel, one round trip more).
    async fn take_spare(self: &Arc<Self>) -> Option<russh::Channel<client::Msg>> {
        let mut ch = self.spare.lock().unwrap().chan.take()?;
        // Polls once: anything queued on an unused channel means it ended.
        // (Not `timeout(Duration::ZERO, ..)`: Tokio rounds its deadline up
        // to the next millisecond tick, which cost every session open about
        // half a millisecond.)
        let pending = {
            let mut wait = std::pin::pin!(ch.wait());
            std::future::poll_fn(|cx| std::task::Poll::Ready(wait.as_mut().poll(cx).is_pending()))
                .await
        };
        let mut s = self.spare.lock().unwrap();
        if pending {
            s.dead = 0;
            return Some(ch);
        }
        s.dead += 1;
        if s.dead >= MAX_DEAD_SPARES {
            s.off = true;
            tracing::info!(
                "the server closed {MAX_DEAD_SPARES} unused spare sessions in a row \
                 (an idle policy such as ChannelTimeout): no longer keeping one"
            );
        }
        None
    }

    /// Opens a channel, counting it against this connection. A session
    /// takes the spare when there is one.
    pub(super) async fn open_counted(
        self: &Arc<Self>,
        what: &Open,
    ) -> Result<Opened, russh::Error> {
        let spare = match what {
            Open::Session => self.take_spare().await,
            _ => None,
        };
        let channel = match what {
            Open::Session if spare.is_some() => spare.expect("checked"),
            Open::Session => self.handle.channel_open_session().await?,
            Open::DirectTcpip {
                host,
                port,
                originator,
                originator_port,
            } => {
                self.handle
                    .channel_open_direct_tcpip(
                        host.clone(),
                        *port,
                        originator.clone(),
                        *originator_port,
                    )
                    .await?
            }
            Open::DirectStreamlocal(path) => {
                self.handle
                    .channel_open_direct_streamlocal(path.clone())
                    .await?
            }
        };
        self.channels.fetch_add(1, Ordering::Relaxed);
        if what.is_session() {
            self.sessions.fetch_add(1, Ordering::Relaxed);
            self.replenish();
        }
        Ok(Opened {
            channel,
            load: LoadGuard {
                conn: self.clone(),
                session: what.is_session(),
            },
            congestion: self.congestion.clone(),
            generation: self.generation,
        })
    }
}

impl Connection {
    /// The counter bridges raise while a stalled reader holds this
    /// connection's reads (see [`Connection::is_congested`]).
    pub fn congestion(&self) -> Arc<AtomicUsize> {
        self.congestion.clone()
    }

    /// Whether a stalled local reader holds this connection right now.
    pub fn is_congested(&self) -> bool {
        self.congestion.load(Ordering::Relaxed) > 0
    }

    /// Waits until this connection has ended and says why.
    pub async fn closed(&self) -> String {
        let mut rx = self.closed.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if self.handle.is_closed() {
                return "connection closed".into();
            }
            // Poll as a safety net: the handler is not told about every way
            // the session task can end.
            if tokio::time::timeout(Duration::from_millis(500), rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return "connection closed".into();
            }
        }
    }

    /// Declares the connection dead: every channel on it ends now.
    pub fn kill(&self, why: String) {
        let _ = self.kill.send(Some(why));
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// Asks for a keepalive probe now instead of at the next interval: the
    /// network changed, and the path may be dead.
    pub fn probe_now(&self) {
        self.probe.notify_one();
    }

    /// Whether the local address this connection was made from is gone
    /// from the machine (its path cannot work any more).
    fn local_address_gone(&self) -> bool {
        let Ok(local) = self.socket.local_addr() else {
            return false;
        };
        // Binding to an address only works while an interface has it.
        matches!(
            std::net::UdpSocket::bind((local.ip(), 0)),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable
        )
    }

    /// Sends a keepalive every `interval`; after `max` unanswered in a row
    /// the path is dead (a blackhole sends no RST, so nothing else would
    /// notice for a long time). Records the round-trip time. On a probe
    /// request (a network change) it checks at once: if our address is
    /// gone the connection is dead now; otherwise keepalives wait only a
    /// few round trips for their answer until one comes, so a path the
    /// change broke is noticed within seconds.
    pub(super) async fn monitor(self: Arc<Self>, interval: Duration, max: usize) {
        let mut missed = 0;
        let mut probing = false;
        let mut first_miss = None;
        loop {
            // After a miss the next keepalive is already due: we just waited
            // a whole interval (or a probe's timeout) for the answer.
            if missed == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = self.probe.notified() => probing = true,
                    _ = self.closed() => return,
                }
            }
            if probing && self.local_address_gone() {
                self.kill("the local network address of the connection is gone".into());
                return;
            }
            // A stalled local reader holds the session loop, and with it
            // the answer: then only the usual patience is fair.
            let wait = if probing && !self.is_congested() {
                let rtt = self.rtt.lock().unwrap().unwrap_or_default();
                (rtt * 4).max(crate::tuning::PROBE_TIMEOUT).min(interval)
            } else {
                interval
            };
            let sent = Instant::now();
            match tokio::time::timeout(wait, self.handle.send_ping()).await {
                Ok(Ok(())) => {
                    missed = 0;
                    probing = false;
                    first_miss = None;
                    *self.rtt.lock().unwrap() = Some(sent.elapsed());
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    missed += 1;
                    let since: Instant = *first_miss.get_or_insert(sent);
                    tracing::debug!("keepalive {missed}/{max} unanswered");
                    if missed >= max {
                        self.kill(format!(
                            "no answer to {max} keepalives in {:.0}s (dead network path?)",
                            since.elapsed().as_secs_f64()
                        ));
                        return;
                    }
                }
            }
        }
    }

    /// Whether the connection is still usable.
    pub fn is_alive(&self) -> bool {
        self.closed.borrow().is_none() && !self.handle.is_closed()
    }
}

/// russh client settings with the given receive window: the algorithm
/// preferences and packet sizes of every upstream connection. Public so a
/// diagnostic connection (`sshshim check`) negotiates exactly as the
/// upstream would.
pub fn client_config(window: u32) -> client::Config {
    client::Config {
        // Our own monitor sends keepalives (it measures RTT and can cut a
        // socket whose writes are stuck); russh's would only duplicate it.
        keepalive_interval: None,
        inactivity_timeout: None,
        window_size: window,
        maximum_packet_size: crate::tuning::MAX_PACKET,
        channel_buffer_size: crate::tuning::UPSTREAM_CHANNEL_BUFFER,
        preferred: crate::tuning::upstream_algorithms(),
        nodelay: true,
        ..Default::default()
    }
}

/// Closes an extra connection once it has carried no session for a while.
pub(super) async fn close_when_idle(conn: Arc<Connection>) {
    let mut idle_since = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = conn.closed() => return,
        }
        if conn.channel_count() > 0 {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= crate::tuning::EXTRA_IDLE {
            tracing::info!("closing an idle extra upstream connection");
            let _ = conn
                .handle
                .disconnect(russh::Disconnect::ByApplication, "idle", "en")
                .await;
            conn.kill("idle extra connection closed".into());
            return;
        }
    }
}

/// TCP keepalive catches a dead path even while SSH keepalives are not
/// due (and keeps idle NAT mappings alive).
pub(super) fn set_tcp_keepalive(stream: &tokio::net::TcpStream, interval: Duration) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(interval)
        .with_interval(interval)
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
}

//! The upstream connection: TCP connect, host key verification,
//! authentication, keepalive, and reconnect with backoff.
//!
//! One [`Upstream`] owns the single SSH connection every local channel is
//! multiplexed onto. Other modules ask it for the current [`Connection`]
//! and never see a connection being replaced.

pub mod auth;
pub mod known_hosts;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use russh::client;
use russh::keys::PublicKeyOrCertificate;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::UpConfig;
use crate::forward::Registry;
use auth::Authenticator;
use known_hosts::{HostKeyError, HostKeyVerifier};

/// Why an upstream connection could not be made or was lost.
#[derive(Debug)]
pub enum UpstreamError {
    /// The host key did not verify (unknown, changed or revoked).
    HostKey(HostKeyError),
    /// TCP connect failed.
    Connect {
        /// `host:port` as tried.
        target: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// TCP connect or the handshake took longer than the connect timeout.
    Timeout(String),
    /// The server rejected every credential we have.
    AuthRejected {
        /// Login name.
        user: String,
        /// Methods the server said it accepts.
        offered: String,
        /// What was tried, for the message.
        tried: String,
    },
    /// A key file could not be read or decrypted.
    BadKey(std::path::PathBuf, String),
    /// A secret is needed and there is no terminal to ask on.
    NoTerminal(String),
    /// The SSH protocol layer failed.
    Ssh(russh::Error),
    /// Anything else, already phrased for the user.
    Other(String),
}

impl UpstreamError {
    /// Whether retrying cannot help (a supervisor should stop, not loop).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            UpstreamError::HostKey(_)
                | UpstreamError::AuthRejected { .. }
                | UpstreamError::BadKey(..)
                | UpstreamError::NoTerminal(_)
        )
    }
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::HostKey(e) => write!(f, "{e}"),
            UpstreamError::Connect { target, source } => {
                let hint = match source.kind() {
                    std::io::ErrorKind::ConnectionRefused => {
                        " (connection refused: is sshd running on that port?)"
                    }
                    std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable => {
                        " (host unreachable: check the host name and your network)"
                    }
                    _ => "",
                };
                write!(f, "cannot connect to {target}: {source}{hint}")
            }
            UpstreamError::Timeout(target) => {
                write!(
                    f,
                    "timed out connecting to {target} (host unreachable or filtered?)"
                )
            }
            UpstreamError::AuthRejected {
                user,
                offered,
                tried,
            } => write!(
                f,
                "authentication as '{user}' was rejected; the server accepts: {offered}; \
                 tried: {tried}"
            ),
            UpstreamError::BadKey(p, e) => write!(f, "cannot use key file {}: {e}", p.display()),
            UpstreamError::NoTerminal(why) => write!(
                f,
                "{why}, but there is no terminal to ask on (use ssh-agent or an unencrypted key \
                 for unattended runs)"
            ),
            UpstreamError::Ssh(e) => write!(f, "SSH error: {e}"),
            UpstreamError::Other(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for UpstreamError {}

impl From<russh::Error> for UpstreamError {
    fn from(e: russh::Error) -> Self {
        UpstreamError::Ssh(e)
    }
}

/// russh callbacks for the upstream connection.
pub struct ClientHandler {
    /// Checks the server's host key.
    verifier: HostKeyVerifier,
    /// Routes forwarded-tcpip/streamlocal channels to their owners.
    forwards: Arc<Registry>,
    /// Told when the connection ends, with the reason.
    closed: watch::Sender<Option<String>>,
    /// Local sessions that asked for agent forwarding right now.
    agent_sessions: Arc<AtomicUsize>,
    /// The server's version string, learnt during the handshake.
    server_version: Arc<Mutex<String>>,
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
        // Local clients are our own user, so our own agent is theirs. sshd
        // keeps an agent socket for the whole connection once any session
        // asked for one, and agent channels name no session; so serve them
        // only while some local session that asked (-A) is open.
        let sock = std::env::var_os("SSH_AUTH_SOCK");
        if self.agent_sessions.load(Ordering::Relaxed) == 0 || sock.is_none() {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let Some(sock) = sock else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        match tokio::net::UnixStream::connect(&sock).await {
            Ok(mut agent) => {
                reply.accept().await;
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut agent).await;
                });
            }
            Err(e) => {
                tracing::warn!("agent forwarding: cannot reach {sock:?}: {e}");
                reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            }
        }
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
        self.forwards.route_tcpip(
            channel,
            connected_address,
            connected_port,
            originator_address,
            originator_port,
            reply,
        );
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: russh::Channel<client::Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.forwards.route_streamlocal(channel, socket_path, reply);
        Ok(())
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

/// Traffic and channel counters of one profile, for status and metrics.
#[derive(Default)]
pub struct Stats {
    /// Bytes from upstream to local clients.
    pub bytes_in: AtomicU64,
    /// Bytes from local clients to upstream.
    pub bytes_out: AtomicU64,
    /// Open bridged channels by kind.
    pub channels: Mutex<std::collections::BTreeMap<&'static str, usize>>,
}

impl Stats {
    /// Counts a bridged channel of `kind` until the meter is dropped.
    pub fn open(self: &Arc<Self>, kind: &'static str) -> ChannelMeter {
        *self.channels.lock().unwrap().entry(kind).or_default() += 1;
        ChannelMeter {
            stats: self.clone(),
            kind,
        }
    }
}

/// One bridged channel's share of [`Stats`].
pub struct ChannelMeter {
    /// The profile's counters.
    stats: Arc<Stats>,
    /// The channel kind.
    kind: &'static str,
}

impl ChannelMeter {
    /// Counts bytes delivered to the local side.
    pub fn add_in(&self, n: usize) {
        self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes sent upstream.
    pub fn add_out(&self, n: usize) {
        self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for ChannelMeter {
    fn drop(&mut self) {
        if let Some(n) = self.stats.channels.lock().unwrap().get_mut(self.kind) {
            *n = n.saturating_sub(1);
        }
    }
}

/// One authenticated upstream SSH connection.
pub struct Connection {
    /// The russh handle; channels are opened through it.
    pub handle: client::Handle<ClientHandler>,
    /// Becomes `Some(reason)` when the connection is gone.
    closed: watch::Receiver<Option<String>>,
    /// Lets the keepalive monitor declare the connection dead.
    kill: watch::Sender<Option<String>>,
    /// A second handle on the socket: shutting it down ends russh's session
    /// at once even when a write is stuck on a dead path.
    socket: std::net::TcpStream,
    /// Monotonic id, so owners can tell a reconnect happened.
    pub generation: u64,
    /// The server's version string.
    pub server_version: String,
    /// Round-trip time of the last answered keepalive.
    pub rtt: Mutex<Option<Duration>>,
    /// Session channels open on this connection (for placing new ones).
    sessions: AtomicUsize,
    /// Connections to the jump hosts this one runs through (kept alive).
    _jumps: Vec<client::Handle<ClientHandler>>,
}

/// A byte stream an SSH connection can run over: a TCP socket, or a channel
/// through a jump host.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Counts one session channel against its connection while alive.
pub struct LoadGuard(Arc<Connection>);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    /// Session channels currently open on this connection.
    pub fn load(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }

    /// Opens a session channel, counting it against this connection.
    async fn open_counted(
        self: &Arc<Self>,
    ) -> Result<(russh::Channel<client::Msg>, LoadGuard), russh::Error> {
        let ch = self.handle.channel_open_session().await?;
        self.sessions.fetch_add(1, Ordering::Relaxed);
        Ok((ch, LoadGuard(self.clone())))
    }
}

impl Connection {
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

    /// Sends a keepalive every `interval`; after `max` unanswered in a row
    /// the path is dead (a blackhole sends no RST, so nothing else would
    /// notice for a long time). Records the round-trip time.
    async fn monitor(self: Arc<Self>, interval: Duration, max: usize) {
        let mut missed = 0;
        loop {
            // After a miss the next keepalive is already due: we just waited
            // a whole interval for the answer.
            if missed == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = self.closed() => return,
                }
            }
            let sent = Instant::now();
            match tokio::time::timeout(interval, self.handle.send_ping()).await {
                Ok(Ok(())) => {
                    missed = 0;
                    *self.rtt.lock().unwrap() = Some(sent.elapsed());
                }
                Ok(Err(_)) => return,
                Err(_) => {
                    missed += 1;
                    tracing::debug!("keepalive {missed}/{max} unanswered");
                    if missed >= max {
                        self.kill(format!(
                            "no answer to {max} keepalives in {}s (dead network path?)",
                            (interval * max as u32).as_secs()
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

/// What local channels see of the upstream right now.
#[derive(Clone)]
pub enum State {
    /// A live connection.
    Up(Arc<Connection>),
    /// Down; reconnecting.
    Reconnecting {
        /// Attempt number of the next try.
        attempt: u32,
        /// Why the last attempt or connection failed.
        last_error: String,
        /// When the next attempt starts, if one is scheduled.
        next_at: Option<std::time::SystemTime>,
    },
    /// Given up for good (host key changed, credentials rejected, shut down).
    Failed(String),
}

/// The upstream side of the shim: owns the connection and replaces it when
/// it dies.
pub struct Upstream {
    /// Resolved settings.
    cfg: Arc<UpConfig>,
    /// Credentials, remembered across reconnects.
    auth: Vec<Authenticator>,
    /// Host key policy.
    verifier: Vec<HostKeyVerifier>,
    /// Where forwarded channels are routed.
    forwards: Arc<Registry>,
    /// Current state; local channels wait on it.
    state: watch::Sender<State>,
    /// russh client settings.
    client_config: Arc<client::Config>,
    /// Local sessions with agent forwarding open right now.
    agent_sessions: Arc<AtomicUsize>,
    /// Extra connections opened when the server refused more sessions on
    /// the existing ones (sshd's MaxSessions); they close again when idle.
    extras: Mutex<Vec<Arc<Connection>>>,
    /// Serialises the opening of extra connections.
    opening_extra: tokio::sync::Mutex<()>,
    /// Traffic counters.
    stats: Arc<Stats>,
    /// Successful reconnects so far.
    reconnects: AtomicU64,
    /// Generation numbers for new connections.
    next_generation: AtomicU64,
}

/// How long an extra connection may sit without sessions before it closes.
const EXTRA_IDLE: Duration = Duration::from_secs(30);

impl Upstream {
    /// Builds the upstream side; nothing is connected yet.
    pub fn new(cfg: Arc<UpConfig>, forwards: Arc<Registry>) -> Arc<Self> {
        // One verifier and one authenticator per hop: jump hosts first,
        // the target last.
        let hops: Vec<&crate::config::HostSpec> = cfg.jumps.iter().chain([&cfg.target]).collect();
        let verifier = hops
            .iter()
            .map(|h| HostKeyVerifier {
                host: h.host.clone(),
                port: h.port,
                user_file: h.known_hosts.clone(),
                global_files: h.global_known_hosts.clone(),
                accept_new: h.accept_new,
            })
            .collect();
        let auth = hops.iter().map(|h| Authenticator::new(h)).collect();
        let client_config = client_config(crate::config::WINDOW_SIZE);
        let (state, _) = watch::channel(State::Reconnecting {
            attempt: 1,
            last_error: "not connected yet".into(),
            next_at: None,
        });
        Arc::new(Upstream {
            cfg,
            auth,
            verifier,
            forwards,
            state,
            client_config: Arc::new(client_config),
            agent_sessions: Arc::default(),
            extras: Mutex::new(Vec::new()),
            opening_extra: tokio::sync::Mutex::new(()),
            stats: Arc::default(),
            reconnects: AtomicU64::new(0),
            next_generation: AtomicU64::new(1000),
        })
    }

    /// Counts local sessions that asked for agent forwarding; the remote's
    /// agent channels are served only while it is not zero.
    pub fn agent_sessions(&self) -> Arc<AtomicUsize> {
        self.agent_sessions.clone()
    }

    /// Traffic and channel counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Successful reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    /// Subscribes to state changes.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// `user@host:port`, for messages.
    pub fn target(&self) -> String {
        let via: Vec<String> = self.cfg.jumps.iter().map(|j| j.to_string()).collect();
        if via.is_empty() {
            self.cfg.target.to_string()
        } else {
            format!("{} via {}", self.cfg.target, via.join(", "))
        }
    }

    /// Makes one connection: TCP to the first hop, then for each further
    /// hop an SSH handshake over a direct-tcpip channel of the previous one;
    /// every hop has its own host key check and authentication.
    async fn connect_once(
        &self,
        interactive: bool,
        generation: u64,
    ) -> Result<Connection, UpstreamError> {
        let hops: Vec<&crate::config::HostSpec> =
            self.cfg.jumps.iter().chain([&self.cfg.target]).collect();
        let first = hops[0];
        let deadline = self.cfg.connect_timeout;
        let target = format!("{}:{}", first.host, first.port);
        let connect_started = Instant::now();
        let stream = tokio::time::timeout(
            deadline,
            tokio::net::TcpStream::connect((first.host.as_str(), first.port)),
        )
        .await
        .map_err(|_| UpstreamError::Timeout(target.clone()))?
        .map_err(|source| UpstreamError::Connect {
            target: target.clone(),
            source,
        })?;
        // The server speaks first: the time until its banner arrives is our
        // round-trip estimate (a TCP connect alone can finish locally, at a
        // proxy or VPN endpoint).
        let mut probe = [0u8; 1];
        let _ = tokio::time::timeout(deadline, stream.peek(&mut probe)).await;
        let client_config = self.tuned_config(connect_started.elapsed());
        let _ = stream.set_nodelay(true);
        set_tcp_keepalive(&stream, self.cfg.keepalive);
        let socket = socket2::SockRef::from(&stream)
            .try_clone()
            .map(std::net::TcpStream::from)
            .map_err(|e| UpstreamError::Other(format!("cannot duplicate the socket: {e}")))?;

        let mut jump_handles = Vec::new();
        let mut stream: Box<dyn Io> = Box::new(stream);
        let last = hops.len() - 1;
        for (i, hop) in hops.iter().enumerate() {
            let target = format!("{}:{}", hop.host, hop.port);
            let (closed_tx, closed_rx) = watch::channel(None);
            let server_version = Arc::new(Mutex::new(String::new()));
            let handler = ClientHandler {
                verifier: self.verifier[i].clone(),
                // Only the target's forwards and agent channels are ours to
                // serve; a jump host gets none.
                forwards: if i == last {
                    self.forwards.clone()
                } else {
                    Registry::new()
                },
                closed: closed_tx.clone(),
                agent_sessions: if i == last {
                    self.agent_sessions.clone()
                } else {
                    Arc::default()
                },
                server_version: server_version.clone(),
            };
            let mut handle = tokio::time::timeout(
                deadline,
                client::connect_stream(client_config.clone(), stream, handler),
            )
            .await
            .map_err(|_| UpstreamError::Timeout(target.clone()))??;
            // Prompts may take as long as the user likes: no timeout around
            // auth when interactive.
            if interactive {
                self.auth[i].authenticate(&mut handle, true).await?;
            } else {
                tokio::time::timeout(deadline, self.auth[i].authenticate(&mut handle, false))
                    .await
                    .map_err(|_| UpstreamError::Timeout(target.clone()))??;
            }
            if i == last {
                let server_version = server_version.lock().unwrap().clone();
                return Ok(Connection {
                    handle,
                    closed: closed_rx,
                    kill: closed_tx,
                    socket,
                    generation,
                    server_version,
                    rtt: Mutex::new(None),
                    sessions: AtomicUsize::new(0),
                    _jumps: jump_handles,
                });
            }
            let next = hops[i + 1];
            let ch = handle
                .channel_open_direct_tcpip(next.host.clone(), next.port as u32, "127.0.0.1", 0)
                .await
                .map_err(|e| {
                    UpstreamError::Other(format!(
                        "jump host {hop} cannot reach {}:{}: {e}",
                        next.host, next.port
                    ))
                })?;
            stream = Box::new(ch.into_stream());
            jump_handles.push(handle);
        }
        unreachable!("the loop returns at the last hop")
    }

    /// The client settings for a connection whose server banner took `rtt`
    /// to arrive (between half a round trip and two).
    /// The receive window bounds one channel's download to window / RTT:
    /// OpenSSH's fixed 2 MiB gives ~40 MB/s at 50 ms. So size it for the
    /// bandwidth-delay product of a fast link at this RTT, bounded: 2 MiB
    /// on loopback and LANs (bigger measured 25-35% slower there), up to
    /// 32 MiB on long paths. russh tops the window up only after half is
    /// used, hence the generous factor.
    fn tuned_config(&self, rtt: Duration) -> Arc<client::Config> {
        const MIN: u64 = crate::config::WINDOW_SIZE as u64;
        const MAX: u64 = 32 << 20;
        let window = ((rtt.as_secs_f64() * 800.0 * (1u64 << 20) as f64) as u64).clamp(MIN, MAX);
        if window == MIN {
            return self.client_config.clone();
        }
        tracing::debug!("connect RTT {rtt:?}: upstream window {} KiB", window >> 10);
        Arc::new(client_config(window as u32))
    }

    /// Publishes a fresh connection and starts watching it.
    fn install(&self, conn: Connection) -> Arc<Connection> {
        let conn = Arc::new(conn);
        tokio::spawn(
            conn.clone()
                .monitor(self.cfg.keepalive, self.cfg.keepalive_max),
        );
        self.state.send_replace(State::Up(conn.clone()));
        conn
    }

    /// The first connection, made in the foreground so errors (and prompts)
    /// reach the user before the endpoint opens.
    pub async fn connect_first(&self) -> Result<(), UpstreamError> {
        let conn = self.connect_once(true, 1).await?;
        tracing::info!("connected to {} ({})", self.target(), conn.server_version);
        self.install(conn);
        Ok(())
    }

    /// Keeps the connection alive until `shutdown`: when it dies, reconnects
    /// with exponential backoff and full jitter. Returns an error only for
    /// failures retrying cannot fix.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), UpstreamError> {
        let mut generation = 1;
        let new_backoff = || {
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500).min(self.cfg.max_backoff))
                .with_max_delay(self.cfg.max_backoff)
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut backoff = new_backoff();
        loop {
            let State::Up(conn) = self.state.borrow().clone() else {
                unreachable!("run() starts after connect_first and loops back only when up")
            };
            let up_since = Instant::now();
            self.forwards.replay(conn.clone());
            let why = tokio::select! {
                why = conn.closed() => why,
                _ = shutdown.cancelled() => {
                    let _ = conn.handle.disconnect(russh::Disconnect::ByApplication, "sshshim shutting down", "en").await;
                    self.state.send_replace(State::Failed("shutting down".into()));
                    return Ok(());
                }
            };
            let rtt = *conn.rtt.lock().unwrap();
            drop(conn);
            self.forwards.mark_down();
            tracing::warn!(
                "disconnected from {}: {why} (last keepalive RTT: {})",
                self.target(),
                rtt.map_or("none".into(), |d| format!(
                    "{:.1} ms",
                    d.as_secs_f64() * 1e3
                ))
            );
            // Only a connection that stayed up a while resets the backoff, so
            // a server that accepts and then drops us is not hammered.
            if up_since.elapsed() >= Duration::from_secs(60) {
                backoff = new_backoff();
            }
            let mut last_error = why;
            let mut attempt = 1u32;
            loop {
                let delay = backoff.next().unwrap_or(self.cfg.max_backoff);
                self.state.send_replace(State::Reconnecting {
                    attempt,
                    last_error: last_error.clone(),
                    next_at: Some(std::time::SystemTime::now() + delay),
                });
                tracing::info!(
                    "retrying in {:.1}s (attempt {attempt})",
                    delay.as_secs_f32()
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {
                        self.state.send_replace(State::Failed("shutting down".into()));
                        return Ok(());
                    }
                }
                generation += 1;
                let res = tokio::select! {
                    r = self.connect_once(false, generation) => r,
                    _ = shutdown.cancelled() => {
                        self.state.send_replace(State::Failed("shutting down".into()));
                        return Ok(());
                    }
                };
                match res {
                    Ok(conn) => {
                        tracing::info!(
                            "reconnected to {} ({}) after {attempt} attempt(s)",
                            self.target(),
                            conn.server_version
                        );
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        self.install(conn);
                        break;
                    }
                    Err(e) if e.is_permanent() => {
                        self.state.send_replace(State::Failed(e.to_string()));
                        return Err(e);
                    }
                    Err(e) => {
                        tracing::warn!("reconnect attempt {attempt} failed: {e}");
                        last_error = e.to_string();
                        attempt += 1;
                    }
                }
            }
        }
    }

    /// Opens a session channel on the least loaded live connection. When the
    /// server refuses more sessions on every connection (sshd's MaxSessions),
    /// opens another connection with the
    /// credentials we hold, up to `--max-upstreams`.
    pub async fn open_session(
        &self,
        primary: Arc<Connection>,
    ) -> Result<(russh::Channel<client::Msg>, LoadGuard), russh::Error> {
        // sshd answers "no more sessions" with "connect failed"; other
        // servers say "administratively prohibited" or "resource shortage".
        // A session open has nothing else to connect to, so all mean "full".
        let refused = |e: &russh::Error| {
            use russh::ChannelOpenFailure as F;
            matches!(
                e,
                russh::Error::ChannelOpenFailure(
                    F::AdministrativelyProhibited | F::ConnectFailed | F::ResourceShortage
                )
            )
        };
        let mut candidates = vec![primary];
        {
            let mut extras = self.extras.lock().unwrap();
            extras.retain(|c| c.is_alive());
            candidates.extend(extras.iter().cloned());
        }
        candidates.sort_by_key(|c| c.load());
        let mut last_err = None;
        for c in &candidates {
            match c.open_counted().await {
                Ok(x) => return Ok(x),
                Err(e) if refused(&e) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        // Every connection is full: open one more, one opener at a time (a
        // burst of opens must not start a burst of connections).
        let _turn = self.opening_extra.lock().await;
        let live = 1 + self
            .extras
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.is_alive())
            .count();
        let newest = self.extras.lock().unwrap().last().cloned();
        if let Some(c) = newest
            && !candidates.iter().any(|k| Arc::ptr_eq(k, &c))
        {
            // Someone opened one while we waited: try it first.
            match c.open_counted().await {
                Ok(x) => return Ok(x),
                Err(e) if refused(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if live >= self.cfg.max_upstreams {
            tracing::warn!(
                "the server refuses more sessions on all {live} upstream connections (--max-upstreams)"
            );
            return Err(last_err.unwrap_or(russh::Error::Disconnect));
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let conn = match self.connect_once(false, generation).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::warn!("cannot open an extra upstream connection: {e}");
                return Err(last_err.unwrap_or(russh::Error::Disconnect));
            }
        };
        tracing::info!(
            "server refused more sessions; opened upstream connection {} of at most {}",
            live + 1,
            self.cfg.max_upstreams
        );
        tokio::spawn(
            conn.clone()
                .monitor(self.cfg.keepalive, self.cfg.keepalive_max),
        );
        tokio::spawn(close_when_idle(conn.clone()));
        self.extras.lock().unwrap().push(conn.clone());
        conn.open_counted().await
    }

    /// Upstream connections alive now (the primary plus extras).
    pub fn connection_count(&self) -> usize {
        let primary = matches!(&*self.state.borrow(), State::Up(c) if c.is_alive());
        usize::from(primary)
            + self
                .extras
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.is_alive())
                .count()
    }

    /// The live connection, waiting up to the connect timeout while
    /// reconnecting. The error text says why there is none.
    pub async fn connection(&self) -> Result<Arc<Connection>, String> {
        let mut rx = self.state.subscribe();
        let wait = async {
            loop {
                match &*rx.borrow_and_update() {
                    State::Up(c) if c.is_alive() => return Ok(c.clone()),
                    State::Failed(why) => return Err(format!("upstream unavailable: {why}")),
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err("upstream unavailable: shutting down".to_string());
                }
            }
        };
        match tokio::time::timeout(self.cfg.connect_timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(match &*self.state.borrow() {
                State::Reconnecting {
                    attempt,
                    last_error,
                    ..
                } => format!(
                    "upstream unavailable: reconnecting (attempt {attempt}, last error: {last_error})"
                ),
                State::Failed(why) => format!("upstream unavailable: {why}"),
                State::Up(_) => "upstream unavailable: connection just closed".to_string(),
            }),
        }
    }
}

/// russh client settings with the given receive window.
fn client_config(window: u32) -> client::Config {
    client::Config {
        // Our own monitor sends keepalives (it measures RTT and can cut a
        // socket whose writes are stuck); russh's would only duplicate it.
        keepalive_interval: None,
        inactivity_timeout: None,
        window_size: window,
        maximum_packet_size: crate::config::MAX_PACKET,
        channel_buffer_size: crate::config::CHANNEL_BUFFER,
        preferred: crate::config::upstream_algorithms(),
        nodelay: true,
        ..Default::default()
    }
}

/// Closes an extra connection once it has carried no session for a while.
async fn close_when_idle(conn: Arc<Connection>) {
    let mut idle_since = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = conn.closed() => return,
        }
        if conn.load() > 0 {
            idle_since = None;
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= EXTRA_IDLE {
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
fn set_tcp_keepalive(stream: &tokio::net::TcpStream, interval: Duration) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(interval)
        .with_interval(interval)
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
}

//! The upstream side: the SSH connection(s) every local channel is
//! multiplexed onto. TCP connect, host key verification, authentication,
//! keepalive, reconnect with backoff, and extra connections past the
//! server's MaxSessions.
//!
//! One [`Pool`] owns the connections. Other modules open channels through
//! it and never see a connection being replaced; they watch its [`State`]
//! to learn of reconnects. Channels the server opens towards us leave as
//! [`ServerOpen`] events on a channel: the upstream calls nobody back.

pub mod auth;
pub mod connection;
pub mod error;
pub mod known_hosts;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use russh::client;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::UpConfig;
use crate::stats::Stats;
use auth::Authenticator;
use connection::{ClientHandler, Io, client_config, close_when_idle, refused, set_tcp_keepalive};
pub use connection::{
    Connection, LoadGuard, Open, OpenError, Opened, ServerOpen, ServerOpenKind, ServerSlot,
    Unavailable,
};
pub use error::UpstreamError;
use known_hosts::HostKeyVerifier;

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
pub struct Pool {
    /// Resolved settings.
    cfg: Arc<UpConfig>,
    /// Credentials, remembered across reconnects.
    auth: Vec<Authenticator>,
    /// Host key policy.
    verifier: Vec<HostKeyVerifier>,
    /// Where channels the server opens are reported.
    events: mpsc::Sender<ServerOpen>,
    /// Current state; local channels wait on it.
    state: watch::Sender<State>,
    /// russh client settings.
    client_config: Arc<client::Config>,
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
    /// Someone wants the upstream now: while down, try at once (within
    /// [`crate::tuning::RECONNECT_GAP`] of the last attempt).
    wake: tokio::sync::Notify,
    /// Requests waiting for the upstream right now: while any wait, attempts
    /// follow each other every [`crate::tuning::RECONNECT_GAP`].
    waiting: AtomicUsize,
}

/// The network changes the reconnect loop reacts to (see
/// [`crate::netwatch`]); `None` once the watcher is gone.
struct NetChanges(Option<watch::Receiver<crate::netwatch::Latest>>);

impl NetChanges {
    /// Marks every change so far as handled.
    fn seen(&mut self) {
        if let Some(rx) = &mut self.0 {
            rx.borrow_and_update();
        }
    }

    /// Waits for the next change and says what it was; never returns when
    /// nothing watches the network.
    async fn changed(&mut self) -> String {
        if let Some(rx) = &mut self.0 {
            if rx.changed().await.is_ok() {
                let change = rx.borrow_and_update().change.clone();
                return change.map_or("the network changed".into(), |c| c.to_string());
            }
            self.0 = None;
        }
        std::future::pending().await
    }
}

/// Counts one request waiting for the upstream while alive.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// Registers a waiter and wakes the reconnect loop.
    fn new(pool: &'a Pool) -> Self {
        pool.waiting.fetch_add(1, Ordering::AcqRel);
        pool.wake.notify_one();
        Waiting(&pool.waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pool {
    /// Builds the upstream side; nothing is connected yet. Channels the
    /// server opens arrive on the returned receiver (see [`ServerOpen`]);
    /// whoever serves them must keep reading it.
    pub fn new(cfg: Arc<UpConfig>) -> (Arc<Self>, mpsc::Receiver<ServerOpen>) {
        // One verifier and one authenticator per hop: jump hosts first,
        // the target last.
        let hops: Vec<&crate::config::spec::HostSpec> =
            cfg.jumps.iter().chain([&cfg.target]).collect();
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
        let client_config = client_config(crate::tuning::WINDOW_SIZE);
        let (state, _) = watch::channel(State::Reconnecting {
            attempt: 1,
            last_error: "not connected yet".into(),
            next_at: None,
        });
        // Bounded: a burst of forwarded connections beyond this is refused
        // rather than held in memory.
        let (events, rx) = mpsc::channel(1024);
        let pool = Arc::new(Pool {
            cfg,
            auth,
            verifier,
            events,
            state,
            client_config: Arc::new(client_config),
            extras: Mutex::new(Vec::new()),
            opening_extra: tokio::sync::Mutex::new(()),
            stats: Arc::default(),
            reconnects: AtomicU64::new(0),
            next_generation: AtomicU64::new(1000),
            wake: tokio::sync::Notify::new(),
            waiting: AtomicUsize::new(0),
        });
        (pool, rx)
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
        let hops: Vec<&crate::config::spec::HostSpec> =
            self.cfg.jumps.iter().chain([&self.cfg.target]).collect();
        let first = hops[0];
        let deadline = self.cfg.tuning.connect_timeout;
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
        set_tcp_keepalive(&stream, self.cfg.tuning.keepalive);
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
            let congestion = Arc::new(AtomicUsize::new(0));
            let server_version = Arc::new(Mutex::new(String::new()));
            let handler = ClientHandler {
                verifier: self.verifier[i].clone(),
                // Only the target's forwards and agent channels are ours to
                // serve; a jump host's are refused.
                events: (i == last).then(|| self.events.clone()),
                generation,
                congestion: congestion.clone(),
                closed: closed_tx.clone(),
                server_version: server_version.clone(),
                server_channels: Arc::default(),
                unasked: 0,
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
                    channels: AtomicUsize::new(0),
                    congestion,
                    _jumps: jump_handles,
                    spare: Mutex::default(),
                    probe: tokio::sync::Notify::new(),
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
        const MIN: u64 = crate::tuning::WINDOW_SIZE as u64;
        const MAX: u64 = crate::tuning::MAX_WINDOW_SIZE as u64;
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
                .monitor(self.cfg.tuning.keepalive, self.cfg.tuning.keepalive_max),
        );
        self.state.send_replace(State::Up(conn.clone()));
        conn.replenish();
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

    /// Waits until the live connection `conn` closes, probing it at once
    /// on a network change, and says why; `None` when `shutdown` came
    /// first (the connection is then closed politely).
    async fn until_closed(
        &self,
        conn: Arc<Connection>,
        net: &mut NetChanges,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        net.seen();
        let why = loop {
            tokio::select! {
                why = conn.closed() => break why,
                change = net.changed() => {
                    tracing::debug!("{change}: probing the upstream connection now");
                    conn.probe_now();
                }
                _ = shutdown.cancelled() => {
                    let _ = conn.handle.disconnect(russh::Disconnect::ByApplication, "sshshim shutting down", "en").await;
                    return None;
                }
            }
        };
        let rtt = *conn.rtt.lock().unwrap();
        drop(conn);
        tracing::warn!(
            "disconnected from {}: {why} (last keepalive RTT: {})",
            self.target(),
            rtt.map_or("none".into(), |d| format!(
                "{:.1} ms",
                d.as_secs_f64() * 1e3
            ))
        );
        Some(why)
    }

    /// Keeps the connection alive until `shutdown`: when it dies, reconnects.
    /// Returns an error only for failures retrying cannot fix.
    ///
    /// When: the first retry after a connection that worked comes at once
    /// (after up to [`crate::tuning::FIRST_RETRY_JITTER`]); after that,
    /// exponential backoff with jitter, from [`crate::tuning::RETRY_MIN`]
    /// up to `--max-backoff`, growing only across failed attempts in a row
    /// (every successful connect and authentication starts it over). Sooner
    /// when someone waits for the upstream or the network changes. Never
    /// two attempts at once, nor two starts within
    /// [`crate::tuning::RECONNECT_GAP`] (or `--max-backoff` if smaller):
    /// that floor is what damps a flapping link or a server that accepts
    /// and then drops us.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), UpstreamError> {
        // A --max-backoff below the gap asks for quicker retries still.
        let gap = crate::tuning::RECONNECT_GAP.min(self.cfg.tuning.max_backoff);
        let mut generation = 1;
        let mut net = NetChanges(Some(crate::netwatch::spawn()));
        // connect_first has just made an attempt.
        let mut last_attempt = Instant::now();
        let new_backoff = || {
            backon::ExponentialBuilder::default()
                .with_min_delay(crate::tuning::RETRY_MIN.min(self.cfg.tuning.max_backoff))
                .with_max_delay(self.cfg.tuning.max_backoff)
                .with_jitter()
                .without_max_times()
                .build()
        };
        let shut_down = |pool: &Pool| -> Result<(), UpstreamError> {
            pool.state
                .send_replace(State::Failed("shutting down".into()));
            Ok(())
        };
        loop {
            let State::Up(conn) = self.state.borrow().clone() else {
                unreachable!("run() starts after connect_first and loops back only when up")
            };
            let Some(why) = self.until_closed(conn, &mut net, &shutdown).await else {
                return shut_down(&self);
            };
            // The connection worked: the backoff starts over. A wake-up
            // left from before is stale (its waiter was served or gave up).
            let _ = tokio::time::timeout(Duration::ZERO, self.wake.notified()).await;
            let mut backoff = new_backoff();
            let mut last_error = why;
            let mut attempt = 1u32;
            loop {
                let planned = if attempt == 1 {
                    crate::tuning::FIRST_RETRY_JITTER
                        .mul_f64(rand::random_range(0.0..1.0))
                        .min(self.cfg.tuning.max_backoff)
                } else {
                    // Jitter may add up to the whole delay again:
                    // --max-backoff is the longest wait, whatever the jitter.
                    backoff
                        .next()
                        .unwrap_or(self.cfg.tuning.max_backoff)
                        .min(self.cfg.tuning.max_backoff)
                };
                let earliest = last_attempt + gap;
                let waited = self.wait_for_attempt(
                    Instant::now() + planned,
                    earliest,
                    (attempt, &last_error),
                    &mut net,
                    &shutdown,
                );
                if !waited.await {
                    return shut_down(&self);
                }
                // Requests and changes up to here are served by this attempt.
                net.seen();
                last_attempt = Instant::now();
                generation += 1;
                let res = tokio::select! {
                    r = self.connect_once(false, generation) => r,
                    _ = shutdown.cancelled() => return shut_down(&self),
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

    /// Waits until the next connect attempt is due: at `at`, or sooner
    /// when a request waits or the network changes, but never before
    /// `earliest`. Publishes the state (`attempt`, last error, when) and
    /// logs why. Returns false on shutdown.
    async fn wait_for_attempt(
        &self,
        mut at: Instant,
        earliest: Instant,
        (attempt, last_error): (u32, &str),
        net: &mut NetChanges,
        shutdown: &CancellationToken,
    ) -> bool {
        at = at.max(earliest);
        let mut why_now: Option<String> = None;
        loop {
            if why_now.is_none() && self.waiting.load(Ordering::Acquire) > 0 {
                why_now = Some("a request is waiting for the upstream".into());
            }
            if why_now.is_some() {
                at = at.min(earliest.max(Instant::now()));
            }
            let wait = at.saturating_duration_since(Instant::now());
            self.state.send_replace(State::Reconnecting {
                attempt,
                last_error: last_error.to_owned(),
                next_at: Some(std::time::SystemTime::now() + wait),
            });
            let why = why_now
                .as_deref()
                .map_or(String::new(), |w| format!("{w}: "));
            tracing::info!(
                "{why}retrying in {:.1}s (attempt {attempt})",
                wait.as_secs_f32()
            );
            tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => return true,
                _ = self.wake.notified(), if why_now.is_none() => {
                    why_now = Some("a request is waiting for the upstream".into());
                }
                change = net.changed(), if why_now.is_none() => {
                    why_now = Some(change);
                }
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    /// Opens a channel upstream, waiting up to the connect timeout while
    /// reconnecting (the error then says why there is none).
    ///
    /// Placement: a connection where a stalled local reader holds the reads
    /// takes no new channels; among the rest a session goes to the least
    /// loaded. When the server refuses more sessions on every connection
    /// (sshd's MaxSessions), or every connection is congested, another one
    /// is opened with the credentials we hold (no prompt), up to
    /// `--max-upstreams`; extras close again when idle.
    pub async fn open(&self, what: Open) -> Result<Opened, OpenError> {
        let primary = self.connection().await?;
        let mut candidates = vec![primary];
        {
            let mut extras = self.extras.lock().unwrap();
            extras.retain(|c| c.is_alive());
            candidates.extend(extras.iter().cloned());
        }
        candidates.sort_by_key(|c| (c.is_congested(), c.load()));
        let mut last_err = None;
        for c in candidates.iter().filter(|c| !c.is_congested()) {
            match c.open_counted(&what).await {
                Ok(x) => return Ok(x),
                Err(e) if what.is_session() && refused(&e) => last_err = Some(e),
                Err(e) => return Err(OpenError::Refused(e)),
            }
        }
        // Every connection is full or congested: open one more, one opener
        // at a time (a burst of opens must not start a burst of connections).
        // One another opener just made may be full already: then the next.
        let mut tried = candidates.clone();
        let extra = loop {
            let Some(c) = self.open_extra(&tried, &what).await else {
                break None;
            };
            match c.open_counted(&what).await {
                Ok(x) => return Ok(x),
                Err(e) if what.is_session() && refused(&e) => {
                    last_err = Some(e);
                    tried.push(c);
                }
                Err(e) => break Some(Err(OpenError::Refused(e))),
            }
        };
        match extra {
            Some(r) => r,
            None if last_err.is_none() => {
                // Everything is congested and no extra is possible: the
                // primary still works, at the stalled reader's pace.
                candidates[0]
                    .open_counted(&what)
                    .await
                    .map_err(OpenError::Refused)
            }
            None => Err(OpenError::Refused(
                last_err.unwrap_or(russh::Error::Disconnect),
            )),
        }
    }

    /// Opens an extra connection if `--max-upstreams` allows, or returns
    /// one another opener made meanwhile.
    async fn open_extra(&self, tried: &[Arc<Connection>], what: &Open) -> Option<Arc<Connection>> {
        let _turn = self.opening_extra.lock().await;
        let newest = self.extras.lock().unwrap().last().cloned();
        if let Some(c) = newest
            && c.is_alive()
            && !c.is_congested()
            && !tried.iter().any(|k| Arc::ptr_eq(k, &c))
        {
            // Someone opened one while we waited: use it.
            return Some(c);
        }
        let live = self.connection_count();
        if live >= self.cfg.tuning.max_upstreams {
            tracing::warn!(
                "no upstream connection can take a new {} and all {live} allowed are open \
                 (--max-upstreams)",
                what.kind()
            );
            return None;
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let conn = match self.connect_once(false, generation).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::warn!("cannot open an extra upstream connection: {e}");
                return None;
            }
        };
        tracing::info!(
            "opened upstream connection {} of at most {} (the others are full or congested)",
            live + 1,
            self.cfg.tuning.max_upstreams
        );
        tokio::spawn(
            conn.clone()
                .monitor(self.cfg.tuning.keepalive, self.cfg.tuning.keepalive_max),
        );
        tokio::spawn(close_when_idle(conn.clone()));
        self.extras.lock().unwrap().push(conn.clone());
        conn.replenish();
        Some(conn)
    }

    /// Upstream connections held back by a stalled local reader right now.
    pub fn congested_count(&self) -> usize {
        let primary = matches!(&*self.state.borrow(), State::Up(c) if c.is_congested());
        usize::from(primary)
            + self
                .extras
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.is_alive() && c.is_congested())
                .count()
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
    ///
    /// Waiting is a reason to reconnect now: while anyone waits, attempts
    /// follow each other every [`crate::tuning::RECONNECT_GAP`] instead of
    /// the backoff, and every waiter gets the connection as soon as it is up.
    pub async fn connection(&self) -> Result<Arc<Connection>, Unavailable> {
        let mut rx = self.state.subscribe();
        let wait = async {
            let mut waiting = None;
            loop {
                match &*rx.borrow_and_update() {
                    State::Up(c) if c.is_alive() => return Ok(c.clone()),
                    State::Failed(why) => return Err(Unavailable::Failed(why.clone())),
                    _ => {}
                }
                if waiting.is_none() {
                    waiting = Some(Waiting::new(self));
                }
                if rx.changed().await.is_err() {
                    return Err(Unavailable::ShuttingDown);
                }
            }
        };
        match tokio::time::timeout(self.cfg.tuning.connect_timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(match &*self.state.borrow() {
                State::Reconnecting {
                    attempt,
                    last_error,
                    ..
                } => Unavailable::Reconnecting {
                    attempt: *attempt,
                    last_error: last_error.clone(),
                },
                State::Failed(why) => Unavailable::Failed(why.clone()),
                State::Up(_) => Unavailable::JustClosed,
            }),
        }
    }
}

//! Port forwarding: the registry of desired remote forwards (whoever owns
//! them), routing of incoming forwarded channels, replay after a reconnect,
//! and sshshim's own `-L`/`-R` forwards.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use backon::BackoffBuilder;
use russh::{ChannelOpenFailure, client, server};
use tokio_util::sync::CancellationToken;

use crate::bridge;
use crate::upstream::{Connection, Upstream};

/// One end of a forward: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// `host:port` (host may be empty: the default bind address).
    Tcp(String, u16),
    /// A Unix socket path.
    Unix(String),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Tcp(h, p) if h.contains(':') => write!(f, "[{h}]:{p}"),
            Addr::Tcp(h, p) if h.is_empty() => write!(f, "{p}"),
            Addr::Tcp(h, p) => write!(f, "{h}:{p}"),
            Addr::Unix(p) => f.write_str(p),
        }
    }
}

/// Direction of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `-L`: listen here, connect from the server's side.
    Local,
    /// `-R`: listen on the server, connect from here.
    Remote,
}

/// A forward in OpenSSH syntax: `[bind:]port:host:hostport`, socket paths
/// allowed on either side, IPv6 in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ForwardSpec {
    /// `-L` or `-R`.
    pub kind: Kind,
    /// Where to listen.
    pub listen: Addr,
    /// Where to connect.
    pub target: Addr,
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.kind {
            Kind::Local => "-L",
            Kind::Remote => "-R",
        };
        write!(f, "{k} {}:{}", self.listen, self.target)
    }
}

impl ForwardSpec {
    /// Parses the argument of `-L` or `-R`.
    pub fn parse(kind: Kind, s: &str) -> Result<Self, String> {
        let flag = if kind == Kind::Local { "-L" } else { "-R" };
        let bad = |why: &str| {
            format!(
                "invalid forward {flag} '{s}': {why}\n  expected [bind_address:]port:host:hostport, \
                 port:/remote/socket, /local/socket:host:hostport or /local/socket:/remote/socket \
                 (IPv6 addresses in brackets)"
            )
        };
        let fields = split_fields(s).map_err(|e| bad(&e))?;
        let addr_of = |host: Option<&str>, port: &str| -> Result<Addr, String> {
            let p = crate::config::parse_port(port).or_else(|e| {
                // Port 0 is allowed on a listening side of -R (server picks).
                if port == "0" { Ok(0) } else { Err(e) }
            });
            Ok(Addr::Tcp(
                host.unwrap_or("").to_owned(),
                p.map_err(|e| bad(&e))?,
            ))
        };
        let is_path = |f: &str| f.starts_with('/') || f.starts_with("./") || f.starts_with('~');
        let (listen, target) = match fields.as_slice() {
            // /sock:/sock
            [a, b] if is_path(a) && is_path(b) => (Addr::Unix(a.clone()), Addr::Unix(b.clone())),
            // port:/sock
            [a, b] if is_path(b) => (addr_of(None, a)?, Addr::Unix(b.clone())),
            // /sock:host:port
            [a, h, p] if is_path(a) => (Addr::Unix(a.clone()), addr_of(Some(h), p)?),
            // bind:port:/sock
            [bnd, a, b] if is_path(b) => (addr_of(Some(bnd), a)?, Addr::Unix(b.clone())),
            // port:host:port
            [a, h, p] => (addr_of(None, a)?, addr_of(Some(h), p)?),
            // bind:port:host:port
            [bnd, a, h, p] => (addr_of(Some(bnd), a)?, addr_of(Some(h), p)?),
            _ => return Err(bad("wrong number of fields")),
        };
        if let Addr::Tcp(h, 0) = &target {
            return Err(bad(&format!("target {h}:0 has no port")));
        }
        if let Addr::Tcp(h, _) = &target
            && h.is_empty()
        {
            return Err(bad("empty target host"));
        }
        if kind == Kind::Local && matches!(listen, Addr::Tcp(_, 0)) {
            return Err(bad("a local listening port must not be 0"));
        }
        Ok(ForwardSpec {
            kind,
            listen,
            target,
        })
    }
}

/// Splits on ':' outside brackets, removing the brackets.
fn split_fields(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = false;
    for c in s.chars() {
        match c {
            '[' if !depth && cur.is_empty() => depth = true,
            ']' if depth => depth = false,
            ':' if !depth => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if depth {
        return Err("unclosed '['".into());
    }
    out.push(cur);
    if out.iter().any(|f| f.is_empty()) && out.len() > 1 {
        // "::" or a trailing ':' — but allow an explicit empty bind ("":port)
        // only as the first of four fields, as OpenSSH does.
        if !(out.len() == 4 && out[0].is_empty() && out[1..].iter().all(|f| !f.is_empty())) {
            return Err("empty field".into());
        }
    }
    Ok(out)
}

/// Who asked for a remote forward, and so where its connections go.
#[derive(Clone)]
enum Owner {
    /// A local client: its connections are opened back to that client.
    Client(server::Handle),
    /// sshshim itself: connections go to this target.
    Shim(Addr),
}

/// State of a remote forward, as shown in status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FwdState {
    /// Listening upstream.
    Active,
    /// Waiting for the upstream connection.
    Pending,
    /// Upstream refused; retrying with backoff.
    Retrying(String),
}

/// A remote forward we want to exist upstream.
struct Entry {
    /// Registry-unique id.
    id: u64,
    /// The listening side as requested (port may be 0).
    listen: Addr,
    /// Port actually bound (the allocated one for port 0).
    bound: Option<u16>,
    /// Where its connections go.
    owner: Owner,
    /// Whether it is listening.
    state: FwdState,
    /// Which connection it was last requested on.
    generation: u64,
}

/// The single registry of desired remote forwards, shared by client-owned
/// and sshshim-owned forwards so both are replayed alike.
#[derive(Default)]
pub struct Registry {
    /// Desired forwards.
    entries: Mutex<Vec<Entry>>,
    /// Id source.
    next_id: AtomicU64,
    /// The upstream side, set once at start-up.
    upstream: Mutex<Weak<Upstream>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Connects the registry to the upstream (done once, after both exist).
    pub fn attach(&self, up: &Arc<Upstream>) {
        *self.upstream.lock().unwrap() = Arc::downgrade(up);
    }

    /// Adds a forward and returns its id.
    fn add(&self, listen: Addr, bound: Option<u16>, owner: Owner, generation: u64) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.entries.lock().unwrap().push(Entry {
            id,
            listen,
            bound,
            owner,
            state: if bound.is_some() {
                FwdState::Active
            } else {
                FwdState::Pending
            },
            generation,
        });
        id
    }

    /// Removes a forward, returning what to cancel upstream.
    fn remove(&self, id: u64) -> Option<(Addr, Option<u16>)> {
        let mut g = self.entries.lock().unwrap();
        let i = g.iter().position(|e| e.id == id)?;
        let e = g.remove(i);
        Some((e.listen, e.bound))
    }

    /// (spec, state, bound port) of every forward, for status and tests.
    pub fn snapshot(&self) -> Vec<(String, bool, FwdState, Option<u16>)> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e.listen.to_string(),
                    matches!(e.owner, Owner::Shim(_)),
                    e.state.clone(),
                    e.bound,
                )
            })
            .collect()
    }

    /// Finds the owner of a forwarded connection.
    fn owner_of(&self, listen: &Addr) -> Option<Owner> {
        let g = self.entries.lock().unwrap();
        let matches = |e: &&Entry| match (&e.listen, listen) {
            (Addr::Tcp(_, _), Addr::Tcp(_, p)) => e.bound == Some(*p),
            (Addr::Unix(a), Addr::Unix(b)) => a == b,
            _ => false,
        };
        // Prefer an exact bind-address match when two share a port.
        let exact = g
            .iter()
            .filter(matches)
            .find(|e| match (&e.listen, listen) {
                (Addr::Tcp(a, _), Addr::Tcp(b, _)) => a == b,
                _ => true,
            });
        exact
            .or_else(|| g.iter().find(matches))
            .map(|e| e.owner.clone())
    }

    /// A meter for a forwarded channel (counted only while attached).
    fn meter(&self, kind: &'static str) -> Option<crate::upstream::ChannelMeter> {
        let up = self.upstream.lock().unwrap().upgrade()?;
        Some(up.stats().open(kind))
    }

    /// Routes an incoming `forwarded-tcpip` channel to its owner. Runs in
    /// the upstream session loop, so the work is spawned.
    pub fn route_tcpip(
        &self,
        channel: russh::Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
    ) {
        let Ok(port) = u16::try_from(connected_port) else {
            drop(reply);
            return;
        };
        let listen = Addr::Tcp(connected_address.to_owned(), port);
        let owner = self.owner_of(&listen);
        let (addr, orig) = (connected_address.to_owned(), originator_address.to_owned());
        let Some(meter) = self.meter("forwarded-tcpip") else {
            drop(reply);
            return;
        };
        tokio::spawn(async move {
            match owner {
                None => {
                    tracing::debug!("forwarded connection for unknown {listen}");
                    reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await;
                }
                Some(Owner::Client(h)) => {
                    match h
                        .channel_open_forwarded_tcpip(addr, connected_port, orig, originator_port)
                        .await
                    {
                        Ok(local) => {
                            reply.accept().await;
                            bridge::spawn(local, h, channel, false, None, meter);
                        }
                        Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
                    }
                }
                Some(Owner::Shim(target)) => connect_target(target, channel, reply, meter).await,
            }
        });
    }

    /// Routes an incoming `forwarded-streamlocal` channel to its owner.
    pub fn route_streamlocal(
        &self,
        channel: russh::Channel<client::Msg>,
        socket_path: &str,
        reply: client::ChannelOpenHandle,
    ) {
        let listen = Addr::Unix(socket_path.to_owned());
        let owner = self.owner_of(&listen);
        let path = socket_path.to_owned();
        let Some(meter) = self.meter("forwarded-streamlocal") else {
            drop(reply);
            return;
        };
        tokio::spawn(async move {
            match owner {
                None => {
                    reply
                        .reject(ChannelOpenFailure::AdministrativelyProhibited)
                        .await
                }
                Some(Owner::Client(h)) => match h.channel_open_forwarded_streamlocal(path).await {
                    Ok(local) => {
                        reply.accept().await;
                        bridge::spawn(local, h, channel, false, None, meter);
                    }
                    Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
                },
                Some(Owner::Shim(target)) => connect_target(target, channel, reply, meter).await,
            }
        });
    }

    /// Re-requests every forward not yet listening on `conn` (after a
    /// reconnect, and for sshshim-owned forwards at start), retrying each
    /// with backoff while the connection lives.
    pub fn replay(self: &Arc<Self>, conn: Arc<Connection>) {
        let todo: Vec<(u64, Addr, Option<u16>)> = {
            let mut g = self.entries.lock().unwrap();
            g.iter_mut()
                .filter(|e| e.generation != conn.generation || e.state != FwdState::Active)
                .map(|e| {
                    e.state = FwdState::Pending;
                    (e.id, e.listen.clone(), e.bound)
                })
                .collect()
        };
        for (id, listen, bound) in todo {
            let reg = self.clone();
            let conn = conn.clone();
            tokio::spawn(async move { reg.establish(id, listen, bound, conn).await });
        }
    }

    /// Requests one forward on `conn` until it succeeds, the forward is
    /// removed, or the connection dies.
    async fn establish(&self, id: u64, listen: Addr, bound: Option<u16>, conn: Arc<Connection>) {
        let mut backoff = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .without_max_times()
            .build();
        let mut logged_failure = false;
        loop {
            if !conn.is_alive() || !self.entries.lock().unwrap().iter().any(|e| e.id == id) {
                return;
            }
            // Ask for the port bound before, so a port-0 forward keeps the
            // port its users were told.
            let res = request_remote(&conn, &listen, bound).await;
            let still_wanted = self.entries.lock().unwrap().iter().any(|e| e.id == id);
            if !still_wanted {
                if let Ok(port) = res {
                    cancel_remote(&conn, &listen, Some(port)).await;
                }
                return;
            }
            {
                let mut g = self.entries.lock().unwrap();
                let Some(e) = g.iter_mut().find(|e| e.id == id) else {
                    return;
                };
                match res {
                    Ok(port) => {
                        e.bound = Some(port);
                        e.state = FwdState::Active;
                        e.generation = conn.generation;
                        tracing::info!("remote forward {} listening (port {port})", e.listen);
                        return;
                    }
                    Err(why) => {
                        if !logged_failure {
                            tracing::warn!("remote forward {} failed: {why}; retrying", e.listen);
                            logged_failure = true;
                        }
                        e.state = FwdState::Retrying(why);
                    }
                }
            }
            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(10))).await;
        }
    }

    /// The connection is gone: nothing listens upstream until the replay.
    pub fn mark_down(&self) {
        for e in self.entries.lock().unwrap().iter_mut() {
            if e.state == FwdState::Active {
                e.state = FwdState::Pending;
            }
        }
    }

    /// Adds the sshshim-owned `-R` forwards; they are requested by
    /// [`Registry::replay`] as soon as a connection is up.
    pub fn add_owned_remote(&self, spec: &ForwardSpec) {
        self.add(
            spec.listen.clone(),
            None,
            Owner::Shim(spec.target.clone()),
            0,
        );
    }
}

/// Asks upstream to listen; returns the bound port (0 for sockets).
async fn request_remote(
    conn: &Connection,
    listen: &Addr,
    bound: Option<u16>,
) -> Result<u16, String> {
    match listen {
        Addr::Tcp(host, port) => {
            let want = bound.unwrap_or(*port);
            match conn.handle.tcpip_forward(host.clone(), want as u32).await {
                // russh reports 0 for a fixed port: the port is the one asked.
                Ok(got) => Ok(if want != 0 { want } else { got as u16 }),
                Err(russh::Error::RequestDenied) => Err(format!(
                    "the server refused to listen on {}",
                    Addr::Tcp(host.clone(), want)
                )),
                Err(e) => Err(e.to_string()),
            }
        }
        Addr::Unix(path) => match conn.handle.streamlocal_forward(path.clone()).await {
            Ok(()) => Ok(0),
            Err(russh::Error::RequestDenied) => {
                Err(format!("the server refused to listen on {path}"))
            }
            Err(e) => Err(e.to_string()),
        },
    }
}

/// Asks upstream to stop listening.
async fn cancel_remote(conn: &Connection, listen: &Addr, bound: Option<u16>) {
    let r = match listen {
        Addr::Tcp(host, port) => {
            conn.handle
                .cancel_tcpip_forward(host.clone(), bound.unwrap_or(*port) as u32)
                .await
        }
        Addr::Unix(path) => conn.handle.cancel_streamlocal_forward(path.clone()).await,
    };
    if let Err(e) = r {
        tracing::debug!("cancelling remote forward {listen}: {e}");
    }
}

/// Connects a forwarded channel to an sshshim-owned forward's target.
async fn connect_target(
    target: Addr,
    channel: russh::Channel<client::Msg>,
    reply: client::ChannelOpenHandle,
    meter: crate::upstream::ChannelMeter,
) {
    let what = format!("forward to {target}");
    match &target {
        Addr::Tcp(h, p) => match tokio::net::TcpStream::connect((h.as_str(), *p)).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                reply.accept().await;
                bridge::spawn_stream(s, channel, what, meter);
            }
            Err(e) => {
                tracing::warn!("remote forward: cannot connect to {target}: {e}");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        },
        Addr::Unix(p) => {
            match tokio::net::UnixStream::connect(crate::config::expand_tilde(p.as_ref())).await {
                Ok(s) => {
                    reply.accept().await;
                    bridge::spawn_stream(s, channel, what, meter);
                }
                Err(e) => {
                    tracing::warn!("remote forward: cannot connect to {target}: {e}");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        }
    }
}

/// The forwards one local client connection asked for. They are cancelled
/// upstream when the connection ends.
pub struct LocalSession {
    /// The shared registry.
    registry: Arc<Registry>,
    /// Where forwarded connections for this client are opened.
    handle: server::Handle,
    /// Ids of this client's forwards.
    ids: Mutex<Vec<u64>>,
}

impl LocalSession {
    /// Tracks forwards for a newly authenticated local connection.
    pub fn new(registry: Arc<Registry>, handle: server::Handle) -> Arc<Self> {
        Arc::new(LocalSession {
            registry,
            handle,
            ids: Mutex::new(Vec::new()),
        })
    }

    /// The upstream connection, if there is one within the connect timeout.
    async fn conn(&self) -> Option<Arc<Connection>> {
        let up = self.registry.upstream.lock().unwrap().upgrade()?;
        up.connection().await.ok()
    }

    /// `tcpip-forward` from the client: asks upstream for the same bind
    /// address and port. Returns the bound port, or `None` if refused.
    pub async fn tcpip_forward(&self, address: &str, port: u32) -> Option<u32> {
        let port = u16::try_from(port).ok()?;
        let conn = self.conn().await?;
        let listen = Addr::Tcp(address.to_owned(), port);
        // sshd accepts connections as soon as it listens, possibly before
        // its reply reaches us: route a fixed port from the start so none
        // is refused. (A port-0 forward is unknown to anyone until the
        // client is told the port, after this returns.)
        let early = (port != 0).then(|| {
            self.registry.add(
                listen.clone(),
                Some(port),
                Owner::Client(self.handle.clone()),
                conn.generation,
            )
        });
        match request_remote(&conn, &listen, None).await {
            Ok(bound) => {
                let id = early.unwrap_or_else(|| {
                    self.registry.add(
                        listen,
                        Some(bound),
                        Owner::Client(self.handle.clone()),
                        conn.generation,
                    )
                });
                self.ids.lock().unwrap().push(id);
                Some(bound as u32)
            }
            Err(why) => {
                if let Some(id) = early {
                    self.registry.remove(id);
                }
                tracing::info!("client forward {address}:{port} refused: {why}");
                None
            }
        }
    }

    /// `cancel-tcpip-forward` from the client.
    pub async fn cancel_tcpip_forward(&self, address: &str, port: u32) -> bool {
        self.cancel(|l, b| matches!(l, Addr::Tcp(h, p) if h == address && (b == Some(port as u16) || *p as u32 == port)))
            .await
    }

    /// `streamlocal-forward@openssh.com` from the client.
    pub async fn streamlocal_forward(&self, path: &str) -> bool {
        let Some(conn) = self.conn().await else {
            return false;
        };
        let listen = Addr::Unix(path.to_owned());
        // Routed before sshd listens, as for TCP above.
        let id = self.registry.add(
            listen.clone(),
            Some(0),
            Owner::Client(self.handle.clone()),
            conn.generation,
        );
        match request_remote(&conn, &listen, None).await {
            Ok(_) => {
                self.ids.lock().unwrap().push(id);
                true
            }
            Err(why) => {
                self.registry.remove(id);
                tracing::info!("client forward {path} refused: {why}");
                false
            }
        }
    }

    /// `cancel-streamlocal-forward@openssh.com` from the client.
    pub async fn cancel_streamlocal_forward(&self, path: &str) -> bool {
        self.cancel(|l, _| matches!(l, Addr::Unix(p) if p == path))
            .await
    }

    /// Cancels this client's forwards that `pick` selects.
    async fn cancel(&self, pick: impl Fn(&Addr, Option<u16>) -> bool) -> bool {
        let ids: Vec<u64> = self.ids.lock().unwrap().clone();
        let mut found = false;
        for id in ids {
            let chosen = {
                let g = self.registry.entries.lock().unwrap();
                g.iter().any(|e| e.id == id && pick(&e.listen, e.bound))
            };
            if chosen && let Some((listen, bound)) = self.registry.remove(id) {
                self.ids.lock().unwrap().retain(|i| *i != id);
                if let Some(conn) = self.conn().await {
                    cancel_remote(&conn, &listen, bound).await;
                }
                found = true;
            }
        }
        found
    }

    /// The client connection ended: forget its forwards and stop them
    /// listening upstream at once.
    pub fn end(self: Arc<Self>) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap());
        let removed: Vec<_> = ids
            .into_iter()
            .filter_map(|id| self.registry.remove(id))
            .collect();
        if removed.is_empty() {
            return;
        }
        let up = self.registry.upstream.lock().unwrap().upgrade();
        tokio::spawn(async move {
            let Some(up) = up else { return };
            let Ok(conn) = up.connection().await else {
                return;
            };
            for (listen, bound) in removed {
                cancel_remote(&conn, &listen, bound).await;
            }
        });
    }
}

/// Runs the sshshim-owned `-L` forwards until `shutdown`: each listens
/// locally and sends its connections through the upstream connection.
pub async fn run_local_forward(
    spec: ForwardSpec,
    upstream: Arc<Upstream>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    enum Listener {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, std::path::PathBuf),
    }
    let listener = match &spec.listen {
        Addr::Tcp(h, p) => {
            let host = if h.is_empty() || h == "localhost" {
                "127.0.0.1"
            } else {
                h.as_str()
            };
            let l = tokio::net::TcpListener::bind((host, *p))
                .await
                .map_err(|e| format!("{spec}: cannot listen on {host}:{p}: {e}"))?;
            Listener::Tcp(l)
        }
        Addr::Unix(p) => {
            let path = crate::config::expand_tilde(p.as_ref());
            let l = bind_unix_private(&path)
                .map_err(|e| format!("{spec}: cannot listen on {p}: {e}"))?;
            Listener::Unix(l, path)
        }
    };
    tracing::info!("local forward {spec} listening");
    loop {
        let accepted: std::io::Result<(Box<dyn Stream>, String, u32)> = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = async {
                match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(s, a)| {
                        let _ = s.set_nodelay(true);
                        (Box::new(s) as Box<dyn Stream>, a.ip().to_string(), a.port() as u32)
                    }),
                    Listener::Unix(l, _) => l.accept().await.map(|(s, _)| (Box::new(s) as Box<dyn Stream>, "127.0.0.1".to_owned(), 0)),
                }
            } => r,
        };
        let (stream, orig, orig_port) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("{spec}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (up, spec2) = (upstream.clone(), spec.clone());
        tokio::spawn(async move {
            let conn = match up.connection().await {
                Ok(c) => c,
                Err(why) => {
                    tracing::warn!("{spec2}: {why}");
                    return;
                }
            };
            let opened = match &spec2.target {
                Addr::Tcp(h, p) => {
                    conn.handle
                        .channel_open_direct_tcpip(h.clone(), *p as u32, orig, orig_port)
                        .await
                }
                Addr::Unix(p) => conn.handle.channel_open_direct_streamlocal(p.clone()).await,
            };
            match opened {
                Ok(ch) => bridge::spawn_stream(
                    stream,
                    ch,
                    spec2.to_string(),
                    up.stats().open("direct-tcpip"),
                ),
                Err(e) => tracing::warn!("{spec2}: upstream refused the connection: {e}"),
            }
        });
    }
    if let Listener::Unix(_, path) = listener {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// A socket of either family, boxed for the accept loop.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

/// Binds a Unix socket that only our user can connect to.
fn bind_unix_private(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(kind: Kind, s: &str) -> ForwardSpec {
        ForwardSpec::parse(kind, s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn openssh_forms() {
        let f = p(Kind::Local, "8080:localhost:80");
        assert_eq!(f.listen, Addr::Tcp("".into(), 8080));
        assert_eq!(f.target, Addr::Tcp("localhost".into(), 80));
        let f = p(Kind::Remote, "0.0.0.0:2222:localhost:22");
        assert_eq!(f.listen, Addr::Tcp("0.0.0.0".into(), 2222));
        let f = p(Kind::Remote, "0:localhost:3000");
        assert_eq!(f.listen, Addr::Tcp("".into(), 0));
        let f = p(Kind::Local, "[::1]:8080:[fe80::1]:80");
        assert_eq!(f.listen, Addr::Tcp("::1".into(), 8080));
        assert_eq!(f.target, Addr::Tcp("fe80::1".into(), 80));
        let f = p(Kind::Local, "/tmp/l.sock:/run/r.sock");
        assert_eq!(f.listen, Addr::Unix("/tmp/l.sock".into()));
        assert_eq!(f.target, Addr::Unix("/run/r.sock".into()));
        let f = p(Kind::Local, "5432:/run/pg.sock");
        assert_eq!(f.target, Addr::Unix("/run/pg.sock".into()));
        let f = p(Kind::Remote, "/tmp/r.sock:localhost:22");
        assert_eq!(f.listen, Addr::Unix("/tmp/r.sock".into()));
        assert_eq!(f.to_string(), "-R /tmp/r.sock:localhost:22");
    }

    #[test]
    fn bad_specs_name_the_spec_and_the_form() {
        for s in [
            "8080",
            "x:localhost:80",
            "8080:localhost:",
            "1:2:3:4:5",
            "[::1:80:h:1",
            "0:localhost:80",
        ] {
            let e = ForwardSpec::parse(Kind::Local, s).unwrap_err();
            assert!(e.contains(s), "{e}");
            assert!(
                e.contains("expected [bind_address:]port:host:hostport"),
                "{e}"
            );
        }
    }
}

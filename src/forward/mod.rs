//! Port forwarding: the registry of desired remote forwards (whoever owns
//! them), routing of the channels the server opens (forwarded connections,
//! agent requests), replay after a reconnect, and sshshim's own forwards.
//!
//! The registry consumes the upstream's events ([`Registry::serve`]) and
//! watches its connection state; the upstream never calls in here.

pub mod client;
pub mod local;
mod route;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::BackoffBuilder;
use russh::server;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bridge::Opener;
use crate::config::spec::{Addr, ForwardSpec};
use crate::upstream::{Connection, Pool, ServerOpen, State};
pub use route::{AgentGuard, AgentTarget};

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

/// One forward as shown in status.
#[derive(Debug, Clone)]
pub struct FwdInfo {
    /// The listening side as requested.
    pub listen: String,
    /// Owned by sshshim (not by a local client).
    pub shim_owned: bool,
    /// Whether it listens.
    pub state: FwdState,
    /// The port bound upstream (the allocated one for port 0).
    pub bound: Option<u16>,
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
/// and sshshim-owned forwards so both are replayed alike, plus the routes
/// for the server's agent channels. It owns its invariants: other modules
/// use its methods, never its maps.
pub struct Registry {
    /// Desired forwards.
    entries: Mutex<Vec<Entry>>,
    /// Id source.
    next_id: AtomicU64,
    /// The upstream side.
    pool: Arc<Pool>,
    /// Bridges routed channels (on the tasks waited for on shutdown).
    opener: Opener,
    /// Local sessions that asked for agent forwarding (see [`AgentTarget`]).
    agents: Mutex<Vec<route::AgentRoute>>,
    /// Upstream connections (by generation) on which the server granted
    /// agent forwarding: sshd grants it once per connection and refuses
    /// later requests while serving them all from that one socket. One
    /// number per connection that ever forwarded an agent.
    agent_granted: Mutex<HashSet<u64>>,
}

impl Registry {
    /// An empty registry for the forwards of `opener`'s pool.
    pub fn new(opener: Opener) -> Arc<Self> {
        Arc::new(Registry {
            entries: Mutex::default(),
            next_id: AtomicU64::new(0),
            pool: opener.pool().clone(),
            opener,
            agents: Mutex::default(),
            agent_granted: Mutex::default(),
        })
    }

    /// The upstream side.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Serves the upstream's events until `shutdown`: routes the channels
    /// the server opens, and replays forwards whenever a new connection is
    /// up. Connections are told apart by generation, so a reconnect that
    /// happens between two looks at the state is not missed.
    pub async fn serve(
        self: Arc<Self>,
        mut events: mpsc::Receiver<ServerOpen>,
        shutdown: CancellationToken,
    ) {
        let mut state = self.pool.watch();
        let mut replayed = None;
        loop {
            let now = state.borrow_and_update().clone();
            match now {
                State::Up(conn) if replayed != Some(conn.generation) => {
                    replayed = Some(conn.generation);
                    self.replay(conn);
                }
                State::Up(_) => {}
                _ => self.mark_down(),
            }
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => self.route(ev),
                    None => return,
                },
                r = state.changed() => if r.is_err() {
                    return;
                },
                _ = shutdown.cancelled() => return,
            }
        }
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

    /// Whether forward `id` exists and `pick` selects its listen side.
    fn selects(&self, id: u64, pick: impl Fn(&Addr, Option<u16>) -> bool) -> bool {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.id == id && pick(&e.listen, e.bound))
    }

    /// Every forward, for status and tests.
    pub fn snapshot(&self) -> Vec<FwdInfo> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|e| FwdInfo {
                listen: e.listen.to_string(),
                shim_owned: matches!(e.owner, Owner::Shim(_)),
                state: e.state.clone(),
                bound: e.bound,
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

    /// Re-requests every forward not yet listening on `conn` (after a
    /// reconnect, and for sshshim-owned forwards at start), retrying each
    /// with backoff while the connection lives.
    fn replay(self: &Arc<Self>, conn: Arc<Connection>) {
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
            self.opener
                .tasks()
                .spawn(async move { reg.establish(id, listen, bound, conn).await });
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
                        e.state = FwdState::Retrying(why.to_string());
                    }
                }
            }
            tokio::time::sleep(backoff.next().unwrap_or(Duration::from_secs(10))).await;
        }
    }

    /// The connection is gone: nothing listens upstream until the replay.
    fn mark_down(&self) {
        for e in self.entries.lock().unwrap().iter_mut() {
            if e.state == FwdState::Active {
                e.state = FwdState::Pending;
            }
        }
    }

    /// The sshshim-owned `-R` forward with exactly this listen side (as
    /// requested, so `0:...` finds a port-0 forward) and target.
    pub fn find_owned_remote(&self, listen: &Addr, target: &Addr) -> Option<u64> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .find(|e| &e.listen == listen && matches!(&e.owner, Owner::Shim(t) if t == target))
            .map(|e| e.id)
    }

    /// The state and bound port of forward `id`, if it still exists.
    pub fn state_of(&self, id: u64) -> Option<(FwdState, Option<u16>)> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.id == id)
            .map(|e| (e.state.clone(), e.bound))
    }

    /// Removes forward `id` and stops it listening upstream.
    pub fn remove_and_cancel(self: &Arc<Self>, id: u64) -> bool {
        let Some((listen, bound)) = self.remove(id) else {
            return false;
        };
        let pool = self.pool.clone();
        self.opener.tasks().spawn(async move {
            if let Ok(conn) = pool.connection().await {
                cancel_remote(&conn, &listen, bound).await;
            }
        });
        true
    }

    /// Adds an sshshim-owned `-R` forward; it is requested as soon as a
    /// connection is up (and again after every reconnect). Returns its id.
    pub fn add_owned_remote(&self, spec: &ForwardSpec) -> u64 {
        self.add(
            spec.listen.clone(),
            None,
            Owner::Shim(spec.target.clone()),
            0,
        )
    }

    /// Adds an sshshim-owned `-R` forward while running: requested at once
    /// if a connection is up, and replayed after every reconnect.
    pub fn open_owned_remote(self: &Arc<Self>, spec: &ForwardSpec) -> u64 {
        let id = self.add_owned_remote(spec);
        if let State::Up(conn) = self.pool.state()
            && conn.is_alive()
        {
            let (reg, listen) = (self.clone(), spec.listen.clone());
            self.opener
                .tasks()
                .spawn(async move { reg.establish(id, listen, None, conn).await });
        }
        id
    }
}

/// Why the server is not listening for a remote forward.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    /// The server said no (sshd's `AllowTcpForwarding`, a port in use, ...).
    #[error("the server refused to listen on {0}")]
    Refused(String),
    /// The request failed (the connection, most likely).
    #[error(transparent)]
    Failed(russh::Error),
}

/// Asks upstream to listen; returns the bound port (0 for sockets).
async fn request_remote(
    conn: &Connection,
    listen: &Addr,
    bound: Option<u16>,
) -> Result<u16, ListenError> {
    let failed = |e, asked: String| match e {
        russh::Error::RequestDenied => ListenError::Refused(asked),
        e => ListenError::Failed(e),
    };
    match listen {
        Addr::Tcp(host, port) => {
            let want = bound.unwrap_or(*port);
            match conn.handle.tcpip_forward(host.clone(), want as u32).await {
                // russh reports 0 for a fixed port: the port is the one asked.
                Ok(got) => Ok(if want != 0 { want } else { got as u16 }),
                Err(e) => Err(failed(e, Addr::Tcp(host.clone(), want).to_string())),
            }
        }
        Addr::Unix(path) => match conn.handle.streamlocal_forward(path.clone()).await {
            Ok(()) => Ok(0),
            Err(e) => Err(failed(e, path.clone())),
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

//! One running profile: binds the endpoint, connects upstream, serves until
//! told to stop or until the upstream fails for good. `sshshim up` runs one
//! in the foreground; `sshshim supervise` runs several.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::bridge::Opener;
use crate::config::UpConfig;
use crate::config::spec::Kind;
use crate::endpoint::auth::{AuthorizedKeys, AuthorizedKeysError};
use crate::endpoint::{self, Endpoint, HostKeyError};
use crate::forward::local::ForwardError;
use crate::forward::{self, Registry};
use crate::master::{Master, MasterOptions};
use crate::mux::{MuxListener, MuxServer};
use crate::stats::Gauge;
use crate::upstream::{Pool, UpstreamError, known_hosts::fingerprint};

/// How long the exit waits for local sessions and bridges to finish after
/// the upstream is closed.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// How a profile ended.
#[derive(Debug)]
pub enum Exit {
    /// Stopped on request.
    Stopped,
    /// Could not start or gave up; `permanent` when retrying cannot help
    /// (host key changed, credentials rejected, bad settings).
    Failed {
        /// The message for the user.
        message: String,
        /// Whether a supervisor should not restart it soon.
        permanent: bool,
    },
}

/// What a started profile exposes to its owner (status, banner).
pub struct Started {
    /// The upstream side.
    pub pool: Arc<Pool>,
    /// The forward registry.
    pub forwards: Arc<Registry>,
    /// The endpoint address actually bound, if any.
    pub endpoint: Option<SocketAddr>,
    /// Endpoint host key fingerprint and file.
    pub host_key: (String, std::path::PathBuf),
    /// Local clients connected right now.
    pub local_clients: Gauge,
    /// The OpenSSH multiplexing socket, if served.
    pub mux: Option<std::path::PathBuf>,
    /// Resumable sessions, if on.
    pub resume: Option<Arc<crate::resume::Resume>>,
}

/// Runs one profile until `stop` is cancelled. `on_start` is called once
/// the upstream is connected and the endpoint is listening.
pub async fn run(cfg: UpConfig, stop: CancellationToken, on_start: impl FnOnce(&Started)) -> Exit {
    let cfg = Arc::new(cfg);
    // Bound before connecting, so a taken port or socket fails before any
    // prompt.
    let bound = match Bound::bind(&cfg).await {
        Ok(b) => b,
        Err(e) => return failed(e.to_string()),
    };
    let profile = Profile::new(cfg);
    if let Err(exit) = profile.connect(&stop).await {
        return exit;
    }
    let mux = bound.mux.map(|l| profile.start_master(l, &stop));
    let local_forwards = profile.start_local_forwards();
    let local_clients = Gauge::default();
    let endpoint = bound
        .endpoint
        .as_ref()
        .and_then(|l| l.listener.local_addr().ok());
    let host_key = match bound.endpoint {
        Some(e) => profile.start_endpoint(e, local_clients.clone()),
        None => (String::new(), std::path::PathBuf::new()),
    };
    on_start(&Started {
        pool: profile.opener.pool().clone(),
        forwards: profile.registry.clone(),
        endpoint,
        host_key,
        local_clients,
        mux,
        resume: profile.opener.resume().cloned(),
    });
    profile.run(stop, local_forwards).await
}

/// A failure that retrying cannot help.
fn failed(message: String) -> Exit {
    Exit::Failed {
        message,
        permanent: true,
    }
}

/// Why a profile cannot bind what it serves; each message says what to
/// change.
#[derive(Debug, thiserror::Error)]
enum BindError {
    /// `--listen` beyond loopback without `--allow-non-loopback`.
    #[error(
        "--listen {0} is not a loopback address; anyone who can reach it could try to log in. \
         Pass --allow-non-loopback if you really mean it."
    )]
    NotLoopback(SocketAddr),
    /// The endpoint's host key.
    #[error(transparent)]
    HostKey(#[from] HostKeyError),
    /// The `--authorized-keys` file.
    #[error(transparent)]
    AuthorizedKeys(#[from] AuthorizedKeysError),
    /// No key to admit anyone with.
    #[error(
        "no public key to admit local clients with: create a key (ssh-keygen -t ed25519), load \
         one into ssh-agent, or pass --authorized-keys FILE"
    )]
    NoKeys,
    /// The endpoint's port is taken.
    #[error(
        "port {0} is already in use (another sshshim?); choose another with --listen \
         127.0.0.1:PORT"
    )]
    PortInUse(u16),
    /// The endpoint cannot listen for another reason.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The `--listen` address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The multiplexing socket cannot be served.
    #[error(
        "cannot serve the multiplexing socket {}: {source} (choose another with --mux PATH, or \
         --mux none)",
        path.display()
    )]
    Mux {
        /// The socket's path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What a profile binds before it connects.
struct Bound {
    /// The endpoint, unless `--listen none`.
    endpoint: Option<BoundEndpoint>,
    /// The multiplexing socket, unless `--mux none`.
    mux: Option<MuxListener>,
}

/// The endpoint's listener and keys.
struct BoundEndpoint {
    /// The listening socket.
    listener: TcpListener,
    /// Its host key and the file it is in.
    key: (PrivateKey, std::path::PathBuf),
    /// The keys it admits.
    authorized: AuthorizedKeys,
}

impl Bound {
    /// Binds the endpoint and the multiplexing socket; the message says
    /// what to change when one cannot be.
    async fn bind(cfg: &UpConfig) -> Result<Bound, BindError> {
        let endpoint = match cfg.listen {
            Some(listen) => Some(BoundEndpoint::bind(cfg, listen).await?),
            None => None,
        };
        // A live socket of another sshshim is an error now, not after a
        // prompt.
        let mux = match &cfg.mux {
            Some(path) => Some(MuxListener::bind(path).map_err(|source| BindError::Mux {
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        Ok(Bound { endpoint, mux })
    }
}

impl BoundEndpoint {
    /// Loads the keys and binds `listen` (refused beyond loopback unless
    /// allowed).
    async fn bind(cfg: &UpConfig, listen: SocketAddr) -> Result<Self, BindError> {
        if !listen.ip().is_loopback() {
            if !cfg.allow_non_loopback {
                return Err(BindError::NotLoopback(listen));
            }
            tracing::warn!(
                "the endpoint listens on {listen}, which is reachable from other machines"
            );
        }
        let key = endpoint::load_or_create_host_key(cfg.host_key.as_deref())?;
        let authorized = match &cfg.authorized_keys {
            Some(p) => AuthorizedKeys::from_file(p)?,
            None => AuthorizedKeys::users_own().await,
        };
        if authorized.is_empty() {
            return Err(BindError::NoKeys);
        }
        let listener = TcpListener::bind(listen).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                BindError::PortInUse(listen.port())
            } else {
                BindError::Listen {
                    addr: listen,
                    source,
                }
            }
        })?;
        Ok(BoundEndpoint {
            listener,
            key,
            authorized,
        })
    }
}

/// A profile's running parts. Everything it starts runs on its opener's
/// tasks, so the exit can wait for it; `shutdown` tells it all to stop.
struct Profile {
    /// The resolved settings.
    cfg: Arc<UpConfig>,
    /// The upstream pool, with what every bridge shares.
    opener: Opener,
    /// The forward registry.
    registry: Arc<Registry>,
    /// Stops everything the profile started.
    shutdown: CancellationToken,
}

impl Profile {
    /// The pool and the registry (serving the upstream's events already),
    /// not yet connected.
    fn new(cfg: Arc<UpConfig>) -> Self {
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let (pool, server_opens) = Pool::new(cfg.clone());
        let resume = cfg.resume.as_ref().map(|(timeout, helper)| {
            crate::resume::Resume::new(
                pool.clone(),
                crate::resume::Settings {
                    timeout: *timeout,
                    remote_helper: helper.clone(),
                    instance: format!("{}\0{}", cfg.config_file.as_deref().unwrap_or(""), cfg.name),
                },
            )
        });
        let opener = Opener::new(pool, tasks.clone(), cfg.tuning.stall_limit).with_resume(resume);
        let registry = Registry::new(opener.clone());
        for spec in cfg.forwards.iter().filter(|f| f.kind == Kind::Remote) {
            registry.add_owned_remote(spec);
        }
        tasks.spawn(
            registry
                .clone()
                .serve(server_opens, shutdown.clone())
                .in_current_span(),
        );
        Profile {
            cfg,
            opener,
            registry,
            shutdown,
        }
    }

    /// Makes the first upstream connection; `Err` is how the profile ends.
    async fn connect(&self, stop: &CancellationToken) -> Result<(), Exit> {
        let first = tokio::select! {
            r = self.opener.pool().connect_first() => r,
            _ = stop.cancelled() => {
                self.shutdown.cancel();
                return Err(Exit::Stopped);
            }
        };
        first.map_err(|e| {
            self.shutdown.cancel();
            Exit::Failed {
                permanent: e.is_permanent(),
                message: e.to_string(),
            }
        })?;
        if let Some(r) = self.opener.resume().cloned() {
            // Find (or upload) the helper now, so the first session does
            // not wait for it, and end what a previous run of ours held.
            self.opener.tasks().spawn(
                async move {
                    let _ = r.helper().await;
                }
                .in_current_span(),
            );
        }
        Ok(())
    }

    /// Serves OpenSSH's multiplexing protocol on `listener`; returns its
    /// path.
    fn start_master(&self, listener: MuxListener, stop: &CancellationToken) -> std::path::PathBuf {
        let path = listener.path().to_path_buf();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let server = MuxServer::new(listener, tx);
        let master = Master::new(MasterOptions {
            opener: self.opener.clone(),
            registry: self.registry.clone(),
            connect_timeout: self.cfg.tuning.connect_timeout,
            stop_profile: stop.clone(),
            stop_listening: server.stop_token(),
            shutdown: self.shutdown.clone(),
        });
        let stop_serving = server.stop_token();
        let sd = self.shutdown.clone();
        let tasks = self.opener.tasks();
        tasks.spawn(
            async move {
                tokio::select! {
                    _ = server.run() => {}
                    _ = sd.cancelled() => stop_serving.cancel(),
                }
            }
            .in_current_span(),
        );
        tasks.spawn(master.serve(rx).in_current_span());
        path
    }

    /// Starts sshshim's own `-L` forwards; each ends with an error if it
    /// cannot listen.
    fn start_local_forwards(&self) -> JoinSet<Result<(), ForwardError>> {
        let mut set = JoinSet::new();
        for spec in self.cfg.forwards.iter().filter(|f| f.kind == Kind::Local) {
            let fut = forward::local::run(spec.clone(), self.opener.clone(), self.shutdown.clone());
            set.spawn(fut.in_current_span());
        }
        set
    }

    /// Serves the local endpoint; returns its host key's fingerprint and
    /// file.
    fn start_endpoint(&self, bound: BoundEndpoint, clients: Gauge) -> (String, std::path::PathBuf) {
        let (key, path) = bound.key;
        let fingerprint = fingerprint(key.public_key());
        record_alias(&self.cfg.name, &key);
        let ep = Endpoint {
            config: Arc::new(endpoint::server_config(key)),
            opener: self.opener.clone(),
            authorized: Arc::new(bound.authorized),
            forwards: self.registry.clone(),
            allow_non_loopback: self.cfg.allow_non_loopback,
            clients,
        };
        let serving = ep.serve(bound.listener, self.shutdown.clone());
        self.opener.tasks().spawn(serving.in_current_span());
        (fingerprint, path)
    }

    /// Keeps the upstream up until `stop`, the upstream gives up, or a
    /// local forward cannot listen; then stops everything and waits a
    /// little for it.
    async fn run(
        self,
        stop: CancellationToken,
        mut local_forwards: JoinSet<Result<(), ForwardError>>,
    ) -> Exit {
        let pool = self.opener.pool().clone();
        let mut running = tokio::spawn(pool.run(self.shutdown.clone()).in_current_span());
        let (exit, upstream_done) = tokio::select! {
            _ = stop.cancelled() => (Exit::Stopped, false),
            r = &mut running => match r {
                Ok(Err(e)) => (gave_up(e), true),
                _ => (Exit::Stopped, true),
            },
            r = wait_first_error(&mut local_forwards) => (failed(r.to_string()), false),
        };
        self.shutdown.cancel();
        // Closing upstream closes every bridged channel; wait for local
        // sessions and bridges to pass that on to their clients, but never
        // hang the exit.
        let tasks = self.opener.tasks();
        tasks.close();
        let waited = tokio::time::timeout(SHUTDOWN_GRACE, async {
            if !upstream_done {
                let _ = running.await;
            }
            local_forwards.shutdown().await;
            tasks.wait().await;
        })
        .await;
        if waited.is_err() {
            tracing::debug!("{} tasks still running at exit", tasks.len());
        }
        exit
    }
}

/// The exit for an upstream that gave up.
fn gave_up(e: UpstreamError) -> Exit {
    Exit::Failed {
        permanent: e.is_permanent(),
        message: format!("giving up: {e}"),
    }
}

/// Records the endpoint's host key under the alias `sshshim-NAME` in
/// sshshim's own known_hosts, so the Host block from `sshshim ssh-config`
/// connects without a prompt.
fn record_alias(name: &str, key: &russh::keys::PrivateKey) {
    let Ok(dir) = crate::paths::state_dir() else {
        return;
    };
    let Ok(line) = key.public_key().to_openssh() else {
        return;
    };
    let alias = crate::config::host_blocks::alias(name);
    if let Err(e) =
        crate::config::host_blocks::record_endpoint_key(&dir.join("known_hosts"), &alias, &line)
    {
        tracing::debug!("cannot record the endpoint key for {alias}: {e}");
    }
}

/// Waits until one of the local forwards fails to start (a bind error).
async fn wait_first_error(tasks: &mut JoinSet<Result<(), ForwardError>>) -> ForwardError {
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            return e;
        }
    }
    std::future::pending().await
}

/// SIGINT or SIGTERM.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Tells the user where the endpoint is and how to use it. The first line
/// is stable: scripts and tests wait for it.
pub fn print_banner(name: &str, s: &Started) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let target = s.pool.target();
    let Some(bound) = s.endpoint else {
        let _ = writeln!(out, "sshshim: connected to {target} (no local endpoint)");
        if let Some(m) = &s.mux {
            let _ = writeln!(out, "  mux:       {}", m.display());
        }
        let _ = out.flush();
        return;
    };
    let port = bound.port();
    let host = if bound.ip().is_loopback() {
        "localhost".to_string()
    } else {
        bound.ip().to_string()
    };
    let p = if port == 22 {
        String::new()
    } else {
        format!(" -p {port}")
    };
    let cap_p = if port == 22 {
        String::new()
    } else {
        format!(" -P {port}")
    };
    let alias = format!("{}-shim", crate::paths::safe_name(name));
    // The Host block is the way in we recommend: it pins the endpoint's host
    // key under a stable name and steers ssh to the fastest algorithms here.
    let port_flag = if port == crate::config::profile::DEFAULT_LISTEN.port() {
        String::new()
    } else {
        format!(" --port {port}")
    };
    let _ = writeln!(out, "sshshim: listening on {bound}");
    let _ = writeln!(out, "  upstream:  {target} (connected)");
    let _ = writeln!(
        out,
        "  host key:  {} ({})",
        s.host_key.0,
        s.host_key.1.display()
    );
    let _ = writeln!(
        out,
        "  set up:    sshshim ssh-config --install {name}{port_flag}"
    );
    let _ = writeln!(
        out,
        "             (a Host block: host key pinned, fastest ciphers and key exchange first)"
    );
    let _ = writeln!(
        out,
        "  then:      ssh {alias}   scp FILE {alias}:   sftp {alias}   rsync -e ssh SRC {alias}:DST"
    );
    if let Some(m) = &s.mux {
        let _ = writeln!(
            out,
            "  mux:       {} (OpenSSH tools: ssh -o ControlPath={} -o ControlMaster=no HOST)",
            m.display(),
            m.display()
        );
    }
    let _ = writeln!(out, "  or now:    ssh{p} {host}");
    let _ = writeln!(out, "             scp{cap_p} FILE {host}:");
    let _ = writeln!(out, "             sftp{cap_p} {host}");
    let _ = writeln!(out, "             rsync -e 'ssh{p}' SRC {host}:DST");
    let _ = out.flush();
}

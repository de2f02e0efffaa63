//! One running profile: binds the endpoint, connects upstream, serves until
//! told to stop or until the upstream fails for good. `sshshim up` runs one
//! in the foreground; `sshshim supervise` runs several.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::UpConfig;
use crate::endpoint::{self, Endpoint, auth::AuthorizedKeys};
use crate::forward::{self, Registry};
use crate::master::{Master, MasterOptions};
use crate::mux::{MuxListener, MuxServer};
use crate::spec::Kind;
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
    let fail = |message: String| Exit::Failed {
        message,
        permanent: true,
    };
    let cfg = Arc::new(cfg);
    let mut listener = None;
    let mut key = None;
    let mut authorized = None;
    if let Some(listen) = cfg.listen {
        if !listen.ip().is_loopback() {
            if !cfg.allow_non_loopback {
                return fail(format!(
                    "--listen {listen} is not a loopback address; anyone who can reach it could \
                     try to log in. Pass --allow-non-loopback if you really mean it."
                ));
            }
            tracing::warn!(
                "the endpoint listens on {listen}, which is reachable from other machines"
            );
        }
        match endpoint::load_or_create_host_key(cfg.host_key.as_deref()) {
            Ok(k) => key = Some(k),
            Err(e) => return fail(e),
        }
        let keys = match &cfg.authorized_keys {
            Some(p) => match AuthorizedKeys::from_file(p) {
                Ok(k) => k,
                Err(e) => return fail(e),
            },
            None => AuthorizedKeys::users_own().await,
        };
        if keys.is_empty() {
            return fail(
                "no public key to admit local clients with: create a key (ssh-keygen -t \
                 ed25519), load one into ssh-agent, or pass --authorized-keys FILE"
                    .into(),
            );
        }
        authorized = Some(keys);
        // Bind before connecting, so a taken port fails before any prompt.
        match TcpListener::bind(listen).await {
            Ok(l) => listener = Some(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return fail(format!(
                    "port {} is already in use (another sshshim?); choose another with \
                     --listen 127.0.0.1:PORT",
                    listen.port()
                ));
            }
            Err(e) => return fail(format!("cannot listen on {listen}: {e}")),
        }
    }
    let endpoint_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    // The multiplexing socket too is bound before connecting: a live one
    // of another sshshim is an error now, not after a prompt.
    let mux_listener = match &cfg.mux {
        Some(path) => match MuxListener::bind(path) {
            Ok(l) => Some(l),
            Err(e) => {
                return fail(format!(
                    "cannot serve the multiplexing socket {}: {e} (choose another with --mux \
                     PATH, or --mux none)",
                    path.display()
                ));
            }
        },
        None => None,
    };

    // Everything this profile starts runs on `tasks`, so the exit can wait
    // for it; `shutdown` tells it all to stop.
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let (pool, server_opens) = Pool::new(cfg.clone());
    let registry = Registry::new(pool.clone(), tasks.clone(), cfg.tuning.stall_limit);
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
    for spec in cfg.forwards.iter().filter(|f| f.kind == Kind::Remote) {
        registry.add_owned_remote(spec);
    }
    tasks.spawn(
        registry
            .clone()
            .serve(server_opens, shutdown.clone())
            .in_current_span(),
    );
    let first = tokio::select! {
        r = pool.connect_first() => r,
        _ = stop.cancelled() => {
            shutdown.cancel();
            return Exit::Stopped;
        }
    };
    if let Err(e) = first {
        shutdown.cancel();
        let permanent = e.is_permanent();
        return Exit::Failed {
            message: e.to_string(),
            permanent,
        };
    }

    if let Some(r) = resume.clone() {
        // Find (or upload) the helper now, so the first session does not
        // wait for it, and end what a previous run of ours left held.
        tasks.spawn(
            async move {
                let _ = r.helper().await;
            }
            .in_current_span(),
        );
    }
    let mux_path = mux_listener.as_ref().map(|l| l.path().to_path_buf());
    if let Some(l) = mux_listener {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let server = MuxServer::new(l, tx);
        let master = Master::new(MasterOptions {
            pool: pool.clone(),
            registry: registry.clone(),
            tasks: tasks.clone(),
            stall_limit: cfg.tuning.stall_limit,
            connect_timeout: cfg.tuning.connect_timeout,
            stop_profile: stop.clone(),
            stop_listening: server.stop_token(),
            shutdown: shutdown.clone(),
            resume: resume.clone(),
        });
        let stop_serving = server.stop_token();
        let sd = shutdown.clone();
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
    }

    let mut local_forwards = tokio::task::JoinSet::new();
    for spec in cfg.forwards.iter().filter(|f| f.kind == Kind::Local) {
        let fut = forward::local::run(spec.clone(), registry.clone(), shutdown.clone());
        local_forwards.spawn(fut.in_current_span());
    }

    let local_clients = Gauge::default();
    let mut host_key = (String::new(), std::path::PathBuf::new());
    if let (Some(listener), Some((k, path)), Some(authorized)) = (listener, key, authorized) {
        host_key = (fingerprint(k.public_key()), path);
        record_alias(&cfg.name, &k);
        let ep = Endpoint {
            config: Arc::new(endpoint::server_config(k)),
            pool: pool.clone(),
            authorized: Arc::new(authorized),
            forwards: registry.clone(),
            allow_non_loopback: cfg.allow_non_loopback,
            clients: local_clients.clone(),
            tasks: tasks.clone(),
            stall_limit: cfg.tuning.stall_limit,
            resume: resume.clone(),
        };
        tasks.spawn(ep.serve(listener, shutdown.clone()).in_current_span());
    }
    on_start(&Started {
        pool: pool.clone(),
        forwards: registry.clone(),
        endpoint: endpoint_addr,
        host_key,
        local_clients,
        mux: mux_path,
        resume,
    });

    let mut running = tokio::spawn(pool.clone().run(shutdown.clone()).in_current_span());
    let (exit, upstream_done) = tokio::select! {
        _ = stop.cancelled() => (Exit::Stopped, false),
        r = &mut running => match r {
            Ok(Err(e)) => (gave_up(e), true),
            _ => (Exit::Stopped, true),
        },
        r = wait_first_error(&mut local_forwards) => (fail(r), false),
    };
    shutdown.cancel();
    // Closing upstream closes every bridged channel; wait for local sessions
    // and bridges to pass that on to their clients, but never hang the exit.
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
    let alias = crate::client_config::alias(name);
    if let Err(e) =
        crate::client_config::record_endpoint_key(&dir.join("known_hosts"), &alias, &line)
    {
        tracing::debug!("cannot record the endpoint key for {alias}: {e}");
    }
}

/// Waits until one of the local forwards fails to start (a bind error).
async fn wait_first_error(tasks: &mut tokio::task::JoinSet<Result<(), String>>) -> String {
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
    let port_flag = if port == crate::profile::DEFAULT_LISTEN.port() {
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

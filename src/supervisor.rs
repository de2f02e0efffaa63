//! Running profiles: `sshshim up` (one, in the foreground) and `sshshim
//! supervise` (many, each isolated, restarted on failure, reloaded on
//! SIGHUP), with the control socket, metrics, event hooks and sd_notify.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tracing::Instrument;

use tokio_util::sync::CancellationToken;

use crate::config::UpConfig;
use crate::control::{self, ForwardStatus, ProfileStatus, StatusSource, UpstreamStatus};
use crate::forward::{FwdState, Registry};
use crate::hooks::EventHook;
use crate::profile::{self, Profile};
use crate::service;
use crate::shim::{self, Exit, Started};
use crate::stats::Gauge;
use crate::upstream::{Pool, State};

use crate::stats::unix_secs as unix;

/// What a profile has once it is running.
struct Parts {
    /// The upstream side.
    pool: Arc<Pool>,
    /// Its forwards.
    forwards: Arc<Registry>,
    /// Endpoint address, if any.
    endpoint: Option<SocketAddr>,
    /// Multiplexing socket, if any.
    mux: Option<std::path::PathBuf>,
    /// Local clients connected.
    clients: Gauge,
    /// Resumable sessions, if on.
    resume: Option<Arc<crate::resume::Resume>>,
}

/// A profile's live status, shared with the control socket and metrics.
pub struct Live {
    /// Profile name.
    name: String,
    /// `user@host:port` for status.
    destination: String,
    /// `config_file` and `profile_destination` for status.
    source: (Option<String>, Option<String>),
    /// Set once started; replaced on restart.
    parts: Mutex<Option<Parts>>,
    /// State name and since when, for status when not running.
    track: Mutex<(String, SystemTime, Option<String>)>,
    /// Restarts by the supervisor (added to reconnects).
    restarts: AtomicUsize,
    /// Stops this profile.
    stop: Mutex<CancellationToken>,
}

impl Live {
    /// A profile about to start.
    fn new(name: &str, destination: String, source: (Option<String>, Option<String>)) -> Arc<Self> {
        Arc::new(Live {
            name: name.to_owned(),
            destination,
            source,
            parts: Mutex::new(None),
            track: Mutex::new(("connecting".into(), SystemTime::now(), None)),
            restarts: AtomicUsize::new(0),
            stop: Mutex::new(CancellationToken::new()),
        })
    }

    /// Records a state change.
    fn set(&self, state: &str, error: Option<String>) {
        let mut t = self.track.lock().unwrap();
        if t.0 != state {
            t.1 = SystemTime::now();
        }
        t.0 = state.to_owned();
        if error.is_some() {
            t.2 = error;
        }
    }

    /// The stop token of the current run.
    fn token(&self) -> CancellationToken {
        self.stop.lock().unwrap().clone()
    }
}

impl StatusSource for Live {
    fn snapshot(&self) -> ProfileStatus {
        let (state, since, last_error) = self.track.lock().unwrap().clone();
        let parts = self.parts.lock().unwrap();
        let mut up = UpstreamStatus {
            state,
            since: unix(since),
            next_attempt: None,
            attempt: None,
            last_error,
            reconnects: self.restarts.load(Ordering::Relaxed) as u64,
            rtt_ms: None,
            server_version: None,
            connections: 0,
            congested_connections: 0,
        };
        let mut status = ProfileStatus {
            profile: self.name.clone(),
            pid: std::process::id(),
            destination: self.destination.clone(),
            endpoint: None,
            mux_socket: None,
            upstream: up.clone(),
            local_clients: 0,
            channels: BTreeMap::new(),
            forwards: Vec::new(),
            bytes_in: 0,
            bytes_out: 0,
            config_file: self.source.0.clone(),
            profile_destination: self.source.1.clone(),
            resume: None,
        };
        let Some(p) = parts.as_ref() else {
            return status;
        };
        up.reconnects += p.pool.reconnects();
        up.connections = p.pool.connection_count();
        up.congested_connections = p.pool.congested_count();
        match p.pool.state() {
            State::Up(c) => {
                up.rtt_ms = c.rtt.lock().unwrap().map(|d| d.as_secs_f64() * 1e3);
                up.server_version = Some(c.server_version.clone());
            }
            State::Reconnecting {
                attempt, next_at, ..
            } => {
                up.attempt = Some(attempt);
                up.next_attempt = next_at.map(unix);
            }
            State::Failed(_) => {}
        }
        let stats = p.pool.stats();
        status.upstream = up;
        status.endpoint = p.endpoint.map(|e| e.to_string());
        status.mux_socket = p.mux.as_ref().map(|m| m.display().to_string());
        status.local_clients = p.clients.get();
        status.channels = stats
            .channels()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| (k.to_string(), n))
            .collect();
        status.bytes_in = stats.bytes_in.load(Ordering::Relaxed);
        status.bytes_out = stats.bytes_out.load(Ordering::Relaxed);
        status.resume = p.resume.as_ref().map(|r| crate::control::ResumeStatus {
            helper: r.helper_state(),
            held_sessions: r.held(),
        });
        status.forwards = p
            .forwards
            .snapshot()
            .into_iter()
            .map(|f| {
                let (spec, owned, port) = (f.listen, f.shim_owned, f.bound);
                let (state, error) = match f.state {
                    FwdState::Active => ("active", None),
                    FwdState::Pending => ("pending", None),
                    FwdState::Retrying(e) => ("retrying", Some(e)),
                };
                ForwardStatus {
                    spec: format!("-R {spec}"),
                    owner: if owned { "sshshim" } else { "client" }.into(),
                    state: state.into(),
                    bound_port: port.filter(|p| *p != 0),
                    error,
                }
            })
            .collect();
        status
    }

    fn stop(&self) {
        self.token().cancel();
    }
}

/// Follows a started profile's upstream state: keeps `live` current and
/// fires events, once per change (so once per outage).
async fn follow(
    live: Arc<Live>,
    pool: Arc<Pool>,
    forwards: Arc<Registry>,
    hook: Option<Arc<EventHook>>,
) {
    let emit = |event: &str, reason: &str| {
        if let Some(h) = &hook {
            h.emit(&live.name, event, reason);
        }
    };
    let mut rx = pool.watch();
    let mut was_up = false;
    let mut retrying: Vec<String> = Vec::new();
    loop {
        let state = rx.borrow_and_update().clone();
        match state {
            State::Up(c) => {
                live.set("connected", None);
                if !was_up {
                    emit("connected", &c.server_version);
                }
                was_up = true;
            }
            State::Reconnecting { last_error, .. } => {
                live.set("reconnecting", Some(last_error.clone()));
                if was_up {
                    emit("disconnected", &last_error);
                }
                was_up = false;
            }
            State::Failed(why) => {
                live.set("failed", Some(why.clone()));
                if why != "shutting down" {
                    emit("failed", &why);
                }
                return;
            }
        }
        // Forward failures are polled: they change inside the registry.
        let tick = tokio::time::sleep(Duration::from_secs(1));
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tick => {}
        }
        let now: Vec<(String, String)> = forwards
            .snapshot()
            .into_iter()
            .filter_map(|f| match f.state {
                FwdState::Retrying(e) => Some((f.listen, e)),
                _ => None,
            })
            .collect();
        for (spec, err) in &now {
            if !retrying.contains(spec) {
                emit("forward-failed", &format!("{spec}: {err}"));
            }
        }
        retrying = now.into_iter().map(|(s, _)| s).collect();
    }
}

/// Runs one profile until stopped; `Ok` on a requested stop.
async fn run_profile(
    cfg: UpConfig,
    live: Arc<Live>,
    hook: Option<Arc<EventHook>>,
    banner: bool,
) -> Exit {
    let name = cfg.name.clone();
    let token = live.token();
    let started = |s: &Started| {
        *live.parts.lock().unwrap() = Some(Parts {
            pool: s.pool.clone(),
            forwards: s.forwards.clone(),
            endpoint: s.endpoint,
            mux: s.mux.clone(),
            clients: s.local_clients.clone(),
            resume: s.resume.clone(),
        });
        tokio::spawn(
            follow(
                live.clone(),
                s.pool.clone(),
                s.forwards.clone(),
                hook.clone(),
            )
            .in_current_span(),
        );
        if banner {
            shim::print_banner(&name, s);
        }
    };
    // One span per profile: under `supervise` every log line says whose it is.
    let span = tracing::info_span!("profile", name = %name);
    let exit = shim::run(cfg, token, started).instrument(span).await;
    match &exit {
        Exit::Stopped => live.set("stopped", None),
        Exit::Failed { message, .. } => live.set("failed", Some(message.clone())),
    }
    exit
}

/// Pings systemd's watchdog for as long as the process runs.
fn start_watchdog() {
    if let Some(every) = service::watchdog_interval() {
        tokio::spawn(async move {
            loop {
                service::notify("WATCHDOG=1");
                tokio::time::sleep(every).await;
            }
        });
    }
}

/// `sshshim up`: one profile in the foreground.
pub async fn up(cfg: UpConfig) -> Result<(), String> {
    let live = Live::new(
        &cfg.name,
        cfg.target.to_string(),
        (cfg.config_file.clone(), cfg.profile_destination.clone()),
    );
    let shutdown = CancellationToken::new();
    let control = {
        let (live, name, shutdown) = (live.clone(), cfg.name.clone(), shutdown.clone());
        let src: Arc<dyn StatusSource> = live;
        tokio::spawn(async move { control::serve(name, src, shutdown).await })
    };
    // Fail fast if this profile is already running.
    tokio::task::yield_now().await;
    if control.is_finished() {
        match control.await {
            Ok(Err(e @ control::ServeError::AlreadyRunning { .. })) => return Err(e.to_string()),
            // Status is a convenience: without it the tunnel still runs.
            Ok(Err(e)) => {
                tracing::warn!("no control socket (sshshim status will not see this): {e}")
            }
            _ => {}
        }
    }
    if let Some(addr) = cfg.metrics {
        let l = live.clone();
        let source: Arc<dyn Fn() -> Vec<ProfileStatus> + Send + Sync> =
            Arc::new(move || vec![l.snapshot()]);
        let sd = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = control::serve_metrics(addr, source, sd).await {
                tracing::error!("metrics on {addr}: {e}");
            }
        });
    }
    let hook = cfg.on_event.clone().map(|c| Arc::new(EventHook::new(c)));
    let token = live.token();
    tokio::spawn(async move {
        shim::signal().await;
        tracing::info!("shutting down");
        token.cancel();
    });
    start_watchdog();
    service::notify("READY=1");
    let exit = run_profile(cfg, live, hook, true).await;
    service::notify("STOPPING=1");
    shutdown.cancel();
    match exit {
        Exit::Stopped => Ok(()),
        Exit::Failed { message, .. } => Err(message),
    }
}

/// Options of `sshshim supervise`.
pub struct SuperviseOptions {
    /// Profiles file.
    pub config: Option<std::path::PathBuf>,
    /// Profiles to run (empty: all).
    pub names: Vec<String>,
    /// Metrics address for all profiles.
    pub metrics: Option<SocketAddr>,
    /// Event command for profiles without their own.
    pub on_event: Option<String>,
}

/// A supervised profile.
struct Supervised {
    /// The settings it was started with (to tell a change on reload).
    profile: Profile,
    /// Its status.
    live: Arc<Live>,
    /// Stops the restart loop.
    stop: CancellationToken,
    /// The restart loop.
    task: tokio::task::JoinHandle<()>,
}

/// Reads the selected profiles from the file.
fn read_profiles(opts: &SuperviseOptions) -> Result<BTreeMap<String, Profile>, String> {
    let path = opts.config.clone().unwrap_or_else(profile::default_path);
    let file = profile::load(&path, opts.config.is_some())?;
    let env = profile::from_env()?;
    let mut out = BTreeMap::new();
    if opts.names.is_empty() {
        for (n, p) in file.profiles {
            out.insert(n, env.clone().or(p));
        }
    } else {
        for n in &opts.names {
            out.insert(n.clone(), env.clone().or(file.get(n)?.clone()));
        }
    }
    for (n, p) in &out {
        if let Some(w) = profile::reserved_name_warning(n, p.mcp_created == Some(true)) {
            tracing::warn!("{w}");
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no profiles in {} (add a [profile.NAME] table with a destination)",
            path.display()
        ));
    }
    Ok(out)
}

/// Starts the restart loop of one profile.
fn start(name: &str, p: Profile, file: &str, default_hook: &Option<String>) -> Supervised {
    let live = Live::new(
        name,
        p.destination.clone().unwrap_or_default(),
        (Some(file.to_owned()), p.target_label()),
    );
    let stop = CancellationToken::new();
    let hook = p
        .on_event
        .clone()
        .or(default_hook.clone())
        .map(|c| Arc::new(EventHook::new(c)));
    let (n, prof, l, st) = (name.to_owned(), p.clone(), live.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut delay = Duration::from_secs(2);
        loop {
            // Resolving may run `ssh -G`: keep that off the async workers.
            let (name, profile) = (n.clone(), prof.clone());
            let cfg = tokio::task::spawn_blocking(move || {
                crate::resolve::resolve_up(crate::resolve::UpRequest {
                    name: &name,
                    profile,
                    ssh_config: None,
                    default_listen: None,
                })
            })
            .await
            .unwrap_or_else(|e| Err(format!("resolving profile {n} failed: {e}")));
            let exit = match cfg {
                Ok(cfg) => {
                    *l.stop.lock().unwrap() = st.child_token();
                    run_profile(cfg, l.clone(), hook.clone(), false).await
                }
                Err(message) => Exit::Failed {
                    message,
                    permanent: true,
                },
            };
            if st.is_cancelled() {
                return;
            }
            let wait = match exit {
                Exit::Stopped => return,
                Exit::Failed { message, permanent } => {
                    tracing::error!(profile = %n, "{message}");
                    l.set("failed", Some(message));
                    if permanent {
                        // Retrying cannot fix this (host key changed,
                        // credentials rejected): try again only rarely, or
                        // after a reload.
                        Duration::from_secs(300)
                    } else {
                        delay = (delay * 2).min(Duration::from_secs(60));
                        delay
                    }
                }
            };
            l.restarts.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = st.cancelled() => return,
            }
        }
    });
    Supervised {
        profile: p,
        live,
        stop,
        task,
    }
}

/// `sshshim supervise`: every profile in one process, each isolated.
pub async fn supervise(opts: SuperviseOptions) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let wanted = read_profiles(&opts)?;
    let file = profile::file_identity(&opts.config.clone().unwrap_or_else(profile::default_path));
    let mut running: BTreeMap<String, Supervised> = BTreeMap::new();
    let controls = CancellationToken::new();
    let serve_control = |name: &str, live: &Arc<Live>, tok: CancellationToken| {
        let (n, src): (String, Arc<dyn StatusSource>) = (name.to_owned(), live.clone());
        tokio::spawn(async move {
            if let Err(e) = control::serve(n.clone(), src, tok).await {
                tracing::warn!(profile = %n, "control socket: {e}");
            }
        });
    };
    let mut control_tokens: BTreeMap<String, CancellationToken> = BTreeMap::new();
    for (n, p) in wanted {
        let s = start(&n, p, &file, &opts.on_event);
        let tok = controls.child_token();
        serve_control(&n, &s.live, tok.clone());
        control_tokens.insert(n.clone(), tok);
        running.insert(n, s);
    }
    let lives: Arc<Mutex<Vec<Arc<Live>>>> = Arc::new(Mutex::new(
        running.values().map(|s| s.live.clone()).collect(),
    ));
    if let Some(addr) = opts.metrics {
        let l = lives.clone();
        let source: Arc<dyn Fn() -> Vec<ProfileStatus> + Send + Sync> =
            Arc::new(move || l.lock().unwrap().iter().map(|x| x.snapshot()).collect());
        let sd = controls.clone();
        tokio::spawn(async move {
            if let Err(e) = control::serve_metrics(addr, source, sd).await {
                tracing::error!("metrics on {addr}: {e}");
            }
        });
    }
    start_watchdog();
    service::notify("READY=1");
    tracing::info!(
        "supervising {} profile(s): {}",
        running.len(),
        running.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = shim::signal() => break,
            _ = hup.recv() => {
                service::notify("RELOADING=1");
                match read_profiles(&opts) {
                    Err(e) => tracing::error!("reload failed, keeping the running profiles: {e}"),
                    Ok(new) => {
                        let names: Vec<String> = running.keys().cloned().collect();
                        for n in names {
                            let keep = new.get(&n).is_some_and(|p| *p == running[&n].profile);
                            if !keep {
                                let s = running.remove(&n).expect("listed");
                                tracing::info!(profile = %n, "stopping (removed or changed)");
                                s.stop.cancel();
                                s.live.stop();
                                let _ = tokio::time::timeout(Duration::from_secs(3), s.task).await;
                                if let Some(t) = control_tokens.remove(&n) {
                                    t.cancel();
                                }
                            }
                        }
                        for (n, p) in new {
                            if let std::collections::btree_map::Entry::Vacant(slot) = running.entry(n.clone()) {
                                tracing::info!(profile = %n, "starting");
                                // Let a stopped predecessor release its control socket.
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                let s = start(&n, p, &file, &opts.on_event);
                                let tok = controls.child_token();
                                serve_control(&n, &s.live, tok.clone());
                                control_tokens.insert(n.clone(), tok);
                                slot.insert(s);
                            }
                        }
                        *lives.lock().unwrap() = running.values().map(|s| s.live.clone()).collect();
                    }
                }
                service::notify("READY=1");
            }
        }
    }
    tracing::info!("shutting down");
    service::notify("STOPPING=1");
    for s in running.values() {
        s.stop.cancel();
        s.live.stop();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        for (_, s) in running {
            let _ = s.task.await;
        }
    })
    .await;
    controls.cancel();
    Ok(())
}

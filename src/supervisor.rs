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
use crate::config::profile::{self, Profile};
use crate::control::{self, ForwardStatus, ProfileStatus, StatusSource, UpstreamStatus};
use crate::forward::{FwdState, Registry};
use crate::hooks::EventHook;
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

/// What a profile is doing, as status shows it (`upstream.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Starting: resolving its settings or making the first connection.
    Connecting,
    /// The upstream connection is up.
    Connected,
    /// The connection dropped; reconnecting.
    Reconnecting,
    /// Given up (for now, under `supervise`: restarted after a delay).
    Failed,
    /// Stopped on request.
    Stopped,
}

impl Phase {
    /// The name in status, a stable string of the JSON schema.
    fn name(self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Reconnecting => "reconnecting",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }
}

/// A profile's phase, since when, and the last error it had.
struct Track {
    /// What it is doing.
    phase: Phase,
    /// When it started doing that.
    since: SystemTime,
    /// The last error (kept after recovery, for status).
    last_error: Option<String>,
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
    /// Phase and since when, for status when not running.
    track: Mutex<Track>,
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
            track: Mutex::new(Track {
                phase: Phase::Connecting,
                since: SystemTime::now(),
                last_error: None,
            }),
            restarts: AtomicUsize::new(0),
            stop: Mutex::new(CancellationToken::new()),
        })
    }

    /// Records a phase change (and the error, if any).
    fn set(&self, phase: Phase, error: Option<String>) {
        let mut t = self.track.lock().unwrap();
        if t.phase != phase {
            t.since = SystemTime::now();
        }
        t.phase = phase;
        if error.is_some() {
            t.last_error = error;
        }
    }

    /// The stop token of the current run.
    fn token(&self) -> CancellationToken {
        self.stop.lock().unwrap().clone()
    }
}

impl StatusSource for Live {
    fn snapshot(&self) -> ProfileStatus {
        let (state, since, last_error) = {
            let t = self.track.lock().unwrap();
            (t.phase.name().to_owned(), t.since, t.last_error.clone())
        };
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
        status.resume = p.resume.as_ref().map(|r| {
            let fwd = r.forwards_state();
            crate::control::ResumeStatus {
                helper: r.helper_state(),
                held_sessions: r.held(),
                forwarded_connections: crate::control::ForwardedConnections {
                    attached: fwd.as_ref().map_or(0, |f| f.1 as u64),
                    waiting: fwd.as_ref().map_or(0, |f| f.2 as u64),
                },
                forwards: fwd.map(|f| f.0),
            }
        });
        status.forwards = forward_statuses(&p.forwards);
        status
    }

    fn stop(&self) {
        self.token().cancel();
    }
}

/// The status of a profile's `-R` forwards.
fn forward_statuses(forwards: &Registry) -> Vec<ForwardStatus> {
    forwards
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
        .collect()
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
                live.set(Phase::Connected, None);
                if !was_up {
                    emit("connected", &c.server_version);
                }
                was_up = true;
            }
            State::Reconnecting { last_error, .. } => {
                live.set(Phase::Reconnecting, Some(last_error.clone()));
                if was_up {
                    emit("disconnected", &last_error);
                }
                was_up = false;
            }
            State::Failed(why) => {
                live.set(Phase::Failed, Some(why.clone()));
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
        Exit::Stopped => live.set(Phase::Stopped, None),
        Exit::Failed { message, .. } => live.set(Phase::Failed, Some(message.clone())),
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

/// Why `sshshim up` or `sshshim supervise` ended with an error; the text
/// is the message for the user.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The profile already runs in another sshshim.
    #[error(transparent)]
    AlreadyRunning(control::ServeError),
    /// The profile stopped for good; the text says why.
    #[error("{0}")]
    Failed(String),
    /// The profiles could not be read.
    #[error(transparent)]
    Profiles(crate::config::ProfileError),
    /// The file has no profile to run.
    #[error("no profiles in {} (add a [profile.NAME] table with a destination)", .0.display())]
    NoProfiles(std::path::PathBuf),
    /// The reload signal could not be watched.
    #[error(transparent)]
    Signal(#[from] std::io::Error),
}

/// `sshshim up`: one profile in the foreground.
pub async fn up(cfg: UpConfig) -> Result<(), RunError> {
    let live = Live::new(
        &cfg.name,
        cfg.target.to_string(),
        (cfg.config_file.clone(), cfg.profile_destination.clone()),
    );
    let shutdown = CancellationToken::new();
    // Fail fast if this profile is already running.
    match control::bind(&cfg.name).await {
        Ok(bound) => {
            let (src, sd): (Arc<dyn StatusSource>, _) = (live.clone(), shutdown.clone());
            tokio::spawn(bound.serve(src, sd));
        }
        Err(e @ control::ServeError::AlreadyRunning { .. }) => {
            return Err(RunError::AlreadyRunning(e));
        }
        // Status is a convenience: without it the tunnel still runs.
        Err(e) => tracing::warn!("no control socket (sshshim status will not see this): {e}"),
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
        Exit::Failed { message, .. } => Err(RunError::Failed(message)),
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
    /// Stops its control socket.
    control: CancellationToken,
    /// Serves its control socket; the socket file is gone once it ends.
    control_task: tokio::task::JoinHandle<()>,
}

/// Reads the selected profiles from the file.
fn read_profiles(opts: &SuperviseOptions) -> Result<BTreeMap<String, Profile>, RunError> {
    let path = opts.config.clone().unwrap_or_else(profile::default_path);
    let file = profile::load(&path, opts.config.is_some()).map_err(RunError::Profiles)?;
    let env = profile::from_env().map_err(RunError::Profiles)?;
    let mut out = BTreeMap::new();
    if opts.names.is_empty() {
        for (n, p) in file.profiles {
            out.insert(n, env.clone().or(p));
        }
    } else {
        for n in &opts.names {
            let p = file.get(n).map_err(RunError::Profiles)?.clone();
            out.insert(n.clone(), env.clone().or(p));
        }
    }
    for (n, p) in &out {
        if let Some(w) = profile::reserved_name_warning(n, p.mcp_created == Some(true)) {
            tracing::warn!("{w}");
        }
    }
    if out.is_empty() {
        return Err(RunError::NoProfiles(path.to_path_buf()));
    }
    Ok(out)
}

/// Runs one profile again and again until `stop`: after a failure, waits
/// (doubling from 2 s to 60 s, or 5 min when retrying cannot help) and
/// starts it afresh.
async fn restart_loop(
    n: String,
    prof: Profile,
    l: Arc<Live>,
    st: CancellationToken,
    hook: Option<Arc<EventHook>>,
) {
    let mut delay = Duration::from_secs(2);
    loop {
        // Resolving may run `ssh -G`: keep that off the async workers.
        let (name, profile) = (n.clone(), prof.clone());
        let cfg = tokio::task::spawn_blocking(move || {
            crate::config::resolve_up(crate::config::UpRequest {
                name: &name,
                profile,
                ssh_config: None,
                default_listen: None,
            })
        })
        .await
        .map_err(|e| format!("resolving profile {n} failed: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
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
                l.set(Phase::Failed, Some(message));
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
}

/// What a reload does to one profile (by name).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    /// Newly listed: start it.
    Start(String),
    /// No longer listed: stop it.
    Stop(String),
    /// Its settings changed: stop it, then start it with the new ones.
    Restart(String),
}

impl Change {
    /// The profile this change stops first, if any.
    fn stops(&self) -> Option<&str> {
        match self {
            Change::Stop(n) | Change::Restart(n) => Some(n),
            Change::Start(_) => None,
        }
    }

    /// The profile this change starts (after every stop), if any.
    fn starts(&self) -> Option<&str> {
        match self {
            Change::Start(n) | Change::Restart(n) => Some(n),
            Change::Stop(_) => None,
        }
    }
}

/// The changes that take the `running` profiles to the `wanted` ones, in
/// name order: stop those no longer listed, restart those whose settings
/// differ, start the new ones; an unchanged profile keeps running (and its
/// connection). Pure, so every case of a reload has a test.
fn plan<P: PartialEq>(running: &BTreeMap<String, P>, wanted: &BTreeMap<String, P>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (name, now) in running {
        match wanted.get(name) {
            None => changes.push(Change::Stop(name.clone())),
            Some(new) if new != now => changes.push(Change::Restart(name.clone())),
            Some(_) => {}
        }
    }
    let new = wanted.keys().filter(|n| !running.contains_key(*n));
    changes.extend(new.cloned().map(Change::Start));
    changes
}

/// The profiles `sshshim supervise` runs.
struct Supervisor {
    /// Its options (reread on reload).
    opts: SuperviseOptions,
    /// Identity of the profiles file, for status.
    file: String,
    /// The running profiles.
    running: BTreeMap<String, Supervised>,
    /// Parent of the control sockets' tokens.
    controls: CancellationToken,
    /// The running profiles' status, for metrics.
    lives: Arc<Mutex<Vec<Arc<Live>>>>,
}

impl Supervisor {
    /// Starts profile `name`: its restart loop and its control socket.
    fn start(&mut self, name: &str, p: Profile) {
        let live = Live::new(
            name,
            p.destination.clone().unwrap_or_default(),
            (Some(self.file.clone()), p.target_label()),
        );
        let stop = CancellationToken::new();
        let hook = p
            .on_event
            .clone()
            .or(self.opts.on_event.clone())
            .map(|c| Arc::new(EventHook::new(c)));
        let task = tokio::spawn(restart_loop(
            name.to_owned(),
            p.clone(),
            live.clone(),
            stop.clone(),
            hook,
        ));
        let control = self.controls.child_token();
        let (n, src, tok): (String, Arc<dyn StatusSource>, _) =
            (name.to_owned(), live.clone(), control.clone());
        let control_task = tokio::spawn(async move {
            if let Err(e) = control::serve(n.clone(), src, tok).await {
                tracing::warn!(profile = %n, "control socket: {e}");
            }
        });
        let s = Supervised {
            profile: p,
            live,
            stop,
            task,
            control,
            control_task,
        };
        self.running.insert(name.to_owned(), s);
    }

    /// Stops profile `name` and waits (bounded) until it has let go of its
    /// control socket, so that a successor can take it.
    async fn stop(&mut self, name: &str) {
        let Some(s) = self.running.remove(name) else {
            return;
        };
        s.stop.cancel();
        s.live.stop();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.task).await;
        s.control.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.control_task).await;
    }

    /// Makes the running profiles' status the one metrics serves.
    fn publish(&self) {
        *self.lives.lock().unwrap() = self.running.values().map(|s| s.live.clone()).collect();
    }

    /// SIGHUP: rereads the profiles and applies the [`plan`]; on a read
    /// error keeps everything running as it is.
    async fn reload(&mut self) {
        let mut wanted = match read_profiles(&self.opts) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("reload failed, keeping the running profiles: {e}");
                return;
            }
        };
        let running: BTreeMap<String, Profile> = self
            .running
            .iter()
            .map(|(n, s)| (n.clone(), s.profile.clone()))
            .collect();
        let changes = plan(&running, &wanted);
        for n in changes.iter().filter_map(Change::stops) {
            tracing::info!(profile = %n, "stopping (removed or changed)");
            self.stop(n).await;
        }
        for n in changes.iter().filter_map(Change::starts) {
            tracing::info!(profile = %n, "starting");
            let p = wanted.remove(n).expect("planned from the wanted profiles");
            self.start(n, p);
        }
        self.publish();
    }

    /// Stops every profile, waiting a bounded time for each to finish.
    async fn shutdown(self) {
        for s in self.running.values() {
            s.stop.cancel();
            s.live.stop();
        }
        let (tasks, controls): (Vec<_>, Vec<_>) = self
            .running
            .into_values()
            .map(|s| (s.task, s.control_task))
            .unzip();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
        self.controls.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for t in controls {
                let _ = t.await;
            }
        })
        .await;
    }
}

/// `sshshim supervise`: every profile in one process, each isolated.
pub async fn supervise(opts: SuperviseOptions) -> Result<(), RunError> {
    use tokio::signal::unix::{SignalKind, signal};
    let wanted = read_profiles(&opts)?;
    let file = profile::file_identity(&opts.config.clone().unwrap_or_else(profile::default_path));
    let metrics = opts.metrics;
    let mut sup = Supervisor {
        opts,
        file,
        running: BTreeMap::new(),
        controls: CancellationToken::new(),
        lives: Arc::new(Mutex::new(Vec::new())),
    };
    for (n, p) in wanted {
        sup.start(&n, p);
    }
    sup.publish();
    if let Some(addr) = metrics {
        let l = sup.lives.clone();
        let source: Arc<dyn Fn() -> Vec<ProfileStatus> + Send + Sync> =
            Arc::new(move || l.lock().unwrap().iter().map(|x| x.snapshot()).collect());
        let sd = sup.controls.clone();
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
        sup.running.len(),
        sup.running.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = shim::signal() => break,
            _ = hup.recv() => {
                service::notify("RELOADING=1");
                sup.reload().await;
                service::notify("READY=1");
            }
        }
    }
    tracing::info!("shutting down");
    service::notify("STOPPING=1");
    sup.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Profiles as (name, settings); a string stands for a profile's settings.
    type Listed<'a> = &'a [(&'a str, &'a str)];

    /// Profiles as name -> settings.
    fn profiles(list: Listed) -> BTreeMap<String, String> {
        list.iter()
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect()
    }

    /// Every kind of reload, as (running, wanted, expected changes).
    #[test]
    fn reload_plan() {
        use Change::{Restart, Start, Stop};
        let s = |n: &str| n.to_string();
        let cases: &[(Listed, Listed, Vec<Change>)] = &[
            // Nothing to do.
            (&[], &[], vec![]),
            (&[("a", "x")], &[("a", "x")], vec![]),
            // First start.
            (
                &[],
                &[("a", "x"), ("b", "y")],
                vec![Start(s("a")), Start(s("b"))],
            ),
            // Removed: stopped; the others keep running.
            (&[("a", "x"), ("b", "y")], &[("b", "y")], vec![Stop(s("a"))]),
            (&[("a", "x")], &[], vec![Stop(s("a"))]),
            // Changed: restarted.
            (
                &[("a", "x"), ("b", "y")],
                &[("a", "x"), ("b", "z")],
                vec![Restart(s("b"))],
            ),
            // All at once, in name order: stops and restarts, then starts.
            (
                &[("a", "x"), ("b", "y"), ("d", "w")],
                &[("b", "y2"), ("c", "v"), ("d", "w")],
                vec![Stop(s("a")), Restart(s("b")), Start(s("c"))],
            ),
        ];
        for (running, wanted, expected) in cases {
            let got = plan(&profiles(running), &profiles(wanted));
            assert_eq!(&got, expected, "running {running:?}, wanted {wanted:?}");
        }
    }

    /// A restart stops before it starts; a plain start or stop does one.
    #[test]
    fn change_halves() {
        let r = Change::Restart("a".into());
        assert_eq!((r.stops(), r.starts()), (Some("a"), Some("a")));
        let s = Change::Start("b".into());
        assert_eq!((s.stops(), s.starts()), (None, Some("b")));
        let t = Change::Stop("c".into());
        assert_eq!((t.stops(), t.starts()), (Some("c"), None));
    }

    /// A phase change restarts `since`; the last error survives recovery.
    #[test]
    fn live_tracks_phase_and_error() {
        let live = Live::new("p", "u@h:22".into(), (None, None));
        assert_eq!(live.snapshot().upstream.state, "connecting");
        live.set(Phase::Reconnecting, Some("timed out".into()));
        live.set(Phase::Connected, None);
        let st = live.snapshot().upstream;
        assert_eq!(st.state, "connected");
        assert_eq!(st.last_error.as_deref(), Some("timed out"));
    }
}

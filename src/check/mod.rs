//! `sshshim check`: diagnoses profiles or destinations, each over its own
//! short-lived upstream connection, and says exactly what is wrong.
//!
//! Per profile, in order: resolution (`ssh -G`, then DNS), TCP connect
//! (timed), the server's version string, the host key (known, unknown,
//! CHANGED, revoked; with fingerprints), authentication (which method
//! worked, which the server offers), each `-L` target reached from the
//! server (a `direct-tcpip` / `direct-streamlocal` channel opened and
//! closed), each fixed `-R` port free on the server (`tcpip-forward`
//! requested and cancelled at once, unless the running sshshim of the
//! profile holds it), each `-R` target reached from this machine, and
//! whether an sshshim runs the profile and how it is doing.
//!
//! Promises: known_hosts is never written (not even with `accept_new`);
//! nothing prompts unless `--interactive`, and then only on a terminal;
//! each profile is bounded by `--timeout`; nothing is left open or
//! listening. Profiles run concurrently (a few at a time), so one that
//! hangs or fails does not hold up the others.
//!
//! # Stable interface
//!
//! The JSON form of [`ProfileReport`] (`sshshim check --json` prints an
//! array of them) is a stable interface: fields are only ever added, never
//! renamed, removed or given a different meaning. String enumerations
//! (`checks[].check`, `checks[].status`, `host_key.state`, `auth.method`)
//! may gain new values, so consumers should tolerate unknown ones.
//!
//! - `probe`: the diagnostic connection, hop by hop (connect, version,
//!   host key, auth); `handler`: its russh handler and version recorder;
//! - `forwards`: the `-L` / `-R` probes; `report`: the report types and
//!   the table ([`render`]).
//!
//! Sits beside `shim` in the module graph: it uses `upstream`, `resolve`,
//! `profile`, `control`, `spec` and `paths`; only `main` uses it.

mod forwards;
mod handler;
mod probe;
mod report;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

pub use report::{AuthReport, Check, HostKeyReport, ProfileReport, Status, render};

use crate::config::UpConfig;
use crate::config::profile::{self, Profile};
use crate::config::spec::ForwardSpec;
use crate::control::{self, ProfileStatus};

/// Profiles checked at once (each holds at most one connection).
const PARALLEL: usize = 8;

/// What to check and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// Profiles or destinations; empty: every profile of the config file.
    pub names: Vec<String>,
    /// `-c`: the profiles file (default: the usual one).
    pub config: Option<PathBuf>,
    /// `-F`: the ssh_config file to resolve with.
    pub ssh_config: Option<PathBuf>,
    /// Time each profile may take in all.
    pub timeout: Duration,
    /// Ask for passwords and passphrases on the terminal (if there is one);
    /// profiles are then checked one after another.
    pub interactive: bool,
}

/// Why nothing could be checked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line asks for nothing checkable (exit status 2).
    #[error("{0}")]
    Usage(String),
    /// The config file or environment is invalid (exit status 1).
    #[error(transparent)]
    Config(crate::config::ProfileError),
    /// The async runtime could not start (exit status 1).
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// One thing to check: a profile (or destination) and its layered settings.
struct Target {
    /// As given, or the profile's name.
    name: String,
    /// Environment over the profile's table (empty for a destination).
    profile: Profile,
}

/// Checks every target; the reports come back in the order asked.
pub async fn run(opts: Options) -> Result<Vec<ProfileReport>, Error> {
    let targets = targets(&opts)?;
    let opts = Arc::new(opts);
    let permits = Arc::new(tokio::sync::Semaphore::new(if opts.interactive {
        1
    } else {
        PARALLEL
    }));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in targets.into_iter().enumerate() {
        let (opts, permits) = (opts.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            (i, check_one(t, &opts).await)
        });
    }
    let mut reports = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(r) => reports.push(r),
            // A panic in one check must not hide the others' results.
            Err(e) => tracing::error!("a check failed unexpectedly: {e}"),
        }
    }
    reports.sort_by_key(|(i, _)| *i);
    Ok(reports.into_iter().map(|(_, r)| r).collect())
}

/// The profiles named (or all of the file), destinations for other names.
fn targets(opts: &Options) -> Result<Vec<Target>, Error> {
    let path = opts.config.clone().unwrap_or_else(profile::default_path);
    let file = profile::load(&path, opts.config.is_some()).map_err(Error::Config)?;
    let env = profile::from_env().map_err(Error::Config)?;
    if opts.names.is_empty() {
        if file.profiles.is_empty() {
            return Err(Error::Usage(format!(
                "nothing to check: {} has no profiles; name a profile or destination: \
                 sshshim check NAME",
                path.display()
            )));
        }
        return Ok(file
            .profiles
            .into_iter()
            .map(|(name, p)| Target {
                name,
                profile: env.clone().or(p),
            })
            .collect());
    }
    Ok(opts
        .names
        .iter()
        .map(|n| Target {
            name: n.clone(),
            // A name that is no profile is a destination, as for `up`.
            profile: env
                .clone()
                .or(file.profiles.get(n).cloned().unwrap_or_default()),
        })
        .collect())
}

/// Checks one profile within `opts.timeout`.
async fn check_one(t: Target, opts: &Options) -> ProfileReport {
    let mut limits = probe::Limits {
        deadline: Instant::now() + opts.timeout,
        timeout: opts.timeout,
        interactive: opts.interactive,
    };
    // The control socket client blocks (bounded by 3 s): off the workers.
    let name = t.name.clone();
    let running = tokio::task::spawn_blocking(move || control::query(&name));
    let mut report = ProfileReport {
        profile: t.name.clone(),
        destination: None,
        passed: false,
        checks: Vec::new(),
        connect_ms: None,
        server_version: None,
        host_key: None,
        auth: None,
        running: None,
    };

    let resolved = resolve(&t, opts, limits.deadline).await;
    let running_line = match running.await {
        Ok(r) => {
            let line = running_check(&r);
            report.running = r.ok();
            line
        }
        Err(e) => Check::skip(
            "running",
            None,
            format!("querying the control socket failed: {e}"),
        ),
    };

    match resolved {
        Err(check) => {
            report.checks.push(check);
            for c in ["connect", "version", "host_key", "auth"] {
                report
                    .checks
                    .push(Check::skip(c, None, "not reached: not resolved"));
            }
        }
        Ok((cfg, addrs, check)) => {
            report.destination = Some(destination(&cfg));
            report.checks.push(check);
            let held = |spec: &ForwardSpec| forwards::held_by(report.running.as_ref(), spec);
            let deadline = limits.deadline;
            // -R targets are local: probed while the connection is made.
            let (found, remote_targets) = tokio::join!(
                probe::run(&cfg, &addrs, &held, &mut limits),
                forwards::remote_targets(&cfg.forwards, deadline, opts.timeout),
            );
            report.checks.extend(found.session);
            report.checks.extend(found.local_targets);
            report.checks.extend(found.remote_ports);
            report.checks.extend(remote_targets);
            report.checks.extend(found.resume);
            report.connect_ms = found.connect_ms;
            report.server_version = found.server_version;
            report.host_key = found.host_key;
            report.auth = found.auth;
        }
    }
    report.checks.push(running_line);
    report.passed = report.failed() == 0;
    report
}

/// "user@host:port", with " via HOP, ..." for jump hosts.
fn destination(cfg: &UpConfig) -> String {
    let via: Vec<String> = cfg.jumps.iter().map(|j| j.to_string()).collect();
    if via.is_empty() {
        cfg.target.to_string()
    } else {
        format!("{} via {}", cfg.target, via.join(", "))
    }
}

/// Resolves the profile as `sshshim up` would (`ssh -G`), then the first
/// hop's name in DNS. Err is the failed "resolve" line.
async fn resolve(
    t: &Target,
    opts: &Options,
    deadline: Instant,
) -> Result<(UpConfig, Vec<SocketAddr>, Check), Check> {
    let (name, profile, ssh_config) = (t.name.clone(), t.profile.clone(), opts.ssh_config.clone());
    // `ssh -G` is a child process: off the async workers.
    let job = tokio::task::spawn_blocking(move || {
        crate::config::resolve_up(crate::config::UpRequest {
            name: &name,
            profile,
            ssh_config: ssh_config.as_deref(),
            default_listen: None,
        })
    });
    let cfg = match timeout_at(deadline, job).await {
        Ok(Ok(Ok(cfg))) => cfg,
        Ok(Ok(Err(e))) => return Err(Check::fail("resolve", None, e.to_string())),
        Ok(Err(e)) => {
            return Err(Check::fail(
                "resolve",
                None,
                format!("resolving failed: {e}"),
            ));
        }
        Err(_) => {
            return Err(Check::fail(
                "resolve",
                None,
                "`ssh -G` did not answer in time (--timeout)",
            ));
        }
    };
    let first = cfg.jumps.first().unwrap_or(&cfg.target);
    let lookup = tokio::net::lookup_host((first.host.as_str(), first.port));
    let addrs: Vec<SocketAddr> = match timeout_at(deadline, lookup).await {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            return Err(Check::fail(
                "resolve",
                None,
                format!("cannot resolve host '{}': {e}", first.host),
            ));
        }
        Err(_) => {
            return Err(Check::fail(
                "resolve",
                None,
                format!("no DNS answer for '{}' in time (--timeout)", first.host),
            ));
        }
    };
    let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
    let detail = if shown.len() == 1 && shown[0] == first.host {
        destination(&cfg)
    } else {
        format!(
            "{} ({} is {})",
            destination(&cfg),
            first.host,
            shown.join(", ")
        )
    };
    Ok((cfg, addrs, Check::ok("resolve", None, detail)))
}

/// The "running" line: whether an sshshim runs the profile, and how it is.
fn running_check(running: &Result<ProfileStatus, control::ClientError>) -> Check {
    let st = match running {
        Ok(st) => st,
        Err(control::ClientError::NotRunning { .. }) => {
            return Check::skip("running", None, "no sshshim is running this profile");
        }
        Err(e) => return Check::skip("running", None, e.to_string()),
    };
    let up = &st.upstream;
    let mut problems = Vec::new();
    if up.state != "connected" {
        let mut p = format!("upstream {}", up.state);
        if let Some(a) = up.attempt {
            p.push_str(&format!(" (attempt {a})"));
        }
        if let Some(e) = &up.last_error {
            p.push_str(&format!(": {e}"));
        }
        problems.push(p);
    }
    let owned: Vec<_> = st
        .forwards
        .iter()
        .filter(|f| f.owner == "sshshim")
        .collect();
    for f in owned.iter().filter(|f| f.state != "active") {
        let mut p = format!("{} {}", f.spec, f.state);
        if let Some(e) = &f.error {
            p.push_str(&format!(": {e}"));
        }
        problems.push(p);
    }
    if problems.is_empty() {
        let rtt = up
            .rtt_ms
            .map(|r| format!(", rtt {r:.1} ms"))
            .unwrap_or_default();
        let fwd = match owned.len() {
            0 => String::new(),
            n => format!(", {n} forward{} active", if n == 1 { "" } else { "s" }),
        };
        Check::ok(
            "running",
            None,
            format!("running (pid {}): upstream connected{rtt}{fwd}", st.pid),
        )
    } else {
        Check::fail(
            "running",
            None,
            format!("running (pid {}): {}", st.pid, problems.join("; ")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{ForwardStatus, UpstreamStatus};

    /// A status of a running profile, for the tests of `check`.
    pub(super) fn status(state: &str, fwd_state: &str) -> ProfileStatus {
        ProfileStatus {
            profile: "lab".into(),
            pid: 42,
            destination: "alice@gw:22".into(),
            endpoint: None,
            mux_socket: None,
            upstream: UpstreamStatus {
                state: state.into(),
                since: 0,
                next_attempt: None,
                attempt: (state != "connected").then_some(3),
                last_error: Some("connection refused".into()),
                reconnects: 0,
                rtt_ms: None,
                server_version: None,
                connections: 1,
                congested_connections: 0,
            },
            local_clients: 0,
            channels: Default::default(),
            forwards: vec![ForwardStatus {
                spec: "-R 2222".into(),
                owner: "sshshim".into(),
                state: fwd_state.into(),
                bound_port: Some(2222),
                error: (fwd_state != "active").then(|| "port in use".into()),
            }],
            bytes_in: 0,
            bytes_out: 0,
            config_file: None,
            profile_destination: None,
            resume: None,
        }
    }

    #[test]
    fn running_line_fails_on_reconnecting_or_retrying_forward() {
        let c = running_check(&Ok(status("connected", "active")));
        assert_eq!(c.status, Status::Ok, "{}", c.detail);
        assert!(c.detail.contains("pid 42") && c.detail.contains("1 forward active"));
        let c = running_check(&Ok(status("reconnecting", "pending")));
        assert_eq!(c.status, Status::Fail);
        assert!(
            c.detail
                .contains("upstream reconnecting (attempt 3): connection refused"),
            "{}",
            c.detail
        );
        let c = running_check(&Ok(status("connected", "retrying")));
        assert!(
            c.detail.contains("-R 2222 retrying: port in use"),
            "{}",
            c.detail
        );
        let c = running_check(&Err(control::ClientError::NotRunning {
            name: "lab".into(),
        }));
        assert_eq!(c.status, Status::Skip);
    }
}

//! The diagnostic SSH connection of `sshshim check`: TCP connect, the
//! server's version string, the host key verdict and authentication, hop by
//! hop through jump hosts, then the forward probes that need the server.
//!
//! It reuses the upstream's host key verifier (never allowed to record a
//! key here) and authenticator, with its own russh handler (see `handler`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, AuthResult};
use russh::keys::PublicKey;
use tokio::time::{Instant, timeout, timeout_at};

use super::forwards::{local_target, open_error, remote_port};
use super::handler::{Io, ProbeHandler, Recording, Verdict, version_line};
use super::report::{AuthReport, Check, HostKeyReport, ms};
use crate::config::UpConfig;
use crate::config::spec::{ForwardSpec, HostSpec, Kind};
use crate::upstream::UpstreamError;
use crate::upstream::auth::Authenticator;
use crate::upstream::known_hosts::{HostKeyError, HostKeyVerifier, fingerprint};

/// Longest an interactive authentication (someone typing a password) may
/// take; it does not count against `--timeout`.
const INTERACTIVE_AUTH_MAX: Duration = Duration::from_secs(300);
/// What the probe is allowed to do.
pub(super) struct Limits {
    /// When the profile's time is up (`--timeout` from its start).
    pub deadline: Instant,
    /// The whole `--timeout`, for messages.
    pub timeout: Duration,
    /// `--interactive`: prompts allowed (on a terminal only).
    pub interactive: bool,
}

/// What the SSH side found.
#[derive(Default)]
pub(super) struct Found {
    /// connect, version, host key and auth lines, hop by hop.
    pub session: Vec<Check>,
    /// `-L` target lines.
    pub local_targets: Vec<Check>,
    /// `-R` port lines.
    pub remote_ports: Vec<Check>,
    /// The `resume` line, for a profile with `--resume`.
    pub resume: Option<Check>,
    /// TCP connect time to the first hop.
    pub connect_ms: Option<f64>,
    /// The target's version string.
    pub server_version: Option<String>,
    /// The target's host key verdict.
    pub host_key: Option<HostKeyReport>,
    /// Authentication to the target.
    pub auth: Option<AuthReport>,
}

/// "publickey,password" as a list.
fn methods(m: &russh::MethodSet) -> Vec<String> {
    m.iter().map(|k| <&str>::from(k).to_owned()).collect()
}

/// Runs the SSH side of the checks for `cfg`, whose first hop resolved to
/// `addrs`. Disconnects before returning: nothing stays open or listening.
pub(super) async fn run(
    cfg: &UpConfig,
    addrs: &[SocketAddr],
    held: &(dyn Fn(&ForwardSpec) -> Option<String> + Sync),
    limits: &mut Limits,
) -> Found {
    let mut found = Found::default();
    let hops: Vec<&HostSpec> = cfg.jumps.iter().chain([&cfg.target]).collect();
    let label = |h: &HostSpec| (!cfg.jumps.is_empty()).then(|| h.to_string());
    let mut handles: Vec<client::Handle<ProbeHandler>> = Vec::new();
    let mut why_not: Option<String> = None;
    let mut reached_target = false;

    // TCP to the first hop.
    let first = hops[0];
    match tcp_connect(first, addrs, limits).await {
        Ok((stream, check, took)) => {
            found.connect_ms = Some(ms(took));
            found.session.push(check);
            let mut stream: Box<dyn Io> = Box::new(stream);
            for (i, hop) in hops.iter().enumerate() {
                let last = i == hops.len() - 1;
                reached_target = last;
                // How to record this hop's key once it is checked by hand:
                // `up --accept-new` covers the target only.
                let record = if last {
                    format!("`sshshim up {} --accept-new`", cfg.name)
                } else {
                    format!("`ssh -p {} {}@{}` once", hop.port, hop.user, hop.host)
                };
                match session(hop, stream, label(hop), &record, limits, &mut found, last).await {
                    Ok(handle) => handles.push(handle),
                    Err(why) => {
                        // Through jump hosts, say which hop it was.
                        why_not = Some(match label(hop) {
                            Some(l) if !last => format!("{why} ({l})"),
                            _ => why,
                        });
                        break;
                    }
                }
                if last {
                    break;
                }
                // Through this hop to the next.
                match through(&handles[i], hop, hops[i + 1], limits, &mut found).await {
                    Ok(next) => stream = next,
                    Err(why) => {
                        why_not = Some(why);
                        break;
                    }
                }
            }
        }
        Err(check) => {
            found.session.push(check);
            why_not = Some("no connection".into());
        }
    }

    // The target's handshake never started: say which lines did not run.
    if !reached_target {
        let why = why_not.as_deref().unwrap_or("no connection");
        for id in ["version", "host_key", "auth"] {
            found.session.push(Check::skip(
                id,
                label(&cfg.target),
                format!("not reached: {why}"),
            ));
        }
    }

    let target = match (&why_not, handles.len() == hops.len()) {
        (None, true) => handles.last().ok_or("no SSH connection"),
        _ => Err(why_not.as_deref().unwrap_or("no SSH connection")),
    };
    probe_forwards(&cfg.forwards, target, held, limits, &mut found).await;
    if let Some((timeout, helper)) = &cfg.resume {
        found.resume = Some(resume_line(target, timeout, helper, limits).await);
    }

    // Nothing stays behind: the target first, then the hops it runs through.
    for h in handles.iter().rev() {
        let _ = h
            .disconnect(russh::Disconnect::ByApplication, "sshshim check done", "en")
            .await;
    }
    let closing = async {
        while !handles.iter().all(|h| h.is_closed()) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let _ = timeout(Duration::from_millis(500), closing).await;
    found
}

/// Opens a channel from `hop` (reached with `handle`) to the `next` hop
/// and returns it as the next hop's stream, with a "connect" line either
/// way; the error says why the chain stops there.
async fn through(
    handle: &client::Handle<ProbeHandler>,
    hop: &HostSpec,
    next: &HostSpec,
    limits: &Limits,
    found: &mut Found,
) -> Result<Box<dyn Io>, String> {
    let started = Instant::now();
    let open =
        handle.channel_open_direct_tcpip(next.host.clone(), next.port as u32, "127.0.0.1", 0);
    let subject = Some(format!("{next} via {hop}"));
    match timeout_at(limits.deadline, open).await {
        Ok(Ok(ch)) => {
            found.session.push(
                Check::ok(
                    "connect",
                    subject,
                    format!("{}:{} reachable from {}", next.host, next.port, hop.host),
                )
                .timed(started.elapsed()),
            );
            Ok(Box::new(ch.into_stream()))
        }
        Ok(Err(e)) => {
            found.session.push(Check::fail(
                "connect",
                subject,
                format!(
                    "jump host {} cannot reach {}:{}: {}",
                    hop.host,
                    next.host,
                    next.port,
                    open_error(&e)
                ),
            ));
            Err(format!("{} not reached", next.host))
        }
        Err(_) => {
            found
                .session
                .push(Check::fail("connect", subject, timed_out(limits)));
            Err("timed out".into())
        }
    }
}

/// One line per forward: probed through the `target` connection, or
/// skipped with why there is none.
async fn probe_forwards(
    forwards: &[ForwardSpec],
    target: Result<&client::Handle<ProbeHandler>, &str>,
    held: &(dyn Fn(&ForwardSpec) -> Option<String> + Sync),
    limits: &mut Limits,
    found: &mut Found,
) {
    for spec in forwards {
        let subject = Some(spec.to_string());
        let (list, check) = match spec.kind {
            Kind::Local => (&mut found.local_targets, "local_target"),
            Kind::Remote => (&mut found.remote_ports, "remote_port"),
        };
        let handle = match target {
            Ok(h) => h,
            Err(why) => {
                list.push(Check::skip(check, subject, format!("not probed: {why}")));
                continue;
            }
        };
        list.push(match spec.kind {
            Kind::Local => local_target(handle, spec, limits).await,
            Kind::Remote => match held(spec) {
                Some(by) => Check::skip("remote_port", subject, by),
                None => remote_port(handle, spec, limits).await,
            },
        });
    }
}

/// Whether the server can run sshshim's helper for resumable sessions
/// (nothing is uploaded: `sshshim up` does that).
async fn resume_line(
    target: Result<&client::Handle<ProbeHandler>, &str>,
    timeout: &Duration,
    helper: &Option<String>,
    limits: &Limits,
) -> Check {
    let handle = match target {
        Ok(h) => h,
        Err(why) => return Check::skip("resume", None, format!("not probed: {why}")),
    };
    let settings = crate::resume::Settings {
        timeout: *timeout,
        remote_helper: helper.clone(),
        instance: String::new(),
    };
    let left = limits.deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, crate::resume::install::diagnose(handle, &settings)).await {
        Ok(Ok(state)) => Check::ok("resume", None, crate::term::clean(&state)),
        Ok(Err(e)) => Check::fail(
            "resume",
            None,
            format!(
                "sessions will not be resumable (they work as without --resume): {}",
                crate::term::clean(&e.why)
            ),
        ),
        Err(_) => Check::fail("resume", None, timed_out(limits)),
    }
}

/// "timed out (--timeout 10 s)".
pub(super) fn timed_out(limits: &Limits) -> String {
    format!(
        "no answer in time (--timeout {} s for the whole profile)",
        limits.timeout.as_secs()
    )
}

/// Connects to the first address of `addrs` that answers.
async fn tcp_connect(
    hop: &HostSpec,
    addrs: &[SocketAddr],
    limits: &Limits,
) -> Result<(tokio::net::TcpStream, Check, Duration), Check> {
    let target = format!("{}:{}", hop.host, hop.port);
    let mut last_error = None;
    for addr in addrs {
        let started = Instant::now();
        match timeout_at(limits.deadline, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let took = started.elapsed();
                let _ = s.set_nodelay(true);
                let check =
                    Check::ok("connect", None, format!("{addr} in {:.1} ms", ms(took))).timed(took);
                return Ok((s, check, took));
            }
            Ok(Err(e)) => last_error = Some(e),
            Err(_) => {
                return Err(Check::fail(
                    "connect",
                    None,
                    format!(
                        "{}: {target} ({addr}) did not answer (host down, or a firewall \
                         dropping packets?)",
                        timed_out(limits)
                    ),
                ));
            }
        }
    }
    let detail = match last_error {
        Some(source) => UpstreamError::Connect { target, source }.to_string(),
        None => format!("{target} resolved to no address"),
    };
    Err(Check::fail("connect", None, detail))
}

/// Handshake and authentication with one hop over `stream`: pushes its
/// version, host key and auth lines. Err says why later checks cannot run.
async fn session(
    hop: &HostSpec,
    stream: Box<dyn Io>,
    subject: Option<String>,
    record: &str,
    limits: &mut Limits,
    found: &mut Found,
    is_target: bool,
) -> Result<client::Handle<ProbeHandler>, String> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let verdict = Arc::new(Mutex::new(None));
    let handler = ProbeHandler {
        verifier: HostKeyVerifier {
            host: hop.host.clone(),
            port: hop.port,
            user_file: hop.known_hosts.clone(),
            global_files: hop.global_known_hosts.clone(),
            // Never: check must not change known_hosts.
            accept_new: false,
        },
        accept_unknown: hop.accept_new,
        verdict: verdict.clone(),
    };
    let stream = Recording {
        inner: stream,
        seen: seen.clone(),
    };
    let config = Arc::new(crate::upstream::connection::client_config(
        crate::tuning::WINDOW_SIZE,
    ));
    let result = timeout_at(
        limits.deadline,
        client::connect_stream(config, stream, handler),
    )
    .await;
    let version = version_line(&seen.lock().unwrap());
    let verdict = verdict.lock().unwrap().take();
    let known_hosts = hop.known_hosts.display().to_string();

    // The version line.
    let handshake_error = match &result {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some(timed_out(limits)),
    };
    match &version {
        Some(v) => {
            found
                .session
                .push(Check::ok("version", subject.clone(), v.clone()));
            if is_target {
                found.server_version = Some(v.clone());
            }
        }
        None => {
            let why = handshake_error.clone().unwrap_or_default();
            found.session.push(Check::fail(
                "version",
                subject.clone(),
                format!("no SSH version string from the server ({why}); is this an SSH server?"),
            ));
            found.session.push(Check::skip(
                "host_key",
                subject.clone(),
                "not reached: no SSH handshake",
            ));
            found.session.push(Check::skip(
                "auth",
                subject,
                "not reached: no SSH handshake",
            ));
            return Err("no SSH handshake".into());
        }
    }

    // The host key.
    let (check, report, go_on) =
        host_key_line(verdict, &known_hosts, hop, record, &handshake_error);
    let check = Check {
        subject: subject.clone(),
        ..check
    };
    found.session.push(check);
    if is_target {
        found.host_key = report;
    }
    let mut handle = match result {
        Ok(Ok(h)) if go_on => h,
        _ => {
            found.session.push(Check::skip(
                "auth",
                subject,
                "not attempted: the host key is not trusted",
            ));
            return Err("the host key is not trusted".into());
        }
    };

    // Authentication.
    let (check, report) = authenticate(hop, &mut handle, limits).await;
    let worked = report.method.is_some();
    found.session.push(Check { subject, ..check });
    if is_target {
        found.auth = Some(report);
    }
    if worked {
        Ok(handle)
    } else {
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, "sshshim check", "en")
            .await;
        Err("not authenticated".into())
    }
}

/// The host key line: the check, the report, and whether to go on.
fn host_key_line(
    verdict: Option<Verdict>,
    known_hosts: &str,
    hop: &HostSpec,
    record: &str,
    handshake_error: &Option<String>,
) -> (Check, Option<HostKeyReport>, bool) {
    let report = |state: &str, key: Option<&PublicKey>| key_report(state, key, known_hosts);
    let Some(verdict) = verdict else {
        let why = handshake_error.clone().unwrap_or_default();
        return (
            Check::fail(
                "host_key",
                None,
                format!("key exchange failed before the host key was offered: {why}"),
            ),
            None,
            false,
        );
    };
    let (key, result) = match verdict {
        Verdict::Certificate => {
            return (
                Check::fail(
                    "host_key",
                    None,
                    "the server offered a host certificate; sshshim verifies plain host keys \
                     only (add the server's key to known_hosts)",
                ),
                Some(report("certificate", None)),
                false,
            );
        }
        Verdict::Key(checked) => *checked,
    };
    let alg = key.algorithm().as_str().to_owned();
    let offered = fingerprint(&key);
    match result {
        Ok(()) => {
            // Known, but the handshake may still have failed after it.
            let check = match handshake_error {
                None => Check::ok("host_key", None, format!("known: {alg} {offered}")),
                Some(e) => Check::fail(
                    "host_key",
                    None,
                    format!("known: {alg} {offered}, but the key exchange failed: {e}"),
                ),
            };
            let go_on = handshake_error.is_none();
            (check, Some(report("known", Some(&key))), go_on)
        }
        Err(e) => refused_key(e, &key, hop, record, known_hosts),
    }
}

/// The host-key part of the report, in `state`.
fn key_report(state: &str, key: Option<&PublicKey>, known_hosts: &str) -> HostKeyReport {
    HostKeyReport {
        state: state.into(),
        algorithm: key.map(|k| k.algorithm().as_str().to_owned()),
        fingerprint: key.map(fingerprint),
        recorded_fingerprint: None,
        recorded_at: None,
        known_hosts: known_hosts.to_owned(),
    }
}

/// The "host_key" line for an offered `key` that is not known: unknown
/// (fine with accept_new), changed, revoked; whether to go on.
fn refused_key(
    e: HostKeyError,
    key: &PublicKey,
    hop: &HostSpec,
    record: &str,
    known_hosts: &str,
) -> (Check, Option<HostKeyReport>, bool) {
    let report = |state: &str, key: Option<&PublicKey>| key_report(state, key, known_hosts);
    let alg = key.algorithm().as_str().to_owned();
    let offered = fingerprint(key);
    match e {
        HostKeyError::Unknown { host, file, .. } => {
            if hop.accept_new {
                let check = Check::ok(
                    "host_key",
                    None,
                    format!(
                        "unknown: {alg} {offered} is not in {}; not recorded by check \
                         (accept_new is set, so `sshshim up` records it on first connect)",
                        file.display()
                    ),
                );
                (check, Some(report("unknown", Some(key))), true)
            } else {
                let check = Check::fail(
                    "host_key",
                    None,
                    format!(
                        "unknown: {host} offered {alg} {offered}, which is not in {}. Check the \
                         fingerprint with the server's administrator, then record it with \
                         {record}",
                        file.display()
                    ),
                );
                (check, Some(report("unknown", Some(key))), false)
            }
        }
        HostKeyError::Changed {
            host,
            file,
            line,
            expected,
            offered,
        } => {
            let at = format!("{}:{line}", file.display());
            let check = Check::fail(
                "host_key",
                None,
                format!(
                    "CHANGED: {host} offered {alg} {offered}, but {at} records {expected}. \
                     Someone could be intercepting the connection, or the key was replaced; \
                     if that is expected: ssh-keygen -R '{host}' -f {}",
                    file.display()
                ),
            );
            let mut r = report("changed", Some(key));
            r.recorded_fingerprint = Some(expected);
            r.recorded_at = Some(at);
            (check, Some(r), false)
        }
        HostKeyError::Revoked {
            file,
            line,
            fingerprint,
        } => {
            let at = format!("{}:{line}", file.display());
            let check = Check::fail(
                "host_key",
                None,
                format!("REVOKED: {alg} {fingerprint} is marked @revoked in {at}"),
            );
            let mut r = report("revoked", Some(key));
            r.recorded_at = Some(at);
            (check, Some(r), false)
        }
        e @ HostKeyError::Record(..) => (
            // Cannot happen (check never records); said plainly if it does.
            Check::fail("host_key", None, e.to_string()),
            Some(report("unknown", Some(key))),
            false,
        ),
    }
}

/// Asks which methods the server offers, then authenticates as `up` would,
/// without prompting unless `--interactive`.
async fn authenticate(
    hop: &HostSpec,
    handle: &mut client::Handle<ProbeHandler>,
    limits: &mut Limits,
) -> (Check, AuthReport) {
    let mut report = AuthReport {
        method: None,
        credential: None,
        offered: Vec::new(),
    };
    // "none" first, as OpenSSH does: the answer lists the methods offered.
    match timeout_at(limits.deadline, handle.authenticate_none(hop.user.clone())).await {
        Ok(Ok(AuthResult::Success)) => {
            report.method = Some("none".into());
            let check = Check::ok(
                "auth",
                None,
                format!(
                    "the server let '{}' in without authentication (method none)",
                    hop.user
                ),
            );
            return (check, report);
        }
        Ok(Ok(AuthResult::Failure {
            remaining_methods, ..
        })) => report.offered = methods(&remaining_methods),
        Ok(Err(e)) => {
            return (
                Check::fail("auth", None, format!("authentication failed: {e}")),
                report,
            );
        }
        Err(_) => return (Check::fail("auth", None, timed_out(limits)), report),
    }
    let offers = if report.offered.is_empty() {
        String::new()
    } else {
        format!("; the server offers {}", report.offered.join(","))
    };
    let auth = Authenticator::new(hop);
    let started = Instant::now();
    let result = if limits.interactive {
        // Someone may be typing: that time does not count against --timeout.
        let r = timeout(INTERACTIVE_AUTH_MAX, auth.authenticate(handle, true)).await;
        limits.deadline += started.elapsed();
        r
    } else {
        timeout_at(limits.deadline, auth.authenticate(handle, false)).await
    };
    match result {
        Ok(Ok(())) => {
            let (method, credential) = auth
                .proven_method()
                .unwrap_or(("publickey", "unknown".to_owned()));
            report.method = Some(method.to_owned());
            report.credential = Some(credential.clone());
            let check = Check::ok(
                "auth",
                None,
                format!("{method} as '{}' with {credential}{offers}", hop.user),
            )
            .timed(started.elapsed());
            (check, report)
        }
        Ok(Err(e)) => {
            let hint = if limits.interactive {
                ""
            } else if report.offered.iter().any(|m| m == "password")
                || e.to_string().contains("passphrase-protected")
            {
                " (check prompts for nothing without --interactive: use ssh-agent, or run \
                 `sshshim check --interactive` on a terminal)"
            } else {
                ""
            };
            (Check::fail("auth", None, format!("{e}{hint}")), report)
        }
        Err(_) => (Check::fail("auth", None, timed_out(limits)), report),
    }
}

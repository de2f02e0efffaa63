//! The diagnostic SSH connection of `sshshim check`: TCP connect, the
//! server's version string, the host key verdict and authentication, hop by
//! hop through jump hosts, then the probes that need the server (`-L`
//! targets through `direct-tcpip` / `direct-streamlocal`, fixed `-R` ports
//! through `tcpip-forward` cancelled at once).
//!
//! It reuses the upstream's host key verifier (never allowed to record a
//! key here) and authenticator, but has its own russh handler: one that
//! remembers the verdict instead of failing with it, and refuses every
//! channel the server opens.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use russh::client::{self, AuthResult};
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, timeout, timeout_at};

use super::report::{AuthReport, Check, HostKeyReport, ms};
use crate::config::UpConfig;
use crate::spec::{Addr, ForwardSpec, HostSpec, Kind};
use crate::upstream::UpstreamError;
use crate::upstream::auth::Authenticator;
use crate::upstream::known_hosts::{HostKeyError, HostKeyVerifier, fingerprint};

/// Longest an interactive authentication (someone typing a password) may
/// take; it does not count against `--timeout`.
const INTERACTIVE_AUTH_MAX: Duration = Duration::from_secs(300);
/// Bytes of the server's first output kept to find its version line
/// (RFC 4253 allows lines before it).
const BANNER_MAX: usize = 8192;

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
    /// TCP connect time to the first hop.
    pub connect_ms: Option<f64>,
    /// The target's version string.
    pub server_version: Option<String>,
    /// The target's host key verdict.
    pub host_key: Option<HostKeyReport>,
    /// Authentication to the target.
    pub auth: Option<AuthReport>,
}

/// A byte stream an SSH connection can run over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The host key a server offered and what known_hosts says about it.
enum Verdict {
    /// A plain key, and what known_hosts says (boxed: it is large).
    Key(Box<(PublicKey, Result<(), HostKeyError>)>),
    /// A certificate, which sshshim does not verify.
    Certificate,
}

/// russh callbacks of the diagnostic connection.
struct ProbeHandler {
    /// known_hosts lookup; `accept_new` is always off here.
    verifier: HostKeyVerifier,
    /// The profile would record an unknown key (accept_new): go on without
    /// recording it, to check the rest.
    accept_unknown: bool,
    /// Where the verdict is left for the report.
    verdict: Arc<Mutex<Option<Verdict>>>,
}

impl client::Handler for ProbeHandler {
    type Error = UpstreamError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.verdict.lock().unwrap() = Some(Verdict::Certificate);
            return Ok(false);
        };
        let result = self.verifier.verify(key);
        let go_on = match &result {
            Ok(()) => true,
            Err(HostKeyError::Unknown { .. }) => self.accept_unknown,
            Err(_) => false,
        };
        *self.verdict.lock().unwrap() = Some(Verdict::Key(Box::new((key.clone(), result))));
        Ok(go_on)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Someone connected to a probed -R port in the instant it was open.
        reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }
}

/// A stream that keeps a copy of the first bytes read from it: the
/// server's version line, which russh does not hand out when the
/// handshake fails (an unknown or changed host key, say).
struct Recording<S> {
    /// The stream.
    inner: S,
    /// The first [`BANNER_MAX`] bytes read.
    seen: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let mut seen = self.seen.lock().unwrap();
            let room = BANNER_MAX.saturating_sub(seen.len());
            let new = &buf.filled()[before..];
            seen.extend_from_slice(&new[..new.len().min(room)]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The first complete line starting with "SSH-" in what the server sent.
fn version_line(seen: &[u8]) -> Option<String> {
    String::from_utf8_lossy(seen)
        .split_inclusive('\n')
        .find(|l| l.ends_with('\n') && l.starts_with("SSH-"))
        .map(|l| l.trim_end().to_owned())
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
                        why_not = Some(why);
                        break;
                    }
                }
                if last {
                    break;
                }
                // Through this hop to the next.
                let next = hops[i + 1];
                let started = Instant::now();
                let open = handles[i].channel_open_direct_tcpip(
                    next.host.clone(),
                    next.port as u32,
                    "127.0.0.1",
                    0,
                );
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
                        stream = Box::new(ch.into_stream());
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
                        why_not = Some(format!("{} not reached", next.host));
                        break;
                    }
                    Err(_) => {
                        found
                            .session
                            .push(Check::fail("connect", subject, timed_out(limits)));
                        why_not = Some("timed out".into());
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
        (None, true) => handles.last(),
        _ => None,
    };
    for spec in &cfg.forwards {
        let subject = Some(spec.to_string());
        let (list, check) = match spec.kind {
            Kind::Local => (&mut found.local_targets, "local_target"),
            Kind::Remote => (&mut found.remote_ports, "remote_port"),
        };
        let Some(handle) = target else {
            let why = why_not.as_deref().unwrap_or("no SSH connection");
            list.push(Check::skip(check, subject, format!("not probed: {why}")));
            continue;
        };
        list.push(match spec.kind {
            Kind::Local => local_target(handle, spec, limits).await,
            Kind::Remote => match held(spec) {
                Some(by) => Check::skip("remote_port", subject, by),
                None => remote_port(handle, spec, limits).await,
            },
        });
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

/// "timed out (--timeout 10 s)".
fn timed_out(limits: &Limits) -> String {
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
    let report = |state: &str, key: Option<&PublicKey>| HostKeyReport {
        state: state.into(),
        algorithm: key.map(|k| k.algorithm().as_str().to_owned()),
        fingerprint: key.map(fingerprint),
        recorded_fingerprint: None,
        recorded_at: None,
        known_hosts: known_hosts.to_owned(),
    };
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
        Err(HostKeyError::Unknown { host, file, .. }) => {
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
                (check, Some(report("unknown", Some(&key))), true)
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
                (check, Some(report("unknown", Some(&key))), false)
            }
        }
        Err(HostKeyError::Changed {
            host,
            file,
            line,
            expected,
            offered,
        }) => {
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
            let mut r = report("changed", Some(&key));
            r.recorded_fingerprint = Some(expected);
            r.recorded_at = Some(at);
            (check, Some(r), false)
        }
        Err(HostKeyError::Revoked {
            file,
            line,
            fingerprint,
        }) => {
            let at = format!("{}:{line}", file.display());
            let check = Check::fail(
                "host_key",
                None,
                format!("REVOKED: {alg} {fingerprint} is marked @revoked in {at}"),
            );
            let mut r = report("revoked", Some(&key));
            r.recorded_at = Some(at);
            (check, Some(r), false)
        }
        Err(e @ HostKeyError::Record(..)) => (
            // Cannot happen (check never records); said plainly if it does.
            Check::fail("host_key", None, e.to_string()),
            Some(report("unknown", Some(&key))),
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

/// Why a channel open failed, as far as russh tells (it keeps the code,
/// not the server's text).
fn open_error(e: &russh::Error) -> String {
    use russh::ChannelOpenFailure as F;
    match e {
        russh::Error::ChannelOpenFailure(F::ConnectFailed) => {
            "connect failed (nothing listens there, the host is unreachable, or the name is \
             unknown to the server)"
                .into()
        }
        russh::Error::ChannelOpenFailure(F::AdministrativelyProhibited) => {
            "administratively prohibited (the server's AllowTcpForwarding, \
             AllowStreamLocalForwarding or PermitOpen forbid it)"
                .into()
        }
        russh::Error::ChannelOpenFailure(F::UnknownChannelType) => {
            "the server does not support this kind of channel".into()
        }
        russh::Error::ChannelOpenFailure(F::ResourceShortage) => {
            "the server is short of resources (MaxSessions?)".into()
        }
        other => other.to_string(),
    }
}

/// A `-L` target, reached from the server: a channel opened and closed.
async fn local_target(
    handle: &client::Handle<ProbeHandler>,
    spec: &ForwardSpec,
    limits: &Limits,
) -> Check {
    let subject = Some(spec.to_string());
    let started = Instant::now();
    let result = match &spec.target {
        Addr::Tcp(host, port) => {
            timeout_at(
                limits.deadline,
                handle.channel_open_direct_tcpip(host.clone(), *port as u32, "127.0.0.1", 0),
            )
            .await
        }
        Addr::Unix(path) => {
            timeout_at(
                limits.deadline,
                handle.channel_open_direct_streamlocal(path.clone()),
            )
            .await
        }
    };
    let took = started.elapsed();
    let target = &spec.target;
    match result {
        Ok(Ok(ch)) => {
            let _ = ch.close().await;
            Check::ok(
                "local_target",
                subject,
                format!("{target} reachable from the server"),
            )
            .timed(took)
        }
        Ok(Err(e)) => Check::fail(
            "local_target",
            subject,
            format!("the server cannot reach {target}: {}", open_error(&e)),
        ),
        Err(_) => Check::fail(
            "local_target",
            subject,
            format!(
                "{}: the server is still trying to reach {target}",
                timed_out(limits)
            ),
        ),
    }
}

/// A fixed `-R` port: asked for and released at once.
async fn remote_port(
    handle: &client::Handle<ProbeHandler>,
    spec: &ForwardSpec,
    limits: &Limits,
) -> Check {
    let subject = Some(spec.to_string());
    let (host, port) = match &spec.listen {
        Addr::Unix(_) => {
            return Check::skip(
                "remote_port",
                subject,
                "a socket path is not probed (asking for it would create the socket file on \
                 the server)",
            );
        }
        Addr::Tcp(_, 0) => {
            return Check::skip(
                "remote_port",
                subject,
                "port 0: the server picks a free port",
            );
        }
        Addr::Tcp(h, p) => (h.clone(), *p),
    };
    let place = if host.is_empty() {
        format!("port {port}")
    } else {
        format!("{}", spec.listen)
    };
    let started = Instant::now();
    match timeout_at(
        limits.deadline,
        handle.tcpip_forward(host.clone(), port as u32),
    )
    .await
    {
        Ok(Ok(_)) => {
            let took = started.elapsed();
            // Release it at once; the disconnect afterwards would too.
            match timeout_at(
                limits.deadline,
                handle.cancel_tcpip_forward(host, port as u32),
            )
            .await
            {
                Ok(Ok(())) => Check::ok(
                    "remote_port",
                    subject,
                    format!("{place} is free on the server (listened and released)"),
                )
                .timed(took),
                Ok(Err(e)) => Check::fail(
                    "remote_port",
                    subject,
                    format!(
                        "{place} is free on the server, but releasing it failed: {e} (closing \
                         the connection released it)"
                    ),
                ),
                Err(_) => Check::fail("remote_port", subject, timed_out(limits)),
            }
        }
        Ok(Err(russh::Error::RequestDenied)) => Check::fail(
            "remote_port",
            subject,
            format!(
                "the server refused to listen on {place}: in use there, or forbidden \
                 (AllowTcpForwarding, PermitListen; ports below 1024 need root)"
            ),
        ),
        Ok(Err(e)) => Check::fail(
            "remote_port",
            subject,
            format!("asking the server to listen on {place} failed: {e}"),
        ),
        Err(_) => Check::fail("remote_port", subject, timed_out(limits)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_line_is_the_first_complete_ssh_line() {
        assert_eq!(
            version_line(b"hello\r\nSSH-2.0-OpenSSH_9.6\r\n\0\0\0"),
            Some("SSH-2.0-OpenSSH_9.6".into())
        );
        assert_eq!(version_line(b"SSH-2.0-Open"), None);
        assert_eq!(version_line(b"HTTP/1.1 400 Bad Request\r\n"), None);
    }
}

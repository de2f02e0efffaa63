//! The forward probes of `sshshim check`: `-L` targets reached from the
//! server (a channel opened and closed), fixed `-R` ports free on the server
//! (`tcpip-forward` requested and cancelled at once), and `-R` targets
//! reached from this machine (a connection opened and closed).

use std::time::Duration;

use russh::client;
use tokio::time::{Instant, timeout_at};

use super::handler::ProbeHandler;
use super::probe::{Limits, timed_out};
use super::report::Check;
use crate::config::spec::{Addr, ForwardSpec, Kind};
use crate::control::ProfileStatus;

/// Whether the running sshshim of this profile holds a `-R` port itself,
/// and then the skip reason: probing it would steal it for an instant.
pub(super) fn held_by(running: Option<&ProfileStatus>, spec: &ForwardSpec) -> Option<String> {
    let st = running?;
    let Addr::Tcp(_, port) = &spec.listen else {
        return None;
    };
    let spec_text = format!("-R {}", spec.listen);
    st.forwards
        .iter()
        .any(|f| f.state == "active" && (f.spec == spec_text || f.bound_port == Some(*port)))
        .then(|| format!("held by the running sshshim (pid {}): not probed", st.pid))
}

/// The `-R` targets, reached from this machine (a connection opened and
/// closed at once), one after another.
pub(super) async fn remote_targets(
    forwards: &[ForwardSpec],
    deadline: Instant,
    limit: Duration,
) -> Vec<Check> {
    let probes = forwards
        .iter()
        .filter(|f| f.kind == Kind::Remote)
        .map(|f| remote_target(f, deadline, limit));
    let mut out = Vec::new();
    // Few per profile: one after another keeps the order and costs little.
    for p in probes {
        out.push(p.await);
    }
    out
}

/// One `-R` target.
async fn remote_target(spec: &ForwardSpec, deadline: Instant, limit: Duration) -> Check {
    let subject = Some(spec.to_string());
    let started = Instant::now();
    let result = match &spec.target {
        Addr::Tcp(h, p) => timeout_at(deadline, tokio::net::TcpStream::connect((h.as_str(), *p)))
            .await
            .map(|r| r.map(drop)),
        Addr::Unix(p) => {
            let path = crate::paths::expand_tilde(p.as_ref());
            timeout_at(deadline, tokio::net::UnixStream::connect(path))
                .await
                .map(|r| r.map(drop))
        }
    };
    let target = &spec.target;
    match result {
        Ok(Ok(())) => Check::ok(
            "remote_target",
            subject,
            format!("{target} reachable from this machine"),
        )
        .timed(started.elapsed()),
        Ok(Err(e)) => {
            let hint = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    " (nothing listens there: is the service running?)"
                }
                std::io::ErrorKind::NotFound => " (no such socket: is the service running?)",
                _ => "",
            };
            Check::fail(
                "remote_target",
                subject,
                format!("cannot connect to {target} from this machine: {e}{hint}"),
            )
        }
        Err(_) => Check::fail(
            "remote_target",
            subject,
            format!(
                "{target} did not answer within the --timeout of {} s",
                limit.as_secs()
            ),
        ),
    }
}

/// Why a channel open failed, as far as russh tells (it keeps the code,
/// not the server's text).
pub(super) fn open_error(e: &russh::Error) -> String {
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
pub(super) async fn local_target(
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
pub(super) async fn remote_port(
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
    fn a_port_held_by_our_own_running_sshshim_is_not_probed() {
        let spec = ForwardSpec::parse(Kind::Remote, "2222:localhost:22").unwrap();
        let other = ForwardSpec::parse(Kind::Remote, "2223:localhost:22").unwrap();
        let st = super::super::tests::status("connected", "active");
        assert!(held_by(Some(&st), &spec).unwrap().contains("pid 42"));
        assert!(held_by(Some(&st), &other).is_none());
        assert!(held_by(None, &spec).is_none());
        // A forward the running one does not hold (retrying) is probed.
        assert!(
            held_by(
                Some(&super::super::tests::status("connected", "retrying")),
                &spec
            )
            .is_none()
        );
    }
}

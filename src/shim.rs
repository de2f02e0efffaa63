//! `sshshim up`: binds the endpoint, connects upstream, serves until a
//! signal or an unrecoverable upstream failure.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::UpConfig;
use crate::endpoint::{self, Endpoint, auth::AuthorizedKeys};
use crate::forward::{self, Kind, Registry};
use crate::upstream::{Upstream, known_hosts::fingerprint};

/// Options of `up` that concern the endpoint rather than the upstream.
#[derive(Debug, Clone, Default)]
pub struct EndpointOptions {
    /// Permit a non-loopback `--listen` address.
    pub allow_non_loopback: bool,
}

/// Runs the shim in the foreground. `Err` carries the message for the user.
pub async fn run(cfg: UpConfig, opts: EndpointOptions) -> Result<(), String> {
    let cfg = Arc::new(cfg);
    if !cfg.listen.ip().is_loopback() {
        if !opts.allow_non_loopback {
            return Err(format!(
                "--listen {} is not a loopback address; anyone who can reach it could try to \
                 log in. Pass --allow-non-loopback if you really mean it.",
                cfg.listen
            ));
        }
        tracing::warn!(
            "the endpoint listens on {}, which is reachable from other machines",
            cfg.listen
        );
    }
    let (host_key, host_key_path) = endpoint::load_or_create_host_key(cfg.host_key.as_deref())?;
    let host_fp = fingerprint(host_key.public_key());
    let authorized = match &cfg.authorized_keys {
        Some(p) => AuthorizedKeys::from_file(p)?,
        None => AuthorizedKeys::users_own().await,
    };
    if authorized.is_empty() {
        return Err(
            "no public key to admit local clients with: create a key (ssh-keygen -t \
                    ed25519), load one into ssh-agent, or pass --authorized-keys FILE"
                .into(),
        );
    }

    // Bind before connecting, so a taken port fails before any prompt.
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            format!(
                "port {} is already in use (another sshshim?); choose another with --listen 127.0.0.1:PORT",
                cfg.listen.port()
            )
        } else {
            format!("cannot listen on {}: {e}", cfg.listen)
        }
    })?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;

    let registry = Registry::new();
    let upstream = Upstream::new(cfg.clone(), registry.clone());
    registry.attach(&upstream);
    for spec in cfg.forwards.iter().filter(|f| f.kind == Kind::Remote) {
        registry.add_owned_remote(spec);
    }
    upstream.connect_first().await.map_err(|e| e.to_string())?;

    let shutdown = CancellationToken::new();
    let mut local_forwards = tokio::task::JoinSet::new();
    for spec in cfg.forwards.iter().filter(|f| f.kind == Kind::Local) {
        let fut = forward::run_local_forward(spec.clone(), upstream.clone(), shutdown.clone());
        local_forwards.spawn(fut);
    }

    print_banner(&upstream.target(), bound, &host_fp, &host_key_path);

    let ep = Endpoint {
        config: Arc::new(endpoint::server_config(host_key)),
        upstream: upstream.clone(),
        authorized: Arc::new(authorized),
        forwards: registry,
        allow_non_loopback: opts.allow_non_loopback,
    };
    let serving = tokio::spawn(ep.serve(listener, shutdown.clone()));
    let mut running = tokio::spawn(upstream.clone().run(shutdown.clone()));

    let (outcome, upstream_done) = tokio::select! {
        _ = signal() => {
            tracing::info!("shutting down");
            (Ok(()), false)
        }
        r = &mut running => match r {
            Ok(Err(e)) => (Err(format!("giving up: {e}")), true),
            _ => (Ok(()), true),
        },
        r = wait_first_error(&mut local_forwards) => (Err(r), false),
    };
    shutdown.cancel();
    // Closing upstream closes every bridged channel; give that a moment to
    // reach local clients, but never hang the exit.
    let _ = tokio::time::timeout(Duration::from_millis(1500), async {
        let _ = serving.await;
        if !upstream_done {
            let _ = running.await;
        }
    })
    .await;
    outcome
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
async fn signal() {
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
fn print_banner(target: &str, bound: std::net::SocketAddr, fp: &str, key_path: &std::path::Path) {
    use std::io::Write;
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
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "sshshim: listening on {bound}");
    let _ = writeln!(out, "  upstream:  {target} (connected)");
    let _ = writeln!(out, "  host key:  {fp} ({})", key_path.display());
    let _ = writeln!(out, "  try:       ssh{p} {host}");
    let _ = writeln!(out, "             scp{cap_p} FILE {host}:");
    let _ = writeln!(out, "             sftp{cap_p} {host}");
    let _ = writeln!(out, "             rsync -e 'ssh{p}' SRC {host}:DST");
    let _ = out.flush();
}

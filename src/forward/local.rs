//! sshshim's own `-L` forwards: listen locally, and send each connection
//! through the upstream as a `direct-tcpip` or `direct-streamlocal` channel.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Registry;
use super::route::Stream;
use crate::bridge::{self, stream::StreamIn, stream::StreamOut};
use crate::spec::{Addr, ForwardSpec};
use crate::upstream::Open;

/// Runs the sshshim-owned `-L` forwards until `shutdown`: each listens
/// locally and sends its connections through the upstream connection.
pub async fn run(
    spec: ForwardSpec,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    enum Listener {
        Tcp(tokio::net::TcpListener),
        Unix(tokio::net::UnixListener, std::path::PathBuf),
    }
    let listener = match &spec.listen {
        Addr::Tcp(h, p) => {
            let host = if h.is_empty() || h == "localhost" {
                "127.0.0.1"
            } else {
                h.as_str()
            };
            let l = tokio::net::TcpListener::bind((host, *p))
                .await
                .map_err(|e| format!("{spec}: cannot listen on {host}:{p}: {e}"))?;
            Listener::Tcp(l)
        }
        Addr::Unix(p) => {
            let path = crate::paths::expand_tilde(p.as_ref());
            let l = bind_unix_private(&path)
                .map_err(|e| format!("{spec}: cannot listen on {p}: {e}"))?;
            Listener::Unix(l, path)
        }
    };
    tracing::info!("local forward {spec} listening");
    loop {
        let accepted: std::io::Result<(Box<dyn Stream>, String, u32)> = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = async {
                match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(s, a)| {
                        let _ = s.set_nodelay(true);
                        (Box::new(s) as Box<dyn Stream>, a.ip().to_string(), a.port() as u32)
                    }),
                    Listener::Unix(l, _) => l.accept().await.map(|(s, _)| (Box::new(s) as Box<dyn Stream>, "127.0.0.1".to_owned(), 0)),
                }
            } => r,
        };
        let (stream, orig, orig_port) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("{spec}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (reg, spec2) = (registry.clone(), spec.clone());
        registry.tasks.spawn(async move {
            let what = match &spec2.target {
                Addr::Tcp(h, p) => Open::DirectTcpip {
                    host: h.clone(),
                    port: *p as u32,
                    originator: orig,
                    originator_port: orig_port,
                },
                Addr::Unix(p) => Open::DirectStreamlocal(p.clone()),
            };
            let kind = what.kind();
            match reg.pool.open(what).await {
                Ok(opened) => {
                    let (rd, wr) = tokio::io::split(stream);
                    let opts = bridge::Options {
                        session: false,
                        what: spec2.to_string(),
                        meter: reg.pool.stats().open(kind),
                        hold: Some(Box::new(opened.load)),
                        stall_limit: reg.stall_limit,
                        congestion: Some(opened.congestion),
                    };
                    bridge::spawn(
                        StreamIn::new(rd),
                        StreamOut(wr),
                        opened.channel,
                        opts,
                        &reg.tasks,
                    );
                }
                Err(e) => tracing::warn!("{spec2}: {e}"),
            }
        });
    }
    if let Listener::Unix(_, path) = listener {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Binds a Unix socket that only our user can connect to: created with
/// umask 077, so it is never open to others, not even for an instant.
/// (The umask is process-wide, so it is held only around the bind, under
/// a lock, and nothing else in sshshim creates files without an explicit
/// mode.)
fn bind_unix_private(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask cannot fail; the previous mask is restored below.
    let old = unsafe { libc::umask(0o077) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

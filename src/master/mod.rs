//! The multiplexing master: serves OpenSSH's ControlMaster protocol (the
//! requests [`crate::mux`] decodes) with the upstream pool, so `ssh`,
//! `scp`, `sftp`, `rsync` and `git` with `ControlPath` set to sshshim's
//! socket reach the server with no local handshake and no local crypto.
//!
//! Unlike OpenSSH's master, this one does not die with its connection: a
//! new session during an outage waits for the reconnect (up to the connect
//! timeout, then fails saying why), forwards opened through the socket are
//! sshshim's own and replayed after a reconnect, and sessions past the
//! server's MaxSessions go to another upstream connection.

//!
//! The parts: [`session`] (NEW_SESSION and `-W`, bridged to the client's
//! descriptors, whose bridge ends are in [`crate::bridge::ends::fds`]),
//! [`forwards`] (`ssh -O forward` and `-O cancel`), and here the master's
//! state, the dispatch of requests and terminal resizes.

mod forwards;
mod session;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bridge::{Bridge, Opener};
use crate::forward::Registry;
use crate::mux::{MuxEvent, MuxRequest};

/// The master's state, shared by every request it serves.
pub struct Master {
    /// Opens upstream channels and bridges them; sessions and forwards run
    /// on its tasks too (waited for on shutdown).
    opener: Opener,
    /// sshshim's forwards (remote forwards opened here are its own).
    registry: Arc<Registry>,
    /// How long a new session waits for the upstream during an outage.
    connect_timeout: Duration,
    /// Stops the whole profile (`ssh -O exit`).
    stop_profile: CancellationToken,
    /// Stops accepting on the socket (`ssh -O stop`).
    stop_listening: CancellationToken,
    /// Stops everything the master started (profile shutdown).
    shutdown: CancellationToken,
    /// Tty sessions, for SIGWINCH.
    ttys: Mutex<Vec<Tty>>,
    /// Local and dynamic forwards opened through the socket.
    forwards: Mutex<HashMap<String, CancellationToken>>,
    /// sshshim's own agent, for sessions that ask (as ControlMaster does).
    agent: Option<PathBuf>,
}

/// A tty session, for window-size changes.
struct Tty {
    /// Its bridge (gone when the session ends).
    bridge: Weak<Bridge>,
    /// A duplicate of the client's terminal, to read its size from.
    fd: OwnedFd,
    /// The last size sent.
    last: Mutex<crate::mux::WindowSize>,
}

/// What [`Master::new`] needs.
pub struct MasterOptions {
    /// Opens upstream channels and bridges them, on the profile's tasks.
    pub opener: Opener,
    /// sshshim's forward registry.
    pub registry: Arc<Registry>,
    /// The profile's connect timeout.
    pub connect_timeout: Duration,
    /// Cancelled by `ssh -O exit`: stops the profile.
    pub stop_profile: CancellationToken,
    /// Cancelled by `ssh -O stop`: stops accepting on the socket.
    pub stop_listening: CancellationToken,
    /// The profile's shutdown.
    pub shutdown: CancellationToken,
}

impl Master {
    /// A master for one profile.
    pub fn new(o: MasterOptions) -> Arc<Self> {
        Arc::new(Master {
            opener: o.opener,
            registry: o.registry,
            connect_timeout: o.connect_timeout,
            stop_profile: o.stop_profile,
            stop_listening: o.stop_listening,
            shutdown: o.shutdown,
            ttys: Mutex::default(),
            forwards: Mutex::default(),
            agent: std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        })
    }

    /// Serves the mux layer's requests until shutdown.
    pub async fn serve(self: Arc<Self>, mut events: mpsc::Receiver<MuxEvent>) {
        let winch = self.clone();
        self.opener
            .tasks()
            .spawn(async move { winch.follow_window_changes().await }.in_current_span());
        loop {
            let ev = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = self.shutdown.cancelled() => return,
            };
            let me = self.clone();
            let span = tracing::info_span!("mux", conn = ev.client.conn_id, pid = ?ev.client.pid);
            self.opener
                .tasks()
                .spawn(async move { me.handle(ev).await }.instrument(span));
        }
    }

    /// Serves one request.
    async fn handle(self: Arc<Self>, ev: MuxEvent) {
        let client = ev.client;
        match ev.request {
            MuxRequest::NewSession {
                session,
                fds,
                tty,
                reply,
            } => self.session(client, session, fds, tty, reply).await,
            MuxRequest::StdioForward { target, fds, reply } => {
                self.stdio(client, target, fds, reply).await
            }
            MuxRequest::OpenForward { forward, reply } => self.open_forward(forward, reply).await,
            MuxRequest::CloseForward { forward, reply } => {
                if self.close_forward(&forward) {
                    reply.ok();
                } else {
                    reply.failure("port not forwarded");
                }
            }
            MuxRequest::Terminate { reply } => {
                tracing::info!("ssh -O exit: stopping");
                reply.ok();
                self.stop_profile.cancel();
            }
            MuxRequest::StopListening { reply } => {
                tracing::info!("ssh -O stop: no longer accepting on the multiplexing socket");
                reply.ok();
                self.stop_listening.cancel();
            }
            MuxRequest::Info { reply, .. } => reply.unsupported("unsupported request"),
        }
    }

    /// On SIGWINCH (clients send it to our pid), sends the new size of
    /// every tty session whose terminal changed.
    async fn follow_window_changes(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut winch) = signal(SignalKind::window_change()) else {
            tracing::warn!("cannot watch SIGWINCH: terminal resizes will not be passed on");
            return;
        };
        loop {
            tokio::select! {
                r = winch.recv() => if r.is_none() { return },
                _ = self.shutdown.cancelled() => return,
            }
            let changed: Vec<(Arc<Bridge>, crate::mux::WindowSize)> = {
                let mut ttys = self.ttys.lock().unwrap();
                ttys.retain(|t| t.bridge.upgrade().is_some_and(|b| !b.is_finished()));
                ttys.iter()
                    .filter_map(|t| {
                        let size = crate::mux::fds::window_size(t.fd.as_fd()).ok()?;
                        let mut last = t.last.lock().unwrap();
                        if *last == size {
                            return None;
                        }
                        *last = size;
                        Some((t.bridge.upgrade()?, size))
                    })
                    .collect()
            };
            for (b, s) in changed {
                let _ = b
                    .write
                    .window_change(s.cols, s.rows, s.xpixel, s.ypixel)
                    .await;
            }
        }
    }
}

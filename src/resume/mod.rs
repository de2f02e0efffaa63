//! Resumable sessions (`--resume`): work that survives the network.
//!
//! A small helper that sshshim brings to the remote side (sshshim itself,
//! run as `sshshim remote-helper`) starts each session's command, detached
//! from sshd, and keeps it running while the upstream connection is gone.
//! After the reconnect sshshim attaches to it again and both sides replay
//! what the other missed.
//!
//! - [`wire`]: the frames and replay buffers both sides share (ground).
//! - [`remote`]: the helper, as it runs on the server.
//! - [`install`]: finding, uploading and checking the helper, once per
//!   upstream connection.
//! - [`session`]: one resumable session on sshshim's side; the bridge sees
//!   it as an upstream channel that outlives connections.
//! - [`forwards`]: forwarded TCP connections, all carried by one helper;
//!   the bridge sees each as an upstream channel too.

pub mod forwards;
pub mod install;
pub mod remote;
pub mod session;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::Digest;

use crate::upstream::Pool;
pub use forwards::{ConnRead, ConnWrite, Opened};
pub use install::Helper;
pub use session::{SessionRead, SessionWrite};

/// Output the helper buffers per stream before it stops reading the
/// command (which then blocks on write, as with a slow reader); also the
/// input sshshim keeps for replay per session.
pub const BUFFER: u32 = 4 << 20;

/// The settings of resumable sessions.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long the helper holds a session with no sshshim attached
    /// ([`crate::tuning::RESUME_TIMEOUT`] by default).
    pub timeout: Duration,
    /// A helper the user installed on the server (`--remote-helper`);
    /// otherwise sshshim uploads its own.
    pub remote_helper: Option<String>,
    /// The profiles file and profile name, which name this sshshim's
    /// sessions on the server (see [`wire::Owner`]).
    pub instance: String,
}

/// A held session, as `status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeldStatus {
    /// The session's first 8 hex digits (its full id stays private).
    pub session: String,
    /// "exec", "shell" or "subsystem".
    pub kind: String,
    /// "attached" or "waiting" (the upstream is gone; the helper holds it).
    pub state: String,
    /// Unix seconds of the last change of `state`.
    pub since: u64,
    /// Input sshshim holds that the helper has not acknowledged.
    pub unacked_input_bytes: u64,
    /// Output received so far (stdout and stderr).
    pub output_bytes: u64,
    /// Times the session was resumed.
    pub resumes: u64,
}

/// Resumable sessions of one running profile.
pub struct Resume {
    /// Where attachments are opened.
    pool: Arc<Pool>,
    /// Settings.
    settings: Settings,
    /// See [`wire::Owner`].
    owner: wire::Owner,
    /// This process's run.
    run: wire::Run,
    /// The helper, once found on the server (or why there is none).
    helper: tokio::sync::Mutex<Option<Result<Arc<Helper>, install::NotHere>>>,
    /// Sessions, for status, by a local number.
    held: Mutex<BTreeMap<u64, HeldStatus>>,
    /// Numbers for `held`.
    next: AtomicU64,
    /// The forwards helper's mux, once started (see [`forwards`]).
    forwards: tokio::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<forwards::Msg>>>,
    /// Why forwarded connections are not resumable, once known.
    forwards_off: Mutex<Option<String>>,
    /// Forwarded connections, for status.
    forwards_counts: Arc<forwards::Counts>,
}

impl Resume {
    /// Resumable sessions over `pool`.
    pub fn new(pool: Arc<Pool>, settings: Settings) -> Arc<Resume> {
        let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        let digest = sha2::Sha256::new()
            .chain_update(machine.trim().as_bytes())
            .chain_update([0])
            .chain_update(settings.instance.as_bytes())
            .finalize();
        let mut owner = [0u8; 16];
        owner.copy_from_slice(&digest[..16]);
        Arc::new(Resume {
            pool,
            settings,
            owner,
            run: rand::random(),
            helper: tokio::sync::Mutex::new(None),
            held: Mutex::default(),
            next: AtomicU64::new(0),
            forwards: tokio::sync::Mutex::new(None),
            forwards_off: Mutex::new(None),
            forwards_counts: Arc::default(),
        })
    }

    /// The helper on the server, found (and uploaded if needed) on first
    /// use; the reason in words when none can run there.
    pub async fn helper(&self) -> Result<Arc<Helper>, install::NotHere> {
        let mut g = self.helper.lock().await;
        if let Some(r) = &*g {
            return r.clone();
        }
        let found = install::find(&*self.pool, &self.settings, self.owner, self.run).await;
        // A transient failure (the connection dropped during the probe)
        // should not switch resume off for good: only a verdict is kept.
        let keep = found.as_ref().map_or_else(|e| !e.transient, |_| true);
        let r = found.map(Arc::new);
        match &r {
            Ok(h) => tracing::info!(
                "resumable sessions: the remote helper is ready ({})",
                crate::term::clean(&h.path)
            ),
            Err(why) => tracing::warn!(
                "resumable sessions are off for this server: {}",
                crate::term::clean(&why.why)
            ),
        }
        if keep {
            *g = Some(r.clone());
        }
        r
    }

    /// Forgets the helper (it was removed on the server): the next session
    /// looks again.
    pub async fn forget_helper(&self) {
        *self.helper.lock().await = None;
    }

    /// The helper's state for status: `None` until a session asked.
    pub fn helper_state(&self) -> Option<String> {
        let g = self.helper.try_lock().ok()?;
        match &*g {
            None => None,
            Some(Ok(h)) => Some(format!("ready: {}", h.path)),
            Some(Err(why)) => Some(format!("unavailable: {why}")),
        }
    }

    /// Held sessions, for status.
    pub fn held(&self) -> Vec<HeldStatus> {
        self.held.lock().unwrap().values().cloned().collect()
    }

    /// Opens a forwarded TCP connection to `host:port` through the forwards
    /// helper (started on first use); [`Opened::Plain`] when the helper
    /// cannot carry it (the reason is logged once and shown by status).
    pub async fn forward(self: &Arc<Self>, host: &str, port: u32) -> Opened {
        if self.forwards_off.lock().unwrap().is_some() {
            return Opened::Plain;
        }
        let helper = match self.helper().await {
            Ok(h) => h,
            Err(why) => {
                if !why.transient {
                    self.forwards_off(format!("the helper cannot run there: {why}"));
                }
                return Opened::Plain;
            }
        };
        if let Err(why) = &helper.forwarding {
            self.forwards_off(format!("the helper does not forward here: {why}"));
            return Opened::Plain;
        }
        let tx = {
            let mut g = self.forwards.lock().await;
            match &*g {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let counts = self.forwards_counts.clone();
                    match forwards::start(self.clone(), helper, counts).await {
                        Ok(tx) => g.insert(tx).clone(),
                        Err(e) if e.transient => {
                            tracing::debug!("the forwards helper did not start: {}", e.why);
                            return Opened::Plain;
                        }
                        Err(e) => {
                            self.forwards_off(format!("the helper could not start: {}", e.why));
                            return Opened::Plain;
                        }
                    }
                }
            }
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        let open = forwards::Msg::Open {
            host: host.to_owned(),
            port,
            reply,
        };
        if tx.send(open).is_err() {
            return Opened::Plain;
        }
        answer.await.unwrap_or(Opened::Plain)
    }

    /// Forwarded connections are not resumable, for good: says why, once.
    fn forwards_off(&self, why: String) {
        let mut g = self.forwards_off.lock().unwrap();
        if g.is_none() {
            tracing::warn!(
                "forwarded connections are not resumable (they use plain direct-tcpip): {}",
                crate::term::clean(&why)
            );
            *g = Some(why);
        }
    }

    /// Forwarded connections for status: whether they are resumable (why
    /// not), and how many the helper carries, attached or waiting; `None`
    /// until the first forwarded connection.
    pub fn forwards_state(&self) -> Option<(String, usize, usize)> {
        if let Some(why) = &*self.forwards_off.lock().unwrap() {
            return Some((format!("not resumable: {why}"), 0, 0));
        }
        let started = self.forwards.try_lock().ok()?.is_some();
        if !started {
            return None;
        }
        let n = self.forwards_counts.conns.load(Ordering::Relaxed);
        Some(if self.forwards_counts.attached.load(Ordering::Relaxed) {
            ("resumable".to_owned(), n, 0)
        } else {
            ("resumable".to_owned(), 0, n)
        })
    }

    /// Registers a session for status; removed when the returned guard drops.
    fn register(self: &Arc<Self>, st: HeldStatus) -> HeldGuard {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.held.lock().unwrap().insert(n, st);
        HeldGuard {
            resume: self.clone(),
            n,
        }
    }
}

/// Keeps a session's status entry.
struct HeldGuard {
    /// Where it is.
    resume: Arc<Resume>,
    /// Its key.
    n: u64,
}

impl HeldGuard {
    /// Updates the entry.
    fn update(&self, f: impl FnOnce(&mut HeldStatus)) {
        if let Some(st) = self.resume.held.lock().unwrap().get_mut(&self.n) {
            f(st);
        }
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.resume.held.lock().unwrap().remove(&self.n);
    }
}

/// Takes `n` credits for input (room in the replay buffer); while it has
/// to wait, `waits` is set and `wake` called first, so output is then
/// acknowledged as it arrives: through the local endpoint, input that
/// waits holds up the client's window adjustments for the output, and
/// output waiting for the reader would in turn hold up the input's acks.
async fn take_credits(
    credits: &tokio::sync::Semaphore,
    n: u32,
    waits: &std::sync::atomic::AtomicBool,
    wake: impl FnOnce(),
) -> Result<(), tokio::sync::AcquireError> {
    use tokio::sync::TryAcquireError;
    match credits.try_acquire_many(n) {
        Ok(p) => p.forget(),
        Err(TryAcquireError::Closed) => {
            credits.acquire_many(n).await?.forget();
        }
        Err(TryAcquireError::NoPermits) => {
            waits.store(true, Ordering::Relaxed);
            wake();
            let got = credits.acquire_many(n).await;
            waits.store(false, Ordering::Relaxed);
            got?.forget();
        }
    }
    Ok(())
}

/// Unix seconds now.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

use wire::hex;

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

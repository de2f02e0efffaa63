//! Noticing `eow@openssh.com` from local clients.
//!
//! An OpenSSH client sends `eow@openssh.com` on a session channel when it
//! can take no more of its output: its stdout was closed (`ssh host yes |
//! head`), or the ControlMaster lost the client it served (sshpyk kills the
//! ssh that started a nohup'd kernel). sshd then closes only the command's
//! stdout; stderr stays writable, even after the client is gone, until the
//! command exits.
//!
//! russh 0.65's server drops unknown channel requests without a callback,
//! only logging "unknown channel request eow@openssh.com" (through the
//! `log` crate) from the connection's session task, without the channel.
//! So the endpoint installs, when it starts, the process's `log` logger
//! ([`install`]): it passes every record on to `tracing` (as tracing-log's
//! `LogTracer` does, so russh's logs show as before) and, whatever the
//! tracing filters say, finds the connection of that one record by the
//! Tokio task it came from, and the channel as the connection's one open
//! session channel (OpenSSH sends eow on session channels only, once
//! each); with several open it cannot tell, and leaves them alone. It then
//! calls [`Bridge::output_closed`], which does what russh's client allows
//! (it cannot send the request upstream either): stdout is dropped, the
//! first stdout the command writes afterwards closes the upstream channel
//! (where sshd would fail that write), stderr and the exit status still
//! reach the client, and when the client goes away the upstream channel
//! gets EOF and stays open until the command exits. Replace this once
//! russh passes unknown requests to the handler.
//!
//! The `log` logger can be set once per process: a program embedding
//! sshshim that sets its own (tracing-subscriber's `init` does, with
//! `LogTracer`) before the endpoint starts is warned that eow is not
//! noticed; it can call [`install`] instead, before or after setting its
//! tracing subscriber.
//!
//! [`Bridge::output_closed`]: crate::bridge::Bridge::output_closed

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::Channels;

/// Where russh logs the request it ignored.
const TARGET: &str = "russh::server::encrypted";
/// The log message for an ignored `eow@openssh.com`.
const MESSAGE: &str = "unknown channel request eow@openssh.com";

/// Local connections by the Tokio task running their russh session.
fn connections() -> &'static Mutex<HashMap<tokio::task::Id, Weak<Channels>>> {
    static MAP: OnceLock<Mutex<HashMap<tokio::task::Id, Weak<Channels>>>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Registers the connection whose session task is running this call (call
/// from a handler callback).
pub fn register(channels: &Arc<Channels>) {
    if let Some(id) = tokio::task::try_id() {
        let mut map = connections().lock().unwrap();
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(id, Arc::downgrade(channels));
    }
}

/// Makes the process's `log` logger the one described above, once; the
/// level of `log` records let through is the tracing subscriber's, and at
/// least warnings (the one russh logs). Returns whether eow is noticed:
/// `false` (with a warning) when another logger was set first.
pub fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let tracer = tracing_log::LogTracer::new();
        if log::set_boxed_logger(Box::new(EowLog(tracer))).is_err() {
            tracing::warn!(
                "another `log` logger is installed, so sshshim cannot notice eow@openssh.com: \
                 `ssh HOST cmd | head` through the endpoint ends only when cmd does (call \
                 sshshim::endpoint::eow::install() instead of installing tracing-log's LogTracer)"
            );
            return false;
        }
        let traced = tracing::level_filters::LevelFilter::current();
        let level = match tracing_log::AsLog::as_log(&traced) {
            l if l < log::LevelFilter::Warn => log::LevelFilter::Warn,
            l => l,
        };
        log::set_max_level(level);
        true
    })
}

/// The `log` logger: passes records on to `tracing`, and acts on russh's
/// ignored eow.
struct EowLog(tracing_log::LogTracer);

impl log::Log for EowLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        is_candidate(metadata) || self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if is_candidate(record.metadata()) && record.args().to_string() == MESSAGE {
            output_closed();
        }
        self.0.log(record);
    }

    fn flush(&self) {}
}

/// Whether a record may be russh's ignored request (cheap: no formatting).
fn is_candidate(m: &log::Metadata<'_>) -> bool {
    m.level() == log::Level::Warn && m.target() == TARGET
}

/// The connection of the running task got eow: closes its one open
/// session's output.
fn output_closed() {
    let Some(task) = tokio::task::try_id() else {
        tracing::debug!("eow: not on a task");
        return;
    };
    let Some(channels) = connections()
        .lock()
        .unwrap()
        .get(&task)
        .and_then(Weak::upgrade)
    else {
        return;
    };
    // OpenSSH sends eow on session channels only, once each. A plain ssh
    // client runs one session; through a ControlMaster there may be
    // several, and then we cannot tell which one the request named, so we
    // leave them alone.
    let candidates: Vec<_> = channels
        .lock()
        .unwrap()
        .values()
        .map(|c| &c.bridge)
        .filter(|b| b.is_session() && !b.is_finished() && !b.is_output_closed())
        .cloned()
        .collect();
    match candidates.as_slice() {
        [b] => {
            tracing::debug!("eow@openssh.com from a local client");
            b.output_closed();
        }
        [] => tracing::debug!("eow@openssh.com on no open session: ignored"),
        _ => tracing::info!(
            "eow@openssh.com with {} sessions open on one connection: cannot tell which, ignored",
            candidates.len()
        ),
    }
}

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
//! only logging "unknown channel request eow@openssh.com" from the
//! connection's session task, without the channel. So this tracing layer
//! (whose own filter admits that event whatever `RUST_LOG` or `-q` say)
//! finds the connection by the Tokio task the event came from, and the
//! channel as the connection's one open session channel (OpenSSH sends eow
//! on session channels only, once each); with several open it cannot tell,
//! and leaves them alone. It then calls [`Bridge::output_closed`], which
//! does what russh's client allows (it cannot send the request upstream
//! either): stdout is dropped, the first stdout the command writes
//! afterwards closes the upstream channel (where sshd would fail that
//! write), stderr and the exit status still reach the client, and when the
//! client goes away the upstream channel gets EOF and stays open until the
//! command exits. Replace this once russh passes unknown requests to the
//! handler.
//!
//! [`Bridge::output_closed`]: crate::bridge::Bridge::output_closed

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

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

/// A tracing layer that turns russh's log line into the close described
/// above. Its filter admits that one kind of event only, so it costs nothing
/// on the data path.
pub fn layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let only_ours = tracing_subscriber::filter::FilterFn::new(|meta: &Metadata<'_>| {
        *meta.level() == tracing::Level::WARN && meta.target() == TARGET
    })
    .with_max_level_hint(tracing::level_filters::LevelFilter::WARN);
    EowLayer.with_filter(only_ours)
}

/// The layer behind [`layer`].
struct EowLayer;

impl<S: Subscriber> Layer<S> for EowLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut msg = MessageText(String::new());
        event.record(&mut msg);
        if msg.0 != MESSAGE {
            return;
        }
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
        // OpenSSH sends eow on session channels only, once each. A plain
        // ssh client runs one session; through a ControlMaster there may be
        // several, and then we cannot tell which one the request named, so
        // we leave them alone.
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
}

/// Collects an event's `message` field.
struct MessageText(String);

impl Visit for MessageText {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }
}

//! Where a local end meets its upstream channel: [`Opener::open`] opens
//! the channel (waiting for a reconnect if need be), and
//! [`OpenChannel::bridge`] spawns the bridge. Every bridge in sshshim is
//! started here (the endpoint's channels, the multiplexing master's
//! sessions and `-W`, sshshim's `-L`/`-D` connections, and the channels
//! the server opens), so the settings a bridge needs are set once, in
//! [`Opener::new`], and a refusal is explained one way ([`Refused`]).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::{Bridge, LocalIn, LocalOut, Options, Upstream};
use crate::resume::{ConnRead, ConnWrite, Helper, Opened, Resume, session};
use crate::upstream::{Open, OpenError, Pool};

/// Opens upstream channels and bridges them; holds what every bridge of
/// a profile shares. Cheap to clone.
#[derive(Clone)]
pub struct Opener {
    /// The upstream side (and its traffic meters).
    pool: Arc<Pool>,
    /// Where bridges run (waited for on shutdown).
    tasks: TaskTracker,
    /// See [`Options::stall_limit`].
    stall_limit: Duration,
    /// Resumable sessions (`--resume`), if on: sessions then run under the
    /// remote helper, when the server can run it.
    resume: Option<Arc<Resume>>,
}

impl Opener {
    /// An opener for `pool`'s channels, running bridges on `tasks`.
    pub fn new(pool: Arc<Pool>, tasks: TaskTracker, stall_limit: Duration) -> Self {
        Opener {
            pool,
            tasks,
            stall_limit,
            resume: None,
        }
    }

    /// Sessions opened from now on are resumable (see [`crate::resume`]).
    pub fn with_resume(mut self, resume: Option<Arc<Resume>>) -> Self {
        self.resume = resume;
        self
    }

    /// Resumable sessions, if on.
    pub fn resume(&self) -> Option<&Arc<Resume>> {
        self.resume.as_ref()
    }

    /// The upstream side.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Where bridges (and the work around them) run.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Opens `what` upstream; `name` names it in logs. A refusal is logged
    /// here and says what to tell the local client ([`Refused`]).
    pub async fn open(&self, what: Open, name: &str) -> Result<OpenChannel, Refused> {
        let session = what.is_session();
        let kind = what.kind();
        if let (Some(r), Open::DirectTcpip { host, port, .. }) = (&self.resume, &what) {
            match r.forward(host, *port).await {
                Opened::Open(rd, wr) => {
                    return Ok(OpenChannel {
                        opener: self.clone(),
                        session,
                        kind,
                        // Agent routes are per connection; a forwarded
                        // connection has none.
                        generation: 0,
                        up: Up::Forwarded(rd, wr),
                    });
                }
                Opened::Failed { code, reason } => {
                    tracing::debug!("{name}: the helper could not connect: {reason}");
                    // The same refusal sshd's own would give the client.
                    let error =
                        OpenError::Refused(russh::Error::ChannelOpenFailure(open_failure(code)));
                    return Err(self.refused(error, session, kind, name));
                }
                Opened::Plain => {}
            }
        }
        match self.pool.open(what).await {
            Ok(o) => {
                // The helper was looked for at connect; this waits only if
                // that is still under way.
                let helper = match (&self.resume, session) {
                    (Some(r), true) => r.helper().await.ok(),
                    _ => None,
                };
                Ok(OpenChannel {
                    opener: self.clone(),
                    session,
                    kind,
                    generation: o.generation,
                    up: Up::Ssh {
                        channel: o.channel,
                        hold: Box::new(o.load),
                        congestion: o.congestion,
                        helper,
                    },
                })
            }
            Err(error) => Err(self.refused(error, session, kind, name)),
        }
    }

    /// A refusal, logged.
    fn refused(&self, error: OpenError, session: bool, kind: &str, name: &str) -> Refused {
        let refused = Refused { error, session };
        match refused.explanation() {
            Some(why) => tracing::warn!("{name}: refusing a session: {why}"),
            None => tracing::info!("{name}: upstream refused a {kind} channel: {refused}"),
        }
        refused
    }

    /// A channel the server opened (a connection to a remote forward, an
    /// agent request), ready to bridge; `hold` is kept while it lives (its
    /// place under the cap on such channels).
    pub fn adopt(
        &self,
        channel: russh::Channel<russh::client::Msg>,
        kind: &'static str,
        hold: Box<dyn Send + Sync>,
        congestion: Arc<AtomicUsize>,
        generation: u64,
    ) -> OpenChannel {
        OpenChannel {
            opener: self.clone(),
            session: false,
            kind,
            generation,
            up: Up::Ssh {
                channel,
                hold,
                congestion,
                helper: None,
            },
        }
    }
}

/// The failure russh reports for an SSH reason code (as it would have
/// decoded sshd's own refusal).
fn open_failure(code: u32) -> russh::ChannelOpenFailure {
    use russh::ChannelOpenFailure as F;
    match code {
        1 => F::AdministrativelyProhibited,
        2 => F::ConnectFailed,
        3 => F::UnknownChannelType,
        4 => F::ResourceShortage,
        code => F::Other {
            code,
            reason: format!("Unknown code {code}"),
        },
    }
}

/// What an [`OpenChannel`] bridges to.
enum Up {
    /// A channel of the upstream connection.
    Ssh {
        /// The channel.
        channel: russh::Channel<russh::client::Msg>,
        /// Held until the upstream channel is gone (its connection's load).
        hold: Box<dyn Send + Sync>,
        /// Its connection's congestion counter.
        congestion: Arc<AtomicUsize>,
        /// The remote helper, for a resumable session.
        helper: Option<Arc<Helper>>,
    },
    /// A forwarded connection the forwards helper carries (`--resume`).
    Forwarded(ConnRead, ConnWrite),
}

/// An upstream channel waiting for its local end. Dropped unbridged, it
/// closes.
pub struct OpenChannel {
    /// The shared settings.
    opener: Opener,
    /// A session channel.
    session: bool,
    /// Its SSH channel type, for the traffic meter.
    kind: &'static str,
    /// Which upstream connection it is on.
    generation: u64,
    /// The channel or forwarded connection.
    up: Up,
}

impl OpenChannel {
    /// Which upstream connection the channel is on (agent forwarding is
    /// per connection).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Bridges the channel to a local end until both are closed; `what`
    /// names it in logs. Returns the [`Bridge`], through which the local
    /// end's handler sends requests.
    pub fn bridge(
        self,
        local_in: impl LocalIn,
        local_out: impl LocalOut,
        what: impl Into<String>,
    ) -> Arc<Bridge> {
        let o = self.opener;
        let mut opts = Options {
            session: self.session,
            what: what.into(),
            meter: o.pool.stats().open(self.kind),
            hold: None,
            stall_limit: o.stall_limit,
            congestion: None,
        };
        let upstream: Upstream = match (self.up, &o.resume) {
            (
                Up::Ssh {
                    channel,
                    hold,
                    helper: Some(helper),
                    ..
                },
                Some(resume),
            ) => {
                // The session counts its own channels, one after another.
                session::start(resume.clone(), helper, channel, hold).into()
            }
            (
                Up::Ssh {
                    channel,
                    hold,
                    congestion,
                    ..
                },
                _,
            ) => {
                opts.hold = Some(hold);
                opts.congestion = Some(congestion);
                channel.into()
            }
            // The helper's channel counts for all its connections.
            (Up::Forwarded(rd, wr), _) => (rd, wr).into(),
        };
        super::spawn(local_in, local_out, upstream, opts, &o.tasks)
    }
}

/// Why an upstream channel could not be opened, and what the local client
/// is told: a session whose upstream is unavailable gets the reason on its
/// stderr (every client shows that, while a refusal code shows only as
/// "open failed"); anything else gets the server's refusal code.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refused {
    /// What went wrong.
    error: OpenError,
    /// Whether a session was asked for.
    session: bool,
}

impl Refused {
    /// For a session with no upstream right now: why, for its stderr.
    /// `None` when the server itself refused, or for another channel type:
    /// then [`Refused::reason`] is the answer.
    pub fn explanation(&self) -> Option<String> {
        let unavailable = matches!(self.error, OpenError::Unavailable(_));
        (self.session && unavailable).then(|| self.error.to_string())
    }

    /// The refusal to pass on to a local channel: the server's code, or
    /// "connect failed" with why there is no upstream.
    pub fn reason(&self) -> russh::ChannelOpenFailure {
        self.error.reason()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helper's codes read as russh reads sshd's, so the local client
    /// gets the same refusal either way.
    #[test]
    fn failure_codes_map_as_russh_decodes_them() {
        use russh::ChannelOpenFailure as F;
        assert!(matches!(open_failure(1), F::AdministrativelyProhibited));
        assert!(matches!(open_failure(2), F::ConnectFailed));
        assert!(matches!(open_failure(3), F::UnknownChannelType));
        assert!(matches!(open_failure(4), F::ResourceShortage));
        assert_eq!(open_failure(9).code(), 9);
    }
}

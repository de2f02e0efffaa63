//! The status schema of a running profile ([`ProfileStatus`] and the types
//! it holds) and the [`StatusSource`] trait a running profile implements.
//!
//! The JSON form of these types is a stable interface; see the
//! [module docs of `control`](super).

use std::collections::BTreeMap;

/// Upstream state of one profile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamStatus {
    /// One of "connecting", "connected", "reconnecting", "failed", "stopped".
    pub state: String,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// Unix seconds of the next connection attempt, when reconnecting.
    pub next_attempt: Option<u64>,
    /// Number of the current (re)connection attempt, when reconnecting.
    pub attempt: Option<u32>,
    /// Most recent upstream error, kept after recovery so it can be diagnosed.
    pub last_error: Option<String>,
    /// Successful reconnections since the profile started.
    pub reconnects: u64,
    /// Last measured round-trip time to the server, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The server's SSH identification string.
    pub server_version: Option<String>,
    /// Upstream connections open (more than 1 once MaxSessions is exceeded,
    /// or while one is congested).
    pub connections: usize,
    /// Upstream connections held back right now by a local reader that
    /// stopped reading at its buffer's cap: they take no new channels, which
    /// go to another connection. Absent in the JSON of older versions.
    #[serde(default)]
    pub congested_connections: usize,
}

/// One forward.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ForwardStatus {
    /// e.g. "-R 2222:localhost:22", or "-R localhost:8080" for a client-requested one.
    pub spec: String,
    /// "sshshim" (configured in the profile) or "client" (requested by a local client).
    pub owner: String,
    /// One of "active", "pending", "retrying".
    pub state: String,
    /// Port actually bound (matters when 0 was requested).
    pub bound_port: Option<u16>,
    /// Why the forward is not active, if known.
    pub error: Option<String>,
}

/// Everything `sshshim status` shows for one profile.
///
/// Its JSON serialisation is a **stable interface** (see the module docs):
/// fields may be added but are never renamed, removed or repurposed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileStatus {
    /// Profile name.
    pub profile: String,
    /// Process id of the sshshim serving the profile.
    pub pid: u32,
    /// Upstream destination as user@host:port.
    pub destination: String,
    /// Local SSH endpoint ("127.0.0.1:2222"), or None when the profile serves none.
    pub endpoint: Option<String>,
    /// OpenSSH multiplexing socket (`ssh -o ControlPath=…`), or None.
    #[serde(default)]
    pub mux_socket: Option<String>,
    /// State of the upstream connection.
    pub upstream: UpstreamStatus,
    /// Local SSH clients currently connected to the endpoint.
    pub local_clients: usize,
    /// Open channels by kind: "session", "direct-tcpip", "forwarded-tcpip", ...
    pub channels: BTreeMap<String, usize>,
    /// Configured and client-requested forwards.
    pub forwards: Vec<ForwardStatus>,
    /// Bytes from upstream to local.
    pub bytes_in: u64,
    /// Bytes from local to upstream.
    pub bytes_out: u64,
    /// The profiles file this profile was read from (absolute, symlinks
    /// resolved), or null when `sshshim up` was given a destination rather
    /// than a profile. With `profile` and `profile_destination` it says
    /// exactly what runs here: `sshshim mcp` acts only on a process whose
    /// three agree with its own file. Absent in the JSON of older versions.
    #[serde(default)]
    pub config_file: Option<String>,
    /// The profile's destination as its settings give it, before ssh_config:
    /// `[user@]host[:port]` with its `user` and `port` keys applied (see
    /// `Profile::target_label`); null when not run from a profile.
    #[serde(default)]
    pub profile_destination: Option<String>,
    /// Resumable sessions (`--resume`); null when off. Absent in the JSON
    /// of older versions.
    #[serde(default)]
    pub resume: Option<ResumeStatus>,
}

/// Resumable sessions of one profile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResumeStatus {
    /// The remote helper: "ready: PATH", "unavailable: REASON", or null
    /// until the first session asked for it.
    pub helper: Option<String>,
    /// Sessions running under the helper, attached or held while the
    /// upstream is away.
    pub held_sessions: Vec<crate::resume::HeldStatus>,
    /// Forwarded TCP connections (`-L`, `-D`, `-W`): "resumable", or "not
    /// resumable: REASON" (they then use plain direct-tcpip); null until
    /// the first one.
    #[serde(default)]
    pub forwards: Option<String>,
    /// Forwarded connections the helper carries.
    #[serde(default)]
    pub forwarded_connections: ForwardedConnections,
}

/// Forwarded connections the remote helper carries (`--resume`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ForwardedConnections {
    /// While the upstream is there.
    pub attached: u64,
    /// Held by the server while the upstream is away.
    pub waiting: u64,
}

/// Implemented by a running profile.
pub trait StatusSource: Send + Sync {
    /// Current status; called once per `status` request, so it should be cheap.
    fn snapshot(&self) -> ProfileStatus;
    /// Asks the profile to stop gracefully (`sshshim down NAME`).
    fn stop(&self);
}

/// A representative status, with characters that need escaping; shared by
/// the tests of the control submodules.
#[cfg(test)]
pub(super) fn sample(name: &str) -> ProfileStatus {
    ProfileStatus {
        profile: name.to_string(),
        pid: std::process::id(),
        destination: "alice@example.com:22".into(),
        endpoint: Some("127.0.0.1:2222".into()),
        mux_socket: Some("/run/user/1000/sshshim/prod.mux".into()),
        upstream: UpstreamStatus {
            state: "connected".into(),
            since: 1_000,
            next_attempt: None,
            attempt: None,
            last_error: Some("connection reset by peer".into()),
            reconnects: 2,
            rtt_ms: Some(12.5),
            server_version: Some("SSH-2.0-OpenSSH_9.6".into()),
            connections: 2,
            congested_connections: 1,
        },
        local_clients: 1,
        channels: BTreeMap::from([("session".into(), 2), ("direct-tcpip".into(), 1)]),
        forwards: vec![
            ForwardStatus {
                spec: "-R 2222:localhost:22".into(),
                owner: "sshshim".into(),
                state: "active".into(),
                bound_port: Some(2222),
                error: None,
            },
            ForwardStatus {
                spec: "-R localhost:8080 \"q\"\\".into(),
                owner: "client".into(),
                state: "retrying".into(),
                bound_port: None,
                error: Some("port in use".into()),
            },
        ],
        bytes_in: 1_300_000,
        bytes_out: 512,
        config_file: Some("/home/alice/.config/sshshim/config.toml".into()),
        profile_destination: Some("alice@example.com".into()),
        resume: Some(ResumeStatus {
            helper: Some("ready: /home/alice/.cache/sshshim/sshshim-0.1.0-0123".into()),
            held_sessions: vec![crate::resume::HeldStatus {
                session: "0a1b2c3d".into(),
                kind: "shell".into(),
                state: "waiting".into(),
                since: 1_200,
                unacked_input_bytes: 12,
                output_bytes: 34_567,
                resumes: 1,
            }],
            forwards: Some("resumable".into()),
            forwarded_connections: ForwardedConnections {
                attached: 2,
                waiting: 0,
            },
        }),
    }
}

//! The one declaration of every setting a profile and `sshshim up` share:
//! [`Profile`] is at once the `[profile.NAME]` table (serde, unknown keys
//! refused), the options of `sshshim up` (clap, flattened into its
//! arguments) and the `SSHSHIM_*` variables. Its defaults are the constants
//! below, and its layers are merged here: [`Profile::or`] stacks flags,
//! environment and profile, [`Profile::tuning`] puts the result over
//! ssh_config and the defaults.
//!
//! A new setting is a field here (its doc comment is its `--help`), a line
//! in [`Profile::or`], and its use; a test fails until README and MCP's key
//! policy list it.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Visitor};

use super::value;
use crate::config::spec::{Destination, ForwardSpec, Kind};
use crate::config::ssh_config::HostConfig;

/// The local endpoint of an ad-hoc `sshshim up` (a profile serves one only
/// if it says `listen`).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2222));
/// Keepalive interval when neither the profile nor ServerAliveInterval set one.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
/// Unanswered keepalives when neither the profile nor ServerAliveCountMax say.
pub const DEFAULT_KEEPALIVE_MAX: u64 = 3;
/// Longest wait between reconnect attempts.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Connect timeout when neither the profile nor ConnectTimeout set one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upstream connections when the server limits sessions per connection.
pub const DEFAULT_MAX_UPSTREAMS: u64 = 4;
/// The most upstream connections one profile may ask for.
pub const MAX_UPSTREAMS_CAP: u64 = 64;
/// How long a stalled local reader may hold its full buffer.
pub const DEFAULT_STALL_LIMIT: Duration = crate::tuning::READER_STALL;

/// The keys that tune the upstream connection's timing and limits and do
/// nothing else: `sshshim mcp` may write them (see `mcp::edit`).
pub const TUNING_KEYS: &[&str] = &[
    "keepalive",
    "keepalive_max",
    "max_backoff",
    "connect_timeout",
    "max_upstreams",
    "stall_limit",
];

/// The settings of one profile, and the options of `sshshim up`. `None` /
/// empty means "not set here", so layers (flags, environment, profile) stack
/// with [`Profile::or`]. Keys are the long options with `-` written `_`;
/// fields skipped by clap are profile keys only.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// `[user@]host[:port]` to connect to (required in a config file; `up`
    /// takes it as its argument).
    #[arg(skip)]
    #[serde(default, deserialize_with = "value::destination")]
    pub destination: Option<String>,

    /// Jump hosts, comma-separated [user@]host[:port] (as `ssh -J`; overrides ProxyJump).
    #[arg(short = 'J', long = "jump", value_name = "HOSTS")]
    #[serde(default, deserialize_with = "value::jumps")]
    pub jump: Option<String>,

    /// Upstream port (default: the destination's, ssh_config's, else 22).
    #[arg(short, long, value_parser = crate::config::spec::parse_port)]
    #[serde(default, deserialize_with = "value::port")]
    pub port: Option<u16>,

    /// Upstream login name (default: the destination's, ssh_config's, else your own).
    #[arg(short = 'l', long)]
    #[serde(default, deserialize_with = "value::name")]
    pub user: Option<String>,

    /// Identity file to authenticate with; repeatable. Default: ssh_config's
    /// IdentityFile, else OpenSSH's default identity files. The agent is tried first.
    #[arg(short, long = "identity", value_name = "FILE", value_parser = path_arg)]
    #[serde(default, deserialize_with = "value::paths")]
    pub identity: Vec<PathBuf>,

    /// known_hosts file to verify the upstream host key against (default:
    /// ssh_config's UserKnownHostsFile, else ~/.ssh/known_hosts).
    /// /etc/ssh/ssh_known_hosts is also read (never written).
    #[arg(long, value_name = "FILE", value_parser = path_arg)]
    #[serde(default, deserialize_with = "value::path")]
    pub known_hosts: Option<PathBuf>,

    /// Record the host key of a host not yet in known_hosts (a CHANGED key is
    /// always refused).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    #[serde(default, deserialize_with = "value::flag")]
    pub accept_new: Option<bool>,

    /// Address of the local endpoint [default: 127.0.0.1:2222].
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(default, deserialize_with = "value::addr")]
    pub listen: Option<SocketAddr>,

    /// Allow --listen on a non-loopback address (other machines could try to
    /// connect; key authentication still applies).
    #[arg(long, num_args = 0, default_missing_value = "true")]
    #[serde(default, deserialize_with = "value::flag")]
    pub allow_non_loopback: Option<bool>,

    /// Public keys allowed to use the endpoint. Default: your own
    /// ~/.ssh/*.pub and the keys in your ssh-agent.
    #[arg(long, value_name = "FILE", value_parser = path_arg)]
    #[serde(default, deserialize_with = "value::path")]
    pub authorized_keys: Option<PathBuf>,

    /// Host key of the endpoint. Default: an ed25519 key generated once in
    /// $XDG_STATE_HOME/sshshim/ (0600) and reused.
    #[arg(long, value_name = "FILE", value_parser = path_arg)]
    #[serde(default, deserialize_with = "value::path")]
    pub host_key: Option<PathBuf>,

    /// Local forward owned by sshshim: [bind:]port:host:hostport, or with
    /// socket paths. Repeatable.
    #[arg(short = 'L', value_name = "SPEC", value_parser = |s: &str| ForwardSpec::parse(Kind::Local, s))]
    #[serde(default, deserialize_with = "value::local_forwards")]
    pub local_forwards: Vec<ForwardSpec>,

    /// Remote forward owned by sshshim: [bind:]port:host:hostport, or with
    /// socket paths. Repeatable. Kept alive across reconnects.
    #[arg(short = 'R', value_name = "SPEC", value_parser = |s: &str| ForwardSpec::parse(Kind::Remote, s))]
    #[serde(default, deserialize_with = "value::remote_forwards")]
    pub remote_forwards: Vec<ForwardSpec>,

    /// Seconds between SSH keepalives sent upstream [default: ServerAliveInterval, else 15].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default, deserialize_with = "value::secs")]
    pub keepalive: Option<u64>,

    /// Unanswered keepalives after which the upstream is declared dead
    /// [default: ServerAliveCountMax, else 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default, deserialize_with = "value::count")]
    pub keepalive_max: Option<u64>,

    /// Longest wait between reconnect attempts, in seconds, fractions allowed [default: 30].
    /// The first retry after a working connection is at once; the wait then
    /// starts at 1 s and doubles per failed attempt in a row, up to this. A
    /// waiting request or a network change triggers an attempt at once.
    /// Flapping is damped by a floor: attempts start at least 1 s apart
    /// (or this, if smaller).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    #[serde(default, deserialize_with = "value::duration")]
    pub max_backoff: Option<Duration>,

    /// Seconds to wait for a connection (and, while reconnecting, how long a
    /// new local channel waits for the upstream) [default: ConnectTimeout, else 30].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default, deserialize_with = "value::secs")]
    pub connect_timeout: Option<u64>,

    /// Most upstream connections to use when the server limits sessions per
    /// connection (sshd's MaxSessions, 10 by default); extra ones close when
    /// idle [default: 4].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_UPSTREAMS_CAP))]
    #[serde(default, deserialize_with = "value::upstreams")]
    pub max_upstreams: Option<u64>,

    /// Run CMD on events (connected, disconnected, forward-failed, ...), with
    /// SSHSHIM_EVENT, SSHSHIM_PROFILE and SSHSHIM_REASON set; rate-limited.
    #[arg(long, value_name = "CMD")]
    #[serde(default, deserialize_with = "value::command")]
    pub on_event: Option<String>,

    /// Serve Prometheus metrics (/metrics) and status JSON (/status) over HTTP
    /// on this loopback address, to your own user only.
    #[arg(long, value_name = "ADDR:PORT")]
    #[serde(default, deserialize_with = "value::addr")]
    pub metrics: Option<SocketAddr>,

    /// Seconds a local reader that stopped reading may hold its full buffer
    /// (the spill cap) before its channel is closed, with a message on its
    /// stderr [default: 5]. Meanwhile new channels use another upstream
    /// connection.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default, deserialize_with = "value::secs")]
    pub stall_limit: Option<u64>,

    /// Serve OpenSSH's multiplexing protocol on this Unix socket, so OpenSSH
    /// tools with `ControlPath` set to it skip the local handshake; `none`
    /// serves none. Its directory must be yours and writable by nobody else
    /// [default: $XDG_RUNTIME_DIR/sshshim/NAME.mux, else
    /// ~/.local/state/sshshim/run/NAME.mux].
    #[arg(long, value_name = "PATH|none", value_parser = path_arg)]
    #[serde(default, deserialize_with = "value::path")]
    pub mux: Option<PathBuf>,

    /// Keep sessions alive across network drops: each session runs under a
    /// small helper that sshshim brings to the server (into
    /// ~/.cache/sshshim there) and continues after the reconnect with
    /// nothing lost. See README, "Resumable sessions".
    #[arg(long, num_args = 0, default_missing_value = "true")]
    #[serde(default, deserialize_with = "value::flag")]
    pub resume: Option<bool>,

    /// Seconds the server holds a resumable session while sshshim is away,
    /// before its command gets SIGHUP as a lost session's would [default: 600].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    #[serde(default, deserialize_with = "value::secs")]
    pub resume_timeout: Option<u64>,

    /// The helper to run on the server for resumable sessions (an sshshim
    /// or sshshim-remote-helper you installed there), instead of uploading one.
    #[arg(long, value_name = "PATH")]
    #[serde(default, deserialize_with = "value::remote_path")]
    pub remote_helper: Option<String>,

    /// Lets `sshshim mcp` run commands and copy files through this profile's
    /// endpoint (its `exec` and `copy` tools); off unless set.
    #[arg(skip)]
    #[serde(default, deserialize_with = "value::flag")]
    pub mcp_exec: Option<bool>,

    /// Marks a profile `sshshim mcp` created (its `tunnel_setup` writes it):
    /// the only profiles MCP may change or remove. `sshshim up` ignores it.
    #[arg(skip)]
    #[serde(default, deserialize_with = "value::flag")]
    pub mcp_created: Option<bool>,

    /// The directory beneath which `sshshim mcp`'s `copy` reads and writes
    /// local files for this profile, `~` expanded (default: the MCP server's
    /// working directory). Set by a person only; MCP may not set it.
    #[arg(skip)]
    #[serde(default, deserialize_with = "value::path")]
    pub copy_dir: Option<PathBuf>,
}

/// The upstream connection's timing and limits, resolved to concrete values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// How long to wait for the upstream TCP connection and handshake.
    pub connect_timeout: Duration,
    /// Interval of SSH keepalives sent upstream.
    pub keepalive: Duration,
    /// Unanswered keepalives after which upstream is declared dead.
    pub keepalive_max: usize,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// Most upstream connections to open when the server limits sessions
    /// per connection (sshd's MaxSessions).
    pub max_upstreams: usize,
    /// How long a local reader whose buffer is full may take nothing
    /// before its channel is closed.
    pub stall_limit: Duration,
}

impl Profile {
    /// Fills every field that is unset in `self` from `lower` (precedence:
    /// self wins). Lists: self's if non-empty, else lower's.
    pub fn or(self, lower: Profile) -> Profile {
        /// A list is set when it is not empty.
        fn list<T>(a: Vec<T>, b: Vec<T>) -> Vec<T> {
            if a.is_empty() { b } else { a }
        }
        Profile {
            destination: self.destination.or(lower.destination),
            jump: self.jump.or(lower.jump),
            port: self.port.or(lower.port),
            user: self.user.or(lower.user),
            identity: list(self.identity, lower.identity),
            known_hosts: self.known_hosts.or(lower.known_hosts),
            accept_new: self.accept_new.or(lower.accept_new),
            listen: self.listen.or(lower.listen),
            allow_non_loopback: self.allow_non_loopback.or(lower.allow_non_loopback),
            authorized_keys: self.authorized_keys.or(lower.authorized_keys),
            host_key: self.host_key.or(lower.host_key),
            local_forwards: list(self.local_forwards, lower.local_forwards),
            remote_forwards: list(self.remote_forwards, lower.remote_forwards),
            keepalive: self.keepalive.or(lower.keepalive),
            keepalive_max: self.keepalive_max.or(lower.keepalive_max),
            max_backoff: self.max_backoff.or(lower.max_backoff),
            connect_timeout: self.connect_timeout.or(lower.connect_timeout),
            max_upstreams: self.max_upstreams.or(lower.max_upstreams),
            on_event: self.on_event.or(lower.on_event),
            metrics: self.metrics.or(lower.metrics),
            stall_limit: self.stall_limit.or(lower.stall_limit),
            mux: self.mux.or(lower.mux),
            resume: self.resume.or(lower.resume),
            resume_timeout: self.resume_timeout.or(lower.resume_timeout),
            remote_helper: self.remote_helper.or(lower.remote_helper),
            mcp_exec: self.mcp_exec.or(lower.mcp_exec),
            mcp_created: self.mcp_created.or(lower.mcp_created),
            copy_dir: self.copy_dir.or(lower.copy_dir),
        }
    }

    /// The timing and limits: these (already layered) settings over
    /// ssh_config's `hc` over the defaults.
    pub fn tuning(&self, hc: &HostConfig) -> Tuning {
        let keepalive = self
            .keepalive
            .or(hc.server_alive_interval.filter(|s| *s > 0))
            .map_or(DEFAULT_KEEPALIVE, Duration::from_secs);
        let keepalive_max = self
            .keepalive_max
            .or(hc.server_alive_count_max)
            .unwrap_or(DEFAULT_KEEPALIVE_MAX)
            .max(1);
        Tuning {
            connect_timeout: self
                .connect_timeout
                .or(hc.connect_timeout)
                .map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_secs),
            keepalive,
            keepalive_max: usize::try_from(keepalive_max).unwrap_or(usize::MAX),
            max_backoff: self.max_backoff.unwrap_or(DEFAULT_MAX_BACKOFF),
            max_upstreams: usize::try_from(self.max_upstreams.unwrap_or(DEFAULT_MAX_UPSTREAMS))
                .unwrap_or(usize::MAX),
            stall_limit: self
                .stall_limit
                .map_or(DEFAULT_STALL_LIMIT, Duration::from_secs),
        }
    }

    /// Resumable sessions: `None` when off, else how long the server holds
    /// a session and the helper the user installed there, if any.
    pub fn resume(&self) -> Option<(Duration, Option<String>)> {
        self.resume.unwrap_or(false).then(|| {
            (
                self.resume_timeout
                    .map_or(crate::tuning::RESUME_TIMEOUT, Duration::from_secs),
                self.remote_helper.clone(),
            )
        })
    }

    /// Where the profile connects as its own settings say, before
    /// ssh_config: `destination` with the `user` and `port` keys applied,
    /// as `[user@]host[:port]`. None without a (valid) destination. A
    /// running profile reports it in its status, and `sshshim mcp` compares
    /// it with the file's.
    pub fn target_label(&self) -> Option<String> {
        let mut d: Destination = self.destination.as_deref()?.parse().ok()?;
        if self.user.is_some() {
            d.user = self.user.clone();
        }
        if self.port.is_some() {
            d.port = self.port;
        }
        Some(d.to_string())
    }
}

/// Every key a profile may set, in declaration order: the field names of
/// [`Profile`], as its `Deserialize` knows them.
pub fn keys() -> &'static [&'static str] {
    static KEYS: OnceLock<&'static [&'static str]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut names: &'static [&'static str] = &[];
        // Asks for the field names and stops: the error is expected.
        let _ = Profile::deserialize(FieldNames(&mut names));
        names
    })
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

/// A path option, `~` expanded (a quoted `~/x` reaches us unexpanded).
fn path_arg(s: &str) -> Result<PathBuf, String> {
    Ok(crate::paths::expand_tilde(std::path::Path::new(s)))
}

/// Parses a positive number of seconds, fractions allowed ("0.5").
fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86400.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "'{s}' is not a number of seconds between 0 and 86400"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tuning value: the layered profile over ssh_config over the default.
    #[test]
    fn tuning_layers() {
        let none = HostConfig::default();
        let defaults = Profile::default().tuning(&none);
        assert_eq!(
            defaults,
            Tuning {
                connect_timeout: DEFAULT_CONNECT_TIMEOUT,
                keepalive: DEFAULT_KEEPALIVE,
                keepalive_max: DEFAULT_KEEPALIVE_MAX as usize,
                max_backoff: DEFAULT_MAX_BACKOFF,
                max_upstreams: DEFAULT_MAX_UPSTREAMS as usize,
                stall_limit: DEFAULT_STALL_LIMIT,
            }
        );
        let hc = HostConfig {
            server_alive_interval: Some(7),
            server_alive_count_max: Some(9),
            connect_timeout: Some(11),
            ..HostConfig::default()
        };
        let from_ssh = Profile::default().tuning(&hc);
        assert_eq!(from_ssh.keepalive, Duration::from_secs(7));
        assert_eq!(from_ssh.keepalive_max, 9);
        assert_eq!(from_ssh.connect_timeout, Duration::from_secs(11));
        let p = Profile {
            keepalive: Some(2),
            keepalive_max: Some(5),
            connect_timeout: Some(3),
            max_backoff: Some(Duration::from_millis(500)),
            max_upstreams: Some(2),
            stall_limit: Some(8),
            ..Profile::default()
        };
        let t = p.tuning(&hc);
        assert_eq!(t.keepalive, Duration::from_secs(2));
        assert_eq!(t.keepalive_max, 5);
        assert_eq!(t.connect_timeout, Duration::from_secs(3));
        assert_eq!(t.max_backoff, Duration::from_millis(500));
        assert_eq!(t.max_upstreams, 2);
        assert_eq!(t.stall_limit, Duration::from_secs(8));
        // ServerAliveInterval 0 means "off" in OpenSSH: the default applies.
        let off = HostConfig {
            server_alive_interval: Some(0),
            ..HostConfig::default()
        };
        assert_eq!(Profile::default().tuning(&off).keepalive, DEFAULT_KEEPALIVE);
    }

    /// The key list is the struct's fields, and the tuning keys are keys.
    #[test]
    fn keys_are_the_fields() {
        let k = keys();
        assert_eq!(k.first(), Some(&"destination"));
        assert!(
            k.contains(&"max_upstreams") && k.contains(&"copy_dir"),
            "{k:?}"
        );
        for t in TUNING_KEYS {
            assert!(k.contains(t), "tuning key '{t}' is no profile key");
        }
    }

    /// Every flag of `up` that is a profile key, and only those, with the
    /// key's name spelt as its long option.
    #[test]
    fn flags_are_keys() {
        let cmd = <Profile as clap::Args>::augment_args(clap::Command::new("up"));
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            assert!(keys().contains(&id), "flag {id} is no profile key");
            if let Some(long) = arg.get_long() {
                assert_eq!(long.replace('-', "_"), id);
            }
        }
    }

    /// The backticked words of `text`.
    fn quoted(text: &str) -> Vec<&str> {
        text.split('`').skip(1).step_by(2).collect()
    }

    /// README's option table and profile reference agree with [`Profile`]:
    /// every flag of it is in the table, every row of the table is such a
    /// flag or one of the options README names as no key, and the key
    /// list is [`keys`].
    #[test]
    fn readme_documents_every_setting() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let section = readme
            .split("### Options of `sshshim up`")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has the option table");
        // Each row's option names: `-p`, `--port`, ...
        let rows: Vec<Vec<&str>> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cell = l.split('|').nth(1).unwrap_or("");
                cell.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .filter(|t| t.starts_with("--") || (t.starts_with('-') && t.len() == 2))
                    .collect()
            })
            .collect();
        let no_key = section
            .split("Every option above except")
            .nth(1)
            .and_then(|s| s.split("is also a").next())
            .map(quoted)
            .expect("README names the options that are no key");
        let cmd = <Profile as clap::Args>::augment_args(clap::Command::new("up"));
        let mut flags = Vec::new();
        for arg in cmd.get_arguments() {
            let names: Vec<String> = arg
                .get_long()
                .map(|l| format!("--{l}"))
                .into_iter()
                .chain(arg.get_short().map(|s| format!("-{s}")))
                .collect();
            for n in &names {
                assert!(
                    rows.iter().any(|r| r.contains(&n.as_str())),
                    "{n} is not in README's option table"
                );
                assert!(!no_key.contains(&n.as_str()), "README says {n} is no key");
            }
            flags.extend(names);
        }
        for row in rows.iter().filter(|r| !r.is_empty()) {
            assert!(
                row.iter()
                    .any(|n| flags.iter().any(|f| f == n) || no_key.contains(n)),
                "README's option table has {row:?}, which is neither a setting nor named as no key"
            );
        }
        let reference = readme
            .split("\nKeys: ")
            .nth(1)
            .and_then(|s| s.split("\n\n").next())
            .expect("README has the profile reference");
        let mut listed: Vec<&str> = quoted(reference)
            .into_iter()
            .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .collect();
        let mut want = keys().to_vec();
        listed.sort_unstable();
        want.sort_unstable();
        assert_eq!(
            listed, want,
            "README's profile keys differ from the settings"
        );
    }
}

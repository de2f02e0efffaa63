//! Configuration: the destination syntax, resolved settings for `sshshim up`,
//! and the directories sshshim keeps its own files in.
//!
//! Command-line parsing lives in `main.rs`; this module turns what the user
//! said into one [`UpConfig`] so the rest of the crate never looks at flags.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::forward::{ForwardSpec, Kind};
use crate::profile::Profile;
use crate::ssh_config::{self, HostConfig, StrictHostKeyChecking};

/// Where to connect: `[user@]host[:port]`, IPv6 hosts in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Login name, if the destination named one.
    pub user: Option<String>,
    /// Host name or address, without brackets.
    pub host: String,
    /// Port, if the destination named one.
    pub port: Option<u16>,
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            |why: &str| format!("invalid destination '{s}': {why} (expected [user@]host[:port])");
        // The last '@' splits, as OpenSSH does: user names may contain '@'.
        let (user, rest) = match s.rfind('@') {
            Some(i) => (Some(&s[..i]), &s[i + 1..]),
            None => (None, s),
        };
        if user == Some("") {
            return Err(bad("empty user name"));
        }
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']').ok_or_else(|| bad("missing ']'"))?;
            let host = &inner[..end];
            let after = &inner[end + 1..];
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            };
            (host, port)
        } else if rest.matches(':').count() > 1 {
            // A bare IPv6 address: no port possible without brackets.
            (rest, None)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(parse_port(p).map_err(|e| bad(&e))?),
        };
        Ok(Destination {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            write!(f, "{}", self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Parses a TCP port number (1-65535).
pub fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("'{p}' is not a port number (1-65535)")),
        Ok(n) => Ok(n),
    }
}

/// One SSH hop (the target or a jump host), fully resolved.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Host name or address to connect to (after ssh_config's HostName).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Login name.
    pub user: String,
    /// Identity files to try, in order, after the agent.
    pub identities: Vec<PathBuf>,
    /// Whether `identities` came from the user (then a missing file is an error).
    pub identities_explicit: bool,
    /// Offer only the agent keys that match `identities` (IdentitiesOnly).
    pub identities_only: bool,
    /// The agent socket to use; `None` for no agent.
    pub agent: Option<PathBuf>,
    /// The known_hosts file that is read and, with `accept_new`, written.
    pub known_hosts: PathBuf,
    /// Read-only known_hosts files.
    pub global_known_hosts: Vec<PathBuf>,
    /// Record the key of a host not yet known instead of refusing.
    pub accept_new: bool,
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// Everything `sshshim up` needs, resolved from flags, profiles, the
/// environment and ssh_config into concrete values.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// Profile or destination name, used for the endpoint's alias and status.
    pub name: String,
    /// The server.
    pub target: HostSpec,
    /// Jump hosts, in order (ProxyJump).
    pub jumps: Vec<HostSpec>,
    /// Local endpoint address; `None` serves no endpoint.
    pub listen: Option<SocketAddr>,
    /// Permit a non-loopback `listen`.
    pub allow_non_loopback: bool,
    /// Public keys allowed to use the endpoint; `None` means the user's own.
    pub authorized_keys: Option<PathBuf>,
    /// The endpoint's host key; `None` means the generated one in the state dir.
    pub host_key: Option<PathBuf>,
    /// Forwards owned by sshshim itself.
    pub forwards: Vec<ForwardSpec>,
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
    /// Command run on connection events.
    pub on_event: Option<String>,
    /// Address of the Prometheus/JSON metrics endpoint.
    pub metrics: Option<SocketAddr>,
}

/// What to resolve for `sshshim up` (and each supervised profile).
pub struct UpRequest<'a> {
    /// The profile name or destination as the user typed it.
    pub name: &'a str,
    /// Flags, environment and profile, already layered.
    pub profile: Profile,
    /// `-F`: the ssh_config file to read instead of the default.
    pub ssh_config: Option<&'a Path>,
    /// `-J`: jump hosts, overriding ProxyJump.
    pub jump: Option<&'a str>,
    /// `--max-upstreams`.
    pub max_upstreams: usize,
    /// Endpoint address when neither flags nor profile name one.
    pub default_listen: Option<SocketAddr>,
}

/// Resolves one hop: the destination's own user/port, then flags, then
/// ssh_config (read with OpenSSH's own `ssh -G`), then OpenSSH's defaults.
fn resolve_host(
    dest: &Destination,
    p: &Profile,
    ssh_config: Option<&Path>,
) -> Result<(HostSpec, HostConfig), String> {
    let hc = ssh_config::resolve(&dest.host, ssh_config)
        .map_err(|e| format!("reading ssh_config for '{}': {e}", dest.host))?;
    let strict = hc.strict_host_key_checking;
    if strict == Some(StrictHostKeyChecking::No) {
        tracing::warn!(
            "StrictHostKeyChecking is 'no' for {}: unknown host keys are recorded without asking \
             (a changed key is still refused)",
            dest.host
        );
    }
    let none = |v: &[PathBuf]| v.len() == 1 && v[0] == Path::new("none");
    let user_files: Vec<PathBuf> = if none(&hc.user_known_hosts_files) {
        Vec::new()
    } else {
        hc.user_known_hosts_files.clone()
    };
    let known_hosts = p
        .known_hosts
        .clone()
        .or_else(|| user_files.first().cloned())
        .unwrap_or_else(|| expand_tilde(Path::new("~/.ssh/known_hosts")));
    let mut global: Vec<PathBuf> = user_files.iter().skip(1).cloned().collect();
    if hc.global_known_hosts_files.is_empty() {
        global.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
    } else if !none(&hc.global_known_hosts_files) {
        global.extend(hc.global_known_hosts_files.iter().cloned());
    }
    let agent = match hc.identity_agent.as_deref() {
        Some("none") => None,
        Some("SSH_AUTH_SOCK") | None => std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        Some(path) => Some(expand_tilde(Path::new(path))),
    };
    let identities_explicit = !p.identity.is_empty();
    let spec = HostSpec {
        host: hc.hostname.clone().unwrap_or_else(|| dest.host.clone()),
        port: p.port.or(dest.port).or(hc.port).unwrap_or(22),
        user: p
            .user
            .clone()
            .or(dest.user.clone())
            .or(hc.user.clone())
            .unwrap_or_else(current_user),
        identities: if identities_explicit {
            p.identity.iter().map(|i| expand_tilde(i)).collect()
        } else if hc.identity_files.is_empty() {
            default_identities()
        } else {
            hc.identity_files.clone()
        },
        identities_explicit,
        identities_only: hc.identities_only,
        agent,
        known_hosts,
        global_known_hosts: global,
        accept_new: p.accept_new.unwrap_or(matches!(
            strict,
            Some(StrictHostKeyChecking::AcceptNew | StrictHostKeyChecking::No)
        )),
    };
    Ok((spec, hc))
}

/// Resolves everything `sshshim up` needs.
pub fn resolve_up(req: UpRequest<'_>) -> Result<UpConfig, String> {
    let p = req.profile;
    let dest: Destination = p.destination.as_deref().unwrap_or(req.name).parse()?;
    let (target, hc) = resolve_host(&dest, &p, req.ssh_config)?;
    let jump_list: Vec<String> = match req.jump {
        Some(j) => j.split(',').map(str::to_owned).collect(),
        None => hc.proxy_jump.clone(),
    };
    let mut jumps = Vec::new();
    for hop in jump_list.iter().filter(|h| !h.is_empty() && *h != "none") {
        let d: Destination = hop.parse().map_err(|e| format!("jump host: {e}"))?;
        // A hop's own settings come from ssh_config, not from our flags.
        let (spec, _) = resolve_host(&d, &Profile::default(), req.ssh_config)?;
        jumps.push(spec);
    }
    let mut forwards = p.local_forwards.clone();
    forwards.extend(p.remote_forwards.iter().cloned());
    if forwards.is_empty() {
        for (kind, list) in [
            (Kind::Local, &hc.local_forwards),
            (Kind::Remote, &hc.remote_forwards),
        ] {
            for f in list {
                match ForwardSpec::parse(kind, f) {
                    Ok(spec) => forwards.push(spec),
                    Err(e) => tracing::warn!("ssh_config forward ignored: {e}"),
                }
            }
        }
    }
    let keepalive = p
        .keepalive
        .or(hc.server_alive_interval.filter(|s| *s > 0))
        .unwrap_or(15);
    Ok(UpConfig {
        name: req.name.to_owned(),
        target,
        jumps,
        listen: p.listen.or(req.default_listen),
        allow_non_loopback: p.allow_non_loopback.unwrap_or(false),
        authorized_keys: p.authorized_keys.map(|k| expand_tilde(&k)),
        host_key: p.host_key.map(|k| expand_tilde(&k)),
        forwards,
        connect_timeout: Duration::from_secs(
            p.connect_timeout.or(hc.connect_timeout).unwrap_or(30),
        ),
        keepalive: Duration::from_secs(keepalive),
        keepalive_max: p
            .keepalive_max
            .or(hc.server_alive_count_max)
            .unwrap_or(3)
            .max(1) as usize,
        max_backoff: p.max_backoff.unwrap_or(Duration::from_secs(30)),
        max_upstreams: req.max_upstreams,
        on_event: p.on_event,
        metrics: p.metrics,
    })
}

/// SSH channel window on both legs. 2 MiB matches OpenSSH; a fixed 16 MiB
/// window measured 25-35% slower on loopback.
pub const WINDOW_SIZE: u32 = 2 * 1024 * 1024;

/// Largest packet we accept: 64 KiB packets measured 5-10% faster than 32 KiB.
pub const MAX_PACKET: u32 = 65535;

/// Messages russh queues per channel before its session loop waits on us.
pub const CHANNEL_BUFFER: usize = 64;

/// Whether the CPU has the instructions that make AES-GCM cheap.
fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Upstream (client leg) algorithm preferences: AES-GCM first when the CPU
/// has AES instructions (1.7-1.9x ChaCha20's throughput measured). As the
/// client we decide: the first of ours the server also has wins.
pub fn upstream_algorithms() -> russh::Preferred {
    use russh::cipher;
    static AES_FIRST: &[cipher::Name] = &[
        cipher::AES_128_GCM,
        cipher::AES_256_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_CTR,
        cipher::AES_128_CTR,
    ];
    static CHACHA_FIRST: &[cipher::Name] = &[
        cipher::CHACHA20_POLY1305,
        cipher::AES_128_GCM,
        cipher::AES_256_GCM,
        cipher::AES_256_CTR,
        cipher::AES_128_CTR,
    ];
    let list = if aes_hardware() {
        AES_FIRST
    } else {
        CHACHA_FIRST
    };
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(list),
        ..Default::default()
    }
}

/// Local endpoint (server leg) algorithm preferences. Here the client's
/// order decides, so what we leave out is what steers it.
/// - Ciphers: OpenSSH lists chacha20-poly1305 first, so offering AES-GCM
///   "first" changes nothing: with AES instructions we offer AES-GCM only
///   (every OpenSSH client has it; uploads through the shim measured 15-25%
///   faster than with ChaCha20 on the local leg).
/// - Key exchange: OpenSSH computes curve25519 (and sntrup761) with slow
///   portable code but NIST P-256 with OpenSSL, so leaving curve25519 out
///   made each `ssh -p 2222 localhost true` ~4.5 ms (18%) faster. The DH
///   groups stay as a fallback for clients configured without NIST curves.
pub fn endpoint_algorithms() -> russh::Preferred {
    use russh::{cipher, kex};
    static GCM_ONLY: &[cipher::Name] = &[cipher::AES_128_GCM, cipher::AES_256_GCM];
    static KEX: &[kex::Name] = &[
        kex::ECDH_SHA2_NISTP256,
        kex::ECDH_SHA2_NISTP384,
        kex::DH_GEX_SHA256,
        kex::DH_G16_SHA512,
        kex::DH_G18_SHA512,
        kex::DH_G14_SHA256,
        kex::EXTENSION_SUPPORT_AS_SERVER,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
    ];
    let mut p = upstream_algorithms();
    if aes_hardware() {
        p.cipher = std::borrow::Cow::Borrowed(GCM_ONLY);
    }
    p.kex = std::borrow::Cow::Borrowed(KEX);
    p
}

/// The OpenSSH default identity files, in the order OpenSSH tries them.
pub fn default_identities() -> Vec<PathBuf> {
    let Some(ssh) = home_dir().map(|h| h.join(".ssh")) else {
        return Vec::new();
    };
    ["id_ed25519", "id_ecdsa", "id_rsa"]
        .iter()
        .map(|n| ssh.join(n))
        .collect()
}

/// The user's home directory, from `$HOME`.
pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Expands a leading `~/` to the home directory.
pub fn expand_tilde(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), home_dir()) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => p.to_path_buf(),
    }
}

/// The current user's login name.
pub fn current_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            // SAFETY: getpwuid returns a pointer into static storage or null.
            unsafe {
                let pw = libc::getpwuid(libc::getuid());
                if pw.is_null() {
                    return "root".into();
                }
                std::ffi::CStr::from_ptr((*pw).pw_name)
                    .to_string_lossy()
                    .into_owned()
            }
        })
}

/// sshshim's state directory (`$XDG_STATE_HOME/sshshim`, else
/// `~/.local/state/sshshim`), created with mode 0700.
pub fn state_dir() -> std::io::Result<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(".local/state")))
        .ok_or_else(|| std::io::Error::other("neither XDG_STATE_HOME nor HOME is set"))?;
    let dir = base.join("sshshim");
    create_private_dir(&dir)?;
    Ok(dir)
}

/// Creates `dir` (and parents) and makes sure the leaf is mode 0700.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations() {
        let d: Destination = "alice@host.example:2200".parse().unwrap();
        assert_eq!(d.user.as_deref(), Some("alice"));
        assert_eq!(d.host, "host.example");
        assert_eq!(d.port, Some(2200));
        let d: Destination = "[::1]:22".parse().unwrap();
        assert_eq!((d.host.as_str(), d.port), ("::1", Some(22)));
        let d: Destination = "fe80::1".parse().unwrap();
        assert_eq!((d.host.as_str(), d.port), ("fe80::1", None));
        let d: Destination = "a@b@host".parse().unwrap();
        assert_eq!(d.user.as_deref(), Some("a@b"));
        assert!("host:0".parse::<Destination>().is_err());
        assert!("host:x".parse::<Destination>().is_err());
        assert!("@host".parse::<Destination>().is_err());
        assert!("".parse::<Destination>().is_err());
        assert_eq!(
            "u@[::1]:2".parse::<Destination>().unwrap().to_string(),
            "u@[::1]:2"
        );
    }
}

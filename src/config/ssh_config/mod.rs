//! Resolving a destination the way OpenSSH does: by running `ssh -G`, so
//! Match, Include, wildcards and `%` tokens follow OpenSSH's own rules.
//!
//! There is no reader of our own for resolving: sshshim serves OpenSSH
//! clients, so `ssh` is almost always installed where it runs. On a machine
//! without it, a destination resolves to OpenSSH's defaults when there is no
//! ssh_config to read, and is an error (saying to install the client) when
//! there is. ([`hosts`] reads `Host` lines, only to offer completions.)

pub mod hosts;
mod tokens;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::paths::{current_user, default_identities, expand_tilde, home_dir};
use tokens::TokenContext;

/// How long `ssh -G` may take before we give up on it.
const SSH_G_TIMEOUT: Duration = Duration::from_secs(10);

/// The system-wide client configuration OpenSSH reads.
const SYSTEM_CONFIG: &str = "/etc/ssh/ssh_config";

/// StrictHostKeyChecking as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrictHostKeyChecking {
    /// Never add keys; refuse unknown or changed hosts (`yes`/`true`).
    Yes,
    /// Add unknown hosts silently, refuse changed keys (`accept-new`).
    AcceptNew,
    /// Add anything, warn on changed keys (`no`/`off`/`false`).
    No,
    /// Ask the user about unknown hosts (`ask`, OpenSSH's default).
    Ask,
}

impl StrictHostKeyChecking {
    /// Parses a config or `ssh -G` value (case-insensitive).
    pub fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "yes" | "true" => Some(Self::Yes),
            "accept-new" => Some(Self::AcceptNew),
            "no" | "off" | "false" => Some(Self::No),
            "ask" => Some(Self::Ask),
            _ => None,
        }
    }
}

/// What ssh_config says about one destination.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostConfig {
    /// Real host name to connect to.
    pub hostname: Option<String>,
    /// Remote user name.
    pub user: Option<String>,
    /// Remote port.
    pub port: Option<u16>,
    /// All identity files, in order, `~` and `%` tokens expanded.
    pub identity_files: Vec<PathBuf>,
    /// Only use the configured identity files, not every agent key.
    pub identities_only: bool,
    /// `"none"`, `"SSH_AUTH_SOCK"` or a socket path (`~` expanded).
    pub identity_agent: Option<String>,
    /// User known_hosts files; a single `"none"` entry means "no file".
    pub user_known_hosts_files: Vec<PathBuf>,
    /// Global known_hosts files; a single `"none"` entry means "no file".
    pub global_known_hosts_files: Vec<PathBuf>,
    /// Host key policy.
    pub strict_host_key_checking: Option<StrictHostKeyChecking>,
    /// Keepalive interval in seconds; 0 = off.
    pub server_alive_interval: Option<u64>,
    /// Unanswered keepalives before disconnecting.
    pub server_alive_count_max: Option<u64>,
    /// TCP connect timeout in seconds.
    pub connect_timeout: Option<u64>,
    /// Jump hosts in order, each `[user@]host[:port]`; empty for none.
    pub proxy_jump: Vec<String>,
    /// Local forwards in `-L` syntax, e.g. `8080:localhost:80`.
    pub local_forwards: Vec<String>,
    /// Remote forwards in `-R` syntax; a bare listen spec is a SOCKS forward.
    pub remote_forwards: Vec<String>,
}

/// Resolves `host` with `ssh -G [-F file] host`.
///
/// Without an `ssh` binary: OpenSSH's defaults when no ssh_config exists
/// (`file`, `~/.ssh/config`, /etc/ssh/ssh_config), else an error.
pub fn resolve(host: &str, file: Option<&Path>) -> Result<HostConfig, ReadError> {
    resolve_with("ssh", host, file)
}

/// [`resolve`] with an explicit `ssh` program, so tests can take it away.
fn resolve_with(program: &str, host: &str, file: Option<&Path>) -> Result<HostConfig, ReadError> {
    match run_ssh_g(program, host, file) {
        Ok(out) => {
            let cfg = parse_ssh_g(&out);
            // ProxyCommand wins over a later ProxyJump, and we cannot honour it.
            if let Some(cmd) = out
                .lines()
                .find_map(|l| l.strip_prefix("proxycommand "))
                .filter(|c| c.trim() != "none")
            {
                tracing::warn!(
                    host,
                    proxycommand = cmd,
                    "ProxyCommand is not supported by sshshim and is ignored"
                );
            }
            Ok(cfg)
        }
        Err(SshGError::NotFound) => {
            let files: Vec<PathBuf> = match file {
                Some(f) => vec![f.to_path_buf()],
                None => [
                    home_dir().map(|h| h.join(".ssh/config")),
                    Some(PathBuf::from(SYSTEM_CONFIG)),
                ]
                .into_iter()
                .flatten()
                .collect(),
            };
            if let Some(f) = files.iter().find(|f| f.exists() || file.is_some()) {
                return Err(ReadError::NoClient {
                    file: f.clone(),
                    host: host.to_owned(),
                    program: program.to_owned(),
                });
            }
            tracing::info!("`{program}` not found and no ssh_config exists: OpenSSH defaults");
            let mut cfg = HostConfig::default();
            fill_defaults(&mut cfg, host);
            Ok(cfg)
        }
        Err(SshGError::Failed(msg)) => Err(ReadError::Failed(msg)),
    }
}

/// Why ssh_config could not be read for a host; the text says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// No OpenSSH client to read an ssh_config that exists.
    #[error(
        "cannot read {} for '{host}': the OpenSSH client (`{program}`) is not \
         installed, and sshshim reads ssh_config only through `ssh -G`; install it \
         (e.g. apt-get install openssh-client)",
        file.display()
    )]
    NoClient {
        /// The ssh_config file.
        file: PathBuf,
        /// The host asked for.
        host: String,
        /// The program not found.
        program: String,
    },
    /// `ssh -G` failed: its message (a bad option and its line, a timeout).
    #[error("{0}")]
    Failed(String),
}

/// Why `ssh -G` produced no output.
enum SshGError {
    /// The program does not exist.
    NotFound,
    /// It ran but failed (bad config, timeout, ...): report it.
    Failed(String),
}

/// Runs `program -G [-F file] -- host` with stdin closed and a timeout.
fn run_ssh_g(program: &str, host: &str, file: Option<&Path>) -> Result<String, SshGError> {
    let mut cmd = Command::new(program);
    cmd.arg("-G");
    if let Some(f) = file {
        cmd.arg("-F").arg(f);
    }
    // "--" keeps a destination starting with '-' from being read as an option.
    cmd.arg("--").arg(host);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SshGError::NotFound),
        Err(e) => return Err(SshGError::Failed(format!("cannot run {program} -G: {e}"))),
    };
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + SSH_G_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SshGError::Failed(format!(
                    "{program} -G {host} timed out after {}s",
                    SSH_G_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(SshGError::Failed(format!("waiting for {program} -G: {e}"))),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if status.success() {
        Ok(stdout)
    } else {
        // ssh prints this harmless notice even for -G; keep only real errors.
        let msg: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.starts_with("Pseudo-terminal will not be allocated"))
            .collect();
        Err(SshGError::Failed(format!(
            "{program} -G {host} failed ({status}): {}",
            msg.join("\n").trim()
        )))
    }
}

/// Parses the output of `ssh -G`.
///
/// `identityfile` is printed unexpanded (`~`, `%d`, `%r`, ...), so it is
/// expanded here using the resolved host, user and port. Buggy or
/// irrelevant lines (`dynamicforward`, which ssh -G also prints for local
/// forwards to unix sockets) are ignored.
pub fn parse_ssh_g(output: &str) -> HostConfig {
    let mut cfg = HostConfig::default();
    let mut original_host = None;
    let mut raw_identities = Vec::new();
    for line in output.lines() {
        let Some((key, value)) = line.split_once(' ') else {
            continue;
        };
        let value = value.trim();
        match key.to_ascii_lowercase().as_str() {
            "host" => original_host = Some(value.to_string()),
            "hostname" => cfg.hostname = Some(value.to_string()),
            "user" => cfg.user = Some(value.to_string()),
            "port" => cfg.port = value.parse().ok(),
            "identityfile" => raw_identities.push(value.to_string()),
            "identitiesonly" => cfg.identities_only = parse_bool(value).unwrap_or(false),
            "identityagent" => cfg.identity_agent = Some(agent_value(value)),
            "userknownhostsfile" => cfg.user_known_hosts_files = path_list(value),
            "globalknownhostsfile" => cfg.global_known_hosts_files = path_list(value),
            "stricthostkeychecking" => {
                cfg.strict_host_key_checking = StrictHostKeyChecking::parse(value)
            }
            "serveraliveinterval" => cfg.server_alive_interval = value.parse().ok(),
            "serveralivecountmax" => cfg.server_alive_count_max = value.parse().ok(),
            // "none" (unset) and anything unparsable both mean "no timeout".
            "connecttimeout" => cfg.connect_timeout = value.parse().ok(),
            "proxyjump" => cfg.proxy_jump = parse_proxy_jump(value),
            "localforward" | "remoteforward" => {
                let mut parts = value.split_whitespace();
                let Some(listen) = parts.next() else { continue };
                let fwd = forward_spec(listen, parts.next());
                if key.eq_ignore_ascii_case("localforward") {
                    cfg.local_forwards.push(fwd);
                } else {
                    cfg.remote_forwards.push(fwd);
                }
            }
            _ => {}
        }
    }
    let ctx = TokenContext::new(
        original_host
            .as_deref()
            .or(cfg.hostname.as_deref())
            .unwrap_or(""),
        &cfg,
    );
    cfg.identity_files = raw_identities
        .iter()
        .map(|f| expand_tilde(Path::new(&ctx.expand(f))))
        .collect();
    cfg
}

/// Parses yes/no style booleans.
fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" => Some(true),
        "no" | "false" => Some(false),
        _ => None,
    }
}

/// Splits a ProxyJump list into hops, turning `ssh://` URIs into `[user@]host[:port]`.
fn parse_proxy_jump(v: &str) -> Vec<String> {
    if v.eq_ignore_ascii_case("none") {
        return Vec::new();
    }
    v.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            h.strip_prefix("ssh://")
                .unwrap_or(h)
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

/// Turns a forward's listen and target (config or `ssh -G` form) into -L/-R syntax.
/// `ssh -G` writes `8080 [localhost]:80`; this yields `8080:localhost:80`.
/// A missing target, or ssh -G's `[socks]:0`, yields a dynamic (SOCKS) forward.
fn forward_spec(listen: &str, connect: Option<&str>) -> String {
    let listen = forward_side(listen);
    match connect {
        None | Some("[socks]:0") => listen,
        Some(c) => format!("{listen}:{}", forward_side(c)),
    }
}

/// Normalises one forward endpoint: unix path, port, or host:port (IPv6 bracketed).
fn forward_side(s: &str) -> String {
    if s.contains('/') {
        return s.to_string();
    }
    let (host, port) = if let Some(inner) = s.strip_prefix('[')
        && let Some((h, rest)) = inner.split_once(']')
    {
        (h, rest.strip_prefix(':').unwrap_or(rest))
    } else if let Some((h, p)) = s.rsplit_once(':') {
        (h, p)
    } else {
        return s.to_string();
    };
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Splits a known_hosts file list on whitespace, expanding `~`.
fn path_list(v: &str) -> Vec<PathBuf> {
    v.split_whitespace()
        .map(|p| expand_tilde(Path::new(p)))
        .collect()
}

/// Keeps the IdentityAgent keywords verbatim and expands `~` in paths.
fn agent_value(v: &str) -> String {
    if v.eq_ignore_ascii_case("none") || v == "SSH_AUTH_SOCK" {
        v.to_string()
    } else {
        expand_tilde(Path::new(v)).to_string_lossy().into_owned()
    }
}

/// OpenSSH's defaults, for a machine without `ssh` and without any ssh_config.
fn fill_defaults(cfg: &mut HostConfig, host: &str) {
    let home = home_dir().unwrap_or_else(|| PathBuf::from("/"));
    cfg.hostname.get_or_insert_with(|| host.to_lowercase());
    cfg.user.get_or_insert_with(current_user);
    cfg.port.get_or_insert(22);
    if cfg.identity_files.is_empty() {
        cfg.identity_files = default_identities();
    }
    if cfg.user_known_hosts_files.is_empty() {
        cfg.user_known_hosts_files = vec![
            home.join(".ssh/known_hosts"),
            home.join(".ssh/known_hosts2"),
        ];
    }
    if cfg.global_known_hosts_files.is_empty() {
        cfg.global_known_hosts_files = vec![
            PathBuf::from("/etc/ssh/ssh_known_hosts"),
            PathBuf::from("/etc/ssh/ssh_known_hosts2"),
        ];
    }
    cfg.strict_host_key_checking
        .get_or_insert(StrictHostKeyChecking::Ask);
    cfg.server_alive_interval.get_or_insert(0);
    cfg.server_alive_count_max.get_or_insert(3);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// True if a usable `ssh` binary is on PATH.
    fn have_ssh() -> bool {
        Command::new("ssh")
            .arg("-V")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    #[test]
    fn without_ssh_defaults_or_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::write(&cfg, "Host x\n  User u\n").unwrap();
        let e = resolve_with("/nonexistent/ssh-binary", "x", Some(&cfg)).unwrap_err();
        assert!(matches!(e, ReadError::NoClient { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("openssh-client"), "{e}");
        assert!(e.contains(&cfg.display().to_string()), "{e}");
        if home_dir().is_some_and(|h| h.join(".ssh/config").exists())
            || Path::new(SYSTEM_CONFIG).exists()
        {
            return;
        }
        let c = resolve_with("/nonexistent/ssh-binary", "Host.example", None).unwrap();
        assert_eq!(c.hostname.as_deref(), Some("host.example"));
        assert_eq!(c.port, Some(22));
        assert_eq!(c.identity_files, default_identities());
        assert_eq!(c.strict_host_key_checking, Some(StrictHostKeyChecking::Ask));
    }

    #[test]
    fn ssh_g_reports_config_errors() {
        if !have_ssh() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::write(&cfg, "Host x\n  NoSuchOption 1\n").unwrap();
        let err = resolve("x", Some(&cfg)).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("Pseudo-terminal"), "{err}");
    }

    #[test]
    fn parses_ssh_g_formats() {
        let out = "host h\nuser u\nhostname h.example.com\nport 22\n\
                   stricthostkeychecking false\nconnecttimeout none\n\
                   identityagent SSH_AUTH_SOCK\nidentitiesonly yes\n\
                   dynamicforward 8082\n\
                   localforward [*]:8080 [host]:80\n\
                   localforward [::1]:8081 [fe80::1]:80\n\
                   localforward 8082 /tmp/r.sock\n\
                   localforward /tmp/l.sock /tmp/r.sock\n\
                   localforward []:8083 [h]:80\n\
                   remoteforward /tmp/rr.sock [localhost]:22\n\
                   remoteforward [0.0.0.0]:9003 [socks]:0\n\
                   remoteforward 9001 [socks]:0\n\
                   identityfile %d/id_%r_%h_%p_%%\n\
                   identityfile /tmp/with space\n\
                   userknownhostsfile none\n\
                   proxyjump u@j:22\n";
        let c = parse_ssh_g(out);
        let home = home_dir().unwrap();
        assert_eq!(c.strict_host_key_checking, Some(StrictHostKeyChecking::No));
        assert_eq!(c.connect_timeout, None);
        assert_eq!(c.identity_agent.as_deref(), Some("SSH_AUTH_SOCK"));
        assert!(c.identities_only);
        assert_eq!(
            c.local_forwards,
            vec![
                "*:8080:host:80",
                "[::1]:8081:[fe80::1]:80",
                "8082:/tmp/r.sock",
                "/tmp/l.sock:/tmp/r.sock",
                ":8083:h:80",
            ]
        );
        assert_eq!(
            c.remote_forwards,
            vec!["/tmp/rr.sock:localhost:22", "0.0.0.0:9003", "9001"]
        );
        assert_eq!(
            c.identity_files,
            vec![
                PathBuf::from(format!("{}/id_u_h.example.com_22_%", home.display())),
                PathBuf::from("/tmp/with space"),
            ]
        );
        assert_eq!(c.user_known_hosts_files, vec![PathBuf::from("none")]);
        assert_eq!(c.proxy_jump, vec!["u@j:22"]);
    }
}

//! Resolving a destination the way OpenSSH does.
//!
//! The authoritative path runs `ssh -G`, so Match, Include, wildcards and
//! `%` tokens follow OpenSSH's own rules exactly. When no `ssh` binary is
//! installed, a small built-in reader ([`read_config`]) covers the common
//! subset and reports what it had to ignore.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long `ssh -G` may take before we give up on it.
const SSH_G_TIMEOUT: Duration = Duration::from_secs(10);

/// OpenSSH refuses Include nesting deeper than this; so do we.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Identity files OpenSSH tries when none are configured (OpenSSH 9.x order).
const DEFAULT_IDENTITY_FILES: &[&str] = &[
    "~/.ssh/id_rsa",
    "~/.ssh/id_ecdsa",
    "~/.ssh/id_ecdsa_sk",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk",
    "~/.ssh/id_xmss",
    "~/.ssh/id_dsa",
];

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

/// Resolves `host` with `ssh -G [-F file] host` (OpenSSH's own rules: Match, Include, wildcards, tokens).
/// If the `ssh` binary is not found, falls back to [`read_config`] on `file` or ~/.ssh/config and
/// logs (tracing::warn!) which keys the built-in reader ignores.
///
/// In the fallback, OpenSSH's defaults (port 22, local user, default
/// identity and known_hosts files, ...) are filled in so callers see the
/// same shape as from `ssh -G`. The system-wide `/etc/ssh/ssh_config` is
/// not read by the fallback.
pub fn resolve(host: &str, file: Option<&Path>) -> Result<HostConfig, String> {
    resolve_with("ssh", host, file)
}

/// [`resolve`] with an explicit `ssh` program, so tests can force the fallback.
fn resolve_with(program: &str, host: &str, file: Option<&Path>) -> Result<HostConfig, String> {
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
            let path = match file {
                Some(f) => f.to_path_buf(),
                None => home_dir().join(".ssh/config"),
            };
            tracing::warn!(
                "`{program}` not found; reading {} with the built-in ssh_config reader",
                path.display()
            );
            let (user_from_dest, host_from_dest, port_from_dest) = split_destination(host);
            let (mut cfg, ignored) = if file.is_none() && !path.exists() {
                // No user config at all is normal; only an explicit -F must exist.
                (HostConfig::default(), Vec::new())
            } else {
                read_config(host_from_dest, &path)?
            };
            if !ignored.is_empty() {
                tracing::warn!(
                    "built-in ssh_config reader ignored these keys for {host}: {}",
                    ignored.join(", ")
                );
            }
            // Destination parts override config, as on the ssh command line.
            if user_from_dest.is_some() {
                cfg.user = user_from_dest.map(str::to_string);
            }
            if port_from_dest.is_some() {
                cfg.port = port_from_dest;
            }
            fill_defaults(&mut cfg, host_from_dest);
            Ok(cfg)
        }
        Err(SshGError::Failed(msg)) => Err(msg),
    }
}

/// Why `ssh -G` produced no output.
enum SshGError {
    /// The program does not exist: use the fallback reader.
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
        .map(|f| PathBuf::from(expand_tilde(&ctx.expand(f))))
        .collect();
    cfg
}

/// Built-in fallback reader: `Host` blocks with wildcards (* ?) and negation (!pattern),
/// first-value-wins like OpenSSH, `Include` (relative paths under ~/.ssh, globs optional),
/// keys: HostName, User, Port, IdentityFile, IdentitiesOnly, IdentityAgent, UserKnownHostsFile,
/// GlobalKnownHostsFile, StrictHostKeyChecking, ServerAliveInterval, ServerAliveCountMax,
/// ConnectTimeout, ProxyJump, LocalForward, RemoteForward. `Match` blocks are skipped (say so).
/// Returns the config and the list of keys it saw but ignored.
///
/// Only what the file sets is returned (no defaults). Ignored keys are
/// reported lowercase, once each, and only from blocks that apply to
/// `host`; a skipped `Match` block is reported as `"match"`.
pub fn read_config(host: &str, file: &Path) -> Result<(HostConfig, Vec<String>), String> {
    let mut reader = Reader {
        host,
        raw: Raw::default(),
        ignored: Vec::new(),
    };
    reader.read_file(file, 0)?;
    let raw = reader.raw;
    let mut cfg = HostConfig {
        hostname: raw.hostname.map(|h| expand_hostname(&h, host)),
        user: raw.user,
        port: raw.port,
        identity_files: Vec::new(),
        identities_only: raw.identities_only.unwrap_or(false),
        identity_agent: None,
        user_known_hosts_files: Vec::new(),
        global_known_hosts_files: Vec::new(),
        strict_host_key_checking: raw.strict,
        server_alive_interval: raw.server_alive_interval,
        server_alive_count_max: raw.server_alive_count_max,
        connect_timeout: raw.connect_timeout.flatten(),
        proxy_jump: raw.proxy_jump.unwrap_or_default(),
        local_forwards: raw.local_forwards,
        remote_forwards: raw.remote_forwards,
    };
    // Tokens refer to the final host/user/port, so expand after reading everything.
    let ctx = TokenContext::new(host, &cfg);
    let expand = |s: &String| PathBuf::from(expand_tilde(&ctx.expand(s)));
    cfg.identity_files = raw.identity_files.iter().map(expand).collect();
    cfg.user_known_hosts_files = raw
        .user_known_hosts
        .unwrap_or_default()
        .iter()
        .map(expand)
        .collect();
    cfg.global_known_hosts_files = raw
        .global_known_hosts
        .unwrap_or_default()
        .iter()
        .map(expand)
        .collect();
    cfg.identity_agent = raw.identity_agent.map(|a| agent_value(&ctx.expand(&a)));
    Ok((cfg, reader.ignored))
}

/// Values collected by the fallback reader; `Option` tracks "already set"
/// so the first value wins, as in OpenSSH.
#[derive(Default)]
struct Raw {
    /// HostName, tokens not yet expanded.
    hostname: Option<String>,
    /// User.
    user: Option<String>,
    /// Port.
    port: Option<u16>,
    /// IdentityFile values, unexpanded, all of them.
    identity_files: Vec<String>,
    /// IdentitiesOnly.
    identities_only: Option<bool>,
    /// IdentityAgent, unexpanded.
    identity_agent: Option<String>,
    /// UserKnownHostsFile arguments, unexpanded.
    user_known_hosts: Option<Vec<String>>,
    /// GlobalKnownHostsFile arguments, unexpanded.
    global_known_hosts: Option<Vec<String>>,
    /// StrictHostKeyChecking.
    strict: Option<StrictHostKeyChecking>,
    /// ServerAliveInterval in seconds.
    server_alive_interval: Option<u64>,
    /// ServerAliveCountMax.
    server_alive_count_max: Option<u64>,
    /// ConnectTimeout; inner `None` for an explicit "none".
    connect_timeout: Option<Option<u64>>,
    /// ProxyJump hops; `Some(empty)` for "none" or a preceding ProxyCommand.
    proxy_jump: Option<Vec<String>>,
    /// LocalForward entries in -L syntax.
    local_forwards: Vec<String>,
    /// RemoteForward entries in -R syntax.
    remote_forwards: Vec<String>,
}

/// State of one [`read_config`] run.
struct Reader<'a> {
    /// The destination as given, which `Host` patterns are matched against.
    host: &'a str,
    /// What has been collected so far.
    raw: Raw,
    /// Keys seen in applicable blocks that the reader does not understand.
    ignored: Vec<String>,
}

impl Reader<'_> {
    /// Reads one file; `Host` state is local to the file, like OpenSSH.
    fn read_file(&mut self, path: &Path, depth: usize) -> Result<(), String> {
        if depth > MAX_INCLUDE_DEPTH {
            return Err(format!("{}: Include nested too deeply", path.display()));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        // Lines before the first Host/Match apply to every host.
        let mut active = true;
        for (idx, line) in text.lines().enumerate() {
            let at = || format!("{} line {}", path.display(), idx + 1);
            let Some((key, args)) = split_line(line).map_err(|e| format!("{}: {e}", at()))? else {
                continue;
            };
            match key.as_str() {
                "host" => active = host_matches(self.host, &args),
                "match" => {
                    active = false;
                    self.note_ignored("match");
                }
                _ if !active => {}
                "include" => {
                    for pattern in &args {
                        let p = expand_tilde(pattern);
                        let p = Path::new(&p);
                        let full = if p.is_absolute() {
                            p.to_path_buf()
                        } else {
                            home_dir().join(".ssh").join(p)
                        };
                        // Missing include files are silently skipped, like OpenSSH's glob().
                        for inc in glob(&full) {
                            self.read_file(&inc, depth + 1)?;
                        }
                    }
                }
                _ => self
                    .apply(&key, &args)
                    .map_err(|e| format!("{}: {e}", at()))?,
            }
        }
        Ok(())
    }

    /// Applies one active `key args...` line.
    fn apply(&mut self, key: &str, args: &[String]) -> Result<(), String> {
        let first = || {
            args.first()
                .cloned()
                .ok_or_else(|| format!("{key}: missing argument"))
        };
        let r = &mut self.raw;
        match key {
            "hostname" => set_once(&mut r.hostname, first()?),
            "user" => set_once(&mut r.user, first()?),
            "port" => {
                let v = first()?;
                let port = v.parse().map_err(|_| format!("bad port {v:?}"))?;
                set_once(&mut r.port, port)
            }
            "identityfile" => r.identity_files.push(first()?),
            "identitiesonly" => {
                let v = first()?;
                let b = parse_bool(&v).ok_or_else(|| format!("bad IdentitiesOnly {v:?}"))?;
                set_once(&mut r.identities_only, b)
            }
            "identityagent" => set_once(&mut r.identity_agent, first()?),
            "userknownhostsfile" => {
                first()?;
                set_once(&mut r.user_known_hosts, args.to_vec())
            }
            "globalknownhostsfile" => {
                first()?;
                set_once(&mut r.global_known_hosts, args.to_vec())
            }
            "stricthostkeychecking" => {
                let v = first()?;
                let s = StrictHostKeyChecking::parse(&v)
                    .ok_or_else(|| format!("bad StrictHostKeyChecking {v:?}"))?;
                set_once(&mut r.strict, s)
            }
            "serveraliveinterval" => set_once(&mut r.server_alive_interval, parse_time(&first()?)?),
            "serveralivecountmax" => {
                let v = first()?;
                let n = v
                    .parse()
                    .map_err(|_| format!("bad ServerAliveCountMax {v:?}"))?;
                set_once(&mut r.server_alive_count_max, n)
            }
            "connecttimeout" => {
                let v = first()?;
                let t = if v.eq_ignore_ascii_case("none") {
                    None
                } else {
                    Some(parse_time(&v)?)
                };
                set_once(&mut r.connect_timeout, t)
            }
            "proxyjump" => set_once(&mut r.proxy_jump, parse_proxy_jump(&first()?)),
            "proxycommand" => {
                // OpenSSH: whichever of ProxyCommand/ProxyJump comes first wins.
                set_once(&mut r.proxy_jump, Vec::new());
                self.note_ignored("proxycommand");
            }
            "localforward" => {
                let (Some(listen), Some(connect)) = (args.first(), args.get(1)) else {
                    return Err("LocalForward needs listen and target arguments".into());
                };
                r.local_forwards.push(forward_spec(listen, Some(connect)));
            }
            "remoteforward" => {
                let listen = first()?;
                r.remote_forwards
                    .push(forward_spec(&listen, args.get(1).map(String::as_str)));
            }
            other => self.note_ignored(other),
        }
        Ok(())
    }

    /// Remembers an ignored key once.
    fn note_ignored(&mut self, key: &str) {
        if !self.ignored.iter().any(|k| k == key) {
            self.ignored.push(key.to_string());
        }
    }
}

/// Sets `slot` unless an earlier line already did (OpenSSH: first value wins).
fn set_once<T>(slot: &mut Option<T>, value: T) {
    if slot.is_none() {
        *slot = Some(value);
    }
}

/// Splits a config line into a lowercase keyword and its arguments.
/// Accepts `Key value`, `Key=value` and `Key = value`, with quoting like OpenSSH.
fn split_line(line: &str) -> Result<Option<(String, Vec<String>)>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let key = line[..end].to_ascii_lowercase();
    let mut rest = line[end..].trim_start();
    // At most one '=' may separate the keyword from its value.
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    Ok(Some((key, split_args(rest)?)))
}

/// Splits arguments on whitespace, honouring "double", 'single' quotes and
/// backslash escapes; a `#` starting an argument ends the line.
fn split_args(s: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None => break,
            Some('#') => break,
            _ => {}
        }
        let mut arg = String::new();
        let mut quote = None;
        while let Some(c) = chars.next() {
            match (quote, c) {
                (None, c) if c.is_whitespace() => break,
                (None, '"' | '\'') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (_, '\\') if matches!(chars.peek(), Some('"' | '\'' | '\\' | ' ')) => {
                    arg.push(chars.next().unwrap_or('\\'))
                }
                (_, c) => arg.push(c),
            }
        }
        if quote.is_some() {
            return Err("unterminated quote".into());
        }
        args.push(arg);
    }
    Ok(args)
}

/// True if `host` matches a `Host` line: any negated match vetoes, else any
/// positive match wins. Case-sensitive, as OpenSSH matches the destination as typed.
fn host_matches(host: &str, patterns: &[String]) -> bool {
    let mut matched = false;
    for p in patterns {
        if let Some(neg) = p.strip_prefix('!') {
            if wildcard_match(neg, host) {
                return false;
            }
        } else if wildcard_match(p, host) {
            matched = true;
        }
    }
    matched
}

/// Glob-style match with `*` (any run) and `?` (one character).
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Position of the last '*' and the text index it is currently covering up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Expands `*`/`?` in any path component; returns existing paths, sorted per component.
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let mut candidates = vec![PathBuf::new()];
    for comp in pattern.components() {
        let part = comp.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for base in &candidates {
            if part.contains(['*', '?']) {
                let dir = if base.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    base
                };
                let Ok(entries) = std::fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    // Like glob(3), wildcards do not match a leading dot.
                    .filter(|n| !n.starts_with('.') || part.starts_with('.'))
                    .filter(|n| wildcard_match(&part, n))
                    .collect();
                names.sort();
                next.extend(names.into_iter().map(|n| base.join(n)));
            } else {
                next.push(base.join(comp.as_os_str()));
            }
        }
        candidates = next;
    }
    candidates.into_iter().filter(|p| p.is_file()).collect()
}

/// Parses OpenSSH time values: plain seconds or `1h30m`-style with s/m/h/d/w.
fn parse_time(v: &str) -> Result<u64, String> {
    let bad = || format!("bad time value {v:?}");
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in v.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let mult = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 604800,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = total
            .checked_add(n.checked_mul(mult).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() {
        total = total
            .checked_add(num.parse().map_err(|_| bad())?)
            .ok_or_else(bad)?;
    } else if v.is_empty() {
        return Err(bad());
    }
    Ok(total)
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

/// Splits a destination into (user, host, port): `ssh://[user@]host[:port]` or `[user@]host`.
fn split_destination(dest: &str) -> (Option<&str>, &str, Option<u16>) {
    let (uri, rest) = match dest.strip_prefix("ssh://") {
        Some(r) => (true, r.trim_end_matches('/')),
        None => (false, dest),
    };
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    if !uri {
        // Plain destinations have no port syntax; ssh treats "h:22" as a host name.
        return (user, hostport, None);
    }
    if let Some(inner) = hostport.strip_prefix('[')
        && let Some((h, after)) = inner.split_once(']')
    {
        return (
            user,
            h,
            after.strip_prefix(':').and_then(|p| p.parse().ok()),
        );
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (user, h, p.parse().ok()),
        _ => (user, hostport, None),
    }
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
        .map(|p| PathBuf::from(expand_tilde(p)))
        .collect()
}

/// Keeps the IdentityAgent keywords verbatim and expands `~` in paths.
fn agent_value(v: &str) -> String {
    if v.eq_ignore_ascii_case("none") || v == "SSH_AUTH_SOCK" {
        v.to_string()
    } else {
        expand_tilde(v)
    }
}

/// HostName accepts only `%h` and `%%`.
fn expand_hostname(v: &str, host: &str) -> String {
    let mut out = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('%', Some('h')) => {
                out.push_str(host);
                chars.next();
            }
            ('%', Some('%')) => {
                out.push('%');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

/// Values for OpenSSH `%` tokens in path options.
struct TokenContext {
    /// `%d`: local home directory.
    home: String,
    /// `%h`: remote host name.
    host: String,
    /// `%n`: destination as given.
    original_host: String,
    /// `%p`: remote port.
    port: String,
    /// `%r`: remote user.
    remote_user: String,
    /// `%u`: local user.
    local_user: String,
}

impl TokenContext {
    /// Builds the token values from a resolved config.
    fn new(original_host: &str, cfg: &HostConfig) -> Self {
        let local_user = local_user();
        Self {
            home: home_dir().to_string_lossy().into_owned(),
            host: cfg
                .hostname
                .clone()
                .unwrap_or_else(|| original_host.to_lowercase()),
            original_host: original_host.to_string(),
            port: cfg.port.unwrap_or(22).to_string(),
            remote_user: cfg.user.clone().unwrap_or_else(|| local_user.clone()),
            local_user,
        }
    }

    /// Expands %d %h %i %L %l %n %p %r %u %%; unknown tokens are kept as-is.
    fn expand(&self, v: &str) -> String {
        let mut out = String::new();
        let mut chars = v.chars();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
                continue;
            }
            let Some(t) = chars.next() else {
                out.push('%');
                break;
            };
            match t {
                '%' => out.push('%'),
                'd' => out.push_str(&self.home),
                'h' => out.push_str(&self.host),
                'n' => out.push_str(&self.original_host),
                'p' => out.push_str(&self.port),
                'r' => out.push_str(&self.remote_user),
                'u' => out.push_str(&self.local_user),
                // SAFETY: getuid has no preconditions and cannot fail.
                'i' => out.push_str(&unsafe { libc::getuid() }.to_string()),
                'l' => out.push_str(&local_hostname()),
                'L' => out.push_str(local_hostname().split('.').next().unwrap_or("")),
                other => {
                    out.push('%');
                    out.push(other);
                }
            }
        }
        out
    }
}

/// Expands a leading `~` or `~/` to the home directory (`~user` is left alone).
fn expand_tilde(p: &str) -> String {
    if p == "~" {
        home_dir().to_string_lossy().into_owned()
    } else if let Some(rest) = p.strip_prefix("~/") {
        home_dir().join(rest).to_string_lossy().into_owned()
    } else {
        p.to_string()
    }
}

/// The passwd entry's (name, home) for our uid, which is what OpenSSH uses.
fn passwd_entry() -> Option<(String, PathBuf)> {
    use std::ffi::CStr;
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid (if meaningless) value to be overwritten.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the stated sizes; getpwuid_r is reentrant.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::getuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success, pw_name and pw_dir point to NUL-terminated strings in `buf`.
    let (name, dir) = unsafe { (CStr::from_ptr(pw.pw_name), CStr::from_ptr(pw.pw_dir)) };
    Some((
        name.to_string_lossy().into_owned(),
        PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())),
    ))
}

/// Home directory as OpenSSH sees it (passwd first, then `$HOME`).
fn home_dir() -> PathBuf {
    passwd_entry()
        .map(|(_, d)| d)
        .filter(|d| !d.as_os_str().is_empty())
        .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Local login name (passwd first, then `$USER`).
fn local_user() -> String {
    passwd_entry()
        .map(|(n, _)| n)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default()
}

/// The machine's host name, for `%l`.
fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success
    // when the name fits, and we stop at the first NUL or the buffer end.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Fills in OpenSSH's defaults for whatever the fallback reader left unset.
fn fill_defaults(cfg: &mut HostConfig, host: &str) {
    let home = home_dir();
    cfg.hostname.get_or_insert_with(|| host.to_lowercase());
    cfg.user.get_or_insert_with(local_user);
    cfg.port.get_or_insert(22);
    if cfg.identity_files.is_empty() {
        cfg.identity_files = DEFAULT_IDENTITY_FILES
            .iter()
            .map(|f| PathBuf::from(expand_tilde(f)))
            .collect();
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

    /// Writes the shared test config (main file + included file) into `dir`.
    fn write_config(dir: &Path) -> PathBuf {
        let inc = dir.join("extra.conf");
        std::fs::write(
            &inc,
            "Host alias\n  ServerAliveInterval 45\n  GlobalKnownHostsFile /etc/gkh\n",
        )
        .unwrap();
        let main = dir.join("config");
        std::fs::write(
            &main,
            format!(
                "# test config\nInclude {}\n\
                 Host alias\n\
                 \x20 HostName real.example.com\n\
                 \x20 User alice\n\
                 \x20 Port 2022\n\
                 \x20 IdentityFile ~/.ssh/id_test_a\n\
                 \x20 IdentityFile /tmp/id_%r_b\n\
                 \x20 UserKnownHostsFile /tmp/kh1 ~/kh2\n\
                 \x20 StrictHostKeyChecking accept-new\n\
                 \x20 ProxyJump a@j1:2201,j2\n\
                 \x20 LocalForward 8080 localhost:80\n\
                 \x20 RemoteForward 9000 [::1]:9000\n\
                 \x20 Compression yes\n\
                 \x20 User ignored-second-value\n\
                 Host *.lab !bad.lab\n\
                 \x20 User labuser\n\
                 \x20 ConnectTimeout 1m\n\
                 Host *\n\
                 \x20 ServerAliveCountMax 7\n",
                inc.display()
            ),
        )
        .unwrap();
        main
    }

    /// Checks the values both resolvers must agree on for `alias`.
    fn check_alias(c: &HostConfig) {
        let home = home_dir();
        assert_eq!(c.hostname.as_deref(), Some("real.example.com"));
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert_eq!(c.port, Some(2022));
        assert_eq!(
            c.identity_files,
            vec![
                home.join(".ssh/id_test_a"),
                PathBuf::from("/tmp/id_alice_b")
            ]
        );
        assert_eq!(
            c.user_known_hosts_files,
            vec![PathBuf::from("/tmp/kh1"), home.join("kh2")]
        );
        assert_eq!(c.global_known_hosts_files, vec![PathBuf::from("/etc/gkh")]);
        assert_eq!(
            c.strict_host_key_checking,
            Some(StrictHostKeyChecking::AcceptNew)
        );
        assert_eq!(
            c.proxy_jump,
            vec!["a@j1:2201".to_string(), "j2".to_string()]
        );
        assert_eq!(c.local_forwards, vec!["8080:localhost:80".to_string()]);
        assert_eq!(c.remote_forwards, vec!["9000:[::1]:9000".to_string()]);
        assert_eq!(c.server_alive_interval, Some(45));
        assert_eq!(c.server_alive_count_max, Some(7));
        assert_eq!(c.connect_timeout, None);
    }

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
    fn ssh_g_and_builtin_reader_agree() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path());

        let (builtin, ignored) = read_config("alias", &cfg).unwrap();
        check_alias(&builtin);
        assert_eq!(ignored, vec!["compression".to_string()]);

        let (lab, _) = read_config("x.lab", &cfg).unwrap();
        assert_eq!(lab.user.as_deref(), Some("labuser"));
        assert_eq!(lab.connect_timeout, Some(60));
        let (bad, _) = read_config("bad.lab", &cfg).unwrap();
        assert_eq!(bad.user, None, "negated pattern must veto the block");

        if !have_ssh() {
            eprintln!("ssh not installed; skipping the ssh -G half");
            return;
        }
        let real = resolve("alias", Some(&cfg)).unwrap();
        check_alias(&real);
        let lab = resolve("x.lab", Some(&cfg)).unwrap();
        assert_eq!(lab.user.as_deref(), Some("labuser"));
        assert_eq!(lab.hostname.as_deref(), Some("x.lab"));
        assert_eq!(lab.connect_timeout, Some(60));
        assert_eq!(
            lab.strict_host_key_checking,
            Some(StrictHostKeyChecking::Ask)
        );
        assert!(lab.proxy_jump.is_empty());
    }

    #[test]
    fn ssh_g_reports_config_errors() {
        if !have_ssh() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::write(&cfg, "Host x\n  NoSuchOption 1\n").unwrap();
        let err = resolve("x", Some(&cfg)).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains("Pseudo-terminal"), "{err}");
    }

    #[test]
    fn fallback_when_ssh_missing_fills_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path());
        let c = resolve_with("/nonexistent/ssh-binary", "alias", Some(&cfg)).unwrap();
        check_alias(&c);
        let c = resolve_with(
            "/nonexistent/ssh-binary",
            "ssh://bob@other:2200",
            Some(&cfg),
        )
        .unwrap();
        assert_eq!(c.user.as_deref(), Some("bob"));
        assert_eq!(c.hostname.as_deref(), Some("other"));
        assert_eq!(c.port, Some(2200));
        assert_eq!(c.server_alive_count_max, Some(7));
        assert_eq!(c.strict_host_key_checking, Some(StrictHostKeyChecking::Ask));
        assert_eq!(c.identity_files.len(), DEFAULT_IDENTITY_FILES.len());
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
        let home = home_dir();
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

    #[test]
    fn reader_details() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(dir.path().join("conf.d/b.conf"), "Port 2\n").unwrap();
        std::fs::write(
            dir.path().join("conf.d/a.conf"),
            "Port 1\nHost other\n  User o\n",
        )
        .unwrap();
        std::fs::write(
            &cfg,
            format!(
                "Include {}/conf.d/*.conf\n\
                 Host=h\n  HostName=%h.example.com\n  IdentityAgent \"~/my agent\"\n\
                 \x20 ProxyCommand nc %h %p\n  ProxyJump j\n  ServerAliveInterval 1m30s\n\
                 Match host h\n  User matched\n\
                 Host h\n  User after-match # trailing comment\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let (c, ignored) = read_config("h", &cfg).unwrap();
        assert_eq!(c.port, Some(1), "glob includes are read in sorted order");
        assert_eq!(c.hostname.as_deref(), Some("h.example.com"));
        assert_eq!(
            c.identity_agent,
            Some(home_dir().join("my agent").to_string_lossy().into_owned())
        );
        assert!(c.proxy_jump.is_empty(), "ProxyCommand came first");
        assert_eq!(c.server_alive_interval, Some(90));
        assert_eq!(c.user.as_deref(), Some("after-match"));
        assert_eq!(ignored, vec!["proxycommand", "match"]);

        std::fs::write(&cfg, "Host h\n  Port banana\n").unwrap();
        let err = read_config("h", &cfg).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.lab", "x.lab"));
        assert!(wildcard_match("h?st*", "host-1"));
        assert!(!wildcard_match("*.lab", "x.lab.com"));
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("a*b*c", "aXbYbZc"));
    }
}

//! Named profiles: the options of `sshshim up`, kept in a TOML file as
//! `[profile.NAME]` tables, plus defaults taken from `SSHSHIM_*` variables.
//!
//! Everything is validated when the file is loaded, so a typo is reported
//! with the file, line and key before any connection is attempted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use crate::paths::{expand_tilde, home_dir};
use crate::spec::{Destination, ForwardSpec, Kind};

/// The keys a profile may set: the long options of `sshshim up`, with `-`
/// written `_`.
pub const KEYS: &[&str] = &[
    "destination",
    "port",
    "user",
    "identity",
    "known_hosts",
    "accept_new",
    "listen",
    "allow_non_loopback",
    "authorized_keys",
    "host_key",
    "local_forwards",
    "remote_forwards",
    "keepalive",
    "keepalive_max",
    "max_backoff",
    "connect_timeout",
    "on_event",
    "metrics",
    "stall_limit",
    "mux",
    "resume",
    "resume_timeout",
    "remote_helper",
    "mcp_exec",
    "mcp_created",
    "copy_dir",
];

/// The settings of one profile. `None` / empty means "not set here", so
/// layers (flags, profile, environment) can be stacked with [`Profile::or`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// `[user@]host[:port]` to connect to (required in a config file).
    pub destination: Option<String>,
    /// Upstream port.
    pub port: Option<u16>,
    /// Upstream login name.
    pub user: Option<String>,
    /// Identity files, `~` expanded.
    pub identity: Vec<PathBuf>,
    /// known_hosts file, `~` expanded.
    pub known_hosts: Option<PathBuf>,
    /// Record unknown host keys instead of refusing.
    pub accept_new: Option<bool>,
    /// Local endpoint address; a profile may serve no endpoint.
    pub listen: Option<SocketAddr>,
    /// Allow `listen` on a non-loopback address.
    pub allow_non_loopback: Option<bool>,
    /// Keys allowed to use the endpoint, `~` expanded.
    pub authorized_keys: Option<PathBuf>,
    /// The endpoint's host key, `~` expanded.
    pub host_key: Option<PathBuf>,
    /// `-L` forwards owned by sshshim.
    pub local_forwards: Vec<ForwardSpec>,
    /// `-R` forwards owned by sshshim.
    pub remote_forwards: Vec<ForwardSpec>,
    /// Keepalive interval in seconds (>= 1).
    pub keepalive: Option<u64>,
    /// Unanswered keepalives before upstream is declared dead (>= 1).
    pub keepalive_max: Option<u64>,
    /// Longest wait between reconnect attempts (> 0).
    pub max_backoff: Option<Duration>,
    /// Connect timeout in seconds (>= 1).
    pub connect_timeout: Option<u64>,
    /// Command run on connection events.
    pub on_event: Option<String>,
    /// Address of the metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// Seconds a stalled local reader may take nothing at its buffer's
    /// cap before its channel is closed (>= 1).
    pub stall_limit: Option<u64>,
    /// OpenSSH multiplexing socket path, `~` expanded; `none` serves none.
    pub mux: Option<PathBuf>,
    /// Sessions survive the network, under a helper on the server.
    pub resume: Option<bool>,
    /// Seconds the helper holds a session with no sshshim attached (>= 1).
    pub resume_timeout: Option<u64>,
    /// The helper's path on the server, when the user installed one.
    pub remote_helper: Option<String>,
    /// Lets `sshshim mcp` run commands and copy files through this profile's
    /// endpoint (its `exec` and `copy` tools); off unless set.
    pub mcp_exec: Option<bool>,
    /// Marks a profile `sshshim mcp` created (its `tunnel_setup` writes it):
    /// the only profiles MCP may change or remove. `sshshim up` ignores it.
    pub mcp_created: Option<bool>,
    /// The directory beneath which `sshshim mcp`'s `copy` reads and writes
    /// local files for this profile, `~` expanded (default: the MCP server's
    /// working directory). Set by a person only; MCP may not set it.
    pub copy_dir: Option<PathBuf>,
}

impl Profile {
    /// Fills every field that is unset in `self` from `lower` (precedence:
    /// self wins). Lists: self's if non-empty, else lower's.
    pub fn or(self, lower: Profile) -> Profile {
        let list = |a: Vec<_>, b| if a.is_empty() { b } else { a };
        Profile {
            destination: self.destination.or(lower.destination),
            port: self.port.or(lower.port),
            user: self.user.or(lower.user),
            identity: list(self.identity, lower.identity),
            known_hosts: self.known_hosts.or(lower.known_hosts),
            accept_new: self.accept_new.or(lower.accept_new),
            listen: self.listen.or(lower.listen),
            allow_non_loopback: self.allow_non_loopback.or(lower.allow_non_loopback),
            authorized_keys: self.authorized_keys.or(lower.authorized_keys),
            host_key: self.host_key.or(lower.host_key),
            local_forwards: if self.local_forwards.is_empty() {
                lower.local_forwards
            } else {
                self.local_forwards
            },
            remote_forwards: if self.remote_forwards.is_empty() {
                lower.remote_forwards
            } else {
                self.remote_forwards
            },
            keepalive: self.keepalive.or(lower.keepalive),
            keepalive_max: self.keepalive_max.or(lower.keepalive_max),
            max_backoff: self.max_backoff.or(lower.max_backoff),
            connect_timeout: self.connect_timeout.or(lower.connect_timeout),
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
}

impl Profile {
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

/// How a profiles file is named in a running profile's status: absolute,
/// symlinks resolved, so two spellings of one file compare equal.
pub fn file_identity(path: &Path) -> String {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// A loaded config file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigFile {
    /// Where it was read from (or would have been, if it does not exist).
    pub path: PathBuf,
    /// Profiles by name.
    pub profiles: BTreeMap<String, Profile>,
}

impl ConfigFile {
    /// The profile `name`, or an error that lists the profiles there are.
    pub fn get(&self, name: &str) -> Result<&Profile, String> {
        self.profiles.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            let known = if known.is_empty() {
                "it has none".to_owned()
            } else {
                format!("known: {}", known.join(", "))
            };
            format!(
                "no profile '{name}' in {} ({known})",
                display_path(&self.path)
            )
        })
    }
}

/// Prefix of the profile names `sshshim mcp` creates, reserved for it:
/// sockets and aliases are named by profile name alone, so an MCP profile
/// named like a person's could take the person's ControlPath while theirs
/// is down.
pub const MCP_PREFIX: &str = "mcp-";

/// The warning for a person's profile (one without `mcp_created = true`),
/// or an ad-hoc name, that uses the prefix reserved for MCP; `None` if it
/// does not.
pub fn reserved_name_warning(name: &str, mcp_created: bool) -> Option<String> {
    (name.starts_with(MCP_PREFIX) && !mcp_created).then(|| {
        format!(
            "'{name}': names beginning with '{MCP_PREFIX}' are reserved for profiles `sshshim \
             mcp` creates; one of them named '{name}' would take this one's socket and alias \
             while it is down. Rename it"
        )
    })
}

/// Default config path: `$XDG_CONFIG_HOME/sshshim/config.toml`, else
/// `~/.config/sshshim/config.toml`.
pub fn default_path() -> PathBuf {
    crate::paths::config_dir()
        // No HOME at all: a relative path is the least surprising fallback.
        .unwrap_or_else(|_| PathBuf::from(".config/sshshim"))
        .join("config.toml")
}

/// Loads and validates a file. A missing file at the default path is an
/// empty config; a missing file given explicitly is an error. Every error
/// names the file, the line and (where there is one) the profile and key.
pub fn load(path: &Path, explicit: bool) -> Result<ConfigFile, String> {
    let shown = display_path(path);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(ConfigFile {
                path: path.to_path_buf(),
                profiles: BTreeMap::new(),
            });
        }
        Err(e) => return Err(format!("{shown}: cannot read config file: {e}")),
    };
    Ok(ConfigFile {
        path: path.to_path_buf(),
        profiles: parse(&shown, &text)?,
    })
}

/// Defaults from the environment: `SSHSHIM_<KEY>` for each of [`KEYS`].
/// Booleans accept 1/0, true/false, yes/no, on/off; lists are
/// comma-separated. Empty variables count as unset. Errors name the variable.
pub fn from_env() -> Result<Profile, String> {
    from_vars(|name| std::env::var_os(name))
}

/// [`from_env`] over any variable lookup, so tests need not touch the
/// process environment.
fn from_vars(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Profile, String> {
    let mut p = Profile::default();
    for key in KEYS {
        let var = format!("SSHSHIM_{}", key.to_ascii_uppercase());
        let Some(raw) = get(&var) else { continue };
        let raw = raw
            .into_string()
            .map_err(|_| format!("environment variable {var}: not valid UTF-8"))?;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        set(&mut p, key, env_val(key, raw))
            .map_err(|b| format!("environment variable {var}='{raw}': {}", keyed(key, &b.msg)))?;
    }
    Ok(p)
}

/// A value from either source, before it is checked against its key.
#[derive(Debug)]
enum Val {
    /// A string.
    Str(String),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A list; non-string items are kept as their type name.
    List(Vec<Result<String, &'static str>>),
    /// Any other TOML type, by name.
    Other(&'static str),
}

impl Val {
    /// How the value reads in an error message.
    fn found(&self) -> String {
        match self {
            Val::Str(s) => format!("'{s}'"),
            Val::Int(i) => i.to_string(),
            Val::Float(f) => f.to_string(),
            Val::Bool(b) => b.to_string(),
            Val::List(_) => "a list".into(),
            Val::Other(t) => format!("a {t}"),
        }
    }
}

/// A rejected value: the message, and which list item it was about (so the
/// error can point at that item's line).
struct Bad {
    /// Index into a list value, if one item was at fault.
    item: Option<usize>,
    /// Continues "key 'K' ...".
    msg: String,
}

impl Bad {
    /// An error about the whole value.
    fn whole(msg: String) -> Self {
        Bad { item: None, msg }
    }
}

/// Parses an environment value as the type its key wants, leaving it a
/// string when it does not fit so that [`set`] reports the type error.
fn env_val(key: &str, s: &str) -> Val {
    let string = || Val::Str(s.to_owned());
    match key {
        "identity" | "local_forwards" | "remote_forwards" => Val::List(
            s.split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| Ok(i.to_owned()))
                .collect(),
        ),
        "accept_new" | "allow_non_loopback" | "mcp_exec" | "mcp_created" => {
            match s.to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => Val::Bool(true),
                "0" | "false" | "no" | "off" => Val::Bool(false),
                _ => string(),
            }
        }
        "port" | "keepalive" | "keepalive_max" | "connect_timeout" => {
            s.parse().map(Val::Int).unwrap_or_else(|_| string())
        }
        "max_backoff" => s
            .parse()
            .map(Val::Int)
            .or_else(|_| s.parse().map(Val::Float))
            .unwrap_or_else(|_| string()),
        _ => string(),
    }
}

/// Converts a parsed TOML value.
fn toml_val(v: &DeValue<'_>) -> Val {
    match v {
        DeValue::String(s) => Val::Str(s.to_string()),
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
            .map(Val::Int)
            // Out of i64 range: no key accepts it anyway.
            .unwrap_or(Val::Other("huge integer")),
        DeValue::Float(f) => f
            .as_str()
            .parse()
            .map(Val::Float)
            .unwrap_or(Val::Other("float")),
        DeValue::Boolean(b) => Val::Bool(*b),
        DeValue::Array(a) => Val::List(
            a.iter()
                .map(|i| match i.get_ref() {
                    DeValue::String(s) => Ok(s.to_string()),
                    other => Err(other.type_str()),
                })
                .collect(),
        ),
        other => Val::Other(other.type_str()),
    }
}

/// Checks `v` against `key` and stores it in `p`.
fn set(p: &mut Profile, key: &str, v: Val) -> Result<(), Bad> {
    let str_of = |v: Val, what: &str| match v {
        Val::Str(s) if !s.is_empty() => Ok(s),
        other => Err(Bad::whole(format!("must be {what}, not {}", other.found()))),
    };
    let int_of = |v: Val, min: i64, max: i64, what: &str| match v {
        Val::Int(i) if (min..=max).contains(&i) => Ok(i),
        other => Err(Bad::whole(format!("must be {what}, not {}", other.found()))),
    };
    let bool_of = |v: Val| match v {
        Val::Bool(b) => Ok(b),
        other => Err(Bad::whole(format!(
            "must be true or false, not {}",
            other.found()
        ))),
    };
    let addr_of = |v: Val| {
        let s = str_of(v, "a string ADDR:PORT")?;
        s.parse::<SocketAddr>().map_err(|_| {
            Bad::whole(format!(
                "must be ADDR:PORT such as 127.0.0.1:2222 or [::1]:2222, not '{s}'"
            ))
        })
    };
    let path_of = |v: Val| Ok(expand_tilde(Path::new(&str_of(v, "a file path")?)));
    // A lone string is accepted where a list is expected: `identity = "~/k"`
    // is what people write for one file.
    let list_of = |v: Val| match v {
        Val::List(items) => items
            .into_iter()
            .enumerate()
            .map(|(n, i)| {
                i.map_err(|t| Bad {
                    item: Some(n),
                    msg: format!("must be a list of strings, but item {} is a {t}", n + 1),
                })
            })
            .collect::<Result<Vec<String>, Bad>>(),
        Val::Str(s) => Ok(vec![s]),
        other => Err(Bad::whole(format!(
            "must be a list of strings, not {}",
            other.found()
        ))),
    };
    let forwards_of = |v: Val, kind: Kind| -> Result<Vec<ForwardSpec>, Bad> {
        list_of(v)?
            .iter()
            .enumerate()
            .map(|(n, s)| {
                ForwardSpec::parse(kind, s).map_err(|msg| Bad {
                    item: Some(n),
                    msg: format!(": {msg}"),
                })
            })
            .collect()
    };
    let secs = "an integer number of seconds >= 1";
    match key {
        "destination" => {
            let s = str_of(v, "a string [user@]host[:port]")?;
            s.parse::<Destination>()
                .map_err(|e| Bad::whole(format!(": {e}")))?;
            p.destination = Some(s);
        }
        "port" => p.port = Some(int_of(v, 1, 65535, "an integer 1-65535")? as u16),
        "user" => p.user = Some(str_of(v, "a non-empty string")?),
        "identity" => {
            p.identity = list_of(v)?
                .iter()
                .map(|s| expand_tilde(Path::new(s)))
                .collect()
        }
        "known_hosts" => p.known_hosts = Some(path_of(v)?),
        "accept_new" => p.accept_new = Some(bool_of(v)?),
        "listen" => p.listen = Some(addr_of(v)?),
        "allow_non_loopback" => p.allow_non_loopback = Some(bool_of(v)?),
        "authorized_keys" => p.authorized_keys = Some(path_of(v)?),
        "host_key" => p.host_key = Some(path_of(v)?),
        "local_forwards" => p.local_forwards = forwards_of(v, Kind::Local)?,
        "remote_forwards" => p.remote_forwards = forwards_of(v, Kind::Remote)?,
        "keepalive" => p.keepalive = Some(int_of(v, 1, i64::MAX, secs)? as u64),
        "keepalive_max" => {
            p.keepalive_max = Some(int_of(v, 1, i64::MAX, "an integer >= 1")? as u64)
        }
        "max_backoff" => {
            let f = match v {
                Val::Int(i) => i as f64,
                Val::Float(f) => f,
                other => {
                    return Err(Bad::whole(format!(
                        "must be a number of seconds > 0, not {}",
                        other.found()
                    )));
                }
            };
            // try_from_secs_f64 also rejects NaN, infinity and overflow.
            match Duration::try_from_secs_f64(f) {
                Ok(d) if !d.is_zero() => p.max_backoff = Some(d),
                _ => {
                    return Err(Bad::whole(format!(
                        "must be a number of seconds > 0, not {f}"
                    )));
                }
            }
        }
        "connect_timeout" => p.connect_timeout = Some(int_of(v, 1, i64::MAX, secs)? as u64),
        "on_event" => p.on_event = Some(str_of(v, "a command (string)")?),
        "metrics" => p.metrics = Some(addr_of(v)?),
        "stall_limit" => p.stall_limit = Some(int_of(v, 1, i64::MAX, secs)? as u64),
        "mux" => p.mux = Some(path_of(v)?),
        "resume" => p.resume = Some(bool_of(v)?),
        "resume_timeout" => p.resume_timeout = Some(int_of(v, 1, i64::MAX, secs)? as u64),
        "remote_helper" => p.remote_helper = Some(str_of(v, "a path on the server (string)")?),
        "mcp_exec" => p.mcp_exec = Some(bool_of(v)?),
        "mcp_created" => p.mcp_created = Some(bool_of(v)?),
        "copy_dir" => p.copy_dir = Some(path_of(v)?),
        _ => return Err(Bad::whole(unknown_key(key))),
    }
    Ok(())
}

/// "key 'K' must be ..." or "key 'K': detail" from a [`Bad`] message.
fn keyed(key: &str, msg: &str) -> String {
    let sep = if msg.starts_with(':') { "" } else { " " };
    format!("key '{key}'{sep}{msg}")
}

/// "unknown key 'K'", with a suggestion when a known key is close.
fn unknown_key(key: &str) -> String {
    let dashed = key.replace('-', "_");
    let close = |k: &str| 2.max(k.len() / 4);
    // The distance is at least the difference in length: skip keys too far
    // off by that alone, so a huge key costs no quadratic work.
    let len = dashed.chars().count();
    let best = KEYS
        .iter()
        .filter(|k| len.abs_diff(k.len()) <= close(k))
        .map(|k| (edit_distance(&dashed, k), *k))
        .min()
        .filter(|(d, k)| *d <= close(k));
    match best {
        Some((_, k)) => format!("unknown key '{key}' (did you mean '{k}'?)"),
        None => format!("unknown key '{key}' (known keys: {})", KEYS.join(", ")),
    }
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Parses and validates the text of a config file shown as `shown`.
fn parse(shown: &str, text: &str) -> Result<BTreeMap<String, Profile>, String> {
    let line = |span: Range<usize>| line_col(text, span.start).0;
    let doc = DeTable::parse(text).map_err(|e| {
        let (l, c) = line_col(text, e.span().map_or(0, |s| s.start));
        format!("{shown}:{l}:{c}: TOML syntax error: {}", e.message())
    })?;
    let mut profiles = BTreeMap::new();
    for (top, v) in doc.get_ref() {
        if top.get_ref() != "profile" {
            return Err(format!(
                "{shown}:{}: unknown top-level key '{}' (settings go in [profile.NAME] tables)",
                line(top.span()),
                top.get_ref()
            ));
        }
        let DeValue::Table(table) = v.get_ref() else {
            return Err(format!(
                "{shown}:{}: 'profile' must hold [profile.NAME] tables",
                line(top.span())
            ));
        };
        for (name, pv) in table {
            let name_line = line(name.span());
            let name = name.get_ref();
            // Names end up in ssh_config Host lines, unit files and socket
            // names: one that could break out of them is refused here.
            if let Err(e) = crate::spec::check_name(name) {
                return Err(format!("{shown}:{name_line}: {e}"));
            }
            let DeValue::Table(pt) = pv.get_ref() else {
                return Err(format!(
                    "{shown}:{name_line}: profile '{name}' must be a table ([profile.{name}])"
                ));
            };
            let mut p = Profile::default();
            for (key, val) in pt {
                let k = key.get_ref();
                let res = if KEYS.contains(&k.as_ref()) {
                    set(&mut p, k, toml_val(val.get_ref()))
                } else {
                    Err(Bad::whole(unknown_key(k)))
                };
                if let Err(b) = res {
                    // Point at the offending list item if there is one:
                    // multi-line lists are common for forwards.
                    let span = match (b.item, val.get_ref()) {
                        (Some(n), DeValue::Array(a)) if n < a.len() => a[n].span(),
                        _ if KEYS.contains(&k.as_ref()) => val.span(),
                        _ => key.span(),
                    };
                    let msg = if KEYS.contains(&k.as_ref()) {
                        keyed(k, &b.msg)
                    } else {
                        b.msg
                    };
                    return Err(format!("{shown}:{}: profile '{name}', {msg}", line(span)));
                }
            }
            if p.destination.is_none() {
                return Err(format!(
                    "{shown}:{name_line}: profile '{name}', key 'destination': missing \
                     (every profile needs destination = \"[user@]host[:port]\")"
                ));
            }
            profiles.insert(name.to_string(), p);
        }
    }
    Ok(profiles)
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// `path` with the home directory written `~`, as users think of it.
fn display_path(path: &Path) -> String {
    match home_dir() {
        Some(home) if home != Path::new("/") => match path.strip_prefix(&home) {
            Ok(rest) => format!("~/{}", rest.display()),
            Err(_) => path.display().to_string(),
        },
        _ => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests;

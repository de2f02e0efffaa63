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
    "mcp_exec",
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
    /// Lets `sshshim mcp` run commands and copy files through this profile's
    /// endpoint (its `exec` and `copy` tools); off unless set.
    pub mcp_exec: Option<bool>,
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
            mcp_exec: self.mcp_exec.or(lower.mcp_exec),
        }
    }
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
        "accept_new" | "allow_non_loopback" | "mcp_exec" => match s.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Val::Bool(true),
            "0" | "false" | "no" | "off" => Val::Bool(false),
            _ => string(),
        },
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
        "mcp_exec" => p.mcp_exec = Some(bool_of(v)?),
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
mod tests {
    use super::*;
    use std::ffi::OsString;

    /// Writes `text` to a temp file and loads it explicitly.
    fn load_text(text: &str) -> (tempfile::TempDir, Result<ConfigFile, String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let r = load(&path, true);
        (dir, r)
    }

    /// Asserts that loading `text` fails naming `line`, and every one of `parts`.
    fn expect_err(text: &str, line: usize, parts: &[&str]) -> String {
        let (dir, r) = load_text(text);
        let e = r.expect_err("should fail");
        let file = display_path(&dir.path().join("config.toml"));
        assert!(
            e.starts_with(&format!("{file}:{line}:")),
            "expected {file}:{line}: in {e}"
        );
        for p in parts {
            assert!(e.contains(p), "expected '{p}' in {e}");
        }
        e
    }

    const GOOD: &str = r#"
# Two profiles.
[profile.lab]
destination = "alice@lab.example:2200"
listen = "127.0.0.1:2300"
identity = ["~/.ssh/lab", "/etc/keys/lab"]
accept_new = true
local_forwards = ["8080:localhost:80"]
remote_forwards = [
    "2222:localhost:22",
    "0:/tmp/x.sock",
]
keepalive = 10
keepalive_max = 5
max_backoff = 2.5
connect_timeout = 7
on_event = "logger sshshim"
metrics = "127.0.0.1:9100"
mcp_exec = true

[profile.prod]
destination = "[2001:db8::1]"
port = 22
user = "deploy"
known_hosts = "/etc/ssh/kh"
allow_non_loopback = false
authorized_keys = "/etc/ak"
host_key = "/etc/hk"
max_backoff = 60
"#;

    #[test]
    fn good_file() {
        let (_d, r) = load_text(GOOD);
        let cf = r.unwrap();
        assert_eq!(cf.profiles.len(), 2);
        let lab = cf.get("lab").unwrap();
        assert_eq!(lab.destination.as_deref(), Some("alice@lab.example:2200"));
        assert_eq!(lab.listen, Some("127.0.0.1:2300".parse().unwrap()));
        assert_eq!(lab.identity.len(), 2);
        assert_eq!(lab.identity[1], PathBuf::from("/etc/keys/lab"));
        if let Some(home) = home_dir() {
            assert_eq!(lab.identity[0], home.join(".ssh/lab"));
        }
        assert_eq!(lab.accept_new, Some(true));
        assert_eq!(lab.local_forwards.len(), 1);
        assert_eq!(lab.remote_forwards.len(), 2);
        assert_eq!(lab.remote_forwards[0].kind, Kind::Remote);
        assert_eq!(lab.keepalive, Some(10));
        assert_eq!(lab.keepalive_max, Some(5));
        assert_eq!(lab.max_backoff, Some(Duration::from_millis(2500)));
        assert_eq!(lab.connect_timeout, Some(7));
        assert_eq!(lab.on_event.as_deref(), Some("logger sshshim"));
        assert_eq!(lab.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(lab.mcp_exec, Some(true));
        let prod = cf.get("prod").unwrap();
        assert_eq!(prod.mcp_exec, None);
        assert_eq!(prod.port, Some(22));
        assert_eq!(prod.user.as_deref(), Some("deploy"));
        assert_eq!(prod.listen, None);
        assert_eq!(prod.allow_non_loopback, Some(false));
        assert_eq!(prod.max_backoff, Some(Duration::from_secs(60)));
        assert_eq!(prod.host_key, Some(PathBuf::from("/etc/hk")));
        let e = cf.get("nope").unwrap_err();
        assert!(e.contains("lab, prod"), "{e}");
    }

    #[test]
    fn missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let cf = load(&path, false).unwrap();
        assert!(cf.profiles.is_empty());
        let e = load(&path, true).unwrap_err();
        assert!(e.contains("absent.toml"), "{e}");
        assert!(default_path().ends_with("sshshim/config.toml"));
    }

    #[test]
    fn syntax_error() {
        let e = expect_err(
            "[profile.a]\ndestination = \"h\"\nport = = 3\n",
            3,
            &["TOML syntax error"],
        );
        // file:line:column
        assert!(e.contains(":3:8:"), "{e}");
    }

    #[test]
    fn unknown_keys() {
        expect_err(
            "[profile.a]\ndestination = \"h\"\n\nlistne = \"127.0.0.1:1\"\n",
            4,
            &[
                "profile 'a'",
                "unknown key 'listne'",
                "did you mean 'listen'",
            ],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\naccept-new = true\n",
            3,
            &["unknown key 'accept-new'", "did you mean 'accept_new'"],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\nzzzzzzzz = 1\n",
            3,
            &["unknown key 'zzzzzzzz'", "known keys"],
        );
        expect_err("title = 1\n", 1, &["unknown top-level key 'title'"]);
    }

    /// Found by fuzzing: a 100,000-character key took seconds, all spent
    /// on "did you mean" against every known key.
    #[test]
    fn huge_unknown_key_is_quick() {
        let started = std::time::Instant::now();
        let e = unknown_key(&"x".repeat(100_000));
        assert!(e.contains("known keys"), "{e:.80}");
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(unknown_key("listne").contains("did you mean 'listen'"));
        assert!(unknown_key("destinations").contains("did you mean 'destination'"));
    }

    #[test]
    fn wrong_types() {
        expect_err(
            "[profile.a]\ndestination = \"h\"\nport = \"22\"\n",
            3,
            &["profile 'a'", "key 'port' must be an integer 1-65535"],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\nport = 70000\n",
            3,
            &["key 'port'", "70000"],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\naccept_new = \"yes\"\n",
            3,
            &["key 'accept_new' must be true or false"],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\nkeepalive = 0\n",
            3,
            &["key 'keepalive'"],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\nmax_backoff = -1.0\n",
            3,
            &["key 'max_backoff'", "> 0"],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\nlisten = \"localhost\"\n",
            3,
            &["key 'listen'", "ADDR:PORT"],
        );
        expect_err(
            "[profile.a]\ndestination = \"h\"\nidentity = [\"a\", 3]\n",
            3,
            &["key 'identity'", "item 2 is a integer"],
        );
        expect_err(
            "[profile.a]\ndestination = \"bob@\"\n",
            2,
            &["key 'destination'", "invalid destination"],
        );
        expect_err("profile = 3\n", 1, &["'profile' must hold"]);
        expect_err("[profile]\na = 3\n", 2, &["profile 'a' must be a table"]);
    }

    #[test]
    fn bad_forward_spec() {
        let e = expect_err(
            "[profile.a]\ndestination = \"h\"\nremote_forwards = [\n  \"1:h:2\",\n  \"2222:localhost\",\n]\n",
            5,
            &["profile 'a', key 'remote_forwards': invalid forward -R '2222:localhost'"],
        );
        assert!(!e.contains("key 'remote_forwards' :"), "{e}");
        expect_err(
            "[profile.b]\ndestination = \"h\"\nlocal_forwards = [\"0:h:22\"]\n",
            3,
            &["profile 'b', key 'local_forwards'", "-L"],
        );
    }

    #[test]
    fn missing_destination() {
        expect_err(
            "[profile.a]\ndestination = \"h\"\n\n[profile.lab]\nport = 22\n",
            4,
            &["profile 'lab'", "key 'destination'", "missing"],
        );
    }

    #[test]
    fn precedence() {
        let flags = Profile {
            port: Some(2200),
            local_forwards: vec![ForwardSpec::parse(Kind::Local, "1:h:2").unwrap()],
            ..Default::default()
        };
        let file = Profile {
            destination: Some("host".into()),
            port: Some(22),
            keepalive: Some(5),
            local_forwards: vec![ForwardSpec::parse(Kind::Local, "3:h:4").unwrap()],
            remote_forwards: vec![ForwardSpec::parse(Kind::Remote, "5:h:6").unwrap()],
            ..Default::default()
        };
        let env = Profile {
            keepalive: Some(99),
            user: Some("envuser".into()),
            ..Default::default()
        };
        let p = flags.clone().or(file.clone()).or(env);
        assert_eq!(p.port, Some(2200));
        assert_eq!(p.destination.as_deref(), Some("host"));
        assert_eq!(p.keepalive, Some(5));
        assert_eq!(p.user.as_deref(), Some("envuser"));
        assert_eq!(p.local_forwards, flags.local_forwards);
        assert_eq!(p.remote_forwards, file.remote_forwards);
        assert_eq!(Profile::default().or(file.clone()), file);
    }

    #[test]
    fn env_lookup() {
        let vars: BTreeMap<&str, &str> = [
            ("SSHSHIM_KEEPALIVE", "10"),
            ("SSHSHIM_LISTEN", "127.0.0.1:2300"),
            ("SSHSHIM_ACCEPT_NEW", "yes"),
            ("SSHSHIM_ALLOW_NON_LOOPBACK", "0"),
            ("SSHSHIM_REMOTE_FORWARDS", "2222:localhost:22, 0:/tmp/s"),
            ("SSHSHIM_MAX_BACKOFF", "0.5"),
            ("SSHSHIM_USER", ""),
        ]
        .into();
        let get = |n: &str| vars.get(n).map(OsString::from);
        let p = from_vars(get).unwrap();
        assert_eq!(p.keepalive, Some(10));
        assert_eq!(p.listen, Some("127.0.0.1:2300".parse().unwrap()));
        assert_eq!(p.accept_new, Some(true));
        assert_eq!(p.allow_non_loopback, Some(false));
        assert_eq!(p.remote_forwards.len(), 2);
        assert_eq!(p.max_backoff, Some(Duration::from_millis(500)));
        assert_eq!(p.user, None);

        let bad = |name: &'static str, val: &'static str| {
            from_vars(move |n: &str| (n == name).then(|| OsString::from(val))).unwrap_err()
        };
        let e = bad("SSHSHIM_PORT", "abc");
        assert!(e.contains("SSHSHIM_PORT") && e.contains("integer"), "{e}");
        let e = bad("SSHSHIM_ACCEPT_NEW", "maybe");
        assert!(e.contains("SSHSHIM_ACCEPT_NEW"), "{e}");
        let e = bad("SSHSHIM_LOCAL_FORWARDS", "8080:x");
        assert!(
            e.contains("SSHSHIM_LOCAL_FORWARDS") && e.contains("-L"),
            "{e}"
        );
    }

    #[test]
    fn process_env() {
        // The only test that touches the process environment; the values
        // are unusual so that a stray outer variable cannot match them.
        let var = "SSHSHIM_CONNECT_TIMEOUT";
        let old = std::env::var_os(var);
        // SAFETY: no other test in this module reads or writes this variable.
        unsafe { std::env::set_var(var, "4321") };
        let r = from_env();
        match old {
            // SAFETY: as above.
            Some(v) => unsafe { std::env::set_var(var, v) },
            None => unsafe { std::env::remove_var(var) },
        }
        assert_eq!(r.unwrap().connect_timeout, Some(4321));
    }
    mod fuzz {
        //! Properties of the profile loader: on any text and on TOML of
        //! the right shape with wrong parts, no panic, bounded time, and
        //! every error names the file and a line of it.

        use super::*;
        use crate::fuzzing::{bounded, config, is_message, nasty_text};
        use proptest::prelude::*;

        /// `parse` within the time bound; an error must be a message that
        /// starts with the file name and a line number within the text.
        fn checked_parse(text: String) -> Result<BTreeMap<String, Profile>, String> {
            let lines = text.lines().count().max(1);
            let t = text.clone();
            let r = bounded("profile::parse", move || parse("fuzz.toml", &t));
            if let Err(e) = &r {
                is_message("profile::parse", e);
                let line = e
                    .strip_prefix("fuzz.toml:")
                    .and_then(|rest| rest.split(':').next())
                    .and_then(|l| l.parse::<usize>().ok());
                assert!(
                    line.is_some_and(|l| (1..=lines + 1).contains(&l)),
                    "error without file:line in range 1..={}: {e}\n--- text:\n{text}",
                    lines + 1
                );
            }
            r
        }

        /// `s` as a TOML basic string (Rust's `{:?}` escapes differ).
        fn toml_str(s: &str) -> String {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }

        /// A TOML integer literal for `n` in one of TOML's spellings.
        fn int_literal() -> impl Strategy<Value = (i128, String)> {
            let n = prop_oneof![
                -2i128..70_000,
                Just(i64::MAX as i128),
                Just(i64::MIN as i128),
                Just(i64::MAX as i128 + 1),
                Just(u64::MAX as i128 + 1),
            ];
            (n, 0..6u8).prop_map(|(n, form)| {
                let lit = match form {
                    1 if n >= 0 => format!("0x{n:X}"),
                    2 if n >= 0 => format!("0o{n:o}"),
                    3 if n >= 0 => format!("0b{n:b}"),
                    4 if n >= 1000 => {
                        let d = n.to_string();
                        let (a, b) = d.split_at(d.len() - 3);
                        format!("{a}_{b}")
                    }
                    5 if n >= 0 => format!("+{n}"),
                    _ => n.to_string(),
                };
                (n, lit)
            })
        }

        /// Any TOML value, as text, biased to what the keys get wrong.
        fn value() -> impl Strategy<Value = String> {
            let leaf = prop_oneof![
                int_literal().prop_map(|(_, l)| l),
                prop::sample::select(vec![
                    "0.0",
                    "-0.0",
                    "1e400",
                    "-1e400",
                    "inf",
                    "+inf",
                    "-inf",
                    "nan",
                    "-nan",
                    "1_000.5",
                    "5e-324",
                    "1e-320",
                    "18446744073709551616.0",
                    "true",
                    "false",
                    "1979-05-27T07:32:00Z",
                    "07:32:00",
                    "1979-05-27",
                    "{}",
                    "{ a = 1 }",
                    "[]",
                    "[[]]",
                    "[1, \"a\"]",
                    "\"\"",
                    "''",
                    "\"\\u0000\"",
                    "\"h\"",
                    "\"u@h:22\"",
                    "\"127.0.0.1:2222\"",
                    "\"[::1]:0\"",
                    "\"8080:localhost:80\"",
                    "\"~/.ssh/id\"",
                    "\"~nobody/x\"",
                    "'''\nmulti\n'''",
                    "\"\\ud800\"",
                ])
                .prop_map(str::to_owned),
                nasty_text(12).prop_map(|s| toml_str(&s)),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4)
                        .prop_map(|v| format!("[{}]", v.join(", "))),
                    prop::collection::vec(inner, 0..3).prop_map(|v| {
                        let kv: Vec<String> = v
                            .iter()
                            .enumerate()
                            .map(|(i, x)| format!("k{i} = {x}"))
                            .collect();
                        format!("{{ {} }}", kv.join(", "))
                    }),
                ]
            })
        }

        /// A key: one we know, a near miss, or anything.
        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
                1 => prop::sample::select(vec![
                    "listne", "accept-new", "Port", "destination.x", "\"destination\"",
                    "'port'", "a.b.c", "\"\"",
                ])
                .prop_map(str::to_owned),
                1 => nasty_text(6).prop_map(|s| toml_str(&s)),
            ]
        }

        /// A table header: a profile, the profile table, or something else.
        fn header() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => "[a-z]{1,6}".prop_map(|n| format!("[profile.{n}]")),
                1 => prop::sample::select(vec![
                    "[profile]", "[[profile]]", "[[profile.a]]", "[profile.a.b]", "[other]",
                    "[profile.\"\"]", "[profile.\"a.b\"]", "", "[profile.a]\n[profile.a]",
                ])
                .prop_map(str::to_owned),
                1 => nasty_text(6).prop_map(|s| format!("[profile.{}]", toml_str(&s))),
            ]
        }

        /// A document: tables of `key = value` lines, often with a
        /// destination so that other keys get checked.
        fn document() -> impl Strategy<Value = String> {
            let table = (
                header(),
                any::<bool>(),
                // Keys unique within a table: a duplicate is only a syntax error.
                prop::collection::btree_map(key(), value(), 0..6),
            )
                .prop_map(|(h, dest, kvs)| {
                    let mut t = format!("{h}\n");
                    if dest {
                        t.push_str("destination = \"h\"\n");
                    }
                    for (k, v) in kvs {
                        t.push_str(&format!("{k} = {v}\n"));
                    }
                    t
                });
            prop::collection::vec(table, 0..4).prop_map(|t| t.concat())
        }

        proptest! {
            #![proptest_config(config())]

            /// Any text at all.
            #[test]
            fn fuzz_profile_any_text(text in nasty_text(200)) {
                let _ = checked_parse(text);
            }

            /// TOML of the right shape with wrong keys, types and values.
            #[test]
            fn fuzz_profile_structured(doc in document()) {
                let _ = checked_parse(doc);
            }

            /// `SSHSHIM_*` variables with any values: errors name the variable.
            #[test]
            fn fuzz_profile_env(
                vars in prop::collection::btree_map(prop::sample::select(KEYS.to_vec()), nasty_text(16), 0..8),
            ) {
                let r = bounded("profile::from_vars", move || {
                    from_vars(|name| {
                        vars.iter()
                            .find(|(k, _)| name == format!("SSHSHIM_{}", k.to_ascii_uppercase()))
                            .map(|(_, v)| v.into())
                    })
                });
                if let Err(e) = r {
                    is_message("profile::from_vars", &e);
                    prop_assert!(e.contains("environment variable SSHSHIM_"), "{}", e);
                }
            }

            /// Integers in every TOML spelling: accepted exactly when in
            /// range, with the value written.
            #[test]
            fn fuzz_profile_integers((n, lit) in int_literal()) {
                let text = format!("[profile.p]\ndestination = \"h\"\nport = {lit}\nkeepalive = {lit}\n");
                let r = checked_parse(text);
                if (1..=65535).contains(&n) {
                    let p = r.map_err(TestCaseError::fail)?;
                    prop_assert_eq!(p["p"].port, Some(n as u16));
                    prop_assert_eq!(p["p"].keepalive, Some(n as u64));
                } else {
                    prop_assert!(r.is_err(), "{} accepted", lit);
                }
            }
        }

        /// Hand-picked documents that break naive loaders.
        #[test]
        fn nasty_profile_seeds() {
            let seeds = [
                "[".repeat(10_000),
                "a = ".to_owned() + &"[".repeat(10_000),
                "a = ".to_owned() + &"{ b = ".repeat(5_000),
                format!(
                    "[profile.{}]\ndestination = \"h\"\n",
                    "a.".repeat(5_000) + "a"
                ),
                format!(
                    "[profile.p]\ndestination = \"{}\"\n",
                    "\\u0000".repeat(10_000)
                ),
                format!(
                    "[profile.p]\ndestination = \"h\"\nport = {}\n",
                    "9".repeat(10_000)
                ),
                format!(
                    "[profile.p]\ndestination = \"h\"\nmax_backoff = 1{}\n",
                    "0".repeat(400)
                ),
                format!(
                    "[profile.p]\ndestination = \"h\"\nmax_backoff = 1e{}\n",
                    "9".repeat(100)
                ),
                format!(
                    "[profile.p]\ndestination = \"h\"\nlocal_forwards = [{}]\n",
                    "\"1:h:2\",".repeat(10_000)
                ),
                format!(
                    "[profile.p]\ndestination = \"h\"\n{} = 1\n",
                    "x".repeat(100_000)
                ),
                format!(
                    "[profile.p]\ndestination = \"h\"\n\"{}\" = 1\n",
                    "é".repeat(50_000)
                ),
                "\0".repeat(10_000),
                "\u{feff}[profile.p]\ndestination = \"h\"\n".into(),
                "[profile.p]\r\ndestination = \"h\"\r\nport = 0\r\n".into(),
            ];
            for s in seeds {
                let _ = checked_parse(s);
            }
            // TOML's other number spellings reach the keys as numbers.
            let p = checked_parse(
                "[profile.p]\ndestination = \"h\"\nmax_backoff = 1_000.5\nport = 0x16\n".into(),
            )
            .unwrap();
            assert_eq!(p["p"].max_backoff, Some(Duration::from_millis(1_000_500)));
            assert_eq!(p["p"].port, Some(22));
            // Not UTF-8 at all: `load` says so, naming the file.
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, b"[profile.p]\n\xff\xfe = 1\n").unwrap();
            let e = load(&path, true).unwrap_err();
            assert!(e.contains("bad.toml") && e.contains("cannot read"), "{e}");
        }
    }
}

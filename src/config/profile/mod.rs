//! Named profiles: the options of `sshshim up`, kept in a TOML file as
//! `[profile.NAME]` tables, plus defaults taken from `SSHSHIM_*` variables.
//! The settings themselves are declared once, in `settings.rs`; this module
//! loads them.
//!
//! Everything is validated when the file is loaded, so a typo is reported
//! with the file, line and key before any connection is attempted.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde::de::IntoDeserializer as _;
use serde::de::value::MapDeserializer;
use toml::de::{DeTable, DeValue};

use crate::paths::home_dir;

mod settings;
mod value;

pub use settings::{
    DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEPALIVE, DEFAULT_KEEPALIVE_MAX, DEFAULT_LISTEN,
    DEFAULT_MAX_BACKOFF, DEFAULT_MAX_UPSTREAMS, DEFAULT_STALL_LIMIT, MAX_UPSTREAMS_CAP, Profile,
    TUNING_KEYS, Tuning, keys,
};

/// How a profiles file is named in a running profile's status: absolute,
/// symlinks resolved, so two spellings of one file compare equal.
pub fn file_identity(path: &Path) -> String {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Why profiles could not be loaded or a profile found; the text names
/// the file, line, profile and key, or the variable.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file exists (or was given) but cannot be read.
    #[error("{file}: cannot read config file: {source}")]
    Read {
        /// The file, as shown to the user.
        file: String,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The file's TOML or one of its values is wrong (file:line: ...).
    #[error("{0}")]
    Invalid(String),
    /// A `SSHSHIM_*` variable is wrong.
    #[error("{0}")]
    Env(String),
    /// No profile of that name in the file.
    #[error("no profile '{name}' in {file} ({known})")]
    NoProfile {
        /// The name asked for.
        name: String,
        /// The file, as shown to the user.
        file: String,
        /// "known: a, b" or "it has none".
        known: String,
    },
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
    pub fn get(&self, name: &str) -> Result<&Profile, ProfileError> {
        self.profiles.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            let known = if known.is_empty() {
                "it has none".to_owned()
            } else {
                format!("known: {}", known.join(", "))
            };
            ProfileError::NoProfile {
                name: name.to_owned(),
                file: display_path(&self.path),
                known,
            }
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
pub fn load(path: &Path, explicit: bool) -> Result<ConfigFile, ProfileError> {
    let shown = display_path(path);
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            return Ok(ConfigFile {
                path: path.to_path_buf(),
                profiles: BTreeMap::new(),
            });
        }
        Err(source) => {
            return Err(ProfileError::Read {
                file: shown,
                source,
            });
        }
    };
    Ok(ConfigFile {
        path: path.to_path_buf(),
        profiles: parse(&shown, &text).map_err(ProfileError::Invalid)?,
    })
}

/// Defaults from the environment: `SSHSHIM_<KEY>` for each of [`keys`].
/// Booleans accept 1/0, true/false, yes/no, on/off; lists are
/// comma-separated. Empty variables count as unset. Errors name the variable.
pub fn from_env() -> Result<Profile, ProfileError> {
    from_vars(|name| std::env::var_os(name))
}

/// [`from_env`] over any variable lookup, so tests need not touch the
/// process environment.
fn from_vars(get: impl Fn(&str) -> Option<OsString>) -> Result<Profile, ProfileError> {
    let mut p = Profile::default();
    for key in keys() {
        let var = format!("SSHSHIM_{}", key.to_ascii_uppercase());
        let Some(raw) = get(&var) else { continue };
        let raw = raw.into_string().map_err(|_| {
            ProfileError::Env(format!("environment variable {var}: not valid UTF-8"))
        })?;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        // One variable at a time, so an error names its variable.
        let one = MapDeserializer::<_, serde::de::value::Error>::new(std::iter::once((
            *key,
            value::EnvValue(raw),
        )));
        let set = Profile::deserialize(one).map_err(|e| {
            ProfileError::Env(format!(
                "environment variable {var}='{raw}': {}",
                keyed(key, &e.to_string())
            ))
        })?;
        p = p.or(set);
    }
    Ok(p)
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
    let best = keys()
        .iter()
        .filter(|k| len.abs_diff(k.len()) <= close(k))
        .map(|k| (edit_distance(&dashed, k), *k))
        .min()
        .filter(|(d, k)| *d <= close(k));
    match best {
        Some((_, k)) => format!("unknown key '{key}' (did you mean '{k}'?)"),
        None => format!("unknown key '{key}' (known keys: {})", keys().join(", ")),
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
            if let Err(e) = crate::config::spec::check_name(name) {
                return Err(format!("{shown}:{name_line}: {e}"));
            }
            let DeValue::Table(pt) = pv.get_ref() else {
                return Err(format!(
                    "{shown}:{name_line}: profile '{name}' must be a table ([profile.{name}])"
                ));
            };
            let p = Profile::deserialize(pv.clone().into_deserializer()).map_err(|e| {
                // The deserializer pins the error to the key (unknown) or
                // to the value or list item (invalid) at fault.
                let at = e.span().unwrap_or_else(|| pv.span());
                let msg = explain(pt, &at, e.message());
                format!("{shown}:{}: profile '{name}', {msg}", line(at))
            })?;
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

/// The message for an error at `at` in profile table `pt`: "unknown key"
/// with a suggestion when `at` is a key, "key 'K' ..." when it is in K's
/// value.
fn explain(pt: &DeTable<'_>, at: &Range<usize>, msg: &str) -> String {
    for (key, val) in pt {
        if key.span() == *at {
            return unknown_key(key.get_ref());
        }
        let v = val.span();
        if v.start <= at.start && at.end <= v.end {
            return keyed(key.get_ref(), msg);
        }
    }
    msg.to_owned()
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

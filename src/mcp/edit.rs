//! Edits of the profiles file for `sshshim mcp`: add, update or remove one
//! `[profile.NAME]` table and leave every other byte of the file as it was,
//! comments included.
//!
//! The new text is validated by the same loader `sshshim up` uses
//! ([`crate::config::profile::load`]) before it replaces the file, atomically and
//! with mode 0600, so a bad edit never reaches the file.
//!
//! What MCP may touch is decided here. It writes only the keys of
//! [`MCP_KEYS`] (where to connect, forwards) and the profile's tuning keys
//! (timing and limits); the keys of
//! [`PERSON_KEYS`] (commands, authentication, host keys, listeners,
//! exposure, the MCP opt-ins) are a person's alone. It changes and removes
//! only profiles it created, which it marks `mcp_created = true` (a key, so
//! the mark goes wherever the table goes and a comment cannot fake it) and
//! which hold no person's key: a person who adds one (say `listen` and
//! `mcp_exec`) takes the profile over. It creates only names beginning with
//! [`profile::MCP_PREFIX`], which a person's profiles are warned off.

use anyhow::anyhow;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use toml_edit::{DocumentMut, Item, Table, Value};

use crate::config::profile;
use crate::config::spec::{Addr, ForwardSpec, Kind};

/// What to write into one profile. Fields left `None` keep what the file has.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProfileEdit {
    /// Profile name: the `NAME` of `[profile.NAME]`.
    pub name: String,
    /// `destination`.
    pub destination: String,
    /// `remote_forwards`; an empty list removes the key.
    pub remote_forwards: Option<Vec<String>>,
    /// `local_forwards`; an empty list removes the key.
    pub local_forwards: Option<Vec<String>>,
    /// Any other profile keys; a JSON `null` removes the key.
    pub options: serde_json::Map<String, Json>,
}

/// Result of [`set_profile`].
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The file that was written (a symlink's target, if it was one).
    pub path: PathBuf,
    /// True when the profile did not exist before.
    pub created: bool,
    /// The profile's keys as they now are in the file.
    pub settings: Json,
}

/// Profile keys `tunnel_setup` may write: where to connect, and (see
/// [`mcp_may_write`]) the harmless tuning of [`profile::TUNING_KEYS`].
/// Every key of [`profile::keys`] is MCP's or in [`PERSON_KEYS`] (a test
/// checks it).
pub const MCP_KEYS: &[&str] = &[
    "destination",
    "port",
    "user",
    "local_forwards",
    "remote_forwards",
    "resume",
    "resume_timeout",
];

/// Whether `tunnel_setup` may write profile key `key`.
pub fn mcp_may_write(key: &str) -> bool {
    MCP_KEYS.contains(&key) || profile::TUNING_KEYS.contains(&key)
}

/// Profile keys only a person sets, each with why.
pub const PERSON_KEYS: &[(&str, &str)] = &[
    (
        "identity",
        "it chooses the private keys that authenticate upstream",
    ),
    (
        "known_hosts",
        "it decides which upstream host keys are trusted",
    ),
    (
        "remote_helper",
        "it chooses a program that runs on the server",
    ),
    ("accept_new", "it would trust unknown upstream host keys"),
    (
        "jump",
        "it routes the connection through other hosts, as the user's ssh_config resolves them",
    ),
    (
        "listen",
        "it opens a local SSH endpoint, through which commands run",
    ),
    (
        "allow_non_loopback",
        "it exposes the endpoint beyond this machine",
    ),
    (
        "authorized_keys",
        "it decides who may log in to the endpoint",
    ),
    ("host_key", "it sets the endpoint's identity"),
    ("on_event", "it runs a local command"),
    ("metrics", "it opens a listener"),
    ("mux", "it places a socket through which commands run"),
    ("mcp_exec", "it lets MCP run commands and copy files"),
    (
        "mcp_created",
        "it marks the profiles MCP created; tunnel_setup writes it itself",
    ),
    (
        "copy_dir",
        "it decides which local files copy may read and write",
    ),
];

/// The marker key of profiles MCP created.
const MARK: &str = "mcp_created";

/// Refuses an edit that touches a person's key, or a forward whose local
/// side is not a loopback port (a `-L` listening beyond loopback, or a Unix
/// socket path on this machine).
fn check_edit(edit: &ProfileEdit, path: &Path) -> anyhow::Result<()> {
    // `ssh -G` resolves the destination through the user's ssh_config,
    // whose `Match exec` commands expand %h and %r: shell syntax there
    // would run (OpenSSH before 9.6 does not refuse it itself).
    let user = edit.options.get("user").and_then(Json::as_str);
    for (what, s) in [
        ("destination", Some(edit.destination.as_str())),
        ("options.user", user),
    ] {
        let Some(s) = s else { continue };
        if s.starts_with('-') || s.contains(|c: char| "'`\"$\\;&<>|(){}".contains(c)) {
            return Err(anyhow!(
                "{what} '{s}': a host or user name starts with no '-' and holds none of \
                 ' ` \" $ \\ ; & < > | ( ) {{ }} through MCP"
            ));
        }
    }
    for key in edit.options.keys() {
        if let Some((_, why)) = PERSON_KEYS.iter().find(|(k, _)| k == key) {
            return Err(anyhow!(
                "options.{key}: only a person sets this key ({why}); ask the user to edit                  [profile.{}] in {} by hand",
                edit.name,
                path.display()
            ));
        }
        // Unknown keys are left to the loader, which names the close ones.
    }
    let lists = [
        (
            Kind::Local,
            &edit.local_forwards,
            edit.options.get("local_forwards"),
        ),
        (
            Kind::Remote,
            &edit.remote_forwards,
            edit.options.get("remote_forwards"),
        ),
    ];
    for (kind, list, opt) in lists {
        let from_opt: Vec<String> = match opt {
            Some(Json::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Some(Json::String(s)) => vec![s.clone()],
            _ => Vec::new(),
        };
        for s in list.iter().flatten().chain(&from_opt) {
            // A spec that does not parse is the loader's to report.
            let Ok(f) = ForwardSpec::parse(kind, s) else {
                continue;
            };
            let local = match kind {
                Kind::Local => &f.listen,
                Kind::Remote => &f.target,
            };
            let ok = match (kind, local) {
                (Kind::Local, Addr::Tcp(h, _)) => {
                    h.is_empty()
                        || h == "localhost"
                        || h.parse::<std::net::IpAddr>()
                            .is_ok_and(|ip| ip.is_loopback())
                }
                (Kind::Remote, Addr::Tcp(..)) => true,
                (_, Addr::Unix(_)) => false,
            };
            if !ok {
                return Err(anyhow!(
                    "forward '{s}': through MCP a forward's local side must be a TCP port on \
                     loopback (no bind address beyond loopback, no Unix socket path); ask the \
                     user to add it by hand"
                ));
            }
        }
    }
    Ok(())
}

/// Refuses to change or remove profile `name` unless MCP created it and no
/// person's key was added to it since.
fn check_owned(table: &dyn toml_edit::TableLike, name: &str, path: &Path) -> anyhow::Result<()> {
    let marked = table
        .get(MARK)
        .and_then(Item::as_value)
        .and_then(Value::as_bool)
        == Some(true);
    if !marked {
        return Err(anyhow!(
            "profile '{name}' in {} was not created through MCP (it has no `mcp_created = \
             true`): MCP changes and removes only the profiles it created. Ask the user to edit \
             it, or use another name",
            path.display()
        ));
    }
    let person: Vec<&str> = table
        .iter()
        .map(|(k, _)| k)
        .filter(|k| *k != MARK && !mcp_may_write(k))
        .collect();
    if !person.is_empty() {
        return Err(anyhow!(
            "profile '{name}' in {} has keys only a person sets ({}): a person has taken it \
             over, so MCP no longer changes or removes it",
            path.display(),
            person.join(", ")
        ));
    }
    Ok(())
}

/// Whether profile `name` exists and MCP may change or remove it: `Ok(true)`
/// when it may, `Ok(false)` when there is no such profile, an error saying
/// why not otherwise.
pub fn owned(path: &Path, name: &str) -> anyhow::Result<bool> {
    let path = real_path(path);
    let (_, doc) = read_doc(&path)?;
    let Some(t) = doc
        .get("profile")
        .and_then(Item::as_table_like)
        .and_then(|p| p.get(name))
    else {
        return Ok(false);
    };
    let t = t.as_table_like().ok_or_else(|| {
        anyhow!(
            "{}: profile '{name}' is not a table; fix it by hand",
            path.display()
        )
    })?;
    check_owned(t, name, &path).map(|()| true)
}

/// Comment placed above a table this module creates, so a person reading the
/// file knows where it came from.
const ADDED_COMMENT: &str = "# Added by `sshshim mcp` (tunnel_setup).\n";

/// Reads the file (a missing one is empty) and parses it for editing.
fn read_doc(path: &Path) -> anyhow::Result<(String, DocumentMut)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow!("{}: cannot read config file: {e}", path.display())),
    };
    let doc = text.parse::<DocumentMut>().map_err(|e| {
        anyhow!(
            "{}: TOML syntax error, fix it by hand first: {}",
            path.display(),
            e.message()
        )
    })?;
    Ok((text, doc))
}

/// Edits the file so profile `edit.name` holds the given settings (creating
/// it, and the file, if needed). Keys not mentioned are kept.
pub fn set_profile(path: &Path, edit: &ProfileEdit) -> anyhow::Result<Written> {
    crate::config::spec::check_name(&edit.name)?;
    let path = real_path(path);
    check_edit(edit, &path)?;
    let (_, mut doc) = read_doc(&path)?;
    let profiles = profiles_table(&mut doc, &path)?;
    let created = !profiles.contains_key(&edit.name);
    // Sockets and aliases go by name alone: a new profile under a person's
    // name would take their ControlPath while theirs is down.
    if created && !edit.name.starts_with(profile::MCP_PREFIX) {
        return Err(anyhow!(
            "profiles created through MCP are named {p}… (a prefix reserved for them, so \
             none takes the socket of a person's profile of the same name); try {p}{}",
            edit.name,
            p = profile::MCP_PREFIX
        ));
    }
    if let Some(t) = profiles.get(&edit.name) {
        let t = t.as_table_like().ok_or_else(|| {
            anyhow!(
                "{}: profile '{}' is not a table; fix it by hand",
                path.display(),
                edit.name
            )
        })?;
        check_owned(t, &edit.name, &path)?;
    }
    if created {
        let mut t = Table::new();
        t.insert(MARK, toml_edit::value(true));
        let blank = if doc_is_empty(&doc) { "" } else { "\n" };
        t.decor_mut().set_prefix(format!("{blank}{ADDED_COMMENT}"));
        // After every table there is, whatever order the file has them in.
        let next = max_position(&doc) + 1;
        t.set_position(Some(next));
        profiles_table(&mut doc, &path)?.insert(&edit.name, Item::Table(t));
    }
    let table = profiles_table(&mut doc, &path)?
        .get_mut(&edit.name)
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| {
            anyhow!(
                "{}: profile '{}' is not a table; fix it by hand",
                path.display(),
                edit.name
            )
        })?;
    for (key, val) in &edit.options {
        if val.is_null() {
            table.remove(key);
        } else {
            put(table, key, to_toml(key, val)?);
        }
    }
    put(table, "destination", Value::from(edit.destination.as_str()));
    for (key, list) in [
        ("remote_forwards", &edit.remote_forwards),
        ("local_forwards", &edit.local_forwards),
    ] {
        match list {
            Some(l) if l.is_empty() => {
                table.remove(key);
            }
            Some(l) => put(table, key, Value::Array(l.iter().collect())),
            None => {}
        }
    }
    let text = doc.to_string();
    write_validated(&path, &text)?;
    Ok(Written {
        settings: settings_of(&text, &edit.name).unwrap_or(Json::Null),
        path,
        created,
    })
}

/// Removes profile `name` from the file. Comments directly above its header
/// go with it; anything separated from the header by a blank line (a
/// file-level comment, say) stays. Returns false if there was no such profile.
pub fn remove_profile(path: &Path, name: &str) -> anyhow::Result<bool> {
    let path = real_path(path);
    let (_, mut doc) = read_doc(&path)?;
    let Some(profiles) = doc.get_mut("profile").and_then(Item::as_table_like_mut) else {
        return Ok(false);
    };
    match profiles.get(name).map(Item::as_table_like) {
        None => return Ok(false),
        Some(None) => {
            return Err(anyhow!(
                "{}: profile '{name}' is not a table; fix it by hand",
                path.display()
            ));
        }
        Some(Some(t)) => check_owned(t, name, &path)?,
    }
    let Some(removed) = profiles.remove(name) else {
        return Ok(false);
    };
    if let Item::Table(t) = &removed {
        let prefix = t.decor().prefix().and_then(|p| p.as_str()).unwrap_or("");
        let keep = detached_part(prefix);
        // Blank lines alone need no new home: the next table has its own.
        if !keep.trim().is_empty() {
            reattach(&mut doc, t.position(), keep);
        }
    }
    let text = doc.to_string();
    write_validated(&path, &text)?;
    Ok(true)
}

/// The profile's keys, as JSON, from the text of a config file.
pub fn settings_of(text: &str, name: &str) -> Option<Json> {
    let table: toml::Table = toml::from_str(text).ok()?;
    let p = table.get("profile")?.get(name)?;
    serde_json::to_value(p).ok()
}

/// Every profile's keys, as JSON, in file order of names (sorted).
pub fn all_settings(path: &Path) -> anyhow::Result<serde_json::Map<String, Json>> {
    let (text, _) = read_doc(path)?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| anyhow!("{}: TOML syntax error: {}", path.display(), e.message()))?;
    let mut out = serde_json::Map::new();
    if let Some(toml::Value::Table(profiles)) = table.get("profile") {
        for (name, v) in profiles {
            out.insert(name.clone(), serde_json::to_value(v).unwrap_or(Json::Null));
        }
    }
    Ok(out)
}

/// A symlinked file (dotfile managers) is edited through the link.
fn real_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The `profile` table, created (implicit, so no bare `[profile]` header
/// appears) when the file has none.
fn profiles_table<'d>(
    doc: &'d mut DocumentMut,
    path: &Path,
) -> anyhow::Result<&'d mut dyn toml_edit::TableLike> {
    if !doc.contains_key("profile") {
        let mut t = Table::new();
        t.set_implicit(true);
        doc.insert("profile", Item::Table(t));
    }
    doc.get_mut("profile")
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| {
            anyhow!(
                "{}: 'profile' must hold [profile.NAME] tables; fix it by hand",
                path.display()
            )
        })
}

/// True when the document has no key and no text at all.
fn doc_is_empty(doc: &DocumentMut) -> bool {
    doc.to_string().trim().is_empty()
}

/// Highest table position in the document (0 if none).
fn max_position(doc: &DocumentMut) -> isize {
    fn walk(t: &Table, max: &mut isize) {
        if let Some(p) = t.position() {
            *max = (*max).max(p);
        }
        for (_, item) in t.iter() {
            if let Item::Table(sub) = item {
                walk(sub, max);
            }
        }
    }
    let mut max = 0;
    walk(doc.as_table(), &mut max);
    max
}

/// The part of a table's prefix that does not belong to it: everything up
/// to and including its last blank line.
fn detached_part(prefix: &str) -> &str {
    let mut end = 0;
    let mut pos = 0;
    for line in prefix.split_inclusive('\n') {
        pos += line.len();
        if line.trim().is_empty() && line.ends_with('\n') {
            end = pos;
        }
    }
    &prefix[..end]
}

/// Puts `text` (comments that were above a removed table) back where it
/// was: before the next table, or at the end of the file if none follows.
fn reattach(doc: &mut DocumentMut, removed_at: Option<isize>, text: &str) {
    let after = removed_at.unwrap_or(isize::MAX);
    let next = doc
        .get_mut("profile")
        .and_then(Item::as_table_mut)
        .and_then(|profiles| {
            profiles
                .iter_mut()
                .filter_map(|(_, item)| item.as_table_mut())
                .filter(|t| t.position().is_some_and(|p| p > after))
                .min_by_key(|t| t.position())
        });
    match next {
        Some(t) => {
            let old = t.decor().prefix().and_then(|p| p.as_str()).unwrap_or("");
            // `text` already ends with the blank line that kept it apart.
            let old = old.trim_start_matches(|c: char| c.is_whitespace());
            let new = format!("{text}{old}");
            t.decor_mut().set_prefix(new);
        }
        None => {
            let old = doc.trailing().as_str().unwrap_or("").to_owned();
            doc.set_trailing(format!("{}\n{old}", text.trim_end()));
        }
    }
}

/// Sets `key` to `value`, keeping the old value's surrounding whitespace and
/// trailing comment.
fn put(table: &mut dyn toml_edit::TableLike, key: &str, mut value: Value) {
    if let Some(old) = table.get(key).and_then(Item::as_value) {
        *value.decor_mut() = old.decor().clone();
    }
    table.insert(key, Item::Value(value));
}

/// A JSON option value as TOML; objects are refused (no key takes one).
fn to_toml(key: &str, v: &Json) -> anyhow::Result<Value> {
    Ok(match v {
        Json::String(s) => Value::from(s.as_str()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(
                n.as_f64()
                    .ok_or_else(|| anyhow!("options.{key}: {n} is not a usable number"))?,
            ),
        },
        Json::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| to_toml(key, i))
                .collect::<Result<_, _>>()?,
        ),
        Json::Null => return Err(anyhow!("options.{key}: null is only allowed at the top")),
        Json::Object(_) => {
            return Err(anyhow!(
                "options.{key}: an object is not a valid value for any profile key"
            ));
        }
    })
}

/// Validates `text` with the profile loader, then replaces `path` with it
/// atomically (a temp file in the same directory, 0600, synced, renamed).
fn write_validated(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let file_name = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config.toml".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(&dir)
        .map_err(|e| anyhow!("cannot write in {}: {e}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| anyhow!("cannot write {}: {e}", tmp.path().display()))?;
    if let Err(e) = profile::load(tmp.path(), true) {
        // The loader names the temp file; name the real one instead.
        let tmp_name = tmp
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let e = e.to_string().replace(&tmp_name, &file_name);
        return Err(anyhow!("not written, the profile would not load: {e}"));
    }
    tmp.persist(path)
        .map_err(|e| anyhow!("cannot replace {}: {}", path.display(), e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edit of profile `name` to `destination` with nothing else.
    fn edit(name: &str, destination: &str) -> ProfileEdit {
        ProfileEdit {
            name: name.into(),
            destination: destination.into(),
            ..Default::default()
        }
    }

    /// Two profiles MCP created, commented on by a person since.
    const FILE: &str = "\
# My tunnels, kept by hand.

# The lab box.
[profile.lab]
mcp_created = true
destination = \"alice@lab.example\"
port = 2200  # not 22
# forwards below
remote_forwards = [\"2222:localhost:22\"]

[profile.prod]
mcp_created = true
destination = \"prod.example\" # the real one
";

    /// A person's profile, and one MCP created that a person took over.
    const PERSON: &str = "\
# Mine.
[profile.mine]
destination = \"me@h.example\" # keep

[profile.taken]
mcp_created = true
destination = \"t.example\"
listen = \"127.0.0.1:2301\"
mcp_exec = true
";

    #[test]
    fn every_profile_key_is_classified() {
        for k in profile::keys() {
            let mcp = mcp_may_write(k);
            let person = PERSON_KEYS.iter().any(|(p, _)| p == k);
            assert!(
                mcp ^ person,
                "profile key '{k}' must be in exactly one of MCP_KEYS and PERSON_KEYS"
            );
        }
        let listed = MCP_KEYS.iter().chain(profile::TUNING_KEYS);
        for k in listed.chain(PERSON_KEYS.iter().map(|(k, _)| k)) {
            assert!(profile::keys().contains(k), "'{k}' is no profile key");
        }
    }

    #[test]
    fn person_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        for (key, val) in [
            ("on_event", Json::from("touch /tmp/pwned")),
            ("mcp_exec", Json::from(true)),
            ("authorized_keys", Json::from("/tmp/k")),
            ("listen", Json::from("127.0.0.1:2999")),
            ("known_hosts", Json::from("/dev/null")),
            ("accept_new", Json::from(true)),
            ("copy_dir", Json::from("/")),
            ("mcp_created", Json::Null),
        ] {
            let mut e = edit("mcp-new", "h.example");
            e.options.insert(key.into(), val);
            let err = set_profile(&path, &e).unwrap_err().to_string();
            assert!(err.contains("only a person sets"), "{key}: {err}");
        }
        assert!(!path.exists(), "nothing written");
        for dest in ["a$(touch /tmp/x).corp", "-oFoo", "h;id", "u`id`@h"] {
            let err = set_profile(&path, &edit("mcp-new", dest))
                .unwrap_err()
                .to_string();
            assert!(err.contains("holds none of"), "{dest}: {err}");
        }
        let mut e = edit("mcp-new", "h.example");
        e.options.insert("user".into(), Json::from("x$(id)"));
        let err = set_profile(&path, &e).unwrap_err().to_string();
        assert!(err.contains("options.user"), "{err}");
        assert!(!path.exists(), "nothing written");
        for (kind, spec) in [
            ("local", "0.0.0.0:8080:db:5432"),
            ("local", "/tmp/s.sock:db:5432"),
            ("remote", "2375:/var/run/docker.sock"),
        ] {
            let mut e = edit("mcp-new", "h.example");
            let l = Some(vec![spec.to_owned()]);
            if kind == "local" {
                e.local_forwards = l;
            } else {
                e.remote_forwards = l;
            }
            let err = set_profile(&path, &e).unwrap_err().to_string();
            assert!(err.contains("loopback"), "{spec}: {err}");
        }
        let mut e = edit("mcp-new", "h.example");
        e.local_forwards = Some(vec!["127.0.0.1:8080:db:5432".into(), "8081:db:5432".into()]);
        e.remote_forwards = Some(vec!["2222:localhost:22".into()]);
        assert!(set_profile(&path, &e).unwrap().created);
    }

    #[test]
    fn a_persons_profiles_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, PERSON).unwrap();
        for name in ["mine", "taken"] {
            let err = set_profile(&path, &edit(name, "x.example"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("MCP"), "{err}");
            let err = remove_profile(&path, name).unwrap_err().to_string();
            assert!(err.contains("MCP"), "{err}");
            assert!(owned(&path, name).is_err());
        }
        assert!(!owned(&path, "none").unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), PERSON);
    }

    #[test]
    fn new_names_take_the_reserved_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FILE).unwrap();
        let err = set_profile(&path, &edit("staging", "h.example"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("named mcp-") && err.contains("try mcp-staging"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
        // Profiles MCP already owns keep their names and stay its own.
        assert!(
            !set_profile(&path, &edit("prod", "p2.example"))
                .unwrap()
                .created
        );
        assert!(
            set_profile(&path, &edit("mcp-staging", "h.example"))
                .unwrap()
                .created
        );
    }

    #[test]
    fn update_keeps_the_rest_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FILE).unwrap();
        let mut e = edit("lab", "bob@lab.example");
        e.options.insert("port".into(), 2201.into());
        e.options.insert("keepalive".into(), 5.into());
        let w = set_profile(&path, &e).unwrap();
        assert!(!w.created);
        assert!(owned(&path, "lab").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let want = FILE
            .replace("alice@lab", "bob@lab")
            .replace("port = 2200  # not 22\n", "port = 2201  # not 22\n")
            .replace(
                "remote_forwards = [\"2222:localhost:22\"]\n",
                "remote_forwards = [\"2222:localhost:22\"]\nkeepalive = 5\n",
            );
        assert_eq!(text, want);
        assert_eq!(w.settings["port"], 2201);
        assert_eq!(w.settings["keepalive"], 5);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn create_appends_a_table_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let mut e = edit("mcp-new", "h.example");
        e.remote_forwards = Some(vec!["1:h:2".into(), "3:h:4".into()]);
        let w = set_profile(&path, &e).unwrap();
        assert!(w.created);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(ADDED_COMMENT), "{text}");
        assert!(text.contains("[profile.mcp-new]\n"), "{text}");
        let cf = profile::load(&path, true).unwrap();
        assert_eq!(cf.get("mcp-new").unwrap().remote_forwards.len(), 2);

        std::fs::write(&path, FILE).unwrap();
        set_profile(&path, &edit("mcp-zz", "z.example")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(FILE), "{text}");
        assert!(
            text.ends_with("[profile.mcp-zz]\nmcp_created = true\ndestination = \"z.example\"\n"),
            "{text}"
        );
    }

    #[test]
    fn invalid_edits_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FILE).unwrap();
        let mut e = edit("lab", "h");
        e.options.insert("listne".into(), "127.0.0.1:1".into());
        let err = set_profile(&path, &e).unwrap_err().to_string();
        assert!(err.contains("config.toml:"), "{err}");
        assert!(err.contains("did you mean 'listen'"), "{err}");
        assert!(!err.contains(".config.toml."), "{err}");
        let mut e = edit("lab", "h");
        e.remote_forwards = Some(vec!["2222:localhost".into()]);
        let err = set_profile(&path, &e).unwrap_err().to_string();
        assert!(err.contains("remote_forwards"), "{err}");
        let err = set_profile(&path, &edit("a b", "h"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("may only use"), "{err}");
        let err = set_profile(&path, &edit("-c.evil", "h"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("must not start with '-'"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 1, "temp files left behind");
    }

    #[test]
    fn remove_keeps_detached_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FILE).unwrap();
        assert!(remove_profile(&path, "lab").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "# My tunnels, kept by hand.\n\n\
             [profile.prod]\nmcp_created = true\ndestination = \"prod.example\" # the real one\n"
        );
        assert!(!remove_profile(&path, "lab").unwrap());
        assert!(remove_profile(&path, "prod").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "# My tunnels, kept by hand.\n");
        assert!(profile::load(&path, true).unwrap().profiles.is_empty());
    }

    #[test]
    fn create_then_remove_restores_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FILE).unwrap();
        set_profile(&path, &edit("mcp-zz", "z.example")).unwrap();
        assert!(remove_profile(&path, "mcp-zz").unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), FILE);
    }

    #[test]
    fn remove_the_last_of_several() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FILE).unwrap();
        assert!(remove_profile(&path, "prod").unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let want = FILE.split("\n[profile.prod]").next().unwrap();
        assert_eq!(text, want);
    }
}

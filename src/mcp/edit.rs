//! Edits of the profiles file for `sshshim mcp`: add, update or remove one
//! `[profile.NAME]` table and leave every other byte of the file as it was,
//! comments included.
//!
//! The new text is validated by the same loader `sshshim up` uses
//! ([`crate::profile::load`]) before it replaces the file, atomically and
//! with mode 0600, so a bad edit never reaches the file.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use toml_edit::{DocumentMut, Item, Table, Value};

use crate::profile;

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

/// Comment placed above a table this module creates, so a person reading the
/// file knows where it came from.
const ADDED_COMMENT: &str = "# Added by `sshshim mcp` (tunnel_setup).\n";

/// Reads the file (a missing one is empty) and parses it for editing.
fn read_doc(path: &Path) -> Result<(String, DocumentMut), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: cannot read config file: {e}", path.display())),
    };
    let doc = text.parse::<DocumentMut>().map_err(|e| {
        format!(
            "{}: TOML syntax error, fix it by hand first: {}",
            path.display(),
            e.message()
        )
    })?;
    Ok((text, doc))
}

/// Edits the file so profile `edit.name` holds the given settings (creating
/// it, and the file, if needed). Keys not mentioned are kept.
pub fn set_profile(path: &Path, edit: &ProfileEdit) -> Result<Written, String> {
    crate::spec::check_name(&edit.name)?;
    let path = real_path(path);
    let (_, mut doc) = read_doc(&path)?;
    let profiles = profiles_table(&mut doc, &path)?;
    let created = !profiles.contains_key(&edit.name);
    if created {
        let mut t = Table::new();
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
            format!(
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
pub fn remove_profile(path: &Path, name: &str) -> Result<bool, String> {
    let path = real_path(path);
    let (_, mut doc) = read_doc(&path)?;
    let Some(profiles) = doc.get_mut("profile").and_then(Item::as_table_like_mut) else {
        return Ok(false);
    };
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
pub fn all_settings(path: &Path) -> Result<serde_json::Map<String, Json>, String> {
    let (text, _) = read_doc(path)?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| format!("{}: TOML syntax error: {}", path.display(), e.message()))?;
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
) -> Result<&'d mut dyn toml_edit::TableLike, String> {
    if !doc.contains_key("profile") {
        let mut t = Table::new();
        t.set_implicit(true);
        doc.insert("profile", Item::Table(t));
    }
    doc.get_mut("profile")
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| {
            format!(
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
fn to_toml(key: &str, v: &Json) -> Result<Value, String> {
    Ok(match v {
        Json::String(s) => Value::from(s.as_str()),
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::from(i),
            None => Value::from(
                n.as_f64()
                    .ok_or_else(|| format!("options.{key}: {n} is not a usable number"))?,
            ),
        },
        Json::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| to_toml(key, i))
                .collect::<Result<_, _>>()?,
        ),
        Json::Null => return Err(format!("options.{key}: null is only allowed at the top")),
        Json::Object(_) => {
            return Err(format!(
                "options.{key}: an object is not a valid value for any profile key"
            ));
        }
    })
}

/// Validates `text` with the profile loader, then replaces `path` with it
/// atomically (a temp file in the same directory, 0600, synced, renamed).
fn write_validated(path: &Path, text: &str) -> Result<(), String> {
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
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
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
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.path().display()))?;
    if let Err(e) = profile::load(tmp.path(), true) {
        // The loader names the temp file; name the real one instead.
        let tmp_name = tmp
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let e = e.replace(&tmp_name, &file_name);
        return Err(format!("not written, the profile would not load: {e}"));
    }
    tmp.persist(path)
        .map_err(|e| format!("cannot replace {}: {}", path.display(), e.error))?;
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

    const FILE: &str = "\
# My tunnels, kept by hand.

# The lab box.
[profile.lab]
destination = \"alice@lab.example\"
port = 2200  # not 22
# forwards below
remote_forwards = [\"2222:localhost:22\"]

[profile.prod]
destination = \"prod.example\" # the real one
";

    #[test]
    fn update_keeps_the_rest_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, FILE).unwrap();
        let mut e = edit("lab", "bob@lab.example");
        e.options.insert("port".into(), 2201.into());
        e.options.insert("mcp_exec".into(), true.into());
        let w = set_profile(&path, &e).unwrap();
        assert!(!w.created);
        let text = std::fs::read_to_string(&path).unwrap();
        let want = FILE
            .replace("alice@lab", "bob@lab")
            .replace("port = 2200  # not 22\n", "port = 2201  # not 22\n")
            .replace(
                "remote_forwards = [\"2222:localhost:22\"]\n",
                "remote_forwards = [\"2222:localhost:22\"]\nmcp_exec = true\n",
            );
        assert_eq!(text, want);
        assert_eq!(w.settings["port"], 2201);
        assert_eq!(w.settings["mcp_exec"], true);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn create_appends_a_table_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config.toml");
        let mut e = edit("new", "h.example");
        e.remote_forwards = Some(vec!["1:h:2".into(), "3:h:4".into()]);
        let w = set_profile(&path, &e).unwrap();
        assert!(w.created);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(ADDED_COMMENT), "{text}");
        assert!(text.contains("[profile.new]\n"), "{text}");
        let cf = profile::load(&path, true).unwrap();
        assert_eq!(cf.get("new").unwrap().remote_forwards.len(), 2);

        std::fs::write(&path, FILE).unwrap();
        set_profile(&path, &edit("zz", "z.example")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(FILE), "{text}");
        assert!(
            text.ends_with("[profile.zz]\ndestination = \"z.example\"\n"),
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
        let err = set_profile(&path, &e).unwrap_err();
        assert!(err.contains("config.toml:"), "{err}");
        assert!(err.contains("did you mean 'listen'"), "{err}");
        assert!(!err.contains(".config.toml."), "{err}");
        let mut e = edit("lab", "h");
        e.remote_forwards = Some(vec!["2222:localhost".into()]);
        let err = set_profile(&path, &e).unwrap_err();
        assert!(err.contains("remote_forwards"), "{err}");
        let err = set_profile(&path, &edit("a b", "h")).unwrap_err();
        assert!(err.contains("may only use"), "{err}");
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
             [profile.prod]\ndestination = \"prod.example\" # the real one\n"
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
        set_profile(&path, &edit("zz", "z.example")).unwrap();
        assert!(remove_profile(&path, "zz").unwrap());
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

//! Whether forwarded TCP connections may go through the helper: only
//! when sshd itself would open them. The helper connects on the user's
//! behalf, so it must not skip sshd's `AllowTcpForwarding`, `PermitOpen`,
//! `DisableForwarding`, nor an authorized key's `no-port-forwarding`,
//! `permitopen` or `restrict` (sshd.c `server_request_direct_tcpip`
//! checks all of them). Fails closed: whatever cannot be read or might
//! restrict forwarding for some login gives "no" with the reason.
//!
//! Remote forwards (`PermitListen`) stay with sshd: the helper never
//! listens.

use std::path::{Path, PathBuf};

use super::sshd::{self, split_word};
use crate::paths;

/// The sshd_config keywords that decide (lower case). A keyword's first
/// value wins, as in sshd.
const WATCHED: [&str; 6] = [
    "allowtcpforwarding",
    "disableforwarding",
    "permitopen",
    "authorizedkeysfile",
    "authorizedkeyscommand",
    "trustedusercakeys",
];

/// Includes nested deeper than this are refused (sshd's own limit is 16).
const MAX_DEPTH: usize = 16;

/// What sshd's configuration says, as far as forwarding goes.
#[derive(Debug, Default)]
struct Settings {
    /// The first global value of each [`WATCHED`] keyword.
    values: [Option<String>; 6],
    /// The first watched keyword met inside a `Match` block.
    in_match: Option<String>,
}

impl Settings {
    /// The first global value of `key`.
    fn get(&self, key: &str) -> Option<&str> {
        let i = WATCHED.iter().position(|k| *k == key)?;
        self.values[i].as_deref()
    }
}

/// `Ok(())` when forwards may go through the helper, else why not.
pub fn tcp_forwarding() -> Result<(), String> {
    let path = sshd::config_path();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut s = Settings::default();
    scan(&text, &read_include, 0, false, &mut s)?;
    verdict(&s)?;
    let home = paths::home_dir().ok_or("no home directory")?;
    let files = s.get("authorizedkeysfile").unwrap_or(DEFAULT_KEYS);
    for f in key_files(files, &home, &paths::current_user()) {
        // A missing file restricts nothing; an unreadable one might.
        match std::fs::read_to_string(&f) {
            Ok(text) => keys_verdict(&text).map_err(|why| format!("{}: {why}", f.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", f.display())),
        }
    }
    Ok(())
}

/// sshd's default `AuthorizedKeysFile`.
const DEFAULT_KEYS: &str = ".ssh/authorized_keys .ssh/authorized_keys2";

/// Reads a configuration's text into `s`, `Include`d files in place;
/// `matched` once inside a `Match` block (it lasts to the file's end).
fn scan(
    text: &str,
    read: &dyn Fn(&str) -> Result<Vec<String>, String>,
    depth: usize,
    mut matched: bool,
    s: &mut Settings,
) -> Result<(), String> {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = split_word(line);
        let key = key.to_ascii_lowercase();
        if key == "match" {
            matched = true;
            continue;
        }
        if key == "include" {
            if depth >= MAX_DEPTH {
                return Err("Include nested too deep".into());
            }
            for pattern in rest.split_whitespace() {
                for included in read(pattern)? {
                    scan(&included, read, depth + 1, matched, s)?;
                }
            }
            continue;
        }
        let Some(i) = WATCHED.iter().position(|k| *k == key) else {
            continue;
        };
        if matched {
            s.in_match
                .get_or_insert_with(|| split_word(line).0.to_string());
        } else if s.values[i].is_none() {
            s.values[i] = Some(rest.trim().to_string());
        }
    }
    Ok(())
}

/// Whether the configuration lets every login open forwards.
fn verdict(s: &Settings) -> Result<(), String> {
    if let Some(key) = &s.in_match {
        return Err(format!("a Match block sets {key}"));
    }
    let allow = s.get("allowtcpforwarding").unwrap_or("yes");
    if !["yes", "all", "local"]
        .iter()
        .any(|v| allow.eq_ignore_ascii_case(v))
    {
        return Err(format!("AllowTcpForwarding {allow}"));
    }
    let disable = s.get("disableforwarding").unwrap_or("no");
    if !disable.eq_ignore_ascii_case("no") {
        return Err(format!("DisableForwarding {disable}"));
    }
    let open = s.get("permitopen").unwrap_or("any");
    if !open.eq_ignore_ascii_case("any") {
        return Err(format!("PermitOpen {open}"));
    }
    if let Some(cmd) = s.get("authorizedkeyscommand")
        && !cmd.eq_ignore_ascii_case("none")
    {
        return Err("AuthorizedKeysCommand may restrict a key's forwarding".into());
    }
    if let Some(ca) = s.get("trustedusercakeys")
        && !ca.eq_ignore_ascii_case("none")
    {
        return Err("TrustedUserCAKeys: a certificate may not permit forwarding".into());
    }
    Ok(())
}

/// The authorized keys files `AuthorizedKeysFile` names for us: `%h`,
/// `%u`, `%%` expanded, relative ones under the home directory.
fn key_files(value: &str, home: &Path, user: &str) -> Vec<PathBuf> {
    if value.trim().eq_ignore_ascii_case("none") {
        return Vec::new();
    }
    value
        .split_whitespace()
        .map(|pattern| {
            let mut out = String::new();
            let mut chars = pattern.chars();
            while let Some(c) = chars.next() {
                match (c, chars.clone().next()) {
                    ('%', Some('h')) => out.push_str(&home.to_string_lossy()),
                    ('%', Some('u')) => out.push_str(user),
                    ('%', Some('%')) => out.push('%'),
                    _ => {
                        out.push(c);
                        continue;
                    }
                }
                chars.next();
            }
            home.join(out)
        })
        .collect()
}

/// Whether no key in an authorized_keys text restricts forwarding.
fn keys_verdict(text: &str) -> Result<(), String> {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let opts = key_options(line);
        let has = |o: &str| opts.iter().any(|x| x.eq_ignore_ascii_case(o));
        let has_prefix = |p: &str| {
            opts.iter()
                .any(|x| x.len() >= p.len() && x[..p.len()].eq_ignore_ascii_case(p))
        };
        let why = if has("no-port-forwarding") {
            "a key has no-port-forwarding"
        } else if has("restrict") && !has("port-forwarding") {
            "a key has restrict"
        } else if has_prefix("permitopen=") {
            "a key has permitopen"
        } else if has("cert-authority") {
            "a certificate authority's certificates may not permit forwarding"
        } else {
            continue;
        };
        return Err(why.into());
    }
    Ok(())
}

/// The options before a key (comma-separated, double quotes protect
/// commas and blanks), or none when the line starts with the key type.
fn key_options(line: &str) -> Vec<String> {
    let first = split_word(line).0;
    let is_type = ["ssh-", "ecdsa-", "sk-"]
        .iter()
        .any(|p| first.starts_with(p));
    if is_type {
        return Vec::new();
    }
    let mut opts = vec![String::new()];
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => opts.push(String::new()),
            c if c.is_whitespace() && !quoted => break,
            c => {
                if let Some(o) = opts.last_mut() {
                    o.push(c);
                }
            }
        }
    }
    opts
}

/// The texts of the files an `Include` pattern names (see
/// [`sshd::include_paths`]); fails for a file that exists but cannot be
/// read.
fn read_include(pattern: &str) -> Result<Vec<String>, String> {
    sshd::include_paths(pattern)
        .iter()
        .map(|p| {
            std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resume::remote::sshd::wildcard;

    /// The verdict for a configuration text (includes from `files`).
    fn config(text: &str, files: &[(&str, &str)]) -> Result<(), String> {
        let read = |p: &str| -> Result<Vec<String>, String> {
            Ok(files
                .iter()
                .filter(|(name, _)| wildcard(p.as_bytes(), name.as_bytes()))
                .map(|(_, t)| t.to_string())
                .collect())
        };
        let mut s = Settings::default();
        scan(text, &read, 0, false, &mut s)?;
        verdict(&s)
    }

    #[test]
    fn sshd_config_settings_decide() {
        assert_eq!(config("Port 22\n", &[]), Ok(()));
        assert_eq!(config("AllowTcpForwarding local\n", &[]), Ok(()));
        assert_eq!(
            config("allowtcpforwarding=ALL\nPermitOpen any\n", &[]),
            Ok(())
        );
        assert_eq!(
            config("AllowTcpForwarding remote\nAllowTcpForwarding yes\n", &[]),
            Err("AllowTcpForwarding remote".into()),
            "the first value wins"
        );
        assert_eq!(
            config("AllowTcpForwarding yes\nAllowTcpForwarding no\n", &[]),
            Ok(())
        );
        assert_eq!(
            config("DisableForwarding yes\n", &[]),
            Err("DisableForwarding yes".into())
        );
        assert_eq!(
            config("PermitOpen localhost:5432 db:5432\n", &[]),
            Err("PermitOpen localhost:5432 db:5432".into())
        );
        assert_eq!(
            config("Match User bob\n  AllowTcpForwarding no\n", &[]),
            Err("a Match block sets AllowTcpForwarding".into())
        );
        assert!(config("Match Group x\n  X11Forwarding no\n", &[]).is_ok());
        assert!(config("TrustedUserCAKeys /etc/ssh/ca.pub\n", &[]).is_err());
        assert!(config("AuthorizedKeysCommand /bin/keys %u\n", &[]).is_err());
        assert!(config("AuthorizedKeysCommand none\n", &[]).is_ok());
    }

    #[test]
    fn includes_are_read_in_place() {
        let files = [
            ("sshd_config.d/10-a.conf", "AllowTcpForwarding no\n"),
            ("other.conf", "Match all\nPermitOpen none\n"),
        ];
        assert_eq!(
            config(
                "Include sshd_config.d/*.conf\nAllowTcpForwarding yes\n",
                &files
            ),
            Err("AllowTcpForwarding no".into())
        );
        assert_eq!(
            config(
                "AllowTcpForwarding yes\nInclude sshd_config.d/*.conf\n",
                &files
            ),
            Ok(())
        );
        assert_eq!(
            config("Include other.conf\n", &files),
            Err("a Match block sets PermitOpen".into())
        );
        // An Include inside a Match block is conditional too.
        assert_eq!(
            config("Match User x\nInclude sshd_config.d/*.conf\n", &files),
            Err("a Match block sets AllowTcpForwarding".into())
        );
        let deep = |p: &str| -> Result<Vec<String>, String> { Ok(vec![format!("Include {p}\n")]) };
        let mut s = Settings::default();
        assert!(scan("Include x\n", &deep, 0, false, &mut s).is_err());
    }

    #[test]
    fn authorized_keys_options_decide() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIL me@host";
        assert_eq!(keys_verdict(&format!("# c\n{key}\n")), Ok(()));
        assert_eq!(
            keys_verdict(&format!("from=\"10.0.0.1,10.0.0.2\",no-pty {key}\n")),
            Ok(())
        );
        for (opts, bad) in [
            ("no-port-forwarding", true),
            ("restrict", true),
            ("restrict,port-forwarding", false),
            ("permitopen=\"db:5432\"", true),
            ("PermitOpen=\"db:5432\"", true),
            ("cert-authority", true),
            ("command=\"echo no-port-forwarding, here\"", false),
        ] {
            let r = keys_verdict(&format!("{key}\n{opts} {key}\n"));
            assert_eq!(r.is_err(), bad, "{opts}: {r:?}");
        }
    }

    #[test]
    fn authorized_keys_files_expand() {
        let home = Path::new("/home/al");
        assert_eq!(
            key_files(DEFAULT_KEYS, home, "al"),
            [
                PathBuf::from("/home/al/.ssh/authorized_keys"),
                PathBuf::from("/home/al/.ssh/authorized_keys2")
            ]
        );
        assert_eq!(
            key_files("/etc/keys/%u %h/k%%", home, "al"),
            [PathBuf::from("/etc/keys/al"), PathBuf::from("/home/al/k%")]
        );
        assert!(key_files("none", home, "al").is_empty());
    }
}

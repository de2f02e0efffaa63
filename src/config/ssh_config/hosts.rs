//! The Host aliases ssh_config defines, for shell completion.
//!
//! `ssh -G` answers for one host and cannot list them, so this reads the
//! files itself, as the shells' own `ssh` completions do: the `Host` lines
//! of the user's file (or `-F FILE`) and, without `-F`, the system file,
//! following `Include`. Only names that can be typed as they are: patterns
//! with `*` or `?` and negations (`!name`) are left out. Never used to
//! resolve anything: a stray or unreadable file only costs candidates.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::paths::{expand_tilde, home_dir};

/// How deep `Include` may nest (OpenSSH's READCONF_MAX_DEPTH).
const MAX_DEPTH: usize = 16;

/// The Host aliases of `file` (as `ssh -F file`), else of `~/.ssh/config`
/// and the system file; sorted, each once.
pub fn host_aliases(file: Option<&Path>) -> Vec<String> {
    let user_dir = home_dir().map(|h| h.join(".ssh"));
    let mut names = BTreeSet::new();
    match file {
        Some(f) => read(&expand_tilde(f), user_dir.as_deref(), 0, &mut names),
        None => {
            if let Some(dir) = &user_dir {
                read(&dir.join("config"), Some(dir), 0, &mut names);
            }
            read(
                Path::new(super::SYSTEM_CONFIG),
                Path::new(super::SYSTEM_CONFIG).parent(),
                0,
                &mut names,
            );
        }
    }
    names.into_iter().collect()
}

/// Adds the aliases of one file and of the files it includes; relative
/// `Include` paths are taken from `include_base` (`~/.ssh` for user files,
/// `/etc/ssh` for the system's, as OpenSSH does).
fn read(path: &Path, include_base: Option<&Path>, depth: usize, names: &mut BTreeSet<String>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let Some((keyword, args)) = split_line(line) else {
            continue;
        };
        if keyword.eq_ignore_ascii_case("host") {
            names.extend(
                args.into_iter()
                    .filter(|a| !a.is_empty() && !a.contains(['*', '?', '!'])),
            );
        } else if keyword.eq_ignore_ascii_case("include") {
            for pattern in args {
                let pattern = expand_tilde(Path::new(&pattern));
                let pattern = match include_base {
                    Some(base) if pattern.is_relative() => base.join(pattern),
                    _ => pattern,
                };
                for f in expand_glob(&pattern) {
                    read(&f, include_base, depth + 1, names);
                }
            }
        }
    }
}

/// Splits a config line into its keyword and arguments: `Keyword args`,
/// `Keyword=args` or `Keyword = args`, double quotes grouping words.
/// `None` for blank lines and comments.
fn split_line(line: &str) -> Option<(String, Vec<String>)> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let end = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let (keyword, rest) = line.split_at(end);
    let rest = rest.trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest);
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in rest.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '#' if !quoted && !in_word => break,
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    args.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        args.push(cur);
    }
    Some((keyword.to_owned(), args))
}

/// The files an `Include` pattern names: `*` and `?` match within one path
/// component, as glob(3) does; sorted, as OpenSSH reads them.
fn expand_glob(pattern: &Path) -> Vec<PathBuf> {
    let mut found = vec![PathBuf::new()];
    for comp in pattern.components() {
        let part = comp.as_os_str();
        let Some(pat) = part.to_str().filter(|p| p.contains(['*', '?'])) else {
            found.iter_mut().for_each(|f| f.push(part));
            continue;
        };
        let mut next = Vec::new();
        for dir in &found {
            let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                // Like glob(3), a wildcard does not match a leading dot.
                if let Some(n) = name.to_str()
                    && !n.starts_with('.')
                    && wildcard(pat.as_bytes(), n.as_bytes())
                {
                    next.push(dir.join(n));
                }
            }
        }
        next.sort();
        found = next;
    }
    found.into_iter().filter(|f| f.is_file()).collect()
}

/// Whether a file name matches `pat` (`*`, `?`; case-sensitive, unlike
/// host patterns). Backtracks to the last `*` only, so it is linear.
fn wildcard(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pat.len() && (pat[p] == b'?' || pat[p] == name[n]) {
            p += 1;
            n += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_like_openssh() {
        let s = |l: &str| split_line(l);
        assert_eq!(s("  # comment"), None);
        assert_eq!(s(""), None);
        assert_eq!(
            s("Host a b  c # trailing"),
            Some(("Host".into(), vec!["a".into(), "b".into(), "c".into()]))
        );
        assert_eq!(s("host=x"), Some(("host".into(), vec!["x".into()])));
        assert_eq!(
            s("Host = x y"),
            Some(("Host".into(), vec!["x".into(), "y".into()]))
        );
        assert_eq!(
            s("Include \"/p/with space/*.conf\" other"),
            Some((
                "Include".into(),
                vec!["/p/with space/*.conf".into(), "other".into()]
            ))
        );
    }

    #[test]
    fn wildcards() {
        assert!(wildcard(b"*.conf", b"a.conf"));
        assert!(wildcard(b"a?c", b"abc"));
        assert!(!wildcard(b"*.conf", b"a.CONF"));
        assert!(!wildcard(b"*.conf", b"a.conf~"));
        assert!(wildcard(b"*", b""));
    }

    #[test]
    fn aliases_follow_includes_and_skip_patterns() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("conf.d")).unwrap();
        std::fs::write(
            d.join("config"),
            format!(
                "Host alpha beta *.wild !neg q?\n  HostName x\n\
                 Include {}/conf.d/*.conf\nMatch host foo\nHost=gamma\n\
                 Include {}/missing\nInclude {}/config\n",
                d.display(),
                d.display(),
                d.display()
            ),
        )
        .unwrap();
        std::fs::write(d.join("conf.d/1.conf"), "Host delta alpha\n").unwrap();
        std::fs::write(d.join("conf.d/skip.txt"), "Host nope\n").unwrap();
        std::fs::write(d.join("conf.d/.hidden.conf"), "Host hidden\n").unwrap();
        // Includes itself: bounded by MAX_DEPTH.
        let got = host_aliases(Some(&d.join("config")));
        assert_eq!(got, ["alpha", "beta", "delta", "gamma"]);
    }
}

//! What sshd's configuration says about subsystems: the helper runs a
//! subsystem's program itself, as sshd would.
//!
//! The configuration is the file the sshd above us was started with
//! (`-f PATH`, found by walking our ancestors in /proc), else
//! `/etc/ssh/sshd_config`.

use std::path::PathBuf;

/// The system's sshd configuration.
const DEFAULT_CONFIG: &str = "/etc/ssh/sshd_config";

/// How sshd runs a subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subsystem {
    /// `internal-sftp`: inside sshd, no program the helper could run.
    Internal,
    /// A command line, which sshd runs with the user's shell `-c`.
    Program(String),
}

/// The subsystem `name` as sshd's configuration defines it, if it does.
pub fn subsystem(name: &str) -> Option<Subsystem> {
    let text = std::fs::read_to_string(config_path()).ok()?;
    find_subsystem(&text, name)
}

/// The configuration file of the sshd we run under.
pub fn config_path() -> PathBuf {
    ancestors_config().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// The `-f` file of the nearest sshd among our ancestors, when readable.
fn ancestors_config() -> Option<PathBuf> {
    // SAFETY: getppid cannot fail.
    let mut pid = unsafe { libc::getppid() } as u32;
    for _ in 0..64 {
        if pid <= 1 {
            break;
        }
        let proc = PathBuf::from(format!("/proc/{pid}"));
        if let Ok(cmdline) = std::fs::read(proc.join("cmdline"))
            && let Some(f) = config_from_cmdline(&cmdline)
        {
            // A relative path is relative to sshd's working directory.
            let f = if f.is_absolute() {
                f
            } else {
                std::fs::read_link(proc.join("cwd")).ok()?.join(f)
            };
            if std::fs::File::open(&f).is_ok() {
                return Some(f);
            }
        }
        pid = parent_of(&std::fs::read_to_string(proc.join("stat")).ok()?)?;
    }
    None
}

/// The parent pid in the text of /proc/PID/stat.
fn parent_of(stat: &str) -> Option<u32> {
    // The command name may hold spaces and parentheses: fields resume
    // after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The `-f` argument of an sshd command line (/proc/PID/cmdline), if the
/// process is an sshd. sshd rewrites its title (`sshd: /usr/sbin/sshd -D
/// -f /etc/x [listener] ...`) into one string, so each argument is also
/// split at spaces (a config path with spaces is missed there).
fn config_from_cmdline(cmdline: &[u8]) -> Option<PathBuf> {
    let text = String::from_utf8_lossy(cmdline);
    let words: Vec<&str> = text
        .split('\0')
        .flat_map(|a| a.split_whitespace())
        .collect();
    let first = words.first()?;
    let program = first.rsplit('/').next().unwrap_or(first);
    if !program.starts_with("sshd") {
        return None;
    }
    let mut it = words.iter();
    while let Some(w) = it.next() {
        if *w == "-f" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = w.strip_prefix("-f").filter(|p| !p.is_empty()) {
            return Some(PathBuf::from(p));
        }
    }
    None
}

/// The first `Subsystem NAME ...` line of a configuration's text, with
/// `Include`d files read in place (through `read`, which expands a
/// pattern to the files' texts). Lines inside `Match` blocks are ignored:
/// a Match block lasts to the end of its file, so the search of that file
/// stops there.
pub fn find_subsystem(text: &str, name: &str) -> Option<Subsystem> {
    find_in(text, name, &read_include, 0).flatten()
}

/// [`find_subsystem`]: `None` when this text (and what it includes) has
/// no line for `name`, `Some(found)` at the first one.
fn find_in(
    text: &str,
    name: &str,
    read: &dyn Fn(&str) -> Vec<String>,
    depth: usize,
) -> Option<Option<Subsystem>> {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, rest) = split_word(line);
        if key.eq_ignore_ascii_case("match") {
            break;
        }
        if key.eq_ignore_ascii_case("include") && depth < 16 {
            for pattern in rest.split_whitespace() {
                for included in read(pattern) {
                    if let Some(found) = find_in(&included, name, read, depth + 1) {
                        return Some(found);
                    }
                }
            }
            continue;
        }
        if !key.eq_ignore_ascii_case("subsystem") {
            continue;
        }
        let (sub, command) = split_word(rest);
        if sub != name {
            continue;
        }
        let command = command.trim();
        return Some(match command {
            "" => None,
            "internal-sftp" => Some(Subsystem::Internal),
            c if c.starts_with("internal-sftp ") => Some(Subsystem::Internal),
            c => Some(Subsystem::Program(c.to_string())),
        });
    }
    None
}

/// The texts of the files an `Include` pattern names (unreadable ones
/// are skipped).
fn read_include(pattern: &str) -> Vec<String> {
    include_paths(pattern)
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

/// The files an `Include` pattern names, in sorted order as sshd's glob
/// gives them; a relative pattern is under /etc/ssh. Wildcards (`*`,
/// `?`) are taken in the file name only.
pub(super) fn include_paths(pattern: &str) -> Vec<PathBuf> {
    let path = PathBuf::from("/etc/ssh").join(pattern);
    let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let file = file.to_string_lossy();
    if !file.contains(['*', '?']) {
        return if path.exists() {
            vec![path]
        } else {
            Vec::new()
        };
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            !n.starts_with('.') && wildcard(file.as_bytes(), n.as_bytes())
        })
        .map(|e| e.path())
        .collect();
    names.sort();
    names
}

/// Whether `name` matches the glob `pat` (`*` and `?` only).
pub(super) fn wildcard(pat: &[u8], name: &[u8]) -> bool {
    match (pat.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard(&pat[1..], name) || (!name.is_empty() && wildcard(pat, &name[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard(&pat[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => wildcard(&pat[1..], &name[1..]),
        _ => false,
    }
}

/// The first word of `s` (ended by whitespace or `=`, as sshd takes
/// keywords) and the rest after the separator.
pub(super) fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(|c: char| c.is_whitespace() || c == '=') {
        Some(i) => {
            let rest = s[i..].trim_start();
            let rest = rest.strip_prefix('=').unwrap_or(rest).trim_start();
            (&s[..i], rest)
        }
        None => (s, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsystem_lines() {
        let cfg = "# Subsystem sftp /commented\n\
                   Port 22\n\
                   subsystem  other /usr/bin/other\n\
                   Subsystem\tsftp\t/usr/lib/openssh/sftp-server -l INFO\n\
                   Subsystem sftp /second/ignored\n\
                   Match User bob\n\
                   Subsystem late /in/match\n";
        assert_eq!(
            find_subsystem(cfg, "sftp"),
            Some(Subsystem::Program(
                "/usr/lib/openssh/sftp-server -l INFO".into()
            ))
        );
        assert_eq!(
            find_subsystem(cfg, "other"),
            Some(Subsystem::Program("/usr/bin/other".into()))
        );
        assert_eq!(find_subsystem(cfg, "late"), None);
        assert_eq!(find_subsystem(cfg, "none"), None);
        assert_eq!(
            find_subsystem("Subsystem sftp internal-sftp -f AUTH\n", "sftp"),
            Some(Subsystem::Internal)
        );
        assert_eq!(
            find_subsystem("Subsystem=sftp internal-sftp\n", "sftp"),
            Some(Subsystem::Internal)
        );
    }

    #[test]
    fn includes_are_read_in_place_first_line_wins() {
        let read = |p: &str| match p {
            "sshd_config.d/*.conf" => vec![
                "# nothing\n".to_string(),
                "Match all\nSubsystem sftp /in/match\n".to_string(),
                "Subsystem sftp /from/include\n".to_string(),
            ],
            _ => Vec::new(),
        };
        let cfg = "Include sshd_config.d/*.conf\nSubsystem sftp /main\nSubsystem x /x\n";
        assert_eq!(
            find_in(cfg, "sftp", &read, 0),
            Some(Some(Subsystem::Program("/from/include".into())))
        );
        assert_eq!(
            find_in(cfg, "x", &read, 0),
            Some(Some(Subsystem::Program("/x".into())))
        );
        assert_eq!(find_in(cfg, "y", &read, 0), None);
        assert!(wildcard(b"*.conf", b"a.conf"));
        assert!(wildcard(b"a?c", b"abc"));
        assert!(!wildcard(b"*.conf", b"a.confx"));
    }

    #[test]
    fn sshd_command_lines() {
        let plain = b"/usr/sbin/sshd\0-D\0-e\0-f\0/tmp/x/sshd_config\0-p\x002222\0";
        assert_eq!(
            config_from_cmdline(plain),
            Some(PathBuf::from("/tmp/x/sshd_config"))
        );
        let joined = b"-f/etc/alt\0";
        assert_eq!(config_from_cmdline(joined), None, "not an sshd");
        let sshd_joined = b"sshd\0-f/etc/alt\0";
        assert_eq!(
            config_from_cmdline(sshd_joined),
            Some(PathBuf::from("/etc/alt"))
        );
        // The title sshd sets for itself.
        let title = b"sshd: /usr/sbin/sshd -D -f /srv/cfg [listener] 0 of 10-100 startups\0";
        assert_eq!(config_from_cmdline(title), Some(PathBuf::from("/srv/cfg")));
        assert_eq!(config_from_cmdline(b"sshd: alice@notty\0"), None);
        assert_eq!(config_from_cmdline(b"/bin/bash\0-f\0/x\0"), None);
    }

    #[test]
    fn stat_parent() {
        assert_eq!(parent_of("123 (a) b) S 77 123 123 0"), Some(77));
        assert_eq!(parent_of("garbage"), None);
        // Our own parent, as the kernel tells it.
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        // SAFETY: getppid cannot fail.
        assert_eq!(parent_of(&me), Some(unsafe { libc::getppid() } as u32));
    }
}

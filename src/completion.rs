//! Shell completion (bash, zsh, fish): the scripts `sshshim completions
//! SHELL` prints, and the candidates for destinations and profiles.
//!
//! Dynamic completion (clap_complete's `CompleteEnv`), not a static script:
//! the script the shell loads is a few lines that, at each Tab, run
//! `sshshim` itself with `SSHSHIM_COMPLETE` set and the words typed so far,
//! and clap completes from the same definitions that parse the command
//! line. So options can never drift from the binary (a static script is a
//! snapshot of the version that wrote it), and candidates that live in
//! files (profile names, ssh_config Host aliases, running profiles) come
//! from the same code `up` uses to read those files, honouring `-c` and
//! `-F` typed earlier on the line. A static script would need each shell's
//! script patched by hand to call a hidden helper for those, three ways of
//! doing the same thing to keep in step. The cost: one short process per
//! Tab (it reads two small files and exits), and `unstable-dynamic` is
//! pinned by Cargo.lock and covered by tests (tests/packaging.rs).

use std::ffi::OsString;
use std::path::PathBuf;

use clap_complete::engine::CompletionCandidate;
use clap_complete::env::{Bash, EnvCompleter, Fish, Zsh};

/// The variable that turns a run of `sshshim` into a completion request
/// (named for us, so a stray `COMPLETE` meant for another tool cannot).
pub const VAR: &str = "SSHSHIM_COMPLETE";

/// A shell `sshshim completions` writes a script for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shell {
    /// bash (with or without the bash-completion package).
    Bash,
    /// zsh (sourced, or as `_sshshim` in `$fpath`).
    Zsh,
    /// fish.
    Fish,
}

/// Answers a completion request and exits, if this run is one (`VAR` set);
/// otherwise returns at once. Call first thing in `main`: the answer is
/// the process's whole stdout.
pub fn complete_if_asked(cli: fn() -> clap::Command) {
    clap_complete::CompleteEnv::with_factory(cli)
        .var(VAR)
        .complete();
}

/// The script that registers completion for `sshshim` in `shell`; at each
/// Tab it runs `completer` (a command name found on `$PATH`, or a path).
pub fn script(shell: Shell, completer: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let adapter: &dyn EnvCompleter = match shell {
        Shell::Bash => &Bash,
        Shell::Zsh => &Zsh,
        Shell::Fish => &Fish,
    };
    adapter
        .write_registration(VAR, "sshshim", "sshshim", completer, &mut out)
        .expect("writing to a Vec cannot fail");
    if shell == Shell::Zsh {
        // Installed as `_sshshim` in $fpath, this file is the body of the
        // function compinit autoloads at the first Tab: the compdef above
        // only takes effect from the second, so complete this one too.
        // Sourced, `_sshshim` is not running and this does nothing (an
        // `if`, so sourcing still returns 0).
        out.extend_from_slice(
            b"\nif [[ ${funcstack[1]} = _sshshim ]]; then\n    \
              _clap_dynamic_completer_sshshim \"$@\"\nfi\n",
        );
    }
    out
}

/// The command the script should run: `argv0` as typed when it is a bare
/// name (looked up on `$PATH` at each Tab), else made absolute, so a
/// script written by `./target/release/sshshim` works from any directory.
pub fn completer_for(argv0: &std::ffi::OsStr) -> String {
    let p = PathBuf::from(argv0);
    let p = if p.components().count() > 1 {
        std::path::absolute(&p).unwrap_or(p)
    } else {
        p
    };
    p.to_string_lossy().into_owned()
}

/// Candidates where a destination or profile is expected (`up`, `check`,
/// `ssh-config`): the profiles of the config file, then the Host aliases
/// of ssh_config that are not also profiles.
pub fn destinations() -> Vec<CompletionCandidate> {
    let (config, ssh_config) = files_on_line(std::env::args_os().collect());
    let mut out = profiles_in(config);
    let hosts = crate::config::ssh_config::hosts::host_aliases(ssh_config.as_deref());
    for h in hosts {
        if !out.iter().any(|c| c.get_value() == h.as_str()) {
            out.push(CompletionCandidate::new(h).help(Some("Host in ssh_config".into())));
        }
    }
    out
}

/// Candidates where only a profile will do (`supervise`, `service install`).
pub fn profiles() -> Vec<CompletionCandidate> {
    let (config, _) = files_on_line(std::env::args_os().collect());
    profiles_in(config)
}

/// Candidates where a running profile is expected (`down`, `status`).
pub fn running() -> Vec<CompletionCandidate> {
    crate::control::running()
        .into_iter()
        .map(|n| CompletionCandidate::new(n).help(Some("running".into())))
        .collect()
}

/// The profiles of `config` (default: the default file), each with its
/// destination as help. A file that does not load offers none: completion
/// is no place for its error, which `up` reports in full.
fn profiles_in(config: Option<PathBuf>) -> Vec<CompletionCandidate> {
    let explicit = config.is_some();
    let path = config.unwrap_or_else(crate::config::profile::default_path);
    let Ok(file) = crate::config::profile::load(&crate::paths::expand_tilde(&path), explicit)
    else {
        return Vec::new();
    };
    file.profiles
        .into_iter()
        .map(|(name, p)| {
            let help = match p.destination {
                Some(d) => format!("profile: {d}"),
                None => "profile".to_owned(),
            };
            CompletionCandidate::new(name).help(Some(help.into()))
        })
        .collect()
}

/// The `-c`/`--config` and `-F` files typed on the line being completed,
/// from a completion request's arguments (`sshshim -- sshshim WORD…`;
/// the last word is the one being completed, so not a value).
fn files_on_line(args: Vec<OsString>) -> (Option<PathBuf>, Option<PathBuf>) {
    let words: Vec<String> = args
        .into_iter()
        .skip_while(|a| a != "--")
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let typed = words.split_last().map_or(&[][..], |(_, w)| w);
    let (mut config, mut ssh_config) = (None, None);
    let mut it = typed.iter();
    while let Some(w) = it.next() {
        let take = |flag_value: Option<&str>| {
            flag_value
                .map(str::to_owned)
                .or_else(|| it.clone().next().cloned())
                .map(PathBuf::from)
        };
        if w == "--" {
            break;
        } else if w == "-c" || w == "--config" {
            config = take(None);
        } else if let Some(v) = w.strip_prefix("--config=") {
            config = take(Some(v));
        } else if w == "-F" {
            ssh_config = take(None);
        } else if let Some(v) = w.strip_prefix("-F") {
            ssh_config = take(Some(v));
        } else if let Some(v) = w.strip_prefix("-c").filter(|v| !v.is_empty()) {
            config = take(Some(v));
        }
    }
    (config, ssh_config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(words: &[&str]) -> (Option<PathBuf>, Option<PathBuf>) {
        let mut args: Vec<OsString> = vec!["sshshim".into(), "--".into()];
        args.extend(words.iter().map(OsString::from));
        files_on_line(args)
    }

    #[test]
    fn config_files_typed_on_the_line() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(line(&["sshshim", "up", ""]), (None, None));
        assert_eq!(
            line(&["sshshim", "up", "-c", "a.toml", "-F", "ssh.conf", ""]),
            (p("a.toml"), p("ssh.conf"))
        );
        assert_eq!(
            line(&["sshshim", "up", "--config=b.toml", "-Fx", "pro"]),
            (p("b.toml"), p("x"))
        );
        assert_eq!(
            line(&["sshshim", "check", "-cc.toml", ""]),
            (p("c.toml"), None)
        );
        // The word being completed is not a value yet.
        assert_eq!(line(&["sshshim", "up", "-c"]), (None, None));
    }

    #[test]
    fn scripts_call_the_completer() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = String::from_utf8(script(shell, "/opt/x/sshshim")).unwrap();
            assert!(s.contains("SSHSHIM_COMPLETE"), "{s}");
            assert!(s.contains("/opt/x/sshshim"), "{s}");
        }
        let zsh = String::from_utf8(script(Shell::Zsh, "sshshim")).unwrap();
        assert!(zsh.starts_with("#compdef sshshim"), "{zsh}");
    }

    #[test]
    fn completer_path() {
        assert_eq!(completer_for("sshshim".as_ref()), "sshshim");
        let abs = completer_for("./bin/sshshim".as_ref());
        assert!(
            abs.starts_with('/') && abs.ends_with("bin/sshshim"),
            "{abs}"
        );
    }
}

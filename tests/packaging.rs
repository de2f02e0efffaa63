//! Installing like other tools: shell completion (bash, zsh, fish), man
//! pages and the template systemd unit. The subcommands are taken from
//! `sshshim --help`, so a new one is checked without editing this file.
//! (The Debian package itself is built by scripts/package.sh, not here.)

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

/// The directory holding the sshshim binary, to put first on `$PATH`.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sshshim"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A throwaway home: ~/.ssh/config with Host aliases (one included), and
/// a profiles file with one profile.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(".ssh/conf.d")).unwrap();
        std::fs::create_dir_all(d.join(".config/sshshim")).unwrap();
        std::fs::write(
            d.join(".ssh/config"),
            "Include conf.d/*.conf\n\nHost gw1 *.wild !negated\n  HostName 127.0.0.1\n",
        )
        .unwrap();
        std::fs::write(d.join(".ssh/conf.d/lab.conf"), "Host=included-host\n").unwrap();
        std::fs::write(
            d.join(".config/sshshim/config.toml"),
            "[profile.labprofile]\ndestination = \"alice@127.0.0.1\"\n",
        )
        .unwrap();
        std::fs::write(
            d.join("other.toml"),
            "[profile.otherprofile]\ndestination = \"127.0.0.1\"\n",
        )
        .unwrap();
        std::fs::write(d.join("other_ssh_config"), "Host otherhost\n").unwrap();
        Home { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command run as a user whose home this is, with sshshim on `$PATH`.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        c.env("HOME", self.path())
            .env("PATH", path)
            .env("XDG_RUNTIME_DIR", self.path().join("run"))
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("SSHSHIM_COMPLETE")
            .current_dir(self.path());
        c
    }

    /// What bash offers for the words after `sshshim` (the last one being
    /// completed), through the script `sshshim completions bash` prints.
    fn bash_complete(&self, words: &[&str]) -> Vec<String> {
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let script = format!(
            "source <(sshshim completions bash) || exit 3\n\
             COMP_WORDS=(sshshim {words}); COMP_CWORD={n}; COMP_TYPE=9\n\
             _clap_complete_sshshim sshshim {cur} {prev}\n\
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            words = quoted.join(" "),
            n = words.len(),
            cur = quoted.last().unwrap(),
            prev = if words.len() > 1 {
                quoted[words.len() - 2].clone()
            } else {
                "sshshim".into()
            },
        );
        let out = run(self.cmd("bash").args(["--norc", "-c", &script]));
        assert_success(&out, "bash completion");
        stdout_text(&out).lines().map(str::to_owned).collect()
    }

    /// Candidates (first field) the binary answers for `shell`'s protocol.
    fn protocol_complete(&self, shell: &str, words: &[&str]) -> Vec<String> {
        let mut args = vec!["--", "sshshim"];
        args.extend(words);
        let out = run(self
            .cmd(env!("CARGO_BIN_EXE_sshshim"))
            .env("SSHSHIM_COMPLETE", shell)
            .env("_CLAP_COMPLETE_INDEX", words.len().to_string())
            .env("_CLAP_IFS", "\n")
            .args(&args));
        assert_success(&out, "completion request");
        stdout_text(&out)
            .lines()
            // fish: value<TAB>help; zsh: value:help.
            .map(|l| l.split(['\t', ':']).next().unwrap().to_owned())
            .collect()
    }
}

/// The subcommands `--help` lists (without `help`), or those of `sub`.
fn subcommands(sub: &[&str]) -> Vec<String> {
    let out = run(Command::new(env!("CARGO_BIN_EXE_sshshim"))
        .args(sub)
        .arg("--help"));
    assert_success(&out, "--help");
    let text = stdout_text(&out);
    let list: Vec<String> = text
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .filter(|c| c != "help")
        .collect();
    assert!(list.len() >= 3, "no commands found in:\n{text}");
    list
}

fn assert_has(got: &[String], want: &str, what: &str) {
    assert!(
        got.iter().any(|g| g == want),
        "{what}: no {want:?} in {got:?}"
    );
}

#[test]
fn completion_scripts_complete_every_subcommand() {
    let home = Home::new();
    let top = subcommands(&[]);
    assert_has(&top, "completions", "--help");
    assert_has(&top, "man", "--help");

    // The check, word for word.
    let out = run(home.cmd("bash").args([
        "--norc",
        "-c",
        "source <(sshshim completions bash); complete -p sshshim",
    ]));
    assert_success(&out, "complete -p");
    assert!(
        stdout_text(&out).contains("-F _clap_complete_sshshim sshshim"),
        "{}",
        stdout_text(&out)
    );

    let offered = home.bash_complete(&[""]);
    for c in &top {
        assert_has(&offered, c, "bash: sshshim <Tab>");
    }
    let offered = home.bash_complete(&["service", ""]);
    for c in subcommands(&["service"]) {
        assert_has(&offered, &c, "bash: sshshim service <Tab>");
    }
    assert_eq!(home.bash_complete(&["comp"]), ["completions"]);
    assert_has(
        &home.bash_complete(&["up", "--acc"]),
        "--accept-new",
        "bash",
    );

    for shell in ["zsh", "fish"] {
        let out = run(home.cmd("sshshim").args(["completions", shell]));
        assert_success(&out, shell);
        let script = stdout_text(&out);
        // Runs `sshshim` from $PATH at each Tab, as bash's does.
        assert!(
            script.contains("SSHSHIM_COMPLETE=") && script.contains("sshshim -- "),
            "{script}"
        );
        let offered = home.protocol_complete(shell, &[""]);
        for c in &top {
            assert_has(&offered, c, shell);
        }
    }

    // The real shells, where installed (CI images may lack them).
    if has("zsh") {
        let out = run(home.cmd("zsh").args([
            "-f",
            "-c",
            "autoload -Uz compinit && compinit -D -u && source <(sshshim completions zsh) \
             && print -r -- $_comps[sshshim]",
        ]));
        assert_success(&out, "zsh");
        assert!(
            stdout_text(&out).contains("_clap_dynamic_completer_sshshim"),
            "{}",
            stderr_text(&out)
        );
    }
    if has("fish") {
        let out = run(home.cmd("fish").args([
            "--no-config",
            "-c",
            "sshshim completions fish | source; complete -C 'sshshim '; complete -C 'sshshim up '",
        ]));
        assert_success(&out, "fish");
        let got: Vec<String> = stdout_text(&out)
            .lines()
            .map(|l| l.split('\t').next().unwrap().to_owned())
            .collect();
        for c in &top {
            assert_has(&got, c, "fish: sshshim <Tab>");
        }
        assert_has(&got, "labprofile", "fish: sshshim up <Tab>");
        assert_has(&got, "gw1", "fish: sshshim up <Tab>");
    }
}

#[test]
fn completion_offers_profiles_and_host_aliases() {
    let home = Home::new();
    for sub in ["up", "check", "ssh-config"] {
        let got = home.bash_complete(&[sub, ""]);
        assert_has(&got, "labprofile", sub);
        assert_has(&got, "gw1", sub);
        assert_has(&got, "included-host", sub);
        for not in ["*.wild", "!negated", "negated", "otherprofile", "otherhost"] {
            assert!(!got.iter().any(|g| g == not), "{sub}: {not:?} in {got:?}");
        }
    }
    assert_eq!(home.bash_complete(&["up", "lab"]), ["labprofile"]);
    assert_eq!(home.bash_complete(&["up", "inc"]), ["included-host"]);
    // Files named earlier on the line are the ones read.
    let got = home.bash_complete(&["up", "-c", "other.toml", "-F", "other_ssh_config", ""]);
    assert_has(&got, "otherprofile", "-c/-F");
    assert_has(&got, "otherhost", "-c/-F");
    assert!(
        !got.iter().any(|g| g == "labprofile" || g == "gw1"),
        "{got:?}"
    );
    // Where only a profile will do, no Host aliases.
    let got = home.bash_complete(&["supervise", ""]);
    assert_has(&got, "labprofile", "supervise");
    assert!(!got.iter().any(|g| g == "gw1"), "supervise: {got:?}");
    // The other shells' answers carry the same names.
    for shell in ["zsh", "fish"] {
        let got = home.protocol_complete(shell, &["up", ""]);
        assert_has(&got, "labprofile", shell);
        assert_has(&got, "gw1", shell);
    }
    // A broken profiles file costs only its candidates, with no noise.
    std::fs::write(home.path().join("broken.toml"), "[profile.x]\nbogus = 1\n").unwrap();
    let got = home.bash_complete(&["up", "-c", "broken.toml", "g"]);
    assert_eq!(got, ["gw1"]);
}

#[test]
fn man_pages_for_every_subcommand() {
    let home = Home::new();
    let dir = home.path().join("man1");
    let out = run(home
        .cmd("sshshim")
        .env("SOURCE_DATE_EPOCH", "1764547200")
        .args(["man", "--dir"])
        .arg(&dir));
    assert_success(&out, "man --dir");

    let mut pages = vec![("sshshim".to_owned(), subcommands(&[]))];
    for c in subcommands(&[]) {
        let nested = run(Command::new(env!("CARGO_BIN_EXE_sshshim")).args([&c, "--help"]));
        if stdout_text(&nested).contains("\nCommands:\n") {
            for n in subcommands(&[&c]) {
                pages.push((format!("sshshim-{c}-{n}"), vec![]));
            }
            pages.push((format!("sshshim-{c}"), subcommands(&[&c])));
        } else {
            pages.push((format!("sshshim-{c}"), vec![]));
        }
    }
    let written: Vec<String> = stdout_text(&out).lines().map(str::to_owned).collect();
    assert_eq!(written.len(), pages.len(), "{written:?}");
    for (name, subs) in &pages {
        let path = dir.join(format!("{name}.1"));
        assert_has(&written, &path.display().to_string(), "man --dir output");
        let roff = std::fs::read_to_string(&path).unwrap();
        assert!(
            roff.contains(&format!(".TH {name} 1 2025-12-01 \"sshshim ")),
            "{name}: {}",
            roff.lines().take(4).collect::<Vec<_>>().join("\n")
        );
        for s in subs {
            let see_also = format!("\\fB{}\\fR(1)", format!("{name}-{s}").replace('-', "\\-"));
            assert!(roff.contains(&see_also), "{name}.1 does not name {s}");
        }
        if has("man") {
            // man-db runs groff with warnings on: bad roff shows up on stderr.
            let out = run_with_timeout(
                Command::new("man")
                    .args(["--warnings", "-l"])
                    .arg(&path)
                    .env("MANPAGER", "cat")
                    .env("MANWIDTH", "80"),
                b"",
                Duration::from_secs(30),
            );
            assert_success(&out, "man -l");
            assert!(
                stderr_text(&out).is_empty(),
                "{name}: {}",
                stderr_text(&out)
            );
            let text = stdout_text(&out);
            assert!(
                text.contains("SYNOPSIS") && text.contains("OPTIONS"),
                "{text}"
            );
        }
    }

    // One page on stdout: the same text as the file.
    let out = run(home
        .cmd("sshshim")
        .env("SOURCE_DATE_EPOCH", "1764547200")
        .args(["man", "service", "install"]));
    assert_success(&out, "man service install");
    assert_eq!(
        out.stdout,
        std::fs::read(dir.join("sshshim-service-install.1")).unwrap()
    );
    let out = run(home.cmd("sshshim").args(["man", "nope"]));
    assert!(!out.status.success());
    assert!(
        stderr_text(&out).contains("'nope' is not a subcommand of 'sshshim' (known: up,"),
        "{}",
        stderr_text(&out)
    );
}

#[test]
fn template_unit_runs_the_instance_profile() {
    let out = run(Command::new(env!("CARGO_BIN_EXE_sshshim")).args(["service", "template"]));
    assert_success(&out, "service template");
    let unit = stdout_text(&out);
    assert!(
        unit.lines()
            .any(|l| l == "ExecStart=/usr/bin/sshshim supervise %i"),
        "{unit}"
    );
    assert!(
        unit.lines().any(|l| l == "WantedBy=default.target"),
        "{unit}"
    );
}

/// Whether `program` is on `$PATH`.
fn has(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

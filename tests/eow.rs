//! `eow@openssh.com` (issue 17): what a remote command sees when its local
//! client can take no more output or goes away, through the shim compared
//! with sshd. Differential: each case runs against sshd directly and through
//! the shim, with real OpenSSH clients and ControlMasters.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// How long a remote effect (a file written, a process gone) may take.
const SETTLE: Duration = Duration::from_secs(10);

/// Waits up to `within` for `f`; returns whether it came true.
fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// How a probe's remote command fared after its launching client died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// It wrote stderr and finished its work.
    Finished,
    /// Writing stderr failed (EPIPE).
    StderrFailed,
    /// It neither finished nor saw a failed write within [`SETTLE`].
    Vanished,
}

/// The remote command of a probe: a `sh` (SIGPIPE ignored, as Python does,
/// so a failed write shows as EPIPE) that waits for its client to be
/// killed, writes stderr, then writes the file `done`. `form` says how it
/// is started:
/// - `exec`: `exec nohup sh ...`, the session's own process (as sshpyk
///   starts its kernel);
/// - `background`: `nohup sh ... &`, the session's shell exits at once;
/// - `orphan`: the session's process exits a second after the client died,
///   and only its background child writes.
fn probe_command(dir: &Path, form: &str, marker: &str) -> String {
    let d = dir.display();
    let work = format!(
        "trap \"\" PIPE; echo > {d}/started; sleep 1; \
         echo err >&2 || touch {d}/failed; sleep 1; echo done > {d}/done"
    );
    match form {
        "exec" => format!("exec nohup sh -c '{work}' {marker}"),
        "background" => format!("nohup sh -c '{work}' {marker} &"),
        "orphan" => format!(
            "exec nohup sh -c 'trap \"\" PIPE; (sleep 1; {work}) & \
             until test -e {d}/started; do sleep 0.1; done; sleep 0.5' {marker}"
        ),
        _ => unreachable!("unknown probe form {form}"),
    }
}

/// The sshpyk pattern without Jupyter: through the ControlMaster of
/// `master`, start a nohup'd command (see [`probe_command`]) and kill its
/// launching client with `sig` right after the start (sshpyk uses TERM).
fn nohup_probe(env: &TestEnv, master: &MasterAlias, tag: &str, form: &str, sig: &str) -> Fate {
    let dir = env.path(&format!("probe-{tag}-{form}-{sig}"));
    std::fs::create_dir(&dir).unwrap();
    let marker = format!("sshshim-probe-{tag}-{form}-{sig}");
    let mut client = master
        .ssh(&[&probe_command(&dir, form, &marker)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _out = Capture::spawn(client.stdout.take().unwrap());
    let _err = Capture::spawn(client.stderr.take().unwrap());
    let started = wait_until(SETTLE, || dir.join("started").exists());
    send_signal(&[client.id()], sig);
    let _ = client.kill();
    let _ = client.wait();
    assert!(started, "{tag} {form}: the remote command never started");
    let finished = wait_until(SETTLE, || {
        dir.join("done").exists() || dir.join("failed").exists()
    });
    if dir.join("failed").exists() {
        Fate::StderrFailed
    } else if finished {
        Fate::Finished
    } else {
        Fate::Vanished
    }
}

#[test]
fn nohup_command_outlives_its_client_through_a_control_master() {
    let env = TestEnv::new();
    let sshd = env.start_sshd();
    let shim = env.start_shim(&sshd);
    let direct = env.master_alias("direct", sshd.port());
    let through = env.master_alias("shim", shim.port());
    direct.start();
    through.start();
    for (form, sig) in [
        ("exec", "TERM"),
        ("exec", "KILL"),
        ("background", "TERM"),
        ("orphan", "TERM"),
    ] {
        let want = nohup_probe(&env, &direct, "direct", form, sig);
        if form == "exec" {
            // What sshpyk relies on.
            assert_eq!(want, Fate::Finished, "sshd itself, {form} SIG{sig}");
        }
        let got = nohup_probe(&env, &through, "shim", form, sig);
        assert_eq!(
            got, want,
            "{form} SIG{sig}: through the shim vs against sshd"
        );
    }
    // No leak: once the nohup'd commands have exited, the upstream channels
    // that were kept open for them are gone.
    assert!(
        wait_until(SETTLE, || sshd
            .session_pids_containing("sshshim-probe-")
            .is_empty()),
        "probe processes left: {:?}",
        sshd.session_pids_containing("sshshim-probe-")
    );
    let mut last = None;
    assert!(
        wait_until(SETTLE, || {
            last = shim.open_channels();
            last == Some(0)
        }),
        "the shim still has channels open after the remote commands exited: {last:?}\n{:?}",
        shim.status_json()
    );
    assert!(through.master_pid().is_some(), "the ControlMaster died");
}

/// Runs `ssh ... 'yes MARKER' | head -c 1000` with `ssh` built by `cmd`
/// (its argument is the remote command); returns ssh's exit status and the
/// time the pipeline took. Panics unless head got its 1000 bytes.
fn yes_head(cmd: impl Fn(&str) -> Command, marker: &str) -> (i32, Duration) {
    let ssh = cmd(&format!("yes {marker}"));
    let line = format!(
        "{} | head -c 1000 | wc -c; echo \"status=${{PIPESTATUS[0]}}\"",
        shell_line(&ssh)
    );
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new("bash")
            .arg("-c")
            .arg(&line)
            .env_remove("SSH_AUTH_SOCK"),
        b"",
        Duration::from_secs(30),
    );
    let took = started.elapsed();
    let text = stdout_text(&out);
    let mut lines = text.lines();
    assert_eq!(lines.next().map(str::trim), Some("1000"), "{text}");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("status="))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    (status, took)
}

/// Asserts that no session process of `sshd` has `marker` as an argument
/// within [`SETTLE`].
fn assert_gone(sshd: &Sshd, marker: &str, what: &str) {
    assert!(
        wait_until(SETTLE, || sshd.session_pids_with_arg(marker).is_empty()),
        "{what}: remote `yes {marker}` still running"
    );
}

#[test]
fn yes_head_ends_promptly_whatever_the_log_settings() {
    let env = TestEnv::new();
    let sshd = env.start_sshd();
    let (want, took) = yes_head(|c| env.ssh(sshd.port(), &[c]), "sshshim-eow-direct");
    assert!(took < Duration::from_secs(10), "sshd took {took:?}");
    assert_gone(&sshd, "sshshim-eow-direct", "against sshd");
    eprintln!("against sshd: ssh exited with {want} after {took:?}");

    let settings: [(&str, &[&str], Option<&str>); 6] = [
        ("default", &[], None),
        ("rust-log-off", &[], Some("off")),
        ("quiet", &["-q"], None),
        ("very-quiet", &["-qq"], None),
        ("verbose", &["-v"], None),
        ("rust-log-trace", &[], Some("trace")),
    ];
    for (name, args, rust_log) in settings {
        let mut b = env.shim_builder(sshd.port()).args(args);
        if let Some(v) = rust_log {
            b = b.env("RUST_LOG", v);
        }
        let shim = b.start();
        let marker = format!("sshshim-eow-{name}");
        let (status, took) = yes_head(|c| shim.ssh(&[c]), &marker);
        assert!(took < Duration::from_secs(10), "{name}: took {took:?}");
        assert_eq!(
            status, want,
            "{name}: ssh's exit status differs from sshd's"
        );
        assert_gone(&sshd, &marker, name);
    }
}

#[test]
fn yes_head_through_a_control_master() {
    let env = TestEnv::new();
    let sshd = env.start_sshd();
    let shim = env.start_shim(&sshd);
    let direct = env.master_alias("direct", sshd.port());
    let through = env.master_alias("shim", shim.port());
    direct.start();
    through.start();
    let (want, _) = yes_head(|c| direct.ssh(&[c]), "sshshim-eow-cm-direct");
    assert_gone(&sshd, "sshshim-eow-cm-direct", "against sshd");
    let (status, took) = yes_head(|c| through.ssh(&[c]), "sshshim-eow-cm-shim");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(status, want, "ssh's exit status differs from sshd's");
    assert_gone(&sshd, "sshshim-eow-cm-shim", "through the shim");
    assert!(
        wait_until(SETTLE, || shim.open_channels() == Some(0)),
        "channels left open"
    );
}

/// One remote command for the killed-client comparison: `silent` only
/// sleeps (its pipes are never written), otherwise it writes stdout every
/// 0.1 s.
fn kill_case_command(silent: bool, marker: &str) -> String {
    if silent {
        format!("sh -c 'sleep 300; echo late' {marker}")
    } else {
        format!("sh -c 'while :; do echo tick; sleep 0.1; done' {marker}")
    }
}

/// Starts one plain client per case on `port`, waits for the remote
/// commands, kills the clients with `sig`, and reports which remote
/// commands are still alive once the dying ones had time to die.
fn killed_clients(env: &TestEnv, sshd: &Sshd, port: u16, tag: &str, sig: &str) -> Vec<bool> {
    let cases = [true, false];
    let markers: Vec<String> = cases
        .iter()
        .map(|s| {
            format!(
                "sshshim-kill-{tag}-{sig}-{}",
                if *s { "silent" } else { "ticker" }
            )
        })
        .collect();
    let mut clients: Vec<_> = cases
        .iter()
        .zip(&markers)
        .map(|(&silent, m)| {
            env.ssh(port, &[&kill_case_command(silent, m)])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for m in &markers {
        assert!(
            wait_until(SETTLE, || !sshd.session_pids_with_arg(m).is_empty()),
            "{tag}: remote command {m} never started"
        );
    }
    for c in &mut clients {
        send_signal(&[c.id()], sig);
    }
    for c in &mut clients {
        if wait_child(c, SETTLE).is_none() {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{tag}: ssh ignored SIG{sig}");
        }
    }
    // The ticker's next write fails within 0.1 s of its pipes closing; a
    // generous margin covers the shim's close travelling upstream.
    wait_until(Duration::from_secs(3), || {
        markers
            .iter()
            .all(|m| sshd.session_pids_with_arg(m).is_empty())
    });
    let alive = markers
        .iter()
        .map(|m| !sshd.session_pids_with_arg(m).is_empty())
        .collect();
    // Leave nothing behind for the next case.
    for m in &markers {
        send_signal(&sshd.session_pids_with_arg(m), "KILL");
    }
    alive
}

#[test]
fn killed_client_ends_the_remote_command_as_with_sshd() {
    let env = TestEnv::new();
    let sshd = env.start_sshd();
    let shim = env.start_shim(&sshd);
    for sig in ["INT", "KILL"] {
        let want = killed_clients(&env, &sshd, sshd.port(), "direct", sig);
        let got = killed_clients(&env, &sshd, shim.port(), "shim", sig);
        assert_eq!(
            got, want,
            "SIG{sig}: remote commands alive after the client died ([silent, ticker]), \
             through the shim vs against sshd"
        );
    }
    assert!(
        wait_until(SETTLE, || shim.open_channels() == Some(0)),
        "channels left open"
    );
}

//! Persistent tunnels: profiles from a file, the supervisor (isolation,
//! SIGHUP reload), status over the control socket, event hooks and the
//! systemd unit.

mod support;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;
use support::*;

/// One `[profile.NAME]` table for an sshd on `port` with a shim-owned -R.
fn profile(
    env: &TestEnv,
    name: &str,
    port: u16,
    rport: u16,
    svc: u16,
    kh: &std::path::Path,
) -> String {
    format!(
        "[profile.{name}]\ndestination = \"{}\"\nport = {port}\nidentity = [\"{}\"]\nknown_hosts = \"{}\"\n\
         authorized_keys = \"{}\"\nhost_key = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\
         remote_forwards = [\"{rport}:127.0.0.1:{svc}\"]\nkeepalive = 2\nmax_backoff = 0.5\nconnect_timeout = 3\n\n",
        env.dest(),
        env.user_key().display(),
        kh.display(),
        env.authorized_keys().display(),
        env.shim_host_key().display(),
        free_port(),
    )
}

/// `sshshim ARGS` with the test's state and runtime directories.
fn sshshim(env: &TestEnv, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sshshim"));
    c.args(args)
        .env("XDG_STATE_HOME", env.state_dir())
        .env("XDG_RUNTIME_DIR", env.runtime_dir())
        .env("XDG_CONFIG_HOME", env.path("config"))
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("RUST_LOG");
    c
}

/// `sshshim status --json NAME` parsed, or None if not running.
fn status(env: &TestEnv, name: &str) -> Option<serde_json::Value> {
    let out = run(&mut sshshim(env, &["status", "--json", name]));
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0).cloned()
}

/// A background `sshshim supervise`, killed on drop.
struct Supervisor(Child, Capture);

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if thread::panicking() {
            eprintln!("--- supervise stderr ---\n{}", self.1.text());
        }
    }
}

fn supervise(env: &TestEnv, file: &std::path::Path) -> Supervisor {
    let mut child = sshshim(env, &["supervise", "-c", file.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = Capture::spawn(child.stderr.take().unwrap());
    Supervisor(child, err)
}

#[test]
fn bad_profile_files_name_file_line_and_key() {
    let env = TestEnv::new();
    let cases = [
        (
            "[profile.a]\ndestination = \"h\"\nlisten = 5\n",
            ":3",
            "listen",
        ),
        (
            "[profile.a]\ndestination = \"h\"\nlistne = \"127.0.0.1:1\"\n",
            ":3",
            "listne",
        ),
        (
            "[profile.a]\ndestination = \"h\"\n\nmax_upstream = 2\n",
            ":4",
            "unknown key 'max_upstream' (did you mean 'max_upstreams'?)",
        ),
        (
            "[profile.a]\ndestination = \"h\"\nmax_upstreams = 65\n",
            ":3",
            "key 'max_upstreams' must be an integer 1-64, not 65",
        ),
        ("[profile.a]\nport = 22\n", ":1", "destination"),
        (
            "[profile.a]\ndestination = \"h\"\nremote_forwards = [\"2222:localhost\"]\n",
            ":3",
            "remote_forwards",
        ),
        ("[profile.a\n", ":1", "TOML"),
    ];
    for (i, (text, line, key)) in cases.iter().enumerate() {
        let f = env.path(&format!("bad{i}.toml"));
        std::fs::write(&f, text).unwrap();
        let out = run(&mut sshshim(&env, &["up", "-c", f.to_str().unwrap(), "a"]));
        assert_eq!(exit_code(&out.status), 1, "{text}");
        let err = stderr_text(&out);
        assert!(
            err.contains(&format!("bad{i}.toml{line}")) && err.contains(key),
            "case {i}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn up_runs_a_profile_with_flags_winning_then_down_stops_it() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let svc = service(b"profile forward");
    let rport = free_port();
    let file = env.path("config.toml");
    std::fs::write(
        &file,
        profile(&env, "lab", sshd.port(), rport, svc, &env.known_hosts()),
    )
    .unwrap();
    let mut shim = env
        .shim_builder(0)
        .no_default_args()
        .args(&[
            "up",
            "-c",
            file.to_str().unwrap(),
            "lab",
            "--listen",
            "127.0.0.1:0",
        ])
        .start();
    assert_eq!(
        stdout_text(&run(&mut shim.ssh(&["echo from-profile"]))),
        "from-profile\n"
    );
    eventually(Duration::from_secs(10), "forward", || {
        fetch(rport).as_deref() == Some(b"profile forward")
    });
    let st = status(&env, "lab").expect("status of lab");
    assert_eq!(st["upstream"]["state"], "connected", "{st}");
    assert_eq!(st["endpoint"], format!("127.0.0.1:{}", shim.port()), "{st}");
    assert_eq!(st["forwards"][0]["state"], "active", "{st}");
    let human = stdout_text(&run(&mut sshshim(&env, &["status"])));
    assert!(
        human.contains("lab") && human.contains("connected"),
        "{human}"
    );
    assert_success(&run(&mut sshshim(&env, &["down", "lab"])), "down");
    let exit = shim
        .wait_exit(Duration::from_secs(5))
        .expect("down did not stop it");
    assert!(exit.success());
}

/// `max_upstreams` in a profile caps the upstream connections, and the flag
/// overrides it: against an sshd allowing one session per connection, a
/// second concurrent session needs a second connection.
#[test]
fn max_upstreams_is_a_profile_key_and_the_flag_wins() {
    let env = TestEnv::new();
    let sshd = Sshd::start_with(&env, &["MaxSessions 1"]);
    let file = env.path("config.toml");
    std::fs::write(
        &file,
        format!(
            "[profile.lab]\ndestination = \"{}\"\nport = {}\nidentity = [\"{}\"]\n\
             known_hosts = \"{}\"\nauthorized_keys = \"{}\"\nhost_key = \"{}\"\n\
             connect_timeout = 3\nmax_upstreams = 1\n",
            env.dest(),
            sshd.port(),
            env.user_key().display(),
            env.known_hosts().display(),
            env.authorized_keys().display(),
            env.shim_host_key().display(),
        ),
    )
    .unwrap();
    // A second session while the first holds the only slot of its
    // connection: (first, second, the shim's log).
    let two_sessions = |flags: &[&str]| {
        let mut args = vec!["up", "-c", file.to_str().unwrap(), "lab"];
        args.extend_from_slice(&["--listen", "127.0.0.1:0"]);
        args.extend_from_slice(flags);
        let shim = env.shim_builder(0).no_default_args().args(&args).start();
        let first = {
            let mut c = shim.ssh(&["sleep 3; echo first"]);
            thread::spawn(move || run_with_timeout(&mut c, b"", Duration::from_secs(30)))
        };
        eventually(
            Duration::from_secs(10),
            "first session open or over",
            || {
                first.is_finished()
                    || status(&env, "lab").is_some_and(|s| s["channels"]["session"] == 1)
            },
        );
        let second = run_with_timeout(
            &mut shim.ssh(&["echo second"]),
            b"",
            Duration::from_secs(30),
        );
        (first.join().unwrap(), second, shim.stderr_text())
    };
    // One connection of one session: never two sessions at once.
    let (first, second, log) = two_sessions(&[]);
    assert!(
        !(first.status.success() && second.status.success()),
        "{first:?} {second:?}"
    );
    assert!(log.contains("all 1 allowed are open"), "{log}");
    assert!(!log.contains("upstream connection 2 of"), "{log}");
    let (first, second, log) = two_sessions(&["--max-upstreams", "2"]);
    assert_eq!(stdout_text(&first), "first\n", "{log}");
    assert_eq!(stdout_text(&second), "second\n", "{log}");
    assert!(log.contains("upstream connection 2 of at most 2"), "{log}");
}

#[test]
fn down_and_status_of_nothing_running_say_so() {
    let env = TestEnv::new();
    // Both an existing runtime directory and one that does not exist (as
    // after logout, when $XDG_RUNTIME_DIR is gone) mean "nothing runs".
    for runtime in [env.runtime_dir(), env.path("no-such-runtime-dir")] {
        for args in [&["down", "ghost"][..], &["status", "ghost"][..]] {
            let out = run(sshshim(&env, args).env("XDG_RUNTIME_DIR", &runtime));
            assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("no running sshshim for profile ghost"),
                "{args:?} with {}: {err}",
                runtime.display()
            );
        }
    }
    assert!(!env.path("no-such-runtime-dir").exists());
}

#[test]
fn supervisor_isolates_profiles_and_reloads_on_sighup() {
    let env = TestEnv::new();
    let kh = env.path("kh_all");
    let mut sshds: Vec<Sshd> = (0..3).map(|_| Sshd::start(&env)).collect();
    let lines: String = sshds
        .iter()
        .map(|s| format!("[127.0.0.1]:{} {}\n", s.port(), env.host_key_line()))
        .collect();
    std::fs::write(&kh, lines).unwrap();
    let svc = service(b"tunnel");
    let r: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let file = env.path("sup.toml");
    // Each profile's text is made once, so a rewrite changes only what the
    // test changes.
    let texts: std::collections::BTreeMap<(usize, usize), String> =
        [(1, 0), (2, 1), (3, 2), (4, 1)]
            .into_iter()
            .map(|(p, s)| {
                (
                    (p, s),
                    profile(&env, &format!("p{p}"), sshds[s].port(), r[p - 1], svc, &kh),
                )
            })
            .collect();
    let write = |names: &[(usize, usize)]| {
        let text: String = names.iter().map(|k| texts[k].clone()).collect();
        std::fs::write(&file, text).unwrap();
    };
    write(&[(1, 0), (2, 1), (3, 2)]);
    let sup = supervise(&env, &file);
    eventually(Duration::from_secs(20), "three tunnels", || {
        (0..3).all(|i| fetch(r[i]).as_deref() == Some(b"tunnel"))
    });

    // One upstream dies: the others are untouched.
    sshds[0].kill();
    eventually(Duration::from_secs(10), "p1 notices", || {
        status(&env, "p1").is_some_and(|s| s["upstream"]["state"] == "reconnecting")
    });
    for i in [1, 2] {
        assert_eq!(fetch(r[i]).as_deref(), Some(&b"tunnel"[..]));
    }
    let p2_before = status(&env, "p2").unwrap();
    assert_eq!(p2_before["upstream"]["reconnects"], 0);
    sshds[0].restart();
    eventually(Duration::from_secs(15), "p1 back", || {
        fetch(r[0]).as_deref() == Some(b"tunnel")
    });

    // SIGHUP: p3 removed, p4 added, p1 and p2 keep their connections.
    write(&[(1, 0), (2, 1), (4, 1)]);
    send_signal(&[sup.0.id()], "HUP");
    eventually(Duration::from_secs(20), "p4 up, p3 gone", || {
        fetch(r[3]).as_deref() == Some(b"tunnel") && fetch(r[2]).is_none()
    });
    let p2_after = status(&env, "p2").unwrap();
    assert_eq!(
        p2_after["upstream"]["since"], p2_before["upstream"]["since"],
        "p2 restarted"
    );
    assert_eq!(p2_after["upstream"]["reconnects"], 0);
    assert!(status(&env, "p3").is_none());
    drop(sup);
}

#[test]
fn status_follows_a_forward_through_retrying_and_back() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let proxy = FaultProxy::start(sshd.port());
    let kh = env.path("kh_proxy");
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} {}\n", proxy.port(), env.host_key_line()),
    )
    .unwrap();
    let svc = service(b"x");
    let rport = free_port();
    let file = env.path("one.toml");
    std::fs::write(&file, profile(&env, "edge", proxy.port(), rport, svc, &kh)).unwrap();
    let _sup = supervise(&env, &file);
    let fwd_state = || {
        status(&env, "edge").map(|s| s["forwards"][0]["state"].as_str().unwrap_or("").to_owned())
    };
    eventually(Duration::from_secs(20), "active", || {
        fwd_state().as_deref() == Some("active")
    });
    proxy.drop_all();
    let mut holder = None;
    eventually(Duration::from_secs(5), "hold the port", || {
        holder = TcpListener::bind(("127.0.0.1", rport)).ok();
        holder.is_some()
    });
    let holder6 = TcpListener::bind(("::1", rport)).ok();
    eventually(Duration::from_secs(15), "retrying", || {
        fwd_state().as_deref() == Some("retrying")
    });
    drop(holder);
    drop(holder6);
    eventually(Duration::from_secs(20), "active again", || {
        fwd_state().as_deref() == Some("active")
    });
}

#[test]
fn on_event_fires_once_per_outage() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start(&env);
    let log = env.path("events.log");
    let hook = format!(
        "echo \"$SSHSHIM_EVENT $SSHSHIM_PROFILE\" >> {}",
        log.display()
    );
    let shim = env
        .shim_builder(sshd.port())
        .args(&[
            "--on-event",
            &hook,
            "--max-backoff",
            "0.5",
            "--connect-timeout",
            "2",
        ])
        .start();
    let count = |ev: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{ev} ")))
            .count()
    };
    eventually(Duration::from_secs(5), "connected event", || {
        count("connected") == 1
    });
    sshd.kill();
    assert!(
        shim.wait_stderr("attempt 3", Duration::from_secs(20)),
        "{}",
        shim.stderr_text()
    );
    sshd.restart();
    assert!(shim.wait_stderr("reconnected", Duration::from_secs(20)));
    eventually(Duration::from_secs(5), "disconnected event", || {
        count("disconnected") == 1
    });
    // Several failed attempts, one outage: one event.
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count("disconnected"),
        1,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn service_install_dry_run_prints_a_valid_unit() {
    let env = TestEnv::new();
    let out = run(&mut sshshim(
        &env,
        &["service", "install", "--dry-run", "lab"],
    ));
    assert_success(&out, "service install --dry-run");
    let text = stdout_text(&out);
    for needle in [
        "[Service]",
        "Type=notify",
        "Restart=always",
        "After=network-online.target",
        "WatchdogSec=",
        " supervise ",
        "systemctl --user",
        "sshshim-lab.service",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let unit_text: String = text
            .lines()
            .skip_while(|l| !l.starts_with("[Unit]"))
            .take_while(|l| !l.starts_with("Would run"))
            .map(|l| format!("{l}\n"))
            .collect();
        let unit = env.path("sshshim-lab.service");
        std::fs::write(&unit, unit_text).unwrap();
        let out = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit));
        let err = stderr_text(&out);
        assert!(
            !err.contains("Unknown key") && !err.contains("Unknown section"),
            "{err}"
        );
    }
}

//! Self-tests for the integration-test harness (no shim involved).

mod support;

use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// sshd starts and runs a command for the current user.
#[test]
fn sshd_runs_command() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let out = run(&mut sshd.ssh(&["echo hi"]));
    assert_success(&out, "ssh echo hi");
    assert_eq!(stdout_text(&out), "hi\n");
    assert!(out.stderr.is_empty(), "stderr: {}", stderr_text(&out));
    let kh = std::fs::read_to_string(env.known_hosts()).unwrap();
    assert!(
        kh.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 AAAA", sshd.port())),
        "known_hosts: {kh}"
    );
}

/// Killing sshd makes connections fail; restart serves on the same port.
#[test]
fn sshd_kill_and_restart_same_port() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start_with(&env, &["MaxSessions 10"]);
    let port = sshd.port();
    sshd.kill();
    let out = run(&mut sshd.ssh(&["true"]));
    assert_eq!(
        exit_code(&out.status),
        255,
        "ssh should fail while sshd is down"
    );
    sshd.restart();
    assert_eq!(sshd.port(), port);
    let out = run(&mut sshd.ssh(&["echo again"]));
    assert_success(&out, "ssh after restart");
    assert_eq!(stdout_text(&out), "again\n");
}

/// `kill()` also ends established sessions.
#[test]
fn sshd_kill_ends_sessions() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start(&env);
    let mut cmd = sshd.ssh(&["sleep 60"]);
    let t = thread::spawn(move || run_with_timeout(&mut cmd, b"", Duration::from_secs(30)));
    // Wait (bounded) until the session's shell exists under sshd.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path().join("cmdline"))
            .is_ok_and(|c| c.starts_with("sleep\u{0}60"))
    }) {
        assert!(Instant::now() < deadline, "session never started");
        thread::sleep(Duration::from_millis(20));
    }
    sshd.kill();
    let out = t.join().unwrap();
    assert_eq!(exit_code(&out.status), 255);
}

/// FaultProxy: Pass forwards, Freeze stalls new connections, Refuse resets,
/// drop_all aborts established sessions, and compare() works across ports.
#[test]
fn fault_proxy_modes() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let proxy = FaultProxy::start(sshd.port());

    let out = run(&mut env.ssh(proxy.port(), &["echo hi"]));
    assert_success(&out, "ssh via proxy");
    assert_eq!(stdout_text(&out), "hi\n");

    // Same command direct and via the proxy must be indistinguishable.
    compare_ports(
        &env,
        sshd.port(),
        proxy.port(),
        &["echo out; echo err >&2; exit 3"],
        b"",
    );
    compare_ports(&env, sshd.port(), proxy.port(), &["cat"], b"stdin data\n");

    proxy.set_delay(Duration::from_millis(20));
    let out = run(&mut env.ssh(proxy.port(), &["echo slow"]));
    assert_eq!(stdout_text(&out), "slow\n");
    proxy.set_delay(Duration::ZERO);

    proxy.set_mode(Mode::Freeze);
    let start = Instant::now();
    let mut cmd = env.ssh_cmd(proxy.port(), &["-o", "ConnectTimeout=2"], &["true"]);
    let out = run_with_timeout(&mut cmd, b"", Duration::from_secs(20));
    assert_eq!(exit_code(&out.status), 255, "frozen connect must fail");
    assert!(start.elapsed() < Duration::from_secs(15));

    proxy.set_mode(Mode::Refuse);
    let out = run(&mut env.ssh(proxy.port(), &["true"]));
    assert_eq!(exit_code(&out.status), 255, "refused connect must fail");

    proxy.set_mode(Mode::Pass);
    let mut cmd = env.ssh(proxy.port(), &["echo started; sleep 60"]);
    let t = thread::spawn(move || run_with_timeout(&mut cmd, b"", Duration::from_secs(30)));
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.connection_count() == 0 {
        assert!(Instant::now() < deadline, "no proxied connection");
        thread::sleep(Duration::from_millis(20));
    }
    // The remote command is running (not a fixed wait: a loaded machine
    // may take longer to start it).
    eventually(Duration::from_secs(10), "remote sleep 60", || {
        !sshd.session_pids_containing("sleep 60").is_empty()
    });
    let start = Instant::now();
    proxy.drop_all();
    let out = t.join().unwrap();
    assert_eq!(exit_code(&out.status), 255);
    assert!(start.elapsed() < Duration::from_secs(10));
    // The orphaned `sleep 60` is found via the session marker and killed.
    let mut sshd = sshd;
    assert!(!sshd.session_pids().is_empty(), "orphan session expected");
    sshd.kill();
    // SIGKILL is delivered at once, but a dying process stays listed until
    // it is reaped.
    eventually(Duration::from_secs(5), "sessions gone after kill()", || {
        sshd.session_pids().is_empty()
    });
}

/// run_with_timeout kills and panics on overrun.
#[test]
#[should_panic(expected = "timed out")]
fn run_with_timeout_panics() {
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("10");
    run_with_timeout(&mut cmd, b"", Duration::from_millis(200));
}

/// sha256 helper matches a known vector.
#[test]
fn sha256_known_vector() {
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

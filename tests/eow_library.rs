//! The `eow@openssh.com` workaround without main's logging (issue 21): the
//! library run in this process, with no logger or tracing subscriber set
//! up at all (as a program embedding sshshim might), still ends `ssh HOST
//! 'yes' | head` promptly and stops the remote `yes`. tests/eow.rs compares
//! the same with sshd through the binary. Its own test binary: it sets the
//! process's environment and `log` logger.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use sshshim::config::UpConfig;
use sshshim::config::spec::HostSpec;
use sshshim::shim::{self, Exit};
use support::*;
use tokio_util::sync::CancellationToken;

/// The settings `sshshim up` gets from tests/support's default arguments.
fn config(env: &TestEnv, sshd_port: u16) -> UpConfig {
    UpConfig {
        name: "eow-library".into(),
        target: HostSpec {
            host: "127.0.0.1".into(),
            port: sshd_port,
            user: env.user().into(),
            identities: vec![env.user_key()],
            identities_explicit: true,
            identities_only: false,
            agent: None,
            known_hosts: env.known_hosts(),
            global_known_hosts: Vec::new(),
            accept_new: false,
        },
        jumps: Vec::new(),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        allow_non_loopback: false,
        authorized_keys: Some(env.authorized_keys()),
        host_key: Some(env.shim_host_key()),
        forwards: Vec::new(),
        tuning: sshshim::config::profile::Tuning {
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            keepalive_max: 3,
            max_backoff: Duration::from_secs(5),
            max_upstreams: 4,
            stall_limit: Duration::from_secs(60),
        },
        resume: None,
        on_event: None,
        metrics: None,
        mux: None,
        config_file: None,
        profile_destination: None,
    }
}

#[test]
fn yes_head_ends_promptly_without_mains_logging() {
    let env = TestEnv::new();
    let sshd = env.start_sshd();
    // SAFETY: this binary's only test, and no thread reads the environment
    // while it is set (the runtime and ssh start afterwards).
    unsafe {
        std::env::set_var("XDG_STATE_HOME", env.state_dir());
        std::env::set_var("XDG_RUNTIME_DIR", env.runtime_dir());
        std::env::remove_var("SSH_AUTH_SOCK");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = CancellationToken::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let running = rt.spawn(shim::run(
        config(&env, sshd.port()),
        stop.clone(),
        move |s| {
            let _ = tx.send(s.endpoint);
        },
    ));
    let port = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the shim did not start")
        .expect("no endpoint")
        .port();

    let marker = "sshshim-eow-library";
    let ssh = env.ssh(port, &[&format!("yes {marker}")]);
    let line = format!("{} | head -c 1000 | wc -c", shell_line(&ssh));
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new("bash").arg("-c").arg(&line),
        b"",
        Duration::from_secs(30),
    );
    let took = started.elapsed();
    assert_eq!(stdout_text(&out).trim(), "1000", "{}", stderr_text(&out));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sshd.session_pids_with_arg(marker).is_empty() {
        assert!(Instant::now() < deadline, "remote `yes` still running");
        std::thread::sleep(Duration::from_millis(50));
    }

    stop.cancel();
    let exit = rt.block_on(running).unwrap();
    assert!(matches!(exit, Exit::Stopped), "{exit:?}");
}

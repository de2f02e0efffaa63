//! Upstream host keys are always verified; the endpoint admits only our
//! user's keys; bad input gets a clear message, not a panic.

mod support;

use std::time::Duration;
use support::*;

#[test]
fn unknown_host_is_refused_until_accepted() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let empty = env.path("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let (code, _out, err) = env
        .shim_builder(sshd.port())
        .known_hosts(&empty)
        .run_expect_exit(Duration::from_secs(20));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not known"), "{err}");
    assert!(err.contains("SHA256:"), "{err}");
    assert!(err.contains("--accept-new"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // --accept-new records the key and connects; the next run needs no flag.
    let shim = env
        .shim_builder(sshd.port())
        .known_hosts(&empty)
        .arg("--accept-new")
        .start();
    let out = run(&mut shim.ssh(&["echo ok"]));
    assert_eq!(stdout_text(&out), "ok\n");
    drop(shim);
    let recorded = std::fs::read_to_string(&empty).unwrap();
    assert!(
        recorded.starts_with(&format!("[127.0.0.1]:{} ssh-ed25519 ", sshd.port())),
        "{recorded}"
    );
    env.shim_builder(sshd.port()).known_hosts(&empty).start();
}

#[test]
fn changed_host_key_is_refused_loudly() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let other = env.path("other_key");
    keygen(&other);
    let other_pub = std::fs::read_to_string(other.with_extension("pub")).unwrap();
    let kh = env.path("changed_known_hosts");
    let line: Vec<&str> = other_pub.split_whitespace().take(2).collect();
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} {}\n", sshd.port(), line.join(" ")),
    )
    .unwrap();
    for extra in [&[][..], &["--accept-new"][..]] {
        let (code, _out, err) = env
            .shim_builder(sshd.port())
            .known_hosts(&kh)
            .args(extra)
            .run_expect_exit(Duration::from_secs(20));
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("HAS CHANGED"), "{err}");
        assert_eq!(
            err.matches("SHA256:").count(),
            2,
            "both fingerprints: {err}"
        );
    }
    // The file is left alone.
    assert_eq!(std::fs::read_to_string(&kh).unwrap().lines().count(), 1);
}

#[test]
fn endpoint_admits_only_authorized_keys() {
    let rig = Rig::start();
    let stranger = rig.env.path("stranger_key");
    keygen(&stranger);
    let mut c = std::process::Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
    ])
    .args([
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .arg("-i")
    .arg(&stranger)
    .args(["-p", &rig.shim.port().to_string(), "127.0.0.1", "true"])
    .env_remove("SSH_AUTH_SOCK");
    let out = run(&mut c);
    assert_eq!(exit_code(&out.status), 255);
    assert!(
        stderr_text(&out).contains("Permission denied (publickey)"),
        "{}",
        stderr_text(&out)
    );

    // Password, keyboard-interactive and none are never offered or accepted.
    let mut c = rig.env.ssh_cmd(
        rig.shim.port(),
        &[
            "-o",
            "PubkeyAuthentication=no",
            "-o",
            "PreferredAuthentications=none,password,keyboard-interactive",
        ],
        &["true"],
    );
    let out = run(&mut c);
    assert_eq!(exit_code(&out.status), 255);
    assert!(
        stderr_text(&out).contains("Permission denied (publickey)"),
        "{}",
        stderr_text(&out)
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    // No multiplexing socket: the shims started below for the same
    // destination take the default one in turn.
    let shim = env
        .shim_builder(sshd.port())
        .args(&["--mux", "none"])
        .start();

    // The port is taken: say so and suggest --listen.
    let (code, _o, err) = env
        .shim_builder(sshd.port())
        .listen(&format!("127.0.0.1:{}", shim.port()))
        .run_expect_exit(Duration::from_secs(20));
    assert_eq!(code, 1);
    assert!(
        err.contains("already in use") && err.contains("--listen"),
        "{err}"
    );

    // A non-loopback endpoint needs an explicit flag.
    let (code, _o, err) = env
        .shim_builder(sshd.port())
        .listen("0.0.0.0:0")
        .run_expect_exit(Duration::from_secs(20));
    assert_eq!(code, 1);
    assert!(err.contains("--allow-non-loopback"), "{err}");

    // Connection refused upstream.
    let closed = free_port();
    // (Its own multiplexing socket: the first shim of this destination
    // still serves the default one, and a live socket is refused.)
    let (code, _o, err) = env
        .shim_builder(closed)
        .args(&["--mux", "none"])
        .run_expect_exit(Duration::from_secs(20));
    assert_eq!(code, 1);
    assert!(err.contains("connection refused"), "{err}");

    // A key file that is not a key, and a key the server does not accept
    // (auth rejected, methods named).
    let junk = env.path("junk_key");
    std::fs::write(&junk, "not a key\n").unwrap();
    let stranger = env.path("stranger");
    keygen(&stranger);
    let up_with_key = |key: &std::path::Path| {
        env.shim_builder(sshd.port())
            .no_default_args()
            .args(&[
                "up",
                "--listen",
                "127.0.0.1:0",
                "--known-hosts",
                env.known_hosts().to_str().unwrap(),
                "-i",
                key.to_str().unwrap(),
                "--authorized-keys",
                env.authorized_keys().to_str().unwrap(),
                "-p",
                &sshd.port().to_string(),
                &env.dest(),
            ])
            .run_expect_exit(Duration::from_secs(20))
    };
    let (code, _o, err) = up_with_key(&junk);
    assert_eq!(code, 1);
    assert!(err.contains("junk_key"), "{err}");
    let (code, _o, err) = up_with_key(&stranger);
    assert_eq!(code, 1);
    assert!(
        err.contains("rejected") && err.contains("publickey"),
        "{err}"
    );

    // A bad destination: a message saying what is expected.
    let out =
        run(std::process::Command::new(env!("CARGO_BIN_EXE_sshshim")).args(["up", "user@:22"]));
    assert_eq!(exit_code(&out.status), 1);
    let err = stderr_text(&out);
    assert!(
        err.contains("invalid destination 'user@:22'") && err.contains("[user@]host[:port]"),
        "{err}"
    );
    // A bad forward spec: a usage error before anything connects.
    let out = run(std::process::Command::new(env!("CARGO_BIN_EXE_sshshim"))
        .args(["up", "host", "-L", "nonsense"]));
    assert_eq!(exit_code(&out.status), 2);
    assert!(!stderr_text(&out).contains("panicked"));
}

/// What a raw TCP client running as `nobody` gets from `port`: the first
/// bytes the server sends, or "" if it closes first.
fn banner_as_nobody(port: u16) -> Option<String> {
    let script = format!(
        "import socket; s=socket.create_connection(('127.0.0.1',{port})); \
         s.settimeout(10); print(s.recv(100).decode(errors='replace'), end='')"
    );
    let mut cmd = std::process::Command::new("setpriv");
    // The system python: a user-installed one may be unreadable to nobody.
    cmd.current_dir("/").args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        &script,
    ]);
    let out = run(&mut cmd);
    out.status.success().then(|| stdout_text(&out))
}

#[test]
fn another_local_user_is_refused_before_the_handshake() {
    // SAFETY: getuid has no preconditions.
    let tools = ["/usr/bin/setpriv", "/usr/bin/python3"];
    if unsafe { libc::getuid() } != 0 || !tools.iter().all(|t| std::path::Path::new(t).exists()) {
        eprintln!("skipped: needs root, setpriv and /usr/bin/python3 to act as another user");
        return;
    }
    let rig = Rig::start();
    // sshd itself lets anyone see its banner; the shim shows nobody anything.
    let direct = banner_as_nobody(rig.sshd.port()).expect("nobody reaches sshd");
    assert!(direct.starts_with("SSH-2.0-"), "{direct:?}");
    let shim = banner_as_nobody(rig.shim.port()).expect("nobody's client ran");
    assert_eq!(shim, "", "another user got a banner from the shim");
    assert!(
        rig.shim
            .wait_stderr("refused local connection", Duration::from_secs(5)),
        "{}",
        rig.shim.stderr_text()
    );
    // Our own user is still served.
    assert_eq!(stdout_text(&run(&mut rig.ssh_shim(&["echo ok"]))), "ok\n");
}

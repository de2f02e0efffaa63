//! Upstream host keys are always verified; the endpoint admits only our
//! user's keys; bad input gets a clear message, not a panic.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
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
    // Its own runtime directory too: a second `up` of the same name would
    // (rightly) be told the profile already runs, before any port is tried.
    let other_run = env.path("other-run");
    std::fs::create_dir_all(&other_run).unwrap();
    std::fs::set_permissions(
        &other_run,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let shim = env
        .shim_builder(sshd.port())
        .args(&["--mux", "none"])
        .env("XDG_RUNTIME_DIR", other_run.display().to_string())
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
    python_as_nobody(&format!(
        "import socket; s=socket.create_connection(('127.0.0.1',{port})); \
         s.settimeout(10); print(s.recv(100).decode(errors='replace'), end='')"
    ))
}

/// Whether this test can act as another local user (root, setpriv and the
/// system python); says why not when it cannot.
fn can_be_nobody() -> bool {
    let tools = ["/usr/bin/setpriv", "/usr/bin/python3"];
    // SAFETY: getuid has no preconditions.
    let ok = unsafe { libc::getuid() } == 0 && tools.iter().all(|t| Path::new(t).exists());
    if !ok {
        eprintln!("skipped: needs root, setpriv and /usr/bin/python3 to act as another user");
    }
    ok
}

/// The stdout of a python `script` run as `nobody`, if it succeeded.
fn python_as_nobody(script: &str) -> Option<String> {
    let mut cmd = std::process::Command::new("setpriv");
    // The system python: a user-installed one may be unreadable to nobody.
    cmd.current_dir("/").args([
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        script,
    ]);
    let out = run(&mut cmd);
    out.status.success().then(|| stdout_text(&out))
}

#[test]
fn another_local_user_is_refused_before_the_handshake() {
    if !can_be_nobody() {
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

/// One HTTP GET on `port` with `host` as the Host header: the response.
fn http_get(port: u16, path: &str, host: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read the response");
    out
}

#[test]
fn metrics_serve_only_our_user_and_loopback_hosts() {
    let mport = free_port();
    let rig = Rig::start_with(&[], &["--metrics", &format!("127.0.0.1:{mport}")]);
    eventually(Duration::from_secs(10), "metrics up", || {
        TcpStream::connect(("127.0.0.1", mport)).is_ok()
    });
    // We read our status, addressed by any loopback name.
    for host in [
        "127.0.0.1",
        &format!("127.0.0.1:{mport}"),
        "localhost",
        "[::1]",
    ] {
        let resp = http_get(mport, "/status", host);
        assert!(resp.starts_with("HTTP/1.0 200 "), "{host}: {resp}");
        assert!(resp.contains("\"destination\""), "{host}: {resp}");
    }
    // A page that rebinds its own DNS name to 127.0.0.1 reads nothing.
    for path in ["/status", "/metrics"] {
        let resp = http_get(mport, path, &format!("rebind.example:{mport}"));
        assert!(resp.starts_with("HTTP/1.0 421 "), "{resp}");
        assert!(
            !resp.contains("destination") && !resp.contains("sshshim_up"),
            "{resp}"
        );
    }
    if !can_be_nobody() {
        return;
    }
    // Another local user gets 403 and no content, whatever it asks.
    for path in ["/status", "/metrics"] {
        let resp = python_as_nobody(&format!(
            "import socket; s=socket.create_connection(('127.0.0.1',{mport})); s.settimeout(10); \
             s.sendall(b'GET {path} HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n'); d=b''\n\
             while True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\n\
             print(d.decode(errors='replace'), end='')"
        ))
        .expect("nobody's client ran");
        assert!(resp.starts_with("HTTP/1.0 403 "), "{path}: {resp}");
        assert!(
            !resp.contains("destination") && !resp.contains("sshshim_up") && !resp.contains(".mux"),
            "{path}: {resp}"
        );
    }
    assert!(
        rig.shim
            .wait_stderr("metrics request from", Duration::from_secs(5)),
        "{}",
        rig.shim.stderr_text()
    );
}

#[test]
fn mux_directory_rule_is_what_openssh_users_expect() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    // Our own 0755 directory (~/.ssh/sockets with a default umask) works.
    let ours = env.path("sockets");
    std::fs::create_dir(&ours).unwrap();
    std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = ours.join("prod.mux");
    let shim = env
        .shim_builder(sshd.port())
        .args(&["--mux", sock.to_str().unwrap()])
        .start();
    let out = run(&mut mux_cmd(&sock, &["echo through-mux"]));
    assert_eq!(stdout_text(&out), "through-mux\n", "{}", stderr_text(&out));
    drop(shim);

    // A directory others can write (world or group): refused, saying why
    // and what to do; nothing is bound there.
    for mode in [0o777, 0o775] {
        let open = env.path(&format!("open-{mode:o}"));
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(mode)).unwrap();
        let sock = open.join("prod.mux");
        let (code, _out, err) = env
            .shim_builder(sshd.port())
            .args(&["--mux", sock.to_str().unwrap()])
            .run_expect_exit(Duration::from_secs(20));
        assert_eq!(code, 1, "{mode:o}: {err}");
        assert!(err.contains("other users can write it"), "{mode:o}: {err}");
        assert!(
            err.contains(&format!("chmod go-w {}", open.display())),
            "{err}"
        );
        assert!(!sock.exists());
    }

    // Another user's directory, even one only they can write: refused.
    if !can_be_nobody() {
        return;
    }
    let theirs = env.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let chown = run(std::process::Command::new("chown")
        .arg("nobody")
        .arg(&theirs));
    assert_success(&chown, "chown nobody");
    let (code, _out, err) = env
        .shim_builder(sshd.port())
        .args(&["--mux", theirs.join("prod.mux").to_str().unwrap()])
        .run_expect_exit(Duration::from_secs(20));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("instead of us") && err.contains("choose a directory"),
        "{err}"
    );
}

#[test]
fn sockets_never_live_where_another_user_can_create_them() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    // Another user got to the old /tmp fallback first (left alone if it
    // exists already: it is not ours to remove).
    // SAFETY: geteuid has no preconditions.
    let squatted = std::path::PathBuf::from(format!("/tmp/sshshim-{}", unsafe { libc::geteuid() }));
    /// Removes the squatted directory even if the test fails.
    struct Unsquat(Option<std::path::PathBuf>);
    impl Drop for Unsquat {
        fn drop(&mut self) {
            if let Some(d) = &self.0 {
                let _ = std::fs::remove_dir(d);
            }
        }
    }
    let mut created = Unsquat(None);
    if can_be_nobody() && !squatted.exists() {
        let out = run(std::process::Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "mkdir",
                "-m",
                "777",
            ])
            .arg(&squatted));
        assert_success(&out, "mkdir as nobody");
        created.0 = Some(squatted.clone());
    }
    // No XDG_RUNTIME_DIR (empty counts as unset): the sockets go to the
    // private state directory instead.
    let shim = env
        .shim_builder(sshd.port())
        .env("XDG_RUNTIME_DIR", "")
        .start();
    let run_dir = env.state_dir().join("sshshim/run");
    let meta = std::fs::symlink_metadata(&run_dir).expect("the runtime directory");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let no_xdg = |args: &[&str]| {
        let mut c = env.sshshim(args);
        c.env("XDG_RUNTIME_DIR", "").env("HOME", env.path("home"));
        c
    };
    // status finds it there, and ssh-config names the same socket.
    let out = run(&mut no_xdg(&["status", "--json"]));
    assert_success(&out, "status");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mux = st[0]["mux_socket"]
        .as_str()
        .expect("a mux socket")
        .to_owned();
    assert!(Path::new(&mux).starts_with(&run_dir), "{mux}");
    let name = st[0]["profile"].as_str().unwrap().to_owned();
    let out = run(&mut no_xdg(&["ssh-config", &name]));
    assert_success(&out, "ssh-config");
    assert!(
        stdout_text(&out).contains(&format!("  ControlPath {mux}\n")),
        "{}",
        stdout_text(&out)
    );
    // A real client gets through that socket.
    let out = run(&mut mux_cmd(Path::new(&mux), &["echo via-state-dir"]));
    assert_eq!(
        stdout_text(&out),
        "via-state-dir\n",
        "{}",
        stderr_text(&out)
    );
    if created.0.is_some() {
        let left = std::fs::read_dir(&squatted).unwrap().count();
        assert_eq!(left, 0, "sshshim used {}", squatted.display());
    }
    let out = run(&mut no_xdg(&["down", &name]));
    assert_success(&out, "down");
    drop(shim);
}

#[test]
fn names_that_would_break_out_of_other_files_are_refused() {
    let env = TestEnv::new();
    let home = env.path("home");
    std::fs::create_dir(&home).unwrap();
    let config = env.path("evil.toml");
    let evil = "x\nProxyCommand touch /tmp/pwned";
    std::fs::write(
        &config,
        format!("[profile.ok]\ndestination = \"h\"\n\n[profile.{evil:?}]\ndestination = \"h\"\n"),
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    for args in [
        &["ssh-config", "--same-name", "--install", "-c", cfg][..],
        &["ssh-config", "--install", "-c", cfg][..],
        &["up", "-c", cfg, "ok"][..],
        &["service", "install", "--dry-run", "-c", cfg][..],
    ] {
        let out = run(env.sshshim(args).env("HOME", &home));
        assert_eq!(exit_code(&out.status), 1, "{args:?}: {out:?}");
        let err = stderr_text(&out);
        assert!(err.contains("evil.toml:4:"), "{args:?}: {err}");
        assert!(
            err.contains("may only use letters, digits"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("\nProxyCommand"), "{args:?}: {err}");
    }
    // Named on the command line, the same name is never written either.
    let out = run(env
        .sshshim(&["ssh-config", "--same-name", "--install", "--", evil])
        .env("HOME", &home));
    assert_eq!(exit_code(&out.status), 1, "{out:?}");
    let out = run(env
        .sshshim(&["service", "install", "--dry-run", "--", evil])
        .env("HOME", &home));
    assert_eq!(exit_code(&out.status), 1, "{out:?}");
    assert!(
        stderr_text(&out).contains("may only use letters"),
        "{out:?}"
    );
    assert!(
        !home.join(".ssh").exists(),
        "something was written to ~/.ssh"
    );
}

#[test]
fn check_prints_a_hostile_server_version_cleaned() {
    // A "server" whose identification line moves the cursor up, rewrites
    // the line with a forged verdict and sets the window title.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("check connects");
        let _ = s.write_all(
            b"SSH-2.0-evil\x1b[1A\x1b[2K\r  ok    host key SHA256:forged\x1b]0;pwned\x07\xc2\x9b2J\r\n",
        );
        // Then nothing more: the handshake fails and check reports it.
    });
    let env = TestEnv::new();
    let dest = format!("{}@127.0.0.1:{port}", env.user());
    let out = run_with_timeout(
        env.sshshim(&["check", "-F", "/dev/null", "--timeout", "10", &dest])
            .env("HOME", env.path("home")),
        b"",
        Duration::from_secs(30),
    );
    server.join().unwrap();
    let (text, err) = (stdout_text(&out), stderr_text(&out));
    assert!(
        text.contains(
            "  ok    version    SSH-2.0-evil?[1A?[2K?  ok    host key SHA256:forged?]0;pwned??2J"
        ),
        "{text}\n{err}"
    );
    for s in [&text, &err] {
        assert!(!s.contains(['\x1b', '\x07', '\r', '\u{9b}']), "{s:?}");
    }
}

#[test]
fn wildcard_listener_checks_the_uid_of_local_clients() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let shim = env
        .shim_builder(sshd.port())
        .listen("0.0.0.0:0")
        .arg("--allow-non-loopback")
        .start();
    // Our own loopback client is admitted (before, the listener's 0.0.0.0
    // was looked up and every loopback client refused).
    let out = run(&mut shim.ssh(&["echo ok"]));
    assert_eq!(stdout_text(&out), "ok\n", "{}", shim.stderr_text());
    if !can_be_nobody() {
        return;
    }
    // Another local user is refused before any SSH byte.
    let got = banner_as_nobody(shim.port()).expect("nobody's client ran");
    assert_eq!(got, "", "another user got a banner");
    assert!(
        shim.wait_stderr("belongs to uid", Duration::from_secs(5)),
        "{}",
        shim.stderr_text()
    );
}

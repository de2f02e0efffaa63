//! sshshim's OpenSSH multiplexing socket, differential against a real
//! OpenSSH ControlMaster on the same sshd: the same client command through
//! either socket must give the same stdout, stderr and exit code. Then what
//! ControlMaster cannot do: survive the upstream connection.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::*;

/// A real OpenSSH ControlMaster to `sshd`, stopped on drop.
struct RealMaster {
    /// Its control socket.
    sock: PathBuf,
    /// The `ssh -M -N` process.
    child: Child,
}

impl RealMaster {
    /// Starts `ssh -M -N -S SOCK` to sshd and waits until it answers.
    fn start(env: &TestEnv, sshd: &Sshd) -> RealMaster {
        let sock = env.path("cm.sock");
        let mut c = Command::new("ssh");
        c.args(env.client_opts(sshd.port(), "-p"))
            .args(["-M", "-N", "-S"])
            .arg(&sock)
            .arg(format!("{}@{LOCALHOST}", env.user()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env_remove("SSH_AUTH_SOCK");
        let child = c.spawn().expect("start a ControlMaster");
        let m = RealMaster { sock, child };
        eventually(Duration::from_secs(20), "ControlMaster ready", || {
            mux_cmd(&m.sock, &["-O", "check"])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        m
    }
}

impl Drop for RealMaster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A closed loopback port: a client that falls back to a direct
/// connection fails at once, on loopback.
fn closed_port() -> u16 {
    free_port()
}

/// The shim's multiplexing socket (the default path for its destination).
fn shim_mux(env: &TestEnv) -> PathBuf {
    let name = format!("{}@{LOCALHOST}", env.user()).replace('@', "+40");
    env.runtime_dir()
        .join("sshshim")
        .join(format!("{name}.mux"))
}

/// A shim, a real ControlMaster and both sockets.
struct Pair {
    /// The real master (dropped first).
    cm: RealMaster,
    /// sshshim.
    shim: Shim,
    /// The shim's multiplexing socket.
    mux: PathBuf,
    /// sshd.
    sshd: Sshd,
    /// The test directory.
    env: TestEnv,
}

impl Pair {
    /// sshd (with `extra` config lines), a shim and a ControlMaster.
    fn start(extra: &[&str]) -> Pair {
        let env = TestEnv::new();
        let sshd = Sshd::start_with(&env, extra);
        let shim = env.shim_builder(sshd.port()).start();
        let mux = shim_mux(&env);
        assert!(mux.exists(), "no mux socket at {}", mux.display());
        let cm = RealMaster::start(&env, &sshd);
        Pair {
            cm,
            shim,
            mux,
            sshd,
            env,
        }
    }

    /// Runs `args` through both sockets and asserts the same stdout,
    /// stderr and exit code; returns the shim's output.
    fn compare(&self, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let t = Duration::from_secs(120);
        let direct = run_with_timeout(&mut mux_cmd(&self.cm.sock, args), stdin, t);
        let shim = run_with_timeout(&mut mux_cmd(&self.mux, args), stdin, t);
        assert_same_output(&direct, &shim, &format!("{args:?}"));
        shim
    }
}

#[test]
fn exec_matches_a_controlmaster() {
    let p = Pair::start(&[]);
    p.compare(&["echo hello"], b"");
    p.compare(&["exit 3"], b"");
    p.compare(&["echo out; echo err >&2; echo out2; exit 7"], b"");
    p.compare(&["printf '%s|' \"a b\" 'c  d' \\$HOME"], b"");
    p.compare(&["cat"], b"some input\nmore\n");
    p.compare(&["wc", "-c"], &vec![7u8; 3 << 20]);
    let out = run(&mut mux_cmd(&p.cm.sock, &["-O", "check"]));
    assert_success(&out, "-O check (ControlMaster)");
    let out = run(&mut mux_cmd(&p.mux, &["-O", "check"]));
    assert_success(&out, "-O check (sshshim)");
    assert!(stderr_text(&out).contains("Master running"), "{out:?}");
}

#[test]
fn bulk_both_ways_by_hash() {
    let p = Pair::start(&[]);
    let data = pseudo_random_bytes(64 << 20, 7);
    let out = run_with_timeout(
        &mut mux_cmd(&p.mux, &["sha256sum"]),
        &data,
        Duration::from_secs(180),
    );
    assert_success(&out, "64 MiB in");
    assert!(stdout_text(&out).starts_with(&sha256_hex(&data)), "{out:?}");
    let out = run_with_timeout(
        &mut mux_cmd(&p.mux, &["head -c 209715200 /dev/zero"]),
        b"",
        Duration::from_secs(180),
    );
    assert_success(&out, "200 MiB out");
    assert_eq!(out.stdout.len(), 200 << 20);
    assert!(out.stdout.iter().all(|b| *b == 0));
}

#[test]
fn scp_sftp_rsync_through_the_socket() {
    let p = Pair::start(&[]);
    let mux = p.mux.display().to_string();
    let opts = format!(
        "-F /dev/null -o BatchMode=yes -o ControlMaster=no -o ControlPath={mux} \
         -o HostName=127.0.0.1 -o Port={}",
        closed_port()
    );
    let src = p.env.path("src.bin");
    std::fs::write(&src, pseudo_random_bytes(1 << 20, 3)).unwrap();
    let dst = p.env.path("copied.bin");
    let out = run(Command::new("scp")
        .args(opts.split(' '))
        .arg(&src)
        .arg(format!("muxhost:{}", dst.display())));
    assert_success(&out, "scp");
    assert_eq!(sha256_file(&src), sha256_file(&dst));
    let back = p.env.path("back.bin");
    let batch = p.env.path("batch");
    std::fs::write(
        &batch,
        format!("get {} {}\n", dst.display(), back.display()),
    )
    .unwrap();
    let out = run(Command::new("sftp")
        .args(opts.split(' '))
        .arg("-b")
        .arg(&batch)
        .arg("muxhost"));
    assert_success(&out, "sftp");
    assert_eq!(sha256_file(&src), sha256_file(&back));
    let synced = p.env.path("synced.bin");
    let out = run(Command::new("rsync")
        .arg("-e")
        .arg(format!("ssh {opts}"))
        .arg(&src)
        .arg(format!("muxhost:{}", synced.display())));
    assert_success(&out, "rsync");
    assert_eq!(sha256_file(&src), sha256_file(&synced));
}

#[test]
fn forwards_through_the_socket() {
    let p = Pair::start(&[]);
    let svc = service(b"from the service");
    // -L via -O forward; stays after the client exits (as with ControlMaster).
    let lport = free_port();
    let out = run(&mut mux_cmd(
        &p.mux,
        &[
            "-O",
            "forward",
            "-L",
            &format!("127.0.0.1:{lport}:127.0.0.1:{svc}"),
        ],
    ));
    assert_success(&out, "-O forward -L");
    assert_eq!(fetch(lport).as_deref(), Some(&b"from the service"[..]));
    // -R 0: the port is printed, and the same spec again gives it again.
    let spec = format!("0:127.0.0.1:{svc}");
    let out = run(&mut mux_cmd(&p.mux, &["-O", "forward", "-R", &spec]));
    assert_success(&out, "-O forward -R 0");
    let port: u16 = stdout_text(&out)
        .trim()
        .parse()
        .expect("the allocated port");
    assert_eq!(fetch(port).as_deref(), Some(&b"from the service"[..]));
    let again = run(&mut mux_cmd(&p.mux, &["-O", "forward", "-R", &spec]));
    assert_eq!(stdout_text(&again).trim(), port.to_string());
    // -R with a fixed port.
    let rport = free_port();
    let out = run(&mut mux_cmd(
        &p.mux,
        &["-O", "forward", "-R", &format!("{rport}:127.0.0.1:{svc}")],
    ));
    assert_success(&out, "-O forward -R fixed");
    assert_eq!(fetch(rport).as_deref(), Some(&b"from the service"[..]));
    // -D: SOCKS through the upstream.
    let dport = free_port();
    let out = run(&mut mux_cmd(
        &p.mux,
        &["-O", "forward", "-D", &format!("127.0.0.1:{dport}")],
    ));
    assert_success(&out, "-O forward -D");
    let out = run(Command::new("curl")
        .args(["-s", "--http0.9", "--max-time", "20", "--socks5-hostname"])
        .arg(format!("127.0.0.1:{dport}"))
        .arg(format!("http://127.0.0.1:{svc}/")));
    assert!(
        stdout_text(&out).contains("from the service"),
        "socks: {out:?}"
    );
    // -O cancel with the original specs.
    for (flag, spec) in [
        ("-L", format!("127.0.0.1:{lport}:127.0.0.1:{svc}")),
        ("-R", spec.clone()),
    ] {
        let out = run(&mut mux_cmd(&p.mux, &["-O", "cancel", flag, &spec]));
        assert_success(&out, &format!("-O cancel {flag}"));
    }
    eventually(Duration::from_secs(10), "-L cancelled", || {
        std::net::TcpStream::connect((LOCALHOST, lport)).is_err()
    });
    eventually(Duration::from_secs(10), "-R 0 cancelled", || {
        fetch(port).is_none()
    });
}

#[test]
fn w_as_a_proxycommand() {
    let p = Pair::start(&[]);
    let proxy = format!(
        "ProxyCommand=ssh -F /dev/null -o BatchMode=yes -o ControlMaster=no \
         -o ControlPath={} -o HostName=127.0.0.1 -o Port={} -W %h:%p muxhost",
        p.mux.display(),
        closed_port()
    );
    let mut c = p
        .env
        .ssh_cmd(p.sshd.port(), &["-o", &proxy], &["echo through -W"]);
    let out = run(&mut c);
    assert_success(&out, "ssh through -W");
    assert_eq!(stdout_text(&out), "through -W\n");
}

#[test]
fn thirty_sessions_past_max_sessions() {
    let p = Pair::start(&["MaxSessions 10"]);
    let workers: Vec<_> = (0..30)
        .map(|i| {
            let mut c = mux_cmd(&p.mux, &[&format!("sleep 2; echo s-{i}")]);
            std::thread::spawn(move || run_with_timeout(&mut c, b"", Duration::from_secs(90)))
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        let out = w.join().unwrap();
        assert_success(&out, &format!("session {i}"));
        assert_eq!(stdout_text(&out), format!("s-{i}\n"));
    }
}

#[test]
fn survives_the_upstream_connection() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let proxy = FaultProxy::start(sshd.port());
    env.write_known_hosts(proxy.port());
    let shim = env
        .shim_builder(proxy.port())
        .args(&["--keepalive", "1", "--max-backoff", "1"])
        .start();
    let mux = {
        let name = format!("{}@{LOCALHOST}", env.user()).replace('@', "+40");
        env.runtime_dir()
            .join("sshshim")
            .join(format!("{name}.mux"))
    };
    let svc = service(b"reverse");
    let rport = free_port();
    let out = run(&mut mux_cmd(
        &mux,
        &["-O", "forward", "-R", &format!("{rport}:127.0.0.1:{svc}")],
    ));
    assert_success(&out, "-O forward -R");
    assert_eq!(fetch(rport).as_deref(), Some(&b"reverse"[..]));
    proxy.drop_all();
    // A new session waits for the reconnect instead of failing.
    let out = run_with_timeout(
        &mut mux_cmd(&mux, &["echo after"]),
        b"",
        Duration::from_secs(60),
    );
    assert_success(&out, "a session after the upstream was dropped");
    assert_eq!(stdout_text(&out), "after\n");
    eventually(Duration::from_secs(30), "-R listening again", || {
        fetch(rport).as_deref() == Some(&b"reverse"[..])
    });
    drop(shim);
}

#[test]
fn a_killed_tty_client_ends_the_remote_command() {
    let p = Pair::start(&[]);
    let marker = format!("sshshim-mux-kill-{}", std::process::id());
    let mut c = mux_cmd(&p.mux, &["-tt", &format!("sleep 300; echo {marker}")]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    eventually(Duration::from_secs(20), "remote sleep started", || {
        !p.sshd.session_pids_containing(&marker).is_empty()
    });
    let _ = child.kill();
    let _ = child.wait();
    eventually(Duration::from_secs(20), "remote command ended", || {
        p.sshd.session_pids_containing(&marker).is_empty()
    });
    let _ = &p.shim;
}

#[test]
fn ssh_config_asks_the_running_instance() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let shim = env.shim_builder(sshd.port()).start();
    let name = format!("{}@{LOCALHOST}", env.user());
    let key = env.user_key().display().to_string();
    let out = run(&mut env.sshshim(&["ssh-config", &name, "-i", &key]));
    assert_success(&out, "ssh-config");
    let block = stdout_text(&out);
    let mux = shim_mux(&env);
    assert!(
        block.contains(&format!("Port {}\n", shim.port())),
        "the running endpoint's port: {block}"
    );
    assert!(
        block.contains(&format!("ControlPath {}\n", mux.display()))
            && block.contains("ControlMaster no"),
        "{block}"
    );
    let file = env.path("block.conf");
    std::fs::write(&file, &block).unwrap();
    let alias = format!("{}-shim", name.replace('@', "+40"));
    let mut c = Command::new("ssh");
    c.args(["-F"])
        .arg(&file)
        .args(["-o", "BatchMode=yes", &alias, "echo via the block"])
        .env_remove("SSH_AUTH_SOCK");
    let out = run(&mut c);
    assert_success(&out, "ssh through the Host block");
    assert_eq!(stdout_text(&out), "via the block\n");
    let out = run(&mut env.sshshim(&["ssh-config", "--same-name", &name]));
    assert_success(&out, "ssh-config --same-name");
    let same = stdout_text(&out);
    assert!(
        same.contains(&format!("Host {name}\n"))
            && same.contains(&format!("ControlPath {}", mux.display()))
            && !same.contains("HostName"),
        "{same}"
    );
}

#[test]
fn interactive_shell_with_resize_and_exit_code() {
    let p = Pair::start(&[]);
    for (what, sock) in [("ControlMaster", &p.cm.sock), ("sshshim", &p.mux)] {
        let out = pty_drive(24, 80, SHELL_RESIZE_EXIT_3, mux_cmd(sock, &["-tt"]));
        assert!(out.contains("EXIT 3"), "{what}: {out}");
    }
}

#[test]
fn git_clone_and_push_through_the_socket() {
    let p = Pair::start(&[]);
    let remote = p.env.path("repo.git");
    let out = run(Command::new("git")
        .args(["init", "-q", "--bare"])
        .arg(&remote));
    assert_success(&out, "git init --bare");
    let ssh = format!(
        "ssh -F /dev/null -o BatchMode=yes -o ControlMaster=no -o ControlPath={} \
         -o HostName=127.0.0.1 -o Port={}",
        p.mux.display(),
        closed_port()
    );
    let work = p.env.path("work");
    let git = |args: &[&str], dir: &Path| {
        let mut c = Command::new("git");
        c.args(args)
            .current_dir(dir)
            .env("GIT_SSH_COMMAND", &ssh)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.org")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.org")
            .env_remove("SSH_AUTH_SOCK");
        let out = run(&mut c);
        assert_success(&out, &format!("git {args:?}"));
    };
    let url = format!("muxhost:{}", remote.display());
    git(&["clone", "-q", &url, work.to_str().unwrap()], p.env.dir());
    std::fs::write(work.join("f.txt"), "through the socket\n").unwrap();
    git(&["add", "f.txt"], &work);
    git(&["commit", "-q", "-m", "first"], &work);
    git(&["push", "-q", "origin", "HEAD"], &work);
    let again = p.env.path("again");
    git(&["clone", "-q", &url, again.to_str().unwrap()], p.env.dir());
    assert_eq!(
        std::fs::read_to_string(again.join("f.txt")).unwrap(),
        "through the socket\n"
    );
}

#[test]
fn stop_then_exit() {
    let p = Pair::start(&[]);
    // A session runs while the socket stops accepting: it goes on.
    let mut c = mux_cmd(&p.mux, &["sleep 2; echo still here"]);
    let running =
        std::thread::spawn(move || run_with_timeout(&mut c, b"", Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(500));
    let out = run(&mut mux_cmd(&p.mux, &["-O", "stop"]));
    assert_success(&out, "-O stop");
    eventually(Duration::from_secs(10), "socket removed", || {
        !p.mux.exists()
    });
    let out = running.join().unwrap();
    assert_success(&out, "the session that was running");
    assert_eq!(stdout_text(&out), "still here\n");
    // The endpoint still serves; `-O exit` needs the socket, so stop the
    // rest with a fresh shim and -O exit there.
    let mut shim = p.shim;
    assert!(shim.is_running(), "sshshim went on after -O stop");
    drop(p.cm);
    let env = p.env;
    let sshd = p.sshd;
    shim.kill();
    let mut shim2 = env.shim_builder(sshd.port()).start();
    let out = run(&mut mux_cmd(&shim_mux(&env), &["-O", "exit"]));
    assert_success(&out, "-O exit");
    assert!(
        shim2.wait_exit(Duration::from_secs(10)).is_some(),
        "sshshim did not stop on -O exit"
    );
}

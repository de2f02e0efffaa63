//! Session channels through the shim behave exactly as against sshd:
//! differential tests with real OpenSSH clients.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn simple_commands_match_sshd() {
    let rig = Rig::start();
    let out = rig.compare(&["echo hello"]);
    assert_eq!(stdout_text(&out), "hello\n");
    let out = rig.compare(&["exit 42"]);
    assert_eq!(exit_code(&out.status), 42);
    let out = rig.compare(&["echo only-stderr >&2; exit 3"]);
    assert_eq!(stderr_text(&out), "only-stderr\n");
    assert!(out.stdout.is_empty());
    // Killed by a signal: same exit code and message as sshd gives.
    rig.compare(&["kill -9 $$"]);
    // A shell without a pty reading its commands from stdin.
    let out = rig.compare_stdin(&[], b"echo from-stdin\nexit 7\n");
    assert_eq!(exit_code(&out.status), 7);
    // An unknown subsystem fails the same way.
    let out = rig.compare(&["-s", "no-such-subsystem"]);
    assert_ne!(exit_code(&out.status), 0);
}

/// Whether this CPU has the AES instructions sshshim looks for.
fn cpu_has_aes() -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags = |f: &str| {
        info.lines().any(|l| {
            (l.starts_with("flags") || l.starts_with("Features"))
                && l.split_whitespace().any(|w| w == f)
        })
    };
    if cfg!(target_arch = "x86_64") {
        flags("aes") && flags("pclmulqdq")
    } else {
        cfg!(target_arch = "aarch64") && flags("aes")
    }
}

/// The `kex: ...` lines of `ssh -v` output, without the "debug1: kex: "
/// prefix.
fn kex_lines(err: &str) -> Vec<&str> {
    err.lines()
        .filter_map(|l| l.strip_prefix("debug1: kex: "))
        .map(str::trim_end)
        .collect()
}

#[test]
fn stock_client_gets_the_fastest_algorithms_it_offers() {
    let rig = Rig::start();
    // OpenSSH's default options list ChaCha20 and curve25519 first; the
    // endpoint lists only the cheapest of what the client offers.
    let out = run(&mut rig.env.ssh_cmd(rig.shim.port(), &["-vvv"], &["true"]));
    assert_success(&out, "ssh -vvv true");
    let err = stderr_text(&out);
    let want = if cpu_has_aes() {
        "aes128-gcm@openssh.com"
    } else {
        "chacha20-poly1305@openssh.com"
    };
    let kex = kex_lines(&err);
    for dir in ["client->server", "server->client"] {
        let line = format!("{dir} cipher: {want} ");
        assert!(
            kex.iter().any(|l| l.starts_with(&line)),
            "expected {want} for {dir}:\n{err}"
        );
    }
    // OpenSSH does P-256 with OpenSSL, curve25519 with slower portable code.
    assert!(kex.contains(&"algorithm: ecdh-sha2-nistp256"), "{err}");
    // The server's list for this client: that one key exchange, and the
    // markers for extension negotiation and strict key exchange, both used.
    assert!(
        err.lines().any(|l| l.trim_end()
            == "debug2: KEX algorithms: ecdh-sha2-nistp256,ext-info-s,kex-strict-s-v00@openssh.com"),
        "{err}"
    );
    assert!(err.contains("will use strict KEX ordering"), "{err}");
    assert!(err.contains("server-sig-algs="), "{err}");
    // A client limited to ChaCha20 still gets ChaCha20, and one that
    // insists on curve25519 gets it.
    let out = run(&mut rig.env.ssh_cmd(
        rig.shim.port(),
        &[
            "-v",
            "-c",
            "chacha20-poly1305@openssh.com",
            "-o",
            "KexAlgorithms=curve25519-sha256",
        ],
        &["echo chacha"],
    ));
    assert_eq!(stdout_text(&out), "chacha\n", "{out:?}");
    let err = stderr_text(&out);
    let kex = kex_lines(&err);
    assert!(kex.contains(&"algorithm: curve25519-sha256"), "{err}");
    assert!(
        kex.iter()
            .any(|l| l.starts_with("client->server cipher: chacha20-poly1305@openssh.com ")),
        "{err}"
    );
    // A client configured without NIST curves still gets in (via DH).
    let hardened = run(&mut rig.env.ssh_cmd(
        rig.shim.port(),
        &[
            "-o",
            "KexAlgorithms=sntrup761x25519-sha512@openssh.com,\
             diffie-hellman-group-exchange-sha256,diffie-hellman-group16-sha512",
        ],
        &["echo hardened"],
    ));
    assert_eq!(stdout_text(&hardened), "hardened\n", "{hardened:?}");
    // Re-keying (the client asks every 256 KiB here) keeps the choice.
    // Four times the client's 2 MiB window: output that fits in one window
    // can all be on its way before the first re-key is done, so a second
    // one may never come (2 MB gave 2 or 3 key exchanges from run to run).
    let out = run(&mut rig.env.ssh_cmd(
        rig.shim.port(),
        &["-v", "-o", "RekeyLimit=256K"],
        &["head -c 8000000 /dev/zero"],
    ));
    assert_success(&out, "ssh -o RekeyLimit=256K");
    assert_eq!(out.stdout.len(), 8_000_000);
    let err = stderr_text(&out);
    let kex = kex_lines(&err);
    let algorithms: Vec<_> = kex
        .iter()
        .filter(|l| l.starts_with("algorithm: "))
        .collect();
    assert!(algorithms.len() >= 3, "expected re-keying:\n{err}");
    assert!(
        algorithms
            .iter()
            .all(|l| **l == "algorithm: ecdh-sha2-nistp256"),
        "{err}"
    );
    let ciphers: Vec<_> = kex.iter().filter(|l| l.contains(" cipher: ")).collect();
    assert_eq!(ciphers.len(), 2 * algorithms.len(), "{err}");
    assert!(
        ciphers
            .iter()
            .all(|l| l.contains(&format!(" cipher: {want} "))),
        "{err}"
    );
}

#[test]
fn bulk_data_both_ways_is_byte_exact() {
    let rig = Rig::start();
    let input = pseudo_random_bytes(64 << 20, 7);
    let out = rig.compare_stdin(&["cat"], &input);
    assert_eq!(sha256_hex(&out.stdout), sha256_hex(&input));
    // 200 MiB of output, with stderr interleaved at the end.
    let out = rig.compare(&["head -c 209715200 /dev/zero | tr '\\0' 'x'; echo done >&2"]);
    assert_eq!(out.stdout.len(), 200 << 20);
    assert_eq!(stderr_text(&out), "done\n");
}

#[test]
fn environment_via_sendenv() {
    let rig = Rig::start();
    let run_on = |port: u16| {
        let mut c = rig.env.ssh_cmd(
            port,
            &["-o", "SendEnv=SSHSHIM_TEST_VAR"],
            &["echo \"[$SSHSHIM_TEST_VAR]\""],
        );
        c.env("SSHSHIM_TEST_VAR", "sent through");
        run(&mut c)
    };
    let direct = run_on(rig.sshd.port());
    let shim = run_on(rig.shim.port());
    assert_same_output(&direct, &shim, "SendEnv");
    assert_eq!(stdout_text(&shim), "[sent through]\n");
}

#[test]
fn pty_size_interactive_shell_and_window_change() {
    let rig = Rig::start();
    for port in [rig.sshd.port(), rig.shim.port()] {
        // -tt sees a tty of the client's size.
        let out = pty_drive(
            33,
            111,
            &["expect:33 111", "wait"],
            rig.env.ssh_cmd(port, &["-tt"], &["stty size"]),
        );
        assert!(out.contains("EXIT 0"), "{out}");

        // An interactive login shell: run a command, resize, exit 3 at once.
        let started = Instant::now();
        let out = pty_drive(
            24,
            80,
            SHELL_RESIZE_EXIT_3,
            rig.env.ssh_cmd(port, &["-tt"], &[]),
        );
        assert!(out.contains("EXIT 3"), "port {port}: {out}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "interactive exit took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn reader_going_away_ends_remote_command() {
    let rig = Rig::start();
    // `yes` with a marker argument so we can look for it among processes.
    let ssh = rig.shim.ssh(&["yes sshshim-eow-marker"]);
    let cmdline = format!(
        "{} | head -c 1000 | wc -c",
        std::iter::once(ssh.get_program())
            .chain(ssh.get_args())
            .map(|a| format!("'{}'", a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = run_with_timeout(
        Command::new("sh")
            .arg("-c")
            .arg(&cmdline)
            .env_remove("SSH_AUTH_SOCK"),
        b"",
        Duration::from_secs(20),
    );
    assert_eq!(stdout_text(&out).trim(), "1000");
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_with_arg("sshshim-eow-marker") {
        assert!(Instant::now() < deadline, "remote `yes` still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a client with its standard streams closed.
fn spawn_quiet(mut cmd: Command) -> std::process::Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (10 s at most) until a process with `arg` in its command line exists.
fn wait_for_process(arg: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_with_arg(arg) {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether any process has `arg` in its command line.
fn process_with_arg(arg: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
            .unwrap_or(false)
    })
}

#[test]
fn killed_client_closes_remote_command() {
    let rig = Rig::start();
    let mut child = spawn_quiet(
        rig.shim
            .ssh(&["bash -c 'while :; do echo tick; sleep 0.1; done' sshshim-kill-marker"]),
    );
    wait_for_process("sshshim-kill-marker", "remote command never started");
    child.kill().unwrap();
    child.wait().unwrap();
    // The shim closes the upstream channel at once; the remote command's
    // next write fails and it ends, as it does when a direct client dies.
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_with_arg("sshshim-kill-marker") {
        assert!(
            Instant::now() < deadline,
            "remote command survived its client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn file_transfer_tools() {
    let rig = Rig::start();
    let env = &rig.env;
    let port = rig.shim.port();
    let data = pseudo_random_bytes(3 << 20, 11);
    let src = env.path("src.bin");
    std::fs::write(&src, &data).unwrap();
    let want = sha256_hex(&data);

    // scp (SFTP protocol by default) and legacy scp -O, both directions.
    let up = env.path("up.bin");
    assert_success(
        &run(&mut env.scp(port, &[src.to_str().unwrap(), &env.remote(&up)])),
        "scp upload",
    );
    assert_eq!(sha256_file(&up), want);
    let down = env.path("down.bin");
    assert_success(
        &run(&mut env.scp(port, &["-O", &env.remote(&up), down.to_str().unwrap()])),
        "scp -O download",
    );
    assert_eq!(sha256_file(&down), want);

    // sftp -b.
    let got = env.path("sftp.bin");
    let out = run(&mut env.sftp(
        port,
        &format!(
            "put {} {}\nget {} {}\n",
            src.display(),
            env.path("sftp-up.bin").display(),
            env.path("sftp-up.bin").display(),
            got.display()
        ),
    ));
    assert_success(&out, "sftp -b");
    assert_eq!(sha256_file(&got), want);

    // rsync -e ssh.
    let dst = env.path("rsync.bin");
    assert_success(
        &run(&mut env.rsync(port, &["-a", src.to_str().unwrap(), &env.remote(&dst)])),
        "rsync",
    );
    assert_eq!(sha256_file(&dst), want);
}

#[test]
fn agent_forwarding_reaches_our_agent() {
    let env = TestEnv::new();
    let sock = env.path("agent.sock");
    /// Kills the agent even when an assertion fails first.
    struct Agent(std::process::Child);
    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _agent = Agent(
        Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "ssh-agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let add = run(Command::new("ssh-add")
        .arg(env.user_key())
        .env("SSH_AUTH_SOCK", &sock));
    assert_success(&add, "ssh-add");

    let sshd = Sshd::start(&env);
    let shim = env
        .shim_builder(sshd.port())
        .env("SSH_AUTH_SOCK", sock.to_str().unwrap())
        .start();
    let list = |port: u16| {
        let mut c = env.ssh_cmd(port, &["-A"], &["ssh-add -l"]);
        c.env("SSH_AUTH_SOCK", &sock);
        run(&mut c)
    };
    let direct = list(sshd.port());
    let via = list(shim.port());
    assert_same_output(&direct, &via, "ssh -A ssh-add -l");
    assert!(
        stdout_text(&via).contains("ED25519"),
        "{}",
        stdout_text(&via)
    );
    // Without -A the remote cannot use the agent (sshd may still show a
    // socket left from the earlier -A session; the shim refuses it).
    let mut c = env.ssh_cmd(shim.port(), &[], &["ssh-add -l; echo rc=$?"]);
    c.env("SSH_AUTH_SOCK", &sock);
    let out = stdout_text(&run(&mut c));
    assert!(!out.contains("ED25519") && !out.contains("rc=0"), "{out}");
}

#[test]
fn stalled_reader_does_not_block_other_clients() {
    let rig = Rig::start();
    // A client whose output nobody reads: its stdout pipe fills and stays full.
    let mut stalled = rig
        .shim
        .ssh(&["cat /dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Ready when the shim has started buffering to its spill file, or,
    // with --resume, once the stalled session's output has stopped at
    // what the client took and the helper's window.
    let pid = rig.shim.pid();
    if rig.shim.resumable() {
        until_output_stalls(&rig.shim);
    } else {
        eventually(
            Duration::from_secs(20),
            "the shim spills the stalled channel",
            || spill_file_open(pid),
        );
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let out = run_with_timeout(&mut rig.shim.ssh(&["true"]), b"", Duration::from_secs(20));
        assert_success(&out, "ssh true beside a stalled reader");
        times.push(t.elapsed());
    }
    times.sort();
    assert!(
        times[1] < Duration::from_secs(1),
        "ssh true took {times:?} while another reader was stalled"
    );
    // Memory stays bounded while the stalled channel spills to disk.
    let status = std::fs::read_to_string(format!("/proc/{}/status", rig.shim.pid())).unwrap();
    let rss_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        rss_kib < 200 * 1024,
        "shim RSS {rss_kib} KiB while spilling"
    );
    // A resumable session's stalled reader makes its command wait, as
    // sshd does: nothing piles up in sshshim.
    assert!(
        !(rig.shim.resumable() && spill_file_open(pid)),
        "a resumable session spilled"
    );
    let _ = stalled.kill();
    let _ = stalled.wait();
}

/// Whether the shim `pid` has a spill file (an unlinked file) open.
fn spill_file_open(pid: u32) -> bool {
    let fd_dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(fd_dir).unwrap().flatten().any(|e| {
        std::fs::read_link(e.path()).is_ok_and(|p| p.to_string_lossy().contains("(deleted)"))
    })
}

/// Waits until the output of the resumable sessions `shim` holds stops
/// growing: their local readers took all they will.
fn until_output_stalls(shim: &Shim) {
    let mut last = None;
    eventually(
        Duration::from_secs(20),
        "the stalled session's output stops growing",
        || {
            let now = shim.held_output_bytes().filter(|&n| n >= 1 << 20);
            let still = now.is_some() && now == last;
            last = now;
            std::thread::sleep(Duration::from_millis(200));
            still
        },
    );
}

#[test]
fn sigterm_exits_promptly_and_cleanly() {
    let mut rig = Rig::start();
    let mut session = spawn_quiet(rig.shim.ssh(&["sleep 300"]));
    // Wait until the session is established (the remote sleep exists).
    wait_for_process("300", "session never started");
    let t = Instant::now();
    rig.shim.signal("TERM");
    let status = rig
        .shim
        .wait_exit(Duration::from_secs(5))
        .expect("shim did not exit after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    let status = wait_child(&mut session, Duration::from_secs(5)).expect("client still running");
    assert!(!status.success());
}

/// `python3` that reads stdin slowly (256 KiB every 10 ms) and prints the
/// byte count and sha256 of what it read.
const SLOW_READER: &str = "import sys,time,hashlib\nh=hashlib.sha256(); n=0\nwhile True:\n b=sys.stdin.buffer.read(262144)\n if not b: break\n h.update(b); n+=len(b); time.sleep(0.01)\nprint(n, h.hexdigest())";

/// Remote command writing `mib` MiB of a fixed pattern (bytes 0..=255).
fn pattern_cmd(mib: usize) -> String {
    format!(
        "python3 -c 'import sys; b=bytes(range(256))*4096; [sys.stdout.buffer.write(b) for _ in range({mib})]'"
    )
}

/// "COUNT SHA256" of what [`pattern_cmd`] writes.
fn pattern_digest(mib: usize) -> String {
    let script = format!(
        "import hashlib; h=hashlib.sha256(); b=bytes(range(256))*4096\n\
         for _ in range({mib}): h.update(b)\n\
         print({mib}*len(b), h.hexdigest())"
    );
    let out = run(std::process::Command::new("python3").arg("-c").arg(script));
    stdout_text(&out).trim().to_string()
}

/// sshd and a shim (with `args`) whose spill cap is 4 MiB, so tests reach
/// it quickly. The environment and sshd are returned to keep them alive.
fn small_spill_cap_rig(args: &[&str]) -> (TestEnv, Sshd, Shim) {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let shim = env
        .shim_builder(sshd.port())
        .env("SSHSHIM_SPILL_DISK_MIB", "4")
        .args(args)
        .start();
    (env, sshd, shim)
}

#[test]
fn slow_reader_past_the_spill_cap_gets_every_byte() {
    // A 48 MiB download read at ~25 MB/s hits the 4 MiB cap early and then
    // proceeds at the reader's pace (backpressure), losing nothing.
    let (_env, _sshd, shim) = small_spill_cap_rig(&["-v"]);
    let mut child = shim
        .ssh(&[&pattern_cmd(48)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = std::process::Command::new("python3")
        .arg("-c")
        .arg(SLOW_READER)
        .stdin(child.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(120)).expect("ssh still running");
    let out = reader.wait_with_output().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        status.success(),
        "ssh: {status:?} {err}\n{}",
        shim.stderr_text()
    );
    assert_eq!(stdout_text(&out).trim(), pattern_digest(48), "{err}");
    assert!(!err.contains("channel closed"), "{err}");
    if shim.resumable() {
        // The helper sends only what the reader took (and a window more):
        // the download never piles up in sshshim.
        assert!(
            !shim.stderr_text().contains("channel buffer full"),
            "{}",
            shim.stderr_text()
        );
    } else {
        assert!(
            shim.stderr_text().contains("channel buffer full"),
            "the download never reached the cap, so this tested nothing"
        );
    }
}

#[test]
fn reader_stalled_past_the_spill_cap_is_closed_and_others_go_on() {
    let (_env, _sshd, shim) = small_spill_cap_rig(&[]);
    // Nobody reads this client's stdout: its buffer fills, then the cap.
    let mut stalled = shim
        .ssh(&["cat /dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if shim.resumable() {
        // With --resume the command waits for its reader, as with sshd:
        // the shared connection is not at stake, so nothing is closed.
        until_output_stalls(&shim);
    } else {
        assert!(
            shim.wait_stderr("closing channel", Duration::from_secs(30)),
            "the stalled channel was never closed: {}",
            shim.stderr_text()
        );
        assert!(shim.stderr_text().contains("stopped reading"));
    }
    let t = Instant::now();
    let out = run_with_timeout(&mut shim.ssh(&["echo alive"]), b"", Duration::from_secs(20));
    assert_eq!(stdout_text(&out), "alive\n");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    if shim.resumable() {
        assert!(
            stalled.try_wait().unwrap().is_none()
                && !shim.stderr_text().contains("closing channel"),
            "a resumable session was closed for a stalled reader: {}",
            shim.stderr_text()
        );
    }
    let _ = stalled.kill();
    let _ = stalled.wait();
}

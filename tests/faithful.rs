//! Faithful to every client: the client's own agent with `-A`, any
//! algorithm a client insists on, the server's reason for a refused
//! channel, and new sessions that never wait behind a stalled reader.
//! Differential where sshd gives the answer: the same client command
//! against sshd and through the shim must give the same output.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// Kills a client process on drop, so a failing test leaves none behind.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two extra user keys, each authorized upstream, for two agents.
fn two_keys(env: &TestEnv) -> (PathBuf, PathBuf) {
    let (a, b) = (env.path("agent_key_a"), env.path("agent_key_b"));
    keygen(&a);
    keygen(&b);
    (a, b)
}

/// `ssh [-A] ... 'ssh-add -l'` to `port` with `agent` as the client's own.
fn list_keys(env: &TestEnv, port: u16, forward: bool, agent: &Agent) -> Output {
    let opts: &[&str] = if forward { &["-A"] } else { &[] };
    let mut c = env.ssh_cmd(port, opts, &["ssh-add -l"]);
    c.env("SSH_AUTH_SOCK", agent.sock());
    run_with_timeout(&mut c, b"", DEFAULT_TIMEOUT)
}

#[test]
fn ssh_a_forwards_the_clients_own_agent() {
    let env = TestEnv::new();
    let (key_a, key_b) = two_keys(&env);
    let (fp_a, fp_b) = (fingerprint(&key_a), fingerprint(&key_b));
    let agent_a = Agent::start(&env, "agent_a", &[&key_a]);
    let agent_b = Agent::start(&env, "agent_b", &[&key_b]);
    let sshd = Sshd::start(&env);
    // The shim has no agent of its own (the builder removes SSH_AUTH_SOCK).
    let shim = env.shim_builder(sshd.port()).start();

    // Without -A there is no agent, exactly as with sshd.
    let direct = list_keys(&env, sshd.port(), false, &agent_a);
    let via = list_keys(&env, shim.port(), false, &agent_a);
    assert_same_output(&direct, &via, "ssh 'ssh-add -l' without -A");
    assert_ne!(exit_code(&via.status), 0);

    // -A from a client that has no agent: refused alike.
    let no_agent = |port: u16| {
        let mut c = env.ssh_cmd(port, &["-A"], &["ssh-add -l"]);
        c.env_remove("SSH_AUTH_SOCK");
        run_with_timeout(&mut c, b"", DEFAULT_TIMEOUT)
    };
    assert_same_output(
        &no_agent(sshd.port()),
        &no_agent(shim.port()),
        "ssh -A 'ssh-add -l' from a client without an agent",
    );

    // With -A each client sees its own agent, one after the other.
    for (agent, mine, other) in [
        (&agent_a, &fp_a, &fp_b),
        (&agent_b, &fp_b, &fp_a),
        (&agent_a, &fp_a, &fp_b),
    ] {
        let direct = list_keys(&env, sshd.port(), true, agent);
        let via = list_keys(&env, shim.port(), true, agent);
        assert_same_output(&direct, &via, "ssh -A 'ssh-add -l'");
        let out = stdout_text(&via);
        assert!(out.contains(mine.as_str()), "own key missing: {out}");
        assert!(!out.contains(other.as_str()), "another client's key: {out}");
    }

    // While one -A session stays open, a newer one is served its own agent
    // (sshd keeps one agent socket per connection: the newest wins).
    let mut hold = env.ssh_cmd(shim.port(), &["-A"], &["sleep 60"]);
    hold.env("SSH_AUTH_SOCK", agent_a.sock())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let held = Client(hold.spawn().unwrap());
    eventually(Duration::from_secs(20), "the held session starts", || {
        !sshd.session_pids().is_empty()
    });
    let via = list_keys(&env, shim.port(), true, &agent_b);
    assert_success(&via, "ssh -A beside another -A session");
    assert!(stdout_text(&via).contains(fp_b.as_str()));
    assert!(!stdout_text(&via).contains(fp_a.as_str()));
    drop(held);

    // Once no -A session is open, a client without -A gets no agent even
    // though sshd now sets SSH_AUTH_SOCK in every session of the connection.
    eventually(Duration::from_secs(20), "the held session ends", || {
        shim_status(&env).is_some_and(|s| s["channels"]["session"].as_u64().unwrap_or(0) == 0)
    });
    let via = list_keys(&env, shim.port(), false, &agent_a);
    assert_ne!(exit_code(&via.status), 0, "{}", stdout_text(&via));
    assert!(
        !stdout_text(&via).contains("SHA256:"),
        "{}",
        stdout_text(&via)
    );
}

/// Runs `ssh OPTS ... CMD` against sshd and through the shim and asserts
/// the same result.
fn same_with_options(rig: &Rig, opts: &[&str]) {
    let cmd = ["echo connected; uname -s"];
    let direct = run_with_timeout(
        &mut rig.env.ssh_cmd(rig.sshd.port(), opts, &cmd),
        b"",
        DEFAULT_TIMEOUT,
    );
    let via = run_with_timeout(
        &mut rig.env.ssh_cmd(rig.shim.port(), opts, &cmd),
        b"",
        DEFAULT_TIMEOUT,
    );
    assert_success(&direct, &format!("direct ssh {opts:?}"));
    assert_same_output(&direct, &via, &format!("ssh {opts:?}"));
}

/// The names `ssh -Q WHAT` lists.
fn client_knows(what: &str, name: &str) -> bool {
    let out = run(Command::new("ssh").args(["-Q", what]));
    stdout_text(&out).lines().any(|l| l.trim() == name)
}

#[test]
fn clients_insisting_on_any_algorithm_connect() {
    let rig = Rig::start();
    let cases: &[&[&str]] = &[
        &["-o", "Ciphers=chacha20-poly1305@openssh.com"],
        &["-o", "KexAlgorithms=curve25519-sha256"],
        &["-o", "KexAlgorithms=curve25519-sha256@libssh.org"],
        &[
            "-o",
            "Ciphers=aes128-ctr",
            "-o",
            "MACs=hmac-sha2-256-etm@openssh.com",
        ],
        &["-o", "Ciphers=aes256-ctr", "-o", "MACs=hmac-sha2-512"],
        &["-o", "KexAlgorithms=ecdh-sha2-nistp521"],
        &["-o", "KexAlgorithms=ecdh-sha2-nistp384"],
        &["-o", "KexAlgorithms=diffie-hellman-group14-sha256"],
        &["-o", "KexAlgorithms=diffie-hellman-group16-sha512"],
        &["-o", "KexAlgorithms=diffie-hellman-group-exchange-sha256"],
    ];
    for opts in cases {
        let t = Instant::now();
        same_with_options(&rig, opts);
        eprintln!("{opts:?}: {:?}", t.elapsed());
    }
    if client_knows("kex", "mlkem768x25519-sha256") {
        same_with_options(&rig, &["-o", "KexAlgorithms=mlkem768x25519-sha256"]);
    } else {
        eprintln!("skipped mlkem768x25519-sha256: this OpenSSH client does not know it");
    }
}

#[test]
fn hardened_client_gets_curve25519_not_finite_field_dh() {
    let rig = Rig::start();
    // ssh-audit's hardening guide for OpenSSH clients.
    let hardened = [
        "-v",
        "-o",
        "KexAlgorithms=sntrup761x25519-sha512@openssh.com,curve25519-sha256,\
         curve25519-sha256@libssh.org,diffie-hellman-group16-sha512,\
         diffie-hellman-group18-sha512,diffie-hellman-group-exchange-sha256",
        "-o",
        "Ciphers=chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,\
         aes128-gcm@openssh.com,aes256-ctr,aes192-ctr,aes128-ctr",
        "-o",
        "MACs=hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,\
         umac-128-etm@openssh.com",
    ];
    let out = run_with_timeout(
        &mut rig
            .env
            .ssh_cmd(rig.shim.port(), &hardened, &["echo hardened"]),
        b"",
        DEFAULT_TIMEOUT,
    );
    assert_success(&out, "hardened ssh through the shim");
    assert_eq!(stdout_text(&out), "hardened\n");
    let err = stderr_text(&out);
    let kex = err
        .lines()
        .find_map(|l| l.strip_prefix("debug1: kex: algorithm: "))
        .unwrap_or_else(|| panic!("no kex line in:\n{err}"));
    assert_eq!(kex.trim(), "curve25519-sha256", "{err}");
}

/// A loopback port nothing listens on.
fn refused_port() -> u16 {
    let port = free_port();
    assert!(std::net::TcpStream::connect((LOCALHOST, port)).is_err());
    port
}

/// Runs `ssh -N -L PORT:TARGET` to `port`, connects to the forward once
/// and returns the line the client prints when the open is refused.
fn forward_refusal(env: &TestEnv, port: u16, target: &str) -> String {
    let listen = free_port();
    let spec = format!("{LOCALHOST}:{listen}:{target}");
    let mut c = env.ssh_cmd(
        port,
        // ssh reports refusals at its default level, INFO.
        &[
            "-N",
            "-L",
            &spec,
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=INFO",
        ],
        &[],
    );
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut client = Client(c.spawn().unwrap());
    let err = Capture::spawn(client.0.stderr.take().unwrap());
    // The first successful connect is the one whose open is refused.
    eventually(Duration::from_secs(20), "ssh -L listens", || {
        std::net::TcpStream::connect((LOCALHOST, listen)).is_ok()
    });
    assert!(
        err.wait_for(Duration::from_secs(30), |t| t.contains("open failed")),
        "no refusal reported: {}",
        err.text()
    );
    drop(client);
    let text = err.text();
    text.lines()
        .find(|l| l.contains("open failed"))
        .map(str::to_owned)
        .unwrap()
}

#[test]
fn refused_target_gets_sshds_reason() {
    let rig = Rig::start();
    let target = format!("{LOCALHOST}:{}", refused_port());
    // -W: the whole client output is the same (ssh reports only "stdio
    // forwarding failed" there).
    let direct = run_with_timeout(
        &mut rig.env.ssh_cmd(rig.sshd.port(), &["-W", &target], &[]),
        b"",
        DEFAULT_TIMEOUT,
    );
    let via = run_with_timeout(
        &mut rig.env.ssh_cmd(rig.shim.port(), &["-W", &target], &[]),
        b"",
        DEFAULT_TIMEOUT,
    );
    assert_same_output(&direct, &via, "ssh -W to a refused port");
    assert_eq!(exit_code(&via.status), 255);

    // -L: the line the client prints for a refused forwarded connection.
    let direct = forward_refusal(&rig.env, rig.sshd.port(), &target);
    let via = forward_refusal(&rig.env, rig.shim.port(), &target);
    eprintln!("{via}");
    assert_eq!(direct, via);
    assert!(
        via.ends_with("open failed: connect failed: Connection refused"),
        "{via}"
    );
}

#[test]
fn forwarded_open_during_an_outage_says_why() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start(&env);
    let shim = env
        .shim_builder(sshd.port())
        .args(&["--connect-timeout", "2", "--max-backoff", "1"])
        .start();
    let target = format!("{LOCALHOST}:{}", sshd.port());
    sshd.kill();
    assert!(
        shim.wait_stderr("reconnect attempt", Duration::from_secs(20)),
        "the shim never noticed the outage: {}",
        shim.stderr_text()
    );
    let line = forward_refusal(&env, shim.port(), &target);
    eprintln!("{line}");
    assert!(
        line.contains("open failed: connect failed: upstream unavailable: reconnecting (attempt "),
        "{line}"
    );
    assert!(line.contains("last error: cannot connect"), "{line}");
}

/// sshd and a shim whose spill cap is 4 MiB (so tests reach it quickly),
/// logging at debug level; `args` are added. The environment and sshd are
/// returned to keep them alive.
fn small_cap_rig(args: &[&str]) -> (TestEnv, Sshd, Shim) {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let shim = env
        .shim_builder(sshd.port())
        .env("SSHSHIM_SPILL_DISK_MIB", "4")
        .arg("-v")
        .args(args)
        .start();
    (env, sshd, shim)
}

/// The upstream congestion count `sshshim status --json` reports.
fn congested(env: &TestEnv) -> u64 {
    shim_status(env)
        .and_then(|s| s["upstream"]["congested_connections"].as_u64())
        .unwrap_or(0)
}

#[test]
fn new_sessions_avoid_a_connection_held_by_a_stalled_reader() {
    const SIZE: u64 = 32 << 20;
    let (env, _sshd, shim) = small_cap_rig(&["--stall-limit", "60"]);
    // A download whose reader stops: we hold its stdout without reading.
    let mut c = shim.ssh(&[&format!("head -c {SIZE} /dev/zero")]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut stalled = Client(c.spawn().unwrap());
    let t = Instant::now();
    eventually(
        Duration::from_secs(60),
        "status shows the connection congested",
        || congested(&env) > 0,
    );
    eprintln!("at the cap after {:?}", t.elapsed());
    assert!(shim.stderr_text().contains("channel buffer full"));

    for i in 0..3 {
        let t = Instant::now();
        let out = run_with_timeout(&mut shim.ssh(&["true"]), b"", Duration::from_secs(30));
        assert_success(&out, "ssh true beside a stalled reader");
        eprintln!("ssh true #{i} beside a stalled reader: {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    let st = shim_status(&env).expect("status");
    eprintln!("status meanwhile: {}", st["upstream"]);
    assert!(st["upstream"]["congested_connections"].as_u64() >= Some(1));
    assert!(st["upstream"]["connections"].as_u64() >= Some(2), "{st}");
    let human = stdout_text(&run(&mut sshshim_cmd(&env, &["status"])));
    assert!(human.contains("congested"), "{human}");

    // The reader resumes within the stall limit and gets every byte.
    let mut stdout = stalled.0.stdout.take().unwrap();
    let mut stderr = stalled.0.stderr.take().unwrap();
    let counter = thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return n,
                Ok(k) => n += k as u64,
            }
        }
    });
    let status = wait_child(&mut stalled.0, Duration::from_secs(240)).expect("download ended");
    let got = counter.join().unwrap();
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert!(status.success(), "{status:?}: {err}");
    assert_eq!(got, SIZE, "{err}");
    eventually(Duration::from_secs(10), "congestion cleared", || {
        congested(&env) == 0
    });
}

#[test]
fn reader_stopped_for_good_is_cut_and_told_why() {
    let (_env, _sshd, shim) = small_cap_rig(&["--stall-limit", "2"]);
    let mut c = shim.ssh(&["cat /dev/zero"]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut stalled = Client(c.spawn().unwrap());
    assert!(
        shim.wait_stderr("closing channel", Duration::from_secs(60)),
        "the stalled channel was never closed: {}",
        shim.stderr_text()
    );
    // Now drain what the client still holds, so it can show the message.
    let mut stdout = stalled.0.stdout.take().unwrap();
    let drain = thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let err = Capture::spawn(stalled.0.stderr.take().unwrap());
    let status = wait_child(&mut stalled.0, Duration::from_secs(60)).expect("client still running");
    let _ = drain.join();
    err.wait_eof(Duration::from_secs(5));
    let text = err.text();
    assert!(!status.success());
    assert!(
        text.contains(
            "sshshim: channel closed: the local reader stopped reading: nothing taken for 2s"
        ),
        "{text}"
    );
}

/// Writes the Host block `sshshim ssh-config NAME` prints for `shim`.
fn host_block(env: &TestEnv, shim: &Shim) -> (String, PathBuf) {
    let name = shim_status(env).expect("status")["profile"]
        .as_str()
        .expect("profile name")
        .to_owned();
    let out = run(&mut sshshim_cmd(
        env,
        &[
            "ssh-config",
            &name,
            "--port",
            &shim.port().to_string(),
            "-i",
            env.user_key().to_str().unwrap(),
        ],
    ));
    assert_success(&out, "sshshim ssh-config");
    let path = env.path("host_block");
    std::fs::write(&path, &out.stdout).unwrap();
    (name, path)
}

/// `ssh -F BLOCK -o BatchMode=yes ARGS...`, with no agent.
fn ssh_with_block(block: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.arg("-F")
        .arg(block)
        .args(["-o", "BatchMode=yes"])
        .args(args)
        .env_remove("SSH_AUTH_SOCK");
    c
}

#[test]
fn host_block_steers_to_the_fastest_algorithms() {
    let rig = Rig::start();
    let (name, block) = host_block(&rig.env, &rig.shim);
    let text = std::fs::read_to_string(&block).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
            .trim()
            .to_owned()
    };
    let (ciphers, kex) = (value("Ciphers "), value("KexAlgorithms "));
    // Only what this client knows (an unknown name would be a fatal error).
    for c in ciphers.split(',') {
        assert!(client_knows("cipher", c), "{c} in {ciphers}");
    }
    for k in kex.split(',') {
        assert!(client_knows("kex", k), "{k} in {kex}");
    }
    assert!(
        ciphers.contains("chacha20-poly1305@openssh.com"),
        "{ciphers}"
    );
    assert!(kex.contains("curve25519-sha256"), "{kex}");

    // The alias is the profile name made safe ("root@h" gives "root+40h-shim").
    let alias = value("Host ");
    assert!(
        alias.ends_with("-shim") && !alias.contains('@'),
        "{name}: {alias}"
    );
    let out = run_with_timeout(
        // The block's ControlPath would take the multiplexing socket (no
        // key exchange at all); this checks the endpoint's steering.
        &mut ssh_with_block(
            &block,
            &["-v", "-o", "ControlPath=none", &alias, "echo via-block"],
        ),
        b"",
        DEFAULT_TIMEOUT,
    );
    assert_success(&out, "ssh with the Host block");
    assert_eq!(stdout_text(&out), "via-block\n");
    // The connection used the first of each steered list.
    let err = stderr_text(&out);
    let first = |s: &str| s.split(',').next().unwrap().to_owned();
    assert!(
        err.contains(&format!("kex: algorithm: {}", first(&kex))),
        "{err}"
    );
    assert!(
        err.contains(&format!("kex: server->client cipher: {}", first(&ciphers))),
        "{err}"
    );
}

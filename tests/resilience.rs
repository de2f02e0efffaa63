//! Surviving the network: real faults injected between the shim and sshd
//! (a TCP proxy that drops, freezes or refuses) and sshd killed and restarted.

mod support;

use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// Whether `ssh shim true` succeeds now (each try bounded).
fn shim_works(env: &TestEnv, shim: &Shim) -> bool {
    let mut c = env.ssh_cmd(shim.port(), &["-o", "ConnectTimeout=5"], &["true"]);
    run_with_timeout(&mut c, b"", Duration::from_secs(40))
        .status
        .success()
}

/// sshd, a fault proxy in front of it, and a shim that connects through the
/// proxy (with a known_hosts entry for the proxy's port).
fn proxied(env: &TestEnv, sshd: &Sshd, shim_args: &[&str]) -> (FaultProxy, Shim) {
    let (proxy, builder) = through_proxy(env, sshd);
    (proxy, builder.args(shim_args).start())
}

/// Counts open file descriptors of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn dropped_connection_is_replaced() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    assert!(shim_works(&env, &shim));
    proxy.drop_all();
    let took = eventually(Duration::from_secs(5), "exec after a drop", || {
        shim_works(&env, &shim)
    });
    eprintln!("recovered {took:?} after the drop");
    assert!(
        shim.wait_stderr("reconnected", Duration::from_secs(1)),
        "{}",
        shim.stderr_text()
    );
}

#[test]
fn sshd_restart_replays_reverse_forwards_on_the_same_ports() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start(&env);
    let svc = service(b"lab machine");
    let (r_client, r_owned) = (free_port(), free_port());
    let shim = env
        .shim_builder(sshd.port())
        .args(&[
            "-R",
            &format!("{r_owned}:127.0.0.1:{svc}"),
            "--max-backoff",
            "1",
        ])
        .start();
    // A long-lived local client holding its own -R forward.
    let mut client: Child = env
        .ssh_cmd(
            shim.port(),
            &[
                "-N",
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("{r_client}:127.0.0.1:{svc}"),
            ],
            &[],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(15), "forwards up", || {
        fetch(r_client).as_deref() == Some(b"lab machine")
            && fetch(r_owned).as_deref() == Some(b"lab machine")
    });

    sshd.kill();
    // The outage itself: the server stays down for 3 s.
    thread::sleep(Duration::from_secs(3));
    assert!(
        fetch(r_owned).is_none(),
        "port still open while sshd is down"
    );
    sshd.restart();
    let took = eventually(Duration::from_secs(5), "both forwards back", || {
        fetch(r_client).as_deref() == Some(b"lab machine")
            && fetch(r_owned).as_deref() == Some(b"lab machine")
    });
    eprintln!("forwards back {took:?} after sshd restarted");
    assert!(
        wait_child(&mut client, Duration::from_millis(1)).is_none(),
        "the -R client must stay connected"
    );
    let _ = client.kill();
    let _ = client.wait();
}

#[test]
fn frozen_path_is_detected_and_recovered() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(
        &env,
        &sshd,
        &[
            "--keepalive",
            "2",
            "--keepalive-max",
            "3",
            "--connect-timeout",
            "3",
            "--max-backoff",
            "2",
        ],
    );
    assert!(shim_works(&env, &shim));
    proxy.set_mode(Mode::Freeze);
    let frozen_at = Instant::now();
    assert!(
        shim.wait_stderr("disconnected", Duration::from_secs(10)),
        "blackhole not noticed within 10 s: {}",
        shim.stderr_text()
    );
    eprintln!("noticed after {:?}", frozen_at.elapsed());
    // Stay frozen for the rest of a minute, as a long outage would.
    thread::sleep(Duration::from_secs(60).saturating_sub(frozen_at.elapsed()));
    proxy.set_mode(Mode::Pass);
    let took = eventually(
        Duration::from_secs(5),
        "exec after the path passes again",
        || shim_works(&env, &shim),
    );
    eprintln!("recovered {took:?} after the path passed again");
}

#[test]
fn replay_retries_while_the_server_still_holds_the_port() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let svc = service(b"behind NAT");
    let rport = free_port();
    let (proxy, shim) = proxied(
        &env,
        &sshd,
        &[
            "-R",
            &format!("{rport}:127.0.0.1:{svc}"),
            "--max-backoff",
            "1",
        ],
    );
    eventually(Duration::from_secs(15), "forward up", || {
        fetch(rport).as_deref() == Some(b"behind NAT")
    });

    // Drop the connection and take the port before the shim can re-request
    // it, as a server that has not yet noticed the old session would.
    proxy.drop_all();
    // sshd listens on both loopback addresses for "localhost"; hold both.
    let mut holder = None;
    eventually(Duration::from_secs(5), "grab the freed port", || {
        holder = TcpListener::bind(("127.0.0.1", rport)).ok();
        holder.is_some()
    });
    let holder6 = TcpListener::bind(("::1", rport)).ok();
    assert!(
        shim.wait_stderr("retrying", Duration::from_secs(10)),
        "no retry logged: {}",
        shim.stderr_text()
    );
    // Meanwhile everything else works.
    assert!(shim_works(&env, &shim));
    thread::sleep(Duration::from_secs(2));
    drop(holder);
    drop(holder6);
    eventually(
        Duration::from_secs(15),
        "forward back after the port is free",
        || fetch(rport).as_deref() == Some(b"behind NAT"),
    );
}

#[test]
fn exec_during_outage_fails_with_reason_or_waits_for_return() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start(&env);
    let shim = env
        .shim_builder(sshd.port())
        .args(&["--connect-timeout", "3", "--max-backoff", "1"])
        .start();
    assert!(shim_works(&env, &shim));
    sshd.kill();
    assert!(shim.wait_stderr("disconnected", Duration::from_secs(5)));
    let t = Instant::now();
    let out = run_with_timeout(&mut shim.ssh(&["true"]), b"", Duration::from_secs(20));
    assert_eq!(exit_code(&out.status), 255);
    let err = stderr_text(&out);
    assert!(
        err.contains("upstream unavailable: reconnecting (attempt") && err.contains("last error"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );

    // An exec started during the outage succeeds once the server returns.
    let mut c = shim.ssh(&["echo back"]);
    let waiter = thread::spawn(move || run_with_timeout(&mut c, b"", Duration::from_secs(20)));
    thread::sleep(Duration::from_millis(500));
    sshd.restart();
    let out = waiter.join().unwrap();
    assert_success(&out, "exec across the outage");
    assert_eq!(stdout_text(&out), "back\n");
}

#[test]
fn changed_host_key_on_reconnect_is_fatal() {
    let env = TestEnv::new();
    let mut sshd = Sshd::start(&env);
    let mut shim = env
        .shim_builder(sshd.port())
        .args(&["--max-backoff", "1"])
        .start();
    sshd.kill();
    // The server comes back with another identity.
    let key = env.host_key();
    let _ = std::fs::remove_file(&key);
    let _ = std::fs::remove_file(key.with_extension("pub"));
    keygen(&key);
    sshd.restart();
    let status = shim
        .wait_exit(Duration::from_secs(20))
        .expect("shim kept running after the host key changed");
    assert_eq!(status.code(), Some(1));
    let err = shim.stderr_text();
    assert!(err.contains("HAS CHANGED"), "{err}");
}

#[test]
fn many_drop_cycles_leak_nothing() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &["--max-backoff", "0.3"]);
    assert!(shim_works(&env, &shim));
    let (fds0, rss0) = (fd_count(shim.pid()), rss_kib(shim.pid()));
    for i in 0..200 {
        proxy.drop_all();
        eventually(Duration::from_secs(10), &format!("reconnect {i}"), || {
            shim_works(&env, &shim)
        });
    }
    assert!(shim_works(&env, &shim));
    let (fds1, rss1) = (fd_count(shim.pid()), rss_kib(shim.pid()));
    eprintln!("fds {fds0} -> {fds1}, rss {rss0} KiB -> {rss1} KiB");
    assert!(fds1 <= fds0 + 2, "fd leak: {fds0} -> {fds1}");
    assert!(rss1 < rss0 + 16 * 1024, "memory grew: {rss0} -> {rss1} KiB");
}

/// The wait the shim announced last ("retrying in 12.3s"), in seconds.
fn last_retry_delay(shim: &Shim) -> Option<f64> {
    let err = shim.stderr_text();
    let at = err.rfind("retrying in ")? + "retrying in ".len();
    let rest = &err[at..];
    rest[..rest.find('s')?].parse().ok()
}

/// How often `needle` occurs in the shim's log.
fn log_count(shim: &Shim, needle: &str) -> usize {
    shim.stderr_text().matches(needle).count()
}

/// Refuses connections through `proxy` and drops the live one, then waits
/// until the shim's backoff has grown to a step of at least `secs`.
fn outage_until_backoff(proxy: &FaultProxy, shim: &Shim, secs: f64) {
    proxy.set_mode(Mode::Refuse);
    proxy.drop_all();
    eventually(
        Duration::from_secs(40),
        &format!("a backoff step of {secs} s"),
        || last_retry_delay(shim).is_some_and(|d| d >= secs),
    );
}

/// Issue 23: after a long refused outage, an `ssh` started a second after
/// the upstream is back must not wait for the next backoff step. A 60 s
/// outage is shortened to "until the backoff has grown to 8 s or more"
/// (the behaviour is the same: the next attempt is seconds away).
#[test]
fn ssh_right_after_an_outage_connects_at_once() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    assert!(shim_works(&env, &shim));
    outage_until_backoff(&proxy, &shim, 8.0);
    proxy.set_mode(Mode::Pass);
    thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let out = run_with_timeout(&mut shim.ssh(&["echo back"]), b"", Duration::from_secs(30));
    let took = t.elapsed();
    eprintln!("ssh after the outage took {took:?}");
    assert_success(&out, "ssh after the outage");
    assert_eq!(stdout_text(&out), "back\n");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// Issue 23: an `ssh` started during an outage gets the upstream within
/// 3 s of its return (8 s outage instead of 15: the --connect-timeout of
/// 30 s is far from both).
#[test]
fn ssh_started_during_an_outage_succeeds_soon_after_it_ends() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    assert!(shim_works(&env, &shim));
    let began = Instant::now();
    proxy.set_mode(Mode::Refuse);
    proxy.drop_all();
    thread::sleep(Duration::from_secs(2));
    let mut c = shim.ssh(&["echo back"]);
    let waiter = thread::spawn(move || {
        let out = run_with_timeout(&mut c, b"", Duration::from_secs(40));
        (out, Instant::now())
    });
    thread::sleep(Duration::from_secs(8).saturating_sub(began.elapsed()));
    proxy.set_mode(Mode::Pass);
    let ended = Instant::now();
    let (out, done) = waiter.join().unwrap();
    let after = done.saturating_duration_since(ended);
    eprintln!("ssh finished {after:?} after the outage ended");
    assert_success(&out, "ssh across the outage");
    assert_eq!(stdout_text(&out), "back\n");
    assert!(after < Duration::from_secs(3), "took {after:?}");
}

/// Issue 23: quick drops in a row do not grow the delay: each reconnect
/// comes about a second after the last attempt, the fourth within 2 s.
#[test]
fn quick_drops_in_a_row_reconnect_quickly() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    assert!(shim_works(&env, &shim));
    for i in 1..=4 {
        let before = log_count(&shim, "reconnected to");
        proxy.drop_all();
        // The log, not an ssh: a waiting client would itself hurry the
        // reconnect.
        let took = eventually(Duration::from_secs(10), &format!("reconnect {i}"), || {
            log_count(&shim, "reconnected to") > before
        });
        eprintln!("drop {i}: reconnected after {took:?}");
        assert!(took < Duration::from_secs(2), "drop {i}: took {took:?}");
    }
    assert!(shim_works(&env, &shim));
}

/// Issue 23: a storm of clients arriving during an outage makes about one
/// connect attempt a second (counted at the proxy), and every one of them
/// gets through once the upstream is back.
#[test]
fn reconnect_storm_makes_about_one_attempt_per_second() {
    const CLIENTS: usize = 20;
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    assert!(shim_works(&env, &shim));
    proxy.set_mode(Mode::Refuse);
    proxy.drop_all();
    shim.wait_stderr("disconnected", Duration::from_secs(5));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut c = shim.ssh(&["true"]);
            thread::spawn(move || run_with_timeout(&mut c, b"", Duration::from_secs(40)))
        })
        .collect();
    // Let them all arrive, then count attempts over a fixed window.
    thread::sleep(Duration::from_secs(1));
    let (a0, t0) = (proxy.accepted(), Instant::now());
    thread::sleep(Duration::from_secs(5));
    let (attempts, secs) = (proxy.accepted() - a0, t0.elapsed().as_secs_f64());
    eprintln!("{attempts} connect attempts in {secs:.1} s with {CLIENTS} clients waiting");
    assert!(attempts >= 3, "clients waiting, yet {attempts} attempts");
    assert!(
        attempts as f64 <= secs + 1.0,
        "{attempts} attempts in {secs:.1} s"
    );
    proxy.set_mode(Mode::Pass);
    for c in clients {
        assert_success(&c.join().unwrap(), "a client of the storm");
    }
}

/// Adds an address to `lo` for the life of the guard (root only).
struct LoAddress(&'static str);

impl LoAddress {
    /// Adds `addr` (a 127/8 address with prefix), or None with a message
    /// when not permitted.
    fn add(addr: &'static str) -> Option<LoAddress> {
        let out = std::process::Command::new("ip")
            .args(["addr", "add", addr, "dev", "lo"])
            .output();
        match out {
            Ok(o) if o.status.success() => Some(LoAddress(addr)),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot add {addr} to lo: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: no `ip` command: {e}");
                None
            }
        }
    }
}

impl Drop for LoAddress {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", self.0, "dev", "lo"])
            .output();
    }
}

/// Issue 23: a new address (netlink) makes a shim that is waiting out a
/// backoff step of seconds try again at once.
#[test]
fn new_address_triggers_a_reconnect_at_once() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &["--max-backoff", "60"]);
    assert!(shim_works(&env, &shim));
    outage_until_backoff(&proxy, &shim, 4.0);
    proxy.set_mode(Mode::Pass);
    let Some(_addr) = LoAddress::add("127.0.0.43/8") else {
        return;
    };
    let took = eventually(
        Duration::from_secs(3),
        "reconnect on the new address",
        || log_count(&shim, "reconnected to") > 0,
    );
    eprintln!("reconnected {took:?} after the address appeared");
    assert!(
        shim.stderr_text().contains("a network address was added"),
        "{}",
        shim.stderr_text()
    );
}

/// Issue 23: on a live connection a network change sends a keepalive at
/// once, so a path that went dead is noticed in seconds, not keepalive
/// intervals (here 30 s x 3).
#[test]
fn network_change_probes_a_live_connection() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &["--keepalive", "30"]);
    assert!(shim_works(&env, &shim));
    proxy.set_mode(Mode::Freeze);
    let Some(_addr) = LoAddress::add("127.0.0.44/8") else {
        return;
    };
    let t = Instant::now();
    assert!(
        shim.wait_stderr("disconnected", Duration::from_secs(8)),
        "blackhole not noticed within 8 s of the change: {}",
        shim.stderr_text()
    );
    eprintln!("noticed {:?} after the change", t.elapsed());
    proxy.set_mode(Mode::Pass);
}

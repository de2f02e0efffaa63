//! Soak: cycles of upstream faults with live traffic in every cycle.
//!
//! A shim reaches a real sshd through a [`FaultProxy`] on loopback. Every
//! cycle injects one fault, in turn: the connection dropped (RST), refused
//! (new connections reset, existing ones dropped), blackholed (bytes frozen
//! until keepalives give up) and sshd killed and restarted. Around each
//! fault runs traffic:
//!
//! * in flight when the fault hits: a slow exec, a slow transfer through a
//!   sshshim-owned `-L` and one through a sshshim-owned `-R`;
//! * a new session started during the outage;
//! * after recovery: an exec, a `-L` transfer, and `-R` transfers through a
//!   sshshim-owned forward and through a forward held by a local `ssh -R`
//!   client, all of which must be byte-exact (SHA-256).
//!
//! Anything cut by a fault must be byte-exact or fail loudly (an error, a
//! reset, or a non-zero exit with the reason on stderr); a silently short
//! or hung result fails the test. The one exception is the in-flight `-R`
//! transfer, whose reader is connected to sshd: sshd closes that socket
//! with a FIN when its connection dies, so it is only counted ("cut").
//! After the run the shim's descriptors, threads, memory and open channels
//! must be back near their level after the first cycles (the whole series is
//! printed as a table), and no reconnect may have waited longer than
//! `--max-backoff`.
//!
//! `SSHSHIM_SOAK_CYCLES` sets the number of cycles (default 15, for CI);
//! `SSHSHIM_SOAK_SECS` optionally stops starting new cycles after that many
//! seconds (scripts/soak.sh runs 1,000 cycles within about 30 minutes).

mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::*;

/// Cycles when `SSHSHIM_SOAK_CYCLES` is unset (keeps CI near a minute).
const DEFAULT_CYCLES: usize = 15;
/// Size of the blob served at once (post-recovery transfers).
const BLOB: usize = 1 << 20;
/// Chunks of the slow stream (in-flight transfers).
const SLOW_CHUNKS: usize = 32;
/// Size of one chunk of the slow stream.
const SLOW_CHUNK: usize = 64 * 1024;
/// Pause between chunks of the slow stream.
const SLOW_PAUSE: Duration = Duration::from_millis(20);
/// A transfer that delivers nothing for this long is counted as hung.
const IDLE_LIMIT: Duration = Duration::from_secs(5);
/// Longest an outage may last before recovery is declared failed.
const RECOVERY_LIMIT: Duration = Duration::from_secs(30);
/// How long a refused path lasts: longer than the shim's connect timeout
/// (2 s), so a session started in it fails with the reason.
const REFUSE_OUTAGE: Duration = Duration::from_millis(2500);
/// `--max-backoff` of the shim, in seconds.
const MAX_BACKOFF: &str = "0.5";
/// Shim flags: keepalives notice a blackhole within about 3 s, and an
/// outage is retried at least every half second.
const SHIM_FLAGS: [&str; 8] = [
    "--keepalive",
    "1",
    "--keepalive-max",
    "2",
    "--connect-timeout",
    "2",
    "--max-backoff",
    MAX_BACKOFF,
];

/// The fault injected in one cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Every proxied connection reset.
    Drop,
    /// Existing connections dropped and new ones reset for
    /// [`REFUSE_OUTAGE`].
    Refuse,
    /// All bytes held until the shim's keepalives declare the path dead.
    Blackhole,
    /// sshd killed, down for 1 s, started again on the same port.
    Restart,
}

impl Fault {
    /// The fault of cycle `i` (they take turns).
    fn of_cycle(i: usize) -> Fault {
        [Fault::Drop, Fault::Refuse, Fault::Blackhole, Fault::Restart][i % 4]
    }
}

/// How one transfer or session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// Every byte arrived, and (for sessions) the exit status was 0.
    Exact,
    /// Failed visibly: an I/O error or reset, a refused connection, or a
    /// non-zero exit with the reason on stderr.
    Loud(String),
    /// Ended cleanly but with the wrong bytes: the failure this test exists
    /// to catch.
    Short {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// Non-zero exit with nothing on stderr (a failure without a reason).
    Quiet(i32),
    /// Nothing arrived for [`IDLE_LIMIT`] (or the command did not end):
    /// bytes received, and the end of the client's stderr if any.
    Hung(usize, String),
    /// A remote-side transfer ended early: sshd, not the shim, owns that
    /// socket and closes it with a FIN when its connection dies (as it
    /// would without sshshim), so nothing better is possible there.
    Cut(usize),
}

impl Outcome {
    /// Short label for tables.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Exact => "exact",
            Outcome::Loud(_) => "loud",
            Outcome::Short { .. } => "SHORT",
            Outcome::Quiet(_) => "QUIET",
            Outcome::Hung(..) => "HUNG",
            Outcome::Cut(_) => "cut",
        }
    }

    /// Whether this outcome is acceptable for traffic cut by a fault.
    fn acceptable(&self) -> bool {
        matches!(self, Outcome::Exact | Outcome::Loud(_) | Outcome::Cut(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exact => write!(f, "exact"),
            Outcome::Loud(why) => write!(f, "loud: {}", truncate(why.trim(), 200)),
            Outcome::Short { got, want } => write!(f, "SHORT: {got} of {want} bytes"),
            Outcome::Quiet(code) => write!(f, "QUIET: exit {code} with no reason"),
            Outcome::Hung(got, tail) if tail.is_empty() => write!(f, "HUNG after {got} bytes"),
            Outcome::Hung(got, tail) => write!(f, "HUNG after {got} bytes; client said:\n{tail}"),
            Outcome::Cut(got) => write!(f, "cut by sshd after {got} bytes"),
        }
    }
}

/// Hex SHA-256 of `data`.
fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Judges received bytes against the expected ones.
fn judge(got: &[u8], want: &[u8]) -> Outcome {
    if got.len() == want.len() && sha(got) == sha(want) {
        Outcome::Exact
    } else {
        Outcome::Short {
            got: got.len(),
            want: want.len(),
        }
    }
}

/// Reads everything 127.0.0.1:`port` sends and judges it against `want`.
fn fetch_judged(port: u16, want: &[u8]) -> Outcome {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => return Outcome::Loud(format!("connect: {e}")),
    };
    let _ = s.set_read_timeout(Some(IDLE_LIMIT));
    let mut got = Vec::with_capacity(want.len());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return judge(&got, want),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Outcome::Hung(got.len(), String::new());
            }
            Err(e) => return Outcome::Loud(format!("after {} bytes: {e}", got.len())),
        }
    }
}

/// Runs an ssh command through the shim and judges its stdout. The client
/// logs at INFO, its default, so the reasons a user would see are seen;
/// `verbose` adds its debug log (ignored when judging) for diagnosing hangs.
fn exec_judged(env: &TestEnv, port: u16, cmd: &str, want: &[u8], verbose: bool) -> Outcome {
    let opts: &[&str] = if verbose {
        &["-v", "-o", "ConnectTimeout=10"]
    } else {
        &["-o", "LogLevel=INFO", "-o", "ConnectTimeout=10"]
    };
    let mut c = env.ssh_cmd(port, opts, &[cmd]);
    let out = match try_run_with_timeout(&mut c, b"", Duration::from_secs(40)) {
        Ok(out) => out,
        Err(partial) => {
            let err = stderr_text(&partial);
            let lines: Vec<&str> = err.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            return Outcome::Hung(partial.stdout.len(), tail);
        }
    };
    let code = exit_code(&out.status);
    let err: String = stderr_text(&out)
        .lines()
        .filter(|l| !l.starts_with("debug"))
        .map(|l| format!("{l}\n"))
        .collect();
    match (code, judge(&out.stdout, want)) {
        (0, judged) => judged,
        (_, _) if err.trim().is_empty() => Outcome::Quiet(code),
        (_, _) => Outcome::Loud(format!("exit {code}: {}", err.trim())),
    }
}

/// A TCP service on 127.0.0.1 sending `data` to every connection, in
/// `chunk`-sized pieces with `pause` between them, then closing.
fn blob_service(data: Arc<Vec<u8>>, chunk: usize, pause: Duration) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind blob service");
    let port = l.local_addr().expect("local_addr").port();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let data = data.clone();
            thread::spawn(move || {
                let mut s = s;
                for piece in data.chunks(chunk) {
                    if s.write_all(piece).is_err() {
                        return;
                    }
                    if !pause.is_zero() {
                        thread::sleep(pause);
                    }
                }
            });
        }
    });
    port
}

/// The shim's status as JSON (the only profile), if it answers.
fn status_json(env: &TestEnv) -> Option<serde_json::Value> {
    let out = try_run_with_timeout(
        &mut env.sshshim(&["status", "--json"]),
        b"",
        Duration::from_secs(10),
    )
    .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0).cloned()
}

/// Whether the upstream is connected and all `n` -R forwards are active.
fn recovered(env: &TestEnv, n: usize) -> bool {
    status_json(env).is_some_and(|st| {
        let fwds = st["forwards"].as_array().cloned().unwrap_or_default();
        st["upstream"]["state"] == "connected"
            && fwds.len() == n
            && fwds.iter().all(|f| f["state"] == "active")
    })
}

/// Everything one soak run drives.
struct World {
    /// The test directory.
    env: TestEnv,
    /// The upstream server.
    sshd: Sshd,
    /// The faulty path between shim and sshd.
    proxy: FaultProxy,
    /// The shim under test.
    shim: Shim,
    /// A local `ssh -N -R` client holding a forward through the endpoint.
    client: Child,
    /// 1 MiB served at once (and in `blob` for exec).
    fast: Arc<Vec<u8>>,
    /// 2 MiB served slowly (and in `slow` for exec).
    slow: Arc<Vec<u8>>,
    /// sshshim-owned -L to the fast service.
    l_fast: u16,
    /// sshshim-owned -L to the slow service.
    l_slow: u16,
    /// sshshim-owned -R to the fast service.
    r_fast: u16,
    /// sshshim-owned -R to the slow service.
    r_slow: u16,
    /// The client's -R to the fast service.
    r_client: u16,
}

impl Drop for World {
    /// Stops the -R client; on failure shows the end of the shim's log
    /// (the harness shows only its beginning).
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
        if thread::panicking() {
            let log = self.shim.stderr_text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- last {} lines of the shim's log ---\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// -R forwards the shim holds (two of its own, one of the client's).
const R_FORWARDS: usize = 3;

impl World {
    /// Starts sshd, proxy, services, the shim and the -R client.
    fn start() -> World {
        let env = TestEnv::new();
        let sshd = Sshd::start(&env);
        let proxy = FaultProxy::start(sshd.port());
        let kh = env.path("known_hosts_proxy");
        std::fs::write(
            &kh,
            format!("[127.0.0.1]:{} {}\n", proxy.port(), env.host_key_line()),
        )
        .expect("write known_hosts");
        let fast = Arc::new(pseudo_random_bytes(BLOB, 11));
        let slow = Arc::new(pseudo_random_bytes(SLOW_CHUNKS * SLOW_CHUNK, 12));
        std::fs::write(env.path("blob"), &*fast).expect("write blob");
        std::fs::write(env.path("slow"), &*slow).expect("write slow");
        let svc_fast = blob_service(fast.clone(), 256 * 1024, Duration::ZERO);
        let svc_slow = blob_service(slow.clone(), SLOW_CHUNK, SLOW_PAUSE);
        let (l_fast, l_slow, r_fast, r_slow, r_client) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let specs = [
            ("-L", format!("{l_fast}:127.0.0.1:{svc_fast}")),
            ("-L", format!("{l_slow}:127.0.0.1:{svc_slow}")),
            ("-R", format!("{r_fast}:127.0.0.1:{svc_fast}")),
            ("-R", format!("{r_slow}:127.0.0.1:{svc_slow}")),
        ];
        let mut b = env
            .shim_builder(proxy.port())
            .known_hosts(&kh)
            .args(&SHIM_FLAGS);
        for (flag, spec) in &specs {
            b = b.args(&[flag, spec]);
        }
        let shim = b.start();
        let client = env
            .ssh_cmd(
                shim.port(),
                &[
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-R",
                    &format!("{r_client}:127.0.0.1:{svc_fast}"),
                ],
                &[],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ssh -R client");
        let w = World {
            env,
            sshd,
            proxy,
            shim,
            client,
            fast,
            slow,
            l_fast,
            l_slow,
            r_fast,
            r_slow,
            r_client,
        };
        eventually(Duration::from_secs(20), "forwards up at start", || {
            recovered(&w.env, R_FORWARDS)
        });
        w
    }

    /// Exec that streams the slow blob in chunks (in flight during a fault).
    fn slow_exec_cmd(&self) -> String {
        format!(
            "i=0; while [ $i -lt {SLOW_CHUNKS} ]; do dd if={} bs={SLOW_CHUNK} skip=$i count=1 status=none; sleep 0.02; i=$((i+1)); done",
            self.env.path("slow").display()
        )
    }

    /// Starts the in-flight transfers: slow exec, slow -L, slow -R.
    fn start_in_flight(&self) -> Vec<(&'static str, JoinHandle<Outcome>)> {
        let (env, port, cmd) = (self.env.clone(), self.shim.port(), self.slow_exec_cmd());
        let (s1, s2, s3) = (self.slow.clone(), self.slow.clone(), self.slow.clone());
        let (l, r) = (self.l_slow, self.r_slow);
        vec![
            (
                "in-flight exec",
                thread::spawn(move || exec_judged(&env, port, &cmd, &s1, false)),
            ),
            ("in-flight -L", thread::spawn(move || fetch_judged(l, &s2))),
            (
                "in-flight -R",
                thread::spawn(move || match fetch_judged(r, &s3) {
                    Outcome::Short { got, .. } | Outcome::Hung(got, _) => Outcome::Cut(got),
                    o => o,
                }),
            ),
        ]
    }

    /// Starts a new session (an exec of the 1 MiB blob) during the outage.
    fn start_outage_session(&self) -> JoinHandle<Outcome> {
        let (env, port, want) = (self.env.clone(), self.shim.port(), self.fast.clone());
        let cmd = format!("cat {}", self.env.path("blob").display());
        thread::spawn(move || exec_judged(&env, port, &cmd, &want, false))
    }

    /// Injects `fault`, starts the outage session, and waits for recovery.
    /// Returns the outage session's handle and how long recovery took.
    fn fault(&mut self, fault: Fault) -> (JoinHandle<Outcome>, Duration) {
        let t = Instant::now();
        let session = match fault {
            Fault::Drop => {
                self.proxy.drop_all();
                self.start_outage_session()
            }
            Fault::Refuse => {
                self.proxy.set_mode(Mode::Refuse);
                self.proxy.drop_all();
                let s = self.start_outage_session();
                thread::sleep(REFUSE_OUTAGE);
                self.proxy.set_mode(Mode::Pass);
                s
            }
            Fault::Blackhole => {
                self.proxy.set_mode(Mode::Freeze);
                eventually(Duration::from_secs(15), "blackhole noticed", || {
                    status_json(&self.env).is_some_and(|s| s["upstream"]["state"] != "connected")
                });
                let s = self.start_outage_session();
                thread::sleep(Duration::from_millis(500));
                self.proxy.set_mode(Mode::Pass);
                // Frozen sockets are useless now; resetting them frees the
                // old session's -R ports on sshd at once.
                self.proxy.drop_all();
                s
            }
            Fault::Restart => {
                self.sshd.kill();
                let s = self.start_outage_session();
                thread::sleep(Duration::from_secs(1));
                self.sshd.restart();
                s
            }
        };
        let (env, shim) = (self.env.clone(), &mut self.shim);
        eventually(RECOVERY_LIMIT, &format!("recovery from {fault:?}"), || {
            assert!(
                shim.is_running(),
                "the shim exited during recovery from {fault:?}"
            );
            recovered(&env, R_FORWARDS)
        });
        (session, t.elapsed())
    }

    /// What the shim looks like now, for a failure message: its status, a
    /// fresh `ssh true`, its threads' states and the proxy's connections.
    fn diagnose(&self) -> String {
        let status = status_json(&self.env).map_or("no answer".into(), |v| v.to_string());
        let mut probe = self
            .env
            .ssh_cmd(self.shim.port(), &["-o", "ConnectTimeout=5"], &["true"]);
        let probe = match try_run_with_timeout(&mut probe, b"", Duration::from_secs(20)) {
            Ok(o) => format!("exit {}: {}", exit_code(&o.status), stderr_text(&o).trim()),
            Err(_) => "no answer within 20 s".into(),
        };
        let pid = self.shim.pid();
        let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| {
                let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                let stat = read("stat");
                let state = stat
                    .rsplit_once(") ")
                    .map_or("?", |(_, r)| &r[..1])
                    .to_string();
                format!(
                    "{} {} {state} {}",
                    t.file_name().to_string_lossy(),
                    read("comm").trim(),
                    read("wchan")
                )
            })
            .collect();
        // Where the shim's threads are, when gdb is there to tell.
        let stacks = if Path::new("/usr/bin/gdb").exists() {
            let mut gdb = std::process::Command::new("/usr/bin/gdb");
            gdb.args([
                "-p",
                &pid.to_string(),
                "-batch",
                "-ex",
                "thread apply all bt 40",
            ]);
            match try_run_with_timeout(&mut gdb, b"", Duration::from_secs(60)) {
                Ok(o) | Err(o) => stdout_text(&o)
                    .lines()
                    .filter(|l| l.starts_with('#') || l.starts_with("Thread"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            }
        } else {
            "(install gdb for the shim's stacks)".into()
        };
        format!(
            "diagnosis: status {status}\n  ssh true now: {probe}\n  shim threads: {threads:?}\n  proxy connections: {}\n  stacks:\n{stacks}",
            self.proxy.connection_count()
        )
    }

    /// Traffic after recovery; every piece must be byte-exact.
    fn after_recovery(&self) -> Vec<(&'static str, Outcome)> {
        let (env, port, fast) = (self.env.clone(), self.shim.port(), self.fast.clone());
        let cmd = format!("cat {}", self.env.path("blob").display());
        let exec = thread::spawn(move || exec_judged(&env, port, &cmd, &fast, true));
        let (l, r, rc) = (self.l_fast, self.r_fast, self.r_client);
        let f = self.fast.clone();
        let tcp = thread::spawn(move || {
            [
                ("-L", fetch_judged(l, &f)),
                ("-R (sshshim's)", fetch_judged(r, &f)),
                ("-R (client's)", fetch_judged(rc, &f)),
            ]
        });
        let mut v = vec![("exec", exec.join().expect("exec thread"))];
        v.extend(tcp.join().expect("tcp thread"));
        v
    }
}

/// One row of the series.
struct Row {
    /// Cycle number (1-based).
    cycle: usize,
    /// The fault injected.
    fault: Fault,
    /// From injecting the fault to upstream and forwards back.
    recovery: Duration,
    /// The shim's resources after the cycle.
    stats: ProcStats,
    /// Channels the shim reports open after the cycle (all kinds).
    channels: u64,
    /// Outcomes of the cut traffic and the outage session.
    outcomes: Vec<(&'static str, Outcome)>,
}

/// Number from the environment, or `default`.
fn env_number(name: &str, default: Option<u64>) -> Option<u64> {
    match std::env::var(name) {
        Ok(v) => Some(
            v.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?}: expected a whole number")),
        ),
        Err(_) => default,
    }
}

/// Prints the series as a table.
fn print_table(rows: &[Row]) {
    eprintln!(
        "\n{:>5} {:<9} {:>9} {:>5} {:>7} {:>9} {:>8}  in-flight exec/-L/-R, outage session",
        "cycle", "fault", "recovery", "fds", "threads", "rss KiB", "channels"
    );
    for r in rows {
        let outs: Vec<&str> = r.outcomes.iter().map(|(_, o)| o.label()).collect();
        eprintln!(
            "{:>5} {:<9} {:>7}ms {:>5} {:>7} {:>9} {:>8}  {}",
            r.cycle,
            format!("{:?}", r.fault),
            r.recovery.as_millis(),
            r.stats.fds,
            r.stats.threads,
            r.stats.rss_kib,
            r.channels,
            outs.join(" ")
        );
    }
}

#[test]
fn soak_faults_with_live_traffic() {
    let cycles =
        env_number("SSHSHIM_SOAK_CYCLES", Some(DEFAULT_CYCLES as u64)).unwrap_or(0) as usize;
    let budget = env_number("SSHSHIM_SOAK_SECS", None).map(Duration::from_secs);
    assert!(
        cycles >= 4,
        "SSHSHIM_SOAK_CYCLES must be at least 4 (one of each fault)"
    );
    let started = Instant::now();
    let mut w = World::start();
    let pid = w.shim.pid();
    eprintln!(
        "soak: {cycles} cycles{}; shim pid {pid}, start {:?}",
        budget.map_or(String::new(), |b| format!(" (at most {b:?})")),
        ProcStats::of(pid)
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut tally: BTreeMap<(&'static str, &'static str), usize> = BTreeMap::new();
    let mut bad: Vec<String> = Vec::new();
    for i in 0..cycles {
        if budget.is_some_and(|b| started.elapsed() >= b) {
            eprintln!("soak: time budget used up after {i} cycles");
            break;
        }
        let fault = Fault::of_cycle(i);
        let in_flight = w.start_in_flight();
        // Let the slow transfers get going so the fault cuts them.
        thread::sleep(Duration::from_millis(150));
        let (session, recovery) = w.fault(fault);

        for (what, o) in w.after_recovery() {
            *tally.entry((what, o.label())).or_default() += 1;
            if o != Outcome::Exact {
                panic!(
                    "cycle {} ({fault:?}): {what} after recovery: {o}\n{}",
                    i + 1,
                    w.diagnose()
                );
            }
        }
        let mut outcomes: Vec<(&'static str, Outcome)> = in_flight
            .into_iter()
            .map(|(what, h)| (what, h.join().expect("in-flight thread")))
            .collect();
        outcomes.push(("outage session", session.join().expect("session thread")));
        for (what, o) in &outcomes {
            *tally.entry((what, o.label())).or_default() += 1;
            if !o.acceptable() {
                bad.push(format!("cycle {} ({fault:?}): {what}: {o}", i + 1));
            }
        }
        assert!(
            wait_child(&mut w.client, Duration::ZERO).is_none(),
            "the local ssh -R client exited in cycle {}",
            i + 1
        );
        let channels = status_json(&w.env).map_or(0, |st| {
            st["channels"]
                .as_object()
                .map_or(0, |m| m.values().filter_map(|v| v.as_u64()).sum())
        });
        let row = Row {
            cycle: i + 1,
            fault,
            recovery,
            stats: ProcStats::of(pid),
            channels,
            outcomes,
        };
        eprintln!(
            "cycle {} {fault:?}: recovered in {:?}; {:?}, {} channels open; {}",
            row.cycle,
            row.recovery,
            row.stats,
            row.channels,
            row.outcomes
                .iter()
                .map(|(w, o)| format!("{w}: {o}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        rows.push(row);
    }

    print_table(&rows);
    eprintln!("\noutcomes over {} cycles:", rows.len());
    for ((what, label), n) in &tally {
        eprintln!("  {what:<22} {label:<6} {n}");
    }

    // Every -R forward is listening again, per status and by connecting.
    let st = status_json(&w.env).expect("status at the end");
    eprintln!("forwards at the end: {}", st["forwards"]);
    assert!(recovered(&w.env, R_FORWARDS), "{st}");
    for port in [w.r_fast, w.r_client] {
        assert_eq!(
            fetch_judged(port, &w.fast),
            Outcome::Exact,
            "-R {port} at the end"
        );
    }

    // Resources back near their level after the first cycles (the
    // highest of cycles 2-4, once buffers and pools have warmed up).
    let base = rows[1..4.min(rows.len())]
        .iter()
        .fold(ProcStats::default(), |m, r| ProcStats {
            fds: m.fds.max(r.stats.fds),
            threads: m.threads.max(r.stats.threads),
            rss_kib: m.rss_kib.max(r.stats.rss_kib),
        });
    // Every check below is reported together, so one run shows them all.
    let mut failures: Vec<String> = Vec::new();
    let settle_from = Instant::now();
    let mut end = ProcStats::of(pid);
    while (end.fds > base.fds + 4 || end.threads > base.threads + 4)
        && settle_from.elapsed() < Duration::from_secs(20)
    {
        thread::sleep(Duration::from_millis(100));
        end = ProcStats::of(pid);
    }
    eprintln!(
        "resources: after cycles 2-4 (max) {base:?}; at the end {end:?} (waited {:?}); whole run {:?}",
        settle_from.elapsed(),
        started.elapsed()
    );
    if end.fds > base.fds + 4 {
        failures.push(format!("descriptors grew from {} to {}", base.fds, end.fds));
    }
    if end.threads > base.threads + 4 {
        failures.push(format!(
            "threads grew from {} to {}",
            base.threads, end.threads
        ));
    }
    // Channels still open: traffic is over, so only a leak keeps them.
    let base_channels = rows[1..4.min(rows.len())]
        .iter()
        .map(|r| r.channels)
        .max()
        .unwrap_or(0);
    let end_channels = rows.last().map_or(0, |r| r.channels);
    if end_channels > base_channels + 2 {
        failures.push(format!(
            "open channels (sshshim status) grew from {base_channels} to {end_channels}"
        ));
    }
    if end.rss_kib > base.rss_kib + 32 * 1024 {
        failures.push(format!(
            "memory grew from {} to {} KiB",
            base.rss_kib, end.rss_kib
        ));
    }
    if !bad.is_empty() {
        failures.push(format!(
            "{} cut transfers or sessions were neither byte-exact nor failed loudly:\n  {}",
            bad.len(),
            bad.join("\n  ")
        ));
    }

    // --max-backoff is "the longest wait between reconnect attempts".
    let waits = retry_waits(&w.shim.stderr_text());
    let longest = waits.iter().copied().fold(0.0, f64::max);
    eprintln!("{} reconnect waits, longest {longest:.1}s", waits.len());
    let max: f64 = MAX_BACKOFF.parse().unwrap_or_default();
    if longest > max + 0.05 {
        failures.push(format!(
            "a reconnect waited {longest:.1}s although --max-backoff is {MAX_BACKOFF}s"
        ));
    }
    assert!(failures.is_empty(), "soak failed:\n{}", failures.join("\n"));
}

/// The waits the shim logged as "retrying in X.Ys", in seconds.
fn retry_waits(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.split_once("retrying in ").map(|(_, r)| r))
        .filter_map(|r| r.split_once('s').and_then(|(n, _)| n.parse().ok()))
        .collect()
}

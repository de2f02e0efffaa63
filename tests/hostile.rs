//! Hostile local input: floods of garbage, idle and half-finished
//! connections, rejected keys, slow-loris and oversized HTTP requests, and
//! junk on the control socket. Throughout each flood a well-behaved
//! `ssh … true` through the shim must keep working (its latency is logged),
//! and the shim's resident memory must stay bounded.
//!
//! Counts and durations are fixed and small enough for CI on 2 cores; every
//! socket and every command is bounded by a timeout.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use support::*;

/// Largest growth of the shim's resident memory a flood may cause.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// Longest a well-behaved `ssh … true` may take while the shim is flooded
/// (generous: the machine's 2 cores are shared with the flood itself).
const PROBE_BOUND: Duration = Duration::from_secs(15);

/// Runs `ssh … true` through the shim; returns its latency, or why it failed.
fn probe_once(env: &TestEnv, port: u16) -> Result<Duration, String> {
    let t = Instant::now();
    let mut c = env.ssh_cmd(port, &["-o", "ConnectTimeout=10"], &["true"]);
    match try_run_with_timeout(&mut c, b"", Duration::from_secs(30)) {
        Ok(out) if out.status.success() => Ok(t.elapsed()),
        Ok(out) => Err(format!(
            "exit {} after {:?}: {}",
            exit_code(&out.status),
            t.elapsed(),
            stderr_text(&out).trim()
        )),
        Err(out) => Err(format!(
            "no answer within 30 s: {}",
            stderr_text(&out).trim()
        )),
    }
}

/// One probe that must succeed; logs and returns its latency.
fn probe(env: &TestEnv, shim: &Shim, when: &str) -> Duration {
    let took = probe_once(env, shim.port())
        .unwrap_or_else(|e| panic!("ssh true through the shim {when}: {e}"));
    eprintln!("ssh true {when}: {took:?}");
    took
}

/// `ssh … true` run over and over in the background while a flood runs.
struct Prober {
    /// Tells the loop to finish.
    stop: Arc<AtomicBool>,
    /// The loop; returns every probe's result.
    thread: JoinHandle<Vec<Result<Duration, String>>>,
}

impl Prober {
    /// Starts probing the shim on `port` every 200 ms.
    fn start(env: &TestEnv, port: u16) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let (env, flag) = (env.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut results = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                results.push(probe_once(&env, port));
                thread::sleep(Duration::from_millis(200));
            }
            results
        });
        Prober { stop, thread }
    }

    /// Stops probing; asserts every probe succeeded within [`PROBE_BOUND`]
    /// and logs the latencies.
    fn finish(self, what: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let results = self.thread.join().expect("prober thread");
        let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "{what}: {} of {} probes failed: {failed:?}",
            failed.len(),
            results.len()
        );
        let mut lat: Vec<Duration> = results.into_iter().flatten().collect();
        assert!(!lat.is_empty(), "{what}: no probe completed");
        lat.sort();
        let (min, med, max) = (lat[0], lat[lat.len() / 2], lat[lat.len() - 1]);
        eprintln!(
            "{what}: {} probes of ssh true during the flood: min {min:?}, median {med:?}, max {max:?}",
            lat.len()
        );
        assert!(max < PROBE_BOUND, "{what}: ssh true took {max:?}");
    }
}

/// Asserts the shim's memory grew by less than [`RSS_BOUND_KIB`].
fn assert_rss_bounded(before: ProcStats, after: ProcStats, what: &str) {
    eprintln!(
        "{what}: rss {} -> {} KiB, fds {} -> {}, threads {} -> {}",
        before.rss_kib, after.rss_kib, before.fds, after.fds, before.threads, after.threads
    );
    assert!(
        after.rss_kib < before.rss_kib + RSS_BOUND_KIB,
        "{what}: memory grew from {} to {} KiB",
        before.rss_kib,
        after.rss_kib
    );
}

/// Waits until the shim holds at most `slack` more descriptors than `before`.
fn fds_settle(pid: u32, before: ProcStats, slack: usize, what: &str) {
    let took = eventually(Duration::from_secs(15), what, || {
        ProcStats::of(pid).fds <= before.fds + slack
    });
    eprintln!(
        "{what}: fds back to {} after {took:?}",
        ProcStats::of(pid).fds
    );
}

/// Connects to 127.0.0.1:`port` with short I/O timeouts.
fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect 127.0.0.1:{port}: {e}"));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s
}

/// Whether the peer has closed `s` (EOF or reset seen without blocking).
fn peer_closed(s: &TcpStream) -> bool {
    let _ = s.set_nonblocking(true);
    let mut b = [0u8; 4096];
    let closed = loop {
        match (&*s).read(&mut b) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// Kinds of hostile endpoint connections; `i % 6` picks one.
const ENDPOINT_KINDS: [&str; 6] = [
    "idle, held",
    "4 KiB of garbage, closed",
    "4 KiB of garbage, held",
    "SSH banner + packet claiming 4 GiB, held",
    "300 KiB line without newline, closed",
    "SSH banner, then closed",
];

/// Sends connection `i`'s hostile input; returns the stream if it is to be held.
fn endpoint_hostile(port: u16, i: usize) -> Option<TcpStream> {
    let mut s = connect(port);
    let garbage = pseudo_random_bytes(4096, i as u64 + 1);
    // Write errors are expected: the shim may hang up while we still send.
    match i % ENDPOINT_KINDS.len() {
        0 => return Some(s),
        1 => {
            let _ = s.write_all(&garbage);
        }
        2 => {
            let _ = s.write_all(&garbage);
            return Some(s);
        }
        3 => {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.9 hostile\r\n");
            let _ = s.write_all(&[0xff, 0xff, 0xff, 0xf0, 0x04]);
            let _ = s.write_all(&garbage);
            return Some(s);
        }
        4 => {
            let _ = s.write_all(&vec![b'A'; 300 * 1024]);
        }
        _ => {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.9\r\n");
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    None
}

#[test]
fn endpoint_survives_a_thousand_garbage_and_idle_connections() {
    let rig = Rig::start();
    let (env, shim) = (&rig.env, &rig.shim);
    let pid = shim.pid();
    probe(env, shim, "before the flood");
    let before = ProcStats::of(pid);
    let prober = Prober::start(env, shim.port());
    let started = Instant::now();

    // 1,000 connections from 8 threads; every one whose kind says "held"
    // stays open (silent or mid-handshake) until the end of the test.
    let held = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let (held, port) = (held.clone(), shim.port());
            thread::spawn(move || {
                for i in (t..1000).step_by(8) {
                    if let Some(s) = endpoint_hostile(port, i) {
                        held.lock().unwrap().push((i, s));
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("flood thread");
    }
    let held = std::mem::take(&mut *held.lock().unwrap());
    eprintln!(
        "1000 hostile connections in {:?} ({} held open)",
        started.elapsed(),
        held.len()
    );

    probe(env, shim, "with the hostile connections open");
    let during = ProcStats::of(pid);
    assert_rss_bounded(before, during, "endpoint flood");
    prober.finish("endpoint flood");

    // Which of the held connections has the shim hung up on?
    let mut closed = [0usize; ENDPOINT_KINDS.len()];
    let mut total = [0usize; ENDPOINT_KINDS.len()];
    for (i, s) in &held {
        let k = i % ENDPOINT_KINDS.len();
        total[k] += 1;
        closed[k] += usize::from(peer_closed(s));
    }
    for k in 0..ENDPOINT_KINDS.len() {
        if total[k] > 0 {
            eprintln!(
                "  {:<42} the shim closed {} of {}",
                ENDPOINT_KINDS[k], closed[k], total[k]
            );
        }
    }
    drop(held);
    fds_settle(pid, before, 8, "endpoint flood over");
    probe(env, shim, "after the flood");
    assert!(rig.shim.stderr_text().lines().count() < 5_000, "log flood");
}

/// Generates `n` ed25519 keys the shim does not authorize.
fn stranger_keys(env: &TestEnv, n: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = env.path(&format!("stranger_{i}"));
            keygen(&p);
            p
        })
        .collect()
}

/// `ssh -v` offering every key in `keys` (and no other) to the shim.
fn ssh_with_keys(env: &TestEnv, port: u16, keys: &[PathBuf]) -> Command {
    let mut c = Command::new("ssh");
    // -v first: ssh keeps the first LogLevel it is given.
    c.arg("-v").args(["-F", "/dev/null"]);
    for o in [
        "BatchMode=yes".to_string(),
        "StrictHostKeyChecking=no".to_string(),
        format!(
            "UserKnownHostsFile={}",
            env.path("stranger_known_hosts").display()
        ),
        "IdentitiesOnly=yes".to_string(),
        "PreferredAuthentications=publickey".to_string(),
        "ConnectTimeout=10".to_string(),
    ] {
        c.arg("-o").arg(o);
    }
    for k in keys {
        c.arg("-i").arg(k);
    }
    c.args(["-p", &port.to_string()])
        .arg(env.dest())
        .arg("true")
        .env_remove("SSH_AUTH_SOCK");
    c
}

#[test]
fn a_thousand_rejected_public_keys() {
    let rig = Rig::start();
    let (env, shim) = (&rig.env, &rig.shim);
    let pid = shim.pid();
    let keys = stranger_keys(env, 10);
    probe(env, shim, "before the key flood");
    let before = ProcStats::of(pid);
    let prober = Prober::start(env, shim.port());
    let started = Instant::now();

    // Each ssh offers several keys on one connection (each offer is one
    // rejected attempt); 12 clients at a time until 1,000 offers were made.
    let offers = Arc::new(AtomicUsize::new(0));
    let clients = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..12)
        .map(|_| {
            let (env, port, keys) = (env.clone(), shim.port(), keys.clone());
            let (offers, clients) = (offers.clone(), clients.clone());
            thread::spawn(move || {
                while offers.load(Ordering::SeqCst) < 1000 {
                    let out = run_with_timeout(
                        &mut ssh_with_keys(&env, port, &keys),
                        b"",
                        Duration::from_secs(60),
                    );
                    let err = stderr_text(&out);
                    assert_eq!(exit_code(&out.status), 255, "a stranger got in: {err}");
                    assert!(
                        err.contains("Permission denied")
                            || err.contains("Too many authentication attempts"),
                        "{err}"
                    );
                    let n = err.matches("Offering public key").count();
                    assert!(n > 0, "no key offered: {err}");
                    offers.fetch_add(n, Ordering::SeqCst);
                    clients.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("key flood thread");
    }
    eprintln!(
        "{} rejected public-key offers from {} ssh clients in {:?}",
        offers.load(Ordering::SeqCst),
        clients.load(Ordering::SeqCst),
        started.elapsed()
    );

    probe(env, shim, "after the key flood");
    assert_rss_bounded(before, ProcStats::of(pid), "key flood");
    prober.finish("key flood");
    fds_settle(pid, before, 8, "key flood over");
}

/// GET `path` from the metrics server; (status line, body), or why not.
fn http_get(port: u16, path: &str) -> Result<(String, String), String> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response: {text:?}"))?;
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// Whether GET /metrics answers 200 with sshshim metrics.
fn metrics_ok(port: u16) -> bool {
    http_get(port, "/metrics")
        .is_ok_and(|(st, body)| st.contains(" 200 ") && body.contains("sshshim_"))
}

/// A slow-loris connection: an unfinished request head, one byte at a time.
fn loris(port: u16) -> Option<TcpStream> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .ok()?;
    Some(s)
}

/// One oversized request `i` (1 MiB in a header, in the request line, or
/// in many headers); returns the status line answered, if any.
fn oversized(port: u16, i: usize) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mib = 1 << 20;
    let req = match i % 3 {
        0 => format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(mib)
        ),
        1 => format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "m".repeat(mib)),
        _ => format!(
            "GET /metrics HTTP/1.1\r\n{}\r\n",
            "X-Many: y\r\n".repeat(mib / 11)
        ),
    };
    // The server stops reading after its limit; the rest may bounce.
    let _ = s.write_all(req.as_bytes());
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    text.lines()
        .next()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
}

#[test]
fn metrics_survives_slow_loris_and_oversized_heads() {
    let mport = free_port();
    let rig = Rig::start_with(&[], &["--metrics", &format!("127.0.0.1:{mport}")]);
    let (env, shim) = (&rig.env, &rig.shim);
    let pid = shim.pid();
    eventually(Duration::from_secs(10), "metrics up", || metrics_ok(mport));
    probe(env, shim, "before the HTTP abuse");
    let before = ProcStats::of(pid);
    let prober = Prober::start(env, shim.port());

    // Slow-loris: 150 connections (more than the server admits at once),
    // each fed one byte every 100 ms for 8 s, reopened when the server hangs up.
    let started = Instant::now();
    let mut conns: Vec<Option<TcpStream>> = (0..150).map(|_| loris(mport)).collect();
    let (mut reopened, mut scrapes, mut scrapes_ok) = (0usize, 0usize, 0usize);
    let mut last_scrape = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        for c in conns.iter_mut() {
            let alive = c
                .as_mut()
                .is_some_and(|s| !peer_closed(s) && s.write_all(b"a").is_ok());
            if !alive {
                *c = loris(mport);
                reopened += 1;
            }
        }
        // A real scraper during the attack: logged, not asserted (the
        // server caps concurrent connections, so the attack may win).
        if last_scrape.elapsed() > Duration::from_millis(500) {
            scrapes += 1;
            scrapes_ok += usize::from(metrics_ok(mport));
            last_scrape = Instant::now();
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "slow-loris: 150 connections for {:?}, {reopened} reopened after the server hung up; \
         GET /metrics answered {scrapes_ok} of {scrapes} times during the attack",
        started.elapsed()
    );
    drop(conns);

    // Oversized heads: 1 MiB of header, of request line, of header lines.
    let t = Instant::now();
    let answers: Vec<Option<String>> = thread::scope(|sc| {
        let hs: Vec<_> = (0..12)
            .map(|i| sc.spawn(move || oversized(mport, i)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("oversized"))
            .collect()
    });
    eprintln!("12 oversized requests in {:?}: {answers:?}", t.elapsed());
    for a in answers.iter().flatten() {
        assert!(
            a.contains(" 431 "),
            "unexpected answer to an oversized head: {a}"
        );
    }

    let took = eventually(
        Duration::from_secs(10),
        "GET /metrics after the abuse",
        || metrics_ok(mport),
    );
    eprintln!("GET /metrics answered {took:?} after the abuse ended");
    let (st, body) = http_get(mport, "/status").expect("GET /status");
    assert!(st.contains(" 200 "), "{st}");
    assert!(body.trim_start().starts_with('['), "{body}");
    probe(env, shim, "after the HTTP abuse");
    assert_rss_bounded(before, ProcStats::of(pid), "HTTP abuse");
    prober.finish("HTTP abuse");
    fds_settle(pid, before, 8, "HTTP abuse over");
}

/// Sends `req` on a new control connection; the reply (empty if none).
fn control_exchange(sock: &Path, req: &[u8]) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return "<connect failed>".into();
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    // The server stops reading at its limit; the rest may bounce.
    let _ = s.write_all(req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `sshshim status` (human form) must answer and name the upstream state.
fn status_answers(env: &TestEnv, when: &str) {
    let t = Instant::now();
    let out = run_with_timeout(&mut env.sshshim(&["status"]), b"", Duration::from_secs(20));
    assert_success(&out, &format!("sshshim status {when}"));
    assert!(
        stdout_text(&out).contains("connected"),
        "{}",
        stdout_text(&out)
    );
    eprintln!("sshshim status {when}: {:?}", t.elapsed());
}

#[test]
fn control_socket_survives_garbage_huge_lines_and_crowds() {
    let rig = Rig::start();
    let (env, shim) = (&rig.env, &rig.shim);
    let pid = shim.pid();
    let sock = env.control_socket();
    status_answers(env, "before the abuse");
    let before = ProcStats::of(pid);
    let prober = Prober::start(env, shim.port());

    // 400 garbage lines (random bytes, some not UTF-8), from 4 threads.
    let t = Instant::now();
    let replies: Vec<String> = thread::scope(|sc| {
        let hs: Vec<_> = (0..4)
            .map(|w| {
                let sock = &sock;
                sc.spawn(move || {
                    (w..400)
                        .step_by(4)
                        .map(|i| {
                            // Odd lines are raw bytes, even ones printable text.
                            let printable = |b: u8| if i % 2 == 0 { b' ' + b % 95 } else { b };
                            let mut line: Vec<u8> = pseudo_random_bytes(1 + i % 900, i as u64 + 7)
                                .into_iter()
                                .map(printable)
                                .filter(|b| *b != b'\n')
                                .collect();
                            line.push(b'\n');
                            control_exchange(sock, &line)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("garbage thread"))
            .collect()
    });
    let unknown = replies
        .iter()
        .filter(|r| r.starts_with("error: unknown command"))
        .count();
    let silent = replies.iter().filter(|r| r.is_empty()).count();
    eprintln!(
        "400 garbage lines in {:?}: {unknown} answered 'unknown command', {silent} closed silently",
        t.elapsed()
    );
    assert_eq!(unknown + silent, 400, "odd replies: {replies:?}");
    assert!(
        unknown >= 200,
        "printable garbage went unanswered: {replies:?}"
    );

    // Huge lines: 16 MiB without a newline, and a 1 MiB line of `down`
    // padding (only the first 1 KiB is read, so it must not stop the shim).
    let t = Instant::now();
    let huge = control_exchange(&sock, &vec![b'x'; 16 << 20]);
    let mut down_pad = b"down".to_vec();
    down_pad.extend(std::iter::repeat_n(b'z', 1 << 20));
    down_pad.push(b'\n');
    let padded = control_exchange(&sock, &down_pad);
    eprintln!(
        "huge lines in {:?}: replies {huge:?}, {padded:?}",
        t.elapsed()
    );
    assert!(
        !huge.contains('{') && !padded.starts_with("ok"),
        "{huge:?} {padded:?}"
    );

    // A crowd: 500 silent connections held open while status is asked.
    let t = Instant::now();
    let crowd: Vec<UnixStream> = (0..500)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    eprintln!(
        "{} silent control connections opened in {:?}",
        crowd.len(),
        t.elapsed()
    );
    assert_eq!(crowd.len(), 500, "control connections refused");
    status_answers(env, "with 500 silent control connections");
    // And 200 concurrent well-formed status requests.
    let jsons: Vec<String> = thread::scope(|sc| {
        let hs: Vec<_> = (0..200)
            .map(|_| sc.spawn(|| control_exchange(&sock, b"status\n")))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("status thread"))
            .collect()
    });
    for j in &jsons {
        let v: serde_json::Value = serde_json::from_str(j.trim())
            .unwrap_or_else(|e| panic!("status reply is not JSON ({e}): {j:?}"));
        assert_eq!(v["upstream"]["state"], "connected", "{j}");
    }
    // The shim hangs up on silent control clients by itself.
    fds_settle(pid, before, 8, "silent control connections still open");
    drop(crowd);

    status_answers(env, "after the abuse");
    let out = run(&mut env.sshshim(&["status", "--json"]));
    assert_success(&out, "sshshim status --json");
    probe(env, shim, "after the control abuse");
    assert_rss_bounded(before, ProcStats::of(pid), "control abuse");
    prober.finish("control abuse");
    fds_settle(pid, before, 8, "control abuse over");
    assert!(rig.shim.pid() == pid && std::fs::metadata(&sock).is_ok());
}

/// Issue 26, finding 5: a hostile upstream opens channels sshshim never
/// asked for (x11, session, direct-tcpip, direct-streamlocal: each refused,
/// 20,000 x11 opens without the shim's memory growing), then more
/// connections to a remote forward than the cap on server-opened channels
/// (those beyond it refused until one closes). The shim keeps working.
#[test]
fn hostile_upstream_cannot_open_channels_nobody_asked_for() {
    use russh::ChannelOpenFailure as F;
    use support::evil_server::EvilServer;
    const X11_OPENS: usize = 20_000;
    const MAX: usize = sshshim::tuning::MAX_SERVER_CHANNELS;
    let env = TestEnv::new();
    let evil = EvilServer::start(&env);
    // The remote forward's target: accepts and holds every connection.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let svc = holder.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h2 = held.clone();
    thread::spawn(move || {
        for s in holder.incoming().flatten() {
            h2.lock().unwrap().push(s);
        }
    });
    let rport = free_port();
    let shim = env
        .shim_builder(evil.port())
        .known_hosts(evil.known_hosts())
        .args(&["-R", &format!("{rport}:127.0.0.1:{svc}")])
        .start();
    let pid = shim.pid();
    let h = evil.session(Duration::from_secs(10));
    probe(&env, &shim, "through the hostile upstream");

    let refusal = |r: Result<russh::Channel<russh::server::Msg>, russh::Error>| match r {
        Err(russh::Error::ChannelOpenFailure(f)) => Some(f),
        _ => None,
    };
    evil.block_on(async {
        let x11 = refusal(h.channel_open_x11("127.0.0.1", 6010).await);
        let session = refusal(h.channel_open_session().await);
        let direct = refusal(
            h.channel_open_direct_tcpip("127.0.0.1", 22, "127.0.0.1", 4000)
                .await,
        );
        let unix = refusal(h.channel_open_direct_streamlocal("/tmp/x").await);
        for (what, r) in [
            ("x11", x11),
            ("session", session),
            ("direct-tcpip", direct),
            ("direct-streamlocal", unix),
        ] {
            assert_eq!(r, Some(F::AdministrativelyProhibited), "{what}");
        }
    });

    let before = ProcStats::of(pid);
    let t = Instant::now();
    let refused = evil.block_on(async {
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move {
                    let mut refused = 0;
                    for _ in 0..X11_OPENS / 50 {
                        if let Err(russh::Error::ChannelOpenFailure(_)) =
                            h.channel_open_x11("127.0.0.1", 6010).await
                        {
                            refused += 1;
                        }
                    }
                    refused
                })
            })
            .collect();
        let mut n = 0;
        for t in tasks {
            n += t.await.unwrap();
        }
        n
    });
    let after = ProcStats::of(pid);
    eprintln!(
        "{refused} of {X11_OPENS} x11 opens refused in {:?}; rss {} -> {} KiB",
        t.elapsed(),
        before.rss_kib,
        after.rss_kib
    );
    assert_eq!(refused, X11_OPENS);
    // Accepted, 20,000 x11 channels held about 50 MB.
    assert!(
        after.rss_kib < before.rss_kib + 16 * 1024,
        "memory grew from {} to {} KiB",
        before.rss_kib,
        after.rss_kib
    );
    probe(&env, &shim, "after the x11 flood");

    // Connections to the remote forward: up to the cap, then refused.
    eventually(Duration::from_secs(10), "the -R forward requested", || {
        !evil.forwards().is_empty()
    });
    let (addr, port) = evil.forwards()[0].clone();
    let open = || h.channel_open_forwarded_tcpip(addr.clone(), port, "127.0.0.1", 5000);
    let mut open_now = evil.block_on(async {
        let mut chans = Vec::new();
        for i in 0..MAX {
            match open().await {
                Ok(c) => chans.push(c),
                Err(e) => panic!("forwarded-tcpip {i} of {MAX} refused: {e}"),
            }
        }
        chans
    });
    eprintln!("{MAX} forwarded connections open");
    evil.block_on(async {
        assert_eq!(refusal(open().await), Some(F::ResourceShortage));
        // One closes: there is room for one more.
        open_now.pop().unwrap().close().await.unwrap();
        let t = Instant::now();
        loop {
            match open().await {
                Ok(c) => break open_now.push(c),
                Err(_) if t.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("no room after a close: {e}"),
            }
        }
        assert_eq!(refusal(open().await), Some(F::ResourceShortage));
    });
    probe(&env, &shim, "with the forwarded channels at the cap");
    drop(open_now);
}

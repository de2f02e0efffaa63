//! Issue 24: forwarded TCP connections survive the network (`--resume`).
//! The remote helper opens them, holds the target connection while the
//! upstream is gone, and both ends continue where they stopped: against
//! the harness's real sshd, through the fault proxy, with real clients
//! (ssh -L, -D, -W, the mux socket's -O forward, sshshim's own -L).

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use support::*;

/// Bytes per generated chunk of a bulk stream.
const CHUNK: usize = 64 << 10;

/// Chunk `i` of the bulk stream `seed` (deterministic, so both ends can
/// check it without keeping it).
fn chunk(seed: u64, i: usize) -> Vec<u8> {
    pseudo_random_bytes(CHUNK, seed * 1_000_003 + i as u64)
}

/// The hex SHA-256 of `mib` MiB of stream `seed`.
fn stream_digest(seed: u64, mib: usize) -> String {
    let mut h = Sha256::new();
    for i in 0..(mib << 20) / CHUNK {
        h.update(chunk(seed, i));
    }
    hex(&h.finalize())
}

/// Lower-case hex.
fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `mib` MiB of stream `seed`, counting what went out.
fn write_stream(
    w: &mut impl Write,
    seed: u64,
    mib: usize,
    sent: &AtomicUsize,
) -> std::io::Result<()> {
    for i in 0..(mib << 20) / CHUNK {
        w.write_all(&chunk(seed, i))?;
        sent.fetch_add(CHUNK, Ordering::Relaxed);
    }
    Ok(())
}

/// Reads to EOF: the hex SHA-256 of the first `body` bytes, and the rest.
fn read_stream(
    r: &mut impl Read,
    body: usize,
    got: &AtomicUsize,
) -> std::io::Result<(String, Vec<u8>)> {
    let mut h = Sha256::new();
    let (mut n, mut tail, mut buf) = (0usize, Vec::new(), vec![0u8; 64 << 10]);
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            return Ok((hex(&h.finalize()), tail));
        }
        let take = k.min(body.saturating_sub(n));
        h.update(&buf[..take]);
        tail.extend_from_slice(&buf[take..k]);
        n += k;
        got.fetch_add(k, Ordering::Relaxed);
    }
}

/// Stream seeds: client to target, target to client.
const UP: u64 = 1;
/// See [`UP`].
const DOWN: u64 = 2;

/// A bulk target on loopback: each connection gets `mib` MiB of stream
/// [`DOWN`] while it sends its own; after the client's EOF the target adds
/// the digest of what it received, then closes. I/O errors (a reset) are
/// collected.
fn bulk_target(mib: usize) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let errs = errors.clone();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            let errs = errs.clone();
            thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let writer = thread::spawn(move || {
                    write_stream(&mut w, DOWN, mib, &AtomicUsize::new(0)).map(|()| w)
                });
                let mut r = s;
                let got = read_stream(&mut r, usize::MAX, &AtomicUsize::new(0));
                let w = writer.join().unwrap();
                match (got, w) {
                    (Ok((digest, _)), Ok(mut w)) => {
                        if let Err(e) = w.write_all(digest.as_bytes()) {
                            errs.lock().unwrap().push(format!("target write: {e}"));
                        }
                    }
                    (g, w) => errs.lock().unwrap().push(format!(
                        "target: read {:?} write {:?}",
                        g.err(),
                        w.err()
                    )),
                }
            });
        }
    });
    (port, errors)
}

/// A bulk exchange under way from the client's side.
struct Bulk {
    /// Bytes sent so far.
    sent: Arc<AtomicUsize>,
    /// Bytes received so far.
    got: Arc<AtomicUsize>,
    /// The exchange: the digest of the body received and the trailer.
    done: thread::JoinHandle<std::io::Result<(String, Vec<u8>)>>,
    /// MiB each way.
    mib: usize,
}

impl Bulk {
    /// Starts `mib` MiB each way over `s`.
    fn start(s: TcpStream, mib: usize) -> Bulk {
        let (sent, got) = (Arc::default(), Arc::<AtomicUsize>::default());
        let (sent2, got2) = (Arc::clone(&sent), got.clone());
        let done = thread::spawn(move || {
            let mut w = s.try_clone()?;
            let writer = thread::spawn(move || {
                write_stream(&mut w, UP, mib, &sent2)?;
                w.shutdown(Shutdown::Write)
            });
            let mut r = s;
            let got = read_stream(&mut r, mib << 20, &got2);
            writer.join().unwrap()?;
            got
        });
        Bulk {
            sent,
            got,
            done,
            mib,
        }
    }

    /// Waits until a quarter went each way (so a fault lands mid-transfer).
    fn wait_quarter(&self) {
        let q = (self.mib << 20) / 4;
        eventually(Duration::from_secs(60), "a quarter each way", || {
            self.sent.load(Ordering::Relaxed) >= q && self.got.load(Ordering::Relaxed) >= q
        });
        assert!(
            self.sent.load(Ordering::Relaxed) < self.mib << 20,
            "the upload finished before the fault"
        );
    }

    /// Waits for the end and checks both directions byte-exact.
    fn check(self, shim: &Shim, errors: &Mutex<Vec<String>>) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !self.done.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the exchange did not finish; shim log:\n{}",
                truncate(&shim.stderr_text(), 20000)
            );
            thread::sleep(Duration::from_millis(20));
        }
        let (body, trailer) = self.done.join().unwrap().unwrap_or_else(|e| {
            panic!(
                "the client saw an error (a reset?): {e}\n{}",
                truncate(&shim.stderr_text(), 20000)
            )
        });
        assert_eq!(
            body,
            stream_digest(DOWN, self.mib),
            "download not byte-exact"
        );
        assert_eq!(
            String::from_utf8_lossy(&trailer),
            stream_digest(UP, self.mib),
            "upload not byte-exact"
        );
        assert!(
            errors.lock().unwrap().is_empty(),
            "{:?}",
            errors.lock().unwrap()
        );
    }
}

/// Kills a client process on drop, so a failing test leaves none behind.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ssh -N OPTS` through the shim's endpoint.
fn ssh_n(env: &TestEnv, shim: &Shim, opts: &[&str]) -> Client {
    let mut all = vec!["-N", "-o", "ExitOnForwardFailure=yes"];
    all.extend_from_slice(opts);
    let c = env
        .ssh_cmd(shim.port(), &all, &[])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Client(c)
}

/// Connects to 127.0.0.1:port once something listens there (bounded).
fn connect(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) => assert!(Instant::now() < deadline, "nothing on {port}: {e}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the shim logged that the forwards helper resumed `n` times.
fn wait_resumed(shim: &Shim, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while shim
        .stderr_text()
        .matches("forwarded connections resumed after")
        .count()
        < n
    {
        assert!(
            Instant::now() < deadline,
            "forwarded connections not resumed:\n{}",
            truncate(&shim.stderr_text(), 20000)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that the helper, not sshd's direct-tcpip, carried the connections.
fn assert_carried(shim: &Shim) {
    let log = shim.stderr_text();
    assert!(
        log.contains("forwarded connections are resumable"),
        "the forwards helper did not start:\n{}",
        truncate(&log, 20000)
    );
}

/// sshd, the fault proxy and a shim with `--resume` and `args` through it.
fn proxied(env: &TestEnv, sshd: &Sshd, args: &[&str]) -> (FaultProxy, Shim) {
    let (proxy, builder) = through_proxy(env, sshd);
    (proxy, builder.arg("--resume").args(args).start())
}

#[test]
fn own_local_forward_carries_64_mib_each_way_across_a_drop() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (target, errors) = bulk_target(64);
    let lport = free_port();
    let spec = format!("127.0.0.1:{lport}:127.0.0.1:{target}");
    let (proxy, shim) = proxied(&env, &sshd, &["-L", &spec]);
    // Paced by the proxy so the drop lands mid-transfer.
    proxy.set_delay(Duration::from_millis(1));
    let bulk = Bulk::start(connect(lport), 64);
    bulk.wait_quarter();
    proxy.drop_all();
    wait_resumed(&shim, 1);
    bulk.check(&shim, &errors);
    assert_carried(&shim);
}

#[test]
fn ssh_local_forward_survives_a_blackhole_the_keepalive_detects() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (target, errors) = bulk_target(32);
    let (proxy, shim) = proxied(
        &env,
        &sshd,
        &[
            "--keepalive",
            "1",
            "--keepalive-max",
            "2",
            "--connect-timeout",
            "3",
        ],
    );
    let lport = free_port();
    let _c = ssh_n(&env, &shim, &["-L", &format!("{lport}:127.0.0.1:{target}")]);
    proxy.set_delay(Duration::from_millis(1));
    let bulk = Bulk::start(connect(lport), 32);
    bulk.wait_quarter();
    proxy.set_mode(Mode::Freeze);
    thread::sleep(Duration::from_secs(4));
    proxy.set_mode(Mode::Pass);
    wait_resumed(&shim, 1);
    bulk.check(&shim, &errors);
    assert_carried(&shim);
}

/// A SOCKS5 CONNECT to 127.0.0.1:port through the SOCKS server at `socks`.
fn socks5(socks: u16, port: u16) -> TcpStream {
    let mut s = connect(socks);
    s.write_all(&[5, 1, 0]).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    assert_eq!(r, [5, 0]);
    let mut req = vec![5, 1, 0, 1, 127, 0, 0, 1];
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(rep[1], 0, "SOCKS request refused");
    s
}

#[test]
fn dynamic_forward_survives_a_drop() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (target, errors) = bulk_target(32);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let dport = free_port();
    let _c = ssh_n(&env, &shim, &["-D", &format!("127.0.0.1:{dport}")]);
    proxy.set_delay(Duration::from_millis(1));
    let bulk = Bulk::start(socks5(dport, target), 32);
    bulk.wait_quarter();
    proxy.drop_all();
    wait_resumed(&shim, 1);
    bulk.check(&shim, &errors);
    assert_carried(&shim);
}

/// The shim's multiplexing socket (the default path for its destination).
fn shim_mux(env: &TestEnv) -> PathBuf {
    let name = format!("{}@{LOCALHOST}", env.user()).replace('@', "+40");
    env.runtime_dir()
        .join("sshshim")
        .join(format!("{name}.mux"))
}

#[test]
fn mux_forward_local_survives_a_drop() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (target, errors) = bulk_target(32);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let lport = free_port();
    let spec = format!("127.0.0.1:{lport}:127.0.0.1:{target}");
    let out = run(&mut mux_cmd(
        &shim_mux(&env),
        &["-O", "forward", "-L", &spec],
    ));
    assert_success(&out, "-O forward -L");
    proxy.set_delay(Duration::from_millis(1));
    let bulk = Bulk::start(connect(lport), 32);
    bulk.wait_quarter();
    proxy.drop_all();
    wait_resumed(&shim, 1);
    bulk.check(&shim, &errors);
    assert_carried(&shim);
}

#[test]
fn an_inner_session_through_w_survives_the_outer_drop() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let proxy_cmd = format!(
        "ProxyCommand=ssh -F /dev/null -o BatchMode=yes -o ControlMaster=no \
         -o ControlPath={} -o HostName=127.0.0.1 -o Port={} -W %h:%p muxhost",
        shim_mux(&env).display(),
        free_port()
    );
    let script = "i=1; while [ $i -le 40 ]; do echo line $i; i=$((i+1)); sleep 0.1; done; exit 7";
    let mut c = env.ssh_cmd(sshd.port(), &["-o", &proxy_cmd], &[script]);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Capture::spawn(child.stdout.take().unwrap());
    let err = Capture::spawn(child.stderr.take().unwrap());
    let mut c = Client(child);
    assert!(out.wait_for(Duration::from_secs(30), |t| t.contains("line 10\n")));
    proxy.drop_all();
    wait_resumed(&shim, 1);
    let st = wait_child(&mut c.0, Duration::from_secs(30)).expect("inner ssh did not end");
    assert_eq!(exit_code(&st), 7, "{}", err.text());
    let want: String = (1..=40).map(|i| format!("line {i}\n")).collect();
    assert_eq!(out.text(), want);
    assert_carried(&shim);
}

/// An echo service that counts its connections.
fn echo_target() -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let n = accepted.clone();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            n.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 || s.write_all(&buf[..k]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// Sends `what` and reads it back.
fn echo(s: &mut TcpStream, what: &[u8]) {
    s.write_all(what).unwrap();
    let mut back = vec![0u8; what.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, what);
}

#[test]
fn an_idle_forwarded_connection_is_usable_after_a_drop() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (target, accepted) = echo_target();
    let lport = free_port();
    let spec = format!("127.0.0.1:{lport}:127.0.0.1:{target}");
    let (proxy, shim) = proxied(&env, &sshd, &["-L", &spec]);
    let mut s = connect(lport);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    echo(&mut s, b"before the drop\n");
    proxy.drop_all();
    wait_resumed(&shim, 1);
    echo(&mut s, b"after the drop\n");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the target connection was replaced"
    );
    assert_carried(&shim);
    let st = shim.status_json().expect("status");
    assert_eq!(st["resume"]["forwards"], "resumable", "{st}");
    assert_eq!(st["resume"]["forwarded_connections"]["attached"], 1, "{st}");
}

/// A shim on `sshd` with `args`, plain or with `--resume` (one at a time:
/// a profile runs once).
fn shim(env: &TestEnv, sshd: &Sshd, resume: bool, args: &[&str]) -> Shim {
    let b = env
        .shim_builder(sshd.port())
        .env("RUST_LOG", "sshshim=debug")
        .args(args);
    if resume { b.arg("--resume") } else { b }.start()
}

#[test]
fn a_refused_target_fails_as_without_resume() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let dead = format!("127.0.0.1:{}", free_port());
    let w = |resume: bool| {
        let shim = shim(&env, &sshd, resume, &[]);
        // VERBOSE: ssh shows the refusal's code and reason.
        let opts = ["-o", "LogLevel=VERBOSE", "-W", &dead];
        let out = run(&mut env.ssh_cmd(shim.port(), &opts, &[]));
        (out, shim)
    };
    let failure = |o: &std::process::Output| -> Vec<String> {
        stderr_text(o)
            .lines()
            .filter(|l| l.contains("open failed") || l.contains("forwarding failed"))
            .map(str::to_owned)
            .collect()
    };
    let (a, _) = w(false);
    let (b, resumable) = w(true);
    assert_eq!(failure(&a), failure(&b));
    assert_eq!(exit_code(&a.status), exit_code(&b.status));
    assert!(
        failure(&b)
            .iter()
            .any(|l| l.contains("open failed: connect failed")),
        "{}",
        stderr_text(&b)
    );
    assert_carried(&resumable);
}

/// Half-close both ways through an own `-L` of `shim` to the two targets:
/// the reply to a request the client ended with EOF, and what the client
/// sent after the target's EOF.
fn half_close(l_reply: u16, l_first: u16, heard: &Mutex<Vec<u8>>) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut s = connect(l_reply);
    s.write_all(b"a request").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    let mut s = connect(l_first);
    let mut banner = Vec::new();
    s.read_to_end(&mut banner).unwrap();
    s.write_all(b"words after the target's EOF").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    eventually(Duration::from_secs(10), "the target heard", || {
        !heard.lock().unwrap().is_empty()
    });
    let got = std::mem::take(&mut *heard.lock().unwrap());
    (reply, banner, got)
}

#[test]
fn half_close_is_carried_as_without_resume() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    // Replies after the client's EOF.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let reply_port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut req = Vec::new();
            let _ = s.read_to_end(&mut req);
            let _ = s.write_all(format!("got {} bytes", req.len()).as_bytes());
        }
    });
    // Sends a banner, ends its side, then still listens.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let first_port = l.local_addr().unwrap().port();
    let heard = Arc::new(Mutex::new(Vec::new()));
    let h = heard.clone();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(b"banner");
            let _ = s.shutdown(Shutdown::Write);
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            *h.lock().unwrap() = got;
        }
    });
    let (l1, l2) = (free_port(), free_port());
    let fwd = |l: u16, t: u16| format!("127.0.0.1:{l}:127.0.0.1:{t}");
    let (f1, f2) = (fwd(l1, reply_port), fwd(l2, first_port));
    let args = ["-L", f1.as_str(), "-L", f2.as_str()];
    let plain = shim(&env, &sshd, false, &args);
    let a = half_close(l1, l2, &heard);
    drop(plain);
    let resumable = shim(&env, &sshd, true, &args);
    let b = half_close(l1, l2, &heard);
    assert_eq!(a, b);
    assert_eq!(a.0, b"got 9 bytes");
    assert_eq!(a.2, b"words after the target's EOF");
    assert_carried(&resumable);
}

#[test]
fn without_the_helper_forwards_work_as_before_and_status_says_why() {
    let env = TestEnv::new();
    let sshd = Sshd::start_with(&env, &["AllowTcpForwarding no"]);
    let (target, _) = echo_target();
    let lport = free_port();
    let spec = format!("127.0.0.1:{lport}:127.0.0.1:{target}");
    let resumable = env
        .shim_builder(sshd.port())
        .env("RUST_LOG", "sshshim=debug")
        .args(&["--resume", "-L", &spec])
        .start();
    // sshd refuses the forward itself: the helper must not bypass it.
    let mut s = connect(lport);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"x");
    let mut buf = [0u8; 4];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "the forward was not refused"
    );
    let st = resumable.status_json().expect("status");
    let why = st["resume"]["forwards"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        why.starts_with("not resumable") && why.contains("AllowTcpForwarding"),
        "{st}"
    );
    // A second connection goes the same way; the log said why once.
    let mut s = connect(lport);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    let log = resumable.stderr_text();
    let said = log
        .matches("forwarded connections are not resumable")
        .count();
    assert_eq!(said, 1, "{log}");
}

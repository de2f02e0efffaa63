//! Integration-test harness for sshshim.
//!
//! Provides throw-away directories with keys ([`TestEnv`]), a private OpenSSH
//! server on loopback ([`Sshd`]), the shim under test ([`Shim`]), client
//! command builders (ssh, scp, sftp, rsync), bounded process execution
//! ([`run_with_timeout`]), output comparison ([`compare_ports`]) and a
//! fault-injecting TCP proxy ([`FaultProxy`]).
//!
//! Every network endpoint is on 127.0.0.1 and every wait is bounded.
// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod evil_server;

/// Path of the OpenSSH server binary used as the upstream.
pub const SSHD_BIN: &str = "/usr/sbin/sshd";
/// Loopback address used for every endpoint in the tests.
pub const LOCALHOST: &str = "127.0.0.1";
/// Default bound for client commands run by the convenience helpers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for sshd to print its banner.
const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the shim's "listening on" line.
const SHIM_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Prefix of the readiness line the shim prints on stdout.
const SHIM_READY_PREFIX: &str = "sshshim: listening on ";
/// Maximum characters of captured output shown in panic messages.
const SHOW_MAX: usize = 4000;

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// Name of the user running the tests (sshd must log this user in).
pub fn current_user() -> &'static str {
    static USER: OnceLock<String> = OnceLock::new();
    USER.get_or_init(|| {
        let out = Command::new("id")
            .arg("-un")
            .output()
            .expect("run `id -un`");
        assert!(out.status.success(), "`id -un` failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
}

/// Returns a currently free loopback TCP port (bind to :0 and release it).
/// A loopback port that was free a moment ago and that this test process
/// has not handed out before: the kernel may give the same ephemeral port to
/// two `bind(0)` calls in a row, and two tests (or two forwards in one test)
/// sharing a port made each other's checks pass or fail.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let l = TcpListener::bind((LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `ssh` through the multiplexing socket `sock` only: HostName and Port
/// name a closed loopback port, so a client that fell back to a direct
/// connection would fail at once instead of passing the test.
pub fn mux_cmd(sock: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("ssh");
    c.args(["-F", "/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "ControlMaster=no", "-o"])
        .arg(format!("ControlPath={}", sock.display()))
        .args(["-o", "HostName=127.0.0.1", "-o", "LogLevel=ERROR", "-o"])
        .arg(format!("Port={}", free_port()))
        .arg("muxhost")
        .args(args)
        .env_remove("SSH_AUTH_SOCK");
    c
}

/// Exit code of a process, or 128+signal when it was killed by a signal.
pub fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Truncates text for panic messages so failures stay readable.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let head: String = s.chars().take(max).collect();
    format!("{head}\n... [truncated, {} chars total]", s.chars().count())
}

/// Hex SHA-256 of `data`, computed with the system `sha256sum`.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut cmd = Command::new("sha256sum");
    let out = run_with_timeout(&mut cmd, data, Duration::from_secs(60));
    assert!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Hex SHA-256 of a file's contents.
pub fn sha256_file(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    sha256_hex(&fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

/// Deterministic pseudo-random bytes (xorshift) for transfer tests.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Generates an unencrypted ed25519 key pair at `path` / `path.pub`.
pub fn keygen(path: &Path) {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-t", "ed25519", "-N", "", "-q", "-C", "sshshim-test", "-f"])
        .arg(path);
    let out = run_with_timeout(&mut cmd, b"", Duration::from_secs(30));
    assert!(
        out.status.success(),
        "ssh-keygen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends `sig` (e.g. "TERM", "KILL", "STOP") to the given pids via `kill`.
pub fn send_signal(pids: &[u32], sig: &str) {
    if pids.is_empty() {
        return;
    }
    // Errors (process already gone) are expected during teardown races.
    let _ = Command::new("kill")
        .arg("-s")
        .arg(sig)
        .args(pids.iter().map(|p| p.to_string()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// All live descendants of `root`, found by walking /proc parent links.
fn descendants(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may contain spaces; fields resume after the last ')'.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

/// PIDs whose environment contains exactly `entry` (`NAME=VALUE`).
fn pids_with_env(entry: &str) -> Vec<u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let environ = fs::read(e.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|kv| kv == entry.as_bytes())
                .then_some(pid)
        })
        .collect()
}

/// SIGKILLs `initial` plus everything `more` finds.
///
/// Processes are stopped first and `more` is re-run until it finds nothing
/// new, so nothing can fork (or be reparented to init) between listing and
/// killing.
fn stop_and_kill(initial: &[u32], more: impl Fn() -> Vec<u32>) {
    send_signal(initial, "STOP");
    let mut seen: HashSet<u32> = initial.iter().copied().collect();
    for _ in 0..20 {
        let new: Vec<u32> = more().into_iter().filter(|p| !seen.contains(p)).collect();
        if new.is_empty() {
            break;
        }
        send_signal(&new, "STOP");
        seen.extend(new);
    }
    send_signal(&seen.into_iter().collect::<Vec<_>>(), "KILL");
}

/// Waits up to `timeout` for `child` to exit, polling without blocking.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// Output capture
// ---------------------------------------------------------------------------

/// Bytes captured so far and whether the pipe reached EOF.
#[derive(Default)]
struct CaptureState {
    /// Captured bytes.
    buf: Vec<u8>,
    /// Set once the writer closed the pipe.
    eof: bool,
}

/// Bytes drained from a pipe by a background thread (so the child never
/// blocks on a full pipe), observable while the child runs.
#[derive(Clone, Default)]
pub struct Capture {
    /// Shared state plus a change notifier.
    inner: Arc<(Mutex<CaptureState>, Condvar)>,
}

impl Capture {
    /// Starts a thread that reads `r` to EOF into a new capture.
    pub fn spawn(mut r: impl Read + Send + 'static) -> Capture {
        let cap = Capture::default();
        let c = cap.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = r.read(&mut buf).unwrap_or(0);
                let (lock, cv) = &*c.inner;
                let mut g = lock.lock().unwrap();
                if n == 0 {
                    g.eof = true;
                    cv.notify_all();
                    return;
                }
                g.buf.extend_from_slice(&buf[..n]);
                cv.notify_all();
            }
        });
        cap
    }

    /// Everything captured so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.inner.0.lock().unwrap().buf.clone()
    }

    /// Everything captured so far, as lossy UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Waits until `pred(text)` holds or EOF/timeout; returns the predicate.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut g = lock.lock().unwrap();
        loop {
            if pred(&String::from_utf8_lossy(&g.buf)) {
                return true;
            }
            let now = Instant::now();
            if g.eof || now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Waits (bounded) for the writer side to close the pipe.
    pub fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.inner;
        let mut g = lock.lock().unwrap();
        while !g.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        true
    }
}

/// Runs `cmd` feeding it `stdin`, capturing stdout/stderr; kills the child
/// and panics with a clear message if it does not exit within `timeout`.
pub fn run_with_timeout(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    try_run_with_timeout(cmd, stdin, timeout).unwrap_or_else(|out| {
        panic!(
            "command timed out after {timeout:?}: {desc}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            truncate(&String::from_utf8_lossy(&out.stdout), SHOW_MAX),
            truncate(&String::from_utf8_lossy(&out.stderr), SHOW_MAX)
        )
    })
}

/// [`run_with_timeout`] with empty stdin and [`DEFAULT_TIMEOUT`].
pub fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, b"", DEFAULT_TIMEOUT)
}

/// Panics with stdout/stderr shown unless `out` is a successful exit.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed with {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        truncate(&String::from_utf8_lossy(&out.stdout), SHOW_MAX),
        truncate(&String::from_utf8_lossy(&out.stderr), SHOW_MAX)
    );
}

/// Stdout of `out` as lossy UTF-8.
pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr of `out` as lossy UTF-8.
pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Describes the first difference between two streams, or None if equal.
fn diff_stream(name: &str, a: &[u8], b: &[u8]) -> Option<String> {
    if a == b {
        return None;
    }
    let (ta, tb) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    let (la, lb): (Vec<&str>, Vec<&str>) = (ta.lines().collect(), tb.lines().collect());
    let i = la.iter().zip(&lb).take_while(|(x, y)| x == y).count();
    Some(format!(
        "{name} differs ({} vs {} bytes); first difference at line {}:\n  direct: {:?}\n  shim:   {:?}\n--- direct {name} ---\n{}\n--- shim {name} ---\n{}",
        a.len(),
        b.len(),
        i + 1,
        truncate(la.get(i).copied().unwrap_or("<end>"), 300),
        truncate(lb.get(i).copied().unwrap_or("<end>"), 300),
        truncate(&ta, SHOW_MAX),
        truncate(&tb, SHOW_MAX)
    ))
}

/// Asserts two outputs have equal exit status, stdout and stderr.
pub fn assert_same_output(direct: &Output, shim: &Output, what: &str) {
    let mut problems = Vec::new();
    if exit_code(&direct.status) != exit_code(&shim.status) {
        problems.push(format!(
            "exit status differs: direct {:?} vs shim {:?}",
            direct.status, shim.status
        ));
    }
    problems.extend(diff_stream("stdout", &direct.stdout, &shim.stdout));
    problems.extend(diff_stream("stderr", &direct.stderr, &shim.stderr));
    assert!(problems.is_empty(), "{what}:\n{}", problems.join("\n"));
}

/// Runs the same ssh command against two ports (direct sshd vs shim) with the
/// same stdin and asserts identical results; returns the direct output.
pub fn compare_ports(env: &TestEnv, direct: u16, shim: u16, args: &[&str], stdin: &[u8]) -> Output {
    let a = run_with_timeout(&mut env.ssh(direct, args), stdin, DEFAULT_TIMEOUT);
    let b = run_with_timeout(&mut env.ssh(shim, args), stdin, DEFAULT_TIMEOUT);
    assert_same_output(&a, &b, &format!("compare ssh {args:?}"));
    a
}

// ---------------------------------------------------------------------------
// TestEnv
// ---------------------------------------------------------------------------

/// A temporary directory removed on drop (std-only `tempfile` substitute).
/// Set `SSHSHIM_KEEP_TMP=1` to keep it for post-mortem debugging.
struct TempDir {
    /// Absolute path of the directory.
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh 0700 directory with a short name (unix socket paths
    /// inside it must stay under 108 bytes).
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "sshshim-{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).expect("chmod tmp");
        TempDir { path }
    }
}

impl Drop for TempDir {
    /// Removes the directory unless asked to keep it.
    fn drop(&mut self) {
        if std::env::var_os("SSHSHIM_KEEP_TMP").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A per-test directory with keys and config files. Cheap to clone; the
/// directory lives until the last clone (including those held by [`Sshd`]
/// and [`Shim`]) is dropped.
#[derive(Clone)]
pub struct TestEnv {
    /// Keeps the directory alive.
    tmp: Arc<TempDir>,
}

impl Default for TestEnv {
    /// Same as [`TestEnv::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    /// Creates the directory, user key, sshd host key, shim host key,
    /// authorized_keys and the shim's state/runtime dirs.
    pub fn new() -> TestEnv {
        let env = TestEnv {
            tmp: Arc::new(TempDir::new()),
        };
        keygen(&env.user_key());
        keygen(&env.host_key());
        keygen(&env.shim_host_key());
        fs::copy(env.path("user_key.pub"), env.authorized_keys()).expect("authorized_keys");
        for d in [env.state_dir(), env.runtime_dir()] {
            fs::create_dir_all(&d).expect("mkdir");
            // XDG_RUNTIME_DIR must be private per the XDG spec.
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).expect("chmod");
        }
        env
    }

    /// The test directory.
    pub fn dir(&self) -> &Path {
        &self.tmp.path
    }

    /// A path inside the test directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// The user sshd logs in (the current user).
    pub fn user(&self) -> &'static str {
        current_user()
    }

    /// `USER@127.0.0.1`.
    pub fn dest(&self) -> String {
        format!("{}@{LOCALHOST}", self.user())
    }

    /// `USER@127.0.0.1:PATH`, for scp/rsync remote operands.
    pub fn remote(&self, path: impl AsRef<Path>) -> String {
        format!("{}:{}", self.dest(), path.as_ref().display())
    }

    /// Client private key (public half in `user_key.pub`).
    pub fn user_key(&self) -> PathBuf {
        self.path("user_key")
    }

    /// sshd's private host key.
    pub fn host_key(&self) -> PathBuf {
        self.path("host_key")
    }

    /// The shim's private host key.
    pub fn shim_host_key(&self) -> PathBuf {
        self.path("shim_host_key")
    }

    /// authorized_keys containing the user key (used by sshd and the shim).
    pub fn authorized_keys(&self) -> PathBuf {
        self.path("authorized_keys")
    }

    /// known_hosts trusting sshd's host key (written by [`Sshd::start`]).
    pub fn known_hosts(&self) -> PathBuf {
        self.path("known_hosts")
    }

    /// The shim's `XDG_STATE_HOME`.
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// The shim's `XDG_RUNTIME_DIR` (0700).
    pub fn runtime_dir(&self) -> PathBuf {
        self.path("run")
    }

    /// `ssh-ed25519 AAAA...` of sshd's host key (no comment).
    pub fn host_key_line(&self) -> String {
        let pubkey = fs::read_to_string(self.path("host_key.pub")).expect("host_key.pub");
        pubkey
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Writes `DIR/known_hosts` for sshd listening on `port`.
    pub fn write_known_hosts(&self, port: u16) {
        let line = format!("[{LOCALHOST}]:{port} {}\n", self.host_key_line());
        fs::write(self.known_hosts(), line).expect("write known_hosts");
    }

    /// Client options shared by ssh/scp/sftp/rsync. `port_flag` is `-p` for
    /// ssh and `-P` for scp/sftp. The client known_hosts file is per port so
    /// different servers never look like a changed host key.
    pub fn client_opts(&self, port: u16, port_flag: &str) -> Vec<String> {
        let kh = self.path(&format!("client_known_hosts_{port}"));
        let mut v: Vec<String> = vec!["-F".into(), "/dev/null".into()];
        for o in [
            "BatchMode=yes".to_string(),
            "StrictHostKeyChecking=no".to_string(),
            format!("UserKnownHostsFile={}", kh.display()),
            "LogLevel=ERROR".to_string(),
            // Never offer keys from the developer's agent.
            "IdentitiesOnly=yes".to_string(),
        ] {
            v.push("-o".into());
            v.push(o);
        }
        v.push("-i".into());
        v.push(self.user_key().display().to_string());
        v.push(port_flag.into());
        v.push(port.to_string());
        v
    }

    /// `ssh [opts] -F /dev/null ... -p PORT USER@127.0.0.1 ARGS...`.
    /// `opts` come first because ssh keeps the first value of an option, so
    /// they can override defaults (e.g. `-o ConnectTimeout=2`).
    pub fn ssh_cmd(&self, port: u16, opts: &[&str], args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(opts)
            .args(self.client_opts(port, "-p"))
            .arg(self.dest())
            .args(args);
        // Deterministic: no agent unless a test sets one explicitly.
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `ssh ... -p PORT USER@127.0.0.1 ARGS...`.
    pub fn ssh(&self, port: u16, args: &[&str]) -> Command {
        self.ssh_cmd(port, &[], args)
    }

    /// `scp -F /dev/null ... -P PORT ARGS...` (use [`TestEnv::remote`]).
    pub fn scp(&self, port: u16, args: &[&str]) -> Command {
        let mut c = Command::new("scp");
        c.args(self.client_opts(port, "-P")).args(args);
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `sftp -F /dev/null ... -P PORT -b BATCHFILE USER@127.0.0.1`, with
    /// `batch` written to a fresh file in the test directory.
    pub fn sftp(&self, port: u16, batch: &str) -> Command {
        static N: AtomicU64 = AtomicU64::new(0);
        let file = self.path(&format!("sftp_batch_{}", N.fetch_add(1, Ordering::Relaxed)));
        fs::write(&file, batch).expect("write sftp batch");
        let mut c = Command::new("sftp");
        c.args(self.client_opts(port, "-P"))
            .arg("-b")
            .arg(&file)
            .arg(self.dest());
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `rsync -e "ssh -F /dev/null ... -p PORT" ARGS...`.
    pub fn rsync(&self, port: u16, args: &[&str]) -> Command {
        // Test paths contain no spaces, so plain joining is a valid -e value.
        let rsh = format!("ssh {}", self.client_opts(port, "-p").join(" "));
        let mut c = Command::new("rsync");
        c.arg("-e").arg(rsh).args(args);
        c.env_remove("SSH_AUTH_SOCK");
        c
    }

    /// Starts sshd with the default config.
    pub fn start_sshd(&self) -> Sshd {
        Sshd::start(self)
    }

    /// Starts a shim with default args in front of `sshd`.
    pub fn start_shim(&self, sshd: &Sshd) -> Shim {
        Shim::start(self, sshd)
    }

    /// A builder for a shim pointing at `sshd_port`.
    pub fn shim_builder(&self, sshd_port: u16) -> ShimBuilder {
        ShimBuilder::new(self, sshd_port)
    }
}

// ---------------------------------------------------------------------------
// Sshd
// ---------------------------------------------------------------------------

/// Creates sshd's privilege-separation directory, required when run as root.
fn ensure_privsep_dir() {
    let p = Path::new("/run/sshd");
    if !p.exists() && fs::create_dir_all(p).is_ok() {
        let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
    }
}

/// Connects to `port` and returns once an `SSH-2.0-` banner is read.
/// Returns an error early if `child` exits, or after `timeout`.
fn wait_ssh_banner(port: u16, child: &mut Child, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let addr: SocketAddr = (LOCALHOST.parse::<std::net::IpAddr>().unwrap(), port).into();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("exited early with {st:?}"));
        }
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let mut reader = BufReader::new(&s);
            if reader.read_line(&mut line).is_ok() && line.starts_with("SSH-2.0-") {
                // Answer with a banner so sshd does not log an ERROR-level
                // "kex_exchange_identification" line for the probe.
                let _ = (&s).write_all(b"SSH-2.0-sshshim_probe\r\n");
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!("no SSH banner on port {port} within {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A private OpenSSH server on 127.0.0.1 logging in the current user with
/// the test's user key. Killed (with all its sessions) on drop.
pub struct Sshd {
    /// Owning test environment (keeps keys alive).
    env: TestEnv,
    /// Listening port, stable across [`Sshd::restart`].
    port: u16,
    /// Caller-supplied config lines.
    extra: Vec<String>,
    /// The `sshd -D` listener process, if running.
    child: Option<Child>,
    /// sshd's stderr log (`-e`) of the current run.
    log: Capture,
    /// `NAME=VALUE` set (via `SetEnv`) in every session of this sshd, so
    /// session processes orphaned by a dropped connection can still be found.
    marker: String,
}

impl Sshd {
    /// Starts sshd with the default config on a free port.
    pub fn start(env: &TestEnv) -> Sshd {
        Self::start_with(env, &[])
    }

    /// Starts sshd with extra config lines (e.g. `"MaxSessions 10"`).
    /// They are placed before the defaults because sshd keeps the first value
    /// of a keyword, so they may override defaults. `Match` blocks and
    /// `SetEnv` are not supported (they would swallow the defaults / the
    /// session marker used for cleanup).
    pub fn start_with(env: &TestEnv, extra: &[&str]) -> Sshd {
        ensure_privsep_dir();
        let mut errors = Vec::new();
        // Another process may grab the port between probing and binding.
        for _ in 0..5 {
            let mut s = Sshd {
                env: env.clone(),
                port: free_port(),
                extra: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
                log: Capture::default(),
                marker: String::new(),
            };
            s.marker = format!("SSHSHIM_SSHD_ID={}-{}", std::process::id(), s.port);
            match s.spawn() {
                Ok(()) => {
                    env.write_known_hosts(s.port);
                    return s;
                }
                Err(e) => errors.push(e),
            }
        }
        panic!("sshd failed to start:\n{}", errors.join("\n"));
    }

    /// Writes the config file for the current port.
    fn write_config(&self) -> PathBuf {
        let d = self.env.dir().display();
        let mut cfg: Vec<String> = self.extra.clone();
        cfg.extend([
            format!("ListenAddress {LOCALHOST}:{}", self.port),
            format!("HostKey {d}/host_key"),
            format!("AuthorizedKeysFile {d}/authorized_keys"),
            "PasswordAuthentication no".into(),
            "KbdInteractiveAuthentication no".into(),
            "PubkeyAuthentication yes".into(),
            "UsePAM no".into(),
            "StrictModes no".into(),
            "PermitRootLogin yes".into(),
            "PidFile none".into(),
            "AcceptEnv LANG LC_* SSHSHIM_TEST_*".into(),
            "Subsystem sftp internal-sftp".into(),
            "AllowAgentForwarding yes".into(),
            "AllowTcpForwarding yes".into(),
            "AllowStreamLocalForwarding yes".into(),
            "GatewayPorts no".into(),
            "X11Forwarding no".into(),
            "PrintMotd no".into(),
            "PrintLastLog no".into(),
            "LogLevel ERROR".into(),
            "MaxStartups 100:30:200".into(),
            // This machine's root .bashrc runs `pyenv init`, whose rehash
            // waits up to 60 s on a lock file that a session killed by a
            // fault test may leave behind, then prints an error on stderr
            // (which differential tests compare). `no_rehash` (the variable
            // pyenv-init's --no-rehash sets) skips it; the timeout bounds it
            // should another pyenv ignore that.
            format!("SetEnv {} PYENV_REHASH_TIMEOUT=2 no_rehash=1", self.marker),
        ]);
        let path = self.env.path("sshd_config");
        fs::write(&path, cfg.join("\n") + "\n").expect("write sshd_config");
        path
    }

    /// Spawns sshd on `self.port` and waits for its banner.
    fn spawn(&mut self) -> Result<(), String> {
        let cfg = self.write_config();
        let mut child = Command::new(SSHD_BIN)
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {SSHD_BIN}: {e}"))?;
        self.log = Capture::spawn(child.stderr.take().expect("stderr"));
        match wait_ssh_banner(self.port, &mut child, SSHD_READY_TIMEOUT) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                self.log.wait_eof(Duration::from_secs(2));
                Err(format!(
                    "sshd on port {}: {e}; log:\n{}",
                    self.port,
                    self.log.text()
                ))
            }
        }
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the listener process, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// PIDs of processes running inside this sshd's sessions (user commands
    /// and shells; they carry the session marker in their environment).
    pub fn session_pids(&self) -> Vec<u32> {
        pids_with_env(&self.marker)
    }

    /// sshd's stderr log for the current run.
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// SIGKILLs the listener and every session process (including orphaned
    /// session commands), then reaps the listener.
    pub fn kill(&mut self) {
        let marker = self.marker.clone();
        match self.child.take() {
            Some(mut c) => {
                let root = c.id();
                stop_and_kill(&[root], || {
                    let mut v = descendants(root);
                    v.extend(pids_with_env(&marker));
                    v
                });
                let _ = c.wait();
            }
            None => stop_and_kill(&[], || pids_with_env(&marker)),
        }
    }

    /// SIGKILLs only the listener; established sessions keep running.
    pub fn kill_listener(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts sshd again on the same port with the same keys (killing the
    /// current instance first, if any). Retries for up to 10 s.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("sshd restart failed: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `ssh` command to this sshd (see [`TestEnv::ssh`]).
    pub fn ssh(&self, args: &[&str]) -> Command {
        self.env.ssh(self.port, args)
    }
}

impl Drop for Sshd {
    /// Kills sshd and its sessions; shows its log if the test is failing.
    fn drop(&mut self) {
        self.kill();
        let log = self.log.text();
        if thread::panicking() && !log.trim().is_empty() {
            eprintln!(
                "--- sshd log (port {}) ---\n{}",
                self.port,
                truncate(&log, SHOW_MAX)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Shim
// ---------------------------------------------------------------------------

/// Builds an `sshshim up ...` invocation.
pub struct ShimBuilder {
    /// Owning test environment.
    env: TestEnv,
    /// Upstream sshd port passed as `-p`.
    sshd_port: u16,
    /// Value of `--known-hosts`.
    known_hosts: PathBuf,
    /// Value of `--listen`.
    listen: String,
    /// Whether to emit the default `up ...` arguments.
    default_args: bool,
    /// Extra arguments appended after the defaults.
    args: Vec<String>,
    /// Environment overrides applied last.
    envs: Vec<(String, String)>,
}

impl ShimBuilder {
    /// Defaults: `--listen 127.0.0.1:0` and the env's known_hosts.
    pub fn new(env: &TestEnv, sshd_port: u16) -> ShimBuilder {
        ShimBuilder {
            env: env.clone(),
            sshd_port,
            known_hosts: env.known_hosts(),
            listen: format!("{LOCALHOST}:0"),
            default_args: true,
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// Uses a different `--known-hosts` file (e.g. for host-key mismatch).
    pub fn known_hosts(mut self, path: impl AsRef<Path>) -> Self {
        self.known_hosts = path.as_ref().to_path_buf();
        self
    }

    /// Uses a different `--listen` address.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// Appends one argument.
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }

    /// Appends arguments.
    pub fn args(mut self, a: &[&str]) -> Self {
        self.args.extend(a.iter().map(|s| s.to_string()));
        self
    }

    /// Sets an environment variable (e.g. `RUST_LOG`, `SSH_AUTH_SOCK`).
    pub fn env(mut self, k: &str, v: impl AsRef<str>) -> Self {
        self.envs.push((k.to_string(), v.as_ref().to_string()));
        self
    }

    /// Drops the default `up ...` arguments; only [`ShimBuilder::args`] are
    /// passed (e.g. for `--help` or other subcommands).
    pub fn no_default_args(mut self) -> Self {
        self.default_args = false;
        self
    }

    /// The full command (stdin null, stdout/stderr piped).
    pub fn command(&self) -> Command {
        let e = &self.env;
        let mut c = Command::new(env!("CARGO_BIN_EXE_sshshim"));
        if self.default_args {
            c.arg("up")
                .args(["--listen", &self.listen])
                .arg("--known-hosts")
                .arg(&self.known_hosts)
                .arg("-i")
                .arg(e.user_key())
                .arg("--authorized-keys")
                .arg(e.authorized_keys())
                .arg("--host-key")
                .arg(e.shim_host_key())
                .args(["-p", &self.sshd_port.to_string()])
                .arg(e.dest());
        }
        c.args(&self.args)
            .env("XDG_STATE_HOME", e.state_dir())
            .env("XDG_RUNTIME_DIR", e.runtime_dir())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("RUST_LOG");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Spawns the shim and waits (20 s) for its "listening on" line.
    pub fn start(self) -> Shim {
        let desc = format!("{:?}", self.command());
        let mut child = self
            .command()
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        let stdout = Capture::spawn(child.stdout.take().expect("stdout"));
        let stderr = Capture::spawn(child.stderr.take().expect("stderr"));
        let mut shim = Shim {
            env: self.env,
            child,
            port: 0,
            stdout,
            stderr,
            exited: None,
        };
        let ready = shim
            .stdout
            .wait_for(SHIM_READY_TIMEOUT, |t| parse_listen_port(t).is_some());
        match parse_listen_port(&shim.stdout.text()) {
            Some(port) if ready => shim.port = port,
            _ => {
                let status = shim.child.try_wait().ok().flatten();
                let _ = shim.child.kill();
                let _ = shim.child.wait();
                shim.exited = shim.child.try_wait().ok().flatten();
                shim.stderr.wait_eof(Duration::from_secs(2));
                panic!(
                    "shim not ready within {SHIM_READY_TIMEOUT:?} (exit: {status:?}): {desc}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    truncate(&shim.stdout.text(), SHOW_MAX),
                    truncate(&shim.stderr.text(), SHOW_MAX)
                );
            }
        }
        shim
    }

    /// Runs the shim without waiting for readiness and expects it to exit
    /// within `timeout` (panics otherwise). Returns (exit code, stdout,
    /// stderr); a signal death is reported as 128+signal.
    pub fn run_expect_exit(self, timeout: Duration) -> (i32, String, String) {
        let mut cmd = self.command();
        let out = run_with_timeout(&mut cmd, b"", timeout);
        (exit_code(&out.status), stdout_text(&out), stderr_text(&out))
    }
}

/// Port from a complete `sshshim: listening on ADDR:PORT` line, if present.
fn parse_listen_port(text: &str) -> Option<u16> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .find_map(|l| l.trim().strip_prefix(SHIM_READY_PREFIX))
        .and_then(|addr| addr.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
}

/// A running sshshim process. SIGKILLed on drop if still running; its stderr
/// is printed if the test is panicking.
pub struct Shim {
    /// Owning test environment.
    env: TestEnv,
    /// The shim process.
    child: Child,
    /// Port parsed from the readiness line.
    port: u16,
    /// Everything the shim printed on stdout.
    stdout: Capture,
    /// Everything the shim printed on stderr.
    stderr: Capture,
    /// Exit status once observed.
    exited: Option<ExitStatus>,
}

impl Shim {
    /// Starts a shim with default args in front of `sshd`.
    pub fn start(env: &TestEnv, sshd: &Sshd) -> Shim {
        ShimBuilder::new(env, sshd.port()).start()
    }

    /// Starts a shim with default args plus `args`.
    pub fn start_with(env: &TestEnv, sshd_port: u16, args: &[&str]) -> Shim {
        ShimBuilder::new(env, sshd_port).args(args).start()
    }

    /// Runs a shim that is expected to fail/exit; see
    /// [`ShimBuilder::run_expect_exit`].
    pub fn run_expect_exit(
        env: &TestEnv,
        sshd_port: u16,
        args: &[&str],
        timeout: Duration,
    ) -> (i32, String, String) {
        ShimBuilder::new(env, sshd_port)
            .args(args)
            .run_expect_exit(timeout)
    }

    /// The port the shim listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shim's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`"TERM"`, `"INT"`, `"HUP"`, ...).
    pub fn signal(&self, sig: &str) {
        send_signal(&[self.pid()], sig);
    }

    /// Waits up to `timeout` for the shim to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_child(&mut self.child, timeout);
        }
        self.exited
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// SIGKILLs the shim and reaps it.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Everything printed on stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// Everything printed on stdout so far.
    pub fn stdout_text(&self) -> String {
        self.stdout.text()
    }

    /// Waits up to `timeout` for `needle` to appear on stderr.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        self.stderr.wait_for(timeout, |t| t.contains(needle))
    }

    /// `ssh` command to the shim (see [`TestEnv::ssh`]).
    pub fn ssh(&self, args: &[&str]) -> Command {
        self.env.ssh(self.port, args)
    }

    /// `scp` command to the shim.
    pub fn scp(&self, args: &[&str]) -> Command {
        self.env.scp(self.port, args)
    }

    /// `sftp -b` command to the shim.
    pub fn sftp(&self, batch: &str) -> Command {
        self.env.sftp(self.port, batch)
    }

    /// `rsync -e ssh...` command to the shim.
    pub fn rsync(&self, args: &[&str]) -> Command {
        self.env.rsync(self.port, args)
    }
}

impl Drop for Shim {
    /// Kills the shim; dumps its stderr if the test is failing.
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            self.stderr.wait_eof(Duration::from_secs(1));
            eprintln!(
                "--- sshshim stderr (pid {}) ---\n{}",
                self.child.id(),
                truncate(&self.stderr.text(), SHOW_MAX)
            );
        }
    }
}

/// sshd + shim + env in one value for the common case.
pub struct Rig {
    /// The shim (declared first so it is dropped before sshd).
    pub shim: Shim,
    /// The upstream sshd.
    pub sshd: Sshd,
    /// The test directory.
    pub env: TestEnv,
}

impl Rig {
    /// Default sshd and shim.
    pub fn start() -> Rig {
        Self::start_with(&[], &[])
    }

    /// sshd with extra config lines and a shim with extra args.
    pub fn start_with(sshd_extra: &[&str], shim_args: &[&str]) -> Rig {
        let env = TestEnv::new();
        let sshd = Sshd::start_with(&env, sshd_extra);
        let shim = Shim::start_with(&env, sshd.port(), shim_args);
        Rig { shim, sshd, env }
    }

    /// `ssh` straight to sshd.
    pub fn ssh_direct(&self, args: &[&str]) -> Command {
        self.sshd.ssh(args)
    }

    /// `ssh` through the shim.
    pub fn ssh_shim(&self, args: &[&str]) -> Command {
        self.shim.ssh(args)
    }

    /// Runs `ssh ARGS` direct and via the shim, asserting identical output.
    pub fn compare(&self, args: &[&str]) -> Output {
        self.compare_stdin(args, b"")
    }

    /// Like [`Rig::compare`] with `stdin` fed to both.
    pub fn compare_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        compare_ports(&self.env, self.sshd.port(), self.shim.port(), args, stdin)
    }
}

// ---------------------------------------------------------------------------
// FaultProxy
// ---------------------------------------------------------------------------

/// Behaviour of a [`FaultProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes normally.
    Pass,
    /// Hold all bytes in both directions; sockets stay open (a partition).
    Freeze,
    /// Reset new connections right after accepting them.
    Refuse,
}

/// State shared between the proxy handle and its threads.
struct ProxyShared {
    /// Upstream port on 127.0.0.1.
    target: u16,
    /// Current mode.
    mode: Mutex<Mode>,
    /// Delay applied before forwarding each chunk.
    delay: Mutex<Duration>,
    /// Set when the proxy is dropped.
    stop: AtomicBool,
    /// Live connections.
    conns: Mutex<Vec<ProxyConn>>,
    /// Connections accepted so far, refused ones included.
    accepted: AtomicU64,
}

/// One proxied connection: both sockets plus its two pump threads.
struct ProxyConn {
    /// Tells the pumps to exit (dropping their socket handles).
    killed: Arc<AtomicBool>,
    /// Client-side and upstream sockets (handles for SO_LINGER).
    socks: [TcpStream; 2],
    /// Pump threads.
    threads: Vec<JoinHandle<()>>,
}

/// A loopback TCP proxy with injectable faults, for resilience tests.
pub struct FaultProxy {
    /// Listening port.
    port: u16,
    /// Shared state.
    shared: Arc<ProxyShared>,
    /// Accept loop thread.
    accept: Option<JoinHandle<()>>,
}

/// Sets SO_LINGER 0 so the final close sends RST instead of FIN.
fn set_rst_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Whether an I/O error is a socket timeout (used to poll flags).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1:0 forwarding to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind((LOCALHOST, 0)).expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        // Non-blocking accept lets the loop notice `stop` promptly.
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(ProxyShared {
            target: target_port,
            mode: Mutex::new(Mode::Pass),
            delay: Mutex::new(Duration::ZERO),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = thread::spawn(move || {
            while !sh.stop.load(Ordering::SeqCst) {
                sh.conns
                    .lock()
                    .unwrap()
                    .retain(|c| !c.threads.iter().all(JoinHandle::is_finished));
                match listener.accept() {
                    Ok((client, _)) => Self::on_accept(&sh, client),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// Handles a new client connection according to the current mode.
    fn on_accept(sh: &Arc<ProxyShared>, client: TcpStream) {
        sh.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nonblocking(false);
        if *sh.mode.lock().unwrap() == Mode::Refuse {
            set_rst_on_close(&client);
            return;
        }
        let up_addr = SocketAddr::from(([127, 0, 0, 1], sh.target));
        let Ok(upstream) = TcpStream::connect_timeout(&up_addr, Duration::from_secs(2)) else {
            set_rst_on_close(&client);
            return;
        };
        let killed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(&client, &upstream), (&upstream, &client)] {
            let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
            let (sh, killed) = (sh.clone(), killed.clone());
            threads.push(thread::spawn(move || pump(from, to, &sh, &killed)));
        }
        sh.conns.lock().unwrap().push(ProxyConn {
            killed,
            socks: [client, upstream],
            threads,
        });
    }

    /// The proxy's listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches mode; applies to existing and new connections.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.lock().unwrap()
    }

    /// Delays every forwarded chunk by `d` (zero disables).
    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    /// Number of connections currently tracked.
    pub fn connection_count(&self) -> usize {
        let mut conns = self.shared.conns.lock().unwrap();
        conns.retain(|c| !c.threads.iter().all(JoinHandle::is_finished));
        conns.len()
    }

    /// Connections accepted so far, refused ones included (each is one
    /// connect attempt of the shim).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Aborts every current connection with RST on both sides.
    pub fn drop_all(&self) {
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for c in conns {
            c.socks.iter().for_each(set_rst_on_close);
            c.killed.store(true, Ordering::SeqCst);
            drop(c.socks);
            // Pumps notice `killed` within ~50 ms and drop the last handles.
            for t in c.threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for FaultProxy {
    /// Stops accepting and resets all connections.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.drop_all();
    }
}

/// Copies `from` -> `to`, honouring freeze/delay and the kill flag.
fn pump(mut from: TcpStream, mut to: TcpStream, sh: &ProxyShared, killed: &AtomicBool) {
    // Short timeouts turn blocking I/O into polling so flags are seen quickly.
    let tick = Duration::from_millis(50);
    let _ = from.set_read_timeout(Some(tick));
    let _ = to.set_write_timeout(Some(tick));
    let dead = || killed.load(Ordering::SeqCst) || sh.stop.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 16 * 1024];
    while !dead() {
        let res = from.read(&mut buf);
        if matches!(&res, Err(e) if is_timeout(e)) {
            continue;
        }
        // Hold whatever we got (data, EOF or error) while frozen.
        while *sh.mode.lock().unwrap() == Mode::Freeze && !dead() {
            thread::sleep(Duration::from_millis(20));
        }
        let delay_until = Instant::now() + *sh.delay.lock().unwrap();
        while Instant::now() < delay_until && !dead() {
            thread::sleep(Duration::from_millis(5));
        }
        let n = match res {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(_) => {
                // Propagate an abort as RST to the other side.
                set_rst_on_close(&to);
                killed.store(true, Ordering::SeqCst);
                return;
            }
        };
        let mut off = 0;
        while off < n && !dead() {
            match to.write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) if is_timeout(&e) => {}
                Err(_) => {
                    set_rst_on_close(&from);
                    killed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Small services and polling shared by the resilience and profile tests
// ---------------------------------------------------------------------------

/// A TCP service answering every connection with `reply`.
pub fn service(reply: &'static [u8]) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(reply);
        }
    });
    port
}

/// Reads what a connection to 127.0.0.1:port says, or None if refused.
pub fn fetch(port: u16) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(out)
}

/// Polls `f` every 50 ms until it is true; panics after `within`.
pub fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

// ---------------------------------------------------------------------------
// ssh-agent
// ---------------------------------------------------------------------------

/// A private `ssh-agent -D -a SOCK` holding the given keys; killed by PID
/// on drop, so even a failing test leaves no agent behind.
pub struct Agent {
    /// The agent process (in the foreground with -D, so this is its PID).
    child: Child,
    /// Its socket.
    sock: PathBuf,
}

impl Agent {
    /// Starts an agent at `env/NAME.sock` and adds `keys` (private key files).
    pub fn start(env: &TestEnv, name: &str, keys: &[&Path]) -> Agent {
        let sock = env.path(&format!("{name}.sock"));
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ssh-agent");
        let agent = Agent { child, sock };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agent.sock.exists() {
            assert!(Instant::now() < deadline, "ssh-agent did not start");
            thread::sleep(Duration::from_millis(20));
        }
        for k in keys {
            let out = run_with_timeout(
                Command::new("ssh-add")
                    .arg(k)
                    .env("SSH_AUTH_SOCK", &agent.sock),
                b"",
                Duration::from_secs(20),
            );
            assert_success(&out, "ssh-add");
        }
        agent
    }

    /// Its socket, for `SSH_AUTH_SOCK`.
    pub fn sock(&self) -> &Path {
        &self.sock
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `SHA256:...` fingerprint of a key file (private or public).
pub fn fingerprint(key: &Path) -> String {
    let out = run(Command::new("ssh-keygen").arg("-lf").arg(key));
    assert_success(&out, "ssh-keygen -lf");
    stdout_text(&out)
        .split_whitespace()
        .nth(1)
        .expect("ssh-keygen -lf output")
        .to_string()
}

// ---------------------------------------------------------------------------
// sshshim subcommands
// ---------------------------------------------------------------------------

/// `sshshim ARGS` with the test's state and runtime directories, so it sees
/// the shims this test started (`status`, `ssh-config`).
pub fn sshshim_cmd(env: &TestEnv, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sshshim"));
    c.args(args)
        .env("XDG_STATE_HOME", env.state_dir())
        .env("XDG_RUNTIME_DIR", env.runtime_dir())
        .env("XDG_CONFIG_HOME", env.path("config"))
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("RUST_LOG");
    c
}

/// The first profile of `sshshim status --json`, or None if none answers.
pub fn shim_status(env: &TestEnv) -> Option<serde_json::Value> {
    let out = run_with_timeout(
        &mut sshshim_cmd(env, &["status", "--json"]),
        b"",
        Duration::from_secs(20),
    );
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get(0).cloned()
}
// ---------------------------------------------------------------------------
// Process statistics, bounded runs and the control socket (hardening tests)
// ---------------------------------------------------------------------------

/// Resources a process holds, read from /proc.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStats {
    /// Open file descriptors (entries of /proc/PID/fd).
    pub fds: usize,
    /// Threads (`Threads:` of /proc/PID/status).
    pub threads: usize,
    /// Resident memory in KiB (`VmRSS:` of /proc/PID/status).
    pub rss_kib: u64,
}

impl ProcStats {
    /// Reads the statistics of `pid`; panics if the process is gone.
    pub fn of(pid: u32) -> ProcStats {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/status (process gone?): {e}"));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        };
        let fds = fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|e| panic!("read /proc/{pid}/fd: {e}"))
            .count();
        ProcStats {
            fds,
            threads: field("Threads:") as usize,
            rss_kib: field("VmRSS:"),
        }
    }
}

/// Like [`run_with_timeout`], but a command still running after `timeout`
/// is killed and returned as `Err` with what it printed until then, instead
/// of panicking (for tests that count outcomes rather than stop at the
/// first one).
pub fn try_run_with_timeout(
    cmd: &mut Command,
    stdin: &[u8],
    timeout: Duration,
) -> Result<Output, Output> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("failed to spawn {desc}: {e}"));
    let mut pipe = child.stdin.take().expect("stdin pipe");
    let input = stdin.to_vec();
    // A separate writer avoids deadlock when the child writes before reading;
    // dropping the pipe afterwards delivers EOF.
    thread::spawn(move || {
        let _ = pipe.write_all(&input);
    });
    let out = Capture::spawn(child.stdout.take().expect("stdout pipe"));
    let err = Capture::spawn(child.stderr.take().expect("stderr pipe"));
    // Grandchildren (e.g. rsync's ssh) may hold the pipes a bit longer: the
    // waits for EOF below are bounded.
    let (status, finished) = match wait_child(&mut child, timeout) {
        Some(status) => (status, true),
        None => {
            let _ = child.kill();
            (child.wait().expect("reap a killed child"), false)
        }
    };
    out.wait_eof(Duration::from_secs(5));
    err.wait_eof(Duration::from_secs(5));
    let output = Output {
        status,
        stdout: out.bytes(),
        stderr: err.bytes(),
    };
    if finished { Ok(output) } else { Err(output) }
}

impl TestEnv {
    /// `sshshim ARGS` (no defaults) with this test's state, runtime and
    /// config directories, e.g. for `status` and `down`.
    pub fn sshshim(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sshshim"));
        c.args(args)
            .env("XDG_STATE_HOME", self.state_dir())
            .env("XDG_RUNTIME_DIR", self.runtime_dir())
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("RUST_LOG");
        c
    }

    /// The control socket of the only shim running in this environment
    /// (`$XDG_RUNTIME_DIR/sshshim/NAME.sock`); panics unless exactly one.
    pub fn control_socket(&self) -> PathBuf {
        let dir = self.runtime_dir().join("sshshim");
        let socks: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sock"))
            .collect();
        assert_eq!(
            socks.len(),
            1,
            "control sockets in {}: {socks:?}",
            dir.display()
        );
        socks.into_iter().next().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Processes, shell lines, status, ControlMaster aliases
// ---------------------------------------------------------------------------

/// The command line of `pid` as its arguments, if the process exists.
fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

impl Sshd {
    /// Session processes (see [`Sshd::session_pids`]) with `arg` as one
    /// whole argument. Put a marker in a separate argument of the remote
    /// command (`sh -c '...' MARKER`): the local ssh client carries the
    /// command as one argument, so it never matches.
    pub fn session_pids_with_arg(&self, arg: &str) -> Vec<u32> {
        self.session_pids()
            .into_iter()
            .filter(|&p| cmdline(p).is_some_and(|c| c.iter().any(|a| a == arg)))
            .collect()
    }

    /// Session processes whose command line (arguments joined by spaces)
    /// contains `needle`.
    pub fn session_pids_containing(&self, needle: &str) -> Vec<u32> {
        self.session_pids()
            .into_iter()
            .filter(|&p| cmdline(p).is_some_and(|c| c.join(" ").contains(needle)))
            .collect()
    }
}

/// `cmd` as one `sh` command line (each word single-quoted; its
/// environment changes are not included).
pub fn shell_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Shim {
    /// `sshshim status --json` of this shim (the first profile listed by
    /// its runtime directory), or None if it does not answer.
    pub fn status_json(&self) -> Option<serde_json::Value> {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sshshim"));
        c.args(["status", "--json"])
            .env("XDG_STATE_HOME", self.env.state_dir())
            .env("XDG_RUNTIME_DIR", self.env.runtime_dir())
            .env_remove("RUST_LOG");
        let out = run_with_timeout(&mut c, b"", Duration::from_secs(20));
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?
            .iter()
            .find(|p| p["pid"].as_u64() == Some(u64::from(self.pid())))
            .cloned()
    }

    /// Channels open right now, all kinds together, per `sshshim status`
    /// (None if it does not answer).
    pub fn open_channels(&self) -> Option<u64> {
        let s = self.status_json()?;
        Some(
            s["channels"]
                .as_object()?
                .values()
                .filter_map(serde_json::Value::as_u64)
                .sum(),
        )
    }
}

/// An ssh_config file with one Host alias for an SSH server on
/// 127.0.0.1:PORT, reached through an OpenSSH ControlMaster the way sshpyk
/// asks for (`ControlMaster auto`, `ControlPath`, `ControlPersist`), with
/// the test's key and no agent. Dropping it stops the master.
pub struct MasterAlias {
    /// The ssh_config file.
    config: PathBuf,
    /// The Host alias.
    alias: String,
}

impl TestEnv {
    /// Writes `ssh_config-ALIAS` for `alias` -> 127.0.0.1:`port` (see
    /// [`MasterAlias`]). The control socket lives in the test directory.
    pub fn master_alias(&self, alias: &str, port: u16) -> MasterAlias {
        let d = self.dir().display();
        let block = format!(
            "Host {alias}\n\
             \x20 HostName {LOCALHOST}\n\
             \x20 Port {port}\n\
             \x20 User {user}\n\
             \x20 IdentityFile {key}\n\
             \x20 IdentitiesOnly yes\n\
             \x20 IdentityAgent none\n\
             \x20 BatchMode yes\n\
             \x20 StrictHostKeyChecking no\n\
             \x20 UserKnownHostsFile {d}/client_known_hosts_{port}\n\
             \x20 LogLevel ERROR\n\
             \x20 ControlMaster auto\n\
             \x20 ControlPath {d}/cm-{alias}\n\
             \x20 ControlPersist 5m\n\
             \x20 ConnectTimeout 10\n",
            user = self.user(),
            key = self.user_key().display(),
        );
        let config = self.path(&format!("ssh_config-{alias}"));
        fs::write(&config, block).expect("write ssh_config");
        MasterAlias {
            config,
            alias: alias.to_string(),
        }
    }
}

impl MasterAlias {
    /// The ssh_config file (for `ssh -F`).
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The Host alias.
    pub fn alias(&self) -> &str {
        &self.alias
    }

    /// `ssh -F CONFIG ALIAS ARGS...` (no agent).
    pub fn ssh(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&self.config)
            .arg(&self.alias)
            .args(args)
            .env_remove("SSH_AUTH_SOCK");
        c
    }

    /// `ssh -F CONFIG -O OP ALIAS`, bounded.
    fn control(&self, op: &str) -> Output {
        let mut c = Command::new("ssh");
        c.arg("-F")
            .arg(&self.config)
            .args(["-O", op])
            .arg(&self.alias)
            .env_remove("SSH_AUTH_SOCK");
        run_with_timeout(&mut c, b"", Duration::from_secs(20))
    }

    /// PID of the running master, from `ssh -O check`.
    pub fn master_pid(&self) -> Option<u32> {
        let out = self.control("check");
        let text = stderr_text(&out);
        let rest = text.split("(pid=").nth(1)?;
        rest.split(')').next()?.trim().parse().ok()
    }

    /// Starts the master (as sshpyk's first command does) and returns its PID.
    pub fn start(&self) -> u32 {
        let out = run(&mut self.ssh(&["true"]));
        assert_success(&out, &format!("first ssh to {}", self.alias));
        self.master_pid()
            .unwrap_or_else(|| panic!("no ControlMaster for {} after a first ssh", self.alias))
    }
}

impl Drop for MasterAlias {
    /// Stops the master (`-O exit`, then SIGKILL if it is still there).
    fn drop(&mut self) {
        let pid = self.master_pid();
        let _ = self.control("exit");
        if let Some(pid) = pid {
            thread::sleep(Duration::from_millis(100));
            if Path::new(&format!("/proc/{pid}")).exists() {
                send_signal(&[pid], "KILL");
            }
        }
    }
}

/// A [`pty_drive`] script for an interactive shell started at 24x80: run
/// a command, check the size, resize to 40x120, check again, `exit 3`.
pub const SHELL_RESIZE_EXIT_3: &[&str] = &[
    "send:echo MARK$((40+2))\\n",
    "expect:MARK42",
    "send:stty size\\n",
    "expect:24 80",
    "resize:40:120",
    "send:stty size\\n",
    "expect:40 120",
    "send:exit 3\\n",
    "wait",
];

/// Runs tests/tools/pty_driver.py with `steps` around `cmd`; returns its stdout.
pub fn pty_drive(rows: u16, cols: u16, steps: &[&str], cmd: Command) -> String {
    let mut c = Command::new("python3");
    c.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/tools/pty_driver.py"
    ))
    .arg(rows.to_string())
    .arg(cols.to_string())
    .args(steps)
    .arg("--")
    .arg(cmd.get_program())
    .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = run_with_timeout(&mut c, b"", Duration::from_secs(60));
    assert_success(&out, &format!("pty driver {steps:?}"));
    stdout_text(&out)
}

//! Bounded command runs: output captured while a process runs
//! ([`Capture`]), runs that kill what overstays ([`run_with_timeout`]),
//! and output assertions and differential comparison ([`compare_ports`]).

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{DEFAULT_TIMEOUT, SHOW_MAX, TestEnv, exit_code, truncate, wait_child};

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

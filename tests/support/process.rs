//! Processes: exit codes, signals, bounded waits, finding and killing
//! process trees, resource statistics from /proc, and shell lines.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Exit code of a process, or 128+signal when it was killed by a signal.
pub fn exit_code(status: &ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
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
pub(super) fn descendants(root: u32) -> Vec<u32> {
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
pub fn pids_with_env(entry: &str) -> Vec<u32> {
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
pub(super) fn stop_and_kill(initial: &[u32], more: impl Fn() -> Vec<u32>) {
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

/// The command line of `pid` as its arguments, if the process exists.
pub(super) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
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

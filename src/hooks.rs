//! User event hooks: a shell command run when a profile changes state
//! (`--on-event`), rate-limited per (profile, event) so a flapping
//! connection cannot fork a storm of processes.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default minimum interval between two runs of a hook for the same (profile, event).
const DEFAULT_HOOK_INTERVAL: Duration = Duration::from_secs(60);

use crate::stats::unix_now;

/// Rate-limit bookkeeping for one (profile, event).
struct HookSlot {
    /// When the hook last actually ran for this key.
    last_sent: Instant,
    /// Emits swallowed since then.
    suppressed: u64,
}

/// Runs a user command on events, rate-limited per (profile, event).
pub struct EventHook {
    /// Shell command, run as `sh -c CMD`.
    cmd: String,
    /// Minimum time between two runs for the same (profile, event).
    min_interval: Duration,
    /// Last run and suppressed count per (profile, event).
    slots: Mutex<HashMap<(String, String), HookSlot>>,
}

impl EventHook {
    /// A hook that runs `cmd` at most once a minute per (profile, event).
    pub fn new(cmd: String) -> Self {
        Self::with_min_interval(cmd, DEFAULT_HOOK_INTERVAL)
    }

    /// A hook with a custom minimum interval per (profile, event).
    pub fn with_min_interval(cmd: String, every: Duration) -> Self {
        Self {
            cmd,
            min_interval: every,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `sh -c CMD` detached with SSHSHIM_EVENT, SSHSHIM_PROFILE,
    /// SSHSHIM_REASON and SSHSHIM_TIME (unix seconds) set, unless the same
    /// (profile, event) ran less than the minimum interval ago; suppressed
    /// emits are counted and the next run gets SSHSHIM_SUPPRESSED=n.
    /// Never blocks: the child is reaped in the background.
    pub fn emit(&self, profile: &str, event: &str, reason: &str) {
        let suppressed = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match slots.get_mut(&(profile.to_string(), event.to_string())) {
                Some(slot) if now.duration_since(slot.last_sent) < self.min_interval => {
                    slot.suppressed += 1;
                    return;
                }
                Some(slot) => {
                    slot.last_sent = now;
                    std::mem::take(&mut slot.suppressed)
                }
                None => {
                    slots.insert(
                        (profile.to_string(), event.to_string()),
                        HookSlot {
                            last_sent: now,
                            suppressed: 0,
                        },
                    );
                    0
                }
            }
        };
        // Values travel in the environment, never interpolated into the
        // command, so a hostile reason string cannot inject shell code. NULs
        // are stripped because the OS would reject them and drop the event.
        let strip = |s: &str| s.replace('\0', "");
        let mut env = vec![
            ("SSHSHIM_EVENT", strip(event)),
            ("SSHSHIM_PROFILE", strip(profile)),
            ("SSHSHIM_REASON", strip(reason)),
            ("SSHSHIM_TIME", unix_now().to_string()),
        ];
        if suppressed > 0 {
            env.push(("SSHSHIM_SUPPRESSED", suppressed.to_string()));
        }
        if let Err(e) = self.spawn(&env) {
            tracing::warn!(event, profile, "cannot run event hook: {e}");
        }
    }

    /// Starts the command and arranges for it to be reaped.
    fn spawn(&self, env: &[(&str, String)]) -> io::Result<()> {
        // Hook output goes to our stderr so stdout stays clean for sshshim's
        // own machine-readable output.
        let stdout = || -> io::Result<std::process::Stdio> {
            use std::os::fd::AsFd as _;
            Ok(io::stderr().as_fd().try_clone_to_owned()?.into())
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let _enter = handle.enter();
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg("-c")
                    .arg(&self.cmd)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdin(std::process::Stdio::null())
                    .stdout(stdout()?)
                    .stderr(std::process::Stdio::inherit())
                    // Own process group: a Ctrl-C aimed at sshshim must not
                    // kill a hook reporting that very shutdown.
                    .process_group(0);
                let mut child = cmd.spawn()?;
                handle.spawn(async move {
                    if let Ok(st) = child.wait().await
                        && !st.success()
                    {
                        tracing::debug!("event hook exited with {st}");
                    }
                });
            }
            Err(_) => {
                // Outside a runtime (e.g. CLI paths): a thread reaps instead.
                use std::os::unix::process::CommandExt as _;
                let mut child = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&self.cmd)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdin(std::process::Stdio::null())
                    .stdout(stdout()?)
                    .stderr(std::process::Stdio::inherit())
                    .process_group(0)
                    .spawn()?;
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Waits until `path` has at least `n` lines (or 5 s pass), returning them.
    async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
        let mut lines = Vec::new();
        for _ in 0..500 {
            lines = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect();
            if lines.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lines
    }

    /// Duplicate events are suppressed, counted, and reported on the next run.
    #[tokio::test]
    async fn event_hook_rate_limits() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("events");
        let cmd = format!(
            "printf '%s|%s|%s|%s|%s\\n' \"$SSHSHIM_EVENT\" \"$SSHSHIM_PROFILE\" \"$SSHSHIM_REASON\" \
             \"${{SSHSHIM_SUPPRESSED:-0}}\" \"$SSHSHIM_TIME\" >> '{}'",
            out.display()
        );
        let hook = EventHook::with_min_interval(cmd, Duration::from_millis(300));
        hook.emit("work", "down", "reset; $(touch /tmp/x)");
        hook.emit("work", "down", "again");
        hook.emit("work", "up", "ok");
        let mut lines = wait_lines(&out, 2).await;
        // Give a wrongly fired duplicate time to show up before asserting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        lines = wait_lines(&out, lines.len()).await;
        lines.sort();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("down|work|reset; $(touch /tmp/x)|0|"),
            "{lines:?}"
        );
        assert!(lines[1].starts_with("up|work|ok|0|"), "{lines:?}");
        let t: u64 = lines[0].rsplit('|').next().unwrap().parse().unwrap();
        assert!(t.abs_diff(unix_now()) < 60);

        // After the interval the next one fires and reports the suppressed count.
        tokio::time::sleep(Duration::from_millis(350)).await;
        hook.emit("work", "down", "third");
        let lines = wait_lines(&out, 3).await;
        assert!(
            lines.iter().any(|l| l.starts_with("down|work|third|1|")),
            "{lines:?}"
        );
    }
}

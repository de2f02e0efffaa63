//! [`Sshd`]: a private OpenSSH server on loopback, and the processes of
//! its sessions.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::process::{cmdline, descendants, pids_with_env, stop_and_kill};
use super::{Capture, LOCALHOST, SHOW_MAX, TestEnv, free_port, truncate};

/// Path of the OpenSSH server binary used as the upstream.
pub const SSHD_BIN: &str = "/usr/sbin/sshd";
/// How long to wait for sshd to print its banner.
const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(10);

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
            // The remote helper of `--resume` caches itself (and its
            // sockets) in the test's own directory, not the real home.
            format!(
                "SetEnv {} PYENV_REHASH_TIMEOUT=2 no_rehash=1 XDG_CACHE_HOME={d}/remote-cache",
                self.marker
            ),
        ]);
        // A test may name its own sftp server (sshd refuses two lines).
        if !self.extra.iter().any(|l| l.starts_with("Subsystem sftp")) {
            cfg.push("Subsystem sftp internal-sftp".into());
        }
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

//! The shim under test: [`ShimBuilder`] and [`Shim`] (`sshshim up`),
//! [`Rig`] (sshd and shim together), and the `sshshim` subcommands tests
//! run beside it (status, control socket).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::Duration;

use super::{
    Capture, LOCALHOST, SHOW_MAX, Sshd, TestEnv, compare_ports, exit_code, run_with_timeout,
    send_signal, stderr_text, stdout_text, truncate, wait_child,
};

/// How long to wait for the shim's "listening on" line.
const SHIM_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Prefix of the readiness line the shim prints on stdout.
const SHIM_READY_PREFIX: &str = "sshshim: listening on ";

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
    /// The executable (default: the one cargo built).
    binary: PathBuf,
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
            binary: PathBuf::from(env!("CARGO_BIN_EXE_sshshim")),
        }
    }

    /// Runs another copy of sshshim (e.g. one without the remote helper
    /// beside it).
    pub fn binary(mut self, path: impl AsRef<Path>) -> Self {
        self.binary = path.as_ref().to_path_buf();
        self
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
        let mut c = Command::new(&self.binary);
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
        c.args(&self.args);
        // scripts/test.sh runs the differential suites again with every
        // session resumable (issue 20: clients must not tell the difference).
        if self.default_args
            && std::env::var_os("SSHSHIM_TEST_RESUME").is_some()
            && !self.args.iter().any(|a| a == "--resume")
        {
            c.arg("--resume");
        }
        c.env("XDG_STATE_HOME", e.state_dir())
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
        let cmd = self.command();
        let desc = format!("{cmd:?}");
        let resumable = cmd.get_args().any(|a| a == "--resume");
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
            resumable,
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
    /// Started with `--resume` (sessions run under the remote helper).
    resumable: bool,
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

impl Shim {
    /// Whether the shim runs its sessions under the remote helper
    /// (`--resume`, also from `SSHSHIM_TEST_RESUME`).
    pub fn resumable(&self) -> bool {
        self.resumable
    }

    /// Output received by the resumable sessions sshshim holds, per
    /// `sshshim status` (None if it does not answer).
    pub fn held_output_bytes(&self) -> Option<u64> {
        let st = self.status_json()?;
        Some(
            st["resume"]["held_sessions"]
                .as_array()?
                .iter()
                .filter_map(|h| h["output_bytes"].as_u64())
                .sum(),
        )
    }

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

/// A fault proxy in front of `sshd`, and a shim builder that connects
/// through it (with a known_hosts entry for the proxy's port) and logs at
/// debug level, for the fault tests.
pub fn through_proxy(env: &TestEnv, sshd: &Sshd) -> (super::FaultProxy, ShimBuilder) {
    let proxy = super::FaultProxy::start(sshd.port());
    let kh = env.path(&format!("kh_proxy_{}", proxy.port()));
    fs::write(
        &kh,
        format!("[127.0.0.1]:{} {}\n", proxy.port(), env.host_key_line()),
    )
    .unwrap();
    let builder = env
        .shim_builder(proxy.port())
        .known_hosts(&kh)
        .env("RUST_LOG", "sshshim=debug");
    (proxy, builder)
}

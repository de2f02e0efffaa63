//! [`TestEnv`]: a throw-away directory with keys and config files, and the
//! client command builders (ssh, scp, sftp, rsync, ssh through a mux socket).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{LOCALHOST, Shim, ShimBuilder, Sshd, current_user, free_port, run_with_timeout};

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

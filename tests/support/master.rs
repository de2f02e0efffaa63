//! [`MasterAlias`]: an ssh_config Host alias reached through an OpenSSH
//! ControlMaster, the way sshpyk sets one up.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use super::{LOCALHOST, TestEnv, assert_success, run, run_with_timeout, send_signal, stderr_text};

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

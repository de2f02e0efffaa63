//! [`Agent`]: a private ssh-agent holding the test's keys, and key
//! fingerprints.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{TestEnv, assert_success, run, run_with_timeout, stdout_text};

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

//! Interactive sessions in a pseudo-terminal, driven by
//! tests/tools/pty_driver.py.

use std::process::Command;
use std::time::Duration;

use super::{assert_success, run_with_timeout, stdout_text};

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

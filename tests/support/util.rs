//! Small utilities: the current user, text truncation for panic messages,
//! hashes and deterministic test data, and polling until a condition holds.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use super::run_with_timeout;

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

/// Polls `f` every 50 ms until it is true; panics after `within`.
pub fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

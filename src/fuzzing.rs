//! Shared pieces of the parsers' property tests (compiled for tests only;
//! `tests/fuzz_parsers.rs` includes this file too): how many cases to run,
//! a time bound per input, and the checks every parser must pass.
//!
//! The property for every parser we own: no panic, no hang (each call
//! returns within [`BUDGET`]), and an error is a message (non-empty text).
//! CI runs [`cases`] cases per property (256 unless `SSHSHIM_FUZZ_CASES`
//! says otherwise); `scripts/fuzz.sh` runs many more.

#![allow(dead_code)] // Each includer uses a different subset.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::Duration;

use proptest::prelude::*;

/// Longest one parser call may take. Real inputs parse in microseconds;
/// a call near this bound has super-linear time or loops.
pub const BUDGET: Duration = Duration::from_secs(1);

/// Cases per property: `SSHSHIM_FUZZ_CASES`, else 256 (seconds in CI).
pub fn cases() -> u32 {
    std::env::var("SSHSHIM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(256)
}

/// The proptest configuration of every fuzz property: [`cases`] cases, and
/// no regression files (a failure found is kept as a regular test instead).
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs `f` on its own thread and returns its result; fails the property
/// when `f` panics (with `f`'s own panic) or takes longer than [`BUDGET`].
/// A hung call is left running on its thread: the test fails anyway.
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(BUDGET) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within {BUDGET:?} (a hang or super-linear time)")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("{what}: worker thread vanished"),
    }
}

/// Fails unless `e` is a message a person can read: non-empty after trimming.
pub fn is_message(what: &str, e: &str) {
    assert!(
        !e.trim().is_empty(),
        "{what}: an error without a message: {e:?}"
    );
}

/// Arbitrary text, biased towards what breaks parsers: any Unicode, NULs,
/// control characters, the separators our formats use, and long runs.
pub fn nasty_text(max: usize) -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => any::<char>().prop_map(String::from),
        4 => prop::sample::select(vec![
            ":", "@", "[", "]", "/", "*", "?", "!", ",", "|", "#", "%", "=", "\"", "'",
            "\\", "{", "}", "\n", "\r", "\r\n", "\t", " ", "\0", "~", "-", ".", "0",
            "65535", "65536", "99999999999999999999", "-1", "|1|", "::", "[::1]",
        ])
        .prop_map(str::to_owned),
        2 => "[a-z0-9]{1,8}",
        1 => (any::<char>(), 1usize..512).prop_map(|(c, n)| c.to_string().repeat(n)),
    ];
    prop::collection::vec(piece, 0..max).prop_map(|v| v.concat())
}

/// Arbitrary bytes, with the same bias as [`nasty_text`] plus invalid UTF-8.
pub fn nasty_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        nasty_text(max).prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..max * 4),
    ]
}

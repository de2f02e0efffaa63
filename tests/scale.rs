//! Scale: more sessions than sshd allows on one connection, and a byte-exact
//! regression guard for bulk transfers (correctness only; speed is judged by
//! scripts/bench.sh, never by timed tests).

mod support;

use std::thread;
use std::time::Duration;
use support::*;

#[test]
fn thirty_concurrent_sessions_past_max_sessions() {
    // sshd's default MaxSessions is 10 per connection.
    let rig = Rig::start_with(&["MaxSessions 10"], &[]);
    let workers: Vec<_> = (0..30)
        .map(|i| {
            let mut c = rig.shim.ssh(&[&format!("sleep 3; echo session-{i}")]);
            thread::spawn(move || run_with_timeout(&mut c, b"", Duration::from_secs(60)))
        })
        .collect();
    for (i, w) in workers.into_iter().enumerate() {
        let out = w.join().unwrap();
        assert_success(&out, &format!("session {i}"));
        assert_eq!(stdout_text(&out), format!("session-{i}\n"));
    }
    assert!(
        rig.shim
            .stderr_text()
            .contains("opened upstream connection"),
        "{}",
        rig.shim.stderr_text()
    );
}

#[test]
fn sixty_four_mib_round_trip_is_byte_exact() {
    let rig = Rig::start();
    let data = pseudo_random_bytes(64 << 20, 64);
    let out = run_with_timeout(&mut rig.shim.ssh(&["cat"]), &data, Duration::from_secs(120));
    assert_success(&out, "cat 64 MiB");
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(sha256_hex(&out.stdout), sha256_hex(&data));
}

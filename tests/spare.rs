//! The spare session channel: a session opened in advance on each upstream
//! connection, taken by the next local session. Correctness only (the
//! round trip it saves is measured by scripts/bench.sh): same output, exit
//! codes and pty behaviour as sshd, dead spares replaced without the client
//! noticing, and an idle policy on the server never turned into a loop.

mod support;

use std::time::Duration;
use support::*;

#[test]
fn sessions_on_spares_behave_as_against_sshd() {
    let rig = Rig::start();
    // Back to back, so most of them take a spare opened by the one before.
    for i in 0..6 {
        rig.compare(&[&format!("echo out-{i}; echo err-{i} >&2; exit {i}")]);
    }
    let out = run(&mut rig.ssh_shim(&["-tt", "tty >/dev/null && echo has-a-tty"]));
    assert_success(&out, "pty session on a spare");
    assert!(stdout_text(&out).contains("has-a-tty"), "{out:?}");
    // The spare is not a session of anybody's: status counts none.
    let st = eventually(Duration::from_secs(10), "no session channels left", || {
        shim_status(&rig.env).is_some_and(|s| {
            s["channels"]
                .get("session")
                .is_none_or(|n| n.as_u64() == Some(0))
        })
    });
    eprintln!("sessions settled after {st:?}");
}

#[test]
fn a_refused_spare_is_not_an_error() {
    // One session per connection: the spare takes the only slot, so every
    // replacement is refused while a session runs, and a second concurrent
    // session needs another upstream connection.
    let rig = Rig::start_with(&["MaxSessions 1"], &[]);
    for i in 0..3 {
        rig.compare(&[&format!("echo seq-{i}")]);
    }
    let slow = {
        let mut c = rig.ssh_shim(&["sleep 2; echo first"]);
        std::thread::spawn(move || run_with_timeout(&mut c, b"", Duration::from_secs(60)))
    };
    let out = run(&mut rig.ssh_shim(&["echo second"]));
    assert_success(&out, "a session while the only slot is taken");
    assert_eq!(stdout_text(&out), "second\n");
    let first = slow.join().unwrap();
    assert_success(&first, "the first session");
    assert_eq!(stdout_text(&first), "first\n");
}

/// Whether this sshd closes idle sessions under `ChannelTimeout` (OpenSSH
/// 9.2 accepts the option but does not enforce it).
fn enforces_channel_timeout(rig: &Rig) -> bool {
    let out = run(&mut rig.ssh_direct(&["sleep 3; echo survived"]));
    !stdout_text(&out).contains("survived")
}

#[test]
fn server_closing_idle_spares_is_not_a_loop() {
    // sshd closes sessions idle for 1 s: every spare dies before it is used.
    let rig = Rig::start_with(&["ChannelTimeout session=1s"], &[]);
    if !enforces_channel_timeout(&rig) {
        eprintln!(
            "SKIPPED: this sshd does not enforce ChannelTimeout (OpenSSH 9.2 does not), \
             so no spare dies on the server side here"
        );
        return;
    }
    for i in 0..4 {
        // Let the server's idle timeout close the spare (this is the fault
        // being injected, not a wait for readiness).
        std::thread::sleep(Duration::from_millis(2500));
        let out = run(&mut rig.ssh_shim(&[&format!("echo fresh-{i}")]));
        assert_success(&out, "session after the spare died");
        assert_eq!(stdout_text(&out), format!("fresh-{i}\n"));
    }
    let log = rig.shim.stderr_text();
    assert!(
        log.contains("no longer keeping one"),
        "the shim should stop keeping spares after repeated closes:\n{log}"
    );
    assert_eq!(log.matches("no longer keeping one").count(), 1, "{log}");
}

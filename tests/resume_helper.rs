//! The remote helper of resumable sessions (`sshshim remote-helper`),
//! driven directly over its stdin/stdout with the wire protocol: no SSH
//! needed. Killing a relay process is what a dropped connection does to
//! it on the server.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use sshshim::resume::wire::{self, Exit, Frame, PtySpec, Secret, SessionId, StartSpec, Stream};

mod support;
use support::{HelperEnv, Peer, hex, wait_until};

/// Attaches to session `id` and resumes it: the relay and how much
/// input the helper has.
fn resume(
    env: &HelperEnv,
    id: &SessionId,
    secret: &Secret,
    have_out: u64,
    have_err: u64,
) -> (Peer, u64) {
    match env.attach(id, secret, have_out, have_err) {
        (p, Frame::Resumed { have_in }) => (p, have_in),
        (_, f) => panic!("expected Resumed, got {f:?}"),
    }
}

/// What the client side keeps of one session's output.
#[derive(Default)]
struct Got {
    out: Vec<u8>,
    err: Vec<u8>,
    eof: [bool; 2],
    exit: Option<Exit>,
}

impl Got {
    /// Takes one frame; acks data when `ack`. Duplicates or gaps fail.
    fn take(&mut self, p: &mut Peer, f: Frame, ack: bool) {
        match f {
            Frame::Data {
                stream,
                offset,
                data,
            } => {
                let buf = match stream {
                    Stream::Stdout => &mut self.out,
                    Stream::Stderr => &mut self.err,
                    Stream::Stdin => panic!("stdin data from the helper"),
                };
                assert_eq!(offset, buf.len() as u64, "{stream:?} data out of place");
                buf.extend_from_slice(&data);
                let upto = buf.len() as u64;
                if ack {
                    p.send(&Frame::Ack { stream, upto });
                }
            }
            Frame::Eof { stream, at } => {
                let (i, len) = match stream {
                    Stream::Stdout => (0, self.out.len()),
                    _ => (1, self.err.len()),
                };
                assert_eq!(at, len as u64, "{stream:?} EOF");
                self.eof[i] = true;
            }
            Frame::Exit(e) => {
                assert_eq!(self.eof, [true, true], "exit before the EOFs");
                self.exit = Some(e);
            }
            Frame::Ack { .. } => {}
            f => panic!("unexpected {f:?}"),
        }
    }

    /// Reads frames until `done(self)`.
    fn until(&mut self, p: &mut Peer, ack: bool, done: impl Fn(&Got) -> bool) {
        while !done(self) {
            let f = p.recv();
            self.take(p, f, ack);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

fn spec(cmd: &str, secret: &Secret) -> StartSpec {
    StartSpec {
        secret: secret.clone(),
        owner: [1; 16],
        run: [2; 16],
        command: wire::Command::Exec(cmd.as_bytes().to_vec()),
        pty: None,
        timeout_secs: 20,
        buffer: 4 << 20,
    }
}

/// Whether process `pid` is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

/// The command's first output line: the pid it printed.
fn first_line_pid(p: &mut Peer, got: &mut Got) -> u32 {
    got.until(p, true, |g| g.out.contains(&b'\n'));
    let text = got.text();
    text.lines().next().unwrap().trim().parse().expect("a pid")
}

const SIXTY: &str = "for i in $(seq 1 60); do echo \"line $i\"; sleep 0.025; done; exit 7";

fn sixty_lines() -> String {
    (1..=60).map(|i| format!("line {i}\n")).collect()
}

#[test]
fn output_survives_a_dropped_relay_byte_exact() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (mut p, id) = env.start(&spec(SIXTY, &secret));
    let mut got = Got::default();
    // Acknowledge only part of it, so the replay starts from what we have.
    got.until(&mut p, false, |g| g.text().lines().count() >= 10);
    p.kill();
    // The daemon holds the session; its socket stays.
    assert!(env.socket(&id).exists());
    let (mut p, have_in) = resume(&env, &id, &secret, got.out.len() as u64, 0);
    assert_eq!(have_in, 0);
    got.until(&mut p, true, |g| g.exit.is_some());
    assert_eq!(got.text(), sixty_lines());
    assert!(got.err.is_empty());
    assert_eq!(got.exit, Some(Exit::Status(7)));
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
    p.wait_exit();
}

#[test]
fn a_wrong_secret_is_refused_and_the_session_stays_resumable() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (p, id) = env.start(&spec("sleep 0.5; echo ok", &secret));
    p.kill();
    let mut bad = env.relay(&["attach", &hex(&id)]);
    assert!(matches!(bad.recv(), Frame::Hello { fresh: false, .. }));
    bad.send(&Frame::Resume {
        secret: Secret::random(),
        have_out: 0,
        have_err: 0,
    });
    assert_eq!(bad.recv(), Frame::Refused("wrong secret".into()));
    bad.wait_exit();
    let (mut p, _) = resume(&env, &id, &secret, 0, 0);
    let mut got = Got::default();
    got.until(&mut p, true, |g| g.exit.is_some());
    assert_eq!(got.text(), "ok\n");
    assert_eq!(got.exit, Some(Exit::Status(0)));
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn attaching_to_an_ended_session_is_refused_in_the_protocol() {
    let env = HelperEnv::new();
    let mut p = env.relay(&["attach", &"ab".repeat(16)]);
    assert_eq!(
        p.recv(),
        Frame::Refused("no such session (it ended)".into())
    );
    let st = p.child.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

#[test]
fn stdin_is_replayed_and_each_byte_seen_once() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let (mut p, id) = env.start(&spec("sha256sum", &secret));
    // Sent, never acknowledged: the relay dies with it in flight.
    p.send(&Frame::Data {
        stream: Stream::Stdin,
        offset: 0,
        data: Bytes::copy_from_slice(&data[..200_000]),
    });
    p.kill();
    let (mut p, have_in) = resume(&env, &id, &secret, 0, 0);
    assert!(have_in <= 200_000, "{have_in}");
    // Everything again from 0: what the helper has is not written twice.
    for (i, chunk) in data.chunks(wire::CHUNK).enumerate() {
        p.send(&Frame::Data {
            stream: Stream::Stdin,
            offset: (i * wire::CHUNK) as u64,
            data: Bytes::copy_from_slice(chunk),
        });
    }
    p.send(&Frame::Eof {
        stream: Stream::Stdin,
        at: data.len() as u64,
    });
    let mut got = Got::default();
    got.until(&mut p, true, |g| g.exit.is_some());
    let want = format!("{}  -\n", hex(&Sha256::digest(&data)));
    assert_eq!(got.text(), want);
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn a_session_nobody_resumes_ends_after_its_timeout() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let mut s = spec("echo $$; exec sleep 60", &secret);
    s.timeout_secs = 1;
    let (mut p, id) = env.start(&s);
    let mut got = Got::default();
    let pid = first_line_pid(&mut p, &mut got);
    p.kill();
    assert!(!gone(pid), "the command runs on while the session is held");
    env.wait_no_socket(&id);
    assert!(
        wait_until(|| gone(pid)),
        "the command {pid} was left behind"
    );
    let mut late = env.relay(&["attach", &hex(&id)]);
    assert_eq!(
        late.recv(),
        Frame::Refused("no such session (it ended)".into())
    );
}

#[test]
fn hangup_ends_the_command() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (mut p, id) = env.start(&spec("echo $$; exec sleep 60", &secret));
    let mut got = Got::default();
    let pid = first_line_pid(&mut p, &mut got);
    p.send(&Frame::Hangup);
    env.wait_no_socket(&id);
    assert!(
        wait_until(|| gone(pid)),
        "the command {pid} was left behind"
    );
    p.wait_exit();
}

#[test]
fn signals_reach_the_command_and_come_back_as_its_exit() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (mut p, id) = env.start(&spec("echo $$; exec sleep 60", &secret));
    let mut got = Got::default();
    first_line_pid(&mut p, &mut got);
    p.send(&Frame::Signal("TERM".into()));
    got.until(&mut p, true, |g| g.exit.is_some());
    assert_eq!(
        got.exit,
        Some(Exit::Signal {
            name: "TERM".into(),
            core_dumped: false
        })
    );
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn reap_ends_the_previous_runs_sessions_of_its_owner_only() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let mine = spec("echo $$; exec sleep 60", &secret);
    let theirs = StartSpec {
        owner: [9; 16],
        ..mine.clone()
    };
    let (mut a, a_id) = env.start(&mine);
    let (mut b, b_id) = env.start(&theirs);
    let (mut ga, mut gb) = (Got::default(), Got::default());
    let a_pid = first_line_pid(&mut a, &mut ga);
    let b_pid = first_line_pid(&mut b, &mut gb);
    a.kill();
    let out = env
        .helper(&["reap", &hex(&mine.owner), &hex(&[3; 16])])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n");
    env.wait_no_socket(&a_id);
    assert!(wait_until(|| gone(a_pid)), "reaped command left behind");
    // The other owner's session, still attached, goes on.
    assert!(env.socket(&b_id).exists());
    assert!(!gone(b_pid));
    // Its own run is not reaped either.
    let out = env
        .helper(&["reap", &hex(&[9; 16]), &hex(&mine.run)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    b.send(&Frame::Signal("KILL".into()));
    gb.until(&mut b, true, |g| g.exit.is_some());
    assert_eq!(
        gb.exit,
        Some(Exit::Signal {
            name: "KILL".into(),
            core_dumped: false
        })
    );
    b.send(&Frame::Done);
    env.wait_no_socket(&b_id);
}

#[test]
fn a_pty_session_has_a_terminal_its_size_and_resizes() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let mut s = spec(
        "tty; echo \"SSH_TTY=$SSH_TTY TERM=$TERM\"; stty size; read x; stty size",
        &secret,
    );
    s.pty = Some(PtySpec {
        term: "xterm-test".into(),
        cols: 100,
        rows: 30,
        px: 0,
        py: 0,
        // ECHO off, ONLCR on.
        modes: vec![(53, 0), (72, 1)],
    });
    let (mut p, id) = env.start(&s);
    let mut got = Got::default();
    got.until(&mut p, true, |g| g.text().contains("30 100"));
    p.send(&Frame::Window {
        cols: 120,
        rows: 40,
        px: 0,
        py: 0,
    });
    p.send(&Frame::Data {
        stream: Stream::Stdin,
        offset: 0,
        data: Bytes::from_static(b"go\n"),
    });
    got.until(&mut p, true, |g| g.exit.is_some());
    let text = got.text();
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{text:?}");
    assert_eq!(lines[1], format!("SSH_TTY={} TERM=xterm-test", lines[0]));
    assert_eq!(lines[2], "30 100");
    // ECHO was off: "go" is not echoed.
    assert_eq!(lines[3], "40 120", "{text:?}");
    assert!(got.err.is_empty());
    assert_eq!(got.exit, Some(Exit::Status(0)));
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn version_names_the_sftp_subsystem_of_the_sshd_above() {
    let env = HelperEnv::new();
    let out = env.helper(&["version"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let first = text.lines().next().unwrap_or("");
    assert_eq!(
        first,
        format!(
            "sshshim-remote-helper {} {}",
            env!("CARGO_PKG_VERSION"),
            wire::VERSION
        )
    );
    // Under a parent that looks like `sshd -f CFG`: its configuration.
    for (line, want) in [
        (
            "Subsystem sftp /usr/lib/openssh/sftp-server -e",
            Some("subsystem sftp /usr/lib/openssh/sftp-server -e"),
        ),
        (
            "Subsystem sftp internal-sftp",
            Some("subsystem sftp internal"),
        ),
        ("Subsystem other /bin/other", None),
    ] {
        let cfg = env.home().join("sshd_config");
        std::fs::write(&cfg, format!("Port 22\n{line}\n")).unwrap();
        let out = under_fake_sshd(&env, &cfg, "version");
        let text = String::from_utf8_lossy(&out).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&first), "{text}");
        let sub = lines.iter().find(|l| l.starts_with("subsystem ")).copied();
        assert_eq!(sub, want, "{line}: {text}");
    }
}

/// `remote-helper SUB` as the child of a bash whose command line reads
/// `sshd ... -f CFG` (as sshd's own does).
fn fake_sshd(env: &HelperEnv, cfg: &Path, sub: &str) -> Command {
    let helper = env!("CARGO_BIN_EXE_sshshim");
    let script = format!(
        "exec -a sshd bash -c '\"$0\" remote-helper {sub}; true' '{helper}' -f '{}'",
        cfg.display()
    );
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(script)
        .env("HOME", env.home())
        .env("XDG_CACHE_HOME", env.cache());
    c
}

/// Runs [`fake_sshd`] to its end: its stdout.
fn under_fake_sshd(env: &HelperEnv, cfg: &Path, sub: &str) -> Vec<u8> {
    let out = fake_sshd(env, cfg, sub).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    out.stdout
}

#[test]
fn subsystems_run_the_program_sshd_names_and_internal_sftp_is_refused() {
    let env = HelperEnv::new();
    let cfg = env.home().join("sshd_config");
    std::fs::write(
        &cfg,
        "Subsystem upper tr a-z A-Z\nSubsystem sftp internal-sftp\n",
    )
    .unwrap();
    let secret = Secret::random();
    let mut p = env.relay_with(fake_sshd(&env, &cfg, "start"));
    let id = env.hello(&mut p);
    let mut s = spec("", &secret);
    s.command = wire::Command::Subsystem("upper".into());
    p.send(&Frame::Start(Box::new(s.clone())));
    assert_eq!(p.recv(), Frame::Started);
    p.send(&Frame::Data {
        stream: Stream::Stdin,
        offset: 0,
        data: Bytes::from_static(b"hello\n"),
    });
    p.send(&Frame::Eof {
        stream: Stream::Stdin,
        at: 6,
    });
    let mut got = Got::default();
    got.until(&mut p, true, |g| g.exit.is_some());
    assert_eq!(got.text(), "HELLO\n");
    assert_eq!(got.exit, Some(Exit::Status(0)));
    p.send(&Frame::Done);
    env.wait_no_socket(&id);

    for (name, why) in [
        ("sftp", "internal-sftp"),
        ("nope", "names no subsystem nope"),
    ] {
        let mut p = env.relay_with(fake_sshd(&env, &cfg, "start"));
        let id = env.hello(&mut p);
        s.command = wire::Command::Subsystem(name.into());
        p.send(&Frame::Start(Box::new(s.clone())));
        match p.recv() {
            Frame::Refused(w) => assert!(w.contains(why), "{w}"),
            f => panic!("expected Refused, got {f:?}"),
        }
        env.wait_no_socket(&id);
        p.wait_exit();
    }
}

#[test]
fn a_full_buffer_stops_reading_the_command_until_acked() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    // 2 MiB out, then a word on stderr once stdout was all taken.
    let mut s = spec("head -c 2097152 /dev/zero; echo written >&2", &secret);
    s.buffer = 64 * 1024;
    let (mut p, id) = env.start(&s);
    let mut got = Got::default();
    // Nothing acknowledged: the helper holds at most its buffer (plus
    // one read), the pipe fills, the command blocks.
    got.until(&mut p, false, |g| g.out.len() >= 64 * 1024);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        if let Some(f) = p.recv_within(Duration::from_millis(50)) {
            got.take(&mut p, f, false);
        }
    }
    assert!(
        got.out.len() <= 64 * 1024 + wire::CHUNK,
        "read {} bytes past a 64 KiB buffer",
        got.out.len()
    );
    assert!(got.err.is_empty(), "the command was not held up");
    // Acknowledged: everything arrives.
    p.send(&Frame::Ack {
        stream: Stream::Stdout,
        upto: got.out.len() as u64,
    });
    got.until(&mut p, true, |g| g.exit.is_some());
    assert_eq!(got.out.len(), 2 << 20);
    assert!(got.out.iter().all(|b| *b == 0));
    assert_eq!(got.err, b"written\n");
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn a_resume_replaces_an_attachment_that_still_looks_alive() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (old, id) = env.start(&spec("read x; echo \"got $x\"", &secret));
    // The old relay still runs (a blackholed connection): the new one
    // takes over, and the old one is closed.
    let (mut p, have_in) = resume(&env, &id, &secret, 0, 0);
    assert_eq!(have_in, 0);
    old.wait_exit();
    p.send(&Frame::Data {
        stream: Stream::Stdin,
        offset: 0,
        data: Bytes::from_static(b"it\n"),
    });
    let mut got = Got::default();
    got.until(&mut p, true, |g| g.exit.is_some());
    assert_eq!(got.text(), "got it\n");
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn shell_is_a_login_shell_in_the_home_directory() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let mut s = spec("", &secret);
    s.command = wire::Command::Shell;
    let (mut p, id) = env.start(&s);
    p.send(&Frame::Data {
        stream: Stream::Stdin,
        offset: 0,
        data: Bytes::from_static(b"echo \"argv0=$0 pwd=$PWD\"; exit 3\n"),
    });
    p.send(&Frame::Eof {
        stream: Stream::Stdin,
        at: 33,
    });
    let mut got = Got::default();
    got.until(&mut p, true, |g| g.exit.is_some());
    let shell = String::from_utf8(
        Command::new("sh")
            .args(["-c", "getent passwd $(id -u) | cut -d: -f7"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let base = Path::new(shell.trim())
        .file_name()
        .map_or("sh".into(), |n| n.to_string_lossy().into_owned());
    let want = format!("argv0=-{base} pwd={}", env.home().display());
    assert!(
        got.text().contains(&want),
        "{:?} lacks {want:?}",
        got.text()
    );
    assert_eq!(got.exit, Some(Exit::Status(3)));
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn a_spec_on_the_command_line_starts_at_once_and_the_secret_follows() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let s = spec(
        "echo $$; read a; echo \"got $a\"; read b; echo \"and $b\"; exit 3",
        &secret,
    );
    // No frame sent yet: the command runs and its greeting comes at once.
    let mut p = env.relay(&["start", &s.to_arg()]);
    let id = env.hello(&mut p);
    assert_eq!(p.recv(), Frame::Started);
    let mut got = Got::default();
    let pid = first_line_pid(&mut p, &mut got);
    p.send(&Frame::Start(Box::new(s.clone())));
    let line = |at: u64, text: &'static [u8]| Frame::Data {
        stream: Stream::Stdin,
        offset: at,
        data: Bytes::from_static(text),
    };
    // Its answer shows the daemon read the secret (frames are in order).
    p.send(&line(0, b"hi\n"));
    got.until(&mut p, true, |g| g.text().contains("got hi\n"));
    p.kill();
    assert!(!gone(pid), "held once its secret arrived");
    let (mut p, have_in) = resume(&env, &id, &secret, got.out.len() as u64, 0);
    assert_eq!(have_in, 3);
    p.send(&line(3, b"yo\n"));
    got.until(&mut p, true, |g| g.exit.is_some());
    assert_eq!(got.text(), format!("{pid}\ngot hi\nand yo\n"));
    assert_eq!(got.exit, Some(Exit::Status(3)));
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn a_session_whose_secret_never_came_ends_with_its_relay() {
    let env = HelperEnv::new();
    let s = spec("echo $$; exec sleep 60", &Secret::random());
    let mut p = env.relay(&["start", &s.to_arg()]);
    let id = env.hello(&mut p);
    assert_eq!(p.recv(), Frame::Started);
    let mut got = Got::default();
    let pid = first_line_pid(&mut p, &mut got);
    p.kill();
    // Nobody could resume it (the zeros placeholder is no secret).
    env.wait_no_socket(&id);
    assert!(
        wait_until(|| gone(pid)),
        "the command {pid} was left behind"
    );
    let bad = env.helper(&["start", "not-a-spec"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a session spec"));
}

//! The remote helper's forwarded connections (issue 24), driven directly
//! over its stdin/stdout with the wire protocol against TCP servers on
//! 127.0.0.1 started here: no SSH needed. Killing a relay process is what
//! a dropped connection does to it on the server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use sshshim::resume::wire::{self, Frame, Secret, SessionId, StartSpec, Stream};

mod support;
use support::{HELPER_WAIT as WAIT, HelperEnv, Peer, hex};

/// Attaches to helper `id` and resumes it (its answer is checked).
fn resume(env: &HelperEnv, id: &SessionId, secret: &Secret) -> Peer {
    let (p, answer) = env.attach(id, secret, 0, 0);
    assert_eq!(answer, Frame::Resumed { have_in: 0 });
    p
}

/// What the client side keeps of one forwarded connection.
#[derive(Default, Debug)]
struct Got {
    started: bool,
    failed: Option<(u32, String)>,
    refused: Option<String>,
    resumed: Option<u64>,
    out: Vec<u8>,
    eof: bool,
    closed: bool,
    acked_in: u64,
}

/// The client side of every connection.
#[derive(Default)]
struct Client {
    conns: HashMap<u32, Got>,
    /// Acknowledge output as it arrives.
    ack: bool,
}

impl Client {
    fn acking() -> Client {
        Client {
            ack: true,
            ..Client::default()
        }
    }

    fn get(&self, c: u32) -> &Got {
        &self.conns[&c]
    }

    /// Takes one frame; duplicates of data or gaps fail.
    fn take(&mut self, p: &mut Peer) {
        let (c, f) = p.recv_conn();
        let g = self.conns.entry(c).or_default();
        match f {
            Frame::Started => g.started = true,
            Frame::OpenFailed { code, reason } => g.failed = Some((code, reason)),
            Frame::Refused(why) => g.refused = Some(why),
            Frame::Resumed { have_in } => g.resumed = Some(have_in),
            Frame::Data {
                stream: Stream::Stdout,
                offset,
                data,
            } => {
                assert_eq!(offset, g.out.len() as u64, "conn {c}: data out of place");
                assert!(!g.eof, "conn {c}: data after EOF");
                g.out.extend_from_slice(&data);
                if self.ack {
                    let upto = g.out.len() as u64;
                    p.conn(
                        c,
                        Frame::Ack {
                            stream: Stream::Stdout,
                            upto,
                        },
                    );
                }
            }
            Frame::Eof {
                stream: Stream::Stdout,
                at,
            } => {
                assert_eq!(at, g.out.len() as u64, "conn {c}: EOF");
                g.eof = true;
            }
            Frame::Ack {
                stream: Stream::Stdin,
                upto,
            } => {
                assert!(upto >= g.acked_in, "conn {c}: acks go forward");
                g.acked_in = upto;
            }
            Frame::Closed => {
                assert!(g.eof, "conn {c}: Closed before the EOF");
                g.closed = true;
            }
            f => panic!("conn {c}: unexpected {f:?}"),
        }
    }

    /// Reads frames until `done(self)`.
    fn until(&mut self, p: &mut Peer, done: impl Fn(&Client) -> bool) {
        while !done(self) {
            self.take(p);
        }
    }

    /// Reads frames until connection `c` satisfies `done`.
    fn until_conn(&mut self, p: &mut Peer, c: u32, done: impl Fn(&Got) -> bool) {
        self.until(p, |cl| cl.conns.get(&c).is_some_and(&done));
    }
}

fn spec(secret: &Secret) -> StartSpec {
    StartSpec {
        secret: secret.clone(),
        owner: [1; 16],
        run: [2; 16],
        command: wire::Command::Forwards,
        pty: None,
        timeout_secs: 20,
        buffer: 4 << 20,
    }
}

fn connect(port: u16) -> Frame {
    Frame::Connect {
        host: "127.0.0.1".into(),
        port: port.into(),
    }
}

fn data(offset: usize, bytes: &[u8]) -> Frame {
    Frame::Data {
        stream: Stream::Stdin,
        offset: offset as u64,
        data: Bytes::copy_from_slice(bytes),
    }
}

fn eof(at: usize) -> Frame {
    Frame::Eof {
        stream: Stream::Stdin,
        at: at as u64,
    }
}

/// Sends `bytes` from `from` as connection `c`'s input, in chunks.
fn upload(p: &mut Peer, c: u32, bytes: &[u8], from: usize) {
    let mut at = from;
    for chunk in bytes[from..].chunks(wire::CHUNK) {
        p.conn(c, data(at, chunk));
        at += chunk.len();
    }
}

/// A TCP server on 127.0.0.1 running `serve` for each connection on its
/// own thread; `serve`'s results come back on the receiver.
fn server<T: Send + 'static>(
    serve: impl Fn(TcpStream) -> T + Send + Sync + Clone + 'static,
) -> (u16, mpsc::Receiver<T>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let (serve, tx) = (serve.clone(), tx.clone());
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(WAIT * 2));
                let _ = tx.send(serve(s));
            });
        }
    });
    (port, rx)
}

/// Echoes until EOF, then half-closes: what it got.
fn echo(mut s: TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                all.extend_from_slice(&buf[..n]);
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    all
}

/// Reads to EOF: everything read.
fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

/// A port nobody listens on.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Deterministic test bytes.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) ^ (i >> 9)) as u8)
        .collect()
}

#[test]
fn data_both_ways_with_half_close_each_way() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (mut p, id) = env.start(&spec(&secret));
    let mut cl = Client::acking();

    // Client to target closes first: the echo goes on after our EOF.
    let (echo_port, echoed) = server(echo);
    p.conn(1, connect(echo_port));
    cl.until_conn(&mut p, 1, |g| g.started);
    let up = pattern(200_000, 1);
    upload(&mut p, 1, &up, 0);
    p.conn(1, eof(up.len()));
    cl.until_conn(&mut p, 1, |g| g.closed);
    assert_eq!(cl.get(1).out, up);
    assert_eq!(cl.get(1).acked_in, up.len() as u64);
    assert_eq!(echoed.recv_timeout(WAIT).unwrap(), up);
    p.conn(1, Frame::Done);

    // Target to client closes first: our data still reaches it.
    let (port, got) = server(|mut s: TcpStream| {
        s.write_all(b"banner\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        read_all(&mut s)
    });
    p.conn(2, connect(port));
    cl.until_conn(&mut p, 2, |g| g.eof);
    assert_eq!(cl.get(2).out, b"banner\n");
    assert!(!cl.get(2).closed, "our side is still open");
    p.conn(2, data(0, b"after your EOF"));
    p.conn(2, eof(14));
    cl.until_conn(&mut p, 2, |g| g.closed);
    assert_eq!(got.recv_timeout(WAIT).unwrap(), b"after your EOF");
    assert_eq!(cl.get(2).acked_in, 14);
    p.conn(2, Frame::Done);

    // A Hangup closes the target connection at once.
    let (port, got) = server(|mut s: TcpStream| read_all(&mut s));
    p.conn(3, connect(port));
    cl.until_conn(&mut p, 3, |g| g.started);
    p.conn(3, data(0, b"partial"));
    cl.until_conn(&mut p, 3, |g| g.acked_in == 7);
    p.conn(3, Frame::Hangup);
    assert_eq!(got.recv_timeout(WAIT).unwrap(), b"partial");

    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn failures_are_answered_as_sshd_answers_them() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (mut p, id) = env.start(&spec(&secret));
    let mut cl = Client::acking();
    p.conn(1, connect(closed_port()));
    cl.until_conn(&mut p, 1, |g| g.failed.is_some());
    assert_eq!(cl.get(1).failed, Some((2, "Connection refused".into())));
    p.conn(
        2,
        Frame::Connect {
            host: "127.0.0.1".into(),
            port: 70000,
        },
    );
    cl.until_conn(&mut p, 2, |g| g.failed.is_some());
    assert_eq!(cl.get(2).failed, Some((1, "open failed".into())));

    // A number still in use is refused; the open connection goes on.
    let (port, _echoed) = server(echo);
    p.conn(3, connect(port));
    cl.until_conn(&mut p, 3, |g| g.started);
    p.conn(3, connect(port));
    cl.until_conn(&mut p, 3, |g| g.failed.is_some());
    assert_eq!(cl.get(3).failed.as_ref().unwrap().0, 2);
    // Data for an unknown connection, data skipping ahead: refused.
    p.conn(9, data(0, b"x"));
    cl.until_conn(&mut p, 9, |g| g.refused.is_some());
    p.conn(3, data(5, b"gap"));
    cl.until_conn(&mut p, 3, |g| g.refused.is_some());
    // Nonsense at the top level is ignored; the helper still serves.
    p.send(&Frame::Window {
        cols: 1,
        rows: 1,
        px: 0,
        py: 0,
    });
    p.conn(4, connect(port));
    cl.until_conn(&mut p, 4, |g| g.started);
    p.conn(4, data(0, b"still here"));
    p.conn(4, eof(10));
    cl.until_conn(&mut p, 4, |g| g.closed);
    assert_eq!(cl.get(4).out, b"still here");
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn a_dropped_relay_loses_nothing_either_way() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let mut s = spec(&secret);
    // Smaller than the download: the helper stops reading until acked.
    s.buffer = 256 * 1024;
    let (mut p, id) = env.start(&s);
    let down = pattern(1 << 20, 7);
    let up = pattern(600_000, 3);
    let sent = down.clone();
    let (port, got) = server(move |mut st: TcpStream| {
        let mut w = st.try_clone().unwrap();
        let sent = sent.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let all = read_all(&mut st);
        writer.join().unwrap();
        all
    });
    let mut cl = Client::default();
    p.conn(5, connect(port));
    cl.until_conn(&mut p, 5, |g| g.started);
    upload(&mut p, 5, &up[..300_000], 0);
    cl.until_conn(&mut p, 5, |g| g.out.len() >= 200_000);
    // Part of it acknowledged: the replay starts from what we have.
    p.conn(
        5,
        Frame::Ack {
            stream: Stream::Stdout,
            upto: 100_000,
        },
    );
    p.kill();
    assert!(env.socket(&id).exists(), "the helper holds the connection");

    let mut p = resume(&env, &id, &secret);
    let have = cl.get(5).out.len() as u64;
    p.conn(
        5,
        Frame::Resume {
            secret: secret.clone(),
            have_out: have,
            have_err: 0,
        },
    );
    cl.until_conn(&mut p, 5, |g| g.resumed.is_some());
    let have_in = cl.get(5).resumed.unwrap();
    assert!(have_in <= 300_000, "{have_in}");
    // Everything again from 0: what the helper has is not written twice.
    cl.ack = true;
    upload(&mut p, 5, &up, 0);
    p.conn(5, eof(up.len()));
    cl.until_conn(&mut p, 5, |g| g.closed);
    assert!(cl.get(5).out == down, "the download arrived byte-exact");
    assert!(
        got.recv_timeout(WAIT).unwrap() == up,
        "the upload arrived byte-exact"
    );
    p.conn(5, Frame::Done);
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn resumes_need_the_secret_and_a_lost_answer_comes_again() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (mut p, id) = env.start(&spec(&secret));
    let (accepted, connected) = mpsc::channel();
    let (port, echoed) = server(move |s: TcpStream| {
        let _ = accepted.send(());
        echo(s)
    });
    p.conn(1, connect(port));
    connected.recv_timeout(WAIT).unwrap();
    // Gone before the answer could be read.
    p.kill();
    let mut bad = env.relay(&["attach", &hex(&id)]);
    assert!(matches!(bad.recv(), Frame::Hello { fresh: false, .. }));
    bad.send(&Frame::Resume {
        secret: Secret::random(),
        have_out: 0,
        have_err: 0,
    });
    assert_eq!(bad.recv(), Frame::Refused("wrong secret".into()));

    let mut p = resume(&env, &id, &secret);
    let mut cl = Client::acking();
    let resume = |secret: &Secret| Frame::Resume {
        secret: secret.clone(),
        have_out: 0,
        have_err: 0,
    };
    p.conn(1, resume(&Secret::random()));
    cl.until_conn(&mut p, 1, |g| g.refused.is_some());
    assert_eq!(cl.get(1).refused.as_deref(), Some("wrong secret"));
    p.conn(2, resume(&secret));
    cl.until_conn(&mut p, 2, |g| g.refused.is_some());
    assert_eq!(cl.get(2).refused.as_deref(), Some("no such connection"));
    p.conn(1, resume(&secret));
    cl.until_conn(&mut p, 1, |g| g.started);
    assert_eq!(cl.get(1).resumed, Some(0));
    p.conn(1, data(0, b"hi"));
    p.conn(1, eof(2));
    cl.until_conn(&mut p, 1, |g| g.closed);
    assert_eq!(cl.get(1).out, b"hi");
    assert_eq!(echoed.recv_timeout(WAIT).unwrap(), b"hi");
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

#[test]
fn nobody_back_within_the_hold_closes_every_target_connection() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let mut s = spec(&secret);
    s.timeout_secs = 1;
    let (mut p, id) = env.start(&s);
    let (port, got) = server(|mut st: TcpStream| read_all(&mut st));
    let mut cl = Client::acking();
    for c in [1, 2] {
        p.conn(c, connect(port));
        p.conn(c, data(0, b"held"));
        cl.until_conn(&mut p, c, |g| g.acked_in == 4);
    }
    p.kill();
    // Held: the targets see nothing yet.
    assert!(got.recv_timeout(Duration::from_millis(300)).is_err());
    env.wait_no_socket(&id);
    for _ in 0..2 {
        assert_eq!(got.recv_timeout(WAIT).unwrap(), b"held");
    }
    let mut late = env.relay(&["attach", &hex(&id)]);
    assert_eq!(
        late.recv(),
        Frame::Refused("no such session (it ended)".into())
    );
}

#[test]
fn reap_ends_a_previous_runs_forwards() {
    let env = HelperEnv::new();
    let secret = Secret::random();
    let s = spec(&secret);
    let (mut p, id) = env.start(&s);
    let (port, got) = server(|mut st: TcpStream| read_all(&mut st));
    let mut cl = Client::acking();
    p.conn(1, connect(port));
    cl.until_conn(&mut p, 1, |g| g.started);
    p.kill();
    let out = env
        .helper(&["reap", &hex(&s.owner), &hex(&s.run)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    assert!(env.socket(&id).exists(), "its own run is not reaped");
    let out = env
        .helper(&["reap", &hex(&s.owner), &hex(&[3; 16])])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    env.wait_no_socket(&id);
    assert_eq!(got.recv_timeout(WAIT).unwrap(), b"");
}

#[test]
fn hundreds_of_connections_share_one_helper() {
    const N: u32 = 250;
    let env = HelperEnv::new();
    let secret = Secret::random();
    let (mut p, id) = env.start(&spec(&secret));
    let (port, echoed) = server(echo);
    let mut cl = Client::acking();
    for c in 0..N {
        // Half by name: lookups (limited in number) and the next address
        // when "localhost" is ::1 first, where nobody listens.
        let host = if c % 2 == 0 { "localhost" } else { "127.0.0.1" };
        p.conn(
            c,
            Frame::Connect {
                host: host.into(),
                port: port.into(),
            },
        );
    }
    cl.until(&mut p, |cl| {
        cl.conns.len() == N as usize && cl.conns.values().all(|g| g.started)
    });
    let msg = |c: u32| format!("connection {c} ").repeat(50).into_bytes();
    for c in 0..N {
        let m = msg(c);
        p.conn(c, data(0, &m));
        p.conn(c, eof(m.len()));
    }
    cl.until(&mut p, |cl| cl.conns.values().all(|g| g.closed));
    for c in 0..N {
        assert_eq!(cl.get(c).out, msg(c), "connection {c}");
        p.conn(c, Frame::Done);
    }
    let mut all: Vec<Vec<u8>> = (0..N).map(|_| echoed.recv_timeout(WAIT).unwrap()).collect();
    let mut want: Vec<Vec<u8>> = (0..N).map(msg).collect();
    all.sort();
    want.sort();
    assert!(all == want, "every target got its own bytes");
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

/// `remote-helper version`'s forwarding line as the child of a bash
/// whose command line reads `sshd ... -f CFG` (as sshd's own does), with
/// `cfg` as its configuration.
fn forwarding_line(env: &HelperEnv, cfg: &str) -> String {
    let path = env.home().join("sshd_config");
    std::fs::write(&path, cfg).unwrap();
    let helper = env!("CARGO_BIN_EXE_sshshim");
    // `; true`: bash would otherwise exec the helper, which then has no
    // sshd-looking parent.
    let script = format!(
        "exec -a sshd bash -c '\"$0\" remote-helper version; true' '{helper}' -f '{}'",
        path.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("HOME", env.home())
        .env("XDG_CACHE_HOME", env.cache())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("sshshim-remote-helper "), "{text}");
    let fwd: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("forwarding "))
        .collect();
    assert_eq!(fwd.len(), 1, "{text}");
    fwd[0].to_owned()
}

#[test]
fn version_says_whether_sshd_lets_forwards_through_the_helper() {
    let env = HelperEnv::new();
    assert_eq!(forwarding_line(&env, "Port 22\n"), "forwarding tcp yes");
    assert_eq!(
        forwarding_line(&env, "AllowTcpForwarding local\nPermitOpen any\n"),
        "forwarding tcp yes"
    );
    assert_eq!(
        forwarding_line(&env, "AllowTcpForwarding remote\n"),
        "forwarding tcp no (AllowTcpForwarding remote)"
    );
    assert_eq!(
        forwarding_line(&env, "DisableForwarding yes\n"),
        "forwarding tcp no (DisableForwarding yes)"
    );
    assert_eq!(
        forwarding_line(&env, "PermitOpen 127.0.0.1:5432\n"),
        "forwarding tcp no (PermitOpen 127.0.0.1:5432)"
    );
    assert_eq!(
        forwarding_line(
            &env,
            "Port 22\nMatch User nobody\n  AllowTcpForwarding no\n"
        ),
        "forwarding tcp no (a Match block sets AllowTcpForwarding)"
    );
    // A key restricted in authorized_keys: sshd would refuse its forwards.
    let ssh = env.home().join(".ssh");
    std::fs::create_dir(&ssh).unwrap();
    let keys = ssh.join("authorized_keys");
    std::fs::write(
        &keys,
        "ssh-ed25519 AAAAC3Nza one\nrestrict,pty ssh-ed25519 AAAAC3Nzb two\n",
    )
    .unwrap();
    assert_eq!(
        forwarding_line(&env, "Port 22\n"),
        format!("forwarding tcp no ({}: a key has restrict)", keys.display())
    );
    assert_eq!(
        forwarding_line(&env, "AuthorizedKeysFile .ssh/other_keys\n"),
        "forwarding tcp yes"
    );
}

#[test]
fn a_bulk_download_does_not_hold_up_another_connection() {
    const BULK: usize = 8 << 20;
    let env = HelperEnv::new();
    let secret = Secret::random();
    let mut s = spec(&secret);
    s.buffer = 16 << 20;
    let (mut p, id) = env.start(&s);
    let (written, all_read) = mpsc::channel();
    let (bulk_port, _) = server(move |mut st: TcpStream| {
        let _ = st.write_all(&vec![b'x'; BULK]);
        let _ = st.shutdown(Shutdown::Write);
        let _ = written.send(());
        read_all(&mut st)
    });
    let (accepted, pinged) = mpsc::channel();
    let (echo_port, _) = server(move |mut st: TcpStream| {
        let mut b = [0u8; 4];
        st.read_exact(&mut b).unwrap();
        st.write_all(&b).unwrap();
        let _ = accepted.send(());
        read_all(&mut st)
    });
    let mut cl = Client::acking();
    p.conn(2, connect(echo_port));
    cl.until_conn(&mut p, 2, |g| g.started);
    // The link stalls while the download fills the helper's buffer.
    p.pause(true);
    p.conn(1, connect(bulk_port));
    // The helper took (nearly) all of it and waits for the link.
    all_read.recv_timeout(WAIT).unwrap();
    p.conn(2, data(0, b"ping"));
    pinged.recv_timeout(WAIT).unwrap();
    p.pause(false);
    cl.until_conn(&mut p, 2, |g| g.out == b"ping");
    let before = cl.conns.get(&1).map_or(0, |g| g.out.len());
    assert!(
        before < 2 << 20,
        "{before} bytes of the download went before the 4-byte answer"
    );
    cl.until_conn(&mut p, 1, |g| g.eof);
    assert_eq!(cl.get(1).out.len(), BULK);
    p.send(&Frame::Done);
    env.wait_no_socket(&id);
}

//! The remote helper's forwarded connections (issue 24), driven directly
//! over its stdin/stdout with the wire protocol against TCP servers on
//! 127.0.0.1 started here: no SSH needed. Killing a relay process is what
//! a dropped connection does to it on the server.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sshshim::resume::wire::{self, Frame, Secret, SessionId, StartSpec, Stream};

/// Bound for any one wait.
const WAIT: Duration = Duration::from_secs(15);

/// A private HOME (and cache) per test; on drop, every process still
/// running with it (daemons) is killed by pid.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    fn socket(&self, id: &SessionId) -> PathBuf {
        self.cache()
            .join("sshshim/run")
            .join(format!("{}.sock", hex(id)))
    }

    fn helper(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sshshim"));
        c.arg("remote-helper")
            .args(args)
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.cache());
        c
    }

    /// Starts a relay (`start` or `attach ID`) and reads its MAGIC.
    fn relay(&self, args: &[&str]) -> Peer {
        let mut child = self
            .helper(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the helper");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut magic = [0u8; 12];
            if stdout.read_exact(&mut magic).is_err() || &magic != wire::MAGIC {
                return;
            }
            let mut buf = BytesMut::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                while let Some(f) = Frame::decode(&mut buf).expect("a valid frame") {
                    if tx.send(f).is_err() {
                        return;
                    }
                }
                match stdout.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        Peer { child, stdin, rx }
    }

    /// Starts a forwards helper: the relay and its id.
    fn start(&self, spec: &StartSpec) -> (Peer, SessionId) {
        let mut p = self.relay(&["start"]);
        let id = match p.recv() {
            Frame::Hello {
                session,
                fresh: true,
                ..
            } => session,
            f => panic!("expected a fresh Hello, got {f:?}"),
        };
        p.send(&Frame::Start(Box::new(spec.clone())));
        assert_eq!(p.recv(), Frame::Started);
        (p, id)
    }

    /// Attaches to helper `id` and resumes it (its answer is checked).
    fn resume(&self, id: &SessionId, secret: &Secret) -> Peer {
        let mut p = self.relay(&["attach", &hex(id)]);
        match p.recv() {
            Frame::Hello {
                session,
                fresh: false,
                ..
            } => assert_eq!(&session, id),
            f => panic!("expected Hello, got {f:?}"),
        }
        p.send(&Frame::Resume {
            secret: secret.clone(),
            have_out: 0,
            have_err: 0,
        });
        assert_eq!(p.recv(), Frame::Resumed { have_in: 0 });
        p
    }

    /// Waits until the helper's socket is gone (its daemon ended).
    fn wait_no_socket(&self, id: &SessionId) {
        let path = self.socket(id);
        assert!(
            wait_until(|| !path.exists()),
            "the helper's socket {} was not removed",
            path.display()
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let mark = format!("XDG_CACHE_HOME={}", self.cache().display());
        for pid in pids_with_env(&mark) {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// One relay process and the frames it prints.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    rx: mpsc::Receiver<Frame>,
}

impl Peer {
    fn send(&mut self, f: &Frame) {
        self.stdin.write_all(&f.to_bytes()).expect("write a frame");
        self.stdin.flush().unwrap();
    }

    /// Sends `f` about connection `conn`.
    fn conn(&mut self, conn: u32, f: Frame) {
        self.send(&Frame::Conn {
            conn,
            frame: Box::new(f),
        });
    }

    fn recv(&mut self) -> Frame {
        self.rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("no frame from the helper: {e}"))
    }

    /// The next frame about a connection.
    fn recv_conn(&mut self) -> (u32, Frame) {
        match self.recv() {
            Frame::Conn { conn, frame } => (conn, *frame),
            f => panic!("expected a connection's frame, got {f:?}"),
        }
    }

    /// Kills the relay (what a dropped connection does to it).
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
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

fn wait_until(f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// PIDs whose environment holds exactly `entry`.
fn pids_with_env(entry: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            environ
                .split(|b| *b == 0)
                .any(|kv| kv == entry.as_bytes())
                .then_some(pid)
        })
        .collect()
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
    let env = Env::new();
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
    let env = Env::new();
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

//! The remote helper (`sshshim remote-helper`) driven directly over its
//! stdin and stdout with the wire protocol, no SSH: [`HelperEnv`] gives it
//! a private HOME and cache, [`Peer`] is one relay process and the frames
//! it prints. Killing a relay is what a dropped connection does to it on
//! the server.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sshshim::resume::wire::{self, Frame, Secret, SessionId, StartSpec};

use super::process::pids_with_env;

/// Bound for any one wait on the helper.
pub const HELPER_WAIT: Duration = Duration::from_secs(15);

/// A private HOME (and cache) per test; on drop, every process still
/// running with it (daemons, commands) is killed by pid.
pub struct HelperEnv {
    dir: tempfile::TempDir,
}

impl HelperEnv {
    /// A fresh directory.
    pub fn new() -> HelperEnv {
        HelperEnv {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// The HOME.
    pub fn home(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// `XDG_CACHE_HOME`.
    pub fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// Where the sessions' sockets are.
    pub fn run_dir(&self) -> PathBuf {
        self.cache().join("sshshim/run")
    }

    /// Session `id`'s socket.
    pub fn socket(&self, id: &SessionId) -> PathBuf {
        self.run_dir().join(format!("{}.sock", hex(id)))
    }

    /// `sshshim remote-helper ARGS` in this HOME.
    pub fn helper(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sshshim"));
        c.arg("remote-helper")
            .args(args)
            .env("HOME", self.dir.path())
            .env("XDG_CACHE_HOME", self.cache());
        c
    }

    /// Starts a relay (`start` or `attach ID`) and reads its MAGIC.
    pub fn relay(&self, args: &[&str]) -> Peer {
        self.relay_with(self.helper(args))
    }

    /// [`HelperEnv::relay`] with the command given.
    pub fn relay_with(&self, mut cmd: Command) -> Peer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run the helper");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let paused = Arc::new(AtomicBool::new(false));
        let pause = paused.clone();
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
                // Paused: the helper's output backs up, as on a slow link.
                while pause.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                match stdout.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        Peer {
            child,
            stdin,
            rx,
            paused,
        }
    }

    /// Starts a session (or forwards helper) with `spec`: the relay and
    /// the session's id.
    pub fn start(&self, spec: &StartSpec) -> (Peer, SessionId) {
        let mut p = self.relay(&["start"]);
        let id = self.hello(&mut p);
        p.send(&Frame::Start(Box::new(spec.clone())));
        assert_eq!(p.recv(), Frame::Started);
        (p, id)
    }

    /// A fresh session's greeting (our protocol, its socket in place): its id.
    pub fn hello(&self, p: &mut Peer) -> SessionId {
        let id = match p.recv() {
            Frame::Hello {
                version,
                session,
                fresh: true,
            } if version == wire::VERSION => session,
            f => panic!("expected a fresh Hello, got {f:?}"),
        };
        assert!(self.socket(&id).exists(), "the session's socket");
        id
    }

    /// A relay attached to session `id` (its `Hello` checked), and its
    /// answer to `Resume` with `secret` and the offsets given.
    pub fn attach(
        &self,
        id: &SessionId,
        secret: &Secret,
        have_out: u64,
        have_err: u64,
    ) -> (Peer, Frame) {
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
            have_out,
            have_err,
        });
        let answer = p.recv();
        (p, answer)
    }

    /// Waits until session `id`'s socket is gone (its daemon ended).
    pub fn wait_no_socket(&self, id: &SessionId) {
        let path = self.socket(id);
        assert!(
            wait_until(|| !path.exists()),
            "the session's socket {} was not removed",
            path.display()
        );
    }
}

impl Drop for HelperEnv {
    fn drop(&mut self) {
        let mark = format!("XDG_CACHE_HOME={}", self.cache().display());
        for pid in pids_with_env(&mark) {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// One relay process and the frames it prints.
pub struct Peer {
    /// The relay.
    pub child: Child,
    /// Its stdin (the channel's input).
    stdin: ChildStdin,
    /// Frames read from its stdout.
    rx: mpsc::Receiver<Frame>,
    /// While set, the helper's output is not read.
    paused: Arc<AtomicBool>,
}

impl Peer {
    /// Sends a frame.
    pub fn send(&mut self, f: &Frame) {
        self.stdin.write_all(&f.to_bytes()).expect("write a frame");
        self.stdin.flush().unwrap();
    }

    /// Sends `f` about connection `conn`.
    pub fn conn(&mut self, conn: u32, f: Frame) {
        self.send(&Frame::Conn {
            conn,
            frame: Box::new(f),
        });
    }

    /// The next frame (bounded wait).
    pub fn recv(&mut self) -> Frame {
        self.rx
            .recv_timeout(HELPER_WAIT)
            .unwrap_or_else(|e| panic!("no frame from the helper: {e}"))
    }

    /// The next frame, if one comes within `d`.
    pub fn recv_within(&mut self, d: Duration) -> Option<Frame> {
        self.rx.recv_timeout(d).ok()
    }

    /// The next frame about a connection.
    pub fn recv_conn(&mut self) -> (u32, Frame) {
        match self.recv() {
            Frame::Conn { conn, frame } => (conn, *frame),
            f => panic!("expected a connection's frame, got {f:?}"),
        }
    }

    /// Stops or resumes reading the helper's output.
    pub fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
    }

    /// Kills the relay (what a dropped connection does to it).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the relay to exit by itself.
    pub fn wait_exit(mut self) {
        let deadline = Instant::now() + HELPER_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        panic!("the relay did not exit");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Polls `f` until it holds (true) or [`HELPER_WAIT`] passes (false).
pub fn wait_until(f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + HELPER_WAIT;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

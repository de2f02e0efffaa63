//! The mux protocol layer against real OpenSSH clients (no sshd needed).
//!
//! A [`MuxServer`] runs on a socket in a temp dir; each test plays the
//! higher layer by answering the events it receives. Every client command
//! carries `-F /dev/null -o BatchMode=yes -o HostName=127.0.0.1 -o
//! Port=<closed port>`: if a mux request failed, OpenSSH would silently
//! fall back to a direct connection, which then fails fast on loopback.

mod support;

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sshshim::mux::proto::{self, ClientMessage, ServerMessage};
use sshshim::mux::{
    FdReader, FdWriter, ForwardKind, MuxAddr, MuxEvent, MuxListener, MuxRequest, MuxServer,
};
use support::{Capture, exit_code, free_port, run_with_timeout, stderr_text, stdout_text};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bound on each client command.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on waiting for one event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// A running server and the receiving end of its events.
struct Harness {
    /// Holds the socket directory.
    _dir: tempfile::TempDir,
    /// The control socket.
    sock: PathBuf,
    /// Requests from clients.
    events: mpsc::Receiver<MuxEvent>,
    /// Stops the accept loop.
    stop: CancellationToken,
    /// A loopback port nothing listens on, for fallbacks to fail fast.
    closed_port: u16,
}

impl Harness {
    /// Binds a socket in a fresh private directory and serves it.
    fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl").join("mux.sock");
        Self::start_at(dir, sock)
    }

    /// Serves `sock` (inside `dir`).
    fn start_at(dir: tempfile::TempDir, sock: PathBuf) -> Harness {
        let listener = MuxListener::bind(&sock).unwrap();
        let (tx, events) = mpsc::channel(16);
        let server = MuxServer::new(listener, tx);
        let stop = server.stop_token();
        tokio::spawn(server.run());
        Harness {
            _dir: dir,
            sock,
            events,
            stop,
            closed_port: free_port(),
        }
    }

    /// The next event, bounded.
    async fn next(&mut self) -> MuxEvent {
        tokio::time::timeout(EVENT_TIMEOUT, self.events.recv())
            .await
            .expect("no mux event within the timeout")
            .expect("server stopped")
    }

    /// `ssh -S SOCK` with the safety options and `args` (for `-O`).
    fn ssh(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(ssh_args(&self.sock, true, self.closed_port))
            .args(args);
        c
    }

    /// `ssh -o ControlPath=SOCK` with the safety options and `args`, as
    /// users reach sshshim for sessions.
    fn ssh_session(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(ssh_args(&self.sock, false, self.closed_port))
            .args(args);
        c
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Client options that select the mux socket (with `-S` or the
/// ControlPath option) and keep any fallback on a closed loopback port.
fn ssh_args(sock: &Path, dash_s: bool, closed_port: u16) -> Vec<OsString> {
    let mut v: Vec<OsString> = ["-F", "/dev/null", "-o", "BatchMode=yes"]
        .iter()
        .map(OsString::from)
        .collect();
    v.push("-o".into());
    v.push("HostName=127.0.0.1".into());
    v.push("-o".into());
    v.push(format!("Port={closed_port}").into());
    v.push("-o".into());
    v.push("ConnectTimeout=5".into());
    v.push("-o".into());
    v.push("ControlMaster=no".into());
    if dash_s {
        v.push("-S".into());
        v.push(sock.into());
    } else {
        let mut o = OsString::from("ControlPath=");
        o.push(sock);
        v.push("-o".into());
        v.push(o);
    }
    v
}

/// A client process killed (and reaped) if a test fails before it exits.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` on the blocking pool with `stdin`, bounded.
async fn run(mut cmd: Command, stdin: &'static [u8]) -> std::process::Output {
    tokio::task::spawn_blocking(move || run_with_timeout(&mut cmd, stdin, CLIENT_TIMEOUT))
        .await
        .unwrap()
}

/// Asserts a client run exited with `code`, showing its output otherwise.
fn assert_exit(out: &std::process::Output, code: i32, what: &str) {
    assert_eq!(
        exit_code(&out.status),
        code,
        "{what}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        stdout_text(out),
        stderr_text(out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_answered_by_the_driver() {
    let h = Harness::start();
    let out = run(h.ssh(&["-O", "check", "anyhost"]), b"").await;
    assert_exit(&out, 0, "ssh -O check");
    let err = stderr_text(&out);
    assert!(
        err.contains(&format!("Master running (pid={})", std::process::id())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_and_stop_are_delivered() {
    let mut h = Harness::start();
    let client = tokio::spawn(run(h.ssh(&["-O", "exit", "anyhost"]), b""));
    match h.next().await.request {
        MuxRequest::Terminate { reply } => reply.ok(),
        other => panic!("expected TERMINATE, got {other:?}"),
    }
    let out = client.await.unwrap();
    assert_exit(&out, 0, "ssh -O exit");
    assert!(stderr_text(&out).contains("Exit request sent"));

    let client = tokio::spawn(run(h.ssh(&["-O", "stop", "anyhost"]), b""));
    match h.next().await.request {
        MuxRequest::StopListening { reply } => {
            reply.ok();
            h.stop.cancel();
        }
        other => panic!("expected STOP_LISTENING, got {other:?}"),
    }
    let out = client.await.unwrap();
    assert_exit(&out, 0, "ssh -O stop");
    assert!(stderr_text(&out).contains("Stop listening request sent"));
    // The socket goes away with the accept loop.
    let gone = async {
        while h.sock.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, gone).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_are_reported() {
    let mut h = Harness::start();
    let client = tokio::spawn(run(h.ssh(&["-O", "exit", "anyhost"]), b""));
    match h.next().await.request {
        MuxRequest::Terminate { reply } => reply.permission_denied("use sshshim down"),
        other => panic!("expected TERMINATE, got {other:?}"),
    }
    let out = client.await.unwrap();
    assert_ne!(exit_code(&out.status), 0);
    assert!(
        stderr_text(&out).contains("use sshshim down"),
        "{}",
        stderr_text(&out)
    );

    // A dropped reply handle becomes a FAILURE, not a hang.
    let client = tokio::spawn(run(h.ssh(&["-O", "cancel", "-L", "1234:h:1", "x"]), b""));
    match h.next().await.request {
        MuxRequest::CloseForward { forward, reply } => {
            assert_eq!(forward.kind, ForwardKind::Local);
            drop(reply);
        }
        other => panic!("expected CLOSE_FWD, got {other:?}"),
    }
    let out = client.await.unwrap();
    assert!(
        stderr_text(&out).contains("request dropped"),
        "{}",
        stderr_text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_decode_and_remote_port_is_printed() {
    let mut h = Harness::start();
    let port = free_port();
    let spec = format!("127.0.0.1:{port}:127.0.0.1:22");
    let client = tokio::spawn(run(h.ssh(&["-O", "forward", "-L", &spec, "anyhost"]), b""));
    match h.next().await.request {
        MuxRequest::OpenForward { forward, reply } => {
            assert_eq!(forward.kind, ForwardKind::Local);
            assert_eq!(forward.listen, MuxAddr::Tcp("127.0.0.1".into(), port));
            assert_eq!(forward.connect, Some(MuxAddr::Tcp("127.0.0.1".into(), 22)));
            reply.ok();
        }
        other => panic!("expected OPEN_FWD, got {other:?}"),
    }
    assert_exit(&client.await.unwrap(), 0, "ssh -O forward -L");

    let client = tokio::spawn(run(
        h.ssh(&["-O", "forward", "-R", "0:127.0.0.1:22", "anyhost"]),
        b"",
    ));
    match h.next().await.request {
        MuxRequest::OpenForward { forward, reply } => {
            assert_eq!(forward.kind, ForwardKind::Remote);
            assert_eq!(forward.listen, MuxAddr::Tcp(String::new(), 0));
            assert_eq!(forward.connect, Some(MuxAddr::Tcp("127.0.0.1".into(), 22)));
            reply.remote_port(43210);
        }
        other => panic!("expected OPEN_FWD, got {other:?}"),
    }
    let out = client.await.unwrap();
    assert_exit(&out, 0, "ssh -O forward -R 0");
    assert_eq!(stdout_text(&out).trim(), "43210");

    let client = tokio::spawn(run(
        h.ssh(&["-O", "forward", "-D", "127.0.0.1:1080", "anyhost"]),
        b"",
    ));
    match h.next().await.request {
        MuxRequest::OpenForward { forward, reply } => {
            assert_eq!(forward.kind, ForwardKind::Dynamic);
            assert_eq!(forward.connect, None);
            reply.failure("Port forwarding failed");
        }
        other => panic!("expected OPEN_FWD, got {other:?}"),
    }
    let out = client.await.unwrap();
    assert_ne!(exit_code(&out.status), 0);
    assert!(stderr_text(&out).contains("Port forwarding failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_gets_command_env_and_usable_fds() {
    let mut h = Harness::start();
    let port = free_port();
    let spec = format!("127.0.0.1:{port}:127.0.0.1:22");
    let cmd = h.ssh_session(&["-o", "SetEnv=FOO=bar", "-L", &spec, "testhost", "echo hi"]);
    let client = tokio::spawn(run(cmd, b"payload from stdin"));
    // Forwards on the command line come first, each as OPEN_FWD.
    match h.next().await.request {
        MuxRequest::OpenForward { forward, reply } => {
            assert_eq!(forward.listen, MuxAddr::Tcp("127.0.0.1".into(), port));
            reply.ok();
        }
        other => panic!("expected OPEN_FWD, got {other:?}"),
    }
    let MuxEvent {
        client: info,
        request,
    } = h.next().await;
    let MuxRequest::NewSession {
        session,
        fds,
        tty,
        reply,
    } = request
    else {
        panic!("expected NEW_SESSION, got {request:?}");
    };
    assert_eq!(session.command, b"echo hi");
    assert!(
        session.env.contains(&("FOO".into(), "bar".into())),
        "{:?}",
        session.env
    );
    assert!(!session.want_tty && tty.is_none());
    assert!(info.pid.is_some());

    let ctl = reply.opened();
    let mut stdin = FdReader::new(fds.stdin).unwrap();
    let mut stdout = FdWriter::new(fds.stdout).unwrap();
    let mut stderr = FdWriter::new(fds.stderr).unwrap();
    let mut input = Vec::new();
    stdin.read_to_end(&mut input).await.unwrap();
    stdout.write_all(b"hi\n").await.unwrap();
    stdout.write_all(&input).await.unwrap();
    stderr.write_all(b"to stderr\n").await.unwrap();
    stdout.flush().await.unwrap();
    stderr.flush().await.unwrap();
    drop((stdin, stdout, stderr));
    ctl.exit(7);

    let out = client.await.unwrap();
    assert_exit(&out, 7, "ssh testhost 'echo hi'");
    assert_eq!(stdout_text(&out), "hi\npayload from stdin");
    assert!(stderr_text(&out).contains("to stderr"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_forward_gets_target_and_two_fds() {
    let mut h = Harness::start();
    let client = tokio::spawn(run(
        h.ssh_session(&["-W", "127.0.0.1:2222", "testhost"]),
        b"client hello",
    ));
    let MuxRequest::StdioForward { target, fds, reply } = h.next().await.request else {
        panic!("expected NEW_STDIO_FWD");
    };
    assert_eq!(target, MuxAddr::Tcp("127.0.0.1".into(), 2222));
    let ctl = reply.opened();
    let mut input = FdReader::new(fds.input).unwrap();
    let mut output = FdWriter::new(fds.output).unwrap();
    let mut got = Vec::new();
    input.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"client hello");
    output.write_all(b"SSH-2.0-fake\r\n").await.unwrap();
    output.flush().await.unwrap();
    drop((input, output));
    ctl.close();
    let out = client.await.unwrap();
    assert_exit(&out, 0, "ssh -W");
    assert_eq!(stdout_text(&out), "SSH-2.0-fake\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_without_exit_status_ends_255_and_client_gone_is_seen() {
    let mut h = Harness::start();
    let client = tokio::spawn(run(h.ssh_session(&["testhost", "true"]), b""));
    let MuxRequest::NewSession { reply, .. } = h.next().await.request else {
        panic!("expected NEW_SESSION");
    };
    reply.opened().close();
    assert_exit(&client.await.unwrap(), 255, "session closed without status");

    // A client killed mid-session: the layer's handle sees it.
    let mut child = KillOnDrop(
        h.ssh_session(&["testhost", "sleep"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let MuxRequest::NewSession { reply, fds, .. } = h.next().await.request else {
        panic!("expected NEW_SESSION");
    };
    let ctl = reply.opened();
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    tokio::time::timeout(EVENT_TIMEOUT, ctl.closed())
        .await
        .expect("closed() did not fire after the client died");
    drop(fds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_session_gets_modes_and_size() {
    let mut h = Harness::start();
    let (master, slave) = open_pty();
    let ws = libc::winsize {
        ws_row: 40,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    assert_eq!(
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
    let mut cmd = h.ssh_session(&["-tt", "-o", "LogLevel=ERROR", "testhost"]);
    cmd.env("TERM", "xterm-test")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let screen = Capture::spawn(master.try_clone().unwrap());

    let MuxRequest::NewSession {
        session,
        fds,
        tty,
        reply,
    } = h.next().await.request
    else {
        panic!("expected NEW_SESSION");
    };
    assert!(session.want_tty);
    assert_eq!(session.term, "xterm-test");
    assert_eq!(session.escape_char, Some(b'~'));
    assert!(session.command.is_empty());
    let tty = tty.expect("tty info for a tty session");
    assert_eq!((tty.size.cols, tty.size.rows), (100, 40));
    let get = |p: russh::Pty| tty.modes.iter().find(|(q, _)| *q == p).map(|(_, v)| *v);
    // Read before the client went raw: cooked mode, with echo.
    assert_eq!(get(russh::Pty::ICANON), Some(1));
    assert_eq!(get(russh::Pty::ECHO), Some(1));
    assert_eq!(get(russh::Pty::VINTR), Some(3));

    let ctl = reply.opened();
    let mut stdout = FdWriter::new(fds.stdout).unwrap();
    stdout.write_all(b"remote prompt$ ").await.unwrap();
    stdout.flush().await.unwrap();
    let shown = tokio::task::spawn_blocking({
        let screen = screen.clone();
        move || screen.wait_for(CLIENT_TIMEOUT, |t| t.contains("remote prompt$"))
    })
    .await
    .unwrap();
    assert!(shown, "{}", screen.text());
    drop((stdout, fds.stdin, fds.stderr));
    ctl.exit(0);
    let status =
        tokio::task::spawn_blocking(move || support::wait_child(&mut child.0, CLIENT_TIMEOUT))
            .await
            .unwrap()
            .expect("tty client did not exit");
    assert_eq!(exit_code(&status), 0, "{}", screen.text());
    drop(master);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_replaced_live_socket_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let sock = dir.path().join("mux.sock");
    // A socket file nobody listens on any more, as a crashed sshshim leaves.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let h = Harness::start_at(dir, sock.clone());
    let out = run(h.ssh(&["-O", "check", "anyhost"]), b"").await;
    assert_exit(&out, 0, "ssh -O check on a replaced stale socket");

    let e = MuxListener::bind(&sock).unwrap_err();
    assert!(
        e.to_string().contains("another sshshim") && e.to_string().contains("already serving"),
        "{e}"
    );
    // The failed bind left the live socket alone.
    let out = run(h.ssh(&["-O", "check", "anyhost"]), b"").await;
    assert_exit(&out, 0, "ssh -O check after a refused second bind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_uid_is_refused() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    let mut h = Harness::start();
    // Open the directory and socket up, as a misconfiguration would, so
    // only the peer check stands in the way.
    let dir = h.sock.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&h.sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "ssh"])
        .args(ssh_args(&h.sock, true, h.closed_port))
        .args(["-O", "check", "anyhost"])
        .env("HOME", "/nonexistent");
    let out = run(cmd, b"").await;
    let err = stderr_text(&out);
    assert_ne!(exit_code(&out.status), 0, "{err}");
    assert!(!err.contains("Master running"), "{err}");
    assert!(
        !err.contains("Permission denied"),
        "socket not reachable: {err}"
    );
    assert!(err.contains("hello exchange failed"), "{err}");
    assert!(h.events.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_clients_hostile_and_pipelined() {
    let mut h = Harness::start();

    // Request before HELLO: closed after our HELLO.
    let mut c = tokio::net::UnixStream::connect(&h.sock).await.unwrap();
    assert_eq!(
        read_msg(&mut c).await,
        Some(ServerMessage::Hello { extensions: vec![] })
    );
    c.write_all(&ClientMessage::AliveCheck { rid: 0 }.encode())
        .await
        .unwrap();
    assert_eq!(read_msg(&mut c).await, None);

    // Oversized packet: closed.
    let mut c = hello_client(&h.sock).await;
    c.write_all(&[0x7f, 0xff, 0xff, 0xff]).await.unwrap();
    assert_eq!(read_msg(&mut c).await, None);

    // Unknown, PROXY, invalid forward and EXT_INFO get FAILURE with their
    // rid; ALIVE works; everything pipelined in one write.
    let mut c = hello_client(&h.sock).await;
    let mut batch = Vec::new();
    batch.extend(
        ClientMessage::Unknown {
            msg_type: 0x1000_0077,
            rid: 5,
        }
        .encode(),
    );
    batch.extend(ClientMessage::Proxy { rid: 6 }.encode());
    batch.extend(
        ClientMessage::ExtInfo {
            rid: 7,
            what: "connection".into(),
        }
        .encode(),
    );
    let mut bad_fwd = ClientMessage::OpenFwd {
        rid: 8,
        forward: sshshim::mux::Forward {
            kind: ForwardKind::Local,
            listen: MuxAddr::Tcp("".into(), 1),
            connect: Some(MuxAddr::Tcp("h".into(), 2)),
        },
    }
    .encode();
    bad_fwd[15] = 9; // forward type 9
    batch.extend(bad_fwd);
    batch.extend(ClientMessage::AliveCheck { rid: 9 }.encode());
    c.write_all(&batch).await.unwrap();
    for rid in [5, 6, 7] {
        assert_eq!(
            read_msg(&mut c).await,
            Some(ServerMessage::Failure {
                rid,
                reason: "unsupported request".into()
            })
        );
    }
    assert_eq!(
        read_msg(&mut c).await,
        Some(ServerMessage::Failure {
            rid: 8,
            reason: "Invalid forwarding request".into()
        })
    );
    assert_eq!(
        read_msg(&mut c).await,
        Some(ServerMessage::Alive {
            rid: 9,
            pid: std::process::id()
        })
    );

    // Many requests pipelined without reading: all answered, in order
    // (the reader pauses while its replies are unwritten).
    let (mut rd, mut wr) = c.into_split();
    let writer = tokio::spawn(async move {
        let mut batch = Vec::new();
        for rid in 100..3100 {
            batch.extend(ClientMessage::AliveCheck { rid }.encode());
        }
        wr.write_all(&batch).await.unwrap();
        wr
    });
    for rid in 100..3100 {
        assert!(
            matches!(read_msg(&mut rd).await, Some(ServerMessage::Alive { rid: r, .. }) if r == rid)
        );
    }
    let mut c = rd.reunite(writer.await.unwrap()).unwrap();

    // A client that hangs up while its request is pending: the layer's
    // ClientInfo sees it.
    c.write_all(&ClientMessage::Terminate { rid: 10 }.encode())
        .await
        .unwrap();
    let ev = h.next().await;
    assert!(matches!(ev.request, MuxRequest::Terminate { .. }));
    drop(c);
    tokio::time::timeout(EVENT_TIMEOUT, ev.client.closed())
        .await
        .expect("closed() did not fire");

    // A NEW_SESSION whose descriptors never come: FAILURE, then closed.
    let mut c = hello_client(&h.sock).await;
    let s = ClientMessage::NewSession {
        rid: 0,
        session: Default::default(),
    };
    c.write_all(&s.encode()).await.unwrap();
    c.write_all(b"x").await.unwrap(); // a byte without a descriptor
    assert_eq!(
        read_msg(&mut c).await,
        Some(ServerMessage::Failure {
            rid: 0,
            reason: "did not receive file descriptors".into()
        })
    );
    assert_eq!(read_msg(&mut c).await, None);
}

/// Connects and exchanges HELLOs.
async fn hello_client(sock: &Path) -> tokio::net::UnixStream {
    let mut c = tokio::net::UnixStream::connect(sock).await.unwrap();
    assert!(matches!(
        read_msg(&mut c).await,
        Some(ServerMessage::Hello { .. })
    ));
    let hello = ClientMessage::Hello {
        version: 4,
        extensions: vec![],
    };
    c.write_all(&hello.encode()).await.unwrap();
    c
}

/// Reads one master message; `None` at end of stream. Bounded.
async fn read_msg(c: &mut (impl AsyncRead + Unpin)) -> Option<ServerMessage> {
    let read = async {
        let mut len = [0u8; 4];
        if c.read_exact(&mut len).await.is_err() {
            return None;
        }
        let n = proto::body_len(len).unwrap();
        let mut body = vec![0; n];
        c.read_exact(&mut body).await.ok()?;
        Some(proto::decode_server(&body).unwrap())
    };
    tokio::time::timeout(EVENT_TIMEOUT, read)
        .await
        .expect("no reply within the timeout")
}

/// A pty pair: (master, slave).
fn open_pty() -> (File, OwnedFd) {
    // SAFETY: standard pty allocation; every return value is checked.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0, "posix_openpt failed");
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let s = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(s >= 0, "cannot open the pty slave");
        (File::from_raw_fd(m), OwnedFd::from_raw_fd(s))
    }
}

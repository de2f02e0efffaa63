//! Port forwarding through the shim: -L, -D, -R (port 0 too), Unix
//! sockets, and forwards owned by sshshim itself.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// A TCP service on loopback: answers every connection with `reply(request
/// bytes)` after the client half-closes. Runs until the test process ends.
fn tcp_service(reply: fn(&[u8]) -> Vec<u8>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || serve(s, reply));
        }
    });
    port
}

/// A Unix-socket twin of [`tcp_service`].
fn unix_service(path: &std::path::Path, reply: fn(&[u8]) -> Vec<u8>) {
    let l = UnixListener::bind(path).unwrap();
    thread::spawn(move || {
        for s in l.incoming().flatten() {
            thread::spawn(move || serve(s, reply));
        }
    });
}

/// Reads until EOF, then writes the reply and closes.
fn serve<S: Read + Write>(mut s: S, reply: fn(&[u8]) -> Vec<u8>) {
    let mut req = Vec::new();
    if s.read_to_end(&mut req).is_ok() {
        let _ = s.write_all(&reply(&req));
    }
}

/// Replies with "sha256:<hex> len:<n>" of the request.
fn hash_reply(req: &[u8]) -> Vec<u8> {
    format!("sha256:{} len:{}", sha256_hex(req), req.len()).into_bytes()
}

/// Replies with 100 MiB of deterministic data, ignoring the request.
fn bulk_reply(_req: &[u8]) -> Vec<u8> {
    pseudo_random_bytes(100 << 20, 42)
}

/// An HTTP/1.0 responder (curl sends its request and waits, no half-close).
fn http_service(body: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    s,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// Sends `data` to a TCP port, half-closes, returns everything read back.
fn exchange(port: u16, data: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let writer = {
        let mut w = s.try_clone().unwrap();
        let data = data.to_vec();
        thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    writer.join().unwrap();
    out
}

/// The Unix-socket twin of [`exchange`].
fn exchange_unix(path: &std::path::Path, data: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// Waits (bounded) until something accepts on 127.0.0.1:port.
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until nothing accepts on 127.0.0.1:port.
fn wait_closed(port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(Instant::now() < deadline, "port {port} still listening");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (bounded) until a Unix socket accepts.
fn wait_unix(path: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {}",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A long-running `ssh -N` client through the shim, killed on drop.
struct Client(Child, Capture);

impl Client {
    fn start(rig: &Rig, opts: &[&str]) -> Client {
        let mut all = vec!["-N", "-o", "ExitOnForwardFailure=yes"];
        all.extend_from_slice(opts);
        let mut child = rig
            .env
            .ssh_cmd(rig.shim.port(), &all, &[])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Capture::spawn(child.stderr.take().unwrap());
        Client(child, err)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn local_forward_http_bulk_parallel_and_refused() {
    let rig = Rig::start();
    let http = http_service("hello through -L\n");
    let hash = tcp_service(hash_reply);
    let bulk = tcp_service(bulk_reply);
    let (l_http, l_hash, l_bulk, l_dead) = (free_port(), free_port(), free_port(), free_port());
    let dead = free_port();
    let _c = Client::start(
        &rig,
        &[
            "-L",
            &format!("{l_http}:127.0.0.1:{http}"),
            "-L",
            &format!("{l_hash}:127.0.0.1:{hash}"),
            "-L",
            &format!("{l_bulk}:127.0.0.1:{bulk}"),
            "-L",
            &format!("{l_dead}:127.0.0.1:{dead}"),
        ],
    );
    wait_listening(l_dead);

    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .arg(format!("http://127.0.0.1:{l_http}/")));
    assert_eq!(stdout_text(&out), "hello through -L\n");

    // 100 MiB each way, byte-exact, with half-close carried through.
    let up = pseudo_random_bytes(100 << 20, 9);
    let got = exchange(l_hash, &up);
    assert_eq!(
        String::from_utf8_lossy(&got),
        format!("sha256:{} len:{}", sha256_hex(&up), up.len())
    );
    let down = exchange(l_bulk, b"");
    assert_eq!(sha256_hex(&down), sha256_hex(&bulk_reply(b"")));

    // 50 parallel connections all complete.
    let handles: Vec<_> = (0..50u64)
        .map(|i| {
            thread::spawn(move || {
                let data = pseudo_random_bytes(64 * 1024 + i as usize, i);
                let got = exchange(l_hash, &data);
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    format!("sha256:{} len:{}", sha256_hex(&data), data.len())
                );
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }

    // A closed destination: the client's connection is closed, not hung.
    let mut s = TcpStream::connect(("127.0.0.1", l_dead)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    let t = Instant::now();
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn dynamic_forward_socks() {
    let rig = Rig::start();
    let http = http_service("hello through -D\n");
    let socks = free_port();
    let _c = Client::start(&rig, &["-D", &format!("127.0.0.1:{socks}")]);
    wait_listening(socks);
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "--socks5-hostname"])
        .arg(format!("127.0.0.1:{socks}"))
        .arg(format!("http://localhost:{http}/")));
    assert_success(&out, "curl via -D");
    assert_eq!(stdout_text(&out), "hello through -D\n");
}

#[test]
fn remote_forwards_route_allocate_and_cancel() {
    let rig = Rig::start();
    let svc_a = tcp_service(|_| b"service A".to_vec());
    let svc_b = tcp_service(|_| b"service B".to_vec());
    let (ra, rb) = (free_port(), free_port());
    let a = Client::start(&rig, &["-R", &format!("{ra}:127.0.0.1:{svc_a}")]);
    let b = Client::start(&rig, &["-R", &format!("{rb}:127.0.0.1:{svc_b}")]);
    wait_listening(ra);
    wait_listening(rb);
    assert_eq!(exchange(ra, b"x"), b"service A");
    assert_eq!(exchange(rb, b"x"), b"service B");

    // A second client asking for a taken port is refused, as sshd would.
    let mut dup = rig.env.ssh_cmd(
        rig.shim.port(),
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("{ra}:127.0.0.1:{svc_b}"),
        ],
        &[],
    );
    let out = run_with_timeout(&mut dup, b"", Duration::from_secs(20));
    assert_eq!(exit_code(&out.status), 255);
    assert!(
        stderr_text(&out).contains("remote port forwarding failed"),
        "{}",
        stderr_text(&out)
    );
    assert_eq!(exchange(ra, b"x"), b"service A");

    // Port 0: the client is told the allocated port, and it works.
    // (LogLevel INFO: ssh prints "Allocated port" at that level.)
    let c = Client::start(
        &rig,
        &["-o", "LogLevel=INFO", "-R", &format!("0:127.0.0.1:{svc_b}")],
    );
    assert!(
        c.1.wait_for(Duration::from_secs(15), |t| t.contains("Allocated port")),
        "{}",
        c.1.text()
    );
    let text = c.1.text();
    let port: u16 = text
        .split("Allocated port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {text:?}"));
    wait_listening(port);
    assert_eq!(exchange(port, b"x"), b"service B");

    // A client that exits: its remote port stops listening within a second.
    drop(a);
    wait_closed(ra, Duration::from_secs(1));
    drop(c);
    wait_closed(port, Duration::from_secs(1));
    assert_eq!(exchange(rb, b"x"), b"service B");
    drop(b);
    wait_closed(rb, Duration::from_secs(1));
}

#[test]
fn unix_socket_forwards() {
    let rig = Rig::start();
    let env = &rig.env;
    let target = env.path("target.sock");
    unix_service(&target, hash_reply);
    // -L local socket -> remote socket.
    let local = env.path("local.sock");
    let _l = Client::start(
        &rig,
        &["-L", &format!("{}:{}", local.display(), target.display())],
    );
    wait_unix(&local);
    let got = exchange_unix(&local, b"via -L unix");
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&hash_reply(b"via -L unix"))
    );
    // -R remote socket -> local TCP service.
    let svc = tcp_service(|_| b"reverse unix".to_vec());
    let remote = env.path("remote.sock");
    let _r = Client::start(
        &rig,
        &["-R", &format!("{}:127.0.0.1:{svc}", remote.display())],
    );
    wait_unix(&remote);
    assert_eq!(exchange_unix(&remote, b""), b"reverse unix");
}

#[test]
fn shim_owned_forwards() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let svc = tcp_service(hash_reply);
    let back = tcp_service(|_| b"reached the lab machine".to_vec());
    let (lport, rport) = (free_port(), free_port());
    let sock = env.path("owned.sock");
    let shim = env
        .shim_builder(sshd.port())
        .args(&[
            "-L",
            &format!("127.0.0.1:{lport}:127.0.0.1:{svc}"),
            "-L",
            &format!("{}:127.0.0.1:{svc}", sock.display()),
            "-R",
            &format!("{rport}:127.0.0.1:{back}"),
        ])
        .start();
    wait_listening(lport);
    let got = exchange(lport, b"owned -L");
    assert_eq!(got, hash_reply(b"owned -L"));
    wait_unix(&sock);
    assert_eq!(
        exchange_unix(&sock, b"owned unix -L"),
        hash_reply(b"owned unix -L")
    );
    wait_listening(rport);
    assert_eq!(exchange(rport, b""), b"reached the lab machine");
    drop(shim);

    // A bad spec names itself and the expected form.
    let out =
        run(Command::new(env!("CARGO_BIN_EXE_sshshim")).args(["up", "gw", "-R", "2222:localhost"]));
    assert_eq!(exit_code(&out.status), 2);
    let err = stderr_text(&out);
    assert!(
        err.contains("'2222:localhost'") && err.contains("[bind_address:]port:host:hostport"),
        "{err}"
    );
}

//! [`FaultProxy`]: a loopback TCP proxy with injectable faults (drop,
//! freeze, refuse, delay) for resilience tests.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::LOCALHOST;

/// Behaviour of a [`FaultProxy`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward bytes normally.
    Pass,
    /// Hold all bytes in both directions; sockets stay open (a partition).
    Freeze,
    /// Reset new connections right after accepting them.
    Refuse,
}

/// State shared between the proxy handle and its threads.
struct ProxyShared {
    /// Upstream port on 127.0.0.1.
    target: u16,
    /// Current mode.
    mode: Mutex<Mode>,
    /// Delay applied before forwarding each chunk.
    delay: Mutex<Duration>,
    /// Set when the proxy is dropped.
    stop: AtomicBool,
    /// Live connections.
    conns: Mutex<Vec<ProxyConn>>,
    /// Connections accepted so far, refused ones included.
    accepted: AtomicU64,
}

/// One proxied connection: both sockets plus its two pump threads.
struct ProxyConn {
    /// Tells the pumps to exit (dropping their socket handles).
    killed: Arc<AtomicBool>,
    /// Client-side and upstream sockets (handles for SO_LINGER).
    socks: [TcpStream; 2],
    /// Pump threads.
    threads: Vec<JoinHandle<()>>,
}

/// A loopback TCP proxy with injectable faults, for resilience tests.
pub struct FaultProxy {
    /// Listening port.
    port: u16,
    /// Shared state.
    shared: Arc<ProxyShared>,
    /// Accept loop thread.
    accept: Option<JoinHandle<()>>,
}

/// Sets SO_LINGER 0 so the final close sends RST instead of FIN.
fn set_rst_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Whether an I/O error is a socket timeout (used to poll flags).
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1:0 forwarding to 127.0.0.1:`target_port`.
    pub fn start(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind((LOCALHOST, 0)).expect("proxy bind");
        let port = listener.local_addr().unwrap().port();
        // Non-blocking accept lets the loop notice `stop` promptly.
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(ProxyShared {
            target: target_port,
            mode: Mutex::new(Mode::Pass),
            delay: Mutex::new(Duration::ZERO),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
        });
        let sh = shared.clone();
        let accept = thread::spawn(move || {
            while !sh.stop.load(Ordering::SeqCst) {
                sh.conns
                    .lock()
                    .unwrap()
                    .retain(|c| !c.threads.iter().all(JoinHandle::is_finished));
                match listener.accept() {
                    Ok((client, _)) => Self::on_accept(&sh, client),
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// Handles a new client connection according to the current mode.
    fn on_accept(sh: &Arc<ProxyShared>, client: TcpStream) {
        sh.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nonblocking(false);
        if *sh.mode.lock().unwrap() == Mode::Refuse {
            set_rst_on_close(&client);
            return;
        }
        let up_addr = SocketAddr::from(([127, 0, 0, 1], sh.target));
        let Ok(upstream) = TcpStream::connect_timeout(&up_addr, Duration::from_secs(2)) else {
            set_rst_on_close(&client);
            return;
        };
        let killed = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (from, to) in [(&client, &upstream), (&upstream, &client)] {
            let (from, to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
            let (sh, killed) = (sh.clone(), killed.clone());
            threads.push(thread::spawn(move || pump(from, to, &sh, &killed)));
        }
        sh.conns.lock().unwrap().push(ProxyConn {
            killed,
            socks: [client, upstream],
            threads,
        });
    }

    /// The proxy's listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Switches mode; applies to existing and new connections.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.lock().unwrap()
    }

    /// Delays every forwarded chunk by `d` (zero disables).
    pub fn set_delay(&self, d: Duration) {
        *self.shared.delay.lock().unwrap() = d;
    }

    /// Number of connections currently tracked.
    pub fn connection_count(&self) -> usize {
        let mut conns = self.shared.conns.lock().unwrap();
        conns.retain(|c| !c.threads.iter().all(JoinHandle::is_finished));
        conns.len()
    }

    /// Connections accepted so far, refused ones included (each is one
    /// connect attempt of the shim).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Aborts every current connection with RST on both sides.
    pub fn drop_all(&self) {
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for c in conns {
            c.socks.iter().for_each(set_rst_on_close);
            c.killed.store(true, Ordering::SeqCst);
            drop(c.socks);
            // Pumps notice `killed` within ~50 ms and drop the last handles.
            for t in c.threads {
                let _ = t.join();
            }
        }
    }
}

impl Drop for FaultProxy {
    /// Stops accepting and resets all connections.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.drop_all();
    }
}

/// Copies `from` -> `to`, honouring freeze/delay and the kill flag.
fn pump(mut from: TcpStream, mut to: TcpStream, sh: &ProxyShared, killed: &AtomicBool) {
    // Short timeouts turn blocking I/O into polling so flags are seen quickly.
    let tick = Duration::from_millis(50);
    let _ = from.set_read_timeout(Some(tick));
    let _ = to.set_write_timeout(Some(tick));
    let dead = || killed.load(Ordering::SeqCst) || sh.stop.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 16 * 1024];
    while !dead() {
        let res = from.read(&mut buf);
        if matches!(&res, Err(e) if is_timeout(e)) {
            continue;
        }
        // Hold whatever we got (data, EOF or error) while frozen.
        while *sh.mode.lock().unwrap() == Mode::Freeze && !dead() {
            thread::sleep(Duration::from_millis(20));
        }
        let delay_until = Instant::now() + *sh.delay.lock().unwrap();
        while Instant::now() < delay_until && !dead() {
            thread::sleep(Duration::from_millis(5));
        }
        let n = match res {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(_) => {
                // Propagate an abort as RST to the other side.
                set_rst_on_close(&to);
                killed.store(true, Ordering::SeqCst);
                return;
            }
        };
        let mut off = 0;
        while off < n && !dead() {
            match to.write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) if is_timeout(&e) => {}
                Err(_) => {
                    set_rst_on_close(&from);
                    killed.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

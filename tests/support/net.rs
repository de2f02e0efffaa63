//! Loopback TCP helpers: free ports and tiny services to forward to.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use super::LOCALHOST;

/// Returns a currently free loopback TCP port (bind to :0 and release it).
/// A loopback port that was free a moment ago and that this test process
/// has not handed out before: the kernel may give the same ephemeral port to
/// two `bind(0)` calls in a row, and two tests (or two forwards in one test)
/// sharing a port made each other's checks pass or fail.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let l = TcpListener::bind((LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A TCP service answering every connection with `reply`.
pub fn service(reply: &'static [u8]) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let _ = s.write_all(reply);
        }
    });
    port
}

/// Reads what a connection to 127.0.0.1:port says, or None if refused.
pub fn fetch(port: u16) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(out)
}

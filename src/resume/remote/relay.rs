//! The helper's short-lived side, run by sshd on an exec channel: `start`
//! (bind a session's socket, fork its daemon, relay), `attach` (relay to a
//! held session), `reap` (ask held sessions of a previous run to end).
//!
//! A relay hands the channel (stdin, stdout) to the session's daemon over
//! the session's socket ([`handover`]) and waits until the daemon lets the
//! attachment go: the daemon stays, holding the command, until a new
//! relay attaches.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;

use super::rundir::{check_peer, hex, parse_id, run_dir, socket_path};
use super::{HelperError, child, daemon, handover};
use crate::resume::wire::{self, Frame, SessionId};

/// How long `reap` waits for one session's greeting.
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// `start [SPEC]`: a new session. Its socket is bound before the fork, so
/// the relay can connect at once and the daemon owns the listener. With
/// SPEC ([`wire::StartSpec::to_arg`]) the command starts at once.
pub fn start(spec: Option<&str>) -> Result<(), HelperError> {
    let spec = spec
        .map(wire::StartSpec::from_arg)
        .transpose()
        .map_err(|_| HelperError::Usage("start's argument is not a session spec"))?;
    let dir = run_dir()?;
    let id: SessionId = rand::random();
    let path = socket_path(&dir, &id);
    // SAFETY: umask only swaps the process's mask; we are single-threaded.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&path);
    // SAFETY: as above; the command inherits the user's own mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(HelperError::step(format!("cannot bind {}", path.display())))?;
    // SAFETY: no other thread exists yet (no runtime, no logging), so the
    // child may run arbitrary code after fork.
    match unsafe { libc::fork() } {
        -1 => {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_file(&path);
            Err(HelperError::step("cannot fork the session's daemon")(e))
        }
        0 => {
            detach_from_sshd();
            daemon::run(listener, path, id, spec);
            std::process::exit(0);
        }
        _ => {
            drop(listener);
            let sock = UnixStream::connect(&path)
                .map_err(HelperError::step("cannot reach the new session"))?;
            relay(sock)
        }
    }
}

/// The daemon's side of the fork: its own session (SIGHUP from sshd's
/// session does not reach it), the home directory, stdio on /dev/null
/// (only attachments hold the channel open).
fn detach_from_sshd() {
    // SAFETY: setsid takes no arguments; it fails only for a group leader,
    // which a fresh child is not.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir(child::home());
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which we own.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// `attach ID`: relays to a held session, or answers for it when the
/// session is gone: MAGIC and `Refused`, exit 0.
pub fn attach(id: &str) -> Result<(), HelperError> {
    let id = parse_id(id).ok_or(HelperError::Usage("a session id is 32 hexadecimal digits"))?;
    let path = socket_path(&run_dir()?, &id);
    let sock = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) if gone(&e) => {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                // Its daemon died without cleaning up (killed).
                let _ = std::fs::remove_file(&path);
            }
            let mut out = BytesMut::new();
            out.extend_from_slice(wire::MAGIC);
            Frame::Refused("no such session (it ended)".into()).encode(&mut out);
            let mut stdout = io::stdout().lock();
            stdout.write_all(&out).and_then(|()| stdout.flush())?;
            return Ok(());
        }
        Err(e) => {
            return Err(HelperError::step(format!(
                "cannot reach session {}",
                hex(&id)
            ))(e));
        }
    };
    check_peer(&sock)?;
    relay(sock)
}

/// Whether a connect error means nobody holds that socket.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Hands stdin and stdout to the session's daemon, which serves the
/// channel itself from then on, and stays until the daemon closes `sock`
/// (sshd keeps the channel open while we live); then exits the process.
fn relay(sock: UnixStream) -> Result<(), HelperError> {
    handover::send(sock.as_raw_fd(), [0, 1])
        .map_err(HelperError::step("cannot hand the channel to the session"))?;
    // Only the daemon holds the channel now: its close is the channel's EOF.
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..2 {
            // SAFETY: dup2 onto the standard descriptors, which we own.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    // What comes on the socket (the daemon's greeting for peers that speak
    // on it) is not ours: read until it closes.
    let mut sock = sock;
    let mut buf = [0u8; 512];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    std::process::exit(0);
}

/// `reap OWNER RUN`: sends `Reap` to every held session (each decides);
/// prints how many it asked.
pub fn reap(owner: &str, run: &str) -> Result<(), HelperError> {
    let owner = parse_id(owner).ok_or(HelperError::Usage("an owner is 32 hexadecimal digits"))?;
    let run = parse_id(run).ok_or(HelperError::Usage("a run is 32 hexadecimal digits"))?;
    let dir = run_dir()?;
    let mut asked = 0;
    for entry in std::fs::read_dir(&dir)? {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "sock") && ask_reap(&path, owner, run) {
            asked += 1;
        }
    }
    println!("{asked}");
    Ok(())
}

/// Greets one session and sends it `Reap`; whether it was asked.
fn ask_reap(path: &Path, owner: [u8; 16], run: [u8; 16]) -> bool {
    let mut sock = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                let _ = std::fs::remove_file(path);
            }
            return false;
        }
    };
    if check_peer(&sock).is_err()
        || sock.set_read_timeout(Some(REAP_TIMEOUT)).is_err()
        || sock.set_write_timeout(Some(REAP_TIMEOUT)).is_err()
    {
        return false;
    }
    let mut magic = [0u8; 12];
    if sock.read_exact(&mut magic).is_err() || &magic != wire::MAGIC {
        return false;
    }
    let mut buf = BytesMut::new();
    loop {
        match Frame::decode(&mut buf) {
            Ok(Some(Frame::Hello { .. })) => break,
            Ok(None) => {
                let mut chunk = [0u8; 256];
                match sock.read(&mut chunk) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            _ => return false,
        }
    }
    sock.write_all(&Frame::Reap { owner, run }.to_bytes())
        .is_ok()
}

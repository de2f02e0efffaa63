//! Where held sessions meet: one Unix socket per session, named by its
//! id, in `${XDG_CACHE_HOME:-$HOME/.cache}/sshshim/run` (0700, ours).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use super::HelperError;
use crate::paths;
use crate::resume::wire::SessionId;

/// The run directory, created private (0700, owned by us) if missing and
/// refused if someone else could have swapped it.
pub fn run_dir() -> Result<PathBuf, HelperError> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| paths::home_dir().map(|h| h.join(".cache")))
        .ok_or(HelperError::NoHome)?;
    let dir = base.join("sshshim").join("run");
    paths::create_private_dir(&dir)?;
    Ok(dir)
}

pub use crate::resume::wire::hex;

/// 16 bytes from 32 hex digits; `None` for anything else.
pub fn parse_id(s: &str) -> Option<[u8; 16]> {
    crate::resume::wire::unhex(s)?.try_into().ok()
}

/// The socket of session `id` in `dir`.
pub fn socket_path(dir: &Path, id: &SessionId) -> PathBuf {
    dir.join(format!("{}.sock", hex(id)))
}

/// Fails unless the process at the other end of `s` runs as our uid.
pub fn check_peer(s: &impl AsRawFd) -> io::Result<()> {
    let uid = peer_uid(s.as_raw_fd())?;
    let ours = paths::my_uid();
    if uid != ours {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the socket's peer runs as uid {uid}, not ours ({ours})"),
        ));
    }
    Ok(())
}

/// The uid of the peer of Unix socket `fd` (SO_PEERCRED: the credentials
/// it had when it connected or listened).
fn peer_uid(fd: RawFd) -> io::Result<u32> {
    // SAFETY: ucred is plain data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writing and `len` is its size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_bad_ones_are_refused() {
        let id = [0xab; 16];
        assert_eq!(parse_id(&hex(&id)), Some(id));
        assert_eq!(parse_id("abc"), None);
        assert_eq!(parse_id(&"g".repeat(32)), None);
        assert_eq!(parse_id(&format!("{}/", "a".repeat(31))), None);
    }
}

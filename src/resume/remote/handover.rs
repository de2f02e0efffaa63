//! Handing a channel's stdin and stdout from a relay to its session's
//! daemon (SCM_RIGHTS over the session's socket), so the daemon reads and
//! writes sshd's pipes itself and no process copies the bytes in between.
//!
//! The relay sends [`MARKER`] with the two descriptors; a connection whose
//! first bytes come without descriptors speaks the protocol on the socket
//! itself (`reap`, and helpers of other versions).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// What a relay sends along with the descriptors: an empty frame, which
/// no frame on the socket can be.
pub const MARKER: [u8; 4] = [0; 4];

/// Room for the control message of two descriptors.
const CMSG_ROOM: usize = 64;

/// Sends [`MARKER`] with `fds` (stdin, stdout) over the Unix socket `sock`.
pub fn send(sock: RawFd, fds: [RawFd; 2]) -> io::Result<()> {
    let mut data = MARKER;
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut room = [0u64; CMSG_ROOM / 8];
    let payload = std::mem::size_of_val(&fds) as u32;
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = room.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as _;
    // SAFETY: msg_control points at `room`, which is larger than
    // CMSG_SPACE(payload), so the first header and its data fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), 2);
    }
    loop {
        // SAFETY: `msg` and everything it points at live across the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            // Four bytes go out whole on a fresh stream socket.
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What the first read of a connection brought.
pub enum First {
    /// A relay's stdin and stdout.
    Channel(OwnedFd, OwnedFd),
    /// Bytes of frames on the socket itself (empty: the peer closed).
    Bytes(Vec<u8>),
}

/// Reads a connection's first bytes, and the descriptors that came with
/// them (close-on-exec). Fails with `WouldBlock` when nothing is there yet,
/// and with `InvalidData` for descriptors that are not a relay's handover.
pub fn receive(sock: RawFd) -> io::Result<First> {
    let mut data = [0u8; 256];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut room = [0u64; CMSG_ROOM / 8];
    // SAFETY: msghdr is plain data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = room.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_ROOM as _;
    // SAFETY: `msg` points at buffers valid for their stated lengths.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of well-formed
    // headers; CMSG_NXTHDR stays within them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    // The descriptors are ours now: owned, so closed on any path.
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let data = &data[..n as usize];
    if fds.is_empty() {
        return Ok(First::Bytes(data.to_vec()));
    }
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if data != MARKER || fds.len() != 2 || truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected descriptors on the session's socket",
        ));
    }
    let out = fds.pop().expect("two");
    let inp = fds.pop().expect("two");
    Ok(First::Channel(inp, out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_arrive_and_plain_bytes_stay_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut in_r, in_w) = UnixStream::pair().unwrap();
        let (out_r, mut out_w) = UnixStream::pair().unwrap();
        send(a.as_raw_fd(), [in_w.as_raw_fd(), out_r.as_raw_fd()]).unwrap();
        let First::Channel(i, o) = receive(b.as_raw_fd()).unwrap() else {
            panic!("no descriptors");
        };
        let mut i = UnixStream::from(i);
        let mut o = UnixStream::from(o);
        i.write_all(b"up").unwrap();
        out_w.write_all(b"down").unwrap();
        let mut got = [0u8; 2];
        in_r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"up");
        let mut got = [0u8; 4];
        o.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"down");

        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"\0\0\0\x05hello").unwrap();
        let First::Bytes(got) = receive(b.as_raw_fd()).unwrap() else {
            panic!("descriptors from nowhere");
        };
        assert_eq!(got, b"\0\0\0\x05hello");
        drop(a);
        assert!(matches!(receive(b.as_raw_fd()), Ok(First::Bytes(v)) if v.is_empty()));
    }
}

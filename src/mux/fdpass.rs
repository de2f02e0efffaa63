//! The control connection's byte level: packets read with `recvmsg`
//! exactly to their end, descriptors received one per 1-byte message as
//! OpenSSH's `mm_send_fd` sends them, and replies written out.
//!
//! OpenSSH attaches each descriptor (SCM_RIGHTS) to a 1-byte message sent
//! right after the request packet. A buffered reader would read ahead into
//! that byte and the kernel would hand the descriptor to a read that does
//! not expect it, so this module never asks the socket for more than the
//! rest of the current packet. Every read goes through `recvmsg` with room
//! for control messages: a descriptor that arrives where none is expected
//! is received (with close-on-exec set atomically by `MSG_CMSG_CLOEXEC`)
//! and closed, never leaked.
//!
//! Everything works on a tokio [`UnixStream`] through readiness and
//! `try_io`, with plain `libc::recvmsg`/`send`: the few lines of unsafe
//! code are simpler than a crate for fd passing, none of which offers
//! "exactly n bytes, descriptors per message" on a tokio stream.
//! [`PacketReader::read_packet`] keeps its progress in `self`, so it is
//! cancel-safe (usable in `select!`).

use std::fmt;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::UnixStream;

use super::proto::{self, DecodeError};

/// Descriptors one message may carry before it counts as hostile; OpenSSH
/// sends exactly one.
const MAX_FDS_PER_MESSAGE: usize = 4;

/// Why reading from the control connection failed.
#[derive(Debug)]
pub enum ControlError {
    /// The socket failed.
    Io(io::Error),
    /// The client closed the connection in the middle of a packet.
    ClosedMidPacket,
    /// The length header announced an oversized packet.
    Decode(DecodeError),
    /// The connection closed before a promised descriptor arrived.
    ClosedBeforeDescriptor,
    /// A byte arrived where a descriptor was expected, without one.
    NoDescriptor,
    /// A message carried more than one descriptor.
    ExtraDescriptors(usize),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Io(e) => write!(f, "control socket: {e}"),
            ControlError::ClosedMidPacket => f.write_str("client closed the connection mid-packet"),
            ControlError::Decode(e) => e.fmt(f),
            ControlError::ClosedBeforeDescriptor => {
                f.write_str("client closed the connection before sending its descriptors")
            }
            ControlError::NoDescriptor => {
                f.write_str("expected a passed descriptor, got a plain byte")
            }
            ControlError::ExtraDescriptors(n) => {
                write!(f, "expected one passed descriptor, got {n}")
            }
        }
    }
}

impl std::error::Error for ControlError {}

impl From<io::Error> for ControlError {
    fn from(e: io::Error) -> Self {
        ControlError::Io(e)
    }
}

/// Reads whole packets from a control connection, never past their end.
#[derive(Debug, Default)]
pub struct PacketReader {
    /// The length header, filled up to `header_have`.
    header: [u8; 4],
    /// Bytes of `header` received.
    header_have: usize,
    /// The body, allocated once the header is complete.
    body: Option<Vec<u8>>,
    /// Bytes of `body` received.
    body_have: usize,
}

impl PacketReader {
    /// A reader at a packet boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next packet body (without its length header). `Ok(None)`
    /// is a clean end of stream at a packet boundary. Cancel-safe: progress
    /// is kept in `self`. Descriptors that arrive with packet bytes are
    /// closed.
    pub async fn read_packet(
        &mut self,
        sock: &UnixStream,
    ) -> Result<Option<Vec<u8>>, ControlError> {
        loop {
            if self.header_have < 4 {
                let have = self.header_have;
                let n = recv_some(sock, &mut self.header[have..]).await?;
                if n == 0 {
                    return if have == 0 {
                        Ok(None)
                    } else {
                        Err(ControlError::ClosedMidPacket)
                    };
                }
                self.header_have += n;
                if self.header_have == 4 {
                    let len = proto::body_len(self.header).map_err(ControlError::Decode)?;
                    self.body = Some(vec![0; len]);
                    self.body_have = 0;
                }
                continue;
            }
            let body = self.body.get_or_insert_with(Vec::new);
            if self.body_have == body.len() {
                let done = mem::take(body);
                *self = Self::default();
                return Ok(Some(done));
            }
            let n = recv_some(sock, &mut body[self.body_have..]).await?;
            if n == 0 {
                return Err(ControlError::ClosedMidPacket);
            }
            self.body_have += n;
        }
    }
}

/// Receives into `buf` once the socket is readable; descriptors that come
/// along are dropped (closed). Cancel-safe: the only await is readiness.
async fn recv_some(sock: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        sock.readable().await?;
        match sock.try_io(Interest::READABLE, || recv_with_fds(sock.as_raw_fd(), buf)) {
            Ok(r) => {
                if !r.fds.is_empty() {
                    tracing::debug!(
                        count = r.fds.len(),
                        "closed descriptors sent with a control packet"
                    );
                }
                return Ok(r.len);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives one descriptor sent as OpenSSH does: a 1-byte message carrying
/// exactly one SCM_RIGHTS descriptor. The descriptor is close-on-exec.
/// Cancel-safe.
pub async fn recv_fd(sock: &UnixStream) -> Result<OwnedFd, ControlError> {
    let mut byte = [0u8; 1];
    let mut r = loop {
        sock.readable().await?;
        match sock.try_io(Interest::READABLE, || {
            recv_with_fds(sock.as_raw_fd(), &mut byte)
        }) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if r.len == 0 {
        return Err(ControlError::ClosedBeforeDescriptor);
    }
    if r.truncated {
        return Err(ControlError::ExtraDescriptors(MAX_FDS_PER_MESSAGE + 1));
    }
    match r.fds.len() {
        0 => Err(ControlError::NoDescriptor),
        1 => Ok(r.fds.remove(0)),
        n => Err(ControlError::ExtraDescriptors(n)),
    }
}

/// Waits until the peer closes the connection or sends more data, without
/// consuming anything. `Ok(true)` is end of stream (or a reset), `Ok(false)`
/// means bytes are waiting. Cancel-safe.
pub async fn wait_readable_or_eof(sock: &UnixStream) -> io::Result<bool> {
    loop {
        sock.readable().await?;
        let mut b = [0u8; 1];
        let r = sock.try_io(Interest::READABLE, || {
            // SAFETY: b is a valid 1-byte buffer for the duration of the call.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match r {
            Ok(0) => return Ok(true),
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(true),
            Err(e) => return Err(e),
        }
    }
}

/// Writes all of `bytes` (one or more framed packets). Not cancel-safe:
/// run it to completion, e.g. from a dedicated writer task.
pub async fn write_all(sock: &UnixStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        sock.writable().await?;
        let r = sock.try_io(Interest::WRITABLE, || {
            // SAFETY: bytes is a valid buffer of the given length; MSG_NOSIGNAL
            // turns a closed peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(
                    sock.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends one descriptor as OpenSSH's clients do (a 1-byte message with one
/// SCM_RIGHTS descriptor) on a blocking or non-blocking socket; `WouldBlock`
/// is returned as is. The client side, for tests and tools.
pub fn send_fd(sock: BorrowedFd<'_>, fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut space = CmsgBuf::new();
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) } as _;
    // SAFETY: msg_control points at a zeroed, aligned buffer of at least
    // msg_controllen bytes, so the first header is in bounds.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd.as_raw_fd());
    }
    // SAFETY: msg and everything it points to outlive the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    match n {
        1 => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("sendmsg sent no byte with the descriptor")),
    }
}

/// What one `recvmsg` returned.
struct Received {
    /// Payload bytes.
    len: usize,
    /// Descriptors that came with them, now owned.
    fds: Vec<OwnedFd>,
    /// The control buffer was too small (the kernel closed the excess).
    truncated: bool,
}

/// An aligned control-message buffer with room for [`MAX_FDS_PER_MESSAGE`].
struct CmsgBuf {
    /// u64 words keep the buffer aligned for `cmsghdr`.
    words: [u64; 8],
}

impl CmsgBuf {
    /// A zeroed buffer.
    fn new() -> Self {
        CmsgBuf { words: [0; 8] }
    }

    /// Usable size in bytes.
    fn len() -> usize {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let need =
            unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * mem::size_of::<RawFd>()) as u32) };
        (need as usize).min(mem::size_of::<[u64; 8]>())
    }

    /// Pointer for `msg_control`.
    fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.words.as_mut_ptr().cast()
    }
}

/// One non-blocking `recvmsg` into `buf`, collecting SCM_RIGHTS descriptors
/// (close-on-exec) into owned values.
fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut space = CmsgBuf::new();
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr();
    msg.msg_controllen = CmsgBuf::len() as _;
    // SAFETY: msg points at valid buffers that outlive the call.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of
    // well-formed control messages; the CMSG_* macros walk them in bounds.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header = libc::CMSG_LEN(0) as usize;
                let count =
                    ((*cmsg).cmsg_len as usize).saturating_sub(header) / mem::size_of::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel just installed this descriptor for us.
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream as StdStream;

    /// Fails a test that has not finished within ten seconds.
    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(10), f)
            .await
            .expect("test timed out")
    }

    /// A tokio stream and the blocking client end.
    fn pair() -> (UnixStream, StdStream) {
        let (a, b) = StdStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (UnixStream::from_std(a).unwrap(), b)
    }

    fn cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD on a valid descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags & libc::FD_CLOEXEC != 0
    }

    #[tokio::test]
    async fn packet_then_descriptors_are_read_exactly() {
        bounded(async move {
            let (server, mut client) = pair();
            let (mut r1, mut w1) = StdStream::pair().unwrap();
            // Packet, then two descriptors, then a second packet: all queued
            // before the server reads anything.
            client.write_all(&[0, 0, 0, 3, 7, 8, 9]).unwrap();
            send_fd(client.as_fd(), w1.as_fd()).unwrap();
            send_fd(client.as_fd(), client.as_fd()).unwrap();
            client.write_all(&[0, 0, 0, 1, 42]).unwrap();

            let mut reader = PacketReader::new();
            assert_eq!(
                reader.read_packet(&server).await.unwrap(),
                Some(vec![7, 8, 9])
            );
            let fd = recv_fd(&server).await.unwrap();
            assert!(cloexec(&fd));
            // A copy of the client's own end: dropped below so EOF can arrive.
            let second = recv_fd(&server).await.unwrap();
            assert_eq!(reader.read_packet(&server).await.unwrap(), Some(vec![42]));

            // The received descriptor is the socket we sent.
            let mut passed = StdStream::from(fd);
            passed.write_all(b"x").unwrap();
            drop(passed);
            w1.write_all(b"y").unwrap();
            drop(w1);
            let mut got = Vec::new();
            r1.read_to_end(&mut got).unwrap();
            assert_eq!(got, b"xy");

            drop((client, second));
            assert_eq!(reader.read_packet(&server).await.unwrap(), None);
        })
        .await
    }

    #[tokio::test]
    async fn byte_by_byte_delivery_is_reassembled() {
        bounded(async move {
            let (server, mut client) = pair();
            let writer = std::thread::spawn(move || {
                for b in [0u8, 0, 0, 2, 1, 2] {
                    client.write_all(&[b]).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                client
            });
            let mut reader = PacketReader::new();
            assert_eq!(reader.read_packet(&server).await.unwrap(), Some(vec![1, 2]));
            drop(writer.join().unwrap());
            assert_eq!(reader.read_packet(&server).await.unwrap(), None);
        })
        .await
    }

    #[tokio::test]
    async fn hostile_streams_are_errors() {
        bounded(async move {
            // Oversized length.
            let (server, mut client) = pair();
            client.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
            let e = PacketReader::new().read_packet(&server).await.unwrap_err();
            assert!(
                matches!(e, ControlError::Decode(DecodeError::TooLarge(_))),
                "{e}"
            );

            // EOF inside a header and inside a body.
            for bytes in [&[0u8, 0][..], &[0, 0, 0, 5, 1][..]] {
                let (server, mut client) = pair();
                client.write_all(bytes).unwrap();
                drop(client);
                let e = PacketReader::new().read_packet(&server).await.unwrap_err();
                assert!(matches!(e, ControlError::ClosedMidPacket), "{e}");
            }

            // A plain byte where a descriptor should be; then EOF.
            let (server, mut client) = pair();
            client.write_all(b"z").unwrap();
            drop(client);
            assert!(matches!(
                recv_fd(&server).await.unwrap_err(),
                ControlError::NoDescriptor
            ));
            assert!(matches!(
                recv_fd(&server).await.unwrap_err(),
                ControlError::ClosedBeforeDescriptor
            ));

            // A descriptor riding on a packet byte is closed, not leaked, and
            // the packet still reads correctly.
            let (server, mut client) = pair();
            client.write_all(&[0, 0, 0]).unwrap();
            send_fd(client.as_fd(), client.as_fd()).unwrap(); // byte 0 of length
            client.write_all(&[9]).unwrap();
            // Length is [0,0,0,0] then body... the 4th header byte was the fd byte.
            let mut reader = PacketReader::new();
            assert_eq!(reader.read_packet(&server).await.unwrap(), Some(vec![]));
        })
        .await
    }

    #[tokio::test]
    async fn eof_watch_does_not_consume() {
        bounded(async move {
            let (server, mut client) = pair();
            client.write_all(&[0, 0, 0, 1, 5]).unwrap();
            assert!(!wait_readable_or_eof(&server).await.unwrap());
            let mut reader = PacketReader::new();
            assert_eq!(reader.read_packet(&server).await.unwrap(), Some(vec![5]));
            drop(client);
            assert!(wait_readable_or_eof(&server).await.unwrap());
        })
        .await
    }

    #[tokio::test]
    async fn write_all_reaches_the_peer() {
        bounded(async move {
            let (server, mut client) = pair();
            let big = vec![7u8; 1 << 20];
            let expect = big.clone();
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; expect.len()];
                client.read_exact(&mut got).unwrap();
                assert_eq!(got, expect);
            });
            write_all(&server, &big).await.unwrap();
            reader.join().unwrap();
        })
        .await
    }
}

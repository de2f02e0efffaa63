//! Async I/O over descriptors a mux client passed us (its stdin, stdout,
//! stderr), and the terminal facts a pty request needs.
//!
//! A passed descriptor shares its open file description, and so its
//! `O_NONBLOCK` flag, with the user's shell and every process that
//! inherited it: setting the flag and dying (or two sessions saving and
//! restoring it out of order, as with `2>&1`) leaves the shell's stdin
//! non-blocking and breaks it. So [`FdReader`] and [`FdWriter`] never
//! change the flags of a passed description:
//!
//! | kind | how |
//! |---|---|
//! | socket | epoll readiness, `recv`/`send` with `MSG_DONTWAIT` (per call) |
//! | pipe, FIFO | reopened through `/proc/self/fd/N` as a new description of the same pipe, non-blocking; without /proc, the blocking pool |
//! | tty, read | epoll readiness, then `poll(0)` and a read bounded by `FIONREAD`, which cannot block |
//! | tty, write | tokio's blocking pool (a stopped terminal, Ctrl-S, blocks only that thread) |
//! | `/dev/null` | nothing at all: reads end at once, writes are discarded |
//! | regular file, other | tokio's blocking pool (epoll refuses regular files) |
//!
//! Reads never run on the blocking pool for a tty, nor for a pipe unless
//! /proc is missing: a read left waiting there after the session ended
//! would swallow the user's next keystroke or the next producer's data.
//!
//! A write to a pipe whose reader has gone raises SIGPIPE; Rust programs
//! ignore that signal by default, so the write fails with EPIPE instead.
//!
//! Writers accept data at once on the blocking pool (write-behind, as
//! `tokio::fs::File` does): call `flush` (or `shutdown`) and wait for it
//! before telling the client the session ended, or output may be cut short.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// What a descriptor refers to, as far as I/O strategy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// A terminal.
    Tty,
    /// A socket of any family.
    Socket,
    /// An anonymous pipe or a FIFO.
    Pipe,
    /// `/dev/null`: nothing to read, nothing kept. (Scripts, `ssh -n` and
    /// IDEs pass it as stdin: served without a trip to the blocking pool.)
    Null,
    /// A regular file or another device.
    File,
}

impl FdKind {
    /// Classifies `fd` with fstat and isatty.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
        let st = fstat(fd.as_raw_fd())?;
        Ok(match st.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => FdKind::Socket,
            libc::S_IFIFO => FdKind::Pipe,
            libc::S_IFCHR if (libc::major(st.st_rdev), libc::minor(st.st_rdev)) == (1, 3) => {
                FdKind::Null
            }
            libc::S_IFCHR if is_tty(fd) => FdKind::Tty,
            _ => FdKind::File,
        })
    }
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// A terminal's size, in the units of an SSH pty-req / window-change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
    /// Width in pixels (often 0).
    pub xpixel: u32,
    /// Height in pixels (often 0).
    pub ypixel: u32,
}

/// The size of the terminal `fd` (TIOCGWINSZ).
pub fn window_size(fd: BorrowedFd<'_>) -> io::Result<WindowSize> {
    // SAFETY: winsize is plain data; TIOCGWINSZ fills it.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out pointer.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(WindowSize {
        cols: ws.ws_col.into(),
        rows: ws.ws_row.into(),
        xpixel: ws.ws_xpixel.into(),
        ypixel: ws.ws_ypixel.into(),
    })
}

/// The modes of the terminal `fd` (tcgetattr), encoded for a pty-req as
/// OpenSSH's client encodes them: output and input speed, the control
/// characters (a disabled one as 255), then each input, local, output and
/// control flag as 0 or 1. Take them as soon as the descriptors arrive:
/// the client switches its terminal to raw mode once the session opens.
pub fn terminal_modes(fd: BorrowedFd<'_>) -> io::Result<Vec<(russh::Pty, u32)>> {
    use russh::Pty as P;
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out pointer.
    if unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) } == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: reading the speed fields of an initialised termios.
    let (ospeed, ispeed) = unsafe { (libc::cfgetospeed(&t), libc::cfgetispeed(&t)) };
    let mut modes = vec![
        (P::TTY_OP_OSPEED, speed_to_baud(ospeed)),
        (P::TTY_OP_ISPEED, speed_to_baud(ispeed)),
    ];
    let chars = [
        (P::VINTR, libc::VINTR),
        (P::VQUIT, libc::VQUIT),
        (P::VERASE, libc::VERASE),
        (P::VKILL, libc::VKILL),
        (P::VEOF, libc::VEOF),
        (P::VEOL, libc::VEOL),
        (P::VEOL2, libc::VEOL2),
        (P::VSTART, libc::VSTART),
        (P::VSTOP, libc::VSTOP),
        (P::VSUSP, libc::VSUSP),
        (P::VREPRINT, libc::VREPRINT),
        (P::VWERASE, libc::VWERASE),
        (P::VLNEXT, libc::VLNEXT),
        (P::VDISCARD, libc::VDISCARD),
    ];
    for (op, idx) in chars {
        let c = t.c_cc[idx];
        // _POSIX_VDISABLE is 0 on Linux; the wire value for "disabled" is 255.
        modes.push((op, if c == 0 { 255 } else { c.into() }));
    }
    let flags = [
        (P::IGNPAR, t.c_iflag, libc::IGNPAR),
        (P::PARMRK, t.c_iflag, libc::PARMRK),
        (P::INPCK, t.c_iflag, libc::INPCK),
        (P::ISTRIP, t.c_iflag, libc::ISTRIP),
        (P::INLCR, t.c_iflag, libc::INLCR),
        (P::IGNCR, t.c_iflag, libc::IGNCR),
        (P::ICRNL, t.c_iflag, libc::ICRNL),
        (P::IUCLC, t.c_iflag, libc::IUCLC),
        (P::IXON, t.c_iflag, libc::IXON),
        (P::IXANY, t.c_iflag, libc::IXANY),
        (P::IXOFF, t.c_iflag, libc::IXOFF),
        (P::IMAXBEL, t.c_iflag, libc::IMAXBEL),
        (P::IUTF8, t.c_iflag, libc::IUTF8),
        (P::ISIG, t.c_lflag, libc::ISIG),
        (P::ICANON, t.c_lflag, libc::ICANON),
        (P::XCASE, t.c_lflag, libc::XCASE),
        (P::ECHO, t.c_lflag, libc::ECHO),
        (P::ECHOE, t.c_lflag, libc::ECHOE),
        (P::ECHOK, t.c_lflag, libc::ECHOK),
        (P::ECHONL, t.c_lflag, libc::ECHONL),
        (P::NOFLSH, t.c_lflag, libc::NOFLSH),
        (P::TOSTOP, t.c_lflag, libc::TOSTOP),
        (P::IEXTEN, t.c_lflag, libc::IEXTEN),
        (P::ECHOCTL, t.c_lflag, libc::ECHOCTL),
        (P::ECHOKE, t.c_lflag, libc::ECHOKE),
        (P::PENDIN, t.c_lflag, libc::PENDIN),
        (P::OPOST, t.c_oflag, libc::OPOST),
        (P::OLCUC, t.c_oflag, libc::OLCUC),
        (P::ONLCR, t.c_oflag, libc::ONLCR),
        (P::OCRNL, t.c_oflag, libc::OCRNL),
        (P::ONOCR, t.c_oflag, libc::ONOCR),
        (P::ONLRET, t.c_oflag, libc::ONLRET),
        // Bit tests like OpenSSH's: CS8 also reads as CS7 set.
        (P::CS7, t.c_cflag, libc::CS7),
        (P::CS8, t.c_cflag, libc::CS8),
        (P::PARENB, t.c_cflag, libc::PARENB),
        (P::PARODD, t.c_cflag, libc::PARODD),
    ];
    for (op, field, bit) in flags {
        modes.push((op, u32::from(field & bit != 0)));
    }
    Ok(modes)
}

/// A termios speed constant as a baud rate (9600 for unknown ones, as
/// OpenSSH does).
fn speed_to_baud(speed: libc::speed_t) -> u32 {
    const TABLE: &[(libc::speed_t, u32)] = &[
        (libc::B0, 0),
        (libc::B50, 50),
        (libc::B75, 75),
        (libc::B110, 110),
        (libc::B134, 134),
        (libc::B150, 150),
        (libc::B200, 200),
        (libc::B300, 300),
        (libc::B600, 600),
        (libc::B1200, 1200),
        (libc::B1800, 1800),
        (libc::B2400, 2400),
        (libc::B4800, 4800),
        (libc::B9600, 9600),
        (libc::B19200, 19200),
        (libc::B38400, 38400),
        (libc::B57600, 57600),
        (libc::B115200, 115_200),
        (libc::B230400, 230_400),
    ];
    TABLE
        .iter()
        .find(|(s, _)| *s == speed)
        .map_or(9600, |(_, b)| *b)
}

/// fstat as a Result.
fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer; a bad fd is an error, not UB.
    if unsafe { libc::fstat(fd, &mut st) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Opens a new, non-blocking description of the pipe behind `fd` through
/// /proc, checking it is the same pipe. `write` picks the access mode.
fn reopen_pipe(fd: BorrowedFd<'_>, write: bool) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}\0", fd.as_raw_fd());
    let mode = if write {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    let flags = mode | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: path is NUL-terminated; open returns a new descriptor or -1.
    let raw = unsafe { libc::open(path.as_bytes().as_ptr().cast(), flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this descriptor to us.
    let new = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    let (a, b) = (fstat(fd.as_raw_fd())?, fstat(new.as_raw_fd())?);
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
        return Err(io::Error::other("reopened descriptor is not the same pipe"));
    }
    Ok(new)
}

/// Registers `fd` with epoll; gives it back if epoll refuses it.
fn try_async(fd: OwnedFd, interest: Interest) -> Result<AsyncFd<OwnedFd>, OwnedFd> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged until the
    // AsyncFd that owns it is dropped.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().0)
}

/// How an epoll-driven descriptor is read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// recv/send with MSG_DONTWAIT.
    Socket,
    /// Plain read/write on our own non-blocking description.
    NonBlocking,
    /// A blocking tty read only after poll(0) says it will not block.
    Tty,
}

/// Reads a passed descriptor without blocking the runtime or changing the
/// descriptor's flags. Owns (and finally closes) the descriptor.
#[derive(Debug)]
pub struct FdReader {
    /// The strategy in use.
    inner: ReadInner,
    /// What the descriptor is.
    kind: FdKind,
}

/// [`FdReader`]'s strategies.
#[derive(Debug)]
enum ReadInner {
    /// Epoll readiness.
    Async(AsyncFd<OwnedFd>, Mode),
    /// Blocking reads on tokio's blocking pool.
    Blocking(tokio::fs::File),
    /// `/dev/null`, kept only to be closed: always at end of file.
    Null(OwnedFd),
}

impl FdReader {
    /// Wraps `fd` (must be called within a tokio runtime).
    pub fn new(fd: OwnedFd) -> io::Result<FdReader> {
        let kind = FdKind::of(fd.as_fd())?;
        let inner = match kind {
            FdKind::Socket => match try_async(fd, Interest::READABLE) {
                Ok(a) => ReadInner::Async(a, Mode::Socket),
                Err(fd) => blocking(fd),
            },
            FdKind::Tty => match try_async(fd, Interest::READABLE) {
                Ok(a) => ReadInner::Async(a, Mode::Tty),
                Err(fd) => blocking(fd),
            },
            FdKind::Pipe => match reopen_pipe(fd.as_fd(), false) {
                Ok(own) => match try_async(own, Interest::READABLE) {
                    Ok(a) => ReadInner::Async(a, Mode::NonBlocking),
                    Err(_) => blocking(fd),
                },
                Err(e) => {
                    tracing::debug!("cannot reopen a passed pipe ({e}); reading it blocking");
                    blocking(fd)
                }
            },
            FdKind::Null => ReadInner::Null(fd),
            FdKind::File => blocking(fd),
        };
        Ok(FdReader { inner, kind })
    }

    /// What the descriptor is.
    pub fn kind(&self) -> FdKind {
        self.kind
    }
}

/// A blocking-pool wrapper around `fd`.
fn blocking(fd: OwnedFd) -> ReadInner {
    ReadInner::Blocking(tokio::fs::File::from_std(File::from(fd)))
}

impl AsFd for FdReader {
    /// The descriptor being read (for [`window_size`] on a tty).
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            ReadInner::Async(a, _) => a.get_ref().as_fd(),
            ReadInner::Blocking(f) => f.as_fd(),
            ReadInner::Null(fd) => fd.as_fd(),
        }
    }
}

/// One non-blocking read attempt for `mode`; `WouldBlock` if nothing is
/// there.
fn read_now(fd: RawFd, mode: Mode, buf: &mut [u8]) -> io::Result<usize> {
    let mut len = buf.len();
    if mode == Mode::Tty {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut avail: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } == 0 && avail > 0 {
            // Never ask for more than is there: with VMIN > 1 a larger
            // read on this blocking descriptor could wait.
            len = len.min(avail as usize);
        }
    }
    // SAFETY: buf is valid for len bytes.
    let n = unsafe {
        match mode {
            Mode::Socket => libc::recv(fd, buf.as_mut_ptr().cast(), len, libc::MSG_DONTWAIT),
            Mode::NonBlocking | Mode::Tty => libc::read(fd, buf.as_mut_ptr().cast(), len),
        }
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        // A hung-up tty reads EIO: that is its end of file.
        if mode == Mode::Tty && e.raw_os_error() == Some(libc::EIO) {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

impl AsyncRead for FdReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.inner {
            ReadInner::Blocking(f) => Pin::new(f).poll_read(cx, buf),
            ReadInner::Null(_) => Poll::Ready(Ok(())),
            ReadInner::Async(a, mode) => loop {
                let mut guard = ready!(a.poll_read_ready(cx))?;
                let unfilled = buf.initialize_unfilled();
                match guard.try_io(|fd| read_now(fd.as_raw_fd(), *mode, unfilled)) {
                    Ok(Ok(n)) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Ok(Err(e)) => return Poll::Ready(Err(e)),
                    Err(_would_block) => continue,
                }
            },
        }
    }
}

/// Writes a passed descriptor without blocking the runtime or changing the
/// descriptor's flags. Owns (and finally closes) the descriptor. Flush
/// before reporting the session's end (see the module docs).
#[derive(Debug)]
pub struct FdWriter {
    /// The strategy in use.
    inner: WriteInner,
    /// What the descriptor is.
    kind: FdKind,
}

/// [`FdWriter`]'s strategies.
#[derive(Debug)]
enum WriteInner {
    /// Epoll readiness.
    Async(AsyncFd<OwnedFd>, Mode),
    /// Write-behind on tokio's blocking pool.
    Blocking(tokio::fs::File),
    /// `/dev/null`, kept only to be closed: every write succeeds at once.
    Null(OwnedFd),
}

impl FdWriter {
    /// Wraps `fd` (must be called within a tokio runtime).
    pub fn new(fd: OwnedFd) -> io::Result<FdWriter> {
        let kind = FdKind::of(fd.as_fd())?;
        let file = |fd: OwnedFd| WriteInner::Blocking(tokio::fs::File::from_std(File::from(fd)));
        let inner = match kind {
            FdKind::Socket => match try_async(fd, Interest::WRITABLE) {
                Ok(a) => WriteInner::Async(a, Mode::Socket),
                Err(fd) => file(fd),
            },
            FdKind::Pipe => match reopen_pipe(fd.as_fd(), true) {
                Ok(own) => match try_async(own, Interest::WRITABLE) {
                    Ok(a) => WriteInner::Async(a, Mode::NonBlocking),
                    Err(_) => file(fd),
                },
                // ENXIO: no reader left; a plain write reports EPIPE.
                Err(_) => file(fd),
            },
            FdKind::Null => WriteInner::Null(fd),
            FdKind::Tty | FdKind::File => file(fd),
        };
        Ok(FdWriter { inner, kind })
    }

    /// What the descriptor is.
    pub fn kind(&self) -> FdKind {
        self.kind
    }
}

impl AsFd for FdWriter {
    /// The descriptor being written.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.inner {
            WriteInner::Async(a, _) => a.get_ref().as_fd(),
            WriteInner::Blocking(f) => f.as_fd(),
            WriteInner::Null(fd) => fd.as_fd(),
        }
    }
}

/// One non-blocking write attempt.
fn write_now(fd: RawFd, mode: Mode, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for its length.
    let n = unsafe {
        match mode {
            Mode::Socket => libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            ),
            Mode::NonBlocking | Mode::Tty => libc::write(fd, buf.as_ptr().cast(), buf.len()),
        }
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl AsyncWrite for FdWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            WriteInner::Blocking(f) => Pin::new(f).poll_write(cx, buf),
            WriteInner::Null(_) => Poll::Ready(Ok(buf.len())),
            WriteInner::Async(a, mode) => loop {
                let mut guard = ready!(a.poll_write_ready(cx))?;
                match guard.try_io(|fd| write_now(fd.as_raw_fd(), *mode, buf)) {
                    Ok(r) => return Poll::Ready(r),
                    Err(_would_block) => continue,
                }
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            WriteInner::Blocking(f) => Pin::new(f).poll_flush(cx),
            WriteInner::Async(..) | WriteInner::Null(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Only flush: the client still holds its copy of the descriptor,
        // and the reader sees end of file once every copy is closed.
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream as StdStream;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Fails a test that has not finished within ten seconds.
    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(10), f)
            .await
            .expect("test timed out")
    }

    /// The file status flags of `fd`.
    fn status_flags(fd: BorrowedFd<'_>) -> i32 {
        // SAFETY: F_GETFL on a valid descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
    }

    /// A pipe as (read end, write end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just created both.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// A pty as (master, slave).
    fn pty() -> (File, OwnedFd) {
        // SAFETY: standard pty allocation; every return value is checked.
        unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(m >= 0, "posix_openpt: {}", io::Error::last_os_error());
            assert_eq!(libc::grantpt(m), 0);
            assert_eq!(libc::unlockpt(m), 0);
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
            let s = libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            );
            assert!(s >= 0);
            (File::from_raw_fd(m), OwnedFd::from_raw_fd(s))
        }
    }

    #[tokio::test]
    async fn pipes_flow_and_keep_their_flags() {
        bounded(async move {
            let (r, w) = pipe();
            // The client's copies: what the user's shell would keep using.
            let (r_client, w_client) = (r.try_clone().unwrap(), w.try_clone().unwrap());
            let (before_r, before_w) = (
                status_flags(r_client.as_fd()),
                status_flags(w_client.as_fd()),
            );
            assert_eq!(before_r & libc::O_NONBLOCK, 0);

            let mut reader = FdReader::new(r).unwrap();
            let mut writer = FdWriter::new(w).unwrap();
            assert_eq!((reader.kind(), writer.kind()), (FdKind::Pipe, FdKind::Pipe));
            // Nothing to read yet: a read must wait, not block the runtime.
            let mut buf = [0u8; 16];
            let early =
                tokio::time::timeout(std::time::Duration::from_millis(50), reader.read(&mut buf))
                    .await;
            assert!(early.is_err(), "read returned without data");

            let big = vec![5u8; 300_000]; // more than a pipe buffer
            let expect = big.len();
            let w_task = tokio::spawn(async move {
                writer.write_all(&big).await.unwrap();
                writer.flush().await.unwrap();
                drop(writer);
            });
            drop(w_client);
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            w_task.await.unwrap();
            assert_eq!(got.len(), expect);
            assert_eq!(status_flags(r_client.as_fd()), before_r);
            assert_eq!(before_w & libc::O_NONBLOCK, 0);
        })
        .await
    }

    #[tokio::test]
    async fn sockets_use_per_call_nonblocking() {
        bounded(async move {
            let (a, mut b) = StdStream::pair().unwrap();
            let a = OwnedFd::from(a);
            let before = status_flags(a.as_fd());
            let mut reader = FdReader::new(a.try_clone().unwrap()).unwrap();
            let mut writer = FdWriter::new(a.try_clone().unwrap()).unwrap();
            assert_eq!(reader.kind(), FdKind::Socket);
            writer.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            b.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            b.write_all(b"pong").unwrap();
            drop(b);
            let mut back = Vec::new();
            reader.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"pong");
            assert_eq!(status_flags(a.as_fd()), before);
        })
        .await
    }

    #[tokio::test]
    async fn regular_files_and_dev_null() {
        bounded(async move {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out");
            let f = File::create(&path).unwrap();
            let mut w = FdWriter::new(OwnedFd::from(f)).unwrap();
            assert_eq!(w.kind(), FdKind::File);
            w.write_all(b"hello file").await.unwrap();
            w.shutdown().await.unwrap();
            drop(w);
            assert_eq!(std::fs::read(&path).unwrap(), b"hello file");

            let mut r = FdReader::new(OwnedFd::from(File::open(&path).unwrap())).unwrap();
            let mut s = String::new();
            r.read_to_string(&mut s).await.unwrap();
            assert_eq!(s, "hello file");

            let null = || {
                OwnedFd::from(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open("/dev/null")
                        .unwrap(),
                )
            };
            let mut r = FdReader::new(null()).unwrap();
            assert_eq!(r.kind(), FdKind::Null);
            let mut v = Vec::new();
            assert_eq!(r.read_to_end(&mut v).await.unwrap(), 0);
            let mut w = FdWriter::new(null()).unwrap();
            assert_eq!(w.kind(), FdKind::Null);
            w.write_all(b"gone").await.unwrap();
            w.flush().await.unwrap();
        })
        .await
    }

    #[tokio::test]
    async fn tty_modes_size_and_reads() {
        bounded(async move {
            let (mut master, slave) = pty();
            assert!(is_tty(slave.as_fd()));
            assert!(!is_tty(master_pipe_free().as_fd()));
            let ws = libc::winsize {
                ws_row: 33,
                ws_col: 101,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads one winsize.
            assert_eq!(
                unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
                0
            );
            assert_eq!(
                window_size(slave.as_fd()).unwrap(),
                WindowSize {
                    cols: 101,
                    rows: 33,
                    xpixel: 0,
                    ypixel: 0
                }
            );
            let modes = terminal_modes(slave.as_fd()).unwrap();
            let get = |p: russh::Pty| modes.iter().find(|(q, _)| *q == p).map(|(_, v)| *v);
            assert_eq!(get(russh::Pty::VINTR), Some(3)); // ^C
            assert_eq!(get(russh::Pty::ECHO), Some(1));
            assert_eq!(get(russh::Pty::ICANON), Some(1));
            assert!(get(russh::Pty::TTY_OP_OSPEED).is_some());
            assert!(modes.iter().all(|(p, _)| *p != russh::Pty::TTY_OP_END));
            assert!(terminal_modes(master_pipe_free().as_fd()).is_err());

            let flags = status_flags(slave.as_fd());
            let mut reader = FdReader::new(slave.try_clone().unwrap()).unwrap();
            assert_eq!(reader.kind(), FdKind::Tty);
            let mut writer = FdWriter::new(slave.try_clone().unwrap()).unwrap();
            // Canonical mode: nothing is readable until a line ends.
            master.write_all(b"abc").unwrap();
            let mut buf = [0u8; 64];
            let early =
                tokio::time::timeout(std::time::Duration::from_millis(50), reader.read(&mut buf))
                    .await;
            assert!(early.is_err(), "partial line was readable");
            master.write_all(b"\n").unwrap();
            let n = reader.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"abc\n");
            writer.write_all(b"out").await.unwrap();
            writer.flush().await.unwrap();
            let mut echoed = Vec::new();
            while !echoed.ends_with(b"out") {
                let mut b = [0u8; 64];
                let n = master.read(&mut b).unwrap();
                echoed.extend_from_slice(&b[..n]);
            }
            assert_eq!(status_flags(slave.as_fd()), flags);
        })
        .await
    }

    /// A non-tty descriptor.
    fn master_pipe_free() -> OwnedFd {
        pipe().0
    }
}

//! Prompt ACKs during the local handshake.
//!
//! OpenSSH clients leave Nagle on for non-interactive sessions (`ssh host
//! true`, scp, sftp), so a message written right after another small one
//! waits until the first is acknowledged. Linux delays that ACK by up to
//! 40 ms when we have nothing to send back, which is what happens after the
//! client's KEXINIT: measured, it added ~40 ms to every `ssh -p 2222 host
//! true`. Re-arming TCP_QUICKACK after each read (the kernel clears it by
//! itself) makes us ACK at once while the handshake ping-pongs.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Reads after which we stop re-arming: enough for version, key exchange,
/// auth and the first channel's requests; bulk transfers pay nothing.
const HANDSHAKE_READS: u8 = 48;

/// A TCP stream that acknowledges promptly for its first reads.
pub struct QuickAck {
    /// The accepted connection.
    inner: TcpStream,
    /// Reads left before we stop re-arming TCP_QUICKACK.
    reads_left: u8,
}

impl QuickAck {
    /// Wraps an accepted local connection.
    pub fn new(inner: TcpStream) -> Self {
        let s = QuickAck {
            inner,
            reads_left: HANDSHAKE_READS,
        };
        s.arm();
        s
    }

    /// Sets TCP_QUICKACK; failure only costs latency, so it is ignored.
    fn arm(&self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = socket2::SockRef::from(&self.inner).set_tcp_quickack(true);
    }
}

impl AsyncRead for QuickAck {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.reads_left > 0 && matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.reads_left -= 1;
            this.arm();
        }
        r
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

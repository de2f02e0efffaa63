//! A byte stream (the TCP or Unix socket of an sshshim-owned forward) as
//! the local end of a bridge, with half-close carried both ways.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::bridge::{Input, LocalIn, LocalOut, Output};

/// Reads from a stream into one buffer whose spare capacity is reused, so
/// a chunk costs no allocation of its own until the buffer is used up.
pub struct StreamIn<R> {
    /// The read half.
    rd: R,
    /// The reused buffer.
    buf: BytesMut,
    /// Set after EOF was reported.
    done: bool,
}

impl<R: AsyncRead + Send + Unpin + 'static> StreamIn<R> {
    /// Wraps a read half.
    pub fn new(rd: R) -> Self {
        StreamIn {
            rd,
            buf: BytesMut::new(),
            done: false,
        }
    }
}

impl<R: AsyncRead + Send + Unpin + 'static> LocalIn for StreamIn<R> {
    async fn recv(&mut self) -> Option<Input> {
        if self.done {
            // Half-closed: the socket still takes output until the channel
            // ends, which is not ours to decide.
            return std::future::pending().await;
        }
        if self.buf.capacity() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        match self.rd.read_buf(&mut self.buf).await {
            Ok(0) => {
                self.done = true;
                Some(Input::Eof)
            }
            Ok(_) => Some(Input::Data(self.buf.split().freeze())),
            Err(e) => {
                tracing::debug!("local socket read failed: {e}");
                None
            }
        }
    }
}

/// Writes a channel's data to a stream; EOF shuts the write side down. A
/// channel that closes without EOF (its connection was lost mid-transfer)
/// resets a TCP stream, so the local program sees an error rather than a
/// clean end of a short transfer.
pub struct StreamOut<W> {
    /// The write half.
    w: W,
    /// Whether the channel sent EOF.
    eof: bool,
    /// The socket again, to reset it (TCP only).
    reset: Option<socket2::Socket>,
}

impl<W> StreamOut<W> {
    /// Wraps a write half.
    pub fn new(w: W) -> Self {
        StreamOut {
            w,
            eof: false,
            reset: None,
        }
    }

    /// Resets `socket` (a duplicate of the stream's TCP socket) if the
    /// channel ends without EOF.
    pub fn reset_on_abort(mut self, socket: Option<socket2::Socket>) -> Self {
        self.reset = socket;
        self
    }
}

impl<W: AsyncWrite + Send + Unpin + 'static> LocalOut for StreamOut<W> {
    async fn send(&mut self, ev: Output) -> std::io::Result<()> {
        match ev {
            Output::Data(d) => self.w.write_all(&d).await,
            Output::Eof => {
                self.eof = true;
                let _ = self.w.shutdown().await;
                Ok(())
            }
            // Only sessions carry stderr and exit codes; a forward has none.
            Output::Ext(..) | Output::ExitStatus(_) | Output::ExitSignal { .. } => Ok(()),
            Output::Close => {
                if !self.eof
                    && let Some(s) = &self.reset
                {
                    // Linger 0: the close of the last descriptor sends RST.
                    let _ = s.set_linger(Some(std::time::Duration::ZERO));
                }
                Ok(())
            }
        }
    }
}

/// A duplicate of a TCP stream's socket, for [`StreamOut::reset_on_abort`].
pub fn dup_tcp(s: &tokio::net::TcpStream) -> Option<socket2::Socket> {
    socket2::SockRef::from(s).try_clone().ok()
}

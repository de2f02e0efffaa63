//! A byte stream (the TCP or Unix socket of an sshshim-owned forward) as
//! the local end of a bridge, with half-close carried both ways.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Input, LocalIn, LocalOut, Output};

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

/// Writes a channel's data to a stream; EOF shuts the write side down.
pub struct StreamOut<W>(pub W);

impl<W: AsyncWrite + Send + Unpin + 'static> LocalOut for StreamOut<W> {
    async fn send(&mut self, ev: Output) -> std::io::Result<()> {
        match ev {
            Output::Data(d) => self.0.write_all(&d).await,
            Output::Eof => {
                let _ = self.0.shutdown().await;
                Ok(())
            }
            // Only sessions carry stderr and exit codes; a forward has none.
            Output::Ext(..) | Output::ExitStatus(_) | Output::ExitSignal { .. } => Ok(()),
            Output::Close => Ok(()),
        }
    }
}

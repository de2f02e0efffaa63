//! A channel of the local SSH endpoint (a russh server channel) as the
//! local end of a bridge. Used by the endpoint for the channels its clients
//! open, and by forwarding for the channels sshshim opens back to a client
//! (a connection to its `-R` forward, the server's agent requests).

use russh::server::{self, Msg};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};

use crate::bridge::{Input, LocalIn, LocalOut, Output};

/// The read side of a local endpoint channel.
pub struct ChannelIn(ChannelReadHalf);

impl LocalIn for ChannelIn {
    async fn recv(&mut self) -> Option<Input> {
        loop {
            match self.0.wait().await? {
                ChannelMsg::Data { data } => return Some(Input::Data(data)),
                ChannelMsg::ExtendedData { ext, data } => return Some(Input::Ext(ext, data)),
                ChannelMsg::Eof => return Some(Input::Eof),
                ChannelMsg::Close => return None,
                // Requests arrive here too; the endpoint's handler answers them.
                _ => {}
            }
        }
    }
}

/// The write side of a local endpoint channel.
pub struct ChannelOut {
    /// Channel writes.
    write: ChannelWriteHalf<Msg>,
    /// The connection, for what the write half cannot send (exit signals).
    handle: server::Handle,
    /// This channel.
    id: ChannelId,
}

impl LocalOut for ChannelOut {
    async fn send(&mut self, ev: Output) -> std::io::Result<()> {
        let gone = |_| std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        match ev {
            Output::Data(d) => self.write.data_bytes(d).await.map_err(gone),
            Output::Ext(e, d) => self.write.extended_data_bytes(e, d).await.map_err(gone),
            Output::Eof => self.write.eof().await.map_err(gone),
            Output::ExitStatus(s) => self.write.exit_status(s).await.map_err(gone),
            Output::ExitSignal {
                signal,
                core_dumped,
                message,
                lang,
            } => self
                .handle
                .exit_signal_request(self.id, signal, core_dumped, message, lang)
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
            Output::Close => {
                let _ = self.write.close().await;
                Ok(())
            }
        }
    }
}

/// Splits a local endpoint channel into the two ends a bridge takes.
pub fn ends(channel: Channel<Msg>, handle: server::Handle) -> (ChannelIn, ChannelOut) {
    let id = channel.id();
    let (read, write) = channel.split();
    (ChannelIn(read), ChannelOut { write, handle, id })
}

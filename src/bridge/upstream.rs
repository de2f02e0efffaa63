//! The upstream end of a bridged channel: a russh channel, or a resumable
//! session ([`crate::resume`]) that outlives its channels. Both take the
//! same requests and yield the same messages, so the bridge's logic exists
//! once.

use bytes::Bytes;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Pty, Sig, client};

use crate::resume::wire::{Command, PtySpec};
use crate::resume::{ConnRead, ConnWrite, SessionRead, SessionWrite};

/// Both halves of an upstream end.
pub struct Upstream {
    /// What it yields.
    pub read: UpRead,
    /// What it takes.
    pub write: UpWrite,
}

impl From<russh::Channel<client::Msg>> for Upstream {
    fn from(ch: russh::Channel<client::Msg>) -> Upstream {
        let (r, w) = ch.split();
        Upstream {
            read: UpRead::Ssh(r),
            write: UpWrite::Ssh(w),
        }
    }
}

impl From<(SessionRead, SessionWrite)> for Upstream {
    fn from((r, w): (SessionRead, SessionWrite)) -> Upstream {
        Upstream {
            read: UpRead::Resumable(r),
            write: UpWrite::Resumable(w),
        }
    }
}

impl From<(ConnRead, ConnWrite)> for Upstream {
    fn from((r, w): (ConnRead, ConnWrite)) -> Upstream {
        Upstream {
            read: UpRead::Forwarded(r),
            write: UpWrite::Forwarded(w),
        }
    }
}

/// The read half.
pub enum UpRead {
    /// A russh channel's.
    Ssh(ChannelReadHalf),
    /// A resumable session's.
    Resumable(SessionRead),
    /// A resumable forwarded connection's.
    Forwarded(ConnRead),
}

impl UpRead {
    /// The next message; `None` once the channel (or session) is gone.
    pub async fn wait(&mut self) -> Option<ChannelMsg> {
        match self {
            UpRead::Ssh(r) => r.wait().await,
            UpRead::Resumable(r) => r.wait().await,
            UpRead::Forwarded(r) => r.wait().await,
        }
    }
}

/// The write half, with the requests a local client may make.
pub enum UpWrite {
    /// A russh channel's.
    Ssh(ChannelWriteHalf<client::Msg>),
    /// A resumable session's (requests are answered on its read half, in
    /// order, as a server's are).
    Resumable(SessionWrite),
    /// A resumable forwarded connection's (it takes no requests, as sshd's
    /// direct-tcpip channels take none).
    Forwarded(ConnWrite),
}

/// A resumable session that ended, as russh reports a closed channel.
fn gone<T>(_: T) -> russh::Error {
    russh::Error::SendError
}

/// A request on a forwarded connection: refused, as sshd refuses requests
/// on a direct-tcpip channel.
fn denied() -> Result<(), russh::Error> {
    Err(russh::Error::RequestDenied)
}

impl UpWrite {
    /// Channel data.
    pub async fn data_bytes(&self, data: Bytes) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.data_bytes(data).await,
            UpWrite::Resumable(w) => w.data(data).await.map_err(gone),
            UpWrite::Forwarded(w) => w.data(data).await.map_err(gone),
        }
    }

    /// Extended data (a resumable session has no use for it: dropped).
    pub async fn extended_data_bytes(&self, ext: u32, data: Bytes) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.extended_data_bytes(ext, data).await,
            UpWrite::Resumable(_) | UpWrite::Forwarded(_) => Ok(()),
        }
    }

    /// The local end took `n` bytes of output (`ext`: extended data), or
    /// dropped them. A resumable session or forwarded connection
    /// acknowledges output only then.
    pub fn taken(&self, ext: Option<u32>, n: usize) {
        match self {
            UpWrite::Resumable(w) => w.taken(ext, n),
            UpWrite::Forwarded(w) if ext.is_none() => w.taken(n),
            _ => {}
        }
    }

    /// EOF.
    pub async fn eof(&self) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.eof().await,
            UpWrite::Resumable(w) => w.eof().map_err(gone),
            UpWrite::Forwarded(w) => w.eof().map_err(gone),
        }
    }

    /// Closes the channel; a resumable session's command is hung up.
    pub async fn close(&self) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.close().await,
            UpWrite::Resumable(w) => {
                w.close();
                Ok(())
            }
            UpWrite::Forwarded(w) => {
                w.close();
                Ok(())
            }
        }
    }

    /// `pty-req`.
    #[allow(clippy::too_many_arguments)]
    pub async fn request_pty(
        &self,
        want_reply: bool,
        term: &str,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
    ) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => {
                w.request_pty(want_reply, term, cols, rows, pix_width, pix_height, modes)
                    .await
            }
            UpWrite::Resumable(w) => w
                .pty(PtySpec {
                    term: term.to_owned(),
                    cols,
                    rows,
                    px: pix_width,
                    py: pix_height,
                    modes: modes.iter().map(|(m, v)| (*m as u8, *v)).collect(),
                })
                .map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }

    /// `shell`.
    pub async fn request_shell(&self, want_reply: bool) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.request_shell(want_reply).await,
            UpWrite::Resumable(w) => w.command(Command::Shell).map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }

    /// `exec`.
    pub async fn exec(&self, want_reply: bool, command: Vec<u8>) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.exec(want_reply, command).await,
            UpWrite::Resumable(w) => w.command(Command::Exec(command)).map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }

    /// `subsystem`.
    pub async fn request_subsystem(
        &self,
        want_reply: bool,
        name: String,
    ) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.request_subsystem(want_reply, name).await,
            UpWrite::Resumable(w) => w.command(Command::Subsystem(name)).map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }

    /// `auth-agent-req@openssh.com`.
    pub async fn agent_forward(&self, want_reply: bool) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.agent_forward(want_reply).await,
            UpWrite::Resumable(w) => w.agent().map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }

    /// `env` (sent without want-reply).
    pub async fn set_env(
        &self,
        want_reply: bool,
        name: &str,
        value: &str,
    ) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.set_env(want_reply, name, value).await,
            UpWrite::Resumable(w) => w.env(name, value).map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }

    /// `window-change`.
    pub async fn window_change(
        &self,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
    ) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.window_change(cols, rows, pix_width, pix_height).await,
            UpWrite::Resumable(w) => w.window(cols, rows, pix_width, pix_height).map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }

    /// `signal`.
    pub async fn signal(&self, sig: Sig) -> Result<(), russh::Error> {
        match self {
            UpWrite::Ssh(w) => w.signal(sig).await,
            UpWrite::Resumable(w) => w.signal(&sig).map_err(gone),
            UpWrite::Forwarded(_) => denied(),
        }
    }
}

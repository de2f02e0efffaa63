//! A multiplexing client's descriptors (passed over the ControlMaster
//! socket) as the local end of a bridge: stdin as [`FdIn`], a session's
//! stdout and stderr as [`SessionOut`], a stdio forward's (`ssh -W`) stdout
//! as [`StdioOut`].

use std::sync::{Arc, Mutex, OnceLock};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::escape::{Escape, Filtered};
use crate::bridge::{Bridge, Input, LocalIn, LocalOut, Output};
use crate::mux::{ClientInfo, FdReader, FdWriter, SessionControl, StdioControl};

/// A client's input descriptor as the bridge's input: its stdin (with the
/// escape filter on a tty), ending when the client goes away.
pub struct FdIn {
    /// The descriptor.
    reader: FdReader,
    /// The control connection (its close means the client is gone).
    client: ClientInfo,
    /// EOF was passed on.
    eof: bool,
    /// The `~.` escape filter, for tty sessions.
    escape: Option<Escape>,
    /// The bridge, once spawned.
    cell: Arc<OnceLock<Arc<Bridge>>>,
    /// A tty session: a client that goes away ends the remote command, as
    /// sshd hangs up a pty whose channel closes.
    tty: bool,
}

impl FdIn {
    /// A client's input: `escape` filters a tty's `~.` sequences; `cell`
    /// will hold the bridge; `tty` says the session has a terminal.
    pub fn new(
        reader: FdReader,
        client: ClientInfo,
        escape: Option<Escape>,
        cell: Arc<OnceLock<Arc<Bridge>>>,
        tty: bool,
    ) -> Self {
        FdIn {
            reader,
            client,
            eof: false,
            escape,
            cell,
            tty,
        }
    }

    /// The client went away. OpenSSH's master turns that into
    /// `eow@openssh.com` plus close; sshd then keeps a non-tty command
    /// running with its stderr open. So do we (see [`Bridge::output_closed`]).
    fn gone(&self) -> Option<Input> {
        if !self.tty
            && let Some(b) = self.cell.get()
        {
            b.output_closed();
        }
        None
    }
}

impl LocalIn for FdIn {
    async fn recv(&mut self) -> Option<Input> {
        loop {
            if self.eof {
                // Half-closed: output goes on until the client leaves.
                self.client.closed().await;
                return self.gone();
            }
            let mut buf = BytesMut::with_capacity(32 * 1024);
            let n = tokio::select! {
                r = self.reader.read_buf(&mut buf) => r,
                _ = self.client.closed() => return self.gone(),
            };
            match n {
                Ok(0) | Err(_) => {
                    self.eof = true;
                    return Some(Input::Eof);
                }
                Ok(_) => {}
            }
            let data = buf.freeze();
            let data = match &mut self.escape {
                Some(esc) => match esc.filter(&data) {
                    Filtered::Data(d) if d.is_empty() => continue,
                    Filtered::Data(d) => d,
                    // `~.`: end the session now, as ssh does.
                    Filtered::Disconnect => return None,
                },
                None => data,
            };
            return Some(Input::Data(data));
        }
    }
}

/// A session's output descriptors as the bridge's output.
pub struct SessionOut {
    /// The client's stdout (dropped once it fails).
    stdout: Option<FdWriter>,
    /// The client's stderr.
    stderr: Option<FdWriter>,
    /// The exit status, once known.
    status: Option<u32>,
    /// The control connection, once SESSION_OPENED was sent.
    ctl: Arc<Mutex<Option<SessionControl>>>,
    /// The bridge, once spawned.
    cell: Arc<OnceLock<Arc<Bridge>>>,
}

impl SessionOut {
    /// A session's stdout and stderr; `ctl` will hold the control
    /// connection once SESSION_OPENED is sent, `cell` the bridge.
    pub fn new(
        stdout: FdWriter,
        stderr: FdWriter,
        ctl: Arc<Mutex<Option<SessionControl>>>,
        cell: Arc<OnceLock<Arc<Bridge>>>,
    ) -> Self {
        SessionOut {
            stdout: Some(stdout),
            stderr: Some(stderr),
            status: None,
            ctl,
            cell,
        }
    }
}

impl LocalOut for SessionOut {
    async fn send(&mut self, ev: Output) -> std::io::Result<()> {
        match ev {
            Output::Data(d) => {
                let Some(w) = self.stdout.as_mut() else {
                    return Ok(());
                };
                if w.write_all(&d).await.is_err() {
                    // What OpenSSH's master turns into eow@openssh.com:
                    // stdout is gone (`| head`), stderr still works.
                    self.stdout = None;
                    if let Some(b) = self.cell.get() {
                        b.output_closed();
                    }
                }
                Ok(())
            }
            Output::Ext(_, d) => {
                if let Some(w) = self.stderr.as_mut()
                    && w.write_all(&d).await.is_err()
                {
                    self.stderr = None;
                }
                Ok(())
            }
            Output::Eof => {
                if let Some(w) = self.stdout.as_mut() {
                    let _ = w.flush().await;
                }
                Ok(())
            }
            Output::ExitStatus(s) => {
                self.status = Some(s);
                Ok(())
            }
            // OpenSSH's master does not relay exit signals either: the
            // client exits 255 (README says so).
            Output::ExitSignal { .. } => Ok(()),
            Output::Close => {
                // Every byte reaches the descriptors before the exit
                // message, and the control connection closes last.
                for w in [self.stdout.take(), self.stderr.take()]
                    .into_iter()
                    .flatten()
                {
                    let mut w = w;
                    let _ = w.flush().await;
                }
                let ctl = self.ctl.lock().unwrap().take();
                if let Some(ctl) = ctl {
                    match self.status {
                        Some(s) => ctl.exit(s),
                        None => ctl.close(),
                    }
                }
                Ok(())
            }
        }
    }
}

/// A stdio forward's output descriptor as the bridge's output.
pub struct StdioOut {
    /// The client's stdout.
    output: Option<FdWriter>,
    /// The control connection.
    ctl: Option<StdioControl>,
}

impl StdioOut {
    /// A stdio forward's output and its control connection.
    pub fn new(output: FdWriter, ctl: StdioControl) -> Self {
        StdioOut {
            output: Some(output),
            ctl: Some(ctl),
        }
    }
}

impl LocalOut for StdioOut {
    async fn send(&mut self, ev: Output) -> std::io::Result<()> {
        match ev {
            Output::Data(d) => match self.output.as_mut() {
                Some(w) => w.write_all(&d).await,
                None => Ok(()),
            },
            Output::Eof => {
                if let Some(mut w) = self.output.take() {
                    let _ = w.flush().await;
                }
                Ok(())
            }
            Output::Close => {
                if let Some(mut w) = self.output.take() {
                    let _ = w.flush().await;
                }
                if let Some(c) = self.ctl.take() {
                    c.close();
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

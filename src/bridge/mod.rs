//! Channel bridging: carries one local channel's traffic to its upstream
//! channel and back, byte for byte, with EOF, exit status and close in order.
//!
//! Three tasks per bridged channel:
//! - the *pump* drains the upstream channel at once into a [`SpillQueue`]
//!   (so no upstream channel can stall the shared connection) and routes
//!   request replies;
//! - the *forwarder* moves events from the queue to the local client,
//!   waiting on the local window (this is where a slow reader waits);
//! - the *uplink* moves local data to upstream, waiting on the upstream
//!   window; it blocks only its own local connection, which is what
//!   backpressure on that client should do.

pub mod spill;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::{ChannelMsg, ChannelWriteHalf, client, server};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::upstream::ChannelMeter;
use spill::{Event, PushError, SpillQueue};

/// A channel request that needs the upstream's answer.
pub enum Request {
    /// `pty-req`.
    Pty {
        /// TERM.
        term: String,
        /// Width in characters.
        cols: u32,
        /// Height in rows.
        rows: u32,
        /// Width in pixels.
        pix_width: u32,
        /// Height in pixels.
        pix_height: u32,
        /// Terminal modes.
        modes: Vec<(russh::Pty, u32)>,
    },
    /// `shell`.
    Shell,
    /// `exec` with the command.
    Exec(Vec<u8>),
    /// `subsystem` with its name.
    Subsystem(String),
    /// `auth-agent-req@openssh.com`.
    AgentForward,
}

/// The upstream write side of a bridged channel, shared by the local
/// handler (requests) and the bridge tasks.
pub struct Upstream {
    /// Writes to the upstream channel.
    pub write: ChannelWriteHalf<client::Msg>,
    /// Replies we are waiting for, in request order (SSH answers in order).
    replies: Mutex<VecDeque<oneshot::Sender<bool>>>,
    /// Set when the local client can no longer take output
    /// (`eow@openssh.com`): output is dropped, exit status still delivered.
    discard: CancellationToken,
    /// Set when we close the upstream channel ourselves. russh then drops
    /// everything the server still sends on it, including its close, so the
    /// pump must stop on this instead of waiting for a close that never comes.
    closing: CancellationToken,
}

impl Upstream {
    /// Wraps the write half of a freshly opened upstream channel.
    fn new(write: ChannelWriteHalf<client::Msg>) -> Arc<Self> {
        Arc::new(Upstream {
            write,
            replies: Mutex::new(VecDeque::new()),
            discard: CancellationToken::new(),
            closing: CancellationToken::new(),
        })
    }

    /// Sends a request upstream with want-reply and waits for the verdict:
    /// `false` when refused or when the channel died first.
    pub async fn request(&self, req: Request) -> bool {
        let (tx, rx) = oneshot::channel();
        self.replies.lock().unwrap().push_back(tx);
        let w = &self.write;
        let sent = match req {
            Request::Pty {
                term,
                cols,
                rows,
                pix_width,
                pix_height,
                modes,
            } => {
                w.request_pty(true, &term, cols, rows, pix_width, pix_height, &modes)
                    .await
            }
            Request::Shell => w.request_shell(true).await,
            Request::Exec(cmd) => w.exec(true, cmd).await,
            Request::Subsystem(name) => w.request_subsystem(true, name).await,
            Request::AgentForward => w.agent_forward(true).await,
        };
        if sent.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The local client can take no more output (it sent
    /// `eow@openssh.com`): drop pending output and close upstream so the
    /// remote command ends, as sshd would on receiving that request.
    pub fn output_closed(&self) {
        self.discard.cancel();
    }

    /// Closes the upstream channel (once) and stops its pump.
    pub async fn close(&self) {
        if !self.closing.is_cancelled() {
            self.closing.cancel();
            let _ = self.write.close().await;
        }
    }

    /// Hands a reply to the oldest waiting request.
    fn reply(&self, ok: bool) {
        if let Some(tx) = self.replies.lock().unwrap().pop_front() {
            let _ = tx.send(ok);
        }
    }
}

/// Bridges a local (server-side) channel to an upstream (client-side)
/// channel until both are closed. Returns the upstream write side so the
/// caller can forward channel requests.
/// `session` marks a session channel: if the upstream connection is lost,
/// its client is told so on stderr before the channel closes.
pub fn spawn(
    local: russh::Channel<server::Msg>,
    local_handle: server::Handle,
    upstream: russh::Channel<client::Msg>,
    session: bool,
    load: Option<crate::upstream::LoadGuard>,
    meter: ChannelMeter,
) -> Arc<Upstream> {
    let local_id = local.id();
    let (mut local_read, local_write) = local.split();
    let (up_read, up_write) = upstream.split();
    let up = Upstream::new(up_write);
    let queue = Arc::new(SpillQueue::new());
    let (up2, queue2) = (up.clone(), queue.clone());
    let meter = Arc::new(meter);
    let meter_up = meter.clone();
    tokio::spawn(async move {
        pump(up_read, up2, queue2, local_id, session).await;
        // The upstream channel is gone: it no longer loads its connection.
        drop(load);
    });

    // Forwarder: queue -> local client, at the local reader's pace.
    let (q, u) = (queue, up.clone());
    tokio::spawn(async move {
        let sent = async {
            loop {
                let ok = match q.pop().await? {
                    // The client discards output after eow@openssh.com and
                    // stops granting window for it: do not wait on it.
                    Event::Data(_) | Event::Ext(..) if u.discard.is_cancelled() => true,
                    Event::Data(d) => {
                        meter.add_in(d.len());
                        tokio::select! {
                            r = local_write.data_bytes(d) => r.is_ok(),
                            _ = u.discard.cancelled() => true,
                        }
                    }
                    Event::Ext(e, d) => tokio::select! {
                        r = local_write.extended_data_bytes(e, d) => r.is_ok(),
                        _ = u.discard.cancelled() => true,
                    },
                    Event::Eof => local_write.eof().await.is_ok(),
                    Event::ExitStatus(s) => local_write.exit_status(s).await.is_ok(),
                    Event::ExitSignal {
                        signal,
                        core_dumped,
                        message,
                        lang,
                    } => local_handle
                        .exit_signal_request(local_id, signal, core_dumped, message, lang)
                        .await
                        .is_ok(),
                    Event::Close => {
                        let _ = local_write.close().await;
                        return Ok::<_, std::io::Error>(());
                    }
                };
                if !ok {
                    return Ok(());
                }
            }
        };
        if let Err(e) = sent.await {
            tracing::warn!("channel {local_id:?}: reading buffered data failed: {e}");
        }
        // Local side gone or closed: stop buffering and end the remote
        // command at once.
        q.close_reader();
        u.close().await;
    });

    // Uplink: local client -> upstream, at the upstream's pace.
    let u = up.clone();
    tokio::spawn(async move {
        while let Some(msg) = local_read.wait().await {
            let ok = match msg {
                ChannelMsg::Data { data } => {
                    meter_up.add_out(data.len());
                    u.write.data_bytes(data).await.is_ok()
                }
                ChannelMsg::ExtendedData { ext, data } => {
                    u.write.extended_data_bytes(ext, data).await.is_ok()
                }
                ChannelMsg::Eof => u.write.eof().await.is_ok(),
                ChannelMsg::Close => break,
                // Requests arrive here too; the handler answers them.
                _ => true,
            };
            if !ok {
                break;
            }
        }
        u.close().await;
    });

    up
}

/// Drains an upstream channel into `q` as fast as it delivers, routing
/// request replies to `u`. Ends with a `Close` event.
async fn pump(
    mut up_read: russh::ChannelReadHalf,
    u: Arc<Upstream>,
    q: Arc<SpillQueue>,
    what: impl std::fmt::Debug,
    session: bool,
) {
    let mut overflowed = false;
    loop {
        let msg = tokio::select! {
            m = up_read.wait() => m,
            _ = u.closing.cancelled() => None,
        };
        let Some(msg) = msg else {
            // No Close from the server and not closed by us: the whole
            // upstream connection went away under this channel.
            if session && !u.closing.is_cancelled() && !overflowed {
                q.push_control(Event::Ext(
                    1,
                    "sshshim: the upstream connection was lost; this session has ended\r\n".into(),
                ));
            }
            break;
        };
        let ev = match msg {
            ChannelMsg::Data { data } => Event::Data(data),
            ChannelMsg::ExtendedData { ext, data } => Event::Ext(ext, data),
            ChannelMsg::Eof => Event::Eof,
            ChannelMsg::ExitStatus { exit_status } => Event::ExitStatus(exit_status),
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => Event::ExitSignal {
                signal: signal_name,
                core_dumped,
                message: error_message,
                lang: lang_tag,
            },
            ChannelMsg::Success => {
                u.reply(true);
                continue;
            }
            ChannelMsg::Failure => {
                u.reply(false);
                continue;
            }
            ChannelMsg::Close => break,
            _ => continue,
        };
        if overflowed {
            continue;
        }
        if let Err(e) = push_or_wait(&q, ev).await {
            // The local reader stopped for good (or the disk failed): end
            // this channel rather than hold the connection or disk for it.
            let why = match e {
                PushError::Full(_) => format!(
                    "the local reader stopped reading with {} MiB buffered",
                    spill::channel_disk() >> 20
                ),
                PushError::Io(e) => format!("cannot buffer for a slow reader: {e}"),
            };
            tracing::warn!("closing channel {what:?}: {why}");
            q.push_control(Event::Ext(
                1,
                format!("\r\nsshshim: channel closed: {why}\r\n").into(),
            ));
            q.push_control(Event::Close);
            overflowed = true;
            u.close().await;
        }
    }
    tracing::trace!("pump {what:?}: upstream channel closed");
    // Wake any request still waiting: the channel is gone.
    u.replies.lock().unwrap().clear();
    q.push_control(Event::Close);
}

/// How long a reader whose buffer is full may make no progress at all
/// before its channel is closed. While the pump waits here the shared
/// upstream connection waits too (russh reads no further until this channel
/// takes its message), so this is short; a reader that is merely slow never
/// reaches it.
const READER_STALL: Duration = Duration::from_secs(5);

/// Queues `ev`; when the channel's buffer is full, waits for the local
/// reader to take something and tries again. That wait is backpressure: a
/// slow download gets through at the reader's pace instead of being cut
/// off. Fails with `Full` only if the reader makes no progress for
/// [`READER_STALL`].
async fn push_or_wait(q: &SpillQueue, mut ev: Event) -> Result<(), PushError> {
    loop {
        match q.push(ev) {
            Err(PushError::Full(back)) => {
                tracing::debug!("channel buffer full: waiting for the local reader");
                if tokio::time::timeout(READER_STALL, q.progressed())
                    .await
                    .is_err()
                {
                    return Err(PushError::Full(back));
                }
                ev = back;
            }
            done => return done,
        }
    }
}

/// Bridges a byte stream (a TCP or Unix socket of an sshshim-owned
/// forward) to an upstream channel, with half-close carried both ways.
pub fn spawn_stream<S>(
    stream: S,
    upstream: russh::Channel<client::Msg>,
    what: String,
    meter: ChannelMeter,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (up_read, up_write) = upstream.split();
    let up = Upstream::new(up_write);
    let queue = Arc::new(SpillQueue::new());
    tokio::spawn(pump(up_read, up.clone(), queue.clone(), what, false));

    let meter = Arc::new(meter);
    let meter_up = meter.clone();
    // Upstream -> socket.
    let (q, u) = (queue, up.clone());
    tokio::spawn(async move {
        loop {
            let ok = match q.pop().await {
                Ok(Event::Data(d)) => {
                    meter.add_in(d.len());
                    wr.write_all(&d).await.is_ok()
                }
                // Only sessions carry stderr; a forward has none to give.
                Ok(Event::Ext(..) | Event::ExitStatus(_) | Event::ExitSignal { .. }) => true,
                Ok(Event::Eof) => {
                    let _ = wr.shutdown().await;
                    true
                }
                Ok(Event::Close) | Err(_) => break,
            };
            if !ok {
                break;
            }
        }
        q.close_reader();
        u.close().await;
    });

    // Socket -> upstream. One buffer whose spare capacity is reused, so a
    // chunk costs no allocation of its own until the buffer is used up.
    tokio::spawn(async move {
        let mut buf = bytes::BytesMut::with_capacity(64 * 1024);
        loop {
            if buf.capacity() < 16 * 1024 {
                buf.reserve(64 * 1024);
            }
            match rd.read_buf(&mut buf).await {
                Ok(0) => {
                    let _ = up.write.eof().await;
                    break;
                }
                Ok(n) => {
                    meter_up.add_out(n);
                    if up.write.data_bytes(buf.split().freeze()).await.is_err() {
                        up.close().await;
                        break;
                    }
                }
                Err(_) => {
                    up.close().await;
                    break;
                }
            }
        }
    });
}

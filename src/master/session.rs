//! NEW_SESSION and NEW_STDIO_FWD (`ssh -W`): an upstream channel bridged
//! to the descriptors a multiplexing client passed
//! ([`crate::bridge::ends::fds`]).

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::{Master, Tty};
use crate::bridge::ends::escape::Escape;
use crate::bridge::ends::fds::{FdIn, SessionOut, StdioOut};
use crate::bridge::{Bridge, Refused, Request};
use crate::forward::AgentTarget;
use crate::mux::{
    ClientInfo, FdReader, FdWriter, MuxAddr, NewSession, SessionControl, SessionFds, SessionReply,
    StdioFds, StdioReply, TtyInfo,
};
use crate::upstream::Open;

impl Master {
    /// NEW_SESSION: opens an upstream session (waiting for a reconnect if
    /// need be), bridges the client's descriptors to it, and sends the
    /// client's requests at once.
    pub(super) async fn session(
        self: Arc<Self>,
        client: ClientInfo,
        s: NewSession,
        fds: SessionFds,
        tty: Option<TtyInfo>,
        reply: SessionReply,
    ) {
        let opened = tokio::select! {
            r = self.opener.open(Open::Session, "mux session") => r,
            _ = client.closed() => return,
        };
        let opened = match opened {
            Ok(o) => o,
            Err(refused) => return explain(reply, fds, &refused).await,
        };
        let tty = tty.filter(|_| s.want_tty);
        let Some(ends) = SessionEnds::new(fds, client, tty.is_some(), s.escape_char) else {
            tracing::warn!("unusable descriptors from a mux client");
            return reply.failure("sshshim cannot use the passed descriptors");
        };
        let generation = opened.generation();
        let b = opened.bridge(ends.input, ends.output, "mux session");
        let _ = ends.cell.set(b.clone());
        // Followed for SIGWINCH before any request goes out: the client may
        // resize as soon as the shell's first output reaches it.
        if let (Some(t), Some(fd)) = (&tty, ends.tty_fd) {
            self.ttys.lock().unwrap().push(Tty {
                bridge: Arc::downgrade(&b),
                fd,
                last: Mutex::new(t.size),
            });
        }
        let replies = self.send_requests(&b, &s, tty.as_ref()).await;
        let ctl = reply.opened();
        let session_id = ctl.id();
        *ends.ctl.lock().unwrap() = Some(ctl);
        tracing::debug!("session {session_id} opened");
        self.await_replies(&b, replies, &ends.ctl, generation, session_id)
            .await;
    }

    /// Sends the client's requests at once, in its order: SSH answers them
    /// in order, so nothing waits for a round trip in between.
    async fn send_requests(&self, b: &Bridge, s: &NewSession, tty: Option<&TtyInfo>) -> Replies {
        let pty = match tty {
            Some(t) => Some(
                b.send_request(Request::Pty {
                    term: s.term.clone(),
                    cols: t.size.cols,
                    rows: t.size.rows,
                    pix_width: t.size.xpixel,
                    pix_height: t.size.ypixel,
                    modes: t.modes.clone(),
                })
                .await,
            ),
            None => None,
        };
        for (name, value) in &s.env {
            let _ = b.write.set_env(false, name.as_str(), value.as_str()).await;
        }
        let agent = match (&self.agent, s.want_agent) {
            (Some(sock), true) => Some((sock.clone(), b.send_request(Request::AgentForward).await)),
            _ => None,
        };
        let (command, what) = if s.subsystem {
            let name = String::from_utf8_lossy(&s.command).into_owned();
            (Request::Subsystem(name), "subsystem request failed")
        } else if s.command.is_empty() {
            (Request::Shell, "shell request failed")
        } else {
            (Request::Exec(s.command.clone()), "exec request failed")
        };
        Replies {
            pty,
            agent,
            started: b.send_request(command).await,
            refused: what,
        }
    }

    /// Acts on the server's answers: a refused pty is reported to the
    /// client, a granted agent is routed while the session lasts, a refused
    /// command ends the session.
    async fn await_replies(
        &self,
        b: &Arc<Bridge>,
        r: Replies,
        ctl: &Mutex<Option<SessionControl>>,
        generation: u64,
        session_id: u32,
    ) {
        if let Some(pty) = r.pty
            && !pty.await.unwrap_or(false)
            && let Some(c) = ctl.lock().unwrap().as_ref()
        {
            c.tty_alloc_failed();
        }
        if let Some((sock, granted)) = r.agent
            && granted.await.unwrap_or(false)
        {
            let guard = self
                .registry
                .add_agent_route(generation, AgentTarget::Socket(sock));
            let b2 = b.clone();
            self.opener.tasks().spawn(async move {
                b2.finished().await;
                drop(guard);
            });
        }
        if !r.started.await.unwrap_or(false) {
            tracing::info!("session {session_id}: {}", r.refused);
            b.close().await;
        }
    }

    /// NEW_STDIO_FWD (`ssh -W`): a direct channel bridged to the client's
    /// stdin and stdout. A refusal is fatal for the client, which says why.
    pub(super) async fn stdio(
        self: Arc<Self>,
        client: ClientInfo,
        target: MuxAddr,
        fds: StdioFds,
        reply: StdioReply,
    ) {
        let open = match &target {
            MuxAddr::Tcp(h, p) => Open::DirectTcpip {
                host: h.clone(),
                port: *p as u32,
                originator: "127.0.0.1".into(),
                originator_port: 0,
            },
            MuxAddr::Unix(p) => Open::DirectStreamlocal(p.clone()),
        };
        let what = format!("-W {target}");
        let opened = tokio::select! {
            r = self.opener.open(open, &what) => r,
            _ = client.closed() => return,
        };
        let opened = match opened {
            Ok(o) => o,
            Err(e) => return reply.failure(&format!("{target}: {}", e.reason().description())),
        };
        let (Ok(input), Ok(output)) = (FdReader::new(fds.input), FdWriter::new(fds.output)) else {
            return reply.failure("sshshim cannot use the passed descriptors");
        };
        let ctl = reply.opened();
        let local_in = FdIn::new(input, client, None, Arc::default(), false);
        opened.bridge(local_in, StdioOut::new(output, ctl), what);
    }
}

/// A refused NEW_SESSION makes ssh connect directly without a word; so
/// the session is opened and fails loudly instead, saying why on the
/// client's stderr, with exit status 255.
async fn explain(reply: SessionReply, fds: SessionFds, refused: &Refused) {
    let ctl = reply.opened();
    let mut err = FdWriter::new(fds.stderr).ok();
    drop((fds.stdin, fds.stdout));
    if let Some(w) = err.as_mut() {
        let _ = w
            .write_all(format!("sshshim: {refused}\r\n").as_bytes())
            .await;
        let _ = w.flush().await;
    }
    drop(err);
    ctl.exit(255);
}

/// The server's answers a new session waits for.
struct Replies {
    /// To `pty-req`, if sent.
    pty: Option<oneshot::Receiver<bool>>,
    /// To the agent request, if sent, with the agent to route to.
    agent: Option<(PathBuf, oneshot::Receiver<bool>)>,
    /// To the shell, exec or subsystem request.
    started: oneshot::Receiver<bool>,
    /// What to log if that is refused.
    refused: &'static str,
}

/// A session's descriptors as the bridge's two ends, and what the master
/// keeps of them.
struct SessionEnds {
    /// stdin (with the escape filter on a tty).
    input: FdIn,
    /// stdout and stderr.
    output: SessionOut,
    /// Will hold the bridge, for the ends.
    cell: Arc<OnceLock<Arc<Bridge>>>,
    /// Will hold the control connection, once SESSION_OPENED is sent.
    ctl: Arc<Mutex<Option<SessionControl>>>,
    /// A duplicate of the client's terminal (a tty session), for its size.
    tty_fd: Option<OwnedFd>,
}

impl SessionEnds {
    /// The ends of a session over `fds`; `None` if a descriptor is unusable.
    fn new(fds: SessionFds, client: ClientInfo, tty: bool, escape: Option<u8>) -> Option<Self> {
        let tty_fd = if tty {
            fds.stdin.as_fd().try_clone_to_owned().ok()
        } else {
            None
        };
        let help_fd = fds.stderr.try_clone().ok();
        let (Ok(stdin), Ok(stdout), Ok(stderr)) = (
            FdReader::new(fds.stdin),
            FdWriter::new(fds.stdout),
            FdWriter::new(fds.stderr),
        ) else {
            return None;
        };
        let cell: Arc<OnceLock<Arc<Bridge>>> = Arc::default();
        let ctl: Arc<Mutex<Option<SessionControl>>> = Arc::default();
        let escape = match (tty, escape) {
            (true, Some(c)) => Some(Escape::new(c, help_fd)),
            _ => None,
        };
        Some(SessionEnds {
            input: FdIn::new(stdin, client, escape, cell.clone(), tty),
            output: SessionOut::new(stdout, stderr, ctl.clone(), cell.clone()),
            cell,
            ctl,
            tty_fd,
        })
    }
}

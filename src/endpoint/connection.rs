//! One local connection: its handshake and login grace time
//! ([`Connection`]), and its russh callbacks ([`LocalHandler`]), which
//! open and bridge the upstream twin of every channel the client opens
//! and pass its requests on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet, Pty, Sig};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Endpoint, config_for, eow, kexinit, quickack};
use crate::bridge::ends::channel;
use crate::bridge::{Bridge, Opener, Refused, Request};
use crate::forward::client::LocalSession;
use crate::forward::{AgentGuard, AgentTarget};
use crate::stats::GaugeGuard;
use crate::upstream::Open;

/// How long a local client may take to log in (sshd's LoginGraceTime is
/// 120 s; a local client needs a fraction of a second).
const LOGIN_GRACE: Duration = Duration::from_secs(30);

/// A bridged session channel of a local connection.
pub struct LocalChannel {
    /// Its bridge, for requests.
    pub bridge: Arc<Bridge>,
    /// The upstream connection it is on.
    generation: u64,
    /// Its agent route, while it has agent forwarding on.
    agent: Option<AgentGuard>,
}

/// A local connection's bridged session channels, by local channel id.
pub type Channels = Mutex<HashMap<ChannelId, LocalChannel>>;

/// One accepted local connection, from its first byte to its end.
pub(super) struct Connection {
    /// The socket.
    stream: tokio::net::TcpStream,
    /// The client's address, for logs.
    peer: SocketAddr,
    /// Its russh callbacks.
    handler: LocalHandler,
    /// The endpoint's russh settings.
    config: Arc<server::Config>,
    /// Set once the client has logged in (ends the login grace time).
    authenticated: CancellationToken,
    /// The profile's shutdown.
    shutdown: CancellationToken,
}

impl Connection {
    /// A connection accepted by `ep` from `peer`.
    pub(super) fn new(
        ep: Endpoint,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Self {
        let authenticated = CancellationToken::new();
        Connection {
            stream,
            peer,
            config: ep.config.clone(),
            handler: LocalHandler {
                _counted: ep.clients.enter(),
                ep,
                peer,
                handle: None,
                channels: Arc::new(Mutex::new(HashMap::new())),
                session: None,
                authenticated: authenticated.clone(),
            },
            authenticated,
            shutdown,
        }
    }

    /// Runs the handshake and the session until the client leaves, fails
    /// to log in within the grace time (as sshd's LoginGraceTime, so idle
    /// or garbage connections cannot pile up), or sshshim shuts down.
    pub(super) async fn run(self) {
        let Connection {
            stream,
            peer,
            handler,
            config,
            authenticated,
            shutdown,
        } = self;
        // The grace time counts from accept: a client that sends nothing at
        // all is dropped too.
        let deadline = tokio::time::Instant::now() + LOGIN_GRACE;
        let grace = LOGIN_GRACE.as_secs();
        let running = match tokio::time::timeout_at(deadline, start(config, stream, handler)).await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return tracing::debug!("local handshake with {peer} failed: {e:?}"),
            Err(_) => {
                return tracing::info!(
                    "local client {peer} sent no SSH banner within {grace}s: dropped"
                );
            }
        };
        let handle = running.handle();
        let grace_over = async {
            tokio::time::sleep_until(deadline).await;
            if authenticated.is_cancelled() {
                std::future::pending::<()>().await;
            }
        };
        let why = tokio::select! {
            r = running => {
                if let Err(e) = r {
                    tracing::debug!("local session {peer} ended: {e:?}");
                }
                return;
            }
            _ = grace_over => {
                tracing::info!("local client {peer} did not log in within {grace}s: dropped");
                "login grace time over"
            }
            _ = shutdown.cancelled() => "sshshim is shutting down",
        };
        let _ = handle
            .disconnect(russh::Disconnect::ByApplication, why.into(), "en".into())
            .await;
    }
}

/// Starts russh on an accepted connection with the settings for what the
/// client offers (see [`kexinit`]).
async fn start(
    base: Arc<server::Config>,
    stream: tokio::net::TcpStream,
    handler: LocalHandler,
) -> Result<server::RunningSession<LocalHandler>, russh::Error> {
    let mut stream = quickack::QuickAck::new(stream);
    let id = kexinit::id_line(&base.server_id);
    let (read, offer) = kexinit::peek(&mut stream, &id).await?;
    let config = match offer {
        Ok(offer) => {
            let c = config_for(&base, &offer);
            tracing::debug!(
                "client offers kex {:?}, ciphers {:?}: listing {:?}, {:?}",
                offer.kex,
                offer.ciphers,
                c.preferred.kex,
                c.preferred.cipher
            );
            Arc::new(c)
        }
        Err(why) => {
            tracing::debug!("listing every algorithm: {why}");
            base
        }
    };
    server::run_stream(config, kexinit::Replay::new(stream, read, id), handler).await
}

/// Per-connection russh callbacks.
pub struct LocalHandler {
    /// Shared endpoint state.
    ep: Endpoint,
    /// The client's address, for logs.
    peer: SocketAddr,
    /// Our handle on this connection, set once authenticated.
    handle: Option<server::Handle>,
    /// Bridged session channels, for request forwarding.
    channels: Arc<Channels>,
    /// Forwards this connection asked for; cancelled when it ends.
    session: Option<Arc<LocalSession>>,
    /// Set once the client has logged in (ends the login grace time).
    authenticated: CancellationToken,
    /// Counts this client in the endpoint's gauge while it is connected.
    _counted: GaugeGuard,
}

impl LocalHandler {
    /// The bridge of a local session channel.
    fn bridge(&self, id: ChannelId) -> Option<Arc<Bridge>> {
        self.channels
            .lock()
            .unwrap()
            .get(&id)
            .map(|c| c.bridge.clone())
    }

    /// Forwards a channel request upstream and answers the local client with
    /// the upstream's verdict. Answered inline: russh keeps one want-reply
    /// flag per channel and OpenSSH pipelines requests, so a deferred answer
    /// could be lost.
    async fn relay(
        &self,
        id: ChannelId,
        session: &mut Session,
        req: Request,
    ) -> Result<(), russh::Error> {
        let ok = match self.bridge(id) {
            Some(b) => b.request(req).await,
            None => false,
        };
        if ok {
            session.channel_success(id)
        } else {
            session.channel_failure(id)
        }
    }

    /// Opens the upstream twin of a local channel in the background (the
    /// open takes a round trip we must not spend inside the session loop),
    /// then bridges them. A refusal carries the server's code, or for a
    /// session why there is no upstream right now.
    fn open_and_bridge(
        &self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
        what: Open,
    ) {
        let opener = self.ep.opener.clone();
        let channels = self.channels.clone();
        let handle = session.handle();
        let kind = what.kind();
        self.ep.opener.tasks().spawn(
            async move {
                let opened = match opener.open(what, kind).await {
                    Ok(o) => o,
                    Err(refused) => return refuse(channel, reply, refused).await,
                };
                let id = channel.id();
                let generation = opened.generation();
                let (i, o) = channel::ends(channel, handle);
                let b = opened.bridge(i, o, kind);
                channels.lock().unwrap().insert(
                    id,
                    LocalChannel {
                        bridge: b.clone(),
                        generation,
                        agent: None,
                    },
                );
                forget_when_finished(&opener, &channels, id, b);
                reply.accept().await;
            }
            .in_current_span(),
        );
    }
}

/// Removes a channel's entry once its bridge is done with it: russh reports
/// no close for a channel we closed first. Unless the id already names a
/// newer channel.
fn forget_when_finished(opener: &Opener, channels: &Arc<Channels>, id: ChannelId, b: Arc<Bridge>) {
    let weak = Arc::downgrade(channels);
    opener.tasks().spawn(async move {
        b.finished().await;
        if let Some(channels) = weak.upgrade() {
            let mut g = channels.lock().unwrap();
            if g.get(&id).is_some_and(|c| Arc::ptr_eq(&c.bridge, &b)) {
                g.remove(&id);
            }
        }
    });
}

/// Tells a local client its channel cannot be opened: a session why, on
/// its stderr (which every client shows); anything else, the refusal code.
async fn refuse(channel: Channel<Msg>, reply: server::ChannelOpenHandle, refused: Refused) {
    match refused.explanation() {
        Some(why) => explain_and_close(channel, reply, &why).await,
        None => reply.reject(refused.reason()).await,
    }
}

/// Accepts a session channel only to tell its client why it cannot be
/// served, then ends it with exit status 255 (what ssh uses for its own
/// failures).
async fn explain_and_close(channel: Channel<Msg>, reply: server::ChannelOpenHandle, why: &str) {
    reply.accept().await;
    let msg = format!("sshshim: {why}\r\n");
    let _ = channel.extended_data_bytes(1, msg.into_bytes()).await;
    let _ = channel.exit_status(255).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

impl server::Handler for LocalHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
        })
    }

    async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
        Ok(Auth::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // The user name is ignored: the endpoint serves exactly one account.
        Ok(if self.ep.authorized.allows(offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.ep.authorized.allows(key.public_key) {
            Ok(Auth::Accept)
        } else {
            tracing::warn!("local client {} offered an unauthorized key", self.peer);
            Ok(Auth::reject())
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.handle = Some(session.handle());
        self.authenticated.cancel();
        eow::register(&self.channels);
        self.session = Some(LocalSession::new(
            self.ep.forwards.clone(),
            session.handle(),
        ));
        tracing::debug!("local client {} authenticated", self.peer);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.open_and_bridge(channel, reply, session, Open::Session);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let what = Open::DirectTcpip {
            host: host_to_connect.to_owned(),
            port: port_to_connect,
            originator: originator_address.to_owned(),
            originator_port,
        };
        self.open_and_bridge(channel, reply, session, what);
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let what = Open::DirectStreamlocal(socket_path.to_owned());
        self.open_and_bridge(channel, reply, session, what);
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the entry drops its agent route too.
        self.channels.lock().unwrap().remove(&channel);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let req = Request::Pty {
            term: term.to_owned(),
            cols: col_width,
            rows: row_height,
            pix_width,
            pix_height,
            modes: modes.to_vec(),
        };
        self.relay(channel, session, req).await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // OpenSSH sends env without want-reply, so pass it on the same way
        // and spare a round trip.
        if let Some(b) = self.bridge(channel) {
            let _ = b.write.set_env(false, name, value).await;
        }
        session.channel_success(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.relay(channel, session, Request::Shell).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.relay(channel, session, Request::Exec(data.to_vec()))
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.relay(channel, session, Request::Subsystem(name.to_owned()))
            .await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(b) = self.bridge(channel) {
            let _ = b
                .write
                .window_change(col_width, row_height, pix_width, pix_height)
                .await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(b) = self.bridge(channel) {
            let _ = b.write.signal(signal).await;
        }
        Ok(())
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // The server's agent requests on this channel's upstream connection
        // come back to this client's own agent, while the channel is open.
        let Some(b) = self.bridge(channel) else {
            return Ok(false);
        };
        let granted = b.request(Request::AgentForward).await;
        let Some(handle) = self.handle.clone() else {
            return Ok(false);
        };
        let mut g = self.channels.lock().unwrap();
        let Some(c) = g.get_mut(&channel) else {
            return Ok(false);
        };
        if !self.ep.forwards.agent_forwarding(c.generation, granted) {
            return Ok(false);
        }
        if c.agent.is_none() {
            c.agent = Some(
                self.ep
                    .forwards
                    .add_agent_route(c.generation, AgentTarget::Client(handle)),
            );
        }
        Ok(true)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(s) = &self.session else {
            return Ok(false);
        };
        Ok(match s.tcpip_forward(address, *port).await {
            Some(bound) => {
                *port = bound;
                true
            }
            None => false,
        })
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(s) = &self.session else {
            return Ok(false);
        };
        Ok(s.cancel_tcpip_forward(address, port).await)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(s) = &self.session else {
            return Ok(false);
        };
        Ok(s.streamlocal_forward(socket_path).await)
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(s) = &self.session else {
            return Ok(false);
        };
        Ok(s.cancel_streamlocal_forward(socket_path).await)
    }
}

impl Drop for LocalHandler {
    fn drop(&mut self) {
        // The local connection is gone: its forwards must stop listening
        // upstream.
        if let Some(s) = self.session.take() {
            s.end();
        }
    }
}

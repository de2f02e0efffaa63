//! Where the channels the server opens go: a connection to a remote
//! forward goes to the forward's owner (a local client, or sshshim's own
//! target); an agent request goes to the local session that forwarded its
//! agent on that upstream connection.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use russh::{ChannelOpenFailure, client, server};

use super::{Owner, Registry};
use crate::bridge::OpenChannel;
use crate::bridge::ends::{channel, stream};
use crate::config::spec::Addr;
use crate::upstream::{ServerOpen, ServerOpenKind, ServerSlot};

/// Where the server's agent requests for one local session go.
#[derive(Clone)]
pub enum AgentTarget {
    /// Back to the endpoint client that asked (`ssh -A`): its own agent.
    Client(server::Handle),
    /// To an agent socket of ours (a multiplexing client asked; OpenSSH's
    /// ControlMaster, too, serves those from its own agent).
    Socket(PathBuf),
}

/// One local session with agent forwarding on.
pub(super) struct AgentRoute {
    /// Registry-unique id.
    id: u64,
    /// The upstream connection its session channel is on.
    generation: u64,
    /// Where its agent is.
    target: AgentTarget,
}

/// Keeps an agent route while alive: drop it when the session ends.
pub struct AgentGuard {
    /// The registry holding the route.
    registry: Weak<Registry>,
    /// The route.
    id: u64,
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            r.agents.lock().unwrap().retain(|a| a.id != self.id);
        }
    }
}

/// A channel to bridge to the local side once accepted.
struct Routed {
    /// The upstream channel.
    channel: russh::Channel<client::Msg>,
    /// Its answer.
    reply: client::ChannelOpenHandle,
    /// The meter and logs' name for it.
    kind: &'static str,
    /// Its connection's congestion counter.
    congestion: Arc<AtomicUsize>,
    /// Its place under the cap on server-opened channels, held while the
    /// bridge lives.
    slot: ServerSlot,
    /// Which upstream connection it came on.
    generation: u64,
}

impl Registry {
    /// Routes the server's agent requests on upstream connection
    /// `generation` to `target` while the guard lives. sshd keeps one agent
    /// socket per connection and its requests name no session, so the most
    /// recently added route of that connection wins.
    pub fn add_agent_route(self: &Arc<Self>, generation: u64, target: AgentTarget) -> AgentGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.agents.lock().unwrap().push(AgentRoute {
            id,
            generation,
            target,
        });
        AgentGuard {
            registry: Arc::downgrade(self),
            id,
        }
    }

    /// Whether a local session on upstream connection `generation` gets
    /// agent forwarding, given whether the server `granted` its request.
    /// sshd grants the first request of a connection and refuses the later
    /// ones, yet every later session gets the same agent socket: so once
    /// granted on a connection, every `-A` session on it is routed.
    pub fn agent_forwarding(&self, generation: u64, granted: bool) -> bool {
        let mut on = self.agent_granted.lock().unwrap();
        if granted {
            on.insert(generation);
            true
        } else {
            on.contains(&generation)
        }
    }

    /// Routes one channel the server opened. Runs in the event loop, so the
    /// work (local opens, connects) is spawned.
    pub(super) fn route(self: &Arc<Self>, ev: ServerOpen) {
        let ServerOpen {
            kind,
            channel,
            reply,
            generation,
            congestion,
            slot,
        } = ev;
        let reg = self.clone();
        self.opener.tasks().spawn(async move {
            match kind {
                ServerOpenKind::ForwardedTcpip {
                    connected_address,
                    connected_port,
                    originator_address,
                    originator_port,
                } => {
                    let routed = Routed {
                        channel,
                        reply,
                        kind: "forwarded-tcpip",
                        congestion,
                        slot,
                        generation,
                    };
                    let Ok(port) = u16::try_from(connected_port) else {
                        return routed.reply.reject(ChannelOpenFailure::ConnectFailed).await;
                    };
                    let listen = Addr::Tcp(connected_address.clone(), port);
                    match reg.owner_of(&listen) {
                        None => {
                            tracing::debug!("forwarded connection for unknown {listen}");
                            routed
                                .reply
                                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                                .await
                        }
                        Some(Owner::Client(h)) => {
                            let local = h
                                .channel_open_forwarded_tcpip(
                                    connected_address,
                                    connected_port,
                                    originator_address,
                                    originator_port,
                                )
                                .await;
                            reg.to_client(local, h, routed).await
                        }
                        Some(Owner::Shim(target)) => reg.to_target(target, routed).await,
                    }
                }
                ServerOpenKind::ForwardedStreamlocal { socket_path } => {
                    let routed = Routed {
                        channel,
                        reply,
                        kind: "forwarded-streamlocal",
                        congestion,
                        slot,
                        generation,
                    };
                    match reg.owner_of(&Addr::Unix(socket_path.clone())) {
                        None => {
                            routed
                                .reply
                                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                                .await
                        }
                        Some(Owner::Client(h)) => {
                            let local = h.channel_open_forwarded_streamlocal(socket_path).await;
                            reg.to_client(local, h, routed).await
                        }
                        Some(Owner::Shim(target)) => reg.to_target(target, routed).await,
                    }
                }
                ServerOpenKind::Agent => {
                    let routed = Routed {
                        channel,
                        reply,
                        kind: "agent",
                        congestion,
                        slot,
                        generation,
                    };
                    reg.to_agent(generation, routed).await
                }
            }
        });
    }

    /// Serves an agent request from the session that forwarded its agent
    /// on that connection; refused when there is none, so a client that did
    /// not ask for `-A` is never given any agent.
    async fn to_agent(&self, generation: u64, routed: Routed) {
        let target = self
            .agents
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|a| a.generation == generation)
            .map(|a| a.target.clone());
        match target {
            None => {
                tracing::debug!("agent request with no -A session open: refused");
                routed
                    .reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await
            }
            Some(AgentTarget::Client(h)) => {
                let local = h.channel_open_agent().await;
                self.to_client(local, h, routed).await
            }
            Some(AgentTarget::Socket(path)) => match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => self.accept_stream(s, None, routed).await,
                Err(e) => {
                    tracing::warn!("agent forwarding: cannot reach {}: {e}", path.display());
                    routed.reply.reject(ChannelOpenFailure::ConnectFailed).await
                }
            },
        }
    }

    /// Bridges a routed channel to a channel opened back to a local client.
    async fn to_client(
        &self,
        local: Result<russh::Channel<server::Msg>, russh::Error>,
        h: server::Handle,
        routed: Routed,
    ) {
        match local {
            Ok(local) => {
                let kind = routed.kind;
                let (upstream, reply) = self.adopt(routed);
                reply.accept().await;
                let (i, o) = channel::ends(local, h);
                upstream.bridge(i, o, kind);
            }
            Err(e) => {
                tracing::debug!("local client refused a {}: {e}", routed.kind);
                routed.reply.reject(ChannelOpenFailure::ConnectFailed).await
            }
        }
    }

    /// Connects a routed channel to an sshshim-owned forward's target.
    async fn to_target(&self, target: Addr, routed: Routed) {
        let connected = match &target {
            Addr::Tcp(h, p) => tokio::net::TcpStream::connect((h.as_str(), *p))
                .await
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    let dup = stream::dup_tcp(&s);
                    (Box::new(s) as Box<dyn Stream>, dup)
                }),
            Addr::Unix(p) => {
                tokio::net::UnixStream::connect(crate::paths::expand_tilde(p.as_ref()))
                    .await
                    .map(|s| (Box::new(s) as Box<dyn Stream>, None))
            }
        };
        match connected {
            Ok((s, dup)) => self.accept_stream(s, dup, routed).await,
            Err(e) => {
                tracing::warn!("remote forward: cannot connect to {target}: {e}");
                routed.reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
    }

    /// Accepts a routed channel and bridges it to a local stream.
    async fn accept_stream(
        &self,
        s: impl Stream + 'static,
        dup: Option<socket2::Socket>,
        routed: Routed,
    ) {
        let kind = routed.kind;
        let (upstream, reply) = self.adopt(routed);
        reply.accept().await;
        let (rd, wr) = tokio::io::split(s);
        upstream.bridge(
            stream::StreamIn::new(rd),
            stream::StreamOut::new(wr).reset_on_abort(dup),
            kind,
        );
    }

    /// A routed channel as one ready to bridge, and its answer.
    fn adopt(&self, r: Routed) -> (OpenChannel, client::ChannelOpenHandle) {
        let hold = Box::new(r.slot);
        let upstream = (self.opener).adopt(r.channel, r.kind, hold, r.congestion, r.generation);
        (upstream, r.reply)
    }
}

/// A socket of either family.
pub(super) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

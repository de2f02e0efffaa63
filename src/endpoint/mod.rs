//! The local endpoint: an SSH server on loopback that admits only our own
//! user and hands every channel to the bridge. Here: its keys and russh
//! settings, and [`Endpoint::serve`], which admits each connection and runs
//! it (`connection`: handshake, login grace time, russh callbacks);
//! [`auth`] checks peers and keys, [`kexinit`] and [`quickack`] tune the
//! handshake, [`eow`] notices `eow@openssh.com`.

pub mod auth;
mod connection;
pub mod eow;
pub mod kexinit;
pub mod quickack;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, ssh_key::LineEnding};
use russh::server;
use russh::{MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::bridge::Opener;
use crate::forward::Registry;
use crate::stats::Gauge;
use auth::AuthorizedKeys;
use connection::Connection;
pub use connection::{Channels, LocalChannel, LocalHandler};

/// Why the endpoint's host key could not be loaded or created; the cause
/// survives as the source.
#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    /// The key file exists but does not load.
    #[error("cannot load host key {}: {source}", path.display())]
    Load {
        /// The key file.
        path: PathBuf,
        /// Why it does not load.
        source: russh::keys::Error,
    },
    /// The state directory, where the generated key lives, cannot be made.
    #[error("cannot create the state directory: {0}")]
    StateDir(#[source] std::io::Error),
    /// No key could be generated.
    #[error("cannot generate a host key: {0}")]
    Generate(#[source] russh::keys::ssh_key::Error),
    /// The generated key could not be encoded.
    #[error("cannot encode the host key: {0}")]
    Encode(#[source] russh::keys::ssh_key::Error),
    /// The generated key could not be written.
    #[error("cannot write host key {}: {source}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// Why it could not be written.
        source: std::io::Error,
    },
}

/// Loads the endpoint host key, or generates one under the state directory
/// the first time so clients always see the same key.
pub fn load_or_create_host_key(
    explicit: Option<&Path>,
) -> Result<(PrivateKey, PathBuf), HostKeyError> {
    if let Some(p) = explicit {
        let key = russh::keys::load_secret_key(p, None).map_err(|source| HostKeyError::Load {
            path: p.to_path_buf(),
            source,
        })?;
        return Ok((key, p.to_path_buf()));
    }
    let dir = crate::paths::state_dir().map_err(HostKeyError::StateDir)?;
    let path = dir.join("host_key_ed25519");
    if path.exists() {
        let key =
            russh::keys::load_secret_key(&path, None).map_err(|source| HostKeyError::Load {
                path: path.clone(),
                source,
            })?;
        return Ok((key, path));
    }
    let key = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
        .map_err(HostKeyError::Generate)?;
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(HostKeyError::Encode)?;
    write_private(&path, text.as_bytes()).map_err(|source| HostKeyError::Write {
        path: path.clone(),
        source,
    })?;
    tracing::info!("generated endpoint host key {}", path.display());
    Ok((key, path))
}

/// Writes a new file readable by its owner only (created 0600, never
/// widened even for an instant).
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// russh server settings for the endpoint, with every algorithm it accepts
/// (for a client whose offer is not known; see [`config_for`]).
pub fn server_config(host_key: PrivateKey) -> server::Config {
    server::Config {
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // OpenSSH probes with "none" first; rejecting it slowly would add a
        // second to every connect.
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        // Local sessions may idle for days (a shell in tmux).
        inactivity_timeout: None,
        window_size: crate::tuning::WINDOW_SIZE,
        maximum_packet_size: crate::tuning::MAX_PACKET,
        channel_buffer_size: crate::tuning::CHANNEL_BUFFER,
        preferred: crate::tuning::endpoint_algorithms(),
        nodelay: true,
        // OpenSSH clients use their extensions (eow@openssh.com above all,
        // which ends `ssh host yes | head` promptly) only with servers whose
        // version starts with "OpenSSH"; we implement what they need.
        server_id: russh::SshId::Standard(
            concat!("SSH-2.0-OpenSSH_sshshim-", env!("CARGO_PKG_VERSION")).into(),
        ),
        ..Default::default()
    }
}

/// The settings for one client, from `base` and what its KEXINIT offers:
/// only the cheapest key exchange and cipher it offers are listed, so the
/// negotiation lands on them whatever the client's order. Re-keying uses
/// the same settings, so it keeps the choice.
pub fn config_for(base: &server::Config, offer: &kexinit::Offer) -> server::Config {
    let kex: Vec<&str> = offer.kex.iter().map(String::as_str).collect();
    let ciphers: Vec<&str> = offer.ciphers.iter().map(String::as_str).collect();
    let choice = crate::tuning::endpoint_choice(&kex, &ciphers);
    let preferred = russh::Preferred {
        kex: choice.kex,
        cipher: choice.cipher,
        ..base.preferred.clone()
    };
    // Every other setting as in `base` (russh's Config is not Clone).
    server::Config {
        server_id: match &base.server_id {
            russh::SshId::Standard(s) => russh::SshId::Standard(s.clone()),
            russh::SshId::Raw(s) => russh::SshId::Raw(s.clone()),
        },
        methods: base.methods.clone(),
        auth_rejection_time: base.auth_rejection_time,
        auth_rejection_time_initial: base.auth_rejection_time_initial,
        keys: base.keys.clone(),
        certificates: base.certificates.clone(),
        limits: base.limits.clone(),
        window_size: base.window_size,
        maximum_packet_size: base.maximum_packet_size,
        channel_buffer_size: base.channel_buffer_size,
        event_buffer_size: base.event_buffer_size,
        preferred,
        max_auth_attempts: base.max_auth_attempts,
        inactivity_timeout: base.inactivity_timeout,
        keepalive_interval: base.keepalive_interval,
        keepalive_max: base.keepalive_max,
        nodelay: base.nodelay,
    }
}

/// Shared state of the endpoint, cloned into every connection.
#[derive(Clone)]
pub struct Endpoint {
    /// russh server settings.
    pub config: Arc<server::Config>,
    /// Opens upstream channels and bridges them; connections run on its
    /// tasks too (waited for on shutdown).
    pub opener: Opener,
    /// Keys allowed in.
    pub authorized: Arc<AuthorizedKeys>,
    /// Forward registry (client-requested and sshshim-owned forwards).
    pub forwards: Arc<Registry>,
    /// Accept peers that are not on loopback (then the uid check cannot apply).
    pub allow_non_loopback: bool,
    /// Local clients connected right now (for status).
    pub clients: Gauge,
}

impl Endpoint {
    /// Accepts local clients until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        eow::install();
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            // The accepted socket's own address (getsockname), not the
            // listener's: on a wildcard listener that is 0.0.0.0, which
            // names no socket the kernel could look up.
            if let Err(why) = self.admit(peer, stream.local_addr().ok()) {
                tracing::warn!("refused local connection from {peer}: {why}");
                continue;
            }
            let _ = stream.set_nodelay(true);
            let conn = Connection::new(self.clone(), stream, peer, shutdown.clone());
            let span = tracing::info_span!("client", %peer);
            self.opener.tasks().spawn(conn.run().instrument(span));
        }
    }

    /// The same-user check done before any SSH byte is exchanged. A client
    /// on this machine (loopback, or one of the host's own addresses when
    /// the endpoint listens beyond loopback) must run as our uid; one from
    /// elsewhere is let through to the key check only with
    /// `allow_non_loopback`.
    fn admit(&self, peer: SocketAddr, local: Option<SocketAddr>) -> Result<(), Refusal> {
        // An IPv4 client of a dual-stack listener shows as ::ffff:a.b.c.d,
        // which is not "loopback" until unmapped.
        let ip = peer.ip().to_canonical();
        let from_here = ip.is_loopback() || auth::is_host_address(ip);
        if !from_here && !self.allow_non_loopback {
            return Err(Refusal::NotLoopback);
        }
        let Some(local) = local else {
            return Err(Refusal::NoLocalAddress);
        };
        if !cfg!(target_os = "linux") {
            // No way to ask the kernel who owns a TCP peer: the key
            // check alone decides (README says so).
            return Ok(());
        }
        admission(from_here, auth::peer_uid(peer, local), auth::my_uid())
    }
}

/// Why a local client was refused before any SSH byte (logged).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum Refusal {
    /// From another machine, and the endpoint admits only this one.
    #[error("not a loopback address")]
    NotLoopback,
    /// The accepted socket's own address is unknown.
    #[error("cannot tell the local address")]
    NoLocalAddress,
    /// Another user's socket.
    #[error("its socket belongs to uid {0}, not ours")]
    OtherUser(u32),
    /// From this machine, but the kernel does not say whose socket it is.
    #[error("cannot find the owner of its socket")]
    NoOwner,
}

/// The verdict on a client: `from_here` when its address is this
/// machine's, `owner` the uid of its socket if the kernel knows the socket.
/// Fails closed: a client from here whose owner cannot be found is refused;
/// a socket the kernel knows is checked wherever its address points.
fn admission(from_here: bool, owner: Option<u32>, me: u32) -> Result<(), Refusal> {
    match owner {
        Some(uid) if uid == me => Ok(()),
        Some(uid) => Err(Refusal::OtherUser(uid)),
        None if from_here => Err(Refusal::NoOwner),
        // Another machine: only the key check applies.
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::PublicKeyOrCertificate;

    /// A server handler that only does the key exchange and refuses logins.
    struct KexOnly;
    impl server::Handler for KexOnly {
        type Error = russh::Error;
    }

    /// A client handler that trusts any host key (the test's own server).
    struct Trusting;
    impl russh::client::Handler for Trusting {
        type Error = russh::Error;
        async fn check_server_key(
            &mut self,
            _key: &PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(true)
        }
    }

    /// Same uid: in. Another uid: out, from here or not. Unknown owner:
    /// out from this machine (fails closed), key check only from elsewhere.
    #[test]
    fn admission_verdicts() {
        assert!(admission(true, Some(7), 7).is_ok());
        assert!(admission(false, Some(7), 7).is_ok());
        let e = admission(true, Some(65534), 7).unwrap_err();
        assert_eq!(e, Refusal::OtherUser(65534));
        assert!(e.to_string().contains("uid 65534"), "{e}");
        assert!(admission(false, Some(65534), 7).is_err());
        assert!(admission(true, None, 7).is_err());
        assert!(admission(false, None, 7).is_ok());
    }

    /// A client that insists on ML-KEM (OpenSSH 9.9 and later may) completes
    /// the key exchange with the endpoint's settings. The OpenSSH client on
    /// the test machines may predate it, so a russh client stands in.
    #[tokio::test]
    async fn endpoint_accepts_a_client_insisting_on_mlkem() {
        let key = PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).unwrap();
        let config = Arc::new(server_config(key));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            if let Ok(running) = server::run_stream(config, s, KexOnly).await {
                let _ = running.await;
            }
        });
        let client = russh::client::Config {
            preferred: russh::Preferred {
                kex: std::borrow::Cow::Borrowed(&[russh::kex::MLKEM768X25519_SHA256]),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut h = russh::client::connect(Arc::new(client), addr, Trusting)
            .await
            .expect("key exchange with mlkem768x25519-sha256 only");
        // Past the key exchange: the server answers an authentication.
        let auth = h.authenticate_none("u").await.unwrap();
        assert!(!auth.success());
        let _ = h
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        server.abort();
    }
}

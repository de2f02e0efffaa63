//! A malicious upstream: a small russh server that passes every check the
//! shim makes (its host key is the test's sshd key, written into a
//! known_hosts file of its own that the shim is given; it accepts only the
//! test user's key) and then does what the test asks through the session
//! handles it hands out, such as opening channels nobody asked for.
//!
//! It serves just enough for `ssh shim true` to work through it (a session
//! channel whose `exec` exits 0), and accepts every `tcpip-forward`.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId};

use super::{LOCALHOST, TestEnv};

/// A running malicious upstream on 127.0.0.1.
pub struct EvilServer {
    /// Runs the server (one worker thread) and the test's async steps.
    rt: tokio::runtime::Runtime,
    /// Listening port.
    port: u16,
    /// known_hosts with this server's key for `[127.0.0.1]:port`.
    known_hosts: PathBuf,
    /// Handles of authenticated connections, in order.
    sessions: Mutex<mpsc::Receiver<server::Handle>>,
    /// `tcpip-forward` requests seen: (address, port).
    forwards: Arc<Mutex<Vec<(String, u32)>>>,
}

/// The server's side of one connection.
struct Evil {
    /// The only key allowed in.
    user_key: russh::keys::PublicKey,
    /// Where the handle goes once the client is authenticated.
    sessions: mpsc::Sender<server::Handle>,
    /// Records `tcpip-forward` requests.
    forwards: Arc<Mutex<Vec<(String, u32)>>>,
}

impl server::Handler for Evil {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if offer.public_key.key_data() == self.user_key.key_data() {
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
        Ok(if key.public_key.key_data() == self.user_key.key_data() {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let _ = self.sessions.send(session.handle());
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        session.exit_status_request(channel, 0)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.forwards
            .lock()
            .unwrap()
            .push((address.to_owned(), *port));
        Ok(true)
    }
}

impl EvilServer {
    /// Starts listening on 127.0.0.1:0 with the env's sshd host key and
    /// writes its known_hosts file.
    pub fn start(env: &TestEnv) -> EvilServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let host_key = russh::keys::load_secret_key(env.host_key(), None).expect("host key");
        let user_key =
            russh::keys::load_public_key(env.path("user_key.pub")).expect("user_key.pub");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind((LOCALHOST, 0)))
            .expect("bind");
        let port = listener.local_addr().unwrap().port();
        let known_hosts = env.path(&format!("kh_evil_{port}"));
        std::fs::write(
            &known_hosts,
            format!("[{LOCALHOST}]:{port} {}\n", env.host_key_line()),
        )
        .expect("write known_hosts");
        let config = Arc::new(server::Config {
            methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
            auth_rejection_time: Duration::from_millis(10),
            auth_rejection_time_initial: Some(Duration::ZERO),
            keys: vec![host_key],
            inactivity_timeout: None,
            ..Default::default()
        });
        let (tx, rx) = mpsc::channel();
        let forwards = Arc::new(Mutex::new(Vec::new()));
        let fw = forwards.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let handler = Evil {
                    user_key: user_key.clone(),
                    sessions: tx.clone(),
                    forwards: fw.clone(),
                };
                let config = config.clone();
                tokio::spawn(async move {
                    if let Ok(running) = server::run_stream(config, stream, handler).await {
                        let _ = running.await;
                    }
                });
            }
        });
        EvilServer {
            rt,
            port,
            known_hosts,
            sessions: Mutex::new(rx),
            forwards,
        }
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// known_hosts trusting this server (give it to the shim).
    pub fn known_hosts(&self) -> &Path {
        &self.known_hosts
    }

    /// The next authenticated connection; panics after `timeout`.
    pub fn session(&self, timeout: Duration) -> server::Handle {
        self.sessions
            .lock()
            .unwrap()
            .recv_timeout(timeout)
            .expect("no authenticated connection to the evil server")
    }

    /// `tcpip-forward` requests received so far: (address, port).
    pub fn forwards(&self) -> Vec<(String, u32)> {
        self.forwards.lock().unwrap().clone()
    }

    /// Runs an async step (opening channels through a handle) on the
    /// server's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

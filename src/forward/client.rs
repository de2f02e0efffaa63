//! The remote forwards a client of the local endpoint asks for (`ssh -R`
//! through the shim): requested upstream on its behalf, routed back to it,
//! and cancelled when it cancels them or goes away.

use std::sync::{Arc, Mutex};

use russh::server;

use super::{Owner, Registry, cancel_remote, request_remote};
use crate::config::spec::Addr;
use crate::upstream::Connection;

/// The forwards one local client connection asked for. They are cancelled
/// upstream when the connection ends.
pub struct LocalSession {
    /// The shared registry.
    registry: Arc<Registry>,
    /// Where forwarded connections for this client are opened.
    handle: server::Handle,
    /// Ids of this client's forwards.
    ids: Mutex<Vec<u64>>,
}

impl LocalSession {
    /// Tracks forwards for a newly authenticated local connection.
    pub fn new(registry: Arc<Registry>, handle: server::Handle) -> Arc<Self> {
        Arc::new(LocalSession {
            registry,
            handle,
            ids: Mutex::new(Vec::new()),
        })
    }

    /// The upstream connection, if there is one within the connect timeout.
    async fn conn(&self) -> Option<Arc<Connection>> {
        self.registry.pool.connection().await.ok()
    }

    /// `tcpip-forward` from the client: asks upstream for the same bind
    /// address and port. Returns the bound port, or `None` if refused.
    pub async fn tcpip_forward(&self, address: &str, port: u32) -> Option<u32> {
        let port = u16::try_from(port).ok()?;
        let conn = self.conn().await?;
        let listen = Addr::Tcp(address.to_owned(), port);
        // sshd accepts connections as soon as it listens, possibly before
        // its reply reaches us: route a fixed port from the start so none
        // is refused. (A port-0 forward is unknown to anyone until the
        // client is told the port, after this returns.)
        let early = (port != 0).then(|| {
            self.registry.add(
                listen.clone(),
                Some(port),
                Owner::Client(self.handle.clone()),
                conn.generation,
            )
        });
        match request_remote(&conn, &listen, None).await {
            Ok(bound) => {
                let id = early.unwrap_or_else(|| {
                    self.registry.add(
                        listen,
                        Some(bound),
                        Owner::Client(self.handle.clone()),
                        conn.generation,
                    )
                });
                self.ids.lock().unwrap().push(id);
                Some(bound as u32)
            }
            Err(why) => {
                if let Some(id) = early {
                    self.registry.remove(id);
                }
                tracing::info!("client forward {address}:{port} refused: {why}");
                None
            }
        }
    }

    /// `cancel-tcpip-forward` from the client.
    pub async fn cancel_tcpip_forward(&self, address: &str, port: u32) -> bool {
        self.cancel(|l, b| matches!(l, Addr::Tcp(h, p) if h == address && (b == Some(port as u16) || *p as u32 == port)))
            .await
    }

    /// `streamlocal-forward@openssh.com` from the client.
    pub async fn streamlocal_forward(&self, path: &str) -> bool {
        let Some(conn) = self.conn().await else {
            return false;
        };
        let listen = Addr::Unix(path.to_owned());
        // Routed before sshd listens, as for TCP above.
        let id = self.registry.add(
            listen.clone(),
            Some(0),
            Owner::Client(self.handle.clone()),
            conn.generation,
        );
        match request_remote(&conn, &listen, None).await {
            Ok(_) => {
                self.ids.lock().unwrap().push(id);
                true
            }
            Err(why) => {
                self.registry.remove(id);
                tracing::info!("client forward {path} refused: {why}");
                false
            }
        }
    }

    /// `cancel-streamlocal-forward@openssh.com` from the client.
    pub async fn cancel_streamlocal_forward(&self, path: &str) -> bool {
        self.cancel(|l, _| matches!(l, Addr::Unix(p) if p == path))
            .await
    }

    /// Cancels this client's forwards that `pick` selects.
    async fn cancel(&self, pick: impl Fn(&Addr, Option<u16>) -> bool) -> bool {
        let ids: Vec<u64> = self.ids.lock().unwrap().clone();
        let mut found = false;
        for id in ids {
            if self.registry.selects(id, &pick)
                && let Some((listen, bound)) = self.registry.remove(id)
            {
                self.ids.lock().unwrap().retain(|i| *i != id);
                if let Some(conn) = self.conn().await {
                    cancel_remote(&conn, &listen, bound).await;
                }
                found = true;
            }
        }
        found
    }

    /// The client connection ended: forget its forwards and stop them
    /// listening upstream at once.
    pub fn end(self: Arc<Self>) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap());
        let removed: Vec<_> = ids
            .into_iter()
            .filter_map(|id| self.registry.remove(id))
            .collect();
        if removed.is_empty() {
            return;
        }
        let pool = self.registry.pool.clone();
        self.registry.opener.tasks().spawn(async move {
            let Ok(conn) = pool.connection().await else {
                return;
            };
            for (listen, bound) in removed {
                cancel_remote(&conn, &listen, bound).await;
            }
        });
    }
}

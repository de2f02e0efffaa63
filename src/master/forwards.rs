//! OPEN_FWD and CLOSE_FWD (`ssh -O forward`, `ssh -O cancel`): forwards
//! owned by sshshim from then on, as with OpenSSH's ControlMaster.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::Master;
use crate::config::spec::{Addr, ForwardSpec, Kind};
use crate::forward::FwdState;
use crate::forward::local::{self, Target};
use crate::mux::{Forward, ForwardKind, ForwardReply, MuxAddr};

impl Master {
    /// OPEN_FWD: a forward owned by sshshim from now on (it outlives the
    /// client, as with ControlMaster, and is replayed after reconnects).
    pub(super) async fn open_forward(self: Arc<Self>, f: Forward, reply: ForwardReply) {
        let key = forward_key(&f);
        let listen = addr(&f.listen);
        match f.kind {
            ForwardKind::Local | ForwardKind::Dynamic => {
                if self.forwards.lock().unwrap().contains_key(&key) {
                    return reply.ok();
                }
                let (target, what) = match (&f.kind, &f.connect) {
                    (ForwardKind::Local, Some(c)) => {
                        (Target::Fixed(addr(c)), format!("-L {listen}:{}", addr(c)))
                    }
                    _ => (Target::Socks, format!("-D {listen}")),
                };
                let listener = match local::bind(&listen).await {
                    Ok(l) => l,
                    Err(e) => return reply.failure(&e.to_string()),
                };
                let token = self.shutdown.child_token();
                self.forwards.lock().unwrap().insert(key, token.clone());
                self.opener.tasks().spawn(
                    local::serve(listener, what, target, self.opener.clone(), token)
                        .in_current_span(),
                );
                reply.ok();
            }
            ForwardKind::Remote => {
                let Some(connect) = &f.connect else {
                    return reply.failure("a remote forward needs a target");
                };
                let spec = ForwardSpec {
                    kind: Kind::Remote,
                    listen: listen.clone(),
                    target: addr(connect),
                };
                let id = match self.registry.find_owned_remote(&spec.listen, &spec.target) {
                    Some(id) => id,
                    None => self.registry.open_owned_remote(&spec),
                };
                // Wait for the server's answer, so `ssh -O forward -R 0:…`
                // prints the port (and a refusal is reported).
                let deadline = tokio::time::Instant::now() + self.connect_timeout;
                loop {
                    match self.registry.state_of(id) {
                        Some((FwdState::Active, bound)) => {
                            return match (&listen, bound) {
                                (Addr::Tcp(_, 0), Some(p)) => reply.remote_port(p),
                                _ => reply.ok(),
                            };
                        }
                        Some((FwdState::Retrying(why), _)) => {
                            self.registry.remove_and_cancel(id);
                            return reply.failure(&why);
                        }
                        Some((FwdState::Pending, _)) => {}
                        None => return reply.failure("the forward was removed"),
                    }
                    if tokio::time::Instant::now() >= deadline {
                        // Kept: it is requested as soon as the upstream is
                        // back, as sshshim's other forwards are.
                        return reply.ok();
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// CLOSE_FWD (`ssh -O cancel`), matched on the spec as it was opened.
    pub(super) fn close_forward(&self, f: &Forward) -> bool {
        match f.kind {
            ForwardKind::Local | ForwardKind::Dynamic => {
                match self.forwards.lock().unwrap().remove(&forward_key(f)) {
                    Some(token) => {
                        token.cancel();
                        true
                    }
                    None => false,
                }
            }
            ForwardKind::Remote => {
                let Some(connect) = &f.connect else {
                    return false;
                };
                match self
                    .registry
                    .find_owned_remote(&addr(&f.listen), &addr(connect))
                {
                    Some(id) => self.registry.remove_and_cancel(id),
                    None => false,
                }
            }
        }
    }
}

/// A mux address as a forward address.
fn addr(a: &MuxAddr) -> Addr {
    match a {
        MuxAddr::Tcp(h, p) => Addr::Tcp(h.clone(), *p),
        MuxAddr::Unix(p) => Addr::Unix(p.clone()),
    }
}

/// The identity of a local or dynamic forward, for CLOSE_FWD.
fn forward_key(f: &Forward) -> String {
    f.to_string()
}

//! The daemon of a forwards helper: started like a session's, its first
//! `Start` asks for [`Command::Forwards`](crate::resume::wire::Command)
//! instead of a command. The same socket, greeting, secret, hold timeout,
//! `Reap` and one attachment at a time; the connections themselves are
//! [`Forwards`]'s.

use std::time::Duration;

use super::{Conn, Daemon, Event, notified, sleep_opt};
use crate::resume::remote::forwards::{Forwards, Link};
use crate::resume::wire::{Frame, StartSpec};

impl Link for Conn {
    fn send(&self, f: &Frame) {
        Conn::send(self, f);
    }

    fn has_room(&self) -> bool {
        Conn::has_room(self)
    }
}

impl Daemon {
    /// Serves forwarded connections from `spec`'s `Start` on `c` until
    /// the client is done, a `Reap` ends them, or nobody attaches within
    /// the hold timeout; every target connection is closed then.
    pub(super) async fn serve_forwards(&mut self, spec: StartSpec, c: Conn) {
        let mut f = Forwards::new(spec);
        // Later connections resume rather than start.
        self.forwarding = true;
        c.send(&Frame::Started);
        self.attached = Some(c);
        while !self.ending {
            if let Some(a) = &self.attached {
                f.pump(a);
            }
            let waits = self.attached.as_ref().is_some_and(|c| !c.has_room()) && f.wants_to_send();
            let drained = self.attached.as_ref().map(|c| c.drained.clone());
            tokio::select! {
                acc = self.listener.accept() => {
                    if let Ok((stream, _)) = acc {
                        self.accepted(stream);
                    }
                }
                Some(ev) = self.events.recv() => self.forwards_event(&mut f, ev),
                ev = f.next() => f.handle(ev),
                () = notified(drained), if waits => {}
                () = sleep_opt(self.timer.as_mut()), if self.timer.is_some() => {
                    // Nobody came back in time.
                    self.ending = true;
                }
            }
        }
        f.close_all();
    }

    /// A connection's event, for a forwards helper.
    fn forwards_event(&mut self, f: &mut Forwards, ev: Event) {
        match ev {
            Event::Closed(g) => {
                self.pending.remove(&g);
                if self.attached.as_ref().is_some_and(|c| c.generation == g) {
                    self.attached = None;
                    let secs = u64::from(f.spec().timeout_secs);
                    self.timer = Some(Box::pin(tokio::time::sleep(Duration::from_secs(secs))));
                }
            }
            Event::Frame(g, frame) => {
                if let Some(a) = self.attached.as_ref().filter(|c| c.generation == g) {
                    match frame {
                        Frame::Conn { conn, frame } => f.frame(conn, *frame, a),
                        // sshshim is done with its forwards (or gone for good).
                        Frame::Done | Frame::Hangup => self.ending = true,
                        Frame::Reap { owner, run } => self.forwards_reap(f, owner, run),
                        // Nothing else means anything here.
                        _ => {}
                    }
                } else if let Some(c) = self.pending.remove(&g) {
                    self.forwards_pending(f, c, frame);
                }
            }
        }
    }

    /// A frame on a connection that is not the attachment.
    fn forwards_pending(&mut self, f: &mut Forwards, c: Conn, frame: Frame) {
        match frame {
            Frame::Resume { secret, .. } => {
                if !f.spec().secret.matches(&secret) {
                    c.send(&Frame::Refused("wrong secret".into()));
                    return;
                }
                c.send(&Frame::Resumed { have_in: 0 });
                f.reattach();
                // Replaces (and closes) any earlier attachment.
                self.attached = Some(c);
                self.timer = None;
            }
            Frame::Reap { owner, run } => self.forwards_reap(f, owner, run),
            Frame::Start(_) => c.send(&Frame::Refused("the session was already started".into())),
            // Anything else before attaching: the connection is dropped.
            _ => {}
        }
    }

    /// `Reap`: ends the helper if it is `owner`'s, from another run.
    fn forwards_reap(&mut self, f: &Forwards, owner: [u8; 16], run: [u8; 16]) {
        if f.spec().owner == owner && f.spec().run != run {
            self.ending = true;
        }
    }
}

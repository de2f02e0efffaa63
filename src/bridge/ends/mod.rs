//! The local ends a bridge carries traffic to and from, each an
//! implementation of [`LocalIn`](super::LocalIn) and
//! [`LocalOut`](super::LocalOut):
//! - [`channel`]: a channel of the local SSH endpoint (what its clients
//!   open, and what sshshim opens back to them);
//! - [`stream`]: a TCP or Unix socket (sshshim's own forwards, agent
//!   sockets);
//! - [`fds`]: a multiplexing client's descriptors, with the [`escape`]
//!   filter on a tty.

pub mod channel;
pub mod escape;
pub mod fds;
pub mod stream;

//! Resumable sessions (`--resume`): work that survives the network.
//!
//! A small helper that sshshim brings to the remote side (sshshim itself,
//! run as `sshshim remote-helper`) starts each session's command, detached
//! from sshd, and keeps it running while the upstream connection is gone.
//! After the reconnect sshshim attaches to it again and both sides replay
//! what the other missed ([`wire`]).
//!
//! - [`wire`]: the frames and replay buffers both sides share (ground).
//! - [`remote`]: the helper, as it runs on the server.

pub mod remote;
pub mod wire;

//! OpenSSH's connection multiplexing ("ControlMaster") protocol, served on
//! a Unix socket so stock `ssh -o ControlPath=SOCK -o ControlMaster=no`,
//! scp, sftp, rsync and git reach sshshim's upstream connection without a
//! local handshake.
//!
//! Layers, lowest first; none imports anything else from the crate:
//! - [`proto`]: typed messages and a pure codec for protocol version 4.
//! - [`fdpass`]: packets read exactly to their end with `recvmsg`, passed
//!   descriptors received one per message, replies written.
//! - [`fds`]: async I/O over passed descriptors (tty, pipe, socket, file)
//!   that never changes their flags; terminal modes and size.
//! - [`listener`]: the control socket, bound safely, peers checked by uid.
//! - [`server`]: the per-connection driver, handing sessions and forwards
//!   to a higher layer as [`server::MuxEvent`]s (see its docs for the
//!   contract).

pub mod fdpass;
pub mod fds;
pub mod listener;
pub mod proto;
pub mod server;

pub use fds::{FdKind, FdReader, FdWriter, WindowSize};
pub use listener::MuxListener;
pub use proto::{Forward, ForwardKind, MuxAddr, NewSession};
pub use server::{
    ClientInfo, ForwardReply, InfoReply, MuxConfig, MuxEvent, MuxRequest, MuxServer, Reply,
    SessionControl, SessionFds, SessionReply, StdioControl, StdioFds, StdioReply, TtyInfo,
    serve_connection,
};

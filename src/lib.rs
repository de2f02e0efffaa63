//! sshshim: one verified, authenticated upstream SSH connection, served to
//! standard OpenSSH tools through a local SSH endpoint.
//!
//! Modules, higher ones above; every `use crate::` edge points down:
//!
//! ```text
//!   main (CLI) ------------------------------ check (diagnostics), mcp (MCP server)
//!     |
//!   supervisor ------------------------------ service, control/, hooks
//!     |
//!   shim (one running profile: bind, connect, start, drain)
//!     |                    \
//!   endpoint (local SSH     master/ (serves OpenSSH's ControlMaster protocol:
//!   server, eow)  |          |      session, forwards)
//!     |           |          |          \
//!   forward (registry,       |           mux (the protocol: codec, fd passing,
//!   routing, replay, -L/-D)  |                socket; imports nothing)
//!     |         \            |
//!     |          bridge/ (open: opens upstream channels and bridges them;
//!     |            |      ends/: the local ends side by side: channel,
//!     |            |      stream, fds (a mux client's), escape; spill;
//!     |            |      upstream: a russh channel or a resumable session)
//!     |            |
//!     |          resume/ (resumable sessions: wire: the protocol (ground);
//!     |            |      install: finds and uploads the helper; session:
//!     |            |      sshshim's side, a bridge's upstream; remote/: the
//!     |            |      helper that runs on the server)
//!     |            |
//!   upstream (pool, auth, known_hosts, error)
//!     |
//!   config/ (resolve: flags + profile + ssh_config -> UpConfig; profile;
//!     |      ssh_config; host_blocks: writes Host blocks; spec (ground))
//!     |
//!   stats, tuning, netwatch, paths, term (ground: import nothing)
//! ```
//!
//! [`check`] (`sshshim check`) makes its own short-lived connection with
//! the upstream's host key verifier and authenticator; [`mcp`] (`sshshim
//! mcp`) edits profiles and drives running shims through their endpoints;
//! only `main` uses either. `master` turns [`mux`] requests into upstream
//! channels and bridges, beside [`endpoint`], which does the same for SSH
//! clients; both, and `forward`, start every bridge through one
//! `bridge::Opener` (open the upstream channel, then bridge it to a local
//! end from `bridge::ends`). A bridge's upstream is a russh channel or a
//! [`resume`] session, which outlives the connection it started on.
//!
//! Data flows one way: local clients -> [`endpoint`] -> `bridge` ->
//! [`upstream`]. Channels the server opens leave [`upstream`] as events
//! that `forward` consumes; nothing calls back up.
//!
//! [`config`] gathers everything about settings: [`config::spec`] (ground),
//! [`config::ssh_config`], [`config::profile`], the merge into
//! [`config::UpConfig`] ([`config::resolve_up`]) and [`config::host_blocks`]
//! (the ssh_config Host blocks `sshshim ssh-config` writes).
//!
//! [`completion`] (shell completion and its candidates) and [`manpages`]
//! serve only `main` too. Modules that neither `main` nor the tests use
//! (`bridge`, `forward`, `master`, `hooks`, `netwatch`, `stats`) are private.

mod bridge;
pub mod check;
pub mod completion;
pub mod config;
pub mod control;
pub mod endpoint;
mod forward;
#[cfg(test)]
mod fuzzing;
mod hooks;
pub mod manpages;
mod master;
pub mod mcp;
pub mod mux;
mod netwatch;
pub mod paths;
pub mod resume;
pub mod service;
pub mod shim;
mod stats;
pub mod supervisor;
pub mod term;
pub mod tuning;
pub mod upstream;

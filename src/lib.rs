//! sshshim: one verified, authenticated upstream SSH connection, served to
//! standard OpenSSH tools through a local SSH endpoint.
//!
//! Data flows one way through the modules:
//! [`endpoint`] (local clients) -> [`bridge`] -> [`upstream`] (the server),
//! with [`forward`] keeping the registry of forwards and [`config`] holding
//! what the user asked for. [`shim`] wires them together for `sshshim up`.

pub mod bridge;
pub mod client_config;
pub mod config;
pub mod control;
pub mod endpoint;
pub mod forward;
pub mod mux;
pub mod profile;
pub mod service;
pub mod shim;
pub mod ssh_config;
pub mod supervisor;
pub mod upstream;

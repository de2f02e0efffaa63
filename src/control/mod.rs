//! Control plane of a running profile: a private Unix socket per profile
//! (`sshshim status` / `sshshim down`), human and Prometheus renderings of
//! the status, and a loopback-only HTTP metrics endpoint.
//!
//! - `status`: the status schema ([`ProfileStatus`] and friends) and
//!   [`StatusSource`];
//! - `socket`: the control socket, server ([`serve`]) and client ([`query`],
//!   [`down`], [`running`]);
//! - `render`: the human rendering ([`render`]);
//! - `metrics`: Prometheus text ([`prometheus`]) and [`serve_metrics`].
//!
//! # Stable interface
//!
//! The JSON form of [`ProfileStatus`] (one line, as answered to `status` on
//! the control socket and as the array served on `GET /status`) is a stable
//! interface that scripts may rely on: fields are only ever added, never
//! renamed, removed or given a different meaning. String enumerations
//! (`upstream.state`, `forwards[].owner`, `forwards[].state`) may gain new
//! values, so consumers should tolerate unknown ones.
//!
//! The control socket speaks a one-shot line protocol: the client sends one
//! command line (`status` or `down`), the server answers one line and closes.

mod metrics;
mod render;
mod socket;
mod status;

pub use metrics::{prometheus, serve_metrics};
pub use render::render;
pub use socket::{
    Bound, ClientError, ServeError, bind, down, query, running, serve, socket_dir, socket_path,
};
pub use status::{
    ForwardStatus, ForwardedConnections, ProfileStatus, ResumeStatus, StatusSource, UpstreamStatus,
};

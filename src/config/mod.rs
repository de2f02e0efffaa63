//! Configuration: everything that turns what the user wrote into what a
//! running shim needs. The parts, lower ones first:
//!
//! - [`spec`] (ground: imports nothing): destinations, hosts, forwards and
//!   names as parsed from the command line or a profile.
//! - [`ssh_config`]: reads `ssh -G` output and the user's Host aliases.
//! - [`profile`]: the profiles file (each setting declared once, shared
//!   with `sshshim up`'s flags).
//! - `resolve`: merges flag over profile over ssh_config over default into
//!   an [`UpConfig`], the resolved settings of one running profile, so
//!   nothing below it ever looks at flags.
//! - [`host_blocks`]: writes the ssh_config Host blocks that point OpenSSH
//!   at a running shim (`sshshim ssh-config --install`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use profile::Tuning;
use spec::{ForwardSpec, HostSpec};

pub mod host_blocks;
pub mod profile;
mod resolve;
pub mod spec;
pub mod ssh_config;

pub use profile::ProfileError;
pub use resolve::{ResolveError, UpRequest, resolve_up};

/// Everything `sshshim up` needs, resolved from flags, profiles, the
/// environment and ssh_config into concrete values.
#[derive(Debug, Clone)]
pub struct UpConfig {
    /// Profile or destination name, used for the endpoint's alias and status.
    pub name: String,
    /// The server.
    pub target: HostSpec,
    /// Jump hosts, in order (ProxyJump).
    pub jumps: Vec<HostSpec>,
    /// Local endpoint address; `None` serves no endpoint.
    pub listen: Option<SocketAddr>,
    /// Permit a non-loopback `listen`.
    pub allow_non_loopback: bool,
    /// Public keys allowed to use the endpoint; `None` means the user's own.
    pub authorized_keys: Option<PathBuf>,
    /// The endpoint's host key; `None` means the generated one in the state dir.
    pub host_key: Option<PathBuf>,
    /// Forwards owned by sshshim itself.
    pub forwards: Vec<ForwardSpec>,
    /// Timing and limits of the upstream connection.
    pub tuning: Tuning,
    /// Resumable sessions (`--resume`): how long the server holds one,
    /// and the helper the user installed there; `None` when off.
    pub resume: Option<(Duration, Option<String>)>,
    /// Command run on connection events.
    pub on_event: Option<String>,
    /// Address of the Prometheus/JSON metrics endpoint.
    pub metrics: Option<SocketAddr>,
    /// OpenSSH multiplexing socket; `None` serves none.
    pub mux: Option<PathBuf>,
    /// The profiles file this profile came from, as
    /// [`crate::config::profile::file_identity`] names it; `None` when `up` was
    /// given a destination. Reported in status.
    pub config_file: Option<String>,
    /// [`crate::config::profile::Profile::target_label`] of the profile that runs;
    /// `None` when not run from a profile. Reported in status.
    pub profile_destination: Option<String>,
}

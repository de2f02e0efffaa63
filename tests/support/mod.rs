//! Integration-test harness for sshshim.
//!
//! Provides throw-away directories with keys ([`TestEnv`]), a private OpenSSH
//! server on loopback ([`Sshd`]), the shim under test ([`Shim`]), client
//! command builders (ssh, scp, sftp, rsync), bounded process execution
//! ([`run_with_timeout`]), output comparison ([`compare_ports`]) and a
//! fault-injecting TCP proxy ([`FaultProxy`]).
//!
//! Every network endpoint is on 127.0.0.1 and every wait is bounded.
//!
//! One file per thing provided; everything public is re-exported here, so
//! a test needs only `mod support; use support::*;`:
//! - `env`: [`TestEnv`] (directory, keys, client commands)
//! - `sshd`: [`Sshd`] (the upstream OpenSSH server)
//! - `shim`: [`ShimBuilder`], [`Shim`], [`Rig`], `sshshim` subcommands
//! - `proxy`: [`FaultProxy`]; `net`: free ports and tiny TCP services
//! - `agent`: [`Agent`] (ssh-agent) and key fingerprints
//! - `master`: [`MasterAlias`] (an OpenSSH ControlMaster alias)
//! - `pty`: [`pty_drive`] (interactive sessions)
//! - `output`: [`Capture`], bounded runs, output assertions
//! - `process`: signals, waits, process trees, [`ProcStats`]
//! - `util`: the current user, hashes, test data, [`eventually`]
//! - `evil_server`: a malicious upstream (russh server)
//! - `helper`: [`HelperEnv`], [`Peer`] (the remote helper without SSH)
// Each test binary uses a different subset of the harness.
#![allow(dead_code)]

use std::time::Duration;

mod agent;
mod env;
pub mod evil_server;
mod helper;
mod master;
mod net;
mod output;
mod process;
mod proxy;
mod pty;
mod shim;
mod sshd;
mod util;

// A test binary that uses nothing of a file would warn about its glob.
#[allow(unused_imports)]
pub use self::{
    agent::*, env::*, helper::*, master::*, net::*, output::*, process::*, proxy::*, pty::*,
    shim::*, sshd::*, util::*,
};

/// Loopback address used for every endpoint in the tests.
pub const LOCALHOST: &str = "127.0.0.1";
/// Default bound for client commands run by the convenience helpers.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Maximum characters of captured output shown in panic messages.
const SHOW_MAX: usize = 4000;

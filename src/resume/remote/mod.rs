//! The remote helper: what `sshshim remote-helper` does on the server.
//!
//! sshd starts it on an exec channel (stdin and stdout are the channel):
//! - `version`: one line with the helper's and the protocol's version, then
//!   how sshd runs the sftp subsystem ([`sshd`]), then whether forwarded
//!   TCP connections may go through the helper ([`fwd_policy`]).
//! - `start [SPEC]`: binds a new session's socket, forks the session's
//!   daemon ([`daemon`]) and hands the channel to it ([`relay`],
//!   [`handover`]); with SPEC the command starts at once (its secret
//!   follows in a frame).
//! - `attach ID`: hands the channel to a held session.
//! - `reap OWNER RUN`: asks every held session to end if it belongs to
//!   OWNER's previous runs.
//!
//! The rendezvous is a Unix socket per session in a private directory
//! ([`rundir`]). The command itself runs as sshd would run it ([`child`]).

mod child;
mod connect;
mod daemon;
mod forwards;
mod fwd_policy;
mod handover;
mod relay;
mod rundir;
mod sshd;

use std::ffi::OsString;
use std::process::ExitCode;

use super::wire;

/// Why a helper command failed; printed on stderr, which sshd passes to
/// sshshim as extended data.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The arguments are not what the command takes (the text says what is).
    #[error("{0}")]
    Usage(&'static str),
    /// Neither `XDG_CACHE_HOME` nor `HOME` says where the run directory is.
    #[error("neither XDG_CACHE_HOME nor HOME is set")]
    NoHome,
    /// A step failed; `what` says which.
    #[error("{what}: {source}")]
    Step {
        /// The step, e.g. "cannot bind PATH".
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A system call failed where the OS's own words say enough.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl HelperError {
    /// A failed step with its cause.
    fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| HelperError::Step { what, source }
    }
}

/// Runs `sshshim remote-helper ARGS...`. Called before any runtime or
/// logging exists: `start` forks.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let args: Vec<String> = match args.into_iter().map(OsString::into_string).collect() {
        Ok(a) => a,
        Err(_) => return fail("arguments are not UTF-8"),
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["version"] => {
            print!("{}", version_text());
            Ok(())
        }
        ["start"] => relay::start(None),
        ["start", spec] => relay::start(Some(spec)),
        ["attach", id] => relay::attach(id),
        ["reap", owner, run] => relay::reap(owner, run),
        _ => Err(HelperError::Usage(
            "usage: sshshim remote-helper version | start [SPEC] | attach ID | reap OWNER RUN",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

/// Says why on stderr (sshd passes it to the client as extended data).
fn fail(why: &str) -> ExitCode {
    eprintln!("sshshim remote-helper: {why}");
    ExitCode::FAILURE
}

/// What `version` prints: `sshshim-remote-helper VERSION PROTOCOL`, then
/// `subsystem sftp COMMAND` or `subsystem sftp internal` when sshd's
/// configuration names one, then `forwarding tcp yes` or `forwarding tcp
/// no (WHY)`: whether sshd would open every forward the helper would.
fn version_text() -> String {
    let mut s = format!(
        "sshshim-remote-helper {} {}\n",
        env!("CARGO_PKG_VERSION"),
        wire::VERSION
    );
    match sshd::subsystem("sftp") {
        Some(sshd::Subsystem::Internal) => s.push_str("subsystem sftp internal\n"),
        Some(sshd::Subsystem::Program(p)) => s.push_str(&format!("subsystem sftp {p}\n")),
        None => {}
    }
    match fwd_policy::tcp_forwarding() {
        Ok(()) => s.push_str("forwarding tcp yes\n"),
        Err(why) => s.push_str(&format!("forwarding tcp no ({})\n", why.replace('\n', " "))),
    }
    s
}

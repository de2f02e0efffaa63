//! Why an upstream connection could not be made or was lost, typed so
//! callers can tell a retry from a permanent failure.

use super::known_hosts::HostKeyError;

/// Why an upstream connection could not be made or was lost.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The host key did not verify (unknown, changed or revoked).
    #[error("{0}")]
    HostKey(HostKeyError),
    /// TCP connect failed.
    #[error("cannot connect to {target}: {source}{}", connect_hint(.source))]
    Connect {
        /// `host:port` as tried.
        target: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// TCP connect or the handshake took longer than the connect timeout.
    #[error("timed out connecting to {0} (host unreachable or filtered?)")]
    Timeout(String),
    /// The server rejected every credential we have.
    #[error(
        "authentication as '{user}' was rejected; the server accepts: {offered}; tried: {tried}"
    )]
    AuthRejected {
        /// Login name.
        user: String,
        /// Methods the server said it accepts.
        offered: String,
        /// What was tried, for the message.
        tried: String,
    },
    /// A key file could not be read or decrypted.
    #[error("cannot use key file {path}: {1}", path = .0.display())]
    BadKey(std::path::PathBuf, String),
    /// A secret is needed and there is no terminal to ask on.
    #[error(
        "{0}, but there is no terminal to ask on (use ssh-agent or an unencrypted key for \
         unattended runs)"
    )]
    NoTerminal(String),
    /// The SSH protocol layer failed.
    #[error("SSH error: {0}")]
    Ssh(#[from] russh::Error),
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Other(String),
}

/// A hint for the common connect failures.
fn connect_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => {
            " (connection refused: is sshd running on that port?)"
        }
        std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
            " (host unreachable: check the host name and your network)"
        }
        _ => "",
    }
}

impl UpstreamError {
    /// Whether retrying cannot help (a supervisor should stop, not loop).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            UpstreamError::HostKey(_)
                | UpstreamError::AuthRejected { .. }
                | UpstreamError::BadKey(..)
                | UpstreamError::NoTerminal(_)
        )
    }
}

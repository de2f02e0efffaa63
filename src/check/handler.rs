//! The russh side of the diagnostic connection: a handler that remembers
//! the host key verdict instead of failing with it and refuses every channel
//! the server opens, and a stream wrapper that keeps the server's version
//! line (russh does not hand it out when the handshake fails).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use russh::client;
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::upstream::UpstreamError;
use crate::upstream::known_hosts::{HostKeyError, HostKeyVerifier};

/// Bytes of the server's first output kept to find its version line
/// (RFC 4253 allows lines before it).
const BANNER_MAX: usize = 8192;

/// A byte stream an SSH connection can run over.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The host key a server offered and what known_hosts says about it.
pub(super) enum Verdict {
    /// A plain key, and what known_hosts says (boxed: it is large).
    Key(Box<(PublicKey, Result<(), HostKeyError>)>),
    /// A certificate, which sshshim does not verify.
    Certificate,
}

/// russh callbacks of the diagnostic connection.
pub(super) struct ProbeHandler {
    /// known_hosts lookup; `accept_new` is always off here.
    pub(super) verifier: HostKeyVerifier,
    /// The profile would record an unknown key (accept_new): go on without
    /// recording it, to check the rest.
    pub(super) accept_unknown: bool,
    /// Where the verdict is left for the report.
    pub(super) verdict: Arc<Mutex<Option<Verdict>>>,
}

impl client::Handler for ProbeHandler {
    type Error = UpstreamError;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.verdict.lock().unwrap() = Some(Verdict::Certificate);
            return Ok(false);
        };
        let result = self.verifier.verify(key);
        let go_on = match &result {
            Ok(()) => true,
            Err(HostKeyError::Unknown { .. }) => self.accept_unknown,
            Err(_) => false,
        };
        *self.verdict.lock().unwrap() = Some(Verdict::Key(Box::new((key.clone(), result))));
        Ok(go_on)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        // Someone connected to a probed -R port in the instant it was open.
        reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }
}

/// A stream that keeps a copy of the first bytes read from it: the
/// server's version line, which russh does not hand out when the
/// handshake fails (an unknown or changed host key, say).
pub(super) struct Recording<S> {
    /// The stream.
    pub(super) inner: S,
    /// The first [`BANNER_MAX`] bytes read.
    pub(super) seen: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Recording<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let mut seen = self.seen.lock().unwrap();
            let room = BANNER_MAX.saturating_sub(seen.len());
            let new = &buf.filled()[before..];
            seen.extend_from_slice(&new[..new.len().min(room)]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recording<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The first complete line starting with "SSH-" in what the server sent.
pub(super) fn version_line(seen: &[u8]) -> Option<String> {
    String::from_utf8_lossy(seen)
        .split_inclusive('\n')
        .find(|l| l.ends_with('\n') && l.starts_with("SSH-"))
        .map(|l| l.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_line_is_the_first_complete_ssh_line() {
        assert_eq!(
            version_line(b"hello\r\nSSH-2.0-OpenSSH_9.6\r\n\0\0\0"),
            Some("SSH-2.0-OpenSSH_9.6".into())
        );
        assert_eq!(version_line(b"SSH-2.0-Open"), None);
        assert_eq!(version_line(b"HTTP/1.1 400 Bad Request\r\n"), None);
    }
}

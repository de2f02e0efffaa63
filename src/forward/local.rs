//! sshshim's own local forwards: listen locally, and send each connection
//! through the upstream as a `direct-tcpip` or `direct-streamlocal`
//! channel, to a fixed target (`-L`) or to where a SOCKS client asks
//! (`-D`, opened through the multiplexing socket).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::route::Stream;
use crate::bridge::Opener;
use crate::bridge::ends::stream::{self, StreamIn, StreamOut};
use crate::config::spec::{Addr, ForwardSpec};
use crate::upstream::Open;

/// Where a local forward's connections go.
#[derive(Clone, Debug)]
pub enum Target {
    /// A fixed address, from the server (`-L`).
    Fixed(Addr),
    /// Wherever the SOCKS 4/5 client asks (`-D`).
    Socks,
}

/// A bound local listener.
pub enum Listener {
    /// A TCP port.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket (removed when the forward ends).
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// A local forward's listening side could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address as shown to the user.
    addr: String,
    /// Why the bind failed.
    source: std::io::Error,
}

/// An sshshim-owned `-L` forward could not start.
#[derive(Debug, thiserror::Error)]
#[error("{spec}: {source}")]
pub struct ForwardError {
    /// The forward, as the user wrote it.
    spec: String,
    /// Why it could not listen.
    source: BindError,
}

/// Runs an sshshim-owned `-L` forward until `shutdown`.
pub async fn run(
    spec: ForwardSpec,
    opener: Opener,
    shutdown: CancellationToken,
) -> Result<(), ForwardError> {
    let listener = bind(&spec.listen).await.map_err(|source| ForwardError {
        spec: spec.to_string(),
        source,
    })?;
    serve(
        listener,
        spec.to_string(),
        Target::Fixed(spec.target.clone()),
        opener,
        shutdown,
    )
    .await;
    Ok(())
}

/// Binds a local forward's listening side (loopback when no address is
/// given, as OpenSSH does with GatewayPorts off).
pub async fn bind(listen: &Addr) -> Result<Listener, BindError> {
    match listen {
        Addr::Tcp(h, p) => {
            let host = if h.is_empty() || h == "localhost" {
                "127.0.0.1"
            } else {
                h.as_str()
            };
            let l = tokio::net::TcpListener::bind((host, *p))
                .await
                .map_err(|source| BindError {
                    addr: format!("{host}:{p}"),
                    source,
                })?;
            Ok(Listener::Tcp(l))
        }
        Addr::Unix(p) => {
            let path = crate::paths::expand_tilde(p.as_ref());
            let l = bind_unix_private(&path).map_err(|source| BindError {
                addr: p.to_string(),
                source,
            })?;
            Ok(Listener::Unix(l, path))
        }
    }
}

/// Accepts on `listener` until `shutdown`, sending every connection through
/// the upstream to `target`. `what` names the forward in logs.
pub async fn serve(
    listener: Listener,
    what: String,
    target: Target,
    opener: Opener,
    shutdown: CancellationToken,
) {
    tracing::info!("local forward {what} listening");
    let what = Arc::new(what);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = accept(&listener) => r,
        };
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("{what}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (o, what, target) = (opener.clone(), what.clone(), target.clone());
        opener
            .tasks()
            .spawn(async move { conn.forward(&o, &what, target).await });
    }
    if let Listener::Unix(_, path) = listener {
        let _ = std::fs::remove_file(path);
    }
}

/// One accepted connection of a local forward.
struct Accepted {
    /// The socket.
    stream: Box<dyn Stream>,
    /// The socket again, to reset it (TCP only).
    dup: Option<socket2::Socket>,
    /// The client's address, for the server's logs.
    originator: String,
    /// Its port.
    originator_port: u32,
}

/// Waits for the next connection.
async fn accept(listener: &Listener) -> std::io::Result<Accepted> {
    Ok(match listener {
        Listener::Tcp(l) => {
            let (s, a) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Accepted {
                dup: stream::dup_tcp(&s),
                stream: Box::new(s),
                originator: a.ip().to_string(),
                originator_port: a.port() as u32,
            }
        }
        Listener::Unix(l, _) => Accepted {
            stream: Box::new(l.accept().await?.0),
            dup: None,
            originator: "127.0.0.1".to_owned(),
            originator_port: 0,
        },
    })
}

impl Accepted {
    /// Sends the connection through the upstream to `target` (for `-D`,
    /// where its SOCKS request asks), and bridges it.
    async fn forward(self, opener: &Opener, what: &str, target: Target) {
        let (mut stream, addr, socks) = match target {
            Target::Fixed(a) => (self.stream, a, None),
            Target::Socks => match socks_handshake(self.stream).await {
                Ok((s, a, v)) => (s, a, Some(v)),
                Err(e) => return tracing::debug!("{what}: SOCKS request refused: {e}"),
            },
        };
        let open = match &addr {
            Addr::Tcp(h, p) => Open::DirectTcpip {
                host: h.clone(),
                port: *p as u32,
                originator: self.originator,
                originator_port: self.originator_port,
            },
            Addr::Unix(p) => Open::DirectStreamlocal(p.clone()),
        };
        let opened = match opener.open(open, &format!("{what}: {addr}")).await {
            Ok(o) => o,
            Err(_) => {
                if let Some(v) = socks {
                    let _ = socks_reply(&mut stream, v, false).await;
                }
                return;
            }
        };
        if let Some(v) = socks
            && socks_reply(&mut stream, v, true).await.is_err()
        {
            return;
        }
        let (rd, wr) = tokio::io::split(stream);
        let local_out = StreamOut::new(wr).reset_on_abort(self.dup);
        opened.bridge(StreamIn::new(rd), local_out, what);
    }
}

/// The SOCKS version of a connection, for the reply.
const SOCKS5: u8 = 5;

/// Reads a SOCKS 4/4a/5 CONNECT request (no authentication, as OpenSSH's
/// `-D` accepts) and returns the stream and where it asks to go. The reply
/// is sent once the upstream has answered ([`socks_reply`]).
async fn socks_handshake(mut s: Box<dyn Stream>) -> std::io::Result<(Box<dyn Stream>, Addr, u8)> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_owned());
    let ver = s.read_u8().await?;
    match ver {
        4 => {
            let cmd = s.read_u8().await?;
            let port = s.read_u16().await?;
            let mut ip = [0u8; 4];
            s.read_exact(&mut ip).await?;
            read_cstr(&mut s).await?; // user id
            if cmd != 1 {
                return Err(bad("only CONNECT is supported"));
            }
            // SOCKS4a: 0.0.0.x means a host name follows.
            let host = if ip[..3] == [0, 0, 0] && ip[3] != 0 {
                read_cstr(&mut s).await?
            } else {
                std::net::Ipv4Addr::from(ip).to_string()
            };
            Ok((s, Addr::Tcp(host, port), 4))
        }
        SOCKS5 => {
            let n = s.read_u8().await? as usize;
            let mut methods = vec![0u8; n];
            s.read_exact(&mut methods).await?;
            if !methods.contains(&0) {
                s.write_all(&[SOCKS5, 0xff]).await?;
                return Err(bad("the client offers no method without authentication"));
            }
            s.write_all(&[SOCKS5, 0]).await?;
            let mut head = [0u8; 4];
            s.read_exact(&mut head).await?;
            if head[1] != 1 {
                s.write_all(&[SOCKS5, 7, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
                return Err(bad("only CONNECT is supported"));
            }
            let host = match head[3] {
                1 => {
                    let mut ip = [0u8; 4];
                    s.read_exact(&mut ip).await?;
                    std::net::Ipv4Addr::from(ip).to_string()
                }
                3 => {
                    let len = s.read_u8().await? as usize;
                    let mut name = vec![0u8; len];
                    s.read_exact(&mut name).await?;
                    String::from_utf8(name).map_err(|_| bad("host name is not UTF-8"))?
                }
                4 => {
                    let mut ip = [0u8; 16];
                    s.read_exact(&mut ip).await?;
                    std::net::Ipv6Addr::from(ip).to_string()
                }
                _ => return Err(bad("unknown address type")),
            };
            let port = s.read_u16().await?;
            Ok((s, Addr::Tcp(host, port), SOCKS5))
        }
        _ => Err(bad("not a SOCKS 4 or 5 request")),
    }
}

/// Reads a NUL-terminated string of at most 255 bytes.
async fn read_cstr(s: &mut Box<dyn Stream>) -> std::io::Result<String> {
    let mut out = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == 0 {
            break;
        }
        if out.len() >= 255 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "SOCKS string too long",
            ));
        }
        out.push(b);
    }
    String::from_utf8(out)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

/// Tells a SOCKS client (`version` 4 or 5) whether its connection is open.
async fn socks_reply(s: &mut Box<dyn Stream>, version: u8, ok: bool) -> std::io::Result<()> {
    let reply: &[u8] = match (version, ok) {
        (4, true) => &[0, 0x5a, 0, 0, 0, 0, 0, 0],
        (4, false) => &[0, 0x5b, 0, 0, 0, 0, 0, 0],
        (_, true) => &[SOCKS5, 0, 0, 1, 0, 0, 0, 0, 0, 0],
        (_, false) => &[SOCKS5, 5, 0, 1, 0, 0, 0, 0, 0, 0],
    };
    s.write_all(reply).await
}

/// Binds a Unix socket that only our user can connect to: created with
/// umask 077, so it is never open to others, not even for an instant.
/// (The umask is process-wide, so it is held only around the bind, under
/// a lock, and nothing else in sshshim creates files without an explicit
/// mode.)
fn bind_unix_private(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    static UMASK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = UMASK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask cannot fail; the previous mask is restored below.
    let old = unsafe { libc::umask(0o077) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

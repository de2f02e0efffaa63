//! Connects to a forwarded connection's target as sshd's `direct-tcpip`
//! does (openssh-portable channels.c, `connect_to_helper` and
//! `connect_next`), so a failure reads the same to the user: the same
//! SSH channel-open failure code and reason text.
//!
//! - A port above 65535: code 1 (administratively prohibited), "open
//!   failed".
//! - A name that does not resolve: code 2, getaddrinfo's message
//!   (`gai_strerror`, or `strerror(errno)` for `EAI_SYSTEM`).
//! - Every address tried; an address whose `connect` fails at once is
//!   skipped. When one failed later (refused, unreachable, timed out):
//!   code 2, `strerror` of the last such error; when all failed at once:
//!   code 2, "open failed".

use std::ffi::{CStr, CString};
use std::io;
use std::net::SocketAddr;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::TcpStream;

/// `SSH2_OPEN_ADMINISTRATIVELY_PROHIBITED` (RFC 4254 5.1).
pub const ADMINISTRATIVELY_PROHIBITED: u32 = 1;

/// `SSH2_OPEN_CONNECT_FAILED` (RFC 4254 5.1).
pub const CONNECT_FAILED: u32 = 2;

/// What sshd's channel-open failure says when it sets no message.
const OPEN_FAILED: &str = "open failed";

/// Name lookups run at once (each takes a thread while it blocks): a
/// burst of a thousand connects must not start a thousand threads.
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Why a connection could not be made, as sshd would word it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFailure {
    /// The SSH channel-open failure code.
    pub code: u32,
    /// Its reason text.
    pub reason: String,
}

impl OpenFailure {
    /// A failure with this code and reason.
    fn new(code: u32, reason: impl Into<String>) -> OpenFailure {
        OpenFailure {
            code,
            reason: reason.into(),
        }
    }
}

/// Resolves `host` and connects to `port` on its addresses in turn.
pub async fn connect(host: &str, port: u32) -> Result<TcpStream, OpenFailure> {
    let Ok(port) = u16::try_from(port) else {
        return Err(OpenFailure::new(ADMINISTRATIVELY_PROHIBITED, OPEN_FAILED));
    };
    let addrs = resolve(host, port).await?;
    let mut later: Option<io::Error> = None;
    for addr in addrs {
        match start(addr) {
            // Failed at once: the next address, as connect_next does.
            Err(_) => continue,
            Ok(sock) => match finish(sock).await {
                Ok(s) => return Ok(s),
                Err(e) => later = Some(e),
            },
        }
    }
    Err(match later {
        Some(e) => OpenFailure::new(CONNECT_FAILED, strerror(&e)),
        None => OpenFailure::new(CONNECT_FAILED, OPEN_FAILED),
    })
}

/// The addresses of `host`, as sshd asks getaddrinfo (any family, stream
/// sockets, the port as a number). A blocking call, so off the runtime.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, OpenFailure> {
    // A literal address needs no lookup (and no thread).
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let Ok(name) = CString::new(host) else {
        // A NUL in the name: getaddrinfo would never find it.
        return Err(OpenFailure::new(
            CONNECT_FAILED,
            gai_message(libc::EAI_NONAME, 0),
        ));
    };
    let Ok(_turn) = LOOKUPS.acquire().await else {
        return Err(OpenFailure::new(CONNECT_FAILED, OPEN_FAILED));
    };
    match tokio::task::spawn_blocking(move || getaddrinfo(&name, port)).await {
        Ok(r) => r.map_err(|msg| OpenFailure::new(CONNECT_FAILED, msg)),
        Err(_) => Err(OpenFailure::new(CONNECT_FAILED, OPEN_FAILED)),
    }
}

/// getaddrinfo(3) for a stream socket to `port`: the addresses in its
/// order, or its error message.
fn getaddrinfo(name: &CStr, port: u16) -> Result<Vec<SocketAddr>, String> {
    let service = CString::new(port.to_string()).unwrap_or_default();
    // SAFETY: addrinfo is plain data; all-zero is a valid value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    hints.ai_socktype = libc::SOCK_STREAM;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: the strings are NUL-terminated, hints and res are valid.
    let rc = unsafe { libc::getaddrinfo(name.as_ptr(), service.as_ptr(), &hints, &mut res) };
    if rc != 0 {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(gai_message(rc, errno));
    }
    let mut out = Vec::new();
    let mut ai = res;
    while !ai.is_null() {
        // SAFETY: `ai` is a node of the list getaddrinfo returned.
        let node = unsafe { &*ai };
        let len = node.ai_addrlen;
        if !node.ai_addr.is_null() && len as usize <= std::mem::size_of::<libc::sockaddr_storage>()
        {
            // SAFETY: ai_addr points to `len` bytes of a socket address.
            let addr = unsafe {
                SockAddr::try_init(|storage, l| {
                    std::ptr::copy_nonoverlapping(
                        node.ai_addr.cast::<u8>(),
                        storage.cast::<u8>(),
                        len as usize,
                    );
                    *l = len;
                    Ok(())
                })
            };
            if let Ok(((), a)) = addr
                && let Some(sa) = a.as_socket()
            {
                out.push(sa);
            }
        }
        ai = node.ai_next;
    }
    // SAFETY: `res` came from getaddrinfo and is freed once.
    unsafe { libc::freeaddrinfo(res) };
    Ok(out)
}

/// sshd's `ssh_gai_strerror`: errno's text for `EAI_SYSTEM`, else
/// getaddrinfo's own.
fn gai_message(rc: i32, errno: i32) -> String {
    if rc == libc::EAI_SYSTEM && errno != 0 {
        return strerror(&io::Error::from_raw_os_error(errno));
    }
    // SAFETY: gai_strerror returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(libc::gai_strerror(rc)) }
        .to_string_lossy()
        .into_owned()
}

/// The C library's text for an OS error (std's adds " (os error N)").
fn strerror(e: &io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return e.to_string();
    };
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: buf is valid for its length; the XSI strerror_r writes a
    // NUL-terminated string into it.
    if unsafe { libc::strerror_r(code, buf.as_mut_ptr(), buf.len()) } != 0 {
        return format!("Unknown error {code}");
    }
    // SAFETY: NUL-terminated by strerror_r.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Starts a non-blocking connect to `addr`: the socket when it is under
/// way (or made), the error when it failed at once.
fn start(addr: SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_nonblocking(true)?;
    sock.set_cloexec(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => Ok(sock),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(sock),
        Err(e) => Err(e),
    }
}

/// Waits for a started connect: the stream, or why it failed.
async fn finish(sock: Socket) -> io::Result<TcpStream> {
    let s = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    s.writable().await?;
    if let Some(e) = s.take_error()? {
        return Err(e);
    }
    // Connected only if it has a peer (writable also reports failure).
    s.peer_addr()?;
    // As sshd's set_nodelay: forwarded traffic is often interactive.
    let _ = s.set_nodelay(true);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failures_read_as_sshd_words_them() {
        // A port nobody listens on: bind one, then close it.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = free.local_addr().unwrap().port();
        drop(free);
        let e = connect("127.0.0.1", port.into()).await.unwrap_err();
        assert_eq!(e, OpenFailure::new(2, "Connection refused"));
        let e = connect("127.0.0.1", 70000).await.unwrap_err();
        assert_eq!(e, OpenFailure::new(1, "open failed"));
    }

    #[test]
    fn resolver_errors_read_as_sshd_words_them() {
        // No real lookup of an unknown name: it would query the network's
        // DNS. glibc's texts, as ssh users see them.
        assert_eq!(
            gai_message(libc::EAI_NONAME, 0),
            "Name or service not known"
        );
        assert_eq!(
            gai_message(libc::EAI_AGAIN, 0),
            "Temporary failure in name resolution"
        );
        assert_eq!(
            gai_message(libc::EAI_SYSTEM, libc::ENOMEM),
            "Cannot allocate memory"
        );
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(strerror(&e), "Connection refused");
    }

    #[tokio::test]
    async fn connects_by_name_and_by_address() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let s = connect("127.0.0.1", port.into()).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), l.local_addr().unwrap());
        assert!(s.nodelay().unwrap());
        // "localhost" may resolve to ::1 first, where nobody listens: the
        // next address is tried.
        let s = connect("localhost", port.into()).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), l.local_addr().unwrap());
    }
}

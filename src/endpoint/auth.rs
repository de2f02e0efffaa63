//! Who may use the local endpoint: the same user, proven twice. The TCP
//! peer's socket must belong to our uid (on Linux, asked of the kernel), and
//! the client must hold a private key we recognise as the user's own.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use russh::keys::PublicKey;

/// Public keys allowed to authenticate on the endpoint.
#[derive(Debug, Default)]
pub struct AuthorizedKeys {
    /// The keys (key material compared only).
    keys: Vec<PublicKey>,
}

/// Why an `--authorized-keys` file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizedKeysError {
    /// The file cannot be read.
    #[error("cannot read authorized keys {}: {source}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The file holds no key sshshim can use.
    #[error(
        "{} holds no usable public key (expected lines like 'ssh-ed25519 AAAA... comment')",
        .0.display()
    )]
    Empty(std::path::PathBuf),
}

impl AuthorizedKeys {
    /// Reads an authorized_keys file (options before the key are allowed).
    pub fn from_file(path: &Path) -> Result<Self, AuthorizedKeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthorizedKeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let keys = parse_keys(&text);
        if keys.is_empty() {
            return Err(AuthorizedKeysError::Empty(path.to_path_buf()));
        }
        Ok(AuthorizedKeys { keys })
    }

    /// The user's own keys: `~/.ssh/*.pub` and the agent's identities.
    pub async fn users_own() -> Self {
        let mut keys = Vec::new();
        if let Some(dir) = crate::paths::home_dir().map(|h| h.join(".ssh"))
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "pub")
                    && let Ok(text) = std::fs::read_to_string(&p)
                {
                    keys.extend(parse_keys(&text));
                }
            }
        }
        if let Some(mut agent) = crate::upstream::auth::connect_agent().await
            && let Ok(ids) = agent.request_identities().await
        {
            keys.extend(ids.iter().map(|i| i.public_key().into_owned()));
        }
        AuthorizedKeys { keys }
    }

    /// Whether `key` is one of ours.
    pub fn allows(&self, key: &PublicKey) -> bool {
        self.keys.iter().any(|k| k.key_data() == key.key_data())
    }

    /// How many keys are allowed.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is allowed (then nobody can connect).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Finds `type base64` pairs in authorized_keys text, skipping options,
/// comments and lines that do not parse.
fn parse_keys(text: &str) -> Vec<PublicKey> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        // The key type is the first field that parses together with the next.
        for w in fields.windows(2) {
            if (w[0].starts_with("ssh-") || w[0].starts_with("ecdsa-") || w[0].starts_with("sk-"))
                && let Ok(k) = russh::keys::parse_public_key_base64(w[1])
            {
                out.push(k);
                break;
            }
        }
    }
    out
}

/// The uid owning the TCP socket at `peer` connected to `local`. `None`
/// when it cannot be told.
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    #[cfg(target_os = "linux")]
    match sock_diag::uid(peer, local) {
        Ok(found) => return found,
        Err(e) => tracing::debug!("sock_diag lookup failed ({e}); scanning /proc/net/tcp"),
    }
    proc_net_uid(peer, local)
}

/// Whether `ip` is one of this machine's own interface addresses, so a
/// client connecting from it runs here. When the addresses cannot be
/// listed, yes (fails closed: the uid check then applies).
pub fn is_host_address(ip: IpAddr) -> bool {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return true;
    }
    let mut found = false;
    let mut at = list;
    while !at.is_null() && !found {
        // SAFETY: `at` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*at };
        found = !ifa.ifa_addr.is_null() && sockaddr_ip(ifa.ifa_addr) == Some(ip);
        at = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// The IP address of a socket address of family AF_INET or AF_INET6.
fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    // SAFETY: the caller passes a valid sockaddr; the family says which
    // larger struct it is the start of.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

/// [`peer_uid`] from `/proc/net/tcp` and `/proc/net/tcp6`. Slow: the kernel
/// walks its whole connection table for every read (~4 ms per table here).
fn proc_net_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let want_local = proc_addrs(peer);
    let want_remote = proc_addrs(local);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                continue;
            }
            if want_local.iter().any(|a| a == f[1]) && want_remote.iter().any(|a| a == f[2]) {
                return f[7].parse().ok();
            }
        }
    }
    None
}

/// One exact-match NETLINK_SOCK_DIAG query: the kernel looks the 4-tuple up
/// in its hash instead of listing every socket as /proc/net/tcp does, which
/// took a few milliseconds off every local connect. Hand-written because it
/// is one fixed-size request and reply; the netlink crates would add half a
/// dozen dependencies for it.
#[cfg(target_os = "linux")]
mod sock_diag {
    use std::io;
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h).
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    /// `NLMSG_ERROR` (linux/netlink.h).
    const NLMSG_ERROR: u16 = 2;
    /// nlmsghdr, then inet_diag_req_v2 (8 bytes + 48-byte inet_diag_sockid).
    const REQ_LEN: usize = 16 + 56;
    /// Offset of `idiag_uid` in a reply: nlmsghdr + family/state/timer/
    /// retrans + sockid + expires/rqueue/wqueue.
    const UID_AT: usize = 16 + 4 + 48 + 12;

    /// Writes an address into a sockid's 16-byte address field.
    fn put_addr(buf: &mut [u8], ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => buf[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => buf[..16].copy_from_slice(&v6.octets()),
        }
    }

    /// Plain IPv4 for an IPv4-mapped address: the client's own socket is
    /// an AF_INET one even when our listener is dual-stack.
    fn unmap(a: SocketAddr) -> SocketAddr {
        match a.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
                None => a,
            },
            IpAddr::V4(_) => a,
        }
    }

    /// The uid of the socket at `peer` connected to `local`: `Ok(None)` if
    /// the kernel knows no such socket, `Err` if it could not be asked.
    pub fn uid(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<u32>> {
        let (peer, local) = (unmap(peer), unmap(local));
        let family = match peer.ip() {
            IpAddr::V4(_) => libc::AF_INET,
            IpAddr::V6(_) => libc::AF_INET6,
        };
        let mut req = [0u8; REQ_LEN];
        req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        req[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        req[8..12].copy_from_slice(&1u32.to_ne_bytes());
        req[16] = family as u8;
        req[17] = libc::IPPROTO_TCP as u8;
        req[20..24].copy_from_slice(&u32::MAX.to_ne_bytes()); // any state
        let id = &mut req[24..];
        // The socket asked about is the client's: its source is our peer.
        id[0..2].copy_from_slice(&peer.port().to_be_bytes());
        id[2..4].copy_from_slice(&local.port().to_be_bytes());
        put_addr(&mut id[4..20], peer.ip());
        put_addr(&mut id[20..36], local.ip());
        id[40..48].copy_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE

        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The kernel answers within send(2); the timeout only guards
        // against the unexpected.
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid fd, pointer and length of a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        // SAFETY: valid fd; req is REQ_LEN readable bytes. A zeroed
        // sockaddr_nl addresses the kernel.
        let sent = unsafe {
            let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
            kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            libc::sendto(
                fd.as_raw_fd(),
                req.as_ptr().cast(),
                REQ_LEN,
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent != REQ_LEN as isize {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        // SAFETY: valid fd; buf is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 16 {
            return Err(io::Error::last_os_error());
        }
        let reply = &buf[..n as usize];
        let kind = u16::from_ne_bytes([reply[4], reply[5]]);
        if kind == NLMSG_ERROR {
            let errno = -i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
            return match errno {
                libc::ENOENT => Ok(None),
                e => Err(io::Error::from_raw_os_error(e)),
            };
        }
        if kind != SOCK_DIAG_BY_FAMILY || reply.len() < UID_AT + 4 {
            return Err(io::Error::other("unexpected sock_diag reply"));
        }
        // The reply echoes the socket's id: make sure it is the one we asked.
        if reply[20..24] != req[24..28] {
            return Ok(None);
        }
        let uid = &reply[UID_AT..UID_AT + 4];
        Ok(Some(u32::from_ne_bytes([uid[0], uid[1], uid[2], uid[3]])))
    }
}

/// The spellings of an address in /proc/net/tcp*: IPv4 as one native-endian
/// word, IPv6 (and IPv4-mapped) as four, port in big-endian hex.
fn proc_addrs(a: SocketAddr) -> Vec<String> {
    let word = |b: &[u8]| format!("{:08X}", u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    let v6 = |o: [u8; 16]| o.chunks(4).map(word).collect::<String>();
    let port = a.port();
    match a.ip() {
        IpAddr::V4(ip) => vec![
            format!("{}:{port:04X}", word(&ip.octets())),
            format!("{}:{port:04X}", v6(ip.to_ipv6_mapped().octets())),
        ],
        IpAddr::V6(ip) => {
            let mut v = vec![format!("{}:{port:04X}", v6(ip.octets()))];
            if let Some(v4) = ip.to_ipv4_mapped() {
                v.push(format!("{}:{port:04X}", word(&v4.octets())));
            }
            v
        }
    }
}

pub use crate::paths::my_uid;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_with_options_and_junk() {
        let text = "# c\nno-pty,command=\"x y\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHz2V0FmQkFUM8WwiDGx1Co4aa2wuqmz8rn4UcTwmPxQ me\ngarbage\n";
        assert_eq!(parse_keys(text).len(), 1);
    }

    #[test]
    fn host_addresses() {
        assert!(is_host_address("127.0.0.1".parse().unwrap()));
        // TEST-NET-1 and documentation IPv6: never assigned to a real host.
        assert!(!is_host_address("192.0.2.1".parse().unwrap()));
        assert!(!is_host_address("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn finds_our_own_loopback_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let local = l.local_addr().unwrap();
        if Path::new("/proc/net/tcp").exists() {
            assert_eq!(peer_uid(peer, local), Some(my_uid()));
            assert_eq!(proc_net_uid(peer, local), Some(my_uid()));
        }
        #[cfg(target_os = "linux")]
        {
            assert_eq!(sock_diag::uid(peer, local).unwrap(), Some(my_uid()));
            // A 4-tuple with no socket behind it is "unknown", not an error.
            let nobody = SocketAddr::new(peer.ip(), 1);
            assert_eq!(sock_diag::uid(nobody, local).unwrap(), None);
        }
    }
}

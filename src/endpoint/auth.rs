//! Who may use the local endpoint: the same user, proven twice. The TCP
//! peer's socket must belong to our uid (Linux `/proc/net/tcp*`), and the
//! client must hold a private key we recognise as the user's own.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use russh::keys::PublicKey;

/// Public keys allowed to authenticate on the endpoint.
#[derive(Debug, Default)]
pub struct AuthorizedKeys {
    /// The keys (key material compared only).
    keys: Vec<PublicKey>,
}

impl AuthorizedKeys {
    /// Reads an authorized_keys file (options before the key are allowed).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read authorized keys {}: {e}", path.display()))?;
        let keys = parse_keys(&text);
        if keys.is_empty() {
            return Err(format!(
                "{} holds no usable public key (expected lines like 'ssh-ed25519 AAAA... comment')",
                path.display()
            ));
        }
        Ok(AuthorizedKeys { keys })
    }

    /// The user's own keys: `~/.ssh/*.pub` and the agent's identities.
    pub async fn users_own() -> Self {
        let mut keys = Vec::new();
        if let Some(dir) = crate::config::home_dir().map(|h| h.join(".ssh"))
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

/// The uid owning the TCP socket at `peer` connected to `local`, from
/// `/proc/net/tcp` and `/proc/net/tcp6`. `None` when it cannot be told.
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
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

/// Our own uid.
pub fn my_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_with_options_and_junk() {
        let text = "# c\nno-pty,command=\"x y\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHz2V0FmQkFUM8WwiDGx1Co4aa2wuqmz8rn4UcTwmPxQ me\ngarbage\n";
        assert_eq!(parse_keys(text).len(), 1);
    }

    #[test]
    fn finds_our_own_loopback_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        if Path::new("/proc/net/tcp").exists() {
            assert_eq!(peer_uid(peer, l.local_addr().unwrap()), Some(my_uid()));
        }
    }
}

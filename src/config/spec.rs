//! What the user asked for, parsed: destinations, resolved hops and
//! forward specs in OpenSSH syntax. A ground module: it imports nothing from
//! the crate, so every other module may use it.

use std::fmt;
use std::path::PathBuf;

/// Where to connect: `[user@]host[:port]`, IPv6 hosts in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Login name, if the destination named one.
    pub user: Option<String>,
    /// Host name or address, without brackets.
    pub host: String,
    /// Port, if the destination named one.
    pub port: Option<u16>,
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            |why: &str| format!("invalid destination '{s}': {why} (expected [user@]host[:port])");
        // The last '@' splits, as OpenSSH does: user names may contain '@'.
        let (user, rest) = match s.rfind('@') {
            Some(i) => (Some(&s[..i]), &s[i + 1..]),
            None => (None, s),
        };
        if user == Some("") {
            return Err(bad("empty user name"));
        }
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let end = inner.find(']').ok_or_else(|| bad("missing ']'"))?;
            let host = &inner[..end];
            let after = &inner[end + 1..];
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            };
            (host, port)
        } else if rest.matches(':').count() > 1 {
            // A bare IPv6 address: no port possible without brackets.
            (rest, None)
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        // As OpenSSH refuses them: a space or control character in a name
        // would also split the known_hosts line recorded for the host.
        let odd = |t: &str| t.chars().any(|c| c.is_whitespace() || c.is_control());
        if odd(host) {
            return Err(bad("the host contains a space or control character"));
        }
        if user.is_some_and(odd) {
            return Err(bad("the user contains a space or control character"));
        }
        if host.contains(['[', ']']) {
            return Err(bad("stray '[' or ']' in the host"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(parse_port(p).map_err(|e| bad(&e.to_string()))?),
        };
        Ok(Destination {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            write!(f, "{}", self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Why a port, name, path or forward was refused; the text says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Not a TCP port number.
    #[error("'{0}' is not a port number (1-65535)")]
    Port(String),
    /// A profile name that breaks a rule of [`check_name`].
    #[error("profile name {name:?} {rule}")]
    Name {
        /// The name as given.
        name: String,
        /// The rule, with what to do.
        rule: &'static str,
    },
    /// A path with a control character (see [`check_path_text`]).
    #[error(
        "{what} {text:?} contains a control character (such as a newline); \
         choose a path without one"
    )]
    PathText {
        /// The setting it is for.
        what: String,
        /// The path as text.
        text: String,
    },
    /// A `-L`/`-R` argument that does not parse.
    #[error(
        "invalid forward {flag} '{spec}': {why}\n  expected [bind_address:]port:host:hostport, \
         port:/remote/socket, /local/socket:host:hostport or /local/socket:/remote/socket \
         (IPv6 addresses in brackets)"
    )]
    Forward {
        /// `-L` or `-R`.
        flag: &'static str,
        /// The argument as given.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
}

/// Parses a TCP port number (1-65535).
pub fn parse_port(p: &str) -> Result<u16, SpecError> {
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(SpecError::Port(p.to_owned())),
        Ok(n) => Ok(n),
    }
}

/// Checks a profile name: 1 to 64 of ASCII letters, digits, `.`, `_` and
/// `-`. Names are written into other files' syntax (ssh_config `Host`
/// lines, systemd units, TOML keys, socket names), where a space, newline
/// or quote would start something else, so every name from any source
/// must pass. The error quotes the name escaped and says what to fix.
pub fn check_name(name: &str) -> Result<(), SpecError> {
    let broken = |rule| {
        Err(SpecError::Name {
            name: name.to_owned(),
            rule,
        })
    };
    if name.is_empty() || name.len() > 64 {
        return broken("must be 1 to 64 characters (letters, digits, '.', '_', '-')");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return broken("may only use letters, digits, '.', '_' and '-'; rename it");
    }
    // It goes on command lines (a unit's ExecStart, `sshshim up NAME`),
    // where a leading '-' reads as an option.
    if name.starts_with('-') {
        return broken("must not start with '-'; rename it");
    }
    Ok(())
}

/// Checks a path about to be written into another file's syntax
/// (ssh_config `ControlPath`, a unit's `ExecStart`): no control
/// characters, which could end the line and start a directive of their
/// own. `what` names the setting for the error.
pub fn check_path_text(what: &str, path: &std::path::Path) -> Result<(), SpecError> {
    let text = path.to_string_lossy();
    if text.chars().any(char::is_control) {
        return Err(SpecError::PathText {
            what: what.to_owned(),
            text: text.into_owned(),
        });
    }
    Ok(())
}

/// One SSH hop (the target or a jump host), fully resolved.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Host name or address to connect to (after ssh_config's HostName).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Login name.
    pub user: String,
    /// Identity files to try, in order, after the agent.
    pub identities: Vec<PathBuf>,
    /// Whether `identities` came from the user (then a missing file is an error).
    pub identities_explicit: bool,
    /// Offer only the agent keys that match `identities` (IdentitiesOnly).
    pub identities_only: bool,
    /// The agent socket to use; `None` for no agent.
    pub agent: Option<PathBuf>,
    /// The known_hosts file that is read and, with `accept_new`, written.
    pub known_hosts: PathBuf,
    /// Read-only known_hosts files.
    pub global_known_hosts: Vec<PathBuf>,
    /// Record the key of a host not yet known instead of refusing.
    pub accept_new: bool,
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}@[{}]:{}", self.user, self.host, self.port)
        } else {
            write!(f, "{}@{}:{}", self.user, self.host, self.port)
        }
    }
}

/// One end of a forward: a TCP address or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Addr {
    /// `host:port` (host may be empty: the default bind address).
    Tcp(String, u16),
    /// A Unix socket path.
    Unix(String),
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Brackets wherever parsing needs them to read the field back.
            Addr::Tcp(h, p) if h.contains(':') || h.starts_with('[') => write!(f, "[{h}]:{p}"),
            Addr::Tcp(h, p) if h.is_empty() => write!(f, "{p}"),
            Addr::Tcp(h, p) => write!(f, "{h}:{p}"),
            Addr::Unix(p) if p.contains(':') => write!(f, "[{p}]"),
            Addr::Unix(p) => f.write_str(p),
        }
    }
}

/// Direction of a forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `-L`: listen here, connect from the server's side.
    Local,
    /// `-R`: listen on the server, connect from here.
    Remote,
}

/// A forward in OpenSSH syntax: `[bind:]port:host:hostport`, socket paths
/// allowed on either side, IPv6 in brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ForwardSpec {
    /// `-L` or `-R`.
    pub kind: Kind,
    /// Where to listen.
    pub listen: Addr,
    /// Where to connect.
    pub target: Addr,
}

impl fmt::Display for ForwardSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.kind {
            Kind::Local => "-L",
            Kind::Remote => "-R",
        };
        write!(f, "{k} {}:{}", self.listen, self.target)
    }
}

impl ForwardSpec {
    /// Parses the argument of `-L` or `-R`.
    pub fn parse(kind: Kind, s: &str) -> Result<Self, SpecError> {
        let flag = if kind == Kind::Local { "-L" } else { "-R" };
        let bad = |why: &str| SpecError::Forward {
            flag,
            spec: s.to_owned(),
            why: why.to_owned(),
        };
        let fields = split_fields(s).map_err(bad)?;
        let addr_of = |host: Option<&str>, port: &str| -> Result<Addr, SpecError> {
            let p = parse_port(port).or_else(|e| {
                // Port 0 is allowed on a listening side of -R (server picks).
                if port == "0" { Ok(0) } else { Err(e) }
            });
            Ok(Addr::Tcp(
                host.unwrap_or("").to_owned(),
                p.map_err(|e| bad(&e.to_string()))?,
            ))
        };
        let is_path = |f: &str| f.starts_with('/') || f.starts_with("./") || f.starts_with('~');
        let (listen, target) = match fields.as_slice() {
            // /sock:/sock
            [a, b] if is_path(a) && is_path(b) => (Addr::Unix(a.clone()), Addr::Unix(b.clone())),
            // port:/sock
            [a, b] if is_path(b) => (addr_of(None, a)?, Addr::Unix(b.clone())),
            // /sock:host:port
            [a, h, p] if is_path(a) => (Addr::Unix(a.clone()), addr_of(Some(h), p)?),
            // bind:port:/sock
            [bnd, a, b] if is_path(b) => (addr_of(Some(bnd), a)?, Addr::Unix(b.clone())),
            // port:host:port
            [a, h, p] => (addr_of(None, a)?, addr_of(Some(h), p)?),
            // bind:port:host:port
            [bnd, a, h, p] => (addr_of(Some(bnd), a)?, addr_of(Some(h), p)?),
            _ => return Err(bad("wrong number of fields")),
        };
        if let Addr::Tcp(h, 0) = &target {
            return Err(bad(&format!("target {h}:0 has no port")));
        }
        if let Addr::Tcp(h, _) = &target
            && h.is_empty()
        {
            return Err(bad("empty target host"));
        }
        if kind == Kind::Local && matches!(listen, Addr::Tcp(_, 0)) {
            return Err(bad("a local listening port must not be 0"));
        }
        Ok(ForwardSpec {
            kind,
            listen,
            target,
        })
    }
}

/// Splits on ':' outside brackets, removing the brackets.
fn split_fields(s: &str) -> Result<Vec<String>, &'static str> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut depth = false;
    for c in s.chars() {
        match c {
            '[' if !depth && cur.is_empty() => depth = true,
            ']' if depth => depth = false,
            ':' if !depth => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if depth {
        return Err("unclosed '['");
    }
    out.push(cur);
    if out.iter().any(|f| f.is_empty()) && out.len() > 1 {
        // "::" or a trailing ':' — but allow an explicit empty bind ("":port)
        // only as the first of four fields, as OpenSSH does.
        if !(out.len() == 4 && out[0].is_empty() && out[1..].iter().all(|f| !f.is_empty())) {
            return Err("empty field");
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_for_other_files() {
        for ok in ["prod", "a.b_c-1", &"x".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "x\nProxyCommand evil",
            "a@b",
            "a/b",
            "é",
            &"x".repeat(65),
        ] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
        }
        let p = std::path::Path::new("/run/x.mux");
        assert!(check_path_text("ControlPath", p).is_ok());
        let e = check_path_text("ControlPath", std::path::Path::new("/a\nb"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ControlPath \"/a\\nb\""), "{e}");
    }

    fn p(kind: Kind, s: &str) -> ForwardSpec {
        ForwardSpec::parse(kind, s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn openssh_forms() {
        let f = p(Kind::Local, "8080:localhost:80");
        assert_eq!(f.listen, Addr::Tcp("".into(), 8080));
        assert_eq!(f.target, Addr::Tcp("localhost".into(), 80));
        let f = p(Kind::Remote, "0.0.0.0:2222:localhost:22");
        assert_eq!(f.listen, Addr::Tcp("0.0.0.0".into(), 2222));
        let f = p(Kind::Remote, "0:localhost:3000");
        assert_eq!(f.listen, Addr::Tcp("".into(), 0));
        let f = p(Kind::Local, "[::1]:8080:[fe80::1]:80");
        assert_eq!(f.listen, Addr::Tcp("::1".into(), 8080));
        assert_eq!(f.target, Addr::Tcp("fe80::1".into(), 80));
        let f = p(Kind::Local, "/tmp/l.sock:/run/r.sock");
        assert_eq!(f.listen, Addr::Unix("/tmp/l.sock".into()));
        assert_eq!(f.target, Addr::Unix("/run/r.sock".into()));
        let f = p(Kind::Local, "5432:/run/pg.sock");
        assert_eq!(f.target, Addr::Unix("/run/pg.sock".into()));
        let f = p(Kind::Remote, "/tmp/r.sock:localhost:22");
        assert_eq!(f.listen, Addr::Unix("/tmp/r.sock".into()));
        assert_eq!(f.to_string(), "-R /tmp/r.sock:localhost:22");
        // Found by fuzzing: a socket path with ':' printed without the
        // brackets that it needs to parse back.
        let f = p(Kind::Local, "[/a:b]:0:1");
        assert_eq!(f.listen, Addr::Unix("/a:b".into()));
        assert_eq!(f.to_string(), "-L [/a:b]:0:1");
        assert_eq!(p(Kind::Local, "[/a:b]:0:1"), f);
    }

    #[test]
    fn bad_specs_name_the_spec_and_the_form() {
        for s in [
            "8080",
            "x:localhost:80",
            "8080:localhost:",
            "1:2:3:4:5",
            "[::1:80:h:1",
            "0:localhost:80",
        ] {
            let e = ForwardSpec::parse(Kind::Local, s).unwrap_err().to_string();
            assert!(e.contains(s), "{e}");
            assert!(
                e.contains("expected [bind_address:]port:host:hostport"),
                "{e}"
            );
        }
    }

    #[test]
    fn destinations() {
        let d: Destination = "alice@host.example:2200".parse().unwrap();
        assert_eq!(d.user.as_deref(), Some("alice"));
        assert_eq!(d.host, "host.example");
        assert_eq!(d.port, Some(2200));
        let d: Destination = "[::1]:22".parse().unwrap();
        assert_eq!((d.host.as_str(), d.port), ("::1", Some(22)));
        let d: Destination = "fe80::1".parse().unwrap();
        assert_eq!((d.host.as_str(), d.port), ("fe80::1", None));
        let d: Destination = "a@b@host".parse().unwrap();
        assert_eq!(d.user.as_deref(), Some("a@b"));
        assert!("host:0".parse::<Destination>().is_err());
        assert!("host:x".parse::<Destination>().is_err());
        assert!("@host".parse::<Destination>().is_err());
        assert!("".parse::<Destination>().is_err());
        // Found by fuzzing: names OpenSSH refuses were accepted.
        for s in ["\0a", "a b", "h\n* ssh-ed25519 AAAA", "u\t@h", "u@h\r:22"] {
            let e = s.parse::<Destination>().unwrap_err().to_string();
            assert!(e.contains("space or control character"), "{e}");
        }
        // Found by fuzzing: brackets inside a host, which no form can print.
        for s in ["0[::1]", "::]", "[[x]", "h]:22"] {
            let e = s.parse::<Destination>().unwrap_err().to_string();
            assert!(e.contains("stray '[' or ']'"), "{e}");
        }
        assert_eq!(
            "u@[::1]:2".parse::<Destination>().unwrap().to_string(),
            "u@[::1]:2"
        );
    }
}

//! Wire format of OpenSSH's multiplexing protocol, version 4: typed
//! messages and a pure, bounded codec.
//!
//! A packet on the control socket is `u32 length` followed by `length` bytes
//! of body; the body starts with `u32 type`. Every client request but HELLO
//! then carries a `u32` request id (rid) that the reply must echo. Strings
//! are SSH strings (`u32 len` + bytes) and the "bool" fields are `u32`.
//!
//! [`decode_client`] turns one packet body into a [`ClientMessage`]; it is a
//! pure function over `&[u8]` that never panics and never allocates more than
//! its input, so it can be fuzzed directly. Malformed input is an `Err`
//! (OpenSSH's master closes the connection on those); a well-framed request
//! whose content is unacceptable decodes as [`ClientMessage::Invalid`], to be
//! answered with a FAILURE while the connection stays up. [`ServerMessage`]
//! encodes every master -> client message, framed and ready to write.
//!
//! The codec mirrors what OpenSSH's clients send and its master accepts
//! (mux.c), not only PROTOCOL.mux where the two differ: the stdio-forward
//! port is a `u32`, and `0xfffffffe` as a port means "the host field is a
//! Unix socket path".

use std::fmt;

/// Protocol version spoken by OpenSSH 5.x to 10.x clients and by us.
pub const MUX_VERSION: u32 = 4;
/// Largest packet body accepted; OpenSSH's master drops bigger ones too.
pub const MAX_PACKET: usize = 256 * 1024;
/// Port value meaning "the address is a Unix socket path" (OpenSSH's
/// `PORT_STREAMLOCAL`, -2 as a u32).
pub const PORT_STREAMLOCAL: u32 = 0xffff_fffe;
/// Most environment entries kept from one NEW_SESSION, as in OpenSSH.
pub const MAX_ENV_VARS: usize = 4096;

/// Message type numbers (OpenSSH mux.c).
pub mod msg {
    /// Both directions: version and extensions.
    pub const HELLO: u32 = 0x0000_0001;
    /// Client: open a session with three passed descriptors.
    pub const NEW_SESSION: u32 = 0x1000_0002;
    /// Client: is the master alive (and what is its pid)?
    pub const ALIVE_CHECK: u32 = 0x1000_0004;
    /// Client: `ssh -O exit`.
    pub const TERMINATE: u32 = 0x1000_0005;
    /// Client: `-L`/`-R`/`-D` or `ssh -O forward`.
    pub const OPEN_FWD: u32 = 0x1000_0006;
    /// Client: `ssh -O cancel`.
    pub const CLOSE_FWD: u32 = 0x1000_0007;
    /// Client: `ssh -W host:port` with two passed descriptors.
    pub const NEW_STDIO_FWD: u32 = 0x1000_0008;
    /// Client: `ssh -O stop`.
    pub const STOP_LISTENING: u32 = 0x1000_0009;
    /// Client: `ssh -O proxy` (raw SSH packets afterwards).
    pub const PROXY: u32 = 0x1000_000f;
    /// Client: `ssh -O conninfo` / `-O channels` (OpenSSH 10.3+).
    pub const EXT_INFO: u32 = 0x2000_0001;
    /// Master: request done.
    pub const OK: u32 = 0x8000_0001;
    /// Master: request refused by policy.
    pub const PERMISSION_DENIED: u32 = 0x8000_0002;
    /// Master: request failed.
    pub const FAILURE: u32 = 0x8000_0003;
    /// Master, unsolicited: the session's exit status.
    pub const EXIT_MESSAGE: u32 = 0x8000_0004;
    /// Master: answer to ALIVE_CHECK.
    pub const ALIVE: u32 = 0x8000_0005;
    /// Master: answer to NEW_SESSION / NEW_STDIO_FWD.
    pub const SESSION_OPENED: u32 = 0x8000_0006;
    /// Master: port allocated for a `-R 0:...` forward.
    pub const REMOTE_PORT: u32 = 0x8000_0007;
    /// Master, unsolicited: the server refused the pty.
    pub const TTY_ALLOC_FAIL: u32 = 0x8000_0008;
    /// Master: answer to PROXY.
    pub const PROXY_REPLY: u32 = 0x8000_000f;
    /// Master: answer to EXT_INFO.
    pub const EXT_INFO_REPLY: u32 = 0x9000_0001;
}

/// Why a packet could not be decoded. Each is fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The length header announces more than [`MAX_PACKET`] bytes.
    TooLarge(usize),
    /// The packet ended before `field` was complete.
    Truncated(&'static str),
    /// A text field held a NUL byte (OpenSSH rejects those too).
    Nul(&'static str),
    /// A text field was not UTF-8.
    NotUtf8(&'static str),
    /// A port field outside 0..=65535 that is not [`PORT_STREAMLOCAL`].
    BadPort(&'static str, u32),
    /// Something this side does not speak (a master's version or type).
    Unsupported(&'static str, u32),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge(n) => {
                write!(f, "packet of {n} bytes exceeds the {MAX_PACKET}-byte limit")
            }
            DecodeError::Truncated(what) => write!(f, "packet truncated in {what}"),
            DecodeError::Nul(what) => write!(f, "{what} contains a NUL byte"),
            DecodeError::NotUtf8(what) => write!(f, "{what} is not valid UTF-8"),
            DecodeError::BadPort(what, p) => write!(f, "{what} {p} is not a valid port"),
            DecodeError::Unsupported(what, v) => write!(f, "unsupported {what} {v:#x}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// An address in a forward request: a TCP host and port, or a Unix path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MuxAddr {
    /// `host:port`. For a listen address the host may be empty (the default
    /// bind address, loopback unless GatewayPorts) or `*` (all addresses).
    Tcp(String, u16),
    /// A Unix socket path (the wire port was [`PORT_STREAMLOCAL`]).
    Unix(String),
}

impl fmt::Display for MuxAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MuxAddr::Tcp(h, p) if h.contains(':') => write!(f, "[{h}]:{p}"),
            MuxAddr::Tcp(h, p) if h.is_empty() => write!(f, "{p}"),
            MuxAddr::Tcp(h, p) => write!(f, "{h}:{p}"),
            MuxAddr::Unix(p) => f.write_str(p),
        }
    }
}

/// Direction of a forward request (wire values 1, 2, 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardKind {
    /// `-L`: listen on the master's side, connect from the server.
    Local,
    /// `-R`: listen on the server, connect from the master's side.
    Remote,
    /// `-D`: SOCKS listener on the master's side.
    Dynamic,
}

impl ForwardKind {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            ForwardKind::Local => 1,
            ForwardKind::Remote => 2,
            ForwardKind::Dynamic => 3,
        }
    }
}

/// A forward as carried by OPEN_FWD and CLOSE_FWD.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Forward {
    /// Local, remote or dynamic.
    pub kind: ForwardKind,
    /// Where to listen. For a remote forward, port 0 asks the server to
    /// pick one (answer with REMOTE_PORT).
    pub listen: MuxAddr,
    /// Where to connect; `None` exactly for dynamic forwards.
    pub connect: Option<MuxAddr>,
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = match self.kind {
            ForwardKind::Local => "-L",
            ForwardKind::Remote => "-R",
            ForwardKind::Dynamic => "-D",
        };
        match &self.connect {
            Some(c) => write!(f, "{flag} {}:{c}", self.listen),
            None => write!(f, "{flag} {}", self.listen),
        }
    }
}

/// The fields of a NEW_SESSION request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewSession {
    /// The client wants a pty (`-t`, or an interactive shell).
    pub want_tty: bool,
    /// The client asked for X11 forwarding (only the flag is sent).
    pub want_x11: bool,
    /// The client asked for agent forwarding (only the flag is sent).
    pub want_agent: bool,
    /// `command` names a subsystem (`-s`, sftp).
    pub subsystem: bool,
    /// The escape character for the master's escape filter (tty sessions
    /// only); `None` for `EscapeChar none` or an out-of-range value.
    pub escape_char: Option<u8>,
    /// The client's TERM (empty if unset).
    pub term: String,
    /// The command, subsystem name, or empty for a shell. Bytes, because a
    /// command may name files in any encoding.
    pub command: Vec<u8>,
    /// `NAME=value` entries (SendEnv matches and SetEnv), split at the first
    /// `=`. Entries without a name or not UTF-8 are left out, and at most
    /// [`MAX_ENV_VARS`] are kept.
    pub env: Vec<(String, String)>,
}

/// One message from a mux client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Version and `(name, value)` extensions.
    Hello {
        /// Protocol version (4 for every known client).
        version: u32,
        /// Extensions; OpenSSH clients send none.
        extensions: Vec<(String, Vec<u8>)>,
    },
    /// ALIVE_CHECK: answer ALIVE with our pid.
    AliveCheck {
        /// Request id.
        rid: u32,
    },
    /// NEW_SESSION; three descriptors follow the packet.
    NewSession {
        /// Request id.
        rid: u32,
        /// The request.
        session: NewSession,
    },
    /// NEW_STDIO_FWD (`ssh -W`); two descriptors follow the packet.
    NewStdioFwd {
        /// Request id.
        rid: u32,
        /// Where to connect from the server.
        target: MuxAddr,
    },
    /// OPEN_FWD.
    OpenFwd {
        /// Request id.
        rid: u32,
        /// The forward.
        forward: Forward,
    },
    /// CLOSE_FWD.
    CloseFwd {
        /// Request id.
        rid: u32,
        /// The forward to cancel, as it was opened.
        forward: Forward,
    },
    /// TERMINATE (`ssh -O exit`).
    Terminate {
        /// Request id.
        rid: u32,
    },
    /// STOP_LISTENING (`ssh -O stop`).
    StopListening {
        /// Request id.
        rid: u32,
    },
    /// PROXY (`ssh -O proxy`).
    Proxy {
        /// Request id.
        rid: u32,
    },
    /// EXT_INFO (`ssh -O conninfo` / `-O channels`).
    ExtInfo {
        /// Request id.
        rid: u32,
        /// What is asked: `connection` or `channels`.
        what: String,
    },
    /// A request type we do not know.
    Unknown {
        /// The type number.
        msg_type: u32,
        /// Request id.
        rid: u32,
    },
    /// A well-formed request whose content is refused; answer FAILURE with
    /// `reason` (descriptors still follow a NEW_STDIO_FWD).
    Invalid {
        /// The type number.
        msg_type: u32,
        /// Request id.
        rid: u32,
        /// Text for the FAILURE reply.
        reason: &'static str,
    },
}

impl ClientMessage {
    /// The request id, if the message has one (all but HELLO).
    pub fn rid(&self) -> Option<u32> {
        match self {
            ClientMessage::Hello { .. } => None,
            ClientMessage::AliveCheck { rid }
            | ClientMessage::NewSession { rid, .. }
            | ClientMessage::NewStdioFwd { rid, .. }
            | ClientMessage::OpenFwd { rid, .. }
            | ClientMessage::CloseFwd { rid, .. }
            | ClientMessage::Terminate { rid }
            | ClientMessage::StopListening { rid }
            | ClientMessage::Proxy { rid }
            | ClientMessage::ExtInfo { rid, .. }
            | ClientMessage::Unknown { rid, .. }
            | ClientMessage::Invalid { rid, .. } => Some(*rid),
        }
    }

    /// How many descriptors the client sends right after this packet.
    pub fn fds_following(&self) -> usize {
        match self {
            ClientMessage::NewSession { .. } => 3,
            ClientMessage::NewStdioFwd { .. } => 2,
            ClientMessage::Invalid { msg_type, .. } => match *msg_type {
                msg::NEW_SESSION => 3,
                msg::NEW_STDIO_FWD => 2,
                _ => 0,
            },
            _ => 0,
        }
    }

    /// Encodes the message as a framed packet (length included), as an
    /// OpenSSH client would send it; for tests and tools.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            ClientMessage::Hello {
                version,
                extensions,
            } => {
                w.u32(msg::HELLO).u32(*version);
                for (name, value) in extensions {
                    w.string(name.as_bytes()).string(value);
                }
            }
            ClientMessage::AliveCheck { rid } => {
                w.u32(msg::ALIVE_CHECK).u32(*rid);
            }
            ClientMessage::NewSession { rid, session: s } => {
                w.u32(msg::NEW_SESSION)
                    .u32(*rid)
                    .string(b"")
                    .u32(s.want_tty.into())
                    .u32(s.want_x11.into())
                    .u32(s.want_agent.into())
                    .u32(s.subsystem.into())
                    .u32(s.escape_char.map_or(0xffff_ffff, u32::from))
                    .string(s.term.as_bytes())
                    .string(&s.command);
                for (name, value) in &s.env {
                    w.string(format!("{name}={value}").as_bytes());
                }
            }
            ClientMessage::NewStdioFwd { rid, target } => {
                let (host, port) = addr_fields(Some(target));
                w.u32(msg::NEW_STDIO_FWD)
                    .u32(*rid)
                    .string(b"")
                    .string(host.as_bytes())
                    .u32(port);
            }
            ClientMessage::OpenFwd { rid, forward } | ClientMessage::CloseFwd { rid, forward } => {
                let t = if matches!(self, ClientMessage::OpenFwd { .. }) {
                    msg::OPEN_FWD
                } else {
                    msg::CLOSE_FWD
                };
                let (lhost, lport) = addr_fields(Some(&forward.listen));
                let (chost, cport) = addr_fields(forward.connect.as_ref());
                w.u32(t)
                    .u32(*rid)
                    .u32(forward.kind.code())
                    .string(lhost.as_bytes())
                    .u32(lport)
                    .string(chost.as_bytes())
                    .u32(cport);
            }
            ClientMessage::Terminate { rid } => {
                w.u32(msg::TERMINATE).u32(*rid);
            }
            ClientMessage::StopListening { rid } => {
                w.u32(msg::STOP_LISTENING).u32(*rid);
            }
            ClientMessage::Proxy { rid } => {
                w.u32(msg::PROXY).u32(*rid);
            }
            ClientMessage::ExtInfo { rid, what } => {
                w.u32(msg::EXT_INFO).u32(*rid).string(what.as_bytes());
            }
            ClientMessage::Unknown { msg_type, rid }
            | ClientMessage::Invalid { msg_type, rid, .. } => {
                w.u32(*msg_type).u32(*rid);
            }
        }
        w.framed()
    }
}

/// Host and port fields for an address (`""`, 0 for none).
fn addr_fields(a: Option<&MuxAddr>) -> (&str, u32) {
    match a {
        None => ("", 0),
        Some(MuxAddr::Tcp(h, p)) => (h, u32::from(*p)),
        Some(MuxAddr::Unix(p)) => (p, PORT_STREAMLOCAL),
    }
}

/// One message from the master to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// Our HELLO: version [`MUX_VERSION`] and extensions.
    Hello {
        /// `(name, value)` pairs, e.g. `("info", "0")`.
        extensions: Vec<(String, Vec<u8>)>,
    },
    /// OK {rid}.
    Ok {
        /// Request id.
        rid: u32,
    },
    /// PERMISSION_DENIED {rid, reason}.
    PermissionDenied {
        /// Request id.
        rid: u32,
        /// Shown to the user.
        reason: String,
    },
    /// FAILURE {rid, reason}.
    Failure {
        /// Request id.
        rid: u32,
        /// Shown to the user.
        reason: String,
    },
    /// ALIVE {rid, pid}; the client sends SIGWINCH to that pid.
    Alive {
        /// Request id.
        rid: u32,
        /// Our process id.
        pid: u32,
    },
    /// SESSION_OPENED {rid, session id}.
    SessionOpened {
        /// Request id.
        rid: u32,
        /// Id echoed in EXIT_MESSAGE / TTY_ALLOC_FAIL.
        session_id: u32,
    },
    /// EXIT_MESSAGE {session id, exit value}; at most once per session.
    ExitMessage {
        /// The session.
        session_id: u32,
        /// The remote command's exit status.
        exit_value: u32,
    },
    /// TTY_ALLOC_FAIL {session id}: the client leaves raw mode.
    TtyAllocFail {
        /// The session.
        session_id: u32,
    },
    /// REMOTE_PORT {rid, port}: answer to a `-R 0:...` OPEN_FWD.
    RemotePort {
        /// Request id.
        rid: u32,
        /// The port the server allocated.
        port: u32,
    },
    /// EXT_INFO reply {rid, status, message}.
    ExtInfo {
        /// Request id.
        rid: u32,
        /// Whether the request was understood.
        ok: bool,
        /// The information, or why there is none.
        message: String,
    },
}

impl ServerMessage {
    /// Encodes the message as a framed packet (length included).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            ServerMessage::Hello { extensions } => {
                w.u32(msg::HELLO).u32(MUX_VERSION);
                for (name, value) in extensions {
                    w.string(name.as_bytes()).string(value);
                }
            }
            ServerMessage::Ok { rid } => {
                w.u32(msg::OK).u32(*rid);
            }
            ServerMessage::PermissionDenied { rid, reason } => {
                w.u32(msg::PERMISSION_DENIED)
                    .u32(*rid)
                    .string(cstr(reason).as_bytes());
            }
            ServerMessage::Failure { rid, reason } => {
                w.u32(msg::FAILURE)
                    .u32(*rid)
                    .string(cstr(reason).as_bytes());
            }
            ServerMessage::Alive { rid, pid } => {
                w.u32(msg::ALIVE).u32(*rid).u32(*pid);
            }
            ServerMessage::SessionOpened { rid, session_id } => {
                w.u32(msg::SESSION_OPENED).u32(*rid).u32(*session_id);
            }
            ServerMessage::ExitMessage {
                session_id,
                exit_value,
            } => {
                w.u32(msg::EXIT_MESSAGE).u32(*session_id).u32(*exit_value);
            }
            ServerMessage::TtyAllocFail { session_id } => {
                w.u32(msg::TTY_ALLOC_FAIL).u32(*session_id);
            }
            ServerMessage::RemotePort { rid, port } => {
                w.u32(msg::REMOTE_PORT).u32(*rid).u32(*port);
            }
            ServerMessage::ExtInfo { rid, ok, message } => {
                w.u32(msg::EXT_INFO_REPLY)
                    .u32(*rid)
                    .u32((*ok).into())
                    .string(cstr(message).as_bytes());
            }
        }
        w.framed()
    }
}

/// The text up to the first NUL: the client reads reasons as C strings
/// and would treat an embedded NUL as a malformed reply.
fn cstr(s: &str) -> &str {
    s.split('\0').next().unwrap_or("")
}

/// Length of the packet body announced by a 4-byte header, refused above
/// [`MAX_PACKET`].
pub fn body_len(header: [u8; 4]) -> Result<usize, DecodeError> {
    let n = u32::from_be_bytes(header) as usize;
    if n > MAX_PACKET {
        return Err(DecodeError::TooLarge(n));
    }
    Ok(n)
}

/// Decodes one client packet body (without its length header).
pub fn decode_client(body: &[u8]) -> Result<ClientMessage, DecodeError> {
    if body.len() > MAX_PACKET {
        return Err(DecodeError::TooLarge(body.len()));
    }
    let mut r = Reader { buf: body };
    let msg_type = r.u32("message type")?;
    if msg_type == msg::HELLO {
        let version = r.u32("HELLO version")?;
        let mut extensions = Vec::new();
        while !r.is_empty() {
            let name = r.text("HELLO extension name")?;
            let value = r.string("HELLO extension value")?.to_vec();
            extensions.push((name, value));
        }
        return Ok(ClientMessage::Hello {
            version,
            extensions,
        });
    }
    let rid = r.u32("request id")?;
    let m = match msg_type {
        msg::ALIVE_CHECK => ClientMessage::AliveCheck { rid },
        msg::TERMINATE => ClientMessage::Terminate { rid },
        msg::STOP_LISTENING => ClientMessage::StopListening { rid },
        msg::PROXY => ClientMessage::Proxy { rid },
        msg::EXT_INFO => ClientMessage::ExtInfo {
            rid,
            what: r.text("EXT_INFO name")?,
        },
        msg::NEW_SESSION => ClientMessage::NewSession {
            rid,
            session: decode_session(&mut r)?,
        },
        msg::NEW_STDIO_FWD => decode_stdio_fwd(&mut r, rid)?,
        msg::OPEN_FWD | msg::CLOSE_FWD => decode_forward(&mut r, msg_type, rid)?,
        _ => ClientMessage::Unknown { msg_type, rid },
    };
    Ok(m)
}

/// NEW_SESSION after the rid.
fn decode_session(r: &mut Reader<'_>) -> Result<NewSession, DecodeError> {
    r.string("reserved field")?;
    let want_tty = r.u32("want_tty")? != 0;
    let want_x11 = r.u32("want_x11")? != 0;
    let want_agent = r.u32("want_agent")? != 0;
    let subsystem = r.u32("subsystem flag")? != 0;
    let escape_char = u8::try_from(r.u32("escape char")?).ok();
    let term = r.text("TERM")?;
    let command = r.cstring("command")?.to_vec();
    let mut env = Vec::new();
    while !r.is_empty() {
        let entry = r.cstring("environment entry")?;
        if env.len() >= MAX_ENV_VARS {
            // Like OpenSSH: keep the first ones, ignore the rest.
            break;
        }
        let Ok(entry) = std::str::from_utf8(entry) else {
            continue;
        };
        match entry.split_once('=') {
            Some((name, value)) if !name.is_empty() => {
                env.push((name.to_string(), value.to_string()));
            }
            _ => {}
        }
    }
    Ok(NewSession {
        want_tty,
        want_x11,
        want_agent,
        subsystem,
        escape_char,
        term,
        command,
        env,
    })
}

/// NEW_STDIO_FWD after the rid.
fn decode_stdio_fwd(r: &mut Reader<'_>, rid: u32) -> Result<ClientMessage, DecodeError> {
    r.string("reserved field")?;
    let host = r.text("stdio forward host")?;
    let port = r.u32("stdio forward port")?;
    let target = match port {
        PORT_STREAMLOCAL => MuxAddr::Unix(host),
        p => match u16::try_from(p) {
            Ok(p) if p != 0 && !host.is_empty() => MuxAddr::Tcp(host, p),
            _ => {
                return Ok(ClientMessage::Invalid {
                    msg_type: msg::NEW_STDIO_FWD,
                    rid,
                    reason: "invalid stdio forwarding target",
                });
            }
        },
    };
    Ok(ClientMessage::NewStdioFwd { rid, target })
}

/// OPEN_FWD / CLOSE_FWD after the rid, validated as OpenSSH's master does.
fn decode_forward(
    r: &mut Reader<'_>,
    msg_type: u32,
    rid: u32,
) -> Result<ClientMessage, DecodeError> {
    let kind = r.u32("forward type")?;
    let lhost = r.text("listen host")?;
    let lport = r.u32("listen port")?;
    let chost = r.text("connect host")?;
    let cport = r.u32("connect port")?;
    for (what, p) in [("listen port", lport), ("connect port", cport)] {
        if p != PORT_STREAMLOCAL && p > 65535 {
            return Err(DecodeError::BadPort(what, p));
        }
    }
    let invalid = ClientMessage::Invalid {
        msg_type,
        rid,
        reason: "Invalid forwarding request",
    };
    let kind = match kind {
        1 => ForwardKind::Local,
        2 => ForwardKind::Remote,
        3 => ForwardKind::Dynamic,
        _ => return Ok(invalid),
    };
    let addr = |host: String, port: u32| match port {
        PORT_STREAMLOCAL => MuxAddr::Unix(host),
        // Checked above: fits.
        p => MuxAddr::Tcp(host, p as u16),
    };
    let listen = addr(lhost, lport);
    if kind == ForwardKind::Dynamic && matches!(listen, MuxAddr::Unix(_)) {
        return Ok(invalid);
    }
    let connect = if kind == ForwardKind::Dynamic {
        None
    } else {
        // A local forward needs a connect port; neither may lack a target.
        if (kind == ForwardKind::Local && cport == 0) || chost.is_empty() {
            return Ok(invalid);
        }
        Some(addr(chost, cport))
    };
    let forward = Forward {
        kind,
        listen,
        connect,
    };
    Ok(if msg_type == msg::OPEN_FWD {
        ClientMessage::OpenFwd { rid, forward }
    } else {
        ClientMessage::CloseFwd { rid, forward }
    })
}

/// Decodes one master packet body (without its length header); the
/// client's view, for tests and tools. Unknown types are an error.
pub fn decode_server(body: &[u8]) -> Result<ServerMessage, DecodeError> {
    if body.len() > MAX_PACKET {
        return Err(DecodeError::TooLarge(body.len()));
    }
    let mut r = Reader { buf: body };
    let msg_type = r.u32("message type")?;
    let m = match msg_type {
        msg::HELLO => {
            let version = r.u32("HELLO version")?;
            if version != MUX_VERSION {
                return Err(DecodeError::Unsupported("protocol version", version));
            }
            let mut extensions = Vec::new();
            while !r.is_empty() {
                let name = r.text("HELLO extension name")?;
                extensions.push((name, r.string("HELLO extension value")?.to_vec()));
            }
            ServerMessage::Hello { extensions }
        }
        msg::OK => ServerMessage::Ok { rid: r.u32("rid")? },
        msg::PERMISSION_DENIED => ServerMessage::PermissionDenied {
            rid: r.u32("rid")?,
            reason: r.text("reason")?,
        },
        msg::FAILURE => ServerMessage::Failure {
            rid: r.u32("rid")?,
            reason: r.text("reason")?,
        },
        msg::ALIVE => ServerMessage::Alive {
            rid: r.u32("rid")?,
            pid: r.u32("pid")?,
        },
        msg::SESSION_OPENED => ServerMessage::SessionOpened {
            rid: r.u32("rid")?,
            session_id: r.u32("session id")?,
        },
        msg::EXIT_MESSAGE => ServerMessage::ExitMessage {
            session_id: r.u32("session id")?,
            exit_value: r.u32("exit value")?,
        },
        msg::TTY_ALLOC_FAIL => ServerMessage::TtyAllocFail {
            session_id: r.u32("session id")?,
        },
        msg::REMOTE_PORT => ServerMessage::RemotePort {
            rid: r.u32("rid")?,
            port: r.u32("port")?,
        },
        msg::EXT_INFO_REPLY => ServerMessage::ExtInfo {
            rid: r.u32("rid")?,
            ok: r.u32("status")? != 0,
            message: r.text("message")?,
        },
        _ => return Err(DecodeError::Unsupported("message type", msg_type)),
    };
    Ok(m)
}

/// A bounds-checked cursor over a packet body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Whether everything has been consumed.
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes `n` bytes.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A big-endian u32.
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// An SSH string as bytes.
    fn string(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }

    /// An SSH string without NUL bytes (OpenSSH's cstring).
    fn cstring(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let s = self.string(what)?;
        if s.contains(&0) {
            return Err(DecodeError::Nul(what));
        }
        Ok(s)
    }

    /// A cstring that must be UTF-8.
    fn text(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let s = self.cstring(what)?;
        match std::str::from_utf8(s) {
            Ok(s) => Ok(s.to_string()),
            Err(_) => Err(DecodeError::NotUtf8(what)),
        }
    }
}

/// Builds a packet body, then frames it.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// Appends a big-endian u32.
    fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends an SSH string.
    fn string(&mut self, s: &[u8]) -> &mut Self {
        // Our own messages are far below 4 GiB; saturate rather than wrap.
        let n = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.u32(n);
        self.buf.extend_from_slice(s);
        self
    }

    /// The body with its length header in front.
    fn framed(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.buf.len());
        let n = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&self.buf);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body of a framed packet, checking the header.
    fn body(framed: &[u8]) -> &[u8] {
        let n = body_len([framed[0], framed[1], framed[2], framed[3]]).unwrap();
        assert_eq!(n, framed.len() - 4);
        &framed[4..]
    }

    /// Hand-built body from u32s and strings, to test decoding of bytes
    /// exactly as OpenSSH lays them out.
    enum F<'a> {
        U(u32),
        S(&'a [u8]),
    }

    fn raw(fields: &[F<'_>]) -> Vec<u8> {
        let mut w = Writer::default();
        for f in fields {
            match f {
                F::U(v) => w.u32(*v),
                F::S(s) => w.string(s),
            };
        }
        w.buf
    }

    fn sample_messages() -> Vec<ClientMessage> {
        vec![
            ClientMessage::Hello {
                version: 4,
                extensions: vec![("info".into(), b"0".to_vec())],
            },
            ClientMessage::AliveCheck { rid: 0 },
            ClientMessage::NewSession {
                rid: 1,
                session: NewSession {
                    want_tty: true,
                    want_x11: false,
                    want_agent: true,
                    subsystem: false,
                    escape_char: Some(b'~'),
                    term: "xterm-256color".into(),
                    command: b"echo hi".to_vec(),
                    env: vec![
                        ("LANG".into(), "C.UTF-8".into()),
                        ("A".into(), "b=c".into()),
                    ],
                },
            },
            ClientMessage::NewStdioFwd {
                rid: 2,
                target: MuxAddr::Tcp("db.internal".into(), 5432),
            },
            ClientMessage::NewStdioFwd {
                rid: 2,
                target: MuxAddr::Unix("/run/x.sock".into()),
            },
            ClientMessage::OpenFwd {
                rid: 3,
                forward: Forward {
                    kind: ForwardKind::Local,
                    listen: MuxAddr::Tcp("127.0.0.1".into(), 8080),
                    connect: Some(MuxAddr::Tcp("127.0.0.1".into(), 22)),
                },
            },
            ClientMessage::OpenFwd {
                rid: 4,
                forward: Forward {
                    kind: ForwardKind::Remote,
                    listen: MuxAddr::Tcp("".into(), 0),
                    connect: Some(MuxAddr::Unix("/tmp/s".into())),
                },
            },
            ClientMessage::CloseFwd {
                rid: 5,
                forward: Forward {
                    kind: ForwardKind::Dynamic,
                    listen: MuxAddr::Tcp("*".into(), 1080),
                    connect: None,
                },
            },
            ClientMessage::Terminate { rid: 6 },
            ClientMessage::StopListening { rid: 7 },
            ClientMessage::Proxy { rid: 8 },
            ClientMessage::ExtInfo {
                rid: 9,
                what: "connection".into(),
            },
            ClientMessage::Unknown {
                msg_type: 0x1000_0042,
                rid: 10,
            },
        ]
    }

    #[test]
    fn client_messages_round_trip() {
        for m in sample_messages() {
            let framed = m.encode();
            assert_eq!(decode_client(body(&framed)), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn server_messages_round_trip() {
        let all = [
            ServerMessage::Hello {
                extensions: vec![("info".into(), b"0".to_vec())],
            },
            ServerMessage::Ok { rid: 1 },
            ServerMessage::PermissionDenied {
                rid: 2,
                reason: "Permission denied".into(),
            },
            ServerMessage::Failure {
                rid: 3,
                reason: "unsupported request".into(),
            },
            ServerMessage::Alive { rid: 4, pid: 4242 },
            ServerMessage::SessionOpened {
                rid: 5,
                session_id: 7,
            },
            ServerMessage::ExitMessage {
                session_id: 7,
                exit_value: 3,
            },
            ServerMessage::TtyAllocFail { session_id: 7 },
            ServerMessage::RemotePort {
                rid: 6,
                port: 40000,
            },
            ServerMessage::ExtInfo {
                rid: 8,
                ok: true,
                message: "x".into(),
            },
        ];
        for m in all {
            assert_eq!(decode_server(body(&m.encode())), Ok(m.clone()), "{m:?}");
        }
    }

    #[test]
    fn server_encodings_match_openssh_layout() {
        assert_eq!(
            ServerMessage::Hello { extensions: vec![] }.encode(),
            [0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 4]
        );
        assert_eq!(
            ServerMessage::Alive {
                rid: 1,
                pid: 0x0102
            }
            .encode(),
            [0, 0, 0, 12, 0x80, 0, 0, 5, 0, 0, 0, 1, 0, 0, 1, 2]
        );
        assert_eq!(
            ServerMessage::Failure {
                rid: 9,
                reason: "no\0tail".into()
            }
            .encode(),
            [
                0, 0, 0, 14, 0x80, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 2, b'n', b'o'
            ]
        );
    }

    #[test]
    fn new_session_as_openssh_sends_it() {
        let b = raw(&[
            F::U(msg::NEW_SESSION),
            F::U(1),
            F::S(b""),
            F::U(0),
            F::U(0),
            F::U(0),
            F::U(0),
            F::U(0xffff_ffff),
            F::S(b"dumb"),
            F::S(b"ls -l \xff"),
            F::S(b"FOO=bar"),
            F::S(b"noequals"),
            F::S(b"=novalue"),
            F::S(b"BAD=\xff"),
            F::S(b"EMPTY="),
        ]);
        let ClientMessage::NewSession { rid, session } = decode_client(&b).unwrap() else {
            panic!("not a session");
        };
        assert_eq!(rid, 1);
        assert_eq!(session.escape_char, None);
        assert_eq!(session.term, "dumb");
        assert_eq!(session.command, b"ls -l \xff");
        assert_eq!(
            session.env,
            vec![
                ("FOO".into(), "bar".into()),
                ("EMPTY".into(), String::new())
            ]
        );
    }

    #[test]
    fn env_is_capped() {
        let mut fields = vec![
            F::U(msg::NEW_SESSION),
            F::U(1),
            F::S(b""),
            F::U(0),
            F::U(0),
            F::U(0),
            F::U(0),
            F::U(b'~'.into()),
            F::S(b""),
            F::S(b""),
        ];
        fields.extend((0..MAX_ENV_VARS + 10).map(|_| F::S(b"A=1")));
        let ClientMessage::NewSession { session, .. } = decode_client(&raw(&fields)).unwrap()
        else {
            panic!("not a session");
        };
        assert_eq!(session.env.len(), MAX_ENV_VARS);
        assert_eq!(session.escape_char, Some(b'~'));
    }

    #[test]
    fn forward_validation_mirrors_openssh() {
        let fwd = |kind, lhost: &[u8], lport, chost: &[u8], cport| {
            decode_client(&raw(&[
                F::U(msg::OPEN_FWD),
                F::U(3),
                F::U(kind),
                F::S(lhost),
                F::U(lport),
                F::S(chost),
                F::U(cport),
            ]))
        };
        let invalid = Ok(ClientMessage::Invalid {
            msg_type: msg::OPEN_FWD,
            rid: 3,
            reason: "Invalid forwarding request",
        });
        assert_eq!(fwd(9, b"", 80, b"h", 80), invalid);
        assert_eq!(fwd(3, b"/p", PORT_STREAMLOCAL, b"", 0), invalid);
        assert_eq!(fwd(1, b"", 80, b"h", 0), invalid);
        assert_eq!(fwd(1, b"", 80, b"", 80), invalid);
        assert_eq!(fwd(2, b"", 0, b"", 0), invalid);
        assert_eq!(
            fwd(1, b"", 80, b"h", 70000),
            Err(DecodeError::BadPort("connect port", 70000))
        );
        assert_eq!(
            fwd(2, b"", 65536, b"h", 1),
            Err(DecodeError::BadPort("listen port", 65536))
        );
        // Remote with connect port 0 is allowed (OpenSSH checks only -L).
        assert!(matches!(
            fwd(2, b"", 0, b"h", 0),
            Ok(ClientMessage::OpenFwd { .. })
        ));
        // Unix paths on both sides.
        let Ok(ClientMessage::OpenFwd { forward, .. }) =
            fwd(1, b"/l", PORT_STREAMLOCAL, b"/c", PORT_STREAMLOCAL)
        else {
            panic!("not a forward");
        };
        assert_eq!(forward.listen, MuxAddr::Unix("/l".into()));
        assert_eq!(forward.connect, Some(MuxAddr::Unix("/c".into())));
        assert_eq!(forward.to_string(), "-L /l:/c");
    }

    #[test]
    fn stdio_forward_ports() {
        let stdio = |host: &[u8], port| {
            decode_client(&raw(&[
                F::U(msg::NEW_STDIO_FWD),
                F::U(2),
                F::S(b""),
                F::S(host),
                F::U(port),
            ]))
        };
        assert_eq!(
            stdio(b"h", 22),
            Ok(ClientMessage::NewStdioFwd {
                rid: 2,
                target: MuxAddr::Tcp("h".into(), 22)
            })
        );
        let bad = stdio(b"h", 70000).unwrap();
        assert!(matches!(bad, ClientMessage::Invalid { .. }));
        // The descriptors still follow and must be consumed.
        assert_eq!(bad.fds_following(), 2);
    }

    #[test]
    fn truncated_input_is_an_error_at_every_length() {
        for m in sample_messages() {
            let framed = m.encode();
            let b = body(&framed);
            for cut in 0..b.len() {
                let r = decode_client(&b[..cut]);
                // A shorter HELLO or session may still be valid (trailing
                // pairs/env are optional); it must never panic, and a cut
                // inside the fixed fields must be an error.
                if cut < 8 {
                    assert!(r.is_err(), "{m:?} cut at {cut}: {r:?}");
                }
            }
        }
        assert_eq!(
            decode_client(&[]),
            Err(DecodeError::Truncated("message type"))
        );
        assert_eq!(
            decode_client(&[0x10, 0, 0, 4, 0]),
            Err(DecodeError::Truncated("request id"))
        );
    }

    #[test]
    fn hostile_input_never_panics() {
        // Huge string lengths, NULs, bad UTF-8, and a pseudo-random sweep.
        let huge = raw(&[F::U(msg::EXT_INFO), F::U(1), F::U(0xffff_ffff)]);
        assert_eq!(
            decode_client(&huge),
            Err(DecodeError::Truncated("EXT_INFO name"))
        );
        let nul = raw(&[F::U(msg::EXT_INFO), F::U(1), F::S(b"a\0b")]);
        assert_eq!(decode_client(&nul), Err(DecodeError::Nul("EXT_INFO name")));
        let utf = raw(&[F::U(msg::EXT_INFO), F::U(1), F::S(b"\xc3")]);
        assert_eq!(
            decode_client(&utf),
            Err(DecodeError::NotUtf8("EXT_INFO name"))
        );
        assert!(matches!(
            decode_client(&vec![0; MAX_PACKET + 1]),
            Err(DecodeError::TooLarge(_))
        ));
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let types = [
            msg::HELLO,
            msg::NEW_SESSION,
            msg::NEW_STDIO_FWD,
            msg::OPEN_FWD,
            msg::CLOSE_FWD,
            msg::EXT_INFO,
        ];
        for i in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && b.len() >= 4 {
                b[..4].copy_from_slice(&types[i % types.len()].to_be_bytes());
                // Small string lengths so decoding goes deep.
                for chunk in b[4..].chunks_mut(8) {
                    if chunk.len() >= 4 && next() % 2 == 0 {
                        chunk[..4].copy_from_slice(&((next() % 6) as u32).to_be_bytes());
                    }
                }
            }
            let _ = decode_client(&b);
            let _ = decode_server(&b);
        }
    }

    #[test]
    fn body_len_limit() {
        assert_eq!(body_len((MAX_PACKET as u32).to_be_bytes()), Ok(MAX_PACKET));
        assert_eq!(
            body_len((MAX_PACKET as u32 + 1).to_be_bytes()),
            Err(DecodeError::TooLarge(MAX_PACKET + 1))
        );
        assert!(body_len([0xff; 4]).is_err());
    }
}

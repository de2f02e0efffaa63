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
mod tests;

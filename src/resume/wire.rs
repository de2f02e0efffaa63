//! The resume protocol: the frames sshshim and its remote helper exchange
//! over the helper's exec channel, and the replay buffers behind them.
//! A ground module: it imports nothing from the crate.
//!
//! Every byte of a stream carries an offset (its position since the
//! session started), so after a reconnect each side says how far it got
//! ("I have stdout up to N") and the other resends from there: nothing
//! delivered twice, nothing skipped. Data is dropped from an [`Outbox`]
//! only once the peer acknowledged it. The idea follows Eternal Terminal's
//! `BackedReader`/`BackedWriter`.
//!
//! A frame is a big-endian `u32` body length, then the body: a tag byte and
//! the fields. Strings and byte strings are a `u32` length and the bytes.
//!
//! Forwarded TCP connections (issue 24) share one helper per sshshim: it
//! is started like a session with [`Command::Forwards`], and every
//! connection's frames travel wrapped in [`Frame::Conn`] with the
//! connection's number, reusing the session frames:
//! - `->` [`Frame::Connect`] opens it; `<-` [`Frame::Started`] or
//!   [`Frame::OpenFailed`] (the channel-open failure sshd would give).
//! - Bytes to the target are [`Stream::Stdin`], from it [`Stream::Stdout`],
//!   with [`Frame::Data`], [`Frame::Ack`] and [`Frame::Eof`] (half-close)
//!   as for a session.
//! - `<-` [`Frame::Closed`]: the target connection is over (both ways
//!   ended, or it failed); everything sent before it is still delivered.
//!   `->` [`Frame::Done`] once the client has it all: the helper forgets
//!   the connection. `->` [`Frame::Hangup`]: the local end is gone; the
//!   helper closes the target connection and forgets it.
//! - After a reconnect the client resumes the helper (`Resume`, with zero
//!   offsets), then each connection it still has with a wrapped `Resume`
//!   (its `have_out` is what it has from the target); the helper answers
//!   `Resumed` (what it has written to the target) or `Refused` (it no
//!   longer has it). A connection whose `Connect` was not yet answered is
//!   answered later with `Started` or `OpenFailed` as usual.

use std::collections::VecDeque;
use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use zeroize::Zeroize;

/// Protocol version; the helper refuses a client of another version.
pub const VERSION: u32 = 1;

/// What the helper writes before its first frame, so the client can tell
/// the helper from a ForceCommand or a shell's banner.
pub const MAGIC: &[u8; 12] = b"\0sshshim-rh1";

/// The largest frame body accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// The largest data chunk put in one frame.
pub const CHUNK: usize = 64 * 1024;

/// Output the helper sends beyond what was acknowledged, per stream, while
/// attached. sshshim acknowledges output once its local client took it,
/// so this is also what sshshim holds for a slow reader: within its
/// in-memory budget per channel (2 MiB), so a resumable download never
/// goes through the spill file. As large as an SSH channel's window.
pub const WINDOW: u64 = 2 * 1024 * 1024 - 2 * CHUNK as u64;

/// A session id: 128 random bits, also the name of its rendezvous socket.
pub type SessionId = [u8; 16];

/// Names the sshshim instance (machine, profiles file, profile) whose
/// sessions a helper holds, so a restarted sshshim can end its
/// predecessor's sessions. Not a secret.
pub type Owner = [u8; 16];

/// One run of an sshshim process.
pub type Run = [u8; 16];

/// The secret that lets only the sshshim that started a session resume
/// it. Wiped when dropped; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; 32]);

impl Secret {
    /// A new random secret.
    pub fn random() -> Secret {
        Secret(rand::random())
    }

    /// Compares in constant time.
    pub fn matches(&self, other: &Secret) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Which byte stream a data frame belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The command's stdin (client to helper).
    Stdin = 0,
    /// Its stdout, or the pty's output.
    Stdout = 1,
    /// Its stderr (SSH extended data 1); never with a pty.
    Stderr = 2,
}

impl Stream {
    /// From the tag byte.
    fn from_u8(b: u8) -> Result<Stream, WireError> {
        match b {
            0 => Ok(Stream::Stdin),
            1 => Ok(Stream::Stdout),
            2 => Ok(Stream::Stderr),
            _ => Err(WireError::Malformed("unknown stream")),
        }
    }
}

/// What the session runs, as the client asked sshd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `shell`: the user's login shell.
    Shell,
    /// `exec`: the command line, run by the user's shell with `-c`.
    Exec(Vec<u8>),
    /// `subsystem`: its name (the helper finds the program sshd names).
    Subsystem(String),
    /// No command: the helper carries forwarded TCP connections
    /// ([`Frame::Conn`]) and holds them while sshshim is away.
    Forwards,
}

/// A pty the helper allocates for the command (sshd never gets a
/// `pty-req` on the helper's channel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtySpec {
    /// TERM.
    pub term: String,
    /// Size in characters.
    pub cols: u32,
    /// Size in rows.
    pub rows: u32,
    /// Width in pixels.
    pub px: u32,
    /// Height in pixels.
    pub py: u32,
    /// Terminal modes as SSH encodes them (RFC 4254 8): opcode, value.
    pub modes: Vec<(u8, u32)>,
}

/// Starts a fresh session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartSpec {
    /// Needed to resume it.
    pub secret: Secret,
    /// See [`Owner`].
    pub owner: Owner,
    /// See [`Run`].
    pub run: Run,
    /// What to run.
    pub command: Command,
    /// With a pty, if asked.
    pub pty: Option<PtySpec>,
    /// How long the helper holds the session with no sshshim attached.
    pub timeout_secs: u32,
    /// Bytes buffered per output stream before the helper stops reading
    /// the command (which then blocks, as on a slow reader).
    pub buffer: u32,
}

/// How the command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status.
    Status(u32),
    /// Killed by this signal (SSH name, without `SIG`).
    Signal {
        /// e.g. `TERM`.
        name: String,
        /// Whether it dumped core.
        core_dumped: bool,
    },
}

/// A protocol frame. Directions: `->` client to helper, `<-` back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// `<-` first frame on every attachment.
    Hello {
        /// The helper's protocol version.
        version: u32,
        /// The session this attachment reaches.
        session: SessionId,
        /// A new session waiting for [`Frame::Start`] (else it waits for
        /// [`Frame::Resume`]).
        fresh: bool,
    },
    /// `->` start the command.
    Start(Box<StartSpec>),
    /// `<-` the command runs.
    Started,
    /// `->` resume: the client has each output stream up to these offsets.
    Resume {
        /// Proves this is the sshshim that started the session.
        secret: Secret,
        /// Stdout bytes received so far.
        have_out: u64,
        /// Stderr bytes received so far.
        have_err: u64,
    },
    /// `<-` resumed: the helper has stdin up to this offset.
    Resumed {
        /// Stdin bytes received so far.
        have_in: u64,
    },
    /// `<-` refused (why); the helper closes the attachment after it.
    Refused(String),
    /// Bytes of a stream, starting at `offset`.
    Data {
        /// Which stream.
        stream: Stream,
        /// The offset of `data`'s first byte.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The receiver has a stream up to `upto`: the sender may drop it.
    Ack {
        /// Which stream.
        stream: Stream,
        /// Received up to here.
        upto: u64,
    },
    /// A stream ends at `at` (stdin `->`, stdout and stderr `<-`).
    Eof {
        /// Which stream.
        stream: Stream,
        /// Its final length.
        at: u64,
    },
    /// `->` the terminal's new size.
    Window {
        /// Characters.
        cols: u32,
        /// Rows.
        rows: u32,
        /// Pixels wide.
        px: u32,
        /// Pixels high.
        py: u32,
    },
    /// `->` a signal for the command (SSH name, without `SIG`).
    Signal(String),
    /// `<-` the command ended; sent after the output streams' EOF.
    Exit(Exit),
    /// `->` the client has everything, exit included: the helper ends.
    Done,
    /// `->` the local client is gone: end the command as sshd would.
    Hangup,
    /// `->` end this session if it is `owner`'s and not from `run`.
    Reap {
        /// The instance.
        owner: Owner,
        /// Its current run.
        run: Run,
    },
    /// Both ways, on a [`Command::Forwards`] helper: `frame` is about
    /// forwarded connection `conn` (numbered by the client). Never nested.
    Conn {
        /// The connection.
        conn: u32,
        /// What about it.
        frame: Box<Frame>,
    },
    /// `->` (in [`Frame::Conn`]) connect to `host`:`port`, as sshd's
    /// `direct-tcpip` would.
    Connect {
        /// Host name or address.
        host: String,
        /// Port.
        port: u32,
    },
    /// `<-` (in [`Frame::Conn`]) the connection could not be made: the
    /// SSH channel-open failure code (RFC 4254 5.1) and its reason.
    OpenFailed {
        /// e.g. 2, `SSH_OPEN_CONNECT_FAILED`.
        code: u32,
        /// e.g. "Connection refused".
        reason: String,
    },
    /// `<-` (in [`Frame::Conn`]) the target connection is over.
    Closed,
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A field is wrong.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    /// Longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes is too long")]
    TooLong(usize),
}

/// Frame tags.
mod tag {
    pub const HELLO: u8 = 1;
    pub const START: u8 = 2;
    pub const STARTED: u8 = 3;
    pub const RESUME: u8 = 4;
    pub const RESUMED: u8 = 5;
    pub const REFUSED: u8 = 6;
    pub const DATA: u8 = 7;
    pub const ACK: u8 = 8;
    pub const EOF: u8 = 9;
    pub const WINDOW: u8 = 10;
    pub const SIGNAL: u8 = 11;
    pub const EXIT: u8 = 12;
    pub const DONE: u8 = 13;
    pub const HANGUP: u8 = 14;
    pub const REAP: u8 = 15;
    pub const CONN: u8 = 16;
    pub const CONNECT: u8 = 17;
    pub const OPEN_FAILED: u8 = 18;
    pub const CLOSED: u8 = 19;
}

/// Appends a length-prefixed byte string.
fn put_bytes(b: &mut BytesMut, s: &[u8]) {
    b.put_u32(s.len() as u32);
    b.put_slice(s);
}

impl Frame {
    /// Appends the encoded frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0);
        match self {
            Frame::Hello {
                version,
                session,
                fresh,
            } => {
                out.put_u8(tag::HELLO);
                out.put_u32(*version);
                out.put_slice(session);
                out.put_u8(*fresh as u8);
            }
            Frame::Start(s) => {
                out.put_u8(tag::START);
                encode_start(s, out);
            }
            Frame::Started => out.put_u8(tag::STARTED),
            Frame::Resume {
                secret,
                have_out,
                have_err,
            } => {
                out.put_u8(tag::RESUME);
                out.put_slice(&secret.0);
                out.put_u64(*have_out);
                out.put_u64(*have_err);
            }
            Frame::Resumed { have_in } => {
                out.put_u8(tag::RESUMED);
                out.put_u64(*have_in);
            }
            Frame::Refused(why) => {
                out.put_u8(tag::REFUSED);
                put_bytes(out, why.as_bytes());
            }
            Frame::Data {
                stream,
                offset,
                data,
            } => {
                // The header's own length prefix is rewritten below.
                out.put_slice(&data_header(*stream, *offset, data.len())[4..]);
                out.put_slice(data);
            }
            Frame::Ack { stream, upto } => {
                out.put_u8(tag::ACK);
                out.put_u8(*stream as u8);
                out.put_u64(*upto);
            }
            Frame::Eof { stream, at } => {
                out.put_u8(tag::EOF);
                out.put_u8(*stream as u8);
                out.put_u64(*at);
            }
            Frame::Window { cols, rows, px, py } => {
                out.put_u8(tag::WINDOW);
                for v in [cols, rows, px, py] {
                    out.put_u32(*v);
                }
            }
            Frame::Signal(name) => {
                out.put_u8(tag::SIGNAL);
                put_bytes(out, name.as_bytes());
            }
            Frame::Exit(e) => encode_exit(e, out),
            Frame::Done => out.put_u8(tag::DONE),
            Frame::Hangup => out.put_u8(tag::HANGUP),
            Frame::Reap { owner, run } => {
                out.put_u8(tag::REAP);
                out.put_slice(owner);
                out.put_slice(run);
            }
            Frame::Conn { .. }
            | Frame::Connect { .. }
            | Frame::OpenFailed { .. }
            | Frame::Closed => encode_forwarding(self, out),
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded frame as bytes.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    /// Takes one whole frame off the front of `buf`: `Ok(None)` when more
    /// bytes are needed.
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_FRAME + 64 {
            return Err(WireError::TooLong(len));
        }
        if buf.len() < 4 + len {
            return Ok(None);
        }
        buf.advance(4);
        let mut body = buf.split_to(len).freeze();
        let frame = parse(&mut body)?;
        if body.has_remaining() {
            return Err(WireError::Malformed("trailing bytes"));
        }
        Ok(Some(frame))
    }
}

impl StartSpec {
    /// The spec as one command-line argument for `remote-helper start`, so
    /// the helper starts the command without waiting for a frame: sshd
    /// opens a session channel's window only once the exec runs, so a
    /// `Start` frame would cost a round trip more. The secret is left out
    /// (zeros): it follows in the `Start` frame, never on a command line.
    pub fn to_arg(&self) -> String {
        let mut b = BytesMut::new();
        Frame::Start(Box::new(StartSpec {
            secret: Secret([0; 32]),
            ..self.clone()
        }))
        .encode(&mut b);
        hex(&b)
    }

    /// The spec from [`StartSpec::to_arg`]'s text; its secret is zeros.
    pub fn from_arg(arg: &str) -> Result<StartSpec, WireError> {
        let bytes = unhex(arg).ok_or(WireError::Malformed("not hexadecimal"))?;
        match Frame::decode(&mut BytesMut::from(&bytes[..]))? {
            Some(Frame::Start(spec)) => Ok(*spec),
            _ => Err(WireError::Malformed("not a start spec")),
        }
    }
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hexadecimal; `None` for anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Bytes of a data frame before its data.
pub const DATA_HEADER: usize = 18;

/// A data frame's header for `len` bytes of `stream` at `offset`: sent
/// before the data itself, a frame is written without copying the data.
pub fn data_header(stream: Stream, offset: u64, len: usize) -> [u8; DATA_HEADER] {
    let mut h = [0u8; DATA_HEADER];
    h[..4].copy_from_slice(&((DATA_HEADER - 4 + len) as u32).to_be_bytes());
    h[4] = tag::DATA;
    h[5] = stream as u8;
    h[6..14].copy_from_slice(&offset.to_be_bytes());
    h[14..].copy_from_slice(&(len as u32).to_be_bytes());
    h
}

/// The fields of an `Exit` frame.
fn encode_exit(e: &Exit, out: &mut BytesMut) {
    out.put_u8(tag::EXIT);
    match e {
        Exit::Status(s) => {
            out.put_u8(0);
            out.put_u32(*s);
        }
        Exit::Signal { name, core_dumped } => {
            out.put_u8(1);
            out.put_u8(*core_dumped as u8);
            put_bytes(out, name.as_bytes());
        }
    }
}

/// The frames of a [`Command::Forwards`] helper.
fn encode_forwarding(f: &Frame, out: &mut BytesMut) {
    match f {
        Frame::Conn { conn, frame } => {
            out.put_u8(tag::CONN);
            out.put_u32(*conn);
            frame.encode(out);
        }
        Frame::Connect { host, port } => {
            out.put_u8(tag::CONNECT);
            put_bytes(out, host.as_bytes());
            out.put_u32(*port);
        }
        Frame::OpenFailed { code, reason } => {
            out.put_u8(tag::OPEN_FAILED);
            out.put_u32(*code);
            put_bytes(out, reason.as_bytes());
        }
        Frame::Closed => out.put_u8(tag::CLOSED),
        _ => unreachable!("not a forwarding frame"),
    }
}

/// The fields of a `Start` frame.
fn encode_start(s: &StartSpec, out: &mut BytesMut) {
    out.put_slice(&s.secret.0);
    out.put_slice(&s.owner);
    out.put_slice(&s.run);
    match &s.command {
        Command::Shell => out.put_u8(0),
        Command::Exec(c) => {
            out.put_u8(1);
            put_bytes(out, c);
        }
        Command::Subsystem(n) => {
            out.put_u8(2);
            put_bytes(out, n.as_bytes());
        }
        Command::Forwards => out.put_u8(3),
    }
    match &s.pty {
        None => out.put_u8(0),
        Some(p) => {
            out.put_u8(1);
            put_bytes(out, p.term.as_bytes());
            for v in [p.cols, p.rows, p.px, p.py] {
                out.put_u32(v);
            }
            out.put_u32(p.modes.len() as u32);
            for (op, v) in &p.modes {
                out.put_u8(*op);
                out.put_u32(*v);
            }
        }
    }
    out.put_u32(s.timeout_secs);
    out.put_u32(s.buffer);
}

/// Reads fields off a frame body.
struct Fields<'a>(&'a mut Bytes);

impl Fields<'_> {
    /// Fails unless `n` bytes remain.
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.0.remaining() < n {
            Err(WireError::Malformed("truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Malformed("bad flag")),
        }
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.need(N)?;
        let mut a = [0u8; N];
        self.0.copy_to_slice(&mut a);
        Ok(a)
    }
    fn bytes(&mut self) -> Result<Bytes, WireError> {
        let n = self.u32()? as usize;
        self.need(n)?;
        Ok(self.0.split_to(n))
    }
    fn string(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| WireError::Malformed("not UTF-8"))
    }
}

/// Parses a frame body.
fn parse(body: &mut Bytes) -> Result<Frame, WireError> {
    let mut f = Fields(body);
    Ok(match f.u8()? {
        tag::HELLO => Frame::Hello {
            version: f.u32()?,
            session: f.array()?,
            fresh: f.bool()?,
        },
        tag::START => Frame::Start(Box::new(parse_start(&mut f)?)),
        tag::STARTED => Frame::Started,
        tag::RESUME => Frame::Resume {
            secret: Secret(f.array()?),
            have_out: f.u64()?,
            have_err: f.u64()?,
        },
        tag::RESUMED => Frame::Resumed { have_in: f.u64()? },
        tag::REFUSED => Frame::Refused(f.string()?),
        tag::DATA => Frame::Data {
            stream: Stream::from_u8(f.u8()?)?,
            offset: f.u64()?,
            data: f.bytes()?,
        },
        tag::ACK => Frame::Ack {
            stream: Stream::from_u8(f.u8()?)?,
            upto: f.u64()?,
        },
        tag::EOF => Frame::Eof {
            stream: Stream::from_u8(f.u8()?)?,
            at: f.u64()?,
        },
        tag::WINDOW => Frame::Window {
            cols: f.u32()?,
            rows: f.u32()?,
            px: f.u32()?,
            py: f.u32()?,
        },
        tag::SIGNAL => Frame::Signal(f.string()?),
        tag::EXIT => match f.u8()? {
            0 => Frame::Exit(Exit::Status(f.u32()?)),
            1 => {
                let core_dumped = f.bool()?;
                Frame::Exit(Exit::Signal {
                    name: f.string()?,
                    core_dumped,
                })
            }
            _ => return Err(WireError::Malformed("unknown exit kind")),
        },
        tag::DONE => Frame::Done,
        tag::HANGUP => Frame::Hangup,
        tag::REAP => Frame::Reap {
            owner: f.array()?,
            run: f.array()?,
        },
        t @ (tag::CONN | tag::CONNECT | tag::OPEN_FAILED | tag::CLOSED) => {
            parse_forwarding(t, &mut f)?
        }
        _ => return Err(WireError::Malformed("unknown frame")),
    })
}

/// Parses a `Start` frame's fields.
fn parse_start(f: &mut Fields<'_>) -> Result<StartSpec, WireError> {
    let secret = Secret(f.array()?);
    let owner = f.array()?;
    let run = f.array()?;
    let command = match f.u8()? {
        0 => Command::Shell,
        1 => Command::Exec(f.bytes()?.to_vec()),
        2 => Command::Subsystem(f.string()?),
        3 => Command::Forwards,
        _ => return Err(WireError::Malformed("unknown command kind")),
    };
    let pty = if f.bool()? {
        let term = f.string()?;
        let (cols, rows, px, py) = (f.u32()?, f.u32()?, f.u32()?, f.u32()?);
        let n = f.u32()? as usize;
        f.need(n.saturating_mul(5))?;
        let mut modes = Vec::with_capacity(n);
        for _ in 0..n {
            modes.push((f.u8()?, f.u32()?));
        }
        Some(PtySpec {
            term,
            cols,
            rows,
            px,
            py,
            modes,
        })
    } else {
        None
    };
    Ok(StartSpec {
        secret,
        owner,
        run,
        command,
        pty,
        timeout_secs: f.u32()?,
        buffer: f.u32()?,
    })
}

/// Parses the fields of a [`Command::Forwards`] helper's frame `t`.
fn parse_forwarding(t: u8, f: &mut Fields<'_>) -> Result<Frame, WireError> {
    Ok(match t {
        tag::CONN => {
            let conn = f.u32()?;
            let len = f.u32()? as usize;
            f.need(len)?;
            let mut inner = f.0.split_to(len);
            let frame = parse(&mut inner)?;
            if inner.has_remaining() {
                return Err(WireError::Malformed("trailing bytes"));
            }
            if matches!(frame, Frame::Conn { .. }) {
                return Err(WireError::Malformed("nested connection frame"));
            }
            Frame::Conn {
                conn,
                frame: Box::new(frame),
            }
        }
        tag::CONNECT => Frame::Connect {
            host: f.string()?,
            port: f.u32()?,
        },
        tag::OPEN_FAILED => Frame::OpenFailed {
            code: f.u32()?,
            reason: f.string()?,
        },
        tag::CLOSED => Frame::Closed,
        _ => return Err(WireError::Malformed("unknown frame")),
    })
}

/// The sending side of one stream: bytes not yet acknowledged, kept for
/// replay, and how far they have been sent on the current attachment.
#[derive(Debug, Default)]
pub struct Outbox {
    /// Offset of `buf`'s first byte (everything before is acknowledged).
    base: u64,
    /// Unacknowledged bytes, in chunks.
    buf: VecDeque<Bytes>,
    /// Bytes in `buf`.
    len: usize,
    /// Offset up to which `buf` went out on the current attachment.
    sent: u64,
    /// The stream's end, once the writer closed it.
    eof: bool,
}

impl Outbox {
    /// Appends bytes to send.
    pub fn push(&mut self, data: Bytes) {
        if !data.is_empty() {
            self.len += data.len();
            self.buf.push_back(data);
        }
    }

    /// Marks the stream's end (after everything pushed).
    pub fn close(&mut self) {
        self.eof = true;
    }

    /// Whether the stream was closed.
    pub fn is_closed(&self) -> bool {
        self.eof
    }

    /// The offset just past the last byte pushed: the final length once closed.
    pub fn end(&self) -> u64 {
        self.base + self.len as u64
    }

    /// Bytes kept for replay.
    pub fn buffered(&self) -> usize {
        self.len
    }

    /// Bytes not yet sent on the current attachment.
    pub fn unsent(&self) -> u64 {
        self.end() - self.sent
    }

    /// Bytes sent and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.sent - self.base
    }

    /// Whether everything pushed was acknowledged.
    pub fn all_acked(&self) -> bool {
        self.len == 0
    }

    /// Drops what the peer has up to `upto`. An offset beyond what was
    /// pushed is a protocol error.
    pub fn ack(&mut self, upto: u64) -> Result<(), WireError> {
        if upto > self.end() {
            return Err(WireError::Malformed("ack beyond the data sent"));
        }
        while upto > self.base {
            let Some(front) = self.buf.front_mut() else {
                break;
            };
            let drop = ((upto - self.base) as usize).min(front.len());
            if drop == front.len() {
                self.buf.pop_front();
            } else {
                front.advance(drop);
            }
            self.base += drop as u64;
            self.len -= drop;
        }
        self.sent = self.sent.max(self.base);
        Ok(())
    }

    /// A new attachment: the peer has the stream up to `have` (which also
    /// acknowledges it), so sending restarts there.
    pub fn rewind(&mut self, have: u64) -> Result<(), WireError> {
        if have < self.base {
            return Err(WireError::Malformed("peer lost acknowledged data"));
        }
        self.ack(have)?;
        self.sent = have;
        Ok(())
    }

    /// The next chunk to send (at most [`CHUNK`] bytes) with its offset,
    /// marked as sent; `None` when everything went out.
    pub fn next_chunk(&mut self) -> Option<(u64, Bytes)> {
        let mut skip = (self.sent - self.base) as usize;
        for chunk in &self.buf {
            if skip >= chunk.len() {
                skip -= chunk.len();
                continue;
            }
            let end = (skip + CHUNK).min(chunk.len());
            let out = chunk.slice(skip..end);
            let offset = self.sent;
            self.sent += out.len() as u64;
            return Some((offset, out));
        }
        None
    }

    /// Whether the EOF is due now: closed, and every byte went out on this
    /// attachment.
    pub fn eof_due(&self) -> bool {
        self.eof && self.sent == self.end()
    }
}

/// The receiving side of one stream: how far it got, so duplicates from
/// a replay are dropped.
#[derive(Debug, Default, Clone, Copy)]
pub struct Inbox {
    /// Bytes received (the offset expected next).
    pub have: u64,
    /// Acknowledged up to here.
    pub acked: u64,
}

impl Inbox {
    /// Takes a data frame: returns the part not seen before. A gap (data
    /// starting beyond what we have) is a protocol error.
    pub fn accept(&mut self, offset: u64, mut data: Bytes) -> Result<Bytes, WireError> {
        if offset > self.have {
            return Err(WireError::Malformed("data skips ahead"));
        }
        let seen = ((self.have - offset) as usize).min(data.len());
        data.advance(seen);
        self.have += data.len() as u64;
        Ok(data)
    }

    /// The acknowledgement to send now, if any: up to `limit` (what the
    /// local side took, or all received), never beyond what was received.
    pub fn take_ack(&mut self, limit: u64) -> Option<u64> {
        let upto = limit.min(self.have);
        (upto > self.acked).then(|| {
            self.acked = upto;
            upto
        })
    }

    /// Bytes that [`Inbox::take_ack`] with `limit` would acknowledge.
    pub fn ackable(&self, limit: u64) -> u64 {
        limit.min(self.have).saturating_sub(self.acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(f: Frame) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        f.encode(&mut b);
        let one = Frame::decode(&mut b).unwrap().unwrap();
        let two = Frame::decode(&mut b).unwrap().unwrap();
        assert_eq!(one, f);
        assert_eq!(two, f);
        assert!(b.is_empty());
    }

    #[test]
    fn a_data_header_and_its_data_are_the_encoded_frame() {
        let data = Bytes::from_static(b"some output");
        let mut sent = data_header(Stream::Stdout, 1 << 33, data.len()).to_vec();
        sent.extend_from_slice(&data);
        let f = Frame::Data {
            stream: Stream::Stdout,
            offset: 1 << 33,
            data,
        };
        assert_eq!(sent, f.to_bytes());
        let mut buf = BytesMut::from(&sent[..]);
        assert_eq!(Frame::decode(&mut buf), Ok(Some(f)));
    }

    #[test]
    fn every_frame_round_trips() {
        let spec = StartSpec {
            secret: Secret([7; 32]),
            owner: [1; 16],
            run: [2; 16],
            command: Command::Exec(b"echo hi".to_vec()),
            pty: Some(PtySpec {
                term: "xterm".into(),
                cols: 80,
                rows: 24,
                px: 0,
                py: 0,
                modes: vec![(53, 1), (128, 38400)],
            }),
            timeout_secs: 600,
            buffer: 4 << 20,
        };
        for f in [
            Frame::Hello {
                version: VERSION,
                session: [9; 16],
                fresh: true,
            },
            Frame::Start(Box::new(spec.clone())),
            Frame::Start(Box::new(StartSpec {
                command: Command::Subsystem("sftp".into()),
                pty: None,
                ..spec.clone()
            })),
            Frame::Start(Box::new(StartSpec {
                command: Command::Forwards,
                pty: None,
                ..spec.clone()
            })),
            Frame::Start(Box::new(StartSpec {
                command: Command::Shell,
                ..spec
            })),
            Frame::Started,
            Frame::Resume {
                secret: Secret([3; 32]),
                have_out: 5,
                have_err: u64::MAX,
            },
            Frame::Resumed { have_in: 77 },
            Frame::Refused("no".into()),
            Frame::Data {
                stream: Stream::Stderr,
                offset: 1 << 40,
                data: Bytes::from_static(b"abc"),
            },
            Frame::Ack {
                stream: Stream::Stdin,
                upto: 3,
            },
            Frame::Eof {
                stream: Stream::Stdout,
                at: 9,
            },
            Frame::Window {
                cols: 1,
                rows: 2,
                px: 3,
                py: 4,
            },
            Frame::Signal("INT".into()),
            Frame::Exit(Exit::Status(7)),
            Frame::Exit(Exit::Signal {
                name: "TERM".into(),
                core_dumped: true,
            }),
            Frame::Done,
            Frame::Hangup,
            Frame::Conn {
                conn: 9,
                frame: Box::new(Frame::Data {
                    stream: Stream::Stdout,
                    offset: 5,
                    data: Bytes::from_static(b"down"),
                }),
            },
            Frame::Conn {
                conn: 3,
                frame: Box::new(Frame::Connect {
                    host: "localhost".into(),
                    port: 5432,
                }),
            },
            Frame::Conn {
                conn: 3,
                frame: Box::new(Frame::OpenFailed {
                    code: 2,
                    reason: "Connection refused".into(),
                }),
            },
            Frame::Conn {
                conn: u32::MAX,
                frame: Box::new(Frame::Closed),
            },
            Frame::Reap {
                owner: [4; 16],
                run: [5; 16],
            },
        ] {
            round_trip(f);
        }
    }

    #[test]
    fn a_start_spec_goes_on_the_command_line_without_its_secret() {
        let spec = StartSpec {
            secret: Secret([7; 32]),
            owner: [1; 16],
            run: [2; 16],
            command: Command::Exec(b"printf '%s' \"$HOME\"".to_vec()),
            pty: None,
            timeout_secs: 600,
            buffer: 4 << 20,
        };
        let arg = spec.to_arg();
        assert!(arg.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!arg.contains(&hex(&[7; 32])));
        let back = StartSpec::from_arg(&arg).unwrap();
        assert_eq!(back.secret, Secret([0; 32]));
        assert_eq!(
            StartSpec {
                secret: Secret([7; 32]),
                ..back
            },
            spec
        );
        assert!(StartSpec::from_arg("zz").is_err());
        assert!(StartSpec::from_arg(&hex(&Frame::Done.to_bytes())).is_err());
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let full = Frame::Signal("HUP".into()).to_bytes();
        for cut in 0..full.len() {
            let mut b = BytesMut::from(&full[..cut]);
            assert_eq!(Frame::decode(&mut b), Ok(None));
        }
    }

    #[test]
    fn outbox_replays_from_what_the_peer_has() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"hello "));
        o.push(Bytes::from_static(b"world"));
        assert_eq!(o.next_chunk(), Some((0, Bytes::from_static(b"hello "))));
        assert_eq!(o.next_chunk(), Some((6, Bytes::from_static(b"world"))));
        assert_eq!(o.next_chunk(), None);
        o.ack(3).unwrap();
        assert_eq!(o.buffered(), 8);
        // Reattached: the peer got up to 8 ("hello wo").
        o.rewind(8).unwrap();
        assert_eq!(o.next_chunk(), Some((8, Bytes::from_static(b"rld"))));
        assert!(
            o.rewind(2).is_err(),
            "acknowledged data cannot be asked again"
        );
        assert!(o.ack(12).is_err());
        o.close();
        assert!(o.eof_due());
        o.ack(11).unwrap();
        assert!(o.all_acked());
    }

    #[test]
    fn inbox_drops_duplicates_and_refuses_gaps() {
        let mut i = Inbox::default();
        assert_eq!(i.accept(0, Bytes::from_static(b"abc")).unwrap(), "abc");
        assert_eq!(i.accept(1, Bytes::from_static(b"bcde")).unwrap(), "de");
        assert_eq!(i.accept(0, Bytes::from_static(b"ab")).unwrap(), "");
        assert!(i.accept(9, Bytes::from_static(b"x")).is_err());
        // Never beyond what was received, nor twice.
        assert_eq!(i.ackable(3), 3);
        assert_eq!(i.take_ack(3), Some(3));
        assert_eq!(i.take_ack(3), None);
        assert_eq!(i.take_ack(u64::MAX), Some(5));
        assert_eq!(i.take_ack(u64::MAX), None);
        assert_eq!(i.ackable(u64::MAX), 0);
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut b = BytesMut::from(&data[..]);
            let _ = Frame::decode(&mut b);
        }

        /// Whatever the chunking, acks and reattachments, the receiver gets
        /// the stream exactly once, in order.
        #[test]
        fn replay_delivers_each_byte_once(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..50), 1..20),
            drops in proptest::collection::vec(any::<bool>(), 1..40),
        ) {
            let mut out = Outbox::default();
            let mut inb = Inbox::default();
            let mut got = Vec::new();
            let want: Vec<u8> = pieces.concat();
            for p in &pieces {
                out.push(Bytes::from(p.clone()));
            }
            let mut d = drops.iter().cycle();
            let mut dropped_last = false;
            while let Some((off, chunk)) = out.next_chunk() {
                // Never twice in a row, so the stream makes progress.
                if *d.next().unwrap() && !dropped_last {
                    dropped_last = true;
                    // The connection broke: this chunk never arrived.
                    out.rewind(inb.have).unwrap();
                    continue;
                }
                dropped_last = false;
                got.extend_from_slice(&inb.accept(off, chunk).unwrap());
                if let Some(a) = inb.take_ack(u64::MAX) {
                    out.ack(a).unwrap();
                }
            }
            prop_assert_eq!(got, want);
        }
    }
}

//! Control plane of a running profile: a private Unix socket per profile
//! (`sshshim status` / `sshshim down`), human and Prometheus renderings of
//! the status, a loopback-only HTTP metrics endpoint, and user event hooks.
//!
//! # Stable interface
//!
//! The JSON form of [`ProfileStatus`] (one line, as answered to `status` on
//! the control socket and as the array served on `GET /status`) is a stable
//! interface that scripts may rely on: fields are only ever added, never
//! renamed, removed or given a different meaning. String enumerations
//! (`upstream.state`, `forwards[].owner`, `forwards[].state`) may gain new
//! values, so consumers should tolerate unknown ones.
//!
//! The control socket speaks a one-shot line protocol: the client sends one
//! command line (`status` or `down`), the server answers one line and closes.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Upstream state of one profile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamStatus {
    /// One of "connecting", "connected", "reconnecting", "failed", "stopped".
    pub state: String,
    /// Unix seconds of the last state change.
    pub since: u64,
    /// Unix seconds of the next connection attempt, when reconnecting.
    pub next_attempt: Option<u64>,
    /// Number of the current (re)connection attempt, when reconnecting.
    pub attempt: Option<u32>,
    /// Most recent upstream error, kept after recovery so it can be diagnosed.
    pub last_error: Option<String>,
    /// Successful reconnections since the profile started.
    pub reconnects: u64,
    /// Last measured round-trip time to the server, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// The server's SSH identification string.
    pub server_version: Option<String>,
    /// Upstream connections open (more than 1 once MaxSessions is exceeded).
    pub connections: usize,
}

/// One forward.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ForwardStatus {
    /// e.g. "-R 2222:localhost:22", or "-R localhost:8080" for a client-requested one.
    pub spec: String,
    /// "sshshim" (configured in the profile) or "client" (requested by a local client).
    pub owner: String,
    /// One of "active", "pending", "retrying".
    pub state: String,
    /// Port actually bound (matters when 0 was requested).
    pub bound_port: Option<u16>,
    /// Why the forward is not active, if known.
    pub error: Option<String>,
}

/// Everything `sshshim status` shows for one profile.
///
/// Its JSON serialisation is a **stable interface** (see the module docs):
/// fields may be added but are never renamed, removed or repurposed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileStatus {
    /// Profile name.
    pub profile: String,
    /// Process id of the sshshim serving the profile.
    pub pid: u32,
    /// Upstream destination as user@host:port.
    pub destination: String,
    /// Local SSH endpoint ("127.0.0.1:2222"), or None when the profile serves none.
    pub endpoint: Option<String>,
    /// State of the upstream connection.
    pub upstream: UpstreamStatus,
    /// Local SSH clients currently connected to the endpoint.
    pub local_clients: usize,
    /// Open channels by kind: "session", "direct-tcpip", "forwarded-tcpip", ...
    pub channels: BTreeMap<String, usize>,
    /// Configured and client-requested forwards.
    pub forwards: Vec<ForwardStatus>,
    /// Bytes from upstream to local.
    pub bytes_in: u64,
    /// Bytes from local to upstream.
    pub bytes_out: u64,
}

/// Implemented by a running profile.
pub trait StatusSource: Send + Sync {
    /// Current status; called once per `status` request, so it should be cheap.
    fn snapshot(&self) -> ProfileStatus;
    /// Asks the profile to stop gracefully (`sshshim down NAME`).
    fn stop(&self);
}

/// Overall bound on a client round trip, so a wedged profile cannot hang the CLI.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the server waits for a client's command line; bounds idle connections.
const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest command line accepted; real commands are a few bytes.
const MAX_COMMAND: u64 = 1024;
/// Longest reply a client accepts; guards against a misbehaving peer.
const MAX_REPLY: u64 = 16 << 20;
/// Largest HTTP request head accepted by the metrics endpoint.
const MAX_HTTP_HEAD: usize = 8 * 1024;
/// Concurrent metrics connections; keeps a local misbehaving scraper from exhausting fds.
const MAX_HTTP_CONNS: usize = 64;
/// Default minimum interval between two runs of a hook for the same (profile, event).
const DEFAULT_HOOK_INTERVAL: Duration = Duration::from_secs(60);

/// Our effective uid, the owner required of the socket dir and of control peers.
fn our_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Current time in unix seconds (0 if the clock is before 1970).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Directory of control sockets: $XDG_RUNTIME_DIR/sshshim (created 0700), else
/// /tmp/sshshim-<uid> (created 0700). Refuses a directory that is not owned by
/// us or is group/other accessible, since anyone who can write there could
/// plant a socket that impersonates a profile.
pub fn socket_dir() -> io::Result<PathBuf> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    socket_dir_in(runtime.as_deref(), Path::new("/tmp"), our_uid())
}

/// [`socket_dir`] with its inputs explicit, so it can be tested without
/// touching the process environment.
fn socket_dir_in(runtime: Option<&Path>, tmp: &Path, uid: u32) -> io::Result<PathBuf> {
    // The XDG spec requires an absolute path; a relative one would depend on
    // the cwd and make client and server disagree.
    let dir = match runtime.filter(|p| p.is_absolute()) {
        Some(rt) => rt.join("sshshim"),
        None => tmp.join(format!("sshshim-{uid}")),
    };
    ensure_private_dir(&dir, uid)?;
    Ok(dir)
}

/// Creates `dir` with mode 0700 if missing, then verifies it is a real
/// directory (not a symlink), owned by `uid` and not group/other accessible.
fn ensure_private_dir(dir: &Path, uid: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create control directory {}: {e}", dir.display()),
            ));
        }
    }
    // symlink_metadata: in a shared /tmp another user could pre-create a
    // symlink to a directory they control.
    let meta = std::fs::symlink_metadata(dir)?;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing to use control directory {}: {why}", dir.display()),
        ))
    };
    if !meta.file_type().is_dir() {
        return refuse("it is not a directory (a symlink or file is in the way)".into());
    }
    if meta.uid() != uid {
        return refuse(format!(
            "it is owned by uid {} instead of us (uid {uid}); another user may have created it",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return refuse(format!(
            "its mode is {mode:03o}, so other users can reach it; run `chmod 700 {}`",
            dir.display()
        ));
    }
    Ok(())
}

/// Maps a profile name onto [A-Za-z0-9._-] so it is a safe single path component.
fn sanitize_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // An empty name would give a hidden ".sock" that `running` could not name.
    if s.is_empty() { "_".into() } else { s }
}

/// Socket path for a profile: socket_dir()/NAME.sock (NAME sanitised to [A-Za-z0-9._-]).
pub fn socket_path(name: &str) -> io::Result<PathBuf> {
    Ok(socket_path_in(&socket_dir()?, name))
}

/// [`socket_path`] within an explicit directory.
fn socket_path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{}.sock", sanitize_name(name)))
}

/// Removes the socket file when the server ends, however it ends, but only if
/// the file is still the one we bound (a successor may have replaced it).
struct SocketGuard {
    /// Path of the bound socket.
    path: PathBuf,
    /// (dev, ino) of the socket file right after bind.
    id: Option<(u64, u64)>,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let current = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if current.is_some() && current == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What was found at a socket path before binding.
enum Existing {
    /// Nothing there.
    Absent,
    /// A socket file nobody listens on (left by a crashed process).
    Stale,
    /// A live server, with its pid if it answered `status`.
    Live(Option<u32>),
}

/// Probes `path` to decide whether it may be replaced.
async fn probe_existing(path: &Path) -> io::Result<Existing> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        // Never delete something that is not ours to delete.
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not removing it",
                path.display()
            ),
        ));
    }
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(Existing::Stale),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(e),
    };
    // Something listens: ask for its status only to report its pid.
    let ask = async {
        stream.write_all(b"status\n").await?;
        let mut line = String::new();
        tokio::io::BufReader::new(&mut stream)
            .take(MAX_REPLY)
            .read_line(&mut line)
            .await?;
        io::Result::Ok(serde_json::from_str::<ProfileStatus>(line.trim()).ok())
    };
    let pid = match tokio::time::timeout(CLIENT_TIMEOUT, ask).await {
        Ok(Ok(status)) => status.map(|s| s.pid),
        _ => None,
    };
    Ok(Existing::Live(pid))
}

/// Serves the control socket for one profile until `shutdown`.
///
/// Binds socket_path(NAME), removing a stale socket file only if nothing
/// answers on it (if a live process answers, fails with "profile NAME is
/// already running (pid N)"), makes it 0600, and for each connection from our
/// own uid reads one line: "status" -> one JSON line of [`ProfileStatus`];
/// "down" -> calls [`StatusSource::stop`] and replies "ok"; anything else ->
/// "error: unknown command". Removes the socket file on exit.
pub async fn serve(
    name: String,
    source: Arc<dyn StatusSource>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let path = socket_path(&name)?;
    serve_at(&path, &name, source, shutdown).await
}

/// [`serve`] on an explicit socket path.
async fn serve_at(
    path: &Path,
    name: &str,
    source: Arc<dyn StatusSource>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    match probe_existing(path).await? {
        Existing::Absent => {}
        Existing::Stale => {
            tracing::debug!(path = %path.display(), "removing stale control socket");
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Existing::Live(pid) => {
            let pid = pid.map_or_else(|| "unknown".to_string(), |p| p.to_string());
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("profile {name} is already running (pid {pid})"),
            ));
        }
    }
    let listener = UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot bind control socket {}: {e}", path.display()),
        )
    })?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
        id: std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino())),
    };
    // The directory is already 0700, so the window before this chmod is not
    // reachable by others; the chmod is defence in depth.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;

    let uid = our_uid();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Transient (e.g. EMFILE): back off rather than spin or die.
                        tracing::warn!("control socket accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                conns.spawn(handle_control(stream, uid, source.clone()));
            }
        }
    }
    // Dropping the JoinSet aborts in-flight handlers, then the guard unlinks.
    drop(conns);
    drop(guard);
    Ok(())
}

/// Handles one control connection: checks the peer, answers one command.
async fn handle_control(mut stream: UnixStream, uid: u32, source: Arc<dyn StatusSource>) {
    // Only our own uid may read status or stop us; the 0700 dir already
    // ensures that, this guards against a misconfigured or shared dir.
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == uid => {}
        Ok(cred) => {
            tracing::warn!(
                peer_uid = cred.uid(),
                "rejected control connection from another uid"
            );
            return;
        }
        Err(e) => {
            tracing::warn!("cannot check control peer credentials: {e}");
            return;
        }
    }
    let mut line = String::new();
    let read = async {
        let mut reader = tokio::io::BufReader::new(&mut stream).take(MAX_COMMAND);
        reader.read_line(&mut line).await
    };
    match tokio::time::timeout(SERVER_READ_TIMEOUT, read).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let reply = match line.trim() {
        "status" => match serde_json::to_string(&source.snapshot()) {
            Ok(json) => json,
            Err(e) => format!("error: cannot encode status: {e}"),
        },
        "down" => {
            source.stop();
            "ok".to_string()
        }
        _ => "error: unknown command".to_string(),
    };
    let write = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(b"\n").await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(SERVER_READ_TIMEOUT, write).await;
}

/// Sends one command to the socket at `path` and returns the reply line,
/// all within `timeout`. Error text is user-facing.
fn request_at(path: &Path, name: &str, cmd: &str, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(format!("no running sshshim for profile {name}"));
        }
        Err(e) => return Err(format!("cannot connect to profile {name}: {e}")),
    };
    let timed_out = || {
        format!(
            "profile {name} did not answer within {}s",
            timeout.as_secs()
        )
    };
    let io_err = |e: io::Error| {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            timed_out()
        } else {
            format!("talking to profile {name}: {e}")
        }
    };
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream
        .write_all(format!("{cmd}\n").as_bytes())
        .map_err(io_err)?;
    // Per-read timeouts are re-armed from the deadline so the whole exchange,
    // not each read, is bounded.
    let mut reader = io::BufReader::new(&stream).take(MAX_REPLY);
    let mut reply = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        reader
            .get_ref()
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(io_err)?;
        let n = reader.read_until(b'\n', &mut reply).map_err(io_err)?;
        if n == 0 || reply.ends_with(b"\n") {
            break;
        }
    }
    let reply = String::from_utf8_lossy(&reply).trim().to_string();
    if reply.is_empty() {
        return Err(format!(
            "profile {name} closed the control connection without answering"
        ));
    }
    if let Some(msg) = reply.strip_prefix("error:") {
        return Err(format!("profile {name}: {}", msg.trim()));
    }
    Ok(reply)
}

/// [`query`] against an explicit socket path.
fn query_at(path: &Path, name: &str) -> Result<ProfileStatus, String> {
    let reply = request_at(path, name, "status", CLIENT_TIMEOUT)?;
    serde_json::from_str(&reply).map_err(|e| format!("profile {name} sent an invalid status: {e}"))
}

/// [`down`] against an explicit socket path.
fn down_at(path: &Path, name: &str) -> Result<(), String> {
    match request_at(path, name, "down", CLIENT_TIMEOUT)?.as_str() {
        "ok" => Ok(()),
        other => Err(format!("profile {name} did not acknowledge down: {other}")),
    }
}

/// The socket of profile `name`, for a client. A control directory that
/// cannot exist (say $XDG_RUNTIME_DIR points nowhere) means nothing runs.
fn client_socket_path(name: &str) -> Result<PathBuf, String> {
    socket_path(name).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("no running sshshim for profile {name}"),
        _ => e.to_string(),
    })
}

/// Client side: queries one profile (bounded by a 3 s timeout). Fails with
/// "no running sshshim for profile NAME" when the socket is absent or refused.
pub fn query(name: &str) -> Result<ProfileStatus, String> {
    let path = client_socket_path(name)?;
    query_at(&path, name)
}

/// Sends "down" to one profile; Ok when acknowledged.
pub fn down(name: &str) -> Result<(), String> {
    let path = client_socket_path(name)?;
    down_at(&path, name)
}

/// Names of profiles with a socket in socket_dir() that answer (stale sockets ignored).
pub fn running() -> Vec<String> {
    match socket_dir() {
        Ok(dir) => running_in(&dir),
        Err(e) => {
            tracing::debug!("no control directory: {e}");
            Vec::new()
        }
    }
}

/// [`running`] within an explicit directory; sorted.
fn running_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|f| f.strip_suffix(".sock")) else {
            continue;
        };
        let Ok(status) = query_at(&entry.path(), stem) else {
            continue;
        };
        // Prefer the profile's own spelling, which maps back to this socket.
        if sanitize_name(&status.profile) == stem {
            names.push(status.profile);
        } else {
            names.push(stem.to_string());
        }
    }
    names.sort();
    names.dedup();
    names
}

/// Formats a duration compactly: "45s", "3m12s", "2h05m", "3d04h".
fn fmt_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Formats a byte count in binary units: "512 B", "1.2 KiB", "3.4 MiB".
fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Makes text safe for a terminal: server versions and errors come from the
/// network, and raw control characters could rewrite the user's screen.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Human-readable status of several profiles: for each, a header line
/// (profile, state, duration in that state, reconnects, rtt, server version),
/// then upstream, endpoint and local clients, open channels by kind, bytes
/// in/out, retry and last error, and a forwards table. Profiles are separated
/// by a blank line; an empty slice renders as an empty string.
pub fn render(statuses: &[ProfileStatus]) -> String {
    render_at(statuses, unix_now())
}

/// [`render`] with an explicit "now", for deterministic output in tests.
fn render_at(statuses: &[ProfileStatus], now: u64) -> String {
    let mut out = String::new();
    for (i, st) in statuses.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_one(&mut out, st, now);
    }
    out
}

/// Appends the block for one profile to `out`.
fn render_one(out: &mut String, st: &ProfileStatus, now: u64) {
    let up = &st.upstream;
    let mut header = format!(
        "{} (pid {}): {} for {}, reconnects {}",
        clean(&st.profile),
        st.pid,
        clean(&up.state),
        fmt_duration(now.saturating_sub(up.since)),
        up.reconnects
    );
    if let Some(rtt) = up.rtt_ms {
        let _ = write!(header, ", rtt {rtt:.1} ms");
    }
    if let Some(v) = &up.server_version {
        let _ = write!(header, ", server {}", clean(v));
    }
    let _ = writeln!(out, "{header}");

    // Fixed-width labels keep the values aligned in one column.
    let mut field = |label: &str, value: String| {
        let line = format!("  {label:<11} {value}");
        let _ = writeln!(out, "{}", line.trim_end());
    };
    let conns = if up.connections == 1 {
        "connection"
    } else {
        "connections"
    };
    field(
        "upstream",
        format!("{} ({} {conns})", clean(&st.destination), up.connections),
    );
    let clients = if st.local_clients == 1 {
        "client"
    } else {
        "clients"
    };
    let endpoint = st.endpoint.as_deref().map_or("none".to_string(), clean);
    field(
        "endpoint",
        format!("{endpoint}, {} local {clients}", st.local_clients),
    );
    let channels = st
        .channels
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{} {n}", clean(k)))
        .collect::<Vec<_>>();
    let channels = if channels.is_empty() {
        "none".to_string()
    } else {
        channels.join(", ")
    };
    field("channels", channels);
    field(
        "traffic",
        format!(
            "in {}, out {}",
            fmt_bytes(st.bytes_in),
            fmt_bytes(st.bytes_out)
        ),
    );
    if let Some(next) = up.next_attempt {
        let attempt = up
            .attempt
            .map(|a| format!("attempt {a} "))
            .unwrap_or_default();
        field(
            "retry",
            format!("{attempt}in {}", fmt_duration(next.saturating_sub(now))),
        );
    }
    if let Some(err) = &up.last_error {
        field("last error", clean(err));
    }
    if st.forwards.is_empty() {
        field("forwards", "none".to_string());
        return;
    }
    field("forwards", String::new());
    let rows: Vec<[String; 5]> = st
        .forwards
        .iter()
        .map(|f| {
            [
                clean(&f.spec),
                clean(&f.owner),
                clean(&f.state),
                f.bound_port.map_or("-".to_string(), |p| p.to_string()),
                f.error.as_deref().map_or(String::new(), clean),
            ]
        })
        .collect();
    let head = ["SPEC", "OWNER", "STATE", "PORT", "ERROR"].map(String::from);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&head).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&head).chain(&rows) {
        let mut line = String::from("   ");
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            // The last column is not padded, to avoid trailing spaces.
            if i == 4 {
                let _ = write!(line, " {cell}");
            } else {
                let _ = write!(line, " {cell:<w$} ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// Escapes a Prometheus label value (backslash, double quote, newline).
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Formats a sample value the way Prometheus parses it (Go float syntax).
fn prom_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Accumulates one metric family so all its samples stay contiguous, as the
/// exposition format requires.
struct Family {
    /// Text after `# HELP name`.
    help: &'static str,
    /// "gauge" or "counter".
    kind: &'static str,
    /// Rendered sample lines.
    samples: Vec<String>,
}

impl Family {
    /// Starts an empty family.
    fn new(help: &'static str, kind: &'static str) -> Self {
        Self {
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample with already-unescaped label pairs.
    fn add(&mut self, name: &str, labels: &[(&str, &str)], value: String) {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect::<Vec<_>>()
            .join(",");
        self.samples.push(format!("{name}{{{labels}}} {value}"));
    }
}

/// Prometheus text exposition (version 0.0.4) for several profiles, with
/// HELP/TYPE lines and escaped label values.
pub fn prometheus(statuses: &[ProfileStatus]) -> String {
    // Order of families in the output.
    let mut fams: Vec<(&str, Family)> = vec![
        (
            "sshshim_up",
            Family::new(
                "Whether the profile's upstream SSH connection is up (1) or not (0).",
                "gauge",
            ),
        ),
        (
            "sshshim_reconnects_total",
            Family::new(
                "Upstream reconnections since the profile started.",
                "counter",
            ),
        ),
        (
            "sshshim_rtt_seconds",
            Family::new("Last measured upstream round-trip time.", "gauge"),
        ),
        (
            "sshshim_local_clients",
            Family::new("Local SSH clients connected to the endpoint.", "gauge"),
        ),
        (
            "sshshim_channels",
            Family::new("Open channels by kind.", "gauge"),
        ),
        (
            "sshshim_forward_active",
            Family::new("Whether a forward is active (1) or not (0).", "gauge"),
        ),
        (
            "sshshim_bytes_total",
            Family::new(
                "Bytes relayed, in = upstream to local, out = local to upstream.",
                "counter",
            ),
        ),
        (
            "sshshim_upstream_connections",
            Family::new("Upstream SSH connections open.", "gauge"),
        ),
    ];
    for st in statuses {
        let p = st.profile.as_str();
        let up = &st.upstream;
        let mut add = |idx: usize, labels: &[(&str, &str)], value: String| {
            let (name, fam) = &mut fams[idx];
            fam.add(name, labels, value);
        };
        add(
            0,
            &[("profile", p)],
            u8::from(up.state == "connected").to_string(),
        );
        add(1, &[("profile", p)], up.reconnects.to_string());
        if let Some(rtt) = up.rtt_ms {
            add(2, &[("profile", p)], prom_float(rtt / 1000.0));
        }
        add(3, &[("profile", p)], st.local_clients.to_string());
        for (kind, n) in &st.channels {
            add(4, &[("profile", p), ("kind", kind)], n.to_string());
        }
        // Identical (spec, owner) pairs would be duplicate series, which
        // Prometheus rejects; merge them, active if any is.
        let mut fwd: BTreeMap<(&str, &str), bool> = BTreeMap::new();
        for f in &st.forwards {
            *fwd.entry((&f.spec, &f.owner)).or_default() |= f.state == "active";
        }
        for ((spec, owner), active) in fwd {
            add(
                5,
                &[("profile", p), ("spec", spec), ("owner", owner)],
                u8::from(active).to_string(),
            );
        }
        add(
            6,
            &[("profile", p), ("direction", "in")],
            st.bytes_in.to_string(),
        );
        add(
            6,
            &[("profile", p), ("direction", "out")],
            st.bytes_out.to_string(),
        );
        add(7, &[("profile", p)], up.connections.to_string());
    }
    let mut out = String::new();
    for (name, fam) in &fams {
        let _ = writeln!(out, "# HELP {name} {}", fam.help);
        let _ = writeln!(out, "# TYPE {name} {}", fam.kind);
        for s in &fam.samples {
            let _ = writeln!(out, "{s}");
        }
    }
    out
}

/// Callback producing the statuses served by [`serve_metrics`].
type Sources = Arc<dyn Fn() -> Vec<ProfileStatus> + Send + Sync>;

/// Serves HTTP on `addr` until shutdown: GET /metrics -> Prometheus text;
/// GET /status -> JSON array of [`ProfileStatus`]; anything else 404.
/// `addr` must be loopback: the metrics reveal hosts and forwards and there is
/// no authentication, so exposing them on the network is refused.
/// `sources` is called at request time.
pub async fn serve_metrics(
    addr: SocketAddr,
    sources: Sources,
    shutdown: CancellationToken,
) -> io::Result<()> {
    if !addr.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "refusing to serve metrics on {addr}: it is not a loopback address, \
                 and the unauthenticated status would be visible to the network"
            ),
        ));
    }
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })?;
    serve_metrics_on(listener, sources, shutdown).await
}

/// [`serve_metrics`] on an already bound listener (lets tests use port 0).
async fn serve_metrics_on(
    listener: TcpListener,
    sources: Sources,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!("metrics accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Over the limit: drop the connection instead of queueing work.
                let Ok(permit) = limit.clone().try_acquire_owned() else { continue };
                let sources = sources.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(
                        SERVER_READ_TIMEOUT,
                        handle_http(stream, sources),
                    )
                    .await;
                });
            }
        }
    }
    Ok(())
}

/// Reads one request head and writes one response, then closes.
async fn handle_http(mut stream: tokio::net::TcpStream, sources: Sources) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let complete = loop {
        if find_head_end(&head) {
            break true;
        }
        if head.len() >= MAX_HTTP_HEAD {
            break false;
        }
        let want = chunk.len().min(MAX_HTTP_HEAD - head.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let (status, ctype, body, head_only) = if !complete {
        (
            "431 Request Header Fields Too Large",
            "text/plain",
            "request head too large\n".into(),
            false,
        )
    } else {
        let text = String::from_utf8_lossy(&head);
        let mut parts = text.lines().next().unwrap_or("").split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let path = target.split('?').next().unwrap_or("");
        let head_only = method == "HEAD";
        if method != "GET" && !head_only {
            (
                "405 Method Not Allowed",
                "text/plain",
                "method not allowed\n".into(),
                false,
            )
        } else if path == "/metrics" || path == "/status" {
            // `sources` may do blocking work (e.g. query other profiles'
            // sockets), so keep it off the async workers.
            let src = sources.clone();
            let statuses = tokio::task::spawn_blocking(move || src())
                .await
                .map_err(io::Error::other)?;
            if path == "/metrics" {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    prometheus(&statuses),
                    head_only,
                )
            } else {
                match serde_json::to_string(&statuses) {
                    Ok(json) => ("200 OK", "application/json", json + "\n", head_only),
                    Err(e) => (
                        "500 Internal Server Error",
                        "text/plain",
                        format!("{e}\n"),
                        false,
                    ),
                }
            }
        } else {
            (
                "404 Not Found",
                "text/plain",
                "not found\n".into(),
                head_only,
            )
        }
    };
    let mut resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        resp.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&resp).await?;
    stream.shutdown().await
}

/// True once `buf` holds a complete request head (blank line seen); bare LF
/// line endings are tolerated for hand-typed requests.
fn find_head_end(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

/// Rate-limit bookkeeping for one (profile, event).
struct HookSlot {
    /// When the hook last actually ran for this key.
    last_sent: Instant,
    /// Emits swallowed since then.
    suppressed: u64,
}

/// Runs a user command on events, rate-limited per (profile, event).
pub struct EventHook {
    /// Shell command, run as `sh -c CMD`.
    cmd: String,
    /// Minimum time between two runs for the same (profile, event).
    min_interval: Duration,
    /// Last run and suppressed count per (profile, event).
    slots: Mutex<HashMap<(String, String), HookSlot>>,
}

impl EventHook {
    /// A hook that runs `cmd` at most once a minute per (profile, event).
    pub fn new(cmd: String) -> Self {
        Self::with_min_interval(cmd, DEFAULT_HOOK_INTERVAL)
    }

    /// A hook with a custom minimum interval per (profile, event).
    pub fn with_min_interval(cmd: String, every: Duration) -> Self {
        Self {
            cmd,
            min_interval: every,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `sh -c CMD` detached with SSHSHIM_EVENT, SSHSHIM_PROFILE,
    /// SSHSHIM_REASON and SSHSHIM_TIME (unix seconds) set, unless the same
    /// (profile, event) ran less than the minimum interval ago; suppressed
    /// emits are counted and the next run gets SSHSHIM_SUPPRESSED=n.
    /// Never blocks: the child is reaped in the background.
    pub fn emit(&self, profile: &str, event: &str, reason: &str) {
        let suppressed = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            match slots.get_mut(&(profile.to_string(), event.to_string())) {
                Some(slot) if now.duration_since(slot.last_sent) < self.min_interval => {
                    slot.suppressed += 1;
                    return;
                }
                Some(slot) => {
                    slot.last_sent = now;
                    std::mem::take(&mut slot.suppressed)
                }
                None => {
                    slots.insert(
                        (profile.to_string(), event.to_string()),
                        HookSlot {
                            last_sent: now,
                            suppressed: 0,
                        },
                    );
                    0
                }
            }
        };
        // Values travel in the environment, never interpolated into the
        // command, so a hostile reason string cannot inject shell code. NULs
        // are stripped because the OS would reject them and drop the event.
        let strip = |s: &str| s.replace('\0', "");
        let mut env = vec![
            ("SSHSHIM_EVENT", strip(event)),
            ("SSHSHIM_PROFILE", strip(profile)),
            ("SSHSHIM_REASON", strip(reason)),
            ("SSHSHIM_TIME", unix_now().to_string()),
        ];
        if suppressed > 0 {
            env.push(("SSHSHIM_SUPPRESSED", suppressed.to_string()));
        }
        if let Err(e) = self.spawn(&env) {
            tracing::warn!(event, profile, "cannot run event hook: {e}");
        }
    }

    /// Starts the command and arranges for it to be reaped.
    fn spawn(&self, env: &[(&str, String)]) -> io::Result<()> {
        // Hook output goes to our stderr so stdout stays clean for sshshim's
        // own machine-readable output.
        let stdout = || -> io::Result<std::process::Stdio> {
            use std::os::fd::AsFd as _;
            Ok(io::stderr().as_fd().try_clone_to_owned()?.into())
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let _enter = handle.enter();
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg("-c")
                    .arg(&self.cmd)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdin(std::process::Stdio::null())
                    .stdout(stdout()?)
                    .stderr(std::process::Stdio::inherit())
                    // Own process group: a Ctrl-C aimed at sshshim must not
                    // kill a hook reporting that very shutdown.
                    .process_group(0);
                let mut child = cmd.spawn()?;
                handle.spawn(async move {
                    if let Ok(st) = child.wait().await
                        && !st.success()
                    {
                        tracing::debug!("event hook exited with {st}");
                    }
                });
            }
            Err(_) => {
                // Outside a runtime (e.g. CLI paths): a thread reaps instead.
                use std::os::unix::process::CommandExt as _;
                let mut child = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(&self.cmd)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdin(std::process::Stdio::null())
                    .stdout(stdout()?)
                    .stderr(std::process::Stdio::inherit())
                    .process_group(0)
                    .spawn()?;
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Fake profile recording whether stop() was called.
    struct Fake {
        /// Set by stop().
        stopped: AtomicBool,
    }

    impl StatusSource for Fake {
        fn snapshot(&self) -> ProfileStatus {
            sample("work")
        }
        fn stop(&self) {
            self.stopped.store(true, Ordering::SeqCst);
        }
    }

    /// A representative status, with characters that need escaping.
    fn sample(name: &str) -> ProfileStatus {
        ProfileStatus {
            profile: name.to_string(),
            pid: std::process::id(),
            destination: "alice@example.com:22".into(),
            endpoint: Some("127.0.0.1:2222".into()),
            upstream: UpstreamStatus {
                state: "connected".into(),
                since: 1_000,
                next_attempt: None,
                attempt: None,
                last_error: Some("connection reset by peer".into()),
                reconnects: 2,
                rtt_ms: Some(12.5),
                server_version: Some("SSH-2.0-OpenSSH_9.6".into()),
                connections: 2,
            },
            local_clients: 1,
            channels: BTreeMap::from([("session".into(), 2), ("direct-tcpip".into(), 1)]),
            forwards: vec![
                ForwardStatus {
                    spec: "-R 2222:localhost:22".into(),
                    owner: "sshshim".into(),
                    state: "active".into(),
                    bound_port: Some(2222),
                    error: None,
                },
                ForwardStatus {
                    spec: "-R localhost:8080 \"q\"\\".into(),
                    owner: "client".into(),
                    state: "retrying".into(),
                    bound_port: None,
                    error: Some("port in use".into()),
                },
            ],
            bytes_in: 1_300_000,
            bytes_out: 512,
        }
    }

    /// Starts serve_at in the background and waits until it answers.
    async fn start(
        path: &Path,
        source: Arc<dyn StatusSource>,
    ) -> (CancellationToken, tokio::task::JoinHandle<io::Result<()>>) {
        let token = CancellationToken::new();
        let (p, t) = (path.to_path_buf(), token.clone());
        let task = tokio::spawn(async move { serve_at(&p, "work", source, t).await });
        for _ in 0..200 {
            if UnixStream::connect(path).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (token, task)
    }

    /// Runs a blocking client call off the runtime.
    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    /// Status, unknown command and down over a real socket; file removed on exit.
    #[tokio::test]
    async fn serve_query_down_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path_in(dir.path(), "work");
        let fake = Arc::new(Fake {
            stopped: AtomicBool::new(false),
        });
        let (token, task) = start(&path, fake.clone()).await;

        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let p = path.clone();
        let st = blocking(move || query_at(&p, "work")).await.unwrap();
        assert_eq!(st, sample("work"));

        let d = dir.path().to_path_buf();
        assert_eq!(
            blocking(move || running_in(&d)).await,
            vec!["work".to_string()]
        );

        let p = path.clone();
        let err = blocking(move || request_at(&p, "work", "bogus", CLIENT_TIMEOUT)).await;
        assert!(err.unwrap_err().contains("unknown command"));

        let p = path.clone();
        blocking(move || down_at(&p, "work")).await.unwrap();
        assert!(fake.stopped.load(Ordering::SeqCst));

        token.cancel();
        task.await.unwrap().unwrap();
        assert!(!path.exists(), "socket file removed on exit");

        let p = path.clone();
        let err = blocking(move || query_at(&p, "work")).await.unwrap_err();
        assert_eq!(err, "no running sshshim for profile work");
    }

    /// A live socket is never stolen; the error names the running pid.
    #[tokio::test]
    async fn second_serve_fails_already_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path_in(dir.path(), "work");
        let fake = Arc::new(Fake {
            stopped: AtomicBool::new(false),
        });
        let (token, task) = start(&path, fake.clone()).await;

        let err = serve_at(&path, "work", fake, CancellationToken::new())
            .await
            .unwrap_err();
        let expected = format!(
            "profile work is already running (pid {})",
            std::process::id()
        );
        assert_eq!(err.to_string(), expected);
        assert!(path.exists(), "the live socket must survive");

        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// A leftover socket nobody listens on is ignored by running() and replaced.
    #[tokio::test]
    async fn stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path_in(dir.path(), "work");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let d = dir.path().to_path_buf();
        assert!(
            blocking(move || running_in(&d)).await.is_empty(),
            "stale socket ignored"
        );

        let fake = Arc::new(Fake {
            stopped: AtomicBool::new(false),
        });
        let (token, task) = start(&path, fake).await;
        let p = path.clone();
        assert_eq!(
            blocking(move || query_at(&p, "work"))
                .await
                .unwrap()
                .profile,
            "work"
        );
        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// A regular file at the socket path is left alone.
    #[tokio::test]
    async fn non_socket_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path_in(dir.path(), "work");
        std::fs::write(&path, b"precious").unwrap();
        let fake = Arc::new(Fake {
            stopped: AtomicBool::new(false),
        });
        let err = serve_at(&path, "work", fake, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    /// Directory creation, fallback, refusal reasons and name sanitising.
    #[test]
    fn socket_dir_checks() {
        let uid = our_uid();
        let rt = tempfile::tempdir().unwrap();
        let dir = socket_dir_in(Some(rt.path()), Path::new("/nonexistent"), uid).unwrap();
        assert_eq!(dir, rt.path().join("sshshim"));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);

        // Fallback to the tmp dir when XDG_RUNTIME_DIR is unset or relative.
        let tmp = tempfile::tempdir().unwrap();
        let dir = socket_dir_in(Some(Path::new("rel")), tmp.path(), uid).unwrap();
        assert_eq!(dir, tmp.path().join(format!("sshshim-{uid}")));

        // A group-accessible dir is refused, with the reason.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
        let err = socket_dir_in(None, tmp.path(), uid).unwrap_err();
        assert!(err.to_string().contains("mode is 770"), "{err}");
        // Owned by someone else (simulated by claiming another uid).
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = socket_dir_in(None, tmp.path(), uid.wrapping_add(1)).unwrap_err();
        assert!(err.to_string().contains("owned by uid"), "{err}");

        assert_eq!(sanitize_name("a/b c.d-e_f"), "a_b_c.d-e_f");
        assert_eq!(
            socket_path_in(Path::new("/x"), "../evil"),
            PathBuf::from("/x/.._evil.sock")
        );
    }

    /// The human rendering carries the key fields and aligns the table.
    #[test]
    fn render_shows_key_fields() {
        let mut other = sample("home");
        other.upstream.state = "reconnecting".into();
        other.upstream.next_attempt = Some(1_000 + 192 + 5);
        other.upstream.attempt = Some(3);
        other.forwards.clear();
        let out = render_at(&[sample("work"), other], 1_000 + 192);
        for want in [
            "work (pid",
            "connected for 3m12s",
            "reconnects 2",
            "rtt 12.5 ms",
            "server SSH-2.0-OpenSSH_9.6",
            "alice@example.com:22 (2 connections)",
            "127.0.0.1:2222, 1 local client",
            "direct-tcpip 1, session 2",
            "in 1.2 MiB, out 512 B",
            "connection reset by peer",
            "SPEC",
            "-R 2222:localhost:22",
            "sshshim",
            "active",
            "2222",
            "retrying",
            "port in use",
            "home (pid",
            "reconnecting for 3m12s",
            "attempt 3 in 5s",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        // Table columns line up: OWNER starts at the same column in every row.
        let table: Vec<&str> = out.lines().filter(|l| l.starts_with("    ")).collect();
        assert_eq!(table.len(), 3, "{out}");
        let col = table[0].find("OWNER").unwrap();
        assert_eq!(table[1].find("sshshim"), Some(col));
        assert_eq!(table[2].find("client"), Some(col));
        assert!(render(&[]).is_empty());
        assert_eq!(fmt_duration(7_500), "2h05m");
        assert_eq!(clean("a\x1b[2Jb"), "a?[2Jb");
    }

    /// A parsed sample: metric name, label pairs, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Parses `name{labels} value` as the exposition format defines it.
    fn parse_sample(line: &str) -> Option<Sample> {
        let (name, rest) = line.split_at(line.find(['{', ' '])?);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return None;
        }
        let mut labels = Vec::new();
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest.find("=\"")?;
                let key = rest[..eq].to_string();
                let mut val = String::new();
                let mut chars = rest[eq + 2..].char_indices();
                let end = loop {
                    let (i, c) = chars.next()?;
                    match c {
                        '\\' => match chars.next()?.1 {
                            'n' => val.push('\n'),
                            c @ ('\\' | '"') => val.push(c),
                            _ => return None,
                        },
                        '"' => break eq + 2 + i + 1,
                        c => val.push(c),
                    }
                };
                labels.push((key, val));
                rest = rest[end..].strip_prefix(',').unwrap_or(&rest[end..]);
            }
        }
        let value = rest.strip_prefix(' ')?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some((name.to_string(), labels, value))
    }

    /// Every sample line parses, with escaped labels round-tripping.
    #[test]
    fn prometheus_lines_parse() {
        let mut down = sample("we\"ird\\name\n");
        down.upstream.state = "reconnecting".into();
        down.upstream.rtt_ms = None;
        let out = prometheus(&[sample("work"), down]);
        let mut samples = Vec::new();
        for line in out.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            samples.push(parse_sample(line).unwrap_or_else(|| panic!("bad line {line:?}")));
        }
        let find = |name: &str, labels: &[(&str, &str)]| {
            samples
                .iter()
                .find(|(n, l, _)| {
                    n == name
                        && labels
                            .iter()
                            .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
                })
                .map(|s| s.2)
        };
        assert_eq!(find("sshshim_up", &[("profile", "work")]), Some(1.0));
        assert_eq!(
            find("sshshim_up", &[("profile", "we\"ird\\name\n")]),
            Some(0.0)
        );
        assert_eq!(
            find("sshshim_reconnects_total", &[("profile", "work")]),
            Some(2.0)
        );
        assert_eq!(
            find("sshshim_rtt_seconds", &[("profile", "work")]),
            Some(0.0125)
        );
        assert_eq!(
            find(
                "sshshim_channels",
                &[("profile", "work"), ("kind", "session")]
            ),
            Some(2.0)
        );
        assert_eq!(
            find(
                "sshshim_forward_active",
                &[("spec", "-R localhost:8080 \"q\"\\"), ("owner", "client")]
            ),
            Some(0.0)
        );
        assert_eq!(
            find(
                "sshshim_bytes_total",
                &[("profile", "work"), ("direction", "in")]
            ),
            Some(1_300_000.0)
        );
        assert_eq!(
            find("sshshim_upstream_connections", &[("profile", "work")]),
            Some(2.0)
        );
        assert!(out.contains("# TYPE sshshim_bytes_total counter"));
        // Each family's TYPE appears exactly once.
        assert_eq!(out.matches("# TYPE sshshim_up ").count(), 1);
    }

    /// Sends a raw HTTP request and returns the whole response.
    async fn http(addr: SocketAddr, req: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The HTTP endpoint answers /metrics, /status and the error cases.
    #[tokio::test]
    async fn metrics_http_endpoint() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let sources: Sources = Arc::new(|| vec![sample("work")]);
        let task = tokio::spawn(serve_metrics_on(listener, sources, token.clone()));

        let resp = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.0 200 OK\r\n"), "{resp}");
        assert!(resp.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(resp.contains("sshshim_up{profile=\"work\"} 1"));
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));

        let resp = http(addr, "GET /status?x=1 HTTP/1.0\r\n\r\n").await;
        let body = resp.split_once("\r\n\r\n").unwrap().1;
        let parsed: Vec<ProfileStatus> = serde_json::from_str(body).unwrap();
        assert_eq!(parsed, vec![sample("work")]);

        let resp = http(addr, "GET /nope HTTP/1.0\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.0 404"), "{resp}");
        let resp = http(addr, "POST /metrics HTTP/1.0\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.0 405"), "{resp}");
        let big = format!("GET /metrics HTTP/1.0\r\nX: {}\r\n\r\n", "a".repeat(9000));
        let resp = http(addr, &big).await;
        assert!(resp.starts_with("HTTP/1.0 431"), "{resp}");

        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// Non-loopback metrics addresses are refused before binding.
    #[tokio::test]
    async fn metrics_refuse_non_loopback() {
        let sources: Sources = Arc::new(Vec::new);
        let err = serve_metrics(
            "0.0.0.0:0".parse().unwrap(),
            sources,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("not a loopback"), "{err}");
    }

    /// Waits until `path` has at least `n` lines (or 5 s pass), returning them.
    async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
        let mut lines = Vec::new();
        for _ in 0..500 {
            lines = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect();
            if lines.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lines
    }

    /// Duplicate events are suppressed, counted, and reported on the next run.
    #[tokio::test]
    async fn event_hook_rate_limits() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("events");
        let cmd = format!(
            "printf '%s|%s|%s|%s|%s\\n' \"$SSHSHIM_EVENT\" \"$SSHSHIM_PROFILE\" \"$SSHSHIM_REASON\" \
             \"${{SSHSHIM_SUPPRESSED:-0}}\" \"$SSHSHIM_TIME\" >> '{}'",
            out.display()
        );
        let hook = EventHook::with_min_interval(cmd, Duration::from_millis(300));
        hook.emit("work", "down", "reset; $(touch /tmp/x)");
        hook.emit("work", "down", "again");
        hook.emit("work", "up", "ok");
        let mut lines = wait_lines(&out, 2).await;
        // Give a wrongly fired duplicate time to show up before asserting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        lines = wait_lines(&out, lines.len()).await;
        lines.sort();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("down|work|reset; $(touch /tmp/x)|0|"),
            "{lines:?}"
        );
        assert!(lines[1].starts_with("up|work|ok|0|"), "{lines:?}");
        let t: u64 = lines[0].rsplit('|').next().unwrap().parse().unwrap();
        assert!(t.abs_diff(unix_now()) < 60);

        // After the interval the next one fires and reports the suppressed count.
        tokio::time::sleep(Duration::from_millis(350)).await;
        hook.emit("work", "down", "third");
        let lines = wait_lines(&out, 3).await;
        assert!(
            lines.iter().any(|l| l.starts_with("down|work|third|1|")),
            "{lines:?}"
        );
    }
}

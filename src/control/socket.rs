//! The control socket of a profile: a private Unix socket per profile that
//! answers `status` and `down` (one command line in, one line out), the
//! client side used by `sshshim status` / `sshshim down`, the checks on the
//! socket directory, and the handling of stale sockets left by a crash.

use std::io::{self, BufRead as _, Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::status::{ProfileStatus, StatusSource};

/// Overall bound on a client round trip, so a wedged profile cannot hang the CLI.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the server waits for a client's command line; bounds idle connections.
const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest command line accepted; real commands are a few bytes.
const MAX_COMMAND: u64 = 1024;
/// Longest reply a client accepts; guards against a misbehaving peer.
const MAX_REPLY: u64 = 16 << 20;

/// Why [`serve`] could not serve the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another sshshim answers on this profile's socket: the profile is
    /// already running, and its socket is left alone.
    #[error("profile {name} is already running (pid {})", fmt_pid(*.pid))]
    AlreadyRunning {
        /// Profile name.
        name: String,
        /// Pid of the running sshshim, if it answered `status`.
        pid: Option<u32>,
    },
    /// Any other failure (control directory, bind, permissions); the message
    /// says what is wrong.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A pid for a message, or "unknown" when the running process did not say.
fn fmt_pid(pid: Option<u32>) -> String {
    pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
}

/// Our effective uid, the owner required of control peers.
fn our_uid() -> u32 {
    crate::paths::my_uid()
}

/// Directory of control sockets: sshshim's runtime directory
/// ($XDG_RUNTIME_DIR/sshshim, else in the state directory: see
/// [`crate::paths::runtime_dir`]), created 0700. A directory not owned by
/// us is refused, since anyone who can write there could plant a socket
/// that impersonates a profile.
pub fn socket_dir() -> io::Result<PathBuf> {
    let dir = crate::paths::runtime_dir()?;
    crate::paths::create_private_dir(&dir)?;
    Ok(dir)
}

/// A profile name as one safe file-name component.
fn sanitize_name(name: &str) -> String {
    crate::paths::safe_name(name)
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
/// answers on it (if a live process answers, fails with
/// [`ServeError::AlreadyRunning`]: "profile NAME is already running (pid
/// N)"), makes it 0600, and for each connection from our
/// own uid reads one line: "status" -> one JSON line of [`ProfileStatus`];
/// "down" -> calls [`StatusSource::stop`] and replies "ok"; anything else ->
/// "error: unknown command". Removes the socket file on exit.
pub async fn serve(
    name: String,
    source: Arc<dyn StatusSource>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    bind(&name).await?.serve(source, shutdown).await;
    Ok(())
}

/// A bound control socket, not yet answering (see [`bind`]).
pub struct Bound {
    /// The listening socket.
    listener: UnixListener,
    /// Removes the socket file when serving ends.
    guard: SocketGuard,
}

/// The first half of [`serve`]: takes profile `name`'s socket (or fails
/// with [`ServeError::AlreadyRunning`]), so a caller can stop before
/// starting anything else.
pub async fn bind(name: &str) -> Result<Bound, ServeError> {
    bind_at(&socket_path(name)?, name).await
}

/// [`serve`] on an explicit socket path.
#[cfg(test)]
async fn serve_at(
    path: &Path,
    name: &str,
    source: Arc<dyn StatusSource>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    bind_at(path, name).await?.serve(source, shutdown).await;
    Ok(())
}

/// [`bind`] on an explicit socket path.
async fn bind_at(path: &Path, name: &str) -> Result<Bound, ServeError> {
    match probe_existing(path).await? {
        Existing::Absent => {}
        Existing::Stale => {
            tracing::debug!(path = %path.display(), "removing stale control socket");
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Existing::Live(pid) => {
            return Err(ServeError::AlreadyRunning {
                name: name.to_string(),
                pid,
            });
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
    Ok(Bound { listener, guard })
}

impl Bound {
    /// The second half of [`serve`]: answers until `shutdown`, then
    /// removes the socket file.
    pub async fn serve(self, source: Arc<dyn StatusSource>, shutdown: CancellationToken) {
        let Bound { listener, guard } = self;
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
    }
}

/// A command on the control socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// `status`: one JSON line of [`ProfileStatus`].
    Status,
    /// `down`: stop the profile.
    Down,
}

/// A request line that is not a command; its text follows `error: ` in
/// the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown command")]
struct UnknownCommand;

/// Parses one command line as read from a client (newline included or not,
/// surrounding whitespace ignored). Anything else, including bytes that are
/// not UTF-8, is [`UnknownCommand`].
fn parse_request(line: &[u8]) -> Result<Request, UnknownCommand> {
    match std::str::from_utf8(line).map(str::trim) {
        Ok("status") => Ok(Request::Status),
        Ok("down") => Ok(Request::Down),
        _ => Err(UnknownCommand),
    }
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
    let mut line = Vec::new();
    let read = async {
        let mut reader = tokio::io::BufReader::new(&mut stream).take(MAX_COMMAND);
        reader.read_until(b'\n', &mut line).await
    };
    match tokio::time::timeout(SERVER_READ_TIMEOUT, read).await {
        Ok(Ok(_)) => {}
        _ => return,
    }
    let reply = match parse_request(&line) {
        Ok(Request::Status) => match serde_json::to_string(&source.snapshot()) {
            Ok(json) => json,
            Err(e) => format!("error: cannot encode status: {e}"),
        },
        Ok(Request::Down) => {
            source.stop();
            "ok".to_string()
        }
        Err(e) => format!("error: {e}"),
    };
    let write = async {
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(b"\n").await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(SERVER_READ_TIMEOUT, write).await;
}

/// Why the client side could not get an answer from a profile; the text
/// is what `sshshim status` and `sshshim down` print.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket, or nobody listens on it: the profile is not running.
    #[error("no running sshshim for profile {name}")]
    NotRunning {
        /// Profile name.
        name: String,
    },
    /// The runtime directory cannot be found.
    #[error(transparent)]
    Dir(io::Error),
    /// Connecting failed for another reason than "not running".
    #[error("cannot connect to profile {name}: {source}")]
    Connect {
        /// Profile name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// No complete answer in time.
    #[error("profile {name} did not answer within {secs}s")]
    Timeout {
        /// Profile name.
        name: String,
        /// The time allowed.
        secs: u64,
    },
    /// Reading or writing the socket failed.
    #[error("talking to profile {name}: {source}")]
    Io {
        /// Profile name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// The connection closed without a reply.
    #[error("profile {name} closed the control connection without answering")]
    NoAnswer {
        /// Profile name.
        name: String,
    },
    /// The profile answered `error: ...`.
    #[error("profile {name}: {message}")]
    Refused {
        /// Profile name.
        name: String,
        /// Its message.
        message: String,
    },
    /// A `status` reply that is not a status.
    #[error("profile {name} sent an invalid status: {source}")]
    InvalidStatus {
        /// Profile name.
        name: String,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// `down` was answered with something else than `ok`.
    #[error("profile {name} did not acknowledge down: {reply}")]
    NotAcknowledged {
        /// Profile name.
        name: String,
        /// What it answered.
        reply: String,
    },
}

/// Sends one command to the socket at `path` and returns the reply line,
/// all within `timeout`.
fn request_at(
    path: &Path,
    name: &str,
    cmd: &str,
    timeout: Duration,
) -> Result<String, ClientError> {
    let deadline = Instant::now() + timeout;
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning { name: name.into() });
        }
        Err(source) => {
            return Err(ClientError::Connect {
                name: name.into(),
                source,
            });
        }
    };
    let timed_out = || ClientError::Timeout {
        name: name.into(),
        secs: timeout.as_secs(),
    };
    let io_err = |source: io::Error| {
        if matches!(
            source.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            timed_out()
        } else {
            ClientError::Io {
                name: name.into(),
                source,
            }
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
    parse_reply(name, &reply)
}

/// Reads a reply line from profile `name`: its text, or an error for an
/// empty reply or one that says `error: ...`.
fn parse_reply(name: &str, reply: &[u8]) -> Result<String, ClientError> {
    let reply = String::from_utf8_lossy(reply).trim().to_string();
    if reply.is_empty() {
        return Err(ClientError::NoAnswer { name: name.into() });
    }
    if let Some(msg) = reply.strip_prefix("error:") {
        let msg = msg.trim();
        let msg = if msg.is_empty() {
            "unspecified error"
        } else {
            msg
        };
        return Err(ClientError::Refused {
            name: name.into(),
            message: msg.into(),
        });
    }
    Ok(reply)
}

/// Reads a `status` reply from profile `name`.
fn parse_status(name: &str, reply: &str) -> Result<ProfileStatus, ClientError> {
    serde_json::from_str(reply).map_err(|source| ClientError::InvalidStatus {
        name: name.into(),
        source,
    })
}

/// [`query`] against an explicit socket path.
fn query_at(path: &Path, name: &str) -> Result<ProfileStatus, ClientError> {
    let reply = request_at(path, name, "status", CLIENT_TIMEOUT)?;
    parse_status(name, &reply)
}

/// [`down`] against an explicit socket path.
fn down_at(path: &Path, name: &str) -> Result<(), ClientError> {
    match request_at(path, name, "down", CLIENT_TIMEOUT)? {
        ok if ok == "ok" => Ok(()),
        reply => Err(ClientError::NotAcknowledged {
            name: name.into(),
            reply,
        }),
    }
}

/// The socket of profile `name`, for a client. A control directory that
/// cannot exist (say $XDG_RUNTIME_DIR points nowhere) means nothing runs.
fn client_socket_path(name: &str) -> Result<PathBuf, ClientError> {
    // A client creates nothing: no directory means nothing runs.
    let dir = crate::paths::runtime_dir().map_err(ClientError::Dir)?;
    let path = socket_path_in(&dir, name);
    if !is_ours(&dir) || !path.exists() {
        return Err(ClientError::NotRunning { name: name.into() });
    }
    Ok(path)
}

/// Client side: queries one profile (bounded by a 3 s timeout). Fails with
/// "no running sshshim for profile NAME" when the socket is absent or refused.
pub fn query(name: &str) -> Result<ProfileStatus, ClientError> {
    let path = client_socket_path(name)?;
    query_at(&path, name)
}

/// Sends "down" to one profile; Ok when acknowledged.
pub fn down(name: &str) -> Result<(), ClientError> {
    let path = client_socket_path(name)?;
    down_at(&path, name)
}

/// Names of profiles with a socket in socket_dir() that answer (stale sockets ignored).
pub fn running() -> Vec<String> {
    let Ok(dir) = crate::paths::runtime_dir() else {
        return Vec::new();
    };
    if !is_ours(&dir) {
        return Vec::new();
    }
    running_in(&dir)
}

/// Whether `dir` is a real directory owned by us (a client talks to no
/// socket in a directory someone else could have planted).
fn is_ours(dir: &Path) -> bool {
    std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == crate::paths::my_uid())
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

#[cfg(test)]
mod tests {
    use super::super::status::sample;
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

    /// Starts serve_at in the background and waits until it answers.
    async fn start(
        path: &Path,
        source: Arc<dyn StatusSource>,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    ) {
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
        assert!(err.unwrap_err().to_string().contains("unknown command"));

        let p = path.clone();
        blocking(move || down_at(&p, "work")).await.unwrap();
        assert!(fake.stopped.load(Ordering::SeqCst));

        token.cancel();
        task.await.unwrap().unwrap();
        assert!(!path.exists(), "socket file removed on exit");

        let p = path.clone();
        let err = blocking(move || query_at(&p, "work")).await.unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err:?}");
        assert_eq!(err.to_string(), "no running sshshim for profile work");
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
        assert!(
            matches!(err, ServeError::AlreadyRunning { pid: Some(p), .. } if p == std::process::id()),
            "{err:?}"
        );
        assert!(path.exists(), "the live socket must survive");

        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// The message when the running process did not give its pid.
    #[test]
    fn already_running_without_pid() {
        let err = ServeError::AlreadyRunning {
            name: "work".into(),
            pid: None,
        };
        assert_eq!(
            err.to_string(),
            "profile work is already running (pid unknown)"
        );
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

    /// Name sanitising.
    #[test]
    fn socket_names() {
        assert_eq!(sanitize_name("a/b c.d-e_f"), "a+2Fb+20c.d-e_f");
        assert_eq!(
            socket_path_in(Path::new("/x"), "../evil"),
            PathBuf::from("/x/..+2Fevil.sock")
        );
        // Escaped, not folded: these two no longer share a socket.
        assert_ne!(
            socket_path_in(Path::new("/x"), "root@127.0.0.1:23401"),
            socket_path_in(Path::new("/x"), "root_127.0.0.1_23401")
        );
    }

    mod fuzz {
        //! Properties of the control protocol, both ends: any request line
        //! gets a command or an error message; any reply line gets its text,
        //! a status or an error message. No panic, bounded time.

        use super::*;
        use crate::fuzzing::{bounded, config, is_message, nasty_bytes, nasty_text};
        use proptest::prelude::*;

        /// A request line: a command with odd spacing and case, or anything.
        fn request_line() -> impl Strategy<Value = Vec<u8>> {
            let cmd = prop::sample::select(vec!["status", "down", "STATUS", "stat", "downn", ""]);
            let pad = prop::sample::select(vec!["", " ", "\t", "\r", "\0", "\u{a0}", "\r\n"]);
            prop_oneof![
                (
                    pad.clone(),
                    cmd,
                    pad,
                    prop::sample::select(vec!["", "\n", "\n\n"])
                )
                    .prop_map(|(a, c, b, nl)| format!("{a}{c}{b}{nl}").into_bytes()),
                nasty_bytes(64),
            ]
        }

        /// A reply line: an error, JSON of roughly the status's shape, or anything.
        fn reply_line() -> impl Strategy<Value = Vec<u8>> {
            let sample = serde_json::to_string(&crate::control::status::sample("w")).unwrap();
            prop_oneof![
                Just(sample.clone().into_bytes()),
                (0..sample.len(), nasty_text(8)).prop_map(move |(at, junk)| {
                    let mut s = sample.clone().into_bytes();
                    let at = at.min(s.len());
                    s.splice(at..at, junk.into_bytes());
                    s
                }),
                nasty_text(16).prop_map(|t| format!("error:{t}").into_bytes()),
                nasty_bytes(64),
            ]
        }

        proptest! {
            #![proptest_config(config())]

            /// Server side: only the two commands parse, and every other
            /// line gets an error message.
            #[test]
            fn fuzz_control_request(line in request_line()) {
                let l = line.clone();
                let r = bounded("parse_request", move || parse_request(&l));
                let text = String::from_utf8_lossy(&line);
                match r {
                    Ok(Request::Status) => prop_assert_eq!(text.trim(), "status"),
                    Ok(Request::Down) => prop_assert_eq!(text.trim(), "down"),
                    Err(e) => is_message("parse_request", &e.to_string()),
                }
            }

            /// Client side: a reply is text, a status or an error message.
            #[test]
            fn fuzz_control_reply(reply in reply_line()) {
                let r = bounded("parse_reply", move || {
                    parse_reply("p", &reply).and_then(|t| parse_status("p", &t).map(|_| t))
                });
                if let Err(e) = r {
                    let e = e.to_string();
                    is_message("parse_reply", &e);
                    prop_assert!(e.contains("profile p"), "{}", e);
                }
            }
        }

        /// Hand-picked lines.
        #[test]
        fn nasty_control_seeds() {
            for line in [
                &b"status"[..],
                b" status \r\n",
                b"down\n",
                b"status\0",
                b"\xffstatus",
                b"",
                b"\n",
                b"error:",
                b"error:   ",
            ] {
                let _ = parse_request(line);
                if let Err(e) = parse_reply("p", line) {
                    is_message("parse_reply", &e.to_string());
                }
            }
            assert_eq!(parse_request(b" status \r\n"), Ok(Request::Status));
            assert_eq!(parse_request(b"status\0"), Err(UnknownCommand));
            assert_eq!(
                parse_reply("p", b"error:  ").unwrap_err().to_string(),
                "profile p: unspecified error"
            );
            let deep = "[".repeat(100_000);
            let e = parse_status("p", &deep).unwrap_err();
            assert!(matches!(e, ClientError::InvalidStatus { .. }), "{e}");
            assert!(e.to_string().contains("invalid status"), "{e}");
        }
    }
}

//! The mux control socket: bound safely, peers checked, removed on drop.
//!
//! - The parent directory is created 0700, or must already be ours and
//!   not writable by group or others: anyone who can write it could swap
//!   the socket (and OpenSSH's mux client does not authenticate its
//!   master). Our own 0755 or 0711 directory is fine, as with OpenSSH:
//!   entering it reaches only the 0600 socket, whose peers are checked.
//! - The socket is bound under a temporary name in that directory, made
//!   0600 and listening, then hard-linked into place, so the final path
//!   never shows a socket with loose permissions or one that refuses
//!   connections (as OpenSSH's master does).
//! - A socket already at the path is probed: if nothing answers a connect
//!   it is stale and replaced; if something answers, binding fails with a
//!   message saying another sshshim (or an ssh master) serves that path.
//!   Anything that is not a socket is never removed.
//! - Every accepted peer's uid (SO_PEERCRED) must be ours.
//! - Dropping the listener removes the socket file, unless someone else's
//!   socket has replaced it since.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{UnixListener, UnixStream};

/// Our effective uid: required of the socket directory and of every peer.
pub fn our_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A bound, listening mux control socket.
#[derive(Debug)]
pub struct MuxListener {
    /// The listening socket.
    listener: UnixListener,
    /// Where it is bound.
    path: PathBuf,
    /// (device, inode) of our socket file, to remove only our own.
    id: (u64, u64),
    /// The uid peers must have.
    uid: u32,
}

impl MuxListener {
    /// Binds `path` as described in the module docs. Must be called within
    /// a tokio runtime.
    pub fn bind(path: &Path) -> io::Result<MuxListener> {
        let uid = our_uid();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if path.file_name().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("control path {} names no file", path.display()),
            ));
        }
        ensure_private_dir(&dir, uid)?;
        remove_if_stale(path)?;

        let tmp = temp_name(path);
        let listener = match bind_std(&tmp) {
            Ok(l) => {
                let placed = set_private(&tmp).and_then(|()| place(&tmp, path));
                let _ = std::fs::remove_file(&tmp);
                placed?;
                l
            }
            // The temporary name is a little longer than the path; inside a
            // private directory binding in place is safe too.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                let l = bind_std(path).map_err(|e| bind_error(path, e))?;
                set_private(path)?;
                l
            }
            Err(e) => return Err(bind_error(path, e)),
        };
        let meta = std::fs::symlink_metadata(path)?;
        let listener = UnixListener::from_std(listener)?;
        Ok(MuxListener {
            listener,
            path: path.to_path_buf(),
            id: (meta.dev(), meta.ino()),
            uid,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the next peer whose uid is ours; others are logged and
    /// closed. An error is an accept failure (e.g. out of descriptors):
    /// back off before retrying.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        loop {
            let (stream, _) = self.listener.accept().await?;
            match stream.peer_cred() {
                Ok(c) if c.uid() == self.uid => return Ok(stream),
                Ok(c) => tracing::warn!(
                    peer_uid = c.uid(),
                    peer_pid = c.pid(),
                    path = %self.path.display(),
                    "refused a mux client of another user"
                ),
                Err(e) => tracing::warn!("cannot check a mux client's credentials: {e}"),
            }
        }
    }
}

impl Drop for MuxListener {
    fn drop(&mut self) {
        // Only our own socket: a successor may already serve this path.
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates `dir` (0700) if missing, then checks it is a directory owned by
/// `uid` that neither group nor others may write. A symlink is followed
/// only if it is ours too (so nobody else can redirect it later).
fn ensure_private_dir(dir: &Path, uid: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot create the control socket directory {}: {e}",
                    dir.display()
                ),
            ));
        }
    }
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing control socket directory {}: {why}", dir.display()),
        ))
    };
    let link = std::fs::symlink_metadata(dir)?;
    if link.file_type().is_symlink() && link.uid() != uid {
        return refuse(format!(
            "it is a symlink owned by uid {} instead of us (uid {uid})",
            link.uid()
        ));
    }
    let meta = std::fs::metadata(dir)?;
    if !meta.is_dir() {
        return refuse("it is not a directory".into());
    }
    if meta.uid() != uid {
        return refuse(format!(
            "it is owned by uid {} instead of us (uid {uid}), who could swap the socket; \
             choose a directory of your own (e.g. ~/.ssh/sockets)",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    // Strict: even a sticky shared directory lets others plant a socket
    // under a name before we bind it.
    if mode & 0o022 != 0 {
        return refuse(format!(
            "its mode is {mode:03o}, so other users can write it and swap the socket; \
             run `chmod go-w {}` or choose a directory only you can write \
             (e.g. ~/.ssh/sockets)",
            dir.display()
        ));
    }
    Ok(())
}

/// Removes a stale socket at `path`; errors if a live one answers or if
/// something other than a socket is there.
fn remove_if_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; remove it or choose another control path",
                path.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(in_use(path)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "replacing a stale control socket");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot probe the existing socket {}: {e}", path.display()),
        )),
    }
}

/// The error for a path some live process serves.
fn in_use(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "another sshshim (or an ssh ControlMaster) is already serving {}; \
             stop it or choose another control path",
            path.display()
        ),
    )
}

/// A bind error with the path in it.
fn bind_error(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot bind control socket {}: {e}", path.display()),
    )
}

/// A unique sibling name for the temporary bind.
fn temp_name(path: &Path) -> PathBuf {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{:x}.{n}", std::process::id()));
    PathBuf::from(s)
}

/// Binds and listens, non-blocking for tokio.
fn bind_std(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let l = std::os::unix::net::UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// chmod 0600.
fn set_private(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Hard-links the bound temporary socket to `path`. If the path appeared
/// meanwhile, replaces it only if it is stale.
fn place(tmp: &Path, path: &Path) -> io::Result<()> {
    match std::fs::hard_link(tmp, path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            remove_if_stale(path)?;
            std::fs::hard_link(tmp, path).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => in_use(path),
                _ => bind_error(path, e),
            })
        }
        Err(e) => Err(bind_error(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails a test that has not finished within ten seconds.
    async fn bounded<F: std::future::Future>(f: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(10), f)
            .await
            .expect("test timed out")
    }

    /// A private temp dir.
    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        d
    }

    #[tokio::test]
    async fn binds_private_and_cleans_up() {
        bounded(async move {
            let d = dir();
            let path = d.path().join("sub/mux.sock");
            let l = MuxListener::bind(&path).unwrap();
            let m = std::fs::symlink_metadata(&path).unwrap();
            assert!(m.file_type().is_socket());
            assert_eq!(m.permissions().mode() & 0o777, 0o600);
            let sub = std::fs::metadata(d.path().join("sub")).unwrap();
            assert_eq!(sub.permissions().mode() & 0o777, 0o700);
            // Only the socket is left in the directory: the temporary is gone.
            let names: Vec<_> = std::fs::read_dir(d.path().join("sub"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, vec![std::ffi::OsString::from("mux.sock")]);

            let c = tokio::net::UnixStream::connect(&path).await.unwrap();
            let s = l.accept().await.unwrap();
            drop((c, s));
            drop(l);
            assert!(!path.exists());
        })
        .await
    }

    #[tokio::test]
    async fn stale_replaced_live_refused_files_kept() {
        bounded(async move {
            let d = dir();
            let path = d.path().join("mux.sock");
            drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
            assert!(path.exists(), "a dropped std listener leaves its file");
            let live = MuxListener::bind(&path).unwrap();

            let e = MuxListener::bind(&path).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
            assert!(e.to_string().contains("already serving"), "{e}");

            drop(live);
            std::fs::write(&path, b"precious").unwrap();
            let e = MuxListener::bind(&path).unwrap_err();
            assert!(e.to_string().contains("not a socket"), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        })
        .await
    }

    #[tokio::test]
    async fn writable_directories_are_refused_readable_ones_not() {
        bounded(async move {
            let d = dir();
            let path = d.path().join("s");
            // Our own directory that others may enter or list: fine, as
            // with OpenSSH (the socket is 0600 and peers are checked).
            for mode in [0o755, 0o711, 0o750, 0o705] {
                std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
                let l = MuxListener::bind(&path).unwrap_or_else(|e| panic!("{mode:o}: {e}"));
                drop(l);
            }
            // Writable by group or others, sticky or not: refused, saying
            // what to do.
            for mode in [0o775, 0o757, 0o777, 0o1777, 0o770] {
                std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode)).unwrap();
                let e = MuxListener::bind(&path).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
                let msg = e.to_string();
                assert!(msg.contains("other users can write it"), "{mode:o}: {msg}");
                assert!(msg.contains("chmod go-w"), "{mode:o}: {msg}");
                assert!(!path.exists(), "{mode:o}: bound anyway");
            }
            std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        })
        .await
    }

    #[tokio::test]
    async fn drop_leaves_a_successor_alone() {
        bounded(async move {
            let d = dir();
            let path = d.path().join("s");
            let first = MuxListener::bind(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            let second = MuxListener::bind(&path).unwrap();
            drop(first);
            assert!(path.exists());
            drop(second);
            assert!(!path.exists());
        })
        .await
    }
}

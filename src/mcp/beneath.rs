//! Local files of `copy`, confined beneath one directory (the MCP server's
//! working directory, or a profile's `copy_dir`).
//!
//! The path must be relative with no `..`; its directories are resolved
//! with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`, so no symlink
//! leads out (kernels before 5.6, without openat2: one `openat(O_NOFOLLOW)`
//! per component, which follows no symlink at all). The file itself is
//! opened relative to its directory with `O_NOFOLLOW`, never through a
//! symlink. sftp then gets the open descriptor (`/dev/fd/N`), not the path,
//! so nothing can be swapped in between.

use anyhow::{anyhow, bail};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Component, Path, PathBuf};

/// A local file opened for `copy`.
#[derive(Debug)]
pub struct Local {
    /// The open file (read-only for put, read-write for get).
    pub file: File,
    /// Where it is, for messages and the result.
    pub shown: PathBuf,
    /// The directory holding it, and its name there.
    parent: OwnedFd,
    /// Its name in `parent`.
    leaf: CString,
    /// True when this call created it (so a failed get removes it).
    created: bool,
}

impl Local {
    /// After a failed get: removes the file if this call created it and it
    /// is still the same file.
    pub fn discard(self) {
        if !self.created {
            return;
        }
        let Ok(ours) = self.file.metadata() else {
            return;
        };
        // SAFETY: an all-zero stat is a valid value for fstatat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, NUL-terminated name, valid out pointer.
        let rc = unsafe {
            libc::fstatat(
                self.parent.as_raw_fd(),
                self.leaf.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc == 0 && st.st_dev == ours.dev() && st.st_ino == ours.ino() {
            // SAFETY: valid descriptor and NUL-terminated name.
            unsafe { libc::unlinkat(self.parent.as_raw_fd(), self.leaf.as_ptr(), 0) };
        }
    }
}

/// The components of `rel`, refused unless it is a relative path without
/// `..` (`.` components are dropped).
fn components(rel: &str) -> anyhow::Result<Vec<&OsStr>> {
    if rel.is_empty() {
        bail!("local path is empty");
    }
    if rel.chars().any(char::is_control) {
        return Err(anyhow!("local path {rel:?} has a control character"));
    }
    let mut out = Vec::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(anyhow!(
                    "local path '{rel}' is absolute; copy takes a path relative to its directory"
                ));
            }
            Component::ParentDir => {
                return Err(anyhow!(
                    "local path '{rel}' has '..'; copy stays beneath its directory"
                ));
            }
        }
    }
    Ok(out)
}

/// `name` as a C string (components never hold NUL: checked above).
fn c_name(name: &OsStr) -> anyhow::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| anyhow!("a path has a NUL byte"))
}

/// `openat(dir, name, flags, mode)` as an owned descriptor.
fn openat(dir: &OwnedFd, name: &CString, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: valid descriptor, NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat2(dir, path, O_PATH | O_DIRECTORY, RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS)`; `None` when the kernel has no openat2.
fn openat2_dir(dir: &OwnedFd, path: &CString) -> Option<io::Result<OwnedFd>> {
    // SAFETY: open_how is plain data; all-zero is "no flags".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid descriptor, NUL-terminated path, `how` valid for its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // ENOSYS: an old kernel; EPERM: a seccomp filter that predates it.
        if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) {
            return None;
        }
        return Some(Err(e));
    }
    // SAFETY: a fresh descriptor we own.
    Some(Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Opens the directory `dirs` (components, possibly none) beneath `root`.
fn open_dir(root: &OwnedFd, dirs: &[&OsStr]) -> io::Result<OwnedFd> {
    let dup = || root.try_clone();
    if dirs.is_empty() {
        return dup();
    }
    let joined: PathBuf = dirs.iter().collect();
    let c = CString::new(joined.as_os_str().as_bytes()).map_err(io::Error::other)?;
    if let Some(r) = openat2_dir(root, &c) {
        return r;
    }
    let mut cur = dup()?;
    for d in dirs {
        let c = CString::new(d.as_bytes()).map_err(io::Error::other)?;
        let next = openat(
            &cur,
            &c,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        // O_PATH | O_NOFOLLOW may open a symlink itself: refuse it.
        if !File::from(next.try_clone()?).metadata()?.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ELOOP));
        }
        cur = next;
    }
    Ok(cur)
}

/// The root directory as a descriptor.
fn open_root(root: &Path) -> anyhow::Result<OwnedFd> {
    let c = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| anyhow!("{} has a NUL byte", root.display()))?;
    // SAFETY: NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(anyhow!(
            "cannot open the copy directory {}: {}",
            root.display(),
            io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An error opening `rel` beneath `root`, said plainly.
fn explain(root: &Path, rel: &str, e: io::Error) -> anyhow::Error {
    let why = match e.raw_os_error() {
        Some(libc::EXDEV) => {
            "it leads out of the copy directory through a symbolic link".to_owned()
        }
        Some(libc::ELOOP) => "it goes through a symbolic link, which copy does not follow \
             there"
            .to_owned(),
        _ => e.to_string(),
    };
    anyhow!(
        "local path '{rel}' (beneath {}) refused: {why}",
        root.display()
    )
}

/// Opens `rel` beneath `root` for reading (a put).
pub fn open_for_put(root: &Path, rel: &str) -> anyhow::Result<Local> {
    let comps = components(rel)?;
    let Some((leaf, dirs)) = comps.split_last() else {
        return Err(anyhow!("local path '{rel}' names no file"));
    };
    let rootfd = open_root(root)?;
    let parent = open_dir(&rootfd, dirs).map_err(|e| explain(root, rel, e))?;
    let leaf = c_name(leaf)?;
    let fd = openat(
        &parent,
        &leaf,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
        0,
    )
    .map_err(|e| explain(root, rel, e))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| explain(root, rel, e))?;
    let shown = root.join(comps.iter().collect::<PathBuf>());
    if !meta.is_file() {
        return Err(anyhow!("{} is not a regular file", shown.display()));
    }
    Ok(Local {
        file,
        shown,
        parent,
        leaf,
        created: false,
    })
}

/// Opens `rel` beneath `root` for writing (a get): a new file is created
/// (`O_EXCL`), an existing one must be a regular file with one link; an
/// existing directory receives the file as `remote_base`.
pub fn open_for_get<'a>(root: &Path, rel: &'a str, remote_base: &'a str) -> anyhow::Result<Local> {
    let mut comps = components(rel)?;
    let rootfd = open_root(root)?;
    let into_dir = |comps: &mut Vec<&'a OsStr>| -> anyhow::Result<()> {
        if remote_base.is_empty()
            || remote_base == "."
            || remote_base == ".."
            || remote_base.contains('/')
        {
            return Err(anyhow!("the remote path names no file ('{remote_base}')"));
        }
        comps.push(OsStr::new(remote_base));
        Ok(())
    };
    match comps.split_last() {
        None => into_dir(&mut comps)?,
        Some((leaf, dirs)) => {
            let parent = open_dir(&rootfd, dirs).map_err(|e| explain(root, rel, e))?;
            let c = c_name(leaf)?;
            let is_dir = openat(
                &parent,
                &c,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .ok()
            .and_then(|fd| File::from(fd).metadata().ok())
            .is_some_and(|m| m.is_dir());
            if is_dir {
                into_dir(&mut comps)?;
            }
        }
    }
    let (leaf, dirs) = comps.split_last().expect("at least one component");
    let shown = root.join(comps.iter().collect::<PathBuf>());
    let parent = open_dir(&rootfd, dirs).map_err(|e| explain(root, rel, e))?;
    let leaf = c_name(leaf)?;
    let flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_NONBLOCK;
    let (fd, created) = match openat(&parent, &leaf, flags | libc::O_CREAT | libc::O_EXCL, 0o666) {
        Ok(fd) => (fd, true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => (
            openat(&parent, &leaf, flags, 0).map_err(|e| explain(root, rel, e))?,
            false,
        ),
        Err(e) => return Err(explain(root, rel, e)),
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| explain(root, rel, e))?;
    if !meta.is_file() {
        return Err(anyhow!(
            "{} exists and is not a regular file",
            shown.display()
        ));
    }
    if meta.nlink() > 1 {
        return Err(anyhow!(
            "{} has other hard links; copy does not write through them",
            shown.display()
        ));
    }
    Ok(Local {
        file,
        shown,
        parent,
        leaf,
        created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_relative_without_dotdot() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"x").unwrap();
        assert!(open_for_put(d.path(), "f").is_ok());
        assert!(open_for_put(d.path(), "./f").is_ok());
        let e = open_for_put(d.path(), "/etc/passwd")
            .unwrap_err()
            .to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = open_for_put(d.path(), "a/../../f").unwrap_err().to_string();
        assert!(e.contains("'..'"), "{e}");
        let e = open_for_get(d.path(), "../g", "g").unwrap_err().to_string();
        assert!(e.contains("'..'"), "{e}");
        assert!(open_for_put(d.path(), "").is_err());
    }

    #[test]
    fn symlinks_do_not_lead_out() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("leaf")).unwrap();
        for rel in ["out/secret", "leaf"] {
            let e = open_for_put(d.path(), rel).unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{rel}: {e}");
            let e = open_for_get(d.path(), rel, "x").unwrap_err().to_string();
            assert!(e.contains("symbolic link"), "{rel}: {e}");
        }
        let e = open_for_get(d.path(), "out/new", "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"s");
        assert!(!outside.path().join("new").exists());
        // A symlink inside the directory, to inside it, is fine for the
        // directories of the path (openat2 kernels).
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("sub", d.path().join("alias")).unwrap();
        std::fs::write(d.path().join("sub/f"), b"y").unwrap();
        if openat2_dir(&open_root(d.path()).unwrap(), &CString::new("sub").unwrap()).is_some() {
            assert!(open_for_put(d.path(), "alias/f").is_ok());
        }
    }

    #[test]
    fn get_creates_or_reuses_and_fills_directories() {
        let d = tempfile::tempdir().unwrap();
        let l = open_for_get(d.path(), "new", "r").unwrap();
        assert!(l.created);
        assert_eq!(l.shown, d.path().join("new"));
        l.discard();
        assert!(!d.path().join("new").exists());
        std::fs::write(d.path().join("old"), b"o").unwrap();
        let l = open_for_get(d.path(), "old", "r").unwrap();
        assert!(!l.created);
        l.discard();
        assert!(d.path().join("old").exists(), "an existing file is kept");
        std::fs::create_dir(d.path().join("dl")).unwrap();
        let l = open_for_get(d.path(), "dl", "remote.bin").unwrap();
        assert_eq!(l.shown, d.path().join("dl/remote.bin"));
        let l = open_for_get(d.path(), ".", "r2").unwrap();
        assert_eq!(l.shown, d.path().join("r2"));
        assert!(open_for_get(d.path(), ".", "..").is_err());
        std::fs::hard_link(d.path().join("old"), d.path().join("twin")).unwrap();
        let e = open_for_get(d.path(), "twin", "r").unwrap_err().to_string();
        assert!(e.contains("hard links"), "{e}");
    }
}

//! Where things are: the home directory, `~` expansion, the current user,
//! sshshim's own state, runtime and config directories, and private
//! directory creation. A ground module: it imports nothing from the crate.
//!
//! One home for each of these, so every part of sshshim agrees on them.

use std::ffi::CStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The passwd entry's (login name, home directory, login shell) for our uid.
fn passwd_entry() -> Option<(String, PathBuf, PathBuf)> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwuid_r to overwrite.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the stated size; getpwuid_r is
    // reentrant (unlike getpwuid, whose static buffer threads would share).
    let rc = unsafe {
        libc::getpwuid_r(
            libc::getuid(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name and pw_dir point to NUL-terminated strings in `buf`.
    let (name, dir) = unsafe { (CStr::from_ptr(pw.pw_name), CStr::from_ptr(pw.pw_dir)) };
    // SAFETY: as pw_dir; a null pw_shell is taken as empty.
    let shell = (!pw.pw_shell.is_null()).then(|| unsafe { CStr::from_ptr(pw.pw_shell) });
    Some((
        name.to_string_lossy().into_owned(),
        PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())),
        PathBuf::from(std::ffi::OsStr::from_bytes(
            shell.map_or(&b""[..], |s| s.to_bytes()),
        )),
    ))
}

/// The user's home directory: `$HOME` when set, else the passwd entry's.
///
/// OpenSSH reads only the passwd entry. They agree for a normal login; where
/// they differ someone set `$HOME` on purpose (a sandbox, a test, a
/// container whose passwd lacks our uid), and sshshim's own files should
/// follow it. ssh_config values are expanded by `ssh -G` itself.
pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .or_else(|| passwd_entry().map(|(_, d, _)| d))
        .filter(|d| !d.as_os_str().is_empty())
}

/// Expands a leading `~` or `~/` to the home directory. `~user` is left
/// alone, as is everything when no home directory is known.
pub fn expand_tilde(p: &Path) -> PathBuf {
    let bytes = p.as_os_str().as_bytes();
    let rest = if bytes == b"~" {
        Some(Path::new(""))
    } else if bytes.starts_with(b"~/") {
        Some(Path::new(std::ffi::OsStr::from_bytes(&bytes[2..])))
    } else {
        None
    };
    match (rest, home_dir()) {
        (Some(rest), Some(home)) if rest.as_os_str().is_empty() => home,
        (Some(rest), Some(home)) => home.join(rest),
        _ => p.to_path_buf(),
    }
}

/// The current user's login name, as OpenSSH takes it: the passwd entry
/// for our uid, then `$USER`.
pub fn current_user() -> String {
    passwd_entry()
        .map(|(n, _, _)| n)
        .filter(|n| !n.is_empty())
        .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "root".into())
}

/// The user's login shell from the passwd entry, as sshd runs commands
/// with it; `/bin/sh` when the entry names none.
pub fn login_shell() -> PathBuf {
    passwd_entry()
        .map(|(_, _, s)| s)
        .filter(|s| !s.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("/bin/sh"))
}

/// Our effective uid.
pub fn my_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// OpenSSH's default identity files, in the order it tries them (what
/// `ssh -G` prints when the configuration names none).
pub fn default_identities() -> Vec<PathBuf> {
    const NAMES: [&str; 7] = [
        "id_rsa",
        "id_ecdsa",
        "id_ecdsa_sk",
        "id_ed25519",
        "id_ed25519_sk",
        "id_xmss",
        "id_dsa",
    ];
    let Some(ssh) = home_dir().map(|h| h.join(".ssh")) else {
        return Vec::new();
    };
    NAMES.iter().map(|n| ssh.join(n)).collect()
}

/// An XDG base directory from `var`, else `fallback` under the home directory.
fn xdg(var: &str, fallback: &str) -> io::Result<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(fallback)))
        .ok_or_else(|| io::Error::other(format!("neither {var} nor HOME is set")))
}

/// sshshim's state directory (`$XDG_STATE_HOME/sshshim`, else
/// `~/.local/state/sshshim`), private to us: host key, known_hosts of the
/// endpoint aliases, spill files.
pub fn state_dir() -> io::Result<PathBuf> {
    let dir = xdg("XDG_STATE_HOME", ".local/state")?.join("sshshim");
    create_private_dir(&dir)?;
    Ok(dir)
}

/// sshshim's configuration directory (`$XDG_CONFIG_HOME/sshshim`, else
/// `~/.config/sshshim`); not created here.
pub fn config_dir() -> io::Result<PathBuf> {
    Ok(xdg("XDG_CONFIG_HOME", ".config")?.join("sshshim"))
}

/// The longest Unix socket path the kernel takes: `sun_path` is 108
/// bytes, one of them the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Room [`runtime_dir`] keeps for a socket's own name (`/NAME.mux`): a
/// runtime directory longer than `MAX_SOCKET_PATH` minus this is refused.
const SOCKET_NAME_ROOM: usize = 32;

/// Where sshshim's sockets live (control sockets, and mux sockets that
/// ssh_config Host blocks name): `$XDG_RUNTIME_DIR/sshshim` when that is
/// a private directory of ours (absolute, a real directory owned by us,
/// mode 0700, as the XDG spec requires), else `sshshim/run` in the state
/// directory (`$XDG_STATE_HOME`, else `~/.local/state`). Never a shared
/// directory such as `/tmp`: OpenSSH's mux client does not authenticate
/// the master, so whoever could create the socket there first would
/// receive the user's commands. Not created here (clients create
/// nothing): see [`create_private_dir`]. An error when neither is known,
/// or when the directory is too long to hold a socket (`sun_path` is 108
/// bytes): the message says to point `XDG_RUNTIME_DIR` at a shorter one.
pub fn runtime_dir() -> io::Result<PathBuf> {
    let state_home = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home_dir().map(|h| h.join(".local/state")));
    runtime_dir_in(
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .as_deref(),
        state_home.as_deref(),
        my_uid(),
    )
}

/// [`runtime_dir`] with its inputs given, for tests: `runtime` is
/// `$XDG_RUNTIME_DIR`, `state_home` the state base directory.
pub fn runtime_dir_in(
    runtime: Option<&Path>,
    state_home: Option<&Path>,
    uid: u32,
) -> io::Result<PathBuf> {
    let private = |r: &&Path| {
        r.is_absolute()
            && std::fs::symlink_metadata(r)
                .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o077 == 0)
    };
    let dir = match (runtime.filter(private), state_home) {
        (Some(r), _) => r.join("sshshim"),
        (None, Some(s)) if s.is_absolute() => s.join("sshshim/run"),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no private directory for sshshim's sockets: XDG_RUNTIME_DIR is not a \
                 private (0700) directory of ours, and neither XDG_STATE_HOME nor HOME \
                 is set to an absolute path",
            ));
        }
    };
    let len = dir.as_os_str().len();
    if len + SOCKET_NAME_ROOM > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "sshshim's socket directory {} is {len} bytes long, too long for Unix socket \
                 paths (at most {MAX_SOCKET_PATH} bytes with the socket's name); set \
                 XDG_RUNTIME_DIR to a private (0700) directory of yours with a shorter path",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

/// Makes `name` safe as one file-name component or ssh_config alias:
/// ASCII letters, digits, `.`, `_` and `-` stay, every other byte (of the
/// UTF-8 form) is written `+XX` (upper-case hex), `+` itself included.
/// Escaping, not folding, keeps it injective: two names never share a
/// socket or alias (`root@h:1` is `root+40h+3A1`, `root_h_1` stays). `+`
/// rather than `%`, which OpenSSH expands in `ControlPath` (a socket path
/// copied from `sshshim status` into `-o ControlPath=` must work as is).
/// The empty name becomes `+` (no other name does), never a hidden file.
pub fn safe_name(name: &str) -> String {
    if name.is_empty() {
        return "+".into();
    }
    let mut s = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            s.push(b as char);
        } else {
            s.push_str(&format!("+{b:02X}"));
        }
    }
    s
}

/// Creates `dir` (and its parents) for sshshim's private use: a missing
/// leaf is created 0700 with no window; an existing one must be a real
/// directory (not a symlink) owned by us, and is tightened to 0700 if it
/// was wider. Refuses, saying why, when another user could own or swap it
/// (a shared `/tmp` is where that happens).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(io::Error::new(
            e.kind(),
            format!("cannot create directory {}: {e}", dir.display()),
        ));
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("refusing to use directory {}: {why}", dir.display()),
        ))
    };
    if !meta.file_type().is_dir() {
        return refuse("it is not a directory (a symlink or file is in the way)".into());
    }
    let uid = my_uid();
    if meta.uid() != uid {
        return refuse(format!(
            "it is owned by uid {} instead of us (uid {uid}); another user may have created it",
            meta.uid()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_forms() {
        let home = home_dir().expect("a home directory");
        assert_eq!(expand_tilde(Path::new("~")), home);
        assert_eq!(expand_tilde(Path::new("~/.ssh/x")), home.join(".ssh/x"));
        assert_eq!(expand_tilde(Path::new("~bob/x")), PathBuf::from("~bob/x"));
        assert_eq!(expand_tilde(Path::new("/a/~/b")), PathBuf::from("/a/~/b"));
        assert_eq!(expand_tilde(Path::new("rel")), PathBuf::from("rel"));
    }

    #[test]
    fn user_and_identities() {
        assert!(!current_user().is_empty());
        let ids = default_identities();
        assert_eq!(ids.len(), 7);
        assert!(ids[0].ends_with(".ssh/id_rsa"), "{ids:?}");
        assert!(ids[3].ends_with(".ssh/id_ed25519"), "{ids:?}");
    }

    #[test]
    fn safe_names() {
        assert_eq!(safe_name("prod"), "prod");
        assert_eq!(safe_name("x.y-z_1"), "x.y-z_1");
        assert_eq!(safe_name("a b/c@d"), "a+20b+2Fc+40d");
        assert_eq!(safe_name("1+1%"), "1+2B1+25");
        assert_eq!(safe_name("é"), "+C3+A9");
        assert_eq!(safe_name(""), "+");
        // The collision of the audit (issue 26): folded, both were
        // `root_127.0.0.1_23401`.
        assert_ne!(
            safe_name("root@127.0.0.1:23401"),
            safe_name("root_127.0.0.1_23401")
        );
        assert_eq!(safe_name("root_127.0.0.1_23401"), "root_127.0.0.1_23401");
    }

    /// Inverse of [`safe_name`], to show nothing is lost.
    fn unescape(s: &str) -> Vec<u8> {
        if s == "+" {
            return Vec::new();
        }
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'+' {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzzing::config())]

        /// Every name maps to a non-empty, safe component from which the
        /// name can be read back, so no two names share one.
        #[test]
        fn safe_name_is_injective(a in "\\PC{0,24}", b in "[a-z@:_%+. /-]{0,12}") {
            for n in [&a, &b] {
                let s = safe_name(n);
                proptest::prop_assert!(!s.is_empty());
                proptest::prop_assert_eq!(s.starts_with('.'), n.starts_with('.'));
                proptest::prop_assert!(s.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-+".contains(&c)));
                proptest::prop_assert_eq!(unescape(&s), n.as_bytes());
            }
            proptest::prop_assert_eq!(a == b, safe_name(&a) == safe_name(&b));
        }
    }

    #[test]
    fn runtime_dirs() {
        let t = tempfile::tempdir().unwrap();
        let me = my_uid();
        let state = t.path().join("state");
        let run = t.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let got = |r: Option<&Path>, uid| runtime_dir_in(r, Some(&state), uid).unwrap();
        // A private runtime directory of ours is used.
        assert_eq!(got(Some(&run), me), run.join("sshshim"));
        // Anything else falls back to the state directory, never /tmp:
        // unset, relative, missing, someone else's, too open, a symlink.
        let fallback = state.join("sshshim/run");
        assert_eq!(got(None, me), fallback);
        assert_eq!(got(Some(Path::new("rel")), me), fallback);
        assert_eq!(got(Some(&t.path().join("missing")), me), fallback);
        assert_eq!(got(Some(&run), me + 1), fallback);
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&run, &link).unwrap();
        assert_eq!(got(Some(&link), me), fallback);
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(got(Some(&run), me), fallback);
        // No base at all, or one too long for a socket path: a clear error.
        let e = runtime_dir_in(None, None, me).unwrap_err();
        assert!(e.to_string().contains("XDG_RUNTIME_DIR"), "{e}");
        let long = PathBuf::from(format!("/{}", "x".repeat(80)));
        let e = runtime_dir_in(None, Some(&long), me).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
        assert!(e.to_string().contains("set XDG_RUNTIME_DIR"), "{e}");
    }

    #[test]
    fn private_dirs() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b");
        create_private_dir(&d).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d), 0o700);
        // An existing directory of ours that is too open is tightened.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        // A symlink in the way is refused, not followed.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = create_private_dir(&link).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        // A file in the way too.
        let f = t.path().join("file");
        std::fs::write(&f, "").unwrap();
        assert!(create_private_dir(&f).is_err());
    }
}

//! Starts a session's command as sshd would: the user's login shell with
//! `-c`, a login shell for `shell`, a subsystem's program; in its own
//! session, with a pty (the helper's own: sshd never allocates one for the
//! helper) when asked.

use std::ffi::{CStr, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::sshd;
use crate::paths;
use crate::resume::wire::{Command, PtySpec, StartSpec};

/// A started command and our ends of its stdio (all non-blocking).
pub struct Spawned {
    /// The process (its pid is also its process group; with a pty, its
    /// session too).
    pub child: tokio::process::Child,
    /// Where its input goes: a pipe, or the pty master.
    pub stdin: OwnedFd,
    /// Its output: a pipe, or the pty master.
    pub stdout: OwnedFd,
    /// Its stderr; none with a pty.
    pub stderr: Option<OwnedFd>,
    /// The pty master, for window changes.
    pub pty: Option<OwnedFd>,
}

/// Why a session's command could not start; its text is sent to the
/// client in `Refused`.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// sshd serves the subsystem itself (internal-sftp).
    #[error("sshd runs subsystem {0} inside itself (internal-sftp): there is no program to run")]
    InternalSubsystem(String),
    /// sshd's configuration has no such subsystem.
    #[error("sshd's configuration ({}) names no subsystem {name}", config.display())]
    NoSubsystem {
        /// The subsystem asked for.
        name: String,
        /// The sshd_config read.
        config: std::path::PathBuf,
    },
    /// A forwards helper runs no command (its daemon carries connections).
    #[error("a helper for forwarded connections runs no command")]
    NoCommand,
    /// The shell could not be started.
    #[error("cannot start {}: {source}", shell.display())]
    Start {
        /// The login shell.
        shell: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Starts what `spec` asks.
pub fn spawn(spec: &StartSpec) -> Result<Spawned, SpawnError> {
    let shell = paths::login_shell();
    let shell_name = shell
        .file_name()
        .map(OsStr::to_os_string)
        .unwrap_or_else(|| shell.clone().into_os_string());
    let mut cmd = tokio::process::Command::new(&shell);
    match &spec.command {
        Command::Shell => {
            let mut argv0 = OsString::from("-");
            argv0.push(&shell_name);
            cmd.arg0(argv0);
        }
        Command::Exec(line) => {
            cmd.arg0(&shell_name)
                .arg("-c")
                .arg(OsString::from_vec(line.clone()));
        }
        Command::Subsystem(name) => match sshd::subsystem(name) {
            Some(sshd::Subsystem::Program(p)) => {
                cmd.arg0(&shell_name).arg("-c").arg(p);
            }
            Some(sshd::Subsystem::Internal) => {
                return Err(SpawnError::InternalSubsystem(name.clone()));
            }
            None => {
                return Err(SpawnError::NoSubsystem {
                    name: name.clone(),
                    config: sshd::config_path(),
                });
            }
        },
        Command::Forwards => return Err(SpawnError::NoCommand),
    }
    if let Some(home) = paths::home_dir() {
        cmd.current_dir(home);
    }
    cmd.kill_on_drop(false);
    let spawned = match &spec.pty {
        None => spawn_piped(cmd),
        Some(p) => spawn_pty(cmd, p),
    };
    spawned.map_err(|source| SpawnError::Start { shell, source })
}

/// With three pipes.
fn spawn_piped(mut cmd: tokio::process::Command) -> io::Result<Spawned> {
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    cmd.stdin(Stdio::from(in_r))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    // Its own process group, for signals and the hang-up. The daemon
    // already left sshd's session and has no controlling terminal, so the
    // command has none either. Without a pre_exec hook std can use
    // posix_spawn (no copy of the daemon's page tables): a resumable
    // command starts about a millisecond sooner.
    cmd.process_group(0);
    let child = cmd.spawn()?;
    // `cmd` held the child's ends; they close with it here.
    drop(cmd);
    for fd in [&in_w, &out_r, &err_r] {
        set_nonblocking(fd.as_raw_fd())?;
    }
    Ok(Spawned {
        child,
        stdin: in_w,
        stdout: out_r,
        stderr: Some(err_r),
        pty: None,
    })
}

/// On a new pty: the slave is its controlling terminal and stdio.
fn spawn_pty(mut cmd: tokio::process::Command, p: &PtySpec) -> io::Result<Spawned> {
    let (master, slave, name) = open_pty()?;
    apply_modes(slave.as_raw_fd(), &p.modes)?;
    set_window(master.as_raw_fd(), p.cols, p.rows, p.px, p.py)?;
    cmd.env("TERM", &p.term).env("SSH_TTY", &name);
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid and ioctl are async-signal-safe and touch no memory
    // of ours; fd 0 is the slave by now (stdio is set up before pre_exec).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Our copies of the slave go with `cmd`: the master then reads EIO
    // once the command's side is closed.
    drop(cmd);
    set_nonblocking(master.as_raw_fd())?;
    Ok(Spawned {
        child,
        stdin: master.try_clone()?,
        stdout: master.try_clone()?,
        stderr: None,
        pty: Some(master),
    })
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are open descriptors that we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; no memory involved.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A new pty: (master, slave, the slave's path).
fn open_pty() -> io::Result<(OwnedFd, OwnedFd, PathBuf)> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `m` is an open descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt take the master; ptsname_r writes at most
    // `name.len()` bytes, NUL included.
    unsafe {
        if libc::grantpt(m) != 0
            || libc::unlockpt(m) != 0
            || libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    // SAFETY: open with a valid C string; returns a new descriptor or -1.
    let s = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `s` is an open descriptor that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    let path = PathBuf::from(OsStr::from_bytes(path.to_bytes()));
    Ok((master, slave, path))
}

/// TIOCSWINSZ on the pty.
pub fn set_window(fd: RawFd, cols: u32, rows: u32, px: u32, py: u32) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows.min(u16::MAX as u32) as u16,
        ws_col: cols.min(u16::MAX as u32) as u16,
        ws_xpixel: px.min(u16::MAX as u32) as u16,
        ws_ypixel: py.min(u16::MAX as u32) as u16,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Applies SSH's encoded terminal modes (RFC 4254 section 8) to the tty
/// `fd`, as sshd does; opcodes Linux has no equivalent for are skipped.
fn apply_modes(fd: RawFd, modes: &[(u8, u32)]) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr overwrites it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is valid for writing.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for &(op, v) in modes {
        apply_mode(&mut t, op, v);
    }
    // SAFETY: `t` is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One mode into `t`.
fn apply_mode(t: &mut libc::termios, op: u8, v: u32) {
    let cc = match op {
        1 => Some(libc::VINTR),
        2 => Some(libc::VQUIT),
        3 => Some(libc::VERASE),
        4 => Some(libc::VKILL),
        5 => Some(libc::VEOF),
        6 => Some(libc::VEOL),
        7 => Some(libc::VEOL2),
        8 => Some(libc::VSTART),
        9 => Some(libc::VSTOP),
        10 => Some(libc::VSUSP),
        12 => Some(libc::VREPRINT),
        13 => Some(libc::VWERASE),
        14 => Some(libc::VLNEXT),
        16 => Some(libc::VSWTC),
        18 => Some(libc::VDISCARD),
        _ => None,
    };
    if let Some(i) = cc {
        // 255 means "disabled" in SSH's encoding (_POSIX_VDISABLE is 0 on Linux).
        t.c_cc[i] = if v == 255 { 0 } else { v as libc::cc_t };
        return;
    }
    let (field, bit) = match op {
        30 => (&mut t.c_iflag, libc::IGNPAR),
        31 => (&mut t.c_iflag, libc::PARMRK),
        32 => (&mut t.c_iflag, libc::INPCK),
        33 => (&mut t.c_iflag, libc::ISTRIP),
        34 => (&mut t.c_iflag, libc::INLCR),
        35 => (&mut t.c_iflag, libc::IGNCR),
        36 => (&mut t.c_iflag, libc::ICRNL),
        37 => (&mut t.c_iflag, libc::IUCLC),
        38 => (&mut t.c_iflag, libc::IXON),
        39 => (&mut t.c_iflag, libc::IXANY),
        40 => (&mut t.c_iflag, libc::IXOFF),
        41 => (&mut t.c_iflag, libc::IMAXBEL),
        42 => (&mut t.c_iflag, libc::IUTF8),
        50 => (&mut t.c_lflag, libc::ISIG),
        51 => (&mut t.c_lflag, libc::ICANON),
        52 => (&mut t.c_lflag, libc::XCASE),
        53 => (&mut t.c_lflag, libc::ECHO),
        54 => (&mut t.c_lflag, libc::ECHOE),
        55 => (&mut t.c_lflag, libc::ECHOK),
        56 => (&mut t.c_lflag, libc::ECHONL),
        57 => (&mut t.c_lflag, libc::NOFLSH),
        58 => (&mut t.c_lflag, libc::TOSTOP),
        59 => (&mut t.c_lflag, libc::IEXTEN),
        60 => (&mut t.c_lflag, libc::ECHOCTL),
        61 => (&mut t.c_lflag, libc::ECHOKE),
        62 => (&mut t.c_lflag, libc::PENDIN),
        70 => (&mut t.c_oflag, libc::OPOST),
        71 => (&mut t.c_oflag, libc::OLCUC),
        72 => (&mut t.c_oflag, libc::ONLCR),
        73 => (&mut t.c_oflag, libc::OCRNL),
        74 => (&mut t.c_oflag, libc::ONOCR),
        75 => (&mut t.c_oflag, libc::ONLRET),
        // As OpenSSH takes them: flags of c_cflag.
        90 => (&mut t.c_cflag, libc::CS7),
        91 => (&mut t.c_cflag, libc::CS8),
        92 => (&mut t.c_cflag, libc::PARENB),
        93 => (&mut t.c_cflag, libc::PARODD),
        128 | 129 => {
            if let Some(speed) = baud(v) {
                // SAFETY: `t` is a valid termios; the speed a B constant.
                unsafe {
                    if op == 128 {
                        libc::cfsetispeed(t, speed);
                    } else {
                        libc::cfsetospeed(t, speed);
                    }
                }
            }
            return;
        }
        _ => return,
    };
    if v != 0 {
        *field |= bit;
    } else {
        *field &= !bit;
    }
}

/// The termios speed constant for a baud rate.
fn baud(v: u32) -> Option<libc::speed_t> {
    Some(match v {
        0 => libc::B0,
        50 => libc::B50,
        75 => libc::B75,
        110 => libc::B110,
        134 => libc::B134,
        150 => libc::B150,
        200 => libc::B200,
        300 => libc::B300,
        600 => libc::B600,
        1200 => libc::B1200,
        1800 => libc::B1800,
        2400 => libc::B2400,
        4800 => libc::B4800,
        9600 => libc::B9600,
        19200 => libc::B19200,
        38400 => libc::B38400,
        57600 => libc::B57600,
        115200 => libc::B115200,
        230400 => libc::B230400,
        460800 => libc::B460800,
        _ => return None,
    })
}

/// Signals by their SSH names (RFC 4254 6.10, and those OpenSSH adds).
const SIGNALS: [(&str, libc::c_int); 15] = [
    ("ABRT", libc::SIGABRT),
    ("ALRM", libc::SIGALRM),
    ("FPE", libc::SIGFPE),
    ("HUP", libc::SIGHUP),
    ("ILL", libc::SIGILL),
    ("INT", libc::SIGINT),
    ("KILL", libc::SIGKILL),
    ("PIPE", libc::SIGPIPE),
    ("QUIT", libc::SIGQUIT),
    ("SEGV", libc::SIGSEGV),
    ("TERM", libc::SIGTERM),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("BUS", libc::SIGBUS),
    ("TRAP", libc::SIGTRAP),
];

/// The signal number of an SSH signal name.
pub fn signal_number(name: &str) -> Option<libc::c_int> {
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The SSH name of a signal number (OpenSSH's `SIG@openssh.com` for one
/// SSH has no name for).
pub fn signal_name(sig: libc::c_int) -> String {
    SIGNALS
        .iter()
        .find(|(_, s)| *s == sig)
        .map_or("SIG@openssh.com", |(n, _)| n)
        .to_string()
}

/// Sends `sig` to process `pid` (negative: its process group); a process
/// already gone is not an error here.
pub fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: kill takes plain integers.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Our working directory for the daemon: the home directory, as sshd's.
pub fn home() -> PathBuf {
    paths::home_dir().unwrap_or_else(|| Path::new("/").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_set_and_clear_flags() {
        // SAFETY: termios is plain data.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        apply_mode(&mut t, 53, 1);
        apply_mode(&mut t, 72, 1);
        apply_mode(&mut t, 3, 0x7f);
        apply_mode(&mut t, 1, 255);
        assert_ne!(t.c_lflag & libc::ECHO, 0);
        assert_ne!(t.c_oflag & libc::ONLCR, 0);
        assert_eq!(t.c_cc[libc::VERASE], 0x7f);
        assert_eq!(t.c_cc[libc::VINTR], 0);
        apply_mode(&mut t, 53, 0);
        assert_eq!(t.c_lflag & libc::ECHO, 0);
        apply_mode(&mut t, 129, 38400);
        // SAFETY: `t` is a valid termios.
        assert_eq!(unsafe { libc::cfgetospeed(&t) }, libc::B38400);
        apply_mode(&mut t, 200, 1);
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_number("TERM"), Some(libc::SIGTERM));
        assert_eq!(signal_name(libc::SIGKILL), "KILL");
        assert_eq!(signal_name(libc::SIGWINCH), "SIG@openssh.com");
        assert_eq!(signal_number("NOPE"), None);
    }
}

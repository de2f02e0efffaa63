//! Commands and file copies through a running shim, for the `exec` and
//! `copy` tools of `sshshim mcp`.
//!
//! Both run the OpenSSH client against the shim's local endpoint, so they
//! open no new upstream connection. The endpoint's host key is checked
//! against sshshim's own known_hosts under the alias `sshshim-NAME` (recorded
//! by every `sshshim up`), and `BatchMode=yes` makes any prompt a failure
//! instead of a hang.

use anyhow::{anyhow, bail};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

/// Most bytes of stdout (and, separately, stderr) that `exec` returns.
pub const OUTPUT_CAP: usize = 1 << 20;

/// Most bytes of sftp's own messages kept for an error report.
const SFTP_MESSAGES_CAP: usize = 64 << 10;

/// Where and how to reach one running shim.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Profile name (for the host key alias).
    pub name: String,
    /// The endpoint address to connect to (never a wildcard address).
    pub endpoint: SocketAddr,
    /// sshshim's known_hosts, where the endpoint's key is pinned.
    pub known_hosts: PathBuf,
    /// Identity files to offer, on top of the agent and OpenSSH's defaults.
    pub identities: Vec<PathBuf>,
    /// The directory `copy` stays beneath.
    pub copy_dir: PathBuf,
    /// Files a `get` never writes, wherever they are (sshshim's profiles
    /// file: writing it would grant MCP any key it likes).
    pub keep: Vec<PathBuf>,
}

impl Target {
    /// Parses the `endpoint` of a status report; a wildcard listen address
    /// (0.0.0.0, ::) is reached on loopback.
    pub fn endpoint_of(endpoint: &str) -> anyhow::Result<SocketAddr> {
        let mut addr: SocketAddr = endpoint
            .parse()
            .map_err(|_| anyhow!("unexpected endpoint address '{endpoint}' in the status"))?;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(addr)
    }

    /// OpenSSH client options shared by ssh and sftp (everything but the
    /// port flag, which they spell differently, and the host).
    fn options(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec!["-F".into(), "/dev/null".into()];
        let mut kh_opt = OsString::from("UserKnownHostsFile=");
        kh_opt.push(quote_ssh_path(self.known_hosts.as_os_str()));
        for o in [
            "BatchMode=yes".into(),
            "StrictHostKeyChecking=yes".into(),
            format!(
                "HostKeyAlias={}",
                crate::config::host_blocks::alias(&self.name)
            )
            .into(),
            kh_opt,
            "GlobalKnownHostsFile=/dev/null".into(),
            "UpdateHostKeys=no".into(),
            "CheckHostIP=no".into(),
            "ConnectTimeout=15".into(),
            "ForwardAgent=no".into(),
            "ForwardX11=no".into(),
            "ClearAllForwardings=yes".into(),
            "PermitLocalCommand=no".into(),
            "LogLevel=ERROR".into(),
        ] {
            v.push("-o".into());
            v.push(o);
        }
        for id in self.identities.iter().filter(|p| p.is_file()) {
            v.push("-i".into());
            // -i paths are token-expanded too, but never quoted.
            v.push(id.to_string_lossy().replace('%', "%%").into());
        }
        v
    }

    /// A clearer message when the OpenSSH client itself could not get in
    /// (as opposed to a remote command failing), from its stderr.
    fn ssh_failure(&self, stderr: &str) -> Option<String> {
        let said = stderr.trim();
        let alias = crate::config::host_blocks::alias(&self.name);
        if said.contains("Host key verification failed") {
            return Some(format!(
                "ssh refused the endpoint {}: its host key is not the one recorded as {alias} \
                 in {} (was the shim started with another XDG_STATE_HOME?): {said}",
                self.endpoint,
                self.known_hosts.display()
            ));
        }
        if said.contains("Permission denied") {
            return Some(format!(
                "the endpoint {} did not accept your keys; it takes the keys in ~/.ssh/*.pub and \
                 your ssh-agent (or the profile's authorized_keys): list a matching private key \
                 in the profile's identity: {said}",
                self.endpoint
            ));
        }
        if said.contains("Connection refused") || said.contains("Connection timed out") {
            return Some(format!(
                "cannot reach the endpoint {} of profile '{}': {said}",
                self.endpoint, self.name
            ));
        }
        None
    }

    /// The host argument: the endpoint's address, bracket-free.
    fn host(&self) -> String {
        self.endpoint.ip().to_string()
    }
}

/// A path as an ssh_config option value: `%` doubled (OpenSSH expands
/// tokens in these paths), quoted if it has spaces.
fn quote_ssh_path(p: &std::ffi::OsStr) -> OsString {
    let s = p.to_string_lossy().replace('%', "%%");
    if s.contains(char::is_whitespace) {
        format!("\"{s}\"").into()
    } else {
        s.into()
    }
}

/// What `exec` returns.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct ExecOutput {
    /// Exit status of the remote command (255 when ssh itself failed, see
    /// stderr); null when it timed out or ssh died from a signal.
    pub exit_status: Option<i32>,
    /// True when the command ran past timeout_s and ssh was stopped (the
    /// remote command may still be running).
    pub timed_out: bool,
    /// Standard output (UTF-8, invalid bytes replaced), at most 1 MiB.
    pub stdout: String,
    /// Standard error, at most 1 MiB.
    pub stderr: String,
    /// Bytes the command wrote to stdout, including any not returned.
    pub stdout_bytes: u64,
    /// Bytes the command wrote to stderr, including any not returned.
    pub stderr_bytes: u64,
    /// True when stdout was cut at the cap (also marked at its end).
    pub stdout_truncated: bool,
    /// True when stderr was cut at the cap (also marked at its end).
    pub stderr_truncated: bool,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Runs `command` (a shell command line for the remote login shell) through
/// the shim, stdin closed, no terminal, bounded by `timeout`.
pub async fn exec(t: &Target, command: &str, timeout: Duration) -> anyhow::Result<ExecOutput> {
    if command.trim().is_empty() {
        bail!("command is empty");
    }
    let started = Instant::now();
    let mut cmd = Command::new("ssh");
    cmd.args(t.options())
        .args(["-T", "-p", &t.endpoint.port().to_string(), &t.host(), "--"])
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow!("cannot run ssh (the OpenSSH client): {e}"))?;
    let out = tokio::spawn(read_capped(child.stdout.take(), OUTPUT_CAP));
    let err = tokio::spawn(read_capped(child.stderr.take(), OUTPUT_CAP));
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(r) => (Some(r.map_err(|e| anyhow!("waiting for ssh: {e}"))?), false),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            (None, true)
        }
    };
    let (stdout, stdout_bytes) = out.await.unwrap_or_default();
    let (stderr, stderr_bytes) = err.await.unwrap_or_default();
    let exit_status = status.and_then(|s| s.code());
    if exit_status == Some(255)
        && let Some(why) = t.ssh_failure(&String::from_utf8_lossy(&stderr))
    {
        return Err(anyhow!(why));
    }
    let (stdout, stdout_truncated) = text_of(stdout, stdout_bytes);
    let (stderr, stderr_truncated) = text_of(stderr, stderr_bytes);
    Ok(ExecOutput {
        exit_status,
        timed_out,
        stdout,
        stderr,
        stdout_bytes,
        stderr_bytes,
        stdout_truncated,
        stderr_truncated,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Reads `r` to its end, keeping the first `cap` bytes and counting all.
async fn read_capped(r: Option<impl AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, u64) {
    let Some(mut r) = r else {
        return (Vec::new(), 0);
    };
    let mut kept = Vec::new();
    let mut total = 0u64;
    let mut buf = vec![0u8; 64 << 10];
    // Keep draining past the cap so the remote command is never blocked on
    // a full pipe.
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        total += n as u64;
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    (kept, total)
}

/// Kept bytes as text, with a marker at the end when some were dropped.
fn text_of(kept: Vec<u8>, total: u64) -> (String, bool) {
    let mut s = String::from_utf8_lossy(&kept).into_owned();
    let dropped = total.saturating_sub(kept.len() as u64);
    if dropped > 0 {
        s.push_str(&format!(
            "\n[sshshim: output truncated, {dropped} more bytes not shown]\n"
        ));
    }
    (s, dropped > 0)
}

/// Which way `copy` moves a file.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Local file to the remote host.
    Put,
    /// Remote file to this machine.
    Get,
}

/// What `copy` returns.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct CopyOutput {
    /// "put" or "get".
    pub direction: Direction,
    /// The local file, as an absolute path.
    pub local: String,
    /// The remote path, as given.
    pub remote: String,
    /// Size of the local file after the transfer.
    pub bytes: u64,
    /// SHA-256 of the local file after the transfer, lowercase hex.
    pub sha256: String,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Copies one regular file with sftp through the shim. `local` is a
/// relative path beneath `root` (see [`super::beneath`]); sftp gets the
/// file already open, as `/dev/fd/N`.
pub async fn copy(
    t: &Target,
    direction: Direction,
    root: &Path,
    local: &str,
    remote: &str,
    timeout: Duration,
) -> anyhow::Result<CopyOutput> {
    let started = Instant::now();
    let opened = match direction {
        Direction::Put => super::beneath::open_for_put(root, local)?,
        Direction::Get => {
            // sftp would put the file inside a directory given as the target.
            let base = remote
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .unwrap_or("");
            let opened = super::beneath::open_for_get(root, local, base)?;
            refuse_kept(t, &opened)?;
            opened
        }
    };
    match transfer(t, direction, &opened.file, remote, timeout).await {
        Ok(()) => {}
        Err(e) => {
            if direction == Direction::Get {
                opened.discard();
            }
            return Err(e);
        }
    }
    let (bytes, sha256) = file_digest(&opened.file, &opened.shown).await?;
    Ok(CopyOutput {
        direction,
        local: opened.shown.display().to_string(),
        remote: remote.to_owned(),
        bytes,
        sha256,
        duration_ms: started.elapsed().as_millis() as u64,
    })
}

/// Refuses a get into one of `t.keep` (compared by device and inode, so
/// no other spelling or hard link gets through); a file this call created
/// is removed again.
fn refuse_kept(t: &Target, opened: &super::beneath::Local) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = opened
        .file
        .metadata()
        .map_err(|e| anyhow!("{}: {e}", opened.shown.display()))?;
    let hit = t.keep.iter().find(|k| {
        std::fs::metadata(k).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino())
    });
    match hit {
        Some(k) => Err(anyhow!(
            "copy does not write {}: it is sshshim's profiles file, which only a person edits",
            k.display()
        )),
        None => Ok(()),
    }
}

/// Runs sftp for one transfer between `file` (handed over as `/dev/fd/N`)
/// and `remote`.
async fn transfer(
    t: &Target,
    direction: Direction,
    file: &std::fs::File,
    remote: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = file.as_raw_fd();
    let local_arg = format!("/dev/fd/{fd}");
    let batch = match direction {
        Direction::Put => format!("put {} {}\n", sftp_arg(&local_arg)?, sftp_arg(remote)?),
        Direction::Get => format!("get {} {}\n", sftp_arg(remote)?, sftp_arg(&local_arg)?),
    };
    let mut cmd = Command::new("sftp");
    cmd.args(t.options())
        .args(["-q", "-P", &t.endpoint.port().to_string(), "-b", "-"])
        .arg(t.host())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: fcntl is async-signal-safe; it changes only the child's copy
    // of the descriptor table, so sftp inherits this one file and no other.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow!("cannot run sftp (the OpenSSH client): {e}"))?;
    let err = tokio::spawn(read_capped(child.stderr.take(), SFTP_MESSAGES_CAP));
    if let Some(mut stdin) = child.stdin.take() {
        // sftp reads the whole batch before it is done; a write error
        // means it already exited, which its status reports.
        let _ = stdin.write_all(batch.as_bytes()).await;
        drop(stdin);
    }
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(r) => r.map_err(|e| anyhow!("waiting for sftp: {e}"))?,
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(anyhow!(
                "copy did not finish within {} s and was stopped; raise timeout_s for large files",
                timeout.as_secs()
            ));
        }
    };
    let (messages, _) = err.await.unwrap_or_default();
    if !status.success() {
        let messages = String::from_utf8_lossy(&messages);
        if let Some(why) = t.ssh_failure(&messages) {
            return Err(anyhow!(why));
        }
        let messages = messages.trim();
        let code = status
            .code()
            .map_or_else(|| "a signal".to_owned(), |c| c.to_string());
        if messages.is_empty() {
            bail!("sftp failed (exit {code})");
        }
        bail!("sftp failed (exit {code}): {messages}");
    }
    Ok(())
}

/// One path as an argument of an sftp batch command. Inside double quotes
/// sftp takes `?`, `[` and `*` literally (it escapes them for its glob), and
/// a backslash escapes `"` and itself. A leading `-` would read as a flag.
fn sftp_arg(path: &str) -> anyhow::Result<String> {
    if path.is_empty() {
        bail!("a path is empty");
    }
    if path.chars().any(char::is_control) {
        return Err(anyhow!(
            "path {path:?} has a control character (newline, tab, ...); sftp cannot take it"
        ));
    }
    let path = if path.starts_with('-') {
        format!("./{path}")
    } else {
        path.to_owned()
    };
    Ok(format!(
        "\"{}\"",
        path.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// Size and SHA-256 (lowercase hex) of an open file, read from its start
/// (`path` only names it in errors).
async fn file_digest(file: &std::fs::File, path: &Path) -> anyhow::Result<(u64, String)> {
    use sha2::Digest as _;
    use tokio::io::AsyncSeekExt as _;
    let f = file
        .try_clone()
        .map_err(|e| anyhow!("cannot read {} after the transfer: {e}", path.display()))?;
    let mut f = tokio::fs::File::from_std(f);
    f.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| anyhow!("cannot read {} after the transfer: {e}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut n_total = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        h.update(&buf[..n]);
    }
    Ok((n_total, data_encoding::HEXLOWER.encode(&h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sftp_args_are_quoted() {
        assert_eq!(sftp_arg("/tmp/a b").unwrap(), "\"/tmp/a b\"");
        assert_eq!(sftp_arg("x\"y\\z").unwrap(), "\"x\\\"y\\\\z\"");
        assert_eq!(sftp_arg("-f").unwrap(), "\"./-f\"");
        assert!(sftp_arg("a\nb").is_err());
        assert!(sftp_arg("").is_err());
    }

    #[test]
    fn truncation_is_marked() {
        let (s, cut) = text_of(b"abc".to_vec(), 3);
        assert_eq!((s.as_str(), cut), ("abc", false));
        let (s, cut) = text_of(b"abc".to_vec(), 10);
        assert!(cut);
        assert!(
            s.starts_with("abc\n[sshshim: output truncated, 7 more"),
            "{s}"
        );
    }

    #[test]
    fn wildcard_endpoints_use_loopback() {
        let a = Target::endpoint_of("0.0.0.0:2222").unwrap();
        assert_eq!(a, "127.0.0.1:2222".parse().unwrap());
        let a = Target::endpoint_of("[::]:2222").unwrap();
        assert_eq!(a, "[::1]:2222".parse().unwrap());
        assert!(Target::endpoint_of("nonsense").is_err());
    }

    #[test]
    fn ssh_failures_are_explained() {
        let t = Target {
            name: "lab".into(),
            endpoint: "127.0.0.1:2301".parse().unwrap(),
            known_hosts: "/s/known_hosts".into(),
            identities: Vec::new(),
            copy_dir: "/w".into(),
            keep: Vec::new(),
        };
        let e = t.ssh_failure("Host key verification failed.\n").unwrap();
        assert!(
            e.contains("sshshim-lab") && e.contains("/s/known_hosts"),
            "{e}"
        );
        let e = t
            .ssh_failure("u@127.0.0.1: Permission denied (publickey).\n")
            .unwrap();
        assert!(e.contains("identity"), "{e}");
        assert!(t.ssh_failure("bash: foo: command not found\n").is_none());
    }

    #[tokio::test]
    async fn capped_reads_count_everything() {
        let data = vec![7u8; 300_000];
        let (kept, total) = read_capped(Some(&data[..]), 1000).await;
        assert_eq!((kept.len(), total), (1000, 300_000));
    }

    #[tokio::test]
    async fn digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let (n, h) = file_digest(&f, &p).await.unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

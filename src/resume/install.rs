//! Finding the remote helper, and uploading it when the server does not
//! have this version yet: once per sshshim run (again only after it went
//! missing), over the upstream connection itself.
//!
//! The helper is sshshim's own executable. It goes to
//! `${XDG_CACHE_HOME:-~/.cache}/sshshim/` on the server (0700), named by
//! version and checksum; the upload is written to a temporary name,
//! checked against the checksum, made executable and renamed into place,
//! and the checksum is checked again before each run's first use. Then it
//! must run there (`remote-helper version`): another OS or architecture, a
//! noexec home, an old libc or a ForceCommand each end up as a reason in
//! words, and sessions then work as without `--resume`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use russh::{ChannelMsg, client};
use sha2::Digest;

use super::{Settings, hex, shell_quote, wire};
use crate::upstream::{Open, OpenError, Pool};

/// How long one probe, upload or reap command may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The first line the probe script prints, so a ForceCommand or a
/// restricted shell (which would print something else) is recognised.
const PROBE_MARK: &str = "sshshim-probe 1";

/// The helper on the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helper {
    /// Its path there.
    pub path: String,
    /// The sftp subsystem: the program sshd's config names for it, or why
    /// sftp sessions cannot run under the helper.
    pub sftp: Result<String, NoSftp>,
    /// Whether the helper may carry forwarded TCP connections (sshd's
    /// AllowTcpForwarding and PermitOpen allow them), or why not.
    pub forwarding: Result<(), String>,
}

/// Why sftp sessions cannot run under the helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoSftp {
    /// sshd's configuration has no sftp subsystem.
    #[error("sshd's configuration names no sftp subsystem")]
    NotNamed,
    /// sshd serves sftp itself.
    #[error(
        "sshd serves sftp in-process (internal-sftp): there is no sftp program the helper could \
         keep running"
    )]
    Internal,
}

/// sshshim's own executable could not be read (kept for every later try).
#[derive(Debug, thiserror::Error)]
#[error("cannot read sshshim's own executable: {0}")]
struct OwnExeError(#[source] std::io::Error);

impl Helper {
    /// The command line that runs the helper with `args`.
    pub fn command(&self, args: &str) -> String {
        format!("{} remote-helper {args}", shell_quote(&self.path))
    }
}

/// Why no helper can run on the server.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{why}")]
pub struct NotHere {
    /// In words, for status, the log and `check`.
    pub why: String,
    /// The connection failed meanwhile: worth trying again later.
    pub transient: bool,
}

impl NotHere {
    /// A verdict about the server.
    fn verdict(why: impl Into<String>) -> NotHere {
        NotHere {
            why: why.into(),
            transient: false,
        }
    }

    /// The connection failed under the probe.
    fn transient(why: impl Into<String>) -> NotHere {
        NotHere {
            why: why.into(),
            transient: true,
        }
    }
}

/// The helper sshshim uploads: `sshshim-remote-helper` when it is
/// installed beside this executable and from the same build (under 1 MB:
/// a tenth of the upload, and it starts sooner, which every resumable
/// command waits for), else this executable itself. Its bytes are read
/// again for an upload, not kept: 8 MB is most of a running sshshim's
/// memory.
struct Local {
    /// The file.
    path: PathBuf,
    /// Its name on the server, before the version.
    name: &'static str,
    /// Its size in bytes.
    len: u64,
    /// Its SHA-256, hex.
    sha256: String,
}

/// This executable as the kernel runs it (the original even if the file
/// was replaced on disk since).
const OWN_EXE: &str = "/proc/self/exe";

/// The helper's own binary, built beside `sshshim` (src/bin).
const HELPER_BIN: &str = "sshshim-remote-helper";

/// How long the helper beside us may take to say its version.
const SIBLING_TIMEOUT: Duration = Duration::from_secs(5);

/// Finds and hashes the helper to upload, once.
fn local() -> Result<&'static Local, &'static OwnExeError> {
    static LOCAL: OnceLock<Result<Local, OwnExeError>> = OnceLock::new();
    LOCAL
        .get_or_init(|| {
            if let Some(path) = sibling() {
                match hash(&path) {
                    Ok((len, sha256)) => {
                        return Ok(Local {
                            path,
                            name: HELPER_BIN,
                            len,
                            sha256,
                        });
                    }
                    Err(e) => tracing::debug!("{}: {e}", path.display()),
                }
            }
            let (len, sha256) = hash(Path::new(OWN_EXE)).map_err(OwnExeError)?;
            Ok(Local {
                path: OWN_EXE.into(),
                name: "sshshim",
                len,
                sha256,
            })
        })
        .as_ref()
}

/// `sshshim-remote-helper` beside this executable, if it is there and
/// from this build: its `version` line must be ours (an upgrade on disk
/// under a running sshshim leaves a newer one there).
fn sibling() -> Option<PathBuf> {
    let path = std::env::current_exe().ok()?.parent()?.join(HELPER_BIN);
    if !path.is_file() {
        return None;
    }
    let mut child = std::process::Command::new(&path)
        .args(["remote-helper", "version"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let reader = child.stdout.take()?;
    let read = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = reader.take(4096).read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + SIBLING_TIMEOUT;
    while child.try_wait().ok()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = read.join().ok()?;
    let ours = format!(
        "sshshim-remote-helper {} {}",
        env!("CARGO_PKG_VERSION"),
        wire::VERSION
    );
    if out.lines().next() == Some(ours.as_str()) {
        Some(path)
    } else {
        tracing::debug!(
            "{} is from another build: uploading sshshim itself",
            path.display()
        );
        None
    }
}

/// The size and SHA-256 (hex) of a file, read in pieces.
fn hash(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((len, hex(&h.finalize())))
}

/// `uname -sm` of this machine, as the remote's `uname -sm` prints it.
fn local_platform() -> String {
    // SAFETY: utsname is plain data; uname fills it with NUL-terminated strings.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!("{} {}", field(&u.sysname), field(&u.machine))
}

/// What a command on the server printed, and how it ended.
pub struct Ran {
    /// Exit status, if it sent one.
    pub status: Option<u32>,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

/// Where the probe's commands run: the profile's pool, or the connection
/// `sshshim check` made.
pub trait Sessions: Sync {
    /// Opens a session channel.
    fn session(&self) -> impl Future<Output = Result<russh::Channel<client::Msg>, NotHere>> + Send;
}

impl Sessions for Pool {
    async fn session(&self) -> Result<russh::Channel<client::Msg>, NotHere> {
        match self.open(Open::Session).await {
            // The load guard goes with it: these channels are short.
            Ok(o) => Ok(o.channel),
            Err(e @ OpenError::Unavailable(_)) => Err(NotHere::transient(e.to_string())),
            Err(e) => Err(NotHere::transient(format!("cannot open a session: {e}"))),
        }
    }
}

impl<H: client::Handler> Sessions for client::Handle<H> {
    async fn session(&self) -> Result<russh::Channel<client::Msg>, NotHere> {
        self.channel_open_session()
            .await
            .map_err(|e| NotHere::transient(format!("cannot open a session: {e}")))
    }
}

/// Runs `command` on the server through the login shell (as `ssh host
/// command` does), with `stdin` then EOF.
pub async fn run(on: &impl Sessions, command: &str, stdin: &[u8]) -> Result<Ran, NotHere> {
    let ch = on.session().await?;
    let work = async {
        ch.exec(true, command.as_bytes())
            .await
            .map_err(|e| NotHere::transient(e.to_string()))?;
        let (mut rd, wr) = ch.split();
        let writer = async {
            for chunk in stdin.chunks(wire::CHUNK) {
                if wr.data_bytes(Bytes::copy_from_slice(chunk)).await.is_err() {
                    break;
                }
            }
            let _ = wr.eof().await;
        };
        let reader = async {
            let mut ran = Ran {
                status: None,
                stdout: Vec::new(),
                stderr: Vec::new(),
            };
            let mut exec_ok = None;
            while let Some(msg) = rd.wait().await {
                match msg {
                    ChannelMsg::Success if exec_ok.is_none() => exec_ok = Some(true),
                    ChannelMsg::Failure if exec_ok.is_none() => exec_ok = Some(false),
                    ChannelMsg::Data { data } => ran.stdout.extend_from_slice(&data),
                    ChannelMsg::ExtendedData { data, .. } => ran.stderr.extend_from_slice(&data),
                    ChannelMsg::ExitStatus { exit_status } => ran.status = Some(exit_status),
                    ChannelMsg::Close => break,
                    _ => {}
                }
            }
            (ran, exec_ok)
        };
        let ((ran, exec_ok), ()) = tokio::join!(reader, writer);
        match exec_ok {
            Some(false) => Err(NotHere::verdict(
                "the server refuses to run commands (exec request refused)",
            )),
            _ => Ok(ran),
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(NotHere::transient("the server did not answer in time")))
}

/// The probe script: prints [`PROBE_MARK`], `uname -sm`, then `have PATH`
/// when the helper is there with the right checksum (`need PATH` if not),
/// or `nodir REASON` when there is no private directory for it.
fn probe_script(file: &str, sha256: &str) -> String {
    format!(
        r#"printf '%s\n' '{PROBE_MARK}'; uname -sm; umask 077
d="${{XDG_CACHE_HOME:-$HOME/.cache}}/sshshim"
if ! mkdir -p "$d" || ! chmod 700 "$d" || ! test -O "$d"; then echo "nodir $d is not a private directory of ours"; exit 0; fi
f="$d/{file}"
if ! command -v sha256sum >/dev/null 2>&1; then echo "nodir the server has no sha256sum to check the helper with"; exit 0; fi
if test -f "$f" && test "$(sha256sum < "$f" | cut -c1-64)" = "{sha256}"; then echo "have $f"; else echo "need $f"; fi"#
    )
}

/// The upload script: the helper arrives on stdin.
fn upload_script(file: &str, sha256: &str) -> String {
    format!(
        r#"umask 077; d="${{XDG_CACHE_HOME:-$HOME/.cache}}/sshshim"; f="$d/{file}"
t=$(mktemp "$d/.upload.XXXXXX") || exit 1
if cat > "$t" && test "$(sha256sum < "$t" | cut -c1-64)" = "{sha256}" && chmod 700 "$t" && mv -f "$t" "$f"; then echo ok; else rm -f "$t"; echo "bad upload"; fi"#
    )
}

/// Finds (or uploads) the helper and checks that it runs; then ends the
/// sessions a previous run of this sshshim left held.
pub async fn find(
    pool: &impl Sessions,
    settings: &Settings,
    owner: wire::Owner,
    run: wire::Run,
) -> Result<Helper, NotHere> {
    let path = match &settings.remote_helper {
        Some(p) => p.clone(),
        None => install(pool).await?,
    };
    let helper = check(pool, &path).await?;
    // Sessions the previous run held have no local client any more.
    let reap = helper.command(&format!("reap {} {}", hex(&owner), hex(&run)));
    match run_cmd(pool, &reap).await {
        Ok(r) if r.status == Some(0) => {
            let out = String::from_utf8_lossy(&r.stdout).trim().to_owned();
            if out != "0" && !out.is_empty() {
                tracing::info!("asked {out} session(s) held for a previous run to end");
            }
        }
        Ok(r) => tracing::debug!(
            "reap: {}",
            crate::term::clean(&String::from_utf8_lossy(&r.stderr))
        ),
        Err(e) => tracing::debug!("reap: {}", e.why),
    }
    Ok(helper)
}

/// [`run`] without stdin.
async fn run_cmd(pool: &impl Sessions, command: &str) -> Result<Ran, NotHere> {
    run(pool, command, &[]).await
}

/// Where sshshim's own helper is (or goes) on the server.
enum Located {
    /// There, with the right checksum.
    Have(String),
    /// Not there yet (or not this version): it goes here.
    Need(String),
}

/// Looks for sshshim's own helper on the server (writes nothing but its
/// private directory).
async fn locate(pool: &impl Sessions) -> Result<Located, NotHere> {
    let me = local().map_err(|e| NotHere::verdict(e.to_string()))?;
    let probe = run_cmd(pool, &probe_script(&helper_file(me), &me.sha256)).await?;
    let text = String::from_utf8_lossy(&probe.stdout).into_owned();
    let mut lines = text.lines();
    if lines.next() != Some(PROBE_MARK) {
        let first = text.lines().next().unwrap_or("").trim();
        return Err(NotHere::verdict(format!(
            "the server ran something else instead of sshshim's probe (a ForceCommand or a \
             restricted shell?){}",
            if first.is_empty() {
                String::new()
            } else {
                format!(": it printed {:?}", crate::term::clean(first))
            }
        )));
    }
    let platform = lines.next().unwrap_or("").trim().to_owned();
    let ours = local_platform();
    if platform != ours {
        return Err(NotHere::verdict(format!(
            "the server is {platform:?}, and this sshshim runs on {ours:?}; install an sshshim \
             built for it there and give its path with --remote-helper"
        )));
    }
    let verdict = lines.next().unwrap_or("").to_owned();
    if let Some(why) = verdict.strip_prefix("nodir ") {
        return Err(NotHere::verdict(why.to_owned()));
    }
    if let Some(path) = verdict.strip_prefix("have ") {
        return Ok(Located::Have(path.to_owned()));
    }
    match verdict.strip_prefix("need ") {
        Some(path) => Ok(Located::Need(path.to_owned())),
        None => Err(NotHere::verdict(format!(
            "the probe's answer was not understood: {:?}",
            crate::term::clean(&text)
        ))),
    }
}

/// The helper's file name on the server: by version and checksum.
fn helper_file(me: &Local) -> String {
    format!(
        "{}-{}-{}",
        me.name,
        env!("CARGO_PKG_VERSION"),
        &me.sha256[..16]
    )
}

/// Makes sure sshshim's own helper is in the server's cache: returns its path.
async fn install(pool: &impl Sessions) -> Result<String, NotHere> {
    let me = local().map_err(|e| NotHere::verdict(e.to_string()))?;
    let path = match locate(pool).await? {
        Located::Have(path) => return Ok(path),
        Located::Need(path) => path,
    };
    let path = path.as_str();
    let file = helper_file(me);
    tracing::info!(
        "uploading the remote helper ({} KiB) to {}",
        me.len >> 10,
        crate::term::clean(path)
    );
    let bytes = std::fs::read(&me.path)
        .map_err(|e| NotHere::verdict(format!("cannot read {}: {e}", me.path.display())))?;
    // The server checks the upload against the checksum hashed before.
    let up = run(pool, &upload_script(&file, &me.sha256), &bytes).await?;
    drop(bytes);
    if String::from_utf8_lossy(&up.stdout).trim() != "ok" {
        return Err(NotHere::verdict(format!(
            "the upload of the helper failed: {}",
            crate::term::clean(
                String::from_utf8_lossy(&up.stderr)
                    .lines()
                    .next()
                    .unwrap_or("its checksum did not match")
            )
        )));
    }
    Ok(path.to_owned())
}

/// What `sshshim check` says about resumable sessions on this server,
/// without uploading anything: `Ok` with the state in words, or why no
/// helper can run there.
pub async fn diagnose(on: &impl Sessions, settings: &Settings) -> Result<String, NotHere> {
    let path = match &settings.remote_helper {
        Some(p) => p.clone(),
        None => match locate(on).await? {
            Located::Have(path) => path,
            Located::Need(path) => {
                let size = local().map_or(0, |l| l.len >> 10);
                return Ok(format!(
                    "the helper is not on the server yet: `sshshim up` uploads it ({size} KiB) \
                     to {path} on its first connection"
                ));
            }
        },
    };
    let h = check(on, &path).await?;
    Ok(format!(
        "the helper at {} runs there{}",
        h.path,
        match &h.sftp {
            Ok(_) => "; sftp sessions are resumable".to_owned(),
            Err(why) => format!("; sftp sessions are not resumable: {why}"),
        },
    ) + &match &h.forwarding {
        Ok(()) => "; forwarded TCP connections are resumable".to_owned(),
        Err(why) => format!("; forwarded TCP connections are not resumable: {why}"),
    })
}

/// Runs the helper's `version` there: it must answer with our protocol.
async fn check(pool: &impl Sessions, path: &str) -> Result<Helper, NotHere> {
    let probe = Helper {
        path: path.to_owned(),
        sftp: Err(NoSftp::NotNamed),
        forwarding: Ok(()),
    };
    let ran = run_cmd(pool, &probe.command("version")).await?;
    let out = String::from_utf8_lossy(&ran.stdout).into_owned();
    let mut lines = out.lines();
    let first = lines.next().unwrap_or("");
    let mut words = first.split_whitespace();
    if words.next() != Some("sshshim-remote-helper") {
        let err = String::from_utf8_lossy(&ran.stderr);
        let why = err.lines().next().unwrap_or("").trim();
        return Err(NotHere::verdict(format!(
            "the helper does not run on the server{}",
            if why.is_empty() {
                format!(" (exit status {:?})", ran.status)
            } else {
                format!(": {}", crate::term::clean(why))
            }
        )));
    }
    let proto = words.nth(1).and_then(|v| v.parse::<u32>().ok());
    if proto != Some(wire::VERSION) {
        return Err(NotHere::verdict(format!(
            "the helper at {path} speaks protocol {proto:?}, this sshshim {}",
            wire::VERSION
        )));
    }
    let mut sftp = Err(NoSftp::NotNamed);
    let mut forwarding =
        Err("the helper does not say whether it may forward (an older version)".into());
    for line in lines {
        if let Some(v) = line.strip_prefix("forwarding tcp ") {
            forwarding = parse_forwarding(v);
        }
        if let Some(cmd) = line.strip_prefix("subsystem sftp ") {
            sftp = if cmd.trim() == "internal" {
                Err(NoSftp::Internal)
            } else {
                Ok(cmd.trim().to_owned())
            };
        }
    }
    Ok(Helper {
        path: path.to_owned(),
        sftp,
        forwarding,
    })
}

/// The helper's `forwarding tcp yes` or `forwarding tcp no (REASON)`.
fn parse_forwarding(v: &str) -> Result<(), String> {
    let v = v.trim();
    if v == "yes" {
        return Ok(());
    }
    let why = v
        .strip_prefix("no")
        .map(|r| {
            r.trim()
                .trim_start_matches('(')
                .trim_end_matches(')')
                .trim()
        })
        .filter(|r| !r.is_empty())
        .unwrap_or("the helper says no");
    Err(crate::term::clean(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forwarding_line_says_yes_or_why_not() {
        assert_eq!(parse_forwarding("yes"), Ok(()));
        assert_eq!(
            parse_forwarding("no (AllowTcpForwarding remote)"),
            Err("AllowTcpForwarding remote".to_owned())
        );
        assert_eq!(parse_forwarding("no"), Err("the helper says no".to_owned()));
        assert!(
            parse_forwarding("maybe").is_err(),
            "anything but yes is a no"
        );
    }

    #[test]
    fn the_local_platform_reads_like_uname() {
        let p = local_platform();
        let out = std::process::Command::new("uname")
            .arg("-sm")
            .output()
            .unwrap();
        assert_eq!(p, String::from_utf8_lossy(&out.stdout).trim());
    }

    #[test]
    fn scripts_run_under_sh() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let data = b"pretend helper".to_vec();
        let sha = hex(&sha2::Sha256::digest(&data));
        let sh = |script: &str, stdin: &[u8]| {
            use std::io::Write;
            let mut c = std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .env("XDG_CACHE_HOME", &cache)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            c.stdin.take().unwrap().write_all(stdin).unwrap();
            String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
        };
        let out = sh(&probe_script("h", &sha), b"");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], PROBE_MARK);
        assert_eq!(lines[1], local_platform());
        let want = format!("need {}/sshshim/h", cache.display());
        assert_eq!(lines[2], want);
        assert_eq!(
            sh(&upload_script("h", &sha), b"wrong bytes").trim(),
            "bad upload"
        );
        assert_eq!(sh(&upload_script("h", &sha), &data).trim(), "ok");
        let out = sh(&probe_script("h", &sha), b"");
        assert!(
            out.ends_with(&format!("have {}/sshshim/h\n", cache.display())),
            "{out}"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cache.join("sshshim/h"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let left: Vec<_> = std::fs::read_dir(cache.join("sshshim")).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary upload left behind");
    }
}

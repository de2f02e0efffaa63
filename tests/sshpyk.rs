//! sshpyk (Jupyter kernels on remote machines over SSH) through the shim,
//! as a new user would set it up (issue 17): the Host alias sshpyk's docs
//! ask for (ControlMaster auto, ControlPath, ControlPersist) pointing at the
//! shim's endpoint, a kernel started, code run, 2 MiB each way, the kernel
//! shut down and no kernel process left. The same test against sshd is the
//! reference.
//!
//! The remote side is the test sshd's user on this machine, running the same
//! virtualenv's python. The virtualenv is built from PyPI once and kept in
//! `target/sshpyk-venv`; the tests are skipped (with a message) only when
//! PyPI cannot be reached.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use support::*;

/// What the virtualenv holds: the versions the issue was reported with.
const REQUIREMENTS: [&str; 3] = ["sshpyk==1.25", "jupyter_client==8.10.0", "ipykernel==7.4.0"];
/// The name of the local sshpyk kernelspec the tests create.
const KERNEL: &str = "sshshim_test";

/// The cached virtualenv: `target/sshpyk-venv`.
fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR has a parent")
        .join("sshpyk-venv")
}

/// The virtualenv, built once per test process (and reused across runs
/// while its requirements are unchanged); `Err` says why the tests must be
/// skipped.
fn venv() -> Result<PathBuf, String> {
    static VENV: OnceLock<Mutex<Option<Result<PathBuf, String>>>> = OnceLock::new();
    let mut g = VENV.get_or_init(Default::default).lock().unwrap();
    g.get_or_insert_with(|| {
        let dir = venv_dir();
        build_venv(&dir).map(|()| dir)
    })
    .clone()
}

/// Makes `dir` a virtualenv with [`REQUIREMENTS`] unless it already is one.
fn build_venv(dir: &Path) -> Result<(), String> {
    let ready = dir.join(".sshshim-ready");
    let want = REQUIREMENTS.join(" ");
    let py = dir.join("bin/python");
    if fs::read_to_string(&ready).is_ok_and(|r| r == want) {
        let mut check = Command::new(&py);
        check.args(["-c", "import sshpyk, jupyter_client, ipykernel"]);
        if run_with_timeout(&mut check, b"", Duration::from_secs(60))
            .status
            .success()
        {
            return Ok(());
        }
    }
    eprintln!("building {} ({want}); pip may take minutes", dir.display());
    let _ = fs::remove_dir_all(dir);
    let mut mk = Command::new("python3");
    mk.args(["-m", "venv"]).arg(dir);
    assert_success(
        &run_with_timeout(&mut mk, b"", Duration::from_secs(180)),
        "python3 -m venv (CPython 3.10+ with the venv module is needed)",
    );
    let pip = |args: &[&str]| {
        let mut c = Command::new(&py);
        c.args(["-m", "pip"]).args(args).args([
            "--disable-pip-version-check",
            "--timeout",
            "30",
            "--retries",
            "2",
        ]);
        c
    };
    let probe = run_with_timeout(
        &mut pip(&["index", "versions", "sshpyk"]),
        b"",
        Duration::from_secs(180),
    );
    if !probe.status.success() {
        let _ = fs::remove_dir_all(dir);
        return Err(format!(
            "PyPI cannot be reached (`pip index versions sshpyk` failed): {}",
            stderr_text(&probe).trim()
        ));
    }
    let mut install = pip(&["install", "--quiet"]);
    install.args(REQUIREMENTS);
    assert_success(
        &run_with_timeout(&mut install, b"", Duration::from_secs(1500)),
        "pip install",
    );
    fs::write(&ready, want).unwrap();
    Ok(())
}

/// One sshpyk setup in a test directory: a local Jupyter home with the
/// kernelspec, and a remote python that keeps the remote side's files in
/// the test directory too.
struct Jupyter {
    /// The virtualenv.
    venv: PathBuf,
    /// Environment for local Jupyter commands.
    local_env: Vec<(String, String)>,
}

impl Jupyter {
    /// Writes the remote python wrapper and adds the sshpyk kernelspec for
    /// `master`'s alias, as sshpyk's README says.
    fn new(env: &TestEnv, venv: PathBuf, master: &MasterAlias) -> Jupyter {
        let remote_home = env.path("remote-home");
        let local_home = env.path("local-home");
        fs::create_dir_all(&remote_home).unwrap();
        fs::create_dir_all(&local_home).unwrap();
        // The remote side is this machine: give it its own HOME so its
        // Jupyter runtime files stay in the test directory.
        let wrapper = env.path("remote-python");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nHOME={}\nexport HOME\nexec {} \"$@\"\n",
                remote_home.display(),
                venv.join("bin/python").display()
            ),
        )
        .unwrap();
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        // Jupyter's runtime directory (connection files, sshpyk's state)
        // must exist and be private.
        let runtime = local_home.join("runtime");
        fs::create_dir_all(&runtime).unwrap();
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
        let local_env = vec![
            ("HOME".to_string(), local_home.display().to_string()),
            (
                "JUPYTER_RUNTIME_DIR".to_string(),
                runtime.display().to_string(),
            ),
            ("JUPYTER_PLATFORM_DIRS".to_string(), "1".to_string()),
        ];
        let j = Jupyter { venv, local_env };
        // The `sshpyk` command, as its README says.
        let out = run_with_timeout(
            j.command(&j.venv.join("bin/sshpyk"))
                .args(["add", "--kernel-name", KERNEL])
                .args(["--display-name", "sshshim test", "--language", "python"])
                .args(["--ssh-host-alias", master.alias()])
                .arg("--ssh-config")
                .arg(master.config())
                .arg("--remote-python")
                .arg(&wrapper)
                .args(["--remote-kernel-name", "python3"])
                .args(["--launch-timeout", "30", "--shutdown-timeout", "15"]),
            b"",
            Duration::from_secs(120),
        );
        assert_success(&out, "sshpyk add");
        j
    }

    /// The virtualenv's python with the local Jupyter environment.
    fn python(&self) -> Command {
        self.command(&self.venv.join("bin/python"))
    }

    /// `program` with the local Jupyter environment.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_remove("SSH_AUTH_SOCK")
            .env_remove("PYTHONPATH")
            .env_remove("JUPYTER_PATH")
            .env_remove("JUPYTER_DATA_DIR")
            .env_remove("JUPYTER_CONFIG_DIR");
        for (k, v) in &self.local_env {
            c.env(k, v);
        }
        c
    }
}

/// Runs the kernel round trip against the SSH server on `port` and checks
/// that nothing of the kernel is left on `sshd`'s side.
fn kernel_round_trip(env: &TestEnv, sshd: &Sshd, port: u16, what: &str) {
    let venv = match venv() {
        Ok(v) => v,
        Err(why) => {
            eprintln!("SKIPPED sshpyk test ({what}): {why}");
            return;
        }
    };
    let master = env.master_alias("sshpyk-test", port);
    let jupyter = Jupyter::new(env, venv.clone(), &master);
    let started = Instant::now();
    let out = run_with_timeout(
        jupyter
            .python()
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/tools/sshpyk_driver.py"
            ))
            .arg(KERNEL),
        b"",
        Duration::from_secs(300),
    );
    let text = stdout_text(&out);
    assert!(
        out.status.success() && text.lines().any(|l| l == "OK"),
        "{what}: the sshpyk kernel round trip failed ({:?}, after {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        started.elapsed(),
        text,
        truncate(&stderr_text(&out), 6000)
    );
    // No kernel process left: nothing in sshd's sessions runs the venv's
    // python any more (the launcher, the kernel and their helpers).
    let venv_text = venv.display().to_string();
    let left = || sshd.session_pids_containing(&venv_text);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !left().is_empty() {
        assert!(
            Instant::now() < deadline,
            "{what}: kernel processes left after shutdown: {:?}\n{text}",
            left()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{what}: kernel round trip in {:?}: {}",
        started.elapsed(),
        text.lines().collect::<Vec<_>>().join(" | ")
    );
}

#[test]
fn sshpyk_kernel_against_sshd() {
    let env = TestEnv::new();
    let sshd = env.start_sshd();
    kernel_round_trip(&env, &sshd, sshd.port(), "against sshd (the reference)");
}

#[test]
fn sshpyk_kernel_through_the_shim() {
    let env = TestEnv::new();
    let sshd = env.start_sshd();
    let shim = env.start_shim(&sshd);
    kernel_round_trip(&env, &sshd, shim.port(), "through the shim");
    // Nothing leaked: the kernel's tunnels and sessions are all closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    while shim.open_channels() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the shim still has channels open after the kernel's shutdown: {:?}",
            shim.status_json()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

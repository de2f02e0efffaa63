//! Issue 20: resumable sessions (`--resume`). A session runs under the
//! remote helper that sshshim uploads, survives upstream drops and a
//! blackhole, and replays what either side missed: against the harness's
//! real sshd, through a fault proxy, with real clients.

mod support;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// sshd, a fault proxy in front of it, and a shim with `--resume` (plus
/// `args`) that connects through the proxy.
fn proxied(env: &TestEnv, sshd: &Sshd, args: &[&str]) -> (FaultProxy, Shim) {
    let (proxy, builder) = through_proxy(env, sshd);
    (proxy, builder.arg("--resume").args(args).start())
}

/// Kills a client process on drop, so a failing test leaves none behind.
struct Client(Child);

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with its stdout and stderr captured.
fn spawn(mut cmd: Command, stdin: Stdio) -> (Client, Capture, Capture) {
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client");
    let out = Capture::spawn(child.stdout.take().unwrap());
    let err = Capture::spawn(child.stderr.take().unwrap());
    (Client(child), out, err)
}

/// Waits for a client's exit code (the shim's log if it does not end).
fn finish(c: &mut Client, timeout: Duration, shim: &Shim) -> i32 {
    match wait_child(&mut c.0, timeout) {
        Some(st) => exit_code(&st),
        None => panic!(
            "client did not finish in time; shim log:\n{}",
            truncate(&shim.stderr_text(), 20000)
        ),
    }
}

/// Waits until the shim logged `n` resumes.
fn wait_resumes(shim: &Shim, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while shim.stderr_text().matches("resumed after").count() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} resumes within {timeout:?}:\n{}",
            truncate(&shim.stderr_text(), 6000)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The script of the first done-when point: 60 numbered lines over 6 s, exit 7.
const SIXTY_LINES: &str = "i=1; while [ $i -le 60 ]; do echo line $i; i=$((i+1)); sleep 0.1; done; \
                           echo done >&2; exit 7";

/// What [`SIXTY_LINES`] prints.
fn sixty_lines() -> String {
    (1..=60).map(|i| format!("line {i}\n")).collect()
}

#[test]
fn command_survives_two_drops_byte_exact_with_its_exit_status() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let (mut c, out, err) = spawn(env.ssh(shim.port(), &[SIXTY_LINES]), Stdio::null());
    assert!(out.wait_for(Duration::from_secs(30), |t| t.contains("line 10\n")));
    proxy.drop_all();
    wait_resumes(&shim, 1, Duration::from_secs(20));
    assert!(out.wait_for(Duration::from_secs(10), |t| t.contains("line 35\n")));
    proxy.drop_all();
    wait_resumes(&shim, 2, Duration::from_secs(20));
    assert_eq!(
        finish(&mut c, Duration::from_secs(30), &shim),
        7,
        "{}",
        err.text()
    );
    assert_eq!(out.text(), sixty_lines());
    assert_eq!(err.text(), "done\n");
    assert!(shim.stderr_text().contains("the server holds the session"));
    // What went to the server is the helper built beside sshshim (under a
    // tenth of sshshim's size), not sshshim itself.
    let helper = format!("/sshshim-remote-helper-{}-", env!("CARGO_PKG_VERSION"));
    assert!(
        shim.stderr_text().contains(&helper),
        "{}",
        shim.stderr_text()
    );
    // The helper ends with its session: nothing is left on the server.
    eventually(Duration::from_secs(10), "no helper left", || {
        remote(&sshd, "remote-helper").is_empty()
    });
}

#[test]
fn command_survives_a_blackhole_the_keepalive_detects() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(
        &env,
        &sshd,
        &[
            "--keepalive",
            "1",
            "--keepalive-max",
            "2",
            "--connect-timeout",
            "3",
        ],
    );
    let (mut c, out, err) = spawn(env.ssh(shim.port(), &[SIXTY_LINES]), Stdio::null());
    assert!(out.wait_for(Duration::from_secs(30), |t| t.contains("line 5\n")));
    proxy.set_mode(Mode::Freeze);
    thread::sleep(Duration::from_secs(4));
    proxy.set_mode(Mode::Pass);
    wait_resumes(&shim, 1, Duration::from_secs(30));
    assert_eq!(
        finish(&mut c, Duration::from_secs(30), &shim),
        7,
        "{}",
        err.text()
    );
    assert_eq!(out.text(), sixty_lines());
}

/// Waits until a capture holds at least `n` bytes.
fn wait_len(c: &Capture, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while c.bytes().len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} bytes arrived",
            c.bytes().len()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// 64 MiB of known bytes in the test directory (the "server" is this machine).
fn big_file(env: &TestEnv, mib: usize) -> (PathBuf, String) {
    let data = pseudo_random_bytes(mib << 20, 20);
    let path = env.path("big.bin");
    std::fs::write(&path, &data).unwrap();
    (path, sha256_hex(&data))
}

#[test]
fn bulk_down_survives_a_drop_mid_transfer() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let (file, digest) = big_file(&env, 64);
    // Paced by the proxy so the drop lands mid-transfer.
    proxy.set_delay(Duration::from_millis(1));
    let down = env.ssh(shim.port(), &[&format!("cat {}", file.display())]);
    let (mut c, out, err) = spawn(down, Stdio::null());
    wait_len(&out, 16 << 20, Duration::from_secs(60));
    proxy.drop_all();
    let code = finish(&mut c, Duration::from_secs(120), &shim);
    assert_eq!(code, 0, "{}", err.text());
    assert_eq!(sha256_hex(&out.bytes()), digest, "download not byte-exact");
    wait_resumes(&shim, 1, Duration::from_secs(1));
}

#[test]
fn bulk_up_survives_a_drop_mid_transfer() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let (file, digest) = big_file(&env, 64);
    proxy.set_delay(Duration::from_millis(1));
    let up = env.ssh(shim.port(), &["sha256sum"]);
    let (mut c, out, err) = spawn(up, Stdio::piped());
    let mut stdin = c.0.stdin.take().unwrap();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let feeder = thread::spawn(move || {
        let data = std::fs::read(file).unwrap();
        for chunk in data.chunks(256 << 10) {
            if stdin.write_all(chunk).is_err() {
                return;
            }
            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    eventually(Duration::from_secs(60), "16 MiB sent", || {
        sent.load(std::sync::atomic::Ordering::Relaxed) >= 16 << 20
    });
    proxy.drop_all();
    let code = finish(&mut c, Duration::from_secs(60), &shim);
    feeder.join().unwrap();
    assert_eq!(code, 0, "{}", err.text());
    assert!(
        out.text().starts_with(&digest),
        "upload not byte-exact: {}",
        out.text()
    );
    wait_resumes(&shim, 1, Duration::from_secs(1));
}

#[test]
fn sftp_get_survives_a_drop_half_way() {
    let env = TestEnv::new();
    let sshd = Sshd::start_with(&env, &["Subsystem sftp /usr/lib/openssh/sftp-server"]);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let (file, digest) = big_file(&env, 32);
    let local = env.path("got.bin");
    proxy.set_delay(Duration::from_millis(1));
    let batch = format!("get {} {}\n", file.display(), local.display());
    let (mut c, _out, err) = spawn(shim.sftp(&batch), Stdio::null());
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&local).map_or(0, |m| m.len()) < 8 << 20 {
        assert!(
            Instant::now() < deadline,
            "sftp made no progress: {}",
            err.text()
        );
        thread::sleep(Duration::from_millis(10));
    }
    proxy.drop_all();
    assert_eq!(
        finish(&mut c, Duration::from_secs(120), &shim),
        0,
        "{}",
        err.text()
    );
    assert_eq!(sha256_file(&local), digest);
    wait_resumes(&shim, 1, Duration::from_secs(1));
}

/// Drives an interactive shell with a pty through `cmd`; lines typed before,
/// during and after a drop are each executed once, and a resize during the
/// outage is applied after it.
fn interactive_shell_across_a_drop(env: &TestEnv, proxy: &FaultProxy, shim: &Shim, cmd: Command) {
    let (drop_flag, back_flag) = (env.path("drop-now"), env.path("back-now"));
    let steps = [
        "send:echo A$((1+1))\\n".to_owned(),
        "expect:A2".into(),
        "send:stty size\\n".into(),
        "expect:24 80".into(),
        format!("touch:{}", drop_flag.display()),
        format!("gone:{}", drop_flag.display()),
        "send:echo B$((2+2))\\n".into(),
        "resize:40:120".into(),
        format!("touch:{}", back_flag.display()),
        format!("gone:{}", back_flag.display()),
        "expect:B4".into(),
        "send:echo C$((3+3))\\n".into(),
        "expect:C6".into(),
        "send:stty size\\n".into(),
        "expect:40 120".into(),
        "send:exit 3\\n".into(),
        "wait".into(),
        "print".into(),
    ];
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    let (d, b) = (drop_flag.clone(), back_flag.clone());
    let resumes = shim.stderr_text().matches("resumed after").count();
    thread::scope(|s| {
        let driver = s.spawn(|| pty_drive(24, 80, &steps, cmd));
        // The test's side of the script: drop when asked, come back later.
        eventually(Duration::from_secs(30), "the shell is up", || d.exists());
        proxy.set_mode(Mode::Refuse);
        proxy.drop_all();
        std::fs::remove_file(&d).unwrap();
        eventually(Duration::from_secs(30), "typed during the outage", || {
            b.exists()
        });
        thread::sleep(Duration::from_millis(300));
        proxy.set_mode(Mode::Pass);
        wait_resumes(shim, resumes + 1, Duration::from_secs(20));
        std::fs::remove_file(&b).unwrap();
        let out = driver.join().unwrap();
        assert!(out.contains("EXIT 3"), "{out}");
        for (what, n) in [("A2", 1), ("B4", 1), ("C6", 1)] {
            assert_eq!(out.matches(what).count(), n, "{what} in:\n{out}");
        }
    });
}

#[test]
fn interactive_shell_through_the_endpoint_survives_a_drop() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let cmd = env.ssh_cmd(shim.port(), &["-tt"], &[]);
    interactive_shell_across_a_drop(&env, &proxy, &shim, cmd);
}

/// The shim's multiplexing socket, from its status.
fn mux_socket(shim: &Shim) -> PathBuf {
    let st = shim.status_json().expect("status");
    PathBuf::from(st["mux_socket"].as_str().expect("a mux socket"))
}

#[test]
fn the_same_through_the_mux_socket() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let sock = mux_socket(&shim);
    let (mut c, out, err) = spawn(mux_cmd(&sock, &[SIXTY_LINES]), Stdio::null());
    assert!(out.wait_for(Duration::from_secs(30), |t| t.contains("line 10\n")));
    proxy.drop_all();
    assert_eq!(
        finish(&mut c, Duration::from_secs(30), &shim),
        7,
        "{}",
        err.text()
    );
    assert_eq!(out.text(), sixty_lines());
    wait_resumes(&shim, 1, Duration::from_secs(1));
    interactive_shell_across_a_drop(&env, &proxy, &shim, mux_cmd(&sock, &["-tt"]));
}

/// Pids of sshd's session processes whose command line contains `needle`.
/// Waits until `shim` holds a resumable session: the command may run on
/// the server a moment before sshshim has the helper's answer (and sent
/// the session's secret, without which it cannot be held).
fn until_held(shim: &Shim) {
    eventually(Duration::from_secs(20), "sshshim holds the session", || {
        shim.status_json().is_some_and(|st| {
            st["resume"]["held_sessions"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        })
    });
}

fn remote(sshd: &Sshd, needle: &str) -> Vec<u32> {
    sshd.session_pids_containing(needle)
}

#[test]
fn held_session_ends_after_the_resume_timeout() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &["--resume-timeout", "2"]);
    let (mut c, _out, err) = spawn(env.ssh(shim.port(), &["sleep 301"]), Stdio::null());
    eventually(Duration::from_secs(20), "remote sleep", || {
        !remote(&sshd, "sleep 301").is_empty()
    });
    until_held(&shim);
    proxy.set_mode(Mode::Refuse);
    proxy.drop_all();
    eventually(Duration::from_secs(15), "the held session ends", || {
        remote(&sshd, "sleep 301").is_empty()
    });
    assert_eq!(finish(&mut c, Duration::from_secs(15), &shim), 255);
    assert!(
        err.text().contains("could not be resumed"),
        "{}",
        err.text()
    );
    let st = shim.status_json().unwrap();
    assert_eq!(
        st["resume"]["held_sessions"].as_array().map(Vec::len),
        Some(0)
    );
}

#[test]
fn a_client_gone_during_the_outage_ends_its_session_after_the_reconnect() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, shim) = proxied(&env, &sshd, &[]);
    let (mut c, _out, _err) = spawn(env.ssh(shim.port(), &["sleep 302"]), Stdio::null());
    eventually(Duration::from_secs(20), "remote sleep", || {
        !remote(&sshd, "sleep 302").is_empty()
    });
    until_held(&shim);
    proxy.set_mode(Mode::Refuse);
    proxy.drop_all();
    let st = shim.status_json().unwrap();
    assert_eq!(st["resume"]["held_sessions"][0]["kind"], "exec", "{st}");
    let _ = c.0.kill();
    let _ = c.0.wait();
    thread::sleep(Duration::from_millis(500));
    assert!(
        !remote(&sshd, "sleep 302").is_empty(),
        "held while sshshim is away"
    );
    proxy.set_mode(Mode::Pass);
    eventually(
        Duration::from_secs(20),
        "the session ends after the reconnect",
        || remote(&sshd, "sleep 302").is_empty(),
    );
}

#[test]
fn a_restarted_sshshim_ends_what_its_previous_run_held() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let (proxy, mut shim) = proxied(&env, &sshd, &[]);
    let (_c, _out, _err) = spawn(env.ssh(shim.port(), &["sleep 303"]), Stdio::null());
    eventually(Duration::from_secs(20), "remote sleep", || {
        !remote(&sshd, "sleep 303").is_empty()
    });
    until_held(&shim);
    shim.signal("KILL");
    shim.wait_exit(Duration::from_secs(5));
    thread::sleep(Duration::from_millis(500));
    assert!(!remote(&sshd, "sleep 303").is_empty(), "held after a crash");
    let kh = env.path(&format!("kh_proxy_{}", proxy.port()));
    let _again = env
        .shim_builder(proxy.port())
        .known_hosts(&kh)
        .arg("--resume")
        .start();
    eventually(Duration::from_secs(20), "the old session ends", || {
        remote(&sshd, "sleep 303").is_empty()
    });
}

#[test]
fn without_a_usable_helper_sessions_work_as_before_and_status_says_why() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let shim = Shim::start_with(
        &env,
        sshd.port(),
        &["--resume", "--remote-helper", "/nonexistent/sshshim"],
    );
    let out = run_with_timeout(&mut shim.ssh(&["echo plain; exit 4"]), b"", DEFAULT_TIMEOUT);
    assert_eq!(exit_code(&out.status), 4);
    assert_eq!(stdout_text(&out), "plain\n");
    let st = shim.status_json().unwrap();
    let helper = st["resume"]["helper"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        helper.starts_with("unavailable: the helper does not run on the server"),
        "{st}"
    );
    assert!(
        shim.stderr_text()
            .contains("resumable sessions are off for this server")
    );
}

/// Differential: with `--resume`, what a client sees is what sshd shows it.
#[test]
fn clients_see_what_sshd_shows_them() {
    let env = TestEnv::new();
    let sshd = Sshd::start_with(&env, &["Subsystem sftp /usr/lib/openssh/sftp-server"]);
    let shim = Shim::start_with(&env, sshd.port(), &["--resume"]);
    let cmp =
        |args: &[&str], stdin: &[u8]| compare_ports(&env, sshd.port(), shim.port(), args, stdin);
    cmp(&["echo hello"], b"");
    cmp(&["exit 42"], b"");
    cmp(&["echo only-stderr >&2; exit 3"], b"");
    cmp(&["kill -9 $$"], b"");
    cmp(&["kill -TERM $$"], b"");
    cmp(&[], b"echo from-stdin\nexit 7\n");
    cmp(&["cat"], &pseudo_random_bytes(1 << 20, 3));
    cmp(
        &["-o", "SetEnv=SSHSHIM_TEST_X=sent", "echo $SSHSHIM_TEST_X"],
        b"",
    );
    cmp(&["-tt", "tty >/dev/null && echo tty; echo $TERM"], b"");
    cmp(&["echo $0; echo $HOME"], b"");
    // sftp through the helper's sftp-server.
    let f = env.path("small.txt");
    std::fs::write(&f, b"sftp through the helper\n").unwrap();
    let batch = format!("get {} {}\n", f.display(), env.path("small.got").display());
    let out = run_with_timeout(&mut shim.sftp(&batch), b"", DEFAULT_TIMEOUT);
    assert_success(&out, "sftp get with --resume");
    assert_eq!(
        std::fs::read(env.path("small.got")).unwrap(),
        b"sftp through the helper\n"
    );
    let st = shim.status_json().unwrap();
    assert!(
        st["resume"]["helper"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ready: "),
        "{st}"
    );
}

/// A server that runs something else for every command (ForceCommand, a
/// restricted shell) cannot run the helper: sessions behave as without
/// `--resume`, and status says why.
#[test]
fn a_forced_command_is_detected_and_sessions_run_as_before() {
    let env = TestEnv::new();
    let sshd = Sshd::start_with(&env, &["ForceCommand echo forced"]);
    let shim = Shim::start_with(&env, sshd.port(), &["--resume"]);
    let out = run_with_timeout(&mut shim.ssh(&["echo mine"]), b"", DEFAULT_TIMEOUT);
    let direct = run_with_timeout(&mut sshd.ssh(&["echo mine"]), b"", DEFAULT_TIMEOUT);
    assert_same_output(&direct, &out, "ForceCommand with --resume");
    let st = shim.status_json().unwrap();
    let helper = st["resume"]["helper"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(helper.contains("ForceCommand"), "{st}");
}

#[test]
fn without_its_own_helper_beside_it_sshshim_uploads_itself() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    // sshshim alone in a directory, beside a helper from another build.
    let dir = env.path("alone");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_sshshim"), dir.join("sshshim")).unwrap();
    let other = dir.join("sshshim-remote-helper");
    std::fs::write(&other, "#!/bin/sh\necho 'sshshim-remote-helper 0.0.1 1'\n").unwrap();
    std::fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let shim = env
        .shim_builder(sshd.port())
        .binary(dir.join("sshshim"))
        .arg("--resume")
        .start();
    let (mut c, out, err) = spawn(env.ssh(shim.port(), &[SIXTY_LINES]), Stdio::null());
    assert!(out.wait_for(Duration::from_secs(30), |t| t.contains("line 10\n")));
    until_held(&shim);
    assert_eq!(
        finish(&mut c, Duration::from_secs(30), &shim),
        7,
        "{}",
        err.text()
    );
    assert_eq!(out.text(), sixty_lines());
    let log = shim.stderr_text();
    let itself = format!("/sshshim-{}-", env!("CARGO_PKG_VERSION"));
    assert!(log.contains(&itself), "{log}");
    assert!(!log.contains("sshshim-remote-helper-"), "{log}");
}

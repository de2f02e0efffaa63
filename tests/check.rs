//! `sshshim check`: diagnostics of profiles against the test sshd. A
//! healthy profile passes; an unknown or changed host key, a refused port,
//! an unreachable `-R` target, a taken `-R` port, a silent server and a
//! password-only server each fail with the right message and exit status 1;
//! nothing is left listening and known_hosts is never written.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// One `[profile.NAME]` table for the test user at 127.0.0.1:`port`, with
/// `extra` TOML lines.
fn profile(env: &TestEnv, name: &str, port: u16, kh: &Path, extra: &str) -> String {
    format!(
        "[profile.{name}]\ndestination = \"{}\"\nport = {port}\nidentity = [\"{}\"]\n\
         known_hosts = \"{}\"\nauthorized_keys = \"{}\"\nhost_key = \"{}\"\n{extra}\n",
        env.dest(),
        env.user_key().display(),
        kh.display(),
        env.authorized_keys().display(),
        env.shim_host_key().display(),
    )
}

/// Writes `text` as the config file and returns its path.
fn config(env: &TestEnv, text: &str) -> String {
    let file = env.path("check.toml");
    std::fs::write(&file, text).unwrap();
    file.display().to_string()
}

/// `sshshim check ARGS`, bounded.
fn check(env: &TestEnv, args: &[&str]) -> Output {
    let mut full = vec!["check"];
    full.extend_from_slice(args);
    run_with_timeout(&mut sshshim_cmd(env, &full), b"", Duration::from_secs(60))
}

/// `sshshim check --json ARGS`: the exit status and the parsed array.
fn check_json(env: &TestEnv, args: &[&str]) -> (i32, Vec<Value>) {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = check(env, &full);
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "check --json printed no JSON ({e}):\n{}\n--- stderr ---\n{}",
            stdout_text(&out),
            stderr_text(&out)
        )
    });
    let list = parsed.as_array().expect("a JSON array").clone();
    (exit_code(&out.status), list)
}

/// The report of profile `name`.
fn report<'a>(list: &'a [Value], name: &str) -> &'a Value {
    list.iter()
        .find(|r| r["profile"] == name)
        .unwrap_or_else(|| panic!("no report for {name}: {list:?}"))
}

/// The first check `id` of a report (with `subject`, if given).
fn line<'a>(r: &'a Value, id: &str, subject: Option<&str>) -> &'a Value {
    r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == id && subject.is_none_or(|s| c["subject"] == s))
        .unwrap_or_else(|| panic!("no {id} check ({subject:?}) in {r:#}"))
}

/// Asserts a check's status and that its detail contains every needle.
fn expect(r: &Value, id: &str, subject: Option<&str>, status: &str, needles: &[&str]) {
    let c = line(r, id, subject);
    assert_eq!(c["status"], status, "{id}: {c:#}\nreport: {r:#}");
    let detail = c["detail"].as_str().unwrap();
    for n in needles {
        assert!(detail.contains(n), "{id}: {n:?} not in {detail:?}");
    }
}

/// Whether something could listen on 127.0.0.1:`port` now.
fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

#[test]
fn healthy_profile_passes_and_leaves_nothing_behind() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let svc = service(b"svc");
    let rport = free_port();
    let lspec = format!("{}:127.0.0.1:{svc}", free_port());
    let rspec = format!("127.0.0.1:{rport}:127.0.0.1:{svc}");
    let file = config(
        &env,
        &profile(
            &env,
            "lab",
            sshd.port(),
            &env.known_hosts(),
            &format!("local_forwards = [\"{lspec}\"]\nremote_forwards = [\"{rspec}\"]"),
        ),
    );
    let kh_before = std::fs::read(env.known_hosts()).unwrap();

    let (code, list) = check_json(&env, &["-c", &file]);
    let r = report(&list, "lab");
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["passed"], true);
    assert_eq!(
        r["destination"],
        format!("{}@127.0.0.1:{}", env.user(), sshd.port())
    );
    for id in ["resolve", "connect", "version", "host_key", "auth"] {
        expect(r, id, None, "ok", &[]);
    }
    let (l, rr) = (format!("-L {lspec}"), format!("-R {rspec}"));
    expect(
        r,
        "local_target",
        Some(&l),
        "ok",
        &["reachable from the server"],
    );
    expect(
        r,
        "remote_port",
        Some(&rr),
        "ok",
        &["is free on the server"],
    );
    expect(
        r,
        "remote_target",
        Some(&rr),
        "ok",
        &["reachable from this machine"],
    );
    expect(r, "running", None, "skip", &["no sshshim is running"]);
    assert!(r["connect_ms"].as_f64().is_some(), "{r:#}");
    assert!(
        r["server_version"]
            .as_str()
            .unwrap()
            .starts_with("SSH-2.0-OpenSSH"),
        "{r:#}"
    );
    let hk = &r["host_key"];
    assert_eq!(hk["state"], "known");
    assert_eq!(hk["algorithm"], "ssh-ed25519");
    assert_eq!(hk["fingerprint"], fingerprint(&env.host_key()));
    let auth = &r["auth"];
    assert_eq!(auth["method"], "publickey");
    assert_eq!(auth["credential"], env.user_key().display().to_string());
    assert!(
        auth["offered"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "publickey"),
        "{auth}"
    );
    assert_eq!(r["running"], Value::Null);

    // The table for people says the same.
    let out = check(&env, &["-c", &file, "lab"]);
    assert_success(&out, "check lab");
    let text = stdout_text(&out);
    assert!(
        text.contains(&format!(
            "  ok    host key   known: ssh-ed25519 {}",
            fingerprint(&env.host_key())
        )),
        "{text}"
    );
    assert!(
        text.contains("lab: passed, 1 skipped") && text.contains("not failures"),
        "{text}"
    );

    // Nothing listens on the probed port, and known_hosts is as it was.
    assert!(port_free(rport), "the -R port {rport} is still taken");
    assert_eq!(std::fs::read(env.known_hosts()).unwrap(), kh_before);
}

#[test]
fn unknown_host_key_fails_and_is_never_recorded() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let kh = env.path("empty_known_hosts");
    let text = profile(&env, "strict", sshd.port(), &kh, "")
        + &profile(&env, "tofu", sshd.port(), &kh, "accept_new = true");
    let file = config(&env, &text);
    let (code, list) = check_json(&env, &["-c", &file]);
    assert_eq!(code, 1, "{list:#?}");
    let fp = fingerprint(&env.host_key());

    let strict = report(&list, "strict");
    assert_eq!(strict["passed"], false);
    expect(
        strict,
        "host_key",
        None,
        "fail",
        &["unknown", &fp, "--accept-new"],
    );
    expect(strict, "auth", None, "skip", &["not trusted"]);
    assert_eq!(strict["host_key"]["state"], "unknown");
    assert_eq!(strict["host_key"]["fingerprint"], fp);

    // accept_new: check goes on (as `up` would), but records nothing.
    let tofu = report(&list, "tofu");
    assert_eq!(tofu["passed"], true, "{tofu:#}");
    expect(tofu, "host_key", None, "ok", &["unknown", "not recorded"]);
    expect(tofu, "auth", None, "ok", &["publickey"]);
    assert!(!kh.exists(), "check wrote {}", kh.display());
}

#[test]
fn changed_host_key_fails_with_both_fingerprints() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let other = env.path("other_host_key");
    keygen(&other);
    let other_line = std::fs::read_to_string(env.path("other_host_key.pub")).unwrap();
    let kh = env.path("changed_known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{} {other_line}", sshd.port())).unwrap();
    let before = std::fs::read(&kh).unwrap();
    let file = config(&env, &profile(&env, "lab", sshd.port(), &kh, ""));

    let (code, list) = check_json(&env, &["-c", &file]);
    assert_eq!(code, 1);
    let r = report(&list, "lab");
    let (offered, recorded) = (fingerprint(&env.host_key()), fingerprint(&other));
    expect(
        r,
        "host_key",
        None,
        "fail",
        &["CHANGED", &offered, &recorded],
    );
    expect(r, "auth", None, "skip", &[]);
    let hk = &r["host_key"];
    assert_eq!(hk["state"], "changed");
    assert_eq!(hk["fingerprint"], offered);
    assert_eq!(hk["recorded_fingerprint"], recorded);
    assert_eq!(hk["recorded_at"], format!("{}:1", kh.display()));

    let out = check(&env, &["-c", &file, "lab"]);
    assert_eq!(exit_code(&out.status), 1);
    assert!(
        stdout_text(&out).contains("  FAIL  host key   CHANGED"),
        "{}",
        stdout_text(&out)
    );
    assert_eq!(std::fs::read(&kh).unwrap(), before);
}

#[test]
fn refused_port_fails_fast_and_other_profiles_still_pass() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let closed = free_port();
    let text = profile(&env, "down", closed, &env.known_hosts(), "")
        + &profile(&env, "up", sshd.port(), &env.known_hosts(), "");
    let file = config(&env, &text);
    let started = Instant::now();
    let (code, list) = check_json(&env, &["-c", &file]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "a refused port took {:?}",
        started.elapsed()
    );
    assert_eq!(code, 1);
    let down = report(&list, "down");
    expect(
        down,
        "connect",
        None,
        "fail",
        &[&format!("127.0.0.1:{closed}"), "refused"],
    );
    for id in ["version", "host_key", "auth"] {
        expect(down, id, None, "skip", &[]);
    }
    assert_eq!(down["connect_ms"], Value::Null);
    assert_eq!(report(&list, "up")["passed"], true);
}

#[test]
fn unreachable_remote_target_fails() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let closed = free_port();
    let rspec = format!("127.0.0.1:{}:127.0.0.1:{closed}", free_port());
    let file = config(
        &env,
        &profile(
            &env,
            "lab",
            sshd.port(),
            &env.known_hosts(),
            &format!("remote_forwards = [\"{rspec}\"]"),
        ),
    );
    let (code, list) = check_json(&env, &["-c", &file]);
    assert_eq!(code, 1);
    let r = report(&list, "lab");
    let subject = format!("-R {rspec}");
    expect(
        r,
        "remote_target",
        Some(&subject),
        "fail",
        &[
            &format!("cannot connect to 127.0.0.1:{closed} from this machine"),
            "is the service running?",
        ],
    );
    expect(r, "remote_port", Some(&subject), "ok", &[]);
    expect(r, "auth", None, "ok", &[]);
}

#[test]
fn taken_remote_port_fails() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let svc = service(b"svc");
    // Something else listens where the profile wants its -R port.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let rspec = format!("127.0.0.1:{port}:127.0.0.1:{svc}");
    let file = config(
        &env,
        &profile(
            &env,
            "lab",
            sshd.port(),
            &env.known_hosts(),
            &format!("remote_forwards = [\"{rspec}\"]"),
        ),
    );
    let (code, list) = check_json(&env, &["-c", &file]);
    assert_eq!(code, 1);
    let r = report(&list, "lab");
    let subject = format!("-R {rspec}");
    expect(
        r,
        "remote_port",
        Some(&subject),
        "fail",
        &[&format!("refused to listen on 127.0.0.1:{port}"), "in use"],
    );
    expect(r, "remote_target", Some(&subject), "ok", &[]);

    let out = check(&env, &["-c", &file]);
    assert_eq!(exit_code(&out.status), 1);
    assert!(
        stdout_text(&out).contains(&format!(
            "  FAIL  -R port    -R {rspec}: the server refused"
        )),
        "{}",
        stdout_text(&out)
    );
}

#[test]
fn a_running_sshshim_is_reported_and_its_port_not_probed() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let svc = service(b"svc");
    let rport = free_port();
    let rspec = format!("127.0.0.1:{rport}:127.0.0.1:{svc}");
    let file = config(
        &env,
        &profile(
            &env,
            "lab",
            sshd.port(),
            &env.known_hosts(),
            &format!("remote_forwards = [\"{rspec}\"]"),
        ),
    );
    let shim = env
        .shim_builder(0)
        .no_default_args()
        .args(&["up", "-c", &file, "lab", "--listen", "127.0.0.1:0"])
        .start();
    eventually(Duration::from_secs(10), "the -R forward", || {
        fetch(rport).as_deref() == Some(b"svc")
    });

    let (code, list) = check_json(&env, &["-c", &file, "lab"]);
    let r = report(&list, "lab");
    assert_eq!(code, 0, "{r:#}");
    let pid = format!("pid {}", shim.pid());
    expect(
        r,
        "remote_port",
        Some(&format!("-R {rspec}")),
        "skip",
        &["held by the running sshshim", &pid],
    );
    expect(r, "running", None, "ok", &[&pid, "upstream connected"]);
    assert_eq!(r["running"]["upstream"]["state"], "connected");
    // The forward still works: check did not take the port away.
    assert_eq!(fetch(rport).as_deref(), Some(&b"svc"[..]));
}

#[test]
fn a_silent_server_times_out_within_the_timeout() {
    let env = TestEnv::new();
    // Accepts TCP (the kernel does, from the backlog) but never speaks.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let file = config(&env, &profile(&env, "mute", port, &env.known_hosts(), ""));
    let started = Instant::now();
    let (code, list) = check_json(&env, &["-c", &file, "--timeout", "2"]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(code, 1);
    let r = report(&list, "mute");
    expect(r, "connect", None, "ok", &[]);
    expect(
        r,
        "version",
        None,
        "fail",
        &["no SSH version string", "--timeout 2 s"],
    );
    drop(silent);
}

#[test]
fn password_only_server_fails_without_prompting() {
    let env = TestEnv::new();
    let sshd = Sshd::start_with(
        &env,
        &["PubkeyAuthentication no", "PasswordAuthentication yes"],
    );
    let file = config(
        &env,
        &profile(&env, "pw", sshd.port(), &env.known_hosts(), ""),
    );
    let (code, list) = check_json(&env, &["-c", &file]);
    assert_eq!(code, 1);
    let r = report(&list, "pw");
    expect(
        r,
        "auth",
        None,
        "fail",
        &["rejected", "password", "--interactive"],
    );
    assert_eq!(r["auth"]["method"], Value::Null);
    assert!(
        r["auth"]["offered"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "password"),
        "{r:#}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let env = TestEnv::new();
    let out = check(&env, &["--timeout", "0"]);
    assert_eq!(exit_code(&out.status), 2, "{}", stderr_text(&out));
    // No config file and no names: nothing to check.
    let out = check(&env, &[]);
    assert_eq!(exit_code(&out.status), 2, "{}", stderr_text(&out));
    assert!(
        stderr_text(&out).contains("nothing to check"),
        "{}",
        stderr_text(&out)
    );
    // An invalid config file is a failure, named with its line.
    let file = config(&env, "[profile.a]\nport = 22\n");
    let out = check(&env, &["-c", &file]);
    assert_eq!(exit_code(&out.status), 1);
    assert!(
        stderr_text(&out).contains("destination"),
        "{}",
        stderr_text(&out)
    );
}

#[test]
fn a_destination_through_a_jump_host_is_checked_hop_by_hop() {
    let env = TestEnv::new();
    let jump = Sshd::start(&env);
    let target = Sshd::start(&env);
    let kh = env.path("both_known_hosts");
    std::fs::write(
        &kh,
        format!(
            "[127.0.0.1]:{} {key}\n[127.0.0.1]:{} {key}\n",
            jump.port(),
            target.port(),
            key = env.host_key_line()
        ),
    )
    .unwrap();
    let ssh_config = env.path("ssh_config");
    let common = format!(
        "  HostName 127.0.0.1\n  User {}\n  IdentityFile {}\n  IdentitiesOnly yes\n  \
         UserKnownHostsFile {}\n",
        env.user(),
        env.user_key().display(),
        kh.display()
    );
    std::fs::write(
        &ssh_config,
        format!(
            "Host inner\n  Port {}\n  ProxyJump gw\n{common}\nHost gw\n  Port {}\n{common}",
            target.port(),
            jump.port()
        ),
    )
    .unwrap();
    let (code, list) = check_json(&env, &["-F", ssh_config.to_str().unwrap(), "inner"]);
    let r = report(&list, "inner");
    assert_eq!(code, 0, "{r:#}");
    let (gw, inner) = (
        format!("{}@127.0.0.1:{}", env.user(), jump.port()),
        format!("{}@127.0.0.1:{}", env.user(), target.port()),
    );
    assert_eq!(r["destination"], format!("{inner} via {gw}"));
    for hop in [&gw, &inner] {
        for id in ["version", "host_key", "auth"] {
            expect(r, id, Some(hop), "ok", &[]);
        }
    }
    expect(
        r,
        "connect",
        Some(&format!("{inner} via {gw}")),
        "ok",
        &["reachable from 127.0.0.1"],
    );

    // The target's key unknown: the jump host passes, the target fails.
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} {}\n", jump.port(), env.host_key_line()),
    )
    .unwrap();
    let (code, list) = check_json(&env, &["-F", ssh_config.to_str().unwrap(), "inner"]);
    assert_eq!(code, 1);
    let r = report(&list, "inner");
    expect(r, "host_key", Some(&gw), "ok", &[]);
    expect(
        r,
        "host_key",
        Some(&inner),
        "fail",
        &["unknown", "sshshim up inner --accept-new"],
    );
    expect(r, "auth", Some(&inner), "skip", &[]);
}

/// Issue 20: with `resume = true`, check says whether the server can run
/// the helper, without uploading it; and why not, when it cannot.
#[test]
fn resume_line_says_whether_the_helper_can_run() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let kh = env.known_hosts();
    let text = profile(&env, "res", sshd.port(), &kh, "resume = true")
        + &profile(
            &env,
            "nohelper",
            sshd.port(),
            &kh,
            "resume = true\nremote_helper = \"/nonexistent/sshshim\"",
        );
    let file = config(&env, &text);
    let (code, list) = check_json(&env, &["-c", &file, "res", "nohelper"]);
    expect(
        report(&list, "res"),
        "resume",
        None,
        "ok",
        &["not on the server yet", "uploads it"],
    );
    expect(
        report(&list, "nohelper"),
        "resume",
        None,
        "fail",
        &["will not be resumable", "does not run on the server"],
    );
    assert_eq!(code, 1);
    // Nothing was uploaded.
    assert!(!env.path("remote-cache/sshshim").read_dir().is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("sshshim-"))
    }));
}

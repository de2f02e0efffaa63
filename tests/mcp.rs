//! `sshshim mcp` driven by a real MCP client (rmcp's) over the child's
//! stdin/stdout: tunnel set-up, status, exec and copy through a running
//! shim in front of the harness sshd, refusal without `mcp_exec`, removal;
//! and the attacks of issue 26 (a shim that is not the profile, keys and
//! profiles that are a person's, copy outside its directory), refused.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::{RoleClient, ServiceExt as _};
use serde_json::{Value, json};
use support::*;

/// Bound on one tool call (exec's own timeouts are shorter).
const CALL_TIMEOUT: Duration = Duration::from_secs(150);

/// `timeout_s` for commands that should finish at once: generous, because
/// the remote login shell's start-up files may be slow on a busy machine
/// (seen: 14 s of `pyenv init` waiting for its rehash lock).
const EXEC_TIMEOUT_S: u64 = 120;

/// The config file as a person left it: comments, and a profile that does
/// not allow exec.
const HAND_WRITTEN: &str = "\
# sshshim profiles, kept by hand.

# Production: never for agents.
[profile.manual]
destination = \"nobody@127.0.0.1\"
port = 1  # closed on purpose
";

/// An MCP client connected to a spawned `sshshim mcp`.
struct Mcp {
    /// The client session.
    client: RunningService<RoleClient, ()>,
    /// The server process (killed on drop).
    child: tokio::process::Child,
    /// Everything the server logged on stderr.
    stderr: Capture,
}

impl Mcp {
    /// Spawns `sshshim mcp` with the test's XDG directories and connects.
    async fn start(env: &TestEnv) -> Mcp {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sshshim"))
            .arg("mcp")
            .env("XDG_STATE_HOME", env.state_dir())
            .env("XDG_RUNTIME_DIR", env.runtime_dir())
            .env("XDG_CONFIG_HOME", env.path("config"))
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("RUST_LOG")
            .current_dir(env.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sshshim mcp");
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take().expect("stdin");
        let stderr = child
            .stderr
            .take()
            .expect("stderr")
            .into_owned_fd()
            .unwrap();
        let stderr = Capture::spawn(std::fs::File::from(stderr));
        let client = tokio::time::timeout(CALL_TIMEOUT, ().serve((stdout, stdin)))
            .await
            .expect("MCP initialize timed out")
            .expect("MCP initialize failed");
        Mcp {
            client,
            child,
            stderr,
        }
    }

    /// Calls `tool` with `args`, bounded in time.
    async fn call(&self, tool: &'static str, args: Value) -> CallToolResult {
        let Value::Object(args) = args else {
            panic!("arguments must be an object")
        };
        let params = CallToolRequestParams::new(tool).with_arguments(args);
        tokio::time::timeout(CALL_TIMEOUT, self.client.call_tool(params))
            .await
            .unwrap_or_else(|_| panic!("{tool} timed out; log:\n{}", self.stderr.text()))
            .unwrap_or_else(|e| panic!("{tool}: {e}; log:\n{}", self.stderr.text()))
    }

    /// Calls `tool` and returns its structured result, failing on a tool error.
    async fn ok(&self, tool: &'static str, args: Value) -> Value {
        let r = self.call(tool, args).await;
        assert_ne!(r.is_error, Some(true), "{tool} failed: {}", text(&r));
        r.structured_content
            .unwrap_or_else(|| panic!("{tool} returned no structured content"))
    }

    /// Calls `tool`, expects a tool error and returns its message.
    async fn err(&self, tool: &'static str, args: Value) -> String {
        let r = self.call(tool, args).await;
        assert_eq!(r.is_error, Some(true), "{tool} should fail: {r:?}");
        text(&r)
    }
}

/// The text content of a result.
fn text(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The default config path under the test's XDG_CONFIG_HOME.
fn config_file(env: &TestEnv) -> PathBuf {
    env.path("config").join("sshshim").join("config.toml")
}

/// A person's profile that opts in to exec and copy, for the harness sshd,
/// serving an endpoint on `listen`.
fn person_profile(env: &TestEnv, sshd: &Sshd, name: &str, listen: &str, extra: &str) -> String {
    format!(
        "\n# Opted in by hand.\n[profile.\"{name}\"]\ndestination = \"{dest}\"\nport = {port}\n\
         identity = [\"{key}\"]\nknown_hosts = \"{kh}\"\nauthorized_keys = \"{ak}\"\n\
         host_key = \"{hk}\"\nlisten = \"{listen}\"\nconnect_timeout = 5\n{extra}",
        dest = env.dest(),
        port = sshd.port(),
        key = env.user_key().display(),
        kh = env.known_hosts().display(),
        ak = env.authorized_keys().display(),
        hk = env.shim_host_key().display(),
    )
}

/// A multi-threaded runtime for the MCP client.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// SHA-256 of a file, lowercase hex.
fn sha(path: &Path) -> String {
    sha256_file(path)
}

#[test]
fn mcp_tools_set_up_use_and_remove_a_tunnel() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let cfg = config_file(&env);
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    // `lab` is a person's: only a person opts a profile in to exec.
    let hand_written = format!(
        "{HAND_WRITTEN}{}",
        person_profile(&env, &sshd, "lab", &listen, "mcp_exec = true\n")
    );
    std::fs::write(&cfg, &hand_written).unwrap();
    let rt = runtime();
    let mcp = rt.block_on(Mcp::start(&env));

    // The tools are there, with input schemas.
    let tools = rt
        .block_on(mcp.client.list_all_tools())
        .expect("tools/list");
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "copy",
            "exec",
            "tunnel_remove",
            "tunnel_setup",
            "tunnel_status"
        ]
    );

    // The annotations say what each tool does.
    let hint = |name: &str| {
        let t = tools.iter().find(|t| t.name == name).unwrap();
        t.annotations.clone().expect("annotations")
    };
    assert_eq!(hint("tunnel_setup").destructive_hint, Some(true));
    assert_eq!(hint("tunnel_setup").open_world_hint, Some(true));
    assert_eq!(hint("tunnel_remove").destructive_hint, Some(true));
    assert_eq!(hint("exec").open_world_hint, Some(true));
    assert_eq!(hint("copy").open_world_hint, Some(true));
    assert_eq!(hint("tunnel_status").read_only_hint, Some(true));

    // Set up a profile of MCP's own for the harness sshd: a forward, no
    // endpoint, no exec.
    let setup = rt.block_on(mcp.ok(
        "tunnel_setup",
        json!({
            "name": "mcp-agent",
            "destination": env.dest(),
            "remote_forwards": [format!("{}:localhost:{}", free_port(), sshd.port())],
            "options": {"port": sshd.port(), "connect_timeout": 5},
        }),
    ));
    assert_eq!(setup["created"], true, "{setup}");
    assert_eq!(setup["running"], false, "{setup}");
    assert_eq!(setup["settings"]["mcp_created"], true, "{setup}");
    assert!(
        setup["next_steps"]
            .as_str()
            .unwrap()
            .contains("sshshim up mcp-agent"),
        "{setup}"
    );
    let text_now = std::fs::read_to_string(&cfg).unwrap();
    assert!(text_now.starts_with(&hand_written), "{text_now}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cfg).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A bad value is refused with the loader's file:line:key message, and
    // nothing is written.
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": "mcp-agent", "destination": env.dest(), "options": {"keepalive": 0}}),
    ));
    assert!(
        e.contains("config.toml:") && e.contains("key 'keepalive'"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), text_now);

    // Configured, not running.
    let st = rt.block_on(mcp.ok("tunnel_status", json!({"name": "lab"})));
    let lab = &st["profiles"][0];
    assert_eq!(lab["name"], "lab", "{st}");
    assert_eq!(lab["configured"], true, "{st}");
    assert_eq!(lab["running"], false, "{st}");
    assert_eq!(lab["mcp_exec"], true, "{st}");
    assert_eq!(lab["mcp_managed"], false, "{st}");
    assert_eq!(lab["settings"]["listen"], listen.as_str(), "{st}");

    // Exec before the shim runs says how to start it.
    let e = rt.block_on(mcp.err("exec", json!({"profile": "lab", "command": "true"})));
    assert!(e.contains("sshshim up lab"), "{e}");

    // Start it as a person would.
    let mut shim = env
        .shim_builder(0)
        .no_default_args()
        .args(&["up", "lab"])
        .env("XDG_CONFIG_HOME", env.path("config").to_str().unwrap())
        .start();
    let st = rt.block_on(mcp.ok("tunnel_status", json!({})));
    let all = st["profiles"].as_array().unwrap();
    assert_eq!(all.len(), 3, "{st}");
    let lab = all.iter().find(|p| p["name"] == "lab").unwrap();
    assert_eq!(lab["running"], true, "{st}");
    assert_eq!(lab["status"]["endpoint"], listen.as_str(), "{st}");
    assert_eq!(lab["status"]["upstream"]["state"], "connected", "{st}");
    let cfg_real = std::fs::canonicalize(&cfg).unwrap();
    assert_eq!(
        lab["status"]["config_file"],
        cfg_real.to_str().unwrap(),
        "{st}"
    );
    assert_eq!(
        lab["status"]["profile_destination"],
        format!("{}:{}", env.dest(), sshd.port()),
        "{st}"
    );
    let manual = all.iter().find(|p| p["name"] == "manual").unwrap();
    assert_eq!(manual["running"], false, "{st}");
    assert_eq!(manual["mcp_exec"], false, "{st}");
    let agent = all.iter().find(|p| p["name"] == "mcp-agent").unwrap();
    assert_eq!(agent["mcp_managed"], true, "{st}");

    // exec: output, exit status, a marker that must not reach the log.
    let marker = "mcp-secret-7f3a";
    let out = rt.block_on(mcp.ok(
        "exec",
        json!({
            "profile": "lab",
            "command": format!("echo hello; echo {marker} >&2; exit 3"),
            "timeout_s": EXEC_TIMEOUT_S,
        }),
    ));
    assert_eq!(out["stdout"], "hello\n", "{out}");
    assert_eq!(out["stderr"], format!("{marker}\n"), "{out}");
    assert_eq!(out["exit_status"], 3, "{out}");
    assert_eq!(out["timed_out"], false, "{out}");

    // Output past the cap is cut and marked.
    let out = rt.block_on(mcp.ok(
        "exec",
        json!({
            "profile": "lab",
            "command": "head -c 1200000 /dev/zero | tr '\\0' x",
            "timeout_s": EXEC_TIMEOUT_S,
        }),
    ));
    assert_eq!(out["stdout_bytes"], 1_200_000, "{}", out["stderr"]);
    assert_eq!(out["stdout_truncated"], true);
    assert!(out["stdout"].as_str().unwrap().ends_with("not shown]\n"));
    assert_eq!(out["exit_status"], 0);

    // A command past timeout_s is stopped.
    let out = rt.block_on(mcp.ok(
        "exec",
        json!({"profile": "lab", "command": "sleep 30", "timeout_s": 1}),
    ));
    assert_eq!(out["timed_out"], true, "{out}");
    assert_eq!(out["exit_status"], Value::Null, "{out}");

    // copy put and get, checked by sha256 on both sides.
    let data = pseudo_random_bytes(300_000, 7);
    let local_up = env.path("up file.bin");
    std::fs::write(&local_up, &data).unwrap();
    let remote_up = env.path("remote_put.bin");
    let put = rt.block_on(mcp.ok(
        "copy",
        json!({"profile": "lab", "direction": "put", "local": "up file.bin", "remote": remote_up}),
    ));
    assert_eq!(put["bytes"], 300_000, "{put}");
    assert_eq!(put["sha256"], sha256_hex(&data), "{put}");
    assert_eq!(sha(&remote_up), sha256_hex(&data));

    let remote_down = env.path("remote [get].bin");
    let data2 = pseudo_random_bytes(123_457, 11);
    std::fs::write(&remote_down, &data2).unwrap();
    let get_dir = env.path("downloads");
    std::fs::create_dir(&get_dir).unwrap();
    let get = rt.block_on(mcp.ok(
        "copy",
        json!({"profile": "lab", "direction": "get", "local": "downloads", "remote": remote_down}),
    ));
    let got = get_dir.join("remote [get].bin");
    assert_eq!(get["local"], got.to_str().unwrap(), "{get}");
    assert_eq!(get["bytes"], 123_457, "{get}");
    assert_eq!(get["sha256"], sha256_hex(&data2), "{get}");
    assert_eq!(sha(&got), sha256_hex(&data2));

    let e = rt.block_on(mcp.err(
        "copy",
        json!({"profile": "lab", "direction": "get", "local": "x", "remote": "/no/such/file"}),
    ));
    assert!(e.contains("sftp failed"), "{e}");

    // A profile without mcp_exec is refused, and tunnel_setup cannot opt
    // an existing profile in.
    let e = rt.block_on(mcp.err("exec", json!({"profile": "manual", "command": "id"})));
    assert!(e.contains("mcp_exec = true") && e.contains("manual"), "{e}");
    let e = rt.block_on(mcp.err(
        "copy",
        json!({"profile": "manual", "direction": "get", "local": "x", "remote": "y"}),
    ));
    assert!(e.contains("mcp_exec = true"), "{e}");
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": "manual", "destination": "nobody@127.0.0.1", "options": {"mcp_exec": true}}),
    ));
    assert!(e.contains("only a person sets"), "{e}");

    // copy stays beneath the server's working directory (issue 26,
    // finding 3): no absolute path, no '..', no symlink leading out, for
    // reading and for writing; nothing outside is read or changed.
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"keep me").unwrap();
    std::os::unix::fs::symlink(&secret, env.path("leaf-link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), env.path("dir-link")).unwrap();
    let secret_abs = secret.to_str().unwrap().to_owned();
    let dotdot = format!(
        "downloads/../../{}/secret",
        outside.path().file_name().unwrap().to_str().unwrap()
    );
    for (direction, local, why) in [
        ("put", secret_abs.as_str(), "absolute"),
        ("get", secret_abs.as_str(), "absolute"),
        ("put", dotdot.as_str(), "'..'"),
        ("get", dotdot.as_str(), "'..'"),
        ("put", "leaf-link", "symbolic link"),
        ("get", "leaf-link", "symbolic link"),
        ("put", "dir-link/secret", "symbolic link"),
        ("get", "dir-link/secret", "symbolic link"),
        ("get", "dir-link/new", "symbolic link"),
        // sshshim's own profiles file lies beneath it here: never written.
        ("get", "config/sshshim/config.toml", "profiles file"),
    ] {
        let e = rt.block_on(mcp.err(
            "copy",
            json!({"profile": "lab", "direction": direction, "local": local, "remote": remote_up}),
        ));
        assert!(e.contains(why), "{direction} {local}: {e}");
    }
    assert_eq!(std::fs::read(&secret).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    // A get that fails leaves no empty file behind.
    assert!(!env.path("x").exists(), "a failed get left its file");

    // Without systemd, service: true installs nothing and says why.
    if !Path::new("/run/systemd/system").exists() {
        let svc = rt.block_on(mcp.ok(
            "tunnel_setup",
            json!({"name": "mcp-svc", "destination": "h.example", "service": true}),
        ));
        assert_eq!(svc["service"]["installed"], false, "{svc}");
        assert!(
            svc["service"]["message"]
                .as_str()
                .unwrap()
                .contains("systemd"),
            "{svc}"
        );
        assert!(
            svc["next_steps"]
                .as_str()
                .unwrap()
                .contains("sshshim up mcp-svc"),
            "{svc}"
        );
        let rm = rt.block_on(mcp.ok("tunnel_remove", json!({"name": "mcp-svc"})));
        assert_eq!(rm["stopped"], false, "{rm}");
    }

    // A person's profile is not MCP's to remove, running or not.
    let e = rt.block_on(mcp.err("tunnel_remove", json!({"name": "lab"})));
    assert!(e.contains("MCP"), "{e}");
    assert!(
        shim.is_running(),
        "tunnel_remove stopped a person's profile"
    );

    // Remove MCP's own profile while a person runs it (flags for what MCP
    // may not set): it is stopped and its table deleted, keeping the
    // comments and the other profiles.
    let mut agent_shim = env
        .shim_builder(0)
        .no_default_args()
        .args(&[
            "up",
            "mcp-agent",
            "--listen",
            "127.0.0.1:0",
            "--known-hosts",
        ])
        .arg(env.known_hosts().to_str().unwrap())
        .arg("-i")
        .arg(env.user_key().to_str().unwrap())
        .args(&["--host-key", env.shim_host_key().to_str().unwrap()])
        .args(&["--authorized-keys", env.authorized_keys().to_str().unwrap()])
        .env("XDG_CONFIG_HOME", env.path("config").to_str().unwrap())
        .start();
    let rm = rt.block_on(mcp.ok("tunnel_remove", json!({"name": "mcp-agent"})));
    assert_eq!(rm["stopped"], true, "{rm}");
    assert_eq!(rm["removed_from_file"], true, "{rm}");
    assert!(
        agent_shim.wait_exit(Duration::from_secs(10)).is_some(),
        "tunnel_remove did not stop the shim"
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), hand_written);
    let e = rt.block_on(mcp.err("tunnel_remove", json!({"name": "mcp-agent"})));
    assert!(e.contains("no profile 'mcp-agent'"), "{e}");
    shim.kill();

    // Every call was logged on stderr, with no command output in it.
    let Mcp {
        client,
        mut child,
        stderr,
    } = mcp;
    rt.block_on(async {
        let _ = tokio::time::timeout(CALL_TIMEOUT, client.cancel()).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    });
    stderr.wait_eof(Duration::from_secs(5));
    let log = stderr.text();
    for needle in [
        "tool=\"tunnel_setup\"",
        "tool=\"exec\"",
        "outcome=\"exit 3\"",
        "tool=\"copy\"",
        "tool=\"tunnel_remove\"",
    ] {
        assert!(log.contains(needle), "missing {needle} in:\n{log}");
    }
    assert!(
        !log.contains(marker),
        "command output leaked into the log:\n{log}"
    );
}

/// Issue 26, finding 2: the agent cannot grant itself code execution. Keys
/// that run commands, authenticate, trust host keys, listen or opt in are
/// refused in tunnel_setup, new profile or not; a person's profile can be
/// neither changed nor removed (so not removed and re-created with
/// mcp_exec), and the file keeps its comments.
#[test]
fn mcp_cannot_grant_itself_exec() {
    let env = TestEnv::new();
    let cfg = config_file(&env);
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, HAND_WRITTEN).unwrap();
    let rt = runtime();
    let mcp = rt.block_on(Mcp::start(&env));
    for (key, value) in [
        ("on_event", json!("touch /tmp/sshshim-pwned")),
        ("mcp_exec", json!(true)),
        ("authorized_keys", json!("/tmp/keys")),
        ("listen", json!("127.0.0.1:2399")),
        ("allow_non_loopback", json!(true)),
        ("known_hosts", json!("/dev/null")),
        ("accept_new", json!(true)),
        ("identity", json!(["/tmp/k"])),
        ("host_key", json!("/tmp/hk")),
        ("metrics", json!("127.0.0.1:9999")),
        ("mux", json!("/tmp/m.sock")),
        ("copy_dir", json!("/")),
        ("mcp_created", json!(true)),
    ] {
        for name in ["mcp-fresh", "manual"] {
            let e = rt.block_on(mcp.err(
                "tunnel_setup",
                json!({"name": name, "destination": "h.example", "options": {key: value}}),
            ));
            assert!(e.contains("only a person sets"), "{key} on {name}: {e}");
        }
    }
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), HAND_WRITTEN);

    // A person's profile: not changed, not removed, so not re-created.
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": "manual", "destination": "h.example"}),
    ));
    assert!(e.contains("not created through MCP"), "{e}");
    let e = rt.block_on(mcp.err("tunnel_remove", json!({"name": "manual"})));
    assert!(e.contains("not created through MCP"), "{e}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), HAND_WRITTEN);

    // New profiles take the reserved prefix, so none gets the socket of a
    // person's `prod` run from another file or ad hoc.
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": "prod", "destination": "h.example", "service": true}),
    ));
    assert!(
        e.contains("named mcp-") && e.contains("try mcp-prod"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), HAND_WRITTEN);

    // A profile MCP created is its to change, until a person takes it over
    // by adding a key of theirs.
    let made = rt.block_on(mcp.ok(
        "tunnel_setup",
        json!({"name": "mcp-mine", "destination": "h.example", "options": {"keepalive": 7}}),
    ));
    assert_eq!(made["created"], true, "{made}");
    let updated = rt.block_on(mcp.ok(
        "tunnel_setup",
        json!({"name": "mcp-mine", "destination": "h2.example"}),
    ));
    assert_eq!(updated["created"], false, "{updated}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "keepalive = 7\n",
            "keepalive = 7\nlisten = \"127.0.0.1:2398\"\nmcp_exec = true\n",
        ),
    )
    .unwrap();
    let taken = std::fs::read_to_string(&cfg).unwrap();
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": "mcp-mine", "destination": "evil.example"}),
    ));
    assert!(e.contains("taken it over"), "{e}");
    let e = rt.block_on(mcp.err("tunnel_remove", json!({"name": "mcp-mine"})));
    assert!(e.contains("taken it over"), "{e}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), taken);
    assert!(taken.starts_with(HAND_WRITTEN), "{taken}");
}

/// Issue 26, finding 1: MCP acts only on the process that runs exactly
/// the profile of its own file. An ad-hoc `sshshim up USER@127.0.0.1` no
/// longer shares a socket with a profile named `USER_127.0.0.1`, and a shim
/// running a profile of the same name from another file is neither used by
/// exec nor stopped by tunnel_remove.
#[test]
fn mcp_acts_only_on_the_profiles_own_process() {
    let env = TestEnv::new();
    let sshd = Sshd::start(&env);
    let cfg = config_file(&env);
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    let rt = runtime();

    // The audit's collision: an ad-hoc shim (no mcp_exec anywhere).
    let adhoc = env.start_shim(&sshd);
    let folded = env.dest().replace('@', "_");
    let mcp = rt.block_on(Mcp::start(&env));
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": folded, "destination": "unrelated", "options": {"mcp_exec": true}}),
    ));
    assert!(e.contains("only a person sets"), "{e}");
    // Even a person's profile of that name does not reach the ad-hoc shim.
    let listen_a = format!("127.0.0.1:{}", free_port());
    let listen_b = format!("127.0.0.1:{}", free_port());
    let mine = format!(
        "{}{}",
        person_profile(&env, &sshd, &folded, &listen_a, "mcp_exec = true\n"),
        person_profile(&env, &sshd, "twin", &listen_b, "mcp_exec = true\n"),
    );
    std::fs::write(&cfg, &mine).unwrap();
    let e = rt.block_on(mcp.err(
        "exec",
        json!({"profile": folded, "command": "echo ran", "timeout_s": EXEC_TIMEOUT_S}),
    ));
    assert!(e.contains(&format!("sshshim up {folded}")), "{e}");

    // `twin` of another file, without mcp_exec, runs under the same name.
    let other = env.path("other.toml");
    std::fs::write(&other, person_profile(&env, &sshd, "twin", &listen_b, "")).unwrap();
    let mut twin = env
        .shim_builder(0)
        .no_default_args()
        .args(&["up", "-c", other.to_str().unwrap(), "twin"])
        .start();
    let e = rt.block_on(mcp.err(
        "exec",
        json!({"profile": "twin", "command": "echo ran", "timeout_s": EXEC_TIMEOUT_S}),
    ));
    assert!(
        e.contains("other.toml") && e.contains("not profile 'twin'"),
        "{e}"
    );
    let e = rt.block_on(mcp.err(
        "copy",
        json!({"profile": "twin", "direction": "get", "local": "got", "remote": "/etc/hostname"}),
    ));
    assert!(e.contains("not profile 'twin'"), "{e}");
    assert!(!env.path("got").exists());

    // Were `twin` MCP's own in this file (made before new names took the
    // mcp- prefix), tunnel_remove still would not stop a process that runs
    // another file's `twin`.
    std::fs::write(
        &cfg,
        format!(
            "[profile.twin]\nmcp_created = true\ndestination = \"{}\"\nport = {}\n",
            env.dest(),
            sshd.port()
        ),
    )
    .unwrap();
    let e = rt.block_on(mcp.err("tunnel_remove", json!({"name": "twin"})));
    assert!(e.contains("nothing was stopped"), "{e}");
    assert!(
        twin.is_running(),
        "tunnel_remove stopped another file's profile"
    );
    assert!(
        std::fs::read_to_string(&cfg)
            .unwrap()
            .contains("[profile.twin]")
    );
    twin.kill();
    drop(adhoc);
}

/// tunnel_setup and tunnel_remove never touch a person's systemd unit: not
/// one whose name only looks like the profile's (`sshshim-mcp-a-b.service`
/// runs the profiles `mcp` and `a-b`), and not `sshshim.service` or `X.service`,
/// which `service remove NAME` would resolve a profile named `sshshim` or
/// `X.service` to.
#[test]
fn mcp_leaves_a_persons_units_alone() {
    let env = TestEnv::new();
    let cfg = config_file(&env);
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    let units = env.path("config").join("systemd").join("user");
    std::fs::create_dir_all(&units).unwrap();
    let canon = std::fs::canonicalize(cfg.parent().unwrap())
        .unwrap()
        .join("config.toml");
    let unit = |profiles: &str| {
        format!(
            "[Service]\nExecStart=/usr/bin/sshshim supervise -c {} {profiles}\n",
            canon.display()
        )
    };
    // The person's units: every profile, prod alone, and mcp and a-b together.
    let person = [
        ("sshshim.service", unit("")),
        ("sshshim-prod.service", unit("prod")),
        ("sshshim-mcp-a-b.service", unit("mcp a-b")),
    ];
    for (f, text) in &person {
        std::fs::write(units.join(f), text).unwrap();
    }
    // MCP's own profiles, with the units tunnel_setup would have installed
    // (named before the mcp- prefix: MCP still removes what it owns).
    std::fs::write(
        &cfg,
        "[profile.sshshim]\nmcp_created = true\ndestination = \"h.example\"\n\n\
         [profile.\"sshshim-prod.service\"]\nmcp_created = true\ndestination = \"h.example\"\n",
    )
    .unwrap();
    let own = [
        ("sshshim-sshshim.service", unit("sshshim")),
        (
            "sshshim-sshshim-prod.service.service",
            unit("sshshim-prod.service"),
        ),
    ];
    for (f, text) in &own {
        std::fs::write(units.join(f), text).unwrap();
    }
    let rt = runtime();
    let mcp = rt.block_on(Mcp::start(&env));
    for name in ["sshshim", "sshshim-prod.service"] {
        let out = rt.block_on(mcp.ok("tunnel_remove", json!({"name": name})));
        assert_eq!(out["removed_from_file"], true, "{out}");
    }
    for (f, _) in &own {
        assert!(!units.join(f).exists(), "{f} was not removed");
    }
    let before = std::fs::read_to_string(&cfg).unwrap();
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": "mcp-a-b", "destination": "evil.example", "service": true}),
    ));
    assert!(e.contains("not tunnel_setup's"), "{e}");
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    for (f, text) in &person {
        assert_eq!(
            std::fs::read_to_string(units.join(f)).ok().as_ref(),
            Some(text),
            "{f} was changed"
        );
    }
}

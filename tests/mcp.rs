//! `sshshim mcp` driven by a real MCP client (rmcp's) over the child's
//! stdin/stdout: tunnel set-up, status, exec and copy through a running
//! shim in front of the harness sshd, refusal without `mcp_exec`, removal.

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
    std::fs::write(&cfg, HAND_WRITTEN).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
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

    // Set up a profile for the harness sshd.
    let setup = rt.block_on(mcp.ok(
        "tunnel_setup",
        json!({
            "name": "lab",
            "destination": env.dest(),
            "options": {
                "port": sshd.port(),
                "identity": [env.user_key()],
                "known_hosts": env.known_hosts(),
                "authorized_keys": env.authorized_keys(),
                "host_key": env.shim_host_key(),
                "listen": listen,
                "connect_timeout": 5,
                "mcp_exec": true,
            },
        }),
    ));
    assert_eq!(setup["created"], true, "{setup}");
    assert_eq!(setup["running"], false, "{setup}");
    assert!(
        setup["next_steps"]
            .as_str()
            .unwrap()
            .contains("sshshim up lab"),
        "{setup}"
    );
    let text_now = std::fs::read_to_string(&cfg).unwrap();
    assert!(text_now.starts_with(HAND_WRITTEN), "{text_now}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cfg).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A bad value is refused with the loader's file:line:key message, and
    // nothing is written.
    let e = rt.block_on(mcp.err(
        "tunnel_setup",
        json!({"name": "lab", "destination": env.dest(), "options": {"keepalive": 0}}),
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
    assert_eq!(all.len(), 2, "{st}");
    let lab = all.iter().find(|p| p["name"] == "lab").unwrap();
    assert_eq!(lab["running"], true, "{st}");
    assert_eq!(lab["status"]["endpoint"], listen.as_str(), "{st}");
    assert_eq!(lab["status"]["upstream"]["state"], "connected", "{st}");
    let manual = all.iter().find(|p| p["name"] == "manual").unwrap();
    assert_eq!(manual["running"], false, "{st}");
    assert_eq!(manual["mcp_exec"], false, "{st}");

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
        json!({"profile": "lab", "direction": "put", "local": local_up, "remote": remote_up}),
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
    assert!(e.contains("mcp_exec = true"), "{e}");

    // Without systemd, service: true installs nothing and says why.
    if !Path::new("/run/systemd/system").exists() {
        let svc = rt.block_on(mcp.ok(
            "tunnel_setup",
            json!({"name": "svc", "destination": "h.example", "service": true}),
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
                .contains("sshshim up svc"),
            "{svc}"
        );
        let rm = rt.block_on(mcp.ok("tunnel_remove", json!({"name": "svc"})));
        assert_eq!(rm["stopped"], false, "{rm}");
    }

    // Remove: stops the shim and deletes the table, keeping the comments
    // and the other profile.
    let rm = rt.block_on(mcp.ok("tunnel_remove", json!({"name": "lab"})));
    assert_eq!(rm["stopped"], true, "{rm}");
    assert_eq!(rm["removed_from_file"], true, "{rm}");
    assert!(
        shim.wait_exit(Duration::from_secs(10)).is_some(),
        "tunnel_remove did not stop the shim"
    );
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), HAND_WRITTEN);
    let e = rt.block_on(mcp.err("tunnel_remove", json!({"name": "lab"})));
    assert!(e.contains("no profile 'lab'"), "{e}");

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

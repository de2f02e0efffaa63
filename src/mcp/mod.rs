//! `sshshim mcp`: a Model Context Protocol server on stdin/stdout, so an AI
//! agent can set up, inspect and remove tunnels, and run commands and copy
//! files through a running shim.
//!
//! Tools: `tunnel_setup`, `tunnel_status`, `tunnel_remove`, `exec`, `copy`.
//! Each takes and returns JSON; a failure is an MCP tool error carrying the
//! message the CLI would print. stdout carries only JSON-RPC; every call is
//! logged (tool, profile, outcome) to stderr, never file contents.
//!
//! The gate holds against an agent set on working around it:
//! - `exec` and `copy` work only for profiles with `mcp_exec = true`, a key
//!   only a person sets (by editing the file), and only through a process
//!   whose status names exactly that profile of this file with the same
//!   destination (see [`check_identity`]);
//! - `tunnel_setup` writes only harmless keys ([`edit::MCP_KEYS`]) and
//!   changes, like `tunnel_remove` removes, only profiles it created and no
//!   person has taken over (see [`edit`]);
//! - `copy` reads and writes local files only beneath the server's working
//!   directory or the profile's `copy_dir` (see [`beneath`]).

mod beneath;
mod edit;
mod remote;

use anyhow::{anyhow, bail};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::{Json, ServiceExt as _, tool, tool_handler, tool_router};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::profile;
use crate::{control, service};

pub use remote::{CopyOutput, Direction, ExecOutput};

/// Default and largest `timeout_s` of `exec`.
const EXEC_TIMEOUT: (u64, u64) = (60, 3600);
/// Default and largest `timeout_s` of `copy`.
const COPY_TIMEOUT: (u64, u64) = (600, 24 * 3600);
/// How long `tunnel_remove` waits for a stopped profile to go away.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What `sshshim mcp` was started with.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Profiles file given with `-c`; else [`profile::default_path`].
    pub config: Option<PathBuf>,
}

/// Serves the tools on stdin/stdout until the client closes stdin.
pub async fn serve(opts: Options) -> anyhow::Result<()> {
    let server = Server::new(opts);
    tracing::info!(config = %server.config.display(), "MCP server ready on stdio");
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow!("MCP session failed to start: {e}"))?;
    let reason = running
        .waiting()
        .await
        .map_err(|e| anyhow!("MCP session ended abnormally: {e}"))?;
    tracing::info!(?reason, "MCP session closed");
    Ok(())
}

/// The MCP server: the config file it edits and the tool router.
#[derive(Clone)]
pub struct Server {
    /// The profiles file.
    config: PathBuf,
    /// Whether `-c` named it (then hints repeat `-c FILE`).
    explicit: bool,
    /// Serialises edits of the file between concurrent calls.
    edits: Arc<tokio::sync::Mutex<()>>,
    /// Routes `tools/call` to the methods below.
    tool_router: ToolRouter<Self>,
}

/// `tunnel_setup` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupParams {
    /// Profile name, the NAME of [profile.NAME]: letters, digits, '.', '_', '-'; a new
    /// profile's name must begin with "mcp-" (reserved for profiles made here).
    pub name: String,
    /// Where to connect: [user@]host[:port], or a Host alias from ~/.ssh/config.
    pub destination: String,
    /// Remote forwards kept up by sshshim, as for ssh -R, e.g. "2222:localhost:22".
    /// Replaces the profile's list; [] removes it; omitted keeps it.
    #[serde(default)]
    pub remote_forwards: Option<Vec<String>>,
    /// Local forwards owned by sshshim, as for ssh -L, e.g. "15432:db:5432".
    /// Replaces the profile's list; [] removes it; omitted keeps it.
    #[serde(default)]
    pub local_forwards: Option<Vec<String>>,
    /// Other profile keys, as in the config file; only port, user and the
    /// tuning keys (the schema lists them, from [`profile::TUNING_KEYS`]).
    #[serde(default)]
    #[schemars(description = options_description())]
    pub options: Option<serde_json::Map<String, Value>>,
    /// Also install and start a systemd user service running this profile.
    #[serde(default)]
    pub service: Option<bool>,
}

/// What an agent reads about `tunnel_setup`'s `options`: the keys it may
/// set, from the lists that decide it.
fn options_description() -> String {
    format!(
        "Other profile keys, as in the config file; only these: port, user, {}. A null value \
         removes the key. Keys such as identity, known_hosts, listen, on_event or mcp_exec \
         are a person's to set, by editing the file.",
        profile::TUNING_KEYS.join(", ")
    )
}

/// `tunnel_setup` result.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SetupOutput {
    /// Profile name.
    pub profile: String,
    /// The config file written.
    pub config_file: String,
    /// True when the profile is new, false when it was updated.
    pub created: bool,
    /// The profile's keys as they now are in the file.
    pub settings: Value,
    /// True when an sshshim already runs this profile (it keeps its old
    /// settings until restarted).
    pub running: bool,
    /// What became of the requested service; null when none was asked for.
    pub service: Option<ServiceOutcome>,
    /// How to start the tunnel.
    pub next_steps: String,
    /// Anything else worth knowing.
    pub notes: Vec<String>,
}

/// The service part of `tunnel_setup`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ServiceOutcome {
    /// True when the unit was installed and started.
    pub installed: bool,
    /// What was done, or why nothing could be.
    pub message: String,
}

/// `tunnel_status` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusParams {
    /// Only this profile (default: every configured or running one).
    #[serde(default)]
    pub name: Option<String>,
}

/// `tunnel_status` result.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct StatusOutput {
    /// The config file read.
    pub config_file: String,
    /// Configured and running profiles, by name.
    pub profiles: Vec<TunnelInfo>,
}

/// One profile in `tunnel_status`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct TunnelInfo {
    /// Profile name.
    pub name: String,
    /// True when the profile is in the config file.
    pub configured: bool,
    /// Its keys as written in the file; null when not configured.
    pub settings: Value,
    /// True when exec and copy may use it (mcp_exec = true).
    pub mcp_exec: bool,
    /// True when tunnel_setup created it and no person has taken it over,
    /// so tunnel_setup may change it and tunnel_remove remove it.
    pub mcp_managed: bool,
    /// True when an sshshim is running it.
    pub running: bool,
    /// The running profile's status, as `sshshim status --json` prints it
    /// (upstream state, endpoint, forwards, counters); null when not running.
    pub status: Option<Value>,
    /// The systemd user unit installed for this profile alone, if any.
    pub service_unit: Option<String>,
}

/// `tunnel_remove` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoveParams {
    /// Profile name.
    pub name: String,
}

/// `tunnel_remove` result.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct RemoveOutput {
    /// Profile name.
    pub profile: String,
    /// The config file edited.
    pub config_file: String,
    /// True when it was stopped (it was running).
    pub stopped: bool,
    /// What was done about its systemd unit; null when it had none.
    pub service: Option<String>,
    /// True when its table was removed from the file.
    pub removed_from_file: bool,
}

/// `exec` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// A running profile with mcp_exec = true.
    pub profile: String,
    /// Command line for the remote login shell; stdin is empty, no terminal.
    pub command: String,
    /// Seconds before ssh is stopped (default 60, at most 3600).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// `copy` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyParams {
    /// A running profile with mcp_exec = true.
    pub profile: String,
    /// "put" (local to remote) or "get" (remote to local).
    pub direction: Direction,
    /// Local file, a relative path without '..' beneath the server's working
    /// directory (or the profile's copy_dir); symlinks leading out are
    /// refused. For get, an existing directory receives the file under its
    /// remote name.
    pub local: String,
    /// Remote path; relative paths start in the remote home directory.
    pub remote: String,
    /// Seconds before the transfer is stopped (default 600).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

#[tool_router]
impl Server {
    /// A server for `opts`.
    pub fn new(opts: Options) -> Self {
        let explicit = opts.config.is_some();
        Server {
            config: opts.config.unwrap_or_else(profile::default_path),
            explicit,
            edits: Arc::new(tokio::sync::Mutex::new(())),
            tool_router: Self::tool_router(),
        }
    }

    /// Adds or updates a profile in the config file.
    #[tool(
        description = "Add or update a tunnel profile ([profile.NAME] in sshshim's config file), \
        validated exactly as `sshshim up` reads it; the rest of the file, comments included, is kept. \
        Keys not given are kept. New profiles must be named mcp-NAME. Only profiles created by \
        tunnel_setup can be updated, and only \
        destination, forwards and timing keys can be set. With service: true, also installs and \
        starts a systemd user service for it; otherwise nothing is started and next_steps says how.",
        // Open world: with service: true it connects to any destination.
        annotations(
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = true
        )
    )]
    async fn tunnel_setup(&self, p: Parameters<SetupParams>) -> Result<Json<SetupOutput>, String> {
        let started = Instant::now();
        let name = p.0.name.clone();
        let r = self.setup(p.0).await;
        logged("tunnel_setup", &name, started, r).map(Json)
    }

    /// Lists profiles and the status of running ones.
    #[tool(
        description = "List the configured tunnel profiles (or one) and, for running ones, their \
        live status: upstream state, local endpoint, forwards, clients, bytes.",
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn tunnel_status(
        &self,
        p: Parameters<StatusParams>,
    ) -> Result<Json<StatusOutput>, String> {
        let started = Instant::now();
        let name = p.0.name.clone().unwrap_or_else(|| "*".into());
        let r = self.status(p.0.name).await;
        logged("tunnel_status", &name, started, r).map(Json)
    }

    /// Stops and removes a profile.
    #[tool(
        description = "Remove a tunnel created by tunnel_setup: stop it if running, remove its \
        systemd unit if it had one of its own, and delete its [profile.NAME] table from the config \
        file (the rest of the file, comments included, is kept).",
        annotations(
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn tunnel_remove(
        &self,
        p: Parameters<RemoveParams>,
    ) -> Result<Json<RemoveOutput>, String> {
        let started = Instant::now();
        let name = p.0.name.clone();
        let r = self.remove(p.0.name).await;
        logged("tunnel_remove", &name, started, r).map(Json)
    }

    /// Runs a command through a running shim.
    #[tool(
        description = "Run a shell command on the remote host through the profile's running \
        shim (no new connection, no prompts). Returns stdout, stderr (1 MiB each at most, \
        truncation marked), exit_status and timed_out. The profile must be running and have \
        mcp_exec = true.",
        annotations(destructive_hint = true, open_world_hint = true)
    )]
    async fn exec(&self, p: Parameters<ExecParams>) -> Result<Json<ExecOutput>, String> {
        let started = Instant::now();
        let p = p.0;
        let secs = p
            .timeout_s
            .unwrap_or(EXEC_TIMEOUT.0)
            .clamp(1, EXEC_TIMEOUT.1);
        let r = match self.target(&p.profile).await {
            Ok(t) => remote::exec(&t, &p.command, Duration::from_secs(secs)).await,
            Err(e) => Err(e),
        };
        if let Ok(o) = &r {
            tracing::info!(
                tool = "exec",
                profile = p.profile.as_str(),
                outcome = if o.timed_out {
                    "timed out".to_owned()
                } else {
                    o.exit_status
                        .map_or("no exit status".to_owned(), |c| format!("exit {c}"))
                },
                stdout_bytes = o.stdout_bytes,
                stderr_bytes = o.stderr_bytes,
                ms = started.elapsed().as_millis() as u64,
            );
            return r.map(Json).map_err(|e| e.to_string());
        }
        logged("exec", &p.profile, started, r).map(Json)
    }

    /// Copies a file through a running shim.
    #[tool(
        description = "Copy one file with sftp through the profile's running shim: put (local to \
        remote) or get (remote to local). Returns the bytes and the sha256 of the local file \
        after the transfer. The profile must be running and have mcp_exec = true.",
        annotations(destructive_hint = true, open_world_hint = true)
    )]
    async fn copy(&self, p: Parameters<CopyParams>) -> Result<Json<CopyOutput>, String> {
        let started = Instant::now();
        let p = p.0;
        let secs = p
            .timeout_s
            .unwrap_or(COPY_TIMEOUT.0)
            .clamp(1, COPY_TIMEOUT.1);
        let r = match self.target(&p.profile).await {
            Ok(t) => {
                remote::copy(
                    &t,
                    p.direction,
                    &t.copy_dir,
                    &p.local,
                    &p.remote,
                    Duration::from_secs(secs),
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Ok(o) = &r {
            tracing::info!(
                tool = "copy",
                profile = p.profile.as_str(),
                outcome = "ok",
                direction = match o.direction {
                    Direction::Put => "put",
                    Direction::Get => "get",
                },
                bytes = o.bytes,
                ms = started.elapsed().as_millis() as u64,
            );
            return r.map(Json).map_err(|e| e.to_string());
        }
        logged("copy", &p.profile, started, r).map(Json)
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "sshshim",
    instructions = "sshshim keeps one verified, authenticated SSH connection per profile and \
    serves it on a local endpoint. tunnel_status lists profiles; tunnel_setup adds one (named mcp-…) with \
    forwards (it starts with `sshshim up NAME` or as a service, service: true). exec and copy \
    run through the running shim of a profile a person opted in (listen and mcp_exec = true, \
    set by editing the file; tunnel_setup cannot set them)."
)]
impl rmcp::ServerHandler for Server {}

impl Server {
    /// `-c FILE` for hints when the file was named explicitly.
    fn config_flag(&self) -> String {
        if self.explicit {
            format!(" -c {}", shell_word(&self.config.display().to_string()))
        } else {
            String::new()
        }
    }

    /// `tunnel_setup`.
    async fn setup(&self, p: SetupParams) -> anyhow::Result<SetupOutput> {
        let path = self.config.clone();
        let edit = edit::ProfileEdit {
            name: p.name.clone(),
            destination: p.destination,
            remote_forwards: p.remote_forwards,
            local_forwards: p.local_forwards,
            options: p.options.unwrap_or_default(),
        };
        if p.service == Some(true) {
            let (n, path) = (p.name.clone(), self.config.clone());
            blocking(move || foreign_unit(&n, &path)).await?;
        }
        let written = {
            let _guard = self.edits.lock().await;
            // Which keys, and which profiles, MCP may write: see `edit`.
            blocking(move || edit::set_profile(&path, &edit)).await?
        };
        let name = p.name;
        let running = {
            let n = name.clone();
            blocking(move || Ok(control::query(&n).is_ok())).await?
        };
        let flag = self.config_flag();
        let mut notes = Vec::new();
        if written.settings.get("listen").is_none() {
            notes.push(format!(
                "no listen address: the tunnel serves no local endpoint, so exec and copy cannot \
                 use it. Only a person can opt it in, by adding `listen = \"127.0.0.1:PORT\"` and \
                 `mcp_exec = true` to [profile.{name}] in {} (MCP then no longer changes it)",
                written.path.display()
            ));
        }
        if running {
            notes.push(format!(
                "profile '{name}' is already running with its old settings; restart it \
                 (`sshshim down {name}`, then start it again) to apply these"
            ));
        }
        let service = if p.service == Some(true) {
            let spec = service::UnitSpec {
                profiles: vec![name.clone()],
                system: false,
                // Always explicit: the service may not see the same XDG_CONFIG_HOME.
                config: Some(written.path.clone()),
                exe: std::env::current_exe()
                    .map_err(|e| anyhow!("cannot find my own path: {e}"))?,
            };
            let outcome = blocking(move || {
                if !service::systemd_available(false) {
                    return Ok(ServiceOutcome {
                        installed: false,
                        message: "no service installed: no systemd user manager is reachable \
                                  (`systemctl --user` does not work here)"
                            .into(),
                    });
                }
                service::install(&spec, false).map(|message| ServiceOutcome {
                    installed: true,
                    message,
                })
            })
            .await
            .map_err(|e| {
                anyhow!(
                    "profile '{name}' was written to {}, but the service could not be \
                     installed: {e}",
                    written.path.display()
                )
            })?;
            Some(outcome)
        } else {
            None
        };
        let next_steps = match &service {
            Some(s) if s.installed => format!(
                "The service runs it now; `sshshim status {name}` (or tunnel_status) shows its \
                 state."
            ),
            _ => format!(
                "Nothing was started. Start it in a terminal with `sshshim up {name}{flag}` \
                 (foreground), run every profile with `sshshim supervise{flag}`, or install a \
                 service with `sshshim service install {name}{flag}`."
            ),
        };
        Ok(SetupOutput {
            profile: name,
            config_file: written.path.display().to_string(),
            created: written.created,
            settings: written.settings,
            running,
            service,
            next_steps,
            notes,
        })
    }

    /// `tunnel_status`.
    async fn status(&self, only: Option<String>) -> anyhow::Result<StatusOutput> {
        let path = self.config.clone();
        blocking(move || {
            let file = profile::load(&path, false).map_err(anyhow::Error::msg)?;
            let settings = edit::all_settings(&path)?;
            let running = match &only {
                Some(n) => control::query(n).ok().into_iter().collect::<Vec<_>>(),
                None => control::running()
                    .iter()
                    .filter_map(|n| control::query(n).ok())
                    .collect(),
            };
            let mut names: Vec<String> = file.profiles.keys().cloned().collect();
            names.extend(running.iter().map(|s| s.profile.clone()));
            names.sort();
            names.dedup();
            if let Some(n) = &only {
                if !names.contains(n) {
                    // The CLI's message: it lists the profiles there are.
                    let why = file.get(n).err().map(|e| e.to_string()).unwrap_or_default();
                    bail!("{why}; and none by that name is running");
                }
                names.retain(|x| x == n);
            }
            let profiles = names
                .into_iter()
                .map(|name| {
                    let p = file.profiles.get(&name);
                    let status = running.iter().find(|s| s.profile == name);
                    TunnelInfo {
                        configured: p.is_some(),
                        settings: settings.get(&name).cloned().unwrap_or(Value::Null),
                        mcp_exec: p.is_some_and(|p| p.mcp_exec == Some(true)),
                        mcp_managed: edit::owned(&path, &name).unwrap_or(false),
                        running: status.is_some(),
                        status: status.and_then(|s| serde_json::to_value(s).ok()),
                        service_unit: own_unit(&name).map(|u| u.display().to_string()),
                        name,
                    }
                })
                .collect();
            Ok(StatusOutput {
                config_file: path.display().to_string(),
                profiles,
            })
        })
        .await
    }

    /// `tunnel_remove`.
    async fn remove(&self, name: String) -> anyhow::Result<RemoveOutput> {
        let path = self.config.clone();
        let _guard = self.edits.lock().await;
        blocking(move || {
            let file = profile::load(&path, false).map_err(anyhow::Error::msg)?;
            // Only a profile of this file that MCP created and still owns;
            // never a person's, never a process that is not that profile.
            let p = file.get(&name).map_err(anyhow::Error::msg)?;
            if !edit::owned(&path, &name)? {
                return Err(anyhow!(
                    file.get(&name)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                ));
            }
            let configured = true;
            let was_running = match control::query(&name) {
                Ok(st) => {
                    check_identity(&st, &name, p, &path)
                        .map_err(|e| anyhow!("{e}; nothing was stopped or removed"))?;
                    true
                }
                Err(_) => false,
            };
            let unit = installed_unit(&name, &path);
            // The unit first: systemd would restart a profile stopped under it.
            // By its exact file name: given the profile name, `service
            // remove` would resolve `sshshim` to `sshshim.service` and
            // `X.service` to itself, a person's units.
            let service = match unit.as_deref().and_then(Path::file_name) {
                Some(file) => Some(service::remove(
                    false,
                    Some(&file.to_string_lossy()),
                    false,
                )?),
                None => None,
            };
            // Checked again: whatever answers now must still be this profile.
            if let Ok(st) = control::query(&name) {
                check_identity(&st, &name, p, &path)
                    .map_err(|e| anyhow!("{e}; it was not stopped"))?;
                control::down(&name)?;
            }
            wait_stopped(&name)?;
            let removed_from_file = configured && edit::remove_profile(&path, &name)?;
            Ok(RemoveOutput {
                profile: name,
                config_file: path.display().to_string(),
                stopped: was_running,
                service: service.map(|s| s.trim_end().to_owned()),
                removed_from_file,
            })
        })
        .await
    }

    /// The running shim of `name`, if the profile allows exec and copy.
    async fn target(&self, name: &str) -> anyhow::Result<remote::Target> {
        let path = self.config.clone();
        let flag = self.config_flag();
        let name = name.to_owned();
        blocking(move || {
            let file = profile::load(&path, false).map_err(anyhow::Error::msg)?;
            let p = file.get(&name).map_err(|e| {
                anyhow!(
                    "{e}; exec and copy work only for profiles in that file with mcp_exec = true"
                )
            })?;
            if p.mcp_exec != Some(true) {
                return Err(anyhow!(
                    "profile '{name}' does not allow exec and copy from MCP: set \
                     `mcp_exec = true` in its [profile.{name}] table in {}",
                    path.display()
                ));
            }
            let status = control::query(&name)
                .map_err(|e| anyhow!("{e}: start it first with `sshshim up {name}{flag}`"))?;
            check_identity(&status, &name, p, &path)?;
            let endpoint = status.endpoint.ok_or_else(|| {
                anyhow!(
                    "profile '{name}' serves no local endpoint: set listen = \"127.0.0.1:PORT\" \
                     in [profile.{name}] and restart it"
                )
            })?;
            let state = crate::paths::state_dir()
                .map_err(|e| anyhow!("cannot open sshshim's state directory: {e}"))?;
            let copy_dir = match &p.copy_dir {
                Some(d) => d.clone(),
                None => {
                    let cwd = std::env::current_dir()
                        .map_err(|e| anyhow!("no current directory for copy: {e}"))?;
                    default_copy_dir(cwd, crate::paths::home_dir().as_deref(), &name, &path)?
                }
            };
            Ok(remote::Target {
                endpoint: remote::Target::endpoint_of(&endpoint)?,
                known_hosts: state.join("known_hosts"),
                identities: p.identity.clone(),
                copy_dir,
                keep: vec![path],
                name,
            })
        })
        .await
    }
}

/// Checks that the process answering on `name`'s control socket runs
/// exactly profile `name` of the file at `path`, with the destination the
/// file gives it: the name alone could belong to an ad-hoc `sshshim up`, a
/// profile of another file, or a profile edited since it started.
fn check_identity(
    st: &control::ProfileStatus,
    name: &str,
    p: &profile::Profile,
    path: &Path,
) -> anyhow::Result<()> {
    let file = profile::file_identity(path);
    let who = format!(
        "the sshshim answering as '{name}' (pid {}) runs '{}' to {} from {}",
        st.pid,
        st.profile,
        st.profile_destination.as_deref().unwrap_or(&st.destination),
        st.config_file
            .as_deref()
            .unwrap_or("no profiles file (started ad hoc)")
    );
    if st.profile != name || st.config_file.as_deref() != Some(file.as_str()) {
        return Err(anyhow!(
            "{who}, not profile '{name}' of {file}; MCP acts only on that profile's own process"
        ));
    }
    let want = p.target_label();
    if st.profile_destination.is_none() || st.profile_destination != want {
        return Err(anyhow!(
            "{who}, but [profile.{name}] now says {}; restart it (`sshshim down {name}`, then \
             start it again) so the two agree",
            want.as_deref().unwrap_or("no destination")
        ));
    }
    Ok(())
}

/// The working directory as `copy`'s directory, refused when it holds the
/// home directory (`/`, `/home`, `~`: where MCP clients often start their
/// servers): beneath it lie `~/.ssh`, shell start-up files and sshshim's
/// own config, so confinement there would confine nothing.
fn default_copy_dir(
    cwd: PathBuf,
    home: Option<&Path>,
    name: &str,
    path: &Path,
) -> anyhow::Result<PathBuf> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let real = canon(&cwd);
    if real == Path::new("/") || home.is_some_and(|h| canon(h).starts_with(&real)) {
        return Err(anyhow!(
            "copy refused: the MCP server runs in {}, which holds your home directory, so \
             copy would reach ~/.ssh and your shell's start-up files. Start `sshshim mcp` in a \
             project directory, or have the user set `copy_dir = \"DIR\"` in [profile.{name}] \
             in {}",
            cwd.display(),
            path.display()
        ));
    }
    Ok(cwd)
}

/// The user unit that runs profile `name` alone, if installed.
fn own_unit(name: &str) -> Option<PathBuf> {
    let path = service::unit_path(&service::UnitSpec {
        profiles: vec![name.to_owned()],
        ..Default::default()
    });
    path.exists().then_some(path)
}

/// The user unit that `tunnel_setup` installed for profile `name` of the
/// file at `path`: its name alone is not enough (`sshshim-a-b.service` may
/// run the profiles `a` and `b`), so its command line must be the one
/// `service install NAME -c FILE` writes, whatever the executable's path.
fn installed_unit(name: &str, path: &Path) -> Option<PathBuf> {
    let unit = own_unit(name)?;
    let spec = service::UnitSpec {
        profiles: vec![name.to_owned()],
        system: false,
        config: Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())),
        exe: PathBuf::from("/sshshim"),
    };
    let exec_tail = |text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .and_then(|l| l.split_once(" supervise "))
            .map(|(_, tail)| tail.to_owned())
    };
    let want = exec_tail(&service::render_unit(&spec))?;
    let have = exec_tail(&std::fs::read_to_string(&unit).ok()?)?;
    (have == want).then_some(unit)
}

/// Refuses when a unit file by the name `tunnel_setup` would install for
/// profile `name` exists but is not the one it installs (another file's
/// profile of that name, the profiles `a` and `b` of `sshshim-a-b.service`,
/// a name folded to the same unit name): installing would overwrite a
/// person's unit and change what their tunnels run.
fn foreign_unit(name: &str, path: &Path) -> anyhow::Result<()> {
    match own_unit(name) {
        Some(unit) if installed_unit(name, path).is_none() => Err(anyhow!(
            "{} exists and does not run profile '{name}' of {} alone: it is not tunnel_setup's \
             to replace. Nothing was written; use another name, or ask the user",
            unit.display(),
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Waits until profile `name` no longer answers on its control socket.
fn wait_stopped(name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + STOP_WAIT;
    while control::query(name).is_ok() {
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "profile '{name}' was asked to stop but still runs after {} s; \
                 nothing was removed from the config file",
                STOP_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs blocking work (file and socket I/O, systemctl) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("internal error: {e}"))?
}

/// Logs one tool call's outcome (never arguments beyond the profile name)
/// and turns its error into the tool error's text.
fn logged<T>(
    tool: &str,
    profile: &str,
    started: Instant,
    r: anyhow::Result<T>,
) -> Result<T, String> {
    let ms = started.elapsed().as_millis() as u64;
    match &r {
        Ok(_) => tracing::info!(tool, profile, outcome = "ok", ms),
        Err(e) => tracing::warn!(tool, profile, outcome = "error", error = %e, ms),
    }
    // The tool's error is its message, as the CLI would print it.
    r.map_err(|e| e.to_string())
}

/// `s` as one word for a POSIX shell (quoted only when needed).
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The working directory is copy's default directory unless it holds
    /// the home directory (`/`, `~`, `/home`), where it would confine nothing.
    #[test]
    fn copy_dir_is_never_home_or_root() {
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home/me");
        let project = home.join("project");
        std::fs::create_dir_all(&project).unwrap();
        let cfg = Path::new("/c.toml");
        for cwd in [PathBuf::from("/"), d.path().join("home"), home.clone()] {
            let e = default_copy_dir(cwd.clone(), Some(&home), "p", cfg)
                .unwrap_err()
                .to_string();
            assert!(e.contains("copy_dir"), "{}: {e}", cwd.display());
        }
        // A symlink to home is home.
        std::os::unix::fs::symlink(&home, d.path().join("h")).unwrap();
        assert!(default_copy_dir(d.path().join("h"), Some(&home), "p", cfg).is_err());
        assert_eq!(
            default_copy_dir(project.clone(), Some(&home), "p", cfg).unwrap(),
            project
        );
    }
}

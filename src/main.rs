//! The `sshshim` command line. Parsing and logging set-up only; the work is
//! done by the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use clap_complete::engine::ArgValueCandidates;
use sshshim::config::profile::Profile;
use sshshim::paths;

/// One verified SSH connection, shared by every ssh, scp, sftp and rsync you run.
///
/// `sshshim up HOST` checks the host key and authenticates once, then serves a
/// local SSH endpoint (127.0.0.1:2222 by default). Every session, transfer and
/// port forward opened there travels over that one upstream connection.
#[derive(Parser, Debug)]
#[command(name = "sshshim", version, propagate_version = true)]
struct Cli {
    /// More log output (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output: warnings and errors only (-qq: errors only).
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect to DESTINATION (or run profile NAME) and serve the local endpoint in the foreground.
    #[command(after_help = UP_EXAMPLES)]
    Up(Box<UpArgs>),
    /// Run every profile of the config file (or the ones named), each isolated, until stopped.
    Supervise(SuperviseArgs),
    /// Show the state of running profiles (upstream, clients, channels, forwards).
    Status(StatusArgs),
    /// Stop a running profile gracefully.
    Down {
        /// Profile (or destination) name, as shown by `sshshim status`.
        #[arg(add = ArgValueCandidates::new(sshshim::completion::running))]
        name: String,
    },
    /// Install, inspect or remove the systemd service that runs `sshshim supervise`.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Print (or --install) ssh_config Host blocks for endpoints: `ssh NAME-shim` just works.
    SshConfig(SshConfigArgs),
    /// Serve MCP tools on stdin/stdout for AI agents: set up, inspect and remove tunnels; exec and copy through them.
    #[command(after_help = MCP_EXAMPLES)]
    Mcp(McpArgs),
    /// Diagnose profiles or destinations: resolution, connect, host key, authentication, forwards.
    #[command(after_help = CHECK_HELP)]
    Check(CheckArgs),
    /// Print the shell completion script for SHELL (see README: Install).
    #[command(after_help = COMPLETIONS_HELP)]
    Completions {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: sshshim::completion::Shell,
    },
    /// Print the man page of sshshim or of a subcommand, or write them all (--dir).
    Man(ManArgs),
    /// The helper sshshim runs on the server for resumable sessions (`--resume`).
    #[command(hide = true, name = "remote-helper")]
    RemoteHelper {
        /// `version`, `start`, `attach ID` or `reap OWNER RUN`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// Shown under `sshshim completions --help`.
const COMPLETIONS_HELP: &str = "\
Subcommands, options, profile names and ssh_config Host aliases complete.
Load it now or from your shell's start-up file:
  bash:  source <(sshshim completions bash)            (~/.bashrc)
  zsh:   source <(sshshim completions zsh)             (~/.zshrc, after compinit)
  fish:  sshshim completions fish | source             (~/.config/fish/config.fish)
or save it where the shell looks (the Debian package does this):
  sshshim completions bash > ~/.local/share/bash-completion/completions/sshshim
  sshshim completions zsh > ~/.zfunc/_sshshim           (a directory in $fpath)
  sshshim completions fish > ~/.config/fish/completions/sshshim.fish";

/// `sshshim man`.
#[derive(Args, Debug)]
struct ManArgs {
    /// Subcommand whose page to print, e.g. `up` or `service install` (default: sshshim's).
    #[arg(value_name = "SUBCOMMAND", conflicts_with = "dir")]
    subcommand: Vec<String>,
    /// Write every page (sshshim.1, sshshim-up.1, ...) into DIR instead.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Examples shown under `sshshim mcp --help`.
const MCP_EXAMPLES: &str = "\
Register it with an MCP client, for example:
  claude mcp add sshshim -- sshshim mcp
  {\"mcpServers\": {\"sshshim\": {\"command\": \"sshshim\", \"args\": [\"mcp\"]}}}
exec and copy work only for profiles a person opted in (`listen` and
`mcp_exec = true`, set by editing the file); tunnel_setup writes only
destination, forward and timing keys, of profiles it created.";

/// `sshshim mcp`.
#[derive(Args, Debug)]
struct McpArgs {
    #[command(flatten)]
    config: ConfigArg,
}

/// Shown under `sshshim check --help`.
const CHECK_HELP: &str = "\
Each profile gets its own short-lived connection and these checks, one line each:
  resolve    the destination as `ssh -G` resolves it, and its address
  connect    TCP connect to the server (time in ms)
  version    the server's SSH version string
  host key   known, unknown or CHANGED, with fingerprints (known_hosts is never written)
  auth       which method worked, and which the server offers
  -L target  each -L target, reached from the server (a channel opened and closed)
  -R port    each fixed -R port free on the server (listened on and released at once;
             not probed while the running sshshim of the profile holds it)
  -R target  each -R target, reached from this machine
  sshshim    whether an sshshim runs the profile, and its state

Nothing prompts unless --interactive (and then only on a terminal): without it,
authentication uses ssh-agent and unencrypted keys, and a profile that needs a
password or passphrase fails saying so. Nothing is left open or listening.

Exit status: 0 when every check passed (skipped checks are not failures),
1 when any failed, 2 for usage errors.

Examples:
  sshshim check                       every profile of the config file
  sshshim check lab alice@gw.example.org
  sshshim check --json lab | jq '.[0].checks[] | select(.status == \"fail\")'";

/// `sshshim check`.
#[derive(Args, Debug)]
struct CheckArgs {
    /// Profiles or destinations to check (default: every profile of the config file).
    #[arg(value_name = "NAME|DESTINATION", add = ArgValueCandidates::new(sshshim::completion::destinations))]
    names: Vec<String>,
    #[command(flatten)]
    config: ConfigArg,
    /// ssh_config file to resolve with (as `ssh -F`).
    #[arg(short = 'F', value_name = "FILE")]
    ssh_config: Option<PathBuf>,
    /// Seconds each profile may take in all: resolving, connecting, the
    /// handshake, authentication and the forward probes.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Ask for passwords and key passphrases on the terminal, as `up` does.
    /// Profiles are then checked one at a time, and time spent typing does
    /// not count against --timeout.
    #[arg(long)]
    interactive: bool,
    /// Print JSON (a stable format, see README).
    #[arg(long)]
    json: bool,
}

/// Examples shown under `sshshim up --help`.
const UP_EXAMPLES: &str = "\
Examples:
  sshshim up alice@login.example.org
      then: ssh -p 2222 localhost | scp -P 2222 f localhost: | sftp -P 2222 localhost
  sshshim up prod                               a Host alias from ~/.ssh/config, or a profile
  sshshim up gw -R 2222:localhost:22            keep this machine reachable via gw
  sshshim up db-bastion -L 15432:db:5432        a database behind a bastion
  sshshim up node7 -J login.hpc.example.org     through a jump host
  sshshim up host --listen 127.0.0.1:2300       a second shim on another port";

/// `-c/--config`, the profiles file, as every subcommand that reads it takes it.
#[derive(Args, Debug, Clone)]
struct ConfigArg {
    /// Profiles file (default: ~/.config/sshshim/config.toml).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// The file: the one given, else the default.
    fn path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(sshshim::config::profile::default_path)
    }

    /// Loads the file; only a file given with `-c` must exist.
    fn load(&self) -> Result<sshshim::config::profile::ConfigFile, sshshim::config::ProfileError> {
        sshshim::config::profile::load(&self.path(), self.config.is_some())
    }
}

/// `sshshim up`: a destination or profile, the files to read, and the
/// settings a profile can also hold.
#[derive(Args, Debug)]
struct UpArgs {
    /// Where to connect: [user@]host[:port], a Host alias from ssh_config, or a profile name.
    #[arg(value_name = "DESTINATION|PROFILE", add = ArgValueCandidates::new(sshshim::completion::destinations))]
    destination: String,

    #[command(flatten)]
    config: ConfigArg,

    /// ssh_config file to resolve DESTINATION with (as `ssh -F`).
    #[arg(short = 'F', value_name = "FILE")]
    ssh_config: Option<PathBuf>,

    /// The flags that are also profile keys.
    #[command(flatten)]
    settings: Profile,
}

impl UpArgs {
    /// Resolves flags over environment over profile (if NAME is one) over ssh_config.
    fn resolve(&self) -> anyhow::Result<sshshim::config::UpConfig> {
        let file = self.config.load()?;
        let from_file = file.profiles.get(&self.destination).cloned();
        let is_profile = from_file.is_some();
        let created = from_file.as_ref().and_then(|p| p.mcp_created) == Some(true);
        if let Some(w) = sshshim::config::profile::reserved_name_warning(&self.destination, created)
        {
            tracing::warn!("{w}");
        }
        let layered = self
            .settings
            .clone()
            .or(sshshim::config::profile::from_env()?)
            .or(from_file.unwrap_or_default());
        let mut cfg = sshshim::config::resolve_up(sshshim::config::UpRequest {
            name: &self.destination,
            profile: layered,
            ssh_config: self.ssh_config.as_deref(),
            // A profile may serve no endpoint; an ad-hoc `up` always does.
            default_listen: (!is_profile).then_some(sshshim::config::profile::DEFAULT_LISTEN),
        })?;
        // Status says which file's profile runs (`sshshim mcp` checks it).
        if is_profile {
            cfg.config_file = Some(sshshim::config::profile::file_identity(&self.config.path()));
        } else {
            cfg.profile_destination = None;
        }
        Ok(cfg)
    }
}

/// `sshshim supervise`.
#[derive(Args, Debug)]
struct SuperviseArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Serve Prometheus metrics and status JSON for all profiles on this loopback address.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Run CMD on events of any profile (a profile's own on_event wins).
    #[arg(long, value_name = "CMD")]
    on_event: Option<String>,
    /// Profiles to run (default: all). SIGHUP re-reads the file.
    #[arg(add = ArgValueCandidates::new(sshshim::completion::profiles))]
    names: Vec<String>,
}

/// `sshshim status`.
#[derive(Args, Debug)]
struct StatusArgs {
    /// Only this profile.
    #[arg(add = ArgValueCandidates::new(sshshim::completion::running))]
    name: Option<String>,
    /// Print JSON (a stable format, see README).
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum ServiceCommand {
    /// Write a systemd unit running `sshshim supervise` (or the named profiles), enable and start it.
    Install {
        /// Profiles (default: all).
        #[arg(add = ArgValueCandidates::new(sshshim::completion::profiles))]
        names: Vec<String>,
        /// A system unit in /etc/systemd/system instead of a user unit.
        #[arg(long)]
        system: bool,
        #[command(flatten)]
        config: ConfigArg,
        /// Print the unit and the commands instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the template unit sshshim@.service (instance = profile name), for packages
    /// or to install by hand: `systemctl --user enable --now sshshim@PROFILE`.
    Template {
        /// The sshshim executable the unit runs.
        #[arg(long, value_name = "PATH", default_value = "/usr/bin/sshshim")]
        exe: PathBuf,
    },
    /// Show `systemctl status` of the sshshim unit(s).
    Status {
        /// Unit or profile name (default: every sshshim unit).
        name: Option<String>,
        /// The system unit.
        #[arg(long)]
        system: bool,
    },
    /// Stop, disable and delete the sshshim unit(s).
    Remove {
        /// Unit or profile name (default: every sshshim unit).
        name: Option<String>,
        /// The system unit.
        #[arg(long)]
        system: bool,
        /// Print what would be done.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `sshshim ssh-config`.
#[derive(Args, Debug)]
struct SshConfigArgs {
    /// Profiles or destinations to write Host blocks for (default: every profile).
    #[arg(add = ArgValueCandidates::new(sshshim::completion::destinations))]
    names: Vec<String>,
    #[command(flatten)]
    config: ConfigArg,
    /// Endpoint port for names that are not profiles [default: 2222].
    #[arg(long)]
    port: Option<u16>,
    /// IdentityFile for the blocks (default: none; ssh offers your usual keys).
    #[arg(short, long = "identity", value_name = "FILE")]
    identity: Option<PathBuf>,
    /// Write ~/.ssh/config.d/sshshim and add one Include line to ~/.ssh/config (backed up first).
    #[arg(long)]
    install: bool,
    /// Blocks for the names themselves (`Host NAME`: only ControlPath to
    /// sshshim's socket and ControlMaster no), so plain `ssh NAME`, `scp f
    /// NAME:` and `git push` go through sshshim while it runs and connect
    /// directly when it does not.
    #[arg(long)]
    same_name: bool,
    /// Remove the installed blocks of these names (both kinds).
    #[arg(long, conflicts_with = "install")]
    uninstall: bool,
}

/// The async runtime: half the CPUs as worker threads (1 to 4), unless
/// `TOKIO_WORKER_THREADS` says otherwise. The shim shares the machine with
/// the ssh, scp or sftp processes it serves; on 2 cores one worker moved a
/// GiB of upload with 20-25% less CPU than two (no cross-thread wake-ups)
/// and so ran faster.
fn build_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        b.worker_threads((cpus / 2).clamp(1, 4));
    }
    b.build()
}

fn main() -> ExitCode {
    // The remote helper starts on every resumable session: it skips the
    // parse of the whole CLI (a millisecond of the session's start-up).
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|a| a == "remote-helper") {
        return sshshim::resume::remote::main(argv.collect());
    }
    sshshim::completion::complete_if_asked(Cli::command);
    let cli = Cli::parse();
    // Before any runtime or logging: the helper forks its daemons.
    let cli = match cli.command {
        Command::RemoteHelper { args } => return sshshim::resume::remote::main(args),
        _ => cli,
    };
    init_logging(cli.verbose, cli.quiet, cli.log_format);
    let runtime = || build_runtime().map_err(|e| anyhow!("cannot start the runtime: {e}"));
    let result: anyhow::Result<()> = match cli.command {
        Command::Up(args) => args
            .resolve()
            .and_then(|cfg| Ok(runtime()?.block_on(sshshim::supervisor::up(cfg))?)),
        Command::Supervise(a) => runtime().and_then(|rt| {
            Ok(rt.block_on(sshshim::supervisor::supervise(
                sshshim::supervisor::SuperviseOptions {
                    config: a.config.config,
                    names: a.names,
                    metrics: a.metrics,
                    on_event: a.on_event,
                },
            ))?)
        }),
        Command::Status(a) => status(a),
        Command::Down { name } => sshshim::control::down(&name)
            .map(|()| println!("sshshim: asked profile '{name}' to stop"))
            .map_err(anyhow::Error::from),
        Command::Service(c) => service(c),
        Command::SshConfig(a) => ssh_config(a),
        Command::Mcp(a) => runtime().and_then(|rt| {
            rt.block_on(sshshim::mcp::serve(sshshim::mcp::Options {
                config: a.config.config,
            }))
        }),
        Command::Check(a) => return check(a),
        Command::Completions { shell } => {
            let argv0 = std::env::args_os().next().unwrap_or_default();
            let completer = sshshim::completion::completer_for(&argv0);
            write_stdout(&sshshim::completion::script(shell, &completer))
        }
        Command::Man(a) => man(a),
        Command::RemoteHelper { .. } => unreachable!("dispatched before logging"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Errors may carry a server's words (its version, its reasons).
            // The message is the error's own text, without its causes: each
            // error here already says what to fix.
            eprintln!("sshshim: {}", sshshim::term::clean_lines(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

/// `sshshim status [NAME] [--json]`.
fn status(a: StatusArgs) -> anyhow::Result<()> {
    let names = match a.name {
        Some(n) => vec![n],
        None => sshshim::control::running(),
    };
    let mut all = Vec::new();
    for n in &names {
        all.push(sshshim::control::query(n)?);
    }
    if a.json {
        let text = serde_json::to_string_pretty(&all)?;
        println!("{text}");
    } else if all.is_empty() {
        println!("no sshshim is running");
    } else {
        print!("{}", sshshim::control::render(&all));
    }
    Ok(())
}

/// `sshshim check [NAME|DESTINATION…]`: exit 0 when every check passed,
/// 1 when one failed, 2 when nothing could be checked as asked.
fn check(a: CheckArgs) -> ExitCode {
    use sshshim::check;
    let opts = check::Options {
        names: a.names,
        config: a.config.config,
        ssh_config: a.ssh_config,
        timeout: Duration::from_secs(a.timeout),
        interactive: a.interactive,
    };
    let result = build_runtime()
        .map_err(check::Error::Runtime)
        .and_then(|rt| rt.block_on(check::run(opts)));
    let reports = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sshshim: {}", sshshim::term::clean_lines(&e.to_string()));
            return match e {
                check::Error::Usage(_) => ExitCode::from(2),
                check::Error::Config(_) | check::Error::Runtime(_) => ExitCode::FAILURE,
            };
        }
    };
    if a.json {
        match serde_json::to_string_pretty(&reports) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("sshshim: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", check::render(&reports));
    }
    if reports.iter().all(|r| r.passed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `sshshim service …`.
fn service(c: ServiceCommand) -> anyhow::Result<()> {
    use sshshim::service;
    let out = match c {
        ServiceCommand::Install {
            names,
            system,
            config,
            dry_run,
        } => {
            // A file that `supervise` would refuse (a bad name, a typo) is
            // reported now rather than at the unit's first start.
            config.load()?;
            let exe =
                std::env::current_exe().map_err(|e| anyhow!("cannot find my own path: {e}"))?;
            let spec = service::UnitSpec {
                profiles: names,
                system,
                config: config.config,
                exe,
            };
            service::install(&spec, dry_run)?
        }
        ServiceCommand::Template { exe } => service::render_template_unit(&exe),
        ServiceCommand::Status { name, system } => service::status(system, name.as_deref())?,
        ServiceCommand::Remove {
            name,
            system,
            dry_run,
        } => service::remove(system, name.as_deref(), dry_run)?,
    };
    print!("{out}");
    if !out.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// `sshshim man [SUBCOMMAND…] [--dir DIR]`.
fn man(a: ManArgs) -> anyhow::Result<()> {
    match a.dir {
        Some(dir) => {
            let written = sshshim::manpages::write_all(Cli::command(), &dir)?;
            for path in written {
                println!("{}", path.display());
            }
            Ok(())
        }
        None => write_stdout(&sshshim::manpages::render(Cli::command(), &a.subcommand)?),
    }
}

/// Writes `bytes` to stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}

/// `sshshim ssh-config [NAME…] [--install]`.
fn ssh_config(a: SshConfigArgs) -> anyhow::Result<()> {
    let file = a.config.load()?;
    let names: Vec<String> = if a.names.is_empty() {
        file.profiles.keys().cloned().collect()
    } else {
        a.names.clone()
    };
    if names.is_empty() {
        bail!("no profiles in the config file; name the endpoints: sshshim ssh-config NAME");
    }
    let ssh_dir = || -> anyhow::Result<PathBuf> {
        Ok(paths::home_dir()
            .ok_or_else(|| anyhow!("no home directory (HOME is not set)"))?
            .join(".ssh"))
    };
    if a.uninstall {
        let summary = sshshim::config::host_blocks::uninstall(&ssh_dir()?, &names)
            .map_err(|e| anyhow!("cannot remove the Host blocks: {e}"))?;
        println!("{summary}");
        return Ok(());
    }
    let state =
        paths::state_dir().map_err(|e| anyhow!("cannot create the state directory: {e}"))?;
    let known_hosts = state.join("known_hosts");
    let mut blocks = String::new();
    for name in &names {
        let profile = file.profiles.get(name);
        // A running instance knows its real endpoint and socket, whatever
        // flags started it; otherwise the profile (or defaults) says.
        let running = sshshim::control::query(name).ok();
        let port = running
            .as_ref()
            .and_then(|st| st.endpoint.as_deref())
            .and_then(|e| e.parse::<std::net::SocketAddr>().ok())
            .map(|e| e.port())
            .or(profile.and_then(|p| p.listen).map(|l| l.port()))
            .or(a.port)
            .unwrap_or(sshshim::config::profile::DEFAULT_LISTEN.port());
        let mux: Option<PathBuf> = match &running {
            Some(st) => st.mux_socket.as_ref().map(PathBuf::from),
            None => match profile.and_then(|p| p.mux.clone()) {
                Some(p) if p.as_os_str() == "none" => None,
                Some(p) => Some(p),
                None => Some(paths::runtime_dir()?.join(format!("{}.mux", paths::safe_name(name)))),
            },
        };
        if a.same_name {
            let Some(mux) = &mux else {
                bail!(
                    "{name} serves no multiplexing socket (mux = \"none\"): --same-name needs one"
                );
            };
            warn_if_controlpath_taken(name, mux);
            blocks.push_str(&sshshim::config::host_blocks::same_name_block(name, mux)?);
            blocks.push('\n');
            continue;
        }
        let identity = a.identity.as_ref().map(|p| paths::expand_tilde(p));
        let clean = sshshim::paths::safe_name(name);
        blocks.push_str(&sshshim::config::host_blocks::host_block(
            &sshshim::config::host_blocks::Endpoint {
                name: &clean,
                port,
                host_key_alias: sshshim::config::host_blocks::alias(name),
                known_hosts: &known_hosts,
                identity_file: identity.as_deref(),
                control_path: mux.as_deref(),
            },
        )?);
        blocks.push('\n');
    }
    if a.install {
        let summary = sshshim::config::host_blocks::install(&ssh_dir()?, &blocks)
            .map_err(|e| anyhow!("cannot install the Host blocks: {e}"))?;
        println!("{summary}");
    } else {
        print!("{blocks}");
    }
    Ok(())
}

/// Says so when the user's own ssh_config already sets a ControlPath for
/// `name`: the `--same-name` block, read first, takes it over while it is
/// installed (`--uninstall` gives it back).
fn warn_if_controlpath_taken(name: &str, ours: &std::path::Path) {
    let Ok(out) = std::process::Command::new("ssh")
        .args(["-G", "--", name])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(cp) = text.lines().find_map(|l| l.strip_prefix("controlpath "))
        && cp != "none"
        && std::path::Path::new(cp) != ours
    {
        eprintln!(
            "sshshim: note: your ssh_config sets ControlPath {cp} for {name}; the --same-name \
             block (read first) replaces it while installed; `sshshim ssh-config --uninstall \
             {name}` gives it back"
        );
    }
}

/// Logs go to stderr; `RUST_LOG` wins over -v/-q.
fn init_logging(verbose: u8, quiet: u8, format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let level = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    // `target=level` directives (what `RUST_LOG=sshshim=debug` needs);
    // `Targets` spares the binary the regex engine of `EnvFilter`, whose
    // span and field filters nobody needs here.
    let default = || format!("sshshim={level},warn");
    let rust_log = std::env::var("RUST_LOG").ok();
    let parsed = rust_log.as_deref().and_then(|v| v.parse().ok());
    let not_understood = rust_log.is_some() && parsed.is_none();
    let filter: tracing_subscriber::filter::Targets =
        parsed.unwrap_or_else(|| default().parse().expect("the default directives parse"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = if format == LogFormat::Json {
        fmt.json().with_filter(filter).boxed()
    } else {
        fmt.with_filter(filter).boxed()
    };
    let subscriber = tracing_subscriber::registry().with(fmt);
    tracing::subscriber::set_global_default(subscriber).expect("no other global subscriber");
    // russh logs through the `log` crate: its records go to tracing through
    // the library's logger (which also notices eow@openssh.com; the
    // endpoint would install it anyway), set after the subscriber so it
    // takes the subscriber's level.
    sshshim::endpoint::eow::install();
    if not_understood {
        tracing::warn!(
            "RUST_LOG is not a list of target=level directives (e.g. sshshim=debug,russh=info); using -v/-q's level"
        );
    }
}

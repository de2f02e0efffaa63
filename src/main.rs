//! The `sshshim` command line. Parsing and logging set-up only; the work is
//! done by the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use sshshim::config::{self, Destination, UpConfig};
use sshshim::forward::{ForwardSpec, Kind};

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Connect to DESTINATION and serve the local endpoint in the foreground.
    #[command(after_help = UP_EXAMPLES)]
    Up(UpArgs),
}

/// Examples shown under `sshshim up --help`.
const UP_EXAMPLES: &str = "\
Examples:
  sshshim up alice@login.example.org
      then: ssh -p 2222 localhost | scp -P 2222 f localhost: | sftp -P 2222 localhost
  sshshim up gw -R 2222:localhost:22            keep this machine reachable via gw
  sshshim up db-bastion -L 15432:db:5432        a database behind a bastion
  sshshim up host --listen 127.0.0.1:2300       a second shim on another port";

#[derive(Args, Debug)]
struct UpArgs {
    /// Where to connect: [user@]host[:port]
    #[arg(value_name = "DESTINATION")]
    destination: Destination,

    /// Upstream port (default: the destination's, else 22).
    #[arg(short, long, value_parser = config::parse_port)]
    port: Option<u16>,

    /// Upstream login name (default: the destination's, else your own).
    #[arg(short = 'l', long)]
    user: Option<String>,

    /// Identity file to authenticate with; repeatable. Default:
    /// ~/.ssh/id_ed25519, id_ecdsa, id_rsa. The agent is always tried first.
    #[arg(short, long = "identity", value_name = "FILE")]
    identity: Vec<PathBuf>,

    /// known_hosts file to verify the upstream host key against.
    /// /etc/ssh/ssh_known_hosts is also read (never written).
    #[arg(long, value_name = "FILE", default_value = "~/.ssh/known_hosts")]
    known_hosts: PathBuf,

    /// Record the host key of a host not yet in known_hosts (a CHANGED key is
    /// always refused).
    #[arg(long)]
    accept_new: bool,

    /// Address of the local endpoint.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:2222",
        env = "SSHSHIM_LISTEN"
    )]
    listen: SocketAddr,

    /// Allow --listen on a non-loopback address (other machines could try to
    /// connect; key authentication still applies).
    #[arg(long)]
    allow_non_loopback: bool,

    /// Public keys allowed to use the endpoint. Default: your own
    /// ~/.ssh/*.pub and the keys in your ssh-agent.
    #[arg(long, value_name = "FILE")]
    authorized_keys: Option<PathBuf>,

    /// Host key of the endpoint. Default: an ed25519 key generated once in
    /// $XDG_STATE_HOME/sshshim/ (0600) and reused.
    #[arg(long, value_name = "FILE")]
    host_key: Option<PathBuf>,

    /// Local forward owned by sshshim: [bind:]port:host:hostport, or with
    /// socket paths. Repeatable.
    #[arg(short = 'L', value_name = "SPEC", value_parser = |s: &str| ForwardSpec::parse(Kind::Local, s))]
    local_forward: Vec<ForwardSpec>,

    /// Remote forward owned by sshshim: [bind:]port:host:hostport, or with
    /// socket paths. Repeatable. Kept alive across reconnects.
    #[arg(short = 'R', value_name = "SPEC", value_parser = |s: &str| ForwardSpec::parse(Kind::Remote, s))]
    remote_forward: Vec<ForwardSpec>,

    /// Seconds between SSH keepalives sent upstream.
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive: u64,

    /// Unanswered keepalives after which the upstream is declared dead.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    keepalive_max: u64,

    /// Longest wait between reconnect attempts, in seconds (fractions allowed).
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    max_backoff: Duration,

    /// Most upstream connections to use when the server limits sessions per
    /// connection (sshd's MaxSessions, 10 by default); extra ones close when idle.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    max_upstreams: u64,

    /// Seconds to wait for a connection (and, while reconnecting, how long
    /// a new local channel waits for the upstream).
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: u64,
}

impl UpArgs {
    /// Resolves flags into a configuration. (ssh_config lookup slots in here.)
    fn resolve(self) -> Result<(UpConfig, sshshim::shim::EndpointOptions), String> {
        let dest = self.destination;
        let forwards = self
            .local_forward
            .into_iter()
            .chain(self.remote_forward)
            .collect();
        let identities_explicit = !self.identity.is_empty();
        let identities = if identities_explicit {
            self.identity
                .iter()
                .map(|p| config::expand_tilde(p))
                .collect()
        } else {
            config::default_identities()
        };
        let cfg = UpConfig {
            port: self.port.or(dest.port).unwrap_or(22),
            user: self.user.or(dest.user).unwrap_or_else(config::current_user),
            host: dest.host,
            identities,
            identities_explicit,
            known_hosts: config::expand_tilde(&self.known_hosts),
            global_known_hosts: vec![PathBuf::from("/etc/ssh/ssh_known_hosts")],
            accept_new: self.accept_new,
            listen: self.listen,
            authorized_keys: self.authorized_keys.map(|p| config::expand_tilde(&p)),
            host_key: self.host_key.map(|p| config::expand_tilde(&p)),
            forwards,
            connect_timeout: Duration::from_secs(self.connect_timeout),
            keepalive: Duration::from_secs(self.keepalive),
            keepalive_max: self.keepalive_max as usize,
            max_backoff: self.max_backoff,
            max_upstreams: self.max_upstreams as usize,
        };
        let opts = sshshim::shim::EndpointOptions {
            allow_non_loopback: self.allow_non_loopback,
        };
        Ok((cfg, opts))
    }
}

/// Parses a positive number of seconds, fractions allowed ("0.5").
fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86400.0 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!(
            "'{s}' is not a number of seconds between 0 and 86400"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Up(args) => args.resolve().and_then(|(cfg, opts)| {
            tokio::runtime::Runtime::new()
                .map_err(|e| format!("cannot start the runtime: {e}"))?
                .block_on(sshshim::shim::run(cfg, opts))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("sshshim: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; `RUST_LOG` wins over -v/-q.
fn init_logging(verbose: u8, quiet: u8) {
    let level = match (verbose, quiet) {
        (0, 0) => "info",
        (1, _) => "debug",
        (v, _) if v >= 2 => "trace",
        (_, 1) => "warn",
        _ => "error",
    };
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("sshshim={level},warn")));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    tracing_subscriber::registry()
        .with(fmt)
        .with(sshshim::endpoint::eow::layer())
        .init();
}

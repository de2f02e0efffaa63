//! Resolution: turns what the user said (a profile or destination, flags,
//! `SSHSHIM_*` variables) plus what ssh_config says (read with OpenSSH's own
//! `ssh -G`) into one [`UpConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::UpConfig;
use crate::config::profile::Profile;
use crate::config::spec::{Destination, ForwardSpec, HostSpec, Kind};
use crate::config::ssh_config::{self, HostConfig, ReadError, StrictHostKeyChecking};
use crate::paths::{current_user, default_identities, expand_tilde};

/// Why a profile or destination could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The destination is not `[user@]host[:port]`.
    #[error("{0}")]
    Destination(String),
    /// A jump host is not `[user@]host[:port]`.
    #[error("jump host: {0}")]
    Jump(String),
    /// `ssh -G` failed for a hop.
    #[error("reading ssh_config for '{host}': {source}")]
    SshConfig {
        /// The hop.
        host: String,
        /// What `ssh -G` said.
        source: ReadError,
    },
    /// No runtime directory for the multiplexing socket.
    #[error("{0}")]
    RuntimeDir(#[source] std::io::Error),
}

/// What to resolve for `sshshim up` (and each supervised profile).
pub struct UpRequest<'a> {
    /// The profile name or destination as the user typed it.
    pub name: &'a str,
    /// Flags, environment and profile, already layered.
    pub profile: Profile,
    /// `-F`: the ssh_config file to read instead of the default.
    pub ssh_config: Option<&'a Path>,
    /// Endpoint address when neither flags nor profile name one.
    pub default_listen: Option<SocketAddr>,
}

/// Resolves one hop: the destination's own user/port, then flags, then
/// ssh_config (read with OpenSSH's own `ssh -G`), then OpenSSH's defaults.
fn resolve_host(
    dest: &Destination,
    p: &Profile,
    ssh_config: Option<&Path>,
) -> Result<(HostSpec, HostConfig), ResolveError> {
    let hc =
        ssh_config::resolve(&dest.host, ssh_config).map_err(|source| ResolveError::SshConfig {
            host: dest.host.clone(),
            source,
        })?;
    let strict = hc.strict_host_key_checking;
    if strict == Some(StrictHostKeyChecking::No) {
        tracing::warn!(
            "StrictHostKeyChecking is 'no' for {}: unknown host keys are recorded without asking \
             (a changed key is still refused)",
            dest.host
        );
    }
    let none = |v: &[PathBuf]| v.len() == 1 && v[0] == Path::new("none");
    let user_files: Vec<PathBuf> = if none(&hc.user_known_hosts_files) {
        Vec::new()
    } else {
        hc.user_known_hosts_files.clone()
    };
    let known_hosts = p
        .known_hosts
        .clone()
        .or_else(|| user_files.first().cloned())
        .unwrap_or_else(|| expand_tilde(Path::new("~/.ssh/known_hosts")));
    let mut global: Vec<PathBuf> = user_files.iter().skip(1).cloned().collect();
    if hc.global_known_hosts_files.is_empty() {
        global.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
    } else if !none(&hc.global_known_hosts_files) {
        global.extend(hc.global_known_hosts_files.iter().cloned());
    }
    let agent = match hc.identity_agent.as_deref() {
        Some("none") => None,
        Some("SSH_AUTH_SOCK") | None => std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from),
        Some(path) => Some(expand_tilde(Path::new(path))),
    };
    let identities_explicit = !p.identity.is_empty();
    let spec = HostSpec {
        host: hc.hostname.clone().unwrap_or_else(|| dest.host.clone()),
        port: p.port.or(dest.port).or(hc.port).unwrap_or(22),
        user: p
            .user
            .clone()
            .or(dest.user.clone())
            .or(hc.user.clone())
            .unwrap_or_else(current_user),
        identities: if identities_explicit {
            p.identity.iter().map(|i| expand_tilde(i)).collect()
        } else if hc.identity_files.is_empty() {
            default_identities()
        } else {
            hc.identity_files.clone()
        },
        identities_explicit,
        identities_only: hc.identities_only,
        agent,
        known_hosts,
        global_known_hosts: global,
        accept_new: p.accept_new.unwrap_or(matches!(
            strict,
            Some(StrictHostKeyChecking::AcceptNew | StrictHostKeyChecking::No)
        )),
    };
    Ok((spec, hc))
}

/// Resolves everything `sshshim up` needs.
pub fn resolve_up(req: UpRequest<'_>) -> Result<UpConfig, ResolveError> {
    let p = req.profile;
    let label = p.target_label();
    let dest: Destination = p
        .destination
        .as_deref()
        .unwrap_or(req.name)
        .parse()
        .map_err(ResolveError::Destination)?;
    let (target, hc) = resolve_host(&dest, &p, req.ssh_config)?;
    let jump_list: Vec<String> = match p.jump.as_deref() {
        Some(j) => j.split(',').map(str::to_owned).collect(),
        None => hc.proxy_jump.clone(),
    };
    let mut jumps = Vec::new();
    for hop in jump_list.iter().filter(|h| !h.is_empty() && *h != "none") {
        let d: Destination = hop.parse().map_err(ResolveError::Jump)?;
        // A hop's own settings come from ssh_config, not from our flags.
        let (spec, _) = resolve_host(&d, &Profile::default(), req.ssh_config)?;
        jumps.push(spec);
    }
    let mut forwards = p.local_forwards.clone();
    forwards.extend(p.remote_forwards.iter().cloned());
    if forwards.is_empty() {
        for (kind, list) in [
            (Kind::Local, &hc.local_forwards),
            (Kind::Remote, &hc.remote_forwards),
        ] {
            for f in list {
                match ForwardSpec::parse(kind, f) {
                    Ok(spec) => forwards.push(spec),
                    Err(e) => tracing::warn!("ssh_config forward ignored: {e}"),
                }
            }
        }
    }
    let tuning = p.tuning(&hc);
    let resume = p.resume();
    Ok(UpConfig {
        name: req.name.to_owned(),
        target,
        jumps,
        listen: p.listen.or(req.default_listen),
        allow_non_loopback: p.allow_non_loopback.unwrap_or(false),
        authorized_keys: p.authorized_keys.map(|k| expand_tilde(&k)),
        host_key: p.host_key.map(|k| expand_tilde(&k)),
        forwards,
        tuning,
        resume,
        on_event: p.on_event,
        metrics: p.metrics,
        mux: match p.mux {
            Some(path) if path.as_os_str() == "none" => None,
            Some(path) => Some(path),
            None => Some(
                crate::paths::runtime_dir()
                    .map_err(ResolveError::RuntimeDir)?
                    .join(format!("{}.mux", crate::paths::safe_name(req.name))),
            ),
        },
        // Set by the caller, which knows whether a file's profile runs.
        config_file: None,
        profile_destination: label,
    })
}

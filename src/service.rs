//! Running sshshim under systemd: writing, inspecting and removing the unit
//! file, and the `sd_notify` protocol the running service speaks.
//!
//! The unit runs `sshshim supervise` as `Type=notify` with a watchdog, so
//! systemd restarts it if it stops answering, not only if it exits.

use anyhow::anyhow;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What to run and where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitSpec {
    /// Profiles to supervise; empty means all of them.
    pub profiles: Vec<String>,
    /// A system unit (`/etc/systemd/system`) rather than a user unit.
    pub system: bool,
    /// Config file to pass with `-c`, if not the default one.
    pub config: Option<PathBuf>,
    /// The sshshim executable.
    pub exe: PathBuf,
}

/// Renders the unit file text.
pub fn render_unit(spec: &UnitSpec) -> String {
    let which = if spec.profiles.is_empty() {
        "all".to_owned()
    } else {
        spec.profiles.join(", ")
    };
    let mut argv = vec![absolute(&spec.exe), "supervise".to_owned()];
    if let Some(c) = &spec.config {
        // The service runs in `/`, so a relative path would mean nothing.
        argv.push("-c".into());
        argv.push(absolute(c));
    }
    argv.extend(spec.profiles.iter().cloned());
    let exec = argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");
    render(
        spec,
        "# Written by `sshshim service install`; `sshshim service remove` deletes it.\n",
        &escape_specifiers(&which),
        &exec,
    )
}

/// The template user unit `sshshim@.service` that packages install: the
/// unit [`render_unit`] writes for one profile, the instance name (`%i`),
/// run by `exe`. `systemctl --user enable --now sshshim@NAME` starts it.
pub fn render_template_unit(exe: &Path) -> String {
    let spec = UnitSpec {
        exe: exe.to_path_buf(),
        ..UnitSpec::default()
    };
    let exec = format!("{} supervise %i", quote(&absolute(exe)));
    render(
        &spec,
        "# Installed by the sshshim package. One instance per profile:\n\
         #   systemctl --user enable --now sshshim@PROFILE\n",
        "%i",
        &exec,
    )
}

/// The unit text around its header comment, the profiles named in its
/// Description and its ExecStart line (both already escaped for systemd).
fn render(spec: &UnitSpec, header: &str, which: &str, exec: &str) -> String {
    let mut u = String::new();
    u.push_str(header);
    u.push_str("[Unit]\n");
    u.push_str(&format!(
        "Description=sshshim persistent tunnels (profiles: {which})\n"
    ));
    u.push_str("Documentation=man:sshshim(1) man:ssh(1)\n");
    u.push_str("Wants=network-online.target\nAfter=network-online.target\n\n");
    u.push_str("[Service]\n");
    u.push_str("Type=notify\n");
    // Only the main process may report readiness and pet the watchdog.
    u.push_str("NotifyAccess=main\n");
    u.push_str(&format!("ExecStart={exec}\n"));
    u.push_str("Restart=always\nRestartSec=5\n");
    // sshshim sends WATCHDOG=1 at half this interval (see watchdog_interval).
    u.push_str("WatchdogSec=60\n");
    u.push_str("StandardError=journal\n");
    u.push_str("Environment=RUST_LOG=info\n");
    // Hardening that still lets sshshim read ~/.ssh and write its state dir:
    // ProtectHome or ProtectSystem=strict would break that.
    u.push_str("NoNewPrivileges=yes\nPrivateTmp=yes\n");
    if spec.system {
        let who = invoking_user();
        u.push_str(
            "# The account whose ~/.ssh, known_hosts and sshshim config are used;\n\
             # change it if the tunnels should run as someone else.\n",
        );
        u.push_str(&format!("User={}\n", escape_specifiers(&who)));
    }
    u.push_str("\n[Install]\n");
    u.push_str(if spec.system {
        "WantedBy=multi-user.target\n"
    } else {
        "WantedBy=default.target\n"
    });
    u
}

/// Unit file name: `sshshim.service` for all profiles, `sshshim-NAME.service`
/// for one profile (`sshshim-A-B.service` for several).
pub fn unit_name(spec: &UnitSpec) -> String {
    if spec.profiles.is_empty() {
        return "sshshim.service".into();
    }
    let names: Vec<String> = spec.profiles.iter().map(|p| unit_safe(p)).collect();
    format!("sshshim-{}.service", names.join("-"))
}

/// Unit path: `~/.config/systemd/user/NAME` (honouring `XDG_CONFIG_HOME`)
/// or `/etc/systemd/system/NAME`.
pub fn unit_path(spec: &UnitSpec) -> PathBuf {
    unit_dir(spec.system).join(unit_name(spec))
}

/// The commands install runs after writing the unit.
pub fn install_commands(spec: &UnitSpec) -> Vec<Vec<String>> {
    vec![
        systemctl(spec.system, &["daemon-reload"]),
        systemctl(spec.system, &["enable", "--now", &unit_name(spec)]),
    ]
}

/// Whether systemd is running and, for user units, whether
/// `systemctl --user` can reach the user's service manager.
pub fn systemd_available(system: bool) -> bool {
    if !Path::new("/run/systemd/system").exists() {
        return false;
    }
    system
        || Command::new("systemctl")
            .args(["--user", "show-environment"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Installs and starts the unit; with `dry_run`, only says what it would
/// do. Without systemd, installs nothing and says how to do it by hand.
pub fn install(spec: &UnitSpec, dry_run: bool) -> anyhow::Result<String> {
    check_spec(spec)?;
    let unit = render_unit(spec);
    let path = unit_path(spec);
    let cmds = install_commands(spec);
    let cmd_lines: String = cmds
        .iter()
        .map(|c| format!("  {}\n", c.join(" ")))
        .collect();
    if dry_run {
        return Ok(format!(
            "Would write {}:\n\n{unit}\nWould run:\n{cmd_lines}",
            path.display()
        ));
    }
    if !systemd_available(spec.system) {
        let what = if spec.system {
            "systemd is not running on this machine"
        } else {
            "no systemd user manager is reachable (`systemctl --user` does not work)"
        };
        return Ok(format!(
            "Nothing installed: {what}.\n\
             To install by hand on a systemd machine, save this as {}:\n\n{unit}\nthen run:\n{cmd_lines}",
            path.display()
        ));
    }
    let existed = path.exists();
    write_unit(&path, &unit)?;
    for c in &cmds {
        run(c)?;
    }
    let name = unit_name(spec);
    let user = if spec.system { "" } else { " --user" };
    let mut out = format!("Installed {} and started {name}.\n", path.display());
    if existed {
        // enable --now does not restart a unit that is already running.
        out.push_str(&format!(
            "It replaced an existing unit: run `systemctl{user} restart {name}` to apply changes.\n"
        ));
    }
    out.push_str(&format!(
        "Check it with `systemctl{user} status {name}` or `journalctl{user} -u {name}`.\n"
    ));
    if !spec.system {
        out.push_str(
            "To keep it running while you are logged out (and start it at boot): \
             loginctl enable-linger $USER\n",
        );
    }
    Ok(out)
}

/// `systemctl [--user] status --no-pager` for the named unit (a unit name or
/// a profile name), or for every installed sshshim unit.
pub fn status(system: bool, name: Option<&str>) -> anyhow::Result<String> {
    let dir = unit_dir(system);
    let units = match name {
        Some(n) => vec![resolve_name(&dir, n)],
        None => installed_units(&dir)?,
    };
    if units.is_empty() {
        return Ok(format!(
            "No sshshim unit is installed in {}.",
            dir.display()
        ));
    }
    if let [u] = units.as_slice()
        && !dir.join(u).exists()
    {
        return Ok(format!(
            "{u} is not installed (no {}).",
            dir.join(u).display()
        ));
    }
    if !systemd_available(system) {
        return Ok(format!(
            "Installed in {}: {}; but systemd is not available here to report on them.",
            dir.display(),
            units.join(", ")
        ));
    }
    let mut argv = systemctl(system, &["status", "--no-pager"]);
    argv.extend(units);
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| anyhow!("cannot run {}: {e}", argv[0]))?;
    // Non-zero exit only means "not running", which is still a status.
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

/// Refuses what could break out of the unit file's syntax: every profile
/// name must pass [`crate::config::spec::check_name`] (a newline in `Description=`
/// would start a directive of its own), and no path or user name may hold a
/// control character.
fn check_spec(spec: &UnitSpec) -> anyhow::Result<()> {
    for p in &spec.profiles {
        crate::config::spec::check_name(p)?;
    }
    crate::config::spec::check_path_text("the sshshim executable", &spec.exe)?;
    if let Some(c) = &spec.config {
        crate::config::spec::check_path_text("the config file", c)?;
    }
    if spec.system {
        crate::config::spec::check_path_text("the user name", Path::new(&invoking_user()))?;
    }
    Ok(())
}

/// Stops and disables the unit, removes its file and reloads systemd. With
/// no name, removes every `sshshim*.service` in the unit directory.
pub fn remove(system: bool, name: Option<&str>, dry_run: bool) -> anyhow::Result<String> {
    let dir = unit_dir(system);
    let units: Vec<String> = match name {
        Some(n) => vec![resolve_name(&dir, n)],
        None => installed_units(&dir)?,
    }
    .into_iter()
    .filter(|u| dir.join(u).exists())
    .collect();
    if units.is_empty() {
        return Ok(match name {
            Some(n) => format!(
                "{} is not installed in {}.",
                resolve_name(&dir, n),
                dir.display()
            ),
            None => format!("No sshshim unit is installed in {}.", dir.display()),
        });
    }
    let mut disable = systemctl(system, &["disable", "--now"]);
    disable.extend(units.iter().cloned());
    let reload = systemctl(system, &["daemon-reload"]);
    let files: Vec<PathBuf> = units.iter().map(|u| dir.join(u)).collect();
    if dry_run {
        let mut out = format!("Would run:\n  {}\nWould remove:\n", disable.join(" "));
        for f in &files {
            out.push_str(&format!("  {}\n", f.display()));
        }
        out.push_str(&format!("Would run:\n  {}\n", reload.join(" ")));
        return Ok(out);
    }
    let mut out = String::new();
    let systemd = systemd_available(system);
    if systemd && let Err(e) = run(&disable) {
        // Keep going: the file must go even if the unit was never loaded.
        out.push_str(&format!("warning: {e}\n"));
    }
    for f in &files {
        std::fs::remove_file(f).map_err(|e| anyhow!("cannot remove {}: {e}", f.display()))?;
        out.push_str(&format!("Removed {}\n", f.display()));
    }
    if systemd {
        run(&reload)?;
    }
    Ok(out)
}

/// sd_notify: sends `state` ("READY=1", "WATCHDOG=1", "STATUS=...",
/// "STOPPING=1") as one datagram to `$NOTIFY_SOCKET` (abstract namespace if
/// it starts with '@'). Does nothing when unset; never panics.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send_notify(&target, state) {
        // Losing a notification is not worth failing over; systemd will
        // complain in its own log if readiness or the watchdog goes missing.
        tracing::debug!("sd_notify {state:?} to {target:?}: {e}");
    }
}

/// Sends one notification datagram to `target`.
fn send_notify(target: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    // Bounded, so a wedged receiver cannot stall the caller (often an async task).
    sock.set_write_timeout(Some(Duration::from_secs(1)))?;
    let bytes = target.as_bytes();
    match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        Some(b'/') => {
            sock.send_to(state.as_bytes(), Path::new(target))?;
        }
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "unsupported NOTIFY_SOCKET address",
            ));
        }
    }
    Ok(())
}

/// How often to send WATCHDOG=1: half of `WATCHDOG_USEC`, if systemd asked
/// this process (per `WATCHDOG_PID`, when set) for a watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

/// [`watchdog_interval`] over explicit values.
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    // WATCHDOG_PID names the process meant; a child must not pet the dog.
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// The directory unit files go in.
fn unit_dir(system: bool) -> PathBuf {
    if system {
        return PathBuf::from("/etc/systemd/system");
    }
    crate::paths::config_dir()
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(".config"))
        .join("systemd/user")
}

/// `systemctl [--user] ARGS...` as an argv.
fn systemctl(system: bool, args: &[&str]) -> Vec<String> {
    let mut v = vec!["systemctl".to_owned()];
    if !system {
        v.push("--user".into());
    }
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// Runs `argv`, turning a failure into an error with its stderr.
fn run(argv: &[String]) -> anyhow::Result<()> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow!("cannot run {}: {e}", argv[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(anyhow!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Writes the unit file with mode 0644, creating its directory.
fn write_unit(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let hint = |e: std::io::Error| {
        let sudo = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (system units need root: try sudo)"
        } else {
            ""
        };
        anyhow!("cannot write {}: {e}{sudo}", path.display())
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(hint)?;
    }
    std::fs::write(path, text).map_err(hint)?;
    // Explicit, because the umask may have made it private or group-writable.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(hint)
}

/// Installed `sshshim*.service` unit names in `dir`, sorted.
fn installed_units(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow!("cannot list {}: {e}", dir.display())),
    };
    let mut v: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("sshshim") && n.ends_with(".service"))
        .collect();
    v.sort();
    Ok(v)
}

/// A unit name from what the user typed: a unit name (with or without
/// `.service`) if such a file is installed, else a profile name.
fn resolve_name(dir: &Path, name: &str) -> String {
    if name.ends_with(".service") {
        return name.to_owned();
    }
    let as_unit = format!("{name}.service");
    if name.starts_with("sshshim") && dir.join(&as_unit).exists() {
        return as_unit;
    }
    format!("sshshim-{}.service", unit_safe(name))
}

/// `s` with characters not allowed in unit names replaced by '_' ('@' would
/// make it a template instance).
fn unit_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `p` made absolute against the current directory (as given if that fails).
fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .to_string_lossy()
        .into_owned()
}

/// Escapes systemd's `%` specifiers.
fn escape_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// Quotes one ExecStart word by systemd's rules: `%` and `$` are doubled
/// everywhere (specifiers, variable expansion); words with blanks, quotes,
/// backslashes or a leading special character go in double quotes with
/// C-style escapes.
fn quote(s: &str) -> String {
    let needs = s.is_empty()
        || s == ";"
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'));
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '%' => out.push_str("%%"),
            '$' => out.push_str("$$"),
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    if needs { format!("\"{out}\"") } else { out }
}

/// The user who ran the install (through sudo if so), for `User=`.
fn invoking_user() -> String {
    std::env::var("SUDO_USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(crate::paths::current_user)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spec for one profile with a config path.
    fn spec(system: bool) -> UnitSpec {
        UnitSpec {
            profiles: vec!["lab".into()],
            system,
            config: Some("/etc/sshshim/my config.toml".into()),
            exe: "/usr/local/bin/sshshim".into(),
        }
    }

    /// A name or path that would add a line to the unit is refused before
    /// anything is written or shown, even in a dry run.
    #[test]
    fn injection_is_refused() {
        let bad_name = UnitSpec {
            profiles: vec!["lab\nExecStartPre=/bin/touch /tmp/pwned".into()],
            ..spec(false)
        };
        let e = install(&bad_name, true).unwrap_err().to_string();
        assert!(e.contains("may only use letters"), "{e}");
        assert!(
            install(
                &UnitSpec {
                    profiles: vec!["a b".into()],
                    ..spec(false)
                },
                true
            )
            .is_err()
        );
        let bad_config = UnitSpec {
            config: Some("/x\nExecStartPre=/bin/true".into()),
            ..spec(false)
        };
        let e = install(&bad_config, true).unwrap_err().to_string();
        assert!(e.contains("control character"), "{e}");
        assert!(install(&spec(false), true).is_ok());
    }

    #[test]
    fn user_unit() {
        let u = render_unit(&spec(false));
        for line in [
            "[Unit]",
            "Description=sshshim persistent tunnels (profiles: lab)",
            "Wants=network-online.target",
            "After=network-online.target",
            "[Service]",
            "Type=notify",
            "ExecStart=/usr/local/bin/sshshim supervise -c \"/etc/sshshim/my config.toml\" lab",
            "Restart=always",
            "RestartSec=5",
            "WatchdogSec=60",
            "NotifyAccess=main",
            "StandardError=journal",
            "Environment=RUST_LOG=info",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "[Install]",
            "WantedBy=default.target",
        ] {
            assert!(u.lines().any(|l| l == line), "missing {line:?} in\n{u}");
        }
        assert!(!u.contains("User="), "{u}");
        assert!(!u.contains("ProtectHome"), "{u}");
    }

    #[test]
    fn template_unit() {
        let u = render_template_unit(Path::new("/usr/bin/sshshim"));
        let user = render_unit(&spec(false));
        // The same unit as `service install` writes for one profile, but
        // for the instance's: only these lines differ.
        let differ = |l: &&str| {
            l.starts_with('#') || l.starts_with("Description=") || l.starts_with("ExecStart=")
        };
        assert_eq!(
            u.lines().filter(|l| !differ(l)).collect::<Vec<_>>(),
            user.lines().filter(|l| !differ(l)).collect::<Vec<_>>()
        );
        assert!(
            u.lines()
                .any(|l| l == "ExecStart=/usr/bin/sshshim supervise %i"),
            "{u}"
        );
        assert!(
            u.lines()
                .any(|l| l == "Description=sshshim persistent tunnels (profiles: %i)"),
            "{u}"
        );
    }

    #[test]
    fn system_unit() {
        let s = UnitSpec {
            profiles: vec![],
            config: None,
            ..spec(true)
        };
        let u = render_unit(&s);
        assert!(u.contains("profiles: all"), "{u}");
        assert!(
            u.lines()
                .any(|l| l == "ExecStart=/usr/local/bin/sshshim supervise"),
            "{u}"
        );
        assert!(u.lines().any(|l| l.starts_with("User=")), "{u}");
        assert!(u.lines().any(|l| l == "WantedBy=multi-user.target"), "{u}");
    }

    #[test]
    fn names_and_paths() {
        let mut s = spec(false);
        assert_eq!(unit_name(&s), "sshshim-lab.service");
        assert_eq!(unit_path(&s).file_name().unwrap(), "sshshim-lab.service");
        assert!(unit_path(&s).starts_with(unit_dir(false)));
        assert!(unit_dir(false).ends_with("systemd/user"));
        s.system = true;
        assert_eq!(
            unit_path(&s),
            PathBuf::from("/etc/systemd/system/sshshim-lab.service")
        );
        s.profiles.clear();
        assert_eq!(unit_name(&s), "sshshim.service");
        s.profiles = vec!["a b@c".into()];
        assert_eq!(unit_name(&s), "sshshim-a_b_c.service");
        assert_eq!(
            install_commands(&spec(false)),
            vec![
                vec!["systemctl", "--user", "daemon-reload"],
                vec![
                    "systemctl",
                    "--user",
                    "enable",
                    "--now",
                    "sshshim-lab.service"
                ],
            ]
        );
        assert_eq!(
            install_commands(&spec(true))[0],
            vec!["systemctl", "daemon-reload"]
        );
        let d = Path::new("/nonexistent");
        assert_eq!(resolve_name(d, "lab"), "sshshim-lab.service");
        assert_eq!(resolve_name(d, "sshshim.service"), "sshshim.service");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("50%"), "50%%");
        assert_eq!(quote("$HOME"), "$$HOME");
        assert_eq!(quote("a\"b\\"), "\"a\\\"b\\\\\"");
        assert_eq!(quote(""), "\"\"");
    }

    #[test]
    fn dry_runs() {
        let out = install(&spec(false), true).unwrap();
        assert!(out.contains(&render_unit(&spec(false))), "{out}");
        assert!(out.contains("systemctl --user daemon-reload"), "{out}");
        assert!(
            out.contains("systemctl --user enable --now sshshim-lab.service"),
            "{out}"
        );
        assert!(out.contains(&unit_path(&spec(false)).display().to_string()));
        // Nothing of ours installed under a name nobody uses.
        let r = remove(true, Some("zz-sshshim-test-nonexistent"), true).unwrap();
        assert!(r.contains("not installed"), "{r}");
    }

    #[test]
    fn watchdog_values() {
        assert_eq!(
            watchdog_from(Some("60000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_from(Some("60000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_from(Some("60000000"), Some("8"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_from(None, None, 7), None);
    }

    #[test]
    fn notify_socket() {
        use std::os::unix::net::UnixDatagram;
        // The only test that touches NOTIFY_SOCKET / WATCHDOG_*.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];

        // SAFETY: no other test reads or writes these variables.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", &path);
            std::env::set_var("WATCHDOG_USEC", "2000000");
            std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        }
        notify("READY=1");
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(1)));

        // Abstract namespace.
        use std::os::linux::net::SocketAddrExt;
        let name = format!("sshshim-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let arx = UnixDatagram::bind_addr(&addr).unwrap();
        arx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // SAFETY: as above.
        unsafe { std::env::set_var("NOTIFY_SOCKET", format!("@{name}")) };
        notify("WATCHDOG=1");
        let n = arx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");

        // Unreachable or unset: silently nothing.
        // SAFETY: as above.
        unsafe { std::env::set_var("NOTIFY_SOCKET", dir.path().join("gone")) };
        notify("STOPPING=1");
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", "garbage");
        }
        notify("STOPPING=1");
        // SAFETY: as above.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        notify("STOPPING=1");
        assert_eq!(watchdog_interval(), None);
    }

    #[test]
    fn systemd_analyze_verify() {
        let ok = Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            eprintln!("systemd-analyze not available; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let verify = |path: &Path, system: bool| {
            let mut cmd = Command::new("systemd-analyze");
            if !system {
                // Without a runtime dir the user manager cannot even start.
                cmd.arg("--user").env("XDG_RUNTIME_DIR", dir.path());
            }
            let out = cmd.args(["verify", "--man=no"]).arg(path).output().unwrap();
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        // Make sure this systemd-analyze does report unknown keys here.
        let probe = dir.path().join("probe.service");
        std::fs::write(&probe, "[Service]\nExecStart=/bin/true\nBogusKey=1\n").unwrap();
        if !verify(&probe, true).contains("Unknown key") {
            eprintln!("systemd-analyze does not report unknown keys here; skipping");
            return;
        }
        for system in [false, true] {
            let s = UnitSpec {
                exe: "/bin/true".into(),
                config: Some(dir.path().join("c.toml")),
                ..spec(system)
            };
            let path = dir.path().join(unit_name(&s));
            std::fs::write(&path, render_unit(&s)).unwrap();
            let err = verify(&path, system);
            for bad in [
                "Unknown key",
                "Unknown section",
                "Unknown lvalue",
                "bad unit file setting",
                "Failed to parse",
                "Invalid",
            ] {
                assert!(
                    !err.contains(bad),
                    "systemd-analyze (system={system}): {err}"
                );
            }
        }
        // The template, as an instance (verify loads units by file name).
        let path = dir.path().join("sshshim@lab.service");
        std::fs::write(&path, render_template_unit(Path::new("/bin/true"))).unwrap();
        let err = verify(&path, false);
        assert!(
            !err.contains("Unknown") && !err.contains("Invalid") && !err.contains("Failed"),
            "systemd-analyze (template): {err}"
        );
    }
}

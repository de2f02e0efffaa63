//! Man pages (roff) for `sshshim` and each subcommand, rendered by
//! clap_mangen from the definitions that parse the command line and print
//! `--help`, so the two cannot drift.

use std::path::{Path, PathBuf};

use anyhow::anyhow;

/// Section 1: user commands.
const SECTION: &str = "1";

/// The page of the command reached by `path` from `cli` (`[]`: sshshim
/// itself, `["service", "install"]`: sshshim-service-install(1)).
pub fn render(cli: clap::Command, path: &[String]) -> anyhow::Result<Vec<u8>> {
    let root = prepare(cli);
    let mut cmd = &root;
    for (i, name) in path.iter().enumerate() {
        cmd = cmd
            .get_subcommands()
            .find(|c| c.get_name() == name && !c.is_hide_set())
            .ok_or_else(|| {
                let known: Vec<&str> = cmd
                    .get_subcommands()
                    .filter(|c| !c.is_hide_set())
                    .map(clap::Command::get_name)
                    .collect();
                anyhow!(
                    "no page for '{}': '{name}' is not a subcommand of '{}' (known: {})",
                    path[..=i].join(" "),
                    display_name(cmd),
                    known.join(", ")
                )
            })?;
    }
    Ok(page(cmd, &root))
}

/// Writes every page into `dir` (created if missing) as `NAME.1`; returns
/// the paths written.
pub fn write_all(cli: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    let root = prepare(cli);
    let mut written = Vec::new();
    for cmd in all_commands(&root) {
        let path = dir.join(format!("{}.{SECTION}", display_name(cmd)));
        std::fs::write(&path, page(cmd, &root))
            .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The command tree as the pages describe it: built (so subcommands know
/// their full names) and without the `help` subcommand, which has no page.
fn prepare(cli: clap::Command) -> clap::Command {
    let mut cli = cli.disable_help_subcommand(true);
    cli.build();
    cli
}

/// `cmd` and every visible subcommand below it, depth first.
fn all_commands(cmd: &clap::Command) -> Vec<&clap::Command> {
    let mut out = vec![cmd];
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        out.extend(all_commands(sub));
    }
    out
}

/// `sshshim-service-install` for `sshshim service install`.
fn display_name(cmd: &clap::Command) -> &str {
    cmd.get_display_name().unwrap_or_else(|| cmd.get_name())
}

/// One page: clap_mangen's, then SEE ALSO naming the pages around it.
fn page(cmd: &clap::Command, root: &clap::Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .manual("User Commands")
        .source(format!(
            "{} {}",
            root.get_name(),
            root.get_version().unwrap_or_default()
        ))
        .date(date())
        .render(&mut out)
        .expect("writing to a Vec cannot fail");
    let mut see_also: Vec<&str> = Vec::new();
    if !std::ptr::eq(cmd, root) {
        see_also.push(display_name(root));
    }
    see_also.extend(
        cmd.get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(display_name),
    );
    let mut refs: Vec<String> = see_also
        .iter()
        .map(|n| format!("\\fB{}\\fR({SECTION})", n.replace('-', "\\-")))
        .collect();
    refs.extend(["\\fBssh\\fR(1)".into(), "\\fBssh_config\\fR(5)".into()]);
    out.extend_from_slice(format!(".SH \"SEE ALSO\"\n{}\n", refs.join(",\n")).as_bytes());
    out
}

/// The page date, YYYY-MM-DD: `SOURCE_DATE_EPOCH` when set (reproducible
/// builds), else today. Never empty: an empty date in `.TH` shifts the
/// fields after it.
fn date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    civil_date(secs / 86_400)
}

/// Days since 1970-01-01 as a proleptic Gregorian YYYY-MM-DD (Howard
/// Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> String {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(20_423), "2025-12-01");
    }
}

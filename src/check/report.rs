//! What `sshshim check` found: the report types (their JSON form is a
//! stable interface, see the [module docs](super)) and the table for people.

use std::fmt::Write as _;

use crate::control::ProfileStatus;
use crate::term::clean;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Passed.
    Ok,
    /// Failed: the detail says what is wrong.
    Fail,
    /// Not run (an earlier step failed, or there is nothing to probe);
    /// never a failure by itself.
    Skip,
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    /// Which check: "resolve", "connect", "version", "host_key", "auth", "resume",
    /// "local_target", "remote_port", "remote_target" or "running" (more
    /// may be added).
    pub check: String,
    /// "ok", "fail" or "skip".
    pub status: Status,
    /// What it is about when a profile has several of the kind: the
    /// forward ("-R 2222:localhost:22"), or the hop of a jump-host chain
    /// ("alice@gw:22"). None otherwise.
    pub subject: Option<String>,
    /// What was found, or exactly what is wrong, for people.
    pub detail: String,
    /// How long the probe took, in milliseconds, where it was timed.
    pub ms: Option<f64>,
}

impl Check {
    /// A check with the given outcome.
    pub(super) fn new(
        check: &str,
        status: Status,
        subject: Option<String>,
        detail: impl Into<String>,
    ) -> Check {
        Check {
            check: check.to_owned(),
            status,
            subject,
            detail: detail.into(),
            ms: None,
        }
    }

    /// A passed check.
    pub(super) fn ok(check: &str, subject: Option<String>, detail: impl Into<String>) -> Check {
        Check::new(check, Status::Ok, subject, detail)
    }

    /// A failed check.
    pub(super) fn fail(check: &str, subject: Option<String>, detail: impl Into<String>) -> Check {
        Check::new(check, Status::Fail, subject, detail)
    }

    /// A check that was not run.
    pub(super) fn skip(check: &str, subject: Option<String>, detail: impl Into<String>) -> Check {
        Check::new(check, Status::Skip, subject, detail)
    }

    /// The same check with its duration.
    pub(super) fn timed(mut self, d: std::time::Duration) -> Check {
        self.ms = Some(ms(d));
        self
    }
}

/// Milliseconds, rounded to 0.1.
pub(super) fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// What the server's host key turned out to be.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostKeyReport {
    /// "known", "unknown", "changed", "revoked" or "certificate" (a
    /// certificate was offered, which sshshim does not verify).
    pub state: String,
    /// Type of the key offered ("ssh-ed25519").
    pub algorithm: Option<String>,
    /// SHA256 fingerprint of the key offered.
    pub fingerprint: Option<String>,
    /// When "changed": fingerprint of the key recorded for the host.
    pub recorded_fingerprint: Option<String>,
    /// When "changed" or "revoked": "FILE:LINE" of the recorded entry.
    pub recorded_at: Option<String>,
    /// The known_hosts file checked (and the one `--accept-new` would write).
    pub known_hosts: String,
}

/// How authentication went.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AuthReport {
    /// "publickey", "password" or "none" when it worked; None when not.
    pub method: Option<String>,
    /// Which credential worked: an agent key's fingerprint, a key file's
    /// path, "a typed password". Never a secret.
    pub credential: Option<String>,
    /// The methods the server offers ("publickey", "password", ...), as
    /// answered to a "none" request; empty if it did not say.
    pub offered: Vec<String>,
}

/// Everything `sshshim check` found for one profile or destination.
///
/// Its JSON serialisation is a **stable interface** (see the module docs):
/// fields may be added but are never renamed, removed or repurposed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProfileReport {
    /// Profile name, or the destination as given.
    pub profile: String,
    /// The resolved upstream, "user@host:port" (with " via HOP, ..." for
    /// jump hosts); None if it could not be resolved.
    pub destination: Option<String>,
    /// Whether every check passed or was skipped.
    pub passed: bool,
    /// The checks, in the order they are shown.
    pub checks: Vec<Check>,
    /// Time of the TCP connect to the first hop, in milliseconds.
    pub connect_ms: Option<f64>,
    /// The server's SSH identification string.
    pub server_version: Option<String>,
    /// The server's host key (of the target, not of jump hosts).
    pub host_key: Option<HostKeyReport>,
    /// Authentication to the target.
    pub auth: Option<AuthReport>,
    /// The status of the sshshim running this profile (the same object as
    /// one element of `sshshim status --json`), or None if none runs.
    pub running: Option<ProfileStatus>,
}

impl ProfileReport {
    /// Failed checks.
    pub fn failed(&self) -> usize {
        self.count(Status::Fail)
    }

    /// Checks with the given outcome.
    fn count(&self, s: Status) -> usize {
        self.checks.iter().filter(|c| c.status == s).count()
    }
}

/// Label of a check in the table.
fn label(check: &str) -> &str {
    match check {
        "host_key" => "host key",
        "local_target" => "-L target",
        "remote_port" => "-R port",
        "remote_target" => "-R target",
        "running" => "sshshim",
        other => other,
    }
}

/// The table for people: per profile a heading, one line per check
/// (ok / FAIL / skip, check, detail), a summary line; a total at the end.
/// Every text is [`clean`]ed: the server's version string and its error
/// messages come from the network, before any host key is checked, and
/// must not drive the terminal (the JSON form escapes them instead).
pub fn render(reports: &[ProfileReport]) -> String {
    let mut out = String::new();
    for (i, r) in reports.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let profile = clean(&r.profile);
        match &r.destination {
            Some(d) if d != &r.profile => {
                let _ = writeln!(out, "{profile} ({})", clean(d));
            }
            _ => {
                let _ = writeln!(out, "{profile}");
            }
        }
        for c in &r.checks {
            let status = match c.status {
                Status::Ok => "ok",
                Status::Fail => "FAIL",
                Status::Skip => "skip",
            };
            let detail = match &c.subject {
                Some(s) => format!("{}: {}", clean(s), clean(&c.detail)),
                None => clean(&c.detail),
            };
            let _ = writeln!(out, "  {status:<5} {:<10} {detail}", clean(label(&c.check)));
        }
        let (failed, skipped) = (r.failed(), r.count(Status::Skip));
        let skipped_text = match skipped {
            0 => String::new(),
            n => format!(", {n} skipped"),
        };
        let _ = if failed == 0 {
            writeln!(out, "{profile}: passed{skipped_text}")
        } else {
            writeln!(
                out,
                "{profile}: {failed} of {} checks failed{skipped_text}",
                r.checks.len()
            )
        };
    }
    let failed = reports.iter().filter(|r| !r.passed).count();
    let skips = reports.iter().any(|r| r.count(Status::Skip) > 0);
    if reports.len() > 1 || skips {
        out.push('\n');
        let _ = write!(
            out,
            "{} checked: {} passed, {failed} failed",
            plural(reports.len(), "profile"),
            reports.len() - failed
        );
        if skips {
            out.push_str(" (skipped checks are not failures)");
        }
        out.push('\n');
    }
    out
}

/// "1 profile", "3 profiles".
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(checks: Vec<Check>) -> ProfileReport {
        ProfileReport {
            profile: "lab".into(),
            destination: Some("alice@gw:22".into()),
            passed: checks.iter().all(|c| c.status != Status::Fail),
            checks,
            connect_ms: Some(1.5),
            server_version: None,
            host_key: None,
            auth: None,
            running: None,
        }
    }

    #[test]
    fn table_shows_status_label_subject_and_summary() {
        let r = report(vec![
            Check::ok("connect", None, "127.0.0.1:22 in 0.3 ms"),
            Check::fail(
                "remote_target",
                Some("-R 2222:localhost:22".into()),
                "refused",
            ),
            Check::skip("running", None, "not running"),
        ]);
        let t = render(&[r]);
        assert!(t.starts_with("lab (alice@gw:22)\n"), "{t}");
        assert!(
            t.contains("  ok    connect    127.0.0.1:22 in 0.3 ms\n"),
            "{t}"
        );
        assert!(
            t.contains("  FAIL  -R target  -R 2222:localhost:22: refused\n"),
            "{t}"
        );
        assert!(t.contains("  skip  sshshim    not running\n"), "{t}");
        assert!(t.contains("lab: 1 of 3 checks failed, 1 skipped\n"), "{t}");
        assert!(t.contains("(skipped checks are not failures)"), "{t}");
    }

    /// A hostile version string or error cannot drive the terminal.
    #[test]
    fn table_is_cleaned() {
        let evil = "SSH-2.0-x\x1b[1A\x1b[2K\r  ok    host key SHA256:forged\x1b]0;t\x07";
        let mut r = report(vec![
            Check::ok("version", None, evil),
            Check::fail("auth", Some("a\x1bb".into()), "server said \u{9b}2J"),
        ]);
        r.profile = "p\x1b[31m".into();
        let t = render(&[r]);
        assert!(!t.contains(['\x1b', '\x07', '\r', '\u{9b}']), "{t:?}");
        assert!(
            t.contains("  ok    version    SSH-2.0-x?[1A?[2K?  ok"),
            "{t}"
        );
        // Only the table's own line breaks are left.
        assert_eq!(t.lines().count(), 4, "{t}");
    }

    #[test]
    fn json_uses_lowercase_statuses_and_round_trips() {
        let r = report(vec![
            Check::fail("auth", None, "rejected").timed(std::time::Duration::from_micros(1234)),
        ]);
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""status":"fail""#), "{text}");
        assert!(text.contains(r#""ms":1.2"#), "{text}");
        let back: ProfileReport = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
    }
}

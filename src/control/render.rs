//! Human rendering of profile statuses: the `sshshim status` output, one
//! block per profile with its forwards as an aligned table.

use std::fmt::Write as _;

use super::status::{ForwardStatus, ProfileStatus};

use crate::stats::unix_now;
// Server versions and errors come from the network.
use crate::term::clean;

/// Formats a duration compactly: "45s", "3m12s", "2h05m", "3d04h".
fn fmt_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Formats a byte count in binary units: "512 B", "1.2 KiB", "3.4 MiB".
fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Human-readable status of several profiles: for each, a header line
/// (profile, state, duration in that state, reconnects, rtt, server version),
/// then upstream, endpoint and local clients, open channels by kind, bytes
/// in/out, retry and last error, and a forwards table. Profiles are separated
/// by a blank line; an empty slice renders as an empty string.
pub fn render(statuses: &[ProfileStatus]) -> String {
    render_at(statuses, unix_now())
}

/// [`render`] with an explicit "now", for deterministic output in tests.
fn render_at(statuses: &[ProfileStatus], now: u64) -> String {
    let mut out = String::new();
    for (i, st) in statuses.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render_one(&mut out, st, now);
    }
    out
}

/// Appends the block for one profile to `out`.
fn render_one(out: &mut String, st: &ProfileStatus, now: u64) {
    let up = &st.upstream;
    let mut header = format!(
        "{} (pid {}): {} for {}, reconnects {}",
        clean(&st.profile),
        st.pid,
        clean(&up.state),
        fmt_duration(now.saturating_sub(up.since)),
        up.reconnects
    );
    if let Some(rtt) = up.rtt_ms {
        let _ = write!(header, ", rtt {rtt:.1} ms");
    }
    if let Some(v) = &up.server_version {
        let _ = write!(header, ", server {}", clean(v));
    }
    let _ = writeln!(out, "{header}");

    render_fields(out, st, now);
}

/// Appends the indented `label value` lines of one profile.
fn render_fields(out: &mut String, st: &ProfileStatus, now: u64) {
    let up = &st.upstream;
    // Fixed-width labels keep the values aligned in one column.
    let mut field = |label: &str, value: String| {
        let line = format!("  {label:<11} {value}");
        let _ = writeln!(out, "{}", line.trim_end());
    };
    let conns = if up.connections == 1 {
        "connection"
    } else {
        "connections"
    };
    // Congestion is shown only while it lasts: it is the exception.
    let congested = match up.congested_connections {
        0 => String::new(),
        n => format!(", {n} congested by a stalled reader"),
    };
    field(
        "upstream",
        format!(
            "{} ({} {conns}{congested})",
            clean(&st.destination),
            up.connections
        ),
    );
    let clients = if st.local_clients == 1 {
        "client"
    } else {
        "clients"
    };
    let endpoint = st.endpoint.as_deref().map_or("none".to_string(), clean);
    field(
        "endpoint",
        format!("{endpoint}, {} local {clients}", st.local_clients),
    );
    if let Some(m) = st.mux_socket.as_deref() {
        field("mux", format!("{} (ssh -o ControlPath=…)", clean(m)));
    }
    let channels = st
        .channels
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{} {n}", clean(k)))
        .collect::<Vec<_>>();
    let channels = if channels.is_empty() {
        "none".to_string()
    } else {
        channels.join(", ")
    };
    field("channels", channels);
    field(
        "traffic",
        format!(
            "in {}, out {}",
            fmt_bytes(st.bytes_in),
            fmt_bytes(st.bytes_out)
        ),
    );
    if let Some(next) = up.next_attempt {
        let attempt = up
            .attempt
            .map(|a| format!("attempt {a} "))
            .unwrap_or_default();
        field(
            "retry",
            format!("{attempt}in {}", fmt_duration(next.saturating_sub(now))),
        );
    }
    if let Some(err) = &up.last_error {
        field("last error", clean(err));
    }
    if st.forwards.is_empty() {
        field("forwards", "none".to_string());
        return;
    }
    field("forwards", String::new());
    render_forwards(out, &st.forwards);
}

/// Appends the table of forwards, one row each under a header.
fn render_forwards(out: &mut String, forwards: &[ForwardStatus]) {
    let rows: Vec<[String; 5]> = forwards
        .iter()
        .map(|f| {
            [
                clean(&f.spec),
                clean(&f.owner),
                clean(&f.state),
                f.bound_port.map_or("-".to_string(), |p| p.to_string()),
                f.error.as_deref().map_or(String::new(), clean),
            ]
        })
        .collect();
    let head = ["SPEC", "OWNER", "STATE", "PORT", "ERROR"].map(String::from);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&head).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&head).chain(&rows) {
        let mut line = String::from("   ");
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            // The last column is not padded, to avoid trailing spaces.
            if i == 4 {
                let _ = write!(line, " {cell}");
            } else {
                let _ = write!(line, " {cell:<w$} ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::super::status::sample;
    use super::*;

    /// The human rendering carries the key fields and aligns the table.
    #[test]
    fn render_shows_key_fields() {
        let mut other = sample("home");
        other.upstream.state = "reconnecting".into();
        other.upstream.next_attempt = Some(1_000 + 192 + 5);
        other.upstream.attempt = Some(3);
        other.forwards.clear();
        let out = render_at(&[sample("work"), other], 1_000 + 192);
        for want in [
            "work (pid",
            "connected for 3m12s",
            "reconnects 2",
            "rtt 12.5 ms",
            "server SSH-2.0-OpenSSH_9.6",
            "alice@example.com:22 (2 connections, 1 congested by a stalled reader)",
            "127.0.0.1:2222, 1 local client",
            "direct-tcpip 1, session 2",
            "in 1.2 MiB, out 512 B",
            "connection reset by peer",
            "SPEC",
            "-R 2222:localhost:22",
            "sshshim",
            "active",
            "2222",
            "retrying",
            "port in use",
            "home (pid",
            "reconnecting for 3m12s",
            "attempt 3 in 5s",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        // Table columns line up: OWNER starts at the same column in every row.
        let table: Vec<&str> = out.lines().filter(|l| l.starts_with("    ")).collect();
        assert_eq!(table.len(), 3, "{out}");
        let col = table[0].find("OWNER").unwrap();
        assert_eq!(table[1].find("sshshim"), Some(col));
        assert_eq!(table[2].find("client"), Some(col));
        assert!(render(&[]).is_empty());
        assert_eq!(fmt_duration(7_500), "2h05m");
        assert_eq!(clean("a\x1b[2Jb"), "a?[2Jb");
    }
}

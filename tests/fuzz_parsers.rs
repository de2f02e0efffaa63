//! Property tests ("fuzzing" on stable Rust) of the public parsers: forward
//! specs, destinations, known_hosts host patterns and the `ssh -G` reader.
//! The private parsers (known_hosts lines, profiles, control socket,
//! metrics HTTP) have theirs next to their code, named `fuzz_*` too.
//!
//! Every property: no panic, an answer within a time bound, errors that
//! are messages. `SSHSHIM_FUZZ_CASES` sets the cases per property (256 by
//! default, seconds in all); `scripts/fuzz.sh` runs many more.

#[path = "../src/fuzzing.rs"]
mod fuzzing;

use fuzzing::{bounded, config, is_message, nasty_text};
use proptest::prelude::*;
use sshshim::config::spec::{Destination, ForwardSpec, Kind};
use sshshim::config::ssh_config::parse_ssh_g;
use sshshim::upstream::known_hosts::glob;

/// Either direction.
fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![Just(Kind::Local), Just(Kind::Remote)]
}

/// One field of a forward spec: ports good and bad, hosts, IPv6 in
/// brackets, socket paths.
fn forward_field() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "0",
            "1",
            "22",
            "8080",
            "65535",
            "65536",
            "-1",
            "99999999999999999999",
            "localhost",
            "*",
            "0.0.0.0",
            "[::1]",
            "[fe80::1%eth0]",
            "[",
            "]",
            "[]",
            "[[::1]]",
            "/tmp/s.sock",
            "./rel.sock",
            "~/s",
            "/a:b",
            "[/a:b]",
            " ",
            "\0",
        ])
        .prop_map(str::to_owned),
        "[a-z0-9.]{1,12}",
        (0u32..70000).prop_map(|n| n.to_string()),
        nasty_text(4),
    ]
}

/// A forward spec: fields joined with ':', or anything at all.
fn forward_text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(forward_field(), 0..7).prop_map(|f| f.join(":")),
        1 => nasty_text(64),
    ]
}

/// `ForwardSpec::parse` within the budget, with its error checked.
fn parse_forward(kind: Kind, s: &str) -> Result<ForwardSpec, String> {
    let owned = s.to_owned();
    let r = bounded("ForwardSpec::parse", move || {
        ForwardSpec::parse(kind, &owned).map_err(|e| e.to_string())
    });
    if let Err(e) = &r {
        is_message("ForwardSpec::parse", e);
        assert!(e.contains(s), "the error names the spec: {e}");
    }
    r
}

/// `Destination::from_str` within the budget, with its error checked.
fn parse_destination(s: &str) -> Result<Destination, String> {
    let owned = s.to_owned();
    let r = bounded("Destination::from_str", move || {
        owned.parse::<Destination>()
    });
    if let Err(e) = &r {
        is_message("Destination::from_str", e);
    }
    r
}

/// A destination: `[user@]host[:port]` from likely pieces, or anything.
fn destination_text() -> impl Strategy<Value = String> {
    let user = prop_oneof![
        Just(String::new()),
        "[a-z]{1,8}@",
        Just("a@b@".to_owned()),
        Just("@".to_owned()),
        nasty_text(3).prop_map(|u| format!("{u}@")),
    ];
    let host = prop_oneof![
        "[a-z0-9.-]{0,16}",
        Just("[::1]".to_owned()),
        Just("fe80::1".to_owned()),
        Just("[fe80::1".to_owned()),
        Just("[]".to_owned()),
        nasty_text(4),
    ];
    let port = prop_oneof![
        Just(String::new()),
        (0u32..70000).prop_map(|p| format!(":{p}")),
        Just(":".to_owned()),
        Just(":99999999999999999999".to_owned()),
        nasty_text(3).prop_map(|p| format!(":{p}")),
    ];
    prop_oneof![
        3 => (user, host, port).prop_map(|(u, h, p)| format!("{u}{h}{p}")),
        1 => nasty_text(64),
    ]
}

/// A reference glob matcher: dynamic programming over (pattern, name)
/// prefixes, byte-wise and ASCII case-insensitive like [`glob`].
fn glob_reference(pat: &str, name: &str) -> bool {
    let (p, n) = (pat.as_bytes(), name.as_bytes());
    // m[j]: does p[..i] match n[..j]?
    let mut m = vec![false; n.len() + 1];
    m[0] = true;
    for &pc in p {
        let mut next = vec![false; n.len() + 1];
        if pc == b'*' {
            next[0] = m[0];
            for j in 1..=n.len() {
                next[j] = m[j] || next[j - 1];
            }
        } else {
            for j in 1..=n.len() {
                next[j] = m[j - 1] && (pc == b'?' || pc.eq_ignore_ascii_case(&n[j - 1]));
            }
        }
        m = next;
    }
    m[n.len()]
}

/// A host pattern or name from a small alphabet, so that matches happen.
fn glob_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["a", "A", "b", ".", "*", "?", "é", "\0", "**"]),
        0..max,
    )
    .prop_map(|v| v.concat())
}

/// One `ssh -G` output line: a key we read (or not) and a value.
fn ssh_g_line() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "host",
        "hostname",
        "user",
        "port",
        "identityfile",
        "identitiesonly",
        "identityagent",
        "userknownhostsfile",
        "globalknownhostsfile",
        "stricthostkeychecking",
        "serveraliveinterval",
        "serveralivecountmax",
        "connecttimeout",
        "proxyjump",
        "localforward",
        "remoteforward",
        "proxycommand",
        "dynamicforward",
        "IdentityFile",
        "",
    ]);
    let value = prop_oneof![
        prop::sample::select(vec![
            "",
            " ",
            "none",
            "yes",
            "no",
            "ask",
            "accept-new",
            "0",
            "65535",
            "65536",
            "18446744073709551616",
            "-1",
            "%",
            "%%",
            "%d/%r/%h/%p/%u/%i/%l/%L/%n/%x",
            "~",
            "~/k",
            "~nobody/k",
            "[socks]:0",
            "8080 [localhost]:80",
            "[::1]:1 [::1]:2",
            "[",
            "[]:",
            "a:b:c:d:e",
            "/tmp/s.sock /tmp/r.sock",
            "ssh://u@h:22/,j2",
        ])
        .prop_map(str::to_owned),
        nasty_text(16),
    ];
    (key, value).prop_map(|(k, v)| format!("{k} {v}"))
}

proptest! {
    #![proptest_config(config())]

    /// Forward specs: no panic, bounded, errors name the spec; a spec that
    /// parses prints in a form that parses back to the same spec.
    #[test]
    fn fuzz_forward_spec(kind in kind(), s in forward_text()) {
        if let Ok(spec) = parse_forward(kind, &s) {
            let shown = spec.to_string();
            let body = shown.split_once(' ').map_or("", |(_, b)| b);
            prop_assert_eq!(parse_forward(kind, body), Ok(spec));
        }
    }

    /// Destinations: no panic, bounded, errors are messages; a destination
    /// that parses prints as one that parses back to itself, and names no
    /// host or user that OpenSSH would refuse (whitespace, control
    /// characters: they would break the known_hosts line we record).
    #[test]
    fn fuzz_destination(s in destination_text()) {
        if let Ok(d) = parse_destination(&s) {
            let bad = |t: &str| t.chars().any(|c| c.is_whitespace() || c.is_control());
            prop_assert!(!bad(&d.host), "host {:?} from {:?}", d.host, s);
            prop_assert!(!d.user.as_deref().is_some_and(bad), "user {:?} from {:?}", d.user, s);
            prop_assert_eq!(parse_destination(&d.to_string()), Ok(d));
        }
    }

    /// Host globs: bounded, and the same answer as the reference matcher.
    #[test]
    fn fuzz_glob(pat in glob_text(24), name in glob_text(24)) {
        let (p, n) = (pat.clone(), name.clone());
        let got = bounded("glob", move || glob(&p, &n));
        prop_assert_eq!(got, glob_reference(&pat, &name), "glob({:?}, {:?})", pat, name);
    }

    /// Host globs on long arbitrary input: bounded (linear-ish) time.
    #[test]
    fn fuzz_glob_long(pat in nasty_text(256), name in nasty_text(256)) {
        bounded("glob", move || glob(&pat, &name));
    }

    /// `ssh -G` output: no panic, bounded, on likely lines and on anything;
    /// the forwards it yields reach ForwardSpec::parse without a panic.
    #[test]
    fn fuzz_parse_ssh_g(
        lines in prop::collection::vec(ssh_g_line(), 0..24),
        junk in nasty_text(64),
        eol in prop::sample::select(vec!["\n", "\r\n", "\r", "\0"]),
    ) {
        let text = format!("{}{eol}{junk}", lines.join(eol));
        let cfg = bounded("parse_ssh_g", move || parse_ssh_g(&text));
        for f in &cfg.local_forwards {
            let _ = parse_forward(Kind::Local, f);
        }
        for f in &cfg.remote_forwards {
            let _ = parse_forward(Kind::Remote, f);
        }
        for hop in &cfg.proxy_jump {
            let _ = parse_destination(hop);
        }
    }
}

/// Hand-picked inputs that break naive parsers.
fn nasty_seeds() -> Vec<String> {
    vec![
        String::new(),
        "\0".repeat(10_000),
        "a".repeat(1 << 18),
        ":".repeat(100_000),
        "[".repeat(100_000),
        "]".repeat(100_000),
        format!("{}{}", "[".repeat(50_000), "]".repeat(50_000)),
        "@".repeat(100_000),
        format!("{}host:22", "u@".repeat(50_000)),
        "99999999999999999999999999999999:h:1".into(),
        "1:h:340282366920938463463374607431768211456".into(),
        "-0:h:1".into(),
        "+22:h:1".into(),
        "0x16:h:1".into(),
        "h:\u{663}\u{662}".into(), // Arabic-Indic digits
        "[::1]:22:[::1]".into(),
        "[::1]]:22".into(),
        "[[::1]:22".into(),
        "\u{feff}host:22".into(),
        "host:22\n* ssh-ed25519 AAAA".into(),
        "*a*a*a*a*a*a*a*a*b".into(),
    ]
}

#[test]
fn nasty_seeds_forward_spec() {
    for s in nasty_seeds() {
        for kind in [Kind::Local, Kind::Remote] {
            let _ = parse_forward(kind, &s);
        }
    }
}

#[test]
fn nasty_seeds_destination() {
    for s in nasty_seeds() {
        let _ = parse_destination(&s);
    }
}

#[test]
fn nasty_seeds_ssh_g() {
    for s in nasty_seeds() {
        let text = format!("identityfile {s}\nlocalforward {s} {s}\nproxyjump {s}\n{s}\n");
        bounded("parse_ssh_g", move || parse_ssh_g(&text));
    }
    // Every expanding token, many times: output grows linearly, no more.
    let text = format!("identityfile {}\n", "%d%h%l%L%u%i%r%n%p".repeat(5_000));
    bounded("parse_ssh_g", move || parse_ssh_g(&text));
}

/// Patterns with many stars against long names: a backtracking matcher
/// takes exponential time here; ours must answer at once.
#[test]
fn nasty_seeds_glob() {
    let long_a = "a".repeat(10_000);
    let cases = [
        ("*a*a*a*a*a*a*a*a*b".to_owned(), long_a.clone()),
        ("*a".repeat(1_000) + "b", long_a.clone()),
        ("*?".repeat(1_000) + "b", long_a.clone()),
        ("*".repeat(100_000), long_a.clone()),
        ("?".repeat(10_001), long_a.clone()),
        ("*a*a*a*a*a*a*a*a*b".to_owned(), "\0".repeat(10_000)),
    ];
    for (pat, name) in cases {
        let (p, n) = (pat.clone(), name.clone());
        let got = bounded("glob", move || glob(&p, &n));
        if pat.len() < 2_000 {
            assert_eq!(got, glob_reference(&pat, &name), "{pat:.40}");
        }
    }
}

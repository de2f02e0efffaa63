//! Unit tests of the parent module (kept apart to keep the module short).

use super::*;
use std::time::Duration;

use crate::config::spec::{ForwardSpec, Kind};

/// Writes `text` to a temp file and loads it explicitly.
fn load_text(text: &str) -> (tempfile::TempDir, Result<ConfigFile, ProfileError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let r = load(&path, true);
    (dir, r)
}

/// Asserts that loading `text` fails naming `line`, and every one of `parts`.
fn expect_err(text: &str, line: usize, parts: &[&str]) -> String {
    let (dir, r) = load_text(text);
    let e = r.expect_err("should fail").to_string();
    let file = display_path(&dir.path().join("config.toml"));
    assert!(
        e.starts_with(&format!("{file}:{line}:")),
        "expected {file}:{line}: in {e}"
    );
    for p in parts {
        assert!(e.contains(p), "expected '{p}' in {e}");
    }
    e
}

const GOOD: &str = r#"
# Two profiles.
[profile.lab]
destination = "alice@lab.example:2200"
jump = "gw.example,bob@bastion:2201"
listen = "127.0.0.1:2300"
identity = ["~/.ssh/lab", "/etc/keys/lab"]
accept_new = true
local_forwards = ["8080:localhost:80"]
remote_forwards = [
"2222:localhost:22",
"0:/tmp/x.sock",
]
keepalive = 10
max_upstreams = 5
max_backoff = 2.5
connect_timeout = 7
on_event = "logger sshshim"
metrics = "127.0.0.1:9100"
mcp_exec = true

[profile.prod]
destination = "[2001:db8::1]"
port = 22
user = "deploy"
known_hosts = "/etc/ssh/kh"
allow_non_loopback = false
authorized_keys = "/etc/ak"
host_key = "/etc/hk"
max_backoff = 60
"#;

#[test]
fn good_file() {
    let (_d, r) = load_text(GOOD);
    let cf = r.unwrap();
    assert_eq!(cf.profiles.len(), 2);
    let lab = cf.get("lab").unwrap();
    assert_eq!(lab.destination.as_deref(), Some("alice@lab.example:2200"));
    assert_eq!(lab.listen, Some("127.0.0.1:2300".parse().unwrap()));
    assert_eq!(lab.identity.len(), 2);
    assert_eq!(lab.identity[1], PathBuf::from("/etc/keys/lab"));
    if let Some(home) = home_dir() {
        assert_eq!(lab.identity[0], home.join(".ssh/lab"));
    }
    assert_eq!(lab.accept_new, Some(true));
    assert_eq!(lab.local_forwards.len(), 1);
    assert_eq!(lab.remote_forwards.len(), 2);
    assert_eq!(lab.remote_forwards[0].kind, Kind::Remote);
    assert_eq!(lab.keepalive, Some(10));
    assert_eq!(lab.max_upstreams, Some(5));
    assert_eq!(lab.jump.as_deref(), Some("gw.example,bob@bastion:2201"));
    assert_eq!(lab.max_backoff, Some(Duration::from_millis(2500)));
    assert_eq!(lab.connect_timeout, Some(7));
    assert_eq!(lab.on_event.as_deref(), Some("logger sshshim"));
    assert_eq!(lab.metrics, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(lab.mcp_exec, Some(true));
    let prod = cf.get("prod").unwrap();
    assert_eq!(prod.mcp_exec, None);
    assert_eq!(prod.port, Some(22));
    assert_eq!(prod.user.as_deref(), Some("deploy"));
    assert_eq!(prod.listen, None);
    assert_eq!(prod.allow_non_loopback, Some(false));
    assert_eq!(prod.max_backoff, Some(Duration::from_secs(60)));
    assert_eq!(prod.host_key, Some(PathBuf::from("/etc/hk")));
    let e = cf.get("nope").unwrap_err().to_string();
    assert!(e.contains("lab, prod"), "{e}");
}

#[test]
fn missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let cf = load(&path, false).unwrap();
    assert!(cf.profiles.is_empty());
    let e = load(&path, true).unwrap_err().to_string();
    assert!(e.contains("absent.toml"), "{e}");
    assert!(default_path().ends_with("sshshim/config.toml"));
}

#[test]
fn syntax_error() {
    let e = expect_err(
        "[profile.a]\ndestination = \"h\"\nport = = 3\n",
        3,
        &["TOML syntax error"],
    );
    // file:line:column
    assert!(e.contains(":3:8:"), "{e}");
}

#[test]
fn unknown_keys() {
    expect_err(
        "[profile.a]\ndestination = \"h\"\n\nlistne = \"127.0.0.1:1\"\n",
        4,
        &[
            "profile 'a'",
            "unknown key 'listne'",
            "did you mean 'listen'",
        ],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\naccept-new = true\n",
        3,
        &["unknown key 'accept-new'", "did you mean 'accept_new'"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\nzzzzzzzz = 1\n",
        3,
        &["unknown key 'zzzzzzzz'", "known keys"],
    );
    expect_err("title = 1\n", 1, &["unknown top-level key 'title'"]);
}

/// Found by fuzzing: a 100,000-character key took seconds, all spent
/// on "did you mean" against every known key.
#[test]
fn huge_unknown_key_is_quick() {
    let started = std::time::Instant::now();
    let e = unknown_key(&"x".repeat(100_000));
    assert!(e.contains("known keys"), "{e:.80}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(unknown_key("listne").contains("did you mean 'listen'"));
    assert!(unknown_key("destinations").contains("did you mean 'destination'"));
}

#[test]
fn wrong_types() {
    expect_err(
        "[profile.a]\ndestination = \"h\"\nport = \"22\"\n",
        3,
        &["profile 'a'", "key 'port' must be an integer 1-65535"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\nport = 70000\n",
        3,
        &["key 'port'", "70000"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\naccept_new = \"yes\"\n",
        3,
        &["key 'accept_new' must be true or false"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\nkeepalive = 0\n",
        3,
        &["key 'keepalive'"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\nmax_backoff = -1.0\n",
        3,
        &["key 'max_backoff'", "> 0"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\nlisten = \"localhost\"\n",
        3,
        &["key 'listen'", "ADDR:PORT"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\nidentity = [\"a\", 3]\n",
        3,
        &["key 'identity'", "item 2 is a integer"],
    );
    expect_err(
        "[profile.a]\ndestination = \"bob@\"\n",
        2,
        &["key 'destination'", "invalid destination"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\njump = \"gw,bob@\"\n",
        3,
        &["key 'jump': jump host 'bob@'"],
    );
    expect_err(
        "[profile.a]\ndestination = \"h\"\nmax_upstreams = 0\n",
        3,
        &["key 'max_upstreams' must be an integer 1-64, not 0"],
    );
    expect_err("profile = 3\n", 1, &["'profile' must hold"]);
    expect_err("[profile]\na = 3\n", 2, &["profile 'a' must be a table"]);
}

#[test]
fn bad_forward_spec() {
    let e = expect_err(
        "[profile.a]\ndestination = \"h\"\nremote_forwards = [\n  \"1:h:2\",\n  \"2222:localhost\",\n]\n",
        5,
        &["profile 'a', key 'remote_forwards': invalid forward -R '2222:localhost'"],
    );
    assert!(!e.contains("key 'remote_forwards' :"), "{e}");
    expect_err(
        "[profile.b]\ndestination = \"h\"\nlocal_forwards = [\"0:h:22\"]\n",
        3,
        &["profile 'b', key 'local_forwards'", "-L"],
    );
}

/// A name that could break out of an ssh_config Host line or a unit file
/// is refused at load, escaped in the message, with what to do.
#[test]
fn unsafe_names() {
    let e = expect_err(
        "[profile.ok]\ndestination = \"h\"\n\n[profile.\"x\\nProxyCommand touch /tmp/p\"]\ndestination = \"h\"\n",
        4,
        &[
            "profile name \"x\\nProxyCommand touch /tmp/p\"",
            "may only use letters",
            "rename it",
        ],
    );
    assert!(!e.contains('\n'), "{e}");
    expect_err(
        "[profile.\"a b\"]\ndestination = \"h\"\n",
        1,
        &["profile name \"a b\""],
    );
}

#[test]
fn missing_destination() {
    expect_err(
        "[profile.a]\ndestination = \"h\"\n\n[profile.lab]\nport = 22\n",
        4,
        &["profile 'lab'", "key 'destination'", "missing"],
    );
}

#[test]
fn precedence() {
    let flags = Profile {
        port: Some(2200),
        local_forwards: vec![ForwardSpec::parse(Kind::Local, "1:h:2").unwrap()],
        ..Default::default()
    };
    let file = Profile {
        destination: Some("host".into()),
        port: Some(22),
        keepalive: Some(5),
        local_forwards: vec![ForwardSpec::parse(Kind::Local, "3:h:4").unwrap()],
        remote_forwards: vec![ForwardSpec::parse(Kind::Remote, "5:h:6").unwrap()],
        ..Default::default()
    };
    let env = Profile {
        keepalive: Some(99),
        user: Some("envuser".into()),
        ..Default::default()
    };
    let p = flags.clone().or(file.clone()).or(env);
    assert_eq!(p.port, Some(2200));
    assert_eq!(p.destination.as_deref(), Some("host"));
    assert_eq!(p.keepalive, Some(5));
    assert_eq!(p.user.as_deref(), Some("envuser"));
    assert_eq!(p.local_forwards, flags.local_forwards);
    assert_eq!(p.remote_forwards, file.remote_forwards);
    assert_eq!(Profile::default().or(file.clone()), file);
}

#[test]
fn env_lookup() {
    let vars: BTreeMap<&str, &str> = [
        ("SSHSHIM_KEEPALIVE", "10"),
        ("SSHSHIM_LISTEN", "127.0.0.1:2300"),
        ("SSHSHIM_ACCEPT_NEW", "yes"),
        ("SSHSHIM_ALLOW_NON_LOOPBACK", "0"),
        ("SSHSHIM_REMOTE_FORWARDS", "2222:localhost:22, 0:/tmp/s"),
        ("SSHSHIM_MAX_BACKOFF", "0.5"),
        ("SSHSHIM_USER", ""),
        ("SSHSHIM_MAX_UPSTREAMS", "2"),
    ]
    .into();
    let get = |n: &str| vars.get(n).map(OsString::from);
    let p = from_vars(get).unwrap();
    assert_eq!(p.keepalive, Some(10));
    assert_eq!(p.listen, Some("127.0.0.1:2300".parse().unwrap()));
    assert_eq!(p.accept_new, Some(true));
    assert_eq!(p.allow_non_loopback, Some(false));
    assert_eq!(p.remote_forwards.len(), 2);
    assert_eq!(p.max_backoff, Some(Duration::from_millis(500)));
    assert_eq!(p.user, None);
    assert_eq!(p.max_upstreams, Some(2));

    let bad = |name: &'static str, val: &'static str| {
        from_vars(move |n: &str| (n == name).then(|| OsString::from(val)))
            .unwrap_err()
            .to_string()
    };
    let e = bad("SSHSHIM_PORT", "abc");
    assert!(e.contains("SSHSHIM_PORT") && e.contains("integer"), "{e}");
    let e = bad("SSHSHIM_ACCEPT_NEW", "maybe");
    assert!(e.contains("SSHSHIM_ACCEPT_NEW"), "{e}");
    let e = bad("SSHSHIM_LOCAL_FORWARDS", "8080:x");
    assert!(
        e.contains("SSHSHIM_LOCAL_FORWARDS") && e.contains("-L"),
        "{e}"
    );
}

#[test]
fn process_env() {
    // The only test that touches the process environment; the values
    // are unusual so that a stray outer variable cannot match them.
    let var = "SSHSHIM_CONNECT_TIMEOUT";
    let old = std::env::var_os(var);
    // SAFETY: no other test in this module reads or writes this variable.
    unsafe { std::env::set_var(var, "4321") };
    let r = from_env();
    match old {
        // SAFETY: as above.
        Some(v) => unsafe { std::env::set_var(var, v) },
        None => unsafe { std::env::remove_var(var) },
    }
    assert_eq!(r.unwrap().connect_timeout, Some(4321));
}
mod fuzz {
    //! Properties of the profile loader: on any text and on TOML of
    //! the right shape with wrong parts, no panic, bounded time, and
    //! every error names the file and a line of it.

    use super::*;
    use crate::fuzzing::{bounded, config, is_message, nasty_text};
    use proptest::prelude::*;

    /// `parse` within the time bound; an error must be a message that
    /// starts with the file name and a line number within the text.
    fn checked_parse(text: String) -> Result<BTreeMap<String, Profile>, String> {
        let lines = text.lines().count().max(1);
        let t = text.clone();
        let r = bounded("profile::parse", move || parse("fuzz.toml", &t));
        if let Err(e) = &r {
            is_message("profile::parse", e);
            let line = e
                .strip_prefix("fuzz.toml:")
                .and_then(|rest| rest.split(':').next())
                .and_then(|l| l.parse::<usize>().ok());
            assert!(
                line.is_some_and(|l| (1..=lines + 1).contains(&l)),
                "error without file:line in range 1..={}: {e}\n--- text:\n{text}",
                lines + 1
            );
        }
        r
    }

    /// `s` as a TOML basic string (Rust's `{:?}` escapes differ).
    fn toml_str(s: &str) -> String {
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// A TOML integer literal for `n` in one of TOML's spellings.
    fn int_literal() -> impl Strategy<Value = (i128, String)> {
        let n = prop_oneof![
            -2i128..70_000,
            Just(i64::MAX as i128),
            Just(i64::MIN as i128),
            Just(i64::MAX as i128 + 1),
            Just(u64::MAX as i128 + 1),
        ];
        (n, 0..6u8).prop_map(|(n, form)| {
            let lit = match form {
                1 if n >= 0 => format!("0x{n:X}"),
                2 if n >= 0 => format!("0o{n:o}"),
                3 if n >= 0 => format!("0b{n:b}"),
                4 if n >= 1000 => {
                    let d = n.to_string();
                    let (a, b) = d.split_at(d.len() - 3);
                    format!("{a}_{b}")
                }
                5 if n >= 0 => format!("+{n}"),
                _ => n.to_string(),
            };
            (n, lit)
        })
    }

    /// Any TOML value, as text, biased to what the keys get wrong.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            int_literal().prop_map(|(_, l)| l),
            prop::sample::select(vec![
                "0.0",
                "-0.0",
                "1e400",
                "-1e400",
                "inf",
                "+inf",
                "-inf",
                "nan",
                "-nan",
                "1_000.5",
                "5e-324",
                "1e-320",
                "18446744073709551616.0",
                "true",
                "false",
                "1979-05-27T07:32:00Z",
                "07:32:00",
                "1979-05-27",
                "{}",
                "{ a = 1 }",
                "[]",
                "[[]]",
                "[1, \"a\"]",
                "\"\"",
                "''",
                "\"\\u0000\"",
                "\"h\"",
                "\"u@h:22\"",
                "\"127.0.0.1:2222\"",
                "\"[::1]:0\"",
                "\"8080:localhost:80\"",
                "\"~/.ssh/id\"",
                "\"~nobody/x\"",
                "'''\nmulti\n'''",
                "\"\\ud800\"",
            ])
            .prop_map(str::to_owned),
            nasty_text(12).prop_map(|s| toml_str(&s)),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                prop::collection::vec(inner, 0..3).prop_map(|v| {
                    let kv: Vec<String> = v
                        .iter()
                        .enumerate()
                        .map(|(i, x)| format!("k{i} = {x}"))
                        .collect();
                    format!("{{ {} }}", kv.join(", "))
                }),
            ]
        })
    }

    /// A key: one we know, a near miss, or anything.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(keys().to_vec()).prop_map(str::to_owned),
            1 => prop::sample::select(vec![
                "listne", "accept-new", "Port", "destination.x", "\"destination\"",
                "'port'", "a.b.c", "\"\"",
            ])
            .prop_map(str::to_owned),
            1 => nasty_text(6).prop_map(|s| toml_str(&s)),
        ]
    }

    /// A table header: a profile, the profile table, or something else.
    fn header() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z]{1,6}".prop_map(|n| format!("[profile.{n}]")),
            1 => prop::sample::select(vec![
                "[profile]", "[[profile]]", "[[profile.a]]", "[profile.a.b]", "[other]",
                "[profile.\"\"]", "[profile.\"a.b\"]", "", "[profile.a]\n[profile.a]",
            ])
            .prop_map(str::to_owned),
            1 => nasty_text(6).prop_map(|s| format!("[profile.{}]", toml_str(&s))),
        ]
    }

    /// A document: tables of `key = value` lines, often with a
    /// destination so that other keys get checked.
    fn document() -> impl Strategy<Value = String> {
        let table = (
            header(),
            any::<bool>(),
            // Keys unique within a table: a duplicate is only a syntax error.
            prop::collection::btree_map(key(), value(), 0..6),
        )
            .prop_map(|(h, dest, kvs)| {
                let mut t = format!("{h}\n");
                if dest {
                    t.push_str("destination = \"h\"\n");
                }
                for (k, v) in kvs {
                    t.push_str(&format!("{k} = {v}\n"));
                }
                t
            });
        prop::collection::vec(table, 0..4).prop_map(|t| t.concat())
    }

    proptest! {
        #![proptest_config(config())]

        /// Any text at all.
        #[test]
        fn fuzz_profile_any_text(text in nasty_text(200)) {
            let _ = checked_parse(text);
        }

        /// TOML of the right shape with wrong keys, types and values.
        #[test]
        fn fuzz_profile_structured(doc in document()) {
            let _ = checked_parse(doc);
        }

        /// `SSHSHIM_*` variables with any values: errors name the variable.
        #[test]
        fn fuzz_profile_env(
            vars in prop::collection::btree_map(prop::sample::select(keys().to_vec()), nasty_text(16), 0..8),
        ) {
            let r = bounded("profile::from_vars", move || {
                from_vars(|name| {
                    vars.iter()
                        .find(|(k, _)| name == format!("SSHSHIM_{}", k.to_ascii_uppercase()))
                        .map(|(_, v)| v.into())
                })
                .map_err(|e| e.to_string())
            });
            if let Err(e) = r {
                is_message("profile::from_vars", &e);
                prop_assert!(e.contains("environment variable SSHSHIM_"), "{}", e);
            }
        }

        /// Integers in every TOML spelling: accepted exactly when in
        /// range, with the value written.
        #[test]
        fn fuzz_profile_integers((n, lit) in int_literal()) {
            let text = format!("[profile.p]\ndestination = \"h\"\nport = {lit}\nkeepalive = {lit}\n");
            let r = checked_parse(text);
            if (1..=65535).contains(&n) {
                let p = r.map_err(TestCaseError::fail)?;
                prop_assert_eq!(p["p"].port, Some(n as u16));
                prop_assert_eq!(p["p"].keepalive, Some(n as u64));
            } else {
                prop_assert!(r.is_err(), "{} accepted", lit);
            }
        }
    }

    /// Hand-picked documents that break naive loaders.
    #[test]
    fn nasty_profile_seeds() {
        let seeds = [
            "[".repeat(10_000),
            "a = ".to_owned() + &"[".repeat(10_000),
            "a = ".to_owned() + &"{ b = ".repeat(5_000),
            format!(
                "[profile.{}]\ndestination = \"h\"\n",
                "a.".repeat(5_000) + "a"
            ),
            format!(
                "[profile.p]\ndestination = \"{}\"\n",
                "\\u0000".repeat(10_000)
            ),
            format!(
                "[profile.p]\ndestination = \"h\"\nport = {}\n",
                "9".repeat(10_000)
            ),
            format!(
                "[profile.p]\ndestination = \"h\"\nmax_backoff = 1{}\n",
                "0".repeat(400)
            ),
            format!(
                "[profile.p]\ndestination = \"h\"\nmax_backoff = 1e{}\n",
                "9".repeat(100)
            ),
            format!(
                "[profile.p]\ndestination = \"h\"\nlocal_forwards = [{}]\n",
                "\"1:h:2\",".repeat(10_000)
            ),
            format!(
                "[profile.p]\ndestination = \"h\"\n{} = 1\n",
                "x".repeat(100_000)
            ),
            format!(
                "[profile.p]\ndestination = \"h\"\n\"{}\" = 1\n",
                "é".repeat(50_000)
            ),
            "\0".repeat(10_000),
            "\u{feff}[profile.p]\ndestination = \"h\"\n".into(),
            "[profile.p]\r\ndestination = \"h\"\r\nport = 0\r\n".into(),
        ];
        for s in seeds {
            let _ = checked_parse(s);
        }
        // TOML's other number spellings reach the keys as numbers.
        let p = checked_parse(
            "[profile.p]\ndestination = \"h\"\nmax_backoff = 1_000.5\nport = 0x16\n".into(),
        )
        .unwrap();
        assert_eq!(p["p"].max_backoff, Some(Duration::from_millis(1_000_500)));
        assert_eq!(p["p"].port, Some(22));
        // Not UTF-8 at all: `load` says so, naming the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, b"[profile.p]\n\xff\xfe = 1\n").unwrap();
        let e = load(&path, true).unwrap_err();
        assert!(matches!(e, ProfileError::Read { .. }), "{e}");
        let e = e.to_string();
        assert!(e.contains("bad.toml") && e.contains("cannot read"), "{e}");
    }
}

#[test]
fn the_mcp_prefix_is_reserved() {
    let w = reserved_name_warning("mcp-prod", false).expect("a warning");
    assert!(w.contains("'mcp-prod'") && w.contains("reserved"), "{w}");
    assert_eq!(reserved_name_warning("mcp-prod", true), None);
    assert_eq!(reserved_name_warning("prod", false), None);
    assert_eq!(reserved_name_warning("prod-mcp-x", false), None);
}

//! Upstream host key verification against OpenSSH known_hosts files.
//!
//! russh ships a known_hosts checker, but it fails on any line it cannot
//! parse (a `@cert-authority` line or an unsupported key type would make
//! every check an error) and does not report the recorded key on a change.
//! This reader handles plain, hashed (`|1|`), `[host]:port`, wildcard and
//! negated patterns and the `@revoked` marker, and skips what it does not know.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};
use russh::keys::{HashAlg, PublicKey};

/// What a known_hosts lookup decided.
#[derive(Debug)]
pub enum HostKeyError {
    /// No file names this host: refused unless the user accepts new keys.
    Unknown {
        /// The host as looked up (`host` or `[host]:port`).
        host: String,
        /// SHA256 fingerprint of the key offered.
        fingerprint: String,
        /// The file `--accept-new` would record the key in.
        file: PathBuf,
    },
    /// A file holds a different key of the same type for this host.
    Changed {
        /// The host as looked up.
        host: String,
        /// Where the recorded key is.
        file: PathBuf,
        /// Line number of the recorded key.
        line: usize,
        /// Fingerprint of the recorded key.
        expected: String,
        /// Fingerprint of the key the server offered.
        offered: String,
    },
    /// The key offered is marked `@revoked`.
    Revoked {
        /// Where the marker is.
        file: PathBuf,
        /// Line number of the marker.
        line: usize,
        /// Fingerprint of the revoked key.
        fingerprint: String,
    },
    /// Recording a new key failed.
    Record(PathBuf, std::io::Error),
}

impl fmt::Display for HostKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKeyError::Unknown {
                host,
                fingerprint,
                file,
            } => write!(
                f,
                "the host key of {host} is not known.\n  \
                 Offered key fingerprint: {fingerprint}\n  \
                 Check this fingerprint with the server's administrator, then run again with\n  \
                 --accept-new to record it in {}",
                file.display()
            ),
            HostKeyError::Changed {
                host,
                file,
                line,
                expected,
                offered,
            } => write!(
                f,
                "WARNING: THE HOST KEY OF {host} HAS CHANGED!\n  \
                 Someone could be eavesdropping on you right now (man-in-the-middle attack),\n  \
                 or the host key has just been replaced.\n  \
                 Recorded key:  {expected} ({}:{line})\n  \
                 Offered key:   {offered}\n  \
                 sshshim refuses to connect. If the change is expected, remove the old key with\n  \
                 ssh-keygen -R '{host}' -f {}",
                file.display(),
                file.display()
            ),
            HostKeyError::Revoked {
                file,
                line,
                fingerprint,
            } => write!(
                f,
                "the host key {fingerprint} is marked @revoked in {}:{line}; refusing to connect",
                file.display()
            ),
            HostKeyError::Record(file, e) => {
                write!(
                    f,
                    "could not record the host key in {}: {e}",
                    file.display()
                )
            }
        }
    }
}

impl std::error::Error for HostKeyError {}

/// Checks an upstream host's key against known_hosts files.
#[derive(Debug, Clone)]
pub struct HostKeyVerifier {
    /// Host name as the user gave it (known_hosts entries are keyed by it).
    pub host: String,
    /// Port, which selects `[host]:port` entries when not 22.
    pub port: u16,
    /// The user's file: read, and written with `accept_new`.
    pub user_file: PathBuf,
    /// System files, read only.
    pub global_files: Vec<PathBuf>,
    /// Record an unknown host's key instead of refusing.
    pub accept_new: bool,
}

/// One key recorded for the host being checked.
struct Recorded {
    file: PathBuf,
    line: usize,
    revoked: bool,
    key: PublicKey,
}

/// SHA256 fingerprint in OpenSSH's `SHA256:...` form.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

impl HostKeyVerifier {
    /// The name known_hosts entries use for this host.
    fn lookup_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    /// Accepts `key` if a known_hosts file vouches for it, records it when
    /// the host is unknown and `accept_new` is set, and refuses otherwise.
    pub fn verify(&self, key: &PublicKey) -> Result<(), HostKeyError> {
        let name = self.lookup_name();
        let mut recorded = Vec::new();
        for file in std::iter::once(&self.user_file).chain(&self.global_files) {
            read_entries(file, &name, &mut recorded);
        }
        let offered = fingerprint(key);
        if let Some(r) = recorded.iter().find(|r| r.revoked && key_eq(&r.key, key)) {
            return Err(HostKeyError::Revoked {
                file: r.file.clone(),
                line: r.line,
                fingerprint: offered,
            });
        }
        let plain: Vec<&Recorded> = recorded.iter().filter(|r| !r.revoked).collect();
        if plain.iter().any(|r| key_eq(&r.key, key)) {
            return Ok(());
        }
        // Any recorded key for this host that is not the offered one means
        // the host's identity is not what we knew: refuse, never re-learn.
        // Report the same-type key when there is one, as it is the likely
        // predecessor.
        if let Some(r) = plain
            .iter()
            .find(|r| r.key.algorithm() == key.algorithm())
            .or(plain.first())
        {
            return Err(HostKeyError::Changed {
                host: name,
                file: r.file.clone(),
                line: r.line,
                expected: fingerprint(&r.key),
                offered,
            });
        }
        if self.accept_new {
            self.record(&name, key)
                .map_err(|e| HostKeyError::Record(self.user_file.clone(), e))?;
            tracing::warn!(
                "recorded new host key {offered} for {name} in {}",
                self.user_file.display()
            );
            return Ok(());
        }
        Err(HostKeyError::Unknown {
            host: name,
            fingerprint: offered,
            file: self.user_file.clone(),
        })
    }

    /// Appends `name key` to the user's file, creating it 0600 in a 0700 dir.
    fn record(&self, name: &str, key: &PublicKey) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = self.user_file.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            crate::paths::create_private_dir(dir)?;
        }
        let existing = std::fs::read(&self.user_file).unwrap_or_default();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.user_file)?;
        let key = key.to_openssh().map_err(std::io::Error::other)?;
        // One write of one whole line: with O_APPEND, two profiles recording
        // at once cannot interleave their lines.
        let sep = if existing.last().is_some_and(|b| *b != b'\n') {
            "\n"
        } else {
            ""
        };
        f.write_all(format!("{sep}{name} {key}\n").as_bytes())
    }
}

/// Compares key material only (comments differ between files).
fn key_eq(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// Collects the entries of `file` that match `name`; unreadable files and
/// lines are skipped, as OpenSSH does.
fn read_entries(file: &Path, name: &str, out: &mut Vec<Recorded>) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    entries_in(&text, file, name, out);
}

/// Collects the entries of known_hosts `text` (read from `file`) that match
/// `name`; lines it cannot use are skipped.
fn entries_in(text: &str, file: &Path, name: &str, out: &mut Vec<Recorded>) {
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next().unwrap_or_default();
        let mut revoked = false;
        if let Some(marker) = first.strip_prefix('@') {
            match marker {
                "revoked" => revoked = true,
                // @cert-authority and anything newer: not a host key.
                _ => continue,
            }
            first = fields.next().unwrap_or_default();
        }
        let (Some(_kind), Some(b64)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !revoked && !patterns_match(first, name) {
            continue;
        }
        if let Ok(key) = russh::keys::parse_public_key_base64(b64) {
            out.push(Recorded {
                file: file.to_path_buf(),
                line: i + 1,
                revoked,
                key,
            });
        }
    }
}

/// OpenSSH host pattern list semantics: any negated match vetoes, else any
/// positive match (plain, hashed or glob) accepts.
fn patterns_match(list: &str, name: &str) -> bool {
    let mut matched = false;
    for pat in list.split(',') {
        if let Some(neg) = pat.strip_prefix('!') {
            if glob(neg, name) {
                return false;
            }
        } else if let Some(hashed) = pat.strip_prefix("|1|") {
            matched |= hashed_match(hashed, name);
        } else {
            matched |= glob(pat, name);
        }
    }
    matched
}

/// Matches `|1|salt|hash` (the `|1|` already removed): HMAC-SHA1 of the name.
fn hashed_match(entry: &str, name: &str) -> bool {
    let b64 = data_encoding::BASE64;
    let Some((salt, hash)) = entry.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt.as_bytes()), b64.decode(hash.as_bytes())) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// Shell-style glob with `*` and `?`, ASCII case-insensitive as OpenSSH
/// matches host names. Iterative with one backtrack point, so a pattern
/// such as `*a*a*a*a*a*a*a*a*b` costs O(pattern x name), not exponential time.
pub fn glob(pat: &str, name: &str) -> bool {
    let (p, n) = (pat.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // The last `*` seen and the name position it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        // `*` first: it is a wildcard even where the name holds a literal `*`.
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && (p[pi] == b'?' || p[pi].eq_ignore_ascii_case(&n[ni])) {
            pi += 1;
            ni += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIHz2V0FmQkFUM8WwiDGx1Co4aa2wuqmz8rn4UcTwmPxQ";

    fn key() -> PublicKey {
        russh::keys::parse_public_key_base64(KEY_A).unwrap()
    }

    fn other_key() -> PublicKey {
        let k = russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
            .unwrap();
        k.public_key().clone()
    }

    fn verifier(dir: &Path, port: u16, accept_new: bool) -> HostKeyVerifier {
        HostKeyVerifier {
            host: "example.org".into(),
            port,
            user_file: dir.join("known_hosts"),
            global_files: vec![dir.join("global")],
            accept_new,
        }
    }

    #[test]
    fn plain_hashed_port_and_global_entries() {
        let dir = tempfile::tempdir().unwrap();
        let v = verifier(dir.path(), 22, false);
        std::fs::write(
            dir.path().join("known_hosts"),
            format!("# comment\n@cert-authority *.org ssh-ed25519 {KEY_A}\nexample.org ssh-ed25519 {KEY_A}\n"),
        )
        .unwrap();
        v.verify(&key()).unwrap();

        // Hashed entry made by `ssh-keygen -H` for "[example.org]:2200".
        let salt = b"0123456789abcdefghij";
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(b"[example.org]:2200");
        let hash = mac.finalize().into_bytes();
        let b64 = data_encoding::BASE64;
        std::fs::write(
            dir.path().join("global"),
            format!(
                "|1|{}|{} ssh-ed25519 {KEY_A}\n",
                b64.encode(salt),
                b64.encode(&hash)
            ),
        )
        .unwrap();
        verifier(dir.path(), 2200, false).verify(&key()).unwrap();
        // The same key on yet another port is unknown.
        assert!(matches!(
            verifier(dir.path(), 2201, false).verify(&key()),
            Err(HostKeyError::Unknown { .. })
        ));
    }

    #[test]
    fn changed_key_is_refused_even_with_accept_new() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("known_hosts"),
            format!("other.org,example.org ssh-ed25519 {KEY_A}\n"),
        )
        .unwrap();
        let err = verifier(dir.path(), 22, true)
            .verify(&other_key())
            .unwrap_err();
        let HostKeyError::Changed { line, expected, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(*line, 1);
        assert_eq!(expected, &fingerprint(&key()));
        assert!(err.to_string().contains("HAS CHANGED"));
    }

    #[test]
    fn unknown_host_is_refused_then_recorded_with_accept_new() {
        let dir = tempfile::tempdir().unwrap();
        let err = verifier(dir.path(), 2222, false)
            .verify(&key())
            .unwrap_err();
        assert!(err.to_string().contains("--accept-new"), "{err}");
        assert!(err.to_string().contains(&fingerprint(&key())));
        verifier(dir.path(), 2222, true).verify(&key()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
        assert!(
            text.starts_with("[example.org]:2222 ssh-ed25519 "),
            "{text}"
        );
        verifier(dir.path(), 2222, false).verify(&key()).unwrap();
    }

    #[test]
    fn negation_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("known_hosts"),
            format!("*.org,!example.org ssh-ed25519 {KEY_A}\n"),
        )
        .unwrap();
        assert!(matches!(
            verifier(dir.path(), 22, false).verify(&key()),
            Err(HostKeyError::Unknown { .. })
        ));
        std::fs::write(
            dir.path().join("known_hosts"),
            format!("example.org ssh-ed25519 {KEY_A}\n@revoked * ssh-ed25519 {KEY_A}\n"),
        )
        .unwrap();
        assert!(matches!(
            verifier(dir.path(), 22, false).verify(&key()),
            Err(HostKeyError::Revoked { line: 2, .. })
        ));
    }

    #[test]
    fn globs_are_linear_and_case_insensitive() {
        assert!(glob("*.lab", "X.LAB"));
        assert!(glob("h?st*", "host-1"));
        assert!(!glob("*.lab", "x.lab.com"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "aXbYbZc"));
        // Found by fuzzing: a `*` in the name was taken as a literal match
        // for the pattern's `*`, which then could not stretch.
        assert!(glob("*", "**"));
        assert!(glob("a*", "a*b"));
        let started = std::time::Instant::now();
        assert!(!glob("*a*a*a*a*a*a*a*a*a*a*a*a*b", &"a".repeat(200)));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    mod fuzz {
        //! Properties of the known_hosts reader: no panic and bounded time
        //! on any text, and junk lines never hide a good entry.

        use super::*;
        use crate::fuzzing::{bounded, config, nasty_text};
        use proptest::prelude::*;

        /// A host name as looked up: plain or `[host]:port`, sometimes odd.
        fn lookup_name() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z0-9.-]{1,20}",
                ("[a-z0-9.-]{1,20}", 1u16..).prop_map(|(h, p)| format!("[{h}]:{p}")),
                nasty_text(8),
            ]
        }

        /// `|1|salt|hash` for `name`, as `ssh-keygen -H` writes it.
        fn hashed(salt: &[u8], name: &str) -> String {
            let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
            mac.update(name.as_bytes());
            let b64 = data_encoding::BASE64;
            format!(
                "|1|{}|{}",
                b64.encode(salt),
                b64.encode(&mac.finalize().into_bytes())
            )
        }

        /// One pattern of a known_hosts line.
        fn pattern() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "*",
                    "?",
                    "!*",
                    "!",
                    "",
                    "|1|",
                    "|1||",
                    "|1|x|y",
                    "|1|====|====",
                    "|1|AAAA|AAAA",
                    "@revoked",
                    "[*]:*",
                    "*a*a*a*a*a*a*a*a*b",
                ])
                .prop_map(str::to_owned),
                "[a-z*?!.]{0,12}",
                (prop::collection::vec(any::<u8>(), 0..40), lookup_name())
                    .prop_map(|(salt, n)| hashed(&salt, &n)),
                nasty_text(6),
            ]
        }

        /// A line in known_hosts shape, with every part sometimes wrong.
        fn line() -> impl Strategy<Value = String> {
            let marker =
                prop::sample::select(vec!["", "@revoked ", "@cert-authority ", "@", "@@ ", "# "]);
            let patterns = prop::collection::vec(pattern(), 0..5).prop_map(|p| p.join(","));
            let kind = prop::sample::select(vec!["ssh-ed25519", "ssh-rsa", "", "x"]);
            let key = prop_oneof![
                Just(KEY_A.to_owned()),
                Just(KEY_A[..40].to_owned()),
                "[A-Za-z0-9+/=]{0,120}",
                nasty_text(8),
            ];
            prop_oneof![
                4 => (marker, patterns, kind, key, nasty_text(4)).prop_map(
                    |(m, p, k, b, c)| format!("{m}{p} {k} {b} {c}")
                ),
                1 => nasty_text(40),
            ]
        }

        /// Entries of `text` for `name`, within the time bound.
        fn entries(text: String, name: String) -> Vec<(usize, bool)> {
            bounded("known_hosts entries", move || {
                let mut out = Vec::new();
                entries_in(&text, Path::new("kh"), &name, &mut out);
                out.iter().map(|r| (r.line, r.revoked)).collect()
            })
        }

        proptest! {
            #![proptest_config(config())]

            /// Any text at all: no panic, bounded, line numbers in range.
            #[test]
            fn fuzz_known_hosts_any_text(text in nasty_text(200), name in lookup_name()) {
                let lines = text.lines().count();
                for (line, _) in entries(text, name) {
                    prop_assert!((1..=lines).contains(&line));
                }
            }

            /// Lines in known_hosts shape around a good entry (plain or
            /// hashed): the good entry is always found.
            #[test]
            fn fuzz_known_hosts_lines(
                before in prop::collection::vec(line(), 0..8),
                after in prop::collection::vec(line(), 0..8),
                name in "[a-z0-9.-]{1,20}",
                port in prop_oneof![Just(22u16), 1u16..],
                salt in prop::collection::vec(any::<u8>(), 1..40),
                hash_it in any::<bool>(),
            ) {
                let name = if port == 22 { name } else { format!("[{name}]:{port}") };
                let pat = if hash_it { hashed(&salt, &name) } else { name.clone() };
                let prefix: String = before.iter().map(|l| format!("{l}\n")).collect();
                let good = prefix.matches('\n').count() + 1;
                let text = format!("{prefix}{pat} ssh-ed25519 {KEY_A}\n{}", after.join("\n"));
                let found = entries(text.clone(), name);
                prop_assert!(found.contains(&(good, false)), "line {} not found in {:?}", good, text);
            }

            /// Pattern lists and hashed entries on their own: bounded.
            #[test]
            fn fuzz_host_patterns(list in prop::collection::vec(pattern(), 0..8), name in lookup_name()) {
                let list = list.join(",");
                let (l, n) = (list.clone(), name.clone());
                bounded("patterns_match", move || patterns_match(&l, &n));
                bounded("hashed_match", move || hashed_match(&list, &name));
            }
        }

        /// Hand-picked lines that break naive readers.
        #[test]
        fn nasty_known_hosts_seeds() {
            let stars = "*a".repeat(2_000) + "b";
            let seeds = [
                "\0".repeat(10_000),
                format!("{} ssh-ed25519 {KEY_A}", ",".repeat(100_000)),
                format!("{stars} ssh-ed25519 {KEY_A}"),
                format!("{} ssh-ed25519 {KEY_A}", vec![stars.as_str(); 50].join(",")),
                format!(
                    "|1|{}|{} ssh-ed25519 {KEY_A}",
                    "A".repeat(100_000),
                    "B".repeat(8)
                ),
                "@revoked".to_owned(),
                "@revoked * ssh-ed25519".to_owned(),
                format!("x ssh-ed25519 {}", "A".repeat(1 << 18)),
                "\n".repeat(100_000),
                "\r".repeat(100_000),
            ];
            for text in seeds {
                entries(text.clone(), "a".repeat(4_000));
                entries(text, "[example.org]:2222".into());
            }
        }
    }
}

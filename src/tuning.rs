//! Measured knobs: channel windows and packet sizes, and the algorithm
//! lists of both legs. A ground module: it imports nothing from the crate.
//! The numbers come from runs of `scripts/bench.sh` on a 2-core machine;
//! README's performance section has the tables.

use std::borrow::Cow;
use std::time::Duration;

use russh::{cipher, kex, mac};

/// SSH channel window on both legs. 2 MiB matches OpenSSH; a fixed 16 MiB
/// window measured 25-35% slower on loopback.
pub const WINDOW_SIZE: u32 = 2 * 1024 * 1024;

/// Largest upstream window, for long fat paths (sized from the RTT).
pub const MAX_WINDOW_SIZE: u32 = 32 << 20;

/// Largest packet we accept: 64 KiB packets measured 5-10% faster than 32 KiB.
pub const MAX_PACKET: u32 = 65535;

/// Messages russh queues per local endpoint channel (a client's input)
/// before its session loop waits on us.
pub const CHANNEL_BUFFER: usize = 64;

/// Messages russh queues per upstream channel. The bridge drains these
/// queues at once into its spill queues, so depth only holds packets (up to
/// 64 KiB each) in memory while the draining tasks wait for a CPU. With 64,
/// 50 concurrent downloads now and then peaked 10-30 MiB higher (most on a
/// loaded machine); with 4 they stayed within 21 MiB, at the same speed.
pub const UPSTREAM_CHANNEL_BUFFER: usize = 4;

/// Channels the server may have opened towards us (connections to remote
/// forwards, agent requests) and not yet closed, per upstream connection,
/// counting those still being routed: more are refused with "resource
/// shortage", so a hostile or runaway server cannot grow our memory and
/// descriptors without bound. Each open one holds a local socket and a
/// bridge; 1024 is far beyond what a person's forwards carry at once.
pub const MAX_SERVER_CHANNELS: usize = 1024;

/// Least time between the starts of two connect attempts of one upstream:
/// however many clients wait and however often the network changes or a
/// connection drops, the server sees at most about one attempt a second.
pub const RECONNECT_GAP: Duration = Duration::from_secs(1);

/// The first retry after a connection that worked waits a random time up to
/// this (many shims dropped at once by a server restart do not return in
/// one burst).
pub const FIRST_RETRY_JITTER: Duration = Duration::from_millis(250);

/// The wait after the first failed attempt in a row; each further failure
/// doubles it (plus up to as much again of jitter), up to `--max-backoff`.
pub const RETRY_MIN: Duration = Duration::from_secs(1);

/// How long to wait for a keepalive answer right after a network change, at
/// least (with several round trips of the last measured RTT): a path the
/// change broke is noticed within a few of these, not keepalive intervals.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long an extra upstream connection (opened past the server's
/// MaxSessions) may carry no session before it is closed.
pub const EXTRA_IDLE: Duration = Duration::from_secs(30);

/// Default for how long a local reader whose buffer is full may make no
/// progress before its channel is closed (`--stall-limit`).
pub const READER_STALL: Duration = Duration::from_secs(5);

/// Default `--resume-timeout`: how long the server holds a resumable
/// session while sshshim is away (then its command gets SIGHUP, as a lost
/// session's would). Long enough for a laptop's lid or a train tunnel.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether the CPU has the instructions that make AES-GCM cheap.
pub fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Ciphers, fastest first on a CPU with AES instructions (AES-GCM measured
/// 1.7-1.9x ChaCha20's throughput there).
static AES_FIRST: &[cipher::Name] = &[
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::CHACHA20_POLY1305,
    cipher::AES_128_CTR,
    cipher::AES_192_CTR,
    cipher::AES_256_CTR,
];

/// Ciphers, fastest first on a CPU without AES instructions.
static CHACHA_FIRST: &[cipher::Name] = &[
    cipher::CHACHA20_POLY1305,
    cipher::AES_128_GCM,
    cipher::AES_256_GCM,
    cipher::AES_128_CTR,
    cipher::AES_192_CTR,
    cipher::AES_256_CTR,
];

/// The cipher list for this machine, fastest first.
fn ciphers() -> &'static [cipher::Name] {
    if aes_hardware() {
        AES_FIRST
    } else {
        CHACHA_FIRST
    }
}

/// MACs (only used with the CTR ciphers): encrypt-then-MAC first.
static MACS: &[mac::Name] = &[
    mac::HMAC_SHA256_ETM,
    mac::HMAC_SHA512_ETM,
    mac::HMAC_SHA256,
    mac::HMAC_SHA512,
];

/// Key exchanges the endpoint accepts (what a current OpenSSH client may
/// insist on), cheapest first: for each connection the endpoint lists only
/// the first of these that the client offers (see [`endpoint_choice`]).
/// Measured on loopback with OpenSSH 9.2 as the client, which computes
/// P-256 with OpenSSL but curve25519 with portable code: exec through the
/// endpoint took 34 ms with P-256 against 42 ms with curve25519; P-384 and
/// P-521 are slower curves on both sides, and the finite-field groups cost
/// tens of milliseconds (larger groups more). ML-KEM adds a lattice step to
/// curve25519. Post-quantum protection buys nothing on loopback: nobody
/// can record the traffic who could not read the endpoint's memory.
static ENDPOINT_KEX: &[kex::Name] = &[
    kex::ECDH_SHA2_NISTP256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::MLKEM768X25519_SHA256,
    kex::ECDH_SHA2_NISTP384,
    kex::ECDH_SHA2_NISTP521,
    kex::DH_G14_SHA256,
    kex::DH_GEX_SHA256,
    kex::DH_G16_SHA512,
    kex::DH_G18_SHA512,
];

/// Markers the endpoint always lists with its key exchanges: it sends
/// EXT_INFO (server-sig-algs) and does OpenSSH's strict key exchange with
/// clients that ask for them.
static SERVER_MARKERS: &[kex::Name] = &[
    kex::EXTENSION_SUPPORT_AS_SERVER,
    kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// Upstream (client leg) algorithm preferences. As the client we decide:
/// the first of ours the server also has wins, so the fastest go first.
pub fn upstream_algorithms() -> russh::Preferred {
    russh::Preferred {
        cipher: Cow::Borrowed(ciphers()),
        mac: Cow::Borrowed(MACS),
        ..Default::default()
    }
}

/// Local endpoint (server leg) algorithm preferences when the client's
/// offer is not known: everything a current OpenSSH client may insist on
/// (a client restricted to ChaCha20, to curve25519, or hardened the way
/// ssh-audit recommends still connects). The client's order decides among
/// them, so normally [`endpoint_choice`] narrows them per connection.
pub fn endpoint_algorithms() -> russh::Preferred {
    let kex: Vec<kex::Name> = ENDPOINT_KEX.iter().chain(SERVER_MARKERS).copied().collect();
    russh::Preferred {
        kex: Cow::Owned(kex),
        cipher: Cow::Borrowed(ciphers()),
        mac: Cow::Borrowed(MACS),
        ..Default::default()
    }
}

/// The endpoint's preferences for one client, from the key exchanges and
/// (client-to-server) ciphers its KEXINIT offers: only the cheapest of each
/// that the client offers, so the negotiation (which follows the client's
/// order among what the server lists) cannot land on a slower one. Never
/// one the client did not offer; for a kind where the client offers none
/// of ours, everything we have, so the failure names our whole list.
pub fn endpoint_choice(client_kex: &[&str], client_ciphers: &[&str]) -> russh::Preferred {
    let mut p = endpoint_algorithms();
    let offered = |name: &str, list: &[&str]| list.contains(&name);
    if let Some(k) = ENDPOINT_KEX
        .iter()
        .find(|k| offered(k.as_ref(), client_kex))
    {
        let kex: Vec<kex::Name> = std::iter::once(*k)
            .chain(SERVER_MARKERS.iter().copied())
            .collect();
        p.kex = Cow::Owned(kex);
    }
    if let Some(c) = ciphers()
        .iter()
        .find(|c| offered(c.as_ref(), client_ciphers))
    {
        p.cipher = Cow::Owned(vec![*c]);
    }
    p
}

/// `Ciphers` and `KexAlgorithms` lines for the Host block of the endpoint,
/// fastest on this machine first, then the rest we accept. OpenSSH's own
/// order puts ChaCha20 and curve25519 first; it computes curve25519 with
/// portable code but P-256 with OpenSSL (about 4.5 ms less per connect),
/// and AES-GCM is 15-25% faster than ChaCha20 on AES hardware.
pub fn steering() -> (String, String) {
    let ciphers: Vec<&str> = ciphers().iter().map(|c| c.as_ref()).collect();
    let kex: Vec<&str> = ENDPOINT_KEX.iter().map(|k| k.as_ref()).collect();
    (ciphers.join(","), kex.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_lists_fast_first_and_everything_accepted() {
        let (ciphers, kex) = steering();
        assert!(kex.starts_with("ecdh-sha2-nistp256,"), "{kex}");
        assert!(kex.contains("curve25519-sha256"), "{kex}");
        assert!(kex.contains("mlkem768x25519-sha256"), "{kex}");
        assert!(!kex.contains("ext-info"), "{kex}");
        assert!(
            ciphers.contains("chacha20-poly1305@openssh.com"),
            "{ciphers}"
        );
        assert!(ciphers.contains("aes128-ctr"), "{ciphers}");
        if aes_hardware() {
            assert!(ciphers.starts_with("aes128-gcm@openssh.com"), "{ciphers}");
        }
    }

    #[test]
    fn each_client_gets_the_cheapest_it_offers_and_nothing_else() {
        fn names(p: &russh::Preferred) -> (Vec<String>, Vec<String>) {
            let kex = p.kex.iter().map(|k| k.as_ref().to_owned()).collect();
            let ciphers = p.cipher.iter().map(|c| c.as_ref().to_owned()).collect();
            (kex, ciphers)
        }
        let markers = ["ext-info-s", "kex-strict-s-v00@openssh.com"];
        // OpenSSH 9.2's defaults: ChaCha20 and curve25519 come first there.
        let openssh_kex = [
            "sntrup761x25519-sha512@openssh.com",
            "curve25519-sha256",
            "curve25519-sha256@libssh.org",
            "ecdh-sha2-nistp256",
            "diffie-hellman-group14-sha256",
            "ext-info-c",
            "kex-strict-c-v00@openssh.com",
        ];
        let openssh_ciphers = [
            "chacha20-poly1305@openssh.com",
            "aes128-ctr",
            "aes128-gcm@openssh.com",
            "aes256-gcm@openssh.com",
        ];
        let (kex, ciphers) = names(&endpoint_choice(&openssh_kex, &openssh_ciphers));
        assert_eq!(kex, [&["ecdh-sha2-nistp256"][..], &markers].concat());
        let fast = if aes_hardware() {
            "aes128-gcm@openssh.com"
        } else {
            "chacha20-poly1305@openssh.com"
        };
        assert_eq!(ciphers, [fast]);
        // Restricted clients get exactly what they allow.
        let (kex, ciphers) = names(&endpoint_choice(
            &[
                "curve25519-sha256@libssh.org",
                "diffie-hellman-group16-sha512",
            ],
            &["chacha20-poly1305@openssh.com"],
        ));
        assert_eq!(
            kex,
            [&["curve25519-sha256@libssh.org"][..], &markers].concat()
        );
        assert_eq!(ciphers, ["chacha20-poly1305@openssh.com"]);
        let (kex, ciphers) = names(&endpoint_choice(
            &[
                "diffie-hellman-group18-sha512",
                "diffie-hellman-group14-sha256",
            ],
            &["aes256-ctr", "aes256-gcm@openssh.com"],
        ));
        assert_eq!(kex[0], "diffie-hellman-group14-sha256");
        assert_eq!(ciphers, ["aes256-gcm@openssh.com"]);
        // Nothing of ours offered: the whole list (the client's error names
        // it), markers included.
        let all = endpoint_algorithms();
        let p = endpoint_choice(&["sntrup761x25519-sha512@openssh.com"], &["3des-cbc"]);
        assert_eq!(names(&p), names(&all));
        assert_eq!(names(&all).0[ENDPOINT_KEX.len()..], markers);
        assert_eq!(names(&all).0.len(), ENDPOINT_KEX.len() + 2);
    }
}

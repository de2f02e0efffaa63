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

/// Key exchanges the endpoint accepts: what a current OpenSSH client may
/// insist on. As a server our order does not matter (the client's decides).
static ENDPOINT_KEX: &[kex::Name] = &[
    kex::ECDH_SHA2_NISTP256,
    kex::ECDH_SHA2_NISTP384,
    kex::ECDH_SHA2_NISTP521,
    kex::MLKEM768X25519_SHA256,
    kex::CURVE25519,
    kex::CURVE25519_PRE_RFC_8731,
    kex::DH_GEX_SHA256,
    kex::DH_G16_SHA512,
    kex::DH_G18_SHA512,
    kex::DH_G14_SHA256,
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

/// Local endpoint (server leg) algorithm preferences: everything a current
/// OpenSSH client may insist on (a client restricted to ChaCha20, to
/// curve25519, or hardened the way ssh-audit recommends still connects).
/// Speed comes from steering, not exclusion: see [`steering`].
pub fn endpoint_algorithms() -> russh::Preferred {
    russh::Preferred {
        kex: Cow::Borrowed(ENDPOINT_KEX),
        cipher: Cow::Borrowed(ciphers()),
        mac: Cow::Borrowed(MACS),
        ..Default::default()
    }
}

/// `Ciphers` and `KexAlgorithms` lines for the Host block of the endpoint,
/// fastest on this machine first, then the rest we accept. OpenSSH's own
/// order puts ChaCha20 and curve25519 first; it computes curve25519 with
/// portable code but P-256 with OpenSSL (about 4.5 ms less per connect),
/// and AES-GCM is 15-25% faster than ChaCha20 on AES hardware.
pub fn steering() -> (String, String) {
    let ciphers: Vec<&str> = ciphers().iter().map(|c| c.as_ref()).collect();
    let kex: Vec<&str> = ENDPOINT_KEX
        .iter()
        .filter(|k| {
            *k != &kex::EXTENSION_SUPPORT_AS_SERVER
                && *k != &kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER
        })
        .map(|k| k.as_ref())
        .collect();
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
}

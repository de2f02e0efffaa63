//! The client's offer, read before the endpoint makes its own.
//!
//! The negotiation picks the first algorithm in the client's list that the
//! server also lists, so a server chooses only by what it lists. RFC 4253
//! lets either side send KEXINIT first, but russh's server sends its
//! identification line and, as soon as the client's has arrived, its
//! KEXINIT, from the `Config` it was started with. So [`peek`] sends the
//! identification line itself and reads the client's line and first
//! binary packet (its KEXINIT, unencrypted); the endpoint then builds that
//! connection's `Config` from the offer, and [`Replay`] hands russh the
//! bytes already read and swallows the identification line russh writes
//! again. Anything unexpected (no KEXINIT first, a packet too large, a
//! client that waits for our KEXINIT) leaves the offer unknown: the
//! connection then gets the full lists, and russh sees every byte.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What a client's KEXINIT offers that the endpoint chooses from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Key exchange algorithms, with markers such as `ext-info-c`, in the
    /// client's order.
    pub kex: Vec<String>,
    /// Client-to-server ciphers (russh uses this list for both directions).
    pub ciphers: Vec<String>,
}

/// Longest identification line with its CR LF (RFC 4253, section 4.2);
/// russh refuses longer ones too.
const MAX_ID_LINE: usize = 255;

/// Largest first packet read ahead. RFC 4253 has every implementation
/// accept 35,000 bytes; OpenSSH's KEXINIT is about 1.5 KiB.
const MAX_PACKET: usize = 35_000;

/// How long to wait for the client's KEXINIT once its identification line
/// is in. A client sends it at once; one that waits for ours gets it after
/// this, with the full lists.
const KEXINIT_WAIT: Duration = Duration::from_secs(1);

/// SSH_MSG_KEXINIT.
const MSG_KEXINIT: u8 = 20;

/// How far the bytes a client sent so far get us.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// The identification line or the first packet is not complete yet.
    NeedMore,
    /// The client's KEXINIT, parsed.
    Offer(Offer),
    /// Not what a client sends first, or too large to read ahead: why.
    Unusable(String),
}

/// Scans what a client sent so far: its identification line (no other
/// lines may precede it from a client), then its first binary packet
/// (`uint32` length, padding length, payload, padding; unencrypted).
pub fn scan(buf: &[u8]) -> Scan {
    let head = &buf[..buf.len().min(MAX_ID_LINE)];
    let Some(nl) = head.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_ID_LINE {
            Scan::Unusable(format!("no identification line within {MAX_ID_LINE} bytes"))
        } else {
            Scan::NeedMore
        };
    };
    if !(buf.starts_with(b"SSH-2.0-") || buf.starts_with(b"SSH-1.99-")) {
        return Scan::Unusable("the first line is not an SSH-2.0 identification".into());
    }
    let rest = &buf[nl + 1..];
    let Some(len) = rest.get(..4) else {
        return Scan::NeedMore;
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_PACKET {
        return Scan::Unusable(format!(
            "first packet of {len} bytes, more than the {MAX_PACKET} read ahead"
        ));
    }
    let Some(packet) = rest.get(4..4 + len) else {
        return Scan::NeedMore;
    };
    let Some((&padding, body)) = packet.split_first() else {
        return Scan::Unusable("an empty first packet".into());
    };
    let Some(payload_len) = body.len().checked_sub(padding as usize) else {
        return Scan::Unusable("a first packet with more padding than bytes".into());
    };
    let payload = &body[..payload_len];
    match parse_kexinit(payload) {
        Ok(offer) => Scan::Offer(offer),
        Err(why) => Scan::Unusable(why),
    }
}

/// Parses a KEXINIT payload: message number, 16-byte cookie, then the
/// name-lists, of which the first (key exchanges) and third
/// (client-to-server ciphers) are kept. The rest is russh's to check.
pub fn parse_kexinit(payload: &[u8]) -> Result<Offer, String> {
    let Some((&msg, rest)) = payload.split_first() else {
        return Err("an empty first message".into());
    };
    if msg != MSG_KEXINIT {
        return Err(format!(
            "the first message is {msg}, not KEXINIT ({MSG_KEXINIT})"
        ));
    }
    let mut r = rest.get(16..).ok_or("a KEXINIT shorter than its cookie")?;
    let kex = name_list(&mut r, "key exchange")?;
    name_list(&mut r, "host key")?;
    let ciphers = name_list(&mut r, "cipher")?;
    Ok(Offer { kex, ciphers })
}

/// Reads one name-list (`uint32` length, comma-separated US-ASCII names)
/// from the front of `r`.
fn name_list(r: &mut &[u8], what: &str) -> Result<Vec<String>, String> {
    let short = || format!("a KEXINIT cut short in its {what} list");
    let len = r.get(..4).ok_or_else(short)?;
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let bytes = r.get(4..4usize.saturating_add(len)).ok_or_else(short)?;
    *r = &r[4 + len..];
    if !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "a {what} list with bytes other than printable ASCII"
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| short())?;
    Ok(text
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The identification line as russh writes it for `id`.
pub fn id_line(id: &russh::SshId) -> Vec<u8> {
    match id {
        russh::SshId::Standard(s) => format!("{s}\r\n").into_bytes(),
        russh::SshId::Raw(s) => s.as_bytes().to_vec(),
    }
}

/// Sends our identification line, then reads the client's and its KEXINIT.
/// Returns every byte read (to replay to russh) and the offer, or why it
/// is unknown. Bounded: at most an identification line and one
/// [`MAX_PACKET`] packet are read, and once the client's line is in, its
/// KEXINIT must follow within [`KEXINIT_WAIT`] (the caller bounds the wait
/// for the line).
pub async fn peek<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    our_id: &[u8],
) -> io::Result<(Vec<u8>, Result<Offer, String>)> {
    stream.write_all(our_id).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(2048);
    let mut deadline = None;
    loop {
        match scan(&buf) {
            Scan::Offer(o) => return Ok((buf, Ok(o))),
            Scan::Unusable(why) => return Ok((buf, Err(why))),
            Scan::NeedMore => {}
        }
        if deadline.is_none() && buf.contains(&b'\n') {
            deadline = Some(tokio::time::Instant::now() + KEXINIT_WAIT);
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk);
        let n = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r?,
                Err(_) => {
                    return Ok((buf, Err("no KEXINIT from the client within 1 s".into())));
                }
            },
            None => read.await?,
        };
        if n == 0 {
            return Ok((buf, Err("the client closed the connection".into())));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream for russh after [`peek`]: reads return the bytes peek read
/// before any new ones, and the identification line russh writes first is
/// swallowed (the client already has it, byte for byte the same).
pub struct Replay<S> {
    /// The connection.
    inner: S,
    /// Bytes peek read, not yet handed to russh.
    pending: Vec<u8>,
    /// How many of `pending` russh has read.
    pos: usize,
    /// Our identification line, as sent.
    id: Vec<u8>,
    /// How much of it russh has written (and we swallowed).
    swallowed: usize,
}

impl<S> Replay<S> {
    /// Wraps `inner` after peek read `pending` and sent `id`.
    pub fn new(inner: S, pending: Vec<u8>, id: Vec<u8>) -> Self {
        Replay {
            inner,
            pending,
            pos: 0,
            id,
            swallowed: 0,
        }
    }

    /// Swallows what russh writes of its identification line: how many
    /// bytes of `buf` that was. A mismatch means russh wrote something
    /// other than the line the client already has: the connection fails
    /// rather than send a second, different identification.
    fn swallow(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = &self.id[self.swallowed..];
        let n = left.len().min(buf.len());
        if buf[..n] != left[..n] {
            return Err(io::Error::other(
                "the SSH server wrote an identification other than the one sent",
            ));
        }
        self.swallowed += n;
        Ok(n)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.pending.len() {
            let n = (this.pending.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.pending[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.pending.len() {
                this.pending = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.swallowed < this.id.len() && !buf.is_empty() {
            return Poll::Ready(this.swallow(buf));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.swallowed < this.id.len() {
            let first = bufs.iter().find(|b| !b.is_empty());
            return Poll::Ready(first.map_or(Ok(0), |b| this.swallow(b)));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What OpenSSH 9.2 sends with its default options.
    const OPENSSH_KEX: &str = "sntrup761x25519-sha512@openssh.com,curve25519-sha256,\
        curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,\
        ecdh-sha2-nistp521,diffie-hellman-group-exchange-sha256,\
        diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,\
        diffie-hellman-group14-sha256,ext-info-c,kex-strict-c-v00@openssh.com";
    /// OpenSSH 9.2's default ciphers.
    const OPENSSH_CIPHERS: &str = "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,\
        aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com";

    /// A KEXINIT payload with these name-lists (the rest as OpenSSH sends).
    pub(super) fn kexinit(kex: &str, ciphers: &str) -> Vec<u8> {
        let mut p = vec![MSG_KEXINIT];
        p.extend_from_slice(&[7; 16]);
        let lists = [
            kex,
            "ssh-ed25519,ecdsa-sha2-nistp256",
            ciphers,
            ciphers,
            "hmac-sha2-256-etm@openssh.com",
            "hmac-sha2-256-etm@openssh.com",
            "none,zlib@openssh.com",
            "none,zlib@openssh.com",
            "",
            "",
        ];
        for l in lists {
            p.extend_from_slice(&(l.len() as u32).to_be_bytes());
            p.extend_from_slice(l.as_bytes());
        }
        p.extend_from_slice(&[0, 0, 0, 0, 0]);
        p
    }

    /// An identification line and `payload` framed as an unencrypted
    /// binary packet.
    pub(super) fn client_hello(payload: &[u8]) -> Vec<u8> {
        let mut v = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u6\r\n".to_vec();
        let padding = 8 - (payload.len() + 5) % 8 + 4;
        v.extend_from_slice(&((payload.len() + padding + 1) as u32).to_be_bytes());
        v.push(padding as u8);
        v.extend_from_slice(payload);
        v.extend(std::iter::repeat_n(0u8, padding));
        v
    }

    #[test]
    fn reads_openssh_default_offer_and_needs_every_byte() {
        let hello = client_hello(&kexinit(OPENSSH_KEX, OPENSSH_CIPHERS));
        let Scan::Offer(o) = scan(&hello) else {
            panic!("{:?}", scan(&hello));
        };
        assert_eq!(o.kex.len(), 12);
        assert_eq!(o.kex[1], "curve25519-sha256");
        assert_eq!(o.kex[11], "kex-strict-c-v00@openssh.com");
        assert_eq!(o.ciphers[0], "chacha20-poly1305@openssh.com");
        assert_eq!(o.ciphers.len(), 6);
        for cut in 0..hello.len() {
            assert_eq!(scan(&hello[..cut]), Scan::NeedMore, "cut at {cut}");
        }
        // Bytes after the packet (a guessed key exchange packet) are left alone.
        let mut more = hello.clone();
        more.extend_from_slice(b"\0\0\0\x0c");
        assert!(matches!(scan(&more), Scan::Offer(_)));
    }

    #[test]
    fn refuses_what_a_client_does_not_send_first() {
        let unusable = |b: &[u8]| match scan(b) {
            Scan::Unusable(why) => why,
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(b)),
        };
        assert!(unusable(b"GET / HTTP/1.1\r\n").contains("identification"));
        assert!(unusable(&[b'x'; 300]).contains("255"));
        let mut big = b"SSH-2.0-x\r\n".to_vec();
        big.extend_from_slice(&100_000u32.to_be_bytes());
        assert!(unusable(&big).contains("100000"));
        // A packet whose padding is longer than the packet.
        let mut pad = b"SSH-2.0-x\r\n".to_vec();
        pad.extend_from_slice(&[0, 0, 0, 2, 9, 20]);
        assert!(unusable(&pad).contains("padding"));
        // Not a KEXINIT (SSH_MSG_IGNORE) first.
        let ignore = client_hello(&[2, 0, 0, 0, 0]);
        assert!(unusable(&ignore).contains("not KEXINIT"));
        // A name-list that runs past the packet.
        let mut cut = kexinit(OPENSSH_KEX, OPENSSH_CIPHERS);
        cut.truncate(40);
        assert!(unusable(&client_hello(&cut)).contains("cut short"));
        // Names with control characters.
        let bad = client_hello(&kexinit("curve25519-sha256\n", "aes128-ctr"));
        assert!(unusable(&bad).contains("ASCII"));
    }

    /// A stream of scripted reads that records what is written to it.
    struct Script {
        /// Chunks still to be read.
        reads: std::collections::VecDeque<Vec<u8>>,
        /// Everything written.
        written: Vec<u8>,
    }

    impl AsyncRead for Script {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(c) = self.get_mut().reads.pop_front() {
                buf.put_slice(&c);
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn peek_then_replay_gives_russh_every_byte_once() {
        let hello = client_hello(&kexinit(OPENSSH_KEX, OPENSSH_CIPHERS));
        // The client's bytes arrive in odd pieces, with more after them.
        let reads = [&hello[..5], &hello[5..60], &hello[60..], b"after"]
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        let mut s = Script {
            reads,
            written: Vec::new(),
        };
        let id = id_line(&russh::SshId::Standard("SSH-2.0-OpenSSH_test".into()));
        assert_eq!(id, b"SSH-2.0-OpenSSH_test\r\n");
        let (read, offer) = peek(&mut s, &id).await.unwrap();
        assert_eq!(offer.unwrap().ciphers[0], "chacha20-poly1305@openssh.com");
        assert_eq!(read, hello);
        assert_eq!(s.written, id);

        let mut r = Replay::new(s, read, id.clone());
        // russh writes its line in two pieces: swallowed; then packets pass.
        r.write_all(&id[..4]).await.unwrap();
        r.write_all(&id[4..]).await.unwrap();
        r.write_all(b"KEXINIT").await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        let mut want = hello.clone();
        want.extend_from_slice(b"after");
        assert_eq!(got, want);
        assert_eq!(r.inner.written, [id.as_slice(), b"KEXINIT"].concat());

        // A different line from russh is an error, not a second line.
        let s = Script {
            reads: Default::default(),
            written: Vec::new(),
        };
        let mut r = Replay::new(s, Vec::new(), id);
        assert!(r.write_all(b"SSH-2.0-other\r\n").await.is_err());
        assert!(r.inner.written.is_empty());
    }

    #[tokio::test]
    async fn peek_gives_up_on_a_client_that_waits_for_our_kexinit() {
        let (mut ours, mut theirs) = tokio::io::duplex(4096);
        theirs.write_all(b"SSH-2.0-patient\r\n").await.unwrap();
        let (read, offer) = peek(&mut ours, b"SSH-2.0-us\r\n").await.unwrap();
        assert_eq!(read, b"SSH-2.0-patient\r\n");
        assert!(offer.unwrap_err().contains("no KEXINIT"));
        // A closed connection ends the peek at once.
        drop(theirs);
        match peek(&mut ours, b"SSH-2.0-us\r\n").await {
            Ok((_, offer)) => assert!(offer.is_err()),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}"),
        }
    }

    mod fuzz {
        //! The KEXINIT scanner on anything a peer could send first: no
        //! panic, bounded time, an error that says what was wrong; valid
        //! packets read back exactly, and no prefix of one is misread.

        use super::super::*;
        use super::{client_hello, kexinit};
        use crate::fuzzing::{bounded, config, is_message, nasty_bytes};
        use proptest::prelude::*;

        /// A name-list: real names, odd ones, empty entries.
        fn names() -> impl Strategy<Value = Vec<String>> {
            let name = prop_oneof![
                prop::sample::select(vec![
                    "curve25519-sha256",
                    "ecdh-sha2-nistp256",
                    "aes128-gcm@openssh.com",
                    "chacha20-poly1305@openssh.com",
                    "ext-info-c",
                    "kex-strict-c-v00@openssh.com",
                ])
                .prop_map(str::to_owned),
                "[!-+\\--~]{1,40}",
            ];
            prop::collection::vec(name, 0..12)
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn fuzz_kexinit_any_bytes(junk in nasty_bytes(200), framed in any::<bool>()) {
                let input = if framed { client_hello(&junk) } else { junk };
                let r = bounded("kexinit::scan", move || scan(&input));
                if let Scan::Unusable(why) = r {
                    is_message("kexinit::scan", &why);
                }
            }

            #[test]
            fn fuzz_kexinit_structured(kex in names(), ciphers in names(), cut in any::<prop::sample::Index>()) {
                let hello = client_hello(&kexinit(&kex.join(","), &ciphers.join(",")));
                let whole = hello.clone();
                let r = bounded("kexinit::scan", move || scan(&whole));
                prop_assert_eq!(r, Scan::Offer(Offer { kex, ciphers }));
                let at = cut.index(hello.len());
                prop_assert_eq!(scan(&hello[..at]), Scan::NeedMore);
            }
        }
    }
}

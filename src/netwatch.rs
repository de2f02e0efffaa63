//! Notices when the network may have changed under a connection: a new or
//! removed address or default route (Linux netlink), and waking from
//! suspend (the boot clock ran on while the monotonic one stood still). A
//! ground module: it imports nothing from the crate and only reports, on a
//! watch channel; what to do about a change is the upstream's business.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often the clocks are compared to notice a suspend. The monotonic
/// clock (which Tokio's timers use) stands still while suspended, so a
/// resume is seen at most this long after it happens.
pub const CLOCK_CHECK: Duration = Duration::from_secs(2);

/// How far the boot clock must run ahead of the monotonic one between two
/// checks to count as a suspend (scheduling delays stay well below it).
pub const SUSPEND_MIN: Duration = Duration::from_secs(3);

/// One change that may have broken or repaired the network path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An address was added to an interface (or its lifetime renewed).
    NewAddress,
    /// An address was removed.
    AddressGone,
    /// A default route appeared.
    NewDefaultRoute,
    /// A default route was removed.
    DefaultRouteGone,
    /// The machine woke from a suspend that lasted about this long.
    Resumed(Duration),
    /// The kernel dropped notifications (its queue overflowed): anything may
    /// have changed.
    Overflow,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::NewAddress => f.write_str("a network address was added"),
            Change::AddressGone => f.write_str("a network address was removed"),
            Change::NewDefaultRoute => f.write_str("a default route appeared"),
            Change::DefaultRouteGone => f.write_str("a default route was removed"),
            Change::Resumed(d) => write!(f, "woke from a suspend of about {}s", d.as_secs()),
            Change::Overflow => f.write_str("network notifications were lost"),
        }
    }
}

/// The latest change and how many there were so far (a receiver sees every
/// burst, coalesced, and can say what the last change was).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Latest {
    /// Changes so far.
    pub count: u64,
    /// The most recent one, if any.
    pub change: Option<Change>,
}

/// Starts watching on the current Tokio runtime; the watchers stop when
/// every receiver is gone. Where netlink is unavailable (not Linux, or a
/// sandbox without it) only suspends are noticed.
pub fn spawn() -> watch::Receiver<Latest> {
    let (tx, rx) = watch::channel(Latest {
        count: 0,
        change: None,
    });
    match netlink::open() {
        Ok(sock) => {
            tokio::spawn(netlink::run(sock, tx.clone()));
        }
        Err(e) => tracing::debug!("not watching address and route changes: {e}"),
    }
    tokio::spawn(watch_clocks(tx));
    rx
}

/// Records one change.
fn publish(tx: &watch::Sender<Latest>, change: Change) {
    tracing::debug!("network watch: {change}");
    tx.send_modify(|l| {
        l.count += 1;
        l.change = Some(change);
    });
}

/// The suspend clock: CLOCK_BOOTTIME on Linux (it counts suspended time),
/// the wall clock elsewhere (it jumps forward on resume, and when set).
fn suspend_clock() -> Duration {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let id = libc::CLOCK_BOOTTIME;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let id = libc::CLOCK_REALTIME;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to; the clock id exists.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// How long the machine was suspended between two readings of (suspend
/// clock, monotonic clock), if it was: the suspend clock ran ahead by at
/// least [`SUSPEND_MIN`].
pub fn suspended(before: (Duration, Instant), after: (Duration, Instant)) -> Option<Duration> {
    let ran = after.0.checked_sub(before.0)?;
    let awake = after.1.saturating_duration_since(before.1);
    let gap = ran.checked_sub(awake)?;
    (gap >= SUSPEND_MIN).then_some(gap)
}

/// Compares the clocks every [`CLOCK_CHECK`] until nobody listens.
async fn watch_clocks(tx: watch::Sender<Latest>) {
    let mut last = (suspend_clock(), Instant::now());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CLOCK_CHECK) => {}
            _ = tx.closed() => return,
        }
        let now = (suspend_clock(), Instant::now());
        if let Some(gap) = suspended(last, now) {
            publish(&tx, Change::Resumed(gap));
        }
        last = now;
    }
}

#[cfg(target_os = "linux")]
mod netlink {
    //! The rtnetlink multicast groups for addresses and routes.

    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use tokio::io::unix::AsyncFd;
    use tokio::sync::watch;

    use super::{Change, Latest, publish};

    /// Size of `struct nlmsghdr`.
    const NLMSG_HDR: usize = 16;

    /// A netlink socket subscribed to address and route changes.
    pub(super) fn open() -> io::Result<AsyncFd<OwnedFd>> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid; fields set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_ROUTE) as u32;
        // SAFETY: `addr` is a valid sockaddr_nl of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns `fd`, which stays open and the same
        // until it is dropped.
        unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
    }

    /// Reads notifications until nobody listens or the socket fails.
    pub(super) async fn run(sock: AsyncFd<OwnedFd>, tx: watch::Sender<Latest>) {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let mut guard = tokio::select! {
                g = sock.readable() => match g {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::debug!("network watch stopped: {e}");
                        return;
                    }
                },
                _ = tx.closed() => return,
            };
            let n = match guard.try_io(|s| {
                // SAFETY: `buf` is writable for its whole length.
                let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    publish(&tx, Change::Overflow);
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::debug!("network watch stopped: {e}");
                    return;
                }
                // Spurious readiness: wait again.
                Err(_) => continue,
            };
            for change in parse(&buf[..n]) {
                publish(&tx, change);
            }
        }
    }

    /// The changes one datagram of netlink messages reports.
    pub(crate) fn parse(mut data: &[u8]) -> Vec<Change> {
        let mut out = Vec::new();
        while data.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
            if len < NLMSG_HDR || len > data.len() {
                break;
            }
            let body = &data[NLMSG_HDR..len];
            // struct rtmsg: family, dst_len, src_len, tos, table, protocol,
            // scope, type. A default route has no destination bits.
            let default_route = body.len() >= 8 && body[1] == 0 && body[7] == libc::RTN_UNICAST;
            let change = match kind {
                libc::RTM_NEWADDR => Some(Change::NewAddress),
                libc::RTM_DELADDR => Some(Change::AddressGone),
                libc::RTM_NEWROUTE if default_route => Some(Change::NewDefaultRoute),
                libc::RTM_DELROUTE if default_route => Some(Change::DefaultRouteGone),
                _ => None,
            };
            out.extend(change);
            // Messages are 4-byte aligned.
            let next = (len + 3) & !3;
            data = data.get(next..).unwrap_or_default();
        }
        out
    }
}

#[cfg(not(target_os = "linux"))]
mod netlink {
    //! No netlink: only suspends are noticed.

    use tokio::sync::watch;

    use super::Latest;

    /// Never available here.
    pub(super) fn open() -> std::io::Result<()> {
        Err(std::io::Error::other("netlink is Linux-only"))
    }

    /// Never runs.
    pub(super) async fn run(_sock: (), _tx: watch::Sender<Latest>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_clock_ahead_of_the_monotonic_one_is_a_suspend() {
        let t0 = Instant::now();
        let b0 = Duration::from_secs(1000);
        // Awake: both clocks advanced alike.
        let awake = (b0 + Duration::from_secs(2), t0 + Duration::from_secs(2));
        assert_eq!(suspended((b0, t0), awake), None);
        // Late wake-up of a busy machine: still no suspend.
        let late = (
            b0 + Duration::from_millis(3500),
            t0 + Duration::from_millis(1500),
        );
        assert_eq!(suspended((b0, t0), late), None);
        // Slept for a minute between two checks.
        let slept = (b0 + Duration::from_secs(62), t0 + Duration::from_secs(2));
        assert_eq!(suspended((b0, t0), slept), Some(Duration::from_secs(60)));
        // A wall clock set backwards is no suspend.
        let back = (b0 - Duration::from_secs(30), t0 + Duration::from_secs(2));
        assert_eq!(suspended((b0, t0), back), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn parses_address_and_default_route_messages() {
        /// One netlink message: header then body, padded to 4 bytes.
        fn msg(kind: u16, body: &[u8]) -> Vec<u8> {
            let len = 16 + body.len();
            let mut m = Vec::new();
            m.extend((len as u32).to_ne_bytes());
            m.extend(kind.to_ne_bytes());
            m.extend([0u8; 10]);
            m.extend(body);
            m.resize((len + 3) & !3, 0);
            m
        }
        let default = [2, 0, 0, 0, 254, 3, 0, libc::RTN_UNICAST, 0, 0, 0, 0];
        let host = [2, 32, 0, 0, 255, 2, 254, libc::RTN_LOCAL, 0, 0, 0, 0];
        let mut data = msg(libc::RTM_NEWADDR, &[2, 8, 0, 0, 1, 0, 0, 0, 0]);
        data.extend(msg(libc::RTM_NEWROUTE, &host));
        data.extend(msg(libc::RTM_NEWROUTE, &default));
        data.extend(msg(libc::RTM_DELROUTE, &default));
        data.extend(msg(libc::RTM_DELADDR, &[10, 64, 0, 0, 2, 0, 0, 0]));
        assert_eq!(
            netlink::parse(&data),
            vec![
                Change::NewAddress,
                Change::NewDefaultRoute,
                Change::DefaultRouteGone,
                Change::AddressGone
            ]
        );
        // A truncated message is ignored, not misread.
        assert_eq!(netlink::parse(&data[..30]), vec![Change::NewAddress]);
        assert_eq!(netlink::parse(&data[..20]), vec![]);
    }

    /// Adds 127.0.0.42/8 to `lo` (root only; skipped otherwise) and expects
    /// the watcher to report the new address, then its removal.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn reports_an_address_added_to_loopback() {
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .output()
        };
        let mut rx = spawn();
        rx.borrow_and_update();
        let added = ip(&["addr", "add", "127.0.0.42/8", "dev", "lo"]);
        match added {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!(
                    "skipped: cannot add an address to lo ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                return;
            }
            Err(e) => {
                eprintln!("skipped: no `ip` command ({e})");
                return;
            }
        }
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                rx.changed().await.unwrap();
                if rx.borrow_and_update().change == Some(Change::NewAddress) {
                    return;
                }
            }
        })
        .await;
        let removed = ip(&["addr", "del", "127.0.0.42/8", "dev", "lo"]);
        assert!(seen.is_ok(), "no new-address event within 5 s");
        assert!(removed.is_ok_and(|o| o.status.success()), "cleanup failed");
        let gone = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                rx.changed().await.unwrap();
                if rx.borrow_and_update().change == Some(Change::AddressGone) {
                    return;
                }
            }
        })
        .await;
        assert!(gone.is_ok(), "no address-removed event within 5 s");
    }
}

//! Prometheus rendering of profile statuses and the loopback-only HTTP
//! endpoint serving it (`GET /metrics`) alongside the status JSON
//! (`GET /status`).
//!
//! Both name hosts, sockets and forwards, so the endpoint answers only the
//! user running sshshim (the client's socket must be ours, as on the SSH
//! endpoint; 403 otherwise) and only requests addressed to a loopback name
//! (`Host: 127.0.0.1`, `[::1]` or `localhost`, with any port; 421
//! otherwise), so a web page that rebinds its own DNS name to 127.0.0.1
//! reads nothing.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::status::ProfileStatus;

/// How long one HTTP exchange may take; bounds idle and slow connections.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest HTTP request head accepted by the metrics endpoint.
const MAX_HTTP_HEAD: usize = 8 * 1024;
/// Concurrent metrics connections; keeps a local misbehaving scraper from exhausting fds.
const MAX_HTTP_CONNS: usize = 64;

/// Escapes a Prometheus label value (backslash, double quote, newline).
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Formats a sample value the way Prometheus parses it (Go float syntax).
fn prom_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// One metric family. Its samples are accumulated together so they stay
/// contiguous in the output, as the exposition format requires.
struct Family {
    /// Metric name, e.g. "sshshim_up".
    name: &'static str,
    /// Text after `# HELP name`.
    help: &'static str,
    /// "gauge" or "counter".
    kind: &'static str,
    /// Rendered sample lines.
    samples: Vec<String>,
}

impl Family {
    /// An empty gauge family.
    fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, "gauge")
    }

    /// An empty counter family.
    fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, "counter")
    }

    /// An empty family of the given kind.
    fn new(name: &'static str, help: &'static str, kind: &'static str) -> Self {
        Self {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a sample with already-unescaped label pairs.
    fn add(&mut self, labels: &[(&str, &str)], value: String) {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect::<Vec<_>>()
            .join(",");
        self.samples
            .push(format!("{}{{{labels}}} {value}", self.name));
    }

    /// Appends the HELP and TYPE lines, then the samples, to `out`.
    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for s in &self.samples {
            let _ = writeln!(out, "{s}");
        }
    }
}

/// Every metric family sshshim exports, each addressed by its own field so
/// a sample can never land in the wrong family.
struct Families {
    /// `sshshim_up`.
    up: Family,
    /// `sshshim_reconnects_total`.
    reconnects: Family,
    /// `sshshim_rtt_seconds`.
    rtt: Family,
    /// `sshshim_local_clients`.
    local_clients: Family,
    /// `sshshim_channels`.
    channels: Family,
    /// `sshshim_forward_active`.
    forward_active: Family,
    /// `sshshim_bytes_total`.
    bytes: Family,
    /// `sshshim_upstream_connections`.
    upstream_connections: Family,
    /// `sshshim_upstream_congested_connections`.
    upstream_congested: Family,
    /// `sshshim_resumable_sessions`.
    resumable: Family,
    /// `sshshim_resumable_forwarded_connections`.
    resumable_forwarded: Family,
}

impl Families {
    /// All families, without samples.
    fn new() -> Self {
        Self {
            up: Family::gauge(
                "sshshim_up",
                "Whether the profile's upstream SSH connection is up (1) or not (0).",
            ),
            reconnects: Family::counter(
                "sshshim_reconnects_total",
                "Upstream reconnections since the profile started.",
            ),
            rtt: Family::gauge(
                "sshshim_rtt_seconds",
                "Last measured upstream round-trip time.",
            ),
            local_clients: Family::gauge(
                "sshshim_local_clients",
                "Local SSH clients connected to the endpoint.",
            ),
            channels: Family::gauge("sshshim_channels", "Open channels by kind."),
            forward_active: Family::gauge(
                "sshshim_forward_active",
                "Whether a forward is active (1) or not (0).",
            ),
            bytes: Family::counter(
                "sshshim_bytes_total",
                "Bytes relayed, in = upstream to local, out = local to upstream.",
            ),
            upstream_connections: Family::gauge(
                "sshshim_upstream_connections",
                "Upstream SSH connections open.",
            ),
            upstream_congested: Family::gauge(
                "sshshim_upstream_congested_connections",
                "Upstream SSH connections held back by a local reader that stopped \
                 reading; they take no new channels meanwhile.",
            ),
            resumable: Family::gauge(
                "sshshim_resumable_sessions",
                "Sessions running under the remote helper (--resume), attached or \
                 waiting for the upstream (held by the server).",
            ),
            resumable_forwarded: Family::gauge(
                "sshshim_resumable_forwarded_connections",
                "Forwarded TCP connections the remote helper carries (--resume), \
                 attached or waiting for the upstream (held by the server).",
            ),
        }
    }

    /// Adds the samples of one profile.
    fn add_profile(&mut self, st: &ProfileStatus) {
        let p = st.profile.as_str();
        let up = &st.upstream;
        self.up.add(
            &[("profile", p)],
            u8::from(up.state == "connected").to_string(),
        );
        self.reconnects
            .add(&[("profile", p)], up.reconnects.to_string());
        if let Some(rtt) = up.rtt_ms {
            self.rtt.add(&[("profile", p)], prom_float(rtt / 1000.0));
        }
        self.local_clients
            .add(&[("profile", p)], st.local_clients.to_string());
        for (kind, n) in &st.channels {
            self.channels
                .add(&[("profile", p), ("kind", kind)], n.to_string());
        }
        // Identical (spec, owner) pairs would be duplicate series, which
        // Prometheus rejects; merge them, active if any is.
        let mut fwd: BTreeMap<(&str, &str), bool> = BTreeMap::new();
        for f in &st.forwards {
            *fwd.entry((&f.spec, &f.owner)).or_default() |= f.state == "active";
        }
        for ((spec, owner), active) in fwd {
            self.forward_active.add(
                &[("profile", p), ("spec", spec), ("owner", owner)],
                u8::from(active).to_string(),
            );
        }
        self.bytes.add(
            &[("profile", p), ("direction", "in")],
            st.bytes_in.to_string(),
        );
        self.bytes.add(
            &[("profile", p), ("direction", "out")],
            st.bytes_out.to_string(),
        );
        self.upstream_connections
            .add(&[("profile", p)], up.connections.to_string());
        self.upstream_congested
            .add(&[("profile", p)], up.congested_connections.to_string());
        if let Some(r) = &st.resume {
            for state in ["attached", "waiting"] {
                let n = r.held_sessions.iter().filter(|h| h.state == state).count();
                self.resumable
                    .add(&[("profile", p), ("state", state)], n.to_string());
            }
            let f = &r.forwarded_connections;
            for (state, n) in [("attached", f.attached), ("waiting", f.waiting)] {
                self.resumable_forwarded
                    .add(&[("profile", p), ("state", state)], n.to_string());
            }
        }
    }

    /// The exposition text: every family in a fixed order.
    fn render(&self) -> String {
        // Destructured so that a new field cannot be left out of the output.
        let Self {
            up,
            reconnects,
            rtt,
            local_clients,
            channels,
            forward_active,
            bytes,
            upstream_connections,
            upstream_congested,
            resumable,
            resumable_forwarded,
        } = self;
        let mut out = String::new();
        for fam in [
            up,
            reconnects,
            rtt,
            local_clients,
            channels,
            forward_active,
            bytes,
            upstream_connections,
            upstream_congested,
            resumable,
            resumable_forwarded,
        ] {
            fam.write(&mut out);
        }
        out
    }
}

/// Prometheus text exposition (version 0.0.4) for several profiles, with
/// HELP/TYPE lines and escaped label values.
pub fn prometheus(statuses: &[ProfileStatus]) -> String {
    let mut fams = Families::new();
    for st in statuses {
        fams.add_profile(st);
    }
    fams.render()
}

/// Callback producing the statuses served by [`serve_metrics`].
type Sources = Arc<dyn Fn() -> Vec<ProfileStatus> + Send + Sync>;

/// Serves HTTP on `addr` until shutdown: GET /metrics -> Prometheus text;
/// GET /status -> JSON array of [`ProfileStatus`]; anything else 404.
/// `addr` must be loopback: the metrics reveal hosts and forwards and there is
/// no authentication, so exposing them on the network is refused. Only our
/// own uid is answered (403 otherwise) and only a loopback `Host` (421
/// otherwise): see the module docs. `sources` is called at request time.
pub async fn serve_metrics(
    addr: SocketAddr,
    sources: Sources,
    shutdown: CancellationToken,
) -> io::Result<()> {
    if !addr.ip().is_loopback() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "refusing to serve metrics on {addr}: it is not a loopback address, \
                 and the unauthenticated status would be visible to the network"
            ),
        ));
    }
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })?;
    serve_metrics_on(listener, sources, shutdown).await
}

/// [`serve_metrics`] on an already bound listener (lets tests use port 0).
async fn serve_metrics_on(
    listener: TcpListener,
    sources: Sources,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("metrics accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Over the limit: drop the connection instead of queueing work.
                let Ok(permit) = limit.clone().try_acquire_owned() else { continue };
                let sources = sources.clone();
                let who = same_user(peer, stream.local_addr().ok());
                if let Err(why) = &who {
                    tracing::warn!("metrics request from {peer} refused: {why}");
                }
                conns.spawn(async move {
                    let _permit = permit;
                    let _ = tokio::time::timeout(
                        HTTP_TIMEOUT,
                        handle_http(stream, sources, who.is_ok()),
                    )
                    .await;
                });
            }
        }
    }
    Ok(())
}

/// Why a metrics client is not taken for our own user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum NotOurs {
    /// The accepted socket has no local address.
    #[error("cannot tell the local address")]
    NoLocalAddr,
    /// Another user's socket.
    #[error("its socket belongs to uid {0}, not ours")]
    OtherUid(u32),
    /// The kernel did not say whose it is.
    #[error("cannot find the owner of its socket")]
    UnknownOwner,
}

/// Whether the client at `peer` (connected to our `local`) runs as our
/// own uid, asked of the kernel as the SSH endpoint does. Fails closed.
fn same_user(peer: SocketAddr, local: Option<SocketAddr>) -> Result<(), NotOurs> {
    let local = local.ok_or(NotOurs::NoLocalAddr)?;
    match crate::endpoint::auth::peer_uid(peer, local) {
        Some(uid) if uid == crate::paths::my_uid() => Ok(()),
        Some(uid) => Err(NotOurs::OtherUid(uid)),
        None => Err(NotOurs::UnknownOwner),
    }
}

/// Reads one request head and writes one response, then closes. A client
/// that is not `same_user` gets 403 and no content.
async fn handle_http(
    mut stream: tokio::net::TcpStream,
    sources: Sources,
    same_user: bool,
) -> io::Result<()> {
    let mut head = HeadReader::default();
    let mut chunk = [0u8; 1024];
    let complete = loop {
        let want = chunk.len().min(head.room());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Ok(());
        }
        if let Some(complete) = head.push(&chunk[..n]) {
            break complete;
        }
    };
    let (route, mut head_only) = if complete && !same_user {
        let status = "403 Forbidden";
        let body = "only the user running sshshim may read its metrics and status\n";
        (Route::Fixed { status, body }, false)
    } else {
        route(&head.buf, complete)
    };
    let (status, ctype, body) = match route {
        Route::Fixed { status, body } => (status, "text/plain", body.to_string()),
        Route::Metrics | Route::Status => {
            // `sources` may do blocking work (e.g. query other profiles'
            // sockets), so keep it off the async workers.
            let src = sources.clone();
            let statuses = tokio::task::spawn_blocking(move || src())
                .await
                .map_err(io::Error::other)?;
            if route == Route::Metrics {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    prometheus(&statuses),
                )
            } else {
                match serde_json::to_string(&statuses) {
                    Ok(json) => ("200 OK", "application/json", json + "\n"),
                    Err(e) => {
                        head_only = false;
                        ("500 Internal Server Error", "text/plain", format!("{e}\n"))
                    }
                }
            }
        }
    };
    let mut resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        resp.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&resp).await?;
    stream.shutdown().await
}

/// A request head being read, up to [`MAX_HTTP_HEAD`] bytes.
#[derive(Default)]
struct HeadReader {
    /// The bytes read so far.
    buf: Vec<u8>,
}

impl HeadReader {
    /// How many bytes the next read may add.
    fn room(&self) -> usize {
        MAX_HTTP_HEAD - self.buf.len()
    }

    /// Adds bytes read (at most [`HeadReader::room`]). `Some(true)` once
    /// the head is complete, `Some(false)` once it is too large without
    /// ending, `None` while more is needed.
    fn push(&mut self, bytes: &[u8]) -> Option<bool> {
        // Only the new bytes and the 3 before them can complete the blank
        // line: scanning the whole head on each read would be quadratic
        // for a client that sends one byte at a time.
        let from = self.buf.len().saturating_sub(3);
        self.buf.extend_from_slice(bytes);
        if find_head_end(&self.buf[from..]) {
            Some(true)
        } else if self.buf.len() >= MAX_HTTP_HEAD {
            Some(false)
        } else {
            None
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `GET /metrics`: the Prometheus text.
    Metrics,
    /// `GET /status`: the statuses as JSON.
    Status,
    /// An answer that needs no status: an HTTP status line and body.
    Fixed {
        /// E.g. "404 Not Found".
        status: &'static str,
        /// The body, ending in a newline.
        body: &'static str,
    },
}

/// Reads a request head (`complete`: its blank line was seen within
/// [`MAX_HTTP_HEAD`] bytes): what to answer, and whether to send the head
/// of the answer only (`HEAD`).
fn route(head: &[u8], complete: bool) -> (Route, bool) {
    if !complete {
        let status = "431 Request Header Fields Too Large";
        let body = "request head too large\n";
        return (Route::Fixed { status, body }, false);
    }
    let text = String::from_utf8_lossy(head);
    let mut parts = text.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if !loopback_host(&text) {
        let status = "421 Misdirected Request";
        let body = "the Host header must be 127.0.0.1, [::1] or localhost (with any port)\n";
        return (Route::Fixed { status, body }, head_only);
    }
    if method != "GET" && !head_only {
        let (status, body) = ("405 Method Not Allowed", "method not allowed\n");
        return (Route::Fixed { status, body }, false);
    }
    let route = match path {
        "/metrics" => Route::Metrics,
        "/status" => Route::Status,
        _ => Route::Fixed {
            status: "404 Not Found",
            body: "not found\n",
        },
    };
    (route, head_only)
}

/// Whether the request head `text` has exactly one `Host` header, naming
/// 127.0.0.1, [::1] or localhost, with or without a port. A DNS-rebinding
/// page sends its own name there; no browser lets a page forge it.
fn loopback_host(text: &str) -> bool {
    let headers = text.lines().skip(1).take_while(|l| !l.is_empty());
    let mut hosts = headers.filter_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim())
    });
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return false;
    };
    let port = if let Some(v6) = host.strip_prefix('[') {
        match v6.split_once(']') {
            Some(("::1", port)) => port,
            _ => return false,
        }
    } else {
        let (name, port) = host.split_at(host.find(':').unwrap_or(host.len()));
        if name != "127.0.0.1" && !name.eq_ignore_ascii_case("localhost") {
            return false;
        }
        port
    };
    match port.strip_prefix(':') {
        // Digits only: u16's parser would take a leading '+'.
        Some(p) => p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok(),
        None => port.is_empty(),
    }
}

/// True once `buf` holds a complete request head (blank line seen); bare LF
/// line endings are tolerated for hand-typed requests.
fn find_head_end(buf: &[u8]) -> bool {
    buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
}

#[cfg(test)]
mod tests {
    use super::super::status::sample;
    use super::*;

    /// A parsed sample: metric name, label pairs, value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Parses `name{labels} value` as the exposition format defines it.
    fn parse_sample(line: &str) -> Option<Sample> {
        let (name, rest) = line.split_at(line.find(['{', ' '])?);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return None;
        }
        let mut labels = Vec::new();
        let mut rest = rest;
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest.find("=\"")?;
                let key = rest[..eq].to_string();
                let mut val = String::new();
                let mut chars = rest[eq + 2..].char_indices();
                let end = loop {
                    let (i, c) = chars.next()?;
                    match c {
                        '\\' => match chars.next()?.1 {
                            'n' => val.push('\n'),
                            c @ ('\\' | '"') => val.push(c),
                            _ => return None,
                        },
                        '"' => break eq + 2 + i + 1,
                        c => val.push(c),
                    }
                };
                labels.push((key, val));
                rest = rest[end..].strip_prefix(',').unwrap_or(&rest[end..]);
            }
        }
        let value = rest.strip_prefix(' ')?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some((name.to_string(), labels, value))
    }

    /// Every sample line parses, with escaped labels round-tripping.
    #[test]
    fn prometheus_lines_parse() {
        let mut down = sample("we\"ird\\name\n");
        down.upstream.state = "reconnecting".into();
        down.upstream.rtt_ms = None;
        let out = prometheus(&[sample("work"), down]);
        let mut samples = Vec::new();
        for line in out.lines() {
            if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            samples.push(parse_sample(line).unwrap_or_else(|| panic!("bad line {line:?}")));
        }
        let find = |name: &str, labels: &[(&str, &str)]| {
            samples
                .iter()
                .find(|(n, l, _)| {
                    n == name
                        && labels
                            .iter()
                            .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
                })
                .map(|s| s.2)
        };
        assert_eq!(find("sshshim_up", &[("profile", "work")]), Some(1.0));
        assert_eq!(
            find("sshshim_up", &[("profile", "we\"ird\\name\n")]),
            Some(0.0)
        );
        assert_eq!(
            find("sshshim_reconnects_total", &[("profile", "work")]),
            Some(2.0)
        );
        assert_eq!(
            find("sshshim_rtt_seconds", &[("profile", "work")]),
            Some(0.0125)
        );
        assert_eq!(
            find(
                "sshshim_channels",
                &[("profile", "work"), ("kind", "session")]
            ),
            Some(2.0)
        );
        assert_eq!(
            find(
                "sshshim_forward_active",
                &[("spec", "-R localhost:8080 \"q\"\\"), ("owner", "client")]
            ),
            Some(0.0)
        );
        assert_eq!(
            find(
                "sshshim_bytes_total",
                &[("profile", "work"), ("direction", "in")]
            ),
            Some(1_300_000.0)
        );
        assert_eq!(
            find("sshshim_upstream_connections", &[("profile", "work")]),
            Some(2.0)
        );
        assert_eq!(
            find(
                "sshshim_upstream_congested_connections",
                &[("profile", "work")]
            ),
            Some(1.0)
        );
        assert_eq!(
            find(
                "sshshim_resumable_sessions",
                &[("profile", "work"), ("state", "waiting")]
            ),
            Some(1.0)
        );
        assert!(out.contains("# TYPE sshshim_bytes_total counter"));
        // Each family's TYPE appears exactly once.
        assert_eq!(out.matches("# TYPE sshshim_up ").count(), 1);
    }

    /// Families come out in a fixed order, each with HELP before TYPE, so
    /// scrapes of different versions stay comparable.
    #[test]
    fn prometheus_family_order() {
        let out = prometheus(&[sample("work")]);
        let types: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "sshshim_up gauge",
                "sshshim_reconnects_total counter",
                "sshshim_rtt_seconds gauge",
                "sshshim_local_clients gauge",
                "sshshim_channels gauge",
                "sshshim_forward_active gauge",
                "sshshim_bytes_total counter",
                "sshshim_upstream_connections gauge",
                "sshshim_upstream_congested_connections gauge",
                "sshshim_resumable_sessions gauge",
                "sshshim_resumable_forwarded_connections gauge",
            ]
        );
        // Every sample sits right under its own family's header.
        let mut family = "";
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&format!("{family}{{")), "{line:?}");
            }
        }
        assert!(prometheus(&[]).lines().all(|l| l.starts_with('#')));
    }

    /// Sends a raw HTTP request and returns the whole response.
    async fn http(addr: SocketAddr, req: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// The HTTP endpoint answers /metrics, /status and the error cases.
    #[tokio::test]
    async fn metrics_http_endpoint() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let sources: Sources = Arc::new(|| vec![sample("work")]);
        let task = tokio::spawn(serve_metrics_on(listener, sources, token.clone()));

        let resp = http(addr, "GET /metrics HTTP/1.1\r\nHost: localhost:9\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.0 200 OK\r\n"), "{resp}");
        assert!(resp.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(resp.contains("sshshim_up{profile=\"work\"} 1"));
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));

        let resp = http(addr, "GET /status?x=1 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await;
        let body = resp.split_once("\r\n\r\n").unwrap().1;
        let parsed: Vec<ProfileStatus> = serde_json::from_str(body).unwrap();
        assert_eq!(parsed, vec![sample("work")]);

        let resp = http(addr, "GET /nope HTTP/1.0\r\nHost: [::1]\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.0 404"), "{resp}");
        let resp = http(addr, "POST /metrics HTTP/1.0\r\nhost: 127.0.0.1\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.0 405"), "{resp}");
        // A foreign or missing Host (DNS rebinding) gets no content.
        for req in [
            "GET /status HTTP/1.1\r\nHost: evil.example:9102\r\n\r\n",
            "GET /metrics HTTP/1.0\r\n\r\n",
        ] {
            let resp = http(addr, req).await;
            assert!(resp.starts_with("HTTP/1.0 421"), "{resp}");
            assert!(!resp.contains("work"), "{resp}");
        }
        let big = format!("GET /metrics HTTP/1.0\r\nX: {}\r\n\r\n", "a".repeat(9000));
        let resp = http(addr, &big).await;
        assert!(resp.starts_with("HTTP/1.0 431"), "{resp}");

        token.cancel();
        task.await.unwrap().unwrap();
    }

    /// Only loopback names pass as Host, once, with a numeric port or none.
    #[test]
    fn host_header_rule() {
        let head = |h: &str| format!("GET /status HTTP/1.1\r\n{h}\r\n\r\nHost: evil\r\n");
        for ok in [
            "Host: 127.0.0.1",
            "Host: 127.0.0.1:9102",
            "host:localhost",
            "HOST: LocalHost:1",
            "Host: [::1]",
            "Host: [::1]:9102",
        ] {
            assert!(loopback_host(&head(ok)), "{ok}");
        }
        for bad in [
            "Host: evil.example",
            "Host: localhost.evil.example",
            "Host: 127.0.0.1.nip.io",
            "Host: 127.0.0.2",
            "Host: [::2]",
            "Host: [::1",
            "Host: localhost:",
            "Host: localhost:+80",
            "Host: localhost:99999",
            "Host: 127.0.0.1:80:80",
            "Host: ",
            "Host: localhost\r\nHost: evil",
            "X-Host: localhost",
        ] {
            assert!(!loopback_host(&head(bad)), "{bad}");
        }
        assert!(!loopback_host("GET / HTTP/1.0\r\n\r\n"));
    }

    /// Non-loopback metrics addresses are refused before binding.
    #[tokio::test]
    async fn metrics_refuse_non_loopback() {
        let sources: Sources = Arc::new(Vec::new);
        let err = serve_metrics(
            "0.0.0.0:0".parse().unwrap(),
            sources,
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("not a loopback"), "{err}");
    }

    mod fuzz {
        //! Properties of the metrics HTTP request reader: any bytes in any
        //! chunks end in an answer (or need more) in bounded time, exactly
        //! where a whole-buffer search would stop.

        use super::*;
        use crate::fuzzing::{bounded, config, nasty_bytes};
        use proptest::prelude::*;

        /// Where a naive reader stops: after the first chunk whose end is
        /// at or past the blank line (`Some(true)`) or the size cap
        /// (`Some(false)`); `None` if the data runs out first.
        fn expected(data: &[u8], chunks: &[usize]) -> (Option<bool>, usize) {
            let end = (0..data.len())
                .find_map(|i| {
                    if data[i..].starts_with(b"\n\n") {
                        Some(i + 2)
                    } else if data[i..].starts_with(b"\r\n\r\n") {
                        Some(i + 4)
                    } else {
                        None
                    }
                })
                .unwrap_or(usize::MAX);
            let mut at = 0;
            for &c in chunks.iter().chain(std::iter::repeat(&1024)) {
                let n = c.max(1).min(MAX_HTTP_HEAD - at).min(data.len() - at);
                if n == 0 {
                    return (None, at);
                }
                at += n;
                if at >= end {
                    return (Some(true), at);
                }
                if at >= MAX_HTTP_HEAD {
                    return (Some(false), at);
                }
            }
            unreachable!()
        }

        /// Feeds `data` to a [`HeadReader`] in `chunks`, as `handle_http` does.
        fn read(data: &[u8], chunks: &[usize]) -> (Option<bool>, usize, HeadReader) {
            let mut r = HeadReader::default();
            let mut at = 0;
            for &c in chunks.iter().chain(std::iter::repeat(&1024)) {
                let n = c.max(1).min(r.room()).min(data.len() - at);
                if n == 0 {
                    return (None, at, r);
                }
                let done = r.push(&data[at..at + n]);
                at += n;
                if done.is_some() {
                    return (done, at, r);
                }
            }
            unreachable!()
        }

        /// A request: a likely request line and headers, or any bytes.
        fn request() -> impl Strategy<Value = Vec<u8>> {
            let line = (
                prop::sample::select(vec!["GET", "HEAD", "POST", "get", "", "GET GET"]),
                prop::sample::select(vec![
                    "/metrics",
                    "/status",
                    "/status?x=1",
                    "/",
                    "",
                    "/metrics/",
                    "//metrics",
                    "/metrics?",
                    "?",
                    "http://x/metrics",
                ]),
                prop::sample::select(vec![" HTTP/1.0", " HTTP/1.1", "", " junk"]),
            )
                .prop_map(|(m, p, v)| format!("{m} {p}{v}"));
            let eol = prop::sample::select(vec!["\r\n", "\n", "\r", ""]);
            prop_oneof![
                (
                    line,
                    eol,
                    nasty_bytes(32),
                    prop::sample::select(vec!["\r\n\r\n", "\n\n", ""])
                )
                    .prop_map(|(l, e, h, end)| {
                        let mut v = format!("{l}{e}").into_bytes();
                        v.extend(h);
                        v.extend(end.as_bytes());
                        v
                    }),
                nasty_bytes(128),
                (any::<u8>(), 0..MAX_HTTP_HEAD * 2).prop_map(|(b, n)| vec![b; n]),
            ]
        }

        proptest! {
            #![proptest_config(config())]

            /// Any bytes in any chunk sizes: the reader stops where a
            /// whole-buffer search would, within the cap and the time bound,
            /// and the head routes to an answer.
            #[test]
            fn fuzz_metrics_request(
                data in request(),
                chunks in prop::collection::vec(prop_oneof![1usize..4, 1usize..2048], 0..64),
            ) {
                let want = expected(&data, &chunks);
                let (d, c) = (data.clone(), chunks.clone());
                let (done, at, reader) = bounded("HeadReader", move || read(&d, &c));
                prop_assert_eq!((done, at), want);
                prop_assert!(reader.buf.len() <= MAX_HTTP_HEAD);
                if let Some(complete) = done {
                    let (route, head_only) = bounded("route", move || route(&reader.buf, complete));
                    if let Route::Fixed { status, body } = route {
                        prop_assert!(!status.is_empty() && !body.trim().is_empty());
                        prop_assert!(!(complete && status.starts_with("431")));
                    }
                    let text = String::from_utf8_lossy(&data);
                    let method = text.lines().next().and_then(|l| l.split_whitespace().next());
                    prop_assert_eq!(head_only, complete && method == Some("HEAD"));
                }
            }
        }

        /// Hand-picked requests.
        #[test]
        fn nasty_metrics_seeds() {
            // One byte per read, never ending: a whole-buffer search per read
            // took seconds (debug build) to reach the cap.
            let slow = vec![b'a'; MAX_HTTP_HEAD];
            let (done, at, _) = bounded("HeadReader", move || read(&slow, &[1; MAX_HTTP_HEAD]));
            assert_eq!((done, at), (Some(false), MAX_HTTP_HEAD));
            // The blank line split across reads is still seen.
            let req = b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
            for split in 1..req.len() {
                let (done, _, r) = read(req, &[split, req.len()]);
                assert_eq!(done, Some(true), "split at {split}");
                assert_eq!(route(&r.buf, true), (Route::Metrics, false));
            }
            assert_eq!(
                route(b"HEAD /status?x HTTP/1.1\r\nHost: [::1]:1\r\n\r\n", true),
                (Route::Status, true)
            );
            assert!(!route(b"\0\xff\n\n", true).1);
            assert!(
                matches!(route(b"", false).0, Route::Fixed { status, .. } if status.starts_with("431"))
            );
        }
    }
}

//! Counters of one profile for status and metrics: bytes each way, open
//! channels by kind, and gauges (local clients) that move by RAII guards so
//! no code path can forget to count down. A ground module: it imports
//! nothing from the crate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Traffic and channel counters of one profile.
#[derive(Default)]
pub struct Stats {
    /// Bytes from upstream to local clients.
    pub bytes_in: AtomicU64,
    /// Bytes from local clients to upstream.
    pub bytes_out: AtomicU64,
    /// Open bridged channels by kind.
    channels: Mutex<BTreeMap<&'static str, usize>>,
}

impl Stats {
    /// Counts a bridged channel of `kind` until the meter is dropped.
    pub fn open(self: &Arc<Self>, kind: &'static str) -> ChannelMeter {
        *self.channels.lock().unwrap().entry(kind).or_default() += 1;
        ChannelMeter {
            stats: self.clone(),
            kind,
        }
    }

    /// Open channels by kind, right now.
    pub fn channels(&self) -> BTreeMap<&'static str, usize> {
        self.channels.lock().unwrap().clone()
    }
}

/// One bridged channel's share of [`Stats`].
pub struct ChannelMeter {
    /// The profile's counters.
    stats: Arc<Stats>,
    /// The channel kind.
    kind: &'static str,
}

impl ChannelMeter {
    /// Counts bytes delivered to the local side.
    pub fn add_in(&self, n: usize) {
        self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts bytes sent upstream.
    pub fn add_out(&self, n: usize) {
        self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl Drop for ChannelMeter {
    fn drop(&mut self) {
        if let Some(n) = self.stats.channels.lock().unwrap().get_mut(self.kind) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Unix seconds of `t` (0 before 1970).
pub fn unix_secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The current time in unix seconds.
pub fn unix_now() -> u64 {
    unix_secs(std::time::SystemTime::now())
}

/// A count of things alive right now (local clients, congested channels).
#[derive(Clone, Default)]
pub struct Gauge(Arc<AtomicUsize>);

impl Gauge {
    /// Counts one more until the guard is dropped.
    pub fn enter(&self) -> GaugeGuard {
        self.0.fetch_add(1, Ordering::Relaxed);
        GaugeGuard(self.0.clone())
    }

    /// The count now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One unit of a [`Gauge`]; dropping it counts down.
pub struct GaugeGuard(Arc<AtomicUsize>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_and_gauges_count_down_on_drop() {
        let s = Arc::new(Stats::default());
        let m = s.open("session");
        m.add_in(3);
        m.add_out(4);
        assert_eq!(s.channels().get("session"), Some(&1));
        drop(m);
        assert_eq!(s.channels().get("session"), Some(&0));
        assert_eq!(s.bytes_in.load(Ordering::Relaxed), 3);
        let g = Gauge::default();
        let (a, b) = (g.enter(), g.enter());
        assert_eq!(g.get(), 2);
        drop((a, b));
        assert_eq!(g.get(), 0);
    }
}

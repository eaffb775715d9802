//! The VMM's own counters: lock-free, per component, read when metrics are flushed or
//! scraped. Each vCPU has its own cache-line-aligned block so that counting an exit never
//! bounces a line between host CPUs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one vCPU.
#[derive(Default)]
#[repr(align(64))]
pub struct VcpuMetrics {
    /// Port-I/O reads.
    pub io_in: AtomicU64,
    /// Port-I/O writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// HLT exits (only with interrupts off: KVM handles the rest in the kernel).
    pub hlt: AtomicU64,
    /// Triple faults.
    pub shutdown: AtomicU64,
    /// KVM system events.
    pub system_event: AtomicU64,
    /// KVM internal errors and entry failures.
    pub failure: AtomicU64,
    /// KVM_RUN returned EINTR/EAGAIN (kicks: pause, stop).
    pub interrupted: AtomicU64,
    /// Any other exit.
    pub other: AtomicU64,
}

impl VcpuMetrics {
    /// Adds one to `c`.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// (reason, count) pairs, in a fixed order.
    pub fn exits(&self) -> [(&'static str, u64); 10] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("io_in", g(&self.io_in)),
            ("io_out", g(&self.io_out)),
            ("mmio_read", g(&self.mmio_read)),
            ("mmio_write", g(&self.mmio_write)),
            ("hlt", g(&self.hlt)),
            ("shutdown", g(&self.shutdown)),
            ("system_event", g(&self.system_event)),
            ("failure", g(&self.failure)),
            ("interrupted", g(&self.interrupted)),
            ("other", g(&self.other)),
        ]
    }
}

/// Counters of the console (COM1).
#[derive(Default)]
pub struct SerialMetrics {
    /// Bytes the guest wrote.
    pub bytes_out: AtomicU64,
    /// Bytes fed to the guest.
    pub bytes_in: AtomicU64,
    /// Output lost because the console sink failed.
    pub write_errors: AtomicU64,
}

/// Counters of the VM's lifecycle.
#[derive(Default)]
pub struct VmMetrics {
    /// Times the VM was paused.
    pub pauses: AtomicU64,
    /// Times it was resumed.
    pub resumes: AtomicU64,
    /// Metrics lines written.
    pub flushes: AtomicU64,
    /// Metrics lines that could not be written whole.
    pub flushes_missed: AtomicU64,
    /// Drive media changed through PATCH /drives.
    pub media_changes: AtomicU64,
    /// Device-process switches (upgrades, media changes): the guest-visible pause.
    pub switch_pause: PauseHistogram,
    /// Device upgrades that failed (the old process kept serving).
    pub upgrades_failed: AtomicU64,
    /// Device processes restarted after they died.
    pub crash_restarts: AtomicU64,
    /// VMM live upgrades: the guest-visible pause.
    pub vmm_upgrade_pause: PauseHistogram,
}

/// [`VmMetrics`] as data: a VMM that takes the VM over (live upgrade) goes on counting
/// from where the one before it was.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmCounters {
    counters: [u64; 7],
    switch_pause: HistogramData,
    vmm_upgrade_pause: HistogramData,
}

/// A [`PauseHistogram`]'s counts (per bucket, not cumulative), sum, count and max.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistogramData {
    buckets: Vec<u64>,
    sum_us: u64,
    count: u64,
    max_us: u64,
}

impl VmMetrics {
    fn counters(&self) -> [&AtomicU64; 7] {
        [
            &self.pauses,
            &self.resumes,
            &self.flushes,
            &self.flushes_missed,
            &self.media_changes,
            &self.upgrades_failed,
            &self.crash_restarts,
        ]
    }

    /// The counters as data.
    pub fn export(&self) -> VmCounters {
        let mut counters = [0; 7];
        for (v, c) in counters.iter_mut().zip(self.counters()) {
            *v = c.load(Ordering::Relaxed);
        }
        VmCounters {
            counters,
            switch_pause: self.switch_pause.export(),
            vmm_upgrade_pause: self.vmm_upgrade_pause.export(),
        }
    }

    /// Adds `data` (from the VMM this one replaces) to the counters.
    pub fn import(&self, data: &VmCounters) {
        for (v, c) in data.counters.iter().zip(self.counters()) {
            c.fetch_add(*v, Ordering::Relaxed);
        }
        self.switch_pause.import(&data.switch_pause);
        self.vmm_upgrade_pause.import(&data.vmm_upgrade_pause);
    }
}

/// Upper bounds of the pause histogram buckets, in microseconds (Prometheus `le`).
pub const PAUSE_BUCKETS_US: [u64; 10] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000,
];

/// A lock-free histogram of pauses in microseconds: per-bucket counts (not cumulative),
/// an overflow bucket, the sum and the count.
#[derive(Default)]
pub struct PauseHistogram {
    buckets: [AtomicU64; PAUSE_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
    max_us: AtomicU64,
}

impl PauseHistogram {
    /// Records one pause.
    pub fn record(&self, us: u64) {
        let i = PAUSE_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(PAUSE_BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    fn export(&self) -> HistogramData {
        HistogramData {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
            max_us: self.max_us.load(Ordering::Relaxed),
        }
    }

    fn import(&self, d: &HistogramData) {
        for (b, n) in self.buckets.iter().zip(&d.buckets) {
            b.fetch_add(*n, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(d.sum_us, Ordering::Relaxed);
        self.count.fetch_add(d.count, Ordering::Relaxed);
        self.max_us.fetch_max(d.max_us, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound (the last is +Inf), the sum, the count, the max.
    pub fn snapshot(&self) -> (Vec<(Option<u64>, u64)>, u64, u64, u64) {
        let mut acc = 0;
        let mut out = Vec::new();
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Ordering::Relaxed);
            out.push((PAUSE_BUCKETS_US.get(i).copied(), acc));
        }
        (
            out,
            self.sum_us.load(Ordering::Relaxed),
            self.count.load(Ordering::Relaxed),
            self.max_us.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = PauseHistogram::default();
        for us in [10, 60, 60, 900, 1_000_000] {
            h.record(us);
        }
        let (b, sum, count, max) = h.snapshot();
        assert_eq!(b[0], (Some(50), 1));
        assert_eq!(b[1], (Some(100), 3));
        assert_eq!(b[4], (Some(1_000), 4));
        assert_eq!(b.last(), Some(&(None, 5)));
        assert_eq!((sum, count, max), (1_001_030, 5, 1_000_000));
    }

    #[test]
    fn counters_carry_over_to_the_next_vmm() {
        let a = VmMetrics::default();
        a.pauses.fetch_add(3, Ordering::Relaxed);
        a.vmm_upgrade_pause.record(700);
        a.switch_pause.record(60);
        let data: VmCounters =
            serde_json::from_str(&serde_json::to_string(&a.export()).unwrap()).unwrap();
        let b = VmMetrics::default();
        b.vmm_upgrade_pause.record(900);
        b.import(&data);
        assert_eq!(b.pauses.load(Ordering::Relaxed), 3);
        let (buckets, sum, count, max) = b.vmm_upgrade_pause.snapshot();
        assert_eq!((sum, count, max), (1600, 2, 900));
        assert_eq!(buckets[4], (Some(1_000), 2));
        assert_eq!(b.switch_pause.snapshot().2, 1);
    }
}

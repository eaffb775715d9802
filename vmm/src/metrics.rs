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
}

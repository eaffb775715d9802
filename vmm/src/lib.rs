//! skiff's VMM: boots a Linux guest on KVM with a serial console and virtio-mmio block and
//! net devices whose queues are served by vhost-user device processes.

pub mod api;
pub mod boot;
pub mod builder;
pub mod config;
/// The device binary checks live in `sandbox`, shared with skiff-jailer's launcher.
pub use sandbox::binary as device_binary;
pub mod device_process;
pub mod devices;
pub mod exit;
pub mod handover;
pub mod host;
pub mod image;
pub mod layout;
mod lifecycle;
pub mod logger;
pub mod memory;
pub mod metrics;
mod recovery;
mod replace;
pub mod report;
mod snapshot;
pub mod state;
mod successor;
pub mod terminal;
pub mod upgrade;
pub mod vcpu;
pub mod vmm;

/// An error and its causes, as one line: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Waits at most `timeout` (zero: not at all) for `fd` to be readable (or hung up); says
/// whether it is.
pub(crate) fn wait_readable(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll reads and writes the one pollfd, which lives across the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

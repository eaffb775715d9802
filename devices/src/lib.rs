//! skiff device models run as vhost-user backends: virtio-blk over a raw
//! image file (`skiff-blk`) and virtio-net over TAP devices (`skiff-net`).
//!
//! The queue logic lives here and is unit-tested with mock queues; the
//! binaries in `src/bin` only parse arguments and serve.

pub mod backend_common;
pub mod block;
pub mod block_backend;
mod block_uring;
pub mod chain;
pub mod disk;
pub mod inflight;
pub mod iov;
pub mod logger;
pub mod metrics;
pub mod net;
pub mod net_backend;
#[cfg(test)]
mod test_ring;
pub mod uring;
pub mod vring;
pub mod vu_proxy;
pub mod vu_socket;

/// Formats an error and its `source()` chain as `a: b: c`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

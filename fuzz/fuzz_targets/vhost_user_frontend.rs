//! skiff's vhost-user front end against a malicious backend: the VMM negotiates with a
//! "backend" that answers every request with bytes from the input (any header, any size,
//! truncated, or nothing), then activates the device with two good rings. Whatever the
//! backend says, the front end returns an error or a device, never panics, never allocates
//! what a reply's size field asks for, and never hangs (the stream has a timeout, as in
//! skiff).
//!
//! Input: a sequence of replies, each a little-endian u16 length then that many bytes,
//! written raw (header included) in answer to each message the front end sends.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vhost_user::{DeviceKind, VhostUserDevice};
use vmm::devices::virtio::{QueueConfig, VirtioDevice};

/// Reads one vhost-user message (12-byte header, then the size it gives, at most 4 KiB).
fn read_message(s: &mut UnixStream) -> bool {
    let mut hdr = [0u8; 12];
    if s.read_exact(&mut hdr).is_err() {
        return false;
    }
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]).min(4096) as usize;
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).is_ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(ram) = vmm::memory::create_guest_ram(1 << 20) else {
        return;
    };
    let Ok((front, mut back)) = UnixStream::pair() else {
        return;
    };
    let _ = front.set_read_timeout(Some(Duration::from_millis(10)));
    let _ = front.set_write_timeout(Some(Duration::from_millis(10)));
    let _ = back.set_read_timeout(Some(Duration::from_millis(10)));
    let replies = data.to_vec();
    let backend = std::thread::spawn(move || {
        let mut rest = &replies[..];
        while read_message(&mut back) {
            if rest.len() < 2 {
                // Out of replies: leave the front end to its timeout.
                continue;
            }
            let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
            let (reply, tail) = rest[2..].split_at(n);
            rest = tail;
            if back.write_all(reply).is_err() {
                break;
            }
        }
    });
    let kind = if data.first().is_some_and(|b| b & 1 == 1) {
        DeviceKind::Net
    } else {
        DeviceKind::Block
    };
    if let Ok(mut dev) = VhostUserDevice::new(kind, front, 4, ram.mem.clone()) {
        let q = |base: u64| QueueConfig {
            max_size: 256,
            size: 256,
            ready: true,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        };
        let queues = [q(0x1_0000), q(0x2_0000)];
        let features = dev.features();
        let _ = dev.activate(features, &queues[..dev.num_queues().min(2)]);
        let mut cfg = [0u8; 8];
        dev.read_config(0, &mut cfg);
        let _ = dev.reset();
    }
    let _ = backend.join();
});

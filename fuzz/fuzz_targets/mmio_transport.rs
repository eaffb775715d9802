//! The virtio-mmio register interface: any sequence of guest reads and writes, of any size
//! at any offset of the window, and broken-ring reports from the backend, never panics, and
//! a device is only ever activated with queues that passed the checks.
//!
//! Input: records of 7 bytes: op, offset (u16 LE), value (u32 LE). op & 3: 0 read, 1 write,
//! 2 a backend's broken-ring report, 3 a write of the same value to Status; op >> 2 & 3
//! picks the access size (4, 1, 2, 8).
#![no_main]

#[path = "common/device.rs"]
mod device;

use std::sync::{Arc, Mutex};

use device::{ram, CheckingDevice};
use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::transport::VirtioTransport;

fuzz_target!(|data: &[u8]| {
    let activations = Arc::new(Mutex::new(0));
    let mut t = VirtioTransport::new(
        Box::new(CheckingDevice {
            device_type: 2,
            queues: 2,
            activations,
        }),
        "fuzz".into(),
        ram(),
    );
    for r in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([r[1], r[2]])) % 0x200;
        let value = [r[3], r[4], r[5], r[6], r[3], r[4], r[5], r[6]];
        let size = [4, 1, 2, 8][usize::from(r[0] >> 2) & 3];
        match r[0] & 3 {
            0 => {
                let mut buf = [0u8; 8];
                t.mmio_read(offset, &mut buf[..size]);
            }
            1 => t.mmio_write(offset, &value[..size]),
            2 => {
                let _ = t.ring_broken();
            }
            _ => t.mmio_write(0x70, &value[..4]),
        }
    }
});

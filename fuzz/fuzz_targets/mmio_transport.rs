//! The virtio-mmio register interface: any sequence of guest reads and writes, of any size
//! at any offset of the window, and broken-ring reports from the backend, never panics, and
//! a device is only ever activated with queues that passed the checks.
//!
//! Input: records of 7 bytes: op, offset (u16 LE), value (u32 LE). op & 3: 0 read, 1 write,
//! 2 a backend's broken-ring report, 3 a write of the same value to Status; op >> 2 & 3
//! picks the access size (4, 1, 2, 8).
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::transport::VirtioTransport;
use vmm::devices::virtio::{QueueConfig, RamRanges, VirtioDevice, VirtioError};

/// RAM of this guest: 1 MiB low, 1 MiB above 4 GiB.
fn ram() -> RamRanges {
    RamRanges(vec![(0, 1 << 20), (4 << 30, (4 << 30) + (1 << 20))])
}

struct Device(Arc<Mutex<u32>>);

impl VirtioDevice for Device {
    fn device_type(&self) -> u32 {
        2
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn queue_max_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        (1 << 32) | (1 << 29) | 0b110
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, _: u64, queues: &[QueueConfig]) -> Result<(), VirtioError> {
        for q in queues.iter().filter(|q| q.ready) {
            assert!(q.check(&ram()).is_ok(), "activated with a bad queue: {q:?}");
        }
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Ok(())
    }
    fn reset(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let activations = Arc::new(Mutex::new(0));
    let mut t = VirtioTransport::new(Box::new(Device(activations)), "fuzz".into(), ram());
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

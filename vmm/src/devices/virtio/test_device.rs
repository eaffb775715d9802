//! A device model for the transports' unit tests: it records what it was asked.

use std::sync::{Arc, Mutex};

use super::{QueueConfig, RamRanges, VirtioDevice, VirtioError};

#[derive(Default)]
pub struct Seen {
    pub activated: Option<(u64, Vec<QueueConfig>)>,
    pub resets: u32,
}

pub struct FakeDevice(pub Arc<Mutex<Seen>>);

impl VirtioDevice for FakeDevice {
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
        (1 << 32) | 0b110
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, acked: u64, queues: &[QueueConfig]) -> Result<(), VirtioError> {
        self.0.lock().unwrap().activated = Some((acked, queues.to_vec()));
        Ok(())
    }
    fn reset(&mut self) -> Result<(), VirtioError> {
        self.0.lock().unwrap().resets += 1;
        Ok(())
    }
}

/// 256 MiB of RAM below a hole, 64 MiB above it.
pub fn ram() -> RamRanges {
    RamRanges(vec![(0, 256 << 20), (4 << 30, (4 << 30) + (64 << 20))])
}

//! The device the transport fuzz targets put behind a transport (included with `#[path]`):
//! it checks every queue it is activated with against the guest's RAM, and counts its
//! activations.

use std::sync::{Arc, Mutex};

use vmm::devices::virtio::{QueueConfig, RamRanges, VirtioDevice, VirtioError};

/// RAM of this guest: 1 MiB low, 1 MiB above 4 GiB.
pub fn ram() -> RamRanges {
    RamRanges(vec![(0, 1 << 20), (4 << 30, (4 << 30) + (1 << 20))])
}

/// A device of type `device_type` with `queues` queues.
pub struct CheckingDevice {
    pub device_type: u32,
    pub queues: usize,
    pub activations: Arc<Mutex<u32>>,
}

impl VirtioDevice for CheckingDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn num_queues(&self) -> usize {
        self.queues
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
        *self.activations.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        Ok(())
    }
    fn reset(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
}

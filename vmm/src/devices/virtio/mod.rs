//! virtio 1.x over MMIO or PCI, with device models that live in vhost-user device
//! processes.

pub mod mmio;
pub mod pci;
#[cfg(test)]
pub(crate) mod test_device;
pub mod transport;
pub mod vhost_user;

/// What the driver configured for one virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueConfig {
    /// Maximum size the device supports.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table guest-physical address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
}

/// The guest-physical ranges of guest RAM, `[start, end)`: a ring must lie wholly inside one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamRanges(pub Vec<(u64, u64)>);

impl RamRanges {
    /// Whether `[addr, addr + len)` lies wholly inside one range.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.0.iter().any(|&(s, e)| s <= addr && end <= e)
    }
}

/// Size of a split virtqueue's areas (virtio 1.2 §2.7), with room for the event index
/// fields whether or not VIRTIO_F_EVENT_IDX is negotiated.
fn ring_areas(q: &QueueConfig) -> [(&'static str, u64, u64, u64); 3] {
    let n = u64::from(q.size);
    [
        ("descriptor table", q.desc, 16 * n, 16),
        ("available ring", q.avail, 6 + 2 * n, 2),
        ("used ring", q.used, 6 + 8 * n, 4),
    ]
}

impl QueueConfig {
    /// Checks a queue the driver made ready before it reaches a backend: a size that is a
    /// power of two up to the maximum, each area aligned and wholly inside one RAM range.
    /// The error says what is wrong.
    pub fn check(&self, ram: &RamRanges) -> Result<(), String> {
        if self.size == 0 || !self.size.is_power_of_two() || self.size > self.max_size {
            return Err(format!(
                "size {} (a power of two up to {} is needed)",
                self.size, self.max_size
            ));
        }
        for (what, addr, len, align) in ring_areas(self) {
            if addr % align != 0 {
                return Err(format!("{what} at {addr:#x} is not {align}-byte aligned"));
            }
            if !ram.contains(addr, len) {
                return Err(format!(
                    "{what} at {addr:#x} ({len} bytes) is not wholly inside guest RAM"
                ));
            }
        }
        Ok(())
    }
}

/// Errors of a virtio device model.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The vhost-user backend failed.
    #[error(transparent)]
    VhostUser(#[from] vhost_user::VhostUserError),
}

/// A device model behind the transport.
pub trait VirtioDevice: Send {
    /// virtio device id (1 net, 2 block).
    fn device_type(&self) -> u32;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Maximum size of each queue.
    fn queue_max_size(&self) -> u16;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Reads device config space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start processing the ready queues.
    fn activate(&mut self, acked_features: u64, queues: &[QueueConfig]) -> Result<(), VirtioError>;
    /// The driver reset the device after activation: stop the queues.
    fn reset(&mut self) -> Result<(), VirtioError>;
    /// The vhost-user front end behind this device, for backend replacement.
    fn as_vhost_user(&mut self) -> Option<&mut vhost_user::VhostUserDevice> {
        None
    }
}

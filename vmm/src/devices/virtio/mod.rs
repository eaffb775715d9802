//! virtio 1.x over MMIO, with device models that live in vhost-user device processes.

pub mod mmio;
pub mod vhost_user;

/// What the driver configured for one virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

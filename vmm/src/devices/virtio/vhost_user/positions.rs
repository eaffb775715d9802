//! Stopping a device's rings where they stand and starting them again there, on the same
//! backend (a snapshot while the VM is paused) or on a fresh one (a restored VM).

use serde::{Deserialize, Serialize};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

use super::{kreq, start_ring, RingFds, RingMode, VhostUserDevice, VhostUserError};
use crate::devices::virtio::QueueConfig;

/// Where one running ring stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPosition {
    /// Queue index.
    pub queue: usize,
    /// The next available-ring index the backend takes (GET_VRING_BASE).
    pub base: u16,
}

impl VhostUserDevice {
    /// Stops every running ring on the backend and returns where each stood. GET_VRING_BASE
    /// returns once the requests in progress are complete, so the used rings in guest memory
    /// are final. If a ring cannot be stopped, the ones already stopped are started again
    /// and the error returned.
    pub fn stop_rings(&mut self) -> Result<Vec<RingPosition>, VhostUserError> {
        let enable = Self::uses_ring_enable(self.backend_features);
        let mut stopped = Vec::new();
        for i in self.started.clone() {
            let r = if enable {
                kreq("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, false))
            } else {
                Ok(())
            }
            .and_then(|()| kreq("GET_VRING_BASE", self.frontend.get_vring_base(i)));
            match r {
                Ok(base) => stopped.push(RingPosition {
                    queue: i,
                    base: base as u16,
                }),
                Err(e) => {
                    log::error!("queue {i}: cannot stop it on the backend: {e}");
                    return Err(e);
                }
            }
        }
        Ok(stopped)
    }

    /// Starts the rings at `rings` on this device's backend, whose features and memory
    /// table are set: after [`VhostUserDevice::stop_rings`] on the same backend. Each ring
    /// is kicked once, for a kick that arrived while it was stopped.
    pub fn resume_rings(
        &mut self,
        queues: &[QueueConfig],
        rings: &[RingPosition],
    ) -> Result<(), VhostUserError> {
        let mode = RingMode {
            enable: Self::uses_ring_enable(self.backend_features),
            ack: self.ack(),
        };
        for r in rings {
            let i = r.queue;
            let q = queues
                .get(i)
                .filter(|_| i < self.kicks.len())
                .ok_or(VhostUserError::BadRingAddress(i, 0))?;
            let data = self.ring_config(i, q)?;
            start_ring(
                &mut self.frontend,
                mode,
                i,
                &data,
                u32::from(r.base),
                RingFds {
                    call: &self.call,
                    kick: &self.kicks[i],
                    err: &self.err,
                },
            )?;
            let _ = self.kicks[i].write(1);
        }
        // Completions the backend made while the guest could not be told (the pause).
        let _ = self.call.write(1);
        Ok(())
    }

    /// A fresh backend takes a device whose driver is running (a restored VM): the
    /// features the driver acknowledged, the memory table, a new inflight area, and the
    /// rings at `rings`.
    pub fn start_at(
        &mut self,
        acked: u64,
        queues: &[QueueConfig],
        rings: &[RingPosition],
    ) -> Result<(), VhostUserError> {
        let missing = acked & !super::VirtioDevice::features(self);
        if missing != 0 {
            return Err(VhostUserError::Incompatible(format!(
                "it lacks features {missing:#x} that the guest driver uses"
            )));
        }
        if let Some(r) = rings.iter().find(|r| r.queue >= self.num_queues) {
            return Err(VhostUserError::Incompatible(format!(
                "it offers {} queue(s); the guest uses queue {}",
                self.num_queues, r.queue
            )));
        }
        self.send_features_and_memory(acked)?;
        self.set_inflight(None)?;
        self.resume_rings(queues, rings)?;
        self.started = rings.iter().map(|r| r.queue).collect();
        Ok(())
    }

    /// The device's config space as the backend reported it.
    pub fn config_space(&self) -> &[u8] {
        &self.config
    }
}

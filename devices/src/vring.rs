//! The vring type both backends use: vhost-user-backend's `VringRwLock`, plus the ring's
//! error eventfd (VHOST_USER_SET_VRING_ERR) and a "broken" state, and the one way the
//! backends take requests from a ring ([`Vring::pop`]).
//!
//! # Broken rings
//!
//! A ring is broken when the guest left it in a state the device cannot go on from: an
//! available index more than a queue size ahead of the next entry, an available entry
//! that cannot be read, a head index at or past the queue size, a used ring or event
//! field outside guest memory. There is no request to fail then (or none that could be
//! completed), and retrying would spin: the backend marks the ring broken
//! ([`Vring::mark_broken`]), writes 1 to the ring's error eventfd once, and stops touching
//! the ring. The frontend turns the signal into VIRTIO_CONFIG_S_NEEDS_RESET for the driver.
//! A ring that breaks before SET_VRING_ERR gave it an eventfd is signalled when one arrives.
//!
//! The ring stays broken until the frontend starts it again. vhost-user-backend starts a
//! ring (`VringT::set_queue_ready(true)`) on the first SET_VRING_KICK (or SET_VRING_CALL)
//! that finds it stopped with a kick fd, i.e. on the SET_VRING_KICK that follows the
//! GET_VRING_BASE which stopped it: that is what a device reset or a re-initialisation of
//! the ring by the frontend sends, and that call clears the state. Nothing else does:
//! SET_VRING_ADDR, SET_VRING_BASE or SET_VRING_ENABLE on a ring that was not stopped leave
//! it broken, and VHOST_USER_RESET_DEVICE is never sent (the backends do not offer the
//! RESET_DEVICE protocol feature).
//!
//! # Why a wrapper type
//!
//! vhost-user-backend stores the eventfd of SET_VRING_ERR through `VringT::set_err` in a
//! private field of its `VringState` and offers no way to signal it. The backend chooses
//! its vring type (`VhostUserBackend::Vring`), so a type that implements `VringT` by
//! delegating to `VringRwLock` receives the fd on that very call, and sees the ring start
//! (`set_queue_ready`) that ends the broken state, for both backends and without parsing
//! the protocol. Intercepting SET_VRING_ERR in `vu_proxy` instead would have needed a table
//! of fds by queue index shared between the relay thread and the workers, a second signal
//! to learn of ring restarts, and would serve skiff-blk only (skiff-net is not relayed).

use std::fs::File;
use std::io::{self, Write};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLockReadGuard, RwLockWriteGuard};

use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::backend_common::Mem;

/// Why a ring cannot be served any more (all of them are the guest's doing).
#[derive(Debug, thiserror::Error)]
pub enum VringError {
    /// The available index is more than a queue size ahead of the next entry.
    #[error(
        "available index {avail} is more than the queue size {size} ahead of the next entry {next}"
    )]
    AvailIndex {
        /// The index the driver published.
        avail: u16,
        /// The next entry the device would take.
        next: u16,
        /// The queue size.
        size: u16,
    },
    /// The entry of the available ring cannot be read.
    #[error("available ring entry {0} cannot be read")]
    AvailEntry(u16),
    /// The driver made a head available that the ring does not have.
    #[error("descriptor head {head} is beyond the queue size {size}")]
    Head {
        /// The head index.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// Reading or writing the ring in guest memory failed.
    #[error("ring access failed")]
    Queue(#[source] virtio_queue::Error),
}

/// What [`Vring::mark_broken`] did.
#[derive(Debug)]
pub enum Breaking {
    /// The ring was broken already: nothing done.
    Already,
    /// The ring is now broken and its error eventfd was written.
    Signalled,
    /// The ring is now broken; it has no error eventfd yet (it is written when one arrives).
    NoErrorFd,
    /// The ring is now broken; writing its error eventfd failed.
    SignalFailed(io::Error),
}

#[derive(Default)]
struct FaultState {
    /// The eventfd of SET_VRING_ERR.
    err: Option<File>,
    /// The error eventfd was written since the ring broke.
    signalled: bool,
}

#[derive(Default)]
struct Fault {
    /// Read without the lock on every event; written under it.
    broken: AtomicBool,
    state: Mutex<FaultState>,
}

impl Fault {
    fn state(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn signal(state: &mut FaultState) -> Option<io::Result<()>> {
    let file = state.err.as_ref()?;
    state.signalled = true;
    let mut f = file;
    Some(f.write_all(&1u64.to_ne_bytes()))
}

/// A vring of either backend (see the module documentation). Clones share the ring.
#[derive(Clone)]
pub struct Vring {
    inner: VringRwLock<Mem>,
    fault: Arc<Fault>,
}

impl Vring {
    /// Whether the ring is broken (see the module documentation).
    pub fn is_broken(&self) -> bool {
        self.fault.broken.load(Ordering::Acquire)
    }

    /// Whether the ring may be served: started, enabled and not broken.
    pub fn running(&self) -> bool {
        let state = self.inner.get_ref();
        state.get_queue().ready() && state.is_enabled() && !self.is_broken()
    }

    /// Marks the ring broken and writes its error eventfd, the first time only.
    pub fn mark_broken(&self) -> Breaking {
        let mut state = self.fault.state();
        if self.fault.broken.swap(true, Ordering::AcqRel) {
            return Breaking::Already;
        }
        match signal(&mut state) {
            None => Breaking::NoErrorFd,
            Some(Ok(())) => Breaking::Signalled,
            Some(Err(e)) => Breaking::SignalFailed(e),
        }
    }

    /// Takes the next request from the available ring: `Ok(None)` when there is none, or
    /// when the ring is stopped or broken; an error when the ring must be marked broken.
    ///
    /// Checks what virtio-queue leaves to the caller or only logs (it logs an error and
    /// returns nothing, on every call, for an available index too far ahead, while
    /// `enable_notification` keeps reporting work): the available index against the queue
    /// size, the available entry, and the head against the queue size. The check and the
    /// pop hold one vring lock, so a ring stopped meanwhile (GET_VRING_BASE) is not read.
    pub fn pop<M>(&self, mem: M) -> Result<Option<DescriptorChain<M>>, VringError>
    where
        M: Clone + Deref,
        M::Target: GuestMemory,
    {
        let mut state = self.inner.get_mut();
        let queue = state.get_queue_mut();
        if !queue.ready() || self.is_broken() {
            return Ok(None);
        }
        let (next, size) = (queue.next_avail(), queue.size());
        let avail = queue
            .avail_idx(&*mem, Ordering::Acquire)
            .map_err(VringError::Queue)?
            .0;
        let ahead = avail.wrapping_sub(next);
        if ahead == 0 {
            return Ok(None);
        }
        if ahead > size {
            return Err(VringError::AvailIndex { avail, next, size });
        }
        // The iterator reads the index again: a driver that moved it meanwhile gets the
        // same checks (an error, or no entry, which breaks the ring as well).
        let chain = queue
            .iter(mem)
            .map_err(VringError::Queue)?
            .next()
            .ok_or(VringError::AvailEntry(next))?;
        let head = chain.head_index();
        if head >= size {
            return Err(VringError::Head { head, size });
        }
        Ok(Some(chain))
    }
}

impl<'a> VringStateGuard<'a, Mem> for Vring {
    type G = RwLockReadGuard<'a, VringState<Mem>>;
}

impl<'a> VringStateMutGuard<'a, Mem> for Vring {
    type G = RwLockWriteGuard<'a, VringState<Mem>>;
}

impl VringT<Mem> for Vring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, virtio_queue::Error> {
        Ok(Vring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            fault: Arc::new(Fault::default()),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), virtio_queue::Error> {
        self.inner.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.inner.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, virtio_queue::Error> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), virtio_queue::Error> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, virtio_queue::Error> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), virtio_queue::Error> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, virtio_queue::Error> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    /// Starting the ring (the SET_VRING_KICK after GET_VRING_BASE) ends its broken state.
    fn set_queue_ready(&self, ready: bool) {
        if ready {
            let mut state = self.fault.state();
            state.signalled = false;
            self.fault.broken.store(false, Ordering::Release);
        }
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.inner.set_kick(file)
    }

    fn read_kick(&self) -> io::Result<bool> {
        self.inner.read_kick()
    }

    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(file)
    }

    /// Keeps the fd here (the crate would keep it out of reach); a ring that broke before
    /// it had one is signalled now.
    fn set_err(&self, file: Option<File>) {
        let mut state = self.fault.state();
        state.err = file;
        if self.is_broken() && !state.signalled {
            if let Some(Err(e)) = signal(&mut state) {
                log::error!("cannot signal the error eventfd of a broken ring: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddressSpace;

    use crate::test_ring::{err_eventfd, eventfd_count, memory, Ring};

    #[test]
    fn a_ring_breaks_once_until_it_is_started_again() {
        let (mem, atomic) = memory();
        let ring = Ring::new(&mem, 0, 16);
        let v: Vring = ring.vring(&atomic, false);
        assert!(v.running());
        // Broken before SET_VRING_ERR: signalled when the fd arrives, once.
        assert!(matches!(v.mark_broken(), Breaking::NoErrorFd));
        assert!(v.is_broken() && !v.running());
        let (theirs, err) = err_eventfd();
        v.set_err(Some(theirs.try_clone().unwrap()));
        assert_eq!(eventfd_count(&err), Some(1));
        v.set_err(Some(theirs));
        assert!(matches!(v.mark_broken(), Breaking::Already));
        assert_eq!(eventfd_count(&err), None);
        // Nothing is popped from a broken ring, whatever the guest puts there.
        ring.desc(0, 0x10_0000, 16, 0, 0);
        ring.push(0);
        assert!(v.pop(atomic.memory()).unwrap().is_none());
        // Enabling it again is no reset; stopping and starting it is.
        v.set_enabled(true);
        assert!(v.is_broken());
        v.set_queue_ready(false);
        v.set_queue_ready(true);
        assert!(v.running());
        assert_eq!(v.pop(atomic.memory()).unwrap().unwrap().head_index(), 0);
        assert!(matches!(v.mark_broken(), Breaking::Signalled));
        assert_eq!(eventfd_count(&err), Some(1));
    }

    #[test]
    fn pop_checks_what_the_guest_wrote() {
        let (mem, atomic) = memory();
        let ring = Ring::new(&mem, 0, 16);
        let v: Vring = ring.vring(&atomic, false);
        assert!(v.pop(atomic.memory()).unwrap().is_none(), "empty");
        ring.set_avail_idx(17);
        assert!(matches!(
            v.pop(atomic.memory()),
            Err(VringError::AvailIndex {
                avail: 17,
                next: 0,
                size: 16
            })
        ));
        ring.set_avail_idx(0);
        ring.push(16);
        assert!(matches!(
            v.pop(atomic.memory()),
            Err(VringError::Head { head: 16, size: 16 })
        ));
        // Stopped (GET_VRING_BASE): not read at all.
        v.set_queue_ready(false);
        ring.push(3);
        assert!(v.pop(atomic.memory()).unwrap().is_none());
    }
}

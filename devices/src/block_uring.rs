//! skiff-blk's request pipeline over its queue's io_uring (crate::uring): every request
//! the ring holds is taken, the reads and writes are submitted together in one
//! io_uring_enter, and each completes into the used ring as its I/O ends, out of order,
//! while more requests are taken and submitted; the guest is signalled once per batch of
//! completions. While requests are in flight the worker sleeps until one completes or the
//! guest kicks (its ring's fd and the queue's kick eventfd, in one poll), so a request the
//! guest adds meanwhile is submitted at once, not after the next completion. Without
//! O_DIRECT each request is submitted as it is taken (see `eager`).
//!
//! The guarantees of the synchronous path are kept: nothing is in flight when the worker
//! leaves its event (GET_VRING_BASE, which waits for the worker, sees a quiet queue and
//! every taken request in the used ring); every request is recorded in the inflight area
//! when taken and cleared as it completes (the area handles completions out of order); a
//! request that is not a plain read or write (flush, GET_ID, discard, write-zeroes,
//! anything malformed, O_DIRECT on unaligned buffers) waits until every request before it
//! has completed and is then served synchronously, so a flush covers every write the guest
//! saw complete and every write taken before it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vhost_user_backend::VringT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryLoadGuard, GuestMemoryMmap};

use crate::backend_common::host_fatal;

use crate::block::{finish_image_io, image_io, process_request, reject_chain, ImageIo};
use crate::block_backend::{BlockBackend, BlockBackendError, BlockVring};
use crate::chain::{self, ChainError};
use crate::inflight::QueueInflight;
use crate::uring::ImageRing;
use crate::vring::VringError;

/// A request taken from the ring that does not go to the io_uring.
enum Later {
    Chain(u16, Vec<Descriptor>),
    Bad(u16, ChainError),
}

/// The requests in flight, by io_uring tag (their slot).
struct Slots {
    slots: Vec<Option<(u16, ImageIo)>>,
    free: Vec<usize>,
}

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
        }
    }

    fn in_flight(&self) -> bool {
        self.free.len() < self.slots.len()
    }
}

impl BlockBackend {
    /// Takes and completes every available request of `vring` through `ring`; returns
    /// whether some were completed since the guest was last signalled.
    pub(crate) fn drain_uring(
        &self,
        vring: &BlockVring,
        ring: &mut ImageRing,
        track: Option<&QueueInflight<'_>>,
    ) -> Result<bool, BlockBackendError> {
        // Declared before `slots`: the guest memory the requests' buffers are in outlives
        // every request.
        let mem = self.memory().memory();
        let mut slots = Slots::new(ring.capacity() as usize);
        // Completions of an earlier drain cannot be there (every drain waits for its own),
        // but a stale one must never complete a request of this one.
        let mut stale = Vec::new();
        ring.reap(&mut stale);
        let r = self.pipeline(vring, ring, track, &mem, &mut slots);
        if slots.in_flight() {
            // A ring error (the guest's) or a host error ended the pipeline with requests in
            // flight: their iovecs (in `slots`) and buffers (in `mem`) must stay until the
            // kernel is done with them, and nothing may be in flight once the worker leaves
            // its event (GET_VRING_BASE waits for that). Their results are dropped: the ring
            // is broken, and the inflight area still holds them for a successor.
            abandon(ring, &mut slots);
        }
        r
    }

    /// [`Self::drain_uring`]'s work.
    fn pipeline(
        &self,
        vring: &BlockVring,
        ring: &mut ImageRing,
        track: Option<&QueueInflight<'_>>,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap<()>>,
        slots: &mut Slots,
    ) -> Result<bool, BlockBackendError> {
        // The kick eventfd, duplicated (a SET_VRING_KICK meanwhile closes the vring's copy)
        // the first time the worker sleeps.
        let mut kick: Option<Option<OwnedFd>> = None;
        let event_idx = self.event_idx();
        // Through the page cache a read or write mostly completes within its submission: each
        // is then submitted and completed as it is taken, so the guest works on the first
        // while the next is copied, instead of the whole batch being copied first. With
        // O_DIRECT the I/O completes later anyway and one submission per batch is cheaper.
        let eager = !self.disk().direct();
        let mut unsignalled = false;
        // A guest fault met while taking requests: reported once nothing is in flight.
        let mut fault = None;
        loop {
            let mut later = None;
            while fault.is_none() && later.is_none() {
                let Some(&slot) = slots.free.last() else {
                    break;
                };
                let mut chain = match vring.pop(mem.clone()) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        fault = Some(e);
                        break;
                    }
                };
                let head = chain.head_index();
                if let Some(t) = track {
                    t.begin(head);
                }
                let descs = match chain::collect(chain.by_ref()) {
                    Ok(d) => d,
                    Err(e) => {
                        later = Some(Later::Bad(head, e));
                        break;
                    }
                };
                let Some(io) = image_io(self.disk(), mem, &descs) else {
                    later = Some(Later::Chain(head, descs));
                    break;
                };
                let (_, io) = slots.slots[slot].insert((head, io));
                // SAFETY: the iovecs live in `slots` and point into guest memory that `mem`
                // keeps mapped; both stay until this slot's completion is reaped, and this
                // function reaps every completion before it returns.
                if unsafe { ring.push(io.write, &io.iovs, io.offset, slot as u64) } {
                    slots.free.pop();
                    if eager {
                        ring.submit().map_err(BlockBackendError::Uring)?;
                        if ring.has_completions() {
                            unsignalled |= self.reap(vring, ring, track, mem, slots)?;
                            unsignalled = signal_if_needed(vring, unsignalled)?;
                        }
                    }
                } else {
                    // The submission queue holds as many entries as there are slots, so it
                    // cannot be full; were it, the request would be served synchronously.
                    slots.slots[slot] = None;
                    later = Some(Later::Chain(head, descs));
                }
            }
            if let Some(l) = later {
                // Every request taken before it completes first.
                while slots.in_flight() {
                    ring.submit_and_wait(1).map_err(BlockBackendError::Uring)?;
                    self.reap(vring, ring, track, mem, slots)?;
                }
                self.serve_later(vring, track, mem, l)?;
                unsignalled = true;
                continue;
            }
            if !slots.in_flight() {
                break;
            }
            let kick = kick.get_or_insert_with(|| {
                vring
                    .get_ref()
                    .get_kick()
                    .as_ref()
                    .and_then(|k| dup_cloexec(k.as_raw_fd()))
            });
            // Requests the pop loop could take now: otherwise (no free slot, a fault, the
            // ring stopped) only a completion is worth waking for.
            let can_take =
                !slots.free.is_empty() && fault.is_none() && vring.get_ref().get_queue().ready();
            self.wait(vring, ring, kick.as_ref(), event_idx && can_take)?;
            unsignalled |= self.reap(vring, ring, track, mem, slots)?;
            unsignalled = signal_if_needed(vring, unsignalled)?;
        }
        match fault {
            Some(e) => Err(e.into()),
            None => Ok(unsignalled),
        }
    }

    /// Submits what is queued, then sleeps until a completion waits or the guest kicks
    /// (with `event_idx`, notifications are on while it sleeps and off again after; the
    /// caller passes false when it could not take a new request anyway, so that new
    /// requests do not wake it in a loop).
    fn wait(
        &self,
        vring: &BlockVring,
        ring: &mut ImageRing,
        kick: Option<&OwnedFd>,
        event_idx: bool,
    ) -> Result<(), BlockBackendError> {
        ring.submit().map_err(BlockBackendError::Uring)?;
        if ring.has_completions() {
            return Ok(());
        }
        if ring.unsubmitted() > 0 {
            // The kernel took none of them for now (EAGAIN: no memory for requests): do not
            // sleep on I/O that is not in flight; submit again.
            std::thread::yield_now();
            return Ok(());
        }
        if event_idx && vring.enable_notification().map_err(VringError::Queue)? {
            // Requests arrived meanwhile: take them.
            vring.disable_notification().map_err(VringError::Queue)?;
            return Ok(());
        }
        let mut fds = [
            libc::pollfd {
                fd: ring.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: kick.map_or(-1, |k| k.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: ppoll reads and writes the two pollfds, which live across the call;
            // no timeout and no signal mask are passed.
            let r = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, std::ptr::null(), std::ptr::null()) };
            if r >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(BlockBackendError::Uring(crate::uring::UringError::Poll(e)));
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            let mut n = [0u8; 8];
            // SAFETY: reads at most 8 bytes into `n`; the eventfd is readable, so this does
            // not block.
            unsafe { libc::read(fds[1].fd, n.as_mut_ptr().cast(), n.len()) };
        }
        if event_idx {
            vring.disable_notification().map_err(VringError::Queue)?;
        }
        Ok(())
    }

    /// Completes every request whose I/O ended; returns whether any did.
    fn reap(
        &self,
        vring: &BlockVring,
        ring: &mut ImageRing,
        track: Option<&QueueInflight<'_>>,
        mem: &GuestMemoryMmap<()>,
        slots: &mut Slots,
    ) -> Result<bool, BlockBackendError> {
        let mut done = Vec::new();
        ring.reap(&mut done);
        let mut any = false;
        for (tag, result) in done {
            let Ok(slot) = usize::try_from(tag) else {
                continue;
            };
            let Some((head, mut io)) = slots.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            slots.free.push(slot);
            let len = finish_image_io(self.disk(), self.block_metrics(), mem, &mut io, result);
            Self::complete(vring, track, head, len)?;
            any = true;
        }
        Ok(any)
    }

    fn serve_later(
        &self,
        vring: &BlockVring,
        track: Option<&QueueInflight<'_>>,
        mem: &GuestMemoryMmap<()>,
        l: Later,
    ) -> Result<(), BlockBackendError> {
        let (head, len) = match l {
            Later::Chain(head, descs) => (
                head,
                process_request(self.disk(), self.block_metrics(), mem, head, &descs),
            ),
            Later::Bad(head, e) => (head, reject_chain(self.block_metrics(), head, &e)),
        };
        Self::complete(vring, track, head, len)
    }
}

/// A close-on-exec duplicate of `fd`.
fn dup_cloexec(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an fd the vring holds open; the result is checked.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: `new` is a fresh fd owned by nobody else.
    (new >= 0).then(|| unsafe { OwnedFd::from_raw_fd(new) })
}

/// Waits for every request in flight and drops its result.
fn abandon(ring: &mut ImageRing, slots: &mut Slots) {
    let mut done = Vec::new();
    while slots.in_flight() {
        if let Err(e) = ring.submit_and_wait(1) {
            // Requests whose end cannot be waited for must not outlive their buffers: the
            // process exits (the kernel cancels them) and the VMM restarts it.
            host_fatal(&e);
        }
        done.clear();
        ring.reap(&mut done);
        for &(tag, _) in &done {
            let Ok(slot) = usize::try_from(tag) else {
                continue;
            };
            if slots.slots.get_mut(slot).and_then(Option::take).is_some() {
                slots.free.push(slot);
            }
        }
    }
}

/// Signals the guest when completions wait unsignalled and the ring wants an interrupt;
/// returns whether completions are still unsignalled.
fn signal_if_needed(vring: &BlockVring, unsignalled: bool) -> Result<bool, BlockBackendError> {
    if unsignalled && vring.needs_notification().map_err(VringError::Queue)? {
        vring
            .signal_used_queue()
            .map_err(BlockBackendError::Signal)?;
        return Ok(false);
    }
    Ok(unsignalled)
}

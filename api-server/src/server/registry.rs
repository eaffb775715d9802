//! The connections being served, at most [`Limits::max_connections`], each by a thread of
//! its own, with the phase the thread is in: so that the accept thread can free a thread
//! for a client whose request waits, and shutdown can end them all.
//!
//! A thread is taken from a connection only when its client is stuck: lingering after a
//! refused request (first), or stalled in a request head or body, or in taking an answer,
//! for at least [`Limits::evict_grace`] (oldest first); that connection is closed. A
//! request with the VMM, or a connection waiting a moment for its next request (it soon
//! gives its thread back on its own, see [`super::conn`]), is never interrupted.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::Limits;

/// What a connection's thread is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting a moment for the next request.
    Idle,
    /// Reading a request head or body.
    Reading,
    /// Waiting for the VMM's answer.
    Vmm,
    /// Writing an answer.
    Writing,
    /// Discarding what a refused client still sends before closing.
    Lingering,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    stream: Arc<UnixStream>,
    phase: Phase,
    /// When the phase began.
    since: Instant,
    /// Shut down to free its thread; the thread is on the way out.
    evicted: bool,
}

#[derive(Debug, Default)]
struct Table {
    slots: Vec<Slot>,
    next_id: u64,
}

/// The table of served connections, and the eventfd that wakes the accept thread.
#[derive(Debug)]
pub struct Registry {
    table: Mutex<Table>,
    changed: Condvar,
    /// Written when a thread leaves and at shutdown.
    wake: EventFd,
    limits: Limits,
}

impl Registry {
    /// An empty table; `wake` is the accept thread's eventfd.
    pub fn new(limits: Limits, wake: EventFd) -> Registry {
        Registry {
            table: Mutex::new(Table::default()),
            changed: Condvar::new(),
            wake,
            limits,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The accept thread's eventfd.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Wakes the accept thread.
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake the skiff-api thread: {e}");
        }
    }

    /// Whether a thread may start for one more connection.
    pub fn has_room(&self) -> bool {
        self.table().slots.len() < self.limits.max_connections
    }

    /// Connections being served.
    pub fn len(&self) -> usize {
        self.table().slots.len()
    }

    /// Registers a connection about to get its thread, in [`Phase::Reading`]. The slot is
    /// freed when the ticket drops.
    pub fn admit(self: &Arc<Self>, stream: Arc<UnixStream>) -> Ticket {
        let mut t = self.table();
        let id = t.next_id;
        t.next_id += 1;
        t.slots.push(Slot {
            id,
            stream,
            phase: Phase::Reading,
            since: Instant::now(),
            evicted: false,
        });
        Ticket {
            registry: Arc::clone(self),
            id,
        }
    }

    /// Closes the connection of a stuck client (see the module's notes) to free its
    /// thread, unless one is already on its way out. Its thread's exit wakes the accept
    /// thread.
    pub fn evict_one(&self) {
        let mut t = self.table();
        if t.slots.iter().any(|s| s.evicted) {
            return;
        }
        let now = Instant::now();
        let grace = self.limits.evict_grace;
        let victim = t
            .slots
            .iter_mut()
            .filter(|s| match s.phase {
                Phase::Lingering => true,
                Phase::Reading | Phase::Writing => now.saturating_duration_since(s.since) >= grace,
                Phase::Idle | Phase::Vmm => false,
            })
            .min_by_key(|s| (s.phase != Phase::Lingering, s.since));
        if let Some(slot) = victim {
            debug!(
                "all {} API connection threads busy: closing a connection {:?} for {:?}",
                self.limits.max_connections,
                slot.phase,
                now.saturating_duration_since(slot.since)
            );
            slot.evicted = true;
            let _ = slot.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Shuts down the connections `which` selects by phase: their threads' reads and
    /// writes end at once.
    pub fn shutdown(&self, which: impl Fn(Phase) -> bool) {
        for s in self.table().slots.iter().filter(|s| which(s.phase)) {
            let _ = s.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits until every connection's thread has left, or `deadline`; true if they have.
    pub fn wait_empty(&self, deadline: Instant) -> bool {
        let mut t = self.table();
        while !t.slots.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            t = self
                .changed
                .wait_timeout(t, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// Whether `stream` has bytes (or an end of stream) waiting to be read.
pub fn readable(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd that lives on this stack frame for the call; the fd
    // stays open because the caller borrows the stream. A zero timeout never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents != 0
}

/// A connection's thread's place in the [`Registry`]; dropping it frees the place and
/// wakes the accept thread.
#[derive(Debug)]
pub struct Ticket {
    registry: Arc<Registry>,
    id: u64,
}

impl Ticket {
    /// Records that the connection's thread enters `phase`. False when the connection
    /// was closed to free its thread: the thread should leave.
    pub fn enter(&self, phase: Phase) -> bool {
        let mut t = self.registry.table();
        match t.slots.iter_mut().find(|s| s.id == self.id) {
            Some(s) if !s.evicted => {
                s.phase = phase;
                s.since = Instant::now();
                true
            }
            _ => false,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self.registry.table();
        t.slots.retain(|s| s.id != self.id);
        drop(t);
        self.registry.changed.notify_all();
        self.registry.wake();
    }
}

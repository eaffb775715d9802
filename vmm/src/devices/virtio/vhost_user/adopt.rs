//! Handing a running vhost-user front end to the VMM process that replaces this one (the
//! VMM's live upgrade): what was negotiated, as data, and the fds, so that the new process
//! goes on with the same connection, eventfds and inflight area while the device process
//! notices nothing.
//!
//! The vhost crate's `Frontend` keeps what it negotiated (the backend's features, the
//! acknowledged protocol features, which decide whether a request waits for REPLY_ACK) in
//! private fields, with no way to set them but the requests themselves. A new `Frontend`
//! over the same connection is brought in step by repeating the harmless ones:
//! GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES with what was acknowledged,
//! GET_QUEUE_NUM, and SET_FEATURES with what the driver acknowledged. A backend with
//! VHOST_USER_F_PROTOCOL_FEATURES keeps its rings as they are on SET_FEATURES (vhost-user
//! spec, "Ring states"); no ring is touched. SET_OWNER is not repeated: the connection is
//! owned already.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{kreq, DeviceKind, InflightFd, VhostUserDevice, VhostUserError};

/// A front end's negotiated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendState {
    /// Block or net.
    pub kind: DeviceKind,
    /// The most queues asked of the backend.
    pub max_queues: usize,
    /// Features the backend offered.
    pub backend_features: u64,
    /// Protocol features acknowledged.
    pub protocol: u64,
    /// Queues the device has.
    pub num_queues: usize,
    /// Config space.
    pub config: Vec<u8>,
    /// Rings the backend runs.
    pub started: Vec<usize>,
    /// The inflight area's geometry `[mmap_size, mmap_offset, num_queues, queue_size]`.
    pub inflight: Option<[u64; 4]>,
}

/// A front end's fds, in the order [`VhostUserDevice::handover_fds`] lists them.
pub struct FrontendFds {
    /// The vhost-user connection.
    pub socket: OwnedFd,
    /// The call eventfd (KVM irqfd).
    pub call: OwnedFd,
    /// The ring-error eventfd.
    pub err: OwnedFd,
    /// One kick eventfd (KVM ioeventfd) per queue.
    pub kicks: Vec<OwnedFd>,
    /// The inflight area's memfd.
    pub inflight: Option<OwnedFd>,
}

impl FrontendFds {
    /// How many fds a front end in `state` hands over.
    pub fn count(state: &FrontendState) -> usize {
        3 + state.num_queues + usize::from(state.inflight.is_some())
    }

    /// Takes them, in order, from `fds`.
    pub fn take(
        state: &FrontendState,
        fds: &mut impl Iterator<Item = OwnedFd>,
    ) -> Result<Self, VhostUserError> {
        let mut next = || {
            fds.next()
                .ok_or_else(|| VhostUserError::Incompatible("too few fds handed over".into()))
        };
        Ok(FrontendFds {
            socket: next()?,
            call: next()?,
            err: next()?,
            kicks: (0..state.num_queues)
                .map(|_| next())
                .collect::<Result<_, _>>()?,
            inflight: match state.inflight {
                Some(_) => Some(next()?),
                None => None,
            },
        })
    }
}

fn eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the fd is an eventfd the previous VMM created and handed over; we own it.
    unsafe {
        <EventFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd))
    }
}

impl VhostUserDevice {
    /// What was negotiated, for the VMM that takes the device over.
    pub fn handover_state(&self, max_queues: usize) -> FrontendState {
        FrontendState {
            kind: self.kind,
            max_queues,
            backend_features: self.backend_features,
            protocol: self.protocol.bits(),
            num_queues: self.num_queues,
            config: self.config.clone(),
            started: self.started.clone(),
            inflight: self.inflight.as_ref().map(|a| {
                [
                    a.info.mmap_size,
                    a.info.mmap_offset,
                    u64::from(a.info.num_queues),
                    u64::from(a.info.queue_size),
                ]
            }),
        }
    }

    /// The fds to hand over, in the order [`FrontendFds::take`] takes them.
    pub fn handover_fds(&self) -> Vec<BorrowedFd<'_>> {
        // SAFETY: the connection's fd lives as long as `self.frontend`, which `self` owns.
        let socket = unsafe { BorrowedFd::borrow_raw(self.frontend.as_raw_fd()) };
        let mut v = vec![socket];
        // SAFETY: as above, for the eventfds `self` owns.
        let fd = |e: &EventFd| unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) };
        v.push(fd(&self.call));
        v.push(fd(&self.err));
        v.extend(self.kicks.iter().map(fd));
        if let Some(a) = &self.inflight {
            // SAFETY: as above, for the inflight memfd.
            v.push(unsafe { BorrowedFd::borrow_raw(a.file.as_raw_fd()) });
        }
        v
    }

    /// The device a previous VMM process ran, over the connection and eventfds it handed
    /// over, with the front end brought in step (see the module comment). `acked` is what
    /// the guest driver acknowledged when the device is active.
    pub fn adopt(
        state: &FrontendState,
        fds: FrontendFds,
        mem: GuestMemoryMmap,
        acked: Option<u64>,
    ) -> Result<Self, VhostUserError> {
        let stream = UnixStream::from(fds.socket);
        let mut frontend = Frontend::from_stream(stream, state.max_queues as u64);
        let offered = kreq("GET_FEATURES", frontend.get_features())?;
        if offered != state.backend_features {
            return Err(VhostUserError::Incompatible(format!(
                "the backend now offers features {offered:#x}, not {:#x}",
                state.backend_features
            )));
        }
        let protocol = VhostUserProtocolFeatures::from_bits_truncate(state.protocol);
        if offered & super::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            kreq("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            kreq(
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(protocol),
            )?;
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                kreq("GET_QUEUE_NUM", frontend.get_queue_num())?;
            }
        }
        let inflight = match (state.inflight, fds.inflight) {
            (Some([mmap_size, mmap_offset, num_queues, queue_size]), Some(fd)) => {
                Some(InflightFd {
                    info: VhostUserInflight {
                        mmap_size,
                        mmap_offset,
                        num_queues: num_queues as u16,
                        queue_size: queue_size as u16,
                    },
                    file: Arc::new(File::from(fd)),
                })
            }
            _ => None,
        };
        let mut dev = VhostUserDevice {
            kind: state.kind,
            frontend,
            backend_features: state.backend_features,
            protocol,
            num_queues: state.num_queues,
            config: state.config.clone(),
            mem,
            call: eventfd(fds.call),
            kicks: fds.kicks.into_iter().map(eventfd).collect(),
            err: eventfd(fds.err),
            started: state.started.clone(),
            inflight,
        };
        if let Some(acked) = acked {
            let bit =
                dev.backend_features & super::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
            let ack = dev.ack();
            super::acked(&mut dev.frontend, ack, "SET_FEATURES", |f| {
                f.set_features(acked | bit)
            })?;
        }
        Ok(dev)
    }
}

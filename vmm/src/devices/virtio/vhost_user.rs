//! vhost-user front end: a virtio device whose queues are processed by a device process.
//!
//! At connect time the owner, features and protocol features are negotiated and the
//! config space is read. When the driver sets DRIVER_OK the memory table (the guest-RAM
//! memfd), ring sizes, addresses, bases, kick (KVM ioeventfd) and call (KVM irqfd) fds are
//! handed over and the rings enabled; from then on the VMM is not on the data path.
//!
//! When the backend offers VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, the VMM asks it for an
//! inflight area when the device starts (GET_INFLIGHT_FD), keeps the memfd for the life
//! of the driver's session, and hands it to every later backend of the device
//! (SET_INFLIGHT_FD) before it gets the rings: after a crash the new backend resubmits the
//! requests the area records as taken and not completed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{QueueConfig, VirtioDevice, VirtioError};

mod adopt;
mod positions;
pub use adopt::{FrontendFds, FrontendState};
pub use positions::RingPosition;

/// Errors talking to a vhost-user backend.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket did not accept a connection in time.
    #[error("vhost-user backend socket {path} did not accept a connection within {secs} s")]
    ConnectTimeout {
        /// Socket path.
        path: PathBuf,
        /// How long we waited.
        secs: u64,
        /// Last error.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {0} failed")]
    Request(&'static str, #[source] vhost::Error),
    /// The backend lacks something skiff needs.
    #[error("vhost-user backend does not offer {0}")]
    Missing(&'static str),
    /// A ring address is outside guest memory.
    #[error("queue {0}: ring address {1:#x} is outside guest memory")]
    BadRingAddress(usize, u64),
    /// A replacement backend cannot take over the running device.
    #[error("the new backend cannot take over: {0}")]
    Incompatible(String),
}

/// Timings of a backend switch, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchTimings {
    /// Feature and memory-table set-up of the new backend (before the pause, filled in by
    /// the caller from [`VhostUserDevice::prepare_takeover`]).
    pub prepare_us: u64,
    /// First ring stopped on the old backend to last ring enabled on the new one.
    pub pause_us: u64,
    /// Rings moved.
    pub rings: usize,
}

/// A backend's inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), kept by the VMM.
#[derive(Clone)]
pub struct InflightFd {
    /// Geometry and size, as the backend gave them.
    pub info: VhostUserInflight,
    /// The memfd.
    pub file: Arc<File>,
}

/// virtio device kinds skiff fronts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceKind {
    /// virtio-net (id 1).
    Net,
    /// virtio-blk (id 2).
    Block,
}

impl DeviceKind {
    fn id(self) -> u32 {
        match self {
            DeviceKind::Net => 1,
            DeviceKind::Block => 2,
        }
    }
    fn config_len(self) -> u32 {
        match self {
            // mac, status, max_virtqueue_pairs, mtu
            DeviceKind::Net => 12,
            // virtio_blk_config up to write_zeroes_may_unmap and padding
            DeviceKind::Block => 60,
        }
    }
}

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const QUEUE_MAX_SIZE: u16 = 256;
/// The protocol features skiff uses when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Connects to `path`, retrying until `timeout` (a backend listening on a path, such as an
/// external one given by the user, may still be starting; the device processes skiff
/// starts are connected over a socketpair instead, see `builder::spawn_connected`).
/// `alive` is polled between attempts so a backend that died is reported at once.
pub fn connect_with_retry(
    path: &Path,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<UnixStream, VhostUserError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Err(why) = alive() {
                    return Err(VhostUserError::ConnectTimeout {
                        path: path.into(),
                        secs: start.elapsed().as_secs(),
                        source: std::io::Error::other(why),
                    });
                }
                if start.elapsed() > timeout {
                    return Err(VhostUserError::ConnectTimeout {
                        path: path.into(),
                        secs: timeout.as_secs(),
                        source: e,
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    kind: DeviceKind,
    frontend: Frontend,
    /// Features the backend offered (including VHOST_USER_F_PROTOCOL_FEATURES).
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    num_queues: usize,
    config: Vec<u8>,
    mem: GuestMemoryMmap,
    call: EventFd,
    kicks: Vec<EventFd>,
    /// Every ring's error eventfd (SET_VRING_ERR): the backend signals it when the guest
    /// driver left a ring in a state it cannot serve.
    err: EventFd,
    started: Vec<usize>,
    /// The inflight area of the driver's current session, if the backend offers one.
    inflight: Option<InflightFd>,
}

fn kreq<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, VhostUserError> {
    r.map_err(|e| VhostUserError::Request(what, e))
}

/// Sends one request with NEED_REPLY when `ack` (REPLY_ACK negotiated), so that it has been
/// carried out, or its refusal is this call's error, when the call returns. Without it a
/// backend's refusal only shows later as a closed connection.
fn acked<T>(
    frontend: &mut Frontend,
    ack: bool,
    what: &'static str,
    f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
) -> Result<T, VhostUserError> {
    if ack {
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let r = f(frontend);
    if ack {
        frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
    }
    kreq(what, r)
}

impl VhostUserDevice {
    /// Negotiates with the backend on `stream`. `max_queues` bounds what is asked for.
    pub fn new(
        kind: DeviceKind,
        stream: UnixStream,
        max_queues: usize,
        mem: GuestMemoryMmap,
    ) -> Result<Self, VhostUserError> {
        let mut frontend = Frontend::from_stream(stream, max_queues as u64);
        kreq("SET_OWNER", frontend.set_owner())?;
        let backend_features = kreq("GET_FEATURES", frontend.get_features())?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(VhostUserError::Missing("VIRTIO_F_VERSION_1"));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut num_queues = match kind {
            DeviceKind::Net => 2,
            DeviceKind::Block => 1,
        };
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = kreq("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            protocol = offered & wanted_protocol_features();
            kreq(
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(protocol),
            )?;
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = kreq("GET_QUEUE_NUM", frontend.get_queue_num())? as usize;
                num_queues = n.clamp(1, max_queues);
            }
        }
        let mut config = vec![0u8; kind.config_len() as usize];
        if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            let (_, buf) = kreq(
                "GET_CONFIG",
                frontend.get_config(
                    0,
                    kind.config_len(),
                    VhostUserConfigFlags::WRITABLE,
                    &config,
                ),
            )?;
            config = buf;
        } else if kind == DeviceKind::Block {
            return Err(VhostUserError::Missing(
                "the CONFIG protocol feature (disk capacity)",
            ));
        }
        if kind == DeviceKind::Block && config.len() >= 36 {
            // virtio_blk_config.num_queues (offset 34) when the device has VIRTIO_BLK_F_MQ.
            let n = u16::from_le_bytes([config[34], config[35]]) as usize;
            if backend_features & (1 << 12) != 0 && n > 0 {
                num_queues = num_queues.min(n);
            } else {
                num_queues = 1;
            }
        }
        let call = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| VhostUserError::Request("eventfd", vhost::Error::IOError(e)))?;
        let kicks = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VhostUserError::Request("eventfd", vhost::Error::IOError(e)))?;
        let err = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| VhostUserError::Request("eventfd", vhost::Error::IOError(e)))?;
        Ok(VhostUserDevice {
            kind,
            frontend,
            backend_features,
            protocol,
            num_queues,
            config,
            mem,
            call,
            kicks,
            err,
            started: Vec::new(),
            inflight: None,
        })
    }

    fn ack(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// Features and memory table (acknowledged, so a refusal shows here).
    fn send_features_and_memory(&mut self, acked_features: u64) -> Result<(), VhostUserError> {
        let bit = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let ack = self.ack();
        acked(&mut self.frontend, ack, "SET_FEATURES", |f| {
            f.set_features(acked_features | bit)
        })?;
        let regions = self
            .mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| VhostUserError::Request("SET_MEM_TABLE", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        acked(&mut self.frontend, ack, "SET_MEM_TABLE", |f| {
            f.set_mem_table(&regions).map(|_| ())
        })
    }

    /// The inflight area the backends of this device share, if any.
    pub fn inflight(&self) -> Option<InflightFd> {
        self.inflight.clone()
    }

    /// Hands this backend the inflight area: `area` when the device has one, else a new one
    /// it allocates (GET_INFLIGHT_FD). Does nothing when the backend does not offer the
    /// feature.
    fn set_inflight(&mut self, area: Option<InflightFd>) -> Result<(), VhostUserError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            self.inflight = None;
            return Ok(());
        }
        let area = match area {
            Some(a) => a,
            None => {
                let ask = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: self.num_queues as u16,
                    queue_size: QUEUE_MAX_SIZE,
                };
                let (info, file) = kreq("GET_INFLIGHT_FD", self.frontend.get_inflight_fd(&ask))?;
                InflightFd {
                    info,
                    file: Arc::new(file),
                }
            }
        };
        let fd = area.file.as_raw_fd();
        let ack = self.ack();
        acked(&mut self.frontend, ack, "SET_INFLIGHT_FD", |f| {
            f.set_inflight_fd(&area.info, fd)
        })?;
        self.inflight = Some(area);
        Ok(())
    }

    /// The eventfd the backend signals (to register as an irqfd).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The eventfd the backend signals when a ring is broken (SET_VRING_ERR, all rings).
    pub fn err_fd(&self) -> &EventFd {
        &self.err
    }

    /// The kick eventfd of each queue (to register as ioeventfds).
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    fn host_addr(&self, queue: usize, gpa: u64) -> Result<u64, VhostUserError> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| VhostUserError::BadRingAddress(queue, gpa))
    }

    fn start(&mut self, acked: u64, queues: &[QueueConfig]) -> Result<(), VhostUserError> {
        let protocol_bit =
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.send_features_and_memory(acked)?;
        // A new driver session gets a new area: what a previous one left must not be
        // resubmitted.
        self.set_inflight(None)?;
        for (i, q) in queues.iter().enumerate() {
            if !q.ready {
                continue;
            }
            let data = self.ring_config(i, q)?;
            let ack = self.ack();
            start_ring(
                &mut self.frontend,
                RingMode {
                    enable: protocol_bit != 0,
                    ack,
                },
                i,
                &data,
                0,
                RingFds {
                    call: &self.call,
                    kick: &self.kicks[i],
                    err: &self.err,
                },
            )?;
            self.started.push(i);
        }
        Ok(())
    }

    fn ring_config(&self, i: usize, q: &QueueConfig) -> Result<VringConfigData, VhostUserError> {
        Ok(VringConfigData {
            queue_max_size: q.max_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.host_addr(i, q.desc)?,
            used_ring_addr: self.host_addr(i, q.used)?,
            avail_ring_addr: self.host_addr(i, q.avail)?,
            log_addr: None,
        })
    }

    fn uses_ring_enable(features: u64) -> bool {
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// First half of a backend replacement, done on `self` = the *new* backend while the
    /// old one still serves and no lock is held: checks that it can serve what the driver
    /// negotiated with the old one (`old_features` offered, `acked`, `queues_in_use`) and,
    /// when the device runs, sends it the features, the memory table and the device's
    /// inflight area `inflight` (a new one if the device had none). Returns the time it
    /// took in microseconds.
    pub fn prepare_takeover(
        &mut self,
        kind: DeviceKind,
        acked: u64,
        queues_in_use: usize,
        active: bool,
        inflight: Option<InflightFd>,
    ) -> Result<u64, VhostUserError> {
        if kind != self.kind {
            return Err(VhostUserError::Incompatible(format!(
                "it serves a {:?} device, not {kind:?}",
                self.kind
            )));
        }
        let offered = self.features();
        if acked & !offered != 0 {
            return Err(VhostUserError::Incompatible(format!(
                "it lacks features {:#x} that the guest driver uses",
                acked & !offered
            )));
        }
        if queues_in_use > self.num_queues {
            return Err(VhostUserError::Incompatible(format!(
                "it offers {} queue(s); the guest uses {queues_in_use}",
                self.num_queues
            )));
        }
        let prep = Instant::now();
        if active {
            self.send_features_and_memory(acked)?;
            self.set_inflight(inflight)?;
        }
        Ok(prep.elapsed().as_micros() as u64)
    }

    /// Number of rings the driver has running (the highest started index + 1).
    pub fn queues_in_use(&self) -> usize {
        self.started.iter().max().map_or(0, |m| m + 1)
    }

    /// Second half of a backend replacement: makes `next`, prepared by
    /// [`VhostUserDevice::prepare_takeover`], the backend of this device, without the guest
    /// noticing more than a pause. `queues` is what the driver set up.
    ///
    /// Each running ring is stopped on the old backend (GET_VRING_BASE waits for requests
    /// in progress and returns the next available index) and started on the new one at that
    /// index, with the same kick and call eventfds, so KVM's ioeventfds and irqfds stay as
    /// they are. If anything fails, the rings the new backend got are stopped there again
    /// and every ring goes back to the old backend at the newest index, so the two never
    /// serve one ring together. The old connection is closed on success, which tells the
    /// old backend to exit. The device's config space becomes the new backend's.
    pub fn take_over(
        &mut self,
        mut next: VhostUserDevice,
        queues: &[QueueConfig],
    ) -> Result<SwitchTimings, VhostUserError> {
        let mut t = SwitchTimings::default();
        let pause = Instant::now();
        let old_enable = Self::uses_ring_enable(self.backend_features);
        let new_enable = Self::uses_ring_enable(next.backend_features);
        let (old_ack, next_ack) = (self.ack(), next.ack());
        // (ring, base, running on the new backend)
        let mut moved: Vec<(usize, u32, bool)> = Vec::new();
        let mut failure = None;
        for &i in &self.started {
            if old_enable {
                if let Err(e) = kreq("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, false)) {
                    failure = Some(e);
                    break;
                }
            }
            match kreq("GET_VRING_BASE", self.frontend.get_vring_base(i)) {
                Ok(base) => moved.push((i, base, false)),
                Err(e) => {
                    // The ring is disabled but still set up on the old backend.
                    if old_enable {
                        if let Err(re) = self.frontend.set_vring_enable(i, true) {
                            log::error!("queue {i}: cannot re-enable it on the old backend: {re}");
                        }
                    }
                    failure = Some(e);
                    break;
                }
            }
        }
        if failure.is_none() {
            for m in moved.iter_mut() {
                let (i, base, _) = *m;
                let r = queues
                    .get(i)
                    .ok_or(VhostUserError::BadRingAddress(i, 0))
                    .and_then(|q| self.ring_config(i, q))
                    .and_then(|data| {
                        start_ring(
                            &mut next.frontend,
                            RingMode {
                                enable: new_enable,
                                ack: next_ack,
                            },
                            i,
                            &data,
                            base,
                            RingFds {
                                call: &self.call,
                                kick: &self.kicks[i],
                                err: &self.err,
                            },
                        )
                    });
                match r {
                    Ok(()) => m.2 = true,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failure {
            for (i, base, on_new) in moved.iter_mut() {
                if *on_new {
                    // Stop it on the new backend first, at the index it reached.
                    if new_enable {
                        let _ = next.frontend.set_vring_enable(*i, false);
                    }
                    match next.frontend.get_vring_base(*i) {
                        Ok(b) => *base = b,
                        Err(re) => log::error!(
                            "queue {i}: the new backend did not report its ring index ({re}); \
                             resuming the old one at {base}"
                        ),
                    }
                }
            }
            // Closing the new connection makes the new backend let go of everything.
            drop(next);
            for &(i, base, _) in &moved {
                let r = queues
                    .get(i)
                    .ok_or(VhostUserError::BadRingAddress(i, 0))
                    .and_then(|q| self.ring_config(i, q))
                    .and_then(|data| {
                        start_ring(
                            &mut self.frontend,
                            RingMode {
                                enable: old_enable,
                                ack: old_ack,
                            },
                            i,
                            &data,
                            base,
                            RingFds {
                                call: &self.call,
                                kick: &self.kicks[i],
                                err: &self.err,
                            },
                        )
                    });
                if let Err(re) = r {
                    log::error!("queue {i}: cannot give the ring back to the old backend: {re}");
                }
            }
            return Err(e);
        }
        t.pause_us = pause.elapsed().as_micros() as u64;
        t.rings = moved.len();
        // A kick the old backend consumed just before it stopped would be lost: kick each
        // moved ring once, which at worst makes the new backend find nothing new.
        for &(i, _, _) in &moved {
            let _ = self.kicks[i].write(1);
        }
        // The old connection closes here.
        self.frontend = next.frontend;
        self.backend_features = next.backend_features;
        self.protocol = next.protocol;
        self.config = next.config;
        self.inflight = next.inflight;
        Ok(t)
    }
}

impl VhostUserDevice {
    /// Makes `next` (fresh from [`VhostUserDevice::new`]) the backend after the previous
    /// one died. Each running ring restarts at the used index the dead backend last
    /// published in guest memory.
    ///
    /// With an inflight area (skiff-blk), the new backend gets it first and resubmits the
    /// requests it records as taken and not completed, in the order they were taken, and
    /// restarts the ring after them, whatever order the dead backend completed requests
    /// in. Without one (skiff-net, or a backend without the feature), every request taken
    /// but not completed is processed again in ring order, which is right only for a
    /// backend that completes a ring's requests in order; for net a frame may be sent
    /// twice or, with a backend that completes out of order, lost (TCP retransmits).
    /// Returns the time from the first to the last ring started, in microseconds.
    pub fn recover(
        &mut self,
        mut next: VhostUserDevice,
        acked: u64,
        queues: &[QueueConfig],
        active: bool,
    ) -> Result<u64, VhostUserError> {
        next.prepare_takeover(
            self.kind,
            acked,
            self.queues_in_use(),
            active,
            self.inflight.clone(),
        )?;
        let start = Instant::now();
        let enable = Self::uses_ring_enable(next.backend_features);
        let next_ack = next.ack();
        for &i in &self.started {
            let q = queues.get(i).ok_or(VhostUserError::BadRingAddress(i, 0))?;
            let used_idx: u16 = self
                .mem
                .read_obj(GuestAddress(q.used + 2))
                .map_err(|_| VhostUserError::BadRingAddress(i, q.used))?;
            let data = self.ring_config(i, q)?;
            start_ring(
                &mut next.frontend,
                RingMode {
                    enable,
                    ack: next_ack,
                },
                i,
                &data,
                u32::from(used_idx),
                RingFds {
                    call: &self.call,
                    kick: &self.kicks[i],
                    err: &self.err,
                },
            )?;
            // The dead backend may have consumed the guest's last kick.
            let _ = self.kicks[i].write(1);
        }
        // It may also have put requests in the used ring and died before signalling them:
        // the guest would wait for them forever. One interrupt makes it look.
        let _ = self.call.write(1);
        let us = start.elapsed().as_micros() as u64;
        self.frontend = next.frontend;
        self.backend_features = next.backend_features;
        self.protocol = next.protocol;
        self.config = next.config;
        self.inflight = next.inflight;
        Ok(us)
    }
}

/// Sets up ring `i` on a backend and enables it: size, base index, addresses, call, kick.
/// How a backend takes its rings: with SET_VRING_ENABLE (VHOST_USER_F_PROTOCOL_FEATURES),
/// and with acknowledged requests (REPLY_ACK).
#[derive(Clone, Copy)]
struct RingMode {
    enable: bool,
    ack: bool,
}

/// The eventfds of one ring: KVM's ioeventfd (kick), irqfd (call), and the error eventfd.
struct RingFds<'a> {
    call: &'a EventFd,
    kick: &'a EventFd,
    err: &'a EventFd,
}

fn start_ring(
    frontend: &mut Frontend,
    mode: RingMode,
    i: usize,
    data: &VringConfigData,
    base: u32,
    fds: RingFds<'_>,
) -> Result<(), VhostUserError> {
    kreq("SET_VRING_NUM", frontend.set_vring_num(i, data.queue_size))?;
    kreq("SET_VRING_BASE", frontend.set_vring_base(i, base as u16))?;
    kreq("SET_VRING_ADDR", frontend.set_vring_addr(i, data))?;
    kreq("SET_VRING_CALL", frontend.set_vring_call(i, fds.call))?;
    kreq("SET_VRING_ERR", frontend.set_vring_err(i, fds.err))?;
    // The last request is acknowledged: when this returns the ring runs (or the backend
    // refused it), which is what the pause measures.
    if mode.enable {
        kreq("SET_VRING_KICK", frontend.set_vring_kick(i, fds.kick))?;
        acked(frontend, mode.ack, "SET_VRING_ENABLE", |f| {
            f.set_vring_enable(i, true)
        })?;
    } else {
        acked(frontend, mode.ack, "SET_VRING_KICK", |f| {
            f.set_vring_kick(i, fds.kick)
        })?;
    }
    Ok(())
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.id()
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX_SIZE
    }

    fn features(&self) -> u64 {
        self.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match self.config.get(start..start + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return;
        }
        let start = offset as usize;
        if let Some(dst) = self.config.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
            if let Err(e) =
                self.frontend
                    .set_config(offset as u32, VhostUserConfigFlags::WRITABLE, data)
            {
                log::warn!("vhost-user SET_CONFIG at {offset} failed: {e}");
            }
        }
    }

    fn activate(&mut self, acked: u64, queues: &[QueueConfig]) -> Result<(), VirtioError> {
        Ok(self.start(acked, queues)?)
    }

    fn as_vhost_user(&mut self) -> Option<&mut VhostUserDevice> {
        Some(self)
    }

    fn reset(&mut self) -> Result<(), VirtioError> {
        let rings_need_enable =
            self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        self.inflight = None;
        for i in std::mem::take(&mut self.started) {
            if rings_need_enable {
                kreq("SET_VRING_ENABLE", self.frontend.set_vring_enable(i, false))?;
            }
            kreq("GET_VRING_BASE", self.frontend.get_vring_base(i))?;
        }
        Ok(())
    }
}

//! The VMM's side of one device's run, all of it skiff's shipped code: the device process is
//! started by `vmm::builder::spawn_connected` and negotiated with by `vmm::builder::negotiate`
//! (`VhostUserDevice::new`); the rings the driver set up are started by
//! `VirtioDevice::activate`, as when the guest driver sets DRIVER_OK; an upgrade is what
//! vmm/src/replace.rs does for `PUT /skiff/devices/{id}/upgrade` (a new process started and
//! negotiated, `VhostUserDevice::prepare_takeover`, then `VhostUserDevice::take_over`); a
//! crash is recovered as vmm/src/replace.rs does after a device process died
//! (`VhostUserDevice::recover`).

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::builder::{negotiate, spawn_connected, BuildError};
use vmm::device_binary::DeviceBinary;
use vmm::device_process::DeviceProcess;
use vmm::devices::metrics_page::MetricsPage;
use vmm::devices::virtio::vhost_user::{DeviceKind, VhostUserDevice, VhostUserError};
use vmm::devices::virtio::{QueueConfig, RamRanges, VirtioDevice, VirtioError};
use vmm::memory::{create_guest_ram, MemoryError};

use crate::driver::{self, Driver, LoadResult, Ring, BASELINE, BLOCK, DONE, RAM, UPGRADES, WARMUP};
use crate::Args;

/// The features the synthetic driver acknowledges: VIRTIO_F_VERSION_1 only (no EVENT_IDX:
/// every completion batch is signalled).
const ACKED: u64 = 1 << 32;
/// Pauses above this are reported with the upgrade's other steps (the first five).
const SLOW: Duration = Duration::from_millis(1);

/// Errors of one device's run.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Starting or negotiating with a device process (the VMM's error).
    #[error(transparent)]
    Start(#[from] BuildError),
    /// A vhost-user request of the hand-over.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// Starting the rings.
    #[error("starting the rings")]
    Activate(#[source] VirtioError),
    /// A queue the driver sets up is not one the device has or accepts.
    #[error("queue {0}: {1}")]
    Queue(usize, String),
    /// A host resource.
    #[error("{0}")]
    Host(&'static str, #[source] std::io::Error),
    /// A killed device process was not seen to end.
    #[error("the killed device process did not end within 5 s")]
    NotEnded,
    /// The driver thread panicked.
    #[error("the driver thread panicked")]
    DriverPanicked,
    /// An upgrade (or crash recovery) failed.
    #[error("upgrade {0}")]
    Upgrade(usize, #[source] Box<DeviceError>),
}

/// What one device's run needs: the device process as skiff starts it, and the driver's rings.
pub struct Setup<'a> {
    /// "blk" or "net".
    pub name: &'static str,
    /// The virtio device kind.
    pub kind: DeviceKind,
    /// The process's name, as the VMM gives it.
    pub process_name: String,
    /// The checked binary.
    pub bin: DeviceBinary,
    /// Its arguments (skiff's, from `vmm::builder::blk_args` or `net_args`).
    pub args: Vec<String>,
    /// The fds it inherits (image or TAP, metrics page, seccomp filter file).
    pub fds: Vec<BorrowedFd<'a>>,
    /// The most queues asked of the backend.
    pub max_queues: usize,
    /// The rings the driver sets up, by queue index.
    pub rings: Vec<(usize, Ring)>,
    /// The queue the load runs on.
    pub load_queue: usize,
    /// blk: the image the process serves and its size, read back at the end.
    pub image: Option<(&'a File, u64)>,
    /// The page the process counts in.
    pub metrics: &'a MetricsPage,
}

/// One upgrade's steps.
#[derive(Clone, Copy, Default)]
struct Steps {
    spawn: Duration,
    negotiate: Duration,
    prepare: Duration,
    pause: Duration,
    total: Duration,
}

/// One device's results.
pub struct DeviceReport {
    /// "blk" or "net".
    pub name: &'static str,
    /// `SwitchTimings::pause_us` of each upgrade (crash: from the death seen to the rings
    /// running again).
    pub pause: Vec<Duration>,
    /// Each whole upgrade: start of the new process to the switch done.
    pub total: Vec<Duration>,
    /// Starting each new process (`spawn_connected`).
    pub spawn: Vec<Duration>,
    /// Negotiating with it (`negotiate`).
    pub negotiate: Vec<Duration>,
    /// `prepare_takeover` (upgrades only).
    pub prepare: Vec<Duration>,
    /// What the driver saw.
    pub load: LoadResult,
    /// Completed writes not found in the image.
    pub lost_writes: u64,
    /// Signals on the rings' error eventfd (a backend found a ring broken).
    pub broken_rings: u64,
    /// The device process's own counters at the end.
    pub counters: Vec<(String, u64)>,
    /// Length of the baseline phase.
    pub baseline_ms: u64,
    /// Length of the upgrade phase.
    pub upgrades_ms: u64,
}

/// A device process, started and negotiated with, not yet serving.
struct Started {
    process: DeviceProcess,
    dev: VhostUserDevice,
    spawn: Duration,
    negotiate: Duration,
}

/// Starts a device process and negotiates with it, as the VMM does (builder.rs for the
/// first one, replace.rs for every later one).
fn start(setup: &Setup<'_>, mem: &vm_memory::GuestMemoryMmap) -> Result<Started, DeviceError> {
    let t0 = Instant::now();
    let (mut process, stream) = spawn_connected(
        setup.process_name.clone(),
        &setup.bin,
        &setup.args,
        &setup.fds,
    )?;
    let spawn = t0.elapsed();
    let t1 = Instant::now();
    match negotiate(
        &mut process,
        setup.kind,
        stream,
        setup.max_queues,
        mem.clone(),
    ) {
        Ok(dev) => Ok(Started {
            process,
            dev,
            spawn,
            negotiate: t1.elapsed(),
        }),
        Err(e) => {
            process.stop(Duration::ZERO);
            Err(e.into())
        }
    }
}

/// The device as the VMM holds it: its process, its vhost-user front end, the queues the
/// driver set up.
struct Vm<'s, 'a> {
    setup: &'s Setup<'a>,
    mem: vm_memory::GuestMemoryMmap,
    process: DeviceProcess,
    dev: VhostUserDevice,
    queues: Vec<QueueConfig>,
}

impl<'s, 'a> Vm<'s, 'a> {
    /// Starts the first process and its rings.
    fn boot(setup: &'s Setup<'a>, mem: vm_memory::GuestMemoryMmap) -> Result<Self, DeviceError> {
        let Started {
            process, mut dev, ..
        } = start(setup, &mem)?;
        let max = dev.queue_max_size();
        let mut queues = vec![QueueConfig::default(); dev.num_queues()];
        let ram = RamRanges(vec![(0, RAM)]);
        for &(i, ring) in &setup.rings {
            let q = queues
                .get_mut(i)
                .ok_or_else(|| DeviceError::Queue(i, "the device offers fewer queues".into()))?;
            *q = ring.queue_config(max);
            // The transport's check of a queue the driver made ready.
            q.check(&ram).map_err(|e| DeviceError::Queue(i, e))?;
        }
        dev.activate(ACKED, &queues)
            .map_err(DeviceError::Activate)?;
        Ok(Vm {
            setup,
            mem,
            process,
            dev,
            queues,
        })
    }

    /// A live upgrade, as `PUT /skiff/devices/{id}/upgrade` does it.
    fn upgrade(&mut self) -> Result<Steps, DeviceError> {
        let t0 = Instant::now();
        let Started {
            process,
            dev: mut next,
            spawn,
            negotiate,
        } = start(self.setup, &self.mem)?;
        let prepare_us = match next.prepare_takeover(
            self.setup.kind,
            ACKED,
            self.dev.queues_in_use(),
            true,
            self.dev.inflight(),
        ) {
            Ok(us) => us,
            Err(e) => {
                drop(next);
                process.stop(Duration::from_secs(2));
                return Err(e.into());
            }
        };
        let switch = match self.dev.take_over(next, &self.queues) {
            Ok(t) => t,
            Err(e) => {
                process.stop(Duration::from_secs(2));
                return Err(e.into());
            }
        };
        let total = t0.elapsed();
        // The old connection is closed: the old process exits on its own.
        std::mem::replace(&mut self.process, process).stop(Duration::from_secs(2));
        Ok(Steps {
            spawn,
            negotiate,
            prepare: Duration::from_micros(prepare_us),
            pause: Duration::from_micros(switch.pause_us),
            total,
        })
    }

    /// Kills the process with SIGKILL and recovers as the VMM does when it sees a device
    /// process died; the pause is from the death seen (its pidfd readable, the VMM's event)
    /// to the rings running again.
    fn crash_and_recover(&mut self) -> Result<Steps, DeviceError> {
        let t0 = Instant::now();
        kill(&self.process)?;
        let seen = Instant::now();
        let Started {
            process,
            dev: next,
            spawn,
            negotiate,
        } = start(self.setup, &self.mem)?;
        if let Err(e) = self.dev.recover(next, ACKED, &self.queues, true) {
            process.stop(Duration::from_secs(2));
            return Err(e.into());
        }
        let pause = seen.elapsed();
        std::mem::replace(&mut self.process, process).stop(Duration::ZERO);
        Ok(Steps {
            spawn,
            negotiate,
            prepare: Duration::ZERO,
            pause,
            total: t0.elapsed(),
        })
    }

    /// Closes the connection and stops the process, as at the VM's end.
    fn finish(self) {
        drop(self.dev);
        self.process.stop(Duration::from_secs(2));
    }
}

/// SIGKILL through the process's pidfd, then waits for the pidfd to become readable.
fn kill(p: &DeviceProcess) -> Result<(), DeviceError> {
    let fd = p.pidfd.as_raw_fd();
    // SAFETY: pidfd_send_signal with the process's pidfd, a signal number, no siginfo and
    // no flags; no memory is passed and the result is checked.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r != 0 {
        return Err(DeviceError::Host(
            "pidfd_send_signal",
            std::io::Error::last_os_error(),
        ));
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd, which lives across the call.
    if unsafe { libc::poll(&mut pfd, 1, 5000) } <= 0 {
        return Err(DeviceError::NotEnded);
    }
    Ok(())
}

/// Runs one device: the first process under load, the baseline, then `a.upgrades`
/// upgrades (or crashes), then the checks.
pub fn bench_device(setup: &Setup<'_>, a: &Args) -> Result<DeviceReport, DeviceError> {
    let ram = create_guest_ram(RAM)?;
    let mut vm = Vm::boot(setup, ram.mem.clone())?;
    let host = |what| move |e| DeviceError::Host(what, e);
    let kick = vm
        .dev
        .kick_fds()
        .get(setup.load_queue)
        .ok_or_else(|| DeviceError::Queue(setup.load_queue, "no kick eventfd".into()))?
        .try_clone()
        .map_err(host("eventfd"))?;

    let phase = Arc::new(AtomicU8::new(WARMUP));
    let stop = Arc::new(AtomicBool::new(false));
    let driver = Driver {
        mem: ram.mem.clone(),
        kick,
        call: vm.dev.call_fd().try_clone().map_err(host("eventfd"))?,
        phase: phase.clone(),
        stop: stop.clone(),
        depth: a.depth,
    };
    let blocks = setup.image.map_or(1, |(_, size)| size / BLOCK as u64);
    let kind = setup.kind;
    let load: JoinHandle<LoadResult> = std::thread::spawn(move || match kind {
        DeviceKind::Block => driver::blk_load(&driver, blocks),
        DeviceKind::Net => driver::net_load(&driver),
    });

    std::thread::sleep(Duration::from_millis(500));
    phase.store(BASELINE, Ordering::Release);
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(a.baseline_ms));
    let baseline_ms = t.elapsed().as_millis() as u64;
    phase.store(UPGRADES, Ordering::Release);
    let t = Instant::now();
    let mut steps = Vec::with_capacity(a.upgrades);
    let mut failure = None;
    for n in 0..a.upgrades {
        let step = if a.crash {
            vm.crash_and_recover()
        } else {
            vm.upgrade()
        };
        match step {
            Ok(s) => steps.push(s),
            Err(e) => {
                failure = Some(DeviceError::Upgrade(n, Box::new(e)));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(a.interval_ms));
    }
    let upgrades_ms = t.elapsed().as_millis() as u64;
    let slow = steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.pause > SLOW)
        .take(5);
    for (n, s) in slow {
        println!(
            "{}: slow upgrade {n}: pause {} µs; spawn {} µs, negotiate {} µs, prepare {} µs, \
             whole upgrade {} µs",
            setup.name,
            s.pause.as_micros(),
            s.spawn.as_micros(),
            s.negotiate.as_micros(),
            s.prepare.as_micros(),
            s.total.as_micros()
        );
    }
    phase.store(DONE, Ordering::Release);
    stop.store(true, Ordering::Release);
    let load = load.join().map_err(|_| DeviceError::DriverPanicked)?;
    // The error eventfd is non-blocking: no signal reads as WouldBlock.
    let broken_rings = vm.dev.err_fd().read().unwrap_or(0);
    vm.finish();
    if let Some(f) = failure {
        return Err(f);
    }
    let mut lost_writes = 0;
    if let Some((file, _)) = setup.image {
        let mut buf = vec![0u8; BLOCK];
        for (&block, &seq) in &load.written {
            file.read_exact_at(&mut buf, block * BLOCK as u64)
                .map_err(host("reading the image back"))?;
            if buf != driver::pattern(block, seq) {
                lost_writes += 1;
            }
        }
    }
    let column = |f: fn(&Steps) -> Duration| steps.iter().map(f).collect::<Vec<_>>();
    Ok(DeviceReport {
        name: setup.name,
        pause: column(|s| s.pause),
        total: column(|s| s.total),
        spawn: column(|s| s.spawn),
        negotiate: column(|s| s.negotiate),
        prepare: if a.crash {
            Vec::new()
        } else {
            column(|s| s.prepare)
        },
        load,
        lost_writes,
        broken_rings,
        counters: setup.metrics.snapshot(),
        baseline_ms,
        upgrades_ms,
    })
}

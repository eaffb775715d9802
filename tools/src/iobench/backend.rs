//! The block backends under test, each started as a user would start it and driven through
//! skiff's own vhost-user front end (`vmm::devices::virtio::vhost_user::VhostUserDevice`):
//! skiff-blk started by the VMM's code (`vmm::builder::spawn_connected` with
//! `vmm::builder::blk_args`, negotiated by `vmm::builder::negotiate`), and
//! qemu-storage-daemon's vhost-user-blk export connected to as skiff connects to any
//! external backend (`vmm::builder::connect_external`).

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmm::builder::{blk_args, connect_external, negotiate, spawn_connected, BuildError};
use vmm::device_binary::BinaryDir;
use vmm::device_process::DeviceProcess;
use vmm::devices::metrics_page::MetricsPage;
use vmm::devices::virtio::vhost_user::{DeviceKind, VhostUserDevice};
use vmm::devices::virtio::{RamRanges, VirtioDevice};
use vmm::memory::{create_guest_ram, GuestRam};
use vmm_sys_util::eventfd::EventFd;

use crate::load::{self, RAM};
use crate::BenchError;

/// virtio 1.x.
const VERSION_1: u64 = 1 << 32;
/// VIRTIO_BLK_F_MQ.
const BLK_F_MQ: u64 = 1 << 12;

/// Which program serves the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// skiff's device process.
    SkiffBlk,
    /// QEMU's storage daemon, vhost-user-blk export.
    Qsd,
}

impl Which {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Which::SkiffBlk => "skiff-blk",
            Which::Qsd => "qemu-storage-daemon",
        }
    }
}

/// How every backend is set up.
pub struct Common<'a> {
    /// The image.
    pub image: &'a Path,
    /// skiff-blk's binary directory.
    pub bins: &'a BinaryDir,
    /// skiff-blk's seccomp choice, as skiff passes it.
    pub seccomp: &'a vmm::builder::DeviceSeccomp,
    /// qemu-storage-daemon's `aio=` (io_uring, native, threads).
    pub qsd_aio: &'a str,
    /// skiff-blk's `--io-engine`.
    pub skiff_io_engine: &'a str,
    /// Where qemu-storage-daemon's socket and both backends' stderr go.
    pub dir: &'a Path,
}

/// The process behind a backend.
enum Process {
    Skiff(DeviceProcess),
    Qsd(Child, PathBuf),
}

/// A backend serving the image, its rings started.
pub struct Running {
    /// Which one.
    pub which: Which,
    /// The front end (the VMM's).
    dev: VhostUserDevice,
    process: Process,
    /// Guest RAM, shared with the backend.
    pub ram: GuestRam,
    /// The request queues.
    pub queues: usize,
    /// The driver's positions on the rings.
    pub positions: load::Positions,
    /// skiff-blk's image fd and metrics page, kept open while it runs.
    _keep: Option<(File, MetricsPage)>,
}

impl Running {
    /// Starts `which` with `queues` request queues, O_DIRECT when `direct`.
    pub fn start(
        which: Which,
        c: &Common<'_>,
        queues: usize,
        direct: bool,
    ) -> Result<Running, BenchError> {
        let ram = create_guest_ram(RAM).map_err(|e| BenchError::Vmm("guest RAM", e.into()))?;
        let (dev, process, keep) = match which {
            Which::SkiffBlk => {
                let image = vmm::image::open_locked(c.image, false)
                    .map_err(|e| BenchError::Vmm("the image", e.into()))?;
                let page = MetricsPage::create("bench")
                    .map_err(|e| BenchError::Vmm("the metrics page", e.into()))?;
                let uring = match c.skiff_io_engine {
                    "io-uring" => true,
                    "sync" => false,
                    other => {
                        return Err(BenchError::Usage(format!(
                            "--skiff-io-engine {other}: sync or io-uring"
                        )))
                    }
                };
                let mut args = blk_args(&image, false, uring, &page, c.seccomp);
                args.extend(["--num-queues".to_string(), queues.to_string()]);
                if direct {
                    args.push("--direct".into());
                }
                let mut fds: Vec<BorrowedFd<'_>> = vec![image.as_fd(), page.fd()];
                fds.extend(c.seccomp.fd());
                let bin = c
                    .bins
                    .resolve(Path::new("skiff-blk"))
                    .map_err(|e| BenchError::Vmm("skiff-blk", e.into()))?;
                let (mut process, stream) =
                    spawn_connected("skiff-blk for drive 'bench'".into(), &bin, &args, &fds)
                        .map_err(vmm_err)?;
                let dev = negotiate(
                    &mut process,
                    DeviceKind::Block,
                    stream,
                    queues,
                    ram.mem.clone(),
                )
                .map_err(vmm_err)?;
                (dev, Process::Skiff(process), Some((image, page)))
            }
            Which::Qsd => {
                let path = c.image.to_str().filter(|p| !p.contains(','));
                let Some(path) = path else {
                    return Err(BenchError::Usage(format!(
                        "qemu-storage-daemon cannot take the image path {} (a comma, or not UTF-8)",
                        c.image.display()
                    )));
                };
                let sock = c.dir.join("qsd.sock");
                let _ = std::fs::remove_file(&sock);
                let log = File::create(c.dir.join("qsd.log"))
                    .map_err(|e| BenchError::Host("qemu-storage-daemon's log".into(), e))?;
                let cache = if direct { "on" } else { "off" };
                let child = Command::new("qemu-storage-daemon")
                    .args(["--object", "iothread,id=iot0", "--blockdev"])
                    .arg(format!(
                        "driver=file,node-name=disk,filename={path},cache.direct={cache},aio={}",
                        c.qsd_aio
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},\
                         writable=on,num-queues={queues},iothread=iot0",
                        sock.display()
                    ))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .map_err(|e| BenchError::Host("starting qemu-storage-daemon".into(), e))?;
                let process = Process::Qsd(child, c.dir.join("qsd.log"));
                match connect_external(
                    "qemu-storage-daemon",
                    DeviceKind::Block,
                    &sock,
                    queues,
                    ram.mem.clone(),
                ) {
                    Ok(dev) => (dev, process, None),
                    Err(e) => {
                        let why = stop(process);
                        return Err(BenchError::Backend(
                            format!("qemu-storage-daemon{why}"),
                            Box::new(e),
                        ));
                    }
                }
            }
        };
        let mut r = Running {
            which,
            dev,
            process,
            ram,
            queues,
            positions: load::Positions::new(queues),
            _keep: keep,
        };
        r.activate()?;
        Ok(r)
    }

    /// Sets the rings up as a guest driver does (DRIVER_OK).
    fn activate(&mut self) -> Result<(), BenchError> {
        let n = self.dev.num_queues();
        if n < self.queues {
            return Err(BenchError::Usage(format!(
                "{} offers {n} request queue(s), not {}",
                self.which.name(),
                self.queues
            )));
        }
        let max = self.dev.queue_max_size();
        let ram = RamRanges(vec![(0, RAM)]);
        let mut configs = Vec::with_capacity(self.queues);
        for q in 0..self.queues {
            let c = load::ring(q).queue_config(max);
            c.check(&ram)
                .map_err(|e| BenchError::Usage(format!("queue {q}: {e}")))?;
            configs.push(c);
        }
        let mut features = VERSION_1;
        if self.queues > 1 {
            features |= BLK_F_MQ;
        }
        if self.dev.features() & features != features {
            return Err(BenchError::Usage(format!(
                "{} does not offer the features the driver needs ({features:#x})",
                self.which.name()
            )));
        }
        self.dev
            .activate(features, &configs)
            .map_err(|e| BenchError::Backend(self.which.name().into(), Box::new(e)))
    }

    /// The kick eventfds and the interrupt, as the driver uses them.
    pub fn eventfds(&self) -> Result<(Vec<EventFd>, EventFd), BenchError> {
        let dup = |e: &EventFd| {
            e.try_clone()
                .map_err(|e| BenchError::Host("eventfd".into(), e))
        };
        let kicks = self.dev.kick_fds()[..self.queues]
            .iter()
            .map(dup)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((kicks, dup(self.dev.call_fd())?))
    }

    /// The backend's process id, for its CPU time.
    pub fn pid(&self) -> u32 {
        match &self.process {
            Process::Skiff(p) => p.pid(),
            Process::Qsd(c, _) => c.id(),
        }
    }

    /// Signals on the rings' error eventfd (a backend found a ring broken).
    pub fn broken_rings(&self) -> u64 {
        self.dev.err_fd().read().unwrap_or(0)
    }

    /// Closes the connection and stops the process.
    pub fn stop(self) {
        let Running { dev, process, .. } = self;
        drop(dev);
        stop(process);
    }
}

/// Stops a backend's process; says how it had ended when it was already gone.
fn stop(p: Process) -> String {
    match p {
        Process::Skiff(mut d) => {
            let why = d.check_alive().err().map(|e| format!(" ({e})"));
            d.stop(Duration::from_secs(2));
            why.unwrap_or_default()
        }
        Process::Qsd(mut c, log) => {
            let ended = c.try_wait().ok().flatten();
            let _ = c.kill();
            let _ = c.wait();
            match ended {
                Some(st) => {
                    let tail = std::fs::read_to_string(log).unwrap_or_default();
                    format!(" ({st}: {})", tail.trim())
                }
                None => String::new(),
            }
        }
    }
}

fn vmm_err(e: BuildError) -> BenchError {
    BenchError::Backend("skiff-blk".into(), Box::new(e))
}

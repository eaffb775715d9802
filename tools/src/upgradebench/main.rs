//! Device-process upgrade benchmark: N upgrades of skiff-blk and of skiff-net under load,
//! timed at native speed with a synthetic front end.
//!
//! The VMM's side is the VMM's shipped code, linked from the `vmm` crate, so the figures time
//! the code that runs in skiff: guest RAM is one sealed memfd from
//! `vmm::memory::create_guest_ram`; the image is opened and locked by
//! `vmm::image::open_locked` and the TAP by `tapdev::Tap`; each device process runs a
//! binary checked by `vmm::device_binary::BinaryDir`, with skiff's arguments
//! (`vmm::builder::blk_args` / `net_args`: image or TAP, metrics page, seccomp choice), and
//! is started by `vmm::builder::spawn_connected` (a `vmm::device_process::DeviceProcess`
//! connected over a socketpair) and negotiated with by `vmm::builder::negotiate`
//! (`VhostUserDevice::new`). The first one gets its rings from `VirtioDevice::activate`, as
//! when the guest driver sets DRIVER_OK. Each upgrade is what vmm/src/replace.rs does for
//! `PUT /skiff/devices/{id}/upgrade`:
//!
//! 1. start and negotiate the new process while the old one serves;
//! 2. `VhostUserDevice::prepare_takeover`: features, memory table and the device's
//!    inflight area (blk), still while the old one serves;
//! 3. `VhostUserDevice::take_over`, the pause: for each ring, disable and GET_VRING_BASE on
//!    the old process, then NUM, BASE, ADDR, CALL, ERR, KICK and ENABLE on the new one with
//!    the same eventfds; one kick per ring; the old connection closed (the old process
//!    exits). Its `SwitchTimings::pause_us` is the pause reported here.
//!
//! `--crash` kills the process with SIGKILL instead and recovers as the VMM does after a
//! crash (`VhostUserDevice::recover`). Not run here: the VMM's API, event loop and MMIO
//! transport around these calls (replace.rs reads the driver's state under the transport's
//! lock), and KVM: the driver writes the kick eventfds and waits on the call eventfd that
//! KVM's ioeventfds and irqfd would.
//!
//! The guest is played by a "driver" thread per device that keeps requests in flight on the
//! rings in guest memory: 4 KiB writes for skiff-blk, queue depth 32; 1514-byte frames on
//! skiff-net's TX ring, into a TAP in a private network namespace. It waits for the
//! device's call eventfd and records when each completion arrives. It does not negotiate
//! EVENT_IDX: every completion batch is signalled.
//!
//! It reports the pause and the whole upgrade as p50 / p99 / max, and the guest-side
//! effect: the longest gap between completions while upgrades ran, beside the same figure
//! for an equal time of the same load without upgrades (the host baseline). At the end it
//! checks that every write the driver saw completed is in the image, that no request
//! failed and that no backend reported a broken ring.
//!
//! Needs root for the TAP (the network namespace is created here). tools/upgradebench.sh
//! builds the release binaries and runs it.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser;
use serde_json::{json, Value};
use tapdev::{Tap, TapError};
use vmm::builder::{blk_args, net_args, DeviceSeccomp};
use vmm::device_binary::{BinaryDir, DeviceBinaryError};
use vmm::devices::metrics_page::{MetricsPage, MetricsPageError};
use vmm::devices::virtio::vhost_user::DeviceKind;
use vmm::error_chain;
use vmm::image::ImageError;

mod device;
mod driver;
mod plot;
#[path = "../split_ring.rs"]
mod split_ring;
#[path = "../stats.rs"]
mod stats;

use device::{bench_device, DeviceError, DeviceReport, Setup};
use driver::{BASELINE, BLK_RING, NET_RX, NET_TX, UPGRADES};
use stats::Stats;

/// Device-process upgrades under load, with a synthetic front end, on this machine.
#[derive(Debug, Parser)]
#[command(name = "upgradebench")]
struct Args {
    /// Upgrades of each device.
    #[arg(long, default_value_t = 1000)]
    upgrades: usize,
    /// Devices to measure: blk, net or both.
    #[arg(long, value_delimiter = ',', default_value = "blk,net")]
    devices: Vec<String>,
    /// The directory skiff-blk and skiff-net are taken from, checked as skiff checks its
    /// --device-bin-dir (default: this program's directory).
    #[arg(long, value_name = "DIR")]
    device_bin_dir: Option<PathBuf>,
    /// Requests (blk) or frames (net) kept in flight.
    #[arg(long, default_value_t = 32)]
    depth: u16,
    /// Milliseconds of load without upgrades, measured as the baseline (after 500 ms of
    /// warm-up).
    #[arg(long, default_value_t = 5000)]
    baseline_ms: u64,
    /// Pause between upgrades, in milliseconds.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// Kill -9 the device process instead of upgrading it, and recover as skiff does
    /// after a crash; "pause" is then from the death seen to the last ring started.
    #[arg(long)]
    crash: bool,
    /// JSON results file.
    #[arg(long, value_name = "PATH", default_value = "target/upgradebench.json")]
    out: PathBuf,
    /// Start the device processes with --no-seccomp (to measure what the filters cost).
    #[arg(long)]
    no_seccomp: bool,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    /// A host resource.
    #[error("{0}")]
    Host(String, #[source] io::Error),
    /// The device binary directory or a binary in it.
    #[error(transparent)]
    Binary(#[from] DeviceBinaryError),
    /// The image.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The TAP.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A metrics page.
    #[error(transparent)]
    MetricsPage(#[from] MetricsPageError),
    /// `ip link set up` failed.
    #[error("`ip link set dev {0} up` failed: {1}")]
    LinkUp(String, std::process::ExitStatus),
    /// A device named on the command line is not one of ours.
    #[error("unknown device {0:?} (blk, net)")]
    UnknownDevice(String),
    /// One device's run failed.
    #[error("{0}")]
    Device(&'static str, #[source] DeviceError),
    /// Runs that failed, by their error chains.
    #[error("{}", .0.join("; "))]
    Failed(Vec<String>),
    /// The load saw failures.
    #[error("requests failed, writes were lost or a backend found a ring broken")]
    Checks,
}

fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    let what = what.into();
    move |e| BenchError::Host(what, e)
}

/// fd 2 pointed at a file while this lives, so that the device processes (which inherit
/// stderr) and the VMM code's log lines write there; then the old stderr again.
struct StderrTo {
    saved: OwnedFd,
}

impl StderrTo {
    fn file(f: &File) -> Result<Self, BenchError> {
        // SAFETY: F_DUPFD_CLOEXEC duplicates fd 2, which is open; the result is checked.
        let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(BenchError::Host(
                "duplicating stderr".into(),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is new and owned by nobody else.
        let saved = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: dup2 of an open fd onto fd 2; the result is checked.
        if unsafe { libc::dup2(f.as_raw_fd(), 2) } < 0 {
            return Err(BenchError::Host(
                "redirecting stderr".into(),
                io::Error::last_os_error(),
            ));
        }
        Ok(StderrTo { saved })
    }
}

impl Drop for StderrTo {
    fn drop(&mut self) {
        // SAFETY: dup2 of the saved (open) fd back onto fd 2.
        unsafe { libc::dup2(self.saved.as_raw_fd(), 2) };
    }
}

/// Brings `name` up (skiff's TAPs are set up by the operator, as tools/boot.sh does).
fn link_up(name: &str) -> Result<(), BenchError> {
    let up = Command::new("ip")
        .args(["link", "set", "dev", name, "up"])
        .status()
        .map_err(host("ip link set up"))?;
    if !up.success() {
        return Err(BenchError::LinkUp(name.into(), up));
    }
    Ok(())
}

/// Runs device `dev` ("blk" or "net").
fn run_device(
    dev: &str,
    a: &Args,
    bins: &BinaryDir,
    seccomp: &DeviceSeccomp,
    dir: &Path,
) -> Result<DeviceReport, BenchError> {
    match dev {
        "blk" => {
            let path = dir.join("disk.img");
            let size = driver::RAM;
            File::create(&path)
                .and_then(|f| f.set_len(size))
                .map_err(host(format!("{}", path.display())))?;
            let image = vmm::image::open_locked(&path, false)?;
            let page = MetricsPage::create("bench")?;
            let mut fds = vec![image.as_fd(), page.fd()];
            fds.extend(seccomp.fd());
            let setup = Setup {
                name: "blk",
                kind: DeviceKind::Block,
                process_name: "skiff-blk for drive 'bench'".into(),
                bin: bins.resolve(Path::new("skiff-blk"))?,
                args: blk_args(&image, false, false, &page, seccomp),
                fds,
                // What skiff asks of skiff-blk for a 1-vCPU guest.
                max_queues: 1,
                rings: vec![(0, BLK_RING)],
                load_queue: 0,
                image: Some((&image, size)),
                metrics: &page,
            };
            bench_device(&setup, a).map_err(|e| BenchError::Device("blk", e))
        }
        "net" => {
            // SAFETY: unshare only changes this process's namespace membership.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(BenchError::Host(
                    "net needs root for a private network namespace".into(),
                    io::Error::last_os_error(),
                ));
            }
            let tap = Tap::open("skbench0")?;
            link_up(tap.name())?;
            let page = MetricsPage::create("eth0")?;
            let mut fds = vec![tap.as_fd(), page.fd()];
            fds.extend(seccomp.fd());
            let setup = Setup {
                name: "net",
                kind: DeviceKind::Net,
                process_name: format!("skiff-net for interface 'eth0' (TAP {})", tap.name()),
                bin: bins.resolve(Path::new("skiff-net"))?,
                args: net_args(&tap, None, &page, seccomp),
                fds,
                // What skiff asks of skiff-net.
                max_queues: 33,
                rings: vec![(0, NET_RX), (1, NET_TX)],
                load_queue: 1,
                image: None,
                metrics: &page,
            };
            bench_device(&setup, a).map_err(|e| BenchError::Device("net", e))
        }
        other => Err(BenchError::UnknownDevice(other.into())),
    }
}

fn us(s: Option<Stats>) -> String {
    s.map_or("-".into(), |s| {
        format!("{:.0} / {:.0} / {:.0}", s.p50, s.p99, s.max)
    })
}

fn run(a: &Args) -> Result<Vec<Value>, BenchError> {
    let dir = std::env::temp_dir().join(format!("upgradebench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(host("temporary directory"))?;
    let bins = BinaryDir::open(a.device_bin_dir.as_deref())?;
    let seccomp = DeviceSeccomp::new(&sandbox::SeccompChoice::from_flags(a.no_seccomp, None))
        .map_err(host("the seccomp filter file"))?;
    // The device processes' stderr (one start and one exit per upgrade) and the VMM code's
    // log lines go here.
    let log_path = a.out.with_extension("log");
    let log = File::create(&log_path).map_err(host(format!("{}", log_path.display())))?;
    let mut out = Vec::new();
    let mut failed = Vec::new();
    {
        let _stderr = StderrTo::file(&log)?;
        for dev in &a.devices {
            match run_device(dev, a, &bins, &seccomp, &dir) {
                Ok(r) => out.push(r),
                Err(e) => {
                    log::error!("{}", error_chain(&e));
                    failed.push(error_chain(&e));
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    for f in &failed {
        log::error!("{f}");
    }

    println!(
        "{:5} {:>9} {:>26} {:>26} {:>26} {:>26} {:>9} {:>7} {:>6} {:>6}",
        "",
        "upgrades",
        "pause µs p50/p99/max",
        "upgrade µs p50/p99/max",
        "gap µs, no upgrades",
        "gap µs, upgrading",
        "max ratio",
        "errors",
        "lost",
        "no-irq"
    );
    let mut docs = Vec::new();
    for r in &out {
        let pause = Stats::of(&r.pause);
        let total = Stats::of(&r.total);
        let base = Stats::of(&r.load.gaps[usize::from(BASELINE)]);
        let up = Stats::of(&r.load.gaps[usize::from(UPGRADES)]);
        let ratio = match (base, up) {
            (Some(b), Some(u)) if b.max > 0.0 => Some(u.max / b.max),
            _ => None,
        };
        println!(
            "{:5} {:>9} {:>26} {:>26} {:>26} {:>26} {:>9} {:>7} {:>6} {:>6}",
            r.name,
            r.pause.len(),
            us(pause),
            us(total),
            us(base),
            us(up),
            ratio.map_or("-".into(), |x| format!("{x:.1}")),
            r.load.errors,
            r.lost_writes,
            r.load.unsignalled
        );
        let json_of = |d: &[std::time::Duration]| Stats::of(d).map(|s| s.json());
        let counters: serde_json::Map<String, Value> = r
            .counters
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(*v)))
            .collect();
        docs.push(json!({
            "device": r.name,
            "upgrades": r.pause.len(),
            "pause": pause.map(|s| s.json()),
            "upgrade_total": total.map(|s| s.json()),
            "spawn": json_of(&r.spawn),
            "negotiate": json_of(&r.negotiate),
            "prepare": json_of(&r.prepare),
            "completion_gap_baseline": base.map(|s| s.json()),
            "completion_gap_upgrading": up.map(|s| s.json()),
            "max_gap_ratio_upgrading_over_baseline": ratio,
            "completions": r.load.completions,
            "errors": r.load.errors,
            "unsignalled_completions": r.load.unsignalled,
            "lost_writes": r.lost_writes,
            "broken_ring_signals": r.broken_rings,
            "device_counters": counters,
            "baseline_ms": r.baseline_ms,
            "upgrading_ms": r.upgrades_ms,
            "pause_us_all": r.pause.iter().map(|d| d.as_micros() as u64).collect::<Vec<_>>(),
        }));
        if r.broken_rings > 0 {
            println!("{}: a backend reported a broken ring", r.name);
        }
    }
    let pause = if a.crash {
        "pause = the device process's death seen (its pidfd) to its rings running on a new \
         one, VhostUserDevice::recover"
    } else {
        "pause = the VMM's VhostUserDevice::take_over, first ring stopped to last ring enabled"
    };
    println!(
        "({pause}; gap = time between two completion batches seen by the synthetic driver, \
         queue depth {}; no-irq = completions found in the used ring after 20 ms without an \
         interrupt; measured on this host at native speed, synthetic front end)",
        a.depth
    );
    println!("device process logs: {}", log_path.display());
    let svg = a.out.with_extension("svg");
    match std::fs::write(&svg, plot::plot(&out)) {
        Ok(()) => println!("plot: {}", svg.display()),
        Err(e) => log::error!("{}: {e}", svg.display()),
    }
    if !failed.is_empty() {
        return Err(BenchError::Failed(failed));
    }
    if out
        .iter()
        .any(|r| r.load.errors > 0 || r.lost_writes > 0 || r.broken_rings > 0)
    {
        return Err(BenchError::Checks);
    }
    Ok(docs)
}

fn main() {
    vmm::logger::init();
    let a = Args::parse();
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(parent);
    }
    let result = run(&a);
    let doc = json!({
        "benchmark": "upgradebench",
        "measured_on": "this host, native speed, synthetic front end (no guest)",
        "code": "the VMM's shipped hand-over (vmm::devices::virtio::vhost_user, vmm::builder)",
        "crash": a.crash,
        "seccomp": !a.no_seccomp,
        "upgrades_per_device": a.upgrades,
        "depth": a.depth,
        "devices": result.as_ref().map_or(Value::Null, |d| Value::from(d.clone())),
        "error": result.as_ref().err().map(|e| error_chain(e)),
    });
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => match std::fs::write(&a.out, text + "\n") {
            Ok(()) => println!("results: {}", a.out.display()),
            Err(e) => log::error!("{}: {e}", a.out.display()),
        },
        Err(e) => log::error!("encoding results: {e}"),
    }
    if let Err(e) = result {
        log::error!("{}", error_chain(&e));
        std::process::exit(1);
    }
}

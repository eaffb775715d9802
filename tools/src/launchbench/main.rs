//! Launch-path benchmark at native speed: how long skiff, Firecracker (when a `firecracker`
//! binary is found) and QEMU microvm take from exec to their first KVM_RUN, and how many VMs
//! a burst launches to their first KVM_RUN per second per core, in one run, reported as
//! ratios.
//!
//! Every VMM boots the same kernel with the same root filesystem (read-only, so that a
//! burst's VMs can share it), 1 vCPU and the same RAM, its console discarded and no API
//! socket (skiff `run`, Firecracker `--no-api --config-file`, QEMU's command line); seccomp
//! stays as each ships it. The times come from the kernel (trace.rs: the exec and the first
//! KVM_RUN ioctl of a thread of the VMM's process, on CLOCK_MONOTONIC), so nothing slows the
//! VMM being measured. A VMM is killed (its process group) at its first KVM_RUN: whether the
//! guest then runs is not this benchmark's business (on a kvm_pvm host only PVM guests do).
//!
//! The summary ends with `ratio launch skiff/firecracker = R` and `ratio launch skiff/qemu =
//! R` (median time to the first KVM_RUN; below 1 is skiff faster) and `rate launch VMM = R`
//! (VMs per second per core). tools/launchbench.sh builds it and finds the guest artifacts.
//! Needs root (tracefs).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};

#[path = "../stats.rs"]
mod stats;
mod trace;

use stats::Stats;

use trace::{Event, Trace};
use vmm::memory::HugePool;

/// Time to the first KVM_RUN of skiff, Firecracker and QEMU, side by side.
#[derive(Debug, Parser)]
#[command(name = "launchbench")]
struct Args {
    /// Guest kernel (ELF vmlinux), the same for every VMM.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Root filesystem image, attached read-only to every VMM.
    #[arg(long, value_name = "PATH")]
    rootfs: PathBuf,
    /// Directory holding skiff, skiff-blk and skiff-net (a release build).
    #[arg(long, value_name = "DIR", default_value = "target/release")]
    bin_dir: PathBuf,
    /// Sequential launches per VMM (the median is reported).
    #[arg(long, default_value_t = 11)]
    runs: usize,
    /// VMs started at once per VMM for the launch rate (0: no burst).
    #[arg(long, default_value_t = 8)]
    burst: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Guest RAM on 2 MiB huge pages for every VMM (skiff `--huge-pages 2M`, Firecracker's
    /// `huge_pages: "2M"`, QEMU a hugetlb memfd backend). The host's pool is grown for the
    /// run when it is short, and put back afterwards.
    #[arg(long)]
    huge_pages: bool,
    /// VMMs to measure, in this order: skiff, firecracker, qemu. Firecracker is left out,
    /// with a note, when its binary is not found.
    #[arg(long, value_delimiter = ',', default_value = "skiff,firecracker,qemu")]
    vmms: Vec<String>,
    /// The Firecracker binary (a name is looked up on PATH).
    #[arg(long, default_value = "firecracker")]
    firecracker: String,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// QEMU's -cpu (default `host`; on a kvm_pvm host `host,-arch-capabilities`, as its KVM
    /// refuses the ARCH_CAPABILITIES MSR QEMU would set).
    #[arg(long)]
    qemu_cpu: Option<String>,
    /// How long one launch may take to its first KVM_RUN.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// Working directory (config files, each VMM's stderr).
    #[arg(long, value_name = "DIR", default_value = "target/launchbench")]
    dir: PathBuf,
    /// Where to write the results as JSON.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

/// Errors of a launch.
#[derive(Debug, thiserror::Error)]
enum LaunchError {
    #[error("cannot start {0}: {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0} (pid {1}) ended before its first KVM_RUN; its stderr ends with:\n{2}")]
    Ended(String, u32, String),
    #[error("{0} (pid {1}) reached no KVM_RUN within {2:?}; its stderr ends with:\n{3}")]
    Timeout(String, u32, Duration, String),
    #[error("the trace reader stopped")]
    TraceGone,
    #[error(transparent)]
    Trace(#[from] trace::TraceError),
    #[error(transparent)]
    Pool(#[from] vmm::memory::MemoryError),
}

/// One VMM under test.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Vmm {
    Skiff,
    Firecracker,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Skiff => "skiff",
            Vmm::Firecracker => "firecracker",
            Vmm::Qemu => "qemu",
        }
    }
}

/// Finds `name` as given (a path) or on PATH.
fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| PathBuf::from(name));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// The command that launches VM number `n` of `vmm`, its files in `dir`.
fn command(args: &Args, vmm: Vmm, bin: &Path, dir: &Path) -> Result<Command, LaunchError> {
    let kernel = args.kernel.to_string_lossy().to_string();
    let rootfs = args.rootfs.to_string_lossy().to_string();
    let mem = args.mem_mib.to_string();
    let mut cmd = Command::new(bin);
    match vmm {
        Vmm::Skiff => {
            cmd.args([
                "run",
                "--kernel",
                &kernel,
                "--rootfs",
                &rootfs,
                "--rootfs-ro",
            ])
            .args(["--console", "none", "--vcpus", "1", "--memory", &mem])
            .arg("--device-bin-dir")
            .arg(&args.bin_dir);
            if args.huge_pages {
                cmd.args(["--huge-pages", "2M"]);
            }
        }
        Vmm::Firecracker => {
            let config = json!({
                "boot-source": {
                    "kernel_image_path": kernel,
                    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro",
                },
                "drives": [{
                    "drive_id": "rootfs",
                    "path_on_host": rootfs,
                    "is_root_device": true,
                    "is_read_only": true,
                }],
                "machine-config": {
                    "vcpu_count": 1,
                    "mem_size_mib": args.mem_mib,
                    "huge_pages": if args.huge_pages { "2M" } else { "None" },
                },
            });
            let path = dir.join("firecracker.json");
            std::fs::write(&path, config.to_string())
                .map_err(|e| LaunchError::Io(path.clone(), e))?;
            cmd.arg("--no-api").arg("--config-file").arg(&path);
        }
        Vmm::Qemu => {
            let cpu = args.qemu_cpu.clone().unwrap_or_else(|| {
                if Path::new("/sys/module/kvm_pvm").exists() {
                    "host,-arch-capabilities".into()
                } else {
                    "host".into()
                }
            });
            if args.huge_pages {
                cmd.arg("-object")
                    .arg(format!(
                        "memory-backend-memfd,id=ram,size={mem}M,hugetlb=on,hugetlbsize=2M"
                    ))
                    .args(["-M", "microvm,memory-backend=ram"]);
            } else {
                cmd.args(["-M", "microvm"]);
            }
            cmd.args(["-accel", "kvm", "-cpu", &cpu, "-smp", "1"])
                .args(["-m", &mem, "-kernel", &kernel])
                .args(["-append", "console=ttyS0 reboot=k panic=1 root=/dev/vda ro"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "null", "-monitor", "none"])
                .arg("-drive")
                .arg(format!(
                    "id=rootfs,file={rootfs},format=raw,if=none,readonly=on"
                ))
                .args(["-device", "virtio-blk-device,drive=rootfs"]);
        }
    }
    let log = dir.join("stderr");
    let stderr = File::create(&log).map_err(|e| LaunchError::Io(log, e))?;
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0);
    Ok(cmd)
}

/// A launched VM: its process, when it exec'd and when it first entered KVM_RUN.
struct Launched {
    child: Child,
    dir: PathBuf,
    exec: Option<f64>,
    run: Option<f64>,
}

impl Launched {
    /// skiff's `VM built in T ms (step t, ...)` line, as (step, ms) pairs with "total" first.
    fn build_steps(&self) -> Vec<(String, f64)> {
        let text = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        text.lines()
            .find_map(|l| l.split_once("VM built in ").map(|(_, r)| r.to_string()))
            .map(|r| parse_steps(&r))
            .unwrap_or_default()
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Kills the VMM's process group (its device processes with it) and reaps it.
    fn end(&mut self) {
        // SAFETY: kill(2) on our child's process group; no memory is involved.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// `12.3 ms (device processes 0.4, guest RAM 0.1)` as `[("total", 12.3), ("device
/// processes", 0.4), ("guest RAM", 0.1)]`.
fn parse_steps(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let Some((total, rest)) = text.split_once(" ms (") else {
        return out;
    };
    let Ok(total) = total.trim().parse() else {
        return out;
    };
    out.push(("total".to_string(), total));
    for step in rest.trim_end_matches(')').split(", ") {
        if let Some((name, ms)) = step.rsplit_once(' ') {
            if let Ok(ms) = ms.parse() {
                out.push((name.to_string(), ms));
            }
        }
    }
    out
}

/// Records event `ev` on the VM it is about, if it is one of `vms`.
fn note(vms: &mut HashMap<u32, Launched>, ev: Event) {
    match ev {
        Event::Exec { pid, t } => {
            if let Some(v) = vms.get_mut(&pid) {
                v.exec.get_or_insert(t);
            }
        }
        Event::KvmRun { tgid, t } => {
            if let Some(v) = vms.get_mut(&tgid) {
                v.run.get_or_insert(t);
            }
        }
    }
}

/// One launch's times: exec and first KVM_RUN in seconds of CLOCK_MONOTONIC, and the
/// steps the VMM reported (skiff's, in ms).
struct Timed {
    exec: f64,
    run: f64,
    steps: Vec<(String, f64)>,
}

/// Starts `count` VMs of `vmm` at once and waits until each has entered KVM_RUN; returns
/// each one's (exec, first KVM_RUN) times, in seconds of CLOCK_MONOTONIC.
fn launch(
    args: &Args,
    vmm: Vmm,
    bin: &Path,
    count: usize,
    events: &Receiver<Event>,
    seq: &mut usize,
) -> Result<Vec<Timed>, LaunchError> {
    let mut vms: HashMap<u32, Launched> = HashMap::new();
    let mut order = Vec::new();
    let result = (|| {
        for _ in 0..count {
            *seq += 1;
            let dir = args.dir.join(format!("{}-{}", vmm.name(), seq));
            std::fs::create_dir_all(&dir).map_err(|e| LaunchError::Io(dir.clone(), e))?;
            let child = command(args, vmm, bin, &dir)?
                .spawn()
                .map_err(|e| LaunchError::Spawn(bin.display().to_string(), e))?;
            order.push(child.id());
            vms.insert(
                child.id(),
                Launched {
                    child,
                    dir,
                    exec: None,
                    run: None,
                },
            );
        }
        let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
        while vms.values().any(|v| v.run.is_none() || v.exec.is_none()) {
            match events.recv_timeout(Duration::from_millis(100)) {
                Ok(ev) => note(&mut vms, ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(LaunchError::TraceGone),
            }
            let mut ended = Vec::new();
            for (pid, v) in vms.iter_mut() {
                if v.run.is_none() && matches!(v.child.try_wait(), Ok(Some(_))) {
                    ended.push(*pid);
                }
            }
            if !ended.is_empty() {
                // An exit is final only once the trace has delivered what came before it.
                std::thread::sleep(Duration::from_millis(200));
                while let Ok(ev) = events.try_recv() {
                    note(&mut vms, ev);
                }
                if let Some(v) = ended
                    .iter()
                    .filter_map(|p| vms.get(p))
                    .find(|v| v.run.is_none())
                {
                    return Err(LaunchError::Ended(
                        vmm.name().into(),
                        v.child.id(),
                        v.stderr_tail(),
                    ));
                }
            }
            if Instant::now() > deadline {
                let (pid, v) = vms
                    .iter()
                    .find(|(_, v)| v.run.is_none() || v.exec.is_none())
                    .ok_or(LaunchError::TraceGone)?;
                return Err(LaunchError::Timeout(
                    vmm.name().into(),
                    *pid,
                    Duration::from_secs(args.timeout_secs),
                    v.stderr_tail(),
                ));
            }
        }
        Ok(order
            .iter()
            .filter_map(|pid| {
                let v = vms.get(pid)?;
                Some(Timed {
                    exec: v.exec?,
                    run: v.run?,
                    steps: v.build_steps(),
                })
            })
            .collect())
    })();
    for v in vms.values_mut() {
        v.end();
    }
    result
}

/// The summary of `ms` (milliseconds), as every benchmark here makes it.
fn summary(ms: &[f64]) -> Option<Stats> {
    let d: Vec<Duration> = ms
        .iter()
        .map(|m| Duration::from_secs_f64(m.max(0.0) / 1e3))
        .collect();
    Stats::of(&d)
}

/// The median (nearest rank) of `ms`, in ms; NaN when empty.
fn median(ms: &[f64]) -> f64 {
    summary(ms).map_or(f64::NAN, |s| s.p50 / 1e3)
}

/// The figures of one VMM.
struct Figures {
    vmm: Vmm,
    /// Milliseconds from exec to the first KVM_RUN, one per sequential launch.
    ms: Vec<f64>,
    /// VMs per second per core in the burst, and the burst's median time to KVM_RUN.
    rate: Option<(f64, f64)>,
    /// The median of each step the VMM reported (skiff's build), in ms, in its order.
    steps: Vec<(String, f64)>,
}

fn measure(
    args: &Args,
    vmm: Vmm,
    bin: &Path,
    events: &Receiver<Event>,
) -> Result<Figures, LaunchError> {
    let mut seq = 0;
    // One unmeasured launch: the binary, kernel and image come into the page cache.
    launch(args, vmm, bin, 1, events, &mut seq)?;
    let mut ms = Vec::new();
    let mut reported: Vec<(String, Vec<f64>)> = Vec::new();
    for _ in 0..args.runs {
        for t in launch(args, vmm, bin, 1, events, &mut seq)? {
            ms.push((t.run - t.exec) * 1e3);
            for (name, v) in t.steps {
                match reported.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, vs)) => vs.push(v),
                    None => reported.push((name, vec![v])),
                }
            }
        }
    }
    let steps = reported
        .into_iter()
        .map(|(n, vs)| (n, median(&vs)))
        .collect();
    let rate = if args.burst > 0 {
        let times = launch(args, vmm, bin, args.burst, events, &mut seq)?;
        let first = times.iter().map(|t| t.exec).fold(f64::INFINITY, f64::min);
        let last = times
            .iter()
            .map(|t| t.run)
            .fold(f64::NEG_INFINITY, f64::max);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let each = median(
            &times
                .iter()
                .map(|t| (t.run - t.exec) * 1e3)
                .collect::<Vec<_>>(),
        );
        Some((times.len() as f64 / (last - first) / cores, each))
    } else {
        None
    };
    Ok(Figures {
        vmm,
        ms,
        rate,
        steps,
    })
}

fn main() {
    vmm::logger::init();
    let mut args = Args::parse();
    // Absolute paths: each VMM runs in a directory of its own.
    for p in [
        &mut args.kernel,
        &mut args.rootfs,
        &mut args.bin_dir,
        &mut args.dir,
    ] {
        if let Ok(abs) = std::path::absolute(&*p) {
            *p = abs;
        }
    }
    if let Err(e) = run(&args) {
        eprintln!("launchbench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), LaunchError> {
    let mut vmms = Vec::new();
    for name in &args.vmms {
        let (vmm, bin) = match name.as_str() {
            "skiff" => (Vmm::Skiff, Some(args.bin_dir.join("skiff"))),
            "firecracker" => (Vmm::Firecracker, which(&args.firecracker)),
            "qemu" => (Vmm::Qemu, which(&args.qemu)),
            other => {
                eprintln!("launchbench: unknown VMM '{other}' (skiff, firecracker, qemu)");
                std::process::exit(2);
            }
        };
        match bin {
            Some(b) => vmms.push((vmm, b)),
            None => println!("note: no {name} binary found; it is left out"),
        }
    }
    std::fs::create_dir_all(&args.dir).map_err(|e| LaunchError::Io(args.dir.clone(), e))?;
    // A burst's VMs hold their RAM at once (pages others hold are not counted as room).
    let _pool = if args.huge_pages {
        HugePool::with_room(args.burst.max(1) as u64 * args.mem_mib.div_ceil(2))?
    } else {
        None
    };
    let (_trace, events) = Trace::start()?;
    let mut all = Vec::new();
    for (vmm, bin) in &vmms {
        println!(
            "{}: {} launches, then a burst of {}",
            vmm.name(),
            args.runs,
            args.burst
        );
        all.push(measure(args, *vmm, bin, &events)?);
    }
    report(args, &all)
}

fn report(args: &Args, all: &[Figures]) -> Result<(), LaunchError> {
    println!(
        "\nexec to first KVM_RUN, 1 vCPU, {} MiB{}, native (this host's KVM), {} runs each:",
        args.mem_mib,
        if args.huge_pages {
            " on 2 MiB huge pages"
        } else {
            ""
        },
        args.runs
    );
    println!(
        "{:<12} {:>10} {:>10} {:>10}   {:>18} {:>14}",
        "VMM", "median ms", "best ms", "worst ms", "rate /s/core", "burst median"
    );
    let mut json_rows = Vec::new();
    for f in all {
        let st = summary(&f.ms);
        let med = st.map_or(f64::NAN, |s| s.p50 / 1e3);
        let best = f.ms.iter().copied().fold(f64::INFINITY, f64::min);
        let worst = st.map_or(f64::NAN, |s| s.max / 1e3);
        let (rate, burst) = f.rate.map_or(("-".into(), "-".into()), |(r, b)| {
            (format!("{r:.1}"), format!("{b:.1} ms"))
        });
        println!(
            "{:<12} {med:>10.1} {best:>10.1} {worst:>10.1}   {rate:>18} {burst:>14}",
            f.vmm.name()
        );
        json_rows.push(json!({
            "vmm": f.vmm.name(),
            "ms": f.ms,
            "median_ms": med,
            "summary": st.map(|s| s.json()),
            "rate_per_core_per_s": f.rate.map(|r| r.0),
            "burst": args.burst,
            "burst_median_ms": f.rate.map(|r| r.1),
            "steps_median_ms": f.steps.iter().map(|(n, v)| json!({"step": n, "ms": v})).collect::<Vec<_>>(),
        }));
    }
    for f in all.iter().filter(|f| !f.steps.is_empty()) {
        let text: Vec<String> = f.steps.iter().map(|(n, v)| format!("{n} {v:.1}")).collect();
        println!(
            "{} build steps, median ms: {}",
            f.vmm.name(),
            text.join(", ")
        );
    }
    let skiff = all.iter().find(|f| f.vmm == Vmm::Skiff);
    println!();
    for f in all {
        if let Some((r, _)) = f.rate {
            println!("rate launch {} = {r:.2}", f.vmm.name());
        }
    }
    if let Some(s) = skiff {
        let s_med = median(&s.ms);
        for f in all.iter().filter(|f| f.vmm != Vmm::Skiff) {
            println!(
                "ratio launch skiff/{} = {:.2}",
                f.vmm.name(),
                s_med / median(&f.ms)
            );
        }
    }
    if let Some(out) = &args.out {
        let doc: Value = json!({
            "kernel": args.kernel,
            "rootfs": args.rootfs,
            "mem_mib": args.mem_mib,
            "huge_pages": args.huge_pages,
            "runs": args.runs,
            "vmms": json_rows,
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| LaunchError::Io(out.clone(), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_skiffs_build_steps() {
        assert_eq!(
            parse_steps("12.5 ms (device processes 0.4, guest RAM 0.0, KVM VM 6.1)"),
            vec![
                ("total".to_string(), 12.5),
                ("device processes".to_string(), 0.4),
                ("guest RAM".to_string(), 0.0),
                ("KVM VM".to_string(), 6.1),
            ]
        );
        assert!(parse_steps("nonsense").is_empty());
    }
}

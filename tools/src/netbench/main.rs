//! Network data-path benchmark at native speed: skiff-net beside the kernel's vhost-net and
//! a plain TAP read/write loop (the floor), same frames, same TAP, in one run, reported as
//! ratios.
//!
//! Everything runs in a network namespace of the benchmark's own (root needed): a TAP per
//! run, brought up, with a packet socket on its host side as the far end (wire.rs). A
//! synthetic guest driver (driver.rs) plays the guest on a receive and a transmit ring in
//! guest memory; skiff-net is started and negotiated by the VMM's own code, vhost-net set up
//! through the `vhost` crate as QEMU sets it up (backend.rs). Every frame is checked at the
//! far end against its template and its sequence number (frames.rs), so a path that
//! corrupts, reorders or loses frames shows, and a lost frame is never counted.
//!
//! Workloads: 64-byte and 1514-byte frames (frames per second) and 64 KiB TSO frames
//! (Gbit/s), guest to host (`tx-`) and host to guest (`rx-`). The summary ends with one
//! line per workload and comparison, `ratio WORKLOAD skiff-net/vhost-net = R` and
//! `ratio WORKLOAD skiff-net/tap = R` (throughput; above 1 is skiff-net faster) and
//! `cpu WORKLOAD skiff-net/vhost-net = R` (the device's CPU time per frame; below 1 is
//! skiff-net cheaper). tools/netbench.sh builds and runs it.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use vmm::builder::DeviceSeccomp;
use vmm::device_binary::BinaryDir;

mod backend;
mod driver;
mod frames;
#[path = "../iobench/plot.rs"]
mod plot;
#[path = "../proc_cpu.rs"]
mod proc_cpu;
#[path = "../split_ring.rs"]
mod split_ring;
mod wire;

use backend::{Common, Running, Which};
use frames::{Kind, Template};
use wire::{PacketSocket, Received, Window};

/// Frames through skiff-net, vhost-net and a bare TAP, side by side.
#[derive(Debug, Parser)]
#[command(name = "netbench")]
struct Args {
    /// A short run for CI: 0.5 s per workload.
    #[arg(long)]
    quick: bool,
    /// Rounds over every workload and path, the paths alternating; the report takes each
    /// one's median (default 3; --quick 1). This machine's frame rates move by 15% and more
    /// from one run to the next.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds measured per workload and path (default 5; --quick 0.5).
    #[arg(long)]
    secs: Option<f64>,
    /// What to compare: skiff-net, vhost-net, tap (default all three; vhost-net is left
    /// out, and says so, where /dev/vhost-net is missing).
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Workloads (default all): tx-64, rx-64, tx-1514, rx-1514, tx-tso, rx-tso (tx: guest
    /// to host).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// The directory skiff-net is taken from, checked as skiff checks its
    /// --device-bin-dir (default: this program's directory).
    #[arg(long, value_name = "DIR")]
    device_bin_dir: Option<PathBuf>,
    /// The driver does not negotiate VIRTIO_RING_F_EVENT_IDX (Linux does), and suppresses
    /// kicks and interrupts with the ring flags only.
    #[arg(long)]
    no_event_idx: bool,
    /// Start skiff-net with --no-seccomp (to measure what its filter costs).
    #[arg(long)]
    no_seccomp: bool,
    /// JSON results file; the SVG plots go beside it.
    #[arg(long, value_name = "PATH", default_value = "target/netbench.json")]
    out: PathBuf,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad option, or a path that cannot do what is asked.
    #[error("{0}")]
    Usage(String),
    /// A host resource.
    #[error("{0}")]
    Host(String, #[source] io::Error),
    /// Setting up skiff's side.
    #[error("{0}")]
    Vmm(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// A device failed to start or to take its rings.
    #[error("{0}")]
    Backend(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// The checks found frames corrupted, out of order, lost or kept, or none at all.
    #[error("{0}")]
    Checks(String),
    /// One workload on one path failed.
    #[error("{0} on {1}")]
    Run(&'static str, &'static str, #[source] Box<BenchError>),
}

/// The workloads: name, frames, guest to host.
const WORKLOADS: [(&str, Kind, bool); 6] = [
    ("tx-64", Kind::Small, true),
    ("rx-64", Kind::Small, false),
    ("tx-1514", Kind::Full, true),
    ("rx-1514", Kind::Full, false),
    ("tx-tso", Kind::Tso, true),
    ("rx-tso", Kind::Tso, false),
];

/// One workload on one path.
struct Row {
    workload: &'static str,
    backend: &'static str,
    got: Received,
    secs: f64,
    device_cpu_ns: Option<u64>,
    total_cpu_ns: u64,
}

impl Row {
    fn pps(&self) -> f64 {
        self.got.frames as f64 / self.secs
    }

    fn gbit(&self) -> f64 {
        self.got.bytes as f64 * 8.0 / self.secs / 1e9
    }

    fn per_frame(&self, ns: u64) -> f64 {
        ns as f64 / self.got.frames.max(1) as f64
    }

    fn json(&self) -> Value {
        json!({
            "workload": self.workload,
            "backend": self.backend,
            "frames": self.got.frames,
            "frames_per_s": self.pps().round(),
            "gbit_per_s": (self.gbit() * 1000.0).round() / 1000.0,
            "device_cpu_ns_per_frame": self.device_cpu_ns.map(|n| self.per_frame(n).round()),
            "total_cpu_ns_per_frame": self.per_frame(self.total_cpu_ns).round(),
            "lost": self.got.order.lost,
            "out_of_order": self.got.order.out_of_order,
            "corrupt": self.got.corrupt,
            "stray": self.got.stray,
        })
    }
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("netbench: {}", vmm::error_chain(&e));
        std::process::exit(1);
    }
}

fn pick<T: Copy>(
    asked: &[String],
    all: &[(&'static str, T)],
    what: &str,
) -> Result<Vec<(&'static str, T)>, BenchError> {
    if asked.is_empty() {
        return Ok(all.to_vec());
    }
    asked
        .iter()
        .map(|n| {
            all.iter()
                .find(|(name, _)| name == n)
                .copied()
                .ok_or_else(|| {
                    let names: Vec<&str> = all.iter().map(|(n, _)| *n).collect();
                    BenchError::Usage(format!(
                        "unknown {what} {n:?} (one of {})",
                        names.join(", ")
                    ))
                })
        })
        .collect()
}

fn run(a: &Args) -> Result<(), BenchError> {
    let paths = [
        ("skiff-net", Which::SkiffNet),
        ("vhost-net", Which::VhostNet),
        ("tap", Which::Tap),
    ];
    let mut which: Vec<Which> = pick(&a.backends, &paths, "backend")?
        .into_iter()
        .map(|(_, w)| w)
        .collect();
    let has_vhost = std::path::Path::new("/dev/vhost-net").exists();
    if !has_vhost && which.contains(&Which::VhostNet) {
        if !a.backends.is_empty() {
            return Err(BenchError::Usage(
                "vhost-net: /dev/vhost-net is missing (a kernel without CONFIG_VHOST_NET, \
                 or the module not loaded)"
                    .into(),
            ));
        }
        println!(
            "netbench: vhost-net left out: /dev/vhost-net is missing on this host (a kernel \
             without CONFIG_VHOST_NET, or the module not loaded)"
        );
        which.retain(|w| *w != Which::VhostNet);
    }
    let all: Vec<(&'static str, (Kind, bool))> =
        WORKLOADS.iter().map(|&(n, k, tx)| (n, (k, tx))).collect();
    let workloads = pick(&a.workloads, &all, "workload")?;
    let secs = a.secs.unwrap_or(if a.quick { 0.5 } else { 5.0 });
    if !(0.1..=3600.0).contains(&secs) {
        return Err(BenchError::Usage(format!(
            "--secs {secs}: from 0.1 to 3600"
        )));
    }
    let secs = Duration::from_secs_f64(secs);
    let warmup = Duration::from_millis(if a.quick { 200 } else { 1000 });
    let bins = BinaryDir::open(a.device_bin_dir.as_deref())
        .map_err(|e| BenchError::Vmm("the device binary directory", e.into()))?;
    let seccomp = DeviceSeccomp::new(&sandbox::SeccompChoice::from_flags(a.no_seccomp, None))
        .map_err(|e| BenchError::Host("the seccomp filter file".into(), e))?;
    let common = Common {
        bins: &bins,
        seccomp: &seccomp,
        event_idx: !a.no_event_idx,
    };
    wire::private_netns()?;
    println!(
        "netbench: {} s per workload after {} ms warm-up, in a network namespace of its own; \
         the driver {} EVENT_IDX; paths {}",
        secs.as_secs_f64(),
        warmup.as_millis(),
        if a.no_event_idx { "without" } else { "with" },
        which
            .iter()
            .map(|w| w.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rounds = a.rounds.unwrap_or(if a.quick { 1 } else { 3 }).max(1);
    let mut rows = Vec::new();
    for round in 0..rounds {
        if rounds > 1 {
            println!("round {} of {rounds}", round + 1);
        }
        // Each round starts with another path, so that none always runs first.
        let mut order = which.clone();
        order.rotate_left(round % which.len().max(1));
        for (i, &(name, (kind, tx))) in workloads.iter().enumerate() {
            for (j, &w) in order.iter().enumerate() {
                let tap = format!("nb{round}x{i}x{j}");
                let context = |e: BenchError| BenchError::Run(name, w.name(), Box::new(e));
                let mut r = Running::start(w, &tap, kind, &common).map_err(context)?;
                let out = run_one(&r, kind, tx, warmup, secs);
                let broken = r.broken_rings();
                let ended = r.ended();
                r.stop();
                if let Some(how) = ended {
                    return Err(context(BenchError::Checks(format!(
                        "skiff-net ended: {how}"
                    ))));
                }
                let mut row = out.map_err(context)?;
                row.workload = name;
                print_row(&row);
                if broken > 0 {
                    return Err(context(BenchError::Checks(
                        "skiff-net marked a ring broken".into(),
                    )));
                }
                if row.got.frames == 0 {
                    return Err(context(BenchError::Checks(
                        "no frame arrived in the measured window".into(),
                    )));
                }
                // The source never runs further ahead than the TAP's queue holds: a frame
                // lost on the way to the guest was lost by the path.
                if !tx && row.got.order.lost > 0 {
                    return Err(context(BenchError::Checks(format!(
                        "{} frames sent to the guest never reached it",
                        row.got.order.lost
                    ))));
                }
                rows.push(row);
            }
        }
    }
    let bad: Vec<String> = rows
        .iter()
        .filter(|r| r.got.corrupt > 0 || r.got.order.out_of_order > 0)
        .map(|r| {
            format!(
                "{} on {}: {} corrupt, {} out of order",
                r.workload, r.backend, r.got.corrupt, r.got.order.out_of_order
            )
        })
        .collect();
    if !bad.is_empty() {
        return Err(BenchError::Checks(format!(
            "frames arrived damaged or out of order: {}",
            bad.join("; ")
        )));
    }
    println!("\nevery frame that arrived was intact and in order");
    let rows = medians(rows);
    if rounds > 1 {
        println!("\nthe median of {rounds} rounds (by throughput):");
        for r in &rows {
            print_row(r);
        }
    }
    report(a, &rows)
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Of every workload's rows on one path, the one of median throughput; in the order they
/// first came.
fn medians(rows: Vec<Row>) -> Vec<Row> {
    let mut groups: Vec<Vec<Row>> = Vec::new();
    for r in rows {
        match groups
            .iter_mut()
            .find(|g| g[0].workload == r.workload && g[0].backend == r.backend)
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .filter_map(|mut g| {
            g.sort_by(|a, b| a.pps().total_cmp(&b.pps()));
            let mid = g.len() / 2;
            g.into_iter().nth(mid)
        })
        .collect()
}

/// One workload on one path: the driver on this thread, the far end and a CPU sampler on
/// two others, one measured window for all.
fn run_one(
    r: &Running,
    kind: Kind,
    tx: bool,
    warmup: Duration,
    secs: Duration,
) -> Result<Row, BenchError> {
    let t = Template::new(kind);
    let start = Instant::now() + warmup;
    let w = Window {
        start,
        end: start + secs,
    };
    let rings = r.rings();
    let stop = AtomicBool::new(false);
    let received = AtomicU64::new(0);
    let credit = backend::eventfd()?;
    let sock = if tx {
        PacketSocket::sink(r.ifindex, kind.ethertype())?
    } else {
        PacketSocket::source(r.ifindex, kind.ethertype(), kind == Kind::Tso)?
    };
    let sample = || (r.device_cpu_ns(), r.total_cpu_ns());
    let (got, cpu) = std::thread::scope(|s| -> Result<_, BenchError> {
        let sampler = s.spawn(|| {
            std::thread::sleep(w.start.saturating_duration_since(Instant::now()));
            let a = sample();
            std::thread::sleep(w.end.saturating_duration_since(Instant::now()));
            (a, sample())
        });
        let got = if tx {
            let sink = s.spawn(|| wire::sink(&sock, &t, w, &stop));
            // The sink stops however the driver ends, a panic included.
            let _stop = StopOnDrop(&stop);
            let sent = match r.which {
                Which::Tap => driver::tap_transmit(r.tap.as_raw_fd(), &t, w),
                _ => driver::transmit(&rings, &t, w),
            };
            // What is on its way through the stack gets a moment to arrive.
            std::thread::sleep(Duration::from_millis(100));
            stop.store(true, Ordering::Relaxed);
            let got = sink
                .join()
                .map_err(|_| BenchError::Usage("the sink panicked".into()))?;
            sent?;
            got
        } else {
            let source =
                s.spawn(|| wire::source(&sock, &t, w, &received, &credit, kind == Kind::Tso));
            let got = match r.which {
                Which::Tap => driver::tap_receive(&r.tap, &t, w, &received, &credit),
                _ => driver::receive(&rings, &t, w, &received, &credit),
            };
            let sent = source
                .join()
                .map_err(|_| BenchError::Usage("the source panicked".into()))?;
            sent?;
            got?
        };
        let cpu = sampler
            .join()
            .map_err(|_| BenchError::Usage("the sampler panicked".into()))?;
        Ok((got, cpu))
    })?;
    let ((dev0, tot0), (dev1, tot1)) = cpu;
    Ok(Row {
        workload: "",
        backend: r.which.name(),
        got,
        secs: secs.as_secs_f64(),
        device_cpu_ns: dev0.zip(dev1).map(|(a, b)| b.saturating_sub(a)),
        total_cpu_ns: tot1.saturating_sub(tot0),
    })
}

fn print_row(r: &Row) {
    println!(
        "{:10} {:10} {:>10.0} frames/s {:>7.2} Gbit/s  device CPU {:>7} ns/frame  \
         all CPU {:>7.0} ns/frame  lost {} stray {}",
        r.workload,
        r.backend,
        r.pps(),
        r.gbit(),
        r.device_cpu_ns
            .map_or("-".to_string(), |n| format!("{:.0}", r.per_frame(n))),
        r.per_frame(r.total_cpu_ns),
        r.got.order.lost,
        r.got.stray,
    );
}

/// The ratios, the JSON file and the plots.
fn report(a: &Args, rows: &[Row]) -> Result<(), BenchError> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.workload) {
            names.push(r.workload);
        }
    }
    let find = |w: &str, b: &str| rows.iter().find(|r| r.workload == w && r.backend == b);
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let mut ratios = Vec::new();
    println!();
    for w in &names {
        let Some(s) = find(w, "skiff-net") else {
            continue;
        };
        for other in ["vhost-net", "tap"] {
            if let Some(o) = find(w, other) {
                let r = s.pps() / o.pps().max(f64::MIN_POSITIVE);
                println!("ratio {w} skiff-net/{other} = {r:.2}");
                ratios.push(json!({"workload": w, "of": format!("skiff-net/{other}"),
                                   "throughput": round(r)}));
            }
        }
        if let (Some(sc), Some(o)) = (s.device_cpu_ns, find(w, "vhost-net")) {
            if let Some(oc) = o.device_cpu_ns.filter(|&n| n > 0) {
                let r = s.per_frame(sc) / o.per_frame(oc).max(f64::MIN_POSITIVE);
                println!("cpu {w} skiff-net/vhost-net = {r:.2}");
                ratios.push(json!({"workload": w, "of": "skiff-net/vhost-net",
                                   "device_cpu_per_frame": round(r)}));
            }
        }
    }
    let doc = json!({
        "where": "this host, native speed (no guest: a synthetic driver on the rings)",
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    let host_err = |p: &std::path::Path| {
        let p = p.display().to_string();
        move |e| BenchError::Host(p, e)
    };
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(host_err(parent))?;
    }
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    std::fs::write(&a.out, text).map_err(host_err(&a.out))?;
    let stem = a.out.with_extension("");
    for w in &names {
        let tso = w.ends_with("tso");
        let bars: Vec<(&str, f64)> = rows
            .iter()
            .filter(|r| r.workload == *w)
            .map(|r| (r.backend, if tso { r.gbit() } else { r.pps() }))
            .collect();
        let unit = if tso { "Gbit/s" } else { "frames/s" };
        let path = PathBuf::from(format!("{}-{w}.svg", stem.display()));
        std::fs::write(&path, plot::bars(w, unit, &bars)).map_err(host_err(&path))?;
    }
    println!(
        "\nresults: {} and {}-WORKLOAD.svg",
        a.out.display(),
        stem.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(workload: &'static str, backend: &'static str, frames: u64) -> Row {
        Row {
            workload,
            backend,
            got: Received {
                frames,
                ..Received::default()
            },
            secs: 1.0,
            device_cpu_ns: None,
            total_cpu_ns: 0,
        }
    }

    #[test]
    fn the_median_round_of_each_workload_and_path_is_kept_in_order() {
        let rows = vec![
            row("tx-64", "skiff-net", 30),
            row("tx-64", "tap", 90),
            row("tx-64", "skiff-net", 10),
            row("tx-64", "tap", 70),
            row("tx-64", "skiff-net", 20),
            row("tx-64", "tap", 80),
        ];
        let m = medians(rows);
        let got: Vec<(&str, u64)> = m.iter().map(|r| (r.backend, r.got.frames)).collect();
        assert_eq!(got, vec![("skiff-net", 20), ("tap", 80)]);
    }
}

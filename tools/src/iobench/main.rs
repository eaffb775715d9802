//! Block data-path benchmark at native speed: skiff-blk beside qemu-storage-daemon's
//! vhost-user-blk export and the host's own fio, same image file system, same workloads, in
//! one run, reported as ratios.
//!
//! Both vhost-user backends are driven by skiff's own front end (the VMM's
//! `VhostUserDevice`, started as the VMM starts or connects a backend: see backend.rs) and
//! by the same synthetic guest driver (load.rs), which keeps the requests in flight on the
//! rings in guest memory and checks every completion against what the image holds, so a
//! fast wrong answer cannot win. The host's figure is fio with io_uring on a copy of the
//! image (host.rs). No KVM and no guest: the driver writes the kick eventfds and waits on
//! the call eventfd that KVM's ioeventfds and irqfd would use, so the figures are the
//! backends' and the host's, not the nested test host's TCG.
//!
//! Each workload (4 KiB random read and write at queue depth 1 and 32, 128 KiB sequential
//! read and write at 8, on 1 and 4 queues, O_DIRECT and buffered) runs on each backend in
//! turn; the summary ends with one line per workload and comparison,
//! `ratio WORKLOAD skiff-blk/qemu-storage-daemon = R` (throughput; above 1 is skiff-blk
//! faster) and `cpu WORKLOAD skiff-blk/qemu-storage-daemon = R` (backend CPU time per
//! request; below 1 is skiff-blk cheaper). tools/iobench.sh builds and runs it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use vmm::builder::DeviceSeccomp;
use vmm::device_binary::BinaryDir;

mod backend;
mod host;
mod load;
mod plot;
#[path = "../proc_cpu.rs"]
#[allow(dead_code)] // the vhost worker's CPU is netbench's
mod proc_cpu;
#[path = "../split_ring.rs"]
mod split_ring;
#[path = "../stats.rs"]
mod stats;

use backend::{Common, Running, Which};
use load::{Contents, Device, Pattern, BLOCK, MAX_BS, MAX_QD, MAX_QUEUES};
use proc_cpu::cpu_ns;
use stats::Stats;

/// Block I/O through skiff-blk, qemu-storage-daemon and the host, side by side.
#[derive(Debug, Parser)]
#[command(name = "iobench")]
struct Args {
    /// A short run for CI: a 128 MiB image, 1 s per workload, O_DIRECT only.
    #[arg(long)]
    quick: bool,
    /// Seconds measured per workload and backend (default 10; --quick 1).
    #[arg(long)]
    secs: Option<f64>,
    /// Image size in MiB (default 1024; --quick 128).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Directory for the images and logs, on the file system to measure (default
    /// target/iobench).
    #[arg(long, value_name = "DIR", default_value = "target/iobench")]
    dir: PathBuf,
    /// What to compare: skiff-blk, qemu-storage-daemon, host.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "skiff-blk,qemu-storage-daemon,host"
    )]
    backends: Vec<String>,
    /// Request queue counts to run (1 to 4).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    queues: Vec<usize>,
    /// Cache modes: direct (O_DIRECT) and/or buffered (default both; --quick direct).
    #[arg(long, value_delimiter = ',')]
    cache: Vec<String>,
    /// Workloads (default all): randread-4k-qd1, randwrite-4k-qd1, randread-4k-qd32,
    /// randwrite-4k-qd32, read-128k-qd8, write-128k-qd8.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// qemu-storage-daemon's `aio=` for its file (io_uring, native, threads).
    #[arg(long, default_value = "io_uring")]
    qsd_aio: String,
    /// skiff-blk's --io-engine (io-uring, sync): to measure one against the other.
    #[arg(long, default_value = "io-uring")]
    skiff_io_engine: String,
    /// The directory skiff-blk is taken from, checked as skiff checks its
    /// --device-bin-dir (default: this program's directory).
    #[arg(long, value_name = "DIR")]
    device_bin_dir: Option<PathBuf>,
    /// Start skiff-blk with --no-seccomp (to measure what its filter costs).
    #[arg(long)]
    no_seccomp: bool,
    /// JSON results file; the SVG plots go beside it.
    #[arg(long, value_name = "PATH", default_value = "target/iobench.json")]
    out: PathBuf,
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A bad option, or a backend that cannot do what is asked.
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
    /// A backend failed to start or to take its rings.
    #[error("{0}")]
    Backend(String, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// fio failed or printed something unexpected.
    #[error("fio: {0}")]
    Fio(String),
    /// The checks found failed requests, wrong data or lost writes.
    #[error("{0}")]
    Checks(String),
}

/// The workloads, by name.
const WORKLOADS: [(&str, Pattern); 6] = [
    ("randread-4k-qd1", pat(false, true, 4, 1)),
    ("randwrite-4k-qd1", pat(true, true, 4, 1)),
    ("randread-4k-qd32", pat(false, true, 4, 32)),
    ("randwrite-4k-qd32", pat(true, true, 4, 32)),
    ("read-128k-qd8", pat(false, false, 128, 8)),
    ("write-128k-qd8", pat(true, false, 128, 8)),
];

const fn pat(write: bool, random: bool, kib: u64, qd: u16) -> Pattern {
    Pattern {
        write,
        random,
        bs: kib << 10,
        qd,
    }
}

/// One row: a workload on one backend.
struct Row {
    workload: String,
    backend: &'static str,
    requests: u64,
    bytes: u64,
    secs: f64,
    lat: Option<Stats>,
    cpu_secs: f64,
}

impl Row {
    fn iops(&self) -> f64 {
        self.requests as f64 / self.secs
    }
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }
    /// CPU seconds per million requests.
    fn cpu_per_m(&self) -> f64 {
        self.cpu_secs / (self.requests.max(1) as f64) * 1e6
    }
    /// CPU seconds per GiB moved.
    fn cpu_per_gib(&self) -> f64 {
        self.cpu_secs / (self.bytes.max(1) as f64) * f64::from(1u32 << 30)
    }
    fn json(&self) -> Value {
        let r = stats::round;
        json!({"workload": self.workload, "backend": self.backend,
               "iops": r(self.iops()), "mb_s": r(self.mb_s()),
               "latency": self.lat.map(|l| l.json()),
               "cpu_s": (self.cpu_secs * 1000.0).round() / 1000.0,
               "cpu_s_per_million_requests": r(self.cpu_per_m()),
               "cpu_s_per_gib": (self.cpu_per_gib() * 1000.0).round() / 1000.0,
               "requests": self.requests, "secs": self.secs})
    }
}

fn host_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    let what = what.into();
    move |e| BenchError::Host(what, e)
}

/// Writes generation 0 into every block of `path` (`size` bytes), then drops it from the
/// page cache so buffered and direct runs start alike.
fn fill(path: &Path, size: u64) -> Result<(), BenchError> {
    let f = File::create(path).map_err(host_err(path.display().to_string()))?;
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        for (i, b) in buf[..n as usize]
            .chunks_exact_mut(BLOCK as usize)
            .enumerate()
        {
            load::fill_block(b, off / BLOCK + i as u64, 0);
        }
        f.write_all_at(&buf[..n as usize], off)
            .map_err(host_err(path.display().to_string()))?;
        off += n;
    }
    f.sync_all().map_err(host_err(path.display().to_string()))?;
    drop_cache(&f);
    Ok(())
}

fn drop_cache(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise on an open fd; advice only, no memory passed.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Reads `path` back and counts the blocks not at their generation.
fn verify(path: &Path, generations: &[u64]) -> Result<u64, BenchError> {
    let f = File::open(path).map_err(host_err(path.display().to_string()))?;
    let per = 256usize;
    let mut buf = vec![0u8; per * BLOCK as usize];
    let mut bad = 0;
    for (c, gens) in generations.chunks(per).enumerate() {
        let off = (c * per) as u64 * BLOCK;
        let len = gens.len() * BLOCK as usize;
        f.read_exact_at(&mut buf[..len], off)
            .map_err(host_err(format!("reading {} back", path.display())))?;
        for (i, g) in gens.iter().enumerate() {
            let block = (c * per + i) as u64;
            let b = &buf[i * BLOCK as usize..(i + 1) * BLOCK as usize];
            if !load::block_is(b, block, *g) {
                bad += 1;
            }
        }
    }
    Ok(bad)
}

/// One workload on one backend through the synthetic driver.
fn run_backend(
    r: &mut Running,
    name: &str,
    p: &Pattern,
    window: (Duration, Duration),
    contents: &mut Contents,
) -> Result<Row, BenchError> {
    let (kicks, call) = r.eventfds()?;
    let dev = Device {
        mem: &r.ram.mem,
        rings: (0..r.queues).map(load::ring).collect(),
        kicks,
        call: &call,
    };
    let pid = r.pid();
    let o = load::run(&dev, p, window, contents, &mut r.positions, &|| cpu_ns(pid));
    let cpu = o.sampled.1.saturating_sub(o.sampled.0) as f64 / 1e9;
    let broken = r.broken_rings();
    if o.errors > 0 || o.bad_reads > 0 || broken > 0 {
        return Err(BenchError::Checks(format!(
            "{name} on {}: {} failed requests, {} blocks read back wrong, {} broken rings",
            r.which.name(),
            o.errors,
            o.bad_reads,
            broken
        )));
    }
    let lat = Stats::of(&o.latencies);
    Ok(Row {
        workload: name.to_string(),
        backend: r.which.name(),
        requests: o.requests,
        bytes: o.bytes,
        secs: o.secs,
        lat,
        cpu_secs: cpu,
    })
}

/// What the options ask for.
struct Plan {
    which: Vec<Which>,
    with_host: bool,
    direct: Vec<bool>,
    workloads: Vec<(&'static str, Pattern)>,
}

fn parse_args(a: &Args) -> Result<Plan, BenchError> {
    let mut which = Vec::new();
    let mut host = false;
    for b in &a.backends {
        match b.as_str() {
            "skiff-blk" => which.push(Which::SkiffBlk),
            "qemu-storage-daemon" => which.push(Which::Qsd),
            "host" => host = true,
            other => {
                return Err(BenchError::Usage(format!(
                    "unknown backend {other:?} (skiff-blk, qemu-storage-daemon, host)"
                )))
            }
        }
    }
    let cache: Vec<String> = if a.cache.is_empty() {
        if a.quick {
            vec!["direct".into()]
        } else {
            vec!["direct".into(), "buffered".into()]
        }
    } else {
        a.cache.clone()
    };
    let direct = cache
        .iter()
        .map(|c| match c.as_str() {
            "direct" => Ok(true),
            "buffered" => Ok(false),
            other => Err(BenchError::Usage(format!(
                "unknown cache mode {other:?} (direct, buffered)"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(q) = a.queues.iter().find(|q| **q == 0 || **q > MAX_QUEUES) {
        return Err(BenchError::Usage(format!(
            "{q} queues: 1 to {MAX_QUEUES} are measured"
        )));
    }
    let workloads = if a.workloads.is_empty() {
        WORKLOADS.to_vec()
    } else {
        a.workloads
            .iter()
            .map(|w| {
                WORKLOADS
                    .iter()
                    .find(|(n, _)| n == w)
                    .copied()
                    .ok_or_else(|| BenchError::Usage(format!("unknown workload {w:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    debug_assert!(workloads
        .iter()
        .all(|(_, p)| p.qd <= MAX_QD && p.bs <= MAX_BS));
    Ok(Plan {
        which,
        with_host: host,
        direct,
        workloads,
    })
}

fn main() {
    let a = Args::parse();
    match run(&a) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("iobench: {}", vmm::error_chain(&e));
            std::process::exit(1);
        }
    }
}

fn run(a: &Args) -> Result<(), BenchError> {
    let Plan {
        which,
        with_host,
        direct,
        workloads,
    } = parse_args(a)?;
    let secs = Duration::from_secs_f64(a.secs.unwrap_or(if a.quick { 1.0 } else { 10.0 }));
    let warmup = if a.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_secs(1)
    };
    let size = a.size_mib.unwrap_or(if a.quick { 128 } else { 1024 }) << 20;
    if size < 16 << 20 {
        return Err(BenchError::Usage("--size-mib must be at least 16".into()));
    }
    std::fs::create_dir_all(&a.dir).map_err(host_err(a.dir.display().to_string()))?;
    let dir = a
        .dir
        .canonicalize()
        .map_err(host_err(a.dir.display().to_string()))?;
    let image = dir.join("disk.img");
    let host_image = dir.join("host.img");
    let bins = BinaryDir::open(a.device_bin_dir.as_deref())
        .map_err(|e| BenchError::Vmm("the device binary directory", e.into()))?;
    let seccomp = DeviceSeccomp::new(&sandbox::SeccompChoice::from_flags(a.no_seccomp, None))
        .map_err(host_err("the seccomp filter file"))?;
    let common = Common {
        image: &image,
        bins: &bins,
        seccomp: &seccomp,
        qsd_aio: &a.qsd_aio,
        skiff_io_engine: &a.skiff_io_engine,
        dir: &dir,
    };
    println!(
        "iobench: {} MiB image in {}, {} s per workload after {} ms warm-up; backends {}{}; \
         skiff-blk --io-engine {}; qemu-storage-daemon with an iothread and aio={}",
        size >> 20,
        dir.display(),
        secs.as_secs_f64(),
        warmup.as_millis(),
        which
            .iter()
            .map(|w| w.name())
            .collect::<Vec<_>>()
            .join(", "),
        if with_host {
            ", host (fio, io_uring)"
        } else {
            ""
        },
        a.skiff_io_engine,
        a.qsd_aio
    );
    fill(&image, size)?;
    if with_host {
        fill(&host_image, size)?;
    }
    let mut contents = Contents {
        generations: vec![0u64; (size / BLOCK) as usize],
        seq: 0,
    };
    let mut rows = Vec::new();
    for &queues in &a.queues {
        for &d in &direct {
            let mode = if d { "direct" } else { "buffered" };
            let mut running = Vec::new();
            for &w in &which {
                running.push(Running::start(w, &common, queues, d)?);
            }
            for (wname, p) in &workloads {
                let name = format!("{wname}-{queues}q-{mode}");
                for r in &mut running {
                    let row = run_backend(r, &name, p, (warmup, secs), &mut contents)?;
                    print_row(&row);
                    rows.push(row);
                }
                if with_host {
                    let f = host::fio(&host_image, size, p, queues, d, warmup, secs)?;
                    let row = Row {
                        workload: name.clone(),
                        backend: "host",
                        requests: f.requests,
                        bytes: f.bytes,
                        secs: f.secs,
                        lat: Some(f.lat),
                        cpu_secs: f.cpu_secs,
                    };
                    print_row(&row);
                    rows.push(row);
                }
            }
            for r in running {
                r.stop();
            }
            if !which.is_empty() {
                let bad = verify(&image, &contents.generations)?;
                if bad > 0 {
                    return Err(BenchError::Checks(format!(
                        "{bad} blocks of the image do not hold what the backends \
                         acknowledged writing ({queues} queue(s), {mode})"
                    )));
                }
            }
        }
    }
    println!("\nevery read matched the image and every acknowledged write is in it");
    report(a, &rows)
}

fn print_row(r: &Row) {
    println!(
        "{:32} {:20} {:>10.0} IOPS {:>8.1} MB/s  p50 {:>7.1} µs  p99 {:>8.1} µs  \
         CPU {:>6.2} s/M req {:>6.3} s/GiB",
        r.workload,
        r.backend,
        r.iops(),
        r.mb_s(),
        r.lat.map_or(0.0, |l| l.p50),
        r.lat.map_or(0.0, |l| l.p99),
        r.cpu_per_m(),
        r.cpu_per_gib()
    );
}

/// The ratios, the JSON file and the plots.
fn report(a: &Args, rows: &[Row]) -> Result<(), BenchError> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.workload.as_str()) {
            names.push(&r.workload);
        }
    }
    let find = |w: &str, b: &str| rows.iter().find(|r| r.workload == w && r.backend == b);
    let mut ratios = Vec::new();
    println!();
    for w in &names {
        let Some(s) = find(w, "skiff-blk") else {
            continue;
        };
        for other in ["qemu-storage-daemon", "host"] {
            if let Some(o) = find(w, other) {
                let r = s.iops() / o.iops().max(f64::MIN_POSITIVE);
                println!("ratio {w} skiff-blk/{other} = {r:.2}");
                ratios.push(json!({"workload": w, "of": format!("skiff-blk/{other}"),
                                   "throughput": stats::round(r * 100.0) / 100.0}));
            }
        }
        if let Some(o) = find(w, "qemu-storage-daemon") {
            let r = s.cpu_per_m() / o.cpu_per_m().max(f64::MIN_POSITIVE);
            println!("cpu {w} skiff-blk/qemu-storage-daemon = {r:.2}");
            ratios.push(json!({"workload": w, "of": "skiff-blk/qemu-storage-daemon",
                               "cpu_per_request": stats::round(r * 100.0) / 100.0}));
        }
    }
    let doc = json!({
        "where": "this host, native speed (no guest: a synthetic driver on the rings)",
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(host_err(parent.display().to_string()))?;
    }
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    std::fs::write(&a.out, text).map_err(host_err(a.out.display().to_string()))?;
    let stem = a.out.with_extension("");
    for w in &names {
        let bars: Vec<(&str, f64)> = rows
            .iter()
            .filter(|r| r.workload == *w)
            .map(|r| (r.backend, r.iops()))
            .collect();
        let path = PathBuf::from(format!("{}-{w}.svg", stem.display()));
        std::fs::write(&path, plot::bars(w, "IOPS", &bars))
            .map_err(host_err(path.display().to_string()))?;
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

    #[test]
    fn verify_finds_a_block_that_is_not_what_was_written() {
        let dir = std::env::temp_dir().join(format!("iobench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        fill(&path, 1 << 20).unwrap();
        let mut gens = vec![0u64; 256];
        assert_eq!(verify(&path, &gens).unwrap(), 0);
        // A write the backend acknowledged but the image does not hold.
        gens[17] = 5;
        assert_eq!(verify(&path, &gens).unwrap(), 1);
        // The write, in the image.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut b = vec![0u8; BLOCK as usize];
        load::fill_block(&mut b, 17, 5);
        f.write_all_at(&b, 17 * BLOCK).unwrap();
        assert_eq!(verify(&path, &gens).unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

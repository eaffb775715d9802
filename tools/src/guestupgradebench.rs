//! Device-process upgrades as a real guest sees them: N upgrades of skiff-blk under fio and
//! N of skiff-net under a TCP stream, with the guest-side effect beside a baseline run of
//! the same load without upgrades.
//!
//! It starts `skiff --api-sock`, boots the bench root filesystem (fio, busybox) with a data
//! drive and a network interface on a TAP in a private network namespace, and drives the
//! guest's shell on the serial console. For each device:
//!
//! - **blk**: fio in the guest, 4 KiB random writes, direct I/O, queue depth 32, on the data
//!   drive, logging every completion (`--write_lat_log`, `--log_avg_msec=0`). The guest's
//!   awk reduces the log to the longest gap between completions (fio logs in ms) and the
//!   longest completion latency (µs).
//! - **net**: the guest streams zeros to a TCP receiver in this program (`nc HOST PORT <
//!   /dev/zero`), which records the longest gap between data arriving, in µs, and the rate.
//!
//! Each load runs in chunks of `--chunk-s` seconds: one chunk without upgrades (the
//! baseline), then chunks during which a thread upgrades the device through the API
//! (`PUT /skiff/devices/{id}/upgrade`) every `--interval-ms`, from 2 s after the chunk
//! starts until 3 s before it ends, until N upgrades are done. The VMM's own report of each
//! upgrade gives the pause (first ring stopped to last ring running on the new process) and
//! the whole upgrade. The baseline (one chunk) is compared with the median chunk with
//! upgrades, like for like, and with the worst one; rates are means over the chunks. Progress
//! is saved after each chunk (`--resume`).
//!
//! Needs a KVM that boots ordinary guests and root (namespace, TAP): tools/upgradebench.sh
//! `--guest` runs it, inside the nested test host when this host's KVM cannot (all figures
//! are then under TCG). tools/src/upgradebench/ times the VMM's switch code itself at
//! native speed.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api_server::client::ApiClient;
use api_server::models::{
    ActionType, BootSource, Drive, MachineConfig, NetworkInterface, UpgradeReport,
};
use clap::Parser;
use serde_json::{json, Value};

#[path = "guest_console.rs"]
mod guest_console;
#[path = "stats.rs"]
mod stats;
use guest_console::{Console, Pending};
use stats::Stats;

const TAP: &str = "skgb0";
/// The data drive fio writes to (its first 64 MiB).
const DATA_SIZE: i64 = 128 << 20;
const HOST_IP: &str = "172.31.7.1";
const GUEST_IP: &str = "172.31.7.2";
const PORT: u16 = 5599;
/// skiff's default command line base (ACPI on).
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off 8250.nr_uarts=1 \
                       i8042.noaux i8042.nomux i8042.dumbkbd";
/// Upgrades start this long after a chunk's load starts and stop this long before it ends.
const LEAD: Duration = Duration::from_secs(2);
const TAIL: Duration = Duration::from_secs(3);

/// Device-process upgrades under load in a real guest (see the module doc).
#[derive(Debug, Parser)]
#[command(name = "upgradebench-guest")]
struct Args {
    /// skiff binary.
    #[arg(long, value_name = "PATH")]
    skiff: PathBuf,
    /// Guest kernel.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Root filesystem with fio and busybox (the bench image, decompressed); the guest
    /// boots a copy.
    #[arg(long, value_name = "PATH")]
    rootfs: PathBuf,
    /// Directory for skiff's log and the results (the API socket and the drives are in a
    /// temporary directory).
    #[arg(long, value_name = "DIR", default_value = "target/upgradebench-guest")]
    dir: PathBuf,
    /// Upgrades of each device.
    #[arg(long, default_value_t = 1000)]
    upgrades: usize,
    /// Devices to measure: blk, net or both.
    #[arg(long, value_delimiter = ',', default_value = "blk,net")]
    devices: Vec<String>,
    /// Seconds of load per chunk (the baseline is one chunk).
    #[arg(long, default_value_t = 30)]
    chunk_s: u64,
    /// Pause between upgrades, in milliseconds.
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Go on from the progress a previous run saved in the output dir (after each chunk)
    /// instead of starting over: the nested test host sometimes dies during long runs.
    #[arg(long)]
    resume: bool,
}

type Result<T> = std::result::Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

// ------------------------------------------------------------------ host side

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .map_err(err(args[0]))?;
    if !st.success() {
        return Err(format!("{}: {st}", args.join(" ")));
    }
    Ok(())
}

/// A private network namespace for this process (and skiff, its child) with the TAP the
/// guest's eth0 uses: nothing the benchmark sends leaves it.
fn private_network() -> Result<()> {
    // SAFETY: unshare only changes this thread's namespace membership; no thread was
    // started yet, so the whole process moves.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "a private network namespace needs root: {}",
            io::Error::last_os_error()
        ));
    }
    sh(&["ip", "link", "set", "lo", "up"])?;
    sh(&["ip", "tuntap", "add", "dev", TAP, "mode", "tap"])?;
    sh(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])?;
    sh(&["ip", "link", "set", TAP, "up"])
}

/// Upgrades device `id` every `interval` from `start` until `stop` or until `left` is
/// zero; the VMM's reports.
fn upgrader(
    sock: PathBuf,
    id: &'static str,
    left: usize,
    start: Instant,
    stop: Instant,
    interval: Duration,
) -> JoinHandle<Result<Vec<UpgradeReport>>> {
    std::thread::spawn(move || {
        // Upgrades get the client's slow timeout (60 s); a VMM that stops answering fails the
        // run instead of hanging it.
        let mut api = ApiClient::new(&sock).with_timeout(Duration::from_secs(10));
        let mut reports = Vec::new();
        if let Some(d) = start.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        while reports.len() < left && Instant::now() < stop {
            let r = api
                .upgrade_device(id, None)
                .map_err(|e| format!("upgrade {} of {id}: {e}", reports.len() + 1))?;
            if r.rings == 0 {
                return Err(format!("upgrade of {id} moved no ring: {r:?}"));
            }
            reports.push(r);
            std::thread::sleep(interval);
        }
        Ok(reports)
    })
}

/// What one chunk of load showed the guest (blk) or the receiver (net).
#[derive(Clone, Copy, Debug, Default)]
struct Effect {
    /// Longest time without a completion (blk, ms resolution) or without data (net).
    max_gap: Duration,
    /// Longest completion latency (blk).
    max_latency: Duration,
    /// Completions (blk) or bytes (net) per second.
    rate: f64,
}

/// What one device's run has measured so far; saved after each chunk so that a run the
/// nested test host interrupted can go on (`--resume`).
#[derive(Default)]
struct Progress {
    baseline: Option<Effect>,
    /// One per chunk with upgrades.
    chunks: Vec<Effect>,
    pause_us: Vec<u64>,
    total_us: Vec<u64>,
}

fn effect_json(e: &Effect) -> Value {
    json!({"max_gap_us": e.max_gap.as_micros() as u64,
           "max_latency_us": e.max_latency.as_micros() as u64, "rate": e.rate})
}

fn effect_from(v: &Value) -> Option<Effect> {
    Some(Effect {
        max_gap: Duration::from_micros(v.get("max_gap_us")?.as_u64()?),
        max_latency: Duration::from_micros(v.get("max_latency_us")?.as_u64()?),
        rate: v.get("rate")?.as_f64()?,
    })
}

impl Progress {
    fn path(a: &Args, device: &str) -> PathBuf {
        a.dir.join(format!("progress-{device}.json"))
    }

    fn load(a: &Args, device: &str) -> Result<Progress> {
        let path = Progress::path(a, device);
        if !a.resume || !path.exists() {
            return Ok(Progress::default());
        }
        let text = std::fs::read_to_string(&path).map_err(err("reading the saved progress"))?;
        let v: Value = serde_json::from_str(&text).map_err(err("saved progress"))?;
        let list = |k: &str| -> Vec<u64> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default()
        };
        let p = Progress {
            baseline: v.get("baseline").and_then(effect_from),
            chunks: v
                .get("chunks")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(effect_from).collect())
                .unwrap_or_default(),
            pause_us: list("pause_us"),
            total_us: list("total_us"),
        };
        println!(
            "{device}: going on from {} (baseline {}, {} upgrades)",
            path.display(),
            if p.baseline.is_some() {
                "done"
            } else {
                "not done"
            },
            p.pause_us.len()
        );
        Ok(p)
    }

    fn save(&self, a: &Args, device: &str) -> Result<()> {
        let v = json!({
            "baseline": self.baseline.as_ref().map(effect_json),
            "chunks": self.chunks.iter().map(effect_json).collect::<Vec<_>>(),
            "pause_us": self.pause_us,
            "total_us": self.total_us,
        });
        // Written whole then renamed: the nested host may die at any moment.
        let path = Progress::path(a, device);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, v.to_string())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(err("saving the progress"))
    }
}

fn fio_chunk(con: &mut Console, secs: u64) -> Result<(Instant, Pending)> {
    let cmd = format!(
        "rm -f /tmp/g_*.log; fio --name=g --filename=/dev/vdb --rw=randwrite --bs=4k \
         --iodepth=32 --ioengine=libaio --direct=1 --size=64m --time_based --runtime={secs} \
         --write_lat_log=/tmp/g --log_avg_msec=0 --disable_slat=1 --disable_lat=1 \
         --eta=never --output=/dev/null && \
         awk -F, '{{t=$1+0; l=$2+0; if (l>m) m=l; if (NR>1 && t-p>g) g=t-p; p=t}} \
         END {{printf \"FIOSTAT %d %d %d\\n\", NR, m/1000, g}}' /tmp/g_clat.1.log"
    );
    let t = con.start(&cmd)?;
    Ok((Instant::now(), t))
}

fn fio_effect(out: &str, secs: u64) -> Result<Effect> {
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("FIOSTAT "))
        .ok_or_else(|| format!("fio printed no summary:\n{out}"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().map_err(|_| format!("bad fio summary {line:?}")))
        .collect::<Result<_>>()?;
    let [n, lat_us, gap_ms] = v[..] else {
        return Err(format!("bad fio summary {line:?}"));
    };
    Ok(Effect {
        max_gap: Duration::from_millis(gap_ms),
        max_latency: Duration::from_micros(lat_us),
        rate: n as f64 / secs as f64,
    })
}

/// Accepts the guest's stream and reads it until `secs` after the first byte, then closes
/// it (which ends the guest's nc); the longest gap between reads and the rate.
fn receiver(listener: &TcpListener, secs: u64) -> Result<Effect> {
    listener.set_nonblocking(true).map_err(err("listener"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(format!("accepting the guest's stream: {e}")),
        }
    };
    s.set_nonblocking(false).map_err(err("stream"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(err("read timeout"))?;
    let mut buf = vec![0u8; 256 * 1024];
    // Timed from the first data, which is not counted in the rate.
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let mut bytes = 0u64;
    let mut max_gap = Duration::ZERO;
    loop {
        let n = s
            .read(&mut buf)
            .map_err(err("reading the guest's stream (stalled for 60 s?)"))?;
        if n == 0 {
            return Err("the guest's stream ended early".into());
        }
        let now = Instant::now();
        let Some(start) = first else {
            first = Some(now);
            last = now;
            continue;
        };
        max_gap = max_gap.max(now - last);
        last = now;
        bytes += n as u64;
        if now - start >= Duration::from_secs(secs) {
            return Ok(Effect {
                max_gap,
                max_latency: Duration::ZERO,
                rate: bytes as f64 / (now - start).as_secs_f64(),
            });
        }
    }
}

// ------------------------------------------------------------------ the run

/// The API socket and the drives; removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Guest {
    skiff: Child,
    con: Console,
    sock: PathBuf,
    /// Dropped after skiff is killed (fields drop after `drop`).
    _work: WorkDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.skiff.kill();
        let _ = self.skiff.wait();
    }
}

fn boot(a: &Args) -> Result<Guest> {
    std::fs::create_dir_all(&a.dir).map_err(err("creating the output dir"))?;
    let dir = std::fs::canonicalize(&a.dir).map_err(err("output dir"))?;
    // Socket and images on a local file system (the output dir may be a 9p share, as in
    // the nested test host, where sockets cannot live).
    let work =
        WorkDir(std::env::temp_dir().join(format!("upgradebench-guest-{}", std::process::id())));
    std::fs::create_dir_all(&work.0).map_err(err("creating the work dir"))?;
    let sock = work.0.join("api.sock");
    let rootfs = work.0.join("rootfs.ext4");
    std::fs::copy(&a.rootfs, &rootfs).map_err(err("copying the root filesystem"))?;
    let mut perms = std::fs::metadata(&rootfs)
        .map_err(err("root filesystem copy"))?
        .permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&rootfs, perms).map_err(err("root filesystem copy"))?;
    // Allocated in full, so that the baseline does not pay for first writes that the runs
    // with upgrades (on blocks already written) do not.
    let data = work.0.join("data.img");
    let f = std::fs::File::create(&data).map_err(err("creating the data drive"))?;
    // SAFETY: fallocate on an fd this function owns; no memory is passed.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, DATA_SIZE) } != 0 {
        return Err(format!(
            "allocating the data drive: {}",
            io::Error::last_os_error()
        ));
    }
    drop(f);
    // Appended to: a resumed run keeps the logs of the attempts before it.
    if !a.resume {
        let _ = std::fs::remove_file(dir.join("skiff.log"));
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("skiff.log"))
        .map_err(err("skiff.log"))?;
    let _ = writeln!(
        log,
        "--- upgradebench-guest: skiff starts (resume: {})",
        a.resume
    );
    let mut skiff = Command::new(&a.skiff)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--id", "upgradebench"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(err("starting skiff"))?;
    let con = Console::new(&mut skiff)?;
    let mut g = Guest {
        skiff,
        con,
        sock,
        _work: work,
    };
    api_server::client::wait_ready(&g.sock, Duration::from_secs(20))
        .map_err(err("skiff's API socket"))?;
    let mut api = ApiClient::new(&g.sock);
    let path = |p: &PathBuf| p.display().to_string();
    api.put_machine_config(&MachineConfig {
        vcpu_count: a.vcpus,
        mem_size_mib: 512,
        ..Default::default()
    })
    .map_err(err("PUT /machine-config"))?;
    api.put_boot_source(&BootSource {
        kernel_image_path: path(&a.kernel),
        boot_args: Some(format!(
            "{CMDLINE} ip={GUEST_IP}::{HOST_IP}:255.255.255.0::eth0:off"
        )),
        initrd_path: None,
    })
    .map_err(err("PUT /boot-source"))?;
    for (id, p, root) in [("rootfs", &rootfs, true), ("data", &data, false)] {
        api.put_drive(&Drive {
            drive_id: id.into(),
            path_on_host: Some(path(p)),
            is_root_device: root,
            is_read_only: Some(false),
            ..Default::default()
        })
        .map_err(err("PUT /drives"))?;
    }
    api.put_network_interface(&NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: TAP.into(),
        guest_mac: Some("06:00:ac:1f:07:02".into()),
        ..Default::default()
    })
    .map_err(err("PUT /network-interfaces/eth0"))?;
    api.action(ActionType::InstanceStart)
        .map_err(err("InstanceStart"))?;
    g.con.wait_for("GUEST-READY", Duration::from_secs(120))?;
    g.con.wait_for("# ", Duration::from_secs(60))?;
    g.con.run("dmesg -n 1", Duration::from_secs(60))?;
    g.con.run(
        &format!("ping -c 2 -W 10 {HOST_IP} >/dev/null"),
        Duration::from_secs(60),
    )?;
    Ok(g)
}

/// One chunk of `device`'s load, upgrading it `left` times at most; the effect and the
/// VMM's reports.
fn chunk(
    g: &mut Guest,
    a: &Args,
    device: &str,
    listener: &TcpListener,
    left: usize,
) -> Result<(Effect, Vec<UpgradeReport>)> {
    let secs = a.chunk_s;
    let interval = Duration::from_millis(a.interval_ms);
    let id = if device == "blk" { "data" } else { "eth0" };
    let run = |start: Instant| {
        let stop = start + Duration::from_secs(secs) - TAIL;
        upgrader(g.sock.clone(), id, left, start + LEAD, stop, interval)
    };
    // Both the load's and the upgrades' failures are reported.
    let both = |load: Result<Effect>, up: Result<Vec<UpgradeReport>>| match (load, up) {
        (Ok(e), Ok(r)) => Ok((e, r)),
        (Err(l), Ok(_)) => Err(l),
        (Ok(_), Err(u)) => Err(u),
        (Err(l), Err(u)) => Err(format!("{u}; and the load failed: {l}")),
    };
    let joined = |h: JoinHandle<Result<Vec<UpgradeReport>>>| {
        h.join()
            .unwrap_or_else(|_| Err("the upgrade thread panicked".into()))
    };
    if device == "blk" {
        let (start, p) = fio_chunk(&mut g.con, secs)?;
        let up = run(start);
        let out = g.con.finish(p, Duration::from_secs(secs + 600));
        both(out.and_then(|o| fio_effect(&o, secs)), joined(up))
    } else {
        let p = g
            .con
            .start(&format!("nc {HOST_IP} {PORT} < /dev/zero; true"))?;
        let up = run(Instant::now());
        let effect = receiver(listener, secs);
        let up = joined(up);
        if let Err(e) = effect {
            // nc may still be sending: Ctrl-C ends it, and its command line; then show what
            // the guest's kernel saw.
            g.con.send("\x03")?;
            let seen = g
                .con
                .run(
                    "dmesg | tail -20; grep -i virtio /proc/interrupts",
                    Duration::from_secs(30),
                )
                .unwrap_or_else(|e| format!("(no answer from the guest: {e})"));
            return both(Err(format!("{e}\nguest kernel log:\n{seen}")), up);
        }
        g.con.finish(p, Duration::from_secs(120))?;
        both(effect, up)
    }
}

fn bench_device(g: &mut Guest, a: &Args, device: &str, listener: &TcpListener) -> Result<Value> {
    let mut p = Progress::load(a, device)?;
    let baseline = match p.baseline {
        Some(b) => b,
        None => {
            println!("{device}: baseline, {} s without upgrades", a.chunk_s);
            let (b, _) = chunk(g, a, device, listener, 0)?;
            p.baseline = Some(b);
            p.save(a, device)?;
            b
        }
    };
    while p.pause_us.len() < a.upgrades {
        let (e, r) = chunk(g, a, device, listener, a.upgrades - p.pause_us.len())?;
        if r.is_empty() {
            return Err(format!(
                "{device}: no upgrade fitted in a {} s chunk",
                a.chunk_s
            ));
        }
        p.chunks.push(e);
        p.pause_us.extend(r.iter().map(|r| r.pause_us));
        p.total_us.extend(r.iter().map(|r| r.total_us));
        p.save(a, device)?;
        println!("{device}: {} of {} upgrades", p.pause_us.len(), a.upgrades);
    }
    if p.chunks.is_empty() {
        return Err("no upgrades were asked for".into());
    }
    let us = |v: &[u64]| -> Vec<Duration> { v.iter().map(|&x| Duration::from_micros(x)).collect() };
    let pause = Stats::of(&us(&p.pause_us)).ok_or("no pauses")?;
    let total = Stats::of(&us(&p.total_us)).ok_or("no upgrades")?;
    let (gap_what, rate_what) = if device == "blk" {
        (
            "longest gap between fio completions (fio logs in ms)",
            "IOPS",
        )
    } else {
        ("longest gap in the guest's TCP stream", "bytes/s")
    };
    let ms = |d: Duration| stats::round(d.as_secs_f64() * 1e3);
    // The baseline is one chunk; each chunk with upgrades is compared with it through the
    // median chunk (like for like) and the worst one.
    let median = |f: fn(&Effect) -> Duration| {
        let mut v: Vec<Duration> = p.chunks.iter().map(f).collect();
        v.sort_unstable();
        v[(v.len() - 1) / 2]
    };
    let worst = |f: fn(&Effect) -> Duration| p.chunks.iter().map(f).max().unwrap_or_default();
    let rate = p.chunks.iter().map(|e| e.rate).sum::<f64>() / p.chunks.len() as f64;
    let (gap_med, gap_max) = (median(|e| e.max_gap), worst(|e| e.max_gap));
    let (lat_med, lat_max) = (median(|e| e.max_latency), worst(|e| e.max_latency));
    println!(
        "{device}: {} upgrades: pause p50 {:.0} us, p99 {:.0} us, max {:.0} us; whole upgrade p50 {:.0} us",
        pause.n, pause.p50, pause.p99, pause.max, total.p50
    );
    println!(
        "{device}: {gap_what}: {} ms without upgrades; with upgrades {} ms in the median chunk, \
         {} ms in the worst of {}; {rate_what} {:.0} → {:.0}",
        ms(baseline.max_gap),
        ms(gap_med),
        ms(gap_max),
        p.chunks.len(),
        baseline.rate,
        rate
    );
    if device == "blk" {
        println!(
            "{device}: longest fio completion latency: {} ms without upgrades; with upgrades \
             {} ms in the median chunk, {} ms in the worst",
            ms(baseline.max_latency),
            ms(lat_med),
            ms(lat_max)
        );
    }
    let chunk_s = a.chunk_s;
    Ok(json!({
        "device": device,
        "upgrades": pause.n,
        "pause": pause.json(),
        "whole_upgrade": total.json(),
        "guest_effect": {
            "gap_is": gap_what,
            "chunk_s": chunk_s,
            "baseline": {"max_gap_ms": ms(baseline.max_gap),
                         "max_latency_ms": ms(baseline.max_latency), "rate": baseline.rate.round()},
            "with_upgrades": {"chunks": p.chunks.len(),
                              "max_gap_ms": {"median_chunk": ms(gap_med), "worst_chunk": ms(gap_max)},
                              "max_latency_ms": {"median_chunk": ms(lat_med), "worst_chunk": ms(lat_max)},
                              "rate": rate.round()},
            "rate_unit": rate_what,
        },
    }))
}

fn run(a: &Args) -> Result<Vec<Value>> {
    for d in &a.devices {
        if d != "blk" && d != "net" {
            return Err(format!("--devices: unknown device {d:?} (blk, net)"));
        }
    }
    private_network()?;
    let listener = TcpListener::bind(SocketAddr::from((
        HOST_IP
            .parse::<std::net::Ipv4Addr>()
            .map_err(err("address"))?,
        PORT,
    )))
    .map_err(err("listening for the guest's stream"))?;
    let mut g = boot(a)?;
    let mut out = Vec::new();
    for d in &a.devices {
        out.push(bench_device(&mut g, a, d, &listener)?);
    }
    g.con.send("reboot -f\n")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(None) = g.skiff.try_wait() {
        if Instant::now() >= deadline {
            return Err("skiff did not exit within 60 s of the guest's reboot".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(out)
}

fn main() {
    let a = Args::parse();
    let result = run(&a);
    let doc = json!({
        "benchmark": "upgradebench-guest",
        "upgrades_per_device": a.upgrades,
        "vcpus": a.vcpus,
        "chunk_s": a.chunk_s,
        "interval_ms": a.interval_ms,
        "devices": result.as_ref().map_or(Value::Null, |d| Value::from(d.clone())),
        "error": result.as_ref().err(),
    });
    let path = a.dir.join("results.json");
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => match std::fs::write(&path, text + "\n") {
            Ok(()) => println!("results: {}", path.display()),
            Err(e) => eprintln!("upgradebench-guest: {}: {e}", path.display()),
        },
        Err(e) => eprintln!("upgradebench-guest: encoding results: {e}"),
    }
    if let Err(e) = result {
        eprintln!("upgradebench-guest: {e}");
        std::process::exit(1);
    }
}

//! Boot benchmark: skiff (virtio-mmio, and virtio-pci with `--enable-pci`) beside QEMU microvm
//! and QEMU q35, same kernel (and initrd), rootfs,
//! vCPUs, memory and host, every monitor with ACPI on.
//!
//! For each monitor, N boots with `bench=boot` (the guest prints its GUEST-READY marker and
//! reboots at once). Reports time from process start to the marker and to exit (best and
//! median), the ratio skiff/QEMU, and the monitor's resident memory beyond the guest's pages:
//! peak of RssAnon + RssFile over the VMM and its device processes. Guest RAM is a shared
//! memfd for both monitors (QEMU gets `memory-backend-memfd`), so it shows up as RssShmem
//! and is left out.
//!
//!     bootbench --kernel vmlinux --rootfs rootfs.ext4 [--initrd initrd.img] [--runs 10]
//!               [--vcpus 2] [--memory 256] [--skiff target/release/skiff] [--json out.json]
//!
//! With `--initrd` (Debian's stock cloud kernel and the initramfs of its modules, which mounts
//! root= itself) every monitor gets the initrd too.
//!
//! Needs a KVM that boots ordinary guests: tools/bootbench.sh runs it inside the nested test
//! host when this host's KVM cannot.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    rootfs: PathBuf,
    runs: usize,
    vcpus: u32,
    memory: u64,
    skiff: PathBuf,
    /// skiff-jailer: a third row, skiff started through it (needs root).
    jailer: Option<PathBuf>,
    json: Option<PathBuf>,
    /// The console line that marks the guest ready.
    marker: String,
    /// Stop the monitor (SIGTERM) once the marker is seen, instead of waiting for the guest
    /// to end the VM (a distribution image does not reboot by itself).
    stop_at_marker: bool,
    /// A boot that has not ended by then is killed and counted as failed.
    timeout: Duration,
    /// Only these monitors (all when empty).
    only: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        kernel: PathBuf::new(),
        initrd: None,
        rootfs: PathBuf::new(),
        runs: 10,
        vcpus: 2,
        memory: 256,
        skiff: PathBuf::from("target/release/skiff"),
        jailer: None,
        json: None,
        marker: "GUEST-READY".into(),
        stop_at_marker: false,
        timeout: BOOT_TIMEOUT,
        only: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--kernel" => a.kernel = v()?.into(),
            "--rootfs" => a.rootfs = v()?.into(),
            "--initrd" => a.initrd = Some(v()?.into()),
            "--runs" => a.runs = v()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--vcpus" => a.vcpus = v()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--memory" => a.memory = v()?.parse().map_err(|e| format!("--memory: {e}"))?,
            "--skiff" => a.skiff = v()?.into(),
            "--jailer" => a.jailer = Some(v()?.into()),
            "--json" => a.json = Some(v()?.into()),
            "--marker" => a.marker = v()?,
            "--stop-at-marker" => a.stop_at_marker = true,
            "--only" => a.only = v()?.split(',').map(str::to_owned).collect(),
            "--timeout" => {
                a.timeout =
                    Duration::from_secs(v()?.parse().map_err(|e| format!("--timeout: {e}"))?)
            }
            "-h" | "--help" => {
                return Err("usage: bootbench --kernel PATH --rootfs PATH [--initrd PATH] [--runs N] [--vcpus N] [--memory MiB] [--skiff PATH] [--jailer PATH] [--json FILE] [--marker TEXT] [--stop-at-marker] [--timeout SECS] [--only MONITOR,...]".into())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.kernel.as_os_str().is_empty() || a.rootfs.as_os_str().is_empty() {
        return Err("--kernel and --rootfs are required".into());
    }
    Ok(a)
}

/// Sum of RssAnon + RssFile (KiB) of `pid` and all its descendants (skiff-jailer's run:
/// the jailer, skiff and the device processes).
fn private_rss_kib(pid: u32) -> u64 {
    let mut total = 0;
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() && pids.len() < 64 {
        let p = pids[i];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    for p in pids {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            for line in status.lines() {
                if line.starts_with("RssAnon:") || line.starts_with("RssFile:") {
                    total += line
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    total
}

/// By default, a boot that has not ended by then is killed and counted as failed (nested
/// host: a normal boot and reboot of our guest takes under 15 s there).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

struct Run {
    marker: Duration,
    exit: Duration,
    rss_kib: u64,
}

/// One boot: the time to the marker on the console and to the monitor's exit (after the
/// guest ended the VM, or after SIGTERM at the marker with `a.stop_at_marker`).
fn boot_once(a: &Args, mut cmd: Command, stderr_log: &Path) -> Result<Run, String> {
    let timeout = a.timeout;
    let log =
        std::fs::File::create(stderr_log).map_err(|e| format!("{}: {e}", stderr_log.display()))?;
    let start = Instant::now();
    // Its own process group: a monitor that stalls is killed with everything it started (the
    // jailer's skiff and device processes hold the console pipe too).
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while std::fs::metadata(format!("/proc/{pid}")).is_ok() {
            peak = peak.max(private_rss_kib(pid));
            std::thread::sleep(Duration::from_millis(5));
        }
        peak
    });
    // A guest that stalls must not hang the benchmark: kill it after BOOT_TIMEOUT.
    let watchdog = {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while !d.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() > deadline {
                    // SAFETY: kill(2) on the child's process group; no memory is touched.
                    unsafe {
                        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                    }
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        });
        done
    };
    let mut marker = None;
    // The console's last lines, for a failure's report.
    let mut tail = std::collections::VecDeque::new();
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&line).into_owned();
        if tail.len() == 6 {
            tail.pop_front();
        }
        tail.push_back(text.clone());
        if marker.is_none() && text.contains(&a.marker) {
            marker = Some(start.elapsed());
            if a.stop_at_marker {
                // SAFETY: kill(2) on the child's process group; no memory is touched.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGTERM);
                }
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let exit = start.elapsed();
    watchdog.store(true, std::sync::atomic::Ordering::Relaxed);
    let why = |what: String| {
        let err = std::fs::read_to_string(stderr_log).unwrap_or_default();
        let err: Vec<&str> = err.lines().rev().take(6).collect();
        format!(
            "{what}\n  console: {}\n  stderr: {}",
            Vec::from(tail.clone()).join("\n           "),
            err.into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n          ")
        )
    };
    if exit >= timeout {
        return Err(why(format!(
            "no exit within {} s (killed); marker seen={}",
            timeout.as_secs(),
            marker.is_some()
        )));
    }
    let rss_kib = sampler.join().unwrap_or(0);
    // Stopped at the marker, a monitor's exit status is its answer to SIGTERM.
    match (status.success() || a.stop_at_marker, marker) {
        (true, Some(marker)) => Ok(Run {
            marker,
            exit,
            rss_kib,
        }),
        (ok, m) => Err(why(format!(
            "boot failed: exit ok={ok}, marker seen={}",
            m.is_some()
        ))),
    }
}

fn skiff_cmd(a: &Args, rootfs: &Path) -> Command {
    let mut c = Command::new(&a.skiff);
    c.args(["run", "--kernel"])
        .arg(&a.kernel)
        .arg("--rootfs")
        .arg(rootfs);
    if let Some(initrd) = &a.initrd {
        c.arg("--initrd").arg(initrd);
    }
    c.args([
        "--vcpus",
        &a.vcpus.to_string(),
        "--memory",
        &a.memory.to_string(),
        "--cmdline",
        "bench=boot",
    ]);
    c
}

/// skiff with its devices on PCI (`--enable-pci`: virtio-pci with MSI-X).
fn skiff_pci_cmd(a: &Args, rootfs: &Path) -> Command {
    let mut c = skiff_cmd(a, rootfs);
    c.arg("--enable-pci");
    c
}

/// skiff through skiff-jailer: the kernel (a copy beside the rootfs, same filesystem) and the
/// rootfs staged into a fresh cell under the rootfs's directory, uid/gid 10000.
fn jailed_cmd(a: &Args, rootfs: &Path) -> Command {
    let dir = rootfs.parent().unwrap_or(Path::new("/tmp"));
    let id = rootfs
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        })
        .unwrap_or_default();
    let mut c = Command::new(a.jailer.as_deref().unwrap_or(Path::new("skiff-jailer")));
    c.args([
        "--id",
        &id,
        "--uid",
        "10000",
        "--gid",
        "10000",
        "--exec-file",
    ])
    .arg(&a.skiff)
    .arg("--chroot-base-dir")
    .arg(dir.join("cells"))
    .args(["--parent-cgroup", "skiff-bootbench", "--stage"])
    .arg(format!("{}:/images/vmlinux", dir.join("vmlinux").display()))
    .arg("--stage")
    .arg(format!("{}:/images/rootfs.ext4:rw", rootfs.display()));
    if a.initrd.is_some() {
        c.arg("--stage")
            .arg(format!("{}:/images/initrd", dir.join("initrd").display()));
    }
    c.arg("--");
    c.args([
        "run",
        "--kernel",
        "/images/vmlinux",
        "--rootfs",
        "/images/rootfs.ext4",
    ]);
    if a.initrd.is_some() {
        c.args(["--initrd", "/images/initrd"]);
    }
    c.args([
        "--vcpus",
        &a.vcpus.to_string(),
        "--memory",
        &a.memory.to_string(),
        "--cmdline",
        "bench=boot",
    ]);
    c
}

/// QEMU's command line base: skiff's default one, except reboot=t (QEMU's microvm has no
/// i8042; a triple fault ends both machine types at once with -no-reboot).
const QEMU_APPEND: &str = "console=ttyS0 reboot=t panic=1 8250.nr_uarts=1 i8042.noaux \
                           i8042.nomux i8042.dumbkbd root=/dev/vda rw bench=boot";

/// QEMU, `machine` (microvm with ACPI, or q35), guest RAM in a shared memfd like skiff's, the
/// root drive on virtio-blk (`device`: virtio-mmio or PCI).
fn qemu(a: &Args, rootfs: &Path, machine: &str, device: &str, append: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let mem = format!("{}M", a.memory);
    c.args([
        "-M",
        machine,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        &mem,
        "-smp",
        &a.vcpus.to_string(),
    ]);
    c.args([
        "-object",
        &format!("memory-backend-memfd,id=ram,size={mem},share=on"),
        "-machine",
        "memory-backend=ram",
    ]);
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
    ])
    .arg(&a.kernel);
    if let Some(initrd) = &a.initrd {
        c.arg("-initrd").arg(initrd);
    }
    c.args(["-append", append]);
    c.arg("-drive").arg(format!(
        "id=root,file={},format=raw,if=none",
        rootfs.display()
    ));
    c.args(["-device", &format!("{device},drive=root")]);
    c
}

fn qemu_microvm_cmd(a: &Args, rootfs: &Path) -> Command {
    let append = format!("{QEMU_APPEND} pci=off");
    qemu(a, rootfs, "microvm,acpi=on", "virtio-blk-device", &append)
}

fn qemu_q35_cmd(a: &Args, rootfs: &Path) -> Command {
    qemu(a, rootfs, "q35", "virtio-blk-pci", QEMU_APPEND)
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let best = v.first().copied().unwrap_or(f64::NAN);
    let median = if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    };
    (best, median)
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bootbench: {e}");
            std::process::exit(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("bootbench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("bootbench: {e}");
        std::process::exit(1);
    }
    let mut results = Vec::new();
    let mut monitors = vec![
        ("skiff", skiff_cmd as fn(&Args, &Path) -> Command),
        ("skiff-pci", skiff_pci_cmd),
        ("qemu-microvm", qemu_microvm_cmd),
        ("qemu-q35", qemu_q35_cmd),
    ];
    if a.jailer.is_some() {
        // The jailer stages by hard link: copies on the cells' file system.
        if let Err(e) = std::fs::copy(&a.kernel, dir.join("vmlinux")) {
            eprintln!("bootbench: copying the kernel for the jailed runs: {e}");
            std::process::exit(1);
        }
        if let Some(initrd) = &a.initrd {
            if let Err(e) = std::fs::copy(initrd, dir.join("initrd")) {
                eprintln!("bootbench: copying the initrd for the jailed runs: {e}");
                std::process::exit(1);
            }
        }
        monitors.push(("skiff-jailed", jailed_cmd));
    }
    if !a.only.is_empty() {
        monitors.retain(|(name, _)| a.only.iter().any(|o| o == name));
    }
    for (name, build) in monitors {
        let mut runs = Vec::new();
        for i in 0..a.runs {
            // A fresh copy each boot: the guest mounts its root read-write (sparse: a
            // distribution image is mostly holes).
            let rootfs = dir.join(format!("{name}-{i}.ext4"));
            let copied = Command::new("cp")
                .arg("--sparse=always")
                .arg(&a.rootfs)
                .arg(&rootfs)
                .status();
            if !copied.as_ref().is_ok_and(|s| s.success()) {
                eprintln!("bootbench: copying the rootfs failed: {copied:?}");
                std::process::exit(1);
            }
            let log = dir.join(format!("{name}-{i}.stderr"));
            match boot_once(&a, build(&a, &rootfs), &log) {
                Ok(r) => runs.push(r),
                Err(e) => eprintln!("bootbench: {name} run {i}: {e}"),
            }
            let _ = std::fs::remove_file(&rootfs);
        }
        let (mb, mm) = stats(runs.iter().map(|r| r.marker.as_secs_f64()).collect());
        let (eb, em) = stats(runs.iter().map(|r| r.exit.as_secs_f64()).collect());
        let (_, rss) = stats(runs.iter().map(|r| r.rss_kib as f64 / 1024.0).collect());
        println!("{name:13} ok {}/{}  to marker best {mb:.3}s median {mm:.3}s  to exit best {eb:.3}s median {em:.3}s  VMM RSS beyond guest RAM (median peak) {rss:.1} MiB", runs.len(), a.runs);
        results.push((name, runs.len(), mb, mm, eb, em, rss));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let (true, [s, p, q, q35, rest @ ..]) = (a.only.is_empty(), &results[..]) {
        for (ours, mine) in [("skiff", s), ("skiff-pci", p)] {
            for (name, other) in [("qemu-microvm", q), ("qemu-q35", q35)] {
                println!(
                    "ratio {ours}/{name}: marker median {:.2}, exit median {:.2}, RSS {:.2}",
                    mine.3 / other.3,
                    mine.5 / other.5,
                    mine.6 / other.6
                );
            }
        }
        if let Some(j) = rest.first() {
            println!(
                "ratio skiff-jailed/skiff: marker median {:.2}, exit median {:.2}, RSS {:.2}",
                j.3 / s.3,
                j.5 / s.5,
                j.6 / s.6
            );
        }
    }
    if let Some(path) = &a.json {
        let rows: Vec<String> = results
            .iter()
            .map(|r| format!("{{\"monitor\":\"{}\",\"ok\":{},\"marker_best_s\":{:.4},\"marker_median_s\":{:.4},\"exit_best_s\":{:.4},\"exit_median_s\":{:.4},\"rss_mib\":{:.2}}}", r.0, r.1, r.2, r.3, r.4, r.5, r.6))
            .collect();
        let _ = std::fs::write(path, format!("[{}]\n", rows.join(",")));
    }
    if results.iter().any(|r| r.1 == 0) {
        std::process::exit(1);
    }
}

//! Boot benchmark: skiff beside QEMU microvm, same kernel, rootfs, vCPUs, memory and host.
//!
//! For each monitor, N boots with `bench=boot` (the guest prints its GUEST-READY marker and
//! reboots at once). Reports time from process start to the marker and to exit (best and
//! median), the ratio skiff/QEMU, and the monitor's resident memory beyond the guest's pages:
//! peak of RssAnon + RssFile over the VMM and its device processes. Guest RAM is a shared
//! memfd for both monitors (QEMU gets `memory-backend-memfd`), so it shows up as RssShmem
//! and is left out.
//!
//!     bootbench --kernel vmlinux --rootfs rootfs.ext4 [--runs 10] [--vcpus 2] [--memory 256]
//!               [--skiff target/release/skiff] [--json out.json]
//!
//! Needs a KVM that boots ordinary guests: tools/bootbench.sh runs it inside the nested test
//! host when this host's KVM cannot.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    kernel: PathBuf,
    rootfs: PathBuf,
    runs: usize,
    vcpus: u32,
    memory: u64,
    skiff: PathBuf,
    /// skiff-jailer: a third row, skiff started through it (needs root).
    jailer: Option<PathBuf>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        kernel: PathBuf::new(),
        rootfs: PathBuf::new(),
        runs: 10,
        vcpus: 2,
        memory: 256,
        skiff: PathBuf::from("target/release/skiff"),
        jailer: None,
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--kernel" => a.kernel = v()?.into(),
            "--rootfs" => a.rootfs = v()?.into(),
            "--runs" => a.runs = v()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--vcpus" => a.vcpus = v()?.parse().map_err(|e| format!("--vcpus: {e}"))?,
            "--memory" => a.memory = v()?.parse().map_err(|e| format!("--memory: {e}"))?,
            "--skiff" => a.skiff = v()?.into(),
            "--jailer" => a.jailer = Some(v()?.into()),
            "--json" => a.json = Some(v()?.into()),
            "-h" | "--help" => {
                return Err("usage: bootbench --kernel PATH --rootfs PATH [--runs N] [--vcpus N] [--memory MiB] [--skiff PATH] [--jailer PATH] [--json FILE]".into())
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

/// A boot that has not ended by then is killed and counted as failed (nested host: a
/// normal boot and reboot takes under 15 s there).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

struct Run {
    marker: Duration,
    exit: Duration,
    rss_kib: u64,
}

fn boot_once(mut cmd: Command) -> Result<Run, String> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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
            let deadline = Instant::now() + BOOT_TIMEOUT;
            while !d.load(std::sync::atomic::Ordering::Relaxed) {
                if Instant::now() > deadline {
                    // SAFETY: kill(2) on the child's pid; no memory is touched.
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
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
    for line in BufReader::new(stdout).split(b'\n') {
        let line = line.map_err(|e| e.to_string())?;
        if marker.is_none() && String::from_utf8_lossy(&line).contains("GUEST-READY") {
            marker = Some(start.elapsed());
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let exit = start.elapsed();
    watchdog.store(true, std::sync::atomic::Ordering::Relaxed);
    if exit >= BOOT_TIMEOUT {
        return Err(format!(
            "no exit within {} s (killed); marker seen={}",
            BOOT_TIMEOUT.as_secs(),
            marker.is_some()
        ));
    }
    let rss_kib = sampler.join().unwrap_or(0);
    match (status.success(), marker) {
        (true, Some(marker)) => Ok(Run {
            marker,
            exit,
            rss_kib,
        }),
        (ok, m) => Err(format!(
            "boot failed: exit ok={ok}, marker seen={}",
            m.is_some()
        )),
    }
}

fn skiff_cmd(a: &Args, rootfs: &Path) -> Command {
    let mut c = Command::new(&a.skiff);
    c.args(["run", "--kernel"])
        .arg(&a.kernel)
        .arg("--rootfs")
        .arg(rootfs);
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
    .arg(format!("{}:/images/rootfs.ext4:rw", rootfs.display()))
    .arg("--");
    c.args([
        "run",
        "--kernel",
        "/images/vmlinux",
        "--rootfs",
        "/images/rootfs.ext4",
    ]);
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

fn qemu_cmd(a: &Args, rootfs: &Path) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let mem = format!("{}M", a.memory);
    c.args([
        "-M",
        "microvm,acpi=off",
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
    // Same command line as skiff's default, except reboot=t: QEMU's microvm has no i8042.
    c.args(["-append", "console=ttyS0 reboot=t panic=1 pci=off acpi=off 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda rw bench=boot"]);
    c.arg("-drive").arg(format!(
        "id=root,file={},format=raw,if=none",
        rootfs.display()
    ));
    c.args(["-device", "virtio-blk-device,drive=root"]);
    c
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
        ("qemu-microvm", qemu_cmd),
    ];
    if a.jailer.is_some() {
        if let Err(e) = std::fs::copy(&a.kernel, dir.join("vmlinux")) {
            eprintln!("bootbench: copying the kernel for the jailed runs: {e}");
            std::process::exit(1);
        }
        monitors.push(("skiff-jailed", jailed_cmd));
    }
    for (name, build) in monitors {
        let mut runs = Vec::new();
        for i in 0..a.runs {
            // A fresh copy each boot: the guest mounts its root read-write.
            let rootfs = dir.join(format!("{name}-{i}.ext4"));
            if let Err(e) = std::fs::copy(&a.rootfs, &rootfs) {
                eprintln!("bootbench: copying the rootfs: {e}");
                std::process::exit(1);
            }
            match boot_once(build(&a, &rootfs)) {
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
    if let [s, q, rest @ ..] = &results[..] {
        println!(
            "ratio skiff/qemu-microvm: marker median {:.2}, exit median {:.2}, RSS {:.2}",
            s.3 / q.3,
            s.5 / q.5,
            s.6 / q.6
        );
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

//! The VMM's live upgrade, timed (`tools/vmmupgradebench.sh`): a skiff under skiff-jailer with a
//! skiff-blk drive and a skiff-net interface is upgraded N times in place (`PUT
//! /skiff/vmm/upgrade`), for each guest memory size, and the same VM is then snapshotted to
//! files and loaded in a new skiff, in the same run.
//!
//! Everything timed is the shipped code: the skiff, skiff-jailer, skiff-blk and skiff-net
//! binaries of `--bin-dir`, driven over their API. The figures are the VMM's own (`pause_us`
//! and its steps, as the old VMM reports them) and the API round trips of the snapshot calls.
//!
//! Where: a host whose KVM cannot run the guest kernel (kvm_pvm, which runs only PVM guests)
//! still creates the VM and its vCPUs, which then stop in KVM without reaching the guest's
//! userspace (after about 13 s of running, kvm_pvm ends such a guest with an emulation
//! failure, upgraded or not: the benchmark then boots a fresh VM for the upgrades left, and
//! says how often). The VMM's save → hand-over → restore path is the same as with a booted guest,
//! at native speed; what such a guest lacks is a driver that activated the virtio devices, so
//! the vhost-user front ends have no rings to re-sync (with a booted guest that adds one
//! round trip per ring). The guest tests report the pause with a booted guest in the nested
//! test host.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_server::client::ApiClient;
use api_server::models::{
    ActionType, BootSource, Drive, MachineConfig, MemBackend, MemBackendType, NetworkInterface,
    SnapshotCreateParams, SnapshotLoadParams, VmStateChange,
};
use clap::Parser;
use serde_json::{json, Value};

#[path = "stats.rs"]
mod stats;
use stats::Stats;

#[derive(Parser)]
#[command(about = "Times the VMM's live upgrade and snapshot/restore of the shipped binaries")]
struct Args {
    /// Upgrades per memory size.
    #[arg(long, default_value_t = 1000)]
    upgrades: usize,
    /// Guest memory sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,4096")]
    mem_mib: Vec<u32>,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u8,
    /// Where skiff, skiff-jailer, skiff-blk and skiff-net are.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The guest kernel.
    #[arg(long)]
    kernel: PathBuf,
    /// Scratch directory (cells, images, snapshot files); emptied first.
    #[arg(long, default_value = "/var/tmp/skiff-vmmupgradebench")]
    work: PathBuf,
    /// The uid and gid skiff runs as (the device processes get the next one).
    #[arg(long, default_value_t = 10_000)]
    uid: u32,
    /// Write the figures as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

type Result<T = ()> = std::result::Result<T, String>;

const TAP: &str = "skvbench0";
/// Time between two upgrades.
const PACE: Duration = Duration::from_millis(100);
const PARENT_CGROUP: &str = "skiff-vmmupgradebench";

/// One skiff under skiff-jailer.
struct Jailed {
    child: Child,
    cell: PathBuf,
    api: ApiClient,
}

impl Jailed {
    /// Starts skiff-jailer with `stage` (HOST:CELL pairs) and waits for skiff's API socket.
    fn start(a: &Args, id: &str, stage: &[(PathBuf, &str)], log: &Path) -> Result<Jailed> {
        let base = a.work.join("cells");
        let mut cmd = Command::new(a.bin_dir.join("skiff-jailer"));
        cmd.args(["--id", id])
            .arg("--exec-file")
            .arg(a.bin_dir.join("skiff"))
            .args(["--uid", &a.uid.to_string(), "--gid", &a.uid.to_string()])
            .arg("--chroot-base-dir")
            .arg(&base)
            .args(["--parent-cgroup", PARENT_CGROUP])
            .arg("--netns")
            .arg(format!("/proc/{}/ns/net", std::process::id()));
        for (host, cell) in stage {
            cmd.arg("--stage")
                .arg(format!("{}:{cell}:rw", host.display()));
        }
        cmd.args(["--", "--api-sock", "/run/api.sock"]);
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start skiff-jailer: {e}"))?;
        let cell = base.join("skiff").join(id).join("root");
        let sock = cell.join("run/api.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "no API socket at {} after 20 s (log {})",
                    sock.display(),
                    log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut api = ApiClient::new(&sock);
        // The socket file exists a moment before skiff accepts on it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while api.skiff_vm().is_err() {
            if Instant::now() > deadline {
                return Err(format!("skiff does not answer on {}", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Jailed { child, cell, api })
    }

    /// Ends the VM (SIGTERM to skiff-jailer, which ends skiff and removes the cell).
    fn stop(mut self) -> Result {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("skiff-jailer did not end within 20 s of SIGTERM".into());
                }
            }
        }
    }
}

fn run(cmd: &str, args: &[&str]) -> Result {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn us(v: u64) -> Duration {
    Duration::from_micros(v)
}

fn stats(samples: &[Duration]) -> Value {
    Stats::of(samples).map_or(Value::Null, |s| s.json())
}

fn line(what: &str, samples: &[Duration]) {
    if let Some(s) = Stats::of(samples) {
        println!(
            "  {what:<26} p50 {:>9.1} us  p99 {:>9.1} us  max {:>9.1} us",
            s.p50, s.p99, s.max
        );
    }
}

/// Configures and starts a VM of `mem_mib` with the data drive and the TAP.
fn boot(j: &mut Jailed, a: &Args, mem_mib: u32) -> Result {
    let e = |what: &'static str| move |e| format!("{what}: {e}");
    j.api
        .put_machine_config(&MachineConfig {
            vcpu_count: u32::from(a.vcpus),
            mem_size_mib: u64::from(mem_mib),
            ..Default::default()
        })
        .map_err(e("PUT /machine-config"))?;
    j.api
        .put_boot_source(&BootSource {
            kernel_image_path: "/images/vmlinux".into(),
            boot_args: None,
            initrd_path: None,
        })
        .map_err(e("PUT /boot-source"))?;
    j.api
        .put_drive(&Drive {
            drive_id: "data".into(),
            path_on_host: Some("/images/data.img".into()),
            is_root_device: false,
            is_read_only: Some(false),
            ..Default::default()
        })
        .map_err(e("PUT /drives/data"))?;
    j.api
        .put_network_interface(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: TAP.into(),
            ..Default::default()
        })
        .map_err(e("PUT /network-interfaces/eth0"))?;
    j.api
        .action(ActionType::InstanceStart)
        .map_err(e("InstanceStart"))?;
    Ok(())
}

/// Fills `path` (a memory file) with non-zero data: a guest that touched all its RAM.
fn fill(path: &Path) -> Result {
    use std::io::Write;
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..len / block.len() as u64 {
        f.write_all(&block).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())
}

/// Loads the snapshot in `files` in a new jailed skiff; the load's API round trip.
fn load(a: &Args, id: &str, files: &Path, data: &Path, kernel: &Path) -> Result<Duration> {
    let stage = [
        (kernel.to_path_buf(), "/images/vmlinux"),
        (data.to_path_buf(), "/images/data.img"),
        (files.join("vm.state"), "/images/vm.state"),
        (files.join("vm.mem"), "/images/vm.mem"),
    ];
    let mut j = Jailed::start(a, id, &stage, &a.work.join(format!("{id}.log")))?;
    let t = Instant::now();
    let r = j.api.load_snapshot(&SnapshotLoadParams {
        snapshot_path: "/images/vm.state".into(),
        mem_backend: Some(MemBackend {
            backend_type: MemBackendType::File,
            backend_path: "/images/vm.mem".into(),
        }),
        // Paused: on a kvm_pvm host the loaded guest's vCPUs would stop at once (and skiff
        // with them); the load's cost is the same.
        resume_vm: false,
        ..Default::default()
    });
    let took = t.elapsed();
    let state = j.api.skiff_vm().map(|s| s.state);
    j.stop()?;
    r.map_err(|e| format!("PUT /snapshot/load: {e}"))?;
    match state {
        Ok(s) if s == "Paused" => Ok(took),
        other => Err(format!("after the load GET /skiff/vm said {other:?}")),
    }
}

/// After a failed call: the VM ended because kvm_pvm could not run the guest (skiff-jailer
/// exited, the log says so). Anything else is a real failure.
fn guest_died_on_pvm(j: &mut Jailed, log: &Path) -> bool {
    if !vmm::host::is_pvm_host() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(j.child.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::read_to_string(log).is_ok_and(|l| l.contains("KVM internal error (emulation failure)"))
}

fn one_size(a: &Args, mem_mib: u32) -> Result<Value> {
    let dir = a.work.join(format!("mem-{mem_mib}"));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // Staged files are hard links: on the cells' filesystem.
    let kernel = dir.join("vmlinux");
    std::fs::copy(&a.kernel, &kernel).map_err(|e| format!("{}: {e}", a.kernel.display()))?;
    let data = dir.join("data.img");
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(64 << 20))
        .map_err(|e| e.to_string())?;
    let id = format!("vmmbench-{mem_mib}");
    let stage = [
        (kernel.clone(), "/images/vmlinux"),
        (data.clone(), "/images/data.img"),
    ];
    let mut log = dir.join("jailer.log");
    let mut j = Jailed::start(a, &id, &stage, &log)?;
    boot(&mut j, a, mem_mib)?;
    std::thread::sleep(Duration::from_millis(200));
    // On kvm_pvm this guest (not a PVM kernel) ends with an emulation failure after about
    // 13 s of running, upgrades or not (a plain `skiff run` of it ends the same way): then
    // a fresh VM goes on with the remaining upgrades, and the summary says how often.
    let mut fresh_vms = 0;

    let (mut pause, mut save, mut restore, mut resume, mut start, mut prepare) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut i = 0;
    while i < a.upgrades {
        let r = match j.api.upgrade_vmm(None) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("{mem_mib} MiB, upgrade {i}: {e}");
                if !guest_died_on_pvm(&mut j, &log) || fresh_vms > a.upgrades / 100 {
                    return Err(format!("{why} (log {})", log.display()));
                }
                fresh_vms += 1;
                log = dir.join(format!("jailer-{fresh_vms}.log"));
                j = Jailed::start(a, &id, &stage, &log)?;
                boot(&mut j, a, mem_mib)?;
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        i += 1;
        pause.push(us(r.pause_us));
        save.push(us(r.save_us));
        restore.push(us(r.restore_us));
        resume.push(us(r.resume_us));
        start.push(us(r.start_us));
        prepare.push(us(r.prepare_us));
        // Upgrades are far apart in use: each is asked of the VMM that runs the guest (a
        // new connection; one kept would be held by the VMM before, which passes the
        // request on), and the VMM before has ended (it exits within a few ms of passing
        // its connections on) before the next one starts.
        j.api = ApiClient::new(j.cell.join("run/api.sock"));
        std::thread::sleep(PACE);
    }
    let vm = j.api.skiff_vm().map_err(|e| e.to_string())?;
    if vm.state != "Running" {
        return Err(format!("after the upgrades the VM is {}", vm.state));
    }

    // Snapshot the same VM, then load it in a new skiff: as written (sparse) and with every
    // page holding data.
    j.api
        .patch_vm(VmStateChange::Paused)
        .map_err(|e| format!("PATCH /vm Paused: {e}"))?;
    let t = Instant::now();
    j.api
        .create_snapshot(&SnapshotCreateParams {
            snapshot_path: "/run/vm.state".into(),
            mem_file_path: "/run/vm.mem".into(),
            ..Default::default()
        })
        .map_err(|e| format!("PUT /snapshot/create: {e}"))?;
    let create = t.elapsed();
    let files = dir.join("snapshot");
    std::fs::create_dir_all(&files).map_err(|e| e.to_string())?;
    for f in ["vm.state", "vm.mem"] {
        std::fs::rename(j.cell.join("run").join(f), files.join(f))
            .map_err(|e| format!("{f}: {e}"))?;
    }
    j.stop()?;
    let load_sparse = load(a, &format!("{id}-load"), &files, &data, &kernel)?;
    fill(&files.join("vm.mem"))?;
    let load_dense = load(a, &format!("{id}-dense"), &files, &data, &kernel)?;
    let gib = f64::from(mem_mib) / 1024.0;

    println!(
        "guest of {mem_mib} MiB, {} vCPUs, {} upgrades{}:",
        a.vcpus,
        a.upgrades,
        match fresh_vms {
            0 => String::new(),
            n => format!(
                " (in {} VMs: kvm_pvm ended the non-PVM guest with an emulation failure {n} \
                 time(s), as it does without upgrades)",
                n + 1
            ),
        }
    );
    line("pause", &pause);
    line("  save", &save);
    line("  hand-over + restore", &restore);
    line("  resume", &resume);
    line("start (before the pause)", &start);
    line("  prepare (before the pause)", &prepare);
    println!(
        "  snapshot create {:.1} ms; load {:.1} ms (file as written), {:.1} ms (every page \
         holds data: {:.1} ms per GiB)",
        create.as_secs_f64() * 1e3,
        load_sparse.as_secs_f64() * 1e3,
        load_dense.as_secs_f64() * 1e3,
        load_dense.as_secs_f64() * 1e3 / gib
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(json!({
        "mem_mib": mem_mib,
        "vcpus": a.vcpus,
        "upgrades": a.upgrades,
        "fresh_vms_after_pvm_emulation_failures": fresh_vms,
        "pause": stats(&pause),
        "save": stats(&save),
        "restore": stats(&restore),
        "resume": stats(&resume),
        "start": stats(&start),
        "prepare": stats(&prepare),
        "snapshot_create_ms": create.as_secs_f64() * 1e3,
        "snapshot_load_sparse_ms": load_sparse.as_secs_f64() * 1e3,
        "snapshot_load_dense_ms": load_dense.as_secs_f64() * 1e3,
        "snapshot_load_dense_ms_per_gib": load_dense.as_secs_f64() * 1e3 / gib,
    }))
}

fn main() {
    let a = Args::parse();
    if let Err(e) = main_(&a) {
        eprintln!("vmmupgradebench: {e}");
        std::process::exit(1);
    }
}

fn main_(a: &Args) -> Result {
    let _ = std::fs::remove_dir_all(&a.work);
    std::fs::create_dir_all(&a.work).map_err(|e| format!("{}: {e}", a.work.display()))?;
    // A private network namespace for the TAP; the jailed skiffs join it.
    // SAFETY: unshare changes only this thread's namespace membership.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (run as root)",
            std::io::Error::last_os_error()
        ));
    }
    run("ip", &["link", "set", "lo", "up"])?;
    run("ip", &["tuntap", "add", "dev", TAP, "mode", "tap"])?;
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (the guest kernel stops in KVM before userspace; see the doc comment)"
    } else {
        "VT-x/AMD-V"
    };
    println!("vmmupgradebench: native, this host's KVM: {kvm}");
    let mut sizes = Vec::new();
    for &m in &a.mem_mib {
        sizes.push(one_size(a, m)?);
    }
    let cpr = "QEMU's cpr-transfer: not in the installed QEMU (it came with QEMU 10.0)";
    println!("{cpr}");
    let p50 = |v: &Value| v["pause"]["p50_us"].as_f64();
    if let (Some(first), Some(last)) = (sizes.first(), sizes.last()) {
        if let (Some(a0), Some(a1)) = (p50(first), p50(last)) {
            println!(
                "ratio pause p50 {} MiB / {} MiB = {:.2}",
                last["mem_mib"],
                first["mem_mib"],
                a1 / a0
            );
        }
    }
    let doc =
        json!({ "where": format!("native, outer host, KVM {kvm}"), "sizes": sizes, "qemu": cpr });
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let _ = std::fs::remove_dir_all(&a.work);
    Ok(())
}

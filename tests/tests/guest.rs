//! Tests that start `skiff`: guests that boot (kind Guest) and bad input that must be refused (kind Host).
//!
//! One binary with its own runner (`harness = false`, see `tests::runner`), so `cargo test NAME` filtering
//! works, and on hosts whose KVM cannot boot ordinary guests the guest tests run in the nested test host.
//! Console traffic is echoed to stderr with SKIFF_TEST_VERBOSE=1; temp dirs are kept with SKIFF_KEEP_TMP=1.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod api;
mod attack;
mod interop;
mod jail;
mod pci;
mod rig;
mod snapshot;
mod stock;
mod upgrade;

use api::*;
use attack::*;
use interop::*;
use jail::*;
use pci::*;
use rig::*;
use snapshot::*;
use stock::*;
use tests::runner::{self, Kind, Test};
use tests::{ensure, guest_artifacts, host, DriveSpec, NetSpec, Result, TestDir, TestVm, VmConfig};
use upgrade::*;

/// Generous: inside the nested test host everything runs under TCG.
const BOOT: Duration = Duration::from_secs(60);
const CMD: Duration = Duration::from_secs(120);
const LONG: Duration = Duration::from_secs(900);
const EXIT: Duration = Duration::from_secs(120);
const MIB: u64 = 1024 * 1024;

macro_rules! tests {
    ($($kind:ident $netns:literal $name:ident),* $(,)?) => {
        &[$(Test {
            name: concat!(tests!(@prefix $kind), stringify!($name)),
            kind: tests!(@kind $kind),
            netns: $netns,
            func: $name,
        }),*]
    };
    (@prefix Guest) => { "guest::" };
    (@prefix Host) => { "bad_input::" };
    (@prefix Soak) => { "soak::" };
    (@prefix Fault) => { "rigfault::" };
    (@prefix Rig) => { "rig::" };
    (@kind Rig) => { Kind::Host };
    (@kind $kind:ident) => { Kind::$kind };
}

fn main() {
    runner::main(tests![
        Guest false boot_1_vcpu_vmlinux,
        Guest false boot_2_vcpus_vmlinux,
        Guest false boot_8_vcpus_vmlinux,
        Guest false boot_bzimage,
        Guest false boot_3328_mib,
        Guest false rootfs_write_survives_reboot,
        Guest false readonly_drive_refuses_writes,
        Guest false data_drive_size_and_64m_roundtrip,
        Guest true net_ping_and_64m_tcp,
        Guest false reboot_exits_0,
        Guest false panic_exits_3,
        Guest false init_exit_panics_exits_3,
        Guest true api_boot_sequence,
        Guest false api_pause_stops_guest_clock,
        Guest false api_ctrl_alt_del,
        Guest false acpi_devices_and_poweroff,
        Guest false acpi_off_guest_boots_the_old_way,
        Guest false api_power_button,
        Guest true stock_kernel_finds_devices_through_acpi,
        Guest false initrd_over_64_mib_boots,
        Guest false debian_image_boots_with_cloud_init,
        Guest false pci_devices_with_msix,
        Guest true stock_kernel_over_pci,
        Guest false pci_snapshot_restores_msix,
        Guest false api_patch_drive_changes_media,
        Guest false api_firecracker_python_client,
        Guest false api_bad_requests_keep_vm_running,
        Guest false api_config_file_keeps_api,
        Guest true snapshot_load_twice_and_bad_loads,
        Soak false upgrade_blk_100_under_fio,
        Soak true upgrade_net_100_under_tcp,
        Guest false upgrade_failures_keep_old_process,
        Guest true device_processes_hold_only_their_fds,
        Guest true hostile_guest_gets_nowhere,
        Guest true jailed_guest_boots_upgrades_and_recovers,
        Soak true vmm_upgrade_100_soak,
        Soak false crash_blk_20_kills_under_fio,
        Guest false crash_blk_3_kills_under_dd,
        Guest false pci_blk_upgrades_and_kills_under_dd,
        Guest true crash_net_5_kills_under_tcp,
        Guest true pci_net_upgrades_and_kills_under_tcp,
        Guest false interop_qemu_boots_from_skiff_blk,
        Guest false interop_skiff_boots_from_qemu_storage_daemon,
        // Last: the nested test host's guests fault, and the nested host itself freezes or
        // dies, most often in these (a CI rehearsal on 2026-12-07 lost two nested hosts in
        // the first of them); a host lost here costs only what is left of them.
        Guest true jailed_vmm_upgrades_under_io,
        Guest true jailed_vmm_upgrades_under_tcp,
        Guest true jailed_vmm_upgrades_over_pci,
        Host false missing_kernel,
        Host false not_a_kernel,
        Host false initrd_bigger_than_memory,
        Host false pci_with_too_many_devices,
        Host false zero_vcpus,
        Host false too_many_vcpus,
        Host false zero_memory,
        Host false more_memory_than_host,
        Host true missing_drive_image,
        Host false same_image_twice_read_write,
        Host true tap_in_use,
        Host false unknown_config_field,
        Host false cli_missing_kernel,
        Host false api_preboot_rules,
        Host false api_socket_handling,
        Host false jailer_bad_input,
        Host false jailer_confines_skiff,
        Host false jailer_launcher_confines_devices_and_refuses_hostile_requests,
        Rig false runner_ends_a_spinning_guest,
        Rig false runner_replaces_a_frozen_nested_host,
        Rig false runner_refreshes_a_faulting_nested_host,
        Fault false guest_spins,
        Fault false nested_host_freezes,
        Fault false nested_host_faults_thrice,
    ])
}

// ---------------------------------------------------------------- helpers

/// Connects to the guest's `nc -l` at `addr`, retrying for up to CMD while it starts; the
/// stream gets LONG as its write timeout.
fn connect_guest_nc(vm: &mut TestVm, addr: SocketAddr) -> Result<TcpStream> {
    let deadline = Instant::now() + CMD;
    let sock = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(300)),
            Err(e) => {
                return Err(format!(
                    "cannot connect to the guest's nc at {addr}: {e}{}",
                    vm.diagnostics()
                ))
            }
        }
    };
    sock.set_write_timeout(Some(LONG))
        .map_err(|e| e.to_string())?;
    Ok(sock)
}

/// Streams `data` (whose sha256 is `want`) from the host to a `nc -l -p PORT` started in the
/// guest, at `addr`, while `count` events happen (`event(vm, n)`), and checks that the guest
/// received it whole. The sender paces itself (32 KiB per 20 ms) and never runs more than
/// 1/(count + 1) of the data ahead of the events done, so the stream flows during every
/// one; it ends the stream after the last. A failed event or a stalled stream ends the
/// whole with what the guest's kernel saw.
fn stream_to_guest_across(
    vm: &mut TestVm,
    addr: SocketAddr,
    data: Vec<u8>,
    want: &str,
    count: usize,
    mut event: impl FnMut(&mut TestVm, usize) -> Result,
) -> Result {
    // nc in the shell's foreground, so that its end is the command's end.
    let nc = vm.start_command(&format!(
        "nc -l -p {} < /dev/null > /tmp/f; sha256sum /tmp/f",
        addr.port()
    ))?;
    let mut sock = connect_guest_nc(vm, addr)?;
    // A stream stalled this long is a failure; do not wait for LONG.
    sock.set_write_timeout(Some(CMD))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(CMD))
        .map_err(|e| e.to_string())?;
    // To stop the sender at once if an event fails.
    let abort = sock.try_clone().map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicUsize::new(0));
    let done_w = done.clone();
    let sender = std::thread::spawn(move || -> Result {
        let share = data.len().div_ceil(count + 1);
        let mut sent = 0;
        for chunk in data.chunks(32 * 1024) {
            while sent >= (done_w.load(Ordering::Relaxed) + 1) * share {
                std::thread::sleep(Duration::from_millis(5));
            }
            sock.write_all(chunk).map_err(|e| {
                format!("sending (byte {sent}; the stream stalls after {CMD:?}): {e}")
            })?;
            sent += chunk.len();
            if done_w.load(Ordering::Relaxed) < count {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        while done_w.load(Ordering::Relaxed) < count {
            std::thread::sleep(Duration::from_millis(10));
        }
        sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        // nc closes its side when it has everything.
        let mut rest = Vec::new();
        sock.read_to_end(&mut rest)
            .map_err(|e| format!("the guest's nc did not close the stream: {e}"))?;
        Ok(())
    });
    let mut failure = None;
    for n in 0..count {
        if let Err(e) = event(vm, n) {
            failure = Some(format!("{e}{}", vm.diagnostics()));
            break;
        }
        done.store(n + 1, Ordering::Relaxed);
    }
    done.store(count, Ordering::Relaxed);
    if failure.is_some() {
        let _ = abort.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .map_err(|_| "the sender panicked".to_string())?;
    if let Some(f) = failure.or_else(|| sent.err()) {
        // nc may still wait for the stream: Ctrl-C ends it and its command line, so the
        // shell takes the next command.
        drop(nc);
        let _ = vm.send("\x03");
        let dmesg = vm
            .run("dmesg | tail -30; cat /sys/class/net/eth0/operstate", CMD)
            .map_or_else(|e| e, |(out, _)| out);
        return Err(format!("{f}\nguest kernel log:\n{dmesg}"));
    }
    let (out, code) = vm.finish_command(nc, LONG)?;
    ensure!(code == 0, "sha256sum of what nc received failed: {out}");
    let got = host::first_sha256(&out).ok_or_else(|| format!("no sha256 in {out:?}"))?;
    ensure!(
        got == want,
        "the guest received sha256 {got}, the host sent {want}"
    );
    Ok(())
}

fn vmlinux() -> Result<std::path::PathBuf> {
    Ok(guest_artifacts()?.vmlinux())
}

/// Boots `cfg` to the guest's GUEST-READY line.
///
/// Known issue of the nested test host (evidence for its cause in README "Current limits": host
/// state found in a guest's registers): in the nested test host (QEMU TCG emulating AMD-V, with a
/// nested KVM) about one guest boot in ten (8 of 85 in five CI runs, 0 to 4 per run) stops
/// before userspace: a triple fault
/// (KVM_EXIT_SHUTDOWN) at a random point while the kernel replays its log to the console, or
/// a stall; seen only in back-to-back test boots, never in 26 standalone boots. There, and only
/// there, a boot that fails *before* userspace is retried (at most three times, 3 s apart), after printing a RETRY line
/// with the failed attempt's console and skiff's stderr (which names the reset cause). A
/// fourth failure, any failure after userspace, and any failure on a host with real VT-x/AMD-V
/// fail the test.
fn boot(cfg: &VmConfig, dir: &TestDir) -> Result<TestVm> {
    let nested = std::env::var("SKIFF_IN_NESTED").is_ok_and(|v| v == "1");
    let mut attempt = 1;
    loop {
        let mut vm = TestVm::start(cfg, dir)?;
        match vm.wait_ready(BOOT) {
            Ok(()) => return Ok(vm),
            Err(e) if nested && attempt < 4 && !vm.console_text().contains("GUEST-READY") => {
                let diag = vm.diagnostics();
                drop(vm);
                eprintln!(
                    "RETRY (nested host, attempt {attempt}): the guest did not reach userspace: {e}{diag}\nRETRY: booting again in 3 s"
                );
                std::thread::sleep(Duration::from_secs(3));
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The last non-empty line of a command's output.
fn last_line(out: &str) -> &str {
    out.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
}

fn guest_sha256(vm: &mut TestVm, cmd: &str, timeout: Duration) -> Result<String> {
    let out = vm.run_ok(cmd, timeout)?;
    host::first_sha256(&out).ok_or_else(|| format!("no sha256 in the output of {cmd:?}: {out:?}"))
}

/// nproc equals the configured vCPUs; MemTotal is at most the configured RAM and short of it by no
/// more than the kernel's own reservations (64 MiB + 1/16).
fn check_cpus_and_memory(vm: &mut TestVm, cfg: &VmConfig) -> Result<u64> {
    let out = vm.run_ok("nproc", CMD)?;
    let n: u32 = last_line(&out)
        .parse()
        .map_err(|_| format!("nproc printed {out:?}"))?;
    ensure!(
        n == cfg.vcpus,
        "guest sees {n} CPUs, the config has {}",
        cfg.vcpus
    );
    let meminfo = vm.run_ok("cat /proc/meminfo", CMD)?;
    let total = host::meminfo_kib(&meminfo, "MemTotal")
        .ok_or_else(|| format!("no MemTotal in {meminfo:?}"))?;
    let want = cfg.mem_mib * 1024;
    let slack = 64 * 1024 + want / 16;
    ensure!(
        total <= want && total + slack >= want,
        "guest MemTotal is {total} KiB, the config has {want} KiB (allowed shortfall {slack} KiB)"
    );
    Ok(total)
}

fn boot_and_check(
    kernel: std::path::PathBuf,
    vcpus: u32,
    mem_mib: u64,
    label: &str,
) -> Result<u64> {
    let dir = TestDir::new(label)?;
    let mut cfg = dir.config(&kernel)?;
    cfg.vcpus = vcpus;
    cfg.mem_mib = mem_mib;
    // In the nested test host (QEMU TCG emulating AMD SVM), a guest above 1 GiB maps its
    // memory with 1 GiB pages, and those guests triple-fault or stop answering on the console
    // there: 5 of 24 such boots versus 0 of 12 with `nogbpages` (same binary, same test). The
    // guest's page size is the guest's choice and does not change what these tests check of
    // skiff (the memory layout above the 32-bit gap); on a VT-x/AMD-V host the guest keeps its
    // 1 GiB pages.
    if mem_mib > 1024 && std::env::var("SKIFF_IN_NESTED").is_ok_and(|v| v == "1") {
        cfg.extra_cmdline = "nogbpages".into();
    }
    let mut vm = boot(&cfg, &dir)?;
    let console = vm.console_text();
    ensure!(
        console.contains(&format!("cpus={vcpus} ")),
        "GUEST-READY line does not say cpus={vcpus}{}",
        vm.diagnostics()
    );
    let total = check_cpus_and_memory(&mut vm, &cfg)?;
    let rel = vm.run_ok("uname -r", CMD)?;
    ensure!(
        last_line(&rel).starts_with("6.1."),
        "unexpected guest kernel release {rel:?}"
    );
    let cmdline = vm.run_ok("cat /proc/cmdline", CMD)?;
    ensure!(
        cmdline.contains("root=/dev/vda"),
        "guest cmdline lacks root=/dev/vda: {cmdline:?}"
    );
    vm.reboot_and_wait(EXIT)?;
    Ok(total)
}

// ---------------------------------------------------------------- guests that boot

fn boot_1_vcpu_vmlinux() -> Result {
    boot_and_check(vmlinux()?, 1, 256, "boot1").map(drop)
}

fn boot_2_vcpus_vmlinux() -> Result {
    boot_and_check(vmlinux()?, 2, 384, "boot2").map(drop)
}

/// More vCPUs than the nested test host has CPUs, with ACPI (the MADT lists 8 local APICs;
/// the guest brings up every one and `nproc` says 8). Not 32, the issue's top: in the nested
/// host 16- and 32-vCPU guests triple-fault or stall in most boots under skiff and QEMU
/// microvm alike (2026-12-07, resources/nested/README.md), while 8 boot mostly; the tables
/// for up to 254 vCPUs are checked by the vmm unit tests.
fn boot_8_vcpus_vmlinux() -> Result {
    boot_and_check(vmlinux()?, 8, 384, "boot8").map(drop)
}

fn boot_bzimage() -> Result {
    boot_and_check(guest_artifacts()?.bzimage(), 2, 256, "bzimage").map(drop)
}

/// More than 3 GiB: RAM continues above the 32-bit MMIO hole and the guest sees it all.
fn boot_3328_mib() -> Result {
    let total = boot_and_check(vmlinux()?, 2, 3328, "big")?;
    ensure!(
        total > 3072 * 1024,
        "guest MemTotal {total} KiB: it does not see the RAM above 3 GiB"
    );
    Ok(())
}

fn rootfs_write_survives_reboot() -> Result {
    let dir = TestDir::new("persist")?;
    let cfg = dir.config(&vmlinux()?)?;
    let mut vm = boot(&cfg, &dir)?;
    let sum = guest_sha256(
        &mut vm,
        "head -c 1048576 /dev/urandom > /root/persist.bin && sync && sha256sum /root/persist.bin",
        CMD,
    )?;
    vm.reboot_and_wait(EXIT)?;
    drop(vm);
    let mut vm = boot(&cfg, &dir)?;
    let again = guest_sha256(&mut vm, "sha256sum /root/persist.bin", CMD)?;
    ensure!(
        again == sum,
        "file written before the reboot has sha256 {again}, was {sum}"
    );
    vm.reboot_and_wait(EXIT)
}

fn readonly_drive_refuses_writes() -> Result {
    let dir = TestDir::new("rodrive")?;
    let mut cfg = dir.config(&vmlinux()?)?;
    let img = dir.join("ro.img");
    std::fs::write(&img, host::pseudo_random((8 * MIB) as usize, 7)).map_err(|e| e.to_string())?;
    let before = host::sha256_file(&img, 0, None)?;
    cfg.drives.push(DriveSpec {
        path: img.clone(),
        read_only: true,
        io_uring: false,
    });
    let mut vm = boot(&cfg, &dir)?;
    let ro = vm.run_ok("cat /sys/block/vdb/ro", CMD)?;
    ensure!(last_line(&ro) == "1", "/sys/block/vdb/ro is {ro:?}, want 1");
    let read = guest_sha256(
        &mut vm,
        "dd if=/dev/vdb bs=1M count=8 iflag=direct 2>/dev/null | sha256sum",
        CMD,
    )?;
    ensure!(
        read == before,
        "read-only drive reads back {read}, the image has {before}"
    );
    let (out, code) = vm.run(
        "dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=fsync",
        CMD,
    )?;
    ensure!(
        code != 0,
        "writing to the read-only drive succeeded: {out:?}"
    );
    let (out, code) = vm.run(
        "blockdev --setrw /dev/vdb; dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct",
        CMD,
    )?;
    ensure!(
        code != 0,
        "writing to the read-only drive after --setrw succeeded: {out:?}"
    );
    vm.reboot_and_wait(EXIT)?;
    let after = host::sha256_file(&img, 0, None)?;
    ensure!(
        after == before,
        "the read-only image changed: {before} → {after}"
    );
    Ok(())
}

fn data_drive_size_and_64m_roundtrip() -> Result {
    let dir = TestDir::new("datadrive")?;
    let mut cfg = dir.config(&vmlinux()?)?;
    cfg.mem_mib = 512;
    // Guest RAM on 2 MiB huge pages (`huge_pages: "2M"`): skiff-blk's rings and buffers live
    // in hugetlbfs pages it maps through vhost-user. The host's pool is grown for the test
    // and put back after it.
    cfg.huge_pages = true;
    let _pool = vmm::memory::HugePool::with_room(cfg.mem_mib / 2)
        .map_err(|e| format!("the huge page pool: {e}"))?;
    let size = 80 * MIB + 1536; // a whole number of sectors, not of pages
    let img = dir.sparse_image("data.img", size)?;
    // Through io_uring (`io_engine: Async`): the whole path from the API to skiff-blk's rings.
    cfg.drives.push(DriveSpec {
        path: img.clone(),
        read_only: false,
        io_uring: true,
    });
    let mut vm = boot(&cfg, &dir)?;
    let got = vm.run_ok("blockdev --getsize64 /dev/vdb", CMD)?;
    ensure!(
        last_line(&got) == size.to_string(),
        "blockdev --getsize64 /dev/vdb says {got:?}, the image has {size} bytes"
    );
    let sectors = vm.run_ok("cat /sys/block/vdb/size", CMD)?;
    ensure!(
        last_line(&sectors) == (size / 512).to_string(),
        "/sys/block/vdb/size is {sectors:?}, want {}",
        size / 512
    );
    let src = guest_sha256(
        &mut vm,
        "dd if=/dev/urandom of=/tmp/src bs=1M count=64 2>/dev/null && sha256sum /tmp/src",
        LONG,
    )?;
    vm.run_ok(
        "dd if=/tmp/src of=/dev/vdb bs=1M seek=8 conv=fsync 2>&1",
        LONG,
    )?;
    let back = guest_sha256(
        &mut vm,
        "dd if=/dev/vdb bs=1M skip=8 count=64 iflag=direct 2>/dev/null | sha256sum",
        LONG,
    )?;
    ensure!(
        back == src,
        "64 MiB read back from /dev/vdb has sha256 {back}, written {src}"
    );
    // skiff and both skiff-blks map the guest's huge pages.
    let mapped: Vec<(i32, u64)> = std::iter::once(vm.pid())
        .chain(
            host::device_processes()
                .iter()
                .map(|p| p.pid)
                .filter(|&pid| {
                    host::read_stat(&format!("/proc/{pid}/stat"))
                        .is_some_and(|s| s.ppid == vm.pid())
                }),
        )
        .map(|pid| (pid, host::hugetlb_kib(pid)))
        .collect();
    ensure!(
        mapped.len() == 3 && mapped.iter().all(|&(_, kib)| kib >= 2048),
        "want skiff and its two skiff-blks each mapping hugetlb pages (pid, KiB): {mapped:?}"
    );
    // The root drive's skiff-blk is sync, the data drive's has one ring (one queue).
    let rings: Vec<(String, usize)> = host::device_processes()
        .iter()
        .filter(|p| {
            host::read_stat(&format!("/proc/{}/stat", p.pid)).is_some_and(|s| s.ppid == vm.pid())
        })
        .map(|p| (p.cmdline.clone(), host::io_urings(p.pid)))
        .collect();
    ensure!(
        rings.iter().map(|r| r.1).sum::<usize>() == 1
            && rings
                .iter()
                .all(|(cmd, n)| (*n == 1) == cmd.contains("--io-engine io-uring")),
        "want one io_uring, in the skiff-blk started with --io-engine io-uring: {rings:?}"
    );
    vm.reboot_and_wait(EXIT)?;
    let on_host = host::sha256_file(&img, 8 * MIB, Some(64 * MIB))?;
    ensure!(
        on_host == src,
        "the image region on the host has sha256 {on_host}, the guest wrote {src}"
    );
    let len = std::fs::metadata(&img).map_err(|e| e.to_string())?.len();
    ensure!(len == size, "the image size changed: {size} → {len}");
    Ok(())
}

/// Runs in a private network namespace (see the runner), so the TAP, its address and the traffic
/// never reach the host's own network.
fn net_ping_and_64m_tcp() -> Result {
    let x = 20 + std::process::id() % 200;
    let tap_name = format!("skt{}n", std::process::id() % 100_000);
    let tap = host::Tap::create(&tap_name, &format!("172.30.{x}.1/24"))?;
    let result = (|| -> Result {
        let dir = TestDir::new("net")?;
        let mut cfg = dir.config(&vmlinux()?)?;
        cfg.mem_mib = 512;
        cfg.nets.push(NetSpec {
            tap: tap_name.clone(),
            mac: Some(format!("06:00:ac:1e:{x:02x}:02")),
        });
        cfg.extra_cmdline = format!("ip=172.30.{x}.2::172.30.{x}.1:255.255.255.0::eth0:off");
        let mut vm = boot(&cfg, &dir)?;
        vm.run_ok(&format!("ping -c 3 -W 10 172.30.{x}.1"), CMD)?;

        let data = host::pseudo_random((64 * MIB) as usize, u64::from(std::process::id()));
        let file = dir.join("net.bin");
        std::fs::write(&file, &data).map_err(|e| e.to_string())?;
        let want = host::sha256_file(&file, 0, None)?;
        let port = 5555;
        // nc in the shell's foreground, so that its end is the command's end.
        let nc = vm.start_command(&format!(
            "nc -l -p {port} < /dev/null > /tmp/f; sha256sum /tmp/f"
        ))?;
        let addr: SocketAddr = format!("172.30.{x}.2:{port}")
            .parse()
            .map_err(|e| format!("{e}"))?;
        let mut sock = connect_guest_nc(&mut vm, addr)?;
        sock.set_read_timeout(Some(CMD))
            .map_err(|e| e.to_string())?;
        sock.write_all(&data)
            .map_err(|e| format!("sending 64 MiB to the guest: {e}{}", vm.diagnostics()))?;
        sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        let _ = sock.read_to_end(&mut rest); // nc closes its side when it has everything
        drop(sock);
        let (out, code) = vm.finish_command(nc, LONG)?;
        ensure!(code == 0, "sha256sum of what nc received failed: {out}");
        let got = host::first_sha256(&out).ok_or_else(|| format!("no sha256 in {out:?}"))?;
        ensure!(
            got == want,
            "the guest received data with sha256 {got}, sent {want}"
        );
        vm.reboot_and_wait(EXIT)
    })();
    drop(tap);
    ensure!(
        !host::netdev_exists(&tap_name),
        "TAP {tap_name} still exists after the test removed it"
    );
    result
}

fn reboot_exits_0() -> Result {
    let dir = TestDir::new("reboot")?;
    let cfg = dir.config(&vmlinux()?)?;
    let mut vm = boot(&cfg, &dir)?;
    let out = vm.run_ok("echo alive", CMD)?;
    ensure!(last_line(&out) == "alive", "echo printed {out:?}");
    vm.reboot_and_wait(EXIT)?;
    ensure!(
        !vm.stderr_text().contains("panicked"),
        "skiff reported a panic on reboot{}",
        vm.diagnostics()
    );
    let left = vm.leftover_device_processes(&[&dir.path.to_string_lossy()]);
    ensure!(
        left.is_empty(),
        "device processes left after the guest rebooted: {left:?}"
    );
    Ok(())
}

fn expect_panic_exit(vm: &mut TestVm, what: &str) -> Result {
    let st = vm.wait_exit(CMD)?;
    ensure!(
        st.code() == Some(3),
        "after {what} skiff exited with {st}, want 3{}",
        vm.diagnostics()
    );
    let err = vm.stderr_text();
    ensure!(
        err.contains("guest kernel panicked"),
        "skiff's stderr does not say \"guest kernel panicked\"{}",
        vm.diagnostics()
    );
    Ok(())
}

/// A panic at run time: with vm.panic_on_oom=1, filling a tmpfs larger than RAM panics the kernel.
/// (The guest kernel has no MAGIC_SYSRQ, and `kill -9 1` is ignored for init.)
fn panic_exits_3() -> Result {
    let dir = TestDir::new("panic")?;
    let mut cfg = dir.config(&vmlinux()?)?;
    cfg.mem_mib = 128;
    let mut vm = boot(&cfg, &dir)?;
    vm.run_ok("echo 1 > /proc/sys/vm/panic_on_oom && mkdir -p /mnt/fill && mount -t tmpfs -o size=400% fill /mnt/fill", CMD)?;
    vm.send("cat /dev/zero > /mnt/fill/zero\n")?;
    expect_panic_exit(&mut vm, "an out-of-memory panic")?;
    ensure!(
        vm.stderr_text().contains("Out of memory"),
        "the panic line on stderr does not say \"Out of memory\"{}",
        vm.diagnostics()
    );
    Ok(())
}

/// init exits → "Kernel panic - not syncing: Attempted to kill init!".
fn init_exit_panics_exits_3() -> Result {
    let dir = TestDir::new("initpanic")?;
    let mut cfg = dir.config(&vmlinux()?)?;
    cfg.extra_cmdline = "init=/bin/false".into();
    let mut vm = TestVm::start(&cfg, &dir)?;
    // Known: a guest can stall in early boot in the nested test host (see `boot`); the runner
    // re-runs the test there when it says so.
    // The panic is printed at the emergency level, which the harness's `loglevel=4` keeps.
    if let Err(e) = vm.wait_for("Attempted to kill init", BOOT) {
        return Err(format!("{}: {e}", runner::NEVER_USERSPACE));
    }
    expect_panic_exit(&mut vm, "init exited")?;
    ensure!(
        vm.stderr_text().contains("Attempted to kill init"),
        "stderr lacks \"Attempted to kill init\"{}",
        vm.diagnostics()
    );
    Ok(())
}

// ---------------------------------------------------------------- bad input

/// skiff must exit with `want` (any non-zero status when None), name one of `keywords` on stderr
/// (case-insensitive), and leave no device process (of its group or naming the test dir / a TAP) or TAP.
fn expect_rejected(
    vm: &mut TestVm,
    want: Option<i32>,
    keywords: &[&str],
    dir: &TestDir,
    taps: &[&str],
) -> Result {
    let st = vm.wait_exit(Duration::from_secs(60))?;
    match want {
        Some(code) => ensure!(
            st.code() == Some(code),
            "skiff exited with {st}, want status {code}{}",
            vm.diagnostics()
        ),
        None => ensure!(
            st.code().is_some_and(|c| c != 0),
            "skiff exited with {st}, want a non-zero status{}",
            vm.diagnostics()
        ),
    }
    let err = vm.stderr_text().to_lowercase();
    ensure!(
        keywords.iter().any(|k| err.contains(&k.to_lowercase())),
        "skiff's stderr names none of {keywords:?}{}",
        vm.diagnostics()
    );
    let dir_s = dir.path.to_string_lossy().into_owned();
    let mut needles: Vec<&str> = vec![&dir_s];
    needles.extend_from_slice(taps);
    let left = vm.leftover_device_processes(&needles);
    ensure!(left.is_empty(), "device processes left behind: {left:?}");
    for t in taps {
        ensure!(!host::netdev_exists(t), "TAP {t} left behind");
    }
    Ok(())
}

fn rejected_config(
    label: &str,
    keywords: &[&str],
    edit: impl FnOnce(&TestDir, &mut VmConfig) -> Result,
) -> Result {
    let dir = TestDir::new(label)?;
    let mut cfg = dir.config(&vmlinux()?)?;
    edit(&dir, &mut cfg)?;
    let mut vm = TestVm::start(&cfg, &dir)?;
    expect_rejected(&mut vm, Some(1), keywords, &dir, &[])
}

fn missing_kernel() -> Result {
    rejected_config("nokernel", &["no-such-vmlinux"], |dir, cfg| {
        cfg.kernel = dir.join("no-such-vmlinux");
        Ok(())
    })
}

fn not_a_kernel() -> Result {
    rejected_config("notkernel", &["not-a-kernel.bin", "kernel"], |dir, cfg| {
        cfg.kernel = dir.join("not-a-kernel.bin");
        std::fs::write(&cfg.kernel, "this is not a kernel\n".repeat(4096))
            .map_err(|e| e.to_string())
    })
}

fn zero_vcpus() -> Result {
    rejected_config("zerovcpu", &["vcpu"], |_, cfg| {
        cfg.vcpus = 0;
        Ok(())
    })
}

fn too_many_vcpus() -> Result {
    rejected_config("manyvcpu", &["vcpu"], |_, cfg| {
        cfg.vcpus = 1000;
        Ok(())
    })
}

fn zero_memory() -> Result {
    rejected_config("zeromem", &["mem"], |_, cfg| {
        cfg.mem_mib = 0;
        Ok(())
    })
}

fn more_memory_than_host() -> Result {
    rejected_config("hugemem", &["mem"], |_, cfg| {
        cfg.mem_mib = host::host_mem_mib() * 2 + 1024;
        Ok(())
    })
}

fn missing_drive_image() -> Result {
    let dir = TestDir::new("nodrive")?;
    let mut cfg = dir.config(&vmlinux()?)?;
    cfg.drives.push(DriveSpec {
        path: dir.join("no-such-disk.img"),
        read_only: false,
        io_uring: false,
    });
    let tap = format!("skt{}m", std::process::id() % 100_000);
    cfg.nets.push(NetSpec {
        tap: tap.clone(),
        mac: None,
    });
    let mut vm = TestVm::start(&cfg, &dir)?;
    expect_rejected(&mut vm, Some(1), &["no-such-disk.img"], &dir, &[&tap])
}

fn same_image_twice_read_write() -> Result {
    rejected_config("twice", &["rootfs.ext4", "lock", "in use"], |_, cfg| {
        let root = cfg.rootfs.clone().ok_or("no rootfs")?;
        cfg.drives.push(DriveSpec {
            path: root,
            read_only: false,
            io_uring: false,
        });
        Ok(())
    })
}

fn tap_in_use() -> Result {
    let name = format!("skt{}u", std::process::id() % 100_000);
    let held = host::HeldTap::open(&name)?;
    let dir = TestDir::new("tapinuse")?;
    let mut cfg = dir.config(&vmlinux()?)?;
    cfg.nets.push(NetSpec {
        tap: name.clone(),
        mac: None,
    });
    let mut vm = TestVm::start(&cfg, &dir)?;
    let r = expect_rejected(&mut vm, Some(1), &[&name], &dir, &[]);
    drop(vm);
    drop(held);
    r?;
    ensure!(
        !host::netdev_exists(&name),
        "TAP {name} still exists after its only user closed it"
    );
    Ok(())
}

fn unknown_config_field() -> Result {
    let dir = TestDir::new("unknownfield")?;
    let cfg = dir.config(&vmlinux()?)?;
    let mut json = cfg.to_json();
    json["machine-config"]["bogus_field_xyz"] = serde_json::json!(1);
    let mut vm = TestVm::start_json(&json, &dir)?;
    expect_rejected(&mut vm, Some(1), &["bogus_field_xyz"], &dir, &[])
}

fn cli_missing_kernel() -> Result {
    let dir = TestDir::new("clinokernel")?;
    let root = dir.copy_rootfs()?;
    let kernel = dir.join("no-such-vmlinux");
    let mut vm = TestVm::start_args(&[
        "run",
        "--kernel",
        &kernel.to_string_lossy(),
        "--rootfs",
        &root.to_string_lossy(),
        "--console",
        "stdio",
    ])?;
    expect_rejected(&mut vm, None, &["no-such-vmlinux"], &dir, &[])
}

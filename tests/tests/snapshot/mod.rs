//! Snapshots with Firecracker's API: a running guest snapshotted and loaded into new skiff
//! processes, twice (the second time from copies of its disk, on another TAP); loads that
//! must fail, each answered 400 with the reason, in a skiff that stays usable.

use std::path::Path;
use std::time::{Duration, Instant};

use api_server::client::ClientError;
use api_server::models::{
    MemBackend, MemBackendType, NetworkInterface, NetworkOverride, SnapshotLoadParams,
    VmStateChange,
};
use tests::{ensure, host, Result, TestDir, TestVm};

use super::api::{fc_python, ApiVm};
use super::{last_line, CMD, EXIT};

const HOST_IP: &str = "172.31.11.1";

/// Runs the Python client against `vm`'s API; a failure carries `vm`'s diagnostics (a guest
/// that triple-faulted meanwhile ends skiff, and the client then finds no socket).
fn python_snapshot(what: &str, vm: &TestVm, sock: &Path, state: &Path, mem: &Path) -> Result {
    let python = fc_python()?;
    let script = tests::repo_root().join("tests/python/fc_client_snapshot.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .args([what, &sock.display().to_string()])
        .args([state, mem])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && text.contains(&format!("FC-CLIENT-OK {what}")),
        "the Python client's snapshot {what} failed ({}):\n{text}{}",
        out.status,
        vm.diagnostics()
    );
    Ok(())
}

fn uptime(a: &mut ApiVm) -> Result<f64> {
    let out = a.vm.run_ok("cut -d' ' -f1 /proc/uptime", CMD)?;
    last_line(&out)
        .parse()
        .map_err(|e| format!("uptime {out:?}: {e}"))
}

/// The restored guest: its shell answers, the file written before the snapshot is there,
/// its clock went on from where it stopped (not by the time it spent as files), and its
/// disk and network work.
fn check_restored(a: &mut ApiVm, before: f64, since: Instant) -> Result {
    let now = uptime(a)?;
    let host = since.elapsed().as_secs_f64();
    ensure!(
        now >= before && now - before <= host,
        "guest clock: {before} s at the snapshot, {now} s after the load, {host:.1} s of host time between"
    );
    let out = a.vm.run_ok(
        &format!(
            "cat /root/before; dd if=/dev/urandom of=/root/after bs=1M count=4 2>/dev/null && sync \
             && echo 3 > /proc/sys/vm/drop_caches && md5sum < /root/after | cut -c1-8 \
             && ping -c 2 -W 5 {HOST_IP} >/dev/null && echo PING-OK"
        ),
        CMD,
    )?;
    ensure!(
        out.contains("written-before-the-snapshot") && out.contains("PING-OK"),
        "the restored guest said {out:?}"
    );
    Ok(())
}

fn fault(r: std::result::Result<(), ClientError>, words: &[&str]) -> Result {
    match r {
        Err(ClientError::Fault {
            status: 400,
            message,
        }) => {
            ensure!(
                words.iter().all(|w| message.contains(w)),
                "the 400's message {message:?} does not name {words:?}"
            );
            Ok(())
        }
        other => Err(format!("want a 400 naming {words:?}, got {other:?}")),
    }
}

fn load(state: &Path, mem: &Path, resume: bool, tap: Option<&str>) -> SnapshotLoadParams {
    SnapshotLoadParams {
        snapshot_path: state.display().to_string(),
        mem_backend: Some(MemBackend {
            backend_type: MemBackendType::File,
            backend_path: mem.display().to_string(),
        }),
        resume_vm: resume,
        network_overrides: tap
            .map(|t| {
                vec![NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: t.into(),
                }]
            })
            .unwrap_or_default(),
        ..Default::default()
    }
}

pub fn snapshot_load_twice_and_bad_loads() -> Result {
    let dir = TestDir::new("snapshot")?;
    let tap1 = format!("sks{}a", std::process::id() % 100_000);
    let tap2 = format!("sks{}b", std::process::id() % 100_000);
    let first_tap = host::Tap::create(&tap1, &format!("{HOST_IP}/24"))?;
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let rootfs = dir.copy_rootfs()?;
    let rootfs_at_snapshot = dir.join("rootfs-at-snapshot.ext4");

    // A: boot, write a file, snapshot (the Python client pauses and snapshots).
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure_rootfs(
        &rootfs,
        2,
        256,
        &format!("ip=172.31.11.2::{HOST_IP}:255.255.255.0::eth0:off"),
    )?;
    a.api
        .put_network_interface(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: tap1.clone(),
            guest_mac: Some("06:00:ac:1f:0b:02".into()),
            ..Default::default()
        })
        .map_err(|e| format!("PUT /network-interfaces/eth0: {e}"))?;
    a.start_guest()?;
    a.vm.run_ok(
        "echo written-before-the-snapshot > /root/before && sync",
        CMD,
    )?;
    let before = uptime(&mut a)?;
    let since = Instant::now();
    python_snapshot("create", &a.vm, &a.sock, &state, &mem)?;
    let st = a.api.skiff_vm().map_err(|e| e.to_string())?;
    ensure!(st.state == "Paused", "after the snapshot: {st:?}");
    drop(a);
    // The state files vmm's unit tests keep as fixtures of each format version come from
    // here: SKIFF_STATE_FIXTURE=$PWD/vmm/tests/fixtures/state-vN.bin.
    if let Some(p) = std::env::var_os("SKIFF_STATE_FIXTURE") {
        std::fs::copy(&state, &p).map_err(|e| format!("fixture {p:?}: {e}"))?;
    }
    std::fs::copy(&rootfs, &rootfs_at_snapshot).map_err(|e| format!("copy rootfs: {e}"))?;
    let mem_len = std::fs::metadata(&mem).map_err(|e| e.to_string())?.len();
    ensure!(mem_len == 256 << 20, "the memory file is {mem_len} bytes");

    // B: the Python client loads it and resumes.
    let dir_b = TestDir::new("snapshot-b")?;
    let mut b = ApiVm::start(&dir_b, &[])?;
    python_snapshot("load", &b.vm, &b.sock, &state, &mem)?;
    check_restored(&mut b, before, since)?;
    b.vm.reboot_and_wait(EXIT)?;
    drop(b);

    // C: loads that must fail, each a 400 with the reason; then the good one, paused, on
    // another TAP, from the disk as it was at the snapshot.
    std::fs::copy(&rootfs_at_snapshot, &rootfs).map_err(|e| format!("copy rootfs: {e}"))?;
    drop(first_tap);
    let _second_tap = host::Tap::create(&tap2, &format!("{HOST_IP}/24"))?;
    let dir_c = TestDir::new("snapshot-c")?;
    let mut c = ApiVm::start(&dir_c, &[])?;
    fault(
        c.api
            .load_snapshot(&load(&dir.join("absent"), &mem, true, Some(&tap2))),
        &["absent", "No such file"],
    )?;
    let mut bytes = std::fs::read(&state).map_err(|e| e.to_string())?;
    let corrupt = dir.join("corrupt.state");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&corrupt, &bytes).map_err(|e| e.to_string())?;
    fault(
        c.api
            .load_snapshot(&load(&corrupt, &mem, true, Some(&tap2))),
        &["corrupt", "checksum"],
    )?;
    bytes[mid] ^= 0x20;
    // Version 3, with a checksum that matches: from a newer skiff.
    let future = dir.join("future.state");
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    let body = bytes.len() - 8;
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&future, &bytes).map_err(|e| e.to_string())?;
    fault(
        c.api.load_snapshot(&load(&future, &mem, true, Some(&tap2))),
        &["version 3 is newer"],
    )?;
    let short_mem = dir.join("short.mem");
    std::fs::File::create(&short_mem)
        .and_then(|f| f.set_len(128 << 20))
        .map_err(|e| e.to_string())?;
    fault(
        c.api
            .load_snapshot(&load(&state, &short_mem, true, Some(&tap2))),
        &["134217728 bytes", "268435456"],
    )?;
    fault(
        c.api
            .load_snapshot(&load(&state, &mem, true, Some("tap_name_far_too_long"))),
        &["tap_name_far_too_long"],
    )?;
    let size = std::fs::metadata(&rootfs).map_err(|e| e.to_string())?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&rootfs)
        .and_then(|f| f.set_len(size + (1 << 20)))
        .map_err(|e| e.to_string())?;
    fault(
        c.api.load_snapshot(&load(&state, &mem, true, Some(&tap2))),
        &["rootfs", "changed size"],
    )?;
    std::fs::copy(&rootfs_at_snapshot, &rootfs).map_err(|e| format!("copy rootfs: {e}"))?;
    let leftovers = c.vm.leftover_device_processes(&[]);
    ensure!(
        leftovers.is_empty(),
        "failed loads left device processes: {leftovers:?}"
    );
    let info = c.api.instance_info().map_err(|e| e.to_string())?;
    ensure!(info.state == "Not started", "after failed loads: {info:?}");
    c.api
        .load_snapshot(&load(&state, &mem, false, Some(&tap2)))
        .map_err(|e| {
            format!(
                "the good load after the bad ones: {e}{}",
                c.vm.diagnostics()
            )
        })?;
    let info = c.api.instance_info().map_err(|e| e.to_string())?;
    ensure!(info.state == "Paused", "loaded without resume_vm: {info:?}");
    std::thread::sleep(Duration::from_millis(500));
    c.api
        .patch_vm(VmStateChange::Resumed)
        .map_err(|e| format!("resume: {e}"))?;
    // B's writes went to the disk that was replaced by its copy from the snapshot's time.
    let out =
        c.vm.run_ok("test -e /root/after && echo PRESENT || echo ABSENT", CMD)?;
    ensure!(
        last_line(&out) == "ABSENT",
        "the second load sees the first one's writes: {out:?}"
    );
    check_restored(&mut c, before, since)?;
    c.vm.reboot_and_wait(EXIT)
}

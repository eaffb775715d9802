//! virtio-pci (issue 15, `--enable-pci`): the guest finds its devices behind skiff's PCI host
//! bridge, with MSI-X interrupts, reads and writes through them, and powers off; Debian's
//! cloud kernel does the same with its own virtio_pci module; too many devices for the bus
//! are refused.

use api_server::models::{
    MemBackend, MemBackendType, NetworkInterface, SnapshotCreateParams, SnapshotLoadParams,
    VmStateChange,
};
use tests::{ensure, DriveSpec, Result, TestDir, TestVm};

use super::api::ApiVm;
use super::upgrade::put_data_drive;
use super::{expect_rejected, last_line, vmlinux, CMD, EXIT, MIB};

/// Each PCI function the guest enumerated: "slot vendor device class".
fn pci_functions(vm: &mut TestVm) -> Result<Vec<String>> {
    let out = vm.run_ok(
        "for d in /sys/bus/pci/devices/*; do echo ${d##*/} $(cat $d/vendor $d/device $d/class); done",
        CMD,
    )?;
    Ok(out
        .lines()
        .filter(|l| l.starts_with("0000:"))
        .map(str::to_owned)
        .collect())
}

/// The guest's MSI-X interrupt lines of virtio devices, with their counts summed over CPUs.
fn msix_lines(vm: &mut TestVm) -> Result<Vec<(String, u64)>> {
    let out = vm.run_ok("grep -i 'msi' /proc/interrupts; true", CMD)?;
    Ok(out
        .lines()
        .filter(|l| l.contains("virtio"))
        .map(|l| {
            let (_, rest) = l.split_once(':').unwrap_or(("", l));
            let count = rest
                .split_whitespace()
                .map_while(|w| w.parse::<u64>().ok())
                .sum();
            let name = l.split_whitespace().last().unwrap_or("").to_string();
            (name, count)
        })
        .collect())
}

/// Checks what a guest on skiff's PCI bus sees: the host bridge at 00:00.0 and virtio
/// functions (`want`: (slot, device id, class)), bound to virtio-pci; nothing on
/// virtio-mmio.
fn check_pci_guest(vm: &mut TestVm, want: &[(&str, &str, &str)]) -> Result {
    let funcs = pci_functions(vm)?;
    ensure!(
        funcs
            .iter()
            .any(|f| f == "0000:00:00.0 0x1b36 0x0008 0x060000"),
        "no host bridge at 00:00.0: {funcs:?}"
    );
    for (slot, device, class) in want {
        let line = format!("0000:00:{slot} 0x1af4 {device} {class}");
        ensure!(
            funcs.contains(&line),
            "the guest lacks PCI function {line:?}: {funcs:?}"
        );
    }
    ensure!(
        funcs.len() == want.len() + 1,
        "the guest has PCI functions {funcs:?}, want the host bridge and {want:?}"
    );
    let bound = vm.run_ok("ls /sys/bus/pci/drivers/virtio-pci", CMD)?;
    for (slot, _, _) in want {
        ensure!(
            bound.contains(&format!("0000:00:{slot}")),
            "virtio-pci is not bound to 00:{slot}: {bound:?}"
        );
    }
    let mmio = vm.run_ok(
        "ls /sys/bus/platform/drivers/virtio-mmio 2>/dev/null; true",
        CMD,
    )?;
    ensure!(
        !mmio.contains("LNRO") && !mmio.contains("virtio-mmio."),
        "a PCI guest has virtio-mmio devices: {mmio:?}"
    );
    Ok(())
}

/// Each of the guest's `n` virtio devices has a configuration vector and a queue vector
/// that has interrupted (after the devices did some I/O).
fn check_msix(vm: &mut TestVm, n: usize) -> Result {
    let lines = msix_lines(vm)?;
    for i in 0..n {
        let config = format!("virtio{i}-config");
        ensure!(
            lines.iter().any(|(n, _)| *n == config),
            "no MSI-X configuration vector {config}: {lines:?}"
        );
        let prefix = format!("virtio{i}-");
        ensure!(
            lines
                .iter()
                .any(|(n, c)| n.starts_with(&prefix) && *n != config && *c > 0),
            "no MSI-X queue vector of virtio{i} has interrupted: {lines:?}"
        );
    }
    Ok(())
}

/// `--enable-pci` with our kernel: a root and a data drive on bus 0, found through ACPI's
/// host bridge and MCFG; 4 MiB written through the data drive reach its image intact; the
/// guest's poweroff ends skiff with 0.
pub fn pci_devices_with_msix() -> Result {
    let dir = TestDir::new("pci")?;
    let size = 24 * MIB;
    let data = dir.sparse_image("data.img", size)?;
    let mut a = ApiVm::start(&dir, &["--enable-pci"])?;
    a.configure(&dir, 2, 256, "")?;
    put_data_drive(&mut a, &data)?;
    a.start_guest()?;
    let vm = &mut a.vm;
    check_pci_guest(
        vm,
        &[
            ("01.0", "0x1042", "0x018000"),
            ("02.0", "0x1042", "0x018000"),
        ],
    )?;
    let got = vm.run_ok("blockdev --getsize64 /dev/vdb; nproc", CMD)?;
    ensure!(
        got.contains(&size.to_string()) && last_line(&got) == "2",
        "the PCI data drive or the vCPUs are wrong: {got:?}"
    );
    let out = vm.run_ok(
        "dd if=/dev/urandom of=/tmp/x bs=1M count=4 2>/dev/null && dd if=/tmp/x of=/dev/vdb \
         bs=1M conv=fsync 2>/dev/null && sha256sum /tmp/x",
        CMD,
    )?;
    let want = tests::host::first_sha256(&out).ok_or_else(|| format!("no sha256 in {out:?}"))?;
    check_msix(vm, 2)?;
    let dmesg = vm.run_ok("dmesg", CMD)?;
    ensure!(
        dmesg.contains("MMCONFIG")
            && dmesg.contains("0xe0000000")
            && !dmesg.contains("MMCONFIG is disabled")
            && !dmesg.contains("not reserved"),
        "the guest did not take the ECAM window from the MCFG: {dmesg:?}"
    );
    let bad: Vec<&str> = dmesg
        .lines()
        .filter(|l| l.contains("ACPI Error") || l.contains("ACPI BIOS Error"))
        .collect();
    ensure!(bad.is_empty(), "the guest's ACPI complained: {bad:?}");
    a.vm.send("poweroff -f\n")?;
    let st = a.vm.wait_exit(EXIT)?;
    ensure!(
        st.code() == Some(0) && a.vm.stderr_text().contains("ACPI S5"),
        "after the PCI guest's poweroff skiff exited with {st}{}",
        a.vm.diagnostics()
    );
    let got = tests::host::sha256_file(&data, 0, Some(4 * MIB))?;
    ensure!(
        got == want,
        "the data drive's image has sha256 {got} in its first 4 MiB, the guest wrote {want}"
    );
    Ok(())
}

/// The sum of the guest's MSI-X interrupts of its virtio queues.
fn queue_interrupts(vm: &mut TestVm) -> Result<u64> {
    Ok(msix_lines(vm)?
        .iter()
        .filter(|(n, _)| !n.ends_with("-config"))
        .map(|(_, c)| c)
        .sum())
}

/// A PCI guest's snapshot, loaded by a skiff started without `--enable-pci`: the state says
/// PCI, so the restored guest keeps its functions, and its MSI-X vectors are routed again
/// (its disk reads back what it wrote before, and writes more, interrupt-driven).
pub fn pci_snapshot_restores_msix() -> Result {
    let dir = TestDir::new("pci-snap")?;
    let data = dir.sparse_image("data.img", 16 * MIB)?;
    let (state, mem) = (dir.join("vm.state"), dir.join("vm.mem"));
    let mut a = ApiVm::start(&dir, &["--enable-pci"])?;
    a.configure(&dir, 2, 256, "")?;
    put_data_drive(&mut a, &data)?;
    a.start_guest()?;
    let out = a.vm.run_ok(
        "dd if=/dev/urandom of=/root/pat bs=1M count=4 2>/dev/null && dd if=/root/pat \
         of=/dev/vdb bs=1M oflag=direct 2>/dev/null && sync && sha256sum /root/pat",
        CMD,
    )?;
    let want = tests::host::first_sha256(&out).ok_or_else(|| format!("no sha256 in {out:?}"))?;
    a.api
        .patch_vm(VmStateChange::Paused)
        .map_err(|e| format!("pause: {e}"))?;
    a.api
        .create_snapshot(&SnapshotCreateParams {
            snapshot_path: state.display().to_string(),
            mem_file_path: mem.display().to_string(),
            ..Default::default()
        })
        .map_err(|e| format!("snapshot: {e}{}", a.vm.diagnostics()))?;
    drop(a);

    let dir_b = TestDir::new("pci-snap-b")?;
    let mut b = ApiVm::start(&dir_b, &[])?;
    b.api
        .load_snapshot(&SnapshotLoadParams {
            snapshot_path: state.display().to_string(),
            mem_backend: Some(MemBackend {
                backend_type: MemBackendType::File,
                backend_path: mem.display().to_string(),
            }),
            resume_vm: true,
            ..Default::default()
        })
        .map_err(|e| format!("load: {e}{}", b.vm.diagnostics()))?;
    let before = queue_interrupts(&mut b.vm)?;
    let out = b.vm.run_ok(
        "dd if=/dev/vdb bs=1M count=4 iflag=direct 2>/dev/null | sha256sum; \
         dd if=/dev/urandom of=/dev/vdb bs=1M seek=4 count=4 oflag=direct 2>/dev/null && echo WROTE",
        CMD,
    )?;
    let got = tests::host::first_sha256(&out).ok_or_else(|| format!("no sha256 in {out:?}"))?;
    ensure!(
        got == want && out.contains("WROTE"),
        "the restored PCI guest read {got} (wrote {want} before the snapshot): {out:?}"
    );
    let after = queue_interrupts(&mut b.vm)?;
    ensure!(
        after > before,
        "the restored guest's queue vectors did not interrupt ({before} then {after})"
    );
    let funcs = pci_functions(&mut b.vm)?;
    ensure!(funcs.len() == 3, "after the load the guest has {funcs:?}");
    b.vm.send("poweroff -f\n")?;
    let st = b.vm.wait_exit(EXIT)?;
    ensure!(
        st.code() == Some(0),
        "after the restored PCI guest's poweroff skiff exited with {st}{}",
        b.vm.diagnostics()
    );
    Ok(())
}

/// Debian's cloud kernel with its own virtio_pci module: disks and network over PCI.
pub fn stock_kernel_over_pci() -> Result {
    let stock = tests::stock_artifacts()?;
    let x = 20 + std::process::id() % 200;
    let tap_name = format!("skp{}s", std::process::id() % 100_000);
    let tap = tests::host::Tap::create(&tap_name, &format!("172.31.{x}.1/24"))?;
    let result = (|| -> Result {
        let dir = TestDir::new("stock-pci")?;
        let mut a = ApiVm::start(&dir, &["--enable-pci"])?;
        let rootfs = dir.copy_rootfs()?;
        super::stock::configure(
            &mut a,
            &stock.kernel(),
            &stock.initramfs(),
            512,
            &[("rootfs", &rootfs, true, false)],
        )?;
        a.api
            .put_network_interface(&NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: tap_name.clone(),
                guest_mac: Some(format!("06:00:ac:1f:{x:02x}:03")),
                ..Default::default()
            })
            .map_err(|e| format!("PUT /network-interfaces/eth0: {e}"))?;
        a.start_guest()?;
        let vm = &mut a.vm;
        let mods = vm.run_ok("cat /proc/modules", CMD)?;
        for m in ["virtio_pci", "virtio_blk", "virtio_net"] {
            ensure!(
                mods.lines().any(|l| l.starts_with(&format!("{m} "))),
                "module {m} is not loaded: {mods:?}"
            );
        }
        check_pci_guest(
            vm,
            &[
                ("01.0", "0x1042", "0x018000"),
                ("02.0", "0x1041", "0x020000"),
            ],
        )?;
        vm.run_ok(
            &format!("ip addr add 172.31.{x}.2/24 dev eth0 && ip link set eth0 up"),
            CMD,
        )?;
        vm.run_ok(&format!("ping -c 3 -W 10 172.31.{x}.1"), CMD)?;
        check_msix(vm, 2)?;
        a.vm.send("poweroff -f\n")?;
        let st = a.vm.wait_exit(EXIT)?;
        ensure!(
            st.code() == Some(0),
            "after the stock PCI guest's poweroff skiff exited with {st}{}",
            a.vm.diagnostics()
        );
        Ok(())
    })();
    drop(tap);
    result
}

/// More devices than bus 0 has slots: refused before boot, saying so, nothing left behind.
pub fn pci_with_too_many_devices() -> Result {
    let dir = TestDir::new("pci-full")?;
    let mut cfg = dir.config(&vmlinux()?)?;
    for i in 0..31 {
        cfg.drives.push(DriveSpec {
            path: dir.sparse_image(&format!("d{i}.img"), MIB)?,
            read_only: true,
            io_uring: false,
        });
    }
    let file = dir.join("vm.json");
    let body = serde_json::to_string_pretty(&cfg.to_json()).map_err(|e| e.to_string())?;
    std::fs::write(&file, body).map_err(|e| e.to_string())?;
    let f = file.to_string_lossy().into_owned();
    let mut vm = TestVm::start_args(&["--no-api", "--enable-pci", "--config-file", &f])?;
    expect_rejected(
        &mut vm,
        Some(1),
        &["32 virtio devices", "31 slots", "PCI"],
        &dir,
        &[],
    )?;
    Ok(())
}

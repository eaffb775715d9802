//! What the jailed guest tests share: skiff's pid from its cell, booting the guest they all
//! boot (root file system and data drive read-write, eth0 on a TAP), and the block and
//! network round trip they check it with.

use std::path::Path;

use api_server::client::ApiClient;
use api_server::models::{ActionType, BootSource, Drive, MachineConfig, NetworkInterface};
use tests::{ensure, Result, TestVm, DEFAULT_BOOT_ARGS};

use super::super::{BOOT, CMD};

/// skiff's pid, from the `skiff.pid` skiff-jailer keeps in the cell (it follows a VMM
/// upgrade).
pub fn skiff_pid(cell: &Path) -> Result<u32> {
    std::fs::read_to_string(cell.join("skiff.pid"))
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|e| format!("skiff.pid: {e}"))
}

/// Configures and starts the guest through `api` and waits for its userspace: `vcpus`,
/// 256 MiB, /images/vmlinux with the guest at 172.31.`net`.2 (the TAP `tap` at .1),
/// /images/rootfs.ext4 as root and /images/data.img, both read-write.
pub fn boot_guest(api: &mut ApiClient, vm: &mut TestVm, vcpus: u32, net: u8, tap: &str) -> Result {
    api.put_machine_config(&MachineConfig {
        vcpu_count: vcpus,
        mem_size_mib: 256,
        ..Default::default()
    })
    .map_err(|e| format!("PUT /machine-config: {e}"))?;
    api.put_boot_source(&BootSource {
        kernel_image_path: "/images/vmlinux".into(),
        boot_args: Some(format!(
            "{DEFAULT_BOOT_ARGS} ip=172.31.{net}.2::172.31.{net}.1:255.255.255.0::eth0:off"
        )),
        initrd_path: None,
    })
    .map_err(|e| format!("PUT /boot-source: {e}"))?;
    for (drive, path, root) in [
        ("rootfs", "/images/rootfs.ext4", true),
        ("data", "/images/data.img", false),
    ] {
        api.put_drive(&Drive {
            drive_id: drive.into(),
            path_on_host: Some(path.into()),
            is_root_device: root,
            is_read_only: Some(false),
            ..Default::default()
        })
        .map_err(|e| format!("PUT /drives/{drive}: {e}"))?;
    }
    api.put_network_interface(&NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: tap.into(),
        ..Default::default()
    })
    .map_err(|e| format!("PUT /network-interfaces/eth0: {e}"))?;
    api.action(ActionType::InstanceStart)
        .map_err(|e| format!("InstanceStart: {e}{}", vm.diagnostics()))?;
    vm.wait_ready(BOOT)
}

/// The guest writes a pattern to the data drive at 64 KiB block `round` and reads it back,
/// then pings the host's TAP end (172.31.`net`.1) `pings` times.
pub fn guest_io(vm: &mut TestVm, net: u8, round: u32, pings: u32) -> Result {
    let out = vm.run_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null && dd if=/tmp/p of=/dev/vdb bs=64k seek={round} count=16 conv=fsync 2>/dev/null && \
             a=$(sha256sum < /tmp/p) && b=$(dd if=/dev/vdb bs=64k skip={round} count=16 2>/dev/null | sha256sum) && [ \"$a\" = \"$b\" ] && echo BLK-OK; \
             ping -c {pings} -W 5 172.31.{net}.1 >/dev/null && echo PING-OK"
        ),
        CMD,
    )?;
    ensure!(
        out.contains("BLK-OK") && out.contains("PING-OK"),
        "round {round}: the guest said {out:?}"
    );
    Ok(())
}

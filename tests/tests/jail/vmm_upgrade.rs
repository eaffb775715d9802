//! The VMM's live upgrade under skiff-jailer: a new skiff takes the running guest over, again
//! and again, while the guest does block and network I/O; the device processes go on
//! untouched; upgrades that cannot work leave the guest on the old VMM.

use std::time::{Duration, Instant};

use api_server::client::{ApiClient, ClientError};
use api_server::models::{ActionType, BootSource, Drive, MachineConfig, NetworkInterface};
use tests::{ensure, host, Result, TestDir, TestVm, DEFAULT_BOOT_ARGS};

use super::super::{last_line, BOOT, CMD, EXIT, MIB};
use super::{check_confined, check_filtered, nothing_left, wait_socket, Jail, ParentCgroup};

/// How many upgrades: 20, or `SKIFF_VMM_UPGRADES` (the soak run: 100).
fn upgrades() -> usize {
    std::env::var("SKIFF_VMM_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn skiff_pid(cell: &std::path::Path) -> Result<u32> {
    std::fs::read_to_string(cell.join("skiff.pid"))
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|e| format!("skiff.pid: {e}"))
}

fn device_pids(api: &mut ApiClient) -> Result<Vec<(String, Option<u32>)>> {
    Ok(api
        .skiff_devices()
        .map_err(|e| e.to_string())?
        .devices
        .into_iter()
        .map(|d| (d.id, d.pid))
        .collect())
}

/// A 400 whose message names each of `words`; the VM keeps its VMM.
fn refused(r: std::result::Result<impl std::fmt::Debug, ClientError>, words: &[&str]) -> Result {
    match r {
        Err(ClientError::Fault {
            status: 400,
            message,
        }) if words.iter().all(|w| message.contains(w)) && message.contains("the VM runs on") => {
            println!("refused: {message}");
            Ok(())
        }
        other => Err(format!("want a 400 naming {words:?}, got {other:?}")),
    }
}

fn guest_io(vm: &mut TestVm, round: u32) -> Result {
    let out = vm.run_ok(
        &format!(
            "dd if=/dev/urandom of=/tmp/p bs=64k count=16 2>/dev/null && dd if=/tmp/p of=/dev/vdb bs=64k seek={round} count=16 conv=fsync 2>/dev/null && \
             a=$(sha256sum < /tmp/p) && b=$(dd if=/dev/vdb bs=64k skip={round} count=16 2>/dev/null | sha256sum) && [ \"$a\" = \"$b\" ] && echo BLK-OK; \
             ping -c 1 -W 5 172.31.8.1 >/dev/null && echo PING-OK"
        ),
        CMD,
    )?;
    ensure!(
        out.contains("BLK-OK") && out.contains("PING-OK"),
        "round {round}: the guest said {out:?}"
    );
    Ok(())
}

fn uptime(vm: &mut TestVm) -> Result<f64> {
    let out = vm.run_ok("cut -d' ' -f1 /proc/uptime", CMD)?;
    last_line(&out)
        .parse()
        .map_err(|e| format!("uptime {out:?}: {e}"))
}

pub fn jailed_vmm_upgrades_under_io() -> Result {
    let dir = TestDir::new("vmm-upgrade")?;
    let parent = ParentCgroup::new("vmmup");
    let base = dir.join("base");
    let rootfs = dir.copy_rootfs()?;
    let kernel = dir.join("vmlinux");
    std::fs::copy(tests::guest_artifacts()?.vmlinux(), &kernel).map_err(|e| e.to_string())?;
    let data = dir.sparse_image("data.img", 16 * MIB)?;
    let tap_name = format!("skv{}n", std::process::id() % 100_000);
    let tap = host::Tap::create(&tap_name, "172.31.8.1/24")?;
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let netns = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
    let id = "vmm-upgrade";
    let mut jl = Jail::new(&base, id, &parent.0)?;
    jl.extra = vec![
        "--netns".into(),
        netns,
        "--stage".into(),
        format!("{}:/images/vmlinux", kernel.display()),
        "--stage".into(),
        format!("{}:/images/rootfs.ext4:rw", rootfs.display()),
        "--stage".into(),
        format!("{}:/images/data.img:rw", data.display()),
    ];
    jl.skiff = vec!["--api-sock".into(), "/run/api.sock".into()];
    let mut vm = TestVm::spawn("skiff-jailer", jl.command()?)?;
    let cell = base.join("skiff").join(id).join("root");
    let sock = cell.join("run/api.sock");
    vm.watch_vmm_pid_file(&cell.join("skiff.pid"));
    let mut api =
        wait_socket(&sock, "jailed skiff").map_err(|e| format!("{e}{}", vm.diagnostics()))?;
    api.put_machine_config(&MachineConfig {
        vcpu_count: 2,
        mem_size_mib: 256,
        ..Default::default()
    })
    .map_err(|e| format!("PUT /machine-config: {e}"))?;
    api.put_boot_source(&BootSource {
        kernel_image_path: "/images/vmlinux".into(),
        boot_args: Some(format!(
            "{DEFAULT_BOOT_ARGS} ip=172.31.8.2::172.31.8.1:255.255.255.0::eth0:off"
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
        host_dev_name: tap.name.clone(),
        ..Default::default()
    })
    .map_err(|e| format!("PUT /network-interfaces/eth0: {e}"))?;
    api.action(ActionType::InstanceStart)
        .map_err(|e| format!("InstanceStart: {e}{}", vm.diagnostics()))?;
    vm.wait_ready(BOOT)?;
    guest_io(&mut vm, 0)?;
    let devices = device_pids(&mut api)?;
    let cgroup = format!("{}/{id}", parent.0);

    // Upgrades that cannot work: the guest stays on its VMM.
    let first = skiff_pid(&cell)?;
    refused(api.upgrade_vmm(Some("no-such-skiff")), &["no-such-skiff"])?;
    // skiff-blk starts and exits at once (it is not a VMM).
    refused(api.upgrade_vmm(Some("skiff-blk")), &["skiff-blk", "exited"])?;
    ensure!(
        skiff_pid(&cell)? == first,
        "a failed upgrade replaced skiff"
    );
    guest_io(&mut vm, 16)?;

    // Upgrades to the same binary, with I/O between them and a write loop during some.
    let n = upgrades();
    let mut pauses = Vec::new();
    let mut before = uptime(&mut vm)?;
    let mut t_before = Instant::now();
    let mut old = first;
    for i in 0..n {
        let busy = (i % 2 == 1)
            .then(|| vm.start_command("for k in $(seq 1 40); do dd if=/dev/zero of=/dev/vdb bs=4k count=64 seek=$((k*64)) conv=fsync 2>/dev/null || echo DD-FAILED; done; echo LOOP-DONE"))
            .transpose()?;
        let r = api
            .upgrade_vmm(None)
            .map_err(|e| format!("upgrade {i}: {e}{}", vm.diagnostics()))?;
        ensure!(
            r.old_pid == old && r.new_pid != old && r.pause_us <= r.total_us,
            "upgrade {i}: report {r:?} (old skiff {old})"
        );
        pauses.push(r.pause_us);
        // The supervisor follows the new skiff; the API socket answers from it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while skiff_pid(&cell)? != r.new_pid {
            ensure!(
                Instant::now() < deadline,
                "upgrade {i}: skiff.pid still says {} (want {}){}",
                skiff_pid(&cell)?,
                r.new_pid,
                vm.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut api2 = ApiClient::new(&sock);
        let st = api2
            .skiff_vm()
            .map_err(|e| format!("after upgrade {i}: {e}"))?;
        ensure!(
            st.pid == r.new_pid && st.state == "Running",
            "after upgrade {i}: GET /skiff/vm says {st:?}"
        );
        ensure!(
            device_pids(&mut api2)? == devices,
            "upgrade {i} changed the device processes"
        );
        check_confined(r.new_pid, "the upgraded skiff", &cell, &cgroup)?;
        check_filtered(r.new_pid, "the upgraded skiff")?;
        if let Some(p) = busy {
            let (out, _) = vm
                .finish_command(p, CMD)
                .map_err(|e| format!("the write loop during upgrade {i}: {e}"))?;
            ensure!(
                out.contains("LOOP-DONE") && !out.contains("DD-FAILED"),
                "the write loop during upgrade {i}: {out:?}"
            );
        }
        guest_io(&mut vm, 32 + (i as u32 % 8) * 16)
            .map_err(|e| format!("after upgrade {i}: {e}"))?;
        // The guest's clock went on, by no more than the host's.
        let now = uptime(&mut vm)?;
        let host_s = t_before.elapsed().as_secs_f64();
        ensure!(
            now > before && now - before <= host_s + 0.5,
            "upgrade {i}: the guest's clock went from {before} to {now} over {host_s:.2} s of host time"
        );
        before = now;
        t_before = Instant::now();
        old = r.new_pid;
        api = api2;
    }
    let metrics = api.skiff_metrics().map_err(|e| e.to_string())?;
    ensure!(
        metrics.contains(&format!("skiff_vmm_upgrade_pause_seconds_count {n}")),
        "the pause histogram did not count {n} upgrades:\n{metrics}"
    );
    pauses.sort_unstable();
    println!(
        "{n} VMM upgrades in the nested host: pause p50 {} us, max {} us",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );

    vm.send("reboot -f\n")?;
    let status = vm.wait_exit(EXIT)?;
    ensure!(
        status.code() == Some(0),
        "skiff-jailer ended with {status}{}",
        vm.diagnostics()
    );
    nothing_left(&base, id, &parent.0)?;
    Ok(())
}

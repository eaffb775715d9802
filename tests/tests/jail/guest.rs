//! A guest booted through skiff-jailer: block and network I/O, both device processes
//! upgraded and each killed once, every process confined throughout, nothing left after.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use api_server::client::ApiClient;
use api_server::models::VmUpgrade;
use tests::{ensure, host, Result, TestDir, TestVm};

use super::super::{EXIT, MIB};
use super::booted::{boot_guest, guest_io, skiff_pid};
use super::{
    check_confined, check_device_cell, check_filtered, controller_file, nothing_left,
    some_controller, wait_socket, Jail, ParentCgroup,
};

/// Every device process: (id, pid).
fn devices(api: &mut ApiClient) -> Result<Vec<(String, u32)>> {
    api.skiff_devices()
        .map_err(|e| e.to_string())?
        .devices
        .into_iter()
        .map(|d| {
            Ok((
                d.id.clone(),
                d.pid.ok_or(format!("device '{}' has no process", d.id))?,
            ))
        })
        .collect()
}

fn confined_all(
    api: &mut ApiClient,
    skiff: u32,
    cell: &std::path::Path,
    cgroup: &str,
) -> Result<Vec<(String, u32)>> {
    check_confined(skiff, "skiff", cell, cgroup)?;
    check_filtered(skiff, "skiff")?;
    let devs = devices(api)?;
    for (id, pid) in &devs {
        let what = format!("device '{id}'");
        check_device_cell(*pid, skiff, &what, cell, cgroup)?;
        check_filtered(*pid, &what)?;
    }
    Ok(devs)
}

pub fn jailed_guest_boots_upgrades_and_recovers() -> Result {
    let dir = TestDir::new("jailed")?;
    let parent = ParentCgroup::new("guest");
    let base = dir.join("base");
    // Staged by hard link: on the same filesystem as the cells.
    let rootfs = dir.copy_rootfs()?;
    let kernel = dir.join("vmlinux");
    std::fs::copy(tests::guest_artifacts()?.vmlinux(), &kernel).map_err(|e| e.to_string())?;
    let data = dir.sparse_image("data.img", 16 * MIB)?;
    // The built-in filters, as an operator's --seccomp-filter file: skiff hands it to each
    // device process as an fd (no path of skiff's cell is visible in a device's cell).
    let filters = dir.join("filters.json");
    let printed = std::process::Command::new(tests::binary("skiff")?)
        .arg("--print-seccomp-filters")
        .output()
        .map_err(|e| e.to_string())?;
    std::fs::write(&filters, &printed.stdout).map_err(|e| e.to_string())?;
    let tap_name = format!("skj{}n", std::process::id() % 100_000);
    let tap = host::Tap::create(&tap_name, "172.31.7.1/24")?;
    // This test thread's private network namespace (the TAP is in it).
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let netns = format!("/proc/{}/task/{tid}/ns/net", std::process::id());
    let controller = some_controller()?;
    let (file, value) = controller_file(&controller);
    let id = "jailed-guest";
    let mut jl = Jail::new(&base, id, &parent.0)?;
    jl.extra = vec![
        "--netns".into(),
        netns,
        "--cgroup".into(),
        format!("{file}={value}"),
        "--stage".into(),
        format!("{}:/images/vmlinux", kernel.display()),
        "--stage".into(),
        format!("{}:/images/rootfs.ext4:rw", rootfs.display()),
        "--stage".into(),
        format!("{}:/images/data.img:rw", data.display()),
        "--stage".into(),
        format!("{}:/images/filters.json", filters.display()),
    ];
    jl.skiff = vec![
        "--api-sock".into(),
        "/run/api.sock".into(),
        "--seccomp-filter".into(),
        "/images/filters.json".into(),
    ];
    let mut vm = TestVm::spawn("skiff-jailer", jl.command()?)?;
    let cell = base.join("skiff").join(id).join("root");
    let mut api = wait_socket(&cell.join("run/api.sock"), "jailed skiff")
        .map_err(|e| format!("{e}{}", vm.diagnostics()))?;
    let skiff = skiff_pid(&cell)?;
    boot_guest(&mut api, &mut vm, 1, 7, &tap.name)?;
    let cgroup = format!("{}/{id}", parent.0);
    let first = confined_all(&mut api, skiff, &cell, &cgroup)?;
    ensure!(first.len() == 3, "want 3 device processes, got {first:?}");
    guest_io(&mut vm, 7, 0, 2)?;

    // Upgrade binaries only from the cell's /bin: anything else is a 400 naming it, and the
    // device keeps its process.
    for (what, path) in [
        ("a cell file outside /bin", "/images/vmlinux"),
        ("a .. out of /bin", "/bin/../images/vmlinux"),
        ("a relative .. path", "../images/vmlinux"),
        ("a host binary", "/usr/bin/true"),
    ] {
        super::refused_naming(
            api.upgrade_device("data", Some(path)).map(|_| ()),
            path,
            what,
        )?;
    }
    ensure!(
        devices(&mut api)? == first,
        "refused upgrades changed the device processes"
    );

    // Upgrades inside the cell: the new processes are as confined as the old.
    let reports = api
        .upgrade_all(&VmUpgrade::default())
        .map_err(|e| format!("PUT /skiff/upgrade: {e}{}", vm.diagnostics()))?;
    println!("upgrades in the cell: {reports:?}");
    let upgraded = confined_all(&mut api, skiff, &cell, &cgroup)?;
    for ((id, old), (_, new)) in first.iter().zip(&upgraded) {
        ensure!(
            old != new,
            "device '{id}' kept pid {old} through its upgrade"
        );
    }
    guest_io(&mut vm, 7, 16, 2)?;

    // A crash of each: restarted in the cell.
    for (i, (id, pid)) in upgraded.iter().enumerate() {
        // SAFETY: kill(2) on a pid the VMM reported.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = devices(&mut api)?;
            if now.get(i).is_some_and(|(_, p)| p != pid) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "device '{id}' was not restarted after kill -9"
            );
        }
    }
    confined_all(&mut api, skiff, &cell, &cgroup)?;
    guest_io(&mut vm, 7, 32, 2)?;

    // The VM's cgroup holds exactly skiff and its device processes (old ones that were
    // replaced or killed may take a moment to be reaped), besides the kernel threads KVM
    // attaches to the VM's cgroup (kvm-nx-lpage-recovery).
    let procs_file = super::cgroup_root()?.join(&cgroup).join("cgroup.procs");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut want: Vec<u32> = devices(&mut api)?.into_iter().map(|(_, p)| p).collect();
        want.push(skiff);
        want.sort_unstable();
        let mut got: Vec<u32> = std::fs::read_to_string(&procs_file)
            .map_err(|e| e.to_string())?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .filter(|p| host::read_stat(&format!("/proc/{p}/stat")).is_none_or(|s| s.ppid != 2))
            .collect();
        got.sort_unstable();
        if got == want {
            break;
        }
        let named: Vec<String> = got
            .iter()
            .map(|p| {
                let st = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                let f = |k: &str| {
                    st.lines()
                        .find(|l| l.starts_with(k))
                        .unwrap_or("")
                        .to_string()
                };
                format!(
                    "{p} {} [{} {} {}]",
                    std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .unwrap_or_default()
                        .replace('\0', " "),
                    f("Name:"),
                    f("State:"),
                    f("PPid:")
                )
            })
            .collect();
        ensure!(
            Instant::now() < deadline,
            "the VM's cgroup holds {named:?}, want skiff and its device processes {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    vm.send("reboot -f\n")?;
    let status = vm.wait_exit(EXIT)?;
    ensure!(
        status.code() == Some(0),
        "skiff-jailer ended with {status}{}",
        vm.diagnostics()
    );
    nothing_left(&base, id, &parent.0)?;
    let meta = std::fs::metadata(&rootfs).map_err(|e| e.to_string())?;
    ensure!(
        meta.uid() == 0,
        "the staged rootfs was not given back to root: uid {}",
        meta.uid()
    );
    Ok(())
}

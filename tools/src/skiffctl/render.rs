//! Readable text for the API's answers: short lines for people, one fact per field.

use api_server::models::{
    InstanceInfo, MachineConfig, SkiffDevices, SkiffVmState, UpgradeReport, UpgradeReports,
};

fn plural(n: u32, one: &str) -> String {
    if n == 1 {
        format!("{n} {one}")
    } else {
        format!("{n} {one}s")
    }
}

/// `GET /`.
pub fn info(i: &InstanceInfo) -> String {
    format!(
        "{}: {} (id {}, version {})",
        i.app_name, i.state, i.id, i.vmm_version
    )
}

/// `GET /machine-config`.
pub fn machine_config(c: &MachineConfig) -> String {
    let mut s = format!("{}, {} MiB", plural(c.vcpu_count, "vCPU"), c.mem_size_mib);
    let on_off = |b: bool| if b { "on" } else { "off" };
    if let Some(b) = c.smt {
        s.push_str(&format!(", smt {}", on_off(b)));
    }
    if let Some(b) = c.track_dirty_pages {
        s.push_str(&format!(", dirty-page tracking {}", on_off(b)));
    }
    if let Some(t) = &c.cpu_template {
        s.push_str(&format!(", cpu template {t}"));
    }
    if let Some(h) = &c.huge_pages {
        s.push_str(&format!(", huge pages {h}"));
    }
    s
}

/// `GET /skiff/vm`.
pub fn vm_state(v: &SkiffVmState) -> String {
    let mut s = format!("state: {}", v.state);
    if let Some(ms) = v.uptime_ms {
        s.push_str(&format!(", uptime {:.1} s", ms as f64 / 1000.0));
    }
    if v.paused_ms > 0 {
        s.push_str(&format!(", paused {:.1} s", v.paused_ms as f64 / 1000.0));
    }
    s.push_str(&format!(
        ", {}, {} MiB, pid {}",
        plural(v.vcpus, "vCPU"),
        v.mem_size_mib,
        v.pid
    ));
    s
}

/// `GET /skiff/devices`: a table, or a line saying there are none.
pub fn devices(d: &SkiffDevices) -> String {
    if d.devices.is_empty() {
        return "no devices".into();
    }
    let header = [
        "ID", "KIND", "PID", "RESTARTS", "ACTIVE", "BACKING", "SOCKET",
    ]
    .map(String::from);
    let rows: Vec<[String; 7]> = d
        .devices
        .iter()
        .map(|d| {
            [
                d.id.clone(),
                d.kind.clone(),
                d.pid.map_or("-".into(), |p| p.to_string()),
                d.restarts.to_string(),
                if d.activated { "yes" } else { "no" }.into(),
                d.backing.clone(),
                d.socket.clone(),
            ]
        })
        .collect();
    let mut width = [0usize; 7];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let line: Vec<String> = row
                .iter()
                .zip(width)
                .map(|(cell, w)| format!("{cell:w$}"))
                .collect();
            line.join("  ").trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One device upgrade: `rootfs (block): pid 1 -> 2, pause 310 us (spawn ..., 1 ring)`,
/// with the binaries when they differ.
pub fn upgrade(r: &UpgradeReport) -> String {
    let mut s = format!("{} ({}): pid {} -> {}", r.id, r.kind, r.old_pid, r.new_pid);
    if r.old_binary != r.new_binary {
        s.push_str(&format!(", binary {} -> {}", r.old_binary, r.new_binary));
    }
    let rings = if r.rings == 1 {
        "1 ring".to_owned()
    } else {
        format!("{} rings", r.rings)
    };
    s.push_str(&format!(
        ", pause {} us (spawn {} us, negotiate {} us, prepare {} us, total {} us, {rings})",
        r.pause_us, r.spawn_us, r.negotiate_us, r.prepare_us, r.total_us
    ));
    s
}

/// `PUT /skiff/upgrade`: one line per device.
pub fn upgrades(r: &UpgradeReports) -> String {
    if r.devices.is_empty() {
        return "no devices to upgrade".into();
    }
    r.devices.iter().map(upgrade).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use api_server::models::SkiffDevice;

    use super::*;

    #[test]
    fn state_lines() {
        let mut v = SkiffVmState {
            state: "Running".into(),
            uptime_ms: Some(12_345),
            paused_ms: 0,
            vcpus: 2,
            mem_size_mib: 256,
            pid: 7,
        };
        assert_eq!(
            vm_state(&v),
            "state: Running, uptime 12.3 s, 2 vCPUs, 256 MiB, pid 7"
        );
        v.state = "Not started".into();
        v.uptime_ms = None;
        v.vcpus = 1;
        assert_eq!(vm_state(&v), "state: Not started, 1 vCPU, 256 MiB, pid 7");
    }

    #[test]
    fn machine_config_line() {
        let mut c = MachineConfig::default();
        assert_eq!(machine_config(&c), "1 vCPU, 128 MiB");
        c.smt = Some(false);
        c.huge_pages = Some("None".into());
        assert_eq!(
            machine_config(&c),
            "1 vCPU, 128 MiB, smt off, huge pages None"
        );
    }

    fn report(id: &str, kind: &str, rings: usize) -> UpgradeReport {
        UpgradeReport {
            id: id.into(),
            kind: kind.into(),
            old_pid: 123,
            new_pid: 456,
            old_binary: "/usr/bin/skiff-blk".into(),
            new_binary: "/usr/bin/skiff-blk".into(),
            pause_us: 310,
            spawn_us: 2100,
            negotiate_us: 400,
            prepare_us: 90,
            total_us: 3200,
            rings,
        }
    }

    #[test]
    fn upgrade_lines() {
        let r = report("rootfs", "block", 1);
        assert_eq!(
            upgrade(&r),
            "rootfs (block): pid 123 -> 456, pause 310 us (spawn 2100 us, negotiate 400 us, \
             prepare 90 us, total 3200 us, 1 ring)"
        );
        let mut n = report("eth0", "net", 2);
        n.old_binary = "/a/skiff-net".into();
        n.new_binary = "/b/skiff-net".into();
        assert_eq!(
            upgrade(&n),
            "eth0 (net): pid 123 -> 456, binary /a/skiff-net -> /b/skiff-net, pause 310 us \
             (spawn 2100 us, negotiate 400 us, prepare 90 us, total 3200 us, 2 rings)"
        );
        assert_eq!(
            upgrades(&UpgradeReports::default()),
            "no devices to upgrade"
        );
        let all = upgrades(&UpgradeReports {
            devices: vec![r, n],
        });
        assert_eq!(all.lines().count(), 2, "{all}");
        assert!(all.starts_with("rootfs (block): ") && all.contains("\neth0 (net): "));
    }

    #[test]
    fn device_table() {
        assert_eq!(devices(&SkiffDevices::default()), "no devices");
        let d = SkiffDevices {
            devices: vec![SkiffDevice {
                id: "rootfs".into(),
                kind: "block".into(),
                socket: "/run/b.sock".into(),
                pid: Some(42),
                binary: None,
                backing: "r.ext4".into(),
                restarts: 1,
                crashes: 0,
                last_exit: None,
                activated: true,
            }],
        };
        assert_eq!(
            devices(&d),
            "ID      KIND   PID  RESTARTS  ACTIVE  BACKING  SOCKET\n\
             rootfs  block  42   1         yes     r.ext4   /run/b.sock"
        );
    }
}

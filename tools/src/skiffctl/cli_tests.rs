//! skiffctl's command-line mapping.

use std::collections::BTreeSet;

use super::*;

fn op(args: &str) -> Op {
    let argv = std::iter::once("skiffctl").chain(args.split_whitespace());
    Cli::try_parse_from(argv).unwrap().command.op().unwrap()
}

fn body(op: &Op) -> serde_json::Value {
    match op {
        Op::PutMachineConfig(b) => serde_json::to_value(b),
        Op::PatchMachineConfig(b) => serde_json::to_value(b),
        Op::PutBootSource(b) => serde_json::to_value(b),
        Op::PutDrive(b) => serde_json::to_value(b),
        Op::PatchDrive(b) => serde_json::to_value(b),
        Op::PutNet(b) => serde_json::to_value(b),
        Op::PatchNet(b) => serde_json::to_value(b),
        Op::PutLogger(b) => serde_json::to_value(b),
        Op::PutMetrics(b) => serde_json::to_value(b),
        Op::Action(a) => serde_json::to_value(a),
        Op::PatchVm(s) => serde_json::to_value(s),
        Op::UpgradeAll(b) => serde_json::to_value(b),
        Op::UpgradeVmm(b) => serde_json::to_value(b),
        Op::CreateSnapshot(b) => serde_json::to_value(b),
        Op::LoadSnapshot(b) => serde_json::to_value(b),
        other => panic!("{other:?} has no body"),
    }
    .unwrap()
}

/// One command line per route of the router's table.
const EVERY_ROUTE: &[&str] = &[
    "info",
    "version",
    "machine-config get",
    "machine-config set --vcpus 2 --mem-mib 256",
    "machine-config patch --vcpus 1",
    "boot-source --kernel vmlinux",
    "drive put root --path rootfs.ext4 --root",
    "drive patch root --path other.ext4",
    "net put eth0 --tap tap0",
    "net patch eth0",
    "start",
    "pause",
    "config",
    "logger --path log",
    "metrics-file --path m",
    "state",
    "devices",
    "metrics",
    "upgrade rootfs",
    "upgrade --all",
    "upgrade --vmm",
    "power-button",
    "snapshot create --state s --mem m",
    "snapshot load --state s --mem m",
];

#[test]
fn every_route_has_a_subcommand() {
    let covered: BTreeSet<_> = EVERY_ROUTE
        .iter()
        .filter_map(|a| op(a).endpoint())
        .collect();
    let routes: BTreeSet<_> = api_server::router::ROUTES
        .iter()
        .map(|r| (r.method, r.path))
        .collect();
    assert_eq!(covered, routes);
}

#[test]
fn machine_config_bodies() {
    let o = op("machine-config set --vcpus 2 --mem-mib 256 --smt false");
    assert_eq!(
        body(&o),
        serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false})
    );
    let o = op("machine-config patch --mem-mib 512 --huge-pages None");
    assert_eq!(
        body(&o),
        serde_json::json!({"mem_size_mib": 512, "huge_pages": "None"})
    );
    let empty = Cli::try_parse_from(["skiffctl", "machine-config", "patch"]).unwrap();
    assert!(empty.command.op().is_err());
}

#[test]
fn drive_and_net_bodies() {
    let o = op("drive put rootfs --path r.ext4 --root --read-only");
    assert_eq!(o.endpoint(), Some(("PUT", "/drives/{drive_id}")));
    assert_eq!(
        body(&o),
        serde_json::json!({"drive_id": "rootfs", "path_on_host": "r.ext4",
                           "is_root_device": true, "is_read_only": true})
    );
    let o = op("drive put data --vhost-socket /run/b.sock");
    assert_eq!(
        body(&o),
        serde_json::json!({"drive_id": "data", "socket": "/run/b.sock", "is_root_device": false})
    );
    let o = op("net put eth0 --tap tap0 --mac 06:00:ac:10:00:02");
    assert_eq!(
        body(&o),
        serde_json::json!({"iface_id": "eth0", "host_dev_name": "tap0",
                           "guest_mac": "06:00:ac:10:00:02"})
    );
    let o = op("net patch eth0 --rx-rate-limiter {}");
    assert_eq!(
        body(&o),
        serde_json::json!({"iface_id": "eth0", "rx_rate_limiter": {}})
    );
}

#[test]
fn drive_needs_exactly_one_backend() {
    for args in [
        &["skiffctl", "drive", "put", "d"][..],
        &[
            "skiffctl",
            "drive",
            "put",
            "d",
            "--path",
            "p",
            "--vhost-socket",
            "s",
        ],
    ] {
        let e = Cli::try_parse_from(args).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
    }
}

#[test]
fn actions_vm_logger_metrics() {
    assert_eq!(op("start"), Op::Action(ActionType::InstanceStart));
    assert_eq!(op("ctrl-alt-del"), Op::Action(ActionType::SendCtrlAltDel));
    assert_eq!(op("power-button"), Op::PowerButton);
    assert_eq!(op("flush-metrics"), Op::Action(ActionType::FlushMetrics));
    assert_eq!(op("pause"), Op::PatchVm(VmStateChange::Paused));
    assert_eq!(
        body(&op("resume")),
        serde_json::json!("Resumed"),
        "PatchVm carries the state; the client wraps it"
    );
    assert_eq!(
        body(&op(
            "logger --path l --level warning --show-level --show-origin"
        )),
        serde_json::json!({"log_path": "l", "level": "Warning",
                           "show_level": true, "show_log_origin": true})
    );
    assert_eq!(
        body(&op("logger")),
        serde_json::json!({}),
        "flags not given are left out"
    );
    assert_eq!(
        body(&op("metrics-file --path m.json")),
        serde_json::json!({"metrics_path": "m.json"})
    );
}

#[test]
fn boot_source_and_raw() {
    assert_eq!(
        body(&op(
            "boot-source --kernel vmlinux --initrd i.cpio --boot-args quiet"
        )),
        serde_json::json!({"kernel_image_path": "vmlinux", "boot_args": "quiet",
                           "initrd_path": "i.cpio"})
    );
    assert_eq!(
        op("raw put /actions -"),
        Op::Raw {
            method: "PUT".into(),
            path: "/actions".into(),
            body: RawBody::Stdin
        }
    );
    assert_eq!(
        op("raw GET /"),
        Op::Raw {
            method: "GET".into(),
            path: "/".into(),
            body: RawBody::None
        }
    );
    assert!(matches!(op("raw PUT /x {}"), Op::Raw { body: RawBody::Arg(b), .. } if b == "{}"));
}

#[test]
fn upgrade_one_or_all() {
    assert_eq!(
        op("upgrade rootfs"),
        Op::UpgradeDevice {
            id: "rootfs".into(),
            binary: None
        }
    );
    assert_eq!(
        op("upgrade eth0 --binary /opt/skiff-net"),
        Op::UpgradeDevice {
            id: "eth0".into(),
            binary: Some("/opt/skiff-net".into())
        }
    );
    assert_eq!(body(&op("upgrade --all")), serde_json::json!({}));
    assert_eq!(
        body(&op("upgrade --all --blk-binary /b --net-binary /n")),
        serde_json::json!({"blk_binary": "/b", "net_binary": "/n"})
    );
    assert_eq!(
        body(&op("upgrade --net-binary /n --all")),
        serde_json::json!({"net_binary": "/n"})
    );
    for args in [
        "upgrade",
        "upgrade rootfs --all",
        "upgrade --all --binary /b",
        "upgrade rootfs --blk-binary /b",
        "upgrade --net-binary /n",
    ] {
        let argv = std::iter::once("skiffctl").chain(args.split_whitespace());
        let e = Cli::try_parse_from(argv).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{args}: {e}");
    }
}

#[test]
fn global_options_anywhere() {
    let c = Cli::try_parse_from(["skiffctl", "state", "--json", "--socket", "/s"]).unwrap();
    assert!(c.json);
    assert_eq!(c.socket.as_deref(), Some(std::path::Path::new("/s")));
    assert_eq!(c.timeout, 10.0);
}

#[test]
fn snapshot_bodies() {
    let o = op("snapshot create --state /r/s --mem /r/m");
    assert_eq!(
        body(&o),
        serde_json::json!({"snapshot_type": "Full", "snapshot_path": "/r/s", "mem_file_path": "/r/m"})
    );
    let o = op("snapshot load --state /r/s --mem /r/m --resume --net eth0=tap9");
    assert_eq!(
        body(&o),
        serde_json::json!({"snapshot_path": "/r/s",
                           "mem_backend": {"backend_type": "File", "backend_path": "/r/m"},
                           "resume_vm": true, "track_dirty_pages": false,
                           "enable_diff_snapshots": false,
                           "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]})
    );
    let bad = Cli::try_parse_from([
        "skiffctl", "snapshot", "load", "--state", "s", "--mem", "m", "--net", "eth0",
    ])
    .unwrap();
    assert!(bad.command.op().unwrap_err().contains("IFACE=TAP"));
}

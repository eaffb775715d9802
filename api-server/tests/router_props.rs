//! Property tests of `route()`: no input makes it panic or answer anything but a request
//! or a 4xx fault with a message, and well-formed requests reach the expected variant.

use api_server::models::{
    ActionType, BootSource, DeviceUpgrade, Drive, InstanceActionInfo, LogLevel, Logger,
    MachineConfig, MachineConfigUpdate, Metrics, NetworkInterface, PartialDrive,
    PartialNetworkInterface, Vm, VmStateChange, VmUpgrade,
};
use api_server::request::ApiRequest;
use api_server::router::{route, valid_id, ROUTES};
use proptest::prelude::*;

/// One valid body per route with a body, for mutation.
const SAMPLES: &[(&str, &str, &str)] = &[
    (
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}"#,
    ),
    ("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#),
    (
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
    ),
    (
        "PUT",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "path_on_host": "/i", "is_root_device": true}"#,
    ),
    (
        "PATCH",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "path_on_host": "/j"}"#,
    ),
    (
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "aa:bb:cc:dd:ee:ff"}"#,
    ),
    (
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0"}"#,
    ),
    ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ("PATCH", "/vm", r#"{"state": "Paused"}"#),
    (
        "PUT",
        "/logger",
        r#"{"log_path": "/l", "level": "Info", "show_level": true}"#,
    ),
    ("PUT", "/metrics", r#"{"metrics_path": "/m"}"#),
    (
        "PUT",
        "/skiff/devices/rootfs/upgrade",
        r#"{"binary": "/usr/bin/skiff-blk"}"#,
    ),
    (
        "PUT",
        "/skiff/upgrade",
        r#"{"blk_binary": "/b", "net_binary": "/n"}"#,
    ),
];

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"])
            .prop_map(str::to_owned),
        "[A-Za-z]{0,8}",
        any::<String>(),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let known = prop::sample::select(ROUTES.iter().map(|r| r.path).collect::<Vec<_>>());
    prop_oneof![
        (known, "[A-Za-z0-9_%./-]{0,70}").prop_map(|(p, id)| p
            .replace("{drive_id}", &id)
            .replace("{iface_id}", &id)
            .replace("{id}", &id)),
        "(/[a-z{}_%?#.-]{0,12}){0,4}",
        prop::sample::select(vec![
            "/mmds/config",
            "/snapshot/load",
            "/balloon",
            "/hotplug/x"
        ])
        .prop_map(str::to_owned),
        any::<String>(),
    ]
}

/// A sample body with one random edit.
fn mutated() -> impl Strategy<Value = (String, String, Vec<u8>)> {
    (
        prop::sample::select(SAMPLES.to_vec()),
        any::<prop::sample::Index>(),
        0u8..4,
        any::<u8>(),
        "[a-z\"{}\\[\\]:,0-9 ]{0,6}",
    )
        .prop_map(|((m, p, b), at, op, byte, text)| {
            let mut body = b.as_bytes().to_vec();
            let i = at.index(body.len());
            match op {
                0 => body.truncate(i),
                1 => body[i] = byte,
                2 => body.insert(i, byte),
                _ => {
                    body.splice(i..i, text.bytes());
                }
            }
            (m.to_owned(), p.to_owned(), body)
        })
}

fn assert_ok_or_4xx(method: &str, path: &str, body: &[u8]) -> Result<(), TestCaseError> {
    if let Err(f) = route(method, path, body) {
        prop_assert!((400..500).contains(&f.status), "{method} {path}: {f:?}");
        prop_assert!(!f.message.is_empty());
    }
    Ok(())
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_]{1,64}"
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    prop::option::of(any::<String>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_requests_are_answered(m in method(), p in path(), body in prop::collection::vec(any::<u8>(), 0..200)) {
        assert_ok_or_4xx(&m, &p, &body)?;
    }

    #[test]
    fn mutated_bodies_are_answered((m, p, body) in mutated()) {
        assert_ok_or_4xx(&m, &p, &body)?;
    }

    #[test]
    fn path_ids_follow_firecracker_rule(id in "[^/?#]{0,70}") {
        let body = serde_json::json!({"drive_id": id, "path_on_host": "/i", "is_root_device": false});
        let r = route("PUT", &format!("/drives/{id}"), body.to_string().as_bytes());
        prop_assert_eq!(r.is_ok(), valid_id(&id), "{:?}", r);
    }

    #[test]
    fn drives_route(id in id(), path in any::<String>(), root: bool, ro: Option<bool>,
                    cache in prop::option::of(prop::sample::select(vec!["Unsafe", "Writeback"]))) {
        let d = Drive {
            drive_id: id.clone(),
            path_on_host: Some(path.clone()),
            is_root_device: root,
            is_read_only: ro,
            cache_type: cache.map(str::to_owned),
            ..Drive::default()
        };
        let body = serde_json::to_vec(&d).unwrap();
        prop_assert_eq!(route("PUT", &format!("/drives/{id}"), &body), Ok(ApiRequest::PutDrive(d)));
        let p = PartialDrive { drive_id: id.clone(), path_on_host: Some(path), rate_limiter: None };
        let body = serde_json::to_vec(&p).unwrap();
        prop_assert_eq!(route("PATCH", &format!("/drives/{id}"), &body), Ok(ApiRequest::PatchDrive(p)));
    }

    #[test]
    fn network_route(id in id(), tap in any::<String>(), mac in opt_text()) {
        let n = NetworkInterface { iface_id: id.clone(), host_dev_name: tap, guest_mac: mac, ..NetworkInterface::default() };
        let body = serde_json::to_vec(&n).unwrap();
        prop_assert_eq!(route("PUT", &format!("/network-interfaces/{id}?q"), &body), Ok(ApiRequest::PutNetworkInterface(n)));
        let p = PartialNetworkInterface { iface_id: id.clone(), ..PartialNetworkInterface::default() };
        let body = serde_json::to_vec(&p).unwrap();
        prop_assert_eq!(route("PATCH", &format!("/network-interfaces/{id}"), &body), Ok(ApiRequest::PatchNetworkInterface(p)));
    }

    #[test]
    fn machine_config_route(vcpus: u32, mem: u64, smt in prop::option::of(Just(false)),
                            dirty in prop::option::of(Just(false)), patch_vcpus: Option<u32>) {
        let c = MachineConfig { vcpu_count: vcpus, mem_size_mib: mem, smt, track_dirty_pages: dirty, ..MachineConfig::default() };
        let body = serde_json::to_vec(&c).unwrap();
        prop_assert_eq!(route("PUT", "/machine-config", &body), Ok(ApiRequest::PutMachineConfig(c)));
        let u = MachineConfigUpdate { vcpu_count: patch_vcpus, smt, ..MachineConfigUpdate::default() };
        let body = serde_json::to_vec(&u).unwrap();
        prop_assert_eq!(route("PATCH", "/machine-config", &body), Ok(ApiRequest::PatchMachineConfig(u)));
    }

    #[test]
    fn other_bodies_route(kernel in any::<String>(), args in opt_text(), initrd in opt_text(),
                          metrics_path in any::<String>(), log_path in opt_text(),
                          level in prop::option::of(prop::sample::select(vec![
                              LogLevel::Off, LogLevel::Error, LogLevel::Warning,
                              LogLevel::Info, LogLevel::Debug, LogLevel::Trace])),
                          action in prop::sample::select(vec![
                              ActionType::InstanceStart, ActionType::SendCtrlAltDel, ActionType::FlushMetrics]),
                          paused: bool) {
        let b = BootSource { kernel_image_path: kernel, boot_args: args, initrd_path: initrd };
        prop_assert_eq!(route("PUT", "/boot-source", &serde_json::to_vec(&b).unwrap()), Ok(ApiRequest::PutBootSource(b)));
        let m = Metrics { metrics_path };
        prop_assert_eq!(route("PUT", "/metrics", &serde_json::to_vec(&m).unwrap()), Ok(ApiRequest::PutMetrics(m)));
        let l = Logger { log_path: log_path.filter(|p| !p.is_empty()), level, ..Logger::default() };
        prop_assert_eq!(route("PUT", "/logger", &serde_json::to_vec(&l).unwrap()), Ok(ApiRequest::PutLogger(l)));
        let a = InstanceActionInfo { action_type: action };
        prop_assert_eq!(route("PUT", "/actions", &serde_json::to_vec(&a).unwrap()), Ok(ApiRequest::Action(a)));
        let state = if paused { VmStateChange::Paused } else { VmStateChange::Resumed };
        let v = Vm { state };
        prop_assert_eq!(route("PATCH", "/vm", &serde_json::to_vec(&v).unwrap()), Ok(ApiRequest::PatchVm(v)));
    }

    #[test]
    fn upgrade_routes(id in id(), binary in opt_text(), blk in opt_text(), net in opt_text(),
                      blank in "[ \t\r\n]{0,4}") {
        let path = format!("/skiff/devices/{id}/upgrade");
        let u = DeviceUpgrade { binary };
        prop_assert_eq!(route("PUT", &path, &serde_json::to_vec(&u).unwrap()), Ok(ApiRequest::UpgradeDevice(id.clone(), u)));
        prop_assert_eq!(route("PUT", &path, blank.as_bytes()), Ok(ApiRequest::UpgradeDevice(id, DeviceUpgrade::default())));
        let v = VmUpgrade { blk_binary: blk, net_binary: net };
        prop_assert_eq!(route("PUT", "/skiff/upgrade", &serde_json::to_vec(&v).unwrap()), Ok(ApiRequest::UpgradeAll(v)));
        prop_assert_eq!(route("PUT", "/skiff/upgrade", blank.as_bytes()), Ok(ApiRequest::UpgradeAll(VmUpgrade::default())));
    }

    #[test]
    fn upgrade_path_ids_follow_firecracker_rule(id in "[^/?#]{0,70}") {
        let r = route("PUT", &format!("/skiff/devices/{id}/upgrade"), b"");
        prop_assert_eq!(r.is_ok(), valid_id(&id), "{:?}", r);
    }
}

use super::*;
use crate::models::{ActionType, DeviceUpgrade, LogLevel, VmStateChange, VmUpgrade};

fn fault(method: &str, path: &str, body: &str) -> ApiFault {
    match route(method, path, body.as_bytes()) {
        Ok(r) => panic!("{method} {path} {body}: expected a fault, got {r:?}"),
        Err(f) => f,
    }
}

fn assert_fault(method: &str, path: &str, body: &str, status: u16, needles: &[&str]) {
    let f = fault(method, path, body);
    assert_eq!(f.status, status, "{method} {path} {body}: {f:?}");
    for n in needles {
        assert!(
            f.message.contains(n),
            "{method} {path}: message {:?} lacks {n:?}",
            f.message
        );
    }
}

const DRIVE: &str = r#"{"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": true}"#;

#[test]
fn get_endpoints() {
    for (path, want) in [
        ("/", ApiRequest::GetInstanceInfo),
        ("/version", ApiRequest::GetVersion),
        ("/machine-config", ApiRequest::GetMachineConfig),
        ("/vm/config", ApiRequest::GetVmConfig),
        ("/skiff/vm", ApiRequest::GetSkiffVm),
        ("/skiff/devices", ApiRequest::GetSkiffDevices),
        ("/skiff/metrics", ApiRequest::GetSkiffMetrics),
    ] {
        assert_eq!(route("GET", path, b"").unwrap(), want, "{path}");
    }
}

#[test]
fn get_ignores_body_and_query() {
    assert_eq!(
        route("GET", "/version?x=1#f", b"{garbage").unwrap(),
        ApiRequest::GetVersion
    );
    assert_eq!(
        route("GET", "/?a", b"").unwrap(),
        ApiRequest::GetInstanceInfo
    );
}

#[test]
fn put_and_patch_bodies() {
    let d = route("PUT", "/drives/rootfs", DRIVE.as_bytes()).unwrap();
    let ApiRequest::PutDrive(d) = d else {
        panic!("{d:?}")
    };
    assert_eq!(d.path_on_host.as_deref(), Some("/img"));
    assert_eq!(
        route(
            "PATCH",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/b"}"#
        )
        .unwrap(),
        ApiRequest::PatchDrive(PartialDrive {
            drive_id: "rootfs".into(),
            path_on_host: Some("/b".into()),
            rate_limiter: None,
        })
    );
    assert_eq!(
        route("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#).unwrap(),
        ApiRequest::Action(InstanceActionInfo {
            action_type: ActionType::InstanceStart
        })
    );
    assert_eq!(
        route("PATCH", "/vm", br#"{"state": "Paused"}"#).unwrap(),
        ApiRequest::PatchVm(Vm {
            state: VmStateChange::Paused
        })
    );
    assert_eq!(
        route("PUT", "/logger", br#"{"level": "debug"}"#).unwrap(),
        ApiRequest::PutLogger(Logger {
            level: Some(LogLevel::Debug),
            ..Logger::default()
        })
    );
    assert_eq!(
        route("PATCH", "/machine-config", br#"{"vcpu_count": 4}"#).unwrap(),
        ApiRequest::PatchMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(4),
            ..MachineConfigUpdate::default()
        })
    );
    assert!(matches!(
        route("PUT", "/metrics", br#"{"metrics_path": "/m"}"#),
        Ok(ApiRequest::PutMetrics(_))
    ));
    assert!(matches!(
        route("PUT", "/boot-source", br#"{"kernel_image_path": "/k"}"#),
        Ok(ApiRequest::PutBootSource(_))
    ));
    assert!(matches!(
        route(
            "PUT",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#
        ),
        Ok(ApiRequest::PutNetworkInterface(_))
    ));
    assert!(matches!(
        route(
            "PATCH",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "rx_rate_limiter": null}"#
        ),
        Ok(ApiRequest::PatchNetworkInterface(_))
    ));
}

#[test]
fn upgrade_device() {
    // An empty (or blank) body means "the same binary".
    for body in ["", " \r\n", "{}", r#"{"binary": null}"#] {
        assert_eq!(
            route("PUT", "/skiff/devices/rootfs/upgrade", body.as_bytes()).unwrap(),
            ApiRequest::UpgradeDevice("rootfs".into(), DeviceUpgrade::default()),
            "{body:?}"
        );
    }
    assert_eq!(
        route(
            "PUT",
            "/skiff/devices/eth_0/upgrade?x#y",
            br#"{"binary": "/opt/skiff-net"}"#
        )
        .unwrap(),
        ApiRequest::UpgradeDevice(
            "eth_0".into(),
            DeviceUpgrade {
                binary: Some("/opt/skiff-net".into())
            }
        )
    );
    let long = "a".repeat(MAX_ID_LEN + 1);
    for bad in ["bad-id", "b%20d", "", long.as_str(), "é", "{id}"] {
        let path = format!("/skiff/devices/{bad}/upgrade");
        for body in ["", "{}"] {
            assert_fault("PUT", &path, body, 400, &["device id", "1 to 64"]);
        }
    }
    assert_fault(
        "PUT",
        "/skiff/devices/rootfs/upgrade",
        r#"{"binary": "/b", "path": "/x"}"#,
        400,
        &["invalid upgrade body", "unknown field `path`"],
    );
    assert_fault(
        "PUT",
        "/skiff/devices/rootfs/upgrade",
        r#"{"binary": 7}"#,
        400,
        &["binary", "invalid type"],
    );
    assert_fault(
        "PUT",
        "/skiff/devices/rootfs/upgrade",
        r#"{} x"#,
        400,
        &["invalid upgrade body", "trailing"],
    );
    assert_fault(
        "PUT",
        "/skiff/devices/rootfs/upgrade",
        "{",
        400,
        &["invalid upgrade body", "EOF"],
    );
    assert_fault(
        "GET",
        "/skiff/devices/rootfs/upgrade",
        "",
        405,
        &["allowed: PUT"],
    );
    for path in [
        "/skiff/devices/rootfs",
        "/skiff/devices/rootfs/upgrade/",
        "/skiff/devices/upgrade",
    ] {
        assert_fault("PUT", path, "", 404, &["no endpoint"]);
    }
}

#[test]
fn upgrade_all() {
    for body in [
        "",
        "\n",
        "{}",
        r#"{"blk_binary": null, "net_binary": null}"#,
    ] {
        assert_eq!(
            route("PUT", "/skiff/upgrade", body.as_bytes()).unwrap(),
            ApiRequest::UpgradeAll(VmUpgrade::default()),
            "{body:?}"
        );
    }
    assert_eq!(
        route(
            "PUT",
            "/skiff/upgrade",
            br#"{"blk_binary": "/b", "net_binary": "/n"}"#
        )
        .unwrap(),
        ApiRequest::UpgradeAll(VmUpgrade {
            blk_binary: Some("/b".into()),
            net_binary: Some("/n".into()),
        })
    );
    assert_eq!(
        route("PUT", "/skiff/upgrade", br#"{"net_binary": "/n"}"#).unwrap(),
        ApiRequest::UpgradeAll(VmUpgrade {
            blk_binary: None,
            net_binary: Some("/n".into()),
        })
    );
    assert_fault(
        "PUT",
        "/skiff/upgrade",
        r#"{"binary": "/b"}"#,
        400,
        &["invalid upgrade body", "unknown field `binary`"],
    );
    assert_fault(
        "PUT",
        "/skiff/upgrade",
        r#"{"blk_binary": ["/b"]}"#,
        400,
        &["blk_binary", "invalid type"],
    );
    for body in ["null", "7", r#""/b""#] {
        assert_fault(
            "PUT",
            "/skiff/upgrade",
            body,
            400,
            &["invalid upgrade body"],
        );
    }
    assert_fault("PATCH", "/skiff/upgrade", "{}", 405, &["allowed: PUT"]);
}

#[test]
fn json_errors_come_from_serde() {
    assert_fault(
        "PUT",
        "/actions",
        "{",
        400,
        &["invalid actions body", "EOF"],
    );
    assert_fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "two", "mem_size_mib": 128}"#,
        400,
        &["invalid type", "string \"two\""],
    );
    assert_fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "smtx": false}"#,
        400,
        &["unknown field `smtx`"],
    );
    assert_fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1}"#,
        400,
        &["missing field `mem_size_mib`"],
    );
    assert_fault(
        "PUT",
        "/actions",
        r#"{"action_type": "Explode"}"#,
        400,
        &["unknown variant `Explode`"],
    );
}

#[test]
fn missing_body() {
    for (method, path) in [
        ("PUT", "/machine-config"),
        ("PATCH", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/a"),
        ("PATCH", "/drives/a"),
        ("PUT", "/network-interfaces/a"),
        ("PATCH", "/network-interfaces/a"),
        ("PUT", "/actions"),
        ("PATCH", "/vm"),
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
    ] {
        assert_fault(method, path, "", 400, &["missing body"]);
        assert_fault(method, path, " \r\n", 400, &["missing body"]);
    }
}

#[test]
fn path_and_body_ids() {
    assert_fault(
        "PUT",
        "/drives/other",
        DRIVE,
        400,
        &["drive_id", "'other'", "'rootfs'"],
    );
    assert_fault(
        "PATCH",
        "/network-interfaces/eth1",
        r#"{"iface_id": "eth0"}"#,
        400,
        &["iface_id", "'eth1'", "'eth0'"],
    );
    let long = "a".repeat(65);
    for bad in ["bad-id", "b%20d", "", long.as_str(), "é"] {
        let path = format!("/drives/{bad}");
        let body = DRIVE.replace("rootfs", bad);
        assert_fault("PUT", &path, &body, 400, &["invalid drive_id", "1 to 64"]);
    }
    let max = "Z_9".repeat(21) + "x";
    assert_eq!(max.len(), MAX_ID_LEN);
    let body = DRIVE.replace("rootfs", &max);
    assert!(route("PUT", &format!("/drives/{max}"), body.as_bytes()).is_ok());
}

#[test]
fn unsupported_options() {
    assert_fault(
        "PUT",
        "/drives/rootfs",
        &DRIVE.replace('}', r#", "partuuid": "x"}"#),
        400,
        &["drives[rootfs].partuuid", "not supported"],
    );
    assert_fault(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": true}"#,
        400,
        &["machine-config.smt", "not supported"],
    );
    assert_fault(
        "PATCH",
        "/machine-config",
        r#"{"huge_pages": "1G"}"#,
        400,
        &["machine-config.huge_pages", "not supported"],
    );
    assert_fault(
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "host_dev_name": "t", "tx_rate_limiter": {}}"#,
        400,
        &["tx_rate_limiter", "not supported"],
    );
    assert_fault(
        "PUT",
        "/logger",
        r#"{"log_path": ""}"#,
        400,
        &["logger.log_path", "not supported"],
    );
    assert_fault(
        "PATCH",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "rate_limiter": {"bandwidth": {}}}"#,
        400,
        &["drives[rootfs].rate_limiter", "not supported"],
    );
    assert_fault(
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "rx_rate_limiter": {}}"#,
        400,
        &["network-interfaces[eth0].rx_rate_limiter", "not supported"],
    );
}

#[test]
fn unsupported_endpoints() {
    for (path, feature) in [
        ("/mmds", "MMDS"),
        ("/mmds/config", "MMDS"),
        ("/vsock", "vsock"),
        ("/balloon", "balloon"),
        ("/balloon/statistics", "balloon"),
        ("/entropy", "entropy"),
        ("/cpu-config", "CPU templates"),
        ("/serial", "serial"),
        ("/hotplug/memory", "hotplug"),
        ("/hotplug/memory/x?y", "hotplug"),
    ] {
        for method in ["GET", "PUT", "PATCH", "DELETE"] {
            assert_fault(
                method,
                path,
                "{}",
                400,
                &[feature, "not supported by skiff"],
            );
        }
    }
    assert_fault("GET", "/mmdsx", "", 404, &["/mmdsx"]);
}

#[test]
fn unknown_paths_and_methods() {
    for path in [
        "/nope",
        "/version/",
        "/drives",
        "/drives/a/b",
        "//",
        "",
        "*",
        "/skiff",
    ] {
        assert_fault("GET", path, "", 404, &["no endpoint"]);
    }
    assert_fault("DELETE", "/version", "", 405, &["DELETE", "allowed: GET"]);
    assert_fault(
        "POST",
        "/machine-config",
        "",
        405,
        &["allowed: GET, PUT, PATCH"],
    );
    assert_fault("GET", "/drives/a", "", 405, &["allowed: PUT, PATCH"]);
    assert_fault("get", "/version", "", 405, &["allowed: GET"]);
    assert_fault("GET", "/vm", "", 405, &["allowed: PATCH"]);
}

#[test]
fn long_client_text_is_cut() {
    let path = format!("/{}", "x".repeat(10_000));
    let f = fault("GET", &path, "");
    assert_eq!(f.status, 404);
    assert!(f.message.len() < 200, "{}", f.message.len());
}

#[test]
fn table_is_consistent() {
    for (i, r) in ROUTES.iter().enumerate() {
        let concrete = r
            .path
            .replace("{drive_id}", "d")
            .replace("{iface_id}", "d")
            .replace("{id}", "d");
        assert_eq!(resolve(r.method, &concrete).ok(), Some(i), "{r:?}");
        assert!(["GET", "PUT", "PATCH"].contains(&r.method), "{r:?}");
        assert!(!r.name.is_empty());
        for (j, other) in ROUTES.iter().enumerate() {
            assert!(
                i == j || other.method != r.method || other.path != r.path,
                "duplicate {r:?}"
            );
        }
    }
}

#[test]
fn power_button_takes_no_parameters() {
    for body in [&b""[..], b"  ", b"{}", b" { } "] {
        assert_eq!(
            route("PUT", "/skiff/power-button", body).unwrap(),
            ApiRequest::PressPowerButton
        );
    }
    for body in [&br#"{"press": true}"#[..], b"[]", b"1", b"{"] {
        let e = route("PUT", "/skiff/power-button", body).unwrap_err();
        assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(body));
    }
}

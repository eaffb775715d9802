//! The API server end to end over its Unix socket, with a fake VMM thread (no KVM).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::Receiver;
use std::thread;
use std::time::{Duration, Instant};

use api_server::client::{wait_ready, ApiClient, ClientError};
use api_server::models::{
    ActionType, BootSource, Drive, Logger, MachineConfig, MachineConfigUpdate, Metrics,
    NetworkInterface, PartialDrive, PartialNetworkInterface, VmStateChange,
};
use api_server::server::{ApiCall, ServerError, MAX_BODY};
use common::{bind, fs_lock, temp_dir, Harness};

fn fault(r: Result<impl std::fmt::Debug, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Fault { status, message }) => (status, message),
        other => panic!("expected a fault, got {other:?}"),
    }
}

fn drive(id: &str) -> Drive {
    Drive {
        drive_id: id.into(),
        path_on_host: Some("/img".into()),
        is_root_device: true,
        ..Drive::default()
    }
}

#[test]
fn typed_round_trip() {
    let h = Harness::start("roundtrip");
    let mut c = ApiClient::connect_timeout(&h.socket, Duration::from_secs(5)).unwrap();
    assert_eq!(c.version().unwrap().firecracker_version, "skiff-test");
    assert_eq!(c.instance_info().unwrap().app_name, "skiff");
    let mc = MachineConfig {
        vcpu_count: 2,
        mem_size_mib: 512,
        ..MachineConfig::default()
    };
    c.put_machine_config(&mc).unwrap();
    assert_eq!(c.machine_config().unwrap(), mc);
    c.patch_machine_config(&MachineConfigUpdate {
        vcpu_count: Some(4),
        ..MachineConfigUpdate::default()
    })
    .unwrap();
    assert_eq!(c.machine_config().unwrap().vcpu_count, 4);
    c.put_boot_source(&BootSource {
        kernel_image_path: "/k".into(),
        ..BootSource::default()
    })
    .unwrap();
    c.put_drive(&drive("rootfs")).unwrap();
    c.patch_drive(&PartialDrive {
        drive_id: "rootfs".into(),
        path_on_host: Some("/b".into()),
        rate_limiter: None,
    })
    .unwrap();
    let net = NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: "tap0".into(),
        ..NetworkInterface::default()
    };
    c.put_network_interface(&net).unwrap();
    c.patch_network_interface(&PartialNetworkInterface {
        iface_id: "eth0".into(),
        ..PartialNetworkInterface::default()
    })
    .unwrap();
    c.put_logger(&Logger::default()).unwrap();
    c.put_metrics(&Metrics {
        metrics_path: "/m".into(),
    })
    .unwrap();
    c.action(ActionType::InstanceStart).unwrap();
    c.patch_vm(VmStateChange::Paused).unwrap();
    assert_eq!(c.vm_config().unwrap()["machine-config"]["vcpu_count"], 4);
    assert_eq!(c.skiff_vm().unwrap().mem_size_mib, 512);
    assert!(c.skiff_devices().unwrap().devices.is_empty());
    assert_eq!(c.skiff_metrics().unwrap(), "skiff_test 1\n");

    // A fault from the VMM comes back with its message.
    let (status, msg) = fault(c.action(ActionType::SendCtrlAltDel));
    assert_eq!(
        (status, msg.as_str()),
        (400, "SendCtrlAltDel needs a running guest")
    );

    // Content types.
    let r = c.raw("GET", "/skiff/metrics", None).unwrap();
    assert_eq!(r.content_type.as_deref(), Some("text/plain; version=0.0.4"));
    let r = c.raw("GET", "/version?pretty", None).unwrap();
    assert_eq!(
        (r.status, r.content_type.as_deref()),
        (200, Some("application/json"))
    );
    let r = c
        .raw("PATCH", "/vm", Some(br#"{"state": "Resumed"}"#))
        .unwrap();
    assert_eq!((r.status, r.body.len()), (204, 0));

    // Every routed request woke the VMM.
    assert!(h.wake.read().unwrap() >= 18);
    let snap = h.metrics.snapshot();
    let version = snap.iter().find(|c| c.name == "version").unwrap();
    assert_eq!((version.status, version.count), (200, 2));
    assert!(snap.iter().any(|c| c.name == "actions" && c.status == 400));
}

#[test]
fn bad_bodies_are_400_naming_the_problem() {
    let h = Harness::start("badbody");
    let mut c = ApiClient::new(&h.socket);
    for (method, path, body, needle) in [
        (
            "PUT",
            "/actions",
            "{\"action_type\": ",
            "invalid actions body",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "2", "mem_size_mib": 1}"#,
            "invalid type",
        ),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 1, "x": 1}"#,
            "unknown field `x`",
        ),
        (
            "PUT",
            "/boot-source",
            "{}",
            "missing field `kernel_image_path`",
        ),
        ("PUT", "/drives/a", "", "missing body"),
        (
            "PUT",
            "/drives/a",
            &serde_json::to_string(&drive("b")).unwrap(),
            "does not match",
        ),
        ("PUT", "/vsock", "{}", "vsock"),
    ] {
        let r = c.raw(method, path, Some(body.as_bytes())).unwrap();
        assert_eq!(r.status, 400, "{method} {path}");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
        let msg = r.fault_message().unwrap();
        assert!(msg.contains(needle), "{method} {path}: {msg}");
    }
    // Typed helpers surface the same faults.
    let (status, msg) = fault(c.put_drive(&Drive {
        partuuid: Some("p".into()),
        ..drive("rootfs")
    }));
    assert_eq!(status, 400);
    assert!(msg.contains("partuuid"), "{msg}");
}

#[test]
fn unknown_path_and_wrong_method() {
    let h = Harness::start("404");
    let mut c = ApiClient::new(&h.socket);
    let r = c.raw("GET", "/nope", None).unwrap();
    assert_eq!(r.status, 404);
    assert!(r.fault_message().unwrap().contains("/nope"));
    let r = c.raw("DELETE", "/drives/a", None).unwrap();
    assert_eq!(r.status, 405);
    assert!(r.fault_message().unwrap().contains("PUT, PATCH"));
    let snap = h.metrics.snapshot();
    assert!(snap.iter().any(|c| c.name == "unrouted" && c.status == 404));
}

#[test]
fn oversized_bodies_are_413() {
    let h = Harness::start("413");
    let mut c = ApiClient::new(&h.socket);
    let big = vec![b' '; MAX_BODY + 1];
    let r = c.raw("PUT", "/drives/a", Some(&big)).unwrap();
    assert_eq!(r.status, 413);
    assert!(r.fault_message().unwrap().contains("51200"));
    // The server closes the connection after a refusal; the client reconnects.
    assert_eq!(c.version().unwrap().firecracker_version, "skiff-test");
    let ok = vec![b' '; MAX_BODY];
    assert!(c.raw("GET", "/", Some(&ok)).unwrap().is_success());

    // Chunked: refused once the limit is passed.
    let mut req = b"PUT /drives/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..(MAX_BODY / 1000 + 2) {
        req.extend_from_slice(b"3e8\r\n");
        req.extend_from_slice(&[b' '; 1000]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let out = h.exchange_raw(&req);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");

    // A body declared but never sent is refused at once, and so is an absurd length,
    // and the connection is closed.
    for len in ["1000000", "1000000000000000", "99999999999999999999999"] {
        let mut s = UnixStream::connect(&h.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        write!(s, "PUT /drives/a HTTP/1.1\r\nContent-Length: {len}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(
            out.starts_with("HTTP/1.1 413") && out.contains("Connection: close"),
            "{out}"
        );
        assert!(c.version().is_ok());
    }
    assert!(h
        .metrics
        .snapshot()
        .iter()
        .any(|c| c.status == 413 && c.count >= 5));
}

#[test]
fn garbage_and_half_requests_do_not_stop_the_server() {
    let h = Harness::start("garbage");
    let mut c = ApiClient::new(&h.socket);
    for junk in [
        &b"this is not http\r\n\r\n"[..],
        b"\x00\xff\xfe\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    ] {
        let out = h.exchange_raw(junk);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 4"), "{out:?}");
        assert!(c.version().is_ok());
    }
    for half in [
        &b"GET /vers"[..],
        b"PUT /drives/a HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"drive_id\"",
        b"PUT /drives/a HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{\"drive_id\"",
    ] {
        let mut s = UnixStream::connect(&h.socket).unwrap();
        s.write_all(half).unwrap();
        drop(s);
        assert!(c.version().is_ok());
    }
    // A client that stalls mid-headers does not block the others.
    let mut stalled = UnixStream::connect(&h.socket).unwrap();
    stalled
        .write_all(b"PUT /actions HTTP/1.1\r\nContent-")
        .unwrap();
    assert!(c.version().is_ok());
    drop(stalled);
    // Nor does one that declares a body and then stalls in it, or one that waits for
    // 100-continue and never sends the body.
    let mut in_body = UnixStream::connect(&h.socket).unwrap();
    in_body
        .write_all(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{\"drive_id\"")
        .unwrap();
    let mut in_continue = UnixStream::connect(&h.socket).unwrap();
    in_continue
        .write_all(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 20\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    thread::sleep(Duration::from_millis(200));
    let mut quick = ApiClient::new(&h.socket).with_timeout(Duration::from_secs(5));
    assert!(quick.version().is_ok());
    assert!(quick.put_drive(&drive("quick")).is_ok());
    drop(in_body);
    drop(in_continue);
}

#[test]
fn concurrent_clients() {
    let h = Harness::start("concurrent");
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let socket = h.socket.clone();
            thread::spawn(move || {
                let mut c = ApiClient::new(socket).with_timeout(Duration::from_secs(30));
                for j in 0..20 {
                    if (i + j) % 2 == 0 {
                        assert_eq!(c.version().unwrap().firecracker_version, "skiff-test");
                    } else {
                        c.put_drive(&drive(&format!("d{i}_{j}"))).unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(h.metrics.total(), 1000);
}

#[test]
fn socket_is_owner_only() {
    let h = Harness::start("mode");
    let meta = fs::metadata(&h.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
}

#[test]
fn stale_live_and_foreign_files() {
    let dir = temp_dir("stale");
    let path = dir.join("api.sock");
    {
        let _g = fs_lock();
        drop(UnixListener::bind(&path).unwrap());
    }
    assert!(path.exists());
    let server = bind(&path).unwrap();
    let err = bind(&path).unwrap_err();
    assert!(matches!(err, ServerError::InUse(_)), "{err}");
    assert!(err.to_string().contains("already in use"), "{err}");
    drop(server);

    let file = dir.join("plain");
    {
        let _g = fs_lock();
        fs::write(&file, b"x").unwrap();
    }
    let err = bind(&file).unwrap_err();
    assert!(err.to_string().contains("plain"), "{err}");
    assert!(matches!(err, ServerError::NotASocket(_)), "{err}");
    assert_eq!(fs::read(&file).unwrap(), b"x");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_removes_the_socket() {
    let mut h = Harness::start("shutdown");
    wait_ready(&h.socket, Duration::from_secs(5)).unwrap();
    let mut c = ApiClient::new(&h.socket);
    assert!(c.version().is_ok());
    h.shutdown();
    assert!(!h.socket.exists());
    let mut fresh = ApiClient::new(&h.socket);
    let err = fresh.version().unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    let err = wait_ready(&h.socket, Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, ClientError::NotReady { .. }), "{err}");
}

#[test]
fn vmm_gone_is_503() {
    let h = Harness::start_with("gone", drop);
    let mut c = ApiClient::new(&h.socket);
    let (status, msg) = fault(c.version());
    assert_eq!((status, msg.as_str()), (503, "the VMM is shutting down"));
    // Unrouted requests are still answered by the HTTP thread alone.
    assert_eq!(c.raw("GET", "/nope", None).unwrap().status, 404);
}

/// A VMM that takes calls and never answers them.
fn silent_vmm(rx: Receiver<ApiCall>) {
    let held: Vec<ApiCall> = rx.iter().collect();
    drop(held);
}

#[test]
fn shutdown_does_not_wait_for_a_stuck_vmm() {
    let mut h = Harness::start_with("stuck", silent_vmm);
    let socket = h.socket.clone();
    let client = thread::spawn(move || ApiClient::new(socket).version());
    while h.wake.read().is_err() {
        thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    h.shutdown();
    assert!(start.elapsed() < Duration::from_secs(2));
    let (status, _) = fault(client.join().unwrap());
    assert_eq!(status, 503);
}

#[test]
fn client_reconnects_after_the_server_closes() {
    let dir = temp_dir("reconnect");
    let path = dir.join("fake.sock");
    let listener = {
        let _g = fs_lock();
        UnixListener::bind(&path).unwrap()
    };
    // Answers one request per connection, advertising keep-alive, then closes.
    let server = thread::spawn(move || {
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 32\r\n\r\n{\"firecracker_version\": \"fake\"}\n")
                .unwrap();
        }
    });
    let mut c = ApiClient::new(&path);
    for _ in 0..3 {
        assert_eq!(c.version().unwrap().firecracker_version, "fake");
        thread::sleep(Duration::from_millis(20));
    }
    server.join().unwrap();
    let _ = fs::remove_dir_all(&dir);
}

//! The control API: guests configured, started, paused, changed and stopped through
//! `skiff --api-sock`, by skiff's own client and by a Firecracker client library from PyPI,
//! and bad requests that must be refused while the VM keeps running.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api_server::client::{ApiClient, ClientError};
use api_server::models::{
    ActionType, BootSource, Drive, LogLevel, Logger, MachineConfig, Metrics, NetworkInterface,
    PartialDrive, VmStateChange,
};
use tests::{ensure, host, Result, TestDir, TestVm, DEFAULT_BOOT_ARGS};

use super::{last_line, vmlinux, BOOT, CMD, EXIT, MIB};

/// A skiff started with `--api-sock` and nothing else, plus a client for it.
pub struct ApiVm {
    pub vm: TestVm,
    pub api: ApiClient,
    pub sock: PathBuf,
}

impl ApiVm {
    pub fn start(dir: &TestDir, extra: &[&str]) -> Result<ApiVm> {
        let sock = dir.join("api.sock");
        let s = sock.to_string_lossy().into_owned();
        let mut args = vec!["--api-sock", s.as_str(), "--id", "api_test"];
        args.extend_from_slice(extra);
        let vm = TestVm::start_args(&args)?;
        api_server::client::wait_ready(&sock, Duration::from_secs(20))
            .map_err(|e| format!("the API socket never accepted: {e}{}", vm.diagnostics()))?;
        Ok(ApiVm {
            vm,
            api: ApiClient::new(&sock),
            sock,
        })
    }

    /// The Firecracker sequence: machine-config, boot-source, rootfs drive.
    pub fn configure(
        &mut self,
        dir: &TestDir,
        vcpus: u32,
        mem: u64,
        extra_cmdline: &str,
    ) -> Result {
        let rootfs = dir.copy_rootfs()?;
        self.configure_rootfs(&rootfs, vcpus, mem, extra_cmdline)
    }

    /// As [`ApiVm::configure`] with a given root filesystem image.
    pub fn configure_rootfs(
        &mut self,
        rootfs: &Path,
        vcpus: u32,
        mem: u64,
        extra_cmdline: &str,
    ) -> Result {
        let api = &mut self.api;
        api.put_machine_config(&MachineConfig {
            vcpu_count: vcpus,
            mem_size_mib: mem,
            ..Default::default()
        })
        .map_err(|e| format!("PUT /machine-config: {e}"))?;
        api.put_boot_source(&BootSource {
            kernel_image_path: vmlinux()?.display().to_string(),
            boot_args: Some(format!("{DEFAULT_BOOT_ARGS} {extra_cmdline}")),
            initrd_path: None,
        })
        .map_err(|e| format!("PUT /boot-source: {e}"))?;
        api.put_drive(&Drive {
            drive_id: "rootfs".into(),
            path_on_host: Some(rootfs.display().to_string()),
            is_root_device: true,
            is_read_only: Some(false),
            ..Default::default()
        })
        .map_err(|e| format!("PUT /drives/rootfs: {e}"))?;
        Ok(())
    }

    /// InstanceStart, then the guest's shell.
    pub fn start_guest(&mut self) -> Result {
        self.api
            .action(ActionType::InstanceStart)
            .map_err(|e| format!("InstanceStart: {e}{}", self.vm.diagnostics()))?;
        self.vm.wait_ready(BOOT)
    }
}

pub fn fault(
    r: std::result::Result<impl std::fmt::Debug, ClientError>,
    status: u16,
    words: &[&str],
) -> Result {
    match r {
        Err(ClientError::Fault { status: s, message }) => {
            ensure!(s == status, "want status {status}, got {s}: {message}");
            let m = message.to_lowercase();
            ensure!(
                words.iter().all(|w| m.contains(&w.to_lowercase())),
                "fault message {message:?} does not name {words:?}"
            );
            Ok(())
        }
        other => Err(format!(
            "want a {status} fault naming {words:?}, got {other:?}"
        )),
    }
}

/// Reads the guest's CLOCK_MONOTONIC (/proc/uptime) in seconds.
fn guest_uptime(vm: &mut TestVm) -> Result<f64> {
    let out = vm.run_ok("cut -d' ' -f1 /proc/uptime", CMD)?;
    last_line(&out)
        .parse()
        .map_err(|_| format!("/proc/uptime printed {out:?}"))
}

// ---------------------------------------------------------------- guests

/// The curl sequence of Firecracker's getting-started guide, with a network interface,
/// then every read-only endpoint, metrics, and a reboot.
pub fn api_boot_sequence() -> Result {
    let dir = TestDir::new("api-boot")?;
    let tap_name = format!("ska{}n", std::process::id() % 100_000);
    let tap = host::Tap::create(&tap_name, "172.31.9.1/24")?;
    let mut a = ApiVm::start(&dir, &[])?;
    let info = a.api.instance_info().map_err(|e| e.to_string())?;
    ensure!(
        info.state == "Not started" && info.id == "api_test",
        "GET / said {info:?}"
    );
    a.configure(
        &dir,
        2,
        256,
        "ip=172.31.9.2::172.31.9.1:255.255.255.0::eth0:off",
    )?;
    a.api
        .put_network_interface(&NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: tap_name.clone(),
            guest_mac: Some("06:00:ac:1f:09:02".into()),
            ..Default::default()
        })
        .map_err(|e| format!("PUT /network-interfaces/eth0: {e}"))?;
    let metrics = dir.join("metrics.json");
    a.api
        .put_metrics(&Metrics {
            metrics_path: metrics.display().to_string(),
        })
        .map_err(|e| format!("PUT /metrics: {e}"))?;
    let log = dir.join("skiff.log");
    a.api
        .put_logger(&Logger {
            log_path: Some(log.display().to_string()),
            level: Some(LogLevel::Info),
            show_level: Some(true),
            show_log_origin: Some(true),
            module: None,
        })
        .map_err(|e| format!("PUT /logger: {e}"))?;
    a.start_guest()?;
    let text = std::fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
    let started = text
        .lines()
        .find(|l| l.contains("VM started"))
        .ok_or_else(|| format!("the log file lacks the start line:\n{text}"))?;
    ensure!(
        started.starts_with("20")
            && started.as_bytes().get(10) == Some(&b'T')
            && started.contains("[skiff:api_test:")
            && started.contains(" INFO ")
            && started.contains(".rs:"),
        "log line without timestamp, id, level or origin: {started:?}"
    );
    let out = a.vm.run_ok(
        "nproc; ping -c 2 -W 5 172.31.9.1 >/dev/null && echo PING-OK",
        CMD,
    )?;
    ensure!(
        out.contains("PING-OK") && out.trim_start().starts_with('2'),
        "guest said {out:?}"
    );

    let info = a.api.instance_info().map_err(|e| e.to_string())?;
    ensure!(info.state == "Running", "GET / after start: {info:?}");
    let cfg = a.api.vm_config().map_err(|e| e.to_string())?;
    ensure!(
        cfg["machine-config"]["vcpu_count"] == 2
            && cfg["drives"][0]["drive_id"] == "rootfs"
            && cfg["network-interfaces"][0]["host_dev_name"] == tap_name.as_str()
            && cfg["metrics"]["metrics_path"] == metrics.display().to_string(),
        "GET /vm/config: {cfg}"
    );
    let st = a.api.skiff_vm().map_err(|e| e.to_string())?;
    ensure!(
        st.state == "Running" && st.uptime_ms.is_some_and(|u| u > 0),
        "GET /skiff/vm: {st:?}"
    );
    let devs = a.api.skiff_devices().map_err(|e| e.to_string())?;
    ensure!(
        devs.devices.len() == 2
            && devs
                .devices
                .iter()
                .all(|d| d.pid.is_some() && d.activated && d.restarts == 0),
        "GET /skiff/devices: {devs:?}"
    );
    // Runtime rules: configuration is closed after InstanceStart.
    fault(
        a.api.put_machine_config(&MachineConfig::default()),
        400,
        &["after instancestart"],
    )?;
    fault(
        a.api.action(ActionType::InstanceStart),
        400,
        &["already started"],
    )?;

    a.api
        .action(ActionType::FlushMetrics)
        .map_err(|e| format!("FlushMetrics: {e}"))?;
    let text = std::fs::read_to_string(&metrics).map_err(|e| e.to_string())?;
    let line = text.lines().last().ok_or("the metrics file is empty")?;
    let m: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
    ensure!(
        m["vcpu"]["io_out"].as_u64().is_some_and(|n| n > 0)
            && m["uart"]["bytes_out"].as_u64().is_some_and(|n| n > 0)
            && m["api_server"].as_object().is_some_and(|o| !o.is_empty()),
        "metrics line lacks vCPU exits, console bytes or API counts: {line}"
    );
    ensure!(
        m["devices"]["rootfs"]["read_requests"]
            .as_u64()
            .is_some_and(|n| n > 0)
            && m["devices"]["eth0"]["tx_frames"]
                .as_u64()
                .is_some_and(|n| n > 0),
        "metrics line lacks the device processes' counters: {line}"
    );
    let prom = a.api.skiff_metrics().map_err(|e| e.to_string())?;
    for (device, counter) in [("rootfs", "read_bytes"), ("eth0", "rx_frames")] {
        let key = format!("skiff_device_total{{device=\"{device}\",kind=");
        let value = prom
            .lines()
            .find(|l| l.starts_with(&key) && l.contains(&format!("counter=\"{counter}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok());
        ensure!(
            value.is_some_and(|v| v > 0),
            "GET /skiff/metrics has no positive {counter} for {device}:\n{prom}"
        );
    }
    for want in [
        "skiff_vcpu_exits_total{vcpu=\"1\",reason=\"io_out\"}",
        "skiff_api_requests_total{method=\"PUT\",path=\"/actions\",status=\"204\"}",
        "skiff_vm_state{state=\"Running\"} 1",
        "skiff_uart_total{counter=\"bytes_out\"}",
    ] {
        ensure!(
            prom.contains(want),
            "GET /skiff/metrics lacks {want}:\n{prom}"
        );
    }
    a.vm.reboot_and_wait(EXIT)?;
    ensure!(
        !a.sock.exists(),
        "the API socket {} is left after exit",
        a.sock.display()
    );
    drop(tap);
    Ok(())
}

/// PATCH /vm Paused stops the guest's clock for the pause's length; Resumed continues.
pub fn api_pause_stops_guest_clock() -> Result {
    let dir = TestDir::new("api-pause")?;
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure(&dir, 2, 256, "")?;
    a.start_guest()?;
    let pause = Duration::from_secs(4);
    let g0 = guest_uptime(&mut a.vm)?;
    let h0 = Instant::now();
    a.api
        .patch_vm(VmStateChange::Paused)
        .map_err(|e| format!("pause: {e}"))?;
    let st = a.api.skiff_vm().map_err(|e| e.to_string())?;
    ensure!(st.state == "Paused", "GET /skiff/vm while paused: {st:?}");
    // Typed while paused: must be taken once resumed.
    std::thread::sleep(pause);
    a.api
        .patch_vm(VmStateChange::Resumed)
        .map_err(|e| format!("resume: {e}"))?;
    let g1 = guest_uptime(&mut a.vm)?;
    let host_s = h0.elapsed().as_secs_f64();
    let guest_s = g1 - g0;
    ensure!(
        guest_s > 0.0 && guest_s <= host_s - pause.as_secs_f64() + 0.5,
        "over {host_s:.2} s of host time with a {pause:?} pause the guest clock advanced {guest_s:.2} s"
    );
    // And it keeps running afterwards.
    std::thread::sleep(Duration::from_secs(1));
    let g2 = guest_uptime(&mut a.vm)?;
    ensure!(
        g2 > g1 + 0.5,
        "after resume the guest clock went from {g1} to {g2} in over 1 s"
    );
    let st = a.api.skiff_vm().map_err(|e| e.to_string())?;
    ensure!(
        st.paused_ms >= 3900,
        "GET /skiff/vm reports {} ms paused",
        st.paused_ms
    );
    a.vm.reboot_and_wait(EXIT)
}

/// SendCtrlAltDel reaches a guest that reboots on Ctrl+Alt+Del, and skiff exits 0.
pub fn api_ctrl_alt_del() -> Result {
    let dir = TestDir::new("api-cad")?;
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure(&dir, 1, 256, "")?;
    a.start_guest()?;
    a.vm.run_ok("echo 1 > /proc/sys/kernel/ctrl-alt-del", CMD)?;
    a.api
        .action(ActionType::SendCtrlAltDel)
        .map_err(|e| format!("SendCtrlAltDel: {e}"))?;
    let st = a.vm.wait_exit(EXIT)?;
    ensure!(
        st.code() == Some(0),
        "after Ctrl+Alt+Del skiff exited with {st}{}",
        a.vm.diagnostics()
    );
    ensure!(
        a.vm.stderr_text().contains("i8042 reset"),
        "skiff did not report the keyboard-controller reset{}",
        a.vm.diagnostics()
    );
    Ok(())
}

/// PATCH /drives swaps the medium of a running VM's data drive: the guest sees the new
/// capacity and contents, and the drive keeps working.
pub fn api_patch_drive_changes_media() -> Result {
    let dir = TestDir::new("api-media")?;
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure(&dir, 1, 256, "")?;
    let first = dir.join("first.img");
    std::fs::write(&first, vec![b'A'; (4 * MIB) as usize]).map_err(|e| e.to_string())?;
    let second = dir.join("second.img");
    std::fs::write(&second, vec![b'B'; (12 * MIB) as usize]).map_err(|e| e.to_string())?;
    a.api
        .put_drive(&Drive {
            drive_id: "data".into(),
            path_on_host: Some(first.display().to_string()),
            is_root_device: false,
            is_read_only: Some(false),
            ..Default::default()
        })
        .map_err(|e| format!("PUT /drives/data: {e}"))?;
    fault(
        a.api.patch_drive(&PartialDrive {
            drive_id: "data".into(),
            path_on_host: Some(second.display().to_string()),
            rate_limiter: None,
        }),
        400,
        &["after instancestart"],
    )?;
    a.start_guest()?;
    let before =
        a.vm.run_ok("cat /sys/block/vdb/size; head -c 4 /dev/vdb; echo", CMD)?;
    ensure!(
        before.contains("8192") && before.contains("AAAA"),
        "before the change: {before:?}"
    );
    let pid_before = a.api.skiff_devices().map_err(|e| e.to_string())?.devices[1].pid;
    a.api
        .patch_drive(&PartialDrive {
            drive_id: "data".into(),
            path_on_host: Some(second.display().to_string()),
            rate_limiter: None,
        })
        .map_err(|e| format!("PATCH /drives/data: {e}{}", a.vm.diagnostics()))?;
    // The guest learns the new size from the config-change interrupt.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let size = a.vm.run_ok("cat /sys/block/vdb/size", CMD)?;
        if last_line(&size) == "24576" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the guest still sees {size:?} sectors, want 24576"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = a.vm.run_ok(
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=4096 skip=2000 count=1 iflag=direct 2>/dev/null | head -c 4; echo; \
         printf CCCC | dd of=/dev/vdb bs=4096 seek=2500 conv=fsync 2>/dev/null; echo WROTE",
        CMD,
    )?;
    ensure!(
        after.contains("BBBB") && after.contains("WROTE"),
        "after the change: {after:?}"
    );
    let devs = a.api.skiff_devices().map_err(|e| e.to_string())?;
    let d = &devs.devices[1];
    ensure!(
        d.restarts == 1 && d.pid != pid_before && d.backing == second.display().to_string(),
        "GET /skiff/devices after the change: {d:?}"
    );
    // Bad media changes are refused and the drive keeps its image.
    fault(
        a.api.patch_drive(&PartialDrive {
            drive_id: "data".into(),
            path_on_host: Some(dir.join("missing.img").display().to_string()),
            rate_limiter: None,
        }),
        400,
        &["missing.img"],
    )?;
    fault(
        a.api.patch_drive(&PartialDrive {
            drive_id: "nosuch".into(),
            path_on_host: Some(second.display().to_string()),
            rate_limiter: None,
        }),
        400,
        &["nosuch"],
    )?;
    a.vm.run_ok(
        "dd if=/dev/vdb bs=4096 count=1 iflag=direct 2>/dev/null | head -c 4",
        CMD,
    )?;
    a.vm.reboot_and_wait(EXIT)?;
    let data = std::fs::read(&second).map_err(|e| e.to_string())?;
    ensure!(
        &data[2500 * 4096..2500 * 4096 + 4] == b"CCCC",
        "the guest's write did not reach the new image"
    );
    let old = std::fs::read(&first).map_err(|e| e.to_string())?;
    ensure!(old.iter().all(|&b| b == b'A'), "the old image was modified");
    Ok(())
}

/// Where the Firecracker client library from PyPI is installed (.ci/run puts it there).
pub fn fc_python() -> Result<PathBuf> {
    let p = std::env::var_os("SKIFF_FC_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/skiff/fc-venv/bin/python3"))
        })
        .ok_or("HOME is not set")?;
    ensure!(
        p.exists(),
        "{} is missing: this test needs the Firecracker client library firecracker-python from PyPI \
         (python3 -m venv ~/.cache/skiff/fc-venv && ~/.cache/skiff/fc-venv/bin/pip install firecracker-python==0.0.5; \
         .ci/run does this), or SKIFF_FC_PYTHON pointing at a python3 that has it",
        p.display()
    );
    Ok(p)
}

/// A Firecracker client library this project did not write (firecracker-python's `Api`,
/// over requests-unixsocket) configures and boots a guest, pauses and resumes it.
pub fn api_firecracker_python_client() -> Result {
    let python = fc_python()?;
    let dir = TestDir::new("api-fcpy")?;
    let a = ApiVm::start(&dir, &[])?;
    let mut vm = a.vm;
    let script = tests::repo_root().join("tests/python/fc_client_boot.py");
    let rootfs = dir.copy_rootfs()?;
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(&a.sock)
        .arg(vmlinux()?)
        .arg(&rootfs)
        .arg(DEFAULT_BOOT_ARGS)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "the Python client failed ({}):\n{text}{}",
        out.status,
        vm.diagnostics()
    );
    ensure!(
        text.contains("FC-CLIENT-OK state=Running"),
        "the Python client said:\n{text}"
    );
    vm.wait_ready(BOOT)?;
    let out = vm.run_ok("echo via-python", CMD)?;
    ensure!(last_line(&out) == "via-python", "guest said {out:?}");
    vm.reboot_and_wait(EXIT)
}

fn raw_exchange(sock: &Path, bytes: &[u8]) -> Result<String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(bytes).map_err(|e| format!("write: {e}"))?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Every kind of bad request against a running VM: each gets a 4xx with a message (or a
/// closed connection for garbage), and the VMM and the guest keep running.
pub fn api_bad_requests_keep_vm_running() -> Result {
    let dir = TestDir::new("api-bad")?;
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure(&dir, 1, 256, "")?;
    a.start_guest()?;
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        ("PUT", "/machine-config", "{\"vcpu_count\": 2,", 400, ""),
        ("PUT", "/machine-config", "{\"vcpu_count\": \"two\", \"mem_size_mib\": 1}", 400, "vcpu_count"),
        ("PUT", "/drives/x", "{\"drive_id\": \"x\", \"is_root_device\": false, \"path_on_host\": \"/a\", \"bogus\": 1}", 400, "bogus"),
        ("PUT", "/boot-source", "{}", 400, "kernel_image_path"),
        ("PUT", "/actions", "{\"action_type\": \"Explode\"}", 400, "explode"),
        ("PATCH", "/vm", "{\"state\": \"Frozen\"}", 400, "frozen"),
        ("GET", "/no/such/path", "", 404, "/no/such/path"),
        ("DELETE", "/machine-config", "", 405, "delete"),
        ("PUT", "/vsock", "{\"guest_cid\": 3, \"uds_path\": \"/v\"}", 400, "not supported"),
        ("PUT", "/snapshot/create", "{}", 400, "snapshot_path"),
        (
            "PUT",
            "/snapshot/create",
            "{\"snapshot_path\": \"/tmp/s\", \"mem_file_path\": \"/tmp/m\"}",
            400,
            "paused vm",
        ),
        (
            "PUT",
            "/snapshot/load",
            "{\"snapshot_path\": \"/tmp/s\", \"mem_backend\": {\"backend_type\": \"File\", \"backend_path\": \"/tmp/m\"}}",
            400,
            "has not started a vm",
        ),
        ("PUT", "/drives/rootfs", "{\"drive_id\": \"other\", \"is_root_device\": false, \"path_on_host\": \"/a\"}", 400, "other"),
    ];
    for (method, path, body, status, word) in cases {
        let r = a
            .api
            .raw(method, path, (!body.is_empty()).then_some(body.as_bytes()))
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let text = String::from_utf8_lossy(&r.body).to_lowercase();
        ensure!(
            r.status == *status
                && text.contains("fault_message")
                && text.contains(&word.to_lowercase()),
            "{method} {path} {body:?}: got {} {text}, want {status} naming {word:?}",
            r.status
        );
    }
    // Oversized body.
    let big = vec![b' '; 200 * 1024];
    let r = a
        .api
        .raw("PUT", "/machine-config", Some(&big))
        .map_err(|e| e.to_string())?;
    ensure!(r.status == 413, "a 200 KiB body got {}", r.status);
    // Not HTTP at all.
    let garbage = raw_exchange(&a.sock, b"\x16\x03\x01 this is not HTTP\r\n\r\n")?;
    ensure!(
        garbage.is_empty() || garbage.starts_with("HTTP/1.1 4"),
        "garbage got {garbage:?}"
    );
    // A client that sends half a request and goes away.
    {
        let mut s = UnixStream::connect(&a.sock).map_err(|e| e.to_string())?;
        s.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu")
            .map_err(|e| e.to_string())?;
    }
    // 50 concurrent clients, 20 requests each.
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let sock = a.sock.clone();
            std::thread::spawn(move || -> Result {
                let mut c = ApiClient::new(&sock);
                for _ in 0..20 {
                    let info = c.instance_info().map_err(|e| format!("client {i}: {e}"))?;
                    ensure!(info.state == "Running", "client {i}: {info:?}");
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| "a client thread panicked".to_string())??;
    }
    let info = a.api.instance_info().map_err(|e| e.to_string())?;
    ensure!(info.state == "Running", "after the bad requests: {info:?}");
    let out = a.vm.run_ok("echo still-here", CMD)?;
    ensure!(last_line(&out) == "still-here", "guest said {out:?}");
    a.vm.reboot_and_wait(EXIT)
}

/// `--config-file` with `--api-sock` boots at once and keeps the API for runtime requests.
pub fn api_config_file_keeps_api() -> Result {
    let dir = TestDir::new("api-cfgfile")?;
    let cfg = dir.config(&vmlinux()?)?;
    let file = dir.join("vm.json");
    std::fs::write(&file, cfg.to_json().to_string()).map_err(|e| e.to_string())?;
    let f = file.to_string_lossy().into_owned();
    let mut a = ApiVm::start(&dir, &["--config-file", &f])?;
    a.vm.wait_ready(BOOT)?;
    let info = a.api.instance_info().map_err(|e| e.to_string())?;
    ensure!(
        info.state == "Running",
        "GET / with --config-file: {info:?}"
    );
    fault(
        a.api.put_boot_source(&BootSource {
            kernel_image_path: vmlinux()?.display().to_string(),
            ..Default::default()
        }),
        400,
        &["after instancestart"],
    )?;
    a.api
        .patch_vm(VmStateChange::Paused)
        .map_err(|e| format!("pause: {e}"))?;
    a.api
        .patch_vm(VmStateChange::Resumed)
        .map_err(|e| format!("resume: {e}"))?;
    let out = a.vm.run_ok("echo after-resume", CMD)?;
    ensure!(last_line(&out) == "after-resume", "guest said {out:?}");
    a.vm.reboot_and_wait(EXIT)
}

// ---------------------------------------------------------------- no guest needed

/// Before InstanceStart: bad configuration is refused with the reason and leaves the
/// previous configuration; runtime-only requests are refused; SIGTERM ends the VMM and
/// removes its socket.
pub fn api_preboot_rules() -> Result {
    let dir = TestDir::new("api-preboot")?;
    let mut a = ApiVm::start(&dir, &[])?;
    let api = &mut a.api;
    fault(
        api.put_machine_config(&MachineConfig {
            vcpu_count: 0,
            mem_size_mib: 128,
            ..Default::default()
        }),
        400,
        &["vcpu_count"],
    )?;
    fault(
        api.put_machine_config(&MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: Some(true),
            ..Default::default()
        }),
        400,
        &["smt", "not supported"],
    )?;
    let mc = api.machine_config().map_err(|e| e.to_string())?;
    ensure!(
        mc.vcpu_count == 1 && mc.mem_size_mib == 128,
        "a refused PUT changed machine-config: {mc:?}"
    );
    fault(
        api.put_boot_source(&BootSource {
            kernel_image_path: dir.join("no-kernel").display().to_string(),
            ..Default::default()
        }),
        400,
        &["no-kernel"],
    )?;
    fault(
        api.put_drive(&Drive {
            drive_id: "data".into(),
            path_on_host: Some(dir.join("no-image").display().to_string()),
            is_root_device: false,
            ..Default::default()
        }),
        400,
        &["no-image"],
    )?;
    fault(api.patch_vm(VmStateChange::Paused), 400, &["not started"])?;
    fault(
        api.action(ActionType::SendCtrlAltDel),
        400,
        &["not started"],
    )?;
    fault(api.action(ActionType::FlushMetrics), 400, &["metrics"])?;
    // No kernel configured: InstanceStart fails and the VMM stays usable.
    fault(api.action(ActionType::InstanceStart), 400, &["kernel"])?;
    let info = api.instance_info().map_err(|e| e.to_string())?;
    ensure!(
        info.state == "Not started",
        "after a failed InstanceStart: {info:?}"
    );
    let mode = std::fs::metadata(&a.sock)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    ensure!(
        mode & 0o777 == 0o600,
        "the API socket has mode {:o}, want 600",
        mode & 0o777
    );
    // SAFETY: kill(2) on the child's pid; touches no memory.
    unsafe {
        libc::kill(a.vm.pid(), libc::SIGTERM);
    }
    let st = a.vm.wait_exit(Duration::from_secs(20))?;
    ensure!(
        st.code() == Some(128 + libc::SIGTERM),
        "after SIGTERM skiff exited with {st}"
    );
    ensure!(!a.sock.exists(), "the API socket is left after SIGTERM");
    Ok(())
}

/// A stale socket file is replaced; a socket another process serves is refused; a path
/// that is not a socket is refused.
pub fn api_socket_handling() -> Result {
    let dir = TestDir::new("api-sock")?;
    let sock = dir.join("api.sock");
    {
        // A socket file nobody listens on any more.
        let l = std::os::unix::net::UnixListener::bind(&sock).map_err(|e| e.to_string())?;
        drop(l);
    }
    ensure!(
        std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket()),
        "could not leave a stale socket"
    );
    let mut first = ApiVm::start(&dir, &[])?;
    first
        .api
        .instance_info()
        .map_err(|e| format!("after replacing a stale socket: {e}"))?;
    // The same path again while the first skiff serves it.
    let s = sock.to_string_lossy().into_owned();
    let mut second = TestVm::start_args(&["--api-sock", &s])?;
    let st = second.wait_exit(Duration::from_secs(20))?;
    ensure!(
        st.code() == Some(1) && second.stderr_text().contains("in use"),
        "a second skiff on a live socket: {st}{}",
        second.diagnostics()
    );
    first
        .api
        .instance_info()
        .map_err(|e| format!("the first skiff stopped answering: {e}"))?;
    drop(first);
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").map_err(|e| e.to_string())?;
    let f = file.to_string_lossy().into_owned();
    let mut third = TestVm::start_args(&["--api-sock", &f])?;
    let st = third.wait_exit(Duration::from_secs(20))?;
    ensure!(
        st.code() == Some(1) && third.stderr_text().contains("not a socket"),
        "skiff on a regular file: {st}{}",
        third.diagnostics()
    );
    ensure!(
        file.exists(),
        "skiff removed a regular file at the socket path"
    );
    Ok(())
}

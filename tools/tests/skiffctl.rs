//! skiffctl against a real `skiff --api-sock` (no guest is booted: pre-boot endpoints, and
//! the post-boot ones only for their 400 answers). Needs `target/debug/skiff`:
//! `cargo build -p vmm --bin skiff` (or SKIFF_BIN=path).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const SKIFFCTL: &str = env!("CARGO_BIN_EXE_skiffctl");

/// `<target>/<profile>/skiff`, beside this test's `<target>/<profile>/deps/` directory.
fn skiff_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SKIFF_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in <target>/<profile>/deps");
    let skiff = profile_dir.join("skiff");
    assert!(
        skiff.is_file(),
        "{} is missing: build it first with `cargo build -p vmm --bin skiff` (same profile), \
         or set SKIFF_BIN",
        skiff.display()
    );
    skiff
}

/// A scratch directory and a skiff serving the API in it; both go away on drop.
struct Vmm {
    dir: PathBuf,
    sock: PathBuf,
    child: Child,
}

impl Vmm {
    fn start(name: &str) -> Vmm {
        let dir = std::env::temp_dir().join(format!("skiffctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let sock = dir.join("api.sock");
        let child = Command::new(skiff_binary())
            .arg("--api-sock")
            .arg(&sock)
            .args(["--console", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start skiff");
        let vmm = Vmm { dir, sock, child };
        let out = vmm.ctl(&["--timeout", "10", "wait-ready"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        vmm
    }

    fn ctl(&self, args: &[&str]) -> Output {
        ctl_env(args, Some(&self.sock))
    }

    /// Runs skiffctl, expects `code`, returns stdout.
    fn expect(&self, code: i32, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "skiffctl {args:?}: stdout {:?} stderr {:?}",
            text(&out.stdout),
            text(&out.stderr)
        );
        if code == 1 {
            let err = text(&out.stderr);
            assert!(err.starts_with("skiffctl: 4"), "skiffctl {args:?}: {err}");
        }
        text(&out.stdout)
    }

    fn file(&self, name: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, b"").expect("scratch file");
        p.to_str().expect("UTF-8 temp dir").to_owned()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs skiffctl with SKIFF_API_SOCK set to `sock` (or unset).
fn ctl_env(args: &[&str], sock: Option<&Path>) -> Output {
    let mut c = Command::new(SKIFFCTL);
    c.args(args).env_remove("SKIFF_API_SOCK");
    if let Some(s) = sock {
        c.env("SKIFF_API_SOCK", s);
    }
    c.stdin(Stdio::null()).output().expect("run skiffctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn every_pre_boot_subcommand() {
    let vmm = Vmm::start("all");
    let out = vmm.expect(0, &["info"]);
    assert!(out.starts_with("skiff: Not started (id "), "{out}");
    assert!(vmm.expect(0, &["version"]).starts_with("skiff "));
    let v: serde_json::Value =
        serde_json::from_str(&vmm.expect(0, &["--json", "version"])).unwrap();
    assert!(v["firecracker_version"].is_string(), "{v}");

    assert_eq!(
        vmm.expect(0, &["machine-config", "get"]),
        "1 vCPU, 128 MiB\n"
    );
    vmm.expect(
        0,
        &["machine-config", "set", "--vcpus", "2", "--mem-mib", "256"],
    );
    vmm.expect(0, &["machine-config", "patch", "--mem-mib", "384"]);
    assert_eq!(
        vmm.expect(0, &["machine-config", "get"]),
        "2 vCPUs, 384 MiB\n"
    );
    let j: serde_json::Value =
        serde_json::from_str(&vmm.expect(0, &["--json", "machine-config", "get"])).unwrap();
    assert_eq!(j, serde_json::json!({"vcpu_count": 2, "mem_size_mib": 384}));
    // A 400: a VM needs a vCPU.
    vmm.expect(
        1,
        &["machine-config", "set", "--vcpus", "0", "--mem-mib", "128"],
    );
    vmm.expect(1, &["machine-config", "patch", "--smt", "true"]);

    let kernel = vmm.file("vmlinux");
    vmm.expect(
        0,
        &["boot-source", "--kernel", &kernel, "--boot-args", "quiet"],
    );
    vmm.expect(1, &["boot-source", "--kernel", "/nonexistent/vmlinux"]);
    let image = vmm.file("root.img");
    vmm.expect(0, &["drive", "put", "rootfs", "--path", &image, "--root"]);
    vmm.expect(1, &["drive", "put", "data", "--path", "/nonexistent.img"]);
    vmm.expect(0, &["net", "put", "eth0", "--tap", "skiffctl0"]);
    vmm.expect(
        1,
        &["net", "put", "eth1", "--tap", "t", "--mac", "nonsense"],
    );

    let log = vmm.dir.join("skiff.log");
    let log = log.to_str().unwrap();
    vmm.expect(
        0,
        &["logger", "--path", log, "--level", "debug", "--show-level"],
    );
    vmm.expect(1, &["flush-metrics"]);
    let metrics = vmm.file("metrics.json");
    vmm.expect(0, &["metrics-file", "--path", &metrics]);
    vmm.expect(0, &["flush-metrics"]);
    assert!(!std::fs::read_to_string(&metrics).unwrap().is_empty());

    let config: serde_json::Value = serde_json::from_str(&vmm.expect(0, &["config"])).unwrap();
    assert_eq!(config["machine-config"]["mem_size_mib"], 384);
    assert_eq!(config["boot-source"]["boot_args"], "quiet");
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"],
        "skiffctl0"
    );

    let state = vmm.expect(0, &["state"]);
    assert!(
        state.starts_with("state: Not started, 2 vCPUs, 384 MiB, pid "),
        "{state}"
    );
    let devices = vmm.expect(0, &["devices"]);
    let lines: Vec<&str> = devices.lines().collect();
    assert!(lines[0].starts_with("ID "), "{devices}");
    assert!(lines.iter().any(|l| l.starts_with("rootfs ")), "{devices}");
    assert!(lines.iter().any(|l| l.starts_with("eth0 ")), "{devices}");
    let d: serde_json::Value =
        serde_json::from_str(&vmm.expect(0, &["--json", "devices"])).unwrap();
    assert_eq!(d["devices"].as_array().map(Vec::len), Some(2), "{d}");
    let metrics = vmm.expect(0, &["metrics"]);
    assert!(
        metrics.contains("skiff_vm_state{state=\"Not started\"} 1"),
        "{metrics}"
    );

    // Post-boot only: each answers 400 before InstanceStart.
    for args in [
        &["pause"][..],
        &["resume"],
        &["ctrl-alt-del"],
        &["drive", "patch", "rootfs", "--path", &image],
        &["net", "patch", "eth0"],
    ] {
        vmm.expect(1, args);
    }
    // Upgrades too, whatever the body: 400 (the routes exist, the VM does not run).
    for args in [
        &["upgrade", "rootfs"][..],
        &["upgrade", "eth0", "--binary", "/nonexistent/skiff-net"],
        &["upgrade", "--all"],
        &[
            "upgrade",
            "--all",
            "--blk-binary",
            "/b",
            "--net-binary",
            "/n",
        ],
        &["--json", "upgrade", "--all"],
    ] {
        let out = vmm.ctl(args);
        assert_eq!(out.status.code(), Some(1), "skiffctl {args:?}: {out:?}");
        let err = text(&out.stderr);
        assert!(
            err.starts_with("skiffctl: 400: "),
            "skiffctl {args:?}: {err}"
        );
        assert!(out.stdout.is_empty(), "skiffctl {args:?}: {out:?}");
    }
    // Writes print nothing with --json.
    assert_eq!(
        vmm.expect(0, &["--json", "machine-config", "patch", "--vcpus", "1"]),
        ""
    );

    // raw: body as received, exit 1 on an error status.
    let raw = vmm.expect(0, &["raw", "GET", "/skiff/vm"]);
    assert!(raw.contains("\"vcpus\":1"), "{raw}");
    vmm.expect(
        0,
        &[
            "raw",
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":128}"#,
        ],
    );
    let raw = vmm.expect(1, &["raw", "GET", "/no-such-endpoint"]);
    assert!(raw.contains("fault_message"), "{raw}");
    let out = vmm.ctl(&["raw", "GET", "/no-such-endpoint"]);
    assert!(text(&out.stderr).starts_with("skiffctl: 404: "), "{out:?}");
    vmm.expect(2, &["raw", "GET", "/a b"]);

    // InstanceStart with an empty kernel file fails to load it: 400, VM stays Not started.
    vmm.expect(1, &["start"]);
    assert!(vmm.expect(0, &["state"]).starts_with("state: Not started"));

    // Usage errors are 2 even with a live socket.
    vmm.expect(
        2,
        &["machine-config", "set", "--vcpus", "x", "--mem-mib", "1"],
    );
    vmm.expect(2, &["machine-config", "patch"]);
    vmm.expect(2, &["drive", "put", "d"]);
    vmm.expect(2, &["upgrade"]);
    vmm.expect(2, &["upgrade", "rootfs", "--all"]);
    vmm.expect(2, &["upgrade", "rootfs", "--net-binary", "/n"]);
    vmm.expect(2, &["no-such-command"]);
}

#[test]
fn exit_codes_without_a_vmm() {
    let missing = std::env::temp_dir().join("skiffctl-no-such-dir/api.sock");
    let out = ctl_env(&["info"], Some(&missing));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.starts_with("skiffctl: cannot connect to the API socket")
            && err.contains("skiffctl-no-such-dir"),
        "{err}"
    );
    let out = ctl_env(&["--timeout", "0.2", "wait-ready"], Some(&missing));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    // No socket given at all, or a bad timeout: usage.
    let out = ctl_env(&["info"], None);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("SKIFF_API_SOCK"), "{out:?}");
    let out = ctl_env(&["--timeout", "-1", "info"], Some(&missing));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = ctl_env(&["--help"], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("Exit status:"), "{out:?}");
}

#[test]
fn timeout_bounds_an_answer() {
    // A socket that accepts but never answers.
    let dir = std::env::temp_dir().join(format!("skiffctl-mute-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("mute.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let start = std::time::Instant::now();
    let out = ctl_env(&["--timeout", "0.3", "info"], Some(&sock));
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(listener);
    let _ = std::fs::remove_dir_all(&dir);
}

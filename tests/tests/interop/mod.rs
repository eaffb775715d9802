//! Interoperability with vhost-user programs skiff did not write (Debian's QEMU 7.2):
//! QEMU as the front end of `skiff-blk`, and `qemu-storage-daemon` as the backend of `skiff`.
//! Each boots the busybox guest from a root disk served over vhost-user, writes and reads a
//! file through it, and checks the image on the host afterwards (`e2fsck -fn`, `debugfs`).

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tests::{binary, ensure, host, Result, TestDir, TestVm, VmConfig, DEFAULT_BOOT_ARGS};

use super::{guest_sha256, last_line, vmlinux, BOOT, CMD, EXIT};

/// The file the guest writes on its root filesystem.
const GUEST_FILE: &str = "/root/interop.bin";
/// How long a backend may take to create its socket.
const SOCKET: Duration = Duration::from_secs(20);

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A vhost-user backend process the test started (skiff-blk, qemu-storage-daemon), stdout and
/// stderr in a log file. Dropping it kills it (SIGKILL) and reaps it if it is still running.
struct Backend {
    name: &'static str,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Backend {
    fn start(name: &'static str, program: &Path, args: &[&str], log: PathBuf) -> Result<Backend> {
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(Backend {
            name,
            child,
            log,
            status: None,
        })
    }

    /// The tail of its output, for failure messages.
    fn diagnostics(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!(
            "\n----- {} output (tail) -----\n{}\n-----",
            self.name,
            tail(&text, 3000)
        )
    }

    /// Appends [`Self::diagnostics`] to an error.
    fn explain<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| format!("{e}{}", self.diagnostics()))
    }

    fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|e| format!("waiting for {}: {e}", self.name))?;
        }
        Ok(self.status)
    }

    /// Waits until `sock` is a socket. Both backends bind and listen in one step, so a frontend
    /// can connect from then on; connecting to probe would use up skiff-blk's one connection.
    fn wait_socket(&mut self, sock: &Path) -> Result {
        let deadline = Instant::now() + SOCKET;
        loop {
            if std::fs::metadata(sock).is_ok_and(|m| m.file_type().is_socket()) {
                return Ok(());
            }
            if let Some(st) = self.try_status()? {
                return Err(format!(
                    "{} exited ({st}) before it listened on {}{}",
                    self.name,
                    sock.display(),
                    self.diagnostics()
                ));
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not create its socket {} within {SOCKET:?}{}",
                self.name,
                sock.display(),
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status()? {
                return Ok(st);
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}{}",
                self.name,
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits for it to exit.
    fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if self.try_status()?.is_none() {
            // SAFETY: kill(2) on our own unreaped child's pid (it cannot have been recycled);
            // no memory is touched.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
        }
        self.wait_exit(timeout)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `vm.wait_ready(BOOT)`, but fails at once (not after BOOT, and without the nested host's
/// never-reached-userspace retry) when the backend exits before the guest reaches userspace.
fn wait_ready_with(vm: &mut TestVm, backend: &mut Backend) -> Result {
    let deadline = Instant::now() + BOOT;
    while !vm.console_text().contains("GUEST-READY") && Instant::now() < deadline {
        if let Some(st) = backend.try_status()? {
            return Err(format!(
                "{} exited ({st}) before the guest reached userspace{}",
                backend.name,
                vm.diagnostics()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    vm.wait_ready(BOOT)
}

fn need(prog: &str, package: &str) -> Result<PathBuf> {
    host::which(prog).ok_or_else(|| format!("`{prog}` not found (apt-get install {package})"))
}

/// The guest sees the whole image as /dev/vda (the capacity came through vhost-user GET_CONFIG).
fn check_disk_size(vm: &mut TestVm, image: &Path) -> Result {
    let bytes = std::fs::metadata(image)
        .map_err(|e| format!("{}: {e}", image.display()))?
        .len();
    let out = vm.run_ok("cat /sys/block/vda/size", CMD)?;
    ensure!(
        last_line(&out) == (bytes / 512).to_string(),
        "/sys/block/vda/size is {out:?}, the image has {} sectors{}",
        bytes / 512,
        vm.diagnostics()
    );
    Ok(())
}

/// Writes 4 MiB of random data to [`GUEST_FILE`], syncs, drops the page cache and reads it back
/// from the disk; returns its sha256.
fn write_and_read_back(vm: &mut TestVm) -> Result<String> {
    let written = guest_sha256(
        vm,
        &format!("head -c 4194304 /dev/urandom > {GUEST_FILE} && sync && sha256sum {GUEST_FILE}"),
        CMD,
    )?;
    let read = guest_sha256(
        vm,
        &format!("echo 3 > /proc/sys/vm/drop_caches && sha256sum {GUEST_FILE}"),
        CMD,
    )?;
    ensure!(
        read == written,
        "{GUEST_FILE} read back from the disk has sha256 {read}, written {written}{}",
        vm.diagnostics()
    );
    Ok(written)
}

/// Remounts the root read-only (ext4 checkpoints its journal, so the image is clean for the
/// host's checks), then `reboot -f`; the VMM must exit 0.
fn remount_ro_and_reboot(vm: &mut TestVm) -> Result {
    vm.run_ok("sync && mount -o remount,ro /", CMD)?;
    vm.reboot_and_wait(EXIT)
}

/// On the host, after the VM is gone: `e2fsck -fn` finds the image clean and [`GUEST_FILE`]
/// in it (read with debugfs) has sha256 `want`.
fn check_image(dir: &TestDir, image: &Path, want: &str) -> Result {
    let e2fsck = need("e2fsck", "e2fsprogs")?;
    let out = Command::new(&e2fsck)
        .arg("-fn")
        .arg(image)
        .output()
        .map_err(|e| format!("cannot run e2fsck: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success() && !text.contains("Fix? no"),
        "e2fsck -fn {} ({}) finds the file system damaged:\n{text}",
        image.display(),
        out.status
    );
    let debugfs = need("debugfs", "e2fsprogs")?;
    let copy = dir.join("interop.bin.host");
    let out = Command::new(&debugfs)
        .arg("-R")
        .arg(format!("dump {GUEST_FILE} {}", copy.display()))
        .arg(image)
        .output()
        .map_err(|e| format!("cannot run debugfs: {e}"))?;
    ensure!(
        out.status.success() && copy.is_file(),
        "debugfs could not dump {GUEST_FILE} from {} ({}): {}",
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got = host::sha256_file(&copy, 0, None)?;
    ensure!(
        got == want,
        "{GUEST_FILE} in the image on the host has sha256 {got}, the guest wrote {want}"
    );
    Ok(())
}

/// QEMU (microvm, virtio-mmio, KVM) boots the guest from a root disk served by `skiff-blk`:
/// skiff-blk must work with a front end it was not written with, and exit 0 when QEMU leaves.
///
/// `--queue-size 1024`: QEMU's virtio-mmio transport reports QueueNumMax = 1024
/// (VIRTQUEUE_MAX_SIZE) whatever the device's `queue-size` property says, so Linux sets up
/// 1024-entry rings and QEMU passes that size on in SET_VRING_NUM; skiff-blk's default maximum
/// (256) refuses it ("requested queue size 1024 out of range") and QEMU then hangs the guest.
pub fn interop_qemu_boots_from_skiff_blk() -> Result {
    let qemu = need("qemu-system-x86_64", "qemu-system-x86")?;
    let dir = TestDir::new("qemu-skiff-blk")?;
    let root = dir.copy_rootfs()?;
    let sock = dir.join("blk.sock");
    let mut blk = Backend::start(
        "skiff-blk",
        &binary("skiff-blk")?,
        &[
            "--socket",
            &sock.to_string_lossy(),
            "--image",
            &root.to_string_lossy(),
            "--queue-size",
            "1024",
        ],
        dir.join("skiff-blk.log"),
    )?;
    blk.wait_socket(&sock)?;

    // skiff's boot arguments, with a triple-fault reboot (microvm has no i8042 to reset through).
    let append = format!(
        "{} pci=off root=/dev/vda rw",
        DEFAULT_BOOT_ARGS.replace("reboot=k", "reboot=t")
    );
    let mut cmd = Command::new(&qemu);
    cmd.args(["-M", "microvm,acpi=off,memory-backend=mem"])
        .args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-smp", "1"])
        // vhost-user needs guest RAM in a shared fd the backend can map.
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .arg("-chardev")
        .arg(format!("socket,id=blk0,path={}", sock.display()))
        .args(["-device", "vhost-user-blk,chardev=blk0,num-queues=1"])
        .arg("-kernel")
        .arg(vmlinux()?)
        .args(["-append", &append])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        // The guest's reboot ends QEMU (exit 0), as it ends skiff.
        .arg("-no-reboot");
    let mut vm = TestVm::spawn("qemu-system-x86_64", cmd)?;

    let sum = (|| -> Result<String> {
        wait_ready_with(&mut vm, &mut blk)?;
        check_disk_size(&mut vm, &root)?;
        let sum = write_and_read_back(&mut vm)?;
        remount_ro_and_reboot(&mut vm)?;
        Ok(sum)
    })();
    let sum = blk.explain(sum)?;
    drop(vm);

    let st = blk.wait_exit(EXIT)?;
    ensure!(
        st.code() == Some(0),
        "skiff-blk exited with {st} after QEMU disconnected, want 0{}",
        blk.diagnostics()
    );
    check_image(&dir, &root, &sum)
}

/// skiff boots the guest from a root disk served by qemu-storage-daemon's vhost-user-blk
/// export (a drive with `"socket"`), twice against the same export: qemu-storage-daemon takes
/// a new front end after the first disconnects, and the second boot reads what the first wrote.
pub fn interop_skiff_boots_from_qemu_storage_daemon() -> Result {
    let qsd_bin = need("qemu-storage-daemon", "qemu-system-common")?;
    let dir = TestDir::new("skiff-qsd")?;
    let root = dir.copy_rootfs()?;
    let sock = dir.join("qsd.sock");
    let (root_s, sock_s) = (root.to_string_lossy(), sock.to_string_lossy());
    ensure!(
        !root_s.contains(',') && !sock_s.contains(','),
        "qemu-storage-daemon options cannot hold a path with a comma: {root_s}, {sock_s}"
    );
    let mut qsd = Backend::start(
        "qemu-storage-daemon",
        &qsd_bin,
        &[
            "--blockdev",
            &format!("driver=file,node-name=file0,filename={root_s}"),
            "--blockdev",
            "driver=raw,node-name=disk0,file=file0",
            "--export",
            &format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock_s},writable=on"
            ),
        ],
        dir.join("qsd.log"),
    )?;
    qsd.wait_socket(&sock)?;

    let mut json = VmConfig::new(vmlinux()?, &root).to_json();
    json["drives"] = json!([{ "drive_id": "rootfs", "socket": sock, "is_root_device": true }]);

    let mut sum = String::new();
    for round in 1..=2 {
        let dir_s = dir.path.to_string_lossy().into_owned();
        let mut vm = TestVm::start_json(&json, &dir)?;
        let r = (|| -> Result {
            wait_ready_with(&mut vm, &mut qsd)?;
            check_disk_size(&mut vm, &root)?;
            if round == 1 {
                sum = write_and_read_back(&mut vm)?;
            } else {
                let again = guest_sha256(&mut vm, &format!("sha256sum {GUEST_FILE}"), CMD)?;
                ensure!(
                    again == sum,
                    "boot 2: {GUEST_FILE} has sha256 {again}, boot 1 wrote {sum}{}",
                    vm.diagnostics()
                );
            }
            remount_ro_and_reboot(&mut vm)?;
            let left = vm.leftover_device_processes(&[&dir_s]);
            ensure!(
                left.is_empty(),
                "device processes left after the guest rebooted: {left:?}"
            );
            Ok(())
        })();
        qsd.explain(r.map_err(|e| format!("boot {round}: {e}")))?;
        drop(vm);
        ensure!(
            qsd.try_status()?.is_none(),
            "qemu-storage-daemon exited ({:?}) when skiff disconnected (boot {round}){}",
            qsd.status,
            qsd.diagnostics()
        );
    }

    let st = qsd.terminate(EXIT)?;
    ensure!(
        st.code() == Some(0),
        "qemu-storage-daemon exited with {st} on SIGTERM, want 0{}",
        qsd.diagnostics()
    );
    check_image(&dir, &root, &sum)
}

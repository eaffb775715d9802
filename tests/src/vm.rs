//! `TestVm`: one `skiff` process with its serial console on pipes.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{artifacts, host, Result};

/// The harness's kernel command line base: skiff's default (docs/CONTRACTS.md) with `nomodule`
/// and `loglevel=4`. A config file's `boot_args` replaces skiff's, so the harness always writes
/// its own out in full.
///
/// `loglevel=4` (the kernel's `quiet` level): errors and worse reach the console (a panic, a
/// soft lockup's first line); the rest stays in the guest's log buffer, where `dmesg` reads
/// it. Every console byte is a port write that exits to skiff, and in the nested test host
/// each exit is emulated by TCG: with the full boot log a 1-2 vCPU boot to userspace took
/// 26-38 s there, with `quiet` 8.6-17 s (8 boots each, one nested host after the other,
/// 2026-12-07), most of what the guest tests' boots cost in CI. Level 5 was tried: it also
/// prints the nested host's XSAVE warning with its stack and a CPUID dump, about 50 lines on
/// every boot there.
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 nomodule 8250.nr_uarts=1 \
                                     i8042.noaux i8042.nomux i8042.dumbkbd loglevel=4";

/// An extra data drive (/dev/vdb, /dev/vdc, ... in order).
#[derive(Debug, Clone)]
pub struct DriveSpec {
    pub path: PathBuf,
    pub read_only: bool,
    /// `io_engine: Async` (skiff-blk through io_uring).
    pub io_uring: bool,
}

/// A network interface backed by a TAP device.
#[derive(Debug, Clone)]
pub struct NetSpec {
    pub tap: String,
    pub mac: Option<String>,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    /// Root drive (/dev/vda); `None` boots without one (initrd only).
    pub rootfs: Option<PathBuf>,
    pub rootfs_read_only: bool,
    pub initrd: Option<PathBuf>,
    pub vcpus: u32,
    pub mem_mib: u64,
    /// Guest RAM on 2 MiB huge pages (`huge_pages: "2M"`).
    pub huge_pages: bool,
    /// Parameters appended to [`DEFAULT_BOOT_ARGS`].
    pub extra_cmdline: String,
    pub drives: Vec<DriveSpec>,
    pub nets: Vec<NetSpec>,
}

impl VmConfig {
    /// 1 vCPU, 256 MiB, the given kernel and root drive.
    pub fn new(kernel: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: kernel.into(),
            rootfs: Some(rootfs.into()),
            rootfs_read_only: false,
            initrd: None,
            vcpus: 1,
            mem_mib: 256,
            huge_pages: false,
            extra_cmdline: String::new(),
            drives: Vec::new(),
            nets: Vec::new(),
        }
    }

    /// The Firecracker-format config file (`boot-source`, `machine-config`, `drives`, `network-interfaces`).
    pub fn to_json(&self) -> Value {
        let args = format!("{DEFAULT_BOOT_ARGS} {}", self.extra_cmdline.trim());
        let mut boot = json!({ "kernel_image_path": self.kernel, "boot_args": args.trim_end() });
        if let Some(initrd) = &self.initrd {
            boot["initrd_path"] = json!(initrd);
        }
        let mut drives = Vec::new();
        if let Some(root) = &self.rootfs {
            drives.push(json!({
                "drive_id": "rootfs", "path_on_host": root,
                "is_root_device": true, "is_read_only": self.rootfs_read_only,
            }));
        }
        for (i, d) in self.drives.iter().enumerate() {
            drives.push(json!({
                "drive_id": format!("data{i}"), "path_on_host": d.path,
                "is_root_device": false, "is_read_only": d.read_only,
                "io_engine": if d.io_uring { "Async" } else { "Sync" },
            }));
        }
        let nets: Vec<Value> = self
            .nets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut v = json!({ "iface_id": format!("eth{i}"), "host_dev_name": n.tap });
                if let Some(mac) = &n.mac {
                    v["guest_mac"] = json!(mac);
                }
                v
            })
            .collect();
        json!({
            "boot-source": boot,
            "machine-config": {
                "vcpu_count": self.vcpus,
                "mem_size_mib": self.mem_mib,
                "smt": false,
                "huge_pages": if self.huge_pages { "2M" } else { "None" },
            },
            "drives": drives,
            "network-interfaces": nets,
        })
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A per-test scratch directory under the system temp dir, removed on drop (kept when
/// `SKIFF_KEEP_TMP=1`). Guest images are copied here because rw mounts change them.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> Result<TestDir> {
        let safe: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = std::env::temp_dir().join(format!(
            "skiff-test-{}-{}-{safe}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TestDir { path })
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// A private, writable copy of the pristine busybox root filesystem.
    pub fn copy_rootfs(&self) -> Result<PathBuf> {
        let src = artifacts::guest_artifacts()?.rootfs();
        let dst = self.join("rootfs.ext4");
        std::fs::copy(&src, &dst)
            .map_err(|e| format!("copy {} → {}: {e}", src.display(), dst.display()))?;
        let mut perms = std::fs::metadata(&dst)
            .map_err(|e| e.to_string())?
            .permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&dst, perms).map_err(|e| e.to_string())?;
        Ok(dst)
    }

    /// A private, writable copy of the bench root filesystem (busybox, fio, iperf3).
    pub fn bench_rootfs(&self) -> Result<PathBuf> {
        let src = artifacts::guest_artifacts()?.bench_rootfs_zst();
        self.unzstd(&src, "rootfs-bench.ext4")
    }

    /// A private copy of the Debian image's root filesystem (decompressed, sparse).
    pub fn debian_rootfs(&self) -> Result<PathBuf> {
        let src = artifacts::debian_artifacts()?.rootfs_zst();
        self.unzstd(&src, "debian.ext4")
    }

    fn unzstd(&self, src: &Path, name: &str) -> Result<PathBuf> {
        let dst = self.join(name);
        let out = Command::new("zstd")
            .args(["-q", "-d", "-f", "--long=27", "-o"])
            .arg(&dst)
            .arg(src)
            .output()
            .map_err(|e| format!("cannot run zstd (apt-get install zstd): {e}"))?;
        crate::ensure!(
            out.status.success(),
            "zstd -d {} failed: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(dst)
    }

    /// A sparse file of exactly `size` bytes.
    pub fn sparse_image(&self, name: &str, size: u64) -> Result<PathBuf> {
        let p = self.join(name);
        let f = std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        f.set_len(size)
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    }

    /// The standard config: `kernel`, a fresh copy of the rootfs, 1 vCPU, 256 MiB.
    pub fn config(&self, kernel: &Path) -> Result<VmConfig> {
        Ok(VmConfig::new(kernel, self.copy_rootfs()?))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("SKIFF_KEEP_TMP").is_none_or(|v| v != "1") {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// How long a booting guest's console may stay silent before the boot is given up as
/// stalled ([`TestVm::wait_ready`]). With the harness's `loglevel=4` a good boot prints
/// nothing before its init's `GUEST-READY` (in the nested test host 8.6-17 s after start for
/// 1-2 vCPUs); a stalled one used to hold a test for the whole boot limit (60 s) before its
/// retry.
const BOOT_SILENCE: Duration = Duration::from_secs(40);

/// How skiff reports a guest that triple-faulted (the nested test host's known fault).
pub const TRIPLE_FAULT: &str = "triple fault (KVM_EXIT_SHUTDOWN)";

/// Triple faults any VMM's stderr has reported so far in this process: the runner tells a
/// test that failed because its guest triple-faulted (and skiff then ended, so an API call
/// found no socket) from one that failed on its own ([`triple_faults_seen`]).
static TRIPLE_FAULTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many triple faults VMMs have reported on stderr so far.
pub fn triple_faults_seen() -> u64 {
    TRIPLE_FAULTS.load(Ordering::Relaxed)
}

/// How long a VMM that got SIGKILL may take to go ([`TestVm`]'s drop).
const REAP: Duration = Duration::from_secs(20);

/// VMMs that SIGKILL did not end within [`REAP`]: a process the kernel holds (seen in the
/// nested test host, whose KVM runs on TCG's emulation of AMD-V). Waiting for one without a
/// bound held a test past its limit, and the runner with it ([`unkillable_seen`]).
static UNKILLABLE: AtomicU64 = AtomicU64::new(0);

/// How many VMMs so far did not end after SIGKILL.
pub fn unkillable_seen() -> u64 {
    UNKILLABLE.load(Ordering::Relaxed)
}

/// Bytes read from one of skiff's pipes, shared with the reader thread.
struct Stream {
    state: Mutex<(Vec<u8>, bool)>, // (bytes, closed)
    cv: Condvar,
}

impl Stream {
    /// `watch`: count the [`TRIPLE_FAULT`] reports that arrive (a VMM's stderr).
    fn spawn(
        mut src: impl Read + Send + 'static,
        echo: Option<&'static str>,
        watch: bool,
    ) -> Arc<Stream> {
        let s = Arc::new(Stream {
            state: Mutex::new((Vec::new(), false)),
            cv: Condvar::new(),
        });
        let s2 = Arc::clone(&s);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = match src.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                if n > 0 && echo.is_some() {
                    let mut e = std::io::stderr().lock();
                    let _ = e.write_all(&buf[..n]);
                }
                let mut st = s2.state.lock().unwrap_or_else(|p| p.into_inner());
                if n == 0 {
                    st.1 = true;
                } else {
                    let from = st.0.len().saturating_sub(TRIPLE_FAULT.len() - 1);
                    st.0.extend_from_slice(&buf[..n]);
                    if watch && find_bytes(&st.0[from..], TRIPLE_FAULT.as_bytes()).is_some() {
                        TRIPLE_FAULTS.fetch_add(1, Ordering::Relaxed);
                    }
                }
                s2.cv.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        s
    }

    /// How many bytes have arrived so far.
    fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }

    /// Whether the pipe has reached its end (the process exited).
    fn closed(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    fn text(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&st.0).replace('\r', "")
    }

    /// Waits until `find(bytes[from..])` returns Some, giving its absolute result.
    fn wait<T>(
        &self,
        timeout: Duration,
        from: usize,
        mut find: impl FnMut(&[u8]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = find(st.0.get(from..).unwrap_or(&[])) {
                return Some(r);
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                return None;
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Every [`TestVm`] alive, so that the runner can show what a hung test's guests printed
/// last ([`live_vm_diagnostics`]).
struct LiveVm {
    pid: i32,
    program: String,
    console: Weak<Stream>,
    stderr: Weak<Stream>,
}

static LIVE_VMS: Mutex<Vec<LiveVm>> = Mutex::new(Vec::new());

/// The console and stderr tails of every VMM the tests have running now.
pub fn live_vm_diagnostics() -> String {
    let live = LIVE_VMS.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = String::new();
    for vm in live.iter() {
        let text = |w: &Weak<Stream>| w.upgrade().map(|s| s.text()).unwrap_or_default();
        s += &format!(
            "----- {} (pid {}) console (tail) -----\n{}\n----- {} (pid {}) stderr (tail) -----\n{}\n",
            vm.program,
            vm.pid,
            tail(&text(&vm.console), 3000),
            vm.program,
            vm.pid,
            tail(&text(&vm.stderr), 3000)
        );
    }
    s
}

/// A command typed at the guest's shell by [`TestVm::start_command`], not yet collected.
#[must_use = "collect the command's output with TestVm::finish_command"]
pub struct PendingCommand {
    cmd: String,
    tok: String,
    from: usize,
}

/// A running (or exited) `skiff`. Dropping it kills skiff's whole process group (device processes too).
/// [`TestVm::spawn`] runs another VMM (QEMU) the same way: guest console on stdin/stdout.
pub struct TestVm {
    /// What the messages call the process ("skiff", "qemu-system-x86_64").
    program: String,
    child: Child,
    stdin: Option<ChildStdin>,
    console: Arc<Stream>,
    stderr: Arc<Stream>,
    cursor: usize,
    status: Option<ExitStatus>,
    token: u64,
    /// Where the VMM's pid is written when it is not the process started (skiff-jailer's
    /// `skiff.pid`, which follows a VMM upgrade): the vCPU threads the diagnostics look at.
    vmm_pid_file: Option<PathBuf>,
}

impl TestVm {
    /// Writes `cfg` as `DIR/vm.json` and starts `skiff --no-api --config-file DIR/vm.json`.
    pub fn start(cfg: &VmConfig, dir: &TestDir) -> Result<TestVm> {
        Self::start_json(&cfg.to_json(), dir)
    }

    /// Starts skiff with an arbitrary config file body (for malformed-config tests).
    pub fn start_json(cfg: &Value, dir: &TestDir) -> Result<TestVm> {
        let file = dir.join("vm.json");
        let body = serde_json::to_string_pretty(cfg).map_err(|e| e.to_string())?;
        std::fs::write(&file, body).map_err(|e| format!("{}: {e}", file.display()))?;
        let file = file.to_string_lossy().into_owned();
        Self::start_args(&["--no-api", "--config-file", &file])
    }

    /// Starts skiff with raw command-line arguments.
    pub fn start_args(args: &[&str]) -> Result<TestVm> {
        let skiff = artifacts::binary("skiff")?;
        // The device binaries must be next to skiff: name the missing one rather than let skiff fail.
        artifacts::binary("skiff-blk")?;
        artifacts::binary("skiff-net")?;
        let mut cmd = Command::new(&skiff);
        cmd.args(args);
        Self::spawn("skiff", cmd)
    }

    /// Starts any VMM whose guest serial console is its stdin/stdout (e.g. QEMU with
    /// `-serial stdio`) in its own process group; `program` names it in messages.
    pub fn spawn(program: &str, mut cmd: Command) -> Result<TestVm> {
        let verbose = std::env::var_os("SKIFF_TEST_VERBOSE").is_some_and(|v| v == "1");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", cmd.get_program().to_string_lossy()))?;
        let out = child.stdout.take().ok_or("no stdout pipe")?;
        let err = child.stderr.take().ok_or("no stderr pipe")?;
        let console = Stream::spawn(out, verbose.then_some("console"), false);
        let stderr = Stream::spawn(err, verbose.then_some("stderr"), true);
        LIVE_VMS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(LiveVm {
                pid: child.id() as i32,
                program: program.to_string(),
                console: Arc::downgrade(&console),
                stderr: Arc::downgrade(&stderr),
            });
        Ok(TestVm {
            program: program.to_string(),
            stdin: child.stdin.take(),
            console,
            stderr,
            child,
            cursor: 0,
            status: None,
            token: u64::from(std::process::id()) << 20,
            vmm_pid_file: None,
        })
    }

    /// skiff's pid, which is also the process group of its device processes.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Makes the diagnostics look at the vCPU threads of the pid written in `path` (a VMM
    /// started by skiff-jailer) instead of the process started.
    pub fn watch_vmm_pid_file(&mut self, path: &Path) {
        self.vmm_pid_file = Some(path.to_path_buf());
    }

    /// The process whose threads are the vCPUs: the pid in the watched pid file, if it
    /// reads, else the process started.
    fn vcpu_pid(&self) -> i32 {
        self.vmm_pid_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| self.pid())
    }

    /// Everything the guest printed so far (CRs removed).
    pub fn console_text(&self) -> String {
        self.console.text()
    }

    /// skiff's stderr so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.text()
    }

    /// The last lines of console and stderr, for failure messages.
    pub fn diagnostics(&self) -> String {
        let console = self.console_text();
        // The guest's init prints this when its console shell ends, then reboots.
        let shell = if console.contains("shell exited; rebooting") {
            "\nThe guest's console shell exited (its init then rebooted the guest)."
        } else {
            ""
        };
        // A VMM still running: are its vCPUs busy, halted or blocked? (A stalled guest
        // whose vCPUs sit in KVM_RUN without using CPU waits for an interrupt; one whose
        // vCPU runs flat out while its console stays silent spins, as the nested test
        // host's guests do when they stall.)
        let (activity, spins) = if self.console.closed() {
            (String::new(), false)
        } else {
            let printed = self.console.len();
            let (text, busiest_ms) =
                crate::hang::thread_activity(self.vcpu_pid(), Duration::from_secs(1));
            (text, busiest_ms >= 900 && self.console.len() == printed)
        };
        let spins = if spins {
            format!(
                "\n{}: a vCPU ran flat out for a second while the console stayed silent",
                crate::runner::GUEST_SPINS
            )
        } else {
            String::new()
        };
        format!(
            "{shell}\n----- console (tail) -----\n{}\n----- {} stderr (tail) -----\n{}\n-----{activity}{spins}",
            tail(&console, 3000),
            self.program,
            tail(&self.stderr_text(), 3000)
        )
    }

    /// For a guest whose command did not finish: if every thread of skiff is idle (the
    /// vCPUs halted, waiting for an interrupt) and the console silent, sends a newline
    /// (an RX interrupt, whose handler also restarts transmission) and reports whether the
    /// guest printed again. A guest that wakes had lost an interrupt; one that stays silent
    /// waits for something else. Seen once in the nested host (2 vCPUs, output stopped
    /// after `cat /proc/meminfo`); this is the evidence for the next time.
    fn nudge_idle_guest(&mut self) -> String {
        if self.console.closed() {
            return String::new();
        }
        let printed = self.console.len();
        let (_, busiest_ms) = crate::hang::thread_activity(self.vcpu_pid(), Duration::from_secs(1));
        if busiest_ms > 50 || self.console.len() != printed {
            return String::new();
        }
        if self.send("\n").is_err() {
            return String::new();
        }
        std::thread::sleep(Duration::from_secs(3));
        let more = self.console.len().saturating_sub(printed);
        // The newline's own echo is one or two bytes.
        if more > 2 {
            let text = self.console_text();
            // A guest of a peer VMM (QEMU) lost an interrupt of the peer's own devices: that
            // is the nested host's fault or the peer's, never skiff's, and the runner may run
            // the test again. A skiff guest's lost interrupt stays a failure (it may be ours).
            let peer = if self.program.starts_with("skiff") {
                String::new()
            } else {
                format!("\n{}", crate::runner::PEER_LOST_INTERRUPT)
            };
            format!(
                "\nNUDGE: the guest was idle (no thread of {} used CPU for a second, console \
                 silent); a newline on its console made it print {more} bytes again (an \
                 interrupt had been lost):\n{}{peer}",
                self.program,
                tail(&text, 400)
            )
        } else {
            format!(
                "\nNUDGE: the guest was idle (no thread of {} used CPU for a second, console \
                 silent) and a newline on its console did not wake it",
                self.program
            )
        }
    }

    /// Waits for `pat` on the console after the previous match; fails on timeout or when skiff exits.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> Result {
        self.wait_for_unless_silent(pat, timeout, Duration::MAX)
    }

    /// [`TestVm::wait_for`], but gives up as soon as the console has printed nothing for
    /// `silence`: a booting guest prints all along, and one that went quiet has stalled (the
    /// nested test host's guests do), so its retry need not wait for the whole `timeout`.
    pub fn wait_for_unless_silent(
        &mut self,
        pat: &str,
        timeout: Duration,
        silence: Duration,
    ) -> Result {
        let from = self.cursor;
        let begun = Instant::now();
        let deadline = begun + timeout;
        let (mut seen, mut quiet_since) = (self.console.len(), begun);
        // The console is looked at each second: for silence, and for a soft lockup in what
        // arrived since the last look.
        let slice = Duration::from_secs(1);
        const LOCKUP: &[u8] = b"BUG: soft lockup";
        let mut unscanned = from;
        loop {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(slice);
            if let Some(pos) = self
                .console
                .wait(wait, from, |b| find_bytes(b, pat.as_bytes()))
            {
                self.cursor = from + pos + pat.len();
                return Ok(());
            }
            let now = Instant::now();
            let len = self.console.len();
            if len != seen {
                (seen, quiet_since) = (len, now);
            }
            let quiet = now - quiet_since;
            let locked = self
                .console
                .wait(Duration::ZERO, unscanned, |b| find_bytes(b, LOCKUP))
                .is_some();
            // A report split across two looks is found by the next one.
            unscanned = len.saturating_sub(LOCKUP.len() - 1).max(from);
            let within = if locked {
                format!(
                    "{:?}: {} (\"BUG: soft lockup\" on the console)",
                    now - begun,
                    crate::runner::SOFT_LOCKUP
                )
            } else if self.console.closed() || now >= deadline {
                format!("{timeout:?}")
            } else if quiet >= silence {
                format!(
                    "{:?}: the console stayed silent for {} s",
                    now - begun,
                    quiet.as_secs()
                )
            } else {
                continue;
            };
            return Err(format!(
                "{pat:?} did not appear on the console within {within}{}",
                self.diagnostics()
            ));
        }
    }

    /// Waits for the guest's `GUEST-READY` line and its shell, then turns off kernel console
    /// messages so command output is only what commands print.
    ///
    /// The tty's echo stays on. With echo off, busybox ash (1.35) reads commands with plain
    /// `fgets`; a background job that ends while the shell waits at the prompt interrupts that
    /// read (SIGCHLD, EINTR), ash takes it for the end of its input and exits, and the guest's
    /// init reboots. The echoed command line never matches the XBEG/XEND markers [`TestVm::run`]
    /// looks for (it holds `XBEG%s`, not the token), so it is not part of any output.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result {
        self.wait_for_unless_silent("GUEST-READY", timeout, BOOT_SILENCE)?;
        self.wait_for("guest:", timeout)?;
        let (_, code) = self.run("dmesg -n 1", Duration::from_secs(60))?;
        crate::ensure!(
            code == 0,
            "dmesg -n 1 in the guest failed ({code}){}",
            self.diagnostics()
        );
        Ok(())
    }

    /// Types raw text on the guest console, a little at a time so a small UART FIFO keeps up.
    pub fn send(&mut self, text: &str) -> Result {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{}'s stdin is closed", self.program))?;
        for chunk in text.as_bytes().chunks(32) {
            stdin
                .write_all(chunk)
                .and_then(|()| stdin.flush())
                .map_err(|e| format!("console write: {e}"))?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Runs a shell command line in the guest: returns its output and exit code.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<(String, i32)> {
        let pending = self.start_command(cmd)?;
        self.finish_command(pending, timeout)
    }

    /// Types a command line at the guest's shell and returns at once; the command runs in
    /// the shell's foreground while the test does host-side work, and
    /// [`TestVm::finish_command`] collects its output. Nothing else may be typed meanwhile:
    /// the tty would echo it into the command's output.
    pub fn start_command(&mut self, cmd: &str) -> Result<PendingCommand> {
        let cmd = cmd.trim();
        self.token += 1;
        let tok = format!("{:x}", self.token);
        let sep = if cmd.ends_with('&') { "" } else { ";" };
        self.send(&format!(
            "printf 'XBEG%s\\n' {tok}; {cmd}{sep} printf 'XEND%s:%d\\n' {tok} $?\n"
        ))?;
        Ok(PendingCommand {
            cmd: cmd.to_string(),
            tok,
            from: self.cursor,
        })
    }

    /// Waits up to `timeout` for a command from [`TestVm::start_command`] to end; returns
    /// its output and exit code.
    pub fn finish_command(
        &mut self,
        pending: PendingCommand,
        timeout: Duration,
    ) -> Result<(String, i32)> {
        let PendingCommand { cmd, tok, from } = pending;
        let begin = format!("XBEG{tok}");
        let end = format!("XEND{tok}:");
        let found = self.console.wait(timeout, from, |b| {
            let s = find_bytes(b, begin.as_bytes())?;
            let nl = s + find_bytes(&b[s..], b"\n")? + 1;
            let e = nl + find_bytes(&b[nl..], end.as_bytes())?;
            let digits_at = e + end.len();
            let len = b[digits_at..]
                .iter()
                .position(|c| !(c.is_ascii_digit() || *c == b'-'))?;
            let code: i32 = std::str::from_utf8(&b[digits_at..digits_at + len])
                .ok()?
                .parse()
                .ok()?;
            Some((
                String::from_utf8_lossy(&b[nl..e]).replace('\r', ""),
                code,
                digits_at + len,
            ))
        });
        match found {
            Some((out, code, stop)) => {
                self.cursor = from + stop;
                Ok((out, code))
            }
            None => {
                let how = if self.console.closed() {
                    format!("did not finish: {} exited", self.program)
                } else {
                    format!("did not finish within {timeout:?}")
                };
                let diagnostics = self.diagnostics();
                Err(format!(
                    "guest command {cmd:?} {how}{diagnostics}{}",
                    self.nudge_idle_guest()
                ))
            }
        }
    }

    /// Runs a command that must succeed; returns its output.
    pub fn run_ok(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let (out, code) = self.run(cmd, timeout)?;
        crate::ensure!(
            code == 0,
            "guest command {cmd:?} exited {code}; output:\n{out}{}",
            self.diagnostics()
        );
        Ok(out)
    }

    /// `reboot -f` in the guest (the rootfs's init is a shell script, so a plain `reboot`, which only
    /// signals PID 1, does nothing), then waits for skiff to exit 0.
    pub fn reboot_and_wait(&mut self, timeout: Duration) -> Result {
        self.send("reboot -f\n")?;
        let st = self.wait_exit(timeout)?;
        crate::ensure!(
            st.code() == Some(0),
            "after guest reboot {} exited with {st}, want 0{}",
            self.program,
            self.diagnostics()
        );
        Ok(())
    }

    /// Waits for skiff to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.status = Some(st);
                    // Let the reader threads take the last bytes (they end at EOF).
                    self.console
                        .wait(Duration::from_secs(2), usize::MAX, |_| None::<()>);
                    self.stderr
                        .wait(Duration::from_secs(2), usize::MAX, |_| None::<()>);
                    return Ok(st);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    return Err(format!(
                        "{} did not exit within {timeout:?}{}",
                        self.program,
                        self.diagnostics()
                    ))
                }
                Err(e) => return Err(format!("waiting for {}: {e}", self.program)),
            }
        }
    }

    /// skiff's device processes still alive (same process group, or naming one of `needles`).
    pub fn leftover_device_processes(&self, needles: &[&str]) -> Vec<host::ProcInfo> {
        host::leftover_device_processes(Some(self.pid()), needles, Duration::from_secs(3))
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        LIVE_VMS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|v| v.pid != self.pid());
        // SAFETY: kill(2) with a negative pid signals the process group skiff leads (process_group(0));
        // it touches no memory.
        unsafe {
            libc::kill(-self.pid(), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let deadline = Instant::now() + REAP;
        loop {
            match self.child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => break,
                Ok(Some(_)) | Err(_) => return,
            }
        }
        UNKILLABLE.fetch_add(1, Ordering::Relaxed);
        let pid = self.pid();
        let state = host::read_stat(&format!("/proc/{pid}/stat")).map_or('?', |s| s.state);
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        eprintln!(
            "UNKILLABLE: {} (pid {pid}) did not end within {} s of SIGKILL (state {state}, \
             wchan {wchan}): the kernel holds it; left behind",
            self.program,
            REAP.as_secs()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report split across two reads counts once; other text does not count.
    #[test]
    fn triple_fault_reports_are_counted_across_reads() {
        let (r, mut w) = std::io::pipe().unwrap();
        let before = triple_faults_seen();
        let s = Stream::spawn(r, None, true);
        let (a, b) = TRIPLE_FAULT.split_at(10);
        w.write_all(format!("skiff: INFO guest rebooted (vCPU 0: {a}").as_bytes())
            .unwrap();
        w.flush().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        w.write_all(format!("{b} at rip 0xfff0)\nunrelated line\n").as_bytes())
            .unwrap();
        drop(w);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !s.closed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(s.closed());
        assert_eq!(triple_faults_seen() - before, 1);
    }
}

//! Facts about the host and host-side helpers: can KVM boot guests here, private network namespaces,
//! TAP devices, leftover device processes, checksums.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::Result;

/// What /dev/kvm on this host can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmHost {
    /// /dev/kvm with VT-x or AMD-V: ordinary guests boot.
    Usable,
    /// /dev/kvm is kvm_pvm or the CPU has neither vmx nor svm: the KVM API works, ordinary guests do not boot.
    ApiOnly,
    /// No /dev/kvm.
    Missing,
}

/// Classifies /dev/kvm: present AND (cpu flags include vmx or svm) AND not the kvm_pvm module.
pub fn kvm_host() -> KvmHost {
    if !Path::new("/dev/kvm").exists() {
        return KvmHost::Missing;
    }
    let flags = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = flags
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if hw && !pvm {
        KvmHost::Usable
    } else {
        KvmHost::ApiOnly
    }
}

/// Finds a program on PATH (and in the sbin dirs, which a non-login PATH may lack).
pub fn which(prog: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(Into::into),
        )
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

/// Host RAM in MiB (MemTotal).
pub fn host_mem_mib() -> u64 {
    let s = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo_kib(&s, "MemTotal").map_or(0, |k| k / 1024)
}

/// A field of /proc/meminfo-format text, in KiB.
pub fn meminfo_kib(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .map(|l| l.trim())
        .find(|l| l.starts_with(&format!("{field}:")))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Moves the calling thread (and every process it starts afterwards) into a new, empty network
/// namespace with `lo` up. Tests that create TAP devices and talk to guests run in one, so their
/// addresses and traffic never reach the host's own network.
pub fn enter_private_netns() -> Result {
    // SAFETY: unshare only changes the calling thread's namespace membership; no memory is touched.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {} (the network tests need root)",
            std::io::Error::last_os_error()
        ));
    }
    ip(&["link", "set", "lo", "up"])
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result {
    let ip = which("ip").ok_or("`ip` not found (apt-get install iproute2)")?;
    let out = Command::new(ip)
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether a network interface of that name exists in the calling thread's network namespace.
pub fn netdev_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// A persistent TAP device created with `ip tuntap`, addressed and up; deleted on drop.
pub struct Tap {
    pub name: String,
}

impl Tap {
    /// `ip tuntap add mode tap NAME`, `ip addr add CIDR dev NAME`, `ip link set NAME up`.
    pub fn create(name: &str, cidr: &str) -> Result<Tap> {
        ip(&["tuntap", "add", "mode", "tap", "name", name])?;
        let tap = Tap {
            name: name.to_string(),
        };
        ip(&["addr", "add", cidr, "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if netdev_exists(&self.name) {
            let _ = ip(&["link", "del", &self.name]);
        }
    }
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A TAP device held open by the test itself (TUNSETIFF on /dev/net/tun), so it is "in use".
/// Not persistent: it disappears when this is dropped.
pub struct HeldTap {
    pub name: String,
    _fd: OwnedFd,
}

impl HeldTap {
    pub fn open(name: &str) -> Result<HeldTap> {
        ensure_name(name)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|e| format!("/dev/net/tun: {e}"))?;
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReqFlags has its layout (16-byte name,
        // then the flags union member, padded to the 40-byte size of struct ifreq) and outlives the call.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETIFF as _,
                &mut req as *mut IfReqFlags,
            )
        };
        if rc != 0 {
            return Err(format!(
                "TUNSETIFF {name}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(HeldTap {
            name: name.to_string(),
            _fd: file.into(),
        })
    }
}

fn ensure_name(name: &str) -> Result {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(format!("bad interface name {name:?}"));
    }
    Ok(())
}

/// A running process seen in /proc.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: i32,
    pub pgrp: i32,
    pub cmdline: String,
}

/// The fields of a /proc `stat` file (of a process or of one of its threads) that the
/// harness uses.
pub struct ProcStat {
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

/// Reads and parses `path` (`/proc/PID/stat` or `/proc/PID/task/TID/stat`).
pub fn read_stat(path: &str) -> Option<ProcStat> {
    let stat = fs::read_to_string(path).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let f: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    Some(ProcStat {
        comm: stat.get(open + 1..close)?.to_string(),
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        pgrp: f.get(2)?.parse().ok()?,
        cpu_ticks: f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    })
}

/// How many io_uring instances process `pid` holds open.
pub fn io_urings(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| {
        dir.flatten()
            .filter_map(|e| fs::read_link(e.path()).ok())
            .filter(|t| t.as_os_str() == "anon_inode:[io_uring]")
            .count()
    })
}

/// KiB of hugetlb pages `pid` maps (`HugetlbPages` of /proc/PID/status; 0 when unreadable).
pub fn hugetlb_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status")).map_or(0, |s| {
        s.lines()
            .find_map(|l| l.strip_prefix("HugetlbPages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    })
}

/// Every pid in /proc.
pub fn pids() -> Vec<i32> {
    fs::read_dir("/proc").map_or_else(
        |_| Vec::new(),
        |dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        },
    )
}

/// Live (non-zombie) skiff-blk / skiff-net processes.
pub fn device_processes() -> Vec<ProcInfo> {
    let mut found = Vec::new();
    for pid in pids() {
        let Some(stat) = read_stat(&format!("/proc/{pid}/stat")) else {
            continue;
        };
        if stat.state == 'Z' {
            continue;
        }
        let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim()
            .to_string();
        let argv0 = cmdline.split(' ').next().unwrap_or("");
        let is_device = ["skiff-blk", "skiff-net"]
            .iter()
            .any(|d| stat.comm.starts_with(d) || argv0.ends_with(&format!("/{d}")) || argv0 == *d);
        if is_device {
            found.push(ProcInfo {
                pid,
                pgrp: stat.pgrp,
                cmdline,
            });
        }
    }
    found
}

/// Device processes that belong to a test: in process group `pgrp`, or with any of `needles`
/// (a temp dir, an image path, a TAP name) in their command line. Polls for up to `grace` for them to go.
pub fn leftover_device_processes(
    pgrp: Option<i32>,
    needles: &[&str],
    grace: Duration,
) -> Vec<ProcInfo> {
    let deadline = Instant::now() + grace;
    loop {
        let left: Vec<ProcInfo> = device_processes()
            .into_iter()
            .filter(|p| {
                Some(p.pgrp) == pgrp
                    || needles
                        .iter()
                        .any(|n| !n.is_empty() && p.cmdline.contains(n))
            })
            .collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// sha256 (hex) of `len` bytes of a file from `offset` (whole file when `len` is None), via coreutils.
pub fn sha256_file(path: &Path, offset: u64, len: Option<u64>) -> Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("seek {}: {e}", path.display()))?;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("sha256sum stdin")?;
    let mut reader: Box<dyn Read> = match len {
        Some(n) => Box::new(f.take(n)),
        None => Box::new(f),
    };
    std::io::copy(&mut reader, &mut stdin).map_err(|e| format!("sha256sum: {e}"))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    first_sha256(&String::from_utf8_lossy(&out.stdout))
        .ok_or_else(|| "sha256sum printed no hash".to_string())
}

/// The first 64-hex-digit word in a text (a sha256sum line).
pub fn first_sha256(text: &str) -> Option<String> {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .map(str::to_ascii_lowercase)
}

/// Deterministic pseudo-random bytes (xorshift64*), for data whose checksum the test knows.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

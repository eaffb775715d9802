//! Where the guest artifacts and the skiff binaries are.
//!
//! Guest artifacts are looked up in the same order as `resources/artifacts.sh`:
//! `$SKIFF_ARTIFACTS` (the files directly, or in a `guest/` subdirectory), `<repo>/../shared/guest`,
//! `${XDG_CACHE_HOME:-~/.cache}/skiff/artifacts/guest`. When none has them, `resources/artifacts.sh guest`
//! is run (it builds them into the cache, which takes minutes) and its `SKIFF_GUEST_DIR=` line is used.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::Result;

const GUEST_FILES: [&str; 4] = [
    "vmlinux",
    "bzImage",
    "rootfs-busybox.ext4",
    "initramfs-busybox.cpio.gz",
];

/// The directory that holds the guest kernel and root filesystems.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub dir: PathBuf,
}

impl GuestArtifacts {
    /// ELF kernel with a PVH note (Linux 64-bit boot protocol or PVH entry).
    pub fn vmlinux(&self) -> PathBuf {
        self.dir.join("vmlinux")
    }
    /// The same kernel as a bzImage.
    pub fn bzimage(&self) -> PathBuf {
        self.dir.join("bzImage")
    }
    /// Pristine busybox ext4 root filesystem: never boot it directly, use [`crate::TestDir::copy_rootfs`].
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs-busybox.ext4")
    }
    /// The same tree as an initramfs.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs-busybox.cpio.gz")
    }
    /// The bench root filesystem (busybox + fio + iperf3), zstd-compressed: use
    /// [`crate::TestDir::bench_rootfs`].
    pub fn bench_rootfs_zst(&self) -> PathBuf {
        self.dir.join("rootfs-bench.ext4.zst")
    }
}

/// The workspace root (the directory with the root Cargo.toml, resources/ and .ci/).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

fn cache_root() -> PathBuf {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        }
    };
    base.join("skiff").join("artifacts")
}

fn has_guest_files(dir: &Path) -> bool {
    GUEST_FILES.iter().all(|f| dir.join(f).is_file())
}

/// Candidate directories in lookup order, without building anything.
fn candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(a) = std::env::var_os("SKIFF_ARTIFACTS").filter(|a| !a.is_empty()) {
        let a = PathBuf::from(a);
        dirs.push(a.join("guest"));
        dirs.push(a);
    }
    dirs.push(repo_root().join("..").join("shared").join("guest"));
    let cached = cache_root().join("guest");
    if cached.join("SHA256SUMS").is_file() {
        dirs.push(cached);
    }
    dirs
}

fn find_guest_artifacts() -> Result<GuestArtifacts> {
    if let Some(dir) = candidates().into_iter().find(|d| has_guest_files(d)) {
        let dir = dir
            .canonicalize()
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        return Ok(GuestArtifacts { dir });
    }
    let script = repo_root().join("resources").join("artifacts.sh");
    eprintln!(
        "skiff tests: no guest artifacts found; running {} guest (may build them, minutes)",
        script.display()
    );
    let out = Command::new("bash")
        .arg(&script)
        .arg("guest")
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SKIFF_GUEST_DIR="))
        .map(PathBuf::from)
        .filter(|_| out.status.success());
    match dir {
        Some(dir) if has_guest_files(&dir) => Ok(GuestArtifacts { dir }),
        _ => Err(format!(
            "no guest artifacts: {} guest failed ({}); set SKIFF_ARTIFACTS to a directory with {}",
            script.display(),
            out.status,
            GUEST_FILES.join(", ")
        )),
    }
}

/// The guest artifacts, looked up once per process.
pub fn guest_artifacts() -> Result<&'static GuestArtifacts> {
    static FOUND: OnceLock<Result<GuestArtifacts>> = OnceLock::new();
    FOUND
        .get_or_init(find_guest_artifacts)
        .as_ref()
        .map_err(Clone::clone)
}

/// The directory holding the built binaries: `$SKIFF_BIN_DIR`, else the profile dir of the running
/// test executable (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("SKIFF_BIN_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut dir = exe
        .parent()
        .ok_or("test executable has no parent dir")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a built binary (`skiff`, `skiff-blk`, `skiff-net`); an error naming it when it is missing.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "binary `{name}` not found at {}: build it first with `cargo build --workspace --bins` \
             (same profile as the tests), or set SKIFF_BIN_DIR",
            path.display()
        ))
    }
}

/// The directory `resources/artifacts.sh --no-build KIND` names (`SKIFF_<KIND>_DIR=`). Never
/// builds: the nested test host has no network to download packages with; `.ci/run` (or the
/// developer) runs `resources/artifacts.sh KIND` first.
fn artifacts_dir(kind: &str, what: &str) -> Result<PathBuf> {
    let script = repo_root().join("resources").join("artifacts.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(["--no-build", kind])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let key = format!("SKIFF_{}_DIR=", kind.to_uppercase());
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .filter(|_| out.status.success())
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!(
                "no {what} ({}); run `resources/artifacts.sh {kind}` first: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

/// Debian's stock cloud kernel and the initramfs of its modules (resources/stock).
#[derive(Debug, Clone)]
pub struct StockArtifacts {
    pub dir: PathBuf,
}

impl StockArtifacts {
    /// Debian bookworm's `linux-image-*-cloud-amd64` bzImage, unchanged.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz-cloud")
    }
    /// busybox + the package's virtio, ACPI button and evdev modules; mounts `root=`.
    pub fn initramfs(&self) -> PathBuf {
        self.dir.join("initramfs-cloud.cpio.gz")
    }
}

/// The stock guest artifacts, looked up once per process.
pub fn stock_artifacts() -> Result<&'static StockArtifacts> {
    static FOUND: OnceLock<Result<StockArtifacts>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            artifacts_dir("stock", "stock guest artifacts (Debian's cloud kernel)")
                .map(|dir| StockArtifacts { dir })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A whole Debian image (resources/debian): systemd, cloud-init, its own kernel and initramfs.
#[derive(Debug, Clone)]
pub struct DebianArtifacts {
    pub dir: PathBuf,
}

impl DebianArtifacts {
    /// The image's own kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("debian-vmlinuz")
    }
    /// The image's own initramfs (initramfs-tools).
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("debian-initrd.img")
    }
    /// The root filesystem, zstd-compressed: use [`crate::TestDir::debian_rootfs`].
    pub fn rootfs_zst(&self) -> PathBuf {
        self.dir.join("debian-rootfs.ext4.zst")
    }
}

/// The Debian image, looked up once per process.
pub fn debian_artifacts() -> Result<&'static DebianArtifacts> {
    static FOUND: OnceLock<Result<DebianArtifacts>> = OnceLock::new();
    FOUND
        .get_or_init(|| artifacts_dir("debian", "Debian image").map(|dir| DebianArtifacts { dir }))
        .as_ref()
        .map_err(Clone::clone)
}

//! The VMM's side of a device process's metrics page: a sealed 4096-byte memfd per device,
//! created here, inherited by `skiff-blk` / `skiff-net` as `--metrics-fd N`, counted into
//! by the device process and read here without asking it anything.
//!
//! The page is self-describing (counter names are in it), so the VMM needs no knowledge of
//! a device's counters. Its layout is the contract in docs/CONTRACTS.md ("Metrics page");
//! the devices crate defines the same layout on its side (it must not depend on vmm), and
//! the tests below read pages written byte by byte from that description. All little
//! endian:
//!
//! ```text
//! 0     magic   u64 = u64::from_le_bytes(*b"SKFMETR1")
//! 8     version u32 = 1
//! 12    count   u32   slots in use, stored last by the writer (Release)
//! 16    reserved, zero, up to 64
//! 64*(i+1), i < 63: slot i = name [u8; 56] (NUL-padded [a-z0-9_]), value u64 (atomic)
//! ```
//!
//! The page belongs to the VMM and outlives device-process restarts and upgrades: the next
//! process attaches to the same page and the counts continue. A device process is not
//! trusted: whatever it writes, reading the page neither crashes nor misleads the VMM
//! (the memfd is sealed against shrinking, so the mapping cannot fault; a bad header gives
//! no counters, bad slots are skipped).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Size of a metrics page.
pub const PAGE_SIZE: usize = 4096;
/// `b"SKFMETR1"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SKFMETR1");
/// The layout version this VMM reads.
pub const VERSION: u32 = 1;
/// Most counters a page holds.
pub const MAX_SLOTS: usize = 63;
/// Bytes of a counter name.
pub const NAME_LEN: usize = 56;

const VERSION_OFFSET: usize = 8;
const COUNT_OFFSET: usize = 12;
const SLOT_LEN: usize = 64;

/// Errors creating a metrics page.
#[derive(Debug, thiserror::Error)]
pub enum MetricsPageError {
    /// The device id cannot be part of a memfd name.
    #[error("device id {0:?} cannot name a memfd")]
    BadId(String),
    /// memfd_create failed.
    #[error("cannot create the metrics memfd of device {0}")]
    Create(String, #[source] io::Error),
    /// ftruncate failed.
    #[error("cannot size the metrics memfd of device {0}")]
    Size(String, #[source] io::Error),
    /// F_ADD_SEALS failed.
    #[error("cannot seal the metrics memfd of device {0}")]
    Seal(String, #[source] io::Error),
    /// mmap failed.
    #[error("cannot map the metrics memfd of device {0}")]
    Map(String, #[source] io::Error),
}

/// One device's metrics page, mapped read-only.
pub struct MetricsPage {
    id: String,
    file: File,
    base: NonNull<u8>,
    /// Set once a problem with the page has been logged.
    warned: AtomicBool,
}

// SAFETY: `base` points to a read-only shared mapping owned by this struct, only ever read
// with atomic loads; it can be used and dropped from any thread.
unsafe impl Send for MetricsPage {}
// SAFETY: as above; `&self` methods only perform atomic loads on the mapping.
unsafe impl Sync for MetricsPage {}

impl std::fmt::Debug for MetricsPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsPage")
            .field("id", &self.id)
            .field("fd", &self.file.as_raw_fd())
            .finish_non_exhaustive()
    }
}

impl MetricsPage {
    /// Creates the page of device `id`: memfd `skiff-metrics-<id>` of [`PAGE_SIZE`] bytes,
    /// sealed against shrinking and growing (so a device process cannot make the VMM's
    /// mapping fault), mapped read-only here. The fd is close-on-exec; hand it to a device
    /// process with `DeviceProcess::spawn_with_metrics`.
    pub fn create(id: &str) -> Result<MetricsPage, MetricsPageError> {
        let name = CString::new(format!("skiff-metrics-{id}"))
            .map_err(|_| MetricsPageError::BadId(id.to_string()))?;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EINVAL) => MetricsPageError::BadId(id.to_string()),
                _ => MetricsPageError::Create(id.to_string(), err),
            });
        }
        // SAFETY: fd is a fresh memfd owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(PAGE_SIZE as u64)
            .map_err(|e| MetricsPageError::Size(id.to_string(), e))?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd this function owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(MetricsPageError::Seal(
                id.to_string(),
                io::Error::last_os_error(),
            ));
        }
        Self::map(id, file)
    }

    /// The page of device `id` that the VMM this one replaces created ([`MetricsPage::create`]),
    /// handed over as `file`: checked to be a page sealed against resizing, and mapped.
    pub fn adopt(id: &str, file: File) -> Result<MetricsPage, MetricsPageError> {
        let len = file
            .metadata()
            .map_err(|e| MetricsPageError::Size(id.to_string(), e))?
            .len();
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_GET_SEALS on a file we own; no memory is passed.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if len != PAGE_SIZE as u64 || seals < 0 || seals & want != want {
            return Err(MetricsPageError::Seal(
                id.to_string(),
                io::Error::other(format!(
                    "a handed-over page of {len} bytes with seals {seals:#x}"
                )),
            ));
        }
        Self::map(id, file)
    }

    fn map(id: &str, file: File) -> Result<MetricsPage, MetricsPageError> {
        // SAFETY: maps PAGE_SIZE bytes of a file of that size at a kernel-chosen address;
        // the result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MetricsPageError::Map(
                id.to_string(),
                io::Error::last_os_error(),
            ));
        }
        let base = NonNull::new(addr.cast::<u8>()).ok_or_else(|| {
            MetricsPageError::Map(
                id.to_string(),
                io::Error::from(io::ErrorKind::AddrNotAvailable),
            )
        })?;
        Ok(MetricsPage {
            id: id.to_string(),
            file,
            base,
            warned: AtomicBool::new(false),
        })
    }

    /// The device id the page was created for.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The memfd (close-on-exec in the VMM).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn u64_at(&self, offset: usize) -> u64 {
        debug_assert!(offset & 7 == 0 && offset + 8 <= PAGE_SIZE);
        // SAFETY: `offset` is 8-aligned and inside the page-aligned PAGE_SIZE mapping, which
        // lives as long as `self`; the device process changes it only atomically, and a
        // relaxed 8-byte atomic load is sound on read-only memory on this target.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) }
            .load(Ordering::Relaxed)
    }

    fn u32_at(&self, offset: usize) -> u32 {
        debug_assert!(offset & 3 == 0 && offset + 4 <= PAGE_SIZE);
        // SAFETY: as in `u64_at`, for a 4-aligned 4-byte load.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) }
            .load(Ordering::Relaxed)
    }

    fn warn_once(&self, what: std::fmt::Arguments<'_>) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            log::warn!("metrics page of device {}: {what}", self.id);
        }
    }

    /// (name, value) of every well-formed counter the device process published, in slot
    /// order. Empty when nothing is published yet or the header is not a version-1 page.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let count = self.u32_at(COUNT_OFFSET);
        if count == 0 {
            return Vec::new();
        }
        // Pairs with the writer's Release store of `count`: the names it covers are visible.
        fence(Ordering::Acquire);
        let magic = self.u64_at(0);
        let version = self.u32_at(VERSION_OFFSET);
        if magic != MAGIC || version != VERSION {
            self.warn_once(format_args!(
                "not a version {VERSION} skiff metrics page \
                 (magic {magic:#018x}, version {version}); ignoring it"
            ));
            return Vec::new();
        }
        let mut slots = count as usize;
        if slots > MAX_SLOTS {
            self.warn_once(format_args!("count {count} clamped to {MAX_SLOTS}"));
            slots = MAX_SLOTS;
        }
        let mut out: Vec<(String, u64)> = Vec::with_capacity(slots);
        for i in 0..slots {
            let off = SLOT_LEN * (i + 1);
            let mut raw = [0u8; NAME_LEN];
            for (w, chunk) in raw.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&self.u64_at(off + 8 * w).to_le_bytes());
            }
            let name = match parse_name(&raw) {
                Some(n) if !out.iter().any(|(o, _)| o == n) => n,
                _ => {
                    self.warn_once(format_args!("slot {i} has an invalid or repeated name"));
                    continue;
                }
            };
            out.push((name.to_string(), self.u64_at(off + NAME_LEN)));
        }
        out
    }
}

/// The name in a slot: NUL-padded, non-empty `[a-z0-9_]`, nothing after the first NUL.
fn parse_name(raw: &[u8; NAME_LEN]) -> Option<&str> {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
    let (name, pad) = raw.split_at(end);
    let valid = !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
        && pad.iter().all(|b| *b == 0);
    if !valid {
        return None;
    }
    std::str::from_utf8(name).ok()
}

impl Drop for MetricsPage {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `create`; nothing borrows it past `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), PAGE_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// Writes `bytes` at `offset` through the memfd, as a device process's mapping would.
    fn put(page: &MetricsPage, offset: usize, bytes: &[u8]) {
        page.file
            .write_all_at(bytes, offset as u64)
            .expect("write page");
    }

    fn header(page: &MetricsPage, magic: &[u8; 8], version: u32, count: u32) {
        put(page, 0, magic);
        put(page, VERSION_OFFSET, &version.to_le_bytes());
        put(page, COUNT_OFFSET, &count.to_le_bytes());
    }

    fn slot(page: &MetricsPage, i: usize, name: &[u8], value: u64) {
        let mut s = [0u8; SLOT_LEN];
        s[..name.len()].copy_from_slice(name);
        s[NAME_LEN..].copy_from_slice(&value.to_le_bytes());
        put(page, SLOT_LEN * (i + 1), &s);
    }

    fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[test]
    fn metrics_page_is_a_sealed_empty_memfd() {
        let page = MetricsPage::create("rootfs").expect("create");
        assert_eq!(page.id(), "rootfs");
        assert_eq!(page.file.metadata().expect("stat").len(), PAGE_SIZE as u64);
        let link = std::fs::read_link(format!("/proc/self/fd/{}", page.fd().as_raw_fd()))
            .expect("readlink");
        assert!(
            link.to_string_lossy().contains("skiff-metrics-rootfs"),
            "{link:?}"
        );
        // SAFETY: F_GET_SEALS / F_GETFD on an fd the page owns.
        let (seals, flags) = unsafe {
            (
                libc::fcntl(page.fd().as_raw_fd(), libc::F_GET_SEALS),
                libc::fcntl(page.fd().as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_eq!(
            seals,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
        );
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert!(page.file.set_len(0).is_err(), "shrinking must be sealed");
        assert!(page.snapshot().is_empty());
        assert!(!page.warned.load(Ordering::Relaxed));
        assert!(matches!(
            MetricsPage::create("a\0b"),
            Err(MetricsPageError::BadId(_))
        ));
    }

    #[test]
    fn metrics_page_reads_the_documented_layout() {
        let page = MetricsPage::create("layout").expect("create");
        slot(&page, 0, b"read_requests", 12);
        slot(&page, 1, b"read_bytes", 1 << 33);
        slot(&page, 2, &[b'x'; NAME_LEN], u64::MAX);
        // Written but not yet published: invisible.
        slot(&page, 3, b"pending", 1);
        header(&page, b"SKFMETR1", 1, 3);
        assert_eq!(
            page.snapshot(),
            pairs(&[
                ("read_requests", 12),
                ("read_bytes", 1 << 33),
                (&"x".repeat(NAME_LEN), u64::MAX),
            ])
        );
        // Values move under the VMM's read-only mapping.
        put(&page, SLOT_LEN + NAME_LEN, &13u64.to_le_bytes());
        assert_eq!(page.snapshot()[0], ("read_requests".to_string(), 13));
        assert!(!page.warned.load(Ordering::Relaxed));
    }

    #[test]
    fn metrics_page_with_a_bad_header_gives_nothing() {
        let page = MetricsPage::create("magic").expect("create");
        slot(&page, 0, b"kicks", 1);
        header(&page, b"SKFMETR2", 1, 1);
        assert!(page.snapshot().is_empty());
        assert!(page.warned.load(Ordering::Relaxed));
        header(&page, b"SKFMETR1", 2, 1);
        assert!(page.snapshot().is_empty());
        header(&page, b"SKFMETR1", 1, 1);
        assert_eq!(page.snapshot(), pairs(&[("kicks", 1)]));
    }

    #[test]
    fn metrics_page_count_is_clamped() {
        let page = MetricsPage::create("clamp").expect("create");
        for i in 0..MAX_SLOTS {
            slot(&page, i, format!("c{i}").as_bytes(), i as u64);
        }
        header(&page, b"SKFMETR1", 1, u32::MAX);
        let snap = page.snapshot();
        assert_eq!(snap.len(), MAX_SLOTS);
        assert_eq!(snap[62], ("c62".to_string(), 62));
        assert!(page.warned.load(Ordering::Relaxed));
    }

    #[test]
    fn metrics_page_skips_bad_slots() {
        let page = MetricsPage::create("names").expect("create");
        slot(&page, 0, b"ok_1", 1);
        slot(&page, 1, b"Upper", 2);
        slot(&page, 2, b"", 3);
        slot(&page, 3, b"dash-ed", 4);
        slot(&page, 4, "caf\u{e9}".as_bytes(), 5);
        slot(&page, 5, b"tail\0junk", 6);
        slot(&page, 6, b"ok_1", 7);
        slot(&page, 7, &[0xff; NAME_LEN], 8);
        slot(&page, 8, b"ok_2", 9);
        header(&page, b"SKFMETR1", 1, 9);
        assert_eq!(page.snapshot(), pairs(&[("ok_1", 1), ("ok_2", 9)]));
        assert!(page.warned.load(Ordering::Relaxed));
    }
}

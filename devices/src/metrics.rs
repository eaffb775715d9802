//! Per-device counters, lock-free, in a "metrics page" the VMM can read without asking.
//!
//! The VMM creates a 4096-byte memfd per device and passes it as `--metrics-fd N`; the
//! device process maps it `MAP_SHARED` and counts straight into it (one relaxed
//! `fetch_add` per counter touched, no syscall, no allocation). Without `--metrics-fd`
//! the same page lives in process memory, so the code path is the same.
//!
//! Layout (docs/CONTRACTS.md, "Metrics page"; the VMM defines it again on its side, this
//! crate must not depend on vmm), all little endian:
//!
//! ```text
//! 0     magic   u64 = u64::from_le_bytes(*b"SKFMETR1")
//! 8     version u32 = 1
//! 12    count   u32   slots in use, published last (Release)
//! 16    reserved, zero, up to 64
//! 64*(i+1), i < 63: slot i = name [u8; 56] (NUL-padded [a-z0-9_]), value u64 (atomic)
//! ```
//!
//! The page outlives the device process: a restarted or upgraded process attaches to the
//! page its predecessor filled, finds its counters by name, appends the names it does not
//! find and never resets a value, so counts continue across the restart.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Size of the page.
pub const PAGE_SIZE: usize = 4096;
/// `b"SKFMETR1"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SKFMETR1");
/// Layout version.
pub const VERSION: u32 = 1;
/// Bytes of a counter name (NUL-padded).
pub const NAME_LEN: usize = 56;
/// Counters a page can hold.
pub const MAX_SLOTS: usize = 63;

const NAME_WORDS: usize = NAME_LEN / 8;

/// Errors attaching to a metrics page or registering a counter.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The fd is one of stdin, stdout, stderr.
    #[error("--metrics-fd {0} is a standard stream, not a metrics page")]
    StdStream(RawFd),
    /// The fd is not open in this process.
    #[error("--metrics-fd {0} is not an open file descriptor")]
    NotOpen(RawFd, #[source] io::Error),
    /// fstat failed.
    #[error("--metrics-fd {0}: cannot stat it")]
    Stat(RawFd, #[source] io::Error),
    /// The file is not exactly one page.
    #[error("--metrics-fd {fd} is {size} bytes, a metrics page is {PAGE_SIZE}")]
    WrongSize {
        /// The fd.
        fd: RawFd,
        /// Its size.
        size: u64,
    },
    /// The fd is not a memfd (F_GET_SEALS fails).
    #[error("--metrics-fd {0} is not a memfd")]
    NotMemfd(RawFd, #[source] io::Error),
    /// mmap failed.
    #[error("--metrics-fd {0}: cannot map it read-write")]
    Map(RawFd, #[source] io::Error),
    /// The page is in use but not in the skiff layout this process understands.
    #[error(
        "--metrics-fd {fd} is not a skiff metrics page version {VERSION} \
         (magic {magic:#018x}, version {version}, count {count})"
    )]
    BadHeader {
        /// The fd.
        fd: RawFd,
        /// Magic found.
        magic: u64,
        /// Version found.
        version: u32,
        /// Count found.
        count: u32,
    },
    /// A counter name is empty, too long or not `[a-z0-9_]`.
    #[error("invalid counter name {0:?}")]
    BadName(&'static str),
    /// All slots are taken.
    #[error("no free slot for counter {0} (a page holds {MAX_SLOTS})")]
    Full(&'static str),
    /// Another writer published a counter while this one was registering.
    #[error("the metrics page changed while registering counter {0}")]
    Raced(&'static str),
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    count: AtomicU32,
    reserved: [AtomicU64; 6],
}

#[repr(C)]
struct Slot {
    /// The name's bytes as little-endian words, so that every access is atomic.
    name: [AtomicU64; NAME_WORDS],
    value: AtomicU64,
}

#[repr(C, align(64))]
struct Page {
    header: Header,
    slots: [Slot; MAX_SLOTS],
}

const _: () = assert!(std::mem::size_of::<Page>() == PAGE_SIZE);
const _: () = assert!(std::mem::size_of::<Slot>() == 64);
const _: () = assert!(std::mem::size_of::<Header>() == 64);

impl Page {
    const fn zeroed() -> Self {
        Page {
            header: Header {
                magic: AtomicU64::new(0),
                version: AtomicU32::new(0),
                count: AtomicU32::new(0),
                reserved: [const { AtomicU64::new(0) }; 6],
            },
            slots: [const {
                Slot {
                    name: [const { AtomicU64::new(0) }; NAME_WORDS],
                    value: AtomicU64::new(0),
                }
            }; MAX_SLOTS],
        }
    }
}

/// A counter in a metrics page.
#[derive(Clone, Copy, Debug)]
pub struct Counter(&'static AtomicU64);

impl Counter {
    /// Adds `n` (relaxed: a counter orders nothing).
    #[inline]
    pub fn inc(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one and says whether this occurrence should be logged: the 1st, 2nd, 4th,
    /// 8th, ... so that a guest sending bad requests in a loop cannot flood the log.
    #[inline]
    pub fn inc_logged(&self) -> bool {
        (self.0.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

fn encode_name(name: &'static str) -> Result<[u64; NAME_WORDS], MetricsError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() > NAME_LEN
        || !bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
    {
        return Err(MetricsError::BadName(name));
    }
    let mut padded = [0u8; NAME_LEN];
    padded[..bytes.len()].copy_from_slice(bytes);
    let mut words = [0u64; NAME_WORDS];
    for (w, chunk) in words.iter_mut().zip(padded.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    Ok(words)
}

/// A device's metrics page: shared with the VMM (`--metrics-fd`) or in process memory.
///
/// The page is mapped (or allocated) once and never released, so counters are
/// `'static` and cost one relaxed `fetch_add`; a device process attaches once.
#[derive(Debug)]
pub struct MetricsPage {
    page: &'static Page,
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("count", &self.header.count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl MetricsPage {
    /// A page in process memory, for a device started without `--metrics-fd`.
    pub fn in_memory() -> Self {
        let page: &'static Page = Box::leak(Box::new(Page::zeroed()));
        MetricsPage::init(page);
        MetricsPage { page }
    }

    /// Attaches to the page behind the inherited fd `fd` (`--metrics-fd`), taking
    /// ownership of the fd (it is closed once the page is mapped).
    ///
    /// The fd must be an open memfd of exactly [`PAGE_SIZE`] bytes holding either
    /// nothing yet (count 0) or a version-1 page; counters already there keep their values.
    pub fn from_fd(fd: RawFd) -> Result<Self, MetricsError> {
        if (0..=2).contains(&fd) {
            return Err(MetricsError::StdStream(fd));
        }
        // SAFETY: F_GETFD only reads the flags of descriptor number `fd`, if it exists.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(MetricsError::NotOpen(fd, io::Error::last_os_error()));
        }
        // SAFETY: `fd` is open (checked above) and was inherited for --metrics-fd; the
        // backends attach before they open anything else, so nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let size = file
            .metadata()
            .map_err(|e| MetricsError::Stat(fd, e))?
            .len();
        if size != PAGE_SIZE as u64 {
            return Err(MetricsError::WrongSize { fd, size });
        }
        // SAFETY: F_GET_SEALS reads the seals of an open fd; it fails unless it is a memfd.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) } < 0 {
            return Err(MetricsError::NotMemfd(fd, io::Error::last_os_error()));
        }
        // SAFETY: maps PAGE_SIZE bytes of an fd of that size at a kernel-chosen address;
        // the result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MetricsError::Map(fd, io::Error::last_os_error()));
        }
        let Some(ptr) = NonNull::new(addr.cast::<Page>()) else {
            return Err(MetricsError::Map(
                fd,
                io::Error::from(io::ErrorKind::AddrNotAvailable),
            ));
        };
        // SAFETY: the mapping is PAGE_SIZE bytes, page aligned (so aligned for `Page`),
        // readable and writable, and is never unmapped, so the reference is valid for
        // 'static. `Page` is made only of atomics, valid for any bit pattern, and the
        // other processes sharing the page (the VMM, a predecessor) access it atomically.
        // (Shrinking the file would make accesses fault, not alias other memory; the VMM
        // seals it against that.)
        let page: &'static Page = unsafe { ptr.as_ref() };
        let h = &page.header;
        let count = h.count.load(Ordering::Acquire);
        if count != 0 {
            let magic = h.magic.load(Ordering::Relaxed);
            let version = h.version.load(Ordering::Relaxed);
            if magic != MAGIC || version != VERSION || count as usize > MAX_SLOTS {
                // SAFETY: unmaps the mapping made above; `page` is not used again.
                unsafe { libc::munmap(addr, PAGE_SIZE) };
                return Err(MetricsError::BadHeader {
                    fd,
                    magic,
                    version,
                    count,
                });
            }
        } else {
            MetricsPage::init(page);
        }
        Ok(MetricsPage { page })
    }

    /// Writes the header of an empty page (its count stays 0 until a counter is added).
    fn init(page: &Page) {
        page.header.magic.store(MAGIC, Ordering::Relaxed);
        page.header.version.store(VERSION, Ordering::Relaxed);
    }

    /// The counter called `name`: the existing slot when the page already has it (a
    /// restarted device process), else a new slot, published after its name is written.
    pub fn counter(&self, name: &'static str) -> Result<Counter, MetricsError> {
        let words = encode_name(name)?;
        let count = self.page.header.count.load(Ordering::Acquire);
        let used = (count as usize).min(MAX_SLOTS);
        let found = self.page.slots[..used].iter().find(|s| {
            s.name
                .iter()
                .zip(words)
                .all(|(w, want)| w.load(Ordering::Relaxed) == want)
        });
        if let Some(slot) = found {
            return Ok(Counter(&slot.value));
        }
        let slot = self.page.slots.get(used).ok_or(MetricsError::Full(name))?;
        for (w, v) in slot.name.iter().zip(words) {
            w.store(v, Ordering::Relaxed);
        }
        // A slot past `count` was never published, so nobody counted into it; start at 0.
        slot.value.store(0, Ordering::Relaxed);
        self.page
            .header
            .count
            .compare_exchange(count, count + 1, Ordering::Release, Ordering::Relaxed)
            .map_err(|_| MetricsError::Raced(name))?;
        Ok(Counter(&slot.value))
    }

    /// (name, value) of every published counter, in slot order.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let count = (self.page.header.count.load(Ordering::Acquire) as usize).min(MAX_SLOTS);
        self.page.slots[..count]
            .iter()
            .map(|s| {
                let mut bytes = Vec::with_capacity(NAME_LEN);
                for w in &s.name {
                    bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
                }
                let end = bytes.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
                bytes.truncate(end);
                (
                    String::from_utf8_lossy(&bytes).into_owned(),
                    s.value.load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// Declares a device's counter set: a struct of [`Counter`]s named after its fields,
/// with `NAMES` and `register(&MetricsPage)`.
#[macro_export]
macro_rules! metric_set {
    (
        $(#[$meta:meta])*
        pub struct $set:ident {
            $( $(#[$fmeta:meta])* $field:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug)]
        pub struct $set {
            $( $(#[$fmeta])* pub $field: $crate::metrics::Counter, )*
        }

        impl $set {
            /// Counter names, in registration (slot) order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Finds or adds every counter of the set in `page`.
            pub fn register(
                page: &$crate::metrics::MetricsPage,
            ) -> Result<Self, $crate::metrics::MetricsError> {
                Ok($set {
                    $( $field: page.counter(stringify!($field))?, )*
                })
            }
        }
    };
}

/// Attaches to `--metrics-fd` when given, else to a page in process memory.
pub fn page_from_arg(fd: Option<RawFd>) -> Result<MetricsPage, MetricsError> {
    match fd {
        Some(fd) => MetricsPage::from_fd(fd),
        None => Ok(MetricsPage::in_memory()),
    }
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;

//! The raw image file behind skiff-blk: opening and locking it, and the
//! vectored I/O, flush, discard and write-zeroes primitives on it.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestMemoryMmap};

use crate::iov::{self, GuestSegment};

/// Size of a virtio-blk sector.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID serial.
pub const SERIAL_LEN: usize = 20;
/// Alignment used for O_DIRECT bounce buffers.
const DIRECT_ALIGN: usize = 4096;
/// Maximum iovecs handed to one preadv/pwritev call.
const IOV_MAX: usize = 1024;
/// Most bytes one call moves: [`DiskImage::read_into`] and [`DiskImage::write_from`] (and
/// so an O_DIRECT bounce buffer), and the zeroes [`DiskImage::write_zeroes`] writes out
/// where the filesystem cannot zero a range itself.
pub const MAX_TRANSFER: usize = 32 << 20;

/// Errors raised while opening the image or moving data.
///
/// `name` is the image as shown to the user: its path for `--image`, or
/// `PATH (--image-fd N)` for an inherited fd (PATH read from /proc/self/fd/N).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image file does not exist.
    #[error("image {0} does not exist")]
    Missing(PathBuf),
    /// The image cannot be opened.
    #[error("cannot open image {path}")]
    Open {
        /// Image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock.
    #[error("image {0} is locked by another process")]
    Locked(String),
    /// flock failed for another reason.
    #[error("cannot lock image {name}")]
    Lock {
        /// Image name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image size cannot be determined.
    #[error("cannot determine the size of image {name}")]
    Size {
        /// Image name.
        name: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `--image-fd` is 0, 1 or 2.
    #[error("--image-fd {0} is a standard stream, not an image")]
    FdStdStream(RawFd),
    /// `--image-fd` is not open in this process.
    #[error("--image-fd {0} is not an open file descriptor")]
    FdNotOpen(RawFd, #[source] io::Error),
    /// fstat on `--image-fd` failed.
    #[error("--image-fd {0}: fstat failed")]
    FdStat(String, #[source] io::Error),
    /// `--image-fd` is neither a regular file nor a block device.
    #[error("--image-fd {name} is {kind}, not a regular file or a block device")]
    FdKind {
        /// `N (PATH)`.
        name: String,
        /// What it is.
        kind: &'static str,
    },
    /// `--image-fd` was opened with an access mode the drive cannot use.
    #[error("--image-fd {name} is opened {mode}; skiff-blk needs {need}")]
    FdMode {
        /// `N (PATH)`.
        name: String,
        /// O_RDONLY, O_WRONLY or O_PATH.
        mode: &'static str,
        /// What would do.
        need: &'static str,
    },
    /// fcntl on `--image-fd` failed.
    #[error("--image-fd {0}: cannot set FD_CLOEXEC")]
    FdCloexec(String, #[source] io::Error),
    /// `--direct` on `--image-fd`: O_DIRECT cannot be set (or cleared without it).
    #[error("--image-fd {name}: cannot {what} O_DIRECT with fcntl(F_SETFL){hint}")]
    FdDirect {
        /// `N (PATH)`.
        name: String,
        /// "set" or "clear".
        what: &'static str,
        /// Extra explanation.
        hint: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A guest range is not mapped.
    #[error("guest buffer is not in guest memory")]
    Guest(#[from] iov::IovError),
    /// A system call on the image failed.
    #[error("I/O on the image failed")]
    Io(#[source] io::Error),
    /// The file ended before the requested range.
    #[error("unexpected end of image")]
    ShortIo,
    /// One call would move more than [`MAX_TRANSFER`] bytes.
    #[error("{0} bytes in one transfer, more than {MAX_TRANSFER}")]
    TooLarge(u64),
}

/// How the image is opened.
#[derive(Clone, Debug, Default)]
pub struct DiskOptions {
    /// Open read-only and take a shared lock.
    pub read_only: bool,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// GET_ID serial; derived from the file when `None`.
    pub serial: Option<String>,
}

/// An open, locked raw image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    name: String,
    size: u64,
    read_only: bool,
    direct: bool,
    serial: [u8; SERIAL_LEN],
}

#[repr(C, align(4096))]
struct ZeroPage([u8; 65536]);
static ZEROES: ZeroPage = ZeroPage([0u8; 65536]);

/// Sets FD_CLOEXEC on an inherited fd.
fn set_cloexec(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD read or set the descriptor flags of an fd we own.
    unsafe {
        let fdfl = libc::fcntl(file.as_raw_fd(), libc::F_GETFD);
        if fdfl < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFD, fdfl | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn serial_bytes(s: &str) -> [u8; SERIAL_LEN] {
    let mut out = [0u8; SERIAL_LEN];
    let b = s.as_bytes();
    let n = b.len().min(SERIAL_LEN);
    out[..n].copy_from_slice(&b[..n]);
    out
}

impl DiskImage {
    /// Opens and locks `path` (`--image PATH`).
    pub fn open(path: &Path, opts: &DiskOptions) -> Result<Self, DiskError> {
        if !path.exists() {
            return Err(DiskError::Missing(path.to_path_buf()));
        }
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_file(file, path.display().to_string(), opts)
    }

    /// Takes over fd `fd`, inherited from the VMM (`--image-fd N`): a regular file or block
    /// device it opened O_RDWR (or O_RDONLY/O_RDWR with `opts.read_only`), usually already
    /// flocked by it. Sets FD_CLOEXEC (this fd only) and makes O_DIRECT match
    /// `opts.direct` with F_SETFL (a flag of the open file description, shared with the
    /// VMM and any other skiff-blk holding it), then locks and sizes it as [`DiskImage::open`]
    /// does. flock locks belong to the open file description, so the lock the VMM (or a
    /// previous skiff-blk) holds on this very description does not conflict; another
    /// open of the same image does. The serial default is derived from the file's dev/ino,
    /// as with `open`, so it is the same for both ways of giving the image.
    ///
    /// The fd is checked before this takes ownership of it: on an error from the checks
    /// (standard stream, not open, wrong file type or access mode) it is left open and
    /// untouched. The caller must not use or close it after that.
    pub fn from_fd(fd: RawFd, opts: &DiskOptions) -> Result<Self, DiskError> {
        if (0..=2).contains(&fd) {
            return Err(DiskError::FdStdStream(fd));
        }
        // SAFETY: F_GETFL only reads the status flags of descriptor number `fd`, if open.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 {
            return Err(DiskError::FdNotOpen(fd, io::Error::last_os_error()));
        }
        let path = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .ok()
            .map(|p| p.display().to_string());
        // `N (PATH)` in --image-fd errors, `PATH (--image-fd N)` (or `fd N`) elsewhere.
        let (fd_name, name) = match &path {
            Some(p) => (format!("{fd} ({p})"), format!("{p} (--image-fd {fd})")),
            None => (fd.to_string(), format!("fd {fd}")),
        };
        // SAFETY: all-zero bytes are a valid `struct stat`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes one `struct stat` into `st`, which lives across the call.
        if unsafe { libc::fstat(fd, &mut st) } < 0 {
            return Err(DiskError::FdStat(fd_name, io::Error::last_os_error()));
        }
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFBLK => None,
            libc::S_IFDIR => Some("a directory"),
            libc::S_IFCHR => Some("a character device"),
            libc::S_IFIFO => Some("a pipe (FIFO)"),
            libc::S_IFSOCK => Some("a socket"),
            libc::S_IFLNK => Some("a symbolic link"),
            _ => Some("of an unknown file type"),
        };
        if let Some(kind) = kind {
            return Err(DiskError::FdKind {
                name: fd_name,
                kind,
            });
        }
        let mode = if fl & libc::O_PATH != 0 {
            Some("O_PATH")
        } else {
            match fl & libc::O_ACCMODE {
                libc::O_RDWR => None,
                libc::O_RDONLY if opts.read_only => None,
                libc::O_RDONLY => Some("O_RDONLY"),
                _ => Some("O_WRONLY"),
            }
        };
        if let Some(mode) = mode {
            let need = if opts.read_only {
                "O_RDONLY or O_RDWR with --read-only"
            } else {
                "O_RDWR (O_RDONLY only with --read-only)"
            };
            return Err(DiskError::FdMode {
                name: fd_name,
                mode,
                need,
            });
        }
        // SAFETY: `fd` is open and an image (checked above); it was inherited for
        // --image-fd and nothing else in this process owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        set_cloexec(&file).map_err(|e| DiskError::FdCloexec(fd_name.clone(), e))?;
        let has_direct = fl & libc::O_DIRECT != 0;
        if opts.direct != has_direct {
            let (what, new_fl, hint) = if opts.direct {
                (
                    "set",
                    fl | libc::O_DIRECT,
                    " (does the filesystem support O_DIRECT? run without --direct otherwise)",
                )
            } else {
                (
                    "clear",
                    fl & !libc::O_DIRECT,
                    " (the fd came with O_DIRECT)",
                )
            };
            // SAFETY: F_SETFL sets the status flags of an fd we own; no memory is passed.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, new_fl) } < 0 {
                return Err(DiskError::FdDirect {
                    name: fd_name,
                    what,
                    hint,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Self::from_file(file, name, opts)
    }

    /// Locks an opened image (LOCK_EX, LOCK_SH when read-only; non-blocking), sizes it and
    /// derives its serial. `file` has the access mode and O_DIRECT `opts` asks for.
    fn from_file(mut file: File, name: String, opts: &DiskOptions) -> Result<Self, DiskError> {
        let op = if opts.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on an fd we own; no memory is passed.
        let ret = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if ret != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DiskError::Locked(name));
            }
            return Err(DiskError::Lock { name, source: err });
        }
        // Seeking moves the offset of a possibly shared description: harmless, every
        // transfer uses preadv/pwritev at explicit offsets.
        let size = match file.seek(SeekFrom::End(0)) {
            Ok(size) => size,
            Err(source) => return Err(DiskError::Size { name, source }),
        };
        let meta = match file.metadata() {
            Ok(meta) => meta,
            Err(source) => return Err(DiskError::Size { name, source }),
        };
        let serial = match &opts.serial {
            Some(s) => serial_bytes(s),
            None => serial_bytes(&format!("{:x}-{:x}", meta.dev(), meta.ino())),
        };
        Ok(DiskImage {
            file,
            name,
            size,
            read_only: opts.read_only,
            direct: opts.direct,
            serial,
        })
    }

    /// The image as shown in messages: its path, or `PATH (--image-fd N)`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether I/O bypasses the page cache (O_DIRECT).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The 20-byte GET_ID serial (NUL padded).
    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    fn aligned(iovs: &[libc::iovec]) -> bool {
        iovs.iter().all(|v| {
            (v.iov_base as usize) % SECTOR_SIZE as usize == 0
                && v.iov_len % SECTOR_SIZE as usize == 0
        })
    }

    /// Reads from `offset` into the guest ranges `segs`; returns bytes read.
    pub fn read_into(
        &self,
        mem: &GuestMemoryMmap<()>,
        segs: &[GuestSegment],
        offset: u64,
    ) -> Result<usize, DiskError> {
        self.transfer(mem, segs, offset, false)
    }

    /// Writes the guest ranges `segs` at `offset`; returns bytes written.
    pub fn write_from(
        &self,
        mem: &GuestMemoryMmap<()>,
        segs: &[GuestSegment],
        offset: u64,
    ) -> Result<usize, DiskError> {
        self.transfer(mem, segs, offset, true)
    }

    /// Moves data between the guest ranges and the image, directly on guest memory (through
    /// an aligned bounce buffer only when O_DIRECT meets an unaligned guest buffer).
    fn transfer(
        &self,
        mem: &GuestMemoryMmap<()>,
        segs: &[GuestSegment],
        offset: u64,
        write: bool,
    ) -> Result<usize, DiskError> {
        let total = segs
            .iter()
            .try_fold(0usize, |sum, s| sum.checked_add(s.len))
            .unwrap_or(usize::MAX);
        if total > MAX_TRANSFER {
            return Err(DiskError::TooLarge(total as u64));
        }
        let mut iovs = Vec::with_capacity(segs.len());
        for seg in segs {
            iov::push_segment(mem, *seg, &mut iovs)?;
        }
        if self.direct && !Self::aligned(&iovs) {
            return self.bounce(mem, segs, offset, write);
        }
        self.vectored(&mut iovs, offset, write)
    }

    /// iovecs straight into guest memory for an asynchronous transfer of `segs` (see
    /// crate::uring), or `None` when it must go the synchronous way: a range outside guest
    /// memory (which that way fails with its error), more than [`MAX_TRANSFER`], or O_DIRECT
    /// on buffers not aligned for it (the bounce buffer).
    pub fn async_iovecs(
        &self,
        mem: &GuestMemoryMmap<()>,
        segs: &[GuestSegment],
    ) -> Option<Vec<libc::iovec>> {
        let total = segs
            .iter()
            .try_fold(0usize, |sum, s| sum.checked_add(s.len))?;
        if total > MAX_TRANSFER {
            return None;
        }
        let mut iovs = Vec::with_capacity(segs.len());
        for seg in segs {
            iov::push_segment(mem, *seg, &mut iovs).ok()?;
        }
        if iovs.len() > IOV_MAX || (self.direct && !Self::aligned(&iovs)) {
            return None;
        }
        Some(iovs)
    }

    /// Finishes a transfer over `iovs` at `offset` of which an asynchronous request moved
    /// only `done` bytes (a short read or write): the rest with preadv/pwritev. Returns the
    /// whole transfer's bytes.
    pub fn finish_transfer(
        &self,
        iovs: &mut [libc::iovec],
        offset: u64,
        done: usize,
        write: bool,
    ) -> Result<usize, DiskError> {
        iov::advance(iovs, 0, done);
        let rest = self.vectored(iovs, offset + done as u64, write)?;
        Ok(done + rest)
    }

    /// The image's fd (what the io_uring reads and writes).
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// preadv/pwritev until every iovec is consumed.
    fn vectored(
        &self,
        iovs: &mut [libc::iovec],
        mut offset: u64,
        write: bool,
    ) -> Result<usize, DiskError> {
        let total = iov::iov_len(iovs);
        let mut idx = iov::advance(iovs, 0, 0);
        let mut done = 0usize;
        while idx < iovs.len() {
            let end = (idx + IOV_MAX).min(iovs.len());
            let batch = &iovs[idx..end];
            let off = libc::off_t::try_from(offset).map_err(|_| DiskError::ShortIo)?;
            let ret = if write {
                // SAFETY: the iovecs point into mapped guest memory (kept alive by the
                // caller's memory guard) and their lengths were bounds-checked by vm-memory.
                unsafe {
                    libc::pwritev(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        off,
                    )
                }
            } else {
                // SAFETY: as above; the kernel writes only within each iovec's bounds.
                unsafe {
                    libc::preadv(
                        self.file.as_raw_fd(),
                        batch.as_ptr(),
                        batch.len() as libc::c_int,
                        off,
                    )
                }
            };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(DiskError::Io(err));
            }
            let n = ret as usize;
            if n == 0 {
                return Err(DiskError::ShortIo);
            }
            done += n;
            offset += n as u64;
            idx = iov::advance(iovs, idx, n);
        }
        debug_assert_eq!(done, total);
        Ok(done)
    }

    /// O_DIRECT path for unaligned guest buffers: go through an aligned buffer.
    fn bounce(
        &self,
        mem: &GuestMemoryMmap<()>,
        segs: &[GuestSegment],
        offset: u64,
        write: bool,
    ) -> Result<usize, DiskError> {
        let total: usize = segs.iter().map(|s| s.len).sum();
        let padded = total.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut raw = vec![0u8; padded + DIRECT_ALIGN];
        let skew = raw.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut raw[skew..skew + padded];
        if write {
            let mut pos = 0;
            for seg in segs {
                mem.read_slice(&mut buf[pos..pos + seg.len], seg.addr)
                    .map_err(|_| {
                        DiskError::Guest(iov::IovError::OutOfGuestMemory {
                            addr: seg.addr.0,
                            len: seg.len,
                        })
                    })?;
                pos += seg.len;
            }
        }
        let mut iovs = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: total.div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize,
        }];
        self.vectored(&mut iovs, offset, write)?;
        if !write {
            let mut pos = 0;
            for seg in segs {
                mem.write_slice(&buf[pos..pos + seg.len], seg.addr)
                    .map_err(|_| {
                        DiskError::Guest(iov::IovError::OutOfGuestMemory {
                            addr: seg.addr.0,
                            len: seg.len,
                        })
                    })?;
                pos += seg.len;
            }
        }
        Ok(total)
    }

    /// fdatasync.
    pub fn flush(&self) -> Result<(), DiskError> {
        self.file.sync_data().map_err(DiskError::Io)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: fallocate on an fd we own; no memory is passed.
        let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if ret == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Deallocates a byte range (advisory: unsupported filesystems are ignored).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(DiskError::Io(e)),
        }
    }

    /// Makes a byte range read back as zeroes. Where the filesystem has no way to do it
    /// (FALLOC_FL_ZERO_RANGE, or PUNCH_HOLE with `unmap`), writes the zeroes out: then
    /// `len` must be at most [`MAX_TRANSFER`].
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EOPNOTSUPP)
                    || e.raw_os_error() == Some(libc::ENOSYS) => {}
            Err(e) => return Err(DiskError::Io(e)),
        }
        if len > MAX_TRANSFER as u64 {
            return Err(DiskError::TooLarge(len));
        }
        // Fallback: write zeroes from a static aligned page.
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = (end - pos).min(ZEROES.0.len() as u64) as usize;
            let mut iovs = [libc::iovec {
                iov_base: ZEROES.0.as_ptr().cast_mut().cast(),
                iov_len: chunk,
            }];
            // pwritev only reads from the buffer, so pointing at immutable data is fine.
            self.vectored(&mut iovs, pos, true)?;
            pos += chunk as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;

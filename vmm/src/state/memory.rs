//! Guest RAM to and from a snapshot's memory file.
//!
//! The memory file is guest RAM in guest-physical order with the MMIO hole left out (the
//! memfd's own layout, as Firecracker's file is). On load it is copied into a fresh memfd,
//! which device processes can map as they map any guest RAM; a `MAP_PRIVATE` mapping of the
//! file could not be shared with them. Both directions copy only the parts that hold data
//! (`SEEK_DATA`/`SEEK_HOLE`), in the kernel (`copy_file_range`, falling back to
//! `pread`/`pwrite` where the two files' filesystems cannot), so never-touched guest pages
//! cost nothing and the file stays sparse.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::memory::{create_guest_ram, GuestRam, MemoryError};

/// Errors moving guest RAM to or from a memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// Opening, sizing, reading or writing.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// The file is not the VM's memory size.
    #[error(
        "the memory file {path} is {found} bytes; the snapshot's VM has {expected} bytes of RAM"
    )]
    Size {
        /// The file.
        path: String,
        /// Its size.
        found: u64,
        /// The VM's.
        expected: u64,
    },
    /// The new guest RAM.
    #[error(transparent)]
    Ram(#[from] MemoryError),
}

/// Bytes copied and the time it took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Copied {
    /// Bytes of data copied (holes skipped).
    pub bytes: u64,
    /// Microseconds.
    pub us: u64,
}

fn lseek(f: &File, off: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an fd the caller owns; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `off`.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Copies `[off, off + len)` of `src` to the same offsets of `dst`.
fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    let mut fallback = false;
    let mut buf = Vec::new();
    while done < len {
        let left = len - done;
        if !fallback {
            let mut off_in = (off + done) as libc::loff_t;
            let mut off_out = off_in;
            // SAFETY: both fds are valid; the offsets are locals the kernel updates.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    left.min(1 << 30) as usize,
                    0,
                )
            };
            if n > 0 {
                done += n as u64;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    fallback = true;
                    buf = vec![0u8; 1 << 20];
                }
                Some(libc::EINTR) => {}
                _ if n == 0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the source ended early",
                    ))
                }
                _ => return Err(e),
            }
            continue;
        }
        let chunk = left.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..chunk], off + done)?;
        dst.write_all_at(&buf[..chunk], off + done)?;
        done += chunk as u64;
    }
    Ok(())
}

/// Copies the data of `src`'s first `size` bytes into `dst` at the same offsets.
fn copy_data(src: &File, dst: &File, size: u64) -> std::io::Result<u64> {
    let mut off = 0u64;
    let mut bytes = 0u64;
    while off < size {
        let Some(start) = lseek(src, off, libc::SEEK_DATA)? else {
            break;
        };
        if start >= size {
            break;
        }
        let end = lseek(src, start, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .min(size);
        copy_range(src, dst, start, end - start)?;
        bytes += end - start;
        off = end;
    }
    Ok(bytes)
}

/// Writes guest RAM (`ram`, `size` bytes) to a new file at `path` (mode 0600; an existing
/// file is replaced).
pub fn save(ram: &GuestRam, size: u64, path: &Path) -> Result<Copied, MemoryFileError> {
    let t = std::time::Instant::now();
    let io = |e| {
        MemoryFileError::Io(
            format!("cannot write the memory file {}", path.display()),
            e,
        )
    };
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    f.set_len(size).map_err(io)?;
    let bytes = copy_data(&ram.memfd, &f, size).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(Copied {
        bytes,
        us: t.elapsed().as_micros() as u64,
    })
}

/// New guest RAM of `size` bytes (one memfd, as at boot) holding the memory file at `path`,
/// which must be exactly `size` bytes.
pub fn load(path: &Path, size: u64) -> Result<(GuestRam, Copied), MemoryFileError> {
    let t = std::time::Instant::now();
    let io = |e| MemoryFileError::Io(format!("cannot read the memory file {}", path.display()), e);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let meta = f.metadata().map_err(io)?;
    if !meta.is_file() || meta.len() != size {
        return Err(MemoryFileError::Size {
            path: path.display().to_string(),
            found: meta.len(),
            expected: size,
        });
    }
    let ram = create_guest_ram(size)?;
    let bytes = copy_data(&f, &ram.memfd, size).map_err(io)?;
    Ok((
        ram,
        Copied {
            bytes,
            us: t.elapsed().as_micros() as u64,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn memory_round_trips_through_a_sparse_file() {
        let size = 8 << 20;
        let ram = create_guest_ram(size).unwrap();
        ram.mem.write_obj(0x1234_5678u32, GuestAddress(0)).unwrap();
        ram.mem
            .write_slice(&[7u8; 4096], GuestAddress(5 << 20))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("skiff-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mem");
        let saved = save(&ram, size, &path).unwrap();
        // Only the touched pages were copied.
        assert!(saved.bytes < 1 << 20, "{} bytes copied", saved.bytes);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);
        let (back, _) = load(&path, size).unwrap();
        assert_eq!(
            back.mem.read_obj::<u32>(GuestAddress(0)).unwrap(),
            0x1234_5678
        );
        let mut page = [0u8; 4096];
        back.mem
            .read_slice(&mut page, GuestAddress(5 << 20))
            .unwrap();
        assert_eq!(page, [7u8; 4096]);
        let e = load(&path, size * 2).err().expect("wrong size").to_string();
        assert!(
            e.contains("is 8388608 bytes; the snapshot's VM has 16777216"),
            "{e}"
        );
        let e = load(&dir.join("absent"), size).err().expect("absent file");
        assert!(crate::error_chain(&e).contains("No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

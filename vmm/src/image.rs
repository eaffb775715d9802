//! The VMM opens each drive's image itself and holds its lock, then hands the open fd to
//! the skiff-blk it starts (`--image-fd`). flock locks belong to the open file
//! description, so every skiff-blk given this fd shares the VMM's lock: a replacement
//! skiff-blk can start while the old one still serves (live upgrade), and another VM that
//! opens the same image is still refused.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Errors opening a drive image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be opened.
    #[error("cannot open image {0}")]
    Open(String, #[source] std::io::Error),
    /// Another process holds a conflicting lock.
    #[error("image {0} is locked by another process (another VM uses it)")]
    Locked(String),
    /// flock failed otherwise.
    #[error("cannot lock image {0}")]
    Lock(String, #[source] std::io::Error),
}

/// Opens `path` (read-write, or read-only) and takes an exclusive (shared for read-only)
/// lock without blocking. The fd is close-on-exec: it reaches a device process only
/// through [`crate::device_process::DeviceProcess::spawn_with_fds`].
pub fn open_locked(path: &Path, read_only: bool) -> Result<File, ImageError> {
    let shown = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| ImageError::Open(shown.clone(), e))?;
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on an fd we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            ImageError::Locked(shown)
        } else {
            ImageError::Lock(shown, err)
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_readers_share() {
        let dir = std::env::temp_dir().join(format!("skiff-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let a = open_locked(&p, false).unwrap();
        assert!(matches!(open_locked(&p, false), Err(ImageError::Locked(_))));
        assert!(matches!(open_locked(&p, true), Err(ImageError::Locked(_))));
        drop(a);
        let r1 = open_locked(&p, true).unwrap();
        let r2 = open_locked(&p, true).unwrap();
        assert!(matches!(open_locked(&p, false), Err(ImageError::Locked(_))));
        drop((r1, r2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! skiff-blk's asynchronous image I/O: one io_uring per request queue, restricted to what
//! the data path needs.
//!
//! A ring is created by the main thread before any seccomp filter is installed and before
//! the first frontend message, disabled (`IORING_SETUP_R_DISABLED`) and then restricted
//! (`IORING_REGISTER_RESTRICTIONS`, as Firecracker does for its async block engine):
//! submissions may only be READV or WRITEV, with no flags, and no register operation is
//! allowed after that. The ring can do no more than the preadv and pwritev the workers'
//! seccomp filter already allows them; that filter allows io_uring_enter only
//! (io_uring_setup and io_uring_register are not in it).
//!
//! The image is not a registered file: a ring outlives its process for a moment (the kernel
//! tears it down asynchronously), and a registered image would keep the image's lock with
//! it, so a device process restarted at once on the same image by path would find it
//! locked.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{cqueue, opcode, register::Restriction, squeue, types, IoUring};

/// Errors raised while setting a ring up or using it.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// A step of the setup failed (the kernel has no io_uring, or it is disabled).
    #[error("io_uring: {0}")]
    Setup(&'static str, #[source] io::Error),
    /// io_uring_enter failed for another reason than an interruption.
    #[error("io_uring_enter failed")]
    Enter(#[source] io::Error),
    /// Waiting on the ring and the kick eventfd failed.
    #[error("ppoll on the io_uring and the kick eventfd failed")]
    Poll(#[source] io::Error),
}

/// One request queue's ring.
pub struct ImageRing {
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    entries: u32,
    image: RawFd,
}

impl ImageRing {
    /// A ring of `entries` submissions for I/O on `image` (an fd this process keeps open
    /// for as long as the ring).
    pub fn new(image: RawFd, entries: u32) -> Result<Self, UringError> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_clamp()
            .build(entries)
            .map_err(|e| UringError::Setup("io_uring_setup", e))?;
        let sub = ring.submitter();
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
        ];
        sub.register_restrictions(&mut allowed)
            .map_err(|e| UringError::Setup("restricting the ring", e))?;
        sub.register_enable_rings()
            .map_err(|e| UringError::Setup("enabling the ring", e))?;
        let entries = ring.params().sq_entries();
        Ok(ImageRing {
            ring,
            entries,
            image,
        })
    }

    /// Submissions the ring holds.
    pub fn capacity(&self) -> u32 {
        self.entries
    }

    /// Queues a read (or write) of the buffers `iovs` at `offset`, tagged `tag`; false when
    /// the submission queue is full.
    ///
    /// # Safety
    ///
    /// `iovs` and the memory it points to must stay valid and untouched by anything else
    /// until the completion tagged `tag` has been reaped.
    pub unsafe fn push(
        &mut self,
        write: bool,
        iovs: &[libc::iovec],
        offset: u64,
        tag: u64,
    ) -> bool {
        let fd = types::Fd(self.image);
        let n = u32::try_from(iovs.len()).unwrap_or(u32::MAX);
        let entry = if write {
            opcode::Writev::new(fd, iovs.as_ptr(), n)
                .offset(offset)
                .build()
        } else {
            opcode::Readv::new(fd, iovs.as_ptr(), n)
                .offset(offset)
                .build()
        };
        // SAFETY: the caller keeps the iovecs and their buffers valid until the completion.
        unsafe { self.ring.submission().push(&entry.user_data(tag)) }.is_ok()
    }

    /// Submits what was queued, without waiting.
    pub fn submit(&mut self) -> Result<(), UringError> {
        self.submit_and_wait(0)
    }

    /// Submissions queued that the kernel has not taken yet.
    pub fn unsubmitted(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Whether completions wait to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// The ring's fd: readable (poll) when completions wait.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Submits what was queued and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> Result<(), UringError> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) =>
                {
                    // Interrupted, or the completion queue is full: what completed is
                    // reaped by the caller, which then waits again.
                    if want == 0 || !self.ring.completion().is_empty() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(UringError::Enter(e)),
            }
        }
    }

    /// The completions so far: (tag, result: bytes or -errno).
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}

/// Whether this process started under a seccomp filter it inherited (Seccomp: 2 in
/// /proc/self/status, read before skiff-blk installs its own): its parent's, which allows
/// no io_uring_setup. That is a skiff not under skiff-jailer starting a device process once
/// its own filter is in force (an upgrade, a restart after a crash); under skiff-jailer the
/// launcher starts device processes, unfiltered until their own filters.
pub fn inherited_seccomp() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(k, v)| k == "Seccomp" && v.trim() != "0")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn reads_and_writes_the_image() {
        let f = tempfile();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        let mut r = ImageRing::new(f.as_raw_fd(), 8).unwrap();
        let mut out = vec![9u8; 4096];
        let mut back = vec![0u8; 4096];
        let w = [iov(&mut out)];
        let rd = [iov(&mut back)];
        // SAFETY: the buffers outlive the completions reaped below.
        assert!(unsafe { r.push(true, &w, 4096, 1) });
        r.submit_and_wait(1).unwrap();
        let mut done = Vec::new();
        r.reap(&mut done);
        assert_eq!(done, vec![(1, 4096)]);
        // SAFETY: as above.
        assert!(unsafe { r.push(false, &rd, 4096, 2) });
        r.submit_and_wait(1).unwrap();
        done.clear();
        r.reap(&mut done);
        assert_eq!(done, vec![(2, 4096)]);
        assert!(back.iter().all(|&b| b == 9));
    }

    #[test]
    fn anything_but_readv_and_writev_is_refused() {
        let f = tempfile();
        let r = ImageRing::new(f.as_raw_fd(), 4).unwrap();
        // No further registration: no file can be registered.
        let other = tempfile();
        assert!(r
            .ring
            .submitter()
            .register_files(&[other.as_raw_fd()])
            .is_err());
        let mut r = r;
        // A fsync is not a permitted operation: the kernel fails it.
        let entry = opcode::Fsync::new(types::Fd(f.as_raw_fd()))
            .build()
            .user_data(5);
        // SAFETY: no buffers are involved.
        unsafe { r.ring.submission().push(&entry) }.unwrap();
        r.submit_and_wait(1).unwrap();
        let mut done = Vec::new();
        r.reap(&mut done);
        assert_eq!(done, vec![(5, -libc::EACCES)]);
        // A read with a flag (here: linked to the next): no flag is allowed.
        let mut buf = vec![0u8; 512];
        let v = [iov(&mut buf)];
        let entry = opcode::Readv::new(types::Fd(f.as_raw_fd()), v.as_ptr(), 1)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(6);
        // SAFETY: `buf` outlives the completion reaped below.
        unsafe { r.ring.submission().push(&entry) }.unwrap();
        r.submit_and_wait(1).unwrap();
        done.clear();
        r.reap(&mut done);
        assert_eq!(done, vec![(6, -libc::EACCES)]);
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "skiff-uring-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}

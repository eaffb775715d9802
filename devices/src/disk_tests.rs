//! `DiskImage::open` / `DiskImage::from_fd` (`--image` / `--image-fd`): access modes, file
//! types, FD_CLOEXEC/O_DIRECT and flock sharing through one open file description.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::tempfile::TempFile;

use super::*;

const SECTORS: u64 = 8;

fn image() -> TempFile {
    let tmp = TempFile::new().expect("temp file");
    tmp.as_file()
        .write_all(&[0x5a; SECTORS as usize * 512])
        .expect("fill image");
    tmp
}

fn rw() -> DiskOptions {
    DiskOptions::default()
}

fn ro() -> DiskOptions {
    DiskOptions {
        read_only: true,
        ..DiskOptions::default()
    }
}

/// Opens `tmp` as the VMM does (without O_CLOEXEC, as a child would inherit it) and
/// takes the drive's flock on that open file description.
fn vmm_open(tmp: &TempFile, write: bool, lock: libc::c_int) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(tmp.as_path())
        .expect("open image");
    // SAFETY: flock on an fd we own; no memory is passed.
    let ret = unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) };
    assert_eq!(ret, 0, "flock: {}", io::Error::last_os_error());
    file
}

/// A new fd on the same open file description, owned by the caller.
fn dup(file: &File) -> RawFd {
    file.try_clone().expect("dup").into_raw_fd()
}

fn fd_flags(disk: &DiskImage) -> (libc::c_int, libc::c_int) {
    let fd = disk.file.as_raw_fd();
    // SAFETY: F_GETFD/F_GETFL only read the flags of an open fd.
    unsafe {
        (
            libc::fcntl(fd, libc::F_GETFD),
            libc::fcntl(fd, libc::F_GETFL),
        )
    }
}

#[test]
fn read_write_fd_is_taken_over() {
    let tmp = image();
    let by_path = DiskImage::open(tmp.as_path(), &rw()).expect("open by path");
    let serial = *by_path.serial();
    assert_eq!(by_path.name(), tmp.as_path().display().to_string());
    drop(by_path);

    let vmm = vmm_open(&tmp, true, libc::LOCK_EX);
    let fd = dup(&vmm);
    let disk = DiskImage::from_fd(fd, &rw()).expect("from fd");
    assert_eq!(disk.sectors(), SECTORS);
    assert!(!disk.read_only());
    assert_eq!(disk.serial(), &serial, "same default serial as --image");
    assert_eq!(
        disk.name(),
        format!("{} (--image-fd {fd})", tmp.as_path().display())
    );
    let (fdfl, fl) = fd_flags(&disk);
    assert_ne!(fdfl & libc::FD_CLOEXEC, 0, "FD_CLOEXEC set");
    assert_eq!(fl & libc::O_DIRECT, 0);
    disk.flush().expect("fdatasync");
}

#[test]
fn read_only_fd_needs_read_only() {
    let tmp = image();
    let vmm = vmm_open(&tmp, false, libc::LOCK_SH);
    let fd = vmm.as_raw_fd();
    let err = DiskImage::from_fd(fd, &rw()).expect_err("O_RDONLY without --read-only");
    let msg = err.to_string();
    assert!(matches!(err, DiskError::FdMode { .. }), "{msg}");
    assert!(
        msg.starts_with(&format!(
            "--image-fd {fd} ({}) is opened O_RDONLY;",
            tmp.as_path().display()
        )),
        "{msg}"
    );
    assert!(msg.contains("--read-only"), "{msg}");
    // Refused before being taken over: still open, still ours.
    // SAFETY: F_GETFD only reads the flags of descriptor `fd`.
    assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);

    let disk = DiskImage::from_fd(dup(&vmm), &ro()).expect("O_RDONLY with --read-only");
    assert!(disk.read_only());
    assert_eq!(disk.sectors(), SECTORS);
    // Shared locks: another read-only user is fine, a read-write one is not.
    DiskImage::open(tmp.as_path(), &ro()).expect("second reader");
    let err = DiskImage::open(tmp.as_path(), &rw()).expect_err("writer");
    assert!(matches!(err, DiskError::Locked(_)), "{err}");

    // An O_RDWR fd also serves a read-only drive.
    let tmp = image();
    let vmm = vmm_open(&tmp, true, libc::LOCK_SH);
    let disk = DiskImage::from_fd(dup(&vmm), &ro()).expect("O_RDWR with --read-only");
    assert!(disk.read_only());
}

#[test]
fn lock_is_shared_by_the_description_only() {
    let tmp = image();
    let vmm = vmm_open(&tmp, true, libc::LOCK_EX);
    let old = DiskImage::from_fd(dup(&vmm), &rw()).expect("first skiff-blk");
    let new = DiskImage::from_fd(dup(&vmm), &rw()).expect("second skiff-blk, same description");
    assert_eq!(old.serial(), new.serial());

    let err = DiskImage::open(tmp.as_path(), &rw()).expect_err("separate open");
    assert!(matches!(err, DiskError::Locked(_)), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "image {} is locked by another process",
            tmp.as_path().display()
        )
    );
    let err = DiskImage::open(tmp.as_path(), &ro()).expect_err("separate read-only open");
    assert!(matches!(err, DiskError::Locked(_)), "{err}");

    // Another VMM's fd: its own description, so a genuine conflict.
    let other = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.as_path())
        .expect("open");
    let fd = other.into_raw_fd();
    let err = DiskImage::from_fd(fd, &rw()).expect_err("other description");
    assert_eq!(
        err.to_string(),
        format!(
            "image {} (--image-fd {fd}) is locked by another process",
            tmp.as_path().display()
        )
    );

    // The lock lives as long as any fd on the description: the skiff-blks going away
    // leaves it with the VMM.
    drop(old);
    drop(new);
    let err = DiskImage::open(tmp.as_path(), &rw()).expect_err("VMM still holds it");
    assert!(matches!(err, DiskError::Locked(_)), "{err}");
    drop(vmm);
    DiskImage::open(tmp.as_path(), &rw()).expect("unlocked once the VMM closes it");
}

#[test]
fn direct_follows_the_option() {
    let tmp = image();
    let vmm = vmm_open(&tmp, true, libc::LOCK_EX);
    let direct = DiskOptions {
        direct: true,
        ..DiskOptions::default()
    };
    match DiskImage::from_fd(dup(&vmm), &direct) {
        Ok(disk) => {
            assert_ne!(fd_flags(&disk).1 & libc::O_DIRECT, 0, "O_DIRECT set");
            // The flag is on the shared description: the VMM's fd sees it too.
            // SAFETY: F_GETFL only reads the flags of an open fd.
            let fl = unsafe { libc::fcntl(vmm.as_raw_fd(), libc::F_GETFL) };
            assert_ne!(fl & libc::O_DIRECT, 0);
            // Without --direct it is cleared again (unaligned buffers need no bounce).
            let plain = DiskImage::from_fd(dup(&vmm), &rw()).expect("without --direct");
            assert_eq!(fd_flags(&plain).1 & libc::O_DIRECT, 0, "O_DIRECT cleared");
        }
        // A filesystem without O_DIRECT support for the temp dir.
        Err(e) => {
            let msg = e.to_string();
            assert!(matches!(e, DiskError::FdDirect { .. }), "{msg}");
            assert!(msg.contains("cannot set O_DIRECT"), "{msg}");
        }
    }
}

#[test]
fn bad_fds_are_refused_naming_the_option() {
    let err = |fd: RawFd, opts: &DiskOptions| DiskImage::from_fd(fd, opts).unwrap_err().to_string();
    assert_eq!(
        err(2, &rw()),
        "--image-fd 2 is a standard stream, not an image"
    );
    assert!(err(1_000_000, &rw()).starts_with("--image-fd 1000000 is not an open file descriptor"));

    let dir = File::open("/").expect("open /");
    let msg = err(dir.as_raw_fd(), &ro());
    assert_eq!(
        msg,
        format!(
            "--image-fd {} (/) is a directory, not a regular file or a block device",
            dir.as_raw_fd()
        )
    );

    let tmp = image();
    let wo = OpenOptions::new()
        .write(true)
        .open(tmp.as_path())
        .expect("open write-only");
    let msg = err(wo.as_raw_fd(), &rw());
    assert!(
        msg.contains("is opened O_WRONLY; skiff-blk needs O_RDWR"),
        "{msg}"
    );
    let msg = err(wo.as_raw_fd(), &ro());
    assert!(
        msg.contains("is opened O_WRONLY; skiff-blk needs O_RDONLY or O_RDWR"),
        "{msg}"
    );

    let path = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(tmp.as_path())
        .expect("open O_PATH");
    let msg = err(path.as_raw_fd(), &ro());
    assert!(msg.contains("is opened O_PATH"), "{msg}");

    let (r, w) = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_CLOEXEC)
        .map(|e| (e.as_raw_fd(), e))
        .expect("eventfd");
    let msg = err(r, &rw());
    assert!(
        msg.contains("not a regular file or a block device"),
        "{msg}"
    );
    drop(w);
}

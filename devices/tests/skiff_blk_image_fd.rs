//! skiff-blk `--image-fd` as a process: exit status and stderr for bad fds, and an image
//! the test opens and locks as the VMM does, served by two skiff-blk at once through the
//! one open file description while `--image PATH` is refused as locked.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use vmm_sys_util::tempdir::TempDir;

mod common;
use common::{stop, wait_listening};

const BIN: &str = env!("CARGO_BIN_EXE_skiff-blk");

fn command(socket: &Path, args: &[&str], fd: Option<RawFd>) -> std::process::Command {
    common::command(BIN, socket, args, fd)
}

fn run(args: &[&str], fd: Option<RawFd>) -> (i32, String) {
    common::run(BIN, args, fd)
}

fn image(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.as_path().join("disk.img");
    File::create(&path)
        .and_then(|mut f| f.write_all(&[0u8; 64 * 512]))
        .expect("create image");
    path
}

/// Opens and flocks the image as the VMM does (close-on-exec; `command` dup2s it).
fn vmm_open(path: &Path, write: bool, lock: libc::c_int) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .expect("open image");
    // SAFETY: flock on an fd we own; no memory is passed.
    let ret = unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) };
    assert_eq!(ret, 0, "flock: {}", io::Error::last_os_error());
    file
}

#[test]
fn bad_image_fds_exit_1_naming_the_option() {
    let (code, err) = run(&["--image-fd", "65000"], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-blk: --image-fd 65000 is not an open file descriptor"),
        "{err}"
    );
    let (code, err) = run(&["--image-fd", "2"], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-blk: --image-fd 2 is a standard stream"),
        "{err}"
    );

    let dir = TempDir::new().expect("temp dir");
    let path = image(&dir);
    let ro = vmm_open(&path, false, libc::LOCK_SH);
    let (code, err) = run(&["--image-fd", "100"], Some(ro.as_raw_fd()));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "skiff-blk: --image-fd 100 ({}) is opened O_RDONLY; skiff-blk needs O_RDWR",
            path.display()
        )),
        "{err}"
    );
    let (code, err) = run(
        &["--image-fd", "100", "--metrics-fd", "100"],
        Some(ro.as_raw_fd()),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-blk: invalid --image-fd 100: it is also the --metrics-fd"),
        "{err}"
    );
}

#[test]
fn image_and_image_fd_are_exclusive() {
    let (code, err) = run(&["--image", "/a.img", "--image-fd", "5"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("'--image <PATH>' cannot be used with '--image-fd <N>'"),
        "{err}"
    );
    let (code, err) = run(&[], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("<--image <PATH>|--image-fd <N>>"), "{err}");
}

#[test]
fn two_backends_share_the_vmm_lock() {
    let dir = TempDir::new().expect("temp dir");
    let path = image(&dir);
    let vmm = vmm_open(&path, true, libc::LOCK_EX);
    let spawn = |name: &str| {
        let socket = dir.as_path().join(name);
        let mut child = command(&socket, &["--image-fd", "100"], Some(vmm.as_raw_fd()))
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn skiff-blk");
        wait_listening(&mut child, &socket);
        child
    };
    let old = spawn("old.sock");
    let new = spawn("new.sock");

    let (code, err) = run(&["--image", path.to_str().expect("utf-8 path")], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "skiff-blk: image {} is locked by another process",
            path.display()
        )),
        "{err}"
    );
    stop(old);
    stop(new);
}

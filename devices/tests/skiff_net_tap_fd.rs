//! skiff-net `--tap-fd` as a process: exit status and stderr for bad fds, and (as root) a
//! TAP opened here, inherited by skiff-net, that outlives it. Root-only parts fail when CI
//! is set and are skipped loudly otherwise (see tapdev::test_utils). The TAP is
//! named `sktfd<pid>x`, non-persistent, deleted by the kernel when its last fd closes.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use vmm_sys_util::tempdir::TempDir;

mod common;
use tapdev::test_utils::can_create_taps;
use tapdev::{IFF_NO_PI, IFF_TAP, IFF_VNET_HDR};

const BIN: &str = env!("CARGO_BIN_EXE_skiff-net");

fn command(socket: &Path, args: &[&str], fd: Option<RawFd>) -> std::process::Command {
    common::command(BIN, socket, args, fd)
}

fn run(args: &[&str], fd: Option<RawFd>) -> (i32, String) {
    common::run(BIN, args, fd)
}

#[test]
fn bad_tap_fds_exit_1_naming_the_option() {
    let (code, err) = run(&["--tap-fd", "65000"], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-net: --tap-fd 65000 is not an open file descriptor"),
        "{err}"
    );

    let (code, err) = run(&["--tap-fd", "2"], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-net: --tap-fd 2 is a standard stream"),
        "{err}"
    );

    let file = File::open(BIN).expect("open a regular file");
    let (code, err) = run(&["--tap-fd", "100"], Some(file.as_raw_fd()));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-net: --tap-fd 100 is not a TUN/TAP file descriptor"),
        "{err}"
    );
}

#[test]
fn tap_and_tap_fd_are_exclusive() {
    let (code, err) = run(&["--tap", "t0", "--tap-fd", "5"], None);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("'--tap <NAME>' cannot be used with '--tap-fd <N>'"),
        "{err}"
    );
    let (code, err) = run(&[], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("<--tap <NAME>|--tap-fd <N>>"), "{err}");
}

/// Opens (creating) TAP `name` as the VMM does (non-blocking, close-on-exec).
fn vmm_tap(name: &str, flags: libc::c_short) -> File {
    assert!(!exists(name), "{name} exists already");
    tapdev::attach(name, flags).expect("TUNSETIFF")
}

fn tap_flags(file: &File) -> libc::c_short {
    let mut req = tapdev::IfReq::new("", 0);
    // SAFETY: TUNGETIFF writes a `struct ifreq` (40 bytes, as IfReq) into `req`, which
    // lives across the call.
    let ret = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            tapdev::TUNGETIFF as _,
            &mut req as *mut tapdev::IfReq,
        )
    };
    assert_eq!(ret, 0, "TUNGETIFF: {}", io::Error::last_os_error());
    req.flags
}

/// Whether the interface has disappeared, waiting up to 2 s: the kernel unregisters a
/// non-persistent TAP asynchronously after its last fd is closed.
fn gone(name: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while exists(name) {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn skiff_net_serves_an_inherited_tap_and_leaves_it_to_the_vmm() {
    if !can_create_taps("skiff_net_serves_an_inherited_tap_and_leaves_it_to_the_vmm") {
        return;
    }
    let name = format!("sktfd{}x", std::process::id());
    let tap = vmm_tap(&name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    let before = tap_flags(&tap);
    let dir = TempDir::new().expect("temp dir");
    let socket = dir.as_path().join("net.sock");

    let mut child = command(&socket, &["--tap-fd", "100"], Some(tap.as_raw_fd()))
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn skiff-net");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let listening = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => {
                let done = line.contains("listening on");
                log.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    child.kill().expect("kill skiff-net");
    child.wait().expect("reap skiff-net");
    assert!(listening, "skiff-net did not start:\n{}", log.join("\n"));
    let expected = format!("TAP {name} (--tap-fd 100) with 1 queue pair(s)");
    assert!(
        log.iter().any(|l| l.contains(&expected)),
        "no '{expected}' in:\n{}",
        log.join("\n")
    );

    // skiff-net is gone: the TAP is still there, as the VMM left it.
    assert!(exists(&name));
    assert_eq!(tap_flags(&tap), before);
    drop(tap);
    assert!(gone(&name), "{name} left behind");
}

#[test]
fn skiff_net_refuses_a_tap_without_vnet_hdr() {
    if !can_create_taps("skiff_net_refuses_a_tap_without_vnet_hdr") {
        return;
    }
    let name = format!("sktfd{}y", std::process::id());
    let tap = vmm_tap(&name, IFF_TAP | IFF_NO_PI);
    let (code, err) = run(&["--tap-fd", "100"], Some(tap.as_raw_fd()));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "skiff-net: --tap-fd 100 (interface {name}) was opened without IFF_VNET_HDR"
        )),
        "{err}"
    );
    drop(tap);
    assert!(gone(&name), "{name} left behind");
}

//! Stands in for skiff under skiff-jailer in the launcher test (`jailer_launcher_...` in
//! tests/tests/jail/launcher.rs): plays a compromised VMM against the launcher socket it is
//! given (`--launcher-fd N`), then has one real skiff-blk started and stopped.
//!
//! Prints one line per step on stdout: `REFUSED <case>: <message>`, `OK <case>`, `FAIL
//! <case>: <why>`, and `DEVICE <pid>` once skiff-blk runs, after which it waits for a line on
//! stdin (the test checks the device's cell meanwhile). Exits 0 when every step went as
//! wanted.

use std::io::BufRead;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use sandbox::launch::{LaunchError, LauncherClient};

fn socketpair(ty: libc::c_int) -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: room for the two fds socketpair writes.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, p.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: fresh fds owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

/// The same file at a number of 100 or more, out of the way of the low numbers tried.
fn high(fd: OwnedFd) -> OwnedFd {
    // SAFETY: F_DUPFD_CLOEXEC on our own fd returns a new fd or -1.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
    assert!(n >= 100, "F_DUPFD");
    // SAFETY: a fresh fd owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(n) }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let fd: i32 = args
        .iter()
        .position(|a| a == "--launcher-fd")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .expect("--launcher-fd N");
    let image = args
        .iter()
        .position(|a| a == "--image")
        .and_then(|i| args.get(i + 1))
        .expect("--image PATH")
        .clone();
    let launcher = LauncherClient::from_raw_fd(fd).expect("the launcher socket");
    let mut ok = true;
    // Fds at the low numbers where the launcher's own descriptors sit (its status pipe, the
    // program it execs): each launch must start a skiff-blk that serves, or say why.
    let img = high(OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&image)
            .expect("the staged image"),
    ));
    let free = |n: i32| {
        // SAFETY: F_GETFD only queries whether `n` is open.
        let flags = unsafe { libc::fcntl(n, libc::F_GETFD) };
        flags < 0
    };
    let mut n = 4;
    while n < 24 {
        let (front, back) = socketpair(libc::SOCK_STREAM);
        let (front, back) = (high(front), high(back));
        let (a, b) = (n, n + 1);
        n += 2;
        if !free(a) || !free(b) {
            continue;
        }
        // SAFETY: dup2 onto numbers checked free; the new fds are owned below.
        let (sock, image_fd) = unsafe {
            libc::dup2(back.as_raw_fd(), a);
            libc::dup2(img.as_raw_fd(), b);
            (OwnedFd::from_raw_fd(a), OwnedFd::from_raw_fd(b))
        };
        drop(back);
        let args = vec![
            "--socket-fd".to_string(),
            a.to_string(),
            "--image-fd".to_string(),
            b.to_string(),
        ];
        let case = format!("fds at {a} and {b}");
        match launcher.launch(
            Path::new("skiff-blk"),
            &args,
            &[sock.as_fd(), image_fd.as_fd()],
        ) {
            Ok((pid, pidfd)) => {
                drop((sock, image_fd));
                std::thread::sleep(std::time::Duration::from_millis(300));
                let before = launcher.status(pid);
                drop(front);
                // Ends on hang-up: the pidfd says when (10 s at most, on a busy host).
                let mut p = libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one initialised pollfd.
                unsafe { libc::poll(&mut p, 1, 10_000) };
                match (before, launcher.status(pid)) {
                    (Ok(None), Ok(Some(0))) => println!("OK {case}"),
                    other => {
                        println!("FAIL {case}: status while served, after hang-up: {other:?}");
                        ok = false;
                    }
                }
            }
            Err(e) => {
                println!("FAIL {case}: {e}");
                ok = false;
            }
        }
    }
    drop(img);
    let mut refused = |case: &str, r: Result<(u32, OwnedFd), LaunchError>| match r {
        Err(LaunchError::Refused(m)) => println!("REFUSED {case}: {m}"),
        Err(e) => {
            println!("FAIL {case}: {e}");
            ok = false;
        }
        Ok((pid, _)) => {
            println!("FAIL {case}: started pid {pid}");
            ok = false;
        }
    };
    // Programs outside the cell's /bin, or not there.
    for bad in ["../../bin/sh", "/bin/sh", "sh", "skiff-blk/..", ""] {
        refused(bad, launcher.launch(Path::new(bad), &[], &[]));
    }
    // A program that is there, but a request skiff cannot make legitimately: an fd number
    // the device cannot get.
    let (a, _b) = socketpair(libc::SOCK_STREAM);
    let high = {
        // SAFETY: F_DUPFD_CLOEXEC on our own fd returns a new fd or -1.
        let n = unsafe { libc::fcntl(a.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 2000) };
        // SAFETY: a fresh fd (or the failure is caught by the launcher refusing fd -1).
        unsafe { OwnedFd::from_raw_fd(n) }
    };
    refused(
        "fd-number-2000",
        launcher.launch(Path::new("skiff-blk"), &[], &[high.as_fd()]),
    );
    // The seccomp choice is the operator's (built-in here), and the launcher socket itself
    // is never handed to a device.
    refused(
        "no-seccomp",
        launcher.launch(Path::new("skiff-blk"), &["--no-seccomp".into()], &[]),
    );
    // SAFETY: fd 3 is the launcher socket, open for the whole run.
    let own = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    refused(
        "the launcher socket",
        launcher.launch(Path::new("skiff-blk"), &[], &[own]),
    );
    // Status and kill of processes that are not the launcher's children.
    for pid in [1u32, std::process::id()] {
        match launcher.status(pid) {
            Err(LaunchError::Refused(m)) => println!("REFUSED status {pid}: {m}"),
            other => {
                println!("FAIL status {pid}: {other:?}");
                ok = false;
            }
        }
        match launcher.kill(pid) {
            Err(LaunchError::Refused(m)) => println!("REFUSED kill {pid}: {m}"),
            other => {
                println!("FAIL kill {pid}: {other:?}");
                ok = false;
            }
        }
    }
    // A real device process: skiff-blk on a socket pair and the staged image.
    let (front, back) = socketpair(libc::SOCK_STREAM);
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .expect("the staged image");
    let blk_args = vec![
        "--socket-fd".to_string(),
        back.as_raw_fd().to_string(),
        "--image-fd".to_string(),
        img.as_raw_fd().to_string(),
    ];
    match launcher.launch(
        Path::new("skiff-blk"),
        &blk_args,
        &[back.as_fd(), img.as_fd()],
    ) {
        Ok((pid, pidfd)) => {
            drop(back);
            println!("OK launch skiff-blk");
            println!("DEVICE {pid}");
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            match launcher.status(pid) {
                Ok(None) => println!("OK running"),
                other => {
                    println!("FAIL status of the device: {other:?}");
                    ok = false;
                }
            }
            // Hanging up ends it (it serves one frontend); the pidfd says when.
            drop(front);
            let mut p = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one initialised pollfd.
            let n = unsafe { libc::poll(&mut p, 1, 10_000) };
            match (n, launcher.status(pid)) {
                (1, Ok(Some(st))) => println!("OK ended, status {st}"),
                other => {
                    println!("FAIL the device did not end when its frontend hung up: {other:?}");
                    ok = false;
                }
            }
        }
        Err(e) => {
            println!("FAIL launch skiff-blk: {e}");
            ok = false;
        }
    }
    std::process::exit(if ok { 0 } else { 1 });
}

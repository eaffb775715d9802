//! Each shipped filter, installed in a forked child: what an attacker would try dies by
//! SIGSYS (wait status checked, and the report line names the call), and what the thread
//! needs still works.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use sandbox::filters::{kvm, tun};
use sandbox::{SeccompChoice, ThreadFilters};

const ALL: &[&str] = &[
    "vmm",
    "vmm_launched",
    "api",
    "vcpu",
    "reaper",
    "blk_main",
    "blk_worker",
    "net_main",
    "net_worker",
];

fn filters() -> ThreadFilters {
    ThreadFilters::load(&SeccompChoice::BuiltIn, "filter-test", ALL).expect("built-in filters")
}

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Exit(i32),
    Signal(i32),
}

/// Runs `body` in a forked child under filter `kind` (stderr into a pipe) and returns how
/// it ended and what it wrote on stderr. `body` returns the exit code.
fn in_child(kind: &str, body: impl FnOnce() -> i32) -> (End, String) {
    let f = filters();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fork; the child only installs the filter, runs body and _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: in the child: stderr to the pipe, then the filter and the test body.
        unsafe {
            libc::dup2(fds[1], 2);
            if f.install(kind).is_err() {
                libc::_exit(100);
            }
            let code = body();
            libc::_exit(code);
        }
    }
    // SAFETY: the parent owns both ends; the write end closes here.
    let mut reader = unsafe {
        libc::close(fds[1]);
        std::fs::File::from_raw_fd(fds[0])
    };
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let mut err = String::new();
    let _ = reader.read_to_string(&mut err);
    let end = if libc::WIFSIGNALED(status) {
        End::Signal(libc::WTERMSIG(status))
    } else {
        End::Exit(libc::WEXITSTATUS(status))
    };
    (end, err)
}

/// `body` must kill the child by SIGSYS with a report naming `call`.
fn dies(kind: &str, call: &str, body: impl FnOnce() -> i32) {
    let (end, err) = in_child(kind, body);
    assert_eq!(
        end,
        End::Signal(libc::SIGSYS),
        "filter {kind}: {call} must die by SIGSYS (stderr: {err})"
    );
    assert!(
        err.contains(&format!("({call})")) && err.contains(&format!("(filter {kind})")),
        "filter {kind}: the report must name {call} and the filter: {err}"
    );
}

/// `body` must run to its end (exit 0) under filter `kind`.
fn works(kind: &str, what: &str, body: impl FnOnce() -> i32) {
    let (end, err) = in_child(kind, body);
    assert_eq!(
        end,
        End::Exit(0),
        "filter {kind}: {what} must work (stderr: {err})"
    );
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn exec_sh() -> i32 {
    let path = c"/bin/sh";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: valid NUL-terminated path and argument arrays.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    1
}

fn open_shadow() -> i32 {
    // SAFETY: a NUL-terminated path.
    let fd = unsafe { libc::open(c"/etc/shadow".as_ptr(), libc::O_RDONLY) };
    if fd >= 0 {
        2
    } else {
        3
    }
}

fn inet_socket() -> i32 {
    // SAFETY: socket takes no pointers.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    1
}

fn ptrace() -> i32 {
    // SAFETY: PTRACE_ATTACH to pid 1 (refused or trapped; no memory passed).
    unsafe { libc::ptrace(libc::PTRACE_ATTACH, 1, 0, 0) };
    1
}

fn mount() -> i32 {
    // SAFETY: NUL-terminated strings; the call is refused or trapped.
    unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/mnt".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    1
}

fn ioctl_on(fd: &OwnedFd, req: u64) -> i32 {
    // SAFETY: an ioctl on an eventfd: the kernel answers ENOTTY unless the filter traps;
    // no memory is passed.
    unsafe { libc::ioctl(fd.as_raw_fd(), req as _, 0) };
    0
}

#[test]
fn no_filter_lets_an_attacker_exec_open_or_reach_the_network() {
    for &kind in ALL {
        dies(kind, "socket", inet_socket);
        dies(kind, "ptrace", ptrace);
        dies(kind, "mount", mount);
    }
    // Only the event loop starts device processes (upgrades, crash restarts).
    for &kind in ALL.iter().filter(|&&k| k != "vmm") {
        dies(kind, "execve", exec_sh);
    }
    // The event loop opens files named by API requests; nothing else opens.
    for &kind in ALL.iter().filter(|&&k| !k.starts_with("vmm")) {
        dies(kind, "openat", open_shadow);
    }
}

#[test]
fn under_the_launcher_the_event_loop_starts_threads_but_no_process() {
    dies("vmm_launched", "clone", || {
        // SAFETY: fork in a single-threaded test child; the grandchild exits at once.
        match unsafe { libc::fork() } {
            // SAFETY: _exit ends the grandchild at once.
            0 => unsafe { libc::_exit(0) },
            _ => 0,
        }
    });
    dies("vmm_launched", "wait4", || {
        let mut st = 0;
        // SAFETY: waitpid with a valid out-parameter.
        unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
        0
    });
    dies("vmm_launched", "kill", || {
        // SAFETY: kill with signal 0 only checks the target.
        unsafe { libc::kill(1, 0) };
        0
    });
    works("vmm_launched", "a thread and a launcher request", || {
        let t = std::thread::spawn(|| 7);
        let (a, b) = sandbox::launch::socket_pair().expect("pair");
        let msg = [b'S', b'1'];
        // SAFETY: send/recv on our own sockets with buffers of the sizes given.
        let ok = unsafe {
            libc::send(a.as_raw_fd(), msg.as_ptr().cast(), 2, 0) == 2 && {
                let mut buf = [0u8; 8];
                libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), 8, 0) == 2
            }
        };
        if t.join().ok() == Some(7) && ok {
            0
        } else {
            1
        }
    });
}

#[test]
fn device_filters_allow_no_kvm_ioctl_and_blk_no_tun_ioctl() {
    let fd = eventfd();
    for kind in [
        "blk_main",
        "blk_worker",
        "net_main",
        "net_worker",
        "api",
        "reaper",
    ] {
        dies(kind, "ioctl", || ioctl_on(&fd, kvm::GET_API_VERSION));
        dies(kind, "ioctl", || ioctl_on(&fd, kvm::RUN));
        dies(kind, "ioctl", || ioctl_on(&fd, kvm::CREATE_VM));
    }
    for kind in ["blk_main", "blk_worker", "net_worker", "vcpu", "api"] {
        dies(kind, "ioctl", || ioctl_on(&fd, tun::SETIFF));
        dies(kind, "ioctl", || ioctl_on(&fd, tun::SETOFFLOAD));
    }
    // skiff-net's main thread: TUNSETOFFLOAD only (the TAP is open before the filter).
    works("net_main", "TUNSETOFFLOAD", || {
        ioctl_on(&fd, tun::SETOFFLOAD)
    });
    dies("net_main", "ioctl", || ioctl_on(&fd, tun::SETIFF));
    dies("net_main", "ioctl", || ioctl_on(&fd, tun::GETIFF));
}

#[test]
fn vcpu_runs_kvm_but_cannot_exec_or_start_threads() {
    let fd = eventfd();
    works("vcpu", "KVM_RUN", || ioctl_on(&fd, kvm::RUN));
    works("vcpu", "KVM_GET_MSRS and KVM_SET_MSRS (pause)", || {
        ioctl_on(&fd, kvm::GET_MSRS) + ioctl_on(&fd, kvm::SET_MSRS)
    });
    dies("vcpu", "ioctl", || ioctl_on(&fd, kvm::CREATE_VM));
    dies("vcpu", "execve", exec_sh);
    // glibc blocks every signal around clone3, so the kernel kills without the report.
    let (end, _) = in_child("vcpu", || {
        let _ = std::thread::spawn(|| ()).join();
        1
    });
    assert_eq!(end, End::Signal(libc::SIGSYS), "vcpu: starting a thread");
    // SAFETY: fork in the child; it is trapped first.
    dies("vcpu", "clone", || unsafe { libc::fork() });
}

#[test]
fn threads_only_kinds_start_threads_but_not_processes() {
    for kind in ["api", "blk_main", "net_main"] {
        works(kind, "a thread", || {
            let t = std::thread::Builder::new().name("t".into()).spawn(|| 7);
            match t.map(|h| h.join()) {
                Ok(Ok(7)) => 0,
                _ => 1,
            }
        });
        // SAFETY: fork (clone without CLONE_THREAD) is trapped.
        dies(kind, "clone", || unsafe { libc::fork() });
    }
}

#[test]
fn workers_do_their_io() {
    let fd = eventfd();
    let dir = std::env::temp_dir().join(format!("sandbox-test-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&dir)
        .expect("temp file");
    let _ = std::fs::remove_file(&dir);
    let io = || {
        let buf = [7u8; 512];
        let mut back = [0u8; 512];
        let w = libc::iovec {
            iov_base: buf.as_ptr() as *mut _,
            iov_len: buf.len(),
        };
        let r = libc::iovec {
            iov_base: back.as_mut_ptr().cast(),
            iov_len: back.len(),
        };
        let one = 1u64;
        let mut got = 0u64;
        // SAFETY: valid iovecs and buffers for each call; fds owned by the test.
        unsafe {
            let ok = libc::pwritev(file.as_raw_fd(), &w, 1, 4096) == 512
                && libc::preadv(file.as_raw_fd(), &r, 1, 4096) == 512
                && libc::fdatasync(file.as_raw_fd()) == 0
                && libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) == 8
                && libc::read(fd.as_raw_fd(), (&mut got as *mut u64).cast(), 8) == 8;
            i32::from(!(ok && back == buf && got == 1))
        }
    };
    works("blk_worker", "preadv/pwritev/fdatasync and eventfds", io);
    works("blk_main", "the workers' calls (inherited)", io);
    dies("net_worker", "pwritev", io);
}

#[test]
fn reaper_kills_with_sigkill_only() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    let pid = child.id() as i32;
    // SAFETY: kill takes no pointers.
    dies("reaper", "kill", || unsafe {
        libc::kill(pid, libc::SIGTERM)
    });
    works("reaper", "SIGKILL", || {
        // SAFETY: kill takes no pointers.
        i32::from(unsafe { libc::kill(pid, libc::SIGKILL) } != 0)
    });
    let status = child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
}

#[test]
fn the_event_loop_starts_processes_that_keep_its_filter() {
    // What an upgrade does: fork and exec a program, which runs under the inherited filter.
    works(
        "vmm",
        "spawning /bin/true",
        || match std::process::Command::new("/bin/true").status() {
            Ok(s) if s.success() => 0,
            _ => 1,
        },
    );
    // A program doing what no device process does dies under the inherited filter.
    works("vmm", "the exec'd child dies by SIGSYS", || {
        let status = std::process::Command::new("/bin/sh")
            .args(["-c", "exec 3<>/dev/tcp/127.0.0.1/1 2>/dev/null; exit 0"])
            .stderr(std::process::Stdio::null())
            .status();
        match status.map(|s| std::os::unix::process::ExitStatusExt::signal(&s)) {
            // bash opens /dev/tcp with socket(AF_INET); dash has no /dev/tcp and exits 0.
            Ok(Some(libc::SIGSYS)) | Ok(None) => 0,
            _ => 1,
        }
    });
    dies("vmm", "socket", inet_socket);
}

#[test]
fn a_filter_file_in_the_json_format_is_used() {
    let json = sandbox::filters::all_json();
    let path = std::env::temp_dir().join(format!("sandbox-filters-{}.json", std::process::id()));
    std::fs::write(&path, &json).expect("write");
    let from_file = ThreadFilters::load(&SeccompChoice::File(path.clone()), "t", ALL);
    let missing = ThreadFilters::load(&SeccompChoice::File(path.clone()), "t", &["nope"]);
    let _ = std::fs::remove_file(&path);
    assert!(from_file.is_ok(), "{:?}", from_file.err());
    let e = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("has no \"nope\" filter"), "{e}");
}

//! The steps the child takes between fork and exec, as root, in this order: into the cgroup,
//! into the network namespace, into a new mount namespace whose root is the cell, /proc,
//! resource limits, no inherited fd, no groups, the VM's uid and gid, no_new_privs, exec
//! with an empty environment. The launcher's device processes share the pieces (mounts,
//! limits, fd placement, the uid drop and exec).

use std::ffi::{CStr, CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::args::Plan;

/// The fd number skiff finds its end of the launcher socket at (`--launcher-fd`).
pub const LAUNCHER_FD: RawFd = 3;
/// Where a skiff started for a live upgrade finds its hand-over socket (`--handover-fd`).
pub const HANDOVER_FD: RawFd = 4;

/// A skiff started to take the VM over from the running one (the VMM's live upgrade).
pub struct Successor<'a> {
    /// Its program, relative to the cell's /bin (checked by the launcher).
    pub binary: &'a str,
    /// Its end of the hand-over socket.
    pub handover: &'a OwnedFd,
}

/// Errors of the child's steps (reported to the supervisor through a pipe).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("cannot join the cgroup ({path})")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} failed")]
    Sys {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a path or argument holds a NUL byte: {0:?}")]
    Nul(OsString),
}

fn sys(step: &'static str, rc: libc::c_long) -> Result<(), JailError> {
    if rc < 0 {
        return Err(JailError::Sys {
            step,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn cstr(s: impl Into<OsString>) -> Result<CString, JailError> {
    let s: OsString = s.into();
    CString::new(s.as_bytes()).map_err(|_| JailError::Nul(s))
}

/// Mounts made from here on in this (new) mount namespace do not propagate to the host;
/// mounts the host makes later still reach it (bind mounts into a running cell).
pub fn make_slave() -> Result<(), JailError> {
    // SAFETY: valid NUL-terminated strings or null where the call allows it.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        )
    };
    sys("making the mounts slaves", rc.into())
}

/// The cell root bind-mounted on itself, then [`pivot_into_mounted`].
fn pivot_into(root: &Path) -> Result<(), JailError> {
    make_slave()?;
    let c = cstr(root.as_os_str())?;
    // SAFETY: `c` is a valid NUL-terminated path.
    let rc = unsafe {
        libc::mount(
            c.as_ptr(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    sys("bind-mounting the cell on itself", rc.into())?;
    pivot_into_mounted(root, false)
}

/// pivot_root into `root` (a mount point), the old root detached, /proc mounted; with
/// `read_only` the new root is then made read-only.
pub fn pivot_into_mounted(root: &Path, read_only: bool) -> Result<(), JailError> {
    let root = cstr(root.as_os_str())?;
    let slash: &CStr = c"/";
    let dot: &CStr = c".";
    let old: &CStr = c"old_root";
    // SAFETY: every pointer is a valid NUL-terminated string or null where the call allows
    // it; none is kept past the call.
    unsafe {
        sys("chdir into the cell", libc::chdir(root.as_ptr()).into())?;
        if libc::mkdir(old.as_ptr(), 0o700) != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            sys("mkdir old_root", -1)?;
        }
        sys(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), old.as_ptr()),
        )?;
        sys("chdir /", libc::chdir(slash.as_ptr()).into())?;
        sys(
            "detaching the old root",
            libc::umount2(old.as_ptr(), libc::MNT_DETACH).into(),
        )?;
        sys("rmdir old_root", libc::rmdir(old.as_ptr()).into())?;
        sys("chroot", libc::chroot(dot.as_ptr()).into())?;
        // The VM's own processes only (hidepid), and no kernel files (subset=pid):
        // /proc/self/fd is what skiff uses.
        sys(
            "mounting /proc",
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"hidepid=invisible,subset=pid".as_ptr().cast(),
            )
            .into(),
        )?;
        if read_only {
            sys(
                "making the root read-only",
                libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV
                        | libc::MS_NOEXEC,
                    std::ptr::null(),
                )
                .into(),
            )?;
        }
    }
    Ok(())
}

/// A tmpfs on `dir` (nosuid, nodev, noexec) with `opts`.
pub fn mount_tmpfs(dir: &Path, opts: &str) -> Result<(), JailError> {
    let d = cstr(dir.as_os_str())?;
    let o = cstr(opts)?;
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            d.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            o.as_ptr().cast(),
        )
    };
    sys("mounting the device root (tmpfs)", rc.into())
}

/// mkdir with exactly `mode`.
pub fn mkdir(path: &Path, mode: u32) -> Result<(), JailError> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: a valid NUL-terminated path.
    unsafe {
        sys(
            "mkdir in the device root",
            libc::mkdir(c.as_ptr(), mode).into(),
        )?;
        sys(
            "chmod in the device root",
            libc::chmod(c.as_ptr(), mode).into(),
        )
    }
}

/// Bind-mounts the file `from` on a new empty file `to`; read-only with `read_only`.
pub fn bind_file(from: &Path, to: &Path, read_only: bool) -> Result<(), JailError> {
    let f = cstr(from.as_os_str())?;
    let t = cstr(to.as_os_str())?;
    // SAFETY: valid NUL-terminated paths; the fd from open is closed at once.
    unsafe {
        let fd = libc::open(
            t.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
            0o444,
        );
        sys("creating a bind-mount target", fd.into())?;
        libc::close(fd);
        sys(
            "bind-mounting into the device root",
            libc::mount(
                f.as_ptr(),
                t.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
            .into(),
        )?;
        if read_only {
            sys(
                "making a bind mount read-only",
                libc::mount(
                    std::ptr::null(),
                    t.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV,
                    std::ptr::null(),
                )
                .into(),
            )?;
        }
    }
    Ok(())
}

fn rlimit(
    step: &'static str,
    resource: libc::__rlimit_resource_t,
    n: u64,
) -> Result<(), JailError> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: `lim` is a valid rlimit read by the call.
    sys(step, unsafe { libc::setrlimit(resource, &lim) }.into())
}

/// RLIMIT_NOFILE, and RLIMIT_FSIZE when given.
pub fn rlimits(no_file: u64, fsize: Option<u64>) -> Result<(), JailError> {
    rlimit("setrlimit(RLIMIT_NOFILE)", libc::RLIMIT_NOFILE, no_file)?;
    if let Some(n) = fsize {
        rlimit("setrlimit(RLIMIT_FSIZE)", libc::RLIMIT_FSIZE, n)?;
    }
    Ok(())
}

/// Puts `fds[i]` at number `targets[i]`, not close-on-exec; every other fd past stdio closes
/// at exec.
pub fn place_fds(fds: &[OwnedFd], targets: &[RawFd]) -> Result<(), JailError> {
    let sys = |step: &'static str| JailError::Sys {
        step,
        source: std::io::Error::last_os_error(),
    };
    // SAFETY: close_range only changes fd flags.
    if unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } != 0
    {
        return Err(sys("close_range"));
    }
    // First above every number involved, so no dup2 below replaces a source still needed.
    let above = fds
        .iter()
        .map(|f| f.as_raw_fd())
        .chain(targets.iter().copied())
        .max()
        .unwrap_or(2)
        + 1;
    let mut moved = Vec::new();
    for f in fds {
        // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1.
        let n = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
        if n < 0 {
            return Err(sys("placing the fds (F_DUPFD)"));
        }
        moved.push(n);
    }
    for (from, to) in moved.iter().zip(targets) {
        // SAFETY: dup2 onto a number this process may use; the new fd is not close-on-exec.
        if unsafe { libc::dup2(*from, *to) } < 0 {
            return Err(sys("placing the fds (dup2)"));
        }
    }
    Ok(())
}

/// Moves `fd` to a number at or above `floor` (close-on-exec), closing the old number: a
/// descriptor the child still needs after [`place_fds`] (its status pipe, the program to
/// exec) must not sit at a number an fd is placed at, where dup2 would close it.
pub fn lift(fd: OwnedFd, floor: RawFd) -> Result<OwnedFd, JailError> {
    use std::os::fd::FromRawFd;
    if fd.as_raw_fd() >= floor {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own returns a new fd or -1.
    let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
    sys("moving an fd out of the way (F_DUPFD)", n.into())?;
    // SAFETY: a fresh fd owned by nobody else; the old one closes when `fd` drops.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// A new session (no controlling terminal), stdin and stdout on /dev/null (of the new
/// root); stderr stays.
pub fn detach_terminal() -> Result<(), JailError> {
    // SAFETY: setsid, open and dup2 on values; the fd from open is closed after the dups.
    unsafe {
        sys("setsid", libc::setsid().into())?;
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        sys("open /dev/null", null.into())?;
        sys("dup2 /dev/null", libc::dup2(null, 0).into())?;
        sys("dup2 /dev/null", libc::dup2(null, 1).into())?;
        libc::close(null);
    }
    Ok(())
}

/// What to exec.
pub enum Program {
    /// A path in the new root.
    Path(CString),
    /// An open, checked file (execveat with AT_EMPTY_PATH).
    Fd(RawFd),
}

/// No groups, `gid`, `uid`, death with the supervisor, no_new_privs, no blocked signal, an
/// empty environment, exec. The fds must be placed already ([`place_fds`]).
pub fn drop_and_exec(
    uid: u32,
    gid: u32,
    program: Program,
    argv: &[CString],
    supervisor: libc::pid_t,
) -> Result<std::convert::Infallible, JailError> {
    let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: plain syscalls on values; the pointers passed to exec point into `program`,
    // `argv`/`argp` and `envp`, which live until exec (which only returns on failure).
    unsafe {
        sys("setgroups", libc::setgroups(0, std::ptr::null()).into())?;
        sys("setresgid", libc::setresgid(gid, gid, gid).into())?;
        sys("setresuid", libc::setresuid(uid, uid, uid).into())?;
        // (Reset by the uid change: set after it.) The process goes with its supervisor.
        sys(
            "prctl(PR_SET_PDEATHSIG)",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into(),
        )?;
        // A supervisor that died before the death signal was set: nobody would end us.
        // (0: not checkable, as PID 1 of a new PID namespace, whose parent is outside.)
        if supervisor != 0 && libc::getppid() != supervisor {
            return Err(JailError::Sys {
                step: "checking the supervisor is alive",
                source: std::io::Error::from_raw_os_error(libc::ESRCH),
            });
        }
        sys(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
        )?;
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        sys(
            "sigprocmask",
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()).into(),
        )?;
        match &program {
            Program::Path(p) => {
                libc::execve(p.as_ptr(), argp.as_ptr(), envp.as_ptr());
            }
            Program::Fd(fd) => {
                libc::syscall(
                    libc::SYS_execveat,
                    *fd,
                    c"".as_ptr(),
                    argp.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            }
        }
    }
    Err(JailError::Sys {
        step: "execve",
        source: std::io::Error::last_os_error(),
    })
}

/// Everything but exec; then exec. Returns only on failure.
pub fn enter(
    plan: &Plan,
    root: &Path,
    cgroup_procs: Option<&Path>,
    netns: Option<&OwnedFd>,
    launcher: &OwnedFd,
    supervisor: libc::pid_t,
    successor: Option<Successor<'_>>,
) -> JailError {
    match steps(
        plan,
        root,
        cgroup_procs,
        netns,
        launcher,
        supervisor,
        successor,
    ) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn steps(
    plan: &Plan,
    root: &Path,
    cgroup_procs: Option<&Path>,
    netns: Option<&OwnedFd>,
    launcher: &OwnedFd,
    supervisor: libc::pid_t,
    successor: Option<Successor<'_>>,
) -> Result<std::convert::Infallible, JailError> {
    // (Only where clone3 could not start this process in the cgroup.)
    if let Some(procs) = cgroup_procs {
        std::fs::write(procs, "0").map_err(|source| JailError::Cgroup {
            path: procs.display().to_string(),
            source,
        })?;
    }
    if let Some(fd) = netns {
        // SAFETY: `fd` is an open network-namespace fd.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        sys("setns (--netns)", rc.into())?;
    }
    // SAFETY: unshare has no memory-safety preconditions.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    sys("unshare(CLONE_NEWNS)", rc.into())?;
    pivot_into(root)?;
    rlimits(plan.no_file, plan.fsize)?;
    let binary = successor
        .as_ref()
        .map_or(plan.exec_name.as_str(), |s| s.binary);
    let exe = cstr(format!("/bin/{binary}"))?;
    // `--id` last: skiff's global flags go after a subcommand (`skiff run ... --id ID`).
    let mut argv = vec![cstr(plan.exec_name.clone())?];
    for a in &plan.skiff_args {
        argv.push(cstr(a.clone())?);
    }
    argv.push(cstr("--launcher-fd")?);
    argv.push(cstr(LAUNCHER_FD.to_string())?);
    argv.push(cstr("--id")?);
    argv.push(cstr(plan.id.clone())?);
    // The launcher socket at LAUNCHER_FD (and a successor's hand-over socket at
    // HANDOVER_FD); every other fd past stdio (the supervisor's status pipe included)
    // closes at exec.
    match &successor {
        Some(s) => {
            argv.push(cstr("--handover-fd")?);
            argv.push(cstr(HANDOVER_FD.to_string())?);
            let fds = [
                launcher.try_clone().map_err(|source| JailError::Sys {
                    step: "dup of the launcher socket",
                    source,
                })?,
                s.handover.try_clone().map_err(|source| JailError::Sys {
                    step: "dup of the hand-over socket",
                    source,
                })?,
            ];
            place_fds(&fds, &[LAUNCHER_FD, HANDOVER_FD])?;
        }
        None => place_fds(std::slice::from_ref(launcher), &[LAUNCHER_FD])?,
    }
    drop_and_exec(plan.uid, plan.gid, Program::Path(exe), &argv, supervisor)
}

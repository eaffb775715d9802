//! The steps the child takes between fork and exec, as root, in this order: into the cgroup,
//! into the network namespace, into a new mount namespace whose root is the cell, /proc,
//! resource limits, no inherited fd, no groups, the VM's uid and gid, no_new_privs, exec
//! with an empty environment.

use std::ffi::{CStr, CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::args::Plan;

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

/// The cell root bind-mounted on itself, pivot_root into it, the old root detached.
fn pivot_into(root: &Path) -> Result<(), JailError> {
    let root = cstr(root.as_os_str())?;
    let slash: &CStr = c"/";
    let dot: &CStr = c".";
    let old: &CStr = c"old_root";
    // SAFETY: every pointer is a valid NUL-terminated string or null where the call allows
    // it; none is kept past the call.
    unsafe {
        // Nothing done here propagates back to the host; mounts the host makes later still
        // reach the cell (bind mounts into a running cell).
        sys(
            "making the mounts slaves",
            libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            )
            .into(),
        )?;
        sys(
            "bind-mounting the cell on itself",
            libc::mount(
                root.as_ptr(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
            .into(),
        )?;
        sys("chdir into the cell", libc::chdir(root.as_ptr()).into())?;
        sys("mkdir old_root", libc::mkdir(old.as_ptr(), 0o700).into())?;
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

/// Everything but exec; then exec. Returns only on failure.
pub fn enter(
    plan: &Plan,
    root: &Path,
    cgroup_procs: Option<&Path>,
    netns: Option<&OwnedFd>,
) -> JailError {
    match steps(plan, root, cgroup_procs, netns) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn steps(
    plan: &Plan,
    root: &Path,
    cgroup_procs: Option<&Path>,
    netns: Option<&OwnedFd>,
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
    rlimit(
        "setrlimit(RLIMIT_NOFILE)",
        libc::RLIMIT_NOFILE,
        plan.no_file,
    )?;
    if let Some(n) = plan.fsize {
        rlimit("setrlimit(RLIMIT_FSIZE)", libc::RLIMIT_FSIZE, n)?;
    }
    let exe = cstr(format!("/bin/{}", plan.exec_name))?;
    // `--id` last: skiff's global flags go after a subcommand (`skiff run ... --id ID`).
    let mut argv = vec![cstr(plan.exec_name.clone())?];
    for a in &plan.skiff_args {
        argv.push(cstr(a.clone())?);
    }
    argv.push(cstr("--id")?);
    argv.push(cstr(plan.id.clone())?);
    let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let (uid, gid) = (plan.uid, plan.gid);
    // SAFETY: plain syscalls on values; the pointers passed to execve point into `exe`,
    // `argv`/`argp` and `envp`, which live until execve (which only returns on failure).
    unsafe {
        // Every fd past stdio closes at exec (the supervisor's status pipe included).
        sys(
            "close_range",
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ),
        )?;
        sys("setgroups", libc::setgroups(0, std::ptr::null()).into())?;
        sys("setresgid", libc::setresgid(gid, gid, gid).into())?;
        sys("setresuid", libc::setresuid(uid, uid, uid).into())?;
        // (Reset by the uid change: set after it.) The VM goes with its supervisor.
        sys(
            "prctl(PR_SET_PDEATHSIG)",
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL).into(),
        )?;
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
        libc::execve(exe.as_ptr(), argp.as_ptr(), envp.as_ptr());
    }
    Err(JailError::Sys {
        step: "execve",
        source: std::io::Error::last_os_error(),
    })
}

//! The supervisor: starts the jailed skiff, passes signals on to it, waits for it, and
//! removes the cell and the cgroup when it has ended.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use crate::args::Plan;
use crate::cell::Cell;
use crate::cgroup::Cgroup;
use crate::jail;
use crate::launcher::{DevicePlan, Launcher, OperatorSeccomp, VmmRequest};
use sandbox::launch::Reply;

/// Signals passed on to skiff.
const FORWARDED: &[libc::c_int] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("{step} failed")]
    Sys {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("starting skiff in the cell failed: {0}")]
    Child(String),
    #[error(transparent)]
    Launcher(#[from] crate::launcher::LauncherError),
}

fn last(step: &'static str) -> SuperviseError {
    SuperviseError::Sys {
        step,
        source: std::io::Error::last_os_error(),
    }
}

/// A close-on-exec pipe: (read, write).
fn pipe() -> Result<(std::fs::File, std::fs::File), SuperviseError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last("pipe2"));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    })
}

fn signal_set(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in sigs {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// `struct clone_args` of clone3(2) (Linux 5.7+, with `cgroup`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub(crate) flags: u64,
    pub(crate) pidfd: u64,
    pub(crate) child_tid: u64,
    pub(crate) parent_tid: u64,
    pub(crate) exit_signal: u64,
    pub(crate) stack: u64,
    pub(crate) stack_size: u64,
    pub(crate) tls: u64,
    pub(crate) set_tid: u64,
    pub(crate) set_tid_size: u64,
    pub(crate) cgroup: u64,
}

pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks skiff's process straight into the VM's cgroup (clone3 with CLONE_INTO_CGROUP: no
/// migration afterwards, which costs an RCU grace period, about 8 ms here) and, with
/// `new_pid_ns`, as PID 1 of a new PID namespace. Returns the pid (0 in the child) and
/// whether the child is in the cgroup already; falls back to fork where clone3 cannot.
fn spawn(
    cgroup_dir: &std::path::Path,
    new_pid_ns: bool,
) -> Result<(libc::pid_t, bool), SuperviseError> {
    let dir = std::fs::File::open(cgroup_dir).map_err(|source| SuperviseError::Sys {
        step: "opening the cgroup directory",
        source,
    })?;
    let mut args = CloneArgs {
        flags: CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: std::os::fd::AsRawFd::as_raw_fd(&dir) as u64,
        ..CloneArgs::default()
    };
    if new_pid_ns {
        args.flags |= libc::CLONE_NEWPID as u64;
    }
    // SAFETY: clone3 without a stack behaves as fork; skiff-jailer is single-threaded, so
    // the child may run ordinary code until exec; `args` outlives the call.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid >= 0 {
        return Ok((pid as libc::pid_t, true));
    }
    let err = std::io::Error::last_os_error();
    if !matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::E2BIG)
    ) {
        return Err(SuperviseError::Sys {
            step: "clone3",
            source: err,
        });
    }
    // Before Linux 5.7: fork, and the child joins the cgroup itself.
    if new_pid_ns {
        // SAFETY: unshare has no memory-safety preconditions; it affects later children only.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(last("unshare(CLONE_NEWPID)"));
        }
    }
    // SAFETY: single-threaded, as above.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last("fork"));
    }
    Ok((pid, false))
}

/// How skiff ended, as an exit code: its own, or 128+N for signal N.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Detaches (--daemonize): the foreground process waits for a line from the supervisor
/// (the pids, or the error) and exits with it; the supervisor continues in a new session
/// with stdio on /dev/null. Returns the pipe to write that line to, in the supervisor.
fn daemonize() -> Result<std::fs::File, SuperviseError> {
    let (mut r, w) = pipe()?;
    // SAFETY: skiff-jailer is single-threaded; both sides continue with ordinary code.
    match unsafe { libc::fork() } {
        -1 => Err(last("fork (--daemonize)")),
        0 => {
            drop(r);
            // SAFETY: setsid, open and dup2 on fds this process owns.
            unsafe {
                if libc::setsid() < 0 {
                    return Err(last("setsid"));
                }
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                if null < 0 {
                    return Err(last("open /dev/null"));
                }
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
                libc::close(null);
            }
            Ok(w)
        }
        _ => {
            drop(w);
            let mut said = String::new();
            let _ = r.read_to_string(&mut said);
            let code = if let Some(err) = said.strip_prefix("error: ") {
                eprint!("skiff-jailer: {err}");
                1
            } else if said.is_empty() {
                eprintln!("skiff-jailer: the supervisor ended without starting skiff");
                1
            } else {
                print!("{said}");
                0
            };
            let _ = std::io::stdout().flush();
            // SAFETY: _exit ends this process only; nothing of it needs unwinding.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Starts skiff in the cell and the cgroup with `skiff_end` as its launcher socket (and,
/// for a live upgrade, as `successor`); returns its pid once it has exec'd.
fn start_skiff(
    plan: &Plan,
    cell: &Cell,
    cgroup: &Cgroup,
    skiff_end: &OwnedFd,
    successor: Option<jail::Successor<'_>>,
) -> Result<libc::pid_t, SuperviseError> {
    let (mut status_r, mut status_w) = pipe()?;
    let procs = cgroup.procs();
    let supervisor = std::process::id() as libc::pid_t;
    let (pid, in_cgroup) = spawn(&cgroup.path, plan.new_pid_ns)?;
    if pid == 0 {
        drop(status_r);
        let join = (!in_cgroup).then_some(procs.as_path());
        // The status pipe stays open when the launcher and hand-over sockets are placed at
        // their numbers.
        let err = match status_w
            .try_clone()
            .map_err(|source| jail::JailError::Sys {
                step: "dup of the pipe",
                source,
            })
            .and_then(|w| jail::lift(OwnedFd::from(w), jail::HANDOVER_FD + 1))
        {
            Ok(w) => {
                drop(std::mem::replace(&mut status_w, std::fs::File::from(w)));
                jail::enter(
                    plan,
                    &cell.root,
                    join,
                    plan.netns.as_ref(),
                    skiff_end,
                    if plan.new_pid_ns { 0 } else { supervisor },
                    successor,
                )
            }
            Err(e) => e,
        };
        let _ = write!(status_w, "{}", crate::chain(&err));
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(126) };
    }
    drop(status_w);
    // EOF without a word: exec succeeded (the pipe was close-on-exec).
    let mut why = String::new();
    let _ = status_r.read_to_string(&mut why);
    if !why.is_empty() {
        let mut st = 0;
        // SAFETY: reaps our own child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        return Err(SuperviseError::Child(why));
    }
    Ok(pid)
}

/// Writes skiff's pid to `<exec name>.pid` in the cell's root, whole or not at all (a new
/// file renamed over the old one: a reader never sees it empty).
fn write_pid_file(plan: &Plan, cell: &Cell, pid: libc::pid_t) {
    let path = cell.root.join(format!("{}.pid", plan.exec_name));
    let tmp = cell.root.join(format!(".{}.pid.new", plan.exec_name));
    if std::fs::write(&tmp, format!("{pid}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

/// A skiff started to take the VM over (the VMM's live upgrade).
struct Next {
    pid: libc::pid_t,
    /// The launcher's end of its launcher socket.
    launcher_end: OwnedFd,
    /// Its end's device and inode (never passed to a device process).
    peer: (u64, u64),
}

/// Starts a skiff from `binary` that takes the VM over through `handover`, with a launcher
/// socket of its own. Returns it and a pidfd of it.
fn start_successor(
    plan: &Plan,
    cell: &Cell,
    cgroup: &Cgroup,
    binary: &str,
    handover: OwnedFd,
) -> Result<(Next, OwnedFd), SuperviseError> {
    use std::os::unix::fs::MetadataExt;
    let (launcher_end, skiff_end) =
        sandbox::launch::socket_pair().map_err(|source| SuperviseError::Sys {
            step: "socketpair (launcher)",
            source,
        })?;
    let m = std::fs::File::from(
        skiff_end
            .try_clone()
            .map_err(|source| SuperviseError::Sys {
                step: "dup of the new skiff's launcher end",
                source,
            })?,
    )
    .metadata()
    .map_err(|source| SuperviseError::Sys {
        step: "fstat of the new skiff's launcher end",
        source,
    })?;
    let successor = jail::Successor {
        binary,
        handover: &handover,
    };
    let pid = start_skiff(plan, cell, cgroup, &skiff_end, Some(successor))?;
    // SAFETY: pidfd_open on our own child, not yet reaped; returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        // SAFETY: kill on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        return Err(SuperviseError::Sys {
            step: "pidfd_open",
            source,
        });
    }
    // SAFETY: a fresh fd owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    Ok((
        Next {
            pid,
            launcher_end,
            peer: (m.dev(), m.ino()),
        },
        pidfd,
    ))
}

/// Starts skiff in `cell` and `cgroup`, waits for it, removes both (unless --keep-cell).
/// Returns skiff's exit code.
pub fn run(
    plan: &Plan,
    mut cell: Cell,
    mut cgroup: Cgroup,
    started: Instant,
) -> Result<i32, SuperviseError> {
    let result = supervise(plan, &cell, &cgroup, started);
    if plan.keep_cell {
        eprintln!(
            "skiff-jailer: kept the cell {} and the cgroup {} (--keep-cell)",
            cell.dir.display(),
            cgroup.path.display()
        );
    } else {
        if let Err(e) = cgroup.remove() {
            eprintln!("skiff-jailer: {}", crate::chain(&e));
        }
        if let Err(e) = cell.remove() {
            eprintln!("skiff-jailer: {}", crate::chain(&e));
        }
    }
    result
}

fn supervise(
    plan: &Plan,
    cell: &Cell,
    cgroup: &Cgroup,
    started: Instant,
) -> Result<i32, SuperviseError> {
    let mut report = if plan.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    let fail = |report: &mut Option<std::fs::File>, e: SuperviseError| {
        if let Some(w) = report.as_mut() {
            let _ = writeln!(w, "error: {}", crate::chain(&e));
        }
        e
    };
    // Blocked here, read with sigwaitinfo below; unblocked in the child before exec.
    let waited = signal_set(&[FORWARDED, &[libc::SIGCHLD]].concat());
    // SAFETY: `waited` is an initialised set.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &waited, std::ptr::null_mut()) } != 0 {
        return Err(fail(&mut report, last("sigprocmask")));
    }
    let (launcher_end, skiff_end) = sandbox::launch::socket_pair().map_err(|source| {
        fail(
            &mut report,
            SuperviseError::Sys {
                step: "socketpair (launcher)",
                source,
            },
        )
    })?;
    let mut launcher = Launcher::new(
        launcher_end,
        &cell.dir,
        &cgroup.path,
        DevicePlan {
            uid: plan.device_uid,
            gid: plan.device_gid,
            no_file: plan.no_file,
            fsize: plan.fsize,
            cell_root: cell.root.clone(),
            runtime_files: plan.runtime_files.clone(),
            seccomp: OperatorSeccomp::from_args(&plan.skiff_args),
            peer: {
                use std::os::unix::fs::MetadataExt;
                let m = std::fs::File::from(skiff_end.try_clone().map_err(|source| {
                    fail(
                        &mut report,
                        SuperviseError::Sys {
                            step: "dup of skiff's launcher end",
                            source,
                        },
                    )
                })?)
                .metadata()
                .map_err(|source| {
                    fail(
                        &mut report,
                        SuperviseError::Sys {
                            step: "fstat of skiff's launcher end",
                            source,
                        },
                    )
                })?;
                (m.dev(), m.ino())
            },
        },
    )
    .map_err(|e| fail(&mut report, e.into()))?;
    let pid =
        start_skiff(plan, cell, cgroup, &skiff_end, None).map_err(|e| fail(&mut report, e))?;
    drop(skiff_end);
    write_pid_file(plan, cell, pid);
    let line = format!(
        "skiff-jailer: VM {} runs: skiff pid {pid}, supervisor pid {}, cell {}, cgroup {}, set up in {} us\n",
        plan.id,
        std::process::id(),
        cell.root.display(),
        cgroup.path.display(),
        started.elapsed().as_micros()
    );
    match report.as_mut() {
        Some(w) => {
            let _ = w.write_all(line.as_bytes());
        }
        None => eprint!("{line}"),
    }
    drop(report);
    let mut pid = pid;
    // A skiff started for a live upgrade, until it takes over or ends.
    let mut next: Option<Next> = None;
    // Skiffs that handed the VM over and still pass on what their API held (they end on
    // their own; their end is not the VM's).
    let mut leaving: Vec<libc::pid_t> = Vec::new();
    // Signals and the launcher socket, in one poll.
    // SAFETY: `waited` is initialised; signalfd returns a new fd or -1.
    let sfd = unsafe { libc::signalfd(-1, &waited, libc::SFD_CLOEXEC) };
    if sfd < 0 {
        return Err(last("signalfd"));
    }
    // SAFETY: a fresh fd owned by nobody else.
    let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
    loop {
        let mut pfd = [
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: launcher.fd().unwrap_or(-1),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `pfd` holds two initialised pollfds (a negative fd is ignored).
        if unsafe { libc::poll(pfd.as_mut_ptr(), 2, -1) } < 0 {
            continue; // EINTR
        }
        if pfd[1].revents != 0 {
            if let Some(req) = launcher.serve_one() {
                let reply = match req {
                    VmmRequest::Start { binary, handover } => {
                        if next.is_some() {
                            Reply::Error("a live upgrade of the VMM is under way already".into())
                        } else {
                            match start_successor(plan, cell, cgroup, &binary, handover) {
                                Ok((n, pidfd)) => {
                                    launcher.set_candidate(Some(n.pid as u32));
                                    let reply = Reply::Launched {
                                        pid: n.pid as u32,
                                        pidfd,
                                    };
                                    next = Some(n);
                                    reply
                                }
                                Err(e) => Reply::Error(crate::chain(&e)),
                            }
                        }
                    }
                    VmmRequest::Commit(p) => match next.as_ref() {
                        Some(n) if n.pid as u32 == p => {
                            launcher.set_candidate(None);
                            Reply::Done
                        }
                        _ => Reply::Error(format!("pid {p} is not a VMM this launcher started")),
                    },
                };
                launcher.reply(&reply);
                // From the commit on the new skiff is the VM's VMM: signals, the launcher
                // and skiff.pid follow it at once. The old one only passes on what its API
                // still held, then ends.
                if matches!(reply, Reply::Done) {
                    if let Some(n) = next.take() {
                        leaving.push(pid);
                        pid = n.pid;
                        launcher.switch_to(n.launcher_end, n.peer);
                        write_pid_file(plan, cell, pid);
                        eprintln!(
                            "skiff-jailer: VM {}: skiff pid {pid} took over (live upgrade)",
                            plan.id
                        );
                    }
                }
            }
        }
        if pfd[0].revents == 0 {
            continue;
        }
        // SAFETY: signalfd_siginfo is plain data; all zeroes is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        // SAFETY: reads at most the size of `info` into it.
        let n = unsafe {
            libc::read(
                sfd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            )
        };
        if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
            continue;
        }
        let sig = info.ssi_signo as libc::c_int;
        if sig == libc::SIGCHLD {
            // Every child that ended: skiff, or a device process.
            loop {
                let mut st = 0;
                // SAFETY: reaps a child of ours without blocking.
                let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
                if r <= 0 {
                    break;
                }
                if r == pid {
                    if let Some(n) = next.take() {
                        // SAFETY: kill on our own child, not yet reaped.
                        unsafe { libc::kill(n.pid, libc::SIGKILL) };
                    }
                    // The VM ended: a skiff still passing on its API's leftovers has no
                    // one to pass them to.
                    for &old in &leaving {
                        // SAFETY: kill and waitpid on our own child, not yet reaped.
                        unsafe {
                            libc::kill(old, libc::SIGKILL);
                            libc::waitpid(old, std::ptr::null_mut(), 0);
                        }
                    }
                    return Ok(exit_code(st));
                }
                if let Some(i) = leaving.iter().position(|&p| p == r) {
                    leaving.swap_remove(i);
                    if exit_code(st) != 0 {
                        eprintln!(
                            "skiff-jailer: VM {}: the skiff that handed the VM over (pid {r}) \
                             ended with status {}",
                            plan.id,
                            exit_code(st)
                        );
                    }
                    continue;
                }
                if next.as_ref().is_some_and(|n| n.pid == r) {
                    // The new skiff ended before the old one: the old one finds out on the
                    // hand-over socket (and may ask how it ended) and keeps the VM (or,
                    // after committing, ends too).
                    next = None;
                    launcher.vmm_ended(r as u32, st);
                    continue;
                }
                launcher.reaped(r as u32, st);
            }
        } else {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
    }
}

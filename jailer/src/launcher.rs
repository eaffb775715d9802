//! The launcher: the supervisor, still root and outside the cell, starts skiff's device
//! processes on skiff's request (protocol in `sandbox::launch`), each in a cell of its own.
//!
//! skiff runs the guest and may be compromised, so a request is only a wish:
//!
//! - the program is a file of the cell's /bin (root's, read-only, checked by the same code
//!   as skiff's own `--device-bin-dir`: `sandbox::binary`), started by the descriptor that
//!   was checked;
//! - it runs as --device-uid/--device-gid (never skiff's uid), with no supplementary groups,
//!   no_new_privs, an empty environment, the VM's resource limits, in the VM's cgroup (so
//!   pids.max and memory.max count it);
//! - in new mount, network, IPC and UTS namespaces: its root is an empty read-only tmpfs
//!   holding only /dev/null, /dev/urandom, a /proc that shows its own user's processes, and
//!   the loader and libraries of a dynamic build (read-only); no /dev/kvm, no /dev/net/tun,
//!   no socket path, no file of the host, of skiff or of another device;
//! - it holds exactly the fds of the request (at most `MAX_FDS`), at the numbers asked;
//! - at most [`MAX_LIVE`] run at once, and status and kill apply to the launcher's own
//!   children only.
//!
//! No new PID namespace: as PID 1 of one, a device process killed by its own seccomp
//! report (which re-raises SIGSYS) would ignore the signal.

use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sandbox::binary::BinaryDir;
use sandbox::launch::{self, Reply, Request};

use crate::jail::{self, JailError};

/// Device processes of one VM running at once, at most (a VM has up to 19 devices, each
/// briefly two processes during an upgrade).
pub const MAX_LIVE: usize = 64;
/// Exit statuses kept for skiff to ask about, at most.
const MAX_ENDED: usize = 256;

/// Errors setting up the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("the cell's binary directory")]
    Bins(#[source] sandbox::binary::DeviceBinaryError),
    #[error("cannot create {}", .0.display())]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("cannot open the cgroup directory {}", .0.display())]
    Cgroup(PathBuf, #[source] std::io::Error),
}

/// What every device process of the VM gets.
pub struct DevicePlan {
    pub uid: u32,
    pub gid: u32,
    pub no_file: u64,
    pub fsize: Option<u64>,
    /// The cell's root (bind sources: dev/null, dev/urandom, the runtime files).
    pub cell_root: PathBuf,
    /// Loader and libraries, as absolute paths inside the cell.
    pub runtime_files: Vec<PathBuf>,
    /// The operator's seccomp choice for skiff, which its device processes get too,
    /// whatever skiff asks.
    pub seccomp: OperatorSeccomp,
    /// skiff's end of the launcher socket (device, inode): never passed on to a device.
    pub peer: (u64, u64),
}

/// The seccomp choice the operator gave skiff (in skiff's arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorSeccomp {
    /// The built-in filters.
    BuiltIn,
    /// `--no-seccomp`.
    Off,
    /// `--seccomp-filter PATH`, a path inside the cell.
    File(PathBuf),
}

impl OperatorSeccomp {
    /// From skiff's arguments.
    pub fn from_args(args: &[OsString]) -> Self {
        let mut choice = OperatorSeccomp::BuiltIn;
        for (i, a) in args.iter().enumerate() {
            let a = a.to_string_lossy();
            if a == "--no-seccomp" {
                choice = OperatorSeccomp::Off;
            } else if a == "--seccomp-filter" {
                if let Some(p) = args.get(i + 1) {
                    choice = OperatorSeccomp::File(PathBuf::from(p));
                }
            } else if let Some(p) = a.strip_prefix("--seccomp-filter=") {
                choice = OperatorSeccomp::File(PathBuf::from(p));
            }
        }
        choice
    }
}

/// A request about the VMM itself, for the supervisor.
pub enum VmmRequest {
    /// Start a skiff from `binary` (checked: relative to the cell's /bin) to take the VM
    /// over through `handover`.
    Start {
        /// The program, relative to the cell's /bin.
        binary: String,
        /// Its end of the hand-over socket.
        handover: OwnedFd,
    },
    /// The skiff `pid` has taken the VM over.
    Commit(u32),
}

/// How long a device process may take from clone to exec before it is killed.
const START_LIMIT_MS: libc::c_int = 10_000;

/// The launcher of one VM.
pub struct Launcher {
    sock: OwnedFd,
    bins: BinaryDir,
    cgroup: std::fs::File,
    /// An empty directory the device root (a tmpfs) is mounted on, in the child's own
    /// mount namespace.
    mount_point: PathBuf,
    plan: DevicePlan,
    /// Live children (their pidfds went to skiff).
    live: HashSet<u32>,
    /// Ended children not yet asked about: pid → raw wait status, oldest first.
    ended: Vec<(u32, i32)>,
    /// A skiff started for a live upgrade that has not taken over: skiff may kill it.
    candidate: Option<u32>,
    open: bool,
}

impl Launcher {
    /// A launcher serving `sock` for the cell in `cell_dir` (whose root is
    /// `plan.cell_root`) and the cgroup `cgroup_dir`.
    pub fn new(
        sock: OwnedFd,
        cell_dir: &Path,
        cgroup_dir: &Path,
        plan: DevicePlan,
    ) -> Result<Self, LauncherError> {
        let bins =
            BinaryDir::open(Some(&plan.cell_root.join("bin"))).map_err(LauncherError::Bins)?;
        let mount_point = cell_dir.join("device-root");
        std::fs::create_dir(&mount_point)
            .map_err(|e| LauncherError::Mkdir(mount_point.clone(), e))?;
        let cgroup = std::fs::File::open(cgroup_dir)
            .map_err(|e| LauncherError::Cgroup(cgroup_dir.to_path_buf(), e))?;
        Ok(Launcher {
            sock,
            bins,
            cgroup,
            mount_point,
            plan,
            live: HashSet::new(),
            ended: Vec::new(),
            candidate: None,
            open: true,
        })
    }

    /// The socket to poll; `None` once skiff closed its end.
    pub fn fd(&self) -> Option<RawFd> {
        self.open.then(|| self.sock.as_raw_fd())
    }

    /// Reads and answers one request; a request about the VMM itself (its live upgrade) is
    /// returned instead, for the supervisor to carry out and answer with [`Launcher::reply`].
    pub fn serve_one(&mut self) -> Option<VmmRequest> {
        let reply = match launch::read_request(self.sock.as_fd()) {
            Ok(None) => {
                self.open = false;
                return None;
            }
            Ok(Some(Request::StartVmm { binary, handover })) => {
                // Named as skiff sees the directory: the host path of the cell is not its
                // business.
                let host_dir = self.bins.path().display().to_string();
                match self.bins.resolve(&binary) {
                    Ok(bin) => {
                        return Some(VmmRequest::Start {
                            binary: bin.relative().display().to_string(),
                            handover,
                        })
                    }
                    Err(e) => Reply::Error(crate::chain(&e).replace(&host_dir, "/bin")),
                }
            }
            Ok(Some(Request::Commit(pid))) => return Some(VmmRequest::Commit(pid)),
            Ok(Some(req)) => self.handle(req),
            Err(e) => Reply::Error(crate::chain(&e)),
        };
        self.reply(&reply);
        None
    }

    /// Answers the request [`Launcher::serve_one`] returned.
    pub fn reply(&mut self, reply: &Reply) {
        if let Err(e) = launch::write_reply(self.sock.as_fd(), reply) {
            eprintln!("skiff-jailer: launcher: {}", crate::chain(&e));
            self.open = false;
        }
    }

    /// Serves `sock`, the launcher socket of the skiff that took the VM over, from now on
    /// (`peer`: its other end's device and inode); the device processes stay its to ask
    /// about.
    pub fn switch_to(&mut self, sock: OwnedFd, peer: (u64, u64)) {
        self.sock = sock;
        self.plan.peer = peer;
        self.open = true;
    }

    /// Notes the skiff started for a live upgrade (`None` once it took over or ended):
    /// the running skiff may kill it.
    pub fn set_candidate(&mut self, pid: Option<u32>) {
        self.candidate = pid;
    }

    /// Notes that a skiff started for a live upgrade ended with `status` before taking
    /// over: the running skiff may ask how.
    pub fn vmm_ended(&mut self, pid: u32, status: i32) {
        self.candidate = None;
        if self.ended.len() >= MAX_ENDED {
            self.ended.remove(0);
        }
        self.ended.push((pid, status));
    }

    /// Notes that child `pid` ended with `status`; false if it is not a device process.
    pub fn reaped(&mut self, pid: u32, status: i32) -> bool {
        if !self.live.remove(&pid) {
            return false;
        }
        if self.ended.len() >= MAX_ENDED {
            self.ended.remove(0);
        }
        self.ended.push((pid, status));
        true
    }

    fn handle(&mut self, req: Request) -> Reply {
        match req {
            Request::StartVmm { .. } | Request::Commit(_) => {
                Reply::Error("a VMM request reached the device launcher".into())
            }
            Request::Status(pid) => {
                // skiff asks when the pidfd says the process ended, maybe before SIGCHLD
                // reached the supervisor's loop: reap it now.
                if self.live.contains(&pid) {
                    let mut st = 0;
                    // SAFETY: reaps a child of ours without blocking.
                    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut st, libc::WNOHANG) };
                    if r == pid as libc::pid_t {
                        self.reaped(pid, st);
                    }
                }
                if self.live.contains(&pid) {
                    return Reply::Status(None);
                }
                match self.ended.iter().position(|(p, _)| *p == pid) {
                    Some(i) => Reply::Status(Some(self.ended.remove(i).1)),
                    None => Reply::Error(format!("pid {pid} is not a device process of this VM")),
                }
            }
            Request::Kill(pid) if self.candidate == Some(pid) => {
                // SAFETY: kill on a child of ours not yet reaped (the supervisor clears
                // `candidate` when it reaps it).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                Reply::Done
            }
            Request::Kill(pid) => {
                if !self.live.contains(&pid) {
                    // Ended already (or never ours): nothing to kill.
                    return if self.ended.iter().any(|(p, _)| *p == pid) {
                        Reply::Done
                    } else {
                        Reply::Error(format!("pid {pid} is not a device process of this VM"))
                    };
                }
                // SAFETY: kill on a live child of ours (not yet reaped, so the pid is not
                // reused).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                Reply::Done
            }
            Request::Launch {
                binary,
                targets,
                args,
                fds,
            } => match self.launch(&binary, &targets, &args, fds) {
                Ok((pid, pidfd)) => {
                    self.live.insert(pid);
                    Reply::Launched { pid, pidfd }
                }
                Err(why) => Reply::Error(why),
            },
        }
    }

    fn launch(
        &mut self,
        binary: &Path,
        targets: &[RawFd],
        args: &[OsString],
        mut fds: Vec<OwnedFd>,
    ) -> Result<(u32, OwnedFd), String> {
        if self.live.len() >= MAX_LIVE {
            return Err(format!(
                "{MAX_LIVE} device processes of this VM run already"
            ));
        }
        for f in &fds {
            let st = fstat(f).map_err(|e| format!("fstat of a passed fd: {e}"))?;
            if (st.st_dev, st.st_ino) == self.plan.peer {
                return Err("the launcher socket is not passed to a device process".into());
            }
        }
        self.enforce_seccomp(targets, args, &mut fds)?;
        // Named as skiff sees the directory: the host path of the cell is not its business.
        let host_dir = self.bins.path().display().to_string();
        let bin = self
            .bins
            .resolve(binary)
            .map_err(|e| crate::chain(&e).replace(&host_dir, "/bin"))?;
        let name = bin
            .path()
            .file_name()
            .map(|n| n.to_owned())
            .unwrap_or_default();
        let mut argv = vec![cstr(name.as_bytes())?];
        for a in args {
            argv.push(cstr(a.as_bytes())?);
        }
        let (status_r, status_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
        let supervisor = std::process::id() as libc::pid_t;
        let mut pidfd: RawFd = -1;
        let mut clone = crate::supervise::CloneArgs {
            flags: crate::supervise::CLONE_INTO_CGROUP
                | (libc::CLONE_PIDFD
                    | libc::CLONE_NEWNS
                    | libc::CLONE_NEWNET
                    | libc::CLONE_NEWIPC
                    | libc::CLONE_NEWUTS) as u64,
            pidfd: &mut pidfd as *mut RawFd as u64,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: self.cgroup.as_raw_fd() as u64,
            ..Default::default()
        };
        // SAFETY: clone3 without a stack behaves as fork; skiff-jailer is single-threaded,
        // so the child may run ordinary code until exec; `clone` and `pidfd` outlive the call.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut clone as *mut crate::supervise::CloneArgs,
                std::mem::size_of::<crate::supervise::CloneArgs>(),
            )
        };
        if pid < 0 {
            return Err(format!("clone3: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            // A panic must not unwind into a second supervisor loop.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.in_child(status_r, status_w, &bin, targets, fds, &argv, supervisor)
            }));
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(126) };
        }
        drop(status_w);
        // SAFETY: CLONE_PIDFD stored a new pidfd owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        // EOF without a word: exec succeeded (the pipe was close-on-exec). A child that
        // neither execs nor fails in time (stopped, throttled by the cgroup) is killed.
        let why = match read_until_eof(status_r, START_LIMIT_MS) {
            Some(why) => why,
            None => {
                // SAFETY: kill on our own child, not yet reaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                format!("it did not start within {} s", START_LIMIT_MS / 1000)
            }
        };
        if !why.is_empty() {
            let mut st = 0;
            // SAFETY: reaps our own child, which has ended or is about to.
            unsafe { libc::waitpid(pid as libc::pid_t, &mut st, 0) };
            return Err(format!(
                "starting /bin/{} in its cell: {why}",
                bin.relative().display()
            ));
        }
        Ok((pid as u32, pidfd))
    }

    /// The child's side of a launch: never returns.
    #[allow(clippy::too_many_arguments)]
    fn in_child(
        &self,
        status_r: std::fs::File,
        mut status_w: std::fs::File,
        bin: &sandbox::binary::DeviceBinary,
        targets: &[RawFd],
        fds: Vec<OwnedFd>,
        argv: &[CString],
        supervisor: libc::pid_t,
    ) {
        {
            drop(status_r);
            // The status pipe and the program stay open across the fd placement: above
            // every number an fd goes to.
            let floor = targets.iter().copied().max().unwrap_or(2) + 1;
            let lift = |fd: std::io::Result<OwnedFd>, what: &'static str| {
                jail::lift(
                    fd.map_err(|source| JailError::Sys { step: what, source })?,
                    floor,
                )
            };
            let prepared =
                lift(bin.fd().try_clone_to_owned(), "dup of the program's fd").and_then(|exe| {
                    let w = lift(status_w.try_clone().map(OwnedFd::from), "dup of the pipe")?;
                    Ok((exe, w))
                });
            let err = match prepared {
                Ok((exe, w)) => {
                    drop(std::mem::replace(&mut status_w, std::fs::File::from(w)));
                    match self.child_steps(exe.as_raw_fd(), targets, &fds, argv, supervisor) {
                        Ok(never) => match never {},
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            let _ = write!(status_w, "{}", crate::chain(&err));
        }
    }

    /// In the child: the device cell, then exec. Returns only on failure.
    fn child_steps(
        &self,
        exe: RawFd,
        targets: &[RawFd],
        fds: &[OwnedFd],
        argv: &[CString],
        supervisor: libc::pid_t,
    ) -> Result<std::convert::Infallible, JailError> {
        jail::make_slave()?;
        self.build_root()?;
        jail::pivot_into_mounted(&self.mount_point, true)?;
        // No controlling terminal (the operator's, when the jailer runs in the foreground)
        // and no terminal on stdin or stdout; stderr stays for the log.
        jail::detach_terminal()?;
        jail::rlimits(self.plan.no_file, self.plan.fsize)?;
        jail::place_fds(fds, targets)?;
        jail::drop_and_exec(
            self.plan.uid,
            self.plan.gid,
            jail::Program::Fd(exe),
            argv,
            supervisor,
        )
    }

    /// The device process gets the operator's seccomp choice, not one skiff makes up: with
    /// the built-in filters no seccomp flag may be asked for, with `--no-seccomp` that flag
    /// must be there, and with a filter file skiff's `--seccomp-filter /proc/self/fd/N`
    /// must name one of the passed fds, which is replaced by the operator's file as the
    /// launcher opens it in the cell.
    fn enforce_seccomp(
        &self,
        targets: &[RawFd],
        args: &[OsString],
        fds: &mut [OwnedFd],
    ) -> Result<(), String> {
        let no = args.iter().any(|a| a == "--no-seccomp");
        let file_at = args.iter().position(|a| a == "--seccomp-filter");
        if args
            .iter()
            .any(|a| a.as_bytes().starts_with(b"--seccomp-filter="))
        {
            return Err("--seccomp-filter=... is not how skiff passes the filter".into());
        }
        let refuse = |want: &str| {
            Err(format!(
                "the device's seccomp choice is the operator's ({want}), not skiff's to make"
            ))
        };
        match &self.plan.seccomp {
            OperatorSeccomp::BuiltIn if no || file_at.is_some() => refuse("the built-in filters"),
            OperatorSeccomp::BuiltIn => Ok(()),
            OperatorSeccomp::Off if no && file_at.is_none() => Ok(()),
            OperatorSeccomp::Off => refuse("--no-seccomp"),
            OperatorSeccomp::File(path) => {
                let Some(i) = file_at.filter(|_| !no) else {
                    return refuse("--seccomp-filter");
                };
                let n = args
                    .get(i + 1)
                    .and_then(|v| v.to_str())
                    .and_then(|v| v.strip_prefix("/proc/self/fd/"))
                    .and_then(|v| v.parse::<RawFd>().ok())
                    .and_then(|n| targets.iter().position(|t| *t == n))
                    .ok_or("--seccomp-filter must name a passed fd (/proc/self/fd/N)")?;
                fds[n] = open_in_cell(&self.plan.cell_root, path).map_err(|e| {
                    format!("the operator's --seccomp-filter {}: {e}", path.display())
                })?;
                Ok(())
            }
        }
    }

    /// The device's root: a small tmpfs on `mount_point` with the bind mounts it needs.
    fn build_root(&self) -> Result<(), JailError> {
        let root = &self.mount_point;
        jail::mount_tmpfs(root, "size=64k,nr_inodes=64,mode=0755")?;
        jail::mkdir(&root.join("dev"), 0o755)?;
        jail::mkdir(&root.join("proc"), 0o555)?;
        jail::mkdir(&root.join("old_root"), 0o700)?;
        for node in ["dev/null", "dev/urandom"] {
            jail::bind_file(&self.plan.cell_root.join(node), &root.join(node), false)?;
        }
        for f in &self.plan.runtime_files {
            let rel = f.strip_prefix("/").unwrap_or(f);
            let to = root.join(rel);
            let mut missing = Vec::new();
            let mut d = to.parent();
            while let Some(x) = d {
                if x == root.as_path() || x.exists() {
                    break;
                }
                missing.push(x.to_path_buf());
                d = x.parent();
            }
            for x in missing.into_iter().rev() {
                jail::mkdir(&x, 0o755)?;
            }
            jail::bind_file(&self.plan.cell_root.join(rel), &to, true)?;
        }
        Ok(())
    }
}

/// Opens `path` (as skiff sees it) read-only, resolved inside the cell.
fn open_in_cell(cell_root: &Path, path: &Path) -> std::io::Result<OwnedFd> {
    let root = std::fs::File::open(cell_root)?;
    let rel = path.strip_prefix("/").unwrap_or(path);
    let c = CString::new(rel.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    sandbox::binary::open_read_only(
        root.as_fd(),
        &c,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: stat is plain data; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an open fd with a valid out-parameter.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// Reads `r` to its end, waiting at most `ms` in all; `None` on timeout.
fn read_until_eof(mut r: std::fs::File, ms: libc::c_int) -> Option<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms as u64);
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one initialised pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as libc::c_int) };
        if n == 0 {
            return None;
        }
        let mut buf = [0u8; 1024];
        match r.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Some(String::from_utf8_lossy(&out).into_owned()),
        }
        if out.len() > 64 * 1024 {
            return Some(String::from_utf8_lossy(&out).into_owned());
        }
    }
}

fn cstr(b: &[u8]) -> Result<CString, String> {
    CString::new(b).map_err(|_| "an argument holds a NUL byte".to_string())
}

/// A close-on-exec pipe: (read, write).
fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    })
}

//! Device processes (`skiff-blk`, `skiff-net`): started per device, watched through a
//! pidfd, stopped and reaped at the end. skiff forks them itself, or, under skiff-jailer,
//! asks the jailer's launcher to (each then runs in a cell of its own under another uid;
//! skiff gets a pidfd and asks the launcher how it ended).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;

use sandbox::launch::LauncherClient;
use std::time::{Duration, Instant};

use crate::device_binary::DeviceBinary;
use crate::devices::metrics_page::MetricsPage;

/// Errors starting a device process.
#[derive(Debug, thiserror::Error)]
pub enum DeviceProcessError {
    /// The binary could not be started.
    #[error("cannot start {bin}")]
    Spawn {
        /// Binary.
        bin: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// pidfd_open failed.
    #[error("cannot watch {0}")]
    Pidfd(String, #[source] std::io::Error),
    /// The launcher did not start it.
    #[error("the launcher did not start {bin}")]
    Launch {
        /// Binary.
        bin: String,
        /// Cause.
        #[source]
        source: sandbox::launch::LaunchError,
    },
}

/// The process: a child of skiff, or one the launcher started.
enum Proc {
    Child(Child),
    Launched {
        pid: u32,
        launcher: Arc<LauncherClient>,
        /// How it ended, once the launcher said (it tells only once).
        ended: Option<ExitStatus>,
    },
}

impl Proc {
    fn pid(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Launched { pid, .. } => *pid,
        }
    }

    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self {
            Proc::Child(c) => c.try_wait(),
            Proc::Launched {
                pid,
                launcher,
                ended,
            } => {
                if ended.is_none() {
                    *ended = launcher
                        .status(*pid)
                        .map_err(|e| std::io::Error::other(crate::error_chain(&e)))?
                        .map(ExitStatus::from_raw);
                }
                Ok(*ended)
            }
        }
    }

    fn kill(&mut self) -> std::io::Result<()> {
        match self {
            Proc::Child(c) => c.kill(),
            Proc::Launched { pid, launcher, .. } => launcher
                .kill(*pid)
                .map_err(|e| std::io::Error::other(crate::error_chain(&e))),
        }
    }

    /// Waits for the end (after a kill).
    fn wait(&mut self) {
        match self {
            Proc::Child(c) => {
                let _ = c.wait();
            }
            Proc::Launched { .. } => {
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(self.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
}

/// A running device process.
pub struct DeviceProcess {
    /// e.g. "skiff-blk for drive rootfs".
    pub name: String,
    child: Proc,
    /// Readable when the process exits.
    pub pidfd: OwnedFd,
}

impl DeviceProcess {
    /// The device process `pid`, started by `launcher` for the VMM this one replaces;
    /// `pidfd` handed over.
    pub fn adopt_launched(
        name: String,
        pid: u32,
        pidfd: OwnedFd,
        launcher: Arc<LauncherClient>,
    ) -> DeviceProcess {
        DeviceProcess {
            name,
            child: Proc::Launched {
                pid,
                launcher,
                ended: None,
            },
            pidfd,
        }
    }

    /// Whether the launcher started it (a VMM that replaces this one can take it over).
    pub fn launched(&self) -> bool {
        matches!(self.child, Proc::Launched { .. })
    }

    /// Starts `bin args...` (its vhost-user connection is one of the fds it is given).
    pub fn spawn(
        name: String,
        bin: &DeviceBinary,
        args: &[String],
    ) -> Result<Self, DeviceProcessError> {
        Self::start(name, bin, args, Vec::new())
    }

    /// Starts `bin args... --metrics-fd N`, where N is `metrics`'s memfd, inherited by this
    /// child only (it stays close-on-exec in the VMM, so no other child gets it). Otherwise
    /// as [`DeviceProcess::spawn`]. The page stays the VMM's: a restarted or upgraded
    /// device process is given the same page and its counts continue.
    pub fn spawn_with_metrics(
        name: String,
        bin: &DeviceBinary,
        args: &[String],
        metrics: &MetricsPage,
    ) -> Result<Self, DeviceProcessError> {
        let fd = metrics.fd().as_raw_fd();
        let mut args = args.to_vec();
        args.push("--metrics-fd".to_string());
        args.push(fd.to_string());
        Self::start(name, bin, &args, vec![fd])
    }

    /// Starts `bin args...` with `fds` inherited by this child only (at the same numbers,
    /// which the caller puts in `args`). Otherwise as [`DeviceProcess::spawn`].
    pub fn spawn_with_fds(
        name: String,
        bin: &DeviceBinary,
        args: &[String],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Self, DeviceProcessError> {
        let raw = fds.iter().map(|f| f.as_raw_fd()).collect();
        Self::start(name, bin, args, raw)
    }

    fn start(
        name: String,
        bin: &DeviceBinary,
        args: &[String],
        inherit: Vec<RawFd>,
    ) -> Result<Self, DeviceProcessError> {
        if let Some(launcher) = bin.launcher() {
            return Self::launch(name, bin, launcher.clone(), args, &inherit);
        }
        let mut cmd = Command::new(bin.exec_path());
        cmd.arg0(bin.file_name())
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // The environment is cleared; only the log level goes through.
        if let Some(level) = std::env::var_os("RUST_LOG") {
            cmd.env("RUST_LOG", level);
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, sigprocmask, close_range, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                // Die with the VMM, whatever way it ends.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The VMM blocks SIGTERM/SIGINT to read them from a signalfd; the child
                // must not inherit that.
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                // Whatever a library opened without O_CLOEXEC stays behind: every fd past
                // stdio closes at exec, then exactly the fds meant for this child are kept.
                if libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // Same number as in the VMM, so it cannot collide with stdio or std's own
                // exec-error pipe (both distinct open fds here). The binary's fd stays
                // close-on-exec: exec opens it by its /proc/self/fd path first.
                for &fd in &inherit {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DeviceProcessError::Spawn {
            bin: bin.path().display().to_string(),
            source,
        })?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            return Err(DeviceProcessError::Pidfd(
                name,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh pidfd owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        log::debug!("started {name} (pid {})", child.id());
        Ok(DeviceProcess {
            name,
            child: Proc::Child(child),
            pidfd,
        })
    }

    /// Asks the launcher to start `bin` (by its name in the binary directory) with `args`
    /// and exactly the fds `inherit`, at the same numbers.
    fn launch(
        name: String,
        bin: &DeviceBinary,
        launcher: Arc<LauncherClient>,
        args: &[String],
        inherit: &[RawFd],
    ) -> Result<Self, DeviceProcessError> {
        // SAFETY: the fds are open for the duration of this call (the caller holds them).
        let fds: Vec<BorrowedFd<'_>> = inherit
            .iter()
            .map(|fd| unsafe { BorrowedFd::borrow_raw(*fd) })
            .collect();
        let (pid, pidfd) = launcher
            .launch(bin.relative(), args, &fds)
            .map_err(|source| DeviceProcessError::Launch {
                bin: bin.path().display().to_string(),
                source,
            })?;
        log::debug!("the launcher started {name} (pid {pid})");
        Ok(DeviceProcess {
            name,
            child: Proc::Launched {
                pid,
                launcher,
                ended: None,
            },
            pidfd,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// `Err(description)` when the process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} (pid {}) {}",
                self.name,
                self.pid(),
                how_it_ended(status)
            )),
            Err(e) => Err(format!(
                "{} (pid {}): cannot check it: {e}",
                self.name,
                self.pid()
            )),
        }
    }

    /// How the process ended ([`how_it_ended`]), once it has.
    pub fn ended_how(&mut self) -> Option<String> {
        self.child.try_wait().ok().flatten().map(how_it_ended)
    }

    /// Waits up to `grace` for the process to exit on its own (its frontend has hung up),
    /// then kills it; reaps it either way.
    pub fn stop(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    log::debug!("{} exited: {status}", self.name);
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => break,
            }
        }
        log::warn!(
            "{} (pid {}) did not exit; killing it",
            self.name,
            self.pid()
        );
        let _ = self.child.kill();
        self.child.wait();
    }
}

/// How a device process ended, as `/skiff/devices` and the log say it: `exited with
/// status N`, `killed by signal N (NAME)`, or `killed by seccomp (SIGSYS)`.
pub fn how_it_ended(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(libc::SIGSYS)) => "killed by seccomp (SIGSYS)".into(),
        (_, Some(sig)) => {
            // SAFETY: strsignal returns a pointer to a static (or thread-local) string.
            let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) };
            format!("killed by signal {sig} ({})", name.to_string_lossy())
        }
        (Some(code), None) => format!("exited with status {code}"),
        (None, None) => format!("ended: {status}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seccomp_kill_is_named() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            how_it_ended(std::process::ExitStatus::from_raw(libc::SIGSYS | 0x80)),
            "killed by seccomp (SIGSYS)"
        );
        assert_eq!(
            how_it_ended(std::process::ExitStatus::from_raw(libc::SIGKILL)),
            "killed by signal 9 (Killed)"
        );
        assert_eq!(
            how_it_ended(std::process::ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
    }

    /// Runs `sh -c script` the way a device process is started and returns its exit code.
    fn exit_code(script: &str, metrics: Option<&MetricsPage>) -> Option<i32> {
        let args = vec!["-c".to_string(), script.to_string()];
        let dir = crate::device_binary::BinaryDir::open(Some(std::path::Path::new("/bin")))
            .expect("/bin");
        let bin = dir.resolve(std::path::Path::new("sh")).expect("sh");
        let mut p = match metrics {
            Some(m) => DeviceProcess::spawn_with_metrics("sh".into(), &bin, &args, m),
            None => DeviceProcess::spawn("sh".into(), &bin, &args),
        }
        .expect("spawn");
        let Proc::Child(c) = &mut p.child else {
            panic!("a forked child")
        };
        c.wait().expect("wait").code()
    }

    #[test]
    fn a_child_gets_stdio_and_its_own_fds_only() {
        // An fd a library opened without O_CLOEXEC, and the environment.
        // SAFETY: eventfd returns a new fd or -1.
        let leaked = unsafe { libc::eventfd(0, 0) };
        assert!(leaked >= 0);
        std::env::set_var("SKIFF_SECRET_TEST_VAR", "1");
        let page = MetricsPage::create("fd-test").expect("page");
        let fd = page.fd().as_raw_fd();
        // Only 0, 1, 2, the page and the shell's own fd listing /proc/self/fd.
        let script = format!(
            r#"n=$(ls /proc/self/fd | sort -n | tr '\n' ' '); [ "$n" = "0 1 2 3 {fd} " ] || [ "$n" = "0 1 2 {fd} " ] || {{ echo "fds: $n" >&2; exit 1; }}; [ -z "$SKIFF_SECRET_TEST_VAR" ] && [ -z "$HOME" ]"#
        );
        let code = exit_code(&script, Some(&page));
        // SAFETY: closing the fd opened above.
        unsafe { libc::close(leaked) };
        assert_eq!(code, Some(0));
    }

    #[test]
    fn metrics_page_is_inherited_by_that_child_only() {
        let page = MetricsPage::create("spawn-test").expect("page");
        let fd = page.fd().as_raw_fd();
        // `sh -c script --metrics-fd N`: $0 and $1 are the appended option; the fd is open
        // in the child and is the 4096-byte page.
        let script = format!(
            r#"[ "$0" = --metrics-fd ] && [ "$1" = {fd} ] && [ "$(stat -L -c %s /proc/self/fd/$1)" = 4096 ]"#
        );
        assert_eq!(exit_code(&script, Some(&page)), Some(0));
        // A plain spawn does not get it, and the VMM's fd is still close-on-exec.
        assert_eq!(
            exit_code(&format!("[ ! -e /proc/self/fd/{fd} ]"), None),
            Some(0)
        );
        // SAFETY: F_GETFD on an fd the page owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}

//! Starting a device process connected to the VMM, and the arguments each kind gets.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::BuildError;
use crate::device_binary::DeviceBinary;
use crate::device_process::DeviceProcess;
use crate::devices::metrics_page::MetricsPage;
use crate::devices::virtio::vhost_user::{connect_with_retry, DeviceKind, VhostUserDevice};
use tapdev::Tap;

/// The seccomp choice as device processes get it: `--seccomp-filter FILE` becomes an fd
/// skiff opened at start (`--seccomp-filter /proc/self/fd/N`, N inherited), so that a
/// device process in a cell of its own, where no path of skiff's is visible, reads the same
/// file, and a file replaced later changes nothing.
pub struct DeviceSeccomp {
    choice: sandbox::SeccompChoice,
    file: Option<File>,
}

impl DeviceSeccomp {
    /// From skiff's own choice; opens the filter file.
    pub fn new(choice: &sandbox::SeccompChoice) -> std::io::Result<Self> {
        Ok(match choice {
            sandbox::SeccompChoice::File(path) => {
                let file = File::open(path)?;
                DeviceSeccomp {
                    choice: sandbox::SeccompChoice::File(PathBuf::from(format!(
                        "/proc/self/fd/{}",
                        file.as_raw_fd()
                    ))),
                    file: Some(file),
                }
            }
            other => DeviceSeccomp {
                choice: other.clone(),
                file: None,
            },
        })
    }

    /// The device process's arguments.
    pub fn args(&self) -> Vec<String> {
        self.choice.to_args()
    }

    /// The fd the device process must inherit, if any.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }
}

/// How long a backend may take to answer one vhost-user request (and an external one to
/// accept the connection).
pub(crate) const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a device process whose connection failed may take to be seen ended: its end
/// of the socketpair closes as it exits, a moment before it can be reaped.
const ENDED_GRACE: Duration = Duration::from_millis(500);

/// Starts device process `name` (`bin args...` with `fds` inherited) connected to the VMM
/// over a socketpair (AF_UNIX, SOCK_STREAM, close-on-exec): the child inherits one end as
/// `--socket-fd N`, appended to `args`, and the VMM closes its copy of that end once the
/// child runs; the other end is returned, with [`BACKEND_TIMEOUT`] on reads and writes as
/// on every vhost-user connection of skiff (the vhost crate retries a read or write that
/// timed out, though, so they do not end a request a live backend never answers). No
/// socket path is shared with the child and there is no connect to retry: the first
/// request waits until the child serves, or fails when it died (see [`negotiate`]).
pub fn spawn_connected(
    name: String,
    bin: &DeviceBinary,
    args: &[String],
    fds: &[BorrowedFd<'_>],
) -> Result<(DeviceProcess, UnixStream), BuildError> {
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| BuildError::Host("the socketpair of a device process", e))?;
    let mut args = args.to_vec();
    args.push("--socket-fd".into());
    args.push(theirs.as_raw_fd().to_string());
    let mut inherit = fds.to_vec();
    inherit.push(theirs.as_fd());
    // No socket path: DeviceProcess keeps one for processes that listen on a path.
    let process = DeviceProcess::spawn_with_fds(name, bin, &args, &inherit)?;
    // Only the child holds its end now, so its exit shows as the end of the connection.
    drop(theirs);
    for set in [UnixStream::set_read_timeout, UnixStream::set_write_timeout] {
        set(&ours, Some(BACKEND_TIMEOUT))
            .map_err(|e| BuildError::Host("the timeouts of a device connection", e))?;
    }
    Ok((process, ours))
}

/// Negotiates with device process `process` over `stream`, its connection from
/// [`spawn_connected`]. When that fails because the process ended (it exited before or
/// while answering), the error says so and how it ended ([`DeviceProcess::check_alive`]).
pub fn negotiate(
    process: &mut DeviceProcess,
    kind: DeviceKind,
    stream: UnixStream,
    max_queues: usize,
    mem: vm_memory::GuestMemoryMmap,
) -> Result<VhostUserDevice, BuildError> {
    // Kept open while a failure is looked into: a live process that refused a request must
    // not exit because its connection closed and then be reported as ended.
    let hold = stream.try_clone().ok();
    match VhostUserDevice::new(kind, stream, max_queues, mem) {
        Ok(dev) => Ok(dev),
        Err(e) => {
            let ended = ended_within(process, ENDED_GRACE);
            drop(hold);
            Err(match ended {
                Some(why) => BuildError::Ended(why, e),
                None => BuildError::Backend(
                    format!("{}: vhost-user negotiation failed", process.name),
                    e,
                ),
            })
        }
    }
}

/// Connects to the external vhost-user backend `name` (qemu-storage-daemon, a user's own
/// skiff-blk, ...) listening on `socket`, which may still be starting, and negotiates with
/// it. A backend that stops answering later fails the request instead of hanging a vCPU
/// ([`BACKEND_TIMEOUT`] on reads and writes).
pub fn connect_external(
    name: &str,
    kind: DeviceKind,
    socket: &Path,
    max_queues: usize,
    mem: vm_memory::GuestMemoryMmap,
) -> Result<VhostUserDevice, BuildError> {
    let stream = connect_with_retry(socket, BACKEND_TIMEOUT, || Ok(()))
        .map_err(|e| BuildError::Backend(format!("{name} is not reachable"), e))?;
    let _ = stream.set_read_timeout(Some(BACKEND_TIMEOUT));
    let _ = stream.set_write_timeout(Some(BACKEND_TIMEOUT));
    VhostUserDevice::new(kind, stream, max_queues, mem)
        .map_err(|e| BuildError::Backend(format!("{name}: vhost-user negotiation failed"), e))
}

/// How `p` ended, if it has or does within `grace` (its pidfd becomes readable).
fn ended_within(p: &mut DeviceProcess, grace: Duration) -> Option<String> {
    crate::wait_readable(p.pidfd.as_raw_fd(), grace);
    p.check_alive().err()
}

/// skiff-blk's arguments for serving the image open on `image` (through io_uring with
/// `io_uring`), counting in `page` (the connection, `--socket-fd`, is added by
/// [`spawn_connected`]).
pub fn blk_args(
    image: &File,
    read_only: bool,
    io_uring: bool,
    page: &MetricsPage,
    seccomp: &DeviceSeccomp,
) -> Vec<String> {
    let mut args = vec![
        "--image-fd".to_string(),
        image.as_raw_fd().to_string(),
        "--metrics-fd".to_string(),
        page.fd().as_raw_fd().to_string(),
    ];
    if read_only {
        args.push("--read-only".into());
    }
    if io_uring {
        args.extend(["--io-engine".into(), "io-uring".into()]);
    }
    args.extend(seccomp.args());
    args
}

/// skiff-net's arguments for serving the TAP `tap`, counting in `page` (the connection,
/// `--socket-fd`, is added by [`spawn_connected`]).
pub fn net_args(
    tap: &Tap,
    mac: Option<&str>,
    page: &MetricsPage,
    seccomp: &DeviceSeccomp,
) -> Vec<String> {
    let mut args = vec![
        "--tap-fd".to_string(),
        tap.as_fd().as_raw_fd().to_string(),
        "--metrics-fd".to_string(),
        page.fd().as_raw_fd().to_string(),
    ];
    if let Some(mac) = mac {
        args.push("--mac".into());
        args.push(mac.to_string());
    }
    args.extend(seccomp.args());
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_binary::BinaryDir;
    use std::path::Path;

    /// bash, not sh: the socket's fd number is whatever the test process has free, often
    /// 10 or more under parallel tests, and dash reads only one-digit fds in redirections
    /// (`exec 12>&-` runs a command named 12 and exits 127).
    fn sh() -> DeviceBinary {
        let dir = BinaryDir::open(Some(Path::new("/bin"))).expect("/bin");
        dir.resolve(Path::new("bash")).expect("bash")
    }

    fn start(script: &str) -> (DeviceProcess, UnixStream) {
        let args = vec!["-c".to_string(), script.to_string()];
        spawn_connected("sh for a test".into(), &sh(), &args, &[]).expect("spawn")
    }

    #[test]
    fn the_child_inherits_its_end_as_socket_fd_and_the_vmm_keeps_the_other() {
        // `sh -c script --socket-fd N`: $0 and $1 are the appended option; fd N is a socket
        // in the child, and the only one besides stdio.
        let (mut p, ours) = start(
            r#"[ "$0" = --socket-fd ] && [ -S /proc/self/fd/$1 ] && echo up >&$1 && read x <&$1 && [ "$x" = go ]"#,
        );
        use std::io::{BufRead, BufReader, Write};
        let mut line = String::new();
        BufReader::new(&ours).read_line(&mut line).expect("read");
        assert_eq!(line, "up\n");
        (&ours).write_all(b"go\n").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while p.check_alive().is_ok() {
            assert!(std::time::Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.ended_how().as_deref(), Some("exited with status 0"));
        // The VMM's end is close-on-exec and has the request timeouts.
        // SAFETY: F_GETFD on an fd the test owns.
        let flags = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert_eq!(ours.read_timeout().expect("timeout"), Some(BACKEND_TIMEOUT));
    }

    #[test]
    fn a_process_that_ends_before_answering_is_named_with_how_it_ended() {
        let (mut p, ours) = start("exit 3");
        let pid = p.pid();
        let mem = vm_memory::GuestMemoryMmap::new();
        let e = match negotiate(&mut p, DeviceKind::Block, ours, 1, mem) {
            Ok(_) => panic!("negotiated with sh"),
            Err(e) => e,
        };
        assert!(matches!(e, BuildError::Ended(..)), "{e:?}");
        let chain = crate::error_chain(&e);
        assert!(
            chain.starts_with(&format!(
                "sh for a test (pid {pid}) exited with status 3 before it answered: vhost-user "
            )),
            "{chain}"
        );
    }

    #[test]
    fn blk_args_ask_for_io_uring_only_when_told() {
        let image = File::open("/proc/self/exe").expect("image");
        let page = MetricsPage::create("t").expect("page");
        let seccomp = DeviceSeccomp::new(&sandbox::SeccompChoice::Off).expect("seccomp");
        let sync = blk_args(&image, true, false, &page, &seccomp);
        assert!(!sync.contains(&"--io-engine".to_string()), "{sync:?}");
        assert!(sync.contains(&"--read-only".to_string()), "{sync:?}");
        let uring = blk_args(&image, false, true, &page, &seccomp);
        let at = uring
            .iter()
            .position(|a| a == "--io-engine")
            .expect("--io-engine");
        assert_eq!(uring[at + 1], "io-uring");
    }

    #[test]
    fn a_live_process_that_hangs_up_is_not_said_to_have_ended() {
        // It closes its end without answering, and lives on.
        let (mut p, ours) = start(r#"eval "exec $1>&-"; sleep 5"#);
        let mem = vm_memory::GuestMemoryMmap::new();
        let e = match negotiate(&mut p, DeviceKind::Block, ours, 1, mem) {
            Ok(_) => panic!("negotiated with sh"),
            Err(e) => e,
        };
        assert!(matches!(e, BuildError::Backend(..)), "{e:?}");
        assert!(
            crate::error_chain(&e).starts_with("sh for a test: vhost-user negotiation failed"),
            "{e}"
        );
        p.stop(Duration::ZERO);
    }
}

//! Where a device process's vhost-user frontend comes from: a socket path it listens on
//! (`--socket PATH`) or a connection it inherits already connected (`--socket-fd N`, one
//! end of a socketpair the VMM made; the next step of confinement puts device processes in
//! mount namespaces of their own, where no socket path is shared with the VMM).

use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

/// Errors taking over `--socket-fd`.
#[derive(Debug, thiserror::Error)]
pub enum VuSocketError {
    /// `--socket-fd` is 0, 1 or 2.
    #[error("--socket-fd {0} is a standard stream, not a vhost-user connection")]
    StdStream(RawFd),
    /// `--socket-fd` is not open in this process.
    #[error("--socket-fd {0} is not an open file descriptor")]
    NotOpen(RawFd, #[source] io::Error),
    /// `--socket-fd` is not a socket at all.
    #[error("--socket-fd {name} is not a socket; {NEED}")]
    NotSocket {
        /// `N (what /proc/self/fd/N links to)`.
        name: String,
    },
    /// getsockopt failed for another reason than ENOTSOCK.
    #[error("--socket-fd {0}: cannot read its {1}")]
    Query(RawFd, &'static str, #[source] io::Error),
    /// `--socket-fd` is a socket of another family or type.
    #[error("--socket-fd {fd} is {kind} socket; {NEED}")]
    WrongKind {
        /// The fd.
        fd: RawFd,
        /// e.g. "an AF_INET SOCK_STREAM".
        kind: String,
    },
    /// `--socket-fd` is a listening or unconnected socket.
    #[error("--socket-fd {fd} is {what}; {NEED}")]
    NotConnected {
        /// The fd.
        fd: RawFd,
        /// "a listening socket" or "not connected".
        what: &'static str,
    },
    /// Setting FD_CLOEXEC or clearing O_NONBLOCK failed.
    #[error("--socket-fd {0}: cannot set its flags")]
    Flags(RawFd, #[source] io::Error),
}

/// What a `--socket-fd` must be, said in every refusal.
const NEED: &str = "a connected AF_UNIX SOCK_STREAM socket is needed (the frontend's end is the other one, e.g. of a socketpair)";

/// The frontend options of skiff-blk and skiff-net (exactly one of the two).
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
#[group(id = "frontend", required = true, multiple = false)]
pub struct FrontendArgs {
    /// vhost-user socket to listen on (a stale file is removed); the first frontend that
    /// connects is served. Either --socket or --socket-fd gives the frontend, not both.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Inherited fd of the vhost-user connection, already connected: an AF_UNIX SOCK_STREAM
    /// socket whose other end is the frontend's (the VMM makes a socketpair and keeps one
    /// end), so that no socket path needs to be shared with the VMM.
    ///
    /// It is checked to be a connected AF_UNIX SOCK_STREAM socket (exit 1 naming
    /// --socket-fd otherwise), gets FD_CLOEXEC set and O_NONBLOCK cleared, and that one
    /// frontend is served until it hangs up.
    #[arg(
        long = "socket-fd",
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(0..)
    )]
    pub socket_fd: Option<i32>,
}

impl FrontendArgs {
    /// The socket they name.
    pub fn source(self) -> SocketSource {
        SocketSource::from_args(self.socket, self.socket_fd)
    }
}

/// The vhost-user socket as the command line gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketSource {
    /// `--socket PATH`: listen on PATH (a stale socket file is removed) and accept one
    /// frontend.
    Path(PathBuf),
    /// `--socket-fd N`: an inherited, already connected AF_UNIX SOCK_STREAM socket.
    Fd(RawFd),
}

impl SocketSource {
    /// From the two exclusive options (clap requires exactly one).
    pub fn from_args(socket: Option<PathBuf>, socket_fd: Option<i32>) -> Self {
        match (socket, socket_fd) {
            (_, Some(fd)) => SocketSource::Fd(fd),
            (Some(path), None) => SocketSource::Path(path),
            // clap requires one of the two.
            (None, None) => SocketSource::Path(PathBuf::new()),
        }
    }

    /// The inherited fd, for the checks that inherited fds are distinct.
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            SocketSource::Path(_) => None,
            SocketSource::Fd(fd) => Some(*fd),
        }
    }

    /// What the backend does with it, for its log: `listening on PATH` or `serving the
    /// frontend connected on --socket-fd N`.
    pub fn activity(&self) -> String {
        match self {
            SocketSource::Path(path) => format!("listening on {}", path.display()),
            SocketSource::Fd(fd) => format!("serving the frontend connected on --socket-fd {fd}"),
        }
    }

    /// Takes over the inherited connection (checked first: see [`take_connection`]), or
    /// passes the path on to be listened on later.
    pub fn open(&self) -> Result<FrontendSocket, VuSocketError> {
        match self {
            SocketSource::Path(path) => Ok(FrontendSocket::Listen(path.clone())),
            SocketSource::Fd(fd) => take_connection(*fd).map(FrontendSocket::Connected),
        }
    }
}

impl fmt::Display for SocketSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketSource::Path(path) => write!(f, "--socket {}", path.display()),
            SocketSource::Fd(fd) => write!(f, "--socket-fd {fd}"),
        }
    }
}

/// Where [`crate::vu_proxy::serve`] takes its one frontend from.
#[derive(Debug)]
pub enum FrontendSocket {
    /// Listen on this path and accept one connection.
    Listen(PathBuf),
    /// The frontend is already connected on this stream.
    Connected(UnixStream),
}

fn sockopt(fd: RawFd, opt: libc::c_int, what: &'static str) -> Result<libc::c_int, VuSocketError> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes (one c_int) into `value` and updates
    // `len`; both live across the call.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSOCK) {
            let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| format!("{fd} ({})", p.display()))
                .unwrap_or_else(|_| fd.to_string());
            return Err(VuSocketError::NotSocket { name: link });
        }
        return Err(VuSocketError::Query(fd, what, e));
    }
    Ok(value)
}

fn family_name(domain: libc::c_int) -> String {
    match domain {
        libc::AF_UNIX => "AF_UNIX".into(),
        libc::AF_INET => "AF_INET".into(),
        libc::AF_INET6 => "AF_INET6".into(),
        libc::AF_NETLINK => "AF_NETLINK".into(),
        libc::AF_PACKET => "AF_PACKET".into(),
        libc::AF_VSOCK => "AF_VSOCK".into(),
        d => format!("family {d}"),
    }
}

fn type_name(ty: libc::c_int) -> String {
    match ty {
        libc::SOCK_STREAM => "SOCK_STREAM".into(),
        libc::SOCK_DGRAM => "SOCK_DGRAM".into(),
        libc::SOCK_SEQPACKET => "SOCK_SEQPACKET".into(),
        libc::SOCK_RAW => "SOCK_RAW".into(),
        t => format!("type {t}"),
    }
}

/// Takes over fd `fd`, inherited from the VMM (`--socket-fd N`): a connected AF_UNIX
/// SOCK_STREAM socket (checked with getsockopt SO_DOMAIN, SO_TYPE and SO_ACCEPTCONN, and a
/// non-blocking recv MSG_PEEK). Sets FD_CLOEXEC and clears O_NONBLOCK (the relay reads it blocking);
/// both are flags of this process's fd and of its own open file, which no other process
/// uses (the VMM holds the socketpair's other end).
///
/// The fd is checked before this takes ownership of it: on an error from the checks it is
/// left open and untouched. The caller must not use or close it after success.
pub fn take_connection(fd: RawFd) -> Result<UnixStream, VuSocketError> {
    if (0..=2).contains(&fd) {
        return Err(VuSocketError::StdStream(fd));
    }
    // SAFETY: F_GETFD only reads the flags of descriptor number `fd`, if it exists.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(VuSocketError::NotOpen(fd, io::Error::last_os_error()));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN, "socket family (SO_DOMAIN)")?;
    let ty = sockopt(fd, libc::SO_TYPE, "socket type (SO_TYPE)")?;
    if domain != libc::AF_UNIX || ty != libc::SOCK_STREAM {
        let family = family_name(domain);
        let article = if family.starts_with(['A', 'E', 'I', 'O', 'U']) {
            "an"
        } else {
            "a"
        };
        return Err(VuSocketError::WrongKind {
            fd,
            kind: format!("{article} {family} {}", type_name(ty)),
        });
    }
    if sockopt(fd, libc::SO_ACCEPTCONN, "listening state (SO_ACCEPTCONN)")? != 0 {
        return Err(VuSocketError::NotConnected {
            fd,
            what: "a listening socket (give its path with --socket instead)",
        });
    }
    // Connected or not: a peek that neither waits nor takes anything. An AF_UNIX stream
    // socket that is not connected answers EINVAL; a connected one data (left in place),
    // EAGAIN, or the end of the stream (the frontend left already: serving ends at once).
    // Not getpeername: a device process the VMM forks after installing its own seccomp
    // filter keeps that filter, which allows recvfrom, not getpeername.
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`, which lives across the call.
    let ret = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if ret < 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => {}
            Some(libc::EINVAL) | Some(libc::ENOTCONN) => {
                return Err(VuSocketError::NotConnected {
                    fd,
                    what: "not connected",
                })
            }
            _ => {
                return Err(VuSocketError::Query(
                    fd,
                    "connection state (recv MSG_PEEK)",
                    e,
                ))
            }
        }
    }
    // SAFETY: `fd` is open and a connected AF_UNIX stream socket (checked above); it was
    // inherited for --socket-fd and nothing else in this process owns it.
    let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
    set_flags(fd).map_err(|e| VuSocketError::Flags(fd, e))?;
    Ok(stream)
}

/// Sets FD_CLOEXEC and clears O_NONBLOCK on an inherited socket.
fn set_flags(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL/F_GETFD/F_SETFD read or set flags of an fd we own.
    unsafe {
        let fdfl = libc::fcntl(fd, libc::F_GETFD);
        if fdfl < 0 || libc::fcntl(fd, libc::F_SETFD, fdfl | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        if fl & libc::O_NONBLOCK != 0 && libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};
    use std::os::unix::net::{UnixDatagram, UnixListener};

    use super::*;

    fn refused(fd: RawFd) -> String {
        crate::error_chain(&take_connection(fd).unwrap_err())
    }

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD reads the flags of an fd the test owns.
        unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    #[test]
    fn a_socketpair_end_is_taken_over_with_fd_cloexec() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        theirs.set_nonblocking(true).expect("nonblocking");
        let fd = theirs.into_raw_fd();
        // As inherited: FD_CLOEXEC cleared.
        // SAFETY: F_SETFD on an fd the test owns.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
        let stream = take_connection(fd).expect("take over");
        assert_eq!(stream.as_raw_fd(), fd);
        assert!(cloexec(fd), "FD_CLOEXEC set");
        // SAFETY: F_GETFL on an fd the test owns.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0, "O_NONBLOCK cleared");
        use std::io::{Read, Write};
        (&ours).write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        (&stream).read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping");

        // A frontend that already left is still a connection (serving then ends at once).
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        drop(ours);
        take_connection(theirs.into_raw_fd()).expect("a connection whose peer left");
    }

    #[test]
    fn anything_but_a_connected_unix_stream_is_refused() {
        assert_eq!(
            refused(1),
            "--socket-fd 1 is a standard stream, not a vhost-user connection"
        );
        assert_eq!(
            refused(65000),
            format!(
                "--socket-fd 65000 is not an open file descriptor: {}",
                io::Error::from_raw_os_error(libc::EBADF)
            )
        );
        let file = vmm_sys_util::tempfile::TempFile::new().expect("temp file");
        let fd = file.as_file().as_raw_fd();
        assert_eq!(
            refused(fd),
            format!(
                "--socket-fd {fd} ({}) is not a socket; {NEED}",
                file.as_path().display()
            )
        );
        // SAFETY: F_GETFD on the temp file's fd, still open: the refusal left it alone.
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
        let (d, _peer) = UnixDatagram::pair().expect("datagram pair");
        let fd = d.as_raw_fd();
        assert_eq!(
            refused(fd),
            format!("--socket-fd {fd} is an AF_UNIX SOCK_DGRAM socket; {NEED}")
        );
        let dir = vmm_sys_util::tempdir::TempDir::new().expect("temp dir");
        let listener = UnixListener::bind(dir.as_path().join("l.sock")).expect("listen");
        let fd = listener.as_raw_fd();
        assert_eq!(
            refused(fd),
            format!(
                "--socket-fd {fd} is a listening socket (give its path with --socket instead); {NEED}"
            )
        );
        // SAFETY: socket() returns a new fd or -1.
        let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh fd owned by nothing else.
        let unconnected = unsafe { OwnedFd::from_raw_fd(raw) };
        assert_eq!(
            refused(unconnected.as_raw_fd()),
            format!("--socket-fd {raw} is not connected; {NEED}")
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let fd = tcp.as_raw_fd();
        assert_eq!(
            refused(fd),
            format!("--socket-fd {fd} is an AF_INET SOCK_STREAM socket; {NEED}")
        );
    }
}

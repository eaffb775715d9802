//! A relay in front of vhost-user-backend's request handler: it serves a frontend that is
//! already connected (`--socket-fd`, which the crate cannot serve) as well as one accepted
//! on a socket path, and adds the inflight area for a backend that has one.
//!
//! vhost-user-backend only accepts from a listener, answers GET_INFLIGHT_FD and
//! SET_INFLIGHT_FD with "not supported", and keeps its handler private, so the messages
//! cannot be handled through the crate. Instead the frontend's connection ends here: a
//! thread reads each message and forwards it, fds included, to the crate's handler over a
//! private connection. For a backend with an inflight area ([`InflightHost`], skiff-blk)
//! it does not forward
//!
//! - GET_INFLIGHT_FD and SET_INFLIGHT_FD, answered here (the area goes to the backend
//!   through [`InflightHost`]);
//! - SET_PROTOCOL_FEATURES, forwarded without the INFLIGHT_SHMFD bit (the crate never
//!   offered it);
//!
//! and a second thread forwards the crate's replies, adding INFLIGHT_SHMFD to the answer
//! to GET_PROTOCOL_FEATURES. A backend without one (skiff-net) gets every message as the
//! crate would have read it from the frontend, and the frontend every reply unchanged.
//! Only control messages pass here; the rings, kicks and calls go between guest memory,
//! the frontend and the crate's workers directly.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use log::{error, info};
use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::mmap::NewBitmap;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::inflight::{InflightArea, InflightError};
use crate::vu_socket::FrontendSocket;

const SET_VRING_KICK: u32 = 12;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const HEADER: usize = 12;
/// Largest body the relay accepts (the vhost crate's limit is 4096 bytes).
const MAX_BODY: usize = 4096;
/// Most fds one message may carry (the vhost crate's limit).
const MAX_FDS: usize = 32;
/// Bytes of VhostUserInflight on the wire: u64, u64, u16, u16, padded to 8 as in C.
const INFLIGHT_BODY: usize = std::mem::size_of::<VhostUserInflight>();

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Setting up a socket failed.
    #[error("{0}")]
    Setup(String, #[source] io::Error),
    /// The vhost-user daemon failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The request handler did not answer on the private connection (another process
    /// connected to it first).
    #[error("the vhost-user request handler did not answer on its private connection")]
    Foreign,
    /// A message broke the protocol.
    #[error("vhost-user message {request}: {why}")]
    Protocol {
        /// Request code.
        request: u32,
        /// What was wrong.
        why: String,
    },
    /// The frontend asked for an inflight area the backend cannot serve.
    #[error(transparent)]
    Inflight(#[from] InflightError),
    /// Reading or writing a connection failed.
    #[error("connection failed")]
    Io(#[source] io::Error),
}

/// What the backend behind the relay provides for the inflight area.
pub trait InflightHost: Send + Sync {
    /// Number of queues the backend serves.
    fn max_queues(&self) -> u16;
    /// Makes `area` the backend's inflight area (GET_INFLIGHT_FD or SET_INFLIGHT_FD).
    fn set_inflight(&self, area: Arc<InflightArea>);
}

/// One vhost-user message as the relay reads it: header fields, body, fds.
pub struct Message {
    request: u32,
    flags: u32,
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn reply(request: u32, body: Vec<u8>) -> Self {
        Message {
            request,
            flags: FLAG_VERSION | FLAG_REPLY,
            body,
            fds: Vec::new(),
        }
    }

    fn u64_body(&self) -> Result<u64, ProxyError> {
        let b: [u8; 8] = self
            .body
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| self.bad("body shorter than 8 bytes"))?;
        Ok(u64::from_le_bytes(b))
    }

    fn bad(&self, why: &str) -> ProxyError {
        ProxyError::Protocol {
            request: self.request,
            why: why.into(),
        }
    }
}

/// Reads one message, with its fds, from the frontend or the crate; `None` at a clean end
/// of stream. A body over 4 KiB is refused before anything is allocated for it. (Public for
/// the fuzz target `vhost_user_relay`.)
pub fn read_message(s: &UnixStream) -> Result<Option<Message>, ProxyError> {
    let mut hdr = [0u8; HEADER];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: hdr.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `hdr`, which lives across the call and is HEADER bytes.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| ProxyError::Io(io::Error::from_raw_os_error(e.errno())))?;
    let fds: Vec<OwnedFd> = fds[..nfds]
        .iter()
        // SAFETY: recvmsg installed these fds in this process; nothing else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut r = s;
    r.read_exact(&mut hdr[n..]).map_err(ProxyError::Io)?;
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_BODY {
        return Err(ProxyError::Protocol {
            request,
            why: format!("body of {size} bytes (at most {MAX_BODY})"),
        });
    }
    let mut body = vec![0u8; size];
    r.read_exact(&mut body).map_err(ProxyError::Io)?;
    Ok(Some(Message {
        request,
        flags,
        body,
        fds,
    }))
}

fn write_message(s: &UnixStream, m: &Message) -> Result<(), ProxyError> {
    let mut buf = Vec::with_capacity(HEADER + m.body.len());
    buf.extend_from_slice(&m.request.to_le_bytes());
    buf.extend_from_slice(&m.flags.to_le_bytes());
    buf.extend_from_slice(&(m.body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&m.body);
    let fds: Vec<RawFd> = m.fds.iter().map(|f| f.as_raw_fd()).collect();
    let sent = s
        .send_with_fds(&[&buf[..]], &fds)
        .map_err(|e| ProxyError::Io(io::Error::from_raw_os_error(e.errno())))?;
    let mut w = s;
    w.write_all(&buf[sent..]).map_err(ProxyError::Io)
}

fn inflight_from(m: &Message) -> Result<VhostUserInflight, ProxyError> {
    let b = m
        .body
        .get(..20)
        .ok_or_else(|| m.bad("body shorter than VhostUserInflight"))?;
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    Ok(VhostUserInflight {
        mmap_size: u64_at(0),
        mmap_offset: u64_at(8),
        num_queues: u16_at(16),
        queue_size: u16_at(18),
    })
}

fn inflight_body(i: &VhostUserInflight) -> Vec<u8> {
    let mut b = Vec::with_capacity(INFLIGHT_BODY);
    let (size, offset, queues, qsize) = (i.mmap_size, i.mmap_offset, i.num_queues, i.queue_size);
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&queues.to_le_bytes());
    b.extend_from_slice(&qsize.to_le_bytes());
    b.resize(INFLIGHT_BODY, 0);
    b
}

/// The relay's frontend side: writes to the frontend come from both threads.
struct Relay {
    front: Mutex<UnixStream>,
    /// The backend's inflight area, if it has one.
    host: Option<Arc<dyn InflightHost>>,
}

impl Relay {
    fn to_front(&self, m: &Message) -> Result<(), ProxyError> {
        let s = self.front.lock().unwrap_or_else(|p| p.into_inner());
        write_message(&s, m)
    }

    /// Answers an inflight message for `host`; the error closes the connection.
    fn inflight(&self, host: &dyn InflightHost, m: Message, acked: bool) -> Result<(), ProxyError> {
        if !acked {
            return Err(m.bad("INFLIGHT_SHMFD was not negotiated"));
        }
        let info = inflight_from(&m)?;
        if m.request == GET_INFLIGHT_FD {
            let area = InflightArea::create(info.num_queues, info.queue_size, host.max_queues())?;
            let answer = area.info();
            let fd = area
                .file()
                .try_clone()
                .map_err(|e| ProxyError::Setup("cannot pass the inflight memfd".into(), e))?;
            info!(
                "inflight area created: {} queue(s) of {}, {} bytes",
                answer.num_queues, answer.queue_size, answer.mmap_size
            );
            host.set_inflight(Arc::new(area));
            let mut reply = Message::reply(GET_INFLIGHT_FD, inflight_body(&answer));
            reply.fds.push(OwnedFd::from(fd));
            return self.to_front(&reply);
        }
        let need_reply = m.flags & FLAG_NEED_REPLY != 0;
        let mut fds = m.fds;
        let file = match (fds.pop(), fds.is_empty()) {
            (Some(fd), true) => File::from(fd),
            _ => {
                return Err(ProxyError::Protocol {
                    request: SET_INFLIGHT_FD,
                    why: "needs exactly one fd".into(),
                })
            }
        };
        let result = InflightArea::open(file, &info);
        let status: u64 = match result {
            Ok(area) => {
                info!("inflight area set: {} queue(s) of {}", info.num_queues, {
                    info.queue_size
                });
                host.set_inflight(Arc::new(area));
                0
            }
            Err(e) if need_reply => {
                error!("SET_INFLIGHT_FD refused: {e}");
                1
            }
            Err(e) => return Err(e.into()),
        };
        if need_reply {
            self.to_front(&Message::reply(
                SET_INFLIGHT_FD,
                status.to_le_bytes().to_vec(),
            ))?;
        }
        Ok(())
    }
}

/// Frontend → crate: forwards every message but the inflight ones (those too when the
/// backend has no inflight area).
fn front_to_backend(
    relay: &Relay,
    front: &UnixStream,
    inner: &UnixStream,
) -> Result<(), ProxyError> {
    let mut acked = false;
    let mut have_area = false;
    while let Some(mut m) = read_message(front)? {
        let mut kick = None;
        let Some(host) = relay.host.as_deref() else {
            // Nothing to add: the crate reads the frontend's messages as they are.
            write_message(inner, &m)?;
            continue;
        };
        match m.request {
            GET_INFLIGHT_FD | SET_INFLIGHT_FD => {
                relay.inflight(host, m, acked)?;
                have_area = true;
                continue;
            }
            SET_VRING_KICK if have_area => {
                // Once the ring runs, one kick makes its worker look at the inflight area
                // (a guest waiting for the requests there would not kick again). A kick
                // before the ring is enabled waits in the eventfd.
                kick = m.fds.first().and_then(|fd| fd.try_clone().ok());
            }
            SET_PROTOCOL_FEATURES => {
                let bits = m.u64_body()?;
                let flag = VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
                acked = bits & flag != 0;
                m.body[..8].copy_from_slice(&(bits & !flag).to_le_bytes());
            }
            _ => {}
        }
        write_message(inner, &m)?;
        if let Some(fd) = kick {
            let _ = File::from(fd).write_all(&1u64.to_ne_bytes());
        }
    }
    Ok(())
}

/// Crate → frontend: forwards every reply, offering INFLIGHT_SHMFD when the backend has an
/// inflight area.
fn backend_to_front(relay: &Relay, inner: &UnixStream) -> Result<(), ProxyError> {
    let offer_inflight = relay.host.is_some();
    while let Some(mut m) = read_message(inner)? {
        if offer_inflight && m.request == GET_PROTOCOL_FEATURES && m.flags & FLAG_REPLY != 0 {
            let bits = m.u64_body()? | VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
            m.body[..8].copy_from_slice(&bits.to_le_bytes());
        }
        relay.to_front(&m)?;
    }
    Ok(())
}

/// Listens on `socket` (a stale socket file is removed) and accepts one frontend.
fn accept_one(socket: &std::path::Path) -> Result<UnixStream, ProxyError> {
    let listener = Listener::new(socket, true).map_err(|e| {
        ProxyError::Setup(
            format!("cannot listen on {}", socket.display()),
            io::Error::other(e),
        )
    })?;
    loop {
        match listener.accept() {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => continue,
            Err(e) => {
                return Err(ProxyError::Setup(
                    "accept on the vhost-user socket".into(),
                    io::Error::other(e),
                ))
            }
        }
    }
}

/// Connects `daemon` (the crate's request handler) to this process over a private
/// connection and returns this end of it.
///
/// The crate only accepts from a listener, so one is bound at a random abstract address
/// (no file to replace, nothing left behind), this process connects, and the crate accepts.
/// Abstract addresses are visible in /proc/net/unix, so another process might connect in
/// between and be accepted instead; a GET_FEATURES probe over our end proves the crate
/// answers us (an unaccepted connection is reset when the listener closes).
fn connect_daemon<T>(daemon: &mut VhostUserDaemon<T>) -> Result<UnixStream, ProxyError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: vhost_user_backend::bitmap::BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;

    let setup = |what: &str| {
        let what = what.to_string();
        move |e: io::Error| ProxyError::Setup(what, e)
    };
    let mut rnd = [0u8; 16];
    // SAFETY: getrandom writes at most 16 bytes into `rnd`, which is that large.
    let n = unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
    if n != rnd.len() as isize {
        return Err(ProxyError::Setup(
            "getrandom".into(),
            io::Error::last_os_error(),
        ));
    }
    let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("skiff-vu-{}-{hex}", std::process::id());
    let addr =
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(setup("abstract address"))?;
    let listener = UnixListener::bind_addr(&addr).map_err(setup("private listener"))?;
    let stream = UnixStream::connect_addr(&addr).map_err(setup("private connection"))?;
    let mut listener = Listener::from(listener);
    daemon
        .start(&mut listener)
        .map_err(|e| ProxyError::Daemon(format!("{e:?}")))?;
    drop(listener);
    // The probe: the crate must answer GET_FEATURES (1) on our end.
    write_message(
        &stream,
        &Message {
            request: 1,
            flags: FLAG_VERSION,
            body: Vec::new(),
            fds: Vec::new(),
        },
    )?;
    match read_message(&stream) {
        Ok(Some(m)) if m.request == 1 && m.flags & FLAG_REPLY != 0 => Ok(stream),
        _ => Err(ProxyError::Foreign),
    }
}

/// Takes one frontend from `frontend` (accepted on its path, or connected already), serves
/// it through the relay until it disconnects, then stops `daemon`'s workers. Replaces
/// `VhostUserDaemon::serve`, which can only listen on a path; `host` is the backend's
/// inflight area, if it has one.
pub fn serve<T>(
    frontend: FrontendSocket,
    daemon: &mut VhostUserDaemon<T>,
    host: Option<Arc<dyn InflightHost>>,
) -> Result<(), ProxyError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: vhost_user_backend::bitmap::BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    let inner = connect_daemon(daemon)?;
    let front = match frontend {
        FrontendSocket::Connected(stream) => stream,
        FrontendSocket::Listen(socket) => accept_one(&socket)?,
    };
    let clone = |s: &UnixStream| {
        s.try_clone()
            .map_err(|e| ProxyError::Setup("cannot clone a connection".into(), e))
    };
    let relay = Arc::new(Relay {
        front: Mutex::new(clone(&front)?),
        host,
    });
    let inner_reader = clone(&inner)?;
    let back = {
        let relay = relay.clone();
        std::thread::Builder::new()
            .name("vu-replies".into())
            .spawn(move || {
                let r = backend_to_front(&relay, &inner_reader);
                // The crate closed its side: end the frontend's connection too.
                let front = relay.front.lock().unwrap_or_else(|p| p.into_inner());
                let _ = front.shutdown(std::net::Shutdown::Both);
                r
            })
            .map_err(|e| ProxyError::Setup("cannot start the relay thread".into(), e))?
    };
    let forward = front_to_backend(&relay, &front, &inner);
    let _ = inner.shutdown(std::net::Shutdown::Both);
    let _ = front.shutdown(std::net::Shutdown::Both);
    let replies = back
        .join()
        .unwrap_or_else(|_| Err(ProxyError::Daemon("the relay thread panicked".into())));
    let daemon_result = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    if let Err(e) = daemon_result {
        // The handler sees its connection shut down when the frontend leaves.
        log::debug!("vhost-user handler ended: {e:?}");
    }
    for r in [forward, replies] {
        match r {
            Ok(()) => {}
            // The frontend hanging up mid-stream is how it usually leaves.
            Err(ProxyError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

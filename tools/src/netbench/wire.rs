//! The host's side of the TAP, where frames leave and enter the kernel's network stack: a
//! private network namespace, the TAP brought up, and packet sockets on it. A sink counts
//! and checks what the backend wrote to the TAP (guest to host); a source sends what the
//! backend must read from it (host to guest), no further ahead of the receiver than a
//! window, so the TAP's queue never overflows and the figure is the path's, not the
//! source's.

use std::io;
use std::mem::{size_of, size_of_val};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::frames::{Check, Order, Template};
use crate::BenchError;

/// Frames the source may have sent that the receiver has not seen (below the TAP's queue
/// of 500 and above a ring of 256).
pub const WINDOW: u64 = 384;
/// Frames per sendmmsg/recvmmsg.
const BATCH: usize = 32;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
/// Legacy `struct virtio_net_hdr` (a packet socket's, without `num_buffers`).
const PACKET_VNET_HDR_LEN: usize = 10;

fn check(ret: libc::c_int, what: &str) -> Result<libc::c_int, BenchError> {
    if ret < 0 {
        Err(BenchError::Host(what.into(), io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

/// Moves this process into a network namespace of its own, without IPv6 (whose router
/// solicitations would reach the rings), so that no interface the benchmark makes is seen
/// outside it and nothing it sends leaves it. Needs CAP_SYS_ADMIN.
pub fn private_netns() -> Result<(), BenchError> {
    // SAFETY: unshare takes flags only.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    check(ret, "unshare(CLONE_NEWNET) (netbench needs root)")?;
    for conf in ["all", "default"] {
        let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
        match std::fs::write(&path, "1") {
            // A kernel without IPv6 has no such file, and sends no IPv6 either.
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(BenchError::Host(path, e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Brings interface `name` up; its index.
pub fn bring_up(name: &str) -> Result<libc::c_int, BenchError> {
    // SAFETY: socket takes no pointers; the fd is owned below.
    let fd = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "a socket for interface ioctls",
    )?;
    // SAFETY: `fd` was just created and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = tapdev::IfReq::new(name, 0);
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a `struct ifreq`, which `IfReq` is
    // (40 bytes, flags at 16); it lives across both calls.
    unsafe {
        check(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            "SIOCGIFFLAGS",
        )?;
        req.flags |= libc::IFF_UP as libc::c_short;
        check(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req),
            "SIOCSIFFLAGS (interface up)",
        )?;
    }
    let cname = std::ffi::CString::new(name).map_err(|_| BenchError::Usage(name.into()))?;
    // SAFETY: a NUL-terminated name that lives across the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(BenchError::Host(
            format!("the index of {name}"),
            io::Error::last_os_error(),
        ));
    }
    Ok(index as libc::c_int)
}

/// An AF_PACKET socket bound to one interface and EtherType.
pub struct PacketSocket(OwnedFd);

fn setsockopt(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    what: &str,
) -> Result<(), BenchError> {
    // SAFETY: setsockopt reads an int through a pointer valid for the call.
    check(
        unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        },
        what,
    )
    .map(|_| ())
}

impl PacketSocket {
    /// A sink for frames of `ethertype` arriving on interface `ifindex` (what the backend
    /// wrote to the TAP), not those the host sends.
    pub fn sink(ifindex: libc::c_int, ethertype: u16) -> Result<Self, BenchError> {
        let s = Self::open(ifindex, ethertype)?;
        setsockopt(
            s.fd(),
            libc::SOL_PACKET,
            PACKET_IGNORE_OUTGOING,
            1,
            "PACKET_IGNORE_OUTGOING",
        )?;
        setsockopt(
            s.fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            64 << 20,
            "SO_RCVBUFFORCE",
        )?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval through a pointer valid for the call.
        let ret = unsafe {
            libc::setsockopt(
                s.fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of_val(&tv) as libc::socklen_t,
            )
        };
        check(ret, "SO_RCVTIMEO")?;
        Ok(s)
    }

    /// A source of frames sent out of interface `ifindex` (to the backend reading the TAP),
    /// past the queueing discipline, each led by a virtio-net header when `vnet_hdr`.
    pub fn source(
        ifindex: libc::c_int,
        ethertype: u16,
        vnet_hdr: bool,
    ) -> Result<Self, BenchError> {
        let s = Self::open(ifindex, ethertype)?;
        setsockopt(
            s.fd(),
            libc::SOL_PACKET,
            PACKET_QDISC_BYPASS,
            1,
            "PACKET_QDISC_BYPASS",
        )?;
        setsockopt(
            s.fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            64 << 20,
            "SO_SNDBUFFORCE",
        )?;
        if vnet_hdr {
            setsockopt(
                s.fd(),
                libc::SOL_PACKET,
                PACKET_VNET_HDR,
                1,
                "PACKET_VNET_HDR",
            )?;
        }
        Ok(s)
    }

    fn open(ifindex: libc::c_int, ethertype: u16) -> Result<Self, BenchError> {
        let proto = ethertype.to_be();
        // SAFETY: socket takes no pointers; the fd is owned below.
        let fd = check(
            unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::c_int::from(proto),
                )
            },
            "an AF_PACKET socket",
        )?;
        // SAFETY: `fd` was just created and is owned by nothing else.
        let s = PacketSocket(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: sockaddr_ll is plain data; zero is a valid value of every field.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: bind reads a sockaddr_ll of the given size, valid for the call.
        let ret = unsafe {
            libc::bind(
                s.fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of_val(&sll) as libc::socklen_t,
            )
        };
        check(ret, "binding the AF_PACKET socket to the TAP")?;
        Ok(s)
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The measured window, which every thread of a run shares.
#[derive(Clone, Copy)]
pub struct Window {
    /// Counting starts.
    pub start: Instant,
    /// Counting ends (and so does sending).
    pub end: Instant,
}

impl Window {
    /// Whether `t` is in the window.
    pub fn has(&self, t: Instant) -> bool {
        t >= self.start && t <= self.end
    }
}

/// What a receiving end counted.
#[derive(Debug, Default)]
pub struct Received {
    /// Intact frames that arrived in the window.
    pub frames: u64,
    /// Their bytes (frames only, no headers).
    pub bytes: u64,
    /// The order of arrivals, over the whole run.
    pub order: Order,
    /// Frames of the run with wrong bytes.
    pub corrupt: u64,
    /// Frames that were not the run's (the kernel's own).
    pub stray: u64,
}

impl Received {
    /// Counts one frame that arrived at `at`; `header_ok` says whether the virtio-net
    /// header that came with it was what the frame's kind calls for.
    pub fn note(&mut self, t: &Template, frame: &[u8], header_ok: bool, at: Instant, w: &Window) {
        match t.check(frame) {
            Check::Seq(_) if !header_ok => self.corrupt += 1,
            Check::Seq(seq) => {
                if self.order.arrived(seq) && w.has(at) {
                    self.frames += 1;
                    self.bytes += frame.len() as u64;
                }
            }
            Check::Stray => self.stray += 1,
            Check::Corrupt => self.corrupt += 1,
        }
    }
}

/// Receives on `sock` until `stop`, counting what arrives.
pub fn sink(sock: &PacketSocket, t: &Template, w: Window, stop: &AtomicBool) -> Received {
    let size = t.len() + 64;
    let mut bufs = vec![0u8; size * BATCH];
    let mut out = Received::default();
    while !stop.load(Ordering::Relaxed) {
        let mut iovs: Vec<libc::iovec> = bufs
            .chunks_exact_mut(size)
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; zero is a valid value of every field.
        let mut msgs: Vec<libc::mmsghdr> =
            (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one iovec over its own part of `bufs`; all of
        // them live across the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let at = Instant::now();
        if n <= 0 {
            continue; // the timeout: look at `stop`
        }
        for (i, m) in msgs.iter().take(n as usize).enumerate() {
            let len = m.msg_len as usize;
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                out.corrupt += 1;
                continue;
            }
            out.note(t, &bufs[i * size..i * size + len], true, at, &w);
        }
    }
    out
}

/// Sends frames 0, 1, ... on `sock` until the window ends, at most [`WINDOW`] ahead of
/// `received` (the receiver's next expected sequence number, raised on `credit`).
pub fn source(
    sock: &PacketSocket,
    t: &Template,
    w: Window,
    received: &AtomicU64,
    credit: &EventFd,
    vnet_hdr: bool,
) -> Result<u64, BenchError> {
    let hdr = if vnet_hdr { PACKET_VNET_HDR_LEN } else { 0 };
    let size = hdr + t.len();
    let mut bufs = vec![0u8; size * BATCH];
    for b in bufs.chunks_exact_mut(size) {
        b[..hdr].copy_from_slice(&t.kind.vnet_hdr()[..hdr]);
        t.write(0, &mut b[hdr..]);
    }
    let (seq_at, _) = t.seq_field(0);
    let mut sent = 0u64;
    while Instant::now() < w.end {
        let room = (received.load(Ordering::Acquire) + WINDOW).saturating_sub(sent);
        if room == 0 {
            wait_readable(credit.as_raw_fd(), 10);
            let _ = credit.read();
            continue;
        }
        let n = (room as usize).min(BATCH);
        let mut iovs: Vec<libc::iovec> = bufs
            .chunks_exact_mut(size)
            .take(n)
            .enumerate()
            .map(|(i, b)| {
                let (_, seq) = t.seq_field(sent + i as u64);
                b[hdr + seq_at..hdr + seq_at + 8].copy_from_slice(&seq);
                libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                }
            })
            .collect();
        // SAFETY: as in `sink`.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one iovec over its own frame; all live across
        // the call.
        let done = unsafe { libc::sendmmsg(sock.fd(), msgs.as_mut_ptr(), n as u32, 0) };
        if done < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // The TAP's queue is full (past the qdisc): a moment for the reader.
                Some(libc::ENOBUFS) | Some(libc::EAGAIN) => {
                    std::thread::sleep(Duration::from_micros(50))
                }
                _ => return Err(BenchError::Host("sendmmsg on the TAP".into(), e)),
            }
            continue;
        }
        sent += done as u64;
    }
    Ok(sent)
}

/// Waits up to `ms` for `fd` to be readable.
pub fn wait_readable(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd that lives across the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

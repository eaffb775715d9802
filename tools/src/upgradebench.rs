//! Device-process upgrade benchmark: N upgrades of skiff-blk and of skiff-net under load,
//! timed at native speed with a synthetic front end.
//!
//! This program plays both the VMM and the guest. Guest RAM is a memfd, as in skiff. A
//! "driver" thread per device keeps requests in flight on the rings in that memory:
//! 4 KiB writes for skiff-blk, queue depth 32; 1514-byte frames on skiff-net's TX ring,
//! into a TAP in a private network namespace. It waits for the device's call eventfd and
//! records when each completion arrives. Meanwhile the main thread replaces the device
//! process N times, the way skiff's VMM does (vmm/src/devices/virtio/vhost_user.rs,
//! `prepare_takeover` + `take_over`):
//!
//! 1. spawn the new process, connected over a socketpair (`--socket-fd`, as skiff's VMM
//!    starts device processes), and negotiate: owner, features, protocol features;
//! 2. while the old one serves: SET_FEATURES, SET_MEM_TABLE and, for blk, SET_INFLIGHT_FD
//!    with the device's inflight area;
//! 3. pause: for each ring, disable and GET_VRING_BASE on the old backend, then NUM, BASE,
//!    ADDR, CALL, KICK and ENABLE on the new one, with the same eventfds;
//! 4. one kick per ring; close the old connection (the old process exits).
//!
//! It reports the pause (step 3) and the whole upgrade as p50 / p99 / max, and the
//! guest-side effect: the longest gap between completions while upgrades ran, beside the
//! same figure for an equal time of the same load without upgrades (the host baseline).
//! At the end it checks that every write the driver saw completed is in the image, and
//! that no request failed. The driver does not negotiate EVENT_IDX: every completion
//! batch is signalled.
//!
//! skiff's VMM links a different implementation of step 3 (tools/ may not link vmm); the
//! guest tests report the VMM's own pause for each upgrade they make.
//!
//! Needs root for the TAP (run under `unshare -n` semantics: the namespace is created
//! here). tools/upgradebench.sh builds the release binaries and runs it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

#[path = "stats.rs"]
mod stats;
use stats::Stats;

const MIB: usize = 1 << 20;
const RAM: usize = 64 * MIB;
const QSIZE: u16 = 256;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const BLOCK: usize = 4096;
/// Phases the driver threads attribute completion gaps to.
const WARMUP: u8 = 0;
const BASELINE: u8 = 1;
const UPGRADES: u8 = 2;
const DONE: u8 = 3;
/// Pauses above this are reported step by step (the first five).
const SLOW: Duration = Duration::from_millis(1);

/// Device-process upgrades under load, with a synthetic front end, on this machine.
#[derive(Debug, Parser)]
#[command(name = "upgradebench")]
struct Args {
    /// Upgrades of each device.
    #[arg(long, default_value_t = 1000)]
    upgrades: usize,
    /// Devices to measure: blk, net or both.
    #[arg(long, value_delimiter = ',', default_value = "blk,net")]
    devices: Vec<String>,
    /// skiff-blk binary (default: beside this binary).
    #[arg(long, value_name = "PATH")]
    blk_binary: Option<PathBuf>,
    /// skiff-net binary (default: beside this binary).
    #[arg(long, value_name = "PATH")]
    net_binary: Option<PathBuf>,
    /// Requests (blk) or frames (net) kept in flight.
    #[arg(long, default_value_t = 32)]
    depth: u16,
    /// Milliseconds of load without upgrades, measured as the baseline (after 500 ms of
    /// warm-up).
    #[arg(long, default_value_t = 5000)]
    baseline_ms: u64,
    /// Pause between upgrades, in milliseconds.
    #[arg(long, default_value_t = 5)]
    interval_ms: u64,
    /// Kill -9 the device process instead of upgrading it, and recover as skiff does
    /// after a crash; "pause" is then from the kill to the last ring started.
    #[arg(long)]
    crash: bool,
    /// JSON results file.
    #[arg(long, value_name = "PATH", default_value = "target/upgradebench.json")]
    out: PathBuf,
    /// Start the device processes with --no-seccomp (to measure what the filters cost).
    #[arg(long)]
    no_seccomp: bool,
}

type Result<T> = std::result::Result<T, String>;

/// The device arguments `args`, with --no-seccomp when asked.
fn seccomp_args(a: &Args, mut args: Vec<String>) -> Vec<String> {
    if a.no_seccomp {
        args.push("--no-seccomp".into());
    }
    args
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

// ------------------------------------------------------------------ guest memory and rings

struct Ram {
    mem: GuestMemoryMmap,
}

fn memfd(name: &std::ffi::CStr, size: usize) -> Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size as u64).map_err(err("sizing a memfd"))?;
    Ok(f)
}

impl Ram {
    fn new() -> Result<Ram> {
        let file = memfd(c"upgradebench-ram", RAM)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            RAM,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(err("mapping guest memory"))?;
        Ok(Ram { mem })
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map_or(0, |p| p as u64)
    }
}

/// A split ring's addresses.
#[derive(Clone, Copy)]
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    /// Ring `n`'s place in guest memory (64 KiB each from 1 MiB).
    fn at(n: u64) -> Ring {
        let base = MIB as u64 + n * 0x10000;
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    fn config(&self, ram: &Ram) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: ram.host(self.desc),
            used_ring_addr: ram.host(self.used),
            avail_ring_addr: ram.host(self.avail),
            log_addr: None,
        }
    }

    fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&d, at);
    }

    /// Puts `head` at available position `pos` and publishes `pos + 1`.
    fn make_available(&self, mem: &GuestMemoryMmap, pos: u16, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(pos % QSIZE));
        let _ = mem.write_obj(head, slot);
        let _ = mem.store(
            pos.wrapping_add(1),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        );
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
            .unwrap_or(0)
    }

    fn used_head(&self, mem: &GuestMemoryMmap, pos: u16) -> u16 {
        let at = GuestAddress(self.used + 4 + 8 * u64::from(pos % QSIZE));
        mem.read_obj::<u32>(at).unwrap_or(u32::MAX) as u16
    }
}

// ------------------------------------------------------------------ load

/// What a driver thread saw.
#[derive(Default)]
struct LoadResult {
    completions: u64,
    errors: u64,
    /// Times completions were in the used ring 20 ms without an interrupt.
    unsignalled: u64,
    /// Gaps between completion batches, per phase.
    gaps: [Vec<Duration>; 4],
    /// blk: block -> generation of the last completed write.
    written: HashMap<u64, u64>,
}

struct Driver {
    ram: Arc<Ram>,
    kick: Vec<EventFd>,
    call: EventFd,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    depth: u16,
}

/// Waits up to `ms` for the device's interrupt; returns whether it came.
fn wait_call(call: &EventFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) } > 0;
    let _ = call.read();
    ready
}

impl Driver {
    /// Keeps `depth` requests in flight on `ring` until stopped and drained. `fill(slot,
    /// seq)` writes request `seq` into slot `slot` and returns its head; `done(slot, seq)`
    /// checks a completed one.
    fn run(
        &self,
        ring: Ring,
        queue: usize,
        mut fill: impl FnMut(&GuestMemoryMmap, u16, u64) -> u16,
        mut done: impl FnMut(&GuestMemoryMmap, u16, u64, &mut LoadResult),
        heads_per_slot: u16,
    ) -> LoadResult {
        let mem = &self.ram.mem;
        let mut r = LoadResult::default();
        let mut avail: u16 = 0;
        let mut used: u16 = 0;
        let mut seq: u64 = 0;
        let mut free: Vec<u16> = (0..self.depth).rev().collect();
        let mut inflight: HashMap<u16, u64> = HashMap::new();
        let mut last = Instant::now();
        let mut last_phase = self.phase.load(Ordering::Acquire);
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            if stopping && inflight.is_empty() {
                break;
            }
            let mut posted = false;
            while let Some(slot) = if stopping { None } else { free.pop() } {
                seq += 1;
                let head = fill(mem, slot, seq);
                inflight.insert(slot, seq);
                ring.make_available(mem, avail, head);
                avail = avail.wrapping_add(1);
                posted = true;
            }
            if posted {
                let _ = self.kick[queue].write(1);
            }
            let signalled = wait_call(&self.call, 20);
            let now_used = ring.used_idx(mem);
            if !signalled && now_used != used {
                // A guest would have waited for these forever.
                r.unsignalled += 1;
            }
            if now_used == used {
                // Nothing: kick again in case a kick fell between two backends.
                let _ = self.kick[queue].write(1);
                continue;
            }
            let phase = self.phase.load(Ordering::Acquire);
            let now = Instant::now();
            if phase == last_phase {
                r.gaps[usize::from(phase.min(DONE))].push(now - last);
            }
            last = now;
            last_phase = phase;
            while used != now_used {
                let head = ring.used_head(mem, used);
                let slot = head / heads_per_slot;
                match inflight.remove(&slot) {
                    Some(s) => {
                        done(mem, slot, s, &mut r);
                        r.completions += 1;
                        free.push(slot);
                    }
                    None => r.errors += 1,
                }
                used = used.wrapping_add(1);
            }
        }
        r
    }
}

/// Guest address of slot `slot`'s buffers for ring `n`.
fn buffers(n: u64, slot: u16) -> u64 {
    8 * MIB as u64 + n * 4 * MIB as u64 + u64::from(slot) * 0x2000
}

fn blk_load(d: &Driver, blocks: u64) -> LoadResult {
    let ring = Ring::at(0);
    d.run(
        ring,
        0,
        |mem, slot, seq| {
            let base = buffers(0, slot);
            let block = seq % blocks;
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
            hdr[8..16].copy_from_slice(&(block * (BLOCK as u64 / 512)).to_le_bytes());
            let _ = mem.write_slice(&hdr, GuestAddress(base));
            let _ = mem.write_slice(&pattern(block, seq), GuestAddress(base + 0x1000));
            let _ = mem.write_obj(0xffu8, GuestAddress(base + 0x10));
            let head = slot * 3;
            ring.set_desc(mem, head, base, 16, F_NEXT, head + 1);
            ring.set_desc(mem, head + 1, base + 0x1000, BLOCK as u32, F_NEXT, head + 2);
            ring.set_desc(mem, head + 2, base + 0x10, 1, F_WRITE, 0);
            head
        },
        |mem, slot, seq, r| {
            let status: u8 = mem
                .read_obj(GuestAddress(buffers(0, slot) + 0x10))
                .unwrap_or(0xff);
            if status == 0 {
                r.written.insert(seq % blocks, seq);
            } else {
                r.errors += 1;
            }
        },
        3,
    )
}

/// A block's content for write `seq`: (block, seq) repeated.
fn pattern(block: u64, seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    while b.len() < BLOCK {
        b.extend_from_slice(&block.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
    }
    b
}

fn net_load(d: &Driver) -> LoadResult {
    // RX (queue 0) gets no buffers: nothing is sent to the TAP's far side on purpose.
    let ring = Ring::at(2);
    d.run(
        ring,
        1,
        |mem, slot, seq| {
            let base = buffers(2, slot);
            let mut frame = vec![0u8; 12 + 1514];
            // virtio_net_hdr_v1 is 12 zero bytes; then Ethernet: a locally administered
            // destination nobody has, our source, the local experimental ethertype.
            frame[12..18].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
            frame[18..24].copy_from_slice(&[0x06, 0, 0, 0, 0, 0x02]);
            frame[24..26].copy_from_slice(&0x88b5u16.to_be_bytes());
            frame[26..34].copy_from_slice(&seq.to_le_bytes());
            let _ = mem.write_slice(&frame, GuestAddress(base));
            ring.set_desc(mem, slot, base, frame.len() as u32, 0, 0);
            slot
        },
        |_, _, _, _| {},
        1,
    )
}

// ------------------------------------------------------------------ backends

/// A device process and the vhost-user connection to it.
struct Backend {
    child: Child,
    fe: Frontend,
    features: u64,
    proto: VhostUserProtocolFeatures,
}

fn spawn(bin: &Path, args: &[String], inherit: Vec<RawFd>, log: &File) -> Result<Child> {
    let mut cmd = Command::new(bin);
    let stderr = log.try_clone().map_err(err("log file"))?;
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: the closure runs between fork and exec and calls only prctl and fcntl.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &inherit {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(err(&format!("starting {}", bin.display())))
}

/// Runs `f` with NEED_REPLY set (REPLY_ACK is negotiated), as skiff's VMM sends the requests
/// whose completion matters: the call returns once the backend has carried it out.
fn acked<T>(
    fe: &mut Frontend,
    f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
) -> vhost::Result<T> {
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    let r = f(fe);
    fe.set_hdr_flags(VhostUserHeaderFlag::empty());
    r
}

impl Backend {
    /// Starts `bin args... --socket-fd N` with `inherit` and one end of a socketpair (N)
    /// inherited, as skiff's VMM does, and negotiates over the other end.
    fn start(
        bin: &Path,
        args: &[String],
        mut inherit: Vec<RawFd>,
        queues: u64,
        log: &File,
    ) -> Result<Backend> {
        let (stream, theirs) = UnixStream::pair().map_err(err("socketpair"))?;
        let mut args = args.to_vec();
        args.push("--socket-fd".into());
        args.push(theirs.as_raw_fd().to_string());
        inherit.push(theirs.as_raw_fd());
        let mut child = spawn(bin, &args, inherit, log)?;
        // Only the child holds its end now: its exit ends the connection.
        drop(theirs);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(err("socket timeout"))?;
        let mut fe = Frontend::from_stream(stream, queues);
        fe.set_owner().map_err(err("SET_OWNER"))?;
        let features = match fe.get_features() {
            Ok(f) => f,
            Err(e) => {
                std::thread::sleep(Duration::from_millis(100));
                return Err(match child.try_wait() {
                    Ok(Some(st)) => format!("{} exited: {st}", bin.display()),
                    _ => format!("GET_FEATURES: {e}"),
                });
            }
        };
        let offered = fe
            .get_protocol_features()
            .map_err(err("GET_PROTOCOL_FEATURES"))?;
        let proto = offered
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::INFLIGHT_SHMFD);
        fe.set_protocol_features(proto)
            .map_err(err("SET_PROTOCOL_FEATURES"))?;
        Ok(Backend {
            child,
            fe,
            features,
            proto,
        })
    }

    /// Features, memory table and inflight area (created on first use), before the rings.
    fn prepare(
        &mut self,
        ram: &Ram,
        inflight: &mut Option<(VhostUserInflight, File)>,
        queues: u16,
    ) -> Result<()> {
        acked(&mut self.fe, |f| {
            f.set_features(VERSION_1 | PROTOCOL_FEATURES)
        })
        .map_err(err("SET_FEATURES"))?;
        let regions = ram
            .mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).map_err(err("region")))
            .collect::<Result<Vec<_>>>()?;
        acked(&mut self.fe, |f| f.set_mem_table(&regions)).map_err(err("SET_MEM_TABLE"))?;
        if self
            .proto
            .contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        {
            if inflight.is_none() {
                let ask = VhostUserInflight {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: queues,
                    queue_size: QSIZE,
                };
                *inflight = Some(
                    self.fe
                        .get_inflight_fd(&ask)
                        .map_err(err("GET_INFLIGHT_FD"))?,
                );
            }
            if let Some((info, file)) = inflight {
                let fd = file.as_raw_fd();
                acked(&mut self.fe, |f| f.set_inflight_fd(info, fd))
                    .map_err(err("SET_INFLIGHT_FD"))?;
            }
        }
        Ok(())
    }

    fn start_ring(
        &mut self,
        i: usize,
        ring: &VringConfigData,
        base: u16,
        call: &EventFd,
        kick: &EventFd,
    ) -> Result<()> {
        self.fe
            .set_vring_num(i, QSIZE)
            .map_err(err("SET_VRING_NUM"))?;
        self.fe
            .set_vring_base(i, base)
            .map_err(err("SET_VRING_BASE"))?;
        self.fe
            .set_vring_addr(i, ring)
            .map_err(err("SET_VRING_ADDR"))?;
        self.fe
            .set_vring_call(i, call)
            .map_err(err("SET_VRING_CALL"))?;
        self.fe
            .set_vring_kick(i, kick)
            .map_err(err("SET_VRING_KICK"))?;
        acked(&mut self.fe, |f| f.set_vring_enable(i, true)).map_err(err("SET_VRING_ENABLE"))
    }

    fn stop_ring(&mut self, i: usize) -> Result<u16> {
        self.fe
            .set_vring_enable(i, false)
            .map_err(err("SET_VRING_ENABLE"))?;
        let base = self.fe.get_vring_base(i).map_err(err("GET_VRING_BASE"))?;
        Ok(base as u16)
    }

    fn finish(mut self) {
        drop(self.fe);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ TAP

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Creates TAP `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, what skiff-net's --tap-fd
/// expects) and brings it up. The same TUNSETIFF as vmm/src/tap.rs; tools may not link vmm.
fn open_tap(name: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(err("/dev/net/tun"))?;
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags: libc::c_short =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte struct ifreq, which `req` is.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, req.as_mut_ptr()) } < 0 {
        return Err(format!("TUNSETIFF {name}: {}", io::Error::last_os_error()));
    }
    let up = Command::new("ip")
        .args(["link", "set", "dev", name, "up"])
        .status()
        .map_err(err("ip link set up"))?;
    if !up.success() {
        return Err(format!("ip link set dev {name} up: {up}"));
    }
    Ok(file)
}

// ------------------------------------------------------------------ one device

struct DeviceReport {
    name: &'static str,
    pause: Vec<Duration>,
    total: Vec<Duration>,
    load: LoadResult,
    lost_writes: u64,
    baseline_ms: u64,
    upgrades_ms: u64,
}

struct Setup {
    bin: PathBuf,
    args: Vec<String>,
    inherit: Vec<RawFd>,
    queues: u16,
    rings: Vec<Ring>,
}

fn bench_device(
    name: &'static str,
    setup: &Setup,
    a: &Args,
    image: Option<(&File, u64)>,
    log: &File,
) -> Result<DeviceReport> {
    let ram = Arc::new(Ram::new()?);
    let kicks: Vec<EventFd> = (0..setup.queues)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
        .collect::<io::Result<_>>()
        .map_err(err("eventfd"))?;
    let call = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(err("eventfd"))?;
    let mut inflight = None;
    let mut cur = Backend::start(
        &setup.bin,
        &setup.args,
        setup.inherit.clone(),
        u64::from(setup.queues),
        log,
    )?;
    cur.prepare(&ram, &mut inflight, setup.queues)?;
    if cur.features & VERSION_1 == 0 {
        return Err(format!("{name} does not offer VIRTIO_F_VERSION_1"));
    }
    for (i, ring) in setup.rings.iter().enumerate() {
        cur.start_ring(i, &ring.config(&ram), 0, &call, &kicks[i])?;
    }

    let phase = Arc::new(AtomicU8::new(WARMUP));
    let stop = Arc::new(AtomicBool::new(false));
    let driver = Driver {
        ram: ram.clone(),
        kick: kicks
            .iter()
            .map(|k| k.try_clone())
            .collect::<io::Result<_>>()
            .map_err(err("eventfd"))?,
        call: call.try_clone().map_err(err("eventfd"))?,
        phase: phase.clone(),
        stop: stop.clone(),
        depth: a.depth,
    };
    let blocks = image.map_or(1, |(_, size)| size / BLOCK as u64);
    let load: JoinHandle<LoadResult> = std::thread::spawn(move || match name {
        "blk" => blk_load(&driver, blocks),
        _ => net_load(&driver),
    });

    std::thread::sleep(Duration::from_millis(500));
    phase.store(BASELINE, Ordering::Release);
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(a.baseline_ms));
    let baseline_ms = t.elapsed().as_millis() as u64;
    phase.store(UPGRADES, Ordering::Release);
    let t = Instant::now();
    let mut pause = Vec::with_capacity(a.upgrades);
    let mut total = Vec::with_capacity(a.upgrades);
    let mut failure = None;
    let mut slow = Vec::new();
    for n in 0..a.upgrades {
        let started = Instant::now();
        if a.crash {
            // kill -9 at a random moment of the load, as a crash would.
            let _ = cur.child.kill();
            let _ = cur.child.wait();
        }
        let step = (|| -> Result<Backend> {
            let crashed = Instant::now();
            let mut next = Backend::start(
                &setup.bin,
                &setup.args,
                setup.inherit.clone(),
                u64::from(setup.queues),
                log,
            )?;
            next.prepare(&ram, &mut inflight, setup.queues)?;
            // Crash: from the kill; upgrade: from the first ring stopped.
            let p = if a.crash { crashed } else { Instant::now() };
            let mut marks = Vec::new();
            for (i, ring) in setup.rings.iter().enumerate() {
                // After a crash the ring restarts at the used index in guest memory, as
                // skiff's VMM does; the inflight area tells skiff-blk what to resubmit.
                let base = if a.crash {
                    ring.used_idx(&ram.mem)
                } else {
                    cur.stop_ring(i)?
                };
                marks.push((format!("ring {i} stopped"), p.elapsed()));
                next.start_ring(i, &ring.config(&ram), base, &call, &kicks[i])?;
                marks.push((format!("ring {i} started"), p.elapsed()));
            }
            let took = p.elapsed();
            pause.push(took);
            if took > SLOW && slow.len() < 5 {
                slow.push((n, marks));
            }
            for k in &kicks {
                let _ = k.write(1);
            }
            if a.crash {
                // As skiff's VMM does: the dead process may have completed requests
                // without signalling them.
                let _ = call.write(1);
            }
            Ok(next)
        })();
        match step {
            Ok(next) => {
                let old = std::mem::replace(&mut cur, next);
                total.push(started.elapsed());
                old.finish();
            }
            Err(e) => {
                failure = Some(format!("upgrade {n}: {e}"));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(a.interval_ms));
    }
    let upgrades_ms = t.elapsed().as_millis() as u64;
    for (n, marks) in &slow {
        let steps: Vec<String> = marks
            .iter()
            .map(|(what, at)| format!("{what} at {} µs", at.as_micros()))
            .collect();
        println!("{name}: slow upgrade {n}: {}", steps.join(", "));
    }
    phase.store(DONE, Ordering::Release);
    stop.store(true, Ordering::Release);
    let load = load
        .join()
        .map_err(|_| format!("{name}: the driver thread panicked"))?;
    cur.finish();
    if let Some(f) = failure {
        return Err(format!("{name}: {f}"));
    }
    let mut lost_writes = 0;
    if let Some((file, _)) = image {
        let mut buf = vec![0u8; BLOCK];
        for (&block, &seq) in &load.written {
            file.read_exact_at(&mut buf, block * BLOCK as u64)
                .map_err(err("reading the image back"))?;
            if buf != pattern(block, seq) {
                lost_writes += 1;
            }
        }
    }
    Ok(DeviceReport {
        name,
        pause,
        total,
        load,
        lost_writes,
        baseline_ms,
        upgrades_ms,
    })
}

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn us(s: Option<Stats>) -> String {
    s.map_or("-".into(), |s| {
        format!("{:.0} / {:.0} / {:.0}", s.p50, s.p99, s.max)
    })
}

fn run(a: &Args) -> Result<Vec<Value>> {
    let dir = std::env::temp_dir().join(format!("upgradebench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(err("temporary directory"))?;
    // The device processes' stderr (one start and one exit per upgrade) goes here.
    let log_path = a.out.with_extension("log");
    let log = File::create(&log_path).map_err(err(&format!("{}", log_path.display())))?;
    let mut out = Vec::new();
    let mut failed = Vec::new();
    for dev in &a.devices {
        let result = match dev.as_str() {
            "blk" => {
                let path = dir.join("disk.img");
                let size = 64 * MIB as u64;
                let image = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(err("image"))?;
                image.set_len(size).map_err(err("image"))?;
                let setup = Setup {
                    bin: a
                        .blk_binary
                        .clone()
                        .unwrap_or_else(|| beside_me("skiff-blk")),
                    args: seccomp_args(a, vec!["--image-fd".into(), image.as_raw_fd().to_string()]),
                    inherit: vec![image.as_raw_fd()],
                    queues: 1,
                    rings: vec![Ring::at(0)],
                };
                bench_device("blk", &setup, a, Some((&image, size)), &log)
            }
            "net" => {
                // SAFETY: unshare only changes this process's namespace membership.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(format!(
                        "net needs root for a private network namespace: {}",
                        io::Error::last_os_error()
                    ));
                }
                let tap = open_tap("skbench0")?;
                let setup = Setup {
                    bin: a
                        .net_binary
                        .clone()
                        .unwrap_or_else(|| beside_me("skiff-net")),
                    args: seccomp_args(a, vec!["--tap-fd".into(), tap.as_raw_fd().to_string()]),
                    inherit: vec![tap.as_raw_fd()],
                    queues: 2,
                    rings: vec![Ring::at(1), Ring::at(2)],
                };
                bench_device("net", &setup, a, None, &log)
            }
            other => Err(format!("unknown device {other:?} (blk, net)")),
        };
        match result {
            Ok(r) => out.push(r),
            Err(e) => {
                eprintln!("upgradebench: {e}");
                failed.push(e);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "{:5} {:>9} {:>26} {:>26} {:>26} {:>26} {:>9} {:>7} {:>6} {:>6}",
        "",
        "upgrades",
        "pause µs p50/p99/max",
        "upgrade µs p50/p99/max",
        "gap µs, no upgrades",
        "gap µs, upgrading",
        "max ratio",
        "errors",
        "lost",
        "no-irq"
    );
    let mut docs = Vec::new();
    for r in &out {
        let pause = Stats::of(&r.pause);
        let total = Stats::of(&r.total);
        let base = Stats::of(&r.load.gaps[usize::from(BASELINE)]);
        let up = Stats::of(&r.load.gaps[usize::from(UPGRADES)]);
        let ratio = match (base, up) {
            (Some(b), Some(u)) if b.max > 0.0 => Some(u.max / b.max),
            _ => None,
        };
        println!(
            "{:5} {:>9} {:>26} {:>26} {:>26} {:>26} {:>9} {:>7} {:>6} {:>6}",
            r.name,
            r.pause.len(),
            us(pause),
            us(total),
            us(base),
            us(up),
            ratio.map_or("-".into(), |x| format!("{x:.1}")),
            r.load.errors,
            r.lost_writes,
            r.load.unsignalled
        );
        docs.push(json!({
            "device": r.name,
            "upgrades": r.pause.len(),
            "pause": pause.map(|s| s.json()),
            "upgrade_total": total.map(|s| s.json()),
            "completion_gap_baseline": base.map(|s| s.json()),
            "completion_gap_upgrading": up.map(|s| s.json()),
            "max_gap_ratio_upgrading_over_baseline": ratio,
            "completions": r.load.completions,
            "errors": r.load.errors,
            "unsignalled_completions": r.load.unsignalled,
            "lost_writes": r.lost_writes,
            "baseline_ms": r.baseline_ms,
            "upgrading_ms": r.upgrades_ms,
            "pause_us_all": r.pause.iter().map(|d| d.as_micros() as u64).collect::<Vec<_>>(),
        }));
    }
    println!(
        "(gap = time between two completion batches seen by the synthetic driver, queue depth {}; \
         no-irq = completions found in the used ring after 20 ms without an interrupt; \
         measured on this host at native speed, synthetic front end)",
        a.depth
    );
    println!("device process logs: {}", log_path.display());
    let svg = a.out.with_extension("svg");
    match std::fs::write(&svg, plot(&out)) {
        Ok(()) => println!("plot: {}", svg.display()),
        Err(e) => eprintln!("upgradebench: {}: {e}", svg.display()),
    }
    if !failed.is_empty() {
        return Err(failed.join("; "));
    }
    if out.iter().any(|r| r.load.errors > 0 || r.lost_writes > 0) {
        return Err("requests failed or writes were lost".into());
    }
    Ok(docs)
}

/// An SVG plot of each device's pause distribution (CDF, log-scale µs).
fn plot(reports: &[DeviceReport]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const L: f64 = 60.0;
    const B: f64 = 40.0;
    // 10 µs .. 100 ms on a log axis.
    let x = |us: f64| L + (us.max(10.0).log10() - 1.0) / 4.0 * (W - L - 20.0);
    let y = |q: f64| H - B - q * (H - B - 20.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{L}\" y=\"14\">upgrade pause, CDF (synthetic front end, native speed)</text>\n"
    );
    for (us, label) in [
        (10.0, "10 µs"),
        (100.0, "100 µs"),
        (1000.0, "1 ms"),
        (10_000.0, "10 ms"),
        (100_000.0, "100 ms"),
    ] {
        svg.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{label}</text>\n",
            x(us),
            y(0.0),
            y(1.0),
            H - B + 16.0
        ));
    }
    for q in [0.0, 0.5, 0.99, 1.0] {
        svg.push_str(&format!(
            "<line x1=\"{L}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{2:.1}\" y=\"{0:.1}\" text-anchor=\"end\">{q}</text>\n",
            y(q),
            W - 20.0,
            L - 6.0
        ));
    }
    for (i, r) in reports.iter().enumerate() {
        let mut us: Vec<f64> = r.pause.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(|a, b| a.total_cmp(b));
        let n = us.len().max(1) as f64;
        let points: Vec<String> = us
            .iter()
            .enumerate()
            .map(|(k, v)| format!("{:.1},{:.1}", x(*v), y((k + 1) as f64 / n)))
            .collect();
        let color = ["#1f77b4", "#d62728"][i % 2];
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{} ({} upgrades)</text>\n",
            points.join(" "),
            L + 10.0,
            40.0 + 16.0 * i as f64,
            r.name,
            r.pause.len()
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn main() {
    let a = Args::parse();
    let result = run(&a);
    let doc = json!({
        "benchmark": "upgradebench",
        "measured_on": "this host, native speed, synthetic front end (no guest)",
        "upgrades_per_device": a.upgrades,
        "depth": a.depth,
        "devices": result.as_ref().map_or(Value::Null, |d| Value::from(d.clone())),
        "error": result.as_ref().err(),
    });
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(parent);
    }
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => match std::fs::write(&a.out, text + "\n") {
            Ok(()) => println!("results: {}", a.out.display()),
            Err(e) => eprintln!("upgradebench: {}: {e}", a.out.display()),
        },
        Err(e) => eprintln!("upgradebench: encoding results: {e}"),
    }
    if let Err(e) = result {
        eprintln!("upgradebench: {e}");
        std::process::exit(1);
    }
}

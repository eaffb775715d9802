//! A synthetic vhost-user frontend for skiff-blk: guest memory in a memfd, queue 0 at fixed
//! addresses, and 3-descriptor write requests laid out by hand.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Stdio};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const BLK_BIN: &str = env!("CARGO_BIN_EXE_skiff-blk");
pub const MEM: usize = 1 << 20;
pub const QSIZE: u16 = 16;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const VERSION_1: u64 = 1 << 32;
pub const PROTOCOL_FEATURES: u64 = 1 << 30;
pub const EVENT_IDX: u64 = 1 << 29;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

pub fn memfd(name: &std::ffi::CStr, size: usize) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(size as u64).expect("size memfd");
    f
}

/// Guest memory of [`MEM`] bytes in a memfd, as the VMM shares it.
pub fn guest_memory() -> GuestMemoryMmap {
    let ram = memfd(c"guest", MEM);
    GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(0),
        MEM,
        Some(FileOffset::new(ram, 0)),
    )])
    .expect("guest memory")
}

pub fn start_blk(socket: &Path, image: &Path) -> Child {
    let image = image.to_str().expect("utf-8 path");
    let mut child = super::command(
        BLK_BIN,
        socket,
        &["--image", image, "--queue-size", &QSIZE.to_string()],
        None,
    )
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn skiff-blk");
    super::wait_listening(&mut child, socket);
    child
}

/// Connects, negotiates `features` (plus VERSION_1 and PROTOCOL_FEATURES) and `proto`, and
/// sets the memory table; returns the frontend.
pub fn connect(
    socket: &Path,
    mem: &GuestMemoryMmap,
    features: u64,
    proto: VhostUserProtocolFeatures,
) -> Frontend {
    negotiate(
        Frontend::connect(socket, 1).expect("connect"),
        mem,
        features,
        proto,
    )
}

/// What [`connect`] does once connected.
pub fn negotiate(
    mut f: Frontend,
    mem: &GuestMemoryMmap,
    features: u64,
    proto: VhostUserProtocolFeatures,
) -> Frontend {
    f.set_owner().expect("SET_OWNER");
    let offered = f.get_features().expect("GET_FEATURES");
    assert_ne!(offered & PROTOCOL_FEATURES, 0);
    let offered_proto = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert!(
        offered_proto.contains(proto),
        "skiff-blk does not offer {proto:?}: {offered_proto:?}"
    );
    f.set_protocol_features(proto)
        .expect("SET_PROTOCOL_FEATURES");
    f.set_features(VERSION_1 | PROTOCOL_FEATURES | features)
        .expect("SET_FEATURES");
    let regions: Vec<_> = mem
        .iter()
        .map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info"))
        .collect();
    f.set_mem_table(&regions).expect("SET_MEM_TABLE");
    f
}

fn host(mem: &GuestMemoryMmap, gpa: u64) -> u64 {
    mem.get_host_address(GuestAddress(gpa))
        .expect("host address") as u64
}

/// Sets up queue 0 at `base` and enables it.
pub fn start_ring(
    f: &mut Frontend,
    mem: &GuestMemoryMmap,
    base: u16,
    call: &EventFd,
    kick: &EventFd,
) {
    f.set_vring_num(0, QSIZE).expect("SET_VRING_NUM");
    f.set_vring_base(0, base).expect("SET_VRING_BASE");
    f.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: host(mem, DESC),
            used_ring_addr: host(mem, USED),
            avail_ring_addr: host(mem, AVAIL),
            log_addr: None,
        },
    )
    .expect("SET_VRING_ADDR");
    f.set_vring_call(0, call).expect("SET_VRING_CALL");
    f.set_vring_kick(0, kick).expect("SET_VRING_KICK");
    f.set_vring_enable(0, true).expect("SET_VRING_ENABLE");
}

/// Writes a 3-descriptor write request at descriptors head..head+2: sector `sector` gets
/// 512 bytes of `fill`.
pub fn write_request(mem: &GuestMemoryMmap, head: u16, sector: u64, fill: u8) {
    let buf = 0x10000 + u64::from(head) * 0x1000;
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&hdr, GuestAddress(buf)).expect("header");
    mem.write_slice(&[fill; 512], GuestAddress(buf + 0x100))
        .expect("data");
    mem.write_obj(0xffu8, GuestAddress(buf + 0x400))
        .expect("status");
    let descs = [
        (buf, 16u32, VIRTQ_DESC_F_NEXT, head + 1),
        (buf + 0x100, 512, VIRTQ_DESC_F_NEXT, head + 2),
        (buf + 0x400, 1, VIRTQ_DESC_F_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
        let at = DESC + 16 * (u64::from(head) + i as u64);
        mem.write_obj(addr, GuestAddress(at)).expect("descriptor");
        mem.write_obj(len, GuestAddress(at + 8))
            .expect("descriptor");
        mem.write_obj(flags, GuestAddress(at + 12))
            .expect("descriptor");
        mem.write_obj(next, GuestAddress(at + 14))
            .expect("descriptor");
    }
}

/// The status byte of the request at `head`.
pub fn status(mem: &GuestMemoryMmap, head: u16) -> u8 {
    mem.read_obj(GuestAddress(0x10000 + u64::from(head) * 0x1000 + 0x400))
        .expect("status")
}

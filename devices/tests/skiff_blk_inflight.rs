//! skiff-blk's inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), driven by a synthetic
//! frontend (the vhost crate's `Frontend`) over guest memory in a memfd.
//!
//! The test plays a backend that died with requests in flight, completed out of order: it
//! writes the area's records itself, following the vhost-user specification's layout, then
//! starts a new skiff-blk with the area and checks that exactly the recorded requests are
//! executed, in the order they were taken, and that the ring restarts after them.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

mod common;
use common::frontend::{
    connect, guest_memory, start_blk, start_ring, status, write_request, AVAIL, QSIZE, USED,
};

/// What skiff does: the inflight area, config space and replies.
fn connect_inflight(socket: &Path, mem: &GuestMemoryMmap) -> Frontend {
    connect(
        socket,
        mem,
        0,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
}

/// Records head `head` in queue 0 of the area as taken (counter) and maybe completed.
fn record(area: &File, head: u16, inflight: bool, counter: u64) {
    let d = 16 + 16 * u64::from(head);
    area.write_all_at(&[u8::from(inflight)], d)
        .expect("vhost-user request or guest memory access");
    area.write_all_at(&counter.to_le_bytes(), d + 8)
        .expect("vhost-user request or guest memory access");
}

#[test]
fn a_new_backend_resubmits_what_the_area_holds_in_taken_order() {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.as_path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(64 * 512))
        .expect("image");
    let mem = guest_memory();

    // Three write requests: heads 0, 3 and 6, made available in that order.
    write_request(&mem, 0, 1, 0xa0);
    write_request(&mem, 3, 2, 0xa3);
    write_request(&mem, 6, 3, 0xa6);
    for (pos, head) in [0u16, 3, 6].into_iter().enumerate() {
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * pos as u64))
            .unwrap();
    }
    mem.write_obj(3u16, GuestAddress(AVAIL + 2)).unwrap();

    // The first backend hands out the area.
    let socket = dir.as_path().join("blk.sock");
    let mut first = start_blk(&socket, &image);
    let mut f = connect_inflight(&socket, &mem);
    let ask = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    };
    let (info, area) = f.get_inflight_fd(&ask).expect("GET_INFLIGHT_FD");
    assert_eq!((info.num_queues, info.queue_size), (1, QSIZE));
    let mut version = [0u8; 4];
    area.read_exact_at(&mut version, 8).unwrap();
    assert_eq!(
        version,
        [1, 0, QSIZE as u8, 0],
        "version 1, desc_num {QSIZE}"
    );

    // It "died" after taking all three (counters 1, 2, 3) and completing head 3 only:
    // used ring = [3], used idx 1, recorded in the area too.
    record(&area, 0, true, 1);
    record(&area, 3, false, 2);
    record(&area, 6, true, 3);
    area.write_all_at(&1u16.to_le_bytes(), 14).unwrap();
    mem.write_obj(3u32, GuestAddress(USED + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(USED + 2)).unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    drop(f);

    // A new backend gets the area and the ring at the used index, as the VMM does.
    let mut second = start_blk(&socket, &image);
    let mut f = connect_inflight(&socket, &mem);
    f.set_inflight_fd(&info, area.as_raw_fd())
        .expect("SET_INFLIGHT_FD");
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // No kick from the "guest": it is waiting for the two requests in flight.
    start_ring(&mut f, &mem, 1, &call, &kick);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        if used == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "used index {used}, not 3: the inflight requests were not resubmitted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let used_heads: Vec<u32> = (0..3)
        .map(|i| mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap())
        .collect();
    assert_eq!(
        used_heads,
        vec![3, 0, 6],
        "resubmitted in the order they were taken"
    );
    assert_eq!(
        (status(&mem, 0), status(&mem, 6)),
        (0, 0),
        "VIRTIO_BLK_S_OK"
    );
    // Head 3 was complete: it is not executed again (its status byte stays as the test left it).
    assert_eq!(status(&mem, 3), 0xff);
    let mut disk = vec![0u8; 4 * 512];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut disk, 0)
        .unwrap();
    assert!(disk[512..1024].iter().all(|&b| b == 0xa0), "sector 1");
    assert!(
        disk[1024..1536].iter().all(|&b| b == 0),
        "sector 2 (completed before)"
    );
    assert!(disk[1536..2048].iter().all(|&b| b == 0xa6), "sector 3");
    // The area records nothing in flight and the new used index.
    let mut rec = [0u8; 2];
    area.read_exact_at(&mut rec, 14).unwrap();
    assert_eq!(u16::from_le_bytes(rec), 3);
    for head in [0u64, 6] {
        let mut flag = [0u8; 1];
        area.read_exact_at(&mut flag, 16 + 16 * head).unwrap();
        assert_eq!(flag[0], 0, "head {head} still flagged");
    }
    // The ring restarted after the three taken requests.
    f.set_vring_enable(0, false).unwrap();
    assert_eq!(f.get_vring_base(0).expect("GET_VRING_BASE"), 3);

    // A request made available now is served normally and tracked.
    write_request(&mem, 9, 4, 0xa1);
    mem.write_obj(9u16, GuestAddress(AVAIL + 4 + 2 * 3))
        .unwrap();
    mem.write_obj(4u16, GuestAddress(AVAIL + 2)).unwrap();
    start_ring(&mut f, &mem, 3, &call, &kick);
    kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() != 4 {
        assert!(
            Instant::now() < deadline,
            "request after recovery not served"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(&mem, 9), 0);
    let mut counter = [0u8; 8];
    area.read_exact_at(&mut counter, 16 + 16 * 9 + 8).unwrap();
    assert!(
        u64::from_le_bytes(counter) > 3,
        "new requests are counted after the recorded ones"
    );
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "skiff-blk did not exit after hang-up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut err = String::new();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        err.contains("resubmitting 2 request(s) from the inflight area"),
        "{err}"
    );
    assert!(second.wait().unwrap().success(), "{err}");
}

#[test]
fn an_inflight_message_without_the_feature_ends_the_connection() {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.as_path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(64 * 512))
        .expect("image");
    let socket = dir.as_path().join("blk.sock");
    let mut child = start_blk(&socket, &image);
    // The vhost crate's frontend would refuse to send it; a raw one does.
    let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    let mut msg = Vec::new();
    for word in [31u32, 1, 20] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    msg.extend_from_slice(&[0u8; 20]);
    s.write_all(&msg).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "no answer, the connection closes"
    );
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("vhost-user message 31: INFLIGHT_SHMFD was not negotiated"),
        "{err}"
    );
}

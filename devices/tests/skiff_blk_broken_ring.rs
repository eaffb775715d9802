//! A guest that corrupts its ring, against skiff-blk as a process: the ring is marked
//! broken, the ring's SET_VRING_ERR eventfd is written once, the process neither spins nor
//! floods its log, its worker thread survives, and the ring runs again once the frontend
//! resets it (GET_VRING_BASE, then the ring's setup and SET_VRING_KICK).

use std::io::Read;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

mod common;
use common::frontend::{
    connect, guest_memory, start_blk, start_ring, status, write_request, AVAIL, EVENT_IDX, QSIZE,
    USED,
};

fn set_avail_idx(mem: &GuestMemoryMmap, idx: u16) {
    mem.write_obj(idx, GuestAddress(AVAIL + 2))
        .expect("avail idx");
}

/// Makes `head` available at ring position `pos`.
fn push(mem: &GuestMemoryMmap, pos: u16, head: u16) {
    mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(pos % QSIZE)))
        .expect("avail entry");
    set_avail_idx(mem, pos.wrapping_add(1));
}

fn used_idx(mem: &GuestMemoryMmap) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).expect("used idx")
}

/// Waits up to 10 s for the eventfd to be written; returns its counter.
fn wait_eventfd(fd: &EventFd, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fd.read() {
            Ok(n) => return n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("{what}: {e}"),
        }
        assert!(Instant::now() < deadline, "{what}: not written in 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_used(mem: &GuestMemoryMmap, want: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(mem) != want {
        assert!(
            Instant::now() < deadline,
            "{what}: used index {} after 10 s, not {want}",
            used_idx(mem)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// CPU time (user + system, in clock ticks) the process has used.
fn cpu_ticks(child: &Child) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).expect("stat");
    // Fields after the command name (which ends with the last ')'): utime and stime are
    // the 14th and 15th fields of the line, the 12th and 13th after it.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let ticks = |i: usize| -> u64 {
        rest.split_whitespace()
            .nth(i)
            .and_then(|f| f.parse().ok())
            .expect("utime/stime in /proc/PID/stat")
    };
    ticks(11) + ticks(12)
}

/// Kicks a few times over half a second: the process must stay idle and signal nothing.
fn assert_idle(child: &Child, kick: &EventFd, err: &EventFd) {
    let before = cpu_ticks(child);
    for _ in 0..10 {
        kick.write(1).expect("kick");
        std::thread::sleep(Duration::from_millis(50));
    }
    let used = cpu_ticks(child) - before;
    assert!(used <= 5, "{used} ticks of CPU in 0.5 s on a broken ring");
    assert!(err.read().is_err(), "the error eventfd was written again");
}

/// The frontend's reset of queue 0: stop it, then set it up again at `base`.
fn reset(f: &mut Frontend, mem: &GuestMemoryMmap, base: u16, call: &EventFd, kick: &EventFd) {
    f.set_vring_enable(0, false).expect("SET_VRING_ENABLE 0");
    f.get_vring_base(0).expect("GET_VRING_BASE");
    start_ring(f, mem, base, call, kick);
}

#[test]
fn a_corrupt_ring_is_broken_signalled_once_and_reset_by_the_frontend() {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.as_path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(64 * 512))
        .expect("image");
    let socket = dir.as_path().join("blk.sock");
    let mut guard = common::ChildGuard(start_blk(&socket, &image));
    let child = &mut guard.0;
    let mem = guest_memory();
    let mut f = connect(
        Path::new(&socket),
        &mem,
        EVENT_IDX,
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK,
    );
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let err = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    f.set_vring_err(0, &err).expect("SET_VRING_ERR");

    // 1. The available index runs more than a queue size ahead.
    set_avail_idx(&mem, QSIZE + 1);
    start_ring(&mut f, &mem, 0, &call, &kick);
    kick.write(1).unwrap();
    assert_eq!(wait_eventfd(&err, "error eventfd after a bad avail.idx"), 1);
    assert_idle(child, &kick, &err);
    assert_eq!(used_idx(&mem), 0);

    // The frontend resets the ring: a good request is served.
    set_avail_idx(&mem, 0);
    write_request(&mem, 0, 1, 0xa0);
    push(&mem, 0, 0);
    reset(&mut f, &mem, 0, &call, &kick);
    kick.write(1).unwrap();
    wait_used(&mem, 1, "request after the reset");
    assert_eq!(status(&mem, 0), 0);

    // 2. A head beyond the ring (add_used would fail): broken again, signalled again.
    push(&mem, 1, QSIZE);
    kick.write(1).unwrap();
    assert_eq!(wait_eventfd(&err, "error eventfd after a bad head"), 1);
    assert_idle(child, &kick, &err);

    // The worker thread is still there: after a reset it serves the ring.
    write_request(&mem, 3, 2, 0xa3);
    push(&mem, 2, 3);
    reset(&mut f, &mem, 2, &call, &kick);
    kick.write(1).unwrap();
    wait_used(&mem, 2, "request after the second reset");
    assert_eq!(status(&mem, 3), 0);

    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "skiff-blk did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let broken: Vec<&&str> = lines.iter().filter(|l| l.contains("broken")).collect();
    assert_eq!(broken.len(), 2, "one line per broken ring:\n{log}");
    assert!(lines.len() < 20, "the log is flooded:\n{log}");
    assert!(child.wait().unwrap().success(), "{log}");
}

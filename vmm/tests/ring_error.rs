//! The broken-ring path end to end between skiff's vhost-user front end and a real
//! skiff-blk, without a guest: the test plays the driver in guest RAM (a memfd, as in a
//! VM), moves the available index far past the queue size, kicks, and checks that skiff-blk
//! signals the ring's error eventfd (sent by the front end with SET_VRING_ERR), stays alive
//! and idle, and that after a device reset the ring serves a request again.
//!
//! Needs `skiff-blk` built beside the test binary (`cargo build --workspace --bins` first);
//! fails, naming it, when it is missing.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress};
use vmm::devices::virtio::vhost_user::{connect_with_retry, DeviceKind, VhostUserDevice};
use vmm::devices::virtio::{QueueConfig, VirtioDevice};

const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x2_0000;
const USED: u64 = 0x3_0000;
const HDR: u64 = 0x4_0000;
const DATA: u64 = 0x5_0000;
const STATUS: u64 = 0x6_0000;
const SIZE: u16 = 16;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn skiff_blk() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = dir.join("skiff-blk");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins`",
        bin.display()
    );
    bin
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn queue() -> QueueConfig {
    QueueConfig {
        max_size: 256,
        size: SIZE,
        ready: true,
        desc: DESC,
        avail: AVAIL,
        used: USED,
    }
}

#[test]
fn a_broken_ring_signals_the_error_eventfd_and_recovers_after_a_reset() {
    let dir = std::env::temp_dir().join(format!("skiff-ring-error-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).expect("mkdir");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; 64 * 512]).expect("image");
    let socket = dir.join("blk.sock");
    let child = Command::new(skiff_blk())
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .stdin(Stdio::null())
        .spawn()
        .expect("start skiff-blk");
    let pid = child.id();
    let mut child = Kill(child);
    let stream = connect_with_retry(&socket, Duration::from_secs(10), || {
        match child.0.try_wait() {
            Ok(None) => Ok(()),
            other => Err(format!("skiff-blk exited: {other:?}")),
        }
    })
    .expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let ram = vmm::memory::create_guest_ram(1 << 20).expect("guest RAM");
    let mem = ram.mem.clone();
    let mut dev =
        VhostUserDevice::new(DeviceKind::Block, stream, 1, mem.clone()).expect("negotiate");
    // The driver acks VERSION_1 only (no EVENT_IDX: simpler rings).
    let acked = 1u64 << 32;
    dev.activate(acked, &[queue()]).expect("activate");

    // The driver publishes an available index far past the queue size and kicks.
    mem.write_obj(1000u16, GuestAddress(AVAIL + 2))
        .expect("avail idx");
    dev.kick_fds()[0].write(1).expect("kick");
    let deadline = Instant::now() + Duration::from_secs(10);
    let signalled = loop {
        match dev.err_fd().read() {
            Ok(n) => break n,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("skiff-blk did not signal the ring's error eventfd: {e}"),
        }
    };
    assert_eq!(signalled, 1);
    // Kicked again, it stays quiet: no second signal, no CPU.
    let before = cpu_ticks(pid);
    for _ in 0..50 {
        dev.kick_fds()[0].write(1).expect("kick");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dev.err_fd().read().is_err(), "signalled twice");
    let used = cpu_ticks(pid) - before;
    assert!(used <= 5, "skiff-blk used {used} ticks on a broken ring");
    assert!(matches!(child.0.try_wait(), Ok(None)), "skiff-blk died");

    // A device reset and a fresh ring: a read of sector 1 is served.
    dev.reset().expect("reset");
    for a in [AVAIL, USED] {
        mem.write_slice(&[0u8; 4 + 2 * SIZE as usize + 2], GuestAddress(a))
            .expect("clear ring");
    }
    dev.activate(acked, &[queue()]).expect("activate again");
    let descs: [(u64, u32, u16, u16); 3] = [
        (HDR, 16, 1, 1),       // header, NEXT
        (DATA, 512, 1 | 2, 2), // data, NEXT | WRITE
        (STATUS, 1, 2, 0),     // status, WRITE
    ];
    for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
        let at = GuestAddress(DESC + 16 * i as u64);
        mem.write_obj(*addr, at).expect("desc");
        mem.write_obj(*len, at.unchecked_add(8)).expect("desc");
        mem.write_obj(*flags, at.unchecked_add(12)).expect("desc");
        mem.write_obj(*next, at.unchecked_add(14)).expect("desc");
    }
    mem.write_obj(0u32, GuestAddress(HDR)).expect("type IN");
    mem.write_obj(1u64, GuestAddress(HDR + 8)).expect("sector");
    mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
    mem.write_obj(0u16, GuestAddress(AVAIL + 4))
        .expect("ring[0]");
    mem.write_obj(1u16, GuestAddress(AVAIL + 2))
        .expect("avail idx");
    dev.kick_fds()[0].write(1).expect("kick");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem
        .read_obj::<u16>(GuestAddress(USED + 2))
        .expect("used idx")
        != 1
    {
        assert!(Instant::now() < deadline, "the reset ring served nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"), 0);
    let mut sector = [0u8; 512];
    mem.read_slice(&mut sector, GuestAddress(DATA))
        .expect("data");
    let mut want = [0u8; 512];
    std::fs::File::open(&image)
        .expect("image")
        .read_exact_at(&mut want, 512)
        .expect("read image");
    assert_eq!(sector, want);
    drop(dev);
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

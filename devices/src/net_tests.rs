use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::metrics::MetricsPage;

const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const BUF: u64 = 0x10_000;

fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_000)]).expect("guest memory")
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Fresh counters and the page they live in.
fn metrics() -> (MetricsPage, NetMetrics) {
    let page = MetricsPage::in_memory();
    let m = NetMetrics::register(&page).expect("counters");
    (page, m)
}

/// The counters that moved, in slot order.
fn moved(page: &MetricsPage) -> Vec<(String, u64)> {
    page.snapshot()
        .into_iter()
        .filter(|(_, v)| *v != 0)
        .collect()
}

fn counts(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

fn frame(payload_len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 1; // NEEDS_CSUM, to check the header is passed through untouched
    f[10] = 0xee; // num_buffers garbage from the "TAP"; rx must overwrite it
    f.extend((0..payload_len).map(|i| (i % 253) as u8));
    f
}

#[test]
fn rx_frame_spans_buffers_and_sets_num_buffers() {
    let m = mem();
    let (page, nm) = metrics();
    let (tap, peer) = UnixDatagram::pair().expect("socketpair");
    let f = frame(100);
    peer.send(&f).expect("send");
    let q = MockSplitQueue::new(&m, 16);
    // Header split across two descriptors (8 + 60), the rest in a third.
    let mut chain = q
        .build_desc_chain(&[
            desc(BUF, 8, F_WRITE),
            desc(BUF + 0x1000, 60, F_WRITE),
            desc(BUF + 0x2000, 1500, F_WRITE),
        ])
        .expect("chain");
    let used = rx_frame(tap.as_raw_fd(), &mut chain, &nm).expect("rx");
    assert_eq!(used as usize, f.len());
    let mut got = vec![0u8; f.len()];
    m.read_slice(&mut got[..8], GuestAddress(BUF)).expect("a");
    m.read_slice(&mut got[8..68], GuestAddress(BUF + 0x1000))
        .expect("b");
    m.read_slice(&mut got[68..], GuestAddress(BUF + 0x2000))
        .expect("c");
    let mut want = f.clone();
    want[10] = 1;
    want[11] = 0;
    assert_eq!(got, want);
    assert_eq!(moved(&page), counts(&[("rx_frames", 1), ("rx_bytes", 100)]));
}

#[test]
fn rx_without_frame_would_block() {
    let m = mem();
    let (page, nm) = metrics();
    let (tap, _peer) = UnixDatagram::pair().expect("socketpair");
    tap.set_nonblocking(true).expect("nonblocking");
    let q = MockSplitQueue::new(&m, 16);
    let mut chain = q
        .build_desc_chain(&[desc(BUF, 1526, F_WRITE)])
        .expect("chain");
    assert!(matches!(
        rx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::WouldBlock)
    ));
    assert_eq!(moved(&page), counts(&[]));
}

#[test]
fn rx_rejects_bad_chains() {
    let m = mem();
    let (page, nm) = metrics();
    let (tap, peer) = UnixDatagram::pair().expect("socketpair");
    peer.send(&frame(10)).expect("send");
    let q = MockSplitQueue::new(&m, 16);
    // Device-readable buffer in an rx chain.
    let mut chain = q.build_desc_chain(&[desc(BUF, 1526, 0)]).expect("chain");
    assert!(matches!(
        rx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::BadChain(_))
    ));
    // Smaller than the header.
    let mut chain = q.build_desc_chain(&[desc(BUF, 6, F_WRITE)]).expect("chain");
    assert!(matches!(
        rx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::BadChain(_))
    ));
    // Outside guest memory.
    let mut chain = q
        .build_desc_chain(&[desc(0xff_0000, 1526, F_WRITE)])
        .expect("chain");
    assert!(matches!(
        rx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::Guest(_))
    ));
    // The frame is still there for a good chain.
    let mut chain = q
        .build_desc_chain(&[desc(BUF, 1526, F_WRITE)])
        .expect("chain");
    assert_eq!(
        rx_frame(tap.as_raw_fd(), &mut chain, &nm).expect("rx") as usize,
        VNET_HDR_LEN + 10
    );
    assert_eq!(
        moved(&page),
        counts(&[("rx_frames", 1), ("rx_bytes", 10), ("invalid_requests", 3)])
    );
}

#[test]
fn rx_short_frame_is_dropped() {
    let m = mem();
    let (page, nm) = metrics();
    let (tap, peer) = UnixDatagram::pair().expect("socketpair");
    peer.send(&[0u8; 4]).expect("send");
    let q = MockSplitQueue::new(&m, 16);
    let mut chain = q
        .build_desc_chain(&[desc(BUF, 1526, F_WRITE)])
        .expect("chain");
    assert!(matches!(
        rx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::ShortFrame(4))
    ));
    assert_eq!(moved(&page), counts(&[("rx_dropped", 1)]));
}

#[test]
fn rx_frame_larger_than_the_chain_is_dropped() {
    let m = mem();
    let (page, nm) = metrics();
    let (tap, peer) = UnixDatagram::pair().expect("socketpair");
    let q = MockSplitQueue::new(&m, 16);
    // Exactly fits: delivered.
    peer.send(&frame(52)).expect("send");
    let mut chain = q
        .build_desc_chain(&[desc(BUF, 64, F_WRITE)])
        .expect("chain");
    assert_eq!(rx_frame(tap.as_raw_fd(), &mut chain, &nm).expect("rx"), 64);
    // One byte too many: dropped, not delivered truncated.
    peer.send(&frame(53)).expect("send");
    let mut chain = q
        .build_desc_chain(&[desc(BUF, 64, F_WRITE)])
        .expect("chain");
    assert!(matches!(
        rx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::Truncated(64))
    ));
    assert_eq!(
        moved(&page),
        counts(&[("rx_frames", 1), ("rx_bytes", 52), ("rx_dropped", 1)])
    );
}

#[test]
fn rx_read_error_is_counted() {
    let m = mem();
    let (page, nm) = metrics();
    // A write-only pipe end: readv fails with EBADF.
    let (_r, w) = pipe();
    let q = MockSplitQueue::new(&m, 16);
    let mut chain = q
        .build_desc_chain(&[desc(BUF, 1526, F_WRITE)])
        .expect("chain");
    assert!(matches!(
        rx_frame(w.as_raw_fd(), &mut chain, &nm),
        Err(NetError::Io(_))
    ));
    assert_eq!(moved(&page), counts(&[("rx_errors", 1)]));
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh fds into the array it is given.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2");
    // SAFETY: both fds are fresh and owned by nothing else.
    unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

#[test]
fn tx_frame_gathers_buffers() {
    let m = mem();
    let (page, nm) = metrics();
    let (tap, peer) = UnixDatagram::pair().expect("socketpair");
    let f = frame(200);
    m.write_slice(&f[..VNET_HDR_LEN], GuestAddress(BUF))
        .expect("hdr");
    m.write_slice(&f[VNET_HDR_LEN..], GuestAddress(BUF + 0x1000))
        .expect("payload");
    let q = MockSplitQueue::new(&m, 16);
    let mut chain = q
        .build_desc_chain(&[
            desc(BUF, VNET_HDR_LEN as u32, 0),
            desc(BUF + 0x1000, 200, 0),
        ])
        .expect("chain");
    let n = tx_frame(tap.as_raw_fd(), &mut chain, &nm).expect("tx");
    assert_eq!(n, f.len());
    let mut got = vec![0u8; 4096];
    let len = peer.recv(&mut got).expect("recv");
    assert_eq!(&got[..len], &f[..]);

    // Device-writable buffer in a tx chain is refused and nothing is sent.
    let mut chain = q
        .build_desc_chain(&[desc(BUF, 64, F_WRITE)])
        .expect("chain");
    assert!(matches!(
        tx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::BadChain(_))
    ));
    peer.set_nonblocking(true).expect("nonblocking");
    assert!(peer.recv(&mut got).is_err());

    // The peer is gone: the write fails and the frame is lost.
    drop(peer);
    let mut chain = q
        .build_desc_chain(&[desc(BUF, VNET_HDR_LEN as u32, 0)])
        .expect("chain");
    assert!(matches!(
        tx_frame(tap.as_raw_fd(), &mut chain, &nm),
        Err(NetError::Io(_))
    ));
    assert_eq!(
        moved(&page),
        counts(&[
            ("tx_frames", 1),
            ("tx_bytes", 200),
            ("tx_errors", 1),
            ("invalid_requests", 1),
        ])
    );
}

#[test]
fn ctrl_mq_pairs_set() {
    let m = mem();
    let (page, nm) = metrics();
    let q = MockSplitQueue::new(&m, 16);
    let ack = GuestAddress(BUF + 0x100);
    for (pairs, want) in [
        (2u16, VIRTIO_NET_OK),
        (3, VIRTIO_NET_ERR),
        (0, VIRTIO_NET_ERR),
    ] {
        let mut cmd = [
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            0,
            0,
        ];
        cmd[2..4].copy_from_slice(&pairs.to_le_bytes());
        m.write_slice(&cmd[..2], GuestAddress(BUF)).expect("hdr");
        m.write_slice(&cmd[2..], GuestAddress(BUF + 0x40))
            .expect("data");
        m.write_obj(0xffu8, ack).expect("poison");
        let mut chain = q
            .build_desc_chain(&[
                desc(BUF, 2, 0),
                desc(BUF + 0x40, 2, 0),
                desc(ack.0, 1, F_WRITE),
            ])
            .expect("chain");
        assert_eq!(ctrl_command(&mut chain, 2, &nm), 1);
        assert_eq!(
            m.read_obj::<u8>(ack).expect("ack"),
            want as u8,
            "pairs {pairs}"
        );
    }
    // No writable ack byte.
    let mut chain = q.build_desc_chain(&[desc(BUF, 4, 0)]).expect("chain");
    assert_eq!(ctrl_command(&mut chain, 2, &nm), 0);
    assert_eq!(moved(&page), counts(&[("invalid_requests", 1)]));
}

#[test]
fn config_layout() {
    let cfg = config_bytes(Some([0x52, 0x54, 0, 1, 2, 3]), 4);
    assert_eq!(cfg.len(), 24);
    assert_eq!(&cfg[0..6], &[0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(&cfg[6..8], &1u16.to_le_bytes());
    assert_eq!(&cfg[8..10], &4u16.to_le_bytes());
    assert_eq!(&config_bytes(None, 1)[0..6], &[0u8; 6]);
}

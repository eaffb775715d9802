//! skiff-blk's and skiff-net's request processing over arbitrary guest memory: descriptor
//! tables (direct and indirect, loops, lengths, addresses outside memory), request headers,
//! data, rx/tx frames and control commands, through the same functions the backends call:
//! the live path (virtio-queue's chain, [`devices::block::process_chain`],
//! [`devices::net::rx_frame`], [`devices::net::tx_frame`], [`devices::net::ctrl_command`])
//! and crash recovery's own walk of a chain from the inflight area
//! ([`devices::inflight::chain_descriptors`] then [`devices::block::process_request`]).
//! Never panics; memory stays bounded (one request is capped at 32 MiB).
//!
//! Input: byte 0 picks the path (blk live, blk recovery, net rx, net tx, net ctrl), bytes
//! 1-2 the queue size exponent and the head, the next 4 KiB the descriptor table (at
//! guest address 0x1000), the rest guest memory from 0x10000 (headers, data, frames; for
//! rx also the frame the "TAP" delivers).
#![no_main]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;

use devices::block::{process_chain, process_request, BlockMetrics};
use devices::disk::{DiskImage, DiskOptions};
use devices::metrics::MetricsPage;
use devices::net::{ctrl_command, rx_frame, tx_frame, NetMetrics};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

const MEM: usize = 1 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x10000;

struct Blk {
    _image: TempFile,
    disk: DiskImage,
    metrics: BlockMetrics,
    _page: MetricsPage,
}

fn blk() -> &'static Blk {
    static BLK: OnceLock<Blk> = OnceLock::new();
    BLK.get_or_init(|| {
        // On tmpfs: a flush request is an fdatasync, milliseconds on a disk.
        let image = TempFile::new_in(std::path::Path::new("/dev/shm")).expect("temp file");
        image.as_file().write_all(&[0x5a; 64 * 512]).expect("image");
        let disk = DiskImage::open(
            image.as_path(),
            &DiskOptions {
                read_only: false,
                direct: false,
                serial: Some("fuzz".into()),
            },
        )
        .expect("open image");
        let page = MetricsPage::in_memory();
        let metrics = BlockMetrics::register(&page).expect("counters");
        Blk {
            _image: image,
            disk,
            metrics,
            _page: page,
        }
    })
}

fn net_metrics() -> &'static NetMetrics {
    static NET: OnceLock<(MetricsPage, NetMetrics)> = OnceLock::new();
    &NET.get_or_init(|| {
        let page = MetricsPage::in_memory();
        let m = NetMetrics::register(&page).expect("counters");
        (page, m)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (mode, size, head) = (data[0] % 5, 1u16 << (data[1] % 9), u16::from(data[2]));
    let rest = &data[3..];
    let (table, memory) = rest.split_at(rest.len().min(4096));
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let _ = mem.write_slice(table, GuestAddress(DESC));
    let _ = mem.write_slice(
        &memory[..memory.len().min(MEM - DATA as usize)],
        GuestAddress(DATA),
    );
    if mode == 1 {
        // Crash recovery: the head comes from the inflight area, the walk is skiff's own.
        let b = blk();
        if let Ok(descs) =
            devices::inflight::chain_descriptors(&mem, GuestAddress(DESC), size, head)
        {
            let _ = process_request(&b.disk, &b.metrics, &mem, head, &descs);
        }
        return;
    }
    // The live path: one available entry, taken through virtio-queue as the backends do.
    let _ = mem.write_obj(0u16, GuestAddress(AVAIL));
    let _ = mem.write_obj(1u16, GuestAddress(AVAIL + 2));
    let _ = mem.write_obj(head, GuestAddress(AVAIL + 4));
    let Ok(mut q) = Queue::new(size) else {
        return;
    };
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let Ok(mut it) = q.iter(&mem) else {
        return;
    };
    let Some(mut chain) = it.next() else {
        return;
    };
    match mode {
        0 => {
            let b = blk();
            let _ = process_chain(&b.disk, &b.metrics, chain);
        }
        2 => {
            let Ok((tap, peer)) = UnixDatagram::pair() else {
                return;
            };
            let _ = tap.set_nonblocking(true);
            let frame = &memory[..memory.len().min(65550)];
            let _ = peer.send(frame);
            let _ = rx_frame(tap.as_raw_fd(), &mut chain, net_metrics());
        }
        3 => {
            let Ok((tap, peer)) = UnixDatagram::pair() else {
                return;
            };
            let _ = tap.set_nonblocking(true);
            let _ = peer.set_nonblocking(true);
            let _ = tx_frame(tap.as_raw_fd(), &mut chain, net_metrics());
            let mut buf = vec![0u8; 70000];
            let _ = peer.recv(&mut buf);
        }
        _ => {
            let _ = ctrl_command(&mut chain, 4, net_metrics());
        }
    }
});

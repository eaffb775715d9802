use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::disk::DiskOptions;
use crate::metrics::MetricsPage;

const F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const HDR: u64 = 0x10_000;
const DATA: u64 = 0x20_000;
const STATUS: u64 = 0x30_000;
const SECTORS: u64 = 64;

fn mem() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_000)]).expect("guest memory")
}

/// An image with the counters its requests go to.
struct Dev {
    disk: DiskImage,
    page: MetricsPage,
    metrics: BlockMetrics,
}

impl Dev {
    /// The counters that moved, in slot order.
    fn counts(&self) -> Vec<(String, u64)> {
        self.page
            .snapshot()
            .into_iter()
            .filter(|(_, v)| *v != 0)
            .collect()
    }
}

fn counts(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

fn image(read_only: bool) -> (TempFile, Dev) {
    let tmp = TempFile::new().expect("temp file");
    let mut f = tmp.as_file();
    let data: Vec<u8> = (0..SECTORS * 512).map(|i| (i % 251) as u8).collect();
    f.write_all(&data).expect("fill image");
    let disk = DiskImage::open(
        tmp.as_path(),
        &DiskOptions {
            read_only,
            direct: false,
            serial: Some("skiff-test-serial".into()),
        },
    )
    .expect("open image");
    let page = MetricsPage::in_memory();
    let metrics = BlockMetrics::register(&page).expect("counters");
    (
        tmp,
        Dev {
            disk,
            page,
            metrics,
        },
    )
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(mem: &GuestMemoryMmap<()>, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).expect("header");
}

fn run(mem: &GuestMemoryMmap<()>, dev: &Dev, descs: &[RawDescriptor]) -> u32 {
    mem.write_obj(0xffu8, GuestAddress(STATUS))
        .expect("poison status");
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).expect("chain");
    process_chain(&dev.disk, &dev.metrics, chain)
}

fn status(mem: &GuestMemoryMmap<()>) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).expect("status")
}

fn file_bytes(tmp: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut f = tmp.as_file();
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read back");
    buf
}

#[test]
fn read_two_segments() {
    let m = mem();
    let (tmp, disk) = image(false);
    header(&m, VIRTIO_BLK_T_IN, 3);
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(DATA + 0x1000, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1025);
    let mut got = vec![0u8; 512];
    m.read_slice(&mut got, GuestAddress(DATA)).expect("data");
    assert_eq!(got, file_bytes(&tmp, 3 * 512, 512));
    m.read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .expect("data");
    assert_eq!(got, file_bytes(&tmp, 4 * 512, 512));
    assert_eq!(
        disk.counts(),
        counts(&[("read_requests", 1), ("read_bytes", 1024)])
    );
}

#[test]
fn write_then_read_back() {
    let m = mem();
    let (tmp, disk) = image(false);
    let pattern: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
    m.write_slice(&pattern, GuestAddress(DATA))
        .expect("pattern");
    header(&m, VIRTIO_BLK_T_OUT, 10);
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 1024, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1);
    assert_eq!(file_bytes(&tmp, 10 * 512, 1024), pattern);

    m.write_slice(&[0u8; 1024], GuestAddress(DATA + 0x4000))
        .expect("clear");
    header(&m, VIRTIO_BLK_T_IN, 10);
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA + 0x4000, 1024, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1025);
    let mut got = vec![0u8; 1024];
    m.read_slice(&mut got, GuestAddress(DATA + 0x4000))
        .expect("data");
    assert_eq!(got, pattern);
    assert_eq!(
        disk.counts(),
        counts(&[
            ("read_requests", 1),
            ("write_requests", 1),
            ("read_bytes", 1024),
            ("write_bytes", 1024),
        ])
    );
}

#[test]
fn flush_ok() {
    let m = mem();
    let (_tmp, disk) = image(false);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    let used = run(&m, &disk, &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)]);
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1);
    assert_eq!(disk.counts(), counts(&[("flush_requests", 1)]));
}

#[test]
fn get_id_returns_serial() {
    let m = mem();
    let (_tmp, disk) = image(false);
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    m.write_slice(&[0xaau8; 20], GuestAddress(DATA))
        .expect("poison");
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 20, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 21);
    let mut got = [0u8; 20];
    m.read_slice(&mut got, GuestAddress(DATA)).expect("id");
    let mut want = [0u8; 20];
    want[..17].copy_from_slice(b"skiff-test-serial");
    assert_eq!(got, want);
    assert_eq!(disk.counts(), counts(&[("get_id_requests", 1)]));
}

fn range(m: &GuestMemoryMmap<()>, sector: u64, count: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&count.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    m.write_slice(&r, GuestAddress(DATA)).expect("range");
}

#[test]
fn discard_and_write_zeroes_read_back_zero() {
    let m = mem();
    let (tmp, disk) = image(false);
    // Write zeroes over sectors 8..16 (block aligned so punch/zero-range cover whole blocks).
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    range(&m, 8, 8, 0);
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 16, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1);
    assert_eq!(file_bytes(&tmp, 8 * 512, 8 * 512), vec![0u8; 8 * 512]);
    // Neighbours untouched.
    assert_eq!(
        file_bytes(&tmp, 7 * 512, 512),
        (7 * 512..8 * 512)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        file_bytes(&tmp, 16 * 512, 512),
        (16 * 512..17 * 512)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
    );

    // Write zeroes with UNMAP punches a hole, still reads zero.
    header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    range(&m, 24, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 16, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(file_bytes(&tmp, 24 * 512, 8 * 512), vec![0u8; 8 * 512]);

    // Discard succeeds; size is kept.
    header(&m, VIRTIO_BLK_T_DISCARD, 0);
    range(&m, 32, 8, 0);
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 16, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(tmp.as_file().metadata().expect("meta").len(), SECTORS * 512);

    // Discard with the unmap flag is unsupported (spec 5.2.6.2), out-of-range is IOERR.
    range(&m, 32, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 16, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP as u8);
    range(&m, SECTORS - 1, 2, 0);
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 16, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        disk.counts(),
        counts(&[
            ("discard_requests", 1),
            ("write_zeroes_requests", 2),
            ("invalid_requests", 2),
        ])
    );
}

#[test]
fn read_only_rejects_writes() {
    let m = mem();
    let (tmp, disk) = image(true);
    let before = file_bytes(&tmp, 0, 512);
    m.write_slice(&[0x55u8; 512], GuestAddress(DATA))
        .expect("data");
    header(&m, VIRTIO_BLK_T_OUT, 0);
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used, 1);
    assert_eq!(file_bytes(&tmp, 0, 512), before);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&m, kind, 0);
        range(&m, 0, 1, 0);
        run(
            &m,
            &disk,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 16, 0),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    }
    // Reads still work.
    header(&m, VIRTIO_BLK_T_IN, 0);
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        disk.counts(),
        counts(&[
            ("read_requests", 1),
            ("read_bytes", 512),
            ("invalid_requests", 3),
        ])
    );
}

#[test]
fn unknown_type_is_unsupported() {
    let m = mem();
    let (_tmp, disk) = image(false);
    header(&m, 0x1234, 0);
    let used = run(&m, &disk, &[desc(HDR, 16, 0), desc(STATUS, 1, F_WRITE)]);
    assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(used, 1);
    assert_eq!(disk.counts(), counts(&[("invalid_requests", 1)]));
}

#[test]
fn malformed_chains_fail_without_panic() {
    let m = mem();
    let (_tmp, disk) = image(false);

    // Header shorter than 16 bytes.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let used = run(&m, &disk, &[desc(HDR, 8, 0), desc(STATUS, 1, F_WRITE)]);
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used, 1);

    // Only a status descriptor.
    let used = run(&m, &disk, &[desc(STATUS, 1, F_WRITE)]);
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used, 1);

    // Sector out of range.
    header(&m, VIRTIO_BLK_T_IN, SECTORS);
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used, 1);
    header(&m, VIRTIO_BLK_T_OUT, u64::MAX);
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);

    // Data buffer outside guest memory.
    header(&m, VIRTIO_BLK_T_IN, 0);
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(0xff_f000, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);

    // Read into a device-readable buffer (wrong direction).
    run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, 0),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);

    // Status descriptor not writable: nothing written, used len 0.
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, 0),
        ],
    );
    assert_eq!(used, 0);
    assert_eq!(status(&m), 0xff);

    // Status byte outside guest memory.
    let used = run(&m, &disk, &[desc(HDR, 16, 0), desc(0x200_0000, 1, F_WRITE)]);
    assert_eq!(used, 0);

    // Every malformed chain is counted once, as invalid, and nothing else moved.
    assert_eq!(disk.counts(), counts(&[("invalid_requests", 8)]));
}

#[test]
fn host_io_failure_counts_io_error() {
    let m = mem();
    let (tmp, disk) = image(false);
    // The image shrinks behind the device's back: a read past its new end fails on the host.
    tmp.as_file().set_len(0).expect("truncate");
    header(&m, VIRTIO_BLK_T_IN, 3);
    let used = run(
        &m,
        &disk,
        &[
            desc(HDR, 16, 0),
            desc(DATA, 512, F_WRITE),
            desc(STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!(status(&m), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used, 1);
    assert_eq!(disk.counts(), counts(&[("io_errors", 1)]));
}

#[test]
fn config_space_layout() {
    let cfg = BlockConfigSpace {
        capacity: 0x1122_3344_5566,
        seg_max: 254,
        num_queues: 4,
    }
    .to_bytes();
    assert_eq!(cfg.len(), std::mem::size_of::<virtio_blk_config>());
    assert_eq!(&cfg[0..8], &0x1122_3344_5566u64.to_le_bytes());
    assert_eq!(&cfg[8..12], &(128u32 << 10).to_le_bytes());
    assert_eq!(&cfg[12..16], &254u32.to_le_bytes());
    assert_eq!(&cfg[20..24], &512u32.to_le_bytes());
    assert_eq!(&cfg[34..36], &4u16.to_le_bytes());
    assert_eq!(&cfg[36..40], &MAX_DISCARD_SECTORS.to_le_bytes());
    assert_eq!(&cfg[40..44], &MAX_DISCARD_SEG.to_le_bytes());
    assert_eq!(&cfg[48..52], &65536u32.to_le_bytes());
    assert_eq!(&cfg[52..56], &MAX_DISCARD_SEG.to_le_bytes());
    assert_eq!(cfg[56], 1);
    assert_eq!(config_slice(&cfg, 34, 2), vec![4, 0]);
    assert_eq!(config_slice(&cfg, cfg.len() as u32 - 1, 4).len(), 4);
}

#[test]
fn lock_conflict_and_missing_image() {
    let (tmp, _disk) = image(false);
    let err = DiskImage::open(tmp.as_path(), &DiskOptions::default()).expect_err("locked");
    assert!(matches!(err, DiskError::Locked(_)), "{err}");
    let err = DiskImage::open(
        std::path::Path::new("/nonexistent/skiff.img"),
        &DiskOptions::default(),
    )
    .expect_err("missing");
    assert!(err.to_string().contains("/nonexistent/skiff.img"), "{err}");
}

/// u32 at `offset` of a config space.
fn config_u32(cfg: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(cfg[offset..offset + 4].try_into().expect("4 bytes"))
}

/// A sparse `bytes`-long image in `dir`, opened with O_DIRECT when `direct` and the
/// filesystem has it.
fn sparse_image(dir: &std::path::Path, bytes: u64, direct: bool) -> (TempFile, Dev) {
    let tmp = TempFile::new_in(dir).expect("temp file");
    tmp.as_file().set_len(bytes).expect("size image");
    let opts = |direct| DiskOptions {
        read_only: false,
        direct,
        serial: None,
    };
    let disk = DiskImage::open(tmp.as_path(), &opts(direct))
        .or_else(|_| DiskImage::open(tmp.as_path(), &opts(false)))
        .expect("open image");
    let page = MetricsPage::in_memory();
    let metrics = BlockMetrics::register(&page).expect("counters");
    (
        tmp,
        Dev {
            disk,
            page,
            metrics,
        },
    )
}

/// Most data bytes one request may move (and so the most a write-zeroes fallback writes).
const REQUEST_BOUND: u64 = 32 << 20;

#[test]
fn discard_and_write_zeroes_beyond_the_advertised_limits_fail() {
    use virtio_bindings::virtio_blk::virtio_blk_config;
    let cfg = BlockConfigSpace {
        capacity: 1 << 32,
        seg_max: 254,
        num_queues: 1,
    }
    .to_bytes();
    let at = |off| config_u32(&cfg, off);
    let wz_max = at(offset_of!(virtio_blk_config, max_write_zeroes_sectors));
    let wz_seg = at(offset_of!(virtio_blk_config, max_write_zeroes_seg));
    let d_max = at(offset_of!(virtio_blk_config, max_discard_sectors));
    let d_seg = at(offset_of!(virtio_blk_config, max_discard_seg));
    // Without FALLOC_FL_ZERO_RANGE a write-zeroes request is written out: no more than the
    // data of one request.
    assert!(
        u64::from(wz_max) * SECTOR_SIZE <= REQUEST_BOUND,
        "max_write_zeroes_sectors {wz_max} lets one request write more than 32 MiB"
    );
    assert_eq!((wz_seg, d_seg), (1, 1));

    // tmpfs has no FALLOC_FL_ZERO_RANGE: write zeroes takes the fallback there.
    let m = mem();
    let capacity = (u64::from(d_max.max(wz_max)) + 64) * SECTOR_SIZE;
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let (tmp, disk) = sparse_image(&dir, capacity, false);
    let request = |kind: u32, ranges: &[(u64, u32)]| -> u8 {
        header(&m, kind, 0);
        for (i, (sector, count)) in ranges.iter().enumerate() {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&count.to_le_bytes());
            m.write_slice(&r, GuestAddress(DATA + 16 * i as u64))
                .expect("range");
        }
        run(
            &m,
            &disk,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 16 * ranges.len() as u32, 0),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        status(&m)
    };
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    assert_eq!(
        request(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, wz_max + 1)]),
        ioerr
    );
    assert_eq!(
        request(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8), (64, 8)]),
        ioerr
    );
    assert_eq!(request(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8), (0, 8)]), ioerr);
    assert_eq!(request(VIRTIO_BLK_T_DISCARD, &[(0, d_max + 1)]), ioerr);
    assert_eq!(request(VIRTIO_BLK_T_DISCARD, &[(0, 8), (64, 8)]), ioerr);
    let allocated = || tmp.as_file().metadata().expect("meta").blocks() * 512;
    assert_eq!(allocated(), 0, "a refused request wrote nothing");
    // Within the limits: done, and the fallback writes the range only.
    assert_eq!(
        request(VIRTIO_BLK_T_WRITE_ZEROES, &[(8, wz_max)]),
        VIRTIO_BLK_S_OK as u8
    );
    assert!(allocated() <= u64::from(wz_max) * SECTOR_SIZE + 4096);
    assert_eq!(
        request(VIRTIO_BLK_T_DISCARD, &[(0, d_max)]),
        VIRTIO_BLK_S_OK as u8
    );
    assert_eq!(
        disk.counts(),
        counts(&[
            ("discard_requests", 1),
            ("write_zeroes_requests", 1),
            ("invalid_requests", 5),
        ])
    );
}

#[test]
fn requests_beyond_the_data_bound_fail_without_a_bounce_buffer() {
    use virtio_bindings::virtio_blk::virtio_blk_config;
    let cfg = BlockConfigSpace {
        capacity: 1 << 32,
        seg_max: 254,
        num_queues: 1,
    }
    .to_bytes();
    let seg_max = config_u32(&cfg, offset_of!(virtio_blk_config, seg_max));
    let size_max = config_u32(&cfg, offset_of!(virtio_blk_config, size_max));
    assert!(
        size_max >= 4096 && u64::from(seg_max) * u64::from(size_max) <= REQUEST_BOUND,
        "seg_max {seg_max} x size_max {size_max} lets a driver send more than 32 MiB"
    );

    // An O_DIRECT image (where the filesystem has it) and an unaligned guest buffer: the
    // data would go through a bounce buffer as large as the request.
    let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
    let (_tmp, disk) = sparse_image(std::env::temp_dir().as_path(), 48 << 20, true);
    let data = 0x10_0001;
    let read = |len: u64| -> u8 {
        header(&m, VIRTIO_BLK_T_IN, 0);
        run(
            &m,
            &disk,
            &[
                desc(HDR, 16, 0),
                desc(data, len as u32, F_WRITE),
                desc(STATUS, 1, F_WRITE),
            ],
        );
        status(&m)
    };
    assert_eq!(read(REQUEST_BOUND + 512), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(read(REQUEST_BOUND), VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        disk.counts(),
        counts(&[
            ("read_requests", 1),
            ("read_bytes", REQUEST_BOUND),
            ("invalid_requests", 1)
        ])
    );
}

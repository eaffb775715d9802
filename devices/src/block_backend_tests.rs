use std::os::fd::AsRawFd;

use clap::error::ErrorKind;
use clap::CommandFactory;

use crate::vu_socket::SocketSource;

use super::*;

fn parse(args: &[&str]) -> Result<BlockOptions, clap::Error> {
    let argv = ["skiff-blk", "--socket", "/s.sock"].iter().chain(args);
    BlkArgs::try_parse_from(argv).map(BlockOptions::from)
}

#[test]
fn image_by_path_or_by_fd() {
    BlkArgs::command().debug_assert();
    let o = parse(&["--image", "/a.img", "--read-only"]).unwrap();
    assert_eq!(o.image, ImageSource::Path("/a.img".into()));
    assert!(o.disk.read_only);
    let o = parse(&["--image-fd", "7", "--direct", "--metrics-fd", "9"]).unwrap();
    assert_eq!(o.image, ImageSource::Fd(7));
    assert!(o.disk.direct);
    check_options(&o).unwrap();
}

#[test]
fn image_options_are_exclusive_and_required() {
    let e = parse(&["--image", "/a.img", "--image-fd", "5"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
    assert!(
        e.to_string()
            .contains("'--image <PATH>' cannot be used with '--image-fd <N>'"),
        "{e}"
    );
    let e = parse(&[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    assert!(
        e.to_string().contains("<--image <PATH>|--image-fd <N>>"),
        "{e}"
    );
    for bad in ["x", "-1"] {
        let e = parse(&["--image-fd", bad]).unwrap_err();
        assert!(e.to_string().contains("--image-fd <N>"), "{bad}: {e}");
    }
}

#[test]
fn socket_by_path_or_by_fd() {
    let o = parse(&["--image", "/a.img"]).unwrap();
    assert_eq!(o.socket, SocketSource::Path("/s.sock".into()));
    let argv = [
        "skiff-blk",
        "--socket-fd",
        "7",
        "--image-fd",
        "5",
        "--metrics-fd",
        "9",
    ];
    let o = BlockOptions::from(BlkArgs::try_parse_from(argv).unwrap());
    assert_eq!(o.socket, SocketSource::Fd(7));
    check_options(&o).unwrap();
}

#[test]
fn socket_options_are_exclusive_and_required() {
    let e = parse(&["--image", "/a.img", "--socket-fd", "5"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
    assert!(
        e.to_string()
            .contains("'--socket <PATH>' cannot be used with '--socket-fd <N>'"),
        "{e}"
    );
    let e = BlkArgs::try_parse_from(["skiff-blk", "--image", "/a.img"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    assert!(
        e.to_string().contains("<--socket <PATH>|--socket-fd <N>>"),
        "{e}"
    );
    for bad in ["x", "-1"] {
        let e = BlkArgs::try_parse_from(["skiff-blk", "--image", "/a", "--socket-fd", bad])
            .unwrap_err();
        assert!(e.to_string().contains("--socket-fd <N>"), "{bad}: {e}");
    }
}

#[test]
fn socket_fd_is_no_other_inherited_fd() {
    let check = |args: &[&str]| {
        let argv = ["skiff-blk", "--socket-fd", "5"].iter().chain(args);
        let o = BlockOptions::from(BlkArgs::try_parse_from(argv).unwrap());
        check_options(&o).map_err(|e| e.to_string())
    };
    assert_eq!(
        check(&["--image-fd", "5"]),
        Err("invalid --socket-fd 5: it is also the --image-fd".into())
    );
    assert_eq!(
        check(&["--image", "/a.img", "--metrics-fd", "5"]),
        Err("invalid --socket-fd 5: it is also the --metrics-fd".into())
    );
    assert_eq!(check(&["--image-fd", "6", "--metrics-fd", "7"]), Ok(()));
}

#[test]
fn help_documents_socket_fd() {
    let help = BlkArgs::command().render_long_help().to_string();
    for s in [
        "--socket <PATH>",
        "--socket-fd <N>",
        "AF_UNIX SOCK_STREAM",
        "FD_CLOEXEC",
    ] {
        assert!(help.contains(s), "{s} missing from --help:\n{help}");
    }
}

#[test]
fn run_refuses_a_socket_fd_that_is_not_a_socket_before_serving() {
    let image = vmm_sys_util::tempfile::TempFile::new().expect("image");
    let fd = image.as_file().as_raw_fd();
    let o = BlockOptions::from(
        BlkArgs::try_parse_from([
            "skiff-blk",
            "--socket-fd",
            &fd.to_string(),
            "--image",
            "/nonexistent.img",
        ])
        .unwrap(),
    );
    let e = run(&o).unwrap_err();
    assert_eq!(
        crate::error_chain(&e),
        format!(
            "--socket-fd {fd} ({}) is not a socket; a connected AF_UNIX SOCK_STREAM socket is needed (the frontend's end is the other one, e.g. of a socketpair)",
            image.as_path().display()
        )
    );
}

#[test]
fn image_fd_is_not_the_metrics_fd() {
    let o = parse(&["--image-fd", "5", "--metrics-fd", "5"]).unwrap();
    assert_eq!(
        check_options(&o).unwrap_err().to_string(),
        "invalid --image-fd 5: it is also the --metrics-fd"
    );
}

// --- Queue processing against a hostile guest -------------------------------------------

mod rings {
    use std::fs::File;
    use std::sync::Arc;

    use vhost_user_backend::{VhostUserBackend, VringT};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::tempfile::TempFile;

    use crate::block::BlockMetrics;
    use crate::block_backend::{BlockBackend, BlockVring};
    use crate::disk::{DiskImage, DiskOptions};
    use crate::inflight::InflightArea;
    use crate::metrics::MetricsPage;
    use crate::test_ring::{err_eventfd, eventfd_count, memory, within, Ring, BUFFERS};
    use crate::vu_proxy::InflightHost;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const QSIZE: u16 = 16;

    /// skiff-blk's queue 0 over a 64-sector image, with the ring's error eventfd set.
    struct Rig {
        _image: TempFile,
        mem: GuestMemoryMmap<()>,
        ring: Ring,
        backend: Arc<BlockBackend>,
        vring: BlockVring,
        err: File,
    }

    impl Rig {
        /// With `uring`, the queue's I/O goes through its io_uring (--io-engine io-uring).
        fn with(event_idx: bool, uring: bool) -> Self {
            let image = TempFile::new().expect("image");
            image.as_file().set_len(64 * 512).expect("size image");
            let disk = DiskImage::open(image.as_path(), &DiskOptions::default()).expect("open");
            let metrics = BlockMetrics::register(&MetricsPage::in_memory()).expect("counters");
            let (mem, atomic) = memory();
            let mut backend = BlockBackend::new(disk, 1, QSIZE, atomic.clone(), metrics);
            if uring {
                backend.use_io_uring().expect("io_uring");
            }
            let backend = Arc::new(backend);
            backend.set_event_idx(event_idx);
            let ring = Ring::new(&mem, 0, QSIZE);
            let vring: BlockVring = ring.vring(&atomic, event_idx);
            let (theirs, err) = err_eventfd();
            vring.set_err(Some(theirs));
            Rig {
                _image: image,
                mem,
                ring,
                backend,
                vring,
                err,
            }
        }

        /// A kick on queue 0, as the crate's worker delivers it.
        fn kick(&self) -> std::io::Result<()> {
            let (backend, vring) = (self.backend.clone(), self.vring.clone());
            within("handle_event", move || {
                backend.handle_event(0, EventSet::IN, &[vring], 0)
            })
        }

        /// What the frontend does to reset a ring: GET_VRING_BASE (stop), SET_VRING_BASE,
        /// SET_VRING_ADDR, SET_VRING_KICK (start).
        fn restart(&self, base: u16, used: u64) {
            self.vring.set_queue_ready(false);
            self.vring.set_queue_next_avail(base);
            self.vring
                .set_queue_info(self.ring.base, self.ring.avail(), used)
                .expect("addresses");
            let used_idx = self.vring.queue_used_idx().unwrap_or(0);
            self.vring.set_queue_next_used(used_idx);
            self.vring.set_queue_ready(true);
        }

        /// A 3-descriptor write request at descriptors head..head+2 writing `fill` at
        /// `sector`; returns its status byte's address.
        fn write_request(&self, head: u16, sector: u64, fill: u8) -> GuestAddress {
            let buf = BUFFERS + u64::from(head) * 0x1000;
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            hdr[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&hdr, GuestAddress(buf)).unwrap();
            self.mem
                .write_slice(&[fill; 512], GuestAddress(buf + 0x100))
                .unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(buf + 0x400))
                .unwrap();
            self.ring.desc(head, buf, 16, F_NEXT, head + 1);
            self.ring.desc(head + 1, buf + 0x100, 512, F_NEXT, head + 2);
            self.ring.desc(head + 2, buf + 0x400, 1, F_WRITE, 0);
            GuestAddress(buf + 0x400)
        }

        fn status(&self, at: GuestAddress) -> u8 {
            self.mem.read_obj(at).unwrap()
        }
    }

    #[test]
    fn an_avail_index_past_the_queue_size_breaks_the_ring_once() {
        for uring in [false, true] {
            avail_index_past_the_queue_size(uring);
        }
    }

    fn avail_index_past_the_queue_size(uring: bool) {
        let rig = Rig::with(true, uring);
        // 17 requests "available" in a ring of 16: virtio-queue refuses to iterate.
        rig.ring.set_avail_idx(QSIZE + 1);
        rig.kick().expect("a guest fault is no worker error");
        assert_eq!(eventfd_count(&rig.err), Some(1), "error eventfd");
        // Broken: further kicks touch nothing and signal nothing.
        rig.kick().expect("kick on a broken ring");
        assert_eq!(eventfd_count(&rig.err), None, "signalled once only");
        assert_eq!(rig.ring.used_idx(), 0);

        // The frontend resets the ring: it runs again.
        rig.ring.set_avail_idx(0);
        rig.restart(0, rig.ring.used());
        let status = rig.write_request(0, 1, 0xab);
        rig.ring.push(0);
        rig.kick().expect("kick");
        assert_eq!(rig.ring.used_idx(), 1);
        assert_eq!(rig.status(status), VIRTIO_BLK_S_OK as u8);
        assert_eq!(eventfd_count(&rig.err), None);
    }

    #[test]
    fn a_head_beyond_the_queue_size_breaks_the_ring_not_the_worker() {
        for (event_idx, uring) in [(false, false), (true, false), (false, true), (true, true)] {
            let rig = Rig::with(event_idx, uring);
            rig.ring.push(QSIZE);
            rig.kick()
                .expect("a guest fault must not end the worker thread");
            assert_eq!(eventfd_count(&rig.err), Some(1), "error eventfd");
            rig.kick().expect("kick on a broken ring");
            assert_eq!(eventfd_count(&rig.err), None, "signalled once only");

            rig.restart(1, rig.ring.used());
            let status = rig.write_request(3, 2, 0xcd);
            rig.ring.push(3);
            rig.kick().expect("kick");
            assert_eq!(rig.ring.used_idx(), 1);
            assert_eq!(rig.ring.used_elem(0), (3, 1));
            assert_eq!(rig.status(status), VIRTIO_BLK_S_OK as u8);
        }
    }

    #[test]
    fn a_used_ring_outside_guest_memory_breaks_the_ring() {
        let outside = crate::test_ring::MEM_SIZE as u64 + 0x1000;
        // Completing the request fails; and with an inflight area, resubmission cannot read
        // the used index either.
        for (with_area, uring) in [(false, false), (true, false), (false, true), (true, true)] {
            let rig = Rig::with(false, uring);
            if with_area {
                let area = InflightArea::create(1, QSIZE, 1).expect("area");
                rig.backend.set_inflight(Arc::new(area));
            }
            rig.vring
                .set_queue_info(rig.ring.base, rig.ring.avail(), outside)
                .expect("addresses");
            rig.write_request(0, 1, 0x11);
            rig.ring.push(0);
            rig.kick()
                .expect("a guest fault must not end the worker thread");
            assert_eq!(eventfd_count(&rig.err), Some(1), "error eventfd");
        }
    }

    /// A request of 2 descriptors (header, status): a flush.
    fn flush_request(rig: &Rig, head: u16) -> GuestAddress {
        let buf = BUFFERS + u64::from(head) * 0x1000;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        rig.mem.write_slice(&hdr, GuestAddress(buf)).unwrap();
        rig.mem
            .write_obj(0xffu8, GuestAddress(buf + 0x400))
            .unwrap();
        rig.ring.desc(head, buf, 16, F_NEXT, head + 1);
        rig.ring.desc(head + 1, buf + 0x400, 1, F_WRITE, 0);
        GuestAddress(buf + 0x400)
    }

    /// A read of one sector into the head's buffer; returns (data, status) addresses.
    fn read_request(rig: &Rig, head: u16, sector: u64) -> (GuestAddress, GuestAddress) {
        let buf = BUFFERS + u64::from(head) * 0x1000;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        rig.mem.write_slice(&hdr, GuestAddress(buf)).unwrap();
        rig.mem
            .write_obj(0xffu8, GuestAddress(buf + 0x400))
            .unwrap();
        rig.ring.desc(head, buf, 16, F_NEXT, head + 1);
        rig.ring
            .desc(head + 1, buf + 0x200, 512, F_NEXT | F_WRITE, head + 2);
        rig.ring.desc(head + 2, buf + 0x400, 1, F_WRITE, 0);
        (GuestAddress(buf + 0x200), GuestAddress(buf + 0x400))
    }

    #[test]
    fn io_uring_serves_a_batch_with_a_flush_in_it_and_clears_the_inflight_area() {
        for event_idx in [false, true] {
            let rig = Rig::with(event_idx, true);
            let area = Arc::new(InflightArea::create(1, QSIZE, 1).expect("area"));
            rig.backend.set_inflight(area.clone());
            // Two writes, a flush, a write: one kick.
            let s0 = rig.write_request(0, 1, 0xa1);
            let s1 = rig.write_request(3, 2, 0xa2);
            let s2 = flush_request(&rig, 6);
            let s3 = rig.write_request(8, 3, 0xa3);
            for h in [0, 3, 6, 8] {
                rig.ring.push(h);
            }
            rig.kick().expect("kick");
            assert_eq!(rig.ring.used_idx(), 4, "every request completed");
            for s in [s0, s1, s2, s3] {
                assert_eq!(rig.status(s), VIRTIO_BLK_S_OK as u8);
            }
            // The flush waited for the writes before it.
            let used: Vec<u32> = (0..4).map(|i| rig.ring.used_elem(i).0).collect();
            let flush_at = used.iter().position(|&h| h == 6).expect("flush used");
            for h in [0, 3] {
                let at = used.iter().position(|&x| x == h).expect("write used");
                assert!(
                    at < flush_at,
                    "write {h} completed after the flush: {used:?}"
                );
            }
            // Read the sectors back through the ring.
            let (d0, r0) = read_request(&rig, 11, 2);
            rig.ring.push(11);
            rig.kick().expect("kick");
            assert_eq!(rig.ring.used_idx(), 5);
            assert_eq!(rig.status(r0), VIRTIO_BLK_S_OK as u8);
            assert_eq!(rig.ring.used_elem(4), (11, 513));
            let mut back = [0u8; 512];
            rig.mem.read_slice(&mut back, d0).unwrap();
            assert!(back.iter().all(|&b| b == 0xa2));
            // Nothing left for a successor to resubmit.
            let q = area.queue(0).expect("queue 0");
            assert!(q.recover(rig.ring.used_idx()).is_empty());
        }
    }

    #[test]
    fn io_uring_fails_a_read_past_the_image_like_the_sync_path() {
        let rig = Rig::with(false, true);
        let (_, st) = read_request(&rig, 0, 64);
        rig.ring.push(0);
        rig.kick().expect("kick");
        assert_eq!(rig.ring.used_idx(), 1);
        assert_eq!(rig.status(st), VIRTIO_BLK_S_IOERR as u8);
    }
}

use super::*;
use crate::vu_socket::SocketSource;

#[test]
fn mac_parsing() {
    assert_eq!(
        parse_mac("52:54:00:ab:CD:ef"),
        Ok([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
    );
    assert!(parse_mac("52:54:00:ab:cd").is_err());
    assert!(parse_mac("52:54:00:ab:cd:zz").is_err());
    assert!(parse_mac("525:4:00:ab:cd:ef").is_err());
}

fn parse(args: &[&str]) -> Result<NetOptions, clap::Error> {
    let argv = ["skiff-net", "--socket", "/s.sock"].iter().chain(args);
    NetArgs::try_parse_from(argv).map(NetOptions::from)
}

#[test]
fn taps_by_name_or_by_fd() {
    use clap::CommandFactory;
    NetArgs::command().debug_assert();
    let o = parse(&["--tap", "t0", "--tap", "t1", "--mac", "52:54:00:00:00:01"]).unwrap();
    assert_eq!(
        o.taps,
        [TapSpec::Name("t0".into()), TapSpec::Name("t1".into())]
    );
    let o = parse(&["--tap-fd", "7", "--tap-fd", "5", "--metrics-fd", "9"]).unwrap();
    assert_eq!(o.taps, [TapSpec::Fd(7), TapSpec::Fd(5)]);
    assert_eq!(o.metrics_fd, Some(9));
    check_taps(&o.taps, o.metrics_fd, o.socket.fd()).unwrap();
}

#[test]
fn tap_options_are_exclusive_and_required() {
    use clap::error::ErrorKind;
    let e = parse(&["--tap", "t0", "--tap-fd", "5"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
    let msg = e.to_string();
    assert!(
        msg.contains("'--tap <NAME>' cannot be used with '--tap-fd <N>'"),
        "{msg}"
    );

    let e = parse(&[]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    assert!(e.to_string().contains("<--tap <NAME>|--tap-fd <N>>"), "{e}");

    for bad in ["x", "-1"] {
        let e = parse(&["--tap-fd", bad]).unwrap_err();
        assert!(e.to_string().contains("--tap-fd <N>"), "{bad}: {e}");
    }
}

#[test]
fn tap_list_is_checked_naming_the_option() {
    let err = |taps: &[TapSpec], metrics: Option<RawFd>| {
        check_taps(taps, metrics, None).unwrap_err().to_string()
    };
    let fds: Vec<TapSpec> = (3..3 + MAX_PAIRS as RawFd + 1).map(TapSpec::Fd).collect();
    assert_eq!(
        err(&fds, None),
        "invalid number of --tap-fd (17, at most 16)"
    );
    check_taps(&fds[..MAX_PAIRS], None, None).unwrap();
    let names: Vec<TapSpec> = (0..=MAX_PAIRS)
        .map(|i| TapSpec::Name(format!("t{i}")))
        .collect();
    assert_eq!(
        err(&names, None),
        "invalid number of --tap (17, at most 16)"
    );
    assert!(err(&[], None).contains("--tap NAME or --tap-fd N"));
    assert_eq!(
        err(&[TapSpec::Fd(5), TapSpec::Fd(6), TapSpec::Fd(5)], None),
        "invalid --tap-fd 5: given twice (one fd per TAP)"
    );
    assert_eq!(
        err(&[TapSpec::Fd(5)], Some(5)),
        "invalid --tap-fd 5: it is also the --metrics-fd"
    );
    assert_eq!(
        err(&[TapSpec::Name("t0".into()), TapSpec::Fd(5)], None),
        "invalid --tap-fd 5: the TAPs are given either by --tap NAME or by --tap-fd N, not both"
    );
}

#[test]
fn socket_by_path_or_by_fd() {
    use clap::error::ErrorKind;
    let o = parse(&["--tap", "t0"]).unwrap();
    assert_eq!(o.socket, SocketSource::Path("/s.sock".into()));
    let o = NetOptions::from(
        NetArgs::try_parse_from(["skiff-net", "--socket-fd", "4", "--tap-fd", "5"]).unwrap(),
    );
    assert_eq!(o.socket, SocketSource::Fd(4));
    check_taps(&o.taps, o.metrics_fd, o.socket.fd()).unwrap();

    let e = parse(&["--tap", "t0", "--socket-fd", "4"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ArgumentConflict);
    assert!(
        e.to_string()
            .contains("'--socket <PATH>' cannot be used with '--socket-fd <N>'"),
        "{e}"
    );
    let e = NetArgs::try_parse_from(["skiff-net", "--tap", "t0"]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    assert!(
        e.to_string().contains("<--socket <PATH>|--socket-fd <N>>"),
        "{e}"
    );
}

#[test]
fn socket_fd_is_no_other_inherited_fd() {
    let err = |taps: &[TapSpec], metrics: Option<RawFd>, socket: RawFd| {
        check_taps(taps, metrics, Some(socket)).map_err(|e| e.to_string())
    };
    assert_eq!(
        err(&[TapSpec::Fd(5), TapSpec::Fd(6)], None, 6),
        Err("invalid --socket-fd 6: it is also a --tap-fd".into())
    );
    assert_eq!(
        err(&[TapSpec::Fd(5)], Some(7), 7),
        Err("invalid --socket-fd 7: it is also the --metrics-fd".into())
    );
    assert_eq!(err(&[TapSpec::Fd(5)], Some(7), 8), Ok(()));
    assert_eq!(err(&[TapSpec::Name("t0".into())], None, 5), Ok(()));
}

#[test]
fn run_refuses_a_socket_fd_that_is_not_a_socket_before_opening_taps() {
    let file = vmm_sys_util::tempfile::TempFile::new().expect("temp file");
    let fd = file.as_file().as_raw_fd();
    let opts = NetOptions::from(
        NetArgs::try_parse_from([
            "skiff-net",
            "--socket-fd",
            &fd.to_string(),
            "--tap-fd",
            "65000",
        ])
        .unwrap(),
    );
    let e = run(&opts).unwrap_err();
    assert_eq!(
        crate::error_chain(&e),
        format!(
            "--socket-fd {fd} ({}) is not a socket; a connected AF_UNIX SOCK_STREAM socket is needed (the frontend's end is the other one, e.g. of a socketpair)",
            file.as_path().display()
        )
    );
}

#[test]
fn run_refuses_a_bad_tap_fd_before_serving() {
    let opts = parse(&["--tap-fd", "65000"]).unwrap();
    let e = run(&opts).unwrap_err();
    assert_eq!(
        crate::error_chain(&e),
        format!(
            "--tap-fd 65000 is not an open file descriptor: {}",
            io::Error::from_raw_os_error(libc::EBADF)
        )
    );
}

#[test]
fn help_documents_tap_fd() {
    use clap::CommandFactory;
    let help = NetArgs::command().render_long_help().to_string();
    for s in [
        "--tap-fd <N>",
        "IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
        "TUNGETIFF",
        "--tap <NAME>",
        "--socket <PATH>",
        "--socket-fd <N>",
        "AF_UNIX SOCK_STREAM",
    ] {
        assert!(help.contains(s), "{s} missing from --help:\n{help}");
    }
}

// --- Queue processing against a hostile guest -------------------------------------------

mod rings {
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;

    use vhost_user_backend::{VhostUserBackend, VringT};
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;

    use crate::backend_common::Mem;
    use crate::metrics::MetricsPage;
    use crate::net::NetMetrics;
    use crate::net_backend::{NetBackend, NetVring};
    use crate::test_ring::{err_eventfd, eventfd_count, memory, within, Ring, BUFFERS};
    use tapdev::{Tap, VNET_HDR_LEN};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    const QSIZE: u16 = 16;

    /// skiff-net with `pairs` queue pairs over datagram sockets; the rings of pair 0 (and
    /// the control queue) with their error eventfds set.
    struct Rig {
        mem: GuestMemoryMmap<()>,
        backend: Arc<NetBackend>,
        pairs: usize,
        /// The far ends of the "TAPs".
        peers: Vec<UnixDatagram>,
        /// rx, tx, ctrl.
        rings: Vec<Ring>,
        vrings: Vec<NetVring>,
        errs: Vec<File>,
    }

    impl Rig {
        fn new(pairs: usize, event_idx: bool) -> Self {
            let (mem, atomic): (GuestMemoryMmap<()>, Mem) = memory();
            let mut taps = Vec::new();
            let mut peers = Vec::new();
            for i in 0..pairs {
                let (tap, peer) = UnixDatagram::pair().expect("socketpair");
                tap.set_nonblocking(true).expect("nonblocking");
                taps.push(Tap::for_tests(
                    File::from(OwnedFd::from(tap)),
                    &format!("t{i}"),
                ));
                peers.push(peer);
            }
            let metrics = NetMetrics::register(&MetricsPage::in_memory()).expect("counters");
            let backend = Arc::new(NetBackend::new(taps, None, QSIZE, atomic.clone(), metrics));
            backend.set_event_idx(event_idx);
            let mut rings = Vec::new();
            let mut vrings = Vec::new();
            let mut errs = Vec::new();
            for q in 0..3u64 {
                let ring = Ring::new(&mem, q * 0x4000, QSIZE);
                let vring: NetVring = ring.vring(&atomic, event_idx);
                let (theirs, err) = err_eventfd();
                vring.set_err(Some(theirs));
                rings.push(ring);
                vrings.push(vring);
                errs.push(err);
            }
            Rig {
                mem,
                backend,
                pairs,
                peers,
                rings,
                vrings,
                errs,
            }
        }

        /// Event `event` on worker `thread` (0 = rx kick, 1 = tx kick, tap_event() = TAP; the
        /// control queue's worker is thread `pairs`).
        fn event(&self, thread: usize, event: u16, set: EventSet) -> std::io::Result<()> {
            let backend = self.backend.clone();
            let vrings: Vec<NetVring> = if thread == 0 {
                self.vrings[..2].to_vec()
            } else {
                vec![self.vrings[2].clone()]
            };
            within("handle_event", move || {
                backend.handle_event(event, set, &vrings, thread)
            })
        }

        fn kick(&self, queue: usize) -> std::io::Result<()> {
            match queue {
                0 | 1 => self.event(0, queue as u16, EventSet::IN),
                _ => self.event(self.pairs, 0, EventSet::IN),
            }
        }
    }

    #[test]
    fn an_avail_index_past_the_queue_size_breaks_rx_and_tx_once() {
        for event_idx in [false, true] {
            for queue in [0usize, 1] {
                let rig = Rig::new(1, event_idx);
                rig.rings[queue].set_avail_idx(QSIZE + 1);
                rig.kick(queue).expect("a guest fault is no worker error");
                assert_eq!(
                    eventfd_count(&rig.errs[queue]),
                    Some(1),
                    "queue {queue}, event_idx {event_idx}"
                );
                // A frame arriving on the TAP does not wake the broken rx ring either.
                rig.peers[0].send(&[0u8; 64]).expect("send");
                let tap = rig.backend.tap_event();
                rig.event(0, tap, EventSet::IN | EventSet::OUT)
                    .expect("TAP event");
                rig.kick(queue).expect("kick on a broken ring");
                assert_eq!(eventfd_count(&rig.errs[queue]), None, "signalled once");
                assert_eq!(rig.rings[queue].used_idx(), 0);
            }
        }
    }

    #[test]
    fn a_head_beyond_the_queue_size_breaks_the_ring_not_the_worker() {
        // rx, tx and the control queue complete whatever chain they pop.
        for queue in [0usize, 1, 2] {
            let rig = Rig::new(2, false);
            rig.rings[queue].push(QSIZE);
            rig.kick(queue)
                .expect("a guest fault must not end the worker thread");
            assert_eq!(eventfd_count(&rig.errs[queue]), Some(1), "queue {queue}");
            rig.kick(queue).expect("kick on a broken ring");
            assert_eq!(eventfd_count(&rig.errs[queue]), None, "signalled once");
        }
    }

    #[test]
    fn an_rx_chain_of_more_buffers_than_readv_takes_does_not_stall_rx() {
        let rig = Rig::new(1, false);
        let rx = &rig.rings[0];
        // Chain 0: an indirect table of 1100 writable 64-byte buffers.
        let table = BUFFERS;
        let n = 1100u16;
        for i in 0..n {
            let flags = if i + 1 < n { F_WRITE | F_NEXT } else { F_WRITE };
            let at = GuestAddress(table + 16 * u64::from(i));
            let addr = BUFFERS + 0x10_0000 + 64 * u64::from(i);
            rig.mem.write_obj(addr, at).unwrap();
            rig.mem.write_obj(64u32, at.unchecked_add(8)).unwrap();
            rig.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            rig.mem.write_obj(i + 1, at.unchecked_add(14)).unwrap();
        }
        rx.desc(0, table, 16 * u32::from(n), F_INDIRECT, 0);
        // Chain 1: one 2048-byte buffer.
        rx.desc(1, BUFFERS + 0x8_0000, 2048, F_WRITE, 0);
        rx.push(0);
        rx.push(1);
        let frame = vec![7u8; VNET_HDR_LEN + 100];
        rig.peers[0].send(&frame).expect("send");
        rig.kick(0).expect("rx kick");
        assert_eq!(rx.used_idx(), 2, "rx stalled on the long chain");
        assert_eq!(rx.used_elem(0), (0, 0), "the long chain is returned unused");
        assert_eq!(rx.used_elem(1), (1, frame.len() as u32));
        assert_eq!(eventfd_count(&rig.errs[0]), None);
    }
}

// --- Serving an inherited connection through the relay ----------------------------------

mod connected {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::sync::Arc;
    use std::time::Duration;

    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    use vhost_user_backend::VhostUserDaemon;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    use crate::metrics::MetricsPage;
    use crate::net::NetMetrics;
    use crate::net_backend::NetBackend;
    use crate::vu_proxy::{self, ProxyError};
    use crate::vu_socket::FrontendSocket;
    use tapdev::Tap;

    const GET_INFLIGHT_FD: u32 = 31;
    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;

    /// skiff-net with two queue pairs (over datagram sockets) serving `theirs`, the
    /// backend's end of a socketpair, as `run` does with `--socket-fd`.
    fn serve(theirs: UnixStream) -> std::thread::JoinHandle<Result<(), ProxyError>> {
        std::thread::spawn(move || {
            let mut taps = Vec::new();
            let mut peers = Vec::new();
            for i in 0..2 {
                let (tap, peer) = UnixDatagram::pair().expect("socketpair");
                tap.set_nonblocking(true).expect("nonblocking");
                taps.push(Tap::for_tests(
                    File::from(OwnedFd::from(tap)),
                    &format!("t{i}"),
                ));
                peers.push(peer);
            }
            let metrics = NetMetrics::register(&MetricsPage::in_memory()).expect("counters");
            let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let backend = Arc::new(NetBackend::new(taps, None, 256, mem.clone(), metrics));
            let mut daemon =
                VhostUserDaemon::new("skiff-net".into(), backend, mem).expect("daemon");
            vu_proxy::serve(FrontendSocket::Connected(theirs), &mut daemon, None)
        })
    }

    fn join(server: std::thread::JoinHandle<Result<(), ProxyError>>) {
        for _ in 0..500 {
            if server.is_finished() {
                let r = server.join().expect("the serving thread panicked");
                r.expect("serve ends cleanly when the frontend leaves");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("serve did not return within 5 s of the frontend leaving");
    }

    #[test]
    fn a_socketpair_end_is_served_without_an_inflight_area() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let server = serve(theirs);
        let mut f = Frontend::from_stream(ours.try_clone().expect("clone"), 5);
        f.set_owner().expect("SET_OWNER");
        let features = f.get_features().expect("GET_FEATURES");
        assert_eq!(
            features & (VERSION_1 | PROTOCOL_FEATURES),
            VERSION_1 | PROTOCOL_FEATURES
        );
        let proto = f.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
        assert!(
            !proto.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
            "skiff-net offers no inflight area: {proto:?}"
        );
        let want = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        assert!(proto.contains(want), "{proto:?}");
        f.set_protocol_features(want)
            .expect("SET_PROTOCOL_FEATURES");
        // Two pairs and the control queue.
        assert_eq!(f.get_queue_num().expect("GET_QUEUE_NUM"), 5);
        drop(f);
        drop(ours);
        join(server);
    }

    #[test]
    fn inflight_messages_go_to_the_crate_which_refuses_them() {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        ours.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let server = serve(theirs);
        let f = Frontend::from_stream(ours.try_clone().expect("clone"), 5);
        f.set_owner().expect("SET_OWNER");
        f.get_features().expect("GET_FEATURES");
        // GET_INFLIGHT_FD, by hand (the vhost crate's frontend will not send it without the
        // feature): 24 bytes of VhostUserInflight asking for one queue of 256.
        let mut msg = Vec::new();
        msg.extend_from_slice(&GET_INFLIGHT_FD.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&24u32.to_le_bytes());
        msg.extend_from_slice(&[0u8; 16]);
        msg.extend_from_slice(&1u16.to_le_bytes());
        msg.extend_from_slice(&256u16.to_le_bytes());
        msg.extend_from_slice(&[0u8; 4]);
        (&ours).write_all(&msg).expect("send GET_INFLIGHT_FD");
        // The crate does not answer it and ends the connection, as it would have unrelayed.
        let mut buf = [0u8; 64];
        let n = (&ours)
            .read(&mut buf)
            .expect("the connection ends, no timeout");
        assert_eq!(n, 0, "an answer to GET_INFLIGHT_FD: {:?}", &buf[..n]);
        drop(f);
        join(server);
    }
}

//! `--socket-fd` as a process: skiff-blk serves a write request over one end of a
//! socketpair it inherited (no socket path at all) and exits when the frontend hangs up;
//! both backends refuse an fd that is not a connected AF_UNIX stream socket, naming the
//! option, and require exactly one of `--socket` and `--socket-fd`.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;

mod common;
use common::frontend::{
    guest_memory, negotiate, start_ring, status, write_request, AVAIL, BLK_BIN, QSIZE, USED,
};
use common::{command_with_fds, ChildGuard};

const NET_BIN: &str = env!("CARGO_BIN_EXE_skiff-net");

/// Runs `bin args...` with `fd` inherited as 100: exit code and stderr.
fn run(bin: &str, args: &[&str], fd: Option<i32>) -> (i32, String) {
    let fds: Vec<(i32, i32)> = fd.map(|f| (f, 100)).into_iter().collect();
    let out = command_with_fds(bin, args, &fds)
        .output()
        .expect("run the device process");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether fd `fd` of process `pid` is close-on-exec (/proc/PID/fdinfo/FD `flags`, octal).
fn cloexec_in(pid: u32, fd: i32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).expect("fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .expect("flags line");
    flags & libc::O_CLOEXEC as u32 != 0
}

#[test]
fn skiff_blk_serves_a_request_over_an_inherited_socketpair() {
    let dir = TempDir::new().expect("tempdir");
    let image = dir.as_path().join("disk.img");
    File::create(&image)
        .and_then(|f| f.set_len(64 * 512))
        .expect("image");
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    ours.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let qsize = QSIZE.to_string();
    let args = [
        "--socket-fd",
        "100",
        "--image",
        image.to_str().expect("utf-8 path"),
        "--queue-size",
        &qsize,
    ];
    let child = command_with_fds(BLK_BIN, &args, &[(theirs.as_raw_fd(), 100)])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn skiff-blk");
    // Only the child holds its end now: when it exits, the frontend sees the end.
    drop(theirs);
    let mut child = ChildGuard(child);

    let mem = guest_memory();
    let mut f = negotiate(
        Frontend::from_stream(ours, 1),
        &mem,
        0,
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK,
    );
    assert!(
        cloexec_in(child.0.id(), 100),
        "skiff-blk did not set FD_CLOEXEC on --socket-fd"
    );
    let call = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    start_ring(&mut f, &mem, 0, &call, &kick);
    write_request(&mem, 0, 5, 0x5c);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).expect("avail");
    mem.write_obj(1u16, GuestAddress(AVAIL + 2))
        .expect("avail idx");
    kick.write(1).expect("kick");
    let deadline = Instant::now() + Duration::from_secs(10);
    while mem
        .read_obj::<u16>(GuestAddress(USED + 2))
        .expect("used idx")
        != 1
    {
        assert!(Instant::now() < deadline, "the request was not completed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(status(&mem, 0), 0, "VIRTIO_BLK_S_OK");
    let mut sector = [0u8; 512];
    File::open(&image)
        .and_then(|f| f.read_exact_at(&mut sector, 5 * 512))
        .expect("read image");
    assert_eq!(sector, [0x5c; 512]);

    // The frontend hangs up: skiff-blk exits 0.
    drop(f);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.0.try_wait().expect("try_wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "skiff-blk did not exit");
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "skiff-blk: {status}: {err}");
}

#[test]
fn a_socket_fd_that_is_no_connected_unix_stream_is_refused() {
    let file = vmm_sys_util::tempfile::TempFile::new().expect("temp file");
    let path = file.as_path().display().to_string();
    let need = "a connected AF_UNIX SOCK_STREAM socket is needed";
    let cases: [(&str, &[&str]); 2] = [
        (
            BLK_BIN,
            &["--socket-fd", "100", "--image", "/nonexistent.img"],
        ),
        (NET_BIN, &["--socket-fd", "100", "--tap-fd", "101"]),
    ];
    for (bin, args) in cases {
        let name = if bin == BLK_BIN {
            "skiff-blk"
        } else {
            "skiff-net"
        };
        let (code, err) = run(bin, args, Some(file.as_file().as_raw_fd()));
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!(
                "{name}: --socket-fd 100 ({path}) is not a socket; {need}"
            )),
            "{err}"
        );
        let (d, _peer) = std::os::unix::net::UnixDatagram::pair().expect("datagram pair");
        let (code, err) = run(bin, args, Some(d.as_raw_fd()));
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!(
                "{name}: --socket-fd 100 is an AF_UNIX SOCK_DGRAM socket; {need}"
            )),
            "{err}"
        );
        let (code, err) = run(bin, args, None);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains(&format!(
                "{name}: --socket-fd 100 is not an open file descriptor"
            )),
            "{err}"
        );
    }
}

#[test]
fn socket_and_socket_fd_are_exclusive_and_required() {
    for (bin, rest) in [(BLK_BIN, ["--image", "/a.img"]), (NET_BIN, ["--tap", "t0"])] {
        let mut both = vec!["--socket", "/s.sock", "--socket-fd", "5"];
        both.extend(rest);
        let (code, err) = run(bin, &both, None);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("'--socket <PATH>' cannot be used with '--socket-fd <N>'"),
            "{err}"
        );
        let (code, err) = run(bin, &rest, None);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("<--socket <PATH>|--socket-fd <N>>"), "{err}");
    }
    let (code, err) = run(NET_BIN, &["--socket-fd", "5", "--tap-fd", "5"], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-net: invalid --socket-fd 5: it is also a --tap-fd"),
        "{err}"
    );
    let (code, err) = run(BLK_BIN, &["--socket-fd", "5", "--image-fd", "5"], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("skiff-blk: invalid --socket-fd 5: it is also the --image-fd"),
        "{err}"
    );
}

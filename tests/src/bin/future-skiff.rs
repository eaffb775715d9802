//! Stands in for a skiff from the future in the VMM-upgrade test
//! (`jailed_vmm_upgrades_under_io` in tests/tests/jail/vmm_upgrade.rs): started by
//! skiff-jailer's supervisor as the new VMM (`--handover-fd N`), it says the hand-over hello
//! of a build that reads only state versions 90 to 99, which no skiff writes, then waits
//! for the running VMM to hang up (or 30 s) and exits 0. The running VMM must refuse it and
//! keep the guest.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(fd) = args
        .iter()
        .position(|a| a == "--handover-fd")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse::<i32>().ok())
    else {
        eprintln!("future-skiff: no --handover-fd N");
        std::process::exit(2);
    };
    // SAFETY: the supervisor put the hand-over socket at this number for us alone.
    let mut s = unsafe { UnixStream::from_raw_fd(fd) };
    if let Err(e) = s.write_all(b"SKIFF-HANDOVER 90 99\n") {
        eprintln!("future-skiff: hello: {e}");
        std::process::exit(1);
    }
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut sink = [0u8; 4096];
    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
}

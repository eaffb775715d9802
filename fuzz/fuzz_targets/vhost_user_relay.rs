//! The vhost-user message reader of skiff-blk's relay (the first code a frontend's bytes
//! reach): any byte stream gives messages, an error or the end, never a panic or an
//! allocation of what a header's size field claims.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use devices::vu_proxy::read_message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((mut front, relay)) = UnixStream::pair() else {
        return;
    };
    // The socket buffer holds far more than the largest input libFuzzer makes here.
    if front.write_all(data).is_err() {
        return;
    }
    drop(front);
    for _ in 0..1024 {
        match read_message(&relay) {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});

//! The API server's HTTP/1.1 framing (request heads, Content-Length, chunked bodies,
//! 100-continue, pipelining) on any byte stream: requests or a refusal, never a panic, and
//! never more memory than the limits (8 KiB heads, 51200-byte bodies).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = api_server::server::read_requests(data);
});

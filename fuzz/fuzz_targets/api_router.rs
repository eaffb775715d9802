//! The API router and every JSON body it parses: any method, path and body give an answer
//! or a fault, never a panic.
//!
//! Input: first byte picks the method, then the path up to the first NUL, then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

const METHODS: &[&str] = &["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "put", ""];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[usize::from(m) % METHODS.len()];
    let (path, body) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let path = String::from_utf8_lossy(path);
    let _ = api_server::router::resolve(method, &path);
    let _ = api_server::router::route(method, &path, body);
});

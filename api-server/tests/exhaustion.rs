//! A hostile client must not exhaust the VMM: under each attack the server holds at most
//! [`MAX_CONNECTIONS`] threads and [`MAX_CONNECTIONS`] + [`MAX_WAITING`] fds more than at
//! the baseline and falls back to it when the attackers go away, refused requests get
//! their 4xx and a closed connection, and a well-behaved client is answered within a
//! second while the attack runs.
//!
//! The counts are the test process's own (`/proc/self/fd`, `/proc/self/task`): the server
//! runs in it, so every check adds the fds and threads the test itself holds for its
//! attackers. The scenarios hold one lock, so that no other test of this file runs beside
//! the one measuring.

#[allow(dead_code)] // shared with tests/server.rs, which uses all of it
mod common;

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use api_server::client::ApiClient;
use api_server::server::{MAX_CONNECTIONS, MAX_WAITING};
use common::Harness;

/// Spare fds and threads beyond the server's bound (the lock's waiting test thread,
/// `read_dir`'s own fd, a connection thread about to exit).
const SLACK: usize = 6;
/// How long the server may take to release a connection whose client went away: a
/// refused request's lingering close, the exit of a connection thread.
const SETTLE: Duration = Duration::from_secs(5);

fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Open fds and threads of this process.
#[derive(Clone, Copy, Debug)]
struct Counts {
    fds: usize,
    threads: usize,
}

fn counts() -> Counts {
    let n = |dir| fs::read_dir(dir).map(|d| d.count()).unwrap_or(usize::MAX);
    Counts {
        fds: n("/proc/self/fd"),
        threads: n("/proc/self/task"),
    }
}

/// A server with a fake VMM, warmed up by one request, and its baseline.
fn start(name: &str) -> (Harness, Counts) {
    let h = Harness::start(name);
    good_client(&h.socket);
    thread::sleep(Duration::from_millis(100));
    (h, counts())
}

/// A fresh client's `GET /` is answered within a second.
fn good_client(socket: &Path) -> Duration {
    let start = Instant::now();
    let mut c = ApiClient::new(socket).with_timeout(Duration::from_secs(1));
    let info = c.instance_info();
    let took = start.elapsed();
    assert!(
        info.is_ok() && took < Duration::from_secs(1),
        "a well-behaved GET / got {info:?} after {took:?}"
    );
    took
}

/// Asserts that the server holds at most `MAX_CONNECTIONS` more threads and
/// `MAX_CONNECTIONS + MAX_WAITING` more fds than at `base`, besides the `fds` and
/// `threads` the test holds itself.
fn assert_bounded(what: &str, base: Counts, fds: usize, threads: usize) -> Counts {
    let now = counts();
    let fd_limit = base.fds + fds + MAX_CONNECTIONS + MAX_WAITING + SLACK;
    let thread_limit = base.threads + threads + MAX_CONNECTIONS + SLACK;
    eprintln!(
        "{what}: fds {} (baseline {}, test holds {fds}, limit {fd_limit}), threads {} \
         (baseline {}, test holds {threads}, limit {thread_limit})",
        now.fds, base.fds, now.threads, base.threads
    );
    assert!(
        now.fds <= fd_limit && now.threads <= thread_limit,
        "{what}: {now:?} against baseline {base:?}"
    );
    now
}

/// Waits until the counts are back within `SLACK` of `base`.
fn assert_settles(what: &str, base: Counts) {
    let start = Instant::now();
    let mut now = counts();
    while (now.fds > base.fds + SLACK || now.threads > base.threads + SLACK)
        && start.elapsed() < SETTLE
    {
        thread::sleep(Duration::from_millis(20));
        now = counts();
    }
    eprintln!(
        "{what}, after the clients went away: fds {} threads {} (baseline {} / {}) after {:?}",
        now.fds,
        now.threads,
        base.fds,
        base.threads,
        start.elapsed()
    );
    assert!(
        now.fds <= base.fds + SLACK && now.threads <= base.threads + SLACK,
        "{what}: still {now:?} {SETTLE:?} after the clients went away (baseline {base:?})"
    );
}

/// Everything the server sends until it closes the connection; an error if it does not
/// close within `limit`.
fn read_until_closed(s: &mut UnixStream, limit: Duration) -> Result<String, String> {
    s.set_read_timeout(Some(limit)).expect("set a read timeout");
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            // A server that closes with unread input resets the connection: closed too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                return Err(format!(
                    "not closed within {limit:?} ({e}); got {:?}",
                    String::from_utf8_lossy(&out)
                ))
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// (a) Connections opened and left idle.
#[test]
fn idle_connections() {
    let _g = serial();
    let (h, base) = start("idle");
    let idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&h.socket).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(300));
    let took = good_client(&h.socket);
    eprintln!("idle connections: GET / answered in {took:?}");
    assert_bounded("200 idle connections", base, idle.len(), 0);
    // Again, now that the server has settled with them.
    thread::sleep(Duration::from_millis(500));
    good_client(&h.socket);
    assert_bounded("200 idle connections, later", base, idle.len(), 0);
    drop(idle);
    assert_settles("200 idle connections", base);
    good_client(&h.socket);
}

/// Writes `bytes` in pieces of `piece` bytes, pausing a millisecond between them, until
/// done or the server stops taking them.
fn dribble(mut s: UnixStream, bytes: Vec<u8>, piece: usize) {
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("set a write timeout");
    for part in bytes.chunks(piece) {
        if s.write_all(part).is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Sends each request on a connection of its own from a thread of its own, checks the
/// well-behaved client meanwhile, and wants `status` and a closed connection on each.
fn refused_heads(name: &str, requests: Vec<Vec<u8>>, piece: usize, status: &str) {
    let _g = serial();
    let (h, base) = start(name);
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for request in requests {
        let s = UnixStream::connect(&h.socket).expect("connect");
        readers.push(s.try_clone().expect("clone a stream"));
        writers.push(thread::spawn(move || dribble(s, request, piece)));
    }
    thread::sleep(Duration::from_millis(50));
    let took = good_client(&h.socket);
    eprintln!("{name}: GET / answered in {took:?} during the attack");
    // Each attacker holds two fds (its stream and the reader's clone) and one thread.
    assert_bounded(name, base, 2 * readers.len(), writers.len());
    for (i, mut r) in readers.into_iter().enumerate() {
        let out = read_until_closed(&mut r, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("{name} #{i}: {e}"));
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{name} #{i}: got {:?}",
            out.get(..out.len().min(200))
        );
    }
    for w in writers {
        w.join().expect("an attacker thread panicked");
    }
    assert_settles(name, base);
    good_client(&h.socket);
}

/// (b) A request head of 10,000 header lines.
#[test]
fn ten_thousand_header_lines() {
    let mut head = b"GET / HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..10_000 {
        head.extend_from_slice(format!("X-Filler-{i}: {i}\r\n").as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    refused_heads("10000 header lines", vec![head; 4], 2048, "431");
}

/// (b) One header line of 1 MiB.
#[test]
fn one_mebibyte_header_line() {
    let mut head = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    head.resize(head.len() + (1 << 20), b'a');
    head.extend_from_slice(b"\r\n\r\n");
    refused_heads("1 MiB header line", vec![head; 4], 16 << 10, "431");
}

/// (c) Requests declaring a 100 MiB body, then stalling or closing.
#[test]
fn huge_declared_bodies() {
    let _g = serial();
    let (h, base) = start("huge-bodies");
    let request =
        b"PUT /drives/a HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
                    Content-Length: 104857600\r\n\r\n{\"drive_id\": \"a\"";
    let mut stalled = Vec::new();
    for i in 0..50 {
        let mut s = UnixStream::connect(&h.socket).unwrap();
        s.write_all(request).unwrap();
        if i % 2 == 0 {
            stalled.push(s);
        }
    }
    thread::sleep(Duration::from_millis(100));
    let took = good_client(&h.socket);
    eprintln!("huge bodies: GET / answered in {took:?} during the attack");
    assert_bounded("50 requests declaring 100 MiB", base, stalled.len(), 0);
    for (i, s) in stalled.iter_mut().enumerate() {
        let out = read_until_closed(s, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("stalled request #{i}: {e}"));
        assert!(
            out.starts_with("HTTP/1.1 413") && out.contains("51200"),
            "stalled request #{i}: got {out:?}"
        );
    }
    assert_bounded(
        "50 requests declaring 100 MiB, answered",
        base,
        stalled.len(),
        0,
    );
    let refused: u64 = (h.metrics.snapshot().iter())
        .filter(|c| c.status == 413)
        .map(|c| c.count)
        .sum();
    assert!(refused >= 25, "{refused} refusals counted");
    drop(stalled);
    assert_settles("50 requests declaring 100 MiB", base);
    good_client(&h.socket);
}

/// (d) Clients that send requests and never read the answers.
#[test]
fn clients_that_never_read() {
    let _g = serial();
    let (h, base) = start("no-reader");
    let mut deaf = Vec::new();
    for _ in 0..4 {
        let mut s = UnixStream::connect(&h.socket).unwrap();
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        // Requests until the server stops taking them: its answers fill the socket.
        let request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let mut sent = 0;
        while s.write_all(request).is_ok() {
            sent += request.len();
            assert!(
                sent < 4 << 20,
                "the server kept reading requests whose answers nobody reads"
            );
        }
        deaf.push(s);
    }
    let took = good_client(&h.socket);
    eprintln!("deaf clients: GET / answered in {took:?} during the attack");
    assert_bounded("4 clients that never read", base, deaf.len(), 0);
    drop(deaf);
    assert_settles("4 clients that never read", base);
    good_client(&h.socket);
}

//! The HTTP framing on bytes in memory, and the server's limits over a real socket with
//! short timeouts.

use std::io::{Cursor, Read, Write};
use std::sync::mpsc::{channel, Receiver};

use serde_json::json;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::http::{Framing, Head, HttpError, Next, Reader, Response};
use super::*;
use crate::request::ApiReply;

fn reader(bytes: &[u8]) -> Reader<Cursor<Vec<u8>>> {
    Reader::new(Cursor::new(bytes.to_vec()))
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn head(bytes: &[u8]) -> Result<Head, HttpError> {
    reader(bytes).read_head(soon())
}

fn framing(bytes: &[u8]) -> Result<Framing, HttpError> {
    head(bytes)?.framing()
}

#[test]
fn pipelined_requests_are_read_in_order() {
    let mut r = reader(
        b"\r\nPUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b?x HTTP/1.1\r\n\r\n\
          PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=1\r\nde\r\n1\r\nf\r\n\
          0\r\nTrailer: x\r\n\r\n",
    );
    let h = r.read_head(soon()).unwrap();
    assert_eq!(
        (h.method.as_str(), h.path.as_str(), h.minor),
        ("PUT", "/a", 1)
    );
    assert!(!h.close && !h.expect_continue);
    assert_eq!(h.framing().unwrap(), Framing::Length(3));
    assert!(r.body_buffered(Framing::Length(3)));
    assert_eq!(r.read_body(Framing::Length(3), soon()).unwrap(), b"abc");
    assert_eq!(r.wait_request(Duration::ZERO), Next::Request);
    let h = r.read_head(soon()).unwrap();
    assert_eq!(
        (h.path.as_str(), h.framing().unwrap()),
        ("/b?x", Framing::Length(0))
    );
    let h = r.read_head(soon()).unwrap();
    assert_eq!(h.framing().unwrap(), Framing::Chunked);
    assert_eq!(r.read_body(Framing::Chunked, soon()).unwrap(), b"def");
    assert_eq!(r.wait_request(Duration::from_secs(1)), Next::Closed);
}

#[test]
fn head_limits_are_431() {
    let mut ok = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        ok.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    let mut over = ok.clone();
    ok.extend_from_slice(b"\r\n");
    assert!(head(&ok).is_ok());
    over.extend_from_slice(b"X-one-more: v\r\n\r\n");
    assert!(matches!(head(&over), Err(HttpError::HeadTooLarge)));

    let mut long = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
    long.resize(MAX_HEAD - 4, b'a');
    long.extend_from_slice(b"\r\n\r\n");
    assert!(head(&long).is_ok(), "a head of exactly MAX_HEAD bytes");
    long.insert(30, b'a');
    let e = head(&long).unwrap_err();
    assert!(matches!(e, HttpError::HeadTooLarge));
    assert_eq!(e.status(), Some(431));
    // A head cut short by the client is not a 431.
    assert!(matches!(
        head(b"GET / HTTP/1.1\r\nX: "),
        Err(HttpError::Closed)
    ));
}

#[test]
fn framing_is_checked_before_the_body() {
    let status = |bytes: &[u8]| framing(bytes).unwrap_err().status();
    assert_eq!(
        framing(b"PUT / HTTP/1.1\r\nContent-Length: 51200\r\n\r\n").unwrap(),
        Framing::Length(MAX_BODY)
    );
    for (req, want) in [
        (&b"PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n"[..], 413),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
            413,
        ),
        (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"PUT / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            400,
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
        ),
        (b"PUT / HTTP/1.1\r\nExpect: something\r\n\r\n", 417),
    ] {
        assert_eq!(status(req), Some(want), "{}", String::from_utf8_lossy(req));
    }
    // The same length twice is fine.
    assert_eq!(
        framing(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n").unwrap(),
        Framing::Length(2)
    );
    for bad in [
        &b"not http\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
    ] {
        assert_eq!(head(bad).unwrap_err().status(), Some(400));
    }
}

#[test]
fn connection_and_expect_headers() {
    let h = head(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(h.close, "HTTP/1.0 closes by default");
    let h = head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
    assert!(!h.close);
    let h = head(b"GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n").unwrap();
    assert!(h.close);
    let h = head(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n").unwrap();
    assert!(h.expect_continue);
}

#[test]
fn chunked_bodies_are_limited() {
    let mut body = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..MAX_BODY / 1024 {
        body.extend_from_slice(b"400\r\n");
        body.extend_from_slice(&[b'x'; 1024]);
        body.extend_from_slice(b"\r\n");
    }
    let mut exact = body.clone();
    exact.extend_from_slice(b"0\r\n\r\n");
    let mut r = reader(&exact);
    let f = r.read_head(soon()).unwrap().framing().unwrap();
    assert_eq!(r.read_body(f, soon()).unwrap().len(), MAX_BODY);

    body.extend_from_slice(b"1\r\nx\r\n0\r\n\r\n");
    let mut r = reader(&body);
    let f = r.read_head(soon()).unwrap().framing().unwrap();
    assert!(matches!(
        r.read_body(f, soon()),
        Err(HttpError::BodyTooLarge)
    ));

    for bad in [
        &b"zz\r\n"[..],
        b"\r\n",
        b"123456789\r\n",
        b"1\r\nxy\r\n0\r\n\r\n",
    ] {
        let mut req = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(bad);
        let mut r = reader(&req);
        let f = r.read_head(soon()).unwrap().framing().unwrap();
        let e = r.read_body(f, soon()).unwrap_err();
        assert_eq!(
            e.status(),
            Some(400),
            "{}: {e}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn responses_are_framed() {
    let r = Response {
        status: 200,
        content_type: Some("application/json"),
        body: b"{}".to_vec(),
    };
    assert_eq!(
        r.encode(false, false, false),
        b"HTTP/1.1 200 OK\r\nServer: skiff\r\nContent-Type: application/json\r\n\
          Content-Length: 2\r\n\r\n{}"
    );
    let text = String::from_utf8(r.encode(true, true, false)).unwrap();
    assert!(
        text.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n"),
        "{text}"
    );
    let text = String::from_utf8(r.encode(false, false, true)).unwrap();
    assert!(text.contains("Connection: keep-alive\r\n"), "{text}");
    let none = Response {
        status: 204,
        content_type: None,
        body: Vec::new(),
    };
    assert_eq!(
        none.encode(false, false, false),
        b"HTTP/1.1 204 No Content\r\nServer: skiff\r\n\r\n"
    );
}

// ------------------------------------------------------------ over a socket

/// A server with `limits` in a private directory, answered by `vmm` on its own thread.
struct TestServer {
    dir: PathBuf,
    socket: PathBuf,
    metrics: Arc<ApiMetrics>,
    handle: Option<ApiServerHandle>,
}

impl TestServer {
    fn start(name: &str, limits: Limits, vmm: fn(Receiver<ApiCall>)) -> TestServer {
        let dir =
            std::env::temp_dir().join(format!("skiff-api-unit-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (tx, rx) = channel();
        let metrics = Arc::new(ApiMetrics::new());
        let handle = ApiServer::from_listener(listener, socket.clone())
            .with_limits(limits)
            .spawn(
                tx,
                EventFd::new(EFD_NONBLOCK | vmm_sys_util::eventfd::EFD_CLOEXEC).unwrap(),
                metrics.clone(),
            )
            .unwrap();
        thread::spawn(move || vmm(rx));
        TestServer {
            dir,
            socket,
            metrics,
            handle: Some(handle),
        }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn open(&self) -> usize {
        self.handle.as_ref().unwrap().shared.registry.len()
    }

    /// Waits up to `within` for the number of open connections to be `n`.
    fn wait_open(&self, n: usize, within: Duration) {
        let start = Instant::now();
        while self.open() != n {
            assert!(
                start.elapsed() < within,
                "{} connections open after {within:?}, want {n}",
                self.open()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        drop(self.handle.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn vmm(rx: Receiver<ApiCall>) {
    for call in rx {
        let result = match call.request {
            ApiRequest::GetInstanceInfo => Ok(ApiReply::Json(json!({"state": "Not started"}))),
            _ => Ok(ApiReply::NoContent),
        };
        call.respond(result);
    }
}

/// A VMM that takes calls and answers none until the server goes.
fn silent_vmm(rx: Receiver<ApiCall>) {
    let held: Vec<ApiCall> = rx.iter().collect();
    drop(held);
}

fn short() -> Limits {
    Limits {
        max_connections: 4,
        max_waiting: 4,
        thread_keep: Duration::from_millis(100),
        wait_grace: Duration::from_millis(50),
        idle_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        evict_grace: Duration::from_millis(300),
        linger: Duration::from_millis(300),
    }
}

/// Reads one response head: status line and headers.
fn response_head(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while !out.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        out.push(byte[0]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response: head and a Content-Length body.
fn response(s: &mut UnixStream) -> String {
    let text = response_head(s);
    let length = text
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |n| n.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    text + &String::from_utf8_lossy(&body)
}

/// True when the server has closed `s` (end of stream within 5 s, nothing else read).
fn closed(s: &mut UnixStream) -> bool {
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == io::ErrorKind::ConnectionReset && rest.is_empty(),
    }
}

#[test]
fn keep_alive_pipelining_and_continue() {
    let srv = TestServer::start("pipeline", short(), vmm);
    let mut s = srv.connect();
    let config = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    let pipelined = format!(
        "GET / HTTP/1.1\r\n\r\nPUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n\
         {config}GET /nope HTTP/1.1\r\n\r\n",
        config.len()
    );
    s.write_all(pipelined.as_bytes()).unwrap();
    let first = response(&mut s);
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(first.ends_with(r#"{"state":"Not started"}"#), "{first}");
    assert!(response(&mut s).starts_with("HTTP/1.1 204 "));
    assert!(response(&mut s).starts_with("HTTP/1.1 404 "));

    // 100 Continue comes before the body is sent, the answer after.
    let action = r#"{"action_type": "FlushMetrics"}"#;
    let head = format!(
        "PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        action.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(action.as_bytes()).unwrap();
    let r = response(&mut s);
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");

    // HEAD gets the head only; HTTP/1.0 is answered and closed.
    s.write_all(b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.0\r\n\r\n")
        .unwrap();
    let head = response_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 405 "), "{head}");
    let last = response(&mut s);
    assert!(last.contains("Connection: close\r\n"), "{last}");
    assert!(closed(&mut s));
}

#[test]
fn refusals_are_counted_and_close() {
    let srv = TestServer::start("refusals", short(), vmm);
    for (req, status) in [
        (
            &b"PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n"[..],
            "413",
        ),
        (
            b"PUT /drives/a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "501",
        ),
        (b"PUT /drives/a HTTP/1.1\r\nExpect: 200-ok\r\n\r\n", "417"),
        (b"GET / HTTP/1.1\r\nX: y\r\nX: y\r\n\r\n", "200"),
        (b"this is not http\r\n\r\n", "400"),
    ] {
        let mut s = srv.connect();
        s.write_all(req).unwrap();
        let r = response(&mut s);
        assert!(r.starts_with(&format!("HTTP/1.1 {status} ")), "{r}");
        if status != "200" {
            assert!(
                r.contains("Connection: close\r\n") && r.contains("fault_message"),
                "{r}"
            );
            assert!(closed(&mut s), "{status}");
        }
    }
    let snap = srv.metrics.snapshot();
    let count = |name: &str, status: u16| {
        snap.iter()
            .find(|c| c.name == name && c.status == status)
            .map_or(0, |c| c.count)
    };
    assert_eq!(count("drives", 413), 1);
    assert_eq!(count("drives", crate::metrics::OTHER_STATUS), 2);
    assert_eq!(count(crate::metrics::UNROUTED, 400), 1);
}

#[test]
fn idle_and_slow_clients_are_closed() {
    let srv = TestServer::start("timeouts", short(), vmm);
    // Idle: closed after the idle timeout, without a word.
    let mut idle = srv.connect();
    let start = Instant::now();
    assert!(closed(&mut idle));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );

    // Mid-head and mid-body: 408 after the request timeout.
    for partial in [
        &b"GET / HTTP/1.1\r\nHost: x"[..],
        b"PUT /actions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{",
    ] {
        let mut s = srv.connect();
        s.write_all(partial).unwrap();
        let r = response(&mut s);
        assert!(r.starts_with("HTTP/1.1 408 "), "{r}");
        assert!(closed(&mut s));
    }
    srv.wait_open(0, Duration::from_secs(2));
}

#[test]
fn a_client_that_does_not_read_is_closed_after_the_write_timeout() {
    let srv = TestServer::start("deaf", short(), vmm);
    let mut s = srv.connect();
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while s.write_all(b"GET / HTTP/1.1\r\n\r\n").is_ok() {}
    assert_eq!(srv.open(), 1);
    // The write timeout (300 ms) ends the connection although the client keeps it open.
    srv.wait_open(0, Duration::from_secs(2));
    drop(s);
}

#[test]
fn idle_connections_wait_without_a_thread() {
    let srv = TestServer::start("waiting", short(), vmm);
    // Connections whose client is silent, and keep-alive ones gone idle, hold no thread.
    let silent: Vec<UnixStream> = (0..2).map(|_| srv.connect()).collect();
    let mut used: Vec<UnixStream> = (0..2).map(|_| srv.connect()).collect();
    for s in &mut used {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(response(s).starts_with("HTTP/1.1 200 "));
    }
    srv.wait_open(0, Duration::from_secs(1));
    // A request on a connection given back gets a thread again.
    used[0].write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(response(&mut used[0]).starts_with("HTTP/1.1 200 "));
    // The room is full (4): each newcomer closes the oldest silent connection.
    let mut fresh: Vec<UnixStream> = (0..2).map(|_| srv.connect()).collect();
    for s in &mut fresh {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(response(s).starts_with("HTTP/1.1 200 "));
    }
    for mut s in silent {
        assert!(closed(&mut s));
    }
    // And then the connection idle longest.
    let mut last = srv.connect();
    last.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(response(&mut last).starts_with("HTTP/1.1 200 "));
    assert!(closed(&mut used[1]));
}

#[test]
fn busy_threads_give_way_only_when_stuck() {
    let srv = TestServer::start("stuck", short(), vmm);
    // Four clients stuck mid-head hold every thread.
    let mut stuck: Vec<UnixStream> = (0..4).map(|_| srv.connect()).collect();
    for s in &mut stuck {
        s.write_all(b"GET / HTTP/1.1\r\nX-Half: ").unwrap();
    }
    srv.wait_open(4, Duration::from_secs(1));
    // A newcomer gets the thread of the oldest once it has stalled for the grace (300 ms;
    // the request timeout is 300 ms too, so it may be a 408 that frees it).
    let start = Instant::now();
    let mut c = srv.connect();
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(response(&mut c).starts_with("HTTP/1.1 200 "));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[test]
fn requests_with_the_vmm_are_not_evicted_and_shutdown_is_prompt() {
    let mut limits = short();
    limits.max_connections = 2;
    let mut srv = TestServer::start("busy", limits, silent_vmm);
    let mut busy: Vec<UnixStream> = (0..2).map(|_| srv.connect()).collect();
    for s in &mut busy {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    }
    srv.wait_open(2, Duration::from_secs(1));
    thread::sleep(Duration::from_millis(400));
    // Both wait for the VMM past the grace: a newcomer waits in the backlog.
    let mut c = srv.connect();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(
        c.read(&mut [0u8; 1]).is_err(),
        "a request with the VMM gave way"
    );
    assert_eq!(srv.open(), 2);

    let start = Instant::now();
    let handle = srv.handle.take().unwrap();
    let shared = Arc::clone(&handle.shared);
    handle.shutdown();
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(shared.registry.len(), 0);
    for s in &mut busy {
        let r = response(s);
        assert!(
            r.starts_with("HTTP/1.1 503 ") && r.contains("Connection: close"),
            "{r}"
        );
    }
    assert!(!srv.socket.exists());
}

#[test]
fn held_gate_leaves_new_connections_in_the_backlog() {
    let srv = TestServer::start("gate", short(), vmm);
    let gate = srv.handle.as_ref().unwrap().accept_gate();
    // A connection taken before the hold (answered once, so surely accepted) is served
    // as ever.
    let mut before = srv.connect();
    before.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(response(&mut before).starts_with("HTTP/1.1 200 "));
    assert!(gate.hold(), "the accept thread did not see the hold");
    before.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(response(&mut before).starts_with("HTTP/1.1 200 "));
    // A new one waits in the backlog, unaccepted and unanswered.
    let mut held = srv.connect();
    held.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    held.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let e = held.read(&mut byte).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    // Opened again, it is taken and answered.
    gate.open();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(response(&mut held).starts_with("HTTP/1.1 200 "));
}

/// The VMM that took over, in [`leaving_server_gives_its_connections_to_the_next`].
fn next_vmm(rx: Receiver<ApiCall>) {
    for call in rx {
        call.respond(Ok(ApiReply::Json(json!({"state": "next"}))));
    }
}

#[test]
fn leaving_server_gives_its_connections_to_the_next() {
    // Idle connections are not closed for their idleness during the test, and a thread
    // keeps its connection for a second (the in-flight case below needs it held).
    let limits = Limits {
        idle_timeout: Duration::from_secs(30),
        thread_keep: Duration::from_secs(1),
        ..short()
    };
    let old = TestServer::start("leave-old", limits, vmm);
    let next = TestServer::start("leave-next", limits, next_vmm);
    let gate = old.handle.as_ref().unwrap().accept_gate();
    // Keep-alive connections, each answered here once (so accepted here): two idle long
    // enough to have no thread (the second gets its next request after the hand-over),
    // one whose thread still waits for its next request, and one that sends its next
    // request to that thread after the hand-over.
    let answered = |name: &str| {
        let mut s = old.connect();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = response(&mut s);
        assert!(
            r.starts_with("HTTP/1.1 200 ") && !r.contains("next"),
            "{name}: {r}"
        );
        s
    };
    let mut roomed = answered("roomed");
    let mut late = answered("late");
    old.wait_open(0, Duration::from_secs(5));
    let mut threaded = answered("threaded");
    let mut inflight = answered("inflight");
    assert!(gate.hold());
    let outbox = gate.leave();
    late.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    inflight.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // The in-flight request is answered here (a VMM forwards it to the next), and its
    // connection closes.
    let r = response(&mut inflight);
    assert!(
        r.starts_with("HTTP/1.1 200 ") && !r.contains("next") && r.contains("Connection: close"),
        "inflight: {r}"
    );
    assert!(
        closed(&mut inflight),
        "the in-flight connection stayed open"
    );
    // The rest come out (the threaded one as soon as its thread sees the server leave, not
    // after its second), none read here.
    let want = 3;
    let mut given = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while given.len() < want {
        assert!(
            Instant::now() < deadline,
            "{} connections given away, want {want}",
            given.len()
        );
        given.extend(outbox.try_iter());
        thread::sleep(Duration::from_millis(5));
    }
    let mut mark = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gate.left(&mut mark) {
        assert!(
            Instant::now() < deadline,
            "the old server did not finish leaving"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let next_gate = next.handle.as_ref().unwrap().accept_gate();
    for s in given {
        next_gate.adopt(Arc::try_unwrap(s).expect("a connection still shared"));
    }
    // Each client goes on where it was, answered by the next server.
    for (name, s, write) in [
        ("late", &mut late, false),
        ("roomed", &mut roomed, true),
        ("threaded", &mut threaded, true),
    ] {
        if write {
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        }
        let r = response(s);
        assert!(
            r.starts_with("HTTP/1.1 200 ") && r.contains("next"),
            "{name}: {r}"
        );
    }
    // The old server still stops cleanly.
    drop(old);
}

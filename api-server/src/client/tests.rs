use super::*;

fn parse(bytes: &[u8]) -> (RawResponse, bool) {
    let (a, mut b) = UnixStream::pair().unwrap();
    b.write_all(bytes).unwrap();
    drop(b);
    let mut conn = Conn::new(a);
    match conn.read_response(Path::new("/test")) {
        Ok(r) => r,
        Err(Failure::Stale) => panic!("stale"),
        Err(Failure::Fatal(e)) => panic!("{e}"),
    }
}

#[test]
fn content_length_body() {
    let (r, keep) = parse(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
          Content-Length: 22\r\n\r\n{\"fault_message\":\"x\"}\n",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    assert_eq!(r.fault_message().as_deref(), Some("x"));
    assert!(keep);
}

#[test]
fn chunked_and_continue_and_close() {
    let (r, keep) = parse(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    );
    assert_eq!(
        (r.status, r.body.as_slice(), keep),
        (200, &b"abcde"[..], false)
    );
}

#[test]
fn no_content_and_unframed() {
    let (r, keep) = parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((r.status, r.body.len(), keep), (204, 0, true));
    let (r, keep) = parse(b"HTTP/1.0 200 OK\r\n\r\nrest of stream");
    assert_eq!((r.body.as_slice(), keep), (&b"rest of stream"[..], false));
}

#[test]
fn ids_are_escaped() {
    assert_eq!(escape("eth0_a"), "eth0_a");
    assert_eq!(escape("a b/c?\r\n"), "a%20b%2Fc%3F%0D%0A");
}

/// A one-connection server that answers each request after `delay` with `body`
/// (status 200), and hands back the request heads and bodies it read.
fn slow_server(
    sock: &Path,
    delay: Duration,
    body: &'static str,
) -> thread::JoinHandle<Vec<String>> {
    let listener = std::os::unix::net::UnixListener::bind(sock).unwrap();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) | Err(_) => return seen,
                Ok(n) => n,
            };
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            thread::sleep(delay);
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(answer.as_bytes()).is_err() {
                return seen;
            }
        }
    })
}

const REPORT: &str = r#"{"id":"rootfs","kind":"block","old_pid":1,"new_pid":2,
    "old_binary":"/a","new_binary":"/b","pause_us":3,"spawn_us":4,"negotiate_us":5,
    "prepare_us":6,"total_us":7,"rings":1}"#;

#[test]
fn upgrades_wait_longer_than_other_requests() {
    let dir = std::env::temp_dir().join(format!("skiff-client-slow-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let server = slow_server(&sock, Duration::from_millis(300), REPORT);
    let mut c = ApiClient::new(&sock)
        .with_timeout(Duration::from_millis(50))
        .with_slow_timeout(Duration::from_secs(20));
    assert_eq!(c.timeout(), Some(Duration::from_millis(50)));
    assert_eq!(c.slow_timeout(), Some(Duration::from_secs(20)));
    let r = c.upgrade_device("root fs", Some("/b")).unwrap();
    assert_eq!(
        (r.id.as_str(), r.old_pid, r.new_pid, r.rings),
        ("rootfs", 1, 2, 1)
    );
    // The usual timeout is back for the next request.
    assert_eq!(c.timeout(), Some(Duration::from_millis(50)));
    let e = c.version().unwrap_err();
    assert!(matches!(e, ClientError::Io { .. }), "{e}");
    drop(c);
    let seen = server.join().unwrap();
    assert!(
        seen[0].starts_with("PUT /skiff/devices/root%20fs/upgrade HTTP/1.1\r\n")
            && seen[0].ends_with("\r\n\r\n{\"binary\":\"/b\"}"),
        "{seen:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn upgrade_all_sends_only_given_binaries() {
    let dir = std::env::temp_dir().join(format!("skiff-client-all-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let server = slow_server(&sock, Duration::ZERO, r#"{"devices":[]}"#);
    let mut c = ApiClient::new(&sock);
    assert_eq!(c.slow_timeout(), None, "no timeout stays no timeout");
    let up = VmUpgrade {
        net_binary: Some("/n".into()),
        ..VmUpgrade::default()
    };
    assert_eq!(c.upgrade_all(&up).unwrap(), UpgradeReports::default());
    let c = c.with_timeout(Duration::from_secs(90));
    assert_eq!(c.slow_timeout(), Some(Duration::from_secs(90)));
    drop(c);
    let seen = server.join().unwrap();
    assert!(
        seen[0].starts_with("PUT /skiff/upgrade HTTP/1.1\r\n")
            && seen[0].ends_with("\r\n\r\n{\"net_binary\":\"/n\"}"),
        "{seen:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_answer_sent_before_the_server_closes_is_read() {
    let dir = std::env::temp_dir().join(format!("skiff-client-early-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    // Refuses the body after its first bytes, unread, as the server does past MAX_BODY.
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).unwrap();
        s.write_all(
            b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n\
              Content-Length: 22\r\n\r\n{\"fault_message\":\"x\"}\n",
        )
        .unwrap();
    });
    let mut c = ApiClient::new(&sock).with_timeout(Duration::from_secs(5));
    let body = vec![b' '; 4 << 20];
    let r = c.raw("PUT", "/drives/a", Some(&body)).unwrap();
    assert_eq!((r.status, r.fault_message().as_deref()), (413, Some("x")));
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_request_lines_are_refused() {
    let mut c = ApiClient::new("/nonexistent/socket");
    for (m, p) in [
        ("GET", "/a b"),
        ("G T", "/"),
        ("GET", "/\r\nX: y"),
        ("", "/"),
    ] {
        assert!(matches!(
            c.raw(m, p, None),
            Err(ClientError::InvalidRequest(_))
        ));
    }
    let e = c.version().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/socket"), "{e}");
}

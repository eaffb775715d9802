//! After a live upgrade of the VMM, the two processes stay connected on the hand-over
//! socket until the leaving one has passed on what its API still held, so that no client
//! sees the change: a request that arrived during the pause (on a keep-alive connection the
//! old VMM had, or in the same batch as the upgrade) is answered by the VMM that took over,
//! and a keep-alive connection goes on in the new VMM.
//!
//! After `RUNNING` (see [`crate::handover`]), old → new, one at a time:
//!
//! - `CALL LEN` and LEN bytes of JSON ([`ApiRequest`]); new → old `REPLY LEN` and the JSON
//!   [`ApiResult`]. The old VMM's API thread writes that answer to the client (with
//!   `Connection: close` once the old VMM is leaving). A request the new VMM cannot read
//!   (another build's types) is answered 400, and the link stays in step. A link that
//!   fails (no answer within a minute) is closed: a late answer would otherwise answer the
//!   next request; what comes after gets 503.
//! - `CONN` and one fd message: a connection with no request being served (idle, or with
//!   a request not read yet); the new VMM serves it as its own.
//!
//! The old VMM then exits. A VMM that is itself handed over while its predecessor still
//! passes things on passes them further, to its own successor.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use api_server::request::{ApiFault, ApiRequest, ApiResult};
use api_server::server::ApiCall;
use vmm_sys_util::epoll::ControlOperation;

use crate::error_chain;
use crate::handover::{self, HandoverError};
use crate::vmm::{ctl, Vmm, TOKEN_PREDECESSOR};

/// How long the new VMM may take to answer a request passed on (a snapshot of a large
/// guest takes seconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a message's parts may take to arrive once it has begun.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest message body (a request body is at most 64 KiB; an answer holds at most the
/// Prometheus page).
const MAX_MESSAGE: usize = 16 << 20;
/// How long a leaving VMM waits at most for its API's connections to be answered or given
/// away: a request being read may take the API's 10 s, its answer up to [`CALL_TIMEOUT`].
const LEAVE_LIMIT: Duration = Duration::from_secs(75);

/// What the VMM this one replaced passes on.
#[derive(Debug)]
pub enum Passed {
    /// A request to answer.
    Call(ApiRequest),
    /// A request whose JSON this binary cannot read (another build's request types): it is
    /// answered with a fault, and the link stays in step.
    Unreadable(String),
    /// A connection to serve.
    Conn(OwnedFd),
}

fn malformed(m: impl Into<String>) -> HandoverError {
    HandoverError::Malformed(m.into())
}

fn send_json(
    s: &UnixStream,
    tag: &str,
    value: &impl serde::Serialize,
) -> Result<(), HandoverError> {
    let json = serde_json::to_vec(value).map_err(|e| malformed(e.to_string()))?;
    let mut w = s;
    w.write_all(format!("{tag} {}\n", json.len()).as_bytes())
        .and_then(|()| w.write_all(&json))
        .map_err(HandoverError::Io)
}

/// A message's body of `len` (its header's) bytes.
fn read_body(s: &UnixStream, len: &str) -> Result<Vec<u8>, HandoverError> {
    let len: usize = len
        .parse()
        .map_err(|_| malformed(format!("length {len:?}")))?;
    if len > MAX_MESSAGE {
        return Err(malformed(format!("a message of {len} bytes")));
    }
    s.set_read_timeout(Some(MESSAGE_TIMEOUT))
        .map_err(HandoverError::Io)?;
    let mut body = vec![0u8; len];
    let mut r = s;
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => HandoverError::Closed,
        _ => HandoverError::Io(e),
    })?;
    Ok(body)
}

fn read_json<T: serde::de::DeserializeOwned>(
    s: &UnixStream,
    len: &str,
) -> Result<T, HandoverError> {
    serde_json::from_slice(&read_body(s, len)?).map_err(|e| malformed(e.to_string()))
}

/// Old side: passes `request` on and returns the answer.
pub fn pass_call(s: &UnixStream, request: &ApiRequest) -> Result<ApiResult, HandoverError> {
    send_json(s, "CALL", request)?;
    let line = handover::read_line(s, CALL_TIMEOUT)?;
    match line.strip_prefix("REPLY ") {
        Some(len) => read_json(s, len),
        None => Err(malformed(format!("{line:?}, not REPLY LEN"))),
    }
}

/// Old side: passes a connection on.
pub fn give(s: &UnixStream, conn: &UnixStream) -> Result<(), HandoverError> {
    handover::send_line(s, "CONN")?;
    let n = sandbox::fdpass::send(s.as_fd(), b"F", &[conn.as_raw_fd()], 0)
        .map_err(HandoverError::Io)?;
    if n != 1 {
        return Err(malformed("an fd message was cut short"));
    }
    Ok(())
}

/// New side: the next thing passed on (the caller knows the socket is readable).
pub fn receive(s: &UnixStream) -> Result<Passed, HandoverError> {
    let line = handover::read_line(s, MESSAGE_TIMEOUT)?;
    if let Some(len) = line.strip_prefix("CALL ") {
        let body = read_body(s, len)?;
        return Ok(match serde_json::from_slice(&body) {
            Ok(r) => Passed::Call(r),
            Err(e) => Passed::Unreadable(e.to_string()),
        });
    }
    if line != "CONN" {
        return Err(malformed(format!("{line:?}, not CALL LEN or CONN")));
    }
    s.set_read_timeout(Some(MESSAGE_TIMEOUT))
        .map_err(HandoverError::Io)?;
    let (data, mut fds, truncated) =
        sandbox::fdpass::recv(s.as_fd(), 1, 1).map_err(HandoverError::Io)?;
    if data.is_empty() {
        return Err(HandoverError::Closed);
    }
    match fds.pop() {
        Some(fd) if !truncated && data == b"F" && fds.is_empty() => Ok(Passed::Conn(fd)),
        _ => Err(malformed("the CONN fd message")),
    }
}

/// New side: the answer to a `CALL`.
pub fn reply(s: &UnixStream, result: &ApiResult) -> Result<(), HandoverError> {
    send_json(s, "REPLY", result)
}

impl Vmm {
    /// Answers an API call this VMM can no longer serve itself (it handed its VM over):
    /// the VMM that took over answers it.
    pub(crate) fn forward(&mut self, call: ApiCall) {
        let result = self.pass_on(&call.request);
        call.respond(result);
    }

    /// `request`'s answer from the successor. A link that failed is dropped (a reply that
    /// came late would answer the next request), and what comes after gets 503.
    fn pass_on(&mut self, request: &ApiRequest) -> ApiResult {
        let Some(next) = &self.successor else {
            return Err(gone("the link to it is closed"));
        };
        match pass_call(next, request) {
            Ok(r) => r,
            Err(e) => {
                let why = error_chain(&e);
                log::warn!("the VMM that took over did not answer a request passed on: {why}");
                self.drop_successor();
                Err(gone(&why))
            }
        }
    }

    fn drop_successor(&mut self) {
        if let Some(next) = self.successor.take() {
            let _ = next.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The VMM this one replaced passed something on: answer it, serve it, or (handed over
    /// in turn) pass it further. The link closes on its end or on a broken message.
    pub(crate) fn serve_predecessor(&mut self) {
        let Some(prev) = &self.predecessor else {
            return;
        };
        let result = match receive(prev) {
            Ok(Passed::Conn(fd)) => return self.take_connection(UnixStream::from(fd)),
            Ok(Passed::Call(request)) if self.handed_over => self.pass_on(&request),
            Ok(Passed::Call(request)) => self.handle(request),
            Ok(Passed::Unreadable(why)) => Err(ApiFault::bad_request(format!(
                "the request reached the VMM during a live upgrade, and the new VMM cannot \
                 read it as passed on ({why}); send it again"
            ))),
            Err(e) => return self.unlink_predecessor(e),
        };
        if let Some(Err(e)) = self.predecessor.as_ref().map(|p| reply(p, &result)) {
            self.unlink_predecessor(e);
        }
    }

    /// Closes the link to the VMM this one replaced (it ended, or broke the protocol).
    fn unlink_predecessor(&mut self, broken: HandoverError) {
        if !matches!(broken, HandoverError::Closed) {
            log::warn!("the VMM this one replaced: {}", error_chain(&broken));
        }
        if let Some(prev) = self.predecessor.take() {
            let _ = ctl(
                &self.epoll,
                ControlOperation::Delete,
                prev.as_raw_fd(),
                TOKEN_PREDECESSOR,
            );
        }
    }

    /// Serves a connection passed on, or (handed over in turn) passes it further.
    fn take_connection(&mut self, conn: UnixStream) {
        if self.handed_over {
            let failed = match &self.successor {
                Some(next) => give(next, &conn).err().map(|e| error_chain(&e)),
                None => Some("the link to the VMM that took over is closed".into()),
            };
            if let Some(why) = failed {
                log::warn!("an API connection was lost passing it on: {why}");
                self.drop_successor();
            }
        } else if let Some(api) = &self.api {
            api.gate.adopt(conn);
        }
    }

    /// A connection this VMM's API gave away (the accept thread holds no copy).
    fn pass_connection(&mut self, conn: std::sync::Arc<UnixStream>) {
        match std::sync::Arc::try_unwrap(conn).or_else(|c| c.try_clone()) {
            Ok(c) => self.take_connection(c),
            Err(e) => log::warn!("an API connection was lost passing it on: {e}"),
        }
    }

    /// Keeps the link to the VMM this one replaced, to serve what it passes on.
    pub(crate) fn link_predecessor(&mut self, s: &UnixStream) -> Result<(), String> {
        let prev = s
            .try_clone()
            .map_err(|e| format!("the hand-over socket: {e}"))?;
        ctl(
            &self.epoll,
            ControlOperation::Add,
            prev.as_raw_fd(),
            TOKEN_PREDECESSOR,
        )
        .map_err(|e| error_chain(&e))?;
        self.predecessor = Some(prev);
        Ok(())
    }

    /// After the VM was handed over: every API request this VMM still gets is answered by
    /// its successor, and every connection with no request being served goes to it; returns
    /// once none is left (or after [`LEAVE_LIMIT`]).
    pub(crate) fn leave(&mut self) {
        let Some(api) = &self.api else {
            return;
        };
        if !self.handed_over {
            return;
        }
        let outbox = api.gate.leave();
        let deadline = Instant::now() + LEAVE_LIMIT;
        let mut empty_since = None;
        let (mut calls, mut conns) = (0, 0);
        loop {
            let mut idle = true;
            while let Some(c) = self.api.as_ref().and_then(|a| a.rx.try_recv().ok()) {
                idle = false;
                calls += 1;
                self.forward(c);
            }
            for conn in outbox.try_iter() {
                idle = false;
                conns += 1;
                self.pass_connection(conn);
            }
            if let Some(true) = self
                .predecessor
                .as_ref()
                .map(|p| crate::wait_readable(p.as_raw_fd(), Duration::ZERO))
            {
                idle = false;
                self.serve_predecessor();
            }
            let done = self
                .api
                .as_ref()
                .is_some_and(|a| a.gate.left(&mut empty_since));
            if idle && done && self.predecessor.is_none() {
                break;
            }
            if Instant::now() > deadline {
                log::warn!(
                    "API connections still open {} s after the hand-over; closing them",
                    LEAVE_LIMIT.as_secs()
                );
                break;
            }
            if idle {
                if let Some(api) = &self.api {
                    crate::wait_readable(api.wake.as_raw_fd(), Duration::from_millis(5));
                    let _ = api.wake.read();
                }
            }
        }
        // One the accept thread gave away between the last drain and the last look.
        for conn in outbox.try_iter() {
            conns += 1;
            self.pass_connection(conn);
        }
        if calls + conns > 0 {
            log::info!("passed {calls} API request(s) and {conns} connection(s) on to the new VMM");
        }
    }
}

/// The answer to a request a handed-over VMM cannot pass on.
fn gone(why: &str) -> ApiFault {
    ApiFault {
        status: 503,
        message: format!(
            "the VM was handed over to a new VMM, which did not answer this request passed \
             on to it ({why}); send it again"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_server::models::{Vm, VmStateChange};
    use api_server::request::ApiReply;

    #[test]
    fn requests_and_connections_pass_over_the_link() {
        let (old, new) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..4 {
                match receive(&new).unwrap() {
                    Passed::Unreadable(why) => {
                        seen.push("unreadable".into());
                        reply(&new, &Err(ApiFault::bad_request(why))).unwrap();
                    }
                    Passed::Call(r) => {
                        seen.push(format!("{r:?}"));
                        let answer = match r {
                            ApiRequest::GetSkiffVm => {
                                Ok(ApiReply::Json(serde_json::json!({"pid": 7})))
                            }
                            _ => Err(ApiFault::bad_request("not now")),
                        };
                        reply(&new, &answer).unwrap();
                    }
                    Passed::Conn(fd) => {
                        // The connection works from here.
                        let mut c = UnixStream::from(fd);
                        c.write_all(b"hello").unwrap();
                        seen.push("conn".into());
                    }
                }
            }
            // The link's end.
            assert!(matches!(receive(&new), Err(HandoverError::Closed)));
            seen
        });
        let r = pass_call(&old, &ApiRequest::GetSkiffVm).unwrap();
        assert_eq!(r, Ok(ApiReply::Json(serde_json::json!({"pid": 7}))));
        let pause = ApiRequest::PatchVm(Vm {
            state: VmStateChange::Paused,
        });
        assert_eq!(
            pass_call(&old, &pause).unwrap(),
            Err(ApiFault::bad_request("not now"))
        );
        // A request of another build's shape is refused, and the link stays in step.
        send_json(&old, "CALL", &serde_json::json!({"NoSuchRequest": 1})).unwrap();
        let line = handover::read_line(&old, Duration::from_secs(5)).unwrap();
        let refused: ApiResult = read_json(&old, line.strip_prefix("REPLY ").unwrap()).unwrap();
        assert_eq!(refused.unwrap_err().status, 400);
        let (mut client, conn) = UnixStream::pair().unwrap();
        give(&old, &conn).unwrap();
        drop(conn);
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(old);
        let seen = server.join().unwrap();
        assert_eq!(seen.len(), 4);
        assert!(
            seen[1].contains("Paused") && seen[2] == "unreadable" && seen[3] == "conn",
            "{seen:?}"
        );
    }

    #[test]
    fn broken_messages_are_refused() {
        for bad in ["CALL 99999999999\n", "CALL x\n", "HELLO\n", "CALL 5\nnot"] {
            let (old, new) = UnixStream::pair().unwrap();
            (&old).write_all(bad.as_bytes()).unwrap();
            drop(old);
            assert!(receive(&new).is_err(), "{bad:?}");
        }
        // A whole message that is not a request this binary knows: answered, not fatal.
        let (old, new) = UnixStream::pair().unwrap();
        (&old).write_all(b"CALL 3\nnot").unwrap();
        assert!(matches!(receive(&new), Ok(Passed::Unreadable(_))));
    }
}

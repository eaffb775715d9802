//! One connection's thread: requests read one after the other (keep-alive and
//! pipelining), each routed and handed to the VMM, each answer written before the next
//! request is read, every wait bounded.
//!
//! - Between requests the thread waits [`Limits::thread_keep`] for the next one, then
//!   gives the connection back to the accept thread, which waits for its next request
//!   without a thread and closes it after [`Limits::idle_timeout`].
//! - From a request's first byte, its head and body must arrive within
//!   [`Limits::request_timeout`] (else 408 and close).
//! - An answer must be taken by the client within [`Limits::write_timeout`] (else close).
//! - A refused request (400, 413, 417, 431, 501) is answered with `Connection: close`; the
//!   thread then shuts down its side and discards, without keeping, what the client still
//!   sends, for at most [`Limits::linger`] and [`LINGER_BYTES`], so that a client that
//!   writes its whole request before reading (most do) gets the answer instead of a broken
//!   pipe. A lingering connection is the first to go when a waiting client needs a thread.

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};

use super::accept::Waiting;
use super::http::{Framing, Head, HttpError, Input, Next, Reader, Response, CONTINUE};
use super::registry::{Phase, Ticket};
use super::{shutting_down, ApiCall, Context};
use crate::request::{ApiFault, ApiReply, ApiRequest, ApiResult};
use crate::router;

/// How often a wait for the VMM's answer checks for shutdown.
const REPLY_POLL: Duration = Duration::from_millis(100);

/// How often a thread waiting for a keep-alive connection's next request looks whether
/// the server is leaving (a VMM that handed its VM over).
const LEAVE_CHECK: Duration = Duration::from_millis(20);

/// Most bytes discarded while lingering after a refused request.
pub const LINGER_BYTES: usize = 1 << 20;

const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4";

/// How a request's exchange ended.
enum After {
    /// Wait for the next request.
    KeepAlive,
    /// Close now.
    Close,
    /// Shut down our side, discard what still comes for a while, then close.
    Linger,
}

/// One accepted connection. Fields drop in order: the stream before the ticket that holds
/// its place.
pub struct Connection {
    reader: Reader<Arc<UnixStream>>,
    stream: Arc<UnixStream>,
    ctx: Arc<Context>,
    ticket: Ticket,
}

impl Connection {
    /// A connection whose place `ticket` holds.
    pub fn new(stream: Arc<UnixStream>, ticket: Ticket, ctx: Arc<Context>) -> Self {
        Connection {
            reader: Reader::new(Arc::clone(&stream)),
            stream,
            ctx,
            ticket,
        }
    }

    fn stopping(&self) -> bool {
        self.ctx.shared.stopping.load(Ordering::Acquire)
    }

    /// Serves requests until the client leaves, a limit ends the connection, it is
    /// closed to free its thread, or the server stops.
    pub fn serve(mut self) {
        let limits = self.ctx.shared.limits;
        let keep = limits.thread_keep.min(limits.idle_timeout);
        loop {
            let idle_since = Instant::now();
            match self.wait_next(keep) {
                Next::Request => {}
                Next::Closed => return,
                Next::Idle => return self.hand_back(idle_since),
            }
            if self.stopping() || !self.ticket.enter(Phase::Reading) {
                return;
            }
            let deadline = Instant::now() + limits.request_timeout;
            match self.exchange(deadline) {
                After::KeepAlive if !self.stopping() && self.ticket.enter(Phase::Idle) => {}
                After::KeepAlive | After::Close => {
                    let _ = self.stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
                After::Linger => return self.linger(),
            }
        }
    }

    /// Waits up to `keep` for the next request; a leaving server's thread gives the
    /// connection back within [`LEAVE_CHECK`] instead (to be passed to the next VMM).
    fn wait_next(&mut self, keep: Duration) -> Next {
        let deadline = Instant::now() + keep;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reader.wait_request(left.min(LEAVE_CHECK)) {
                Next::Idle if !left.is_zero() && !self.ctx.shared.leaving() => {}
                other => return other,
            }
        }
    }

    /// Gives the idle connection back to the accept thread, which waits for its next
    /// request without a thread; the thread ends.
    fn hand_back(self, since: Instant) {
        let Connection {
            reader,
            stream,
            ctx,
            ticket,
        } = self;
        drop(reader);
        if !ctx.shared.stopping.load(Ordering::Acquire) {
            // After shutdown nobody receives: the connection closes.
            let _ = ctx.handback.send(Waiting::new(stream, since));
        }
        drop(ticket);
    }

    /// Reads one request, has it answered, and writes the answer.
    fn exchange(&mut self, deadline: Instant) -> After {
        let head = match self.reader.read_head(deadline) {
            Ok(h) => h,
            Err(e) => return self.refuse(None, None, e),
        };
        let route = router::resolve(&head.method, &head.path).ok();
        let framing = match head.framing() {
            Ok(f) => f,
            Err(e) => return self.refuse(route, Some(&head), e),
        };
        let wants_body = framing != Framing::Length(0);
        if head.expect_continue
            && head.minor >= 1
            && wants_body
            && !self.reader.body_buffered(framing)
            && self.write(CONTINUE).is_err()
        {
            return After::Close;
        }
        let body = match self.reader.read_body(framing, deadline) {
            Ok(b) => b,
            Err(e) => return self.refuse(route, Some(&head), e),
        };
        if !self.ticket.enter(Phase::Vmm) {
            return After::Close;
        }
        let result = if self.stopping() {
            Err(shutting_down())
        } else {
            router::route(&head.method, &head.path, &body).and_then(|r| self.call_vmm(r))
        };
        let response = build_response(&result);
        self.ctx.metrics.record(route, response.status);
        debug!("{} {} {}", head.method, head.path, response.status);
        // A leaving server's answers end their connections: the client's next request
        // goes to the VMM that took over.
        let close = head.close || self.stopping() || self.ctx.shared.leaving();
        let bytes = response.encode(head.method == "HEAD", close, head.minor == 0 && !close);
        if !self.ticket.enter(Phase::Writing) {
            return After::Close;
        }
        match self.write(&bytes) {
            Ok(()) if !close => After::KeepAlive,
            Ok(()) => After::Close,
            Err(e) => {
                debug!("cannot write an API response: {e}");
                After::Close
            }
        }
    }

    /// Answers a request that cannot be read or served with its error status (if anyone
    /// is left to answer) and `Connection: close`.
    fn refuse(&mut self, route: Option<usize>, head: Option<&Head>, e: HttpError) -> After {
        let Some(status) = e.status() else {
            debug!("API request abandoned: {e}");
            return After::Close;
        };
        match head {
            Some(h) => debug!("{} {} {status}: {e}", h.method, h.path),
            None => debug!("unreadable API request, {status}: {e}"),
        }
        self.ctx.metrics.record(route, status);
        let response = build_response(&Err(ApiFault {
            status,
            message: e.to_string(),
        }));
        let head_only = head.is_some_and(|h| h.method == "HEAD");
        if !self.ticket.enter(Phase::Writing)
            || self
                .write(&response.encode(head_only, true, false))
                .is_err()
        {
            return After::Close;
        }
        match e {
            // A client too slow to send its request will not send the rest either.
            HttpError::Timeout => After::Close,
            _ => After::Linger,
        }
    }

    /// Writes all of `bytes` within the write timeout.
    fn write(&self, bytes: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + self.ctx.shared.limits.write_timeout;
        let mut rest = bytes;
        while !rest.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_write_timeout(Some(left))?;
            match (&*self.stream).write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::ErrorKind::TimedOut.into())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// After a refusal: no more answers, and what the client still sends is read and
    /// dropped for a bounded time and amount before the connection closes.
    fn linger(mut self) {
        if !self.ticket.enter(Phase::Lingering) {
            return;
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + self.ctx.shared.limits.linger;
        let mut scratch = [0u8; 8192];
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            match self.reader.input().read_by(&mut scratch, deadline) {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n,
            }
        }
    }

    /// Hands `request` to the VMM and waits for its answer (503 if the VMM is gone or the
    /// server stops meanwhile).
    fn call_vmm(&self, request: ApiRequest) -> ApiResult {
        let (reply, answer) = sync_channel(1);
        if self.ctx.to_vmm.send(ApiCall { request, reply }).is_err() {
            return Err(shutting_down());
        }
        if let Err(e) = self.ctx.wake.write(1) {
            warn!("cannot wake the VMM for an API request: {e}");
        }
        loop {
            match answer.recv_timeout(REPLY_POLL) {
                Ok(result) => return result,
                Err(RecvTimeoutError::Disconnected) => return Err(shutting_down()),
                Err(RecvTimeoutError::Timeout) if self.stopping() => return Err(shutting_down()),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// The response for an answer: 204 without a body, 200 with JSON or Prometheus text, or
/// the fault's status with `{"fault_message": ...}`.
pub fn build_response(result: &ApiResult) -> Response {
    let (status, content_type, body) = match result {
        Ok(ApiReply::NoContent) => (204, None, Vec::new()),
        Ok(ApiReply::Json(v)) => match serde_json::to_vec(v) {
            Ok(b) => (200, Some(JSON), b),
            Err(e) => fault_body(&ApiFault::internal(format!("cannot encode reply: {e}"))),
        },
        Ok(ApiReply::Prometheus(text)) => (200, Some(PROMETHEUS), text.clone().into_bytes()),
        Err(fault) => fault_body(fault),
    };
    Response {
        status,
        content_type,
        body,
    }
}

fn fault_body(fault: &ApiFault) -> (u16, Option<&'static str>, Vec<u8>) {
    // A fault's status must be an error status; anything else is skiff's bug.
    let status = if (400..=599).contains(&fault.status) {
        fault.status
    } else {
        500
    };
    let body = serde_json::json!({ "fault_message": fault.message }).to_string();
    (status, Some(JSON), body.into_bytes())
}

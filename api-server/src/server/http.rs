//! HTTP/1.1 framing for the API server: request heads parsed with httparse within fixed
//! limits, `Content-Length` and chunked request bodies of at most [`MAX_BODY`] bytes, and
//! responses. No I/O policy lives here beyond a deadline per read: the connection thread
//! ([`super::conn`]) decides when to wait, answer, close or linger.
//!
//! Nothing is ever buffered because a client declared it: a head is read only up to
//! [`MAX_HEAD`] bytes, a `Content-Length` over [`MAX_BODY`] is refused before a byte of the
//! body is read, and a chunked body is refused as soon as its chunks pass the limit.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::MAX_BODY;

/// Largest request head (request line, header fields, final empty line) read.
pub const MAX_HEAD: usize = 8 << 10;

/// Most header fields in one request head.
pub const MAX_HEADERS: usize = 64;

/// Longest chunk-size line of a chunked body (the size and any chunk extensions).
const MAX_CHUNK_LINE: usize = 1024;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 << 10;

/// Why a request could not be read. [`HttpError::status`] gives the answer, if any; the
/// connection is closed after any of these.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The head passed [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields: 431.
    #[error(
        "request head larger than {MAX_HEAD} bytes or with more than {MAX_HEADERS} header fields"
    )]
    HeadTooLarge,
    /// Not HTTP/1.x, or framing that cannot be trusted: 400.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The body passes [`MAX_BODY`] (declared or, chunked, as sent): 413.
    #[error("request body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    /// A transfer coding other than `chunked`: 501.
    #[error("transfer coding '{0}' is not supported (only chunked)")]
    Coding(String),
    /// An `Expect` other than `100-continue`: 417.
    #[error("expectation '{0}' is not supported (only 100-continue)")]
    Expectation(String),
    /// The request did not arrive whole before its deadline: 408.
    #[error("the request did not arrive in time")]
    Timeout,
    /// The client closed the connection mid-request: no answer.
    #[error("the client closed the connection mid-request")]
    Closed,
    /// Reading failed: no answer.
    #[error("cannot read the request")]
    Io(#[source] io::Error),
}

impl HttpError {
    /// The status to answer with, or `None` when nobody is left to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::HeadTooLarge => Some(431),
            HttpError::Malformed(_) => Some(400),
            HttpError::BodyTooLarge => Some(413),
            HttpError::Coding(_) => Some(501),
            HttpError::Expectation(_) => Some(417),
            HttpError::Timeout => Some(408),
            HttpError::Closed | HttpError::Io(_) => None,
        }
    }
}

/// Where request bytes come from: a read that gives up at a deadline.
pub trait Input {
    /// Reads into `buf`; `Ok(0)` at end of stream, an error of kind `WouldBlock` or
    /// `TimedOut` when `deadline` passes first.
    fn read_by(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize>;
}

impl Input for Arc<UnixStream> {
    fn read_by(&mut self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.set_read_timeout(Some(left))?;
        loop {
            match (&**self).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }
}

/// Bytes already in memory (the unit tests and the fuzz target): the deadline never passes.
impl Input for io::Cursor<Vec<u8>> {
    fn read_by(&mut self, buf: &mut [u8], _deadline: Instant) -> io::Result<usize> {
        io::Read::read(self, buf)
    }
}

/// Reads requests from `bytes` as a connection does (head, framing, body) until the bytes
/// end or one is refused; returns how many were read whole. For the fuzz target
/// `http_framing`: the framing code on any byte stream, without sockets or threads.
pub fn read_all(bytes: &[u8]) -> usize {
    let mut r = Reader::new(io::Cursor::new(bytes.to_vec()));
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut n = 0;
    loop {
        let Ok(head) = r.read_head(deadline) else {
            return n;
        };
        let Ok(framing) = head.framing() else {
            return n;
        };
        if r.read_body(framing, deadline).is_err() {
            return n;
        }
        n += 1;
    }
}

/// How a request's body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes (0: no body).
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// The method, as sent.
    pub method: String,
    /// The request target, as sent.
    pub path: String,
    /// `x` of `HTTP/1.x`.
    pub minor: u8,
    /// The client does not want the connection kept (`Connection: close`, or HTTP/1.0
    /// without `keep-alive`).
    pub close: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    content_length: Option<String>,
    conflicting_lengths: bool,
    transfer_encoding: Option<String>,
    expect_other: Option<String>,
}

impl Head {
    fn from_parsed(req: &httparse::Request<'_, '_>) -> Head {
        let mut head = Head {
            method: req.method.unwrap_or_default().to_owned(),
            path: req.path.unwrap_or_default().to_owned(),
            minor: req.version.unwrap_or_default(),
            ..Head::default()
        };
        let mut keep_alive = false;
        for h in req.headers.iter() {
            let value = String::from_utf8_lossy(h.value).trim().to_owned();
            let name = h.name;
            if name.eq_ignore_ascii_case("content-length") {
                match &head.content_length {
                    Some(v) if *v != value => head.conflicting_lengths = true,
                    _ => head.content_length = Some(value),
                }
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.transfer_encoding = Some(match head.transfer_encoding.take() {
                    Some(before) => format!("{before}, {value}"),
                    None => value,
                });
            } else if name.eq_ignore_ascii_case("expect") {
                if value.eq_ignore_ascii_case("100-continue") {
                    head.expect_continue = true;
                } else {
                    head.expect_other = Some(value);
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        head.close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
        }
        if head.minor == 0 && !keep_alive {
            head.close = true;
        }
        head
    }

    /// How the body is framed, or why the request is refused before its body is read.
    pub fn framing(&self) -> Result<Framing, HttpError> {
        if let Some(e) = &self.expect_other {
            return Err(HttpError::Expectation(e.clone()));
        }
        if let Some(te) = &self.transfer_encoding {
            if self.content_length.is_some() {
                return Err(HttpError::Malformed(
                    "both Content-Length and Transfer-Encoding".into(),
                ));
            }
            let codings: Vec<&str> = te.split(',').map(str::trim).collect();
            return match codings.as_slice() {
                [c] if c.eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
                _ if te.is_empty() => Err(HttpError::Malformed("empty Transfer-Encoding".into())),
                _ => Err(HttpError::Coding(te.clone())),
            };
        }
        if self.conflicting_lengths {
            return Err(HttpError::Malformed("conflicting Content-Length".into()));
        }
        let Some(length) = &self.content_length else {
            return Ok(Framing::Length(0));
        };
        if length.is_empty() || !length.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Malformed(format!(
                "invalid Content-Length '{}'",
                shown(length)
            )));
        }
        // All digits: anything that does not fit is too large too.
        match length.parse::<usize>() {
            Ok(n) if n <= MAX_BODY => Ok(Framing::Length(n)),
            _ => Err(HttpError::BodyTooLarge),
        }
    }
}

/// Client text in a message, cut short.
fn shown(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((cut, _)) => &s[..cut],
        None => s,
    }
}

/// What waiting for the next request found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Bytes of a request are there.
    Request,
    /// The client closed the connection (or it was shut down).
    Closed,
    /// Nothing came within the idle timeout.
    Idle,
}

/// Requests read from one connection, with the bytes received but not used yet (the
/// start of a pipelined request).
#[derive(Debug)]
pub struct Reader<I> {
    input: I,
    buf: Vec<u8>,
}

impl<I: Input> Reader<I> {
    /// A reader with nothing buffered.
    pub fn new(input: I) -> Self {
        Reader {
            input,
            buf: Vec::new(),
        }
    }

    /// The input, for lingering over what the client still sends.
    pub fn input(&mut self) -> &mut I {
        &mut self.input
    }

    /// Waits up to `idle` for the first byte of the next request.
    pub fn wait_request(&mut self, idle: Duration) -> Next {
        if !self.buf.is_empty() {
            return Next::Request;
        }
        let deadline = Instant::now() + idle;
        match self.fill(deadline, READ_CHUNK) {
            Ok(()) => Next::Request,
            Err(HttpError::Timeout) => Next::Idle,
            Err(_) => Next::Closed,
        }
    }

    /// Reads and parses one request head, all of it before `deadline`.
    pub fn read_head(&mut self, deadline: Instant) -> Result<Head, HttpError> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut fields);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
                    return Err(HttpError::HeadTooLarge)
                }
                Ok(httparse::Status::Complete(n)) => {
                    let head = Head::from_parsed(&req);
                    self.buf.drain(..n);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) if self.buf.len() >= MAX_HEAD => {
                    return Err(HttpError::HeadTooLarge)
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
                Err(e) => return Err(HttpError::Malformed(e.to_string())),
            }
            let room = MAX_HEAD - self.buf.len();
            self.fill(deadline, room)?;
        }
    }

    /// Whether the whole body of `framing` is already buffered (no 100 Continue needed).
    pub fn body_buffered(&self, framing: Framing) -> bool {
        match framing {
            Framing::Length(n) => self.buf.len() >= n,
            Framing::Chunked => false,
        }
    }

    /// Reads the body, all of it before `deadline`.
    pub fn read_body(&mut self, framing: Framing, deadline: Instant) -> Result<Vec<u8>, HttpError> {
        match framing {
            Framing::Length(n) => self.take(n, deadline),
            Framing::Chunked => self.read_chunked(deadline),
        }
    }

    fn read_chunked(&mut self, deadline: Instant) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        loop {
            let line = self.line(deadline, MAX_CHUNK_LINE)?;
            let size = line.split(';').next().unwrap_or_default().trim();
            if size.is_empty() || size.len() > 8 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(HttpError::Malformed(format!(
                    "invalid chunk size '{}'",
                    shown(size)
                )));
            }
            let size = usize::from_str_radix(size, 16)
                .map_err(|e| HttpError::Malformed(format!("invalid chunk size: {e}")))?;
            if size == 0 {
                // Trailer fields, ignored, within the head's limit.
                let mut trailers = 0;
                loop {
                    let line = self.line(deadline, MAX_HEAD)?;
                    if line.is_empty() {
                        return Ok(body);
                    }
                    trailers += line.len() + 2;
                    if trailers > MAX_HEAD {
                        return Err(HttpError::HeadTooLarge);
                    }
                }
            }
            if body.len() + size > MAX_BODY {
                return Err(HttpError::BodyTooLarge);
            }
            body.extend(self.take(size, deadline)?);
            if !self.line(deadline, 0)?.is_empty() {
                return Err(HttpError::Malformed("chunk not followed by CRLF".into()));
            }
        }
    }

    /// Takes exactly `n` bytes (`n` is at most [`MAX_BODY`]).
    fn take(&mut self, n: usize, deadline: Instant) -> Result<Vec<u8>, HttpError> {
        while self.buf.len() < n {
            let want = n - self.buf.len();
            self.fill(deadline, want)?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Takes one CRLF-terminated line of at most `max` bytes, without the CRLF.
    fn line(&mut self, deadline: Instant, max: usize) -> Result<String, HttpError> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                if i > max {
                    return Err(HttpError::Malformed(
                        "line too long in a chunked body".into(),
                    ));
                }
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > max + 1 {
                return Err(HttpError::Malformed(
                    "line too long in a chunked body".into(),
                ));
            }
            self.fill(deadline, READ_CHUNK)?;
        }
    }

    /// Appends at least one and at most `max` (> 0) bytes from the input.
    fn fill(&mut self, deadline: Instant, max: usize) -> Result<(), HttpError> {
        let mut chunk = [0u8; READ_CHUNK];
        let want = max.clamp(1, READ_CHUNK);
        match self.input.read_by(&mut chunk[..want], deadline) {
            Ok(0) => Err(HttpError::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(HttpError::Timeout)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::NotConnected
                ) =>
            {
                Err(HttpError::Closed)
            }
            Err(e) => Err(HttpError::Io(e)),
        }
    }
}

/// One response to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, when there is a body.
    pub content_type: Option<&'static str>,
    /// The body.
    pub body: Vec<u8>,
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Response {
    /// The bytes on the wire. `head_only` leaves the body out (an answer to HEAD);
    /// `close` says the connection ends after it; `keep_alive` says so explicitly (to an
    /// HTTP/1.0 client that asked for it).
    pub fn encode(&self, head_only: bool, close: bool, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: skiff\r\n",
            self.status,
            reason(self.status)
        );
        if let Some(ct) = self.content_type {
            out.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        // A 204 carries no body and no Content-Length (RFC 9110 8.6).
        if self.status != 204 {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        if close {
            out.push_str("Connection: close\r\n");
        } else if keep_alive {
            out.push_str("Connection: keep-alive\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only && self.status != 204 {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// The reason phrase of a status this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

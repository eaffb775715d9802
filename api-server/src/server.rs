//! The API thread: HTTP/1.1 on a Unix socket (tiny_http), routing, and a hand-off of
//! every routed request to the VMM's event loop over a channel plus an eventfd. The thread
//! never touches VM state; it waits for the VMM's [`ApiResult`] and writes it back.
//!
//! tiny_http accepts connections and parses requests on threads of its own (one accept
//! thread and one per open connection). A request whose body tiny_http has already
//! buffered (every body Firecracker's API defines) is answered on the `skiff-api` thread in
//! arrival order; one with a larger, chunked or 100-continue body is read and answered on a
//! thread of its own, so a client that stalls in its body holds up nobody else. The VMM
//! still sees one request at a time.
//!
//! Known limits of tiny_http 0.12: no header-size limit, no idle timeout, no write timeout
//! (a client that does not read its answers blocks the thread writing them; shutdown waits
//! at most a second for it).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, error, warn};
use tiny_http::{Header, Request, Response, Server, StatusCode};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::ApiMetrics;
use crate::request::{ApiFault, ApiReply, ApiRequest, ApiResult};
use crate::router;

/// Largest request body accepted (Firecracker's default `--http-api-max-payload-size`).
pub const MAX_BODY: usize = 51200;

/// Largest declared body of a refused (413) request that is still read and discarded to
/// keep the connection usable. tiny_http discards an unread body by allocating a buffer of
/// the whole remaining length, so past this the request is abandoned unanswered instead.
const MAX_DISCARD: usize = 64 << 20;

/// How often a wait for the VMM's answer checks for shutdown.
const REPLY_POLL: Duration = Duration::from_millis(100);

/// Pause before re-creating tiny_http's accept loop after an accept error.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4";

/// Errors setting up the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process accepts connections on the socket.
    #[error("API socket {0} is already in use by another process")]
    InUse(PathBuf),
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The existing socket could not be checked or removed.
    #[error("cannot replace the stale API socket {path}")]
    Stale {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `bind(2)` failed.
    #[error("cannot bind the API socket {path}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The listening socket could not be duplicated for the HTTP server.
    #[error("cannot duplicate the API listener")]
    Listener(#[source] io::Error),
    /// tiny_http refused the listener.
    #[error("cannot start the HTTP server")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The `skiff-api` thread could not be started.
    #[error("cannot start the skiff-api thread")]
    Spawn(#[source] io::Error),
}

/// One routed request handed to the VMM. The VMM answers on `reply`, exactly once.
#[derive(Debug)]
pub struct ApiCall {
    /// What was asked.
    pub request: ApiRequest,
    /// Where the answer goes; the API thread waits on the other end.
    pub reply: SyncSender<ApiResult>,
}

impl ApiCall {
    /// Sends the answer; a caller that went away (server shutting down) is not an error.
    pub fn respond(self, result: ApiResult) {
        let _ = self.reply.send(result);
    }
}

/// A bound API socket whose thread has not started yet.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Binds the API socket at `path`, owner-only (mode 0600).
    ///
    /// An existing socket that nobody accepts on (connect is refused) is stale and
    /// replaced; a live one is [`ServerError::InUse`]; any other file is
    /// [`ServerError::NotASocket`].
    ///
    /// The mode comes from setting the process umask to 0177 around `bind(2)`. The umask
    /// is process-wide, so call this before other threads that create files start (the VMM
    /// binds during start-up, before its vCPU, device and API threads exist).
    pub fn bind(path: &Path) -> Result<ApiServer, ServerError> {
        remove_stale(path)?;
        // SAFETY: umask(2) only swaps the process's file-creation mask; it cannot fail and
        // touches no memory of ours.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above; this restores the mask saved just before.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(|source| ServerError::Bind {
            path: path.to_owned(),
            source,
        })?;
        Ok(ApiServer {
            listener,
            path: path.to_owned(),
        })
    }

    /// Wraps a listener bound elsewhere (for example inherited across an exec); `path` is
    /// the file removed at shutdown.
    pub fn from_listener(listener: UnixListener, path: PathBuf) -> ApiServer {
        ApiServer { listener, path }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket (to keep it open across an exec).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Starts the `skiff-api` thread. Each routed request is sent on `to_vmm`, followed by
    /// a write of 1 to `wake`; the thread then waits for the answer on the call's reply
    /// channel. If the VMM has dropped its receiver the client gets 503.
    pub fn spawn(
        self,
        to_vmm: Sender<ApiCall>,
        wake: EventFd,
        metrics: Arc<ApiMetrics>,
    ) -> Result<ApiServerHandle, ServerError> {
        let identity = fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        let spare = self.listener.try_clone().map_err(ServerError::Listener)?;
        let server = Server::from_listener(self.listener, None).map_err(ServerError::Http)?;
        let shared = Arc::new(Shared {
            server: Mutex::new(Some(Arc::new(server))),
            stopping: AtomicBool::new(false),
        });
        let worker = Worker {
            shared: shared.clone(),
            spare,
            to_vmm,
            wake,
            metrics,
        };
        let mut handle = ApiServerHandle {
            shared,
            thread: None,
            path: self.path,
            identity,
        };
        match thread::Builder::new()
            .name("skiff-api".into())
            .spawn(move || worker.run())
        {
            Ok(t) => {
                handle.thread = Some(t);
                Ok(handle)
            }
            Err(e) => {
                handle.stop();
                Err(ServerError::Spawn(e))
            }
        }
    }
}

/// Removes a stale socket at `path`; refuses a live socket or another kind of file.
fn remove_stale(path: &Path) -> Result<(), ServerError> {
    let stale = |source| ServerError::Stale {
        path: path.to_owned(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(stale(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            debug!("removing stale API socket {}", path.display());
            fs::remove_file(path).map_err(stale)
        }
        Err(e) => Err(stale(e)),
    }
}

/// State shared by the handle and the thread.
struct Shared {
    /// The current tiny_http server; `None` once shut down.
    server: Mutex<Option<Arc<Server>>>,
    stopping: AtomicBool,
}

impl Shared {
    fn server(&self) -> MutexGuard<'_, Option<Arc<Server>>> {
        self.server.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// The running API thread. [`shutdown`](Self::shutdown) (or drop) stops it and removes
/// the socket file.
#[derive(Debug)]
pub struct ApiServerHandle {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Device and inode of the socket we bound, so that shutdown removes only ours.
    identity: Option<(u64, u64)>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("stopping", &self.stopping())
            .finish_non_exhaustive()
    }
}

impl ApiServerHandle {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, waits for the thread, and removes the socket file. A request
    /// still waiting for the VMM is answered 503 within 100 ms, so this does not
    /// deadlock when called from the thread that answers [`ApiCall`]s.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(server) = self.shared.server().as_ref() {
            server.unblock();
        }
        if let Some(thread) = self.thread.take() {
            // The thread can be stuck writing an answer to a client that does not read;
            // do not let that hold up the VMM's exit.
            let deadline = std::time::Instant::now() + JOIN_LIMIT;
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            if !thread.is_finished() {
                warn!("the skiff-api thread is stuck answering a client; not waiting for it");
            } else if thread.join().is_err() {
                error!("the skiff-api thread panicked");
            }
        }
        // Dropping the last tiny_http server ends its accept thread: it connects to the
        // socket to wake it, so the file must still be there.
        let server = self.shared.server().take();
        drop(server);
        let ours = fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.identity {
            if let Err(e) = fs::remove_file(&self.path) {
                warn!("cannot remove API socket {}: {e}", self.path.display());
            }
        }
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long shutdown waits for the `skiff-api` thread.
const JOIN_LIMIT: Duration = Duration::from_secs(1);

/// What the `skiff-api` thread owns.
struct Worker {
    shared: Arc<Shared>,
    /// A duplicate of the listener, to restart tiny_http after an accept error ends its
    /// accept thread (EMFILE, for example).
    spare: UnixListener,
    to_vmm: Sender<ApiCall>,
    wake: EventFd,
    metrics: Arc<ApiMetrics>,
}

impl Worker {
    fn run(self) {
        let me = Arc::new(self);
        loop {
            let Some(server) = me.shared.server().clone() else {
                return;
            };
            match server.recv() {
                Ok(rq) => me.dispatch(rq),
                Err(e) => {
                    if me.shared.stopping() {
                        return;
                    }
                    warn!("API socket accept failed: {e}; restarting the HTTP server");
                    drop(server);
                    if !me.restart() {
                        return;
                    }
                }
            }
        }
    }

    /// Replaces the tiny_http server (whose accept thread has exited) with a new one on
    /// the same socket. False when shutting down.
    fn restart(&self) -> bool {
        loop {
            thread::sleep(ACCEPT_RETRY);
            let mut slot = self.shared.server();
            if self.shared.stopping() {
                return false;
            }
            let fresh = self
                .spare
                .try_clone()
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
                .and_then(|l| Server::from_listener(l, None));
            match fresh {
                Ok(s) => {
                    *slot = Some(Arc::new(s));
                    return true;
                }
                Err(e) => warn!("cannot restart the HTTP server: {e}"),
            }
        }
    }

    /// Handles `rq` on this thread when its body (if any) is already buffered, which
    /// tiny_http does for bodies up to 1 KiB: every request Firecracker's API defines fits.
    /// A larger or chunked body is read on a thread of its own, so a client that declares a
    /// body and then stalls cannot hold up the API for everyone else.
    fn dispatch(self: &Arc<Self>, rq: Request) {
        let expects_continue = rq.headers().iter().any(|h| h.field.equiv("Expect"));
        let buffered = !expects_continue
            && matches!(rq.body_length(), Some(n) if n <= BUFFERED_BODY || n > MAX_BODY);
        if buffered {
            return self.handle(rq);
        }
        let me = Arc::clone(self);
        if let Err(e) = thread::Builder::new()
            .name("skiff-api-body".into())
            .spawn(move || me.handle(rq))
        {
            warn!("cannot start a thread to read a request body: {e}");
        }
    }

    fn handle(&self, mut rq: Request) {
        let method = rq.method().as_str().to_owned();
        let url = rq.url().to_owned();
        let route = router::resolve(&method, &url).ok();
        let declared = rq.body_length().unwrap_or(0);
        let (result, discard) = if declared > MAX_BODY {
            (Err(too_large()), Some(declared))
        } else if self.shared.stopping() {
            (Err(shutting_down()), None)
        } else {
            (self.answer(&mut rq, &method, &url), None)
        };
        let response = build_response(&result);
        let status = response.status_code().0;
        self.metrics.record(route, status);
        debug!("{method} {url} {status}");
        match discard {
            None => send(rq, response),
            // Responding drops the request, and with it tiny_http discards the unread
            // body: do that off this thread so a client that never sends it cannot stall
            // the API.
            Some(len) if len <= MAX_DISCARD => {
                let spawned = thread::Builder::new()
                    .name("skiff-api-drain".into())
                    .spawn(move || send(rq, response));
                if let Err(e) = spawned {
                    warn!("cannot start a thread to refuse an oversized request: {e}");
                }
            }
            Some(len) => {
                warn!("{method} {url}: abandoning a request declaring a {len}-byte body");
                std::mem::forget(rq);
            }
        }
    }

    /// Reads the body, routes, and asks the VMM.
    fn answer(&self, rq: &mut Request, method: &str, url: &str) -> ApiResult {
        let body = read_body(rq)?;
        let request = router::route(method, url, &body)?;
        self.call_vmm(request)
    }

    fn call_vmm(&self, request: ApiRequest) -> ApiResult {
        let (reply, answer) = sync_channel(1);
        if self.to_vmm.send(ApiCall { request, reply }).is_err() {
            return Err(shutting_down());
        }
        if let Err(e) = self.wake.write(1) {
            warn!("cannot wake the VMM for an API request: {e}");
        }
        loop {
            match answer.recv_timeout(REPLY_POLL) {
                Ok(result) => return result,
                Err(RecvTimeoutError::Disconnected) => return Err(shutting_down()),
                Err(RecvTimeoutError::Timeout) if self.shared.stopping() => {
                    return Err(shutting_down())
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }
}

/// Bodies up to this size are read by tiny_http's connection thread before `recv()`
/// returns the request.
const BUFFERED_BODY: usize = 1024;

/// The body, at most [`MAX_BODY`] bytes (chunked bodies are cut off there too).
fn read_body(rq: &mut Request) -> Result<Vec<u8>, ApiFault> {
    let declared = rq.body_length();
    let mut body = Vec::new();
    rq.as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiFault::bad_request(format!("cannot read the request body: {e}")))?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    match declared {
        Some(n) if n != body.len() => Err(ApiFault::bad_request(format!(
            "the body ended after {} of {n} bytes",
            body.len()
        ))),
        _ => Ok(body),
    }
}

fn too_large() -> ApiFault {
    ApiFault {
        status: 413,
        message: format!("request body larger than {MAX_BODY} bytes"),
    }
}

fn shutting_down() -> ApiFault {
    ApiFault {
        status: 503,
        message: "the VMM is shutting down".into(),
    }
}

/// The HTTP response for an answer: 204 without a body, 200 with JSON or Prometheus
/// text, or the fault's status with `{"fault_message": ...}`.
fn build_response(result: &ApiResult) -> Response<io::Cursor<Vec<u8>>> {
    let (status, content_type, body) = match result {
        Ok(ApiReply::NoContent) => (204, None, Vec::new()),
        Ok(ApiReply::Json(v)) => match serde_json::to_vec(v) {
            Ok(b) => (200, Some(JSON), b),
            Err(e) => fault_body(&ApiFault::internal(format!("cannot encode reply: {e}"))),
        },
        Ok(ApiReply::Prometheus(text)) => (200, Some(PROMETHEUS), text.clone().into_bytes()),
        Err(fault) => fault_body(fault),
    };
    let mut response = Response::from_data(body)
        .with_status_code(StatusCode(status))
        .with_chunked_threshold(usize::MAX);
    if let Some(ct) = content_type {
        match Header::from_bytes("Content-Type", ct) {
            Ok(h) => response.add_header(h),
            Err(()) => error!("invalid Content-Type header {ct}"),
        }
    }
    response
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

fn send(rq: Request, response: Response<io::Cursor<Vec<u8>>>) {
    if let Err(e) = rq.respond(response) {
        debug!("cannot write an API response: {e}");
    }
}

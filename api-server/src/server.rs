//! The API server: HTTP/1.1 on a Unix socket, routing, and a hand-off of every routed
//! request to the VMM's event loop over a channel plus an eventfd. No thread here touches
//! VM state; each waits for the VMM's [`ApiResult`] and writes it back.
//!
//! The client is only semi-trusted, so every resource a client can make the server hold is
//! bounded, whatever it sends or fails to read:
//!
//! - One accept thread (`skiff-api`), and at most [`MAX_CONNECTIONS`] connections being
//!   served, each by a thread of its own (`skiff-api-conn`) that gives the connection
//!   back after [`THREAD_KEEP`] without a request. At most [`MAX_WAITING`] more are held
//!   open without a thread: clients that have not written yet and idle keep-alive
//!   connections, which the accept thread polls and hands to a thread when their client
//!   writes (`server/accept.rs`). So the server holds at most 1 + [`MAX_CONNECTIONS`] threads
//!   and [`MAX_CONNECTIONS`] + [`MAX_WAITING`] connection fds besides the listener and its
//!   eventfd. When the waiting room is full a new client closes the oldest connection
//!   silent for at least [`WAIT_GRACE`], so that a crowd of idle connections cannot lock a client out; when every
//!   thread is busy, a stuck client's (stalled mid-request or mid-answer, or lingering
//!   after a refusal) is freed (`server/registry.rs`), never one whose request is with the VMM;
//!   and when the room is full of clients waiting for a thread, new ones wait in the
//!   listen backlog. Waiting rather than a 503 keeps bursts of well-behaved clients (50
//!   at once in the tests) working.
//! - A request head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields (else 431), a
//!   body of at most [`MAX_BODY`] (else 413 before any of it is read; chunked bodies are
//!   read up to the same limit), all of it within [`REQUEST_TIMEOUT`] of its first byte
//!   (else 408); at most [`IDLE_TIMEOUT`] between requests and [`WRITE_TIMEOUT`] for an
//!   answer to be taken. A refused request closes its connection (`server/conn.rs`).
//! - Keep-alive and pipelining as HTTP/1.1 clients expect (answers in request order),
//!   `Expect: 100-continue` answered before the body is read, HTTP/1.0 closing unless it
//!   asks for keep-alive. Every fd is close-on-exec (std's `accept4(SOCK_CLOEXEC)`).
//!
//! Why a small server of our own on `httparse` rather than tokio and hyper: the API serves
//! one local client a few small JSON requests at a time, the host has few cores, and an
//! async runtime would add dozens of crates and much build time to the VMM for nothing it
//! needs; this server is a few hundred lines whose every limit is visible. Firecracker and
//! Cloud Hypervisor do the same: both serve their API with a small dedicated HTTP server,
//! `micro_http`. tiny_http, which served before, could not be given any of these limits
//! (no header or connection limit, no timeouts on Unix sockets, a thread per connection
//! and per unbuffered request, and an unread body discarded by allocating its declared
//! length).

mod accept;
mod conn;
mod http;

/// The HTTP framing on bytes in memory (for the fuzz target `http_framing`).
pub use http::read_all as read_requests;
mod registry;

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::metrics::ApiMetrics;
use crate::request::{ApiFault, ApiRequest, ApiResult};
use accept::Waiting;
pub use conn::LINGER_BYTES;
pub use http::{MAX_HEAD, MAX_HEADERS};
use registry::{Phase, Registry};

/// Largest request body accepted (Firecracker's default `--http-api-max-payload-size`).
pub const MAX_BODY: usize = 51200;

/// Most connections served at once, each by a thread of its own.
pub const MAX_CONNECTIONS: usize = 16;

/// Most connections held open without a thread: clients that have not written yet, and
/// idle keep-alive connections.
pub const MAX_WAITING: usize = 32;

/// How long a connection's thread waits for the next request before it gives the
/// connection back to the accept thread (a request after that gets a new thread).
pub const THREAD_KEEP: Duration = Duration::from_millis(250);

/// How long a connection may wait for its next request before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request may take to arrive, head and body, from its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to read an answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection must have waited silent before it may be closed to make room in
/// the waiting room (a client that has just connected gets this long to write).
pub const WAIT_GRACE: Duration = Duration::from_millis(100);

/// How long a client must have stalled mid-request or mid-answer before its connection
/// may be closed to free its thread for another client.
pub const EVICT_GRACE: Duration = Duration::from_secs(1);

/// Longest linger after a refused request.
pub const LINGER: Duration = Duration::from_secs(1);

/// Pause after an accept error (EMFILE, for example) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// How long shutdown waits for the connections to finish.
const JOIN_LIMIT: Duration = Duration::from_secs(1);

/// The server's limits; the constants above, shorter in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub max_waiting: usize,
    pub thread_keep: Duration,
    pub wait_grace: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub write_timeout: Duration,
    pub evict_grace: Duration,
    pub linger: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            max_waiting: MAX_WAITING,
            thread_keep: THREAD_KEEP,
            wait_grace: WAIT_GRACE,
            idle_timeout: IDLE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            write_timeout: WRITE_TIMEOUT,
            evict_grace: EVICT_GRACE,
            linger: LINGER,
        }
    }
}

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
    /// The eventfd that wakes the accept thread could not be created.
    #[error("cannot create the API server's eventfd")]
    WakeEvent(#[source] io::Error),
    /// The `skiff-api` thread could not be started.
    #[error("cannot start the skiff-api thread")]
    Spawn(#[source] io::Error),
    /// The `skiff-api` thread's set-up (its seccomp filter) failed.
    #[error("cannot set up the skiff-api thread: {0}")]
    ThreadInit(String),
}

/// What the `skiff-api` thread runs first, before it accepts a connection (the VMM
/// installs its seccomp filter there; the connection threads it starts keep it).
pub type ThreadInit = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// One routed request handed to the VMM. The VMM answers on `reply`, exactly once.
#[derive(Debug)]
pub struct ApiCall {
    /// What was asked.
    pub request: ApiRequest,
    /// Where the answer goes; the connection's thread waits on the other end.
    pub reply: SyncSender<ApiResult>,
}

impl ApiCall {
    /// Sends the answer; a caller that went away (server shutting down) is not an error.
    pub fn respond(self, result: ApiResult) {
        let _ = self.reply.send(result);
    }
}

/// A bound API socket whose threads have not started yet.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    limits: Limits,
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
        Ok(Self::from_listener(listener, path.to_owned()))
    }

    /// Wraps a listener bound elsewhere (for example inherited across an exec); `path` is
    /// the file removed at shutdown.
    pub fn from_listener(listener: UnixListener, path: PathBuf) -> ApiServer {
        ApiServer {
            listener,
            path,
            limits: Limits::default(),
        }
    }

    /// The same server with other limits (tests).
    #[cfg(test)]
    pub(crate) fn with_limits(mut self, limits: Limits) -> ApiServer {
        self.limits = limits;
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket (to keep it open across an exec).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Starts the `skiff-api` accept thread. Each routed request is sent on `to_vmm`,
    /// followed by a write of 1 to `wake`; the connection's thread then waits for the
    /// answer on the call's reply channel. If the VMM has dropped its receiver the client
    /// gets 503.
    pub fn spawn(
        self,
        to_vmm: Sender<ApiCall>,
        wake: EventFd,
        metrics: Arc<ApiMetrics>,
    ) -> Result<ApiServerHandle, ServerError> {
        self.spawn_with_init(to_vmm, wake, metrics, Box::new(|| Ok(())))
    }

    /// [`ApiServer::spawn`], with `init` run first on the `skiff-api` thread; its error
    /// stops the thread before it accepts anything and is returned here.
    pub fn spawn_with_init(
        self,
        to_vmm: Sender<ApiCall>,
        wake: EventFd,
        metrics: Arc<ApiMetrics>,
        init: ThreadInit,
    ) -> Result<ApiServerHandle, ServerError> {
        let identity = fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        let accept_wake =
            EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK).map_err(ServerError::WakeEvent)?;
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            held: AtomicBool::new(false),
            held_seen: AtomicBool::new(false),
            outbox: std::sync::Mutex::new(None),
            leave_rounds: std::sync::atomic::AtomicU64::new(0),
            registry: Arc::new(Registry::new(self.limits, accept_wake)),
            limits: self.limits,
        });
        let (handback, handbacks) = channel();
        let ctx = Arc::new(Context {
            shared: Arc::clone(&shared),
            to_vmm,
            wake,
            metrics,
            handback: handback.clone(),
        });
        let listener = self.listener;
        let mut handle = ApiServerHandle {
            shared,
            handback,
            thread: None,
            path: self.path,
            identity,
        };
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        match thread::Builder::new()
            .name("skiff-api".into())
            .spawn(move || {
                let r = init();
                let ok = r.is_ok();
                let _ = ready_tx.send(r);
                if ok {
                    accept::accept_loop(listener, ctx, handbacks)
                }
            }) {
            Ok(t) => {
                handle.thread = Some(t);
                match ready.recv() {
                    Ok(Ok(())) => Ok(handle),
                    Ok(Err(e)) => {
                        handle.stop();
                        Err(ServerError::ThreadInit(e))
                    }
                    Err(_) => {
                        handle.stop();
                        Err(ServerError::ThreadInit("the thread ended".into()))
                    }
                }
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

/// State shared by the handle and the threads.
#[derive(Debug)]
struct Shared {
    stopping: AtomicBool,
    /// New connections wait in the listening socket's backlog (see [`AcceptGate`]).
    held: AtomicBool,
    /// The accept thread saw `held` and takes no connection until it is cleared.
    held_seen: AtomicBool,
    /// The VMM has handed the VM over and is leaving: answers close their connections,
    /// and the accept thread gives every connection without a thread to this sender
    /// (for the VMM that took over). See [`AcceptGate::leave`].
    outbox: std::sync::Mutex<Option<Sender<Arc<UnixStream>>>>,
    /// Rounds the accept thread made since it saw the outbox.
    leave_rounds: std::sync::atomic::AtomicU64,
    registry: Arc<Registry>,
    limits: Limits,
}

impl Shared {
    fn leaving(&self) -> bool {
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn outbox(&self) -> Option<Sender<Arc<UnixStream>>> {
        self.outbox
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// How long [`AcceptGate::hold`] waits for the accept thread to stop accepting.
const HOLD_WAIT: Duration = Duration::from_millis(200);

/// Stops and restarts the taking of new connections, which meanwhile wait in the listening
/// socket's backlog. The VMM holds it while another process (the VMM that replaces this
/// one, which shares the listening socket) takes the VM over, so that no connection
/// opened during the hand-over lands on the VMM that is leaving.
///
/// It also moves connections between the two VMMs: the leaving one gives away every
/// connection that waits without a request being served ([`AcceptGate::leave`]), and the
/// one that took over serves them as its own ([`AcceptGate::adopt`]); a client on a
/// keep-alive connection never sees the change.
#[derive(Clone, Debug)]
pub struct AcceptGate {
    shared: Arc<Shared>,
    handback: Sender<Waiting>,
}

impl AcceptGate {
    /// No new connection from now on: returns once the accept thread has seen it (within
    /// [`HOLD_WAIT`]; false if it did not say so in time, or has stopped).
    pub fn hold(&self) -> bool {
        let s = &self.shared;
        s.held_seen.store(false, Ordering::Release);
        s.held.store(true, Ordering::Release);
        s.registry.wake();
        let deadline = Instant::now() + HOLD_WAIT;
        while !s.held_seen.load(Ordering::Acquire) {
            if Instant::now() >= deadline || s.stopping.load(Ordering::Acquire) {
                return false;
            }
            thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// New connections are taken again.
    pub fn open(&self) {
        self.shared.held.store(false, Ordering::Release);
        self.shared.registry.wake();
    }

    /// The VMM has handed its VM over (after [`AcceptGate::hold`]): each request still
    /// being read or served is answered (the VMM forwards it) with `Connection: close`,
    /// and every connection without a thread, idle or with a request not yet read, is
    /// sent on the returned channel instead of being served here.
    pub fn leave(&self) -> std::sync::mpsc::Receiver<Arc<UnixStream>> {
        let (tx, rx) = channel();
        *self.shared.outbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        self.shared.leave_rounds.store(0, Ordering::Release);
        self.shared.registry.wake();
        rx
    }

    /// After [`AcceptGate::leave`]: no connection has a thread any more and the accept
    /// thread has given away all the others (it went round twice since the last thread
    /// ended, so what that thread gave back is out too).
    pub fn left(&self, rounds_when_empty: &mut Option<u64>) -> bool {
        let s = &self.shared;
        let rounds = s.leave_rounds.load(Ordering::Acquire);
        if s.registry.len() != 0 {
            *rounds_when_empty = None;
            return false;
        }
        let since = *rounds_when_empty.get_or_insert(rounds);
        rounds >= since + 2
    }

    /// Serves `stream`, a connection the VMM this one replaced gave away, as if it had
    /// been accepted here (it may hold a request not yet read).
    pub fn adopt(&self, stream: UnixStream) {
        let w = Waiting::new(Arc::new(stream), Instant::now());
        if self.handback.send(w).is_ok() {
            self.shared.registry.wake();
        }
    }
}

/// What every connection's thread needs.
#[derive(Debug)]
struct Context {
    shared: Arc<Shared>,
    to_vmm: Sender<ApiCall>,
    wake: EventFd,
    metrics: Arc<ApiMetrics>,
    /// Where a thread gives back a connection that went idle.
    handback: Sender<Waiting>,
}

/// The running API server. [`shutdown`](Self::shutdown) (or drop) stops it and removes
/// the socket file.
#[derive(Debug)]
pub struct ApiServerHandle {
    shared: Arc<Shared>,
    /// Where adopted connections go (the accept thread's hand-back channel).
    handback: Sender<Waiting>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Device and inode of the socket we bound, so that shutdown removes only ours.
    identity: Option<(u64, u64)>,
}

impl ApiServerHandle {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The gate that holds new connections back.
    pub fn accept_gate(&self) -> AcceptGate {
        AcceptGate {
            shared: Arc::clone(&self.shared),
            handback: self.handback.clone(),
        }
    }

    /// Stops accepting, closes every connection, and removes the socket file, within
    /// about a second. A request still waiting for the VMM is answered 503 within 100 ms,
    /// so this does not deadlock when called from the thread that answers [`ApiCall`]s.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// As [`ApiServerHandle::shutdown`], but the socket file stays: another process (the
    /// VMM that replaced this one) accepts on the same listening socket, inherited.
    /// Answers already sent are written out first.
    pub fn release(mut self) {
        self.identity = None;
        self.stop();
    }

    fn stop(&mut self) {
        let deadline = Instant::now() + JOIN_LIMIT;
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.registry.wake();
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if !thread.is_finished() {
                warn!("the skiff-api thread did not stop; not waiting for it");
            } else if thread.join().is_err() {
                error!("the skiff-api thread panicked");
            }
        }
        // A request with the VMM gets its 503 and then closes; everything else ends now.
        let registry = &self.shared.registry;
        registry.shutdown(|phase| phase != Phase::Vmm);
        if !registry.wait_empty(deadline) {
            warn!("API connections still open at shutdown; closing them");
            registry.shutdown(|_| true);
        }
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

/// The answer to a request that arrives while the server stops or after the VMM is gone.
fn shutting_down() -> ApiFault {
    ApiFault {
        status: 503,
        message: "the VMM is shutting down".into(),
    }
}

#[cfg(test)]
mod tests;

//! The `skiff-api` thread: accepts clients, holds the connections that have nothing to be
//! served yet, and gives each connection a thread of its own when its client sends
//! something.
//!
//! The waiting room holds at most [`Limits::max_waiting`] connections without a thread:
//! new ones whose client has not written yet, and idle keep-alive ones that a connection
//! thread gave back. They cost an fd and no thread. The accept thread polls them; one
//! whose client writes (or hangs up) gets a thread as soon as fewer than
//! [`Limits::max_connections`] are serving, oldest first, and when none is free the
//! registry frees the thread of a stuck client (see [`super::registry`]). A connection
//! idle for [`Limits::idle_timeout`] is closed. When the room is full, a new client makes
//! the connection silent longest close, so that a crowd of idle connections cannot keep a
//! client out; but only one silent for at least [`Limits::wait_grace`], so that a client
//! that connected a moment ago and has not written yet (a busy host can delay it that
//! long) is not taken for one. Until one qualifies, new clients wait in the listen
//! backlog.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, warn};

use super::conn::Connection;
use super::registry::readable;
use super::{Context, ACCEPT_RETRY};

/// How often the accept thread looks again for a thread to free while a client waits.
const RECHECK: Duration = Duration::from_millis(20);
/// How often a leaving server's accept thread looks for connections to give away.
const LEAVE_POLL: Duration = Duration::from_millis(10);

/// A connection without a thread.
#[derive(Debug)]
pub struct Waiting {
    stream: Arc<UnixStream>,
    /// When it went idle (or was accepted).
    since: Instant,
    /// Its client has written (or hung up): it needs a thread.
    ready: bool,
}

impl Waiting {
    /// A connection idle since `since`.
    pub fn new(stream: Arc<UnixStream>, since: Instant) -> Waiting {
        Waiting {
            stream,
            since,
            ready: false,
        }
    }
}

/// Runs until the server stops: `handbacks` brings the connections that threads give back.
pub fn accept_loop(listener: UnixListener, ctx: Arc<Context>, handbacks: Receiver<Waiting>) {
    let shared = &ctx.shared;
    let registry = &shared.registry;
    let limits = shared.limits;
    let mut room: VecDeque<Waiting> = VecDeque::new();
    let mut warned = false;
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        room.extend(handbacks.try_iter());
        // The VMM is leaving: every connection without a thread goes to the one that took
        // over, unread; nothing is accepted or started here any more.
        if let Some(out) = shared.outbox() {
            shared.held_seen.store(true, Ordering::Release);
            for w in room.drain(..) {
                let _ = out.send(w.stream);
            }
            let mut fds = [pollin(registry.wake_fd().as_raw_fd())];
            if poll(&mut fds, LEAVE_POLL).is_ok() && fds[0].revents != 0 {
                let _ = registry.wake_fd().read();
            }
            shared.leave_rounds.fetch_add(1, Ordering::AcqRel);
            continue;
        }
        let now = Instant::now();
        let before = room.len();
        room.retain(|w| w.ready || now.saturating_duration_since(w.since) < limits.idle_timeout);
        if room.len() < before {
            debug!("closed {} idle API connections", before - room.len());
        }
        // Threads for the clients that wrote, oldest first.
        while registry.has_room() {
            let Some(i) = room.iter().position(|w| w.ready) else {
                break;
            };
            if let Some(w) = room.remove(i) {
                start(w.stream, &ctx);
            }
        }
        let starved = room.iter().any(|w| w.ready);
        if starved {
            registry.evict_one();
        }
        let grace = limits.wait_grace;
        while room.len() > limits.max_waiting && close_oldest_silent(&mut room, grace) {}
        let full = room.len() >= limits.max_waiting;
        let held = shared.held.load(Ordering::Acquire);
        if held {
            shared.held_seen.store(true, Ordering::Release);
        }
        let accepting = !held && (!full || oldest_silent(&room, grace).is_some());

        // Wait for the eventfd, a client, or a waiting connection's client.
        let mut fds = vec![pollin(registry.wake_fd().as_raw_fd())];
        if accepting {
            fds.push(pollin(listener.as_raw_fd()));
        }
        let first_waiting = fds.len();
        let polled: Vec<usize> = (0..room.len()).filter(|&i| !room[i].ready).collect();
        fds.extend(polled.iter().map(|&i| pollin(room[i].stream.as_raw_fd())));
        // Wake for the next idle timeout, or when a silent connection may give way.
        let wait_for = if full { grace } else { limits.idle_timeout };
        let timeout = if starved {
            RECHECK
        } else {
            room.iter()
                .filter(|w| !w.ready)
                .map(|w| (w.since + wait_for).saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::MAX)
        };
        if let Err(e) = poll(&mut fds, timeout) {
            error!("cannot wait on the API socket: {e}");
            thread::sleep(ACCEPT_RETRY);
            continue;
        }
        if fds[0].revents != 0 {
            let _ = registry.wake_fd().read();
        }
        for (k, &i) in polled.iter().enumerate() {
            if fds[first_waiting + k].revents != 0 {
                room[i].ready = true;
            }
        }
        if !accepting || fds[1].revents == 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                warned = false;
                if room.len() >= limits.max_waiting {
                    close_oldest_silent(&mut room, grace);
                }
                let ready = readable(&stream);
                room.push_back(Waiting {
                    stream: Arc::new(stream),
                    since: Instant::now(),
                    ready,
                });
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // EMFILE and the like: the client waits in the backlog meanwhile.
                if !warned {
                    warn!("API socket accept failed: {e}; retrying");
                    warned = true;
                }
                thread::sleep(ACCEPT_RETRY);
            }
        }
    }
}

/// The waiting connection silent longest, if it has been silent for `grace`.
fn oldest_silent(room: &VecDeque<Waiting>, grace: Duration) -> Option<usize> {
    room.iter()
        .enumerate()
        .filter(|(_, w)| !w.ready)
        .min_by_key(|(_, w)| w.since)
        .filter(|(_, w)| w.since.elapsed() >= grace)
        .map(|(i, _)| i)
}

/// Closes the connection [`oldest_silent`] names; false if there is none.
fn close_oldest_silent(room: &mut VecDeque<Waiting>, grace: Duration) -> bool {
    match oldest_silent(room, grace).and_then(|i| room.remove(i)) {
        Some(w) => {
            debug!(
                "API waiting room full: closing a connection idle for {:?}",
                w.since.elapsed()
            );
            true
        }
        None => false,
    }
}

/// Starts the thread of a connection; without a thread the connection is closed.
fn start(stream: Arc<UnixStream>, ctx: &Arc<Context>) {
    let ticket = ctx.shared.registry.admit(Arc::clone(&stream));
    let conn = Connection::new(stream, ticket, Arc::clone(ctx));
    if let Err(e) = thread::Builder::new()
        .name("skiff-api-conn".into())
        .spawn(move || conn.serve())
    {
        warn!("cannot start a thread for an API connection: {e}");
        thread::sleep(ACCEPT_RETRY);
    }
}

fn pollin(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// poll(2) on `fds` for up to `timeout` (`Duration::MAX`: no limit); EINTR is no error.
fn poll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = if timeout == Duration::MAX {
        -1
    } else {
        // Rounded up, so that a deadline is not polled for in a busy loop.
        i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
    };
    // SAFETY: poll(2) on the pollfds of a slice we borrow mutably for the call, with its
    // length; every fd in it belongs to an object the caller keeps open meanwhile.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

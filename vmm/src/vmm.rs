//! Runs a built VM: vCPU threads, and the event loop on the calling thread (console
//! input, SIGTERM/SIGINT, device-process deaths, the guest's end), then a clean teardown.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::signal::Killable;

use crate::builder::BuiltVm;
use crate::config::ConsoleConfig;
use crate::exit::ExitReason;
use crate::vcpu::{install_kick_handler, kick_signal};

/// Errors running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// epoll, signalfd or thread creation failed.
    #[error("cannot set up the event loop: {0}")]
    EventLoop(&'static str, #[source] std::io::Error),
}

const TOKEN_EXIT: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_STDIN: u64 = 2;
const TOKEN_CONSOLE: u64 = 3;
const TOKEN_PROCESS: u64 = 100;

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts) and returns a
/// signalfd that reads them.
pub fn block_termination_signals() -> Result<OwnedFd, VmmError> {
    // SAFETY: sigset operations on a local, zero-initialised set.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if fd < 0 {
        return Err(VmmError::EventLoop(
            "signalfd",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data; read() fills at most its size.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: valid fd and buffer of `size` bytes.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n as usize == size).then_some(info.ssi_signo as i32)
}

fn ctl(epoll: &Epoll, op: ControlOperation, fd: i32, token: u64) -> Result<(), VmmError> {
    epoll
        .ctl(op, fd, EpollEvent::new(EventSet::IN, token))
        .map_err(|e| VmmError::EventLoop("epoll_ctl", e))
}

/// Runs `vm` to its end and tears it down. Returns why it ended.
pub fn run(
    mut vm: BuiltVm,
    console: &ConsoleConfig,
    signals: &OwnedFd,
) -> Result<ExitReason, VmmError> {
    let mut handles: Vec<JoinHandle<()>> = Vec::new();
    // On any error below the VM is still torn down: device processes reaped, sockets removed.
    let mut result = install_kick_handler().map_err(|e| {
        VmmError::EventLoop(
            "the vCPU kick signal",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    });
    for vcpu in vm.vcpus.drain(..) {
        if result.is_err() {
            break;
        }
        match std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index))
            .spawn(move || vcpu.run())
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                result = Err(VmmError::EventLoop("a vCPU thread", e));
                break;
            }
        }
    }
    let reason = match result {
        Ok(()) => event_loop(&mut vm, console, signals),
        Err(e) => Err(e),
    };
    teardown(vm, handles);
    reason
}

fn event_loop(
    vm: &mut BuiltVm,
    console: &ConsoleConfig,
    signals: &OwnedFd,
) -> Result<ExitReason, VmmError> {
    let epoll = Epoll::new().map_err(|e| VmmError::EventLoop("epoll", e))?;
    ctl(
        &epoll,
        ControlOperation::Add,
        vm.exit.evt.as_raw_fd(),
        TOKEN_EXIT,
    )?;
    ctl(
        &epoll,
        ControlOperation::Add,
        signals.as_raw_fd(),
        TOKEN_SIGNAL,
    )?;
    ctl(
        &epoll,
        ControlOperation::Add,
        vm.console_flush.as_raw_fd(),
        TOKEN_CONSOLE,
    )?;
    for (i, p) in vm.processes.iter().enumerate() {
        ctl(
            &epoll,
            ControlOperation::Add,
            p.pidfd.as_raw_fd(),
            TOKEN_PROCESS + i as u64,
        )?;
    }
    let mut stdin_open = *console == ConsoleConfig::Stdio;
    if stdin_open
        && ctl(
            &epoll,
            ControlOperation::Add,
            libc::STDIN_FILENO,
            TOKEN_STDIN,
        )
        .is_err()
    {
        // stdin is a regular file or /dev/null, which epoll cannot watch: no console input.
        stdin_open = false;
    }
    let mut stdin_watched = stdin_open;
    let mut pending: VecDeque<u8> = VecDeque::new();
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        if let Some(reason) = vm.exit.reason() {
            return Ok(reason);
        }
        // Feed queued console input as the UART's FIFO drains.
        if !pending.is_empty() {
            let mut serial = vm.bus.serial.lock().unwrap_or_else(|p| p.into_inner());
            let chunk: Vec<u8> = pending
                .iter()
                .take(serial.fifo_capacity())
                .copied()
                .collect();
            if !chunk.is_empty() {
                if let Ok(n) = serial.enqueue_raw_bytes(&chunk) {
                    pending.drain(..n);
                }
            }
        }
        if stdin_open && pending.is_empty() && !stdin_watched {
            ctl(
                &epoll,
                ControlOperation::Add,
                libc::STDIN_FILENO,
                TOKEN_STDIN,
            )?;
            stdin_watched = true;
        }
        let timeout = if pending.is_empty() { -1 } else { 2 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VmmError::EventLoop("epoll_wait", e)),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_EXIT => {
                    let _ = vm.exit.evt.read();
                }
                TOKEN_CONSOLE => {
                    let _ = vm.console_flush.read();
                    let mut serial = vm.bus.serial.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = serial.writer_mut().drain() {
                        log::warn!("console output: {e}");
                    }
                }
                TOKEN_SIGNAL => {
                    if let Some(sig) = read_signal(signals) {
                        vm.exit.report(ExitReason::Signal(sig));
                    }
                }
                TOKEN_STDIN => {
                    let mut buf = [0u8; 256];
                    // Straight from the fd: std's buffered stdin would keep bytes that epoll
                    // then never reports again.
                    // SAFETY: valid fd and buffer of buf.len() bytes.
                    let n = unsafe {
                        libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len())
                    };
                    // Stop watching stdin either way: at EOF or error for good, otherwise
                    // until the UART has taken what was read.
                    ctl(
                        &epoll,
                        ControlOperation::Delete,
                        libc::STDIN_FILENO,
                        TOKEN_STDIN,
                    )?;
                    stdin_watched = false;
                    match usize::try_from(n) {
                        Ok(n) if n > 0 => pending.extend(&buf[..n]),
                        _ => stdin_open = false,
                    }
                }
                t if t >= TOKEN_PROCESS => {
                    let idx = (t - TOKEN_PROCESS) as usize;
                    if let Some(p) = vm.processes.get_mut(idx) {
                        let why = p
                            .check_alive()
                            .err()
                            .unwrap_or_else(|| format!("{} hung up", p.name));
                        ctl(&epoll, ControlOperation::Delete, p.pidfd.as_raw_fd(), t)?;
                        vm.exit.report(ExitReason::DeviceFailure(why));
                    }
                }
                _ => {}
            }
        }
    }
}

fn teardown(vm: BuiltVm, handles: Vec<JoinHandle<()>>) {
    vm.stop.store(true, Ordering::Release);
    // Kick every vCPU out of KVM_RUN until its thread has finished.
    loop {
        let running: Vec<&JoinHandle<()>> = handles.iter().filter(|h| !h.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        for h in running {
            let _ = h.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for h in handles {
        if h.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
    let BuiltVm {
        vm: vm_fd,
        bus,
        processes,
        runtime_dir,
        ram,
        ..
    } = vm;
    if let Err(e) = bus
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .writer_mut()
        .drain()
    {
        log::warn!("console output: {e}");
    }
    // Closing the vhost-user connections tells the device processes to exit.
    drop(bus);
    for p in processes {
        p.stop(Duration::from_secs(2));
    }
    drop(vm_fd);
    drop(ram);
    let _ = std::fs::remove_dir_all(&runtime_dir);
}

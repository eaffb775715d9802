//! What happens on a violation: the filter traps (SECCOMP_RET_TRAP), the SIGSYS handler
//! writes one line to stderr naming the system call (number and name), the thread (its
//! name, and the filter it installed) and the program, then the process dies by SIGSYS.
//!
//! The handler is async-signal-safe: it formats into a stack buffer and makes only three
//! system calls, `prctl(PR_GET_NAME)` (the thread's name), `write(2)` and
//! `rt_sigaction(SIGSYS, SIG_DFL)`; every built-in filter allows those. It then makes the
//! trapped call again, with the same arguments: the filter traps it again while SIGSYS is
//! blocked (the handler is running), and the kernel then resets SIGSYS to its default
//! action and delivers it, so the process dies by SIGSYS even where a filter forbids one of
//! the handler's own calls (then without the line).

use std::cell::Cell;
use std::sync::OnceLock;

/// The program's name at the start of the line ("skiff", "skiff-blk", ...).
static PROGRAM: OnceLock<[u8; 16]> = OnceLock::new();

thread_local! {
    /// The filter this thread installed ("vcpu", "worker", ...); empty when it runs under
    /// the filter it inherited from the thread that started it.
    static FILTER: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn fixed(s: &str) -> [u8; 16] {
    let mut b = [0u8; 16];
    let n = s.len().min(15);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

fn until_nul(b: &[u8]) -> &[u8] {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    &b[..n]
}

/// Records the program name for the violation line (first call wins).
pub(crate) fn set_program(name: &str) {
    let _ = PROGRAM.set(fixed(name));
}

/// Records the filter the calling thread installs, for the violation line.
pub(crate) fn set_thread_filter(kind: &str) {
    FILTER.with(|f| f.set(fixed(kind)));
}

/// A line being formatted without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The violation line for system call `nr` made by thread `thread` under filter `filter`.
fn format_line(program: &[u8], nr: i32, thread: &[u8], filter: &[u8]) -> Line {
    let mut l = Line {
        buf: [0; 256],
        len: 0,
    };
    l.push(program);
    l.push(b": seccomp: thread '");
    l.push(thread);
    l.push(b"'");
    if !filter.is_empty() {
        l.push(b" (filter ");
        l.push(filter);
        l.push(b")");
    }
    l.push(b" made system call ");
    l.push_num(u64::from(nr as u32));
    let name = usize::try_from(nr)
        .ok()
        .and_then(|i| crate::syscalls::NAMES.get(i))
        .copied()
        .unwrap_or("");
    l.push(b" (");
    l.push(if name.is_empty() {
        b"unknown"
    } else {
        name.as_bytes()
    });
    l.push(b"), which its filter forbids; killed by SIGSYS\n");
    l
}

/// Offset of `si_syscall` in a SIGSYS siginfo on x86_64 (after si_signo, si_errno,
/// si_code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall is an int at this
    // offset on x86_64 (include/uapi/asm-generic/siginfo.h).
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut comm = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) };
    let program = PROGRAM.get().copied().unwrap_or([0; 16]);
    let filter = FILTER.with(Cell::get);
    let line = format_line(
        until_nul(&program),
        nr,
        until_nul(&comm),
        until_nul(&filter),
    );
    // SAFETY: write(2) of an initialised stack buffer; restoring the default action with a
    // zeroed sigaction (SIG_DFL is 0).
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        let dfl: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGSYS, &dfl, std::ptr::null_mut());
    }
    // Re-raise: the same call with the same arguments traps again while SIGSYS is blocked,
    // so the kernel delivers it with its default action (see the module comment).
    // SAFETY: the kernel passes the interrupted context; gregs holds the registers at the
    // system call, whose arguments are in rdi, rsi, rdx, r10, r8, r9.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        let g = (*uc).uc_mcontext.gregs;
        libc::syscall(
            libc::c_long::from(nr),
            g[libc::REG_RDI as usize],
            g[libc::REG_RSI as usize],
            g[libc::REG_RDX as usize],
            g[libc::REG_R10 as usize],
            g[libc::REG_R8 as usize],
            g[libc::REG_R9 as usize],
        );
        // Not reached; should the call have been allowed after all, still die by SIGSYS
        // once the handler returns and the signal is unblocked.
        libc::raise(libc::SIGSYS);
    }
}

/// Installs the SIGSYS handler (process-wide; idempotent).
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid SA_SIGINFO handler and an empty mask.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        sa.sa_sigaction = handler as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_names_call_thread_and_filter() {
        let l = format_line(b"skiff-blk", 59, b"vring_worker", b"worker");
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).expect("ascii"),
            "skiff-blk: seccomp: thread 'vring_worker' (filter worker) made system call 59 \
             (execve), which its filter forbids; killed by SIGSYS\n"
        );
        let l = format_line(b"skiff", 9999, b"x", b"");
        assert!(std::str::from_utf8(&l.buf[..l.len])
            .expect("ascii")
            .contains("thread 'x' made system call 9999 (unknown)"));
    }
}

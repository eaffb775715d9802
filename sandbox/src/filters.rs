//! The built-in filters, one per thread kind, found by running every process under
//! `strace -f` through the test suite, the upgrade benchmark and guest boots (see the
//! README's "Confinement"). Keys are the names of the `--seccomp-filter` JSON format.
//!
//! A thread keeps the filter of the thread that started it and adds its own, and a process
//! keeps the filters of the thread that forked it across exec; every filter must allow a
//! call. A filter under which narrower threads or processes start is therefore the union
//! of its own list and theirs ([`AllowList::union`]).

use libc::{c_long, SYS_clone, SYS_fcntl, SYS_ioctl, SYS_madvise, SYS_prctl, SYS_socket};

use crate::allow::{AllowList, Cond};

/// `_IOC(dir, type, nr, size)` for x86_64.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
const NONE: u64 = 0;
const W: u64 = 1;
const R: u64 = 2;

/// KVM ioctls (linux/kvm.h; sizes of kvm_regs 144, kvm_sregs 312, kvm_msrs 8,
/// kvm_vcpu_events 64, kvm_clock_data 48, kvm_mp_state 4, kvm_xsave 4096, kvm_xcrs 392,
/// kvm_debugregs 128, kvm_lapic_state 1024, kvm_cpuid2 8, kvm_irqchip 520,
/// kvm_pit_state2 112, kvm_irqfd 32). `vmm`'s tests check them against kvm-bindings.
pub mod kvm {
    use super::{ioc, NONE, R, W};
    const KVMIO: u64 = 0xae;
    /// KVM_GET_API_VERSION (on /dev/kvm).
    pub const GET_API_VERSION: u64 = ioc(NONE, KVMIO, 0x00, 0);
    /// KVM_CREATE_VM (on /dev/kvm).
    pub const CREATE_VM: u64 = ioc(NONE, KVMIO, 0x01, 0);
    /// KVM_RUN.
    pub const RUN: u64 = ioc(NONE, KVMIO, 0x80, 0);
    /// KVM_GET_REGS.
    pub const GET_REGS: u64 = ioc(R, KVMIO, 0x81, 144);
    /// KVM_GET_SREGS.
    pub const GET_SREGS: u64 = ioc(R, KVMIO, 0x83, 312);
    /// KVM_GET_MSRS (the TSC, read when a vCPU parks).
    pub const GET_MSRS: u64 = ioc(R | W, KVMIO, 0x88, 8);
    /// KVM_SET_MSRS (the TSC, written back when a parked vCPU resumes).
    pub const SET_MSRS: u64 = ioc(W, KVMIO, 0x89, 8);
    /// KVM_GET_VCPU_EVENTS.
    pub const GET_VCPU_EVENTS: u64 = ioc(R, KVMIO, 0x9f, 64);
    /// KVM_SET_CLOCK.
    pub const SET_CLOCK: u64 = ioc(W, KVMIO, 0x7b, 48);
    /// KVM_GET_CLOCK.
    pub const GET_CLOCK: u64 = ioc(R, KVMIO, 0x7c, 48);
    /// KVM_GET_MP_STATE (a parked vCPU saving its state, as the rest of this group).
    pub const GET_MP_STATE: u64 = ioc(R, KVMIO, 0x98, 4);
    /// KVM_GET_XSAVE.
    pub const GET_XSAVE: u64 = ioc(R, KVMIO, 0xa4, 4096);
    /// KVM_GET_XCRS.
    pub const GET_XCRS: u64 = ioc(R, KVMIO, 0xa6, 392);
    /// KVM_GET_DEBUGREGS.
    pub const GET_DEBUGREGS: u64 = ioc(R, KVMIO, 0xa1, 128);
    /// KVM_GET_LAPIC.
    pub const GET_LAPIC: u64 = ioc(R, KVMIO, 0x8e, 1024);
    /// KVM_GET_TSC_KHZ.
    pub const GET_TSC_KHZ: u64 = ioc(NONE, KVMIO, 0xa3, 0);
    /// KVM_GET_CPUID2.
    pub const GET_CPUID2: u64 = ioc(R | W, KVMIO, 0x91, 8);
    /// KVM_GET_IRQCHIP (the event loop saving the VM's state, with KVM_GET_PIT2).
    pub const GET_IRQCHIP: u64 = ioc(R | W, KVMIO, 0x62, 520);
    /// KVM_GET_PIT2.
    pub const GET_PIT2: u64 = ioc(R, KVMIO, 0x9f, 112);
    /// KVM_IRQFD (a VMM handing its VM over detaches the devices' interrupts from its KVM
    /// VM, and attaches them again if the hand-over fails).
    pub const IRQFD: u64 = ioc(W, KVMIO, 0x76, 32);
    /// KVM_SET_GSI_ROUTING (virtio-pci: a driver enabling or masking an MSI-X vector, from
    /// a vCPU; a VMM handing its VM over, from the event loop).
    pub const SET_GSI_ROUTING: u64 = ioc(W, KVMIO, 0x6a, 8);
}

/// TUN/TAP ioctls (linux/if_tun.h).
pub mod tun {
    use super::{ioc, R, W};
    const T: u64 = b'T' as u64;
    /// TUNSETIFF.
    pub const SETIFF: u64 = ioc(W, T, 202, 4);
    /// TUNSETOFFLOAD.
    pub const SETOFFLOAD: u64 = ioc(W, T, 208, 4);
    /// TUNGETIFF.
    pub const GETIFF: u64 = ioc(R, T, 210, 4);
    /// TUNSETVNETHDRSZ.
    pub const SETVNETHDRSZ: u64 = ioc(W, T, 216, 4);
}

/// Terminal ioctls (the VMM puts its terminal back at exit).
mod tty {
    pub const TCGETS: u64 = 0x5401;
    pub const TCSETS: u64 = 0x5402;
}

/// Thread kinds that start threads but never processes: clone3 answers ENOSYS there (a
/// second, built-in filter installed with theirs, also with `--seccomp-filter`), so glibc
/// falls back to clone, which their lists allow with CLONE_THREAD only.
pub const THREADS_ONLY: &[&str] = &["api", "blk_main", "net_main"];

/// Thread-kind keys of the VMM (`skiff`).
pub const VMM_KINDS: &[&str] = &["vmm", "vmm_launched", "api", "vcpu", "reaper"];
/// Thread-kind keys of skiff-blk.
pub const BLK_KINDS: &[&str] = &["blk_main", "blk_worker"];
/// Thread-kind keys of skiff-net.
pub const NET_KINDS: &[&str] = &["net_main", "net_worker"];

/// What every thread does: memory, locks, signals (restart_syscall included), time, closing fds, its own end, logging to stderr
/// and the violation report (prctl(PR_GET_NAME), rt_sigaction(SIGSYS)).
fn base() -> AllowList {
    AllowList::new()
        .any(&[
            libc::SYS_futex,
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mprotect,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            // The kernel resumes a call interrupted by a stop (SIGSTOP/SIGCONT, a debugger,
            // a frozen cgroup) through restart_syscall: forbidding it kills a stopped VMM.
            libc::SYS_restart_syscall,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_getrandom,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ])
        .when(SYS_madvise, &[Cond::eq32(2, libc::MADV_DONTNEED as u64)])
        // Rust std checks an fd before closing it (debug builds).
        .when(SYS_fcntl, &[Cond::eq32(1, libc::F_GETFD as u64)])
        .when(
            libc::SYS_rt_sigaction,
            &[Cond::eq32(0, libc::SIGSYS as u64)],
        )
        .when_one_of(
            SYS_prctl,
            0,
            &[libc::PR_GET_NAME as u64, libc::PR_SET_NAME as u64],
        )
}

/// Starting threads (Rust std over glibc's pthread_create): clone3, or clone for a thread
/// of this process only (CLONE_THREAD), never a new process.
fn thread_start() -> AllowList {
    let thread = libc::CLONE_THREAD as u64;
    AllowList::new()
        .any(&[
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_sched_getaffinity,
        ])
        .when(SYS_clone, &[Cond::masked(0, thread, thread)])
        // glibc's first pthread_create installs its internal handlers (SIGCANCEL 32,
        // SIGSETXID 33).
        .when_one_of(libc::SYS_rt_sigaction, 0, &[32, 33])
}

/// Installing a filter (seccompiler sets no_new_privs first): threads that install their
/// own filter start under this one.
fn filter_install() -> AllowList {
    AllowList::new().any(&[libc::SYS_seccomp]).when(
        SYS_prctl,
        &[Cond::eq32(0, libc::PR_SET_NO_NEW_PRIVS as u64)],
    )
}

/// What a device process does between the VMM's fork and its own filter: exec, the
/// dynamic loader, Rust's runtime start, opening its inherited image, TAP and metrics page
/// (the VMM's filter is still in force; the device's own filter is added on top).
fn device_start() -> AllowList {
    AllowList::new()
        .any(&[
            libc::SYS_execve,
            libc::SYS_arch_prctl,
            libc::SYS_access,
            libc::SYS_openat,
            libc::SYS_pread64,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_set_tid_address,
            libc::SYS_prlimit64,
            libc::SYS_poll,
            libc::SYS_rt_sigaction,
            libc::SYS_flock,
            libc::SYS_lseek,
        ])
        .union(&fcntl(&[
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_GET_SEALS,
        ]))
        .union(&ioctl(&[tun::GETIFF, tun::SETVNETHDRSZ, tun::SETOFFLOAD]))
}

fn fcntl(cmds: &[libc::c_int]) -> AllowList {
    let cmds: Vec<u64> = cmds.iter().map(|&c| c as u64).collect();
    AllowList::new().when_one_of(SYS_fcntl, 1, &cmds)
}

fn ioctl(reqs: &[u64]) -> AllowList {
    AllowList::new().when_one_of(SYS_ioctl, 1, reqs)
}

/// Unix sockets only: vhost-user (listen, accept, connect) and fd passing.
fn unix_sockets() -> AllowList {
    AllowList::new()
        .when(SYS_socket, &[Cond::eq32(0, libc::AF_UNIX as u64)])
        .when(libc::SYS_socketpair, &[Cond::eq32(0, libc::AF_UNIX as u64)])
        .any(&[
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_shutdown,
            libc::SYS_unlink,
        ])
}

/// The vhost-user protocol side of a device process (its frontend's messages): guest
/// memory and the inflight area arrive as fds and are mapped; kick and call eventfds are
/// added to the workers' epoll sets.
fn vhost_user_backend() -> AllowList {
    unix_sockets()
        .any(&[
            libc::SYS_read,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_eventfd2,
            libc::SYS_memfd_create,
            libc::SYS_ftruncate,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ])
        .union(&fcntl(&[
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_DUPFD_CLOEXEC,
            libc::F_ADD_SEALS,
            libc::F_GET_SEALS,
        ]))
        .union(&ioctl(&[libc::FIONBIO]))
}

/// A vring worker of skiff-blk: its queue's kicks, the image, the call eventfd.
pub fn blk_worker() -> AllowList {
    base()
        .any(&[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_read,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            libc::SYS_fallocate,
            // Its queue's io_uring (set up and restricted before any filter: crate::uring), and
            // the sleep until a completion or a kick (ppoll on the ring and a duplicate of the
            // kick eventfd).
            libc::SYS_io_uring_enter,
            libc::SYS_ppoll,
        ])
        .union(&fcntl(&[libc::F_DUPFD_CLOEXEC]))
}

/// skiff-blk's main thread and the vhost-user threads (they start the workers).
pub fn blk_main() -> AllowList {
    base()
        .union(&thread_start())
        .union(&filter_install())
        .union(&vhost_user_backend())
        .union(&blk_worker())
}

/// A vring worker of skiff-net: its queue pair's kicks, the TAP, the call eventfds.
pub fn net_worker() -> AllowList {
    base().any(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_writev,
    ])
}

/// skiff-net's main thread and the vhost-user threads: the only TUN ioctl left once the TAP
/// is open is TUNSETOFFLOAD (the driver's features arrive later).
pub fn net_main() -> AllowList {
    base()
        .union(&thread_start())
        .union(&filter_install())
        .union(&vhost_user_backend())
        .union(&ioctl(&[tun::SETOFFLOAD]))
        .union(&net_worker())
}

/// A vCPU thread: KVM_RUN and the MMIO/PIO exits it serves itself (console output, the
/// virtio transports and their vhost-user front end at DRIVER_OK, eventfds, and MSI-X
/// vectors becoming KVM routes and irqfds).
pub fn vcpu() -> AllowList {
    base()
        .union(&ioctl(&[
            kvm::RUN,
            kvm::GET_REGS,
            kvm::GET_SREGS,
            kvm::GET_VCPU_EVENTS,
            kvm::GET_MSRS,
            kvm::SET_MSRS,
            kvm::GET_MP_STATE,
            kvm::GET_XSAVE,
            kvm::GET_XCRS,
            kvm::GET_DEBUGREGS,
            kvm::GET_LAPIC,
            kvm::GET_TSC_KHZ,
            kvm::GET_CPUID2,
            kvm::IRQFD,
            kvm::SET_GSI_ROUTING,
        ]))
        .union(&unix_sockets_connected())
        .any(&[
            libc::SYS_read,
            libc::SYS_writev,
            libc::SYS_eventfd2,
            libc::SYS_fstat,
            libc::SYS_lseek,
            libc::SYS_ftruncate,
        ])
        .union(&fcntl(&[
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_DUPFD_CLOEXEC,
        ]))
}

/// An established Unix-socket connection (vhost-user front end): no new sockets.
fn unix_sockets_connected() -> AllowList {
    AllowList::new().any(&[
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_poll,
    ])
}

/// The API threads: accept, read and answer HTTP on the API socket; requests go to the
/// event loop over a channel and an eventfd. Connection threads are started here.
pub fn api() -> AllowList {
    base()
        .union(&thread_start())
        .any(&[
            libc::SYS_accept4,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_writev,
            libc::SYS_shutdown,
            libc::SYS_poll,
            libc::SYS_ppoll,
        ])
        .union(&fcntl(&[libc::F_GETFD, libc::F_GETFL, libc::F_SETFL]))
        .union(&ioctl(&[libc::FIONBIO]))
        .when(
            libc::SYS_setsockopt,
            &[
                Cond::eq32(1, libc::SOL_SOCKET as u64),
                Cond::eq32(2, libc::SO_RCVTIMEO as u64),
            ],
        )
        .when(
            libc::SYS_setsockopt,
            &[
                Cond::eq32(1, libc::SOL_SOCKET as u64),
                Cond::eq32(2, libc::SO_SNDTIMEO as u64),
            ],
        )
}

/// The thread that stops and reaps a replaced device process (itself, or through the
/// launcher).
pub fn reaper() -> AllowList {
    base()
        .any(&[libc::SYS_wait4, libc::SYS_waitid])
        // Under skiff-jailer: asking the launcher for the status, and to kill.
        .any(&[libc::SYS_sendmsg, libc::SYS_recvmsg])
        .when(libc::SYS_kill, &[Cond::eq32(1, libc::SIGKILL as u64)])
}

/// The VMM's event loop's own calls after InstanceStart: API requests, pause/resume (the
/// clock, the vCPU kick signal), device upgrades and crash restarts (negotiating with the
/// new process; asking skiff-jailer's launcher for it under the jailer), snapshots (the
/// irqchip and PIT; the state and memory files: the memory is copied in the kernel, or
/// with pread/pwrite, holes skipped with lseek), metrics, the console, teardown.
fn vmm_own() -> AllowList {
    base()
        .union(&thread_start())
        .union(&unix_sockets())
        .any(&[
            libc::SYS_read,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_ctl,
            libc::SYS_eventfd2,
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_pread64,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_geteuid,
            libc::SYS_getuid,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_flock,
            libc::SYS_ftruncate,
            libc::SYS_getdents64,
            libc::SYS_unlinkat,
            libc::SYS_rmdir,
            libc::SYS_pipe2,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
            libc::SYS_tgkill,
            libc::SYS_rt_sigaction,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_copy_file_range,
            libc::SYS_pwrite64,
            libc::SYS_fsync,
        ])
        .union(&fcntl(&[
            libc::F_GETFD,
            libc::F_SETFD,
            libc::F_GETFL,
            libc::F_SETFL,
            libc::F_DUPFD_CLOEXEC,
            libc::F_OFD_SETLK,
            libc::F_OFD_GETLK,
        ]))
        .union(&ioctl(&[
            kvm::GET_CLOCK,
            kvm::SET_CLOCK,
            kvm::GET_IRQCHIP,
            kvm::GET_PIT2,
            kvm::IRQFD,
            kvm::SET_GSI_ROUTING,
            tty::TCGETS,
            tty::TCSETS,
            libc::FIONBIO,
        ]))
        .union(&filter_install())
}

/// Starting device processes itself: fork (clone), the child's steps before exec
/// (death signal, fds), exec, watching and reaping them.
fn spawning() -> AllowList {
    AllowList::new()
        .any(&[
            libc::SYS_dup2,
            libc::SYS_kill,
            libc::SYS_wait4,
            libc::SYS_waitid,
            libc::SYS_pidfd_open,
            libc::SYS_close_range,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_vfork,
            libc::SYS_clone,
        ])
        .when_one_of(SYS_prctl, 0, &[libc::PR_SET_PDEATHSIG as u64])
}

/// The VMM's event loop when it starts its device processes itself (not under
/// skiff-jailer): they, and the reaper threads it starts, keep this filter until their own
/// is added, so it includes theirs.
pub fn vmm() -> AllowList {
    vmm_own()
        .union(&spawning())
        .union(&reaper())
        .union(&device_start())
        .union(&blk_main())
        .union(&net_main())
}

/// The VMM's event loop under skiff-jailer, whose launcher starts the device processes: no
/// fork, no exec, no wait, no kill, and nothing of the device processes' own lists.
pub fn vmm_launched() -> AllowList {
    vmm_own()
}

/// The built-in filters of a process, by key (one of [`VMM_KINDS`], [`BLK_KINDS`],
/// [`NET_KINDS`]).
pub fn built_in(kind: &str) -> Option<AllowList> {
    Some(match kind {
        "vmm" => vmm(),
        "vmm_launched" => vmm_launched(),
        "api" => api(),
        "vcpu" => vcpu(),
        "reaper" => reaper(),
        "blk_main" => blk_main(),
        "blk_worker" => blk_worker(),
        "net_main" => net_main(),
        "net_worker" => net_worker(),
        _ => return None,
    })
}

/// Every built-in filter in the `--seccomp-filter` JSON format (`skiff
/// --print-seccomp-filters`): a starting point for an operator's own file.
pub fn all_json() -> String {
    let kinds = VMM_KINDS.iter().chain(BLK_KINDS).chain(NET_KINDS);
    let entries: Vec<String> = kinds
        .filter_map(|k| built_in(k).map(|f| format!("  \"{k}\": {}", f.to_json("  "))))
        .collect();
    format!("{{\n{}\n}}\n", entries.join(",\n"))
}

/// System calls that a filter of `kind` never allows, whatever the workload: what the tests
/// try as an attacker would.
pub fn never(kind: &str) -> Vec<c_long> {
    let mut v = vec![
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_process_vm_writev,
        libc::SYS_bpf,
        libc::SYS_init_module,
        libc::SYS_setns,
        libc::SYS_unshare,
    ];
    match kind {
        "vmm" => {}
        // Under the launcher the event loop opens files (API paths) but starts nothing.
        "vmm_launched" => v.extend([libc::SYS_execve, libc::SYS_execveat, libc::SYS_vfork]),
        _ => v.extend([libc::SYS_execve, libc::SYS_execveat, libc::SYS_openat]),
    }
    // A new io_uring would do what no filter checks (sockets, file operations): skiff-blk
    // makes its rings before any filter, and no filter may make one. (So a skiff-blk started
    // under its parent's filter, by a skiff not under skiff-jailer, has no io_uring.)
    v.extend([libc::SYS_io_uring_setup, libc::SYS_io_uring_register]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_filter_allows_what_it_never_may() {
        for kind in VMM_KINDS.iter().chain(BLK_KINDS).chain(NET_KINDS) {
            let f = built_in(kind).expect("built-in");
            for nr in never(kind) {
                assert!(!f.mentions(nr), "filter {kind} allows system call {nr}");
            }
        }
    }

    #[test]
    fn io_uring_is_entered_by_skiff_blk_and_made_by_no_filtered_thread() {
        for kind in VMM_KINDS.iter().chain(BLK_KINDS).chain(NET_KINDS) {
            let f = built_in(kind).expect("built-in");
            let enters = f.mentions(libc::SYS_io_uring_enter);
            let makes = f.mentions(libc::SYS_io_uring_setup);
            // skiff-blk's threads enter their rings (the VMM's filter, which includes what
            // the device processes it starts need, too); nobody makes one under a filter.
            assert_eq!(
                enters,
                matches!(*kind, "blk_main" | "blk_worker" | "vmm"),
                "{kind}"
            );
            assert!(!makes, "{kind}");
        }
    }
}

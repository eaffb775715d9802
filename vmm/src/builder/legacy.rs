//! The VM's own devices (COM1, the i8042, the ACPI power button's line) and the console
//! and exit plumbing around them.

use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::{BuildError, BuildOptions};
use crate::config::{ConsoleConfig, VmConfig};
use crate::devices::i8042::I8042;
use crate::devices::serial::{CappedFile, ConsoleOut, ConsoleSink, SerialDevice};
use crate::devices::IrqLine;
use crate::exit::VmExit;
use crate::layout::{GED_IRQ, SERIAL_IRQ};
use crate::metrics::SerialMetrics;
use crate::state::VmState;

fn console_sink(c: &ConsoleConfig, cap: u64) -> Result<ConsoleSink, BuildError> {
    Ok(match c {
        ConsoleConfig::Stdio => ConsoleSink::Stdout(std::io::stdout()),
        ConsoleConfig::None => ConsoleSink::Null,
        ConsoleConfig::File(p) => {
            let err = |e| BuildError::ConsoleFile(p.display().to_string(), e);
            // Not O_APPEND: the cap rewrites the file from its start.
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map_err(err)?;
            ConsoleSink::File(CappedFile::new(file, cap).map_err(err)?)
        }
    })
}

/// An interrupt line of a legacy device: an eventfd that is `gsi`'s irqfd, registered now,
/// or (restoring a VM) kept in `deferred` until the interrupt controllers hold their saved
/// state (see [`finish`]).
fn irq_line(
    vm: &VmFd,
    gsi: u32,
    deferred: Option<&mut Vec<(EventFd, u32)>>,
) -> Result<IrqLine, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| BuildError::Host("an interrupt eventfd", e))?;
    match deferred {
        Some(later) => later.push((
            evt.try_clone()
                .map_err(|e| BuildError::Host("an interrupt eventfd", e))?,
            gsi,
        )),
        None => vm
            .register_irqfd(&evt, gsi)
            .map_err(|e| BuildError::KvmVm("register an irqfd", e))?,
    }
    Ok(IrqLine(evt))
}

/// The VM's own devices (COM1, the i8042) and the console and exit plumbing around them.
pub(crate) struct Legacy {
    pub(super) serial: SerialDevice,
    pub(super) i8042: I8042,
    /// Restoring: their interrupt lines, registered by [`finish`].
    pub(super) irqfds: Vec<(EventFd, u32)>,
    pub(super) exit: Arc<VmExit>,
    pub(super) panic: Arc<Mutex<Option<String>>>,
    pub(super) console_flush: EventFd,
    pub(super) serial_metrics: Arc<SerialMetrics>,
    pub(super) power_button: Option<IrqLine>,
}

/// Builds [`Legacy`], fresh or as `saved` left it.
pub(crate) fn legacy_devices(
    vm: &VmFd,
    cfg: &VmConfig,
    opts: &BuildOptions,
    saved: Option<&VmState>,
) -> Result<Legacy, BuildError> {
    let exit = Arc::new(VmExit::new().map_err(|e| BuildError::Host("the exit eventfd", e))?);
    let panic = Arc::new(Mutex::new(None));
    let console_flush = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| BuildError::Host("the console eventfd", e))?;
    let serial_metrics = Arc::new(SerialMetrics::default());
    let console = ConsoleOut::new(
        console_sink(&cfg.console, opts.console_file_limit)?,
        panic.clone(),
        Some(
            console_flush
                .try_clone()
                .map_err(|e| BuildError::Host("the console eventfd", e))?,
        ),
    )
    .with_metrics(serial_metrics.clone());
    let mut irqfds = Vec::new();
    let restoring = saved.is_some();
    let serial_irq = irq_line(vm, SERIAL_IRQ, restoring.then_some(&mut irqfds))?;
    let i8042_irq = irq_line(vm, 1, restoring.then_some(&mut irqfds))?;
    // A restored guest has ACPI if it booted with it (what the saved state says), whatever
    // this binary's default command line would give.
    let acpi = saved.map_or_else(|| cfg.acpi(), |s| s.acpi);
    let power_button = if acpi {
        Some(irq_line(vm, GED_IRQ, restoring.then_some(&mut irqfds))?)
    } else {
        None
    };
    let serial = match saved {
        None => SerialDevice::new(serial_irq, console),
        Some(s) => s
            .serial
            .build(serial_irq, console)
            .map_err(|e| BuildError::Restore(format!("the serial port: {e}")))?,
    };
    let i8042 = match saved {
        None => I8042::new(i8042_irq),
        Some(s) => I8042::from_state(i8042_irq, &s.i8042),
    };

    Ok(Legacy {
        serial,
        i8042,
        irqfds,
        exit,
        panic,
        console_flush,
        serial_metrics,
        power_button,
    })
}

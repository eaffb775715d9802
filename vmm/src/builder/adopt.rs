//! Rebuilding a running VM from what the VMM process it replaces handed over (the VMM's
//! live upgrade): the same guest-RAM memfd, mapped again; the same vhost-user connections,
//! eventfds, inflight areas, metrics pages, TAPs, images and device processes; a new KVM VM
//! and vCPUs with the saved state.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};

use super::{
    check_restorable, create_vm, finish, legacy_devices, transport, wire_device, BuildError,
    BuildOptions, BuildSteps, BuiltVm, Bus, DeviceSlot, Parts, Vcpus,
};
use crate::config::VmConfig;
use crate::device_process::DeviceProcess;
use crate::devices::metrics_page::MetricsPage;
use crate::devices::virtio::vhost_user::{FrontendFds, VhostUserDevice};
use crate::devices::virtio::RamRanges;
use crate::handover::Handover;
use crate::memory::{map_guest_ram, GuestRam};
use tapdev::Tap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

fn short() -> BuildError {
    BuildError::Restore("the hand-over has fewer fds than it announces".into())
}

/// What the new VMM builds before the old one pauses the guest: the guest RAM mapped and a
/// KVM VM over it (irqchip, PIT, memory slots). KVM_CREATE_VM and its set-up are most of
/// the adoption's time (5.7 of 7.4 ms on kvm_pvm); none of it needs the saved state, only
/// the memory size, so the guest runs on meanwhile.
pub struct Prepared {
    kvm: Kvm,
    ram: GuestRam,
    vm: VmFd,
    /// The memfd's device and inode: the hand-over's memfd must be the same file.
    file_id: (u64, u64),
}

fn file_id(f: &File) -> Result<(u64, u64), BuildError> {
    let m = f
        .metadata()
        .map_err(|e| BuildError::Restore(format!("the guest RAM memfd: {e}")))?;
    Ok((m.dev(), m.ino()))
}

/// Maps the guest RAM memfd (`mem_bytes` long) and creates a KVM VM over it.
pub fn prepare(memfd: File, mem_bytes: u64) -> Result<Prepared, BuildError> {
    let t0 = Instant::now();
    let file_id = file_id(&memfd)?;
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    let ram = map_guest_ram(memfd, mem_bytes)?;
    let vm = create_vm(&kvm, &ram)?;
    log::info!(
        "prepared a KVM VM over the guest RAM in {} us, before the pause",
        t0.elapsed().as_micros()
    );
    Ok(Prepared {
        kvm,
        ram,
        vm,
        file_id,
    })
}

/// The VM `h` describes, over `fds` (in [`Handover::fd_count`]'s order). Returns it and the
/// API's listening socket when one was handed over.
///
/// `prepared` is the KVM VM made before the pause over the same memfd ([`prepare`]).
pub fn adopt(
    cfg: &VmConfig,
    opts: &BuildOptions,
    h: &Handover,
    fds: Vec<OwnedFd>,
    prepared: Prepared,
) -> Result<(BuiltVm, Option<OwnedFd>), BuildError> {
    // Where the time goes (the pause of a live upgrade is mostly this): one log line.
    let mut steps = BuildSteps::default();
    let state = &h.state;
    let mem_bytes = cfg.mem_mib << 20;
    check_restorable(cfg, state, mem_bytes)?;
    if h.devices.len() != state.devices.len() {
        return Err(BuildError::Restore(format!(
            "{} devices handed over for {} in the state",
            h.devices.len(),
            state.devices.len()
        )));
    }
    let mut fds = fds.into_iter();
    let memfd = File::from(fds.next().ok_or_else(short)?);
    if file_id(&memfd)? != prepared.file_id {
        return Err(BuildError::Restore(
            "the hand-over's guest RAM is not the memfd the VM was prepared over".into(),
        ));
    }
    drop(memfd);
    let Prepared { kvm, ram, vm, .. } = prepared;
    let size = ram.memfd.metadata().map(|m| m.len()).unwrap_or(0);
    if size != mem_bytes {
        return Err(BuildError::Restore(format!(
            "the VM was prepared with {size} bytes of RAM; the state has {mem_bytes}"
        )));
    }
    let legacy = legacy_devices(&vm, cfg, opts, Some(state))?;
    let bus = Bus::new(&kvm, &vm, state.pci)?;
    steps.mark("legacy devices");
    let ram_ranges = RamRanges(
        ram.mem
            .iter()
            .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
            .collect(),
    );
    let launcher = opts.device_bins.launcher();
    let mut transports = Vec::new();
    let mut devices = Vec::new();
    for (i, (d, saved)) in h.devices.iter().zip(&state.devices).enumerate() {
        if d.id != saved.id {
            return Err(BuildError::Restore(format!(
                "device {i} is '{}' in the hand-over, '{}' in the state",
                d.id, saved.id
            )));
        }
        let front = FrontendFds::take(&d.frontend, &mut fds)
            .map_err(|e| BuildError::Backend(format!("device '{}'", d.id), e))?;
        let mut next = || fds.next().ok_or_else(short);
        let metrics = match d.metrics {
            true => Some(Arc::new(MetricsPage::adopt(&d.id, File::from(next()?))?)),
            false => None,
        };
        let tap = match d.tap {
            true => Some(Arc::new(Tap::adopt(&d.backing, File::from(next()?)))),
            false => None,
        };
        let image = match d.image {
            true => Some(Arc::new(File::from(next()?))),
            false => None,
        };
        let process = match &d.process {
            Some((pid, name)) => {
                let pidfd = next()?;
                let Some(l) = launcher else {
                    return Err(BuildError::Restore(format!(
                        "device '{}': its process was started by a launcher this VMM lacks",
                        d.id
                    )));
                };
                Some(DeviceProcess::adopt_launched(
                    name.clone(),
                    *pid,
                    pidfd,
                    l.clone(),
                ))
            }
            None => None,
        };
        let t = &saved.transport;
        let acked = t.active.then_some(t.acked_features);
        let dev = VhostUserDevice::adopt(&d.frontend, front, ram.mem.clone(), acked)
            .map_err(|e| BuildError::Backend(format!("device '{}': cannot take over", d.id), e))?;
        wire_device(&vm, &dev, i, true, state.pci)?;
        let name = process
            .as_ref()
            .map_or_else(|| format!("device '{}'", d.id), |p| p.name.clone());
        let mut transport = transport(Box::new(dev), name, ram_ranges.clone(), &bus, i, true)?;
        transport.restore(t).map_err(BuildError::Restore)?;
        transports.push(Mutex::new(transport));
        steps.mark("a vhost-user device");
        devices.push(DeviceSlot {
            id: d.id.clone(),
            kind: d.frontend.kind,
            transport: i,
            process,
            socket: d.socket.clone(),
            binary: d.binary.clone(),
            backing: d.backing.clone(),
            read_only: d.read_only,
            io_uring: d.io_uring,
            restarts: d.restarts,
            crashes: d.crashes,
            last_exit: d.last_exit.clone(),
            metrics,
            tap,
            mac: d.mac.clone(),
            max_queues: d.frontend.max_queues,
            image,
        });
    }
    let listener = match h.api_listener {
        true => Some(fds.next().ok_or_else(short)?),
        false => None,
    };
    if fds.next().is_some() {
        return Err(BuildError::Restore(
            "the hand-over has more fds than it announces".into(),
        ));
    }
    let built = finish(
        &kvm,
        Parts {
            vm,
            ram,
            legacy,
            transports,
            devices,
            pci: state.pci,
            steps,
        },
        cfg,
        Vcpus::Restore(state),
    )?;
    log::info!("adopted the VM in {}", built.steps.micros());
    Ok((built, listener))
}

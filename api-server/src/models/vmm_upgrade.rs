//! skiff's own VMM live upgrade: `PUT /skiff/vmm/upgrade`.

use serde::{Deserialize, Serialize};

/// `PUT /skiff/vmm/upgrade` body: replace the VMM process under the running guest.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmmUpgrade {
    /// The new skiff binary, in the cell's /bin (default: the one running now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
}

/// The answer to a VMM upgrade: who took over, and how long the guest was stopped.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct VmmUpgradeReport {
    /// The VMM that answers (and exits once the answer is out).
    pub old_pid: u32,
    /// The VMM that runs the guest from now on.
    pub new_pid: u32,
    /// The new VMM's binary.
    pub new_binary: String,
    /// vCPUs stopped → vCPUs running again in the new VMM.
    pub pause_us: u64,
    /// Starting the new VMM until it answered (before the pause).
    pub start_us: u64,
    /// The new VMM mapping the guest RAM and creating its KVM VM (before the pause).
    #[serde(default)]
    pub prepare_us: u64,
    /// Saving the VM's state (in the pause).
    pub save_us: u64,
    /// Sending the state and the fds, rebuilding the VM in the new VMM (in the pause).
    pub restore_us: u64,
    /// The supervisor told, the new VMM's vCPUs running (in the pause).
    pub resume_us: u64,
    /// The whole request.
    pub total_us: u64,
}

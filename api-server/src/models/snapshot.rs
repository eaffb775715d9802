//! Firecracker's snapshot objects: `PUT /snapshot/create` and `PUT /snapshot/load`.

use serde::{Deserialize, Serialize};

use super::{unsupported, ModelsError};

/// What a snapshot holds.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the last snapshot (not supported by skiff yet).
    Diff,
}

/// `PUT /snapshot/create`: writes the paused VM's state and memory to two files.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the VM's state goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
}

impl SnapshotCreateParams {
    /// Diff snapshots are refused by name.
    pub fn check_supported(&self) -> Result<(), ModelsError> {
        if self.snapshot_type == SnapshotType::Diff {
            return Err(unsupported(
                "snapshot_type",
                "Diff snapshots; take a Full one",
            ));
        }
        Ok(())
    }
}

/// Where a loaded snapshot's memory comes from.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum MemBackendType {
    /// A memory file written by `PUT /snapshot/create`.
    File,
    /// A userfaultfd handler's socket (not supported by skiff yet).
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file (File) or the handler's socket (Uffd).
    pub backend_path: String,
}

/// One entry of `network_overrides`: a snapshot's interface on another TAP.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as the snapshot names it.
    pub iface_id: String,
    /// The TAP it uses from now on.
    pub host_dev_name: String,
}

/// `PUT /snapshot/load`: a new VM from a snapshot, in a skiff that has not started one.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory (Firecracker's current field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// The memory file (Firecracker's older field; not together with `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// Run the VM once loaded (default: it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Dirty-page tracking for later Diff snapshots (not supported by skiff yet).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker's older name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Interfaces moved to other TAPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

impl SnapshotLoadParams {
    /// The memory file, from `mem_backend` or `mem_file_path` (exactly one), after the
    /// checks Firecracker makes and the ones for what skiff lacks.
    pub fn mem_file(&self) -> Result<&str, ModelsError> {
        if self.track_dirty_pages || self.enable_diff_snapshots {
            return Err(unsupported(
                "track_dirty_pages",
                "dirty-page tracking for Diff snapshots",
            ));
        }
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => Err(unsupported(
                "mem_file_path",
                "together with mem_backend: give only mem_backend",
            )),
            (None, None) => Err(unsupported(
                "mem_backend",
                "a snapshot needs its memory: give mem_backend {backend_type: File, backend_path}",
            )),
            (None, Some(p)) => Ok(p),
            (Some(b), None) => match b.backend_type {
                MemBackendType::File => Ok(&b.backend_path),
                MemBackendType::Uffd => Err(unsupported(
                    "mem_backend.backend_type",
                    "Uffd (a userfaultfd page-fault handler); use File",
                )),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str) -> SnapshotLoadParams {
        serde_json::from_str(json).expect(json)
    }

    #[test]
    fn firecracker_bodies_parse_and_the_memory_file_is_found() {
        let p = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"},"resume_vm":true}"#,
        );
        assert_eq!(p.mem_file().unwrap(), "m");
        assert!(p.resume_vm);
        assert_eq!(
            load(r#"{"snapshot_path":"s","mem_file_path":"old"}"#)
                .mem_file()
                .unwrap(),
            "old"
        );
        let both = load(
            r#"{"snapshot_path":"s","mem_file_path":"m","mem_backend":{"backend_type":"File","backend_path":"m"}}"#,
        );
        assert!(both
            .mem_file()
            .unwrap_err()
            .to_string()
            .contains("only mem_backend"));
        let uffd = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"sock"}}"#,
        );
        assert!(uffd.mem_file().unwrap_err().to_string().contains("Uffd"));
        assert!(load(r#"{"snapshot_path":"s"}"#).mem_file().is_err());
        let dirty = load(r#"{"snapshot_path":"s","mem_file_path":"m","track_dirty_pages":true}"#);
        assert!(dirty.mem_file().unwrap_err().to_string().contains("dirty"));
        assert!(
            serde_json::from_str::<SnapshotLoadParams>(r#"{"snapshot_path":"s","bogus":1}"#)
                .is_err()
        );
    }

    #[test]
    fn create_defaults_to_full_and_refuses_diff() {
        let c: SnapshotCreateParams =
            serde_json::from_str(r#"{"snapshot_path":"s","mem_file_path":"m"}"#).unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Full);
        assert!(c.check_supported().is_ok());
        let d: SnapshotCreateParams = serde_json::from_str(
            r#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"m"}"#,
        )
        .unwrap();
        assert!(d
            .check_supported()
            .unwrap_err()
            .to_string()
            .contains("Diff"));
    }
}

//! What the HTTP layer hands the VMM: one typed [`ApiRequest`] per HTTP request, answered
//! with an [`ApiReply`] or an [`ApiFault`]. The VMM's event loop is the only place that
//! acts on requests; the HTTP thread only parses and routes.

use serde::{Deserialize, Serialize};

use crate::models::{
    BootSource, DeviceUpgrade, Drive, InstanceActionInfo, Logger, MachineConfig,
    MachineConfigUpdate, Metrics, NetworkInterface, PartialDrive, PartialNetworkInterface,
    SnapshotCreateParams, SnapshotLoadParams, Vm, VmUpgrade, VmmUpgrade,
};

/// A parsed, routed request. It serializes so that a VMM that handed its VM over can pass
/// a request it still holds to the VMM that took over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ApiRequest {
    /// `GET /`
    GetInstanceInfo,
    /// `GET /version`
    GetVersion,
    /// `GET /machine-config`
    GetMachineConfig,
    /// `PUT /machine-config`
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /boot-source`
    PutBootSource(BootSource),
    /// `PUT /drives/{drive_id}`
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}`
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{iface_id}`
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{iface_id}`
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /actions`
    Action(InstanceActionInfo),
    /// `PATCH /vm`
    PatchVm(Vm),
    /// `GET /vm/config`
    GetVmConfig,
    /// `PUT /logger`
    PutLogger(Logger),
    /// `PUT /metrics`
    PutMetrics(Metrics),
    /// `GET /skiff/vm`
    GetSkiffVm,
    /// `GET /skiff/devices`
    GetSkiffDevices,
    /// `GET /skiff/metrics` (Prometheus text format)
    GetSkiffMetrics,
    /// `PUT /skiff/devices/{id}/upgrade`
    UpgradeDevice(String, DeviceUpgrade),
    /// `PUT /skiff/upgrade`
    UpgradeAll(VmUpgrade),
    /// `PUT /skiff/vmm/upgrade`
    UpgradeVmm(VmmUpgrade),
    /// `PUT /skiff/power-button`
    PressPowerButton,
    /// `PUT /snapshot/create`
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`
    LoadSnapshot(SnapshotLoadParams),
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ApiReply {
    /// 204, no body.
    NoContent,
    /// 200 with a JSON body.
    Json(serde_json::Value),
    /// 200 with a Prometheus text body (`text/plain; version=0.0.4`).
    Prometheus(String),
}

/// A failed request: status and the `fault_message` of the body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{status}: {message}")]
pub struct ApiFault {
    /// HTTP status (4xx for the client's fault, 500 for skiff's).
    pub status: u16,
    /// Human-readable reason.
    pub message: String,
}

impl ApiFault {
    /// 400 Bad Request: bad input, or an action not allowed in the current state.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiFault {
            status: 400,
            message: message.into(),
        }
    }

    /// 500: skiff failed to carry out a valid request.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiFault {
            status: 500,
            message: message.into(),
        }
    }
}

/// The VMM's answer to one request.
pub type ApiResult = Result<ApiReply, ApiFault>;

//! Maps an HTTP method, path and body to an [`ApiRequest`]. Pure: no I/O, no state.
//!
//! [`ROUTES`] is the one list of endpoints: [`route`] matches against it and each entry
//! carries the parser for its body, so the table and the router cannot drift apart.
//!
//! Path rules: the query string (and any fragment) is stripped; paths are matched
//! segment by segment and strictly, so a trailing slash is an unknown path except for `/`
//! itself. Firecracker endpoints skiff does not implement answer 400 naming the feature,
//! whatever the method; an unknown path answers 404 and a known path with another method
//! 405. A body on a GET is ignored.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::models::{
    BootSource, DeviceUpgrade, Drive, InstanceActionInfo, Logger, MachineConfig,
    MachineConfigUpdate, Metrics, ModelsError, NetworkInterface, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, Vm, VmUpgrade, VmmUpgrade,
};
use crate::request::{ApiFault, ApiRequest};

/// Longest drive or interface id Firecracker accepts.
pub const MAX_ID_LEN: usize = 64;

/// Builds the request of one route from the id captured in the path and the body.
type Parse = fn(Option<&str>, &[u8]) -> Result<ApiRequest, ApiFault>;

/// One endpoint the server answers.
#[derive(Clone, Copy)]
pub struct Route {
    /// HTTP method, upper case.
    pub method: &'static str,
    /// Path pattern; a `{name}` segment matches one id.
    pub path: &'static str,
    /// Short name for metrics (`"drives"`); PUT and PATCH of one path share it.
    pub name: &'static str,
    parse: Parse,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.method, self.path, self.name)
    }
}

const fn r(method: &'static str, path: &'static str, name: &'static str, parse: Parse) -> Route {
    Route {
        method,
        path,
        name,
        parse,
    }
}

/// Every route the server answers, in a stable order (metrics index into it).
pub const ROUTES: &[Route] = &[
    r("GET", "/", "instance_info", |_, _| {
        Ok(ApiRequest::GetInstanceInfo)
    }),
    r("GET", "/version", "version", |_, _| {
        Ok(ApiRequest::GetVersion)
    }),
    r("GET", "/machine-config", "machine_config", |_, _| {
        Ok(ApiRequest::GetMachineConfig)
    }),
    r("PUT", "/machine-config", "machine_config", |_, b| {
        let c: MachineConfig = json(b, "machine-config")?;
        c.check_supported().map_err(unsupported)?;
        Ok(ApiRequest::PutMachineConfig(c))
    }),
    r("PATCH", "/machine-config", "machine_config", |_, b| {
        let c: MachineConfigUpdate = json(b, "machine-config")?;
        c.check_supported().map_err(unsupported)?;
        Ok(ApiRequest::PatchMachineConfig(c))
    }),
    r("PUT", "/boot-source", "boot_source", |_, b| {
        Ok(ApiRequest::PutBootSource(json::<BootSource>(
            b,
            "boot-source",
        )?))
    }),
    r("PUT", "/drives/{drive_id}", "drives", |id, b| {
        let d: Drive = json(b, "drive")?;
        same_id("drive_id", id, &d.drive_id)?;
        d.check_supported().map_err(unsupported)?;
        Ok(ApiRequest::PutDrive(d))
    }),
    r("PATCH", "/drives/{drive_id}", "drives", |id, b| {
        let d: PartialDrive = json(b, "drive")?;
        same_id("drive_id", id, &d.drive_id)?;
        no_rate_limiter(&d.rate_limiter, || {
            format!("drives[{}].rate_limiter", d.drive_id)
        })?;
        Ok(ApiRequest::PatchDrive(d))
    }),
    r(
        "PUT",
        "/network-interfaces/{iface_id}",
        "network_interfaces",
        |id, b| {
            let n: NetworkInterface = json(b, "network-interface")?;
            same_id("iface_id", id, &n.iface_id)?;
            n.check_supported().map_err(unsupported)?;
            Ok(ApiRequest::PutNetworkInterface(n))
        },
    ),
    r(
        "PATCH",
        "/network-interfaces/{iface_id}",
        "network_interfaces",
        |id, b| {
            let n: PartialNetworkInterface = json(b, "network-interface")?;
            same_id("iface_id", id, &n.iface_id)?;
            for (field, v) in [
                ("rx_rate_limiter", &n.rx_rate_limiter),
                ("tx_rate_limiter", &n.tx_rate_limiter),
            ] {
                no_rate_limiter(v, || format!("network-interfaces[{}].{field}", n.iface_id))?;
            }
            Ok(ApiRequest::PatchNetworkInterface(n))
        },
    ),
    r("PUT", "/actions", "actions", |_, b| {
        Ok(ApiRequest::Action(json::<InstanceActionInfo>(
            b, "actions",
        )?))
    }),
    r("PATCH", "/vm", "vm", |_, b| {
        Ok(ApiRequest::PatchVm(json::<Vm>(b, "vm")?))
    }),
    r("GET", "/vm/config", "vm_config", |_, _| {
        Ok(ApiRequest::GetVmConfig)
    }),
    r("PUT", "/logger", "logger", |_, b| {
        let l: Logger = json(b, "logger")?;
        l.check_supported().map_err(unsupported)?;
        Ok(ApiRequest::PutLogger(l))
    }),
    r("PUT", "/metrics", "metrics", |_, b| {
        Ok(ApiRequest::PutMetrics(json::<Metrics>(b, "metrics")?))
    }),
    r("GET", "/skiff/vm", "skiff_vm", |_, _| {
        Ok(ApiRequest::GetSkiffVm)
    }),
    r("GET", "/skiff/devices", "skiff_devices", |_, _| {
        Ok(ApiRequest::GetSkiffDevices)
    }),
    r("GET", "/skiff/metrics", "skiff_metrics", |_, _| {
        Ok(ApiRequest::GetSkiffMetrics)
    }),
    r(
        "PUT",
        "/skiff/devices/{id}/upgrade",
        "skiff_upgrade",
        |id, b| {
            let id = id.unwrap_or_default();
            if !valid_id(id) {
                return Err(ApiFault::bad_request(format!(
                    "device id '{}' must be 1 to {MAX_ID_LEN} letters, digits or underscores",
                    shown(id)
                )));
            }
            // An empty body means "the same binary".
            let u: DeviceUpgrade = if b.iter().all(u8::is_ascii_whitespace) {
                DeviceUpgrade::default()
            } else {
                json(b, "upgrade")?
            };
            Ok(ApiRequest::UpgradeDevice(id.to_string(), u))
        },
    ),
    r("PUT", "/skiff/upgrade", "skiff_upgrade_all", |_, b| {
        let u: VmUpgrade = if b.iter().all(u8::is_ascii_whitespace) {
            VmUpgrade::default()
        } else {
            json(b, "upgrade")?
        };
        Ok(ApiRequest::UpgradeAll(u))
    }),
    r("PUT", "/skiff/vmm/upgrade", "skiff_vmm_upgrade", |_, b| {
        let u: VmmUpgrade = if b.iter().all(u8::is_ascii_whitespace) {
            VmmUpgrade::default()
        } else {
            json(b, "upgrade")?
        };
        Ok(ApiRequest::UpgradeVmm(u))
    }),
    r(
        "PUT",
        "/skiff/power-button",
        "skiff_power_button",
        |_, b| {
            // No parameters: an empty body or an empty JSON object.
            if !b.iter().all(u8::is_ascii_whitespace) {
                let v: serde_json::Value = json(b, "power-button")?;
                if v.as_object().is_none_or(|o| !o.is_empty()) {
                    return Err(ApiFault::bad_request(
                        "PUT /skiff/power-button takes no parameters (send no body or {})",
                    ));
                }
            }
            Ok(ApiRequest::PressPowerButton)
        },
    ),
    r("PUT", "/snapshot/create", "snapshot_create", |_, b| {
        let c: SnapshotCreateParams = json(b, "snapshot-create")?;
        c.check_supported().map_err(unsupported)?;
        Ok(ApiRequest::CreateSnapshot(c))
    }),
    r("PUT", "/snapshot/load", "snapshot_load", |_, b| {
        let l: SnapshotLoadParams = json(b, "snapshot-load")?;
        l.mem_file().map_err(unsupported)?;
        Ok(ApiRequest::LoadSnapshot(l))
    }),
];

/// Firecracker endpoints skiff lacks: first path segment and the feature's name. The
/// endpoint and every path below it answer 400, whatever the method.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("mmds", "MMDS (the microVM metadata service)"),
    ("vsock", "vsock"),
    ("balloon", "the balloon device"),
    ("entropy", "the entropy device"),
    ("cpu-config", "custom CPU templates"),
    ("serial", "serial console configuration"),
    ("hotplug", "memory hotplug"),
    ("pmem", "virtio-pmem devices"),
    ("memory-hotplug", "memory hotplug"),
];

/// Routes one request: the path's endpoint, the method, then the body.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiFault> {
    let (index, id) = lookup(method, path)?;
    let route = ROUTES
        .get(index)
        .ok_or_else(|| ApiFault::internal("route table"))?;
    if route.method == "GET" {
        (route.parse)(id, &[])
    } else {
        (route.parse)(id, body)
    }
}

/// The index in [`ROUTES`] that `method` and `path` select, without looking at a body;
/// the fault is the one [`route`] would give for the path and method.
pub fn resolve(method: &str, path: &str) -> Result<usize, ApiFault> {
    lookup(method, path).map(|(index, _)| index)
}

fn lookup<'p>(method: &str, path: &'p str) -> Result<(usize, Option<&'p str>), ApiFault> {
    let path = strip_query(path);
    let segments = match split(path) {
        Some(s) => s,
        None => return Err(not_found(path)),
    };
    if let Some((_, feature)) = segments
        .first()
        .and_then(|first| UNSUPPORTED.iter().find(|(seg, _)| seg == first))
    {
        return Err(ApiFault::bad_request(format!(
            "{} ({}) is not supported by skiff",
            feature,
            shown(path)
        )));
    }
    let mut allowed: Vec<&str> = Vec::new();
    for (index, route) in ROUTES.iter().enumerate() {
        let Some(id) = match_pattern(route.path, &segments) else {
            continue;
        };
        if route.method == method {
            return Ok((index, id));
        }
        allowed.push(route.method);
    }
    if allowed.is_empty() {
        return Err(not_found(path));
    }
    Err(ApiFault {
        status: 405,
        message: format!(
            "method {} is not allowed on {} (allowed: {})",
            shown(method),
            shown(path),
            allowed.join(", ")
        ),
    })
}

/// The path without its query string or fragment.
fn strip_query(path: &str) -> &str {
    path.split(['?', '#']).next().unwrap_or_default()
}

/// The segments of an absolute path; `/` has none. `None` when the path is not absolute.
fn split(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    Some(rest.split('/').collect())
}

/// `Some(captured id)` when `segments` fit `pattern`.
fn match_pattern<'p>(pattern: &str, segments: &[&'p str]) -> Option<Option<&'p str>> {
    let want = split(pattern)?;
    if want.len() != segments.len() {
        return None;
    }
    let mut id = None;
    for (w, s) in want.iter().zip(segments) {
        if w.starts_with('{') {
            id = Some(*s);
        } else if w != s {
            return None;
        }
    }
    Some(id)
}

/// Parses a required JSON body; `what` names the object in messages.
fn json<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiFault> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiFault::bad_request(format!(
            "missing body: a JSON {what} object is required"
        )));
    }
    // serde_path_to_error names the field a type error is in ("vcpu_count: invalid type").
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiFault::bad_request(format!("invalid {what} body: {inner}"))
        } else {
            ApiFault::bad_request(format!("invalid {what} body: {path}: {inner}"))
        }
    })?;
    // Trailing garbage after the object is an error too.
    de.end()
        .map_err(|e| ApiFault::bad_request(format!("invalid {what} body: {e}")))?;
    Ok(value)
}

fn unsupported(e: ModelsError) -> ApiFault {
    ApiFault::bad_request(e.to_string())
}

/// Checks the path id (Firecracker's rule) and that the body names the same object.
fn same_id(kind: &str, path_id: Option<&str>, body_id: &str) -> Result<(), ApiFault> {
    let path_id = path_id.unwrap_or_default();
    if !valid_id(path_id) {
        return Err(ApiFault::bad_request(format!(
            "invalid {kind} '{}' in the path: ids are 1 to {MAX_ID_LEN} characters of \
             A-Z, a-z, 0-9 and _",
            shown(path_id)
        )));
    }
    if path_id != body_id {
        return Err(ApiFault::bad_request(format!(
            "{kind} in the path ('{}') does not match {kind} in the body ('{}')",
            shown(path_id),
            shown(body_id)
        )));
    }
    Ok(())
}

/// Firecracker's id rule: 1 to 64 characters of `[A-Za-z0-9_]`.
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn no_rate_limiter(v: &Option<Value>, field: impl FnOnce() -> String) -> Result<(), ApiFault> {
    if v.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiFault::bad_request(format!(
            "{}: rate limiting is not supported by skiff",
            field()
        )));
    }
    Ok(())
}

fn not_found(path: &str) -> ApiFault {
    ApiFault {
        status: 404,
        message: format!("no endpoint at '{}'", shown(path)),
    }
}

/// Client-supplied text for a message, cut short when it is long.
fn shown(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests;

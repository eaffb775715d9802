//! One snapshot of every counter, rendered as a Firecracker-style JSON metrics line
//! (`PUT /metrics` + `FlushMetrics`, and every 60 s) or as Prometheus text
//! (`GET /skiff/metrics`), so both outputs always carry the same counters.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::devices::virtio::vhost_user::DeviceKind;
use crate::vmm::Vmm;

/// Counters of one virtio device.
pub struct DeviceCounters {
    /// drive_id / iface_id.
    pub id: String,
    /// "block" or "net".
    pub kind: &'static str,
    /// Times its device process was replaced.
    pub restarts: u32,
    /// The device process's own counters (from its metrics page).
    pub counters: Vec<(String, u64)>,
}

/// One API counter.
pub struct ApiCounter {
    /// HTTP method.
    pub method: String,
    /// Route pattern, e.g. `/drives/{drive_id}`.
    pub path: String,
    /// HTTP status.
    pub status: u16,
    /// Requests.
    pub count: u64,
}

/// Every counter at one moment.
pub struct Snapshot {
    /// Milliseconds since the epoch.
    pub utc_timestamp_ms: u64,
    /// Lifecycle state.
    pub state: &'static str,
    /// Since InstanceStart.
    pub uptime_ms: Option<u64>,
    /// Time spent paused.
    pub paused_ms: u64,
    /// Per vCPU: (exit reason, count).
    pub vcpu_exits: Vec<Vec<(&'static str, u64)>>,
    /// Console: (name, value).
    pub serial: Vec<(&'static str, u64)>,
    /// Lifecycle counters: (name, value).
    pub vm: Vec<(&'static str, u64)>,
    /// Logger: (name, value).
    pub logger: Vec<(&'static str, u64)>,
    /// Device-process switch pauses: cumulative (bound µs, count), sum µs, count, max µs.
    pub switch_pause: Histogram,
    /// VMM live-upgrade pauses, the same way.
    pub vmm_upgrade_pause: Histogram,
    /// API requests.
    pub api: Vec<ApiCounter>,
    /// Devices.
    pub devices: Vec<DeviceCounters>,
}

/// A pause histogram: cumulative (bound µs, count), sum µs, count, max µs.
pub type Histogram = (Vec<(Option<u64>, u64)>, u64, u64, u64);

fn histogram_json(h: &Histogram) -> serde_json::Value {
    json!({
        "count": h.2,
        "sum": h.1,
        "max": h.3,
        "buckets": h.0.iter().map(|(le, n)| {
            json!({"le": le.map_or("+Inf".to_string(), |v| v.to_string()), "count": n})
        }).collect::<Vec<_>>(),
    })
}

/// The HELP and TYPE lines of family `skiff_NAME`.
fn family(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP skiff_{name} {help}\n# TYPE skiff_{name} {kind}");
}

/// One histogram family `skiff_NAME` in seconds.
fn histogram_prometheus(o: &mut String, name: &str, help: &str, h: &Histogram) {
    family(o, name, "histogram", help);
    let (buckets, sum_us, count, _) = h;
    for (le, n) in buckets {
        let le = le.map_or("+Inf".to_string(), |us| format!("{}", us as f64 / 1e6));
        let _ = writeln!(o, "skiff_{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(
        o,
        "skiff_{name}_sum {}\nskiff_{name}_count {count}",
        *sum_us as f64 / 1e6
    );
}

impl Snapshot {
    /// Reads every counter of `vmm`.
    pub fn take(vmm: &Vmm) -> Snapshot {
        let utc_timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let m = &vmm.vm_metrics;
        let mut s = Snapshot {
            utc_timestamp_ms,
            state: vmm.lifecycle.as_str(),
            uptime_ms: None,
            paused_ms: 0,
            vcpu_exits: Vec::new(),
            serial: Vec::new(),
            vm: vec![
                ("pauses", g(&m.pauses)),
                ("resumes", g(&m.resumes)),
                ("metrics_flushes", g(&m.flushes)),
                ("metrics_flushes_missed", g(&m.flushes_missed)),
                ("media_changes", g(&m.media_changes)),
                ("upgrades_failed", g(&m.upgrades_failed)),
                ("device_crash_restarts", g(&m.crash_restarts)),
            ],
            switch_pause: m.switch_pause.snapshot(),
            vmm_upgrade_pause: m.vmm_upgrade_pause.snapshot(),
            logger: vec![
                ("lines", g(&crate::logger::LINES)),
                ("missed_lines", g(&crate::logger::MISSED_LINES)),
            ],
            api: vmm
                .api_metrics()
                .map(|a| {
                    a.snapshot()
                        .into_iter()
                        .map(|c| ApiCounter {
                            method: c.method.to_string(),
                            path: c.path.to_string(),
                            status: c.status,
                            count: c.count,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            devices: Vec::new(),
        };
        if let Some(vm) = &vmm.vm {
            s.uptime_ms = Some(vm.started.elapsed().as_millis() as u64);
            let paused_now = vm.paused_since.map(|p| p.elapsed()).unwrap_or_default();
            s.paused_ms = (vm.paused_total + paused_now).as_millis() as u64;
            s.vcpu_exits = vm
                .built
                .vcpu_metrics
                .iter()
                .map(|v| v.exits().to_vec())
                .collect();
            let sm = &vm.built.serial_metrics;
            s.serial = vec![
                ("bytes_out", g(&sm.bytes_out)),
                ("bytes_in", g(&sm.bytes_in)),
                ("write_errors", g(&sm.write_errors)),
            ];
            s.devices = vm
                .built
                .devices
                .iter()
                .map(|d| DeviceCounters {
                    id: d.id.clone(),
                    kind: kind_name(d.kind),
                    restarts: d.restarts,
                    counters: d.counters(),
                })
                .collect();
        }
        s
    }

    /// Firecracker-style metrics: one JSON object per line.
    pub fn json_line(&self) -> String {
        let pairs = |v: &[(&str, u64)]| -> Value {
            Value::Object(v.iter().map(|(k, n)| (k.to_string(), json!(n))).collect())
        };
        let mut vcpu_total: Vec<(&str, u64)> = Vec::new();
        for exits in &self.vcpu_exits {
            for (i, (name, n)) in exits.iter().enumerate() {
                match vcpu_total.get_mut(i) {
                    Some(t) => t.1 += n,
                    None => vcpu_total.push((name, *n)),
                }
            }
        }
        let mut api = Map::new();
        for c in &self.api {
            api.insert(
                format!("{} {} {}", c.method, c.path, c.status),
                json!(c.count),
            );
        }
        let mut devices = Map::new();
        for d in &self.devices {
            let mut o = Map::new();
            o.insert("kind".into(), json!(d.kind));
            o.insert("restarts".into(), json!(d.restarts));
            for (k, v) in &d.counters {
                o.insert(k.clone(), json!(v));
            }
            devices.insert(d.id.clone(), Value::Object(o));
        }
        let v = json!({
            "utc_timestamp_ms": self.utc_timestamp_ms,
            "vm": {
                "state": self.state,
                "uptime_ms": self.uptime_ms,
                "paused_ms": self.paused_ms,
                "counters": pairs(&self.vm),
            },
            "vcpu": pairs(&vcpu_total),
            "per_vcpu": self.vcpu_exits.iter().map(|e| pairs(e)).collect::<Vec<_>>(),
            "uart": pairs(&self.serial),
            "logger": pairs(&self.logger),
            "api_server": api,
            "devices": devices,
            "device_switch_pause_us": histogram_json(&self.switch_pause),
            "vmm_upgrade_pause_us": histogram_json(&self.vmm_upgrade_pause),
        });
        format!("{v}\n")
    }

    /// Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut o = String::new();
        family(
            &mut o,
            "vm_state",
            "gauge",
            "1 for the VM's current lifecycle state.",
        );
        for st in ["Not started", "Running", "Paused", "Stopped"] {
            let _ = writeln!(
                o,
                "skiff_vm_state{{state=\"{st}\"}} {}",
                u8::from(st == self.state)
            );
        }
        family(
            &mut o,
            "vm_uptime_seconds",
            "gauge",
            "Seconds since InstanceStart.",
        );
        let _ = writeln!(
            o,
            "skiff_vm_uptime_seconds {}",
            self.uptime_ms.unwrap_or(0) as f64 / 1000.0
        );
        family(
            &mut o,
            "vm_paused_seconds_total",
            "counter",
            "Seconds spent paused.",
        );
        let _ = writeln!(
            o,
            "skiff_vm_paused_seconds_total {}",
            self.paused_ms as f64 / 1000.0
        );
        for (name, n) in &self.vm {
            family(
                &mut o,
                &format!("vm_{name}_total"),
                "counter",
                "VM lifecycle events.",
            );
            let _ = writeln!(o, "skiff_vm_{name}_total {n}");
        }
        family(
            &mut o,
            "vcpu_exits_total",
            "counter",
            "vCPU exits to the VMM by reason.",
        );
        for (i, exits) in self.vcpu_exits.iter().enumerate() {
            for (reason, n) in exits {
                let _ = writeln!(
                    o,
                    "skiff_vcpu_exits_total{{vcpu=\"{i}\",reason=\"{reason}\"}} {n}"
                );
            }
        }
        family(&mut o, "uart_total", "counter", "Console (COM1) counters.");
        for (name, n) in &self.serial {
            let _ = writeln!(o, "skiff_uart_total{{counter=\"{name}\"}} {n}");
        }
        family(
            &mut o,
            "logger_total",
            "counter",
            "Logger lines written and lost.",
        );
        for (name, n) in &self.logger {
            let _ = writeln!(o, "skiff_logger_total{{counter=\"{name}\"}} {n}");
        }
        family(
            &mut o,
            "api_requests_total",
            "counter",
            "API requests by route and status.",
        );
        for c in &self.api {
            let _ = writeln!(
                o,
                "skiff_api_requests_total{{method=\"{}\",path=\"{}\",status=\"{}\"}} {}",
                c.method, c.path, c.status, c.count
            );
        }
        histogram_prometheus(
            &mut o,
            "device_switch_pause_seconds",
            "Guest-visible pause of device-process switches (upgrades, media changes).",
            &self.switch_pause,
        );
        histogram_prometheus(
            &mut o,
            "vmm_upgrade_pause_seconds",
            "Guest-visible pause of live upgrades of the VMM process.",
            &self.vmm_upgrade_pause,
        );
        family(
            &mut o,
            "device_restarts_total",
            "counter",
            "Times a device process was replaced.",
        );
        for d in &self.devices {
            let _ = writeln!(
                o,
                "skiff_device_restarts_total{{device=\"{}\",kind=\"{}\"}} {}",
                d.id, d.kind, d.restarts
            );
        }
        family(
            &mut o,
            "device_total",
            "counter",
            "Counters reported by the device processes.",
        );
        for d in &self.devices {
            for (k, v) in &d.counters {
                let _ = writeln!(
                    o,
                    "skiff_device_total{{device=\"{}\",kind=\"{}\",counter=\"{k}\"}} {v}",
                    d.id, d.kind
                );
            }
        }
        o
    }
}

/// "block" or "net".
pub fn kind_name(k: DeviceKind) -> &'static str {
    match k {
        DeviceKind::Block => "block",
        DeviceKind::Net => "net",
    }
}

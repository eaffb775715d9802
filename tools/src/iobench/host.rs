//! The host's own figure for a workload: fio with io_uring on a copy of the image on the
//! same file system, the same block size, queue depth per queue and number of queues (fio
//! jobs), O_DIRECT or buffered. It is the physical limit here, no virtio in the way.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::load::Pattern;
use crate::stats::Stats;
use crate::BenchError;

/// What fio measured.
pub struct FioResult {
    /// Requests completed after the ramp.
    pub requests: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Seconds measured (each job's runtime).
    pub secs: f64,
    /// Completion latency, µs.
    pub lat: Stats,
    /// fio's CPU seconds (user + system, all jobs).
    pub cpu_secs: f64,
}

/// Runs fio on `file` (`size` bytes).
pub fn fio(
    file: &Path,
    size: u64,
    p: &Pattern,
    queues: usize,
    direct: bool,
    warmup: Duration,
    secs: Duration,
) -> Result<FioResult, BenchError> {
    let rw = match (p.write, p.random) {
        (false, true) => "randread",
        (true, true) => "randwrite",
        (false, false) => "read",
        (true, false) => "write",
    };
    let mut cmd = Command::new("fio");
    cmd.arg("--name=host")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={}", p.bs))
        .arg(format!("--iodepth={}", p.qd))
        .arg(format!("--numjobs={queues}"))
        .arg("--ioengine=io_uring")
        .arg(format!("--direct={}", u8::from(direct)))
        .arg("--thread")
        .arg("--time_based")
        .arg(format!("--ramp_time={}ms", warmup.as_millis().max(1)))
        .arg(format!("--runtime={}ms", secs.as_millis().max(1)))
        .arg("--norandommap")
        .arg("--randrepeat=0")
        .arg("--group_reporting")
        .arg("--output-format=json");
    if p.random {
        cmd.arg(format!("--size={size}"));
    } else {
        // Each job through its own part, as each queue of the synthetic driver.
        let part = size / queues as u64 / p.bs * p.bs;
        cmd.arg(format!("--size={part}"))
            .arg(format!("--offset_increment={part}"));
    }
    let out = cmd
        .output()
        .map_err(|e| BenchError::Host("running fio (Debian's fio package)".into(), e))?;
    if !out.status.success() {
        return Err(BenchError::Fio(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    // fio may print notes before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.find('{').map_or("", |i| &text[i..]);
    let doc: Value =
        serde_json::from_str(json).map_err(|e| BenchError::Fio(format!("its JSON output: {e}")))?;
    parse(&doc, p.write)
}

fn parse(doc: &Value, write: bool) -> Result<FioResult, BenchError> {
    let job = &doc["jobs"][0];
    let dir = &job[if write { "write" } else { "read" }];
    let num = |v: &Value, what: &str| {
        v.as_f64()
            .ok_or_else(|| BenchError::Fio(format!("no {what} in its JSON output")))
    };
    let requests = num(&dir["total_ios"], "total_ios")? as u64;
    let bytes = num(&dir["io_bytes"], "io_bytes")? as u64;
    // job_runtime is the sum over the jobs; runtime is the group's wall time.
    let secs = num(&dir["runtime"], "runtime")? / 1000.0;
    let job_secs = num(&job["job_runtime"], "job_runtime")? / 1000.0;
    let pct = &dir["clat_ns"]["percentile"];
    let lat = Stats {
        n: requests as usize,
        p50: num(&pct["50.000000"], "the median latency")? / 1000.0,
        p99: num(&pct["99.000000"], "the 99th percentile latency")? / 1000.0,
        max: num(&dir["clat_ns"]["max"], "the largest latency")? / 1000.0,
        mean: num(&dir["clat_ns"]["mean"], "the mean latency")? / 1000.0,
    };
    let cpu_pct = num(&job["usr_cpu"], "usr_cpu")? + num(&job["sys_cpu"], "sys_cpu")?;
    Ok(FioResult {
        requests,
        bytes,
        secs,
        lat,
        cpu_secs: cpu_pct / 100.0 * job_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let doc: Value = serde_json::from_str(
            r#"{"jobs": [{"usr_cpu": 10.0, "sys_cpu": 30.0, "job_runtime": 4000,
                "read": {"total_ios": 1000, "io_bytes": 4096000, "runtime": 2000,
                         "clat_ns": {"max": 150000, "mean": 25000,
                                     "percentile": {"50.000000": 20000, "99.000000": 90000}}},
                "write": {"total_ios": 0}}]}"#,
        )
        .unwrap();
        let r = parse(&doc, false).unwrap();
        assert_eq!((r.requests, r.bytes), (1000, 4_096_000));
        assert_eq!(
            (r.secs, r.lat.p50, r.lat.p99, r.lat.max),
            (2.0, 20.0, 90.0, 150.0)
        );
        assert!((r.cpu_secs - 1.6).abs() < 1e-9);
        assert!(parse(&doc, true).is_err());
    }
}

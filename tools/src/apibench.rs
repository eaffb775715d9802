//! API latency benchmark: skiff's HTTP API beside QEMU's QMP (and Firecracker's API when a
//! `firecracker` binary is on PATH), side by side in one run on this machine.
//!
//! For each monitor: N starts, timing process spawn → control socket accepting a connection
//! → first answer; then over one keep-alive connection R read requests (`GET /`; QMP
//! `query-status`) and R write requests (`PUT /machine-config` alternating 1 and 2 vCPUs;
//! QMP `qom-set /machine dump-guest-core` alternating false and true), and F of each over a
//! fresh connection per request (QMP: connect, greeting, `qmp_capabilities`, command).
//! Reports p50 / p99 / max and the ratios skiff/QEMU, and writes JSON to `--out`.
//!
//! No guest is needed or booted: every request is answered before InstanceStart (QEMU runs
//! `-machine none -S`), so this runs at native speed on the outer machine, also where the
//! host's KVM cannot boot guests. tools/apibench.sh builds and runs it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use api_server::client::ApiClient;
use clap::Parser;
use serde_json::{json, Value};

#[path = "stats.rs"]
mod stats;
use stats::Stats;

/// How often a starting monitor's socket is polled.
const POLL: Duration = Duration::from_micros(100);
/// Longest wait for a monitor to start serving.
const START_LIMIT: Duration = Duration::from_secs(20);
/// Bound on every read and write of a request.
const IO_LIMIT: Duration = Duration::from_secs(10);

/// Control-API latency: skiff vs QEMU QMP (vs Firecracker if installed), on this machine.
#[derive(Debug, Parser)]
#[command(name = "apibench")]
struct Args {
    /// skiff binary (default: `skiff` beside this binary).
    #[arg(long, value_name = "PATH")]
    skiff: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Firecracker binary (default: `firecracker` on PATH, skipped when absent).
    #[arg(long, value_name = "PATH")]
    firecracker: Option<PathBuf>,
    /// skiff-jailer binary: skiff is also measured started through it (default:
    /// `skiff-jailer` beside skiff; needs root, skipped otherwise).
    #[arg(long, value_name = "PATH")]
    jailer: Option<PathBuf>,
    /// Process starts per monitor.
    #[arg(long, default_value_t = 20)]
    starts: usize,
    /// Requests of each kind over one keep-alive connection.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Requests of each kind over a fresh connection each.
    #[arg(long, default_value_t = 1_000)]
    fresh: usize,
    /// Untimed requests before each timed series (at least this many)...
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// ... and for at least this many milliseconds: on a busy 2-CPU host a new process's
    /// threads can share a CPU with another busy thread for a few hundred ms until the
    /// scheduler moves them, which would show up as multi-ms outliers of the first series.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    warmup_ms: u64,
    /// Machine-readable results.
    #[arg(long, value_name = "FILE", default_value = "target/apibench.json")]
    out: PathBuf,
}

impl Args {
    fn warmup(&self) -> Warmup {
        Warmup {
            requests: self.warmup,
            at_least: Duration::from_millis(self.warmup_ms),
        }
    }
}

/// The series measured for one monitor; absent ones were not measurable.
#[derive(Default)]
struct Report {
    version: String,
    /// What the read and write requests were.
    read: &'static str,
    write: &'static str,
    start_accept: Option<Stats>,
    start_answer: Option<Stats>,
    read_keepalive: Option<Stats>,
    write_keepalive: Option<Stats>,
    read_fresh: Option<Stats>,
    write_fresh: Option<Stats>,
}

/// One row of the results: JSON key, printed label, and the series.
type Row = (&'static str, &'static str, fn(&Report) -> Option<Stats>);

/// The rows, in print order.
const ROWS: &[Row] = &[
    ("start_to_accept", "start → socket accepts", |r| {
        r.start_accept
    }),
    ("start_to_first_answer", "start → first answer", |r| {
        r.start_answer
    }),
    ("read_keepalive", "read, keep-alive", |r| r.read_keepalive),
    ("write_keepalive", "write, keep-alive", |r| {
        r.write_keepalive
    }),
    ("read_fresh_connection", "read, new connection", |r| {
        r.read_fresh
    }),
    ("write_fresh_connection", "write, new connection", |r| {
        r.write_fresh
    }),
];

/// A monitor process, killed and reaped when dropped.
struct Monitor {
    child: Child,
}

impl Monitor {
    fn spawn(cmd: &mut Command) -> Result<Monitor, String> {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        Ok(Monitor { child })
    }

    /// Polls `socket` until it accepts a connection.
    fn wait_accept(&mut self, socket: &Path) -> Result<UnixStream, String> {
        let start = Instant::now();
        loop {
            if let Ok(s) = UnixStream::connect(socket) {
                return Ok(s);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited before serving its socket ({status})"));
            }
            if start.elapsed() > START_LIMIT {
                return Err(format!("socket not accepting after {START_LIMIT:?}"));
            }
            thread::sleep(POLL);
        }
    }
}

impl Monitor {
    /// SIGTERM and wait: lets skiff-jailer remove the cell before the next start.
    fn terminate(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start one kind of monitor and talk to it.
trait Protocol {
    /// Where start `tag` serves its control API.
    fn socket(&self, dir: &Path, tag: &str) -> PathBuf {
        dir.join(format!("{tag}.sock"))
    }
    /// Ends with SIGTERM and a wait, not SIGKILL.
    fn graceful(&self) -> bool {
        false
    }
    /// The command that serves the control API on `socket`.
    fn command(&self, socket: &Path) -> Command;
    /// Connected and ready for requests; the first answer came back.
    fn first_answer(&self, stream: UnixStream, socket: &Path) -> Result<(), String>;
    /// Measures the steady-state series against a running monitor.
    fn series(&self, socket: &Path, a: &Args, r: &mut Report) -> Result<(), String>;
}

/// How long to warm up before a timed series.
#[derive(Clone, Copy)]
struct Warmup {
    requests: usize,
    at_least: Duration,
}

/// Times `n` calls of `f` after untimed warm-up calls.
fn timed(
    warmup: Warmup,
    n: usize,
    mut f: impl FnMut(usize) -> Result<(), String>,
) -> Result<Option<Stats>, String> {
    let start = Instant::now();
    let mut i = 0;
    while i < warmup.requests || start.elapsed() < warmup.at_least {
        f(i)?;
        i += 1;
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i)?;
        samples.push(t.elapsed());
    }
    Ok(Stats::of(&samples))
}

/// skiff and Firecracker: the same HTTP API, driven by api-server's client.
struct Http {
    binary: PathBuf,
    extra: &'static [&'static str],
}

const MACHINE_CONFIGS: [&[u8]; 2] = [
    br#"{"vcpu_count":1,"mem_size_mib":128}"#,
    br#"{"vcpu_count":2,"mem_size_mib":128}"#,
];

fn http_call(
    c: &mut ApiClient,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(), String> {
    let r = c
        .raw(method, path, body)
        .map_err(|e| format!("{method} {path}: {e}"))?;
    if r.is_success() {
        Ok(())
    } else {
        Err(format!(
            "{method} {path}: HTTP {} {}",
            r.status,
            r.fault_message().unwrap_or_default()
        ))
    }
}

fn http_get(c: &mut ApiClient, _: usize) -> Result<(), String> {
    http_call(c, "GET", "/", None)
}

fn http_put(c: &mut ApiClient, i: usize) -> Result<(), String> {
    http_call(c, "PUT", "/machine-config", Some(MACHINE_CONFIGS[i % 2]))
}

impl Protocol for Http {
    fn command(&self, socket: &Path) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--api-sock").arg(socket).args(self.extra);
        c
    }

    fn first_answer(&self, stream: UnixStream, socket: &Path) -> Result<(), String> {
        Http::first_answer_of(stream, socket)
    }

    fn series(&self, socket: &Path, a: &Args, r: &mut Report) -> Result<(), String> {
        Http::series_of(socket, a, r)
    }
}

impl Http {
    fn first_answer_of(_stream: UnixStream, socket: &Path) -> Result<(), String> {
        let mut c = ApiClient::new(socket).with_timeout(IO_LIMIT);
        http_get(&mut c, 0)
    }

    fn series_of(socket: &Path, a: &Args, r: &mut Report) -> Result<(), String> {
        let mut c = ApiClient::connect_timeout(socket, START_LIMIT)
            .map_err(|e| e.to_string())?
            .with_timeout(IO_LIMIT);
        r.version = c.version().map_err(|e| e.to_string())?.firecracker_version;
        r.read_keepalive = timed(a.warmup(), a.requests, |i| http_get(&mut c, i))?;
        r.write_keepalive = timed(a.warmup(), a.requests, |i| http_put(&mut c, i))?;
        let fresh = || ApiClient::new(socket).with_timeout(IO_LIMIT);
        r.read_fresh = timed(a.warmup(), a.fresh, |i| http_get(&mut fresh(), i))?;
        r.write_fresh = timed(a.warmup(), a.fresh, |i| http_put(&mut fresh(), i))?;
        Ok(())
    }
}

/// QEMU's QMP: one JSON object per line each way.
struct Qmp {
    binary: PathBuf,
}

struct QmpConn {
    reader: BufReader<UnixStream>,
    line: String,
}

const QOM_SET: [&[u8]; 2] = [
    b"{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"/machine\",\"property\":\"dump-guest-core\",\"value\":false}}\n",
    b"{\"execute\":\"qom-set\",\"arguments\":{\"path\":\"/machine\",\"property\":\"dump-guest-core\",\"value\":true}}\n",
];
const QUERY_STATUS: &[u8] = b"{\"execute\":\"query-status\"}\n";

impl QmpConn {
    /// Reads the greeting and leaves capabilities negotiation mode.
    fn open(stream: UnixStream) -> Result<(QmpConn, String), String> {
        stream
            .set_read_timeout(Some(IO_LIMIT))
            .map_err(|e| e.to_string())?;
        let mut c = QmpConn {
            reader: BufReader::new(stream),
            line: String::new(),
        };
        c.read_line()?;
        let greeting = c.line.clone();
        if !greeting.contains("\"QMP\"") {
            return Err(format!("unexpected QMP greeting {greeting:?}"));
        }
        c.execute(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        Ok((c, greeting))
    }

    fn read_line(&mut self) -> Result<(), String> {
        self.line.clear();
        match self.reader.read_line(&mut self.line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Sends one command and waits for its `return` (events in between are skipped).
    fn execute(&mut self, command: &[u8]) -> Result<(), String> {
        self.reader
            .get_mut()
            .write_all(command)
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            self.read_line()?;
            if self.line.starts_with("{\"return\"") {
                return Ok(());
            }
            if self.line.starts_with("{\"error\"") {
                return Err(format!("QMP error: {}", self.line.trim()));
            }
        }
    }
}

fn qmp_connect(socket: &Path) -> Result<QmpConn, String> {
    let s = UnixStream::connect(socket).map_err(|e| format!("QMP connect: {e}"))?;
    QmpConn::open(s).map(|(c, _)| c)
}

fn qmp_read(c: &mut QmpConn, _: usize) -> Result<(), String> {
    c.execute(QUERY_STATUS)
}

fn qmp_write(c: &mut QmpConn, i: usize) -> Result<(), String> {
    c.execute(QOM_SET[i % 2])
}

impl Protocol for Qmp {
    fn command(&self, socket: &Path) -> Command {
        let mut c = Command::new(&self.binary);
        c.args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()));
        c
    }

    fn first_answer(&self, stream: UnixStream, _socket: &Path) -> Result<(), String> {
        let (mut c, _) = QmpConn::open(stream)?;
        qmp_read(&mut c, 0)
    }

    fn series(&self, socket: &Path, a: &Args, r: &mut Report) -> Result<(), String> {
        let s = UnixStream::connect(socket).map_err(|e| format!("QMP connect: {e}"))?;
        let (mut c, greeting) = QmpConn::open(s)?;
        let v: Value = serde_json::from_str(&greeting).map_err(|e| format!("QMP greeting: {e}"))?;
        let q = &v["QMP"]["version"]["qemu"];
        r.version = format!("{}.{}.{}", q["major"], q["minor"], q["micro"]);
        r.read_keepalive = timed(a.warmup(), a.requests, |i| qmp_read(&mut c, i))?;
        r.write_keepalive = timed(a.warmup(), a.requests, |i| qmp_write(&mut c, i))?;
        drop(c);
        r.read_fresh = timed(a.warmup(), a.fresh, |i| {
            qmp_read(&mut qmp_connect(socket)?, i)
        })?;
        r.write_fresh = timed(a.warmup(), a.fresh, |i| {
            qmp_write(&mut qmp_connect(socket)?, i)
        })?;
        Ok(())
    }
}

/// Start-up series, then the request series against one more instance.
fn measure(
    p: &dyn Protocol,
    dir: &Path,
    name: &str,
    a: &Args,
    r: &mut Report,
) -> Result<(), String> {
    let mut accept = Vec::new();
    let mut answer = Vec::new();
    for i in 0..a.starts {
        let socket = p.socket(dir, &format!("{name}-{i}"));
        let t = Instant::now();
        let mut m = Monitor::spawn(&mut p.command(&socket))?;
        let stream = m.wait_accept(&socket)?;
        accept.push(t.elapsed());
        p.first_answer(stream, &socket)?;
        answer.push(t.elapsed());
        end(p, m);
        let _ = std::fs::remove_file(&socket);
    }
    r.start_accept = Stats::of(&accept);
    r.start_answer = Stats::of(&answer);
    let socket = p.socket(dir, &format!("{name}-series"));
    let mut m = Monitor::spawn(&mut p.command(&socket))?;
    drop(m.wait_accept(&socket)?);
    p.series(&socket, a, r)?;
    end(p, m);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn end(p: &dyn Protocol, m: Monitor) {
    if p.graceful() {
        m.terminate();
    }
}

/// skiff started through skiff-jailer (a cell per start under `base`, uid/gid 10000).
struct Jailed {
    jailer: PathBuf,
    skiff: PathBuf,
    base: PathBuf,
}

impl Protocol for Jailed {
    fn socket(&self, _dir: &Path, tag: &str) -> PathBuf {
        self.base.join("skiff").join(tag).join("root/run/api.sock")
    }
    fn graceful(&self) -> bool {
        true
    }
    fn command(&self, socket: &Path) -> Command {
        // <base>/skiff/<id>/root/run/api.sock
        let id = socket
            .ancestors()
            .nth(3)
            .and_then(|d| d.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut c = Command::new(&self.jailer);
        c.args([
            "--id",
            &id,
            "--uid",
            "10000",
            "--gid",
            "10000",
            "--exec-file",
        ])
        .arg(&self.skiff)
        .arg("--chroot-base-dir")
        .arg(&self.base)
        .args(["--parent-cgroup", "skiff-apibench", "--"])
        .args(["--api-sock", "/run/api.sock", "--console", "none"]);
        c
    }
    fn first_answer(&self, stream: UnixStream, socket: &Path) -> Result<(), String> {
        Http::first_answer_of(stream, socket)
    }
    fn series(&self, socket: &Path, a: &Args, r: &mut Report) -> Result<(), String> {
        Http::series_of(socket, a, r)
    }
}

/// The host's floor: a 64-byte ping-pong over a Unix socket pair between two threads,
/// the least any request over a Unix socket can cost here.
fn host_floor(a: &Args) -> Result<Option<Stats>, String> {
    use std::io::Read;
    let (mut near, mut far) = UnixStream::pair().map_err(|e| e.to_string())?;
    let echo = thread::spawn(move || {
        let mut buf = [0u8; 64];
        while far.read_exact(&mut buf).is_ok() && far.write_all(&buf).is_ok() {}
    });
    let mut buf = [0u8; 64];
    let stats = timed(a.warmup(), a.requests, |_| {
        near.write_all(&buf)
            .and_then(|()| near.read_exact(&mut buf))
            .map_err(|e| format!("ping-pong: {e}"))
    });
    drop(near);
    let _ = echo.join();
    stats
}

/// `name` on PATH, if there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn host_description() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm"
    } else if Path::new("/dev/kvm").exists() {
        "kvm"
    } else {
        "none"
    };
    json!({"kernel": read("/proc/sys/kernel/osrelease").trim(), "cpu": cpu, "cpus": cpus, "kvm": kvm})
}

fn cell(s: Option<Stats>, us: bool) -> String {
    match s {
        None => "-".into(),
        Some(s) if us => format!("{:.0} / {:.0} / {:.0} µs", s.p50, s.p99, s.max),
        Some(s) => format!(
            "{:.1} / {:.1} / {:.1} ms",
            s.p50 / 1e3,
            s.p99 / 1e3,
            s.max / 1e3
        ),
    }
}

fn ratio(a: Option<Stats>, b: Option<Stats>) -> Option<(f64, f64)> {
    let (a, b) = (a?, b?);
    Some((a.p50 / b.p50, a.p99 / b.p99))
}

fn main() {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("apibench-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("apibench: {}: {e}", dir.display());
        std::process::exit(1);
    }
    let skiff = a.skiff.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("skiff")))
            .unwrap_or_else(|| PathBuf::from("target/release/skiff"))
    });
    let firecracker = a.firecracker.clone().or_else(|| on_path("firecracker"));
    let jailer = a
        .jailer
        .clone()
        .unwrap_or_else(|| skiff.with_file_name("skiff-jailer"));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let host = host_description();
    println!(
        "apibench: measured on this machine (outer host, native speed; {} CPUs, {}, kernel {}, /dev/kvm: {}).",
        host["cpus"], host["cpu"].as_str().unwrap_or("?"), host["kernel"].as_str().unwrap_or("?"), host["kvm"].as_str().unwrap_or("?")
    );
    println!("No guest is booted: all requests are pre-boot (skiff before InstanceStart, QEMU `-machine none -S`).");
    println!(
        "{} starts each; {} requests of each kind over one keep-alive connection, {} over a new connection each; untimed warm-up of {} requests and at least {} ms before each series.",
        a.starts, a.requests, a.fresh, a.warmup, a.warmup_ms
    );

    let mut monitors: Vec<(&str, Box<dyn Protocol>, &str, &str)> = vec![
        (
            "skiff",
            Box::new(Http {
                binary: skiff.clone(),
                extra: &["--console", "none"],
            }),
            "GET /",
            "PUT /machine-config",
        ),
        (
            "qemu-qmp",
            Box::new(Qmp {
                binary: a.qemu.clone(),
            }),
            "query-status",
            "qom-set /machine dump-guest-core",
        ),
    ];
    match &firecracker {
        Some(fc) => monitors.push((
            "firecracker",
            Box::new(Http {
                binary: fc.clone(),
                extra: &["--level", "Error"],
            }),
            "GET /",
            "PUT /machine-config",
        )),
        None => println!("firecracker: not installed (no `firecracker` on PATH)"),
    }
    if root && jailer.is_file() {
        monitors.push((
            "skiff-jailed",
            Box::new(Jailed {
                jailer: jailer.clone(),
                skiff: skiff.clone(),
                base: dir.join("cells"),
            }),
            "GET /",
            "PUT /machine-config",
        ));
    } else {
        println!(
            "skiff-jailed: skipped (needs root and {})",
            jailer.display()
        );
    }

    let floor = host_floor(&a).unwrap_or_else(|e| {
        eprintln!("apibench: host floor: {e}");
        None
    });
    let mut results: Vec<(&str, Report)> = Vec::new();
    for (name, proto, read, write) in &monitors {
        let mut r = Report {
            read,
            write,
            ..Report::default()
        };
        eprintln!("apibench: measuring {name} ...");
        if let Err(e) = measure(proto.as_ref(), &dir, name, &a, &mut r) {
            eprintln!("apibench: {name}: {e}");
        }
        results.push((name, r));
    }
    let _ = std::fs::remove_dir_all(&dir);

    // Table: one column per monitor (p50 / p99 / max), then the skiff/QEMU ratios.
    println!();
    let mut header = format!("{:24}", "");
    for (name, r) in &results {
        header.push_str(&format!("  {:34}", format!("{name} {}", r.version)));
    }
    println!("{header}  skiff/qemu p50, p99");
    for (_, label, get) in ROWS {
        let us = !label.starts_with("start");
        let mut line = format!("{label:24}");
        for (_, r) in &results {
            line.push_str(&format!("  {:34}", cell(get(r), us)));
        }
        if let (Some((_, s)), Some((_, q))) = (results.first(), results.get(1)) {
            if let Some((r50, r99)) = ratio(get(s), get(q)) {
                line.push_str(&format!("  {r50:.2}, {r99:.2}"));
            }
        }
        println!("{line}");
    }
    for (name, r) in &results {
        println!("{name}: read = {}, write = {}", r.read, r.write);
    }
    let jailed = results
        .iter()
        .find(|(n, _)| *n == "skiff-jailed")
        .map(|(_, r)| r);
    let plain = results.first().map(|(_, r)| r);
    let mut jail_ratios = json!({});
    if let (Some(j), Some(s)) = (jailed, plain) {
        println!("skiff-jailer's cost (skiff-jailed/skiff, p50, p99):");
        for (key, label, get) in ROWS {
            if let Some((r50, r99)) = ratio(get(j), get(s)) {
                println!("  {label:24}  {r50:.2}, {r99:.2}");
                jail_ratios[*key] = json!({"p50": round2(r50), "p99": round2(r99)});
            }
        }
    }
    println!(
        "host floor (64-byte ping-pong over a Unix socket pair, two threads): {}",
        cell(floor, true)
    );
    println!(
        "(p50 / p99 / max; start-up in ms over {} starts, requests in µs)",
        a.starts
    );

    let json_monitors: Vec<Value> = results
        .iter()
        .map(|(name, r)| {
            let mut m =
                json!({"name": name, "version": r.version, "read": r.read, "write": r.write});
            for (key, _, get) in ROWS {
                m[*key] = get(r).map_or(Value::Null, |s| s.json());
            }
            m
        })
        .collect();
    let mut ratios = json!({});
    if let (Some((_, s)), Some((_, q))) = (results.first(), results.get(1)) {
        for (key, _, get) in ROWS {
            ratios[*key] = ratio(get(s), get(q)).map_or(
                Value::Null,
                |(r50, r99)| json!({"p50": round2(r50), "p99": round2(r99)}),
            );
        }
    }
    let doc = json!({
        "benchmark": "apibench",
        "measured_on": "outer host, native speed, no guest (pre-boot requests)",
        "host": host,
        "starts": a.starts, "requests": a.requests, "fresh_requests": a.fresh, "warmup": a.warmup, "warmup_ms": a.warmup_ms,
        "host_floor_unix_pingpong": floor.map_or(Value::Null, |s| s.json()),
        "monitors": json_monitors,
        "ratios_skiff_over_qemu": ratios,
        "ratios_jailed_over_skiff": jail_ratios,
        "firecracker": firecracker.map_or(Value::from("not installed"), |p| Value::from(p.display().to_string())),
    });
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(parent);
    }
    match serde_json::to_string_pretty(&doc) {
        Ok(text) => match std::fs::write(&a.out, text + "\n") {
            Ok(()) => println!("results: {}", a.out.display()),
            Err(e) => eprintln!("apibench: {}: {e}", a.out.display()),
        },
        Err(e) => eprintln!("apibench: encoding results: {e}"),
    }
    if results.iter().any(|(_, r)| r.read_keepalive.is_none()) {
        std::process::exit(1);
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

//! Live upgrades of device processes while the guest does I/O: the guest sees nothing but
//! short pauses, no I/O error, no lost or corrupted data.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use api_server::client::ClientError;
use api_server::models::{Drive, NetworkInterface, SkiffDevice, UpgradeReport};
use tests::{ensure, host, Result, TestDir, TestVm};

use super::api::ApiVm;
use super::{last_line, stream_to_guest_across, CMD, EXIT, LONG, MIB};

/// The dd loop of the block crash test takes 20-40 s in the nested host. Well under the
/// test's limit, so that a guest that stalls there (twice seen: vCPU 1 running flat out,
/// vCPU 0 halted, every device process idle, after three restarts that resumed their
/// rings) fails with the console, skiff's stderr and the stall diagnosis, and the runner
/// can tell the nested host's stall and run the test again, instead of the test hanging
/// to its limit.
const CRASH_LOOP: Duration = Duration::from_secs(240);

/// How many upgrades the soak tests do: 100, or `SKIFF_UPGRADES`. (tools/upgradebench.sh
/// times 1000 per device at native speed with a synthetic front end.)
fn upgrades() -> usize {
    std::env::var("SKIFF_UPGRADES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100)
}

fn summary(pauses: &mut [u64]) -> String {
    pauses.sort_unstable();
    let at = |q: f64| pauses[((pauses.len() - 1) as f64 * q) as usize];
    format!(
        "{} upgrades: pause p50 {} us, p99 {} us, max {} us",
        pauses.len(),
        at(0.5),
        at(0.99),
        pauses[pauses.len() - 1]
    )
}

fn check_report(r: &UpgradeReport, id: &str, previous_pid: u32) -> Result {
    ensure!(
        r.id == id && r.old_pid == previous_pid && r.new_pid != previous_pid && r.rings >= 1,
        "unexpected upgrade report: {r:?}"
    );
    ensure!(
        r.pause_us <= r.total_us && r.prepare_us <= r.total_us,
        "inconsistent timings: {r:?}"
    );
    Ok(())
}

/// fio for `secs` seconds on `target`: random 4 KiB writes, direct I/O, queue depth 32,
/// verified as it goes (verify_backlog) and at the end.
pub(crate) fn fio_cmd(target: &str, secs: u64) -> String {
    format!(
        "fio --name=v --filename={target} --rw=randwrite --bs=4k --iodepth=32 \
         --ioengine=libaio --direct=1 --size=16m --verify=crc32c --verify_fatal=1 \
         --verify_backlog=512 --do_verify=1 --time_based --runtime={secs} 2>&1; echo FIO-EXIT $?"
    )
}

/// Checks [`fio_cmd`]'s output and the guest's log: fio exited 0 with `err= 0`, the guest
/// logged no I/O error; `what` says what happened meanwhile.
pub(crate) fn check_fio(vm: &mut TestVm, out: &str, what: &str) -> Result {
    ensure!(
        out.contains("FIO-EXIT 0") && out.contains("err= 0"),
        "fio failed {what}:\n{out}"
    );
    no_io_errors(vm, what)
}

/// The guest's log holds no I/O error; `what` says what happened meanwhile.
pub(crate) fn no_io_errors(vm: &mut TestVm, what: &str) -> Result {
    let ioerr = vm.run("dmesg | grep -ci 'i/o error'", CMD)?.0;
    ensure!(
        last_line(&ioerr) == "0",
        "the guest logged I/O errors {what}: {ioerr}"
    );
    Ok(())
}

/// Runs `cmd` in the guest's foreground (up to `timeout`) while `work` runs on a thread
/// with its own API client; returns the command's output and what `work` returned, and
/// fails if `work` was still running when the command ended (the load must cover it).
///
/// A foreground command and a thread rather than a background loop that the test stops:
/// with busybox ash on the console, the interactive shell exited when such a loop ended
/// (cause not found).
fn while_guest_runs<T: Send + 'static>(
    a: &mut ApiVm,
    cmd: &str,
    timeout: Duration,
    work: impl FnOnce(&mut api_server::client::ApiClient) -> Result<T> + Send + 'static,
) -> Result<(String, T)> {
    let mut api = api_server::client::ApiClient::new(&a.sock);
    let worker = std::thread::spawn(move || {
        let r = work(&mut api);
        (r, Instant::now())
    });
    let out = a.vm.run(cmd, timeout);
    let ended = Instant::now();
    let (r, work_ended) = worker
        .join()
        .map_err(|_| "the host-side thread panicked".to_string())?;
    let (out, _) = out?;
    let r = r?;
    ensure!(
        work_ended <= ended,
        "the guest's command ended before the host-side work did; output:\n{out}"
    );
    Ok((out, r))
}

/// kill -9 of the device process of device number `index` (in `GET /skiff/devices`),
/// whose pid is `pid`, waiting until skiff restarted it for the `restarts`-th time; returns
/// the new pid.
fn kill_and_wait_restart(
    api: &mut api_server::client::ApiClient,
    index: usize,
    pid: u32,
    restarts: usize,
) -> Result<u32> {
    // SAFETY: kill(2) on a pid the VMM reported; no memory is touched.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let d = device_at(api, index)?;
        match d.pid {
            Some(p) if p != pid && d.restarts as usize == restarts => return Ok(p),
            _ => ensure!(
                Instant::now() < deadline,
                "kill {restarts}: {} was not restarted: {d:?}",
                d.id
            ),
        }
    }
}

/// Device number `index` in `GET /skiff/devices`.
fn device_at(api: &mut api_server::client::ApiClient, index: usize) -> Result<SkiffDevice> {
    api.skiff_devices()
        .map_err(|e| e.to_string())?
        .devices
        .into_iter()
        .nth(index)
        .ok_or_else(|| format!("GET /skiff/devices has no device {index}"))
}

/// The pid of device number `index`'s process.
fn device_pid(api: &mut api_server::client::ApiClient, index: usize) -> Result<u32> {
    let d = device_at(api, index)?;
    d.pid
        .ok_or_else(|| format!("{} has no device process", d.id))
}

/// kill -9 of the data drive's skiff-blk `kills` times, after `delay`, waiting each time
/// until skiff restarted it; returns the killed pids.
fn kill_blk(
    api: &mut api_server::client::ApiClient,
    kills: usize,
    delay: Duration,
) -> Result<Vec<u32>> {
    upgrade_and_kill_blk(api, 0, kills, delay)
}

/// `upgrades` upgrades of the data drive's skiff-blk after `delay`, then `kills` kill -9s,
/// waiting each time until skiff restarted it; returns the killed pids.
fn upgrade_and_kill_blk(
    api: &mut api_server::client::ApiClient,
    upgrades: usize,
    kills: usize,
    delay: Duration,
) -> Result<Vec<u32>> {
    std::thread::sleep(delay);
    let mut pid = device_pid(api, 1)?;
    for k in 0..upgrades {
        let r = api
            .upgrade_device("data", None)
            .map_err(|e| format!("upgrade {k}: {e}"))?;
        check_report(&r, "data", pid)?;
        pid = r.new_pid;
    }
    let mut pids = Vec::new();
    for n in 0..kills {
        pids.push(pid);
        pid = kill_and_wait_restart(api, 1, pid, upgrades + n + 1)?;
    }
    Ok(pids)
}

/// Configures a data drive `data` served from `image`.
pub(crate) fn put_data_drive(a: &mut ApiVm, image: &std::path::Path) -> Result {
    a.api
        .put_drive(&Drive {
            drive_id: "data".into(),
            path_on_host: Some(image.display().to_string()),
            is_root_device: false,
            is_read_only: Some(false),
            ..Default::default()
        })
        .map_err(|e| format!("PUT /drives/data: {e}"))
}

/// 100 upgrades of skiff-blk while fio runs random 4 KiB writes with verification (direct
/// I/O, queue depth 32) on the drive: no I/O error, every verify passes.
pub fn upgrade_blk_100_under_fio() -> Result {
    let dir = TestDir::new("upgrade-blk")?;
    let rootfs = dir.bench_rootfs()?;
    let data = dir.sparse_image("data.img", 64 * MIB)?;
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure_rootfs(&rootfs, 2, 512, "")?;
    put_data_drive(&mut a, &data)?;
    a.start_guest()?;
    a.vm.run_ok("command -v fio", CMD)?;
    let n = upgrades();
    let secs = 20 + n as u64 / 4;
    let (out, mut pauses) = while_guest_runs(
        &mut a,
        &fio_cmd("/dev/vdb", secs),
        Duration::from_secs(secs) + LONG,
        move |api| {
            std::thread::sleep(Duration::from_secs(3));
            let mut pid = device_pid(api, 1)?;
            let mut pauses = Vec::new();
            for k in 0..n {
                let r = api
                    .upgrade_device("data", None)
                    .map_err(|e| format!("upgrade {k}: {e}"))?;
                check_report(&r, "data", pid)?;
                pid = r.new_pid;
                pauses.push(r.pause_us);
            }
            Ok(pauses)
        },
    )?;
    check_fio(&mut a.vm, &out, "during the upgrades")?;
    let devs = a.api.skiff_devices().map_err(|e| e.to_string())?;
    ensure!(
        devs.devices[1].restarts as usize == upgrades(),
        "GET /skiff/devices: {:?}",
        devs.devices[1]
    );
    let prom = a.api.skiff_metrics().map_err(|e| e.to_string())?;
    ensure!(
        prom.contains(&format!(
            "skiff_device_switch_pause_seconds_count {}",
            upgrades()
        )),
        "the pause histogram lacks the upgrades:\n{prom}"
    );
    println!("upgrade_blk_100_under_fio: {}", summary(&mut pauses));
    a.vm.reboot_and_wait(EXIT)
}

/// What the net stream tests do to skiff-net while the stream flows.
#[derive(Clone, Copy, PartialEq)]
enum NetEvent {
    /// `PUT /skiff/devices/eth0/upgrade` to the same binary.
    Upgrade,
    /// kill -9, and wait until skiff restarted it.
    Kill,
}

/// 100 upgrades of skiff-net while the host streams 32 MiB of known content to the
/// guest over TCP: the guest receives it whole (TCP retransmits what a switch drops).
pub fn upgrade_net_100_under_tcp() -> Result {
    net_stream_under(NetEvent::Upgrade, upgrades())
}

/// kill -9 of skiff-net 5 times, every few hundred ms, while the host streams 32 MiB of
/// known content to the guest over TCP: skiff restarts it each time at the rings' last
/// used index, the guest receives the stream whole (TCP retransmits the frames a dead
/// process had taken), the restarts are counted, and the guest's network still works.
pub fn crash_net_5_kills_under_tcp() -> Result {
    net_stream_under(NetEvent::Kill, 5)
}

/// Over virtio-pci (`--enable-pci`): 10 upgrades, then 2 kills, of skiff-net while the host
/// streams 32 MiB to the guest over TCP.
pub fn pci_net_upgrades_and_kills_under_tcp() -> Result {
    net_stream_with(
        &["--enable-pci"],
        &[(NetEvent::Upgrade, 10), (NetEvent::Kill, 2)],
    )
}

/// `count` events of kind `event` on skiff-net while the host streams 32 MiB to the guest.
fn net_stream_under(event: NetEvent, count: usize) -> Result {
    net_stream_with(&[], &[(event, count)])
}

/// `events` (so many of each kind, in order) on skiff-net, skiff started with
/// `skiff_args`, while the host streams 32 MiB to the guest.
fn net_stream_with(skiff_args: &[&str], events: &[(NetEvent, usize)]) -> Result {
    let x = 20 + std::process::id() % 200;
    let tap_name = format!("sku{}n", std::process::id() % 100_000);
    let tap = host::Tap::create(&tap_name, &format!("172.29.{x}.1/24"))?;
    let result = (|| -> Result {
        let dir = TestDir::new("upgrade-net")?;
        let mut a = ApiVm::start(&dir, skiff_args)?;
        a.configure(
            &dir,
            1,
            512,
            &format!("ip=172.29.{x}.2::172.29.{x}.1:255.255.255.0::eth0:off"),
        )?;
        a.api
            .put_network_interface(&NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: tap_name.clone(),
                guest_mac: Some(format!("06:00:ac:1d:{x:02x}:02")),
                ..Default::default()
            })
            .map_err(|e| format!("PUT /network-interfaces/eth0: {e}"))?;
        a.start_guest()?;
        a.vm.run_ok(&format!("ping -c 2 -W 10 172.29.{x}.1"), CMD)?;
        let data = host::pseudo_random((32 * MIB) as usize, u64::from(std::process::id()));
        let want = {
            let file = dir.join("net.bin");
            std::fs::write(&file, &data).map_err(|e| e.to_string())?;
            host::sha256_file(&file, 0, None)?
        };
        let addr: SocketAddr = format!("172.29.{x}.2:5556")
            .parse()
            .map_err(|e| format!("{e}"))?;
        // The n-th event's kind, in `events`' order.
        let kinds: Vec<NetEvent> = events
            .iter()
            .flat_map(|&(e, n)| std::iter::repeat_n(e, n))
            .collect();
        let count = kinds.len();
        let of = |kind: NetEvent| kinds.iter().filter(|&&k| k == kind).count();
        let mut pid = device_pid(&mut a.api, 1)?;
        let mut pauses = Vec::new();
        let api = &mut a.api;
        stream_to_guest_across(&mut a.vm, addr, data, &want, count, |_, n| {
            pid = match kinds[n] {
                NetEvent::Upgrade => {
                    let r = api
                        .upgrade_device("eth0", None)
                        .map_err(|e| format!("upgrade {n}: {e}"))?;
                    check_report(&r, "eth0", pid)?;
                    pauses.push(r.pause_us);
                    r.new_pid
                }
                NetEvent::Kill => {
                    std::thread::sleep(Duration::from_millis(200));
                    kill_and_wait_restart(api, 1, pid, n + 1)?
                }
            };
            Ok(())
        })?;
        let out = a.vm.run_ok(
            &format!("ping -c 1 -W 10 172.29.{x}.1 >/dev/null && echo OK"),
            CMD,
        )?;
        ensure!(last_line(&out) == "OK", "no ping afterwards: {out}");
        let restarts = a.api.skiff_devices().map_err(|e| e.to_string())?.devices[1].restarts;
        ensure!(
            restarts as usize == count,
            "GET /skiff/devices counts {restarts} replacements of skiff-net, want {count}"
        );
        let prom = a.api.skiff_metrics().map_err(|e| e.to_string())?;
        for (kind, metric) in [
            (NetEvent::Upgrade, "skiff_device_switch_pause_seconds_count"),
            (NetEvent::Kill, "skiff_vm_device_crash_restarts_total"),
        ] {
            let want = format!("{metric} {}", of(kind));
            ensure!(
                of(kind) == 0 || prom.contains(&want),
                "the metrics lack {want:?}:\n{prom}"
            );
        }
        if !pauses.is_empty() {
            println!("skiff-net upgrades under TCP: {}", summary(&mut pauses));
        }
        a.vm.reboot_and_wait(EXIT)
    })();
    drop(tap);
    result
}

/// Makes `dir/bins`, skiff's device binary directory for the upgrade-failure test: copies of
/// skiff-blk and skiff-net, and programs no upgrade may run. Returns it and the file the
/// refused scripts would create if they ran.
fn hostile_bin_dir(dir: &TestDir) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let bins = dir.join("bins");
    let marker = dir.join("a-script-ran");
    let set_mode = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("chmod {}: {e}", p.display()))
    };
    std::fs::create_dir(&bins).map_err(|e| format!("mkdir {}: {e}", bins.display()))?;
    set_mode(&bins, 0o755)?;
    let copy = |from: &std::path::Path, name: &str, mode: u32| -> Result {
        let to = bins.join(name);
        std::fs::copy(from, &to)
            .map_err(|e| format!("copy {} to {}: {e}", from.display(), to.display()))?;
        set_mode(&to, mode)
    };
    copy(&tests::binary("skiff-blk")?, "skiff-blk", 0o755)?;
    copy(&tests::binary("skiff-net")?, "skiff-net", 0o755)?;
    copy(std::path::Path::new("/bin/false"), "exits-at-once", 0o755)?;
    copy(std::path::Path::new("/bin/true"), "writable-by-all", 0o777)?;
    let script = format!("#!/bin/sh\ntouch {}\n", marker.display());
    for p in [bins.join("script.sh"), dir.join("evil.sh")] {
        std::fs::write(&p, &script).map_err(|e| format!("write {}: {e}", p.display()))?;
        set_mode(&p, 0o755)?;
    }
    std::os::unix::fs::symlink(dir.join("evil.sh"), bins.join("link-out"))
        .map_err(|e| format!("symlink: {e}"))?;
    Ok((bins, marker))
}

/// An upgrade to a binary that does not exist, that exits at once, or that is not a checked
/// program of skiff's device binary directory (a path outside it, a link out of it, `..`, a
/// script, a file others can write) is refused with the reason and runs nothing; the old
/// process keeps serving and the guest's I/O goes on. Device processes get a cleared
/// environment.
pub fn upgrade_failures_keep_old_process() -> Result {
    let dir = TestDir::new("upgrade-fail")?;
    let data = dir.sparse_image("data.img", 16 * MIB)?;
    let (bins, marker) = hostile_bin_dir(&dir)?;
    let bins_arg = bins.display().to_string();
    let mut a = ApiVm::start(&dir, &["--device-bin-dir", &bins_arg])?;
    a.configure(&dir, 1, 256, "")?;
    put_data_drive(&mut a, &data)?;
    match a.api.upgrade_device("data", None) {
        Err(ClientError::Fault {
            status: 400,
            message,
        }) if message.contains("started VM") => {}
        other => return Err(format!("an upgrade before InstanceStart: {other:?}")),
    }
    a.start_guest()?;
    let pid = a.api.skiff_devices().map_err(|e| e.to_string())?.devices[1].pid;
    let evil = dir.join("evil.sh").display().to_string();
    let cases = [
        (
            "no-such-skiff-blk".to_string(),
            vec!["no-such-skiff-blk", "keeps"],
        ),
        (
            evil.clone(),
            vec!["is not in the device binary directory", "keeps"],
        ),
        (
            "../evil.sh".to_string(),
            vec!["is not in the device binary directory"],
        ),
        (
            "link-out".to_string(),
            vec!["is not in the device binary directory"],
        ),
        ("script.sh".to_string(), vec!["not an elf executable"]),
        (
            "writable-by-all".to_string(),
            vec!["writable by group or others"],
        ),
        (
            "/bin/true".to_string(),
            vec!["is not in the device binary directory"],
        ),
        ("exits-at-once".to_string(), vec!["exit", "keeps serving"]),
    ];
    for (bin, words) in &cases {
        match a.api.upgrade_device("data", Some(bin)) {
            Err(ClientError::Fault {
                status: 400,
                message,
            }) => {
                let m = message.to_lowercase();
                ensure!(
                    words.iter().all(|w| m.contains(w)),
                    "upgrade to {bin}: the message {message:?} does not name {words:?}"
                );
            }
            other => return Err(format!("upgrade to {bin}: want 400, got {other:?}")),
        }
        ensure!(
            !marker.exists(),
            "the upgrade to {bin} ran a script ({} exists)",
            marker.display()
        );
        let now = a.api.skiff_devices().map_err(|e| e.to_string())?.devices[1].pid;
        ensure!(
            now == pid,
            "after a failed upgrade to {bin} the pid changed: {pid:?} -> {now:?}"
        );
        let out = a.vm.run_ok(
            "dd if=/dev/urandom of=/dev/vdb bs=4k count=64 oflag=direct 2>/dev/null && \
             dd if=/dev/vdb of=/dev/null bs=4k count=64 iflag=direct 2>/dev/null && echo IO-OK",
            CMD,
        )?;
        ensure!(
            last_line(&out) == "IO-OK",
            "guest I/O after a failed upgrade: {out}"
        );
    }
    match a.api.upgrade_device("nosuch", None) {
        Err(ClientError::Fault {
            status: 400,
            message,
        }) if message.contains("nosuch") => {}
        other => return Err(format!("upgrade of an unknown device: {other:?}")),
    }
    let prom = a.api.skiff_metrics().map_err(|e| e.to_string())?;
    let failed = format!("skiff_vm_upgrades_failed_total {}", cases.len());
    ensure!(
        prom.contains(&failed),
        "failed upgrades are not counted (want {failed:?}):\n{prom}"
    );
    // And a good one still works afterwards, for every device at once.
    let all = a
        .api
        .upgrade_all(&Default::default())
        .map_err(|e| format!("PUT /skiff/upgrade: {e}"))?;
    ensure!(all.devices.len() == 2, "PUT /skiff/upgrade: {all:?}");
    // The new device processes run from the directory, with nothing of skiff's environment
    // but the log level.
    for d in a.api.skiff_devices().map_err(|e| e.to_string())?.devices {
        let Some(pid) = d.pid else { continue };
        let env = std::fs::read(format!("/proc/{pid}/environ"))
            .map_err(|e| format!("environ of {pid}: {e}"))?;
        let vars: Vec<String> = env
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        ensure!(
            vars.iter().all(|v| v.starts_with("RUST_LOG=")),
            "device '{}' (pid {pid}) got skiff's environment: {vars:?}",
            d.id
        );
        let bin = d.binary.unwrap_or_default();
        ensure!(
            bin.starts_with(&bins_arg),
            "device '{}' runs {bin}, not a program of {bins_arg}",
            d.id
        );
    }
    a.vm.reboot_and_wait(EXIT)
}

/// kill -9 of skiff-blk 20 times while fio writes and verifies a file on an ext4 file
/// system on the drive (soak test; see [`crash_blk_kills_under_fio`]).
pub fn crash_blk_20_kills_under_fio() -> Result {
    crash_blk_kills_under_fio(20)
}

/// kill -9 of skiff-blk 3 times, every few hundred ms, while the guest writes 8 MiB of
/// random data to the raw drive with O_DIRECT and reads it back, round after round: no
/// write or read fails, every read-back matches, the guest logs no I/O error, and the
/// host's image holds the data. Short enough for every CI run. The loop runs in the
/// foreground and a thread does the kills: a background loop that the test stops makes the
/// guest's interactive shell exit when it ends (busybox ash; cause not found), and fio at
/// queue depth 32 crashes the nested test host (its kernel, or the guest's) on its own.
pub fn crash_blk_3_kills_under_dd() -> Result {
    // SKIFF_KILLS overrides the count (0 runs the same loop without kills).
    let kills: usize = std::env::var("SKIFF_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    blk_events_under_dd(&[], 0, kills)
}

/// The same over virtio-pci (`--enable-pci`): 10 upgrades of skiff-blk, then 2 kills,
/// while the guest writes and reads back through its drive, with MSI-X interrupts.
pub fn pci_blk_upgrades_and_kills_under_dd() -> Result {
    blk_events_under_dd(&["--enable-pci"], 10, 2)
}

/// `upgrades` upgrades then `kills` kill -9s of the data drive's skiff-blk (skiff started
/// with `skiff_args`) during [`crash_blk_3_kills_under_dd`]'s write/read-back loop.
fn blk_events_under_dd(skiff_args: &[&str], upgrades: usize, kills: usize) -> Result {
    const ROUNDS: usize = 6;
    let dir = TestDir::new("crash-dd")?;
    let data = dir.sparse_image("data.img", 64 * MIB)?;
    let mut a = ApiVm::start(&dir, skiff_args)?;
    a.configure(&dir, 2, 512, "")?;
    put_data_drive(&mut a, &data)?;
    a.start_guest()?;
    let want = host::first_sha256(&a.vm.run_ok(
        "dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>/dev/null && sha256sum < /tmp/pat | tee /tmp/pat.sum",
        CMD,
    )?)
    .ok_or("no checksum of the pattern")?;
    let (out, pids) = while_guest_runs(
        &mut a,
        &format!(
            "for i in $(seq {ROUNDS}); do \
             dd if=/tmp/pat of=/dev/vdb bs=64k oflag=direct conv=fsync 2>>/tmp/dd.err || echo DD-WRITE-FAILED $i; \
             dd if=/dev/vdb bs=64k count=128 iflag=direct 2>>/tmp/dd.err | sha256sum | cmp -s - /tmp/pat.sum || echo DD-MISMATCH $i; \
             echo DD-ROUND $i; done"
        ),
        CRASH_LOOP,
        move |api| upgrade_and_kill_blk(api, upgrades, kills, Duration::from_millis(1500)),
    )?;
    ensure!(pids.len() == kills, "killed {pids:?}");
    if out.contains("DD-WRITE-FAILED")
        || out.contains("DD-MISMATCH")
        || !out.contains(&format!("DD-ROUND {ROUNDS}"))
    {
        let more =
            a.vm.run_ok("cat /tmp/dd.err; dmesg | tail -20", CMD)
                .unwrap_or_else(|e| e);
        return Err(format!(
            "the guest's write/read-back loop while skiff-blk was upgraded {upgrades} times and \
             killed {kills} times:\n{out}\n{more}"
        ));
    }
    let ioerr = a.vm.run("dmesg | grep -ci 'i/o error'", CMD)?.0;
    ensure!(
        last_line(&ioerr) == "0",
        "the guest logged I/O errors: {ioerr}"
    );
    let prom = a.api.skiff_metrics().map_err(|e| e.to_string())?;
    ensure!(
        prom.contains(&format!("skiff_vm_device_crash_restarts_total {kills}")),
        "the restarts are not counted:\n{prom}"
    );
    a.vm.reboot_and_wait(EXIT)?;
    // The data the guest wrote last is in the host's image.
    let got = host::sha256_file(&data, 0, Some(8 * MIB))?;
    ensure!(got == want, "the image holds {got}, the guest wrote {want}");
    Ok(())
}

/// kill -9 of skiff-blk `kills` times, one every few hundred ms, while fio writes and
/// verifies a file on an ext4 file system on the drive: skiff restarts it each time, the
/// new process resubmits what the inflight area holds, so the guest sees no I/O error,
/// fio's verify passes, and the file system is clean.
fn crash_blk_kills_under_fio(kills: usize) -> Result {
    let dir = TestDir::new("crash-blk")?;
    let rootfs = dir.bench_rootfs()?;
    let data = dir.sparse_image("data.img", 64 * MIB)?;
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&data)
        .output()
        .map_err(|e| format!("mkfs.ext4 (apt-get install e2fsprogs): {e}"))?;
    ensure!(
        mkfs.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure_rootfs(&rootfs, 2, 512, "")?;
    put_data_drive(&mut a, &data)?;
    a.start_guest()?;
    a.vm.run_ok("mkdir -p /mnt && mount -t ext4 /dev/vdb /mnt", CMD)?;
    let secs = 20 + kills as u64;
    let (out, _) = while_guest_runs(
        &mut a,
        &fio_cmd("/mnt/f", secs),
        Duration::from_secs(secs) + LONG,
        move |api| kill_blk(api, kills, Duration::from_secs(3)),
    )?;
    check_fio(&mut a.vm, &out, "while skiff-blk was killed")?;
    a.vm.run_ok("umount /mnt && sync", CMD)?;
    let prom = a.api.skiff_metrics().map_err(|e| e.to_string())?;
    ensure!(
        prom.contains(&format!("skiff_vm_device_crash_restarts_total {kills}")),
        "the restarts are not counted:\n{prom}"
    );
    a.vm.reboot_and_wait(EXIT)?;
    let fsck = std::process::Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&data)
        .output()
        .map_err(|e| format!("e2fsck: {e}"))?;
    ensure!(
        fsck.status.success(),
        "e2fsck -fn found problems:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    Ok(())
}

/// What one fd of a device process is, for [`device_processes_hold_only_their_fds`]: its own
/// image, TAP and metrics page become fixed words, so processes of one kind compare equal.
fn fd_kind(link: &str, own_image: Option<&str>, own_id: &str) -> String {
    if own_image.is_some_and(|i| link == i) {
        return "own image".into();
    }
    if link == format!("/memfd:skiff-metrics-{own_id} (deleted)") {
        return "own metrics page".into();
    }
    if link.starts_with("socket:") {
        return "socket".into();
    }
    if link.starts_with("pipe:") {
        return "pipe".into();
    }
    link.to_string()
}

/// The kinds of every fd of process `pid` past stdio, sorted.
fn fd_kinds(pid: u32, own_image: Option<&str>, own_id: &str) -> Result<Vec<String>> {
    let dir = format!("/proc/{pid}/fd");
    let mut kinds = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let e = e.map_err(|e| format!("{dir}: {e}"))?;
        let n: u32 = e.file_name().to_string_lossy().parse().unwrap_or(0);
        if n <= 2 {
            continue;
        }
        let link = std::fs::read_link(e.path())
            .map(|l| l.display().to_string())
            .unwrap_or_else(|e| format!("unreadable ({e})"));
        kinds.push(fd_kind(&link, own_image, own_id));
    }
    kinds.sort();
    Ok(kinds)
}

/// Each device process, in a VM with two drives and two network interfaces, holds exactly
/// the fds meant for it (/proc/PID/fd): no other drive's image, no /dev/kvm or KVM fd, no
/// TAP in skiff-blk, one TAP in skiff-net, no other device's metrics page, a bounded number of
/// eventfds (its rings' kick, call and error fds and the backend's own); and after every
/// device was upgraded the new processes hold the same kinds of fds as those started at
/// boot (before the fix a new process inherited every device's kick and irq eventfds).
pub fn device_processes_hold_only_their_fds() -> Result {
    let n = std::process::id() % 100_000;
    let x = 40 + std::process::id() % 100;
    let taps = [
        host::Tap::create(&format!("skf{n}a"), &format!("172.31.{x}.1/24"))?,
        host::Tap::create(&format!("skf{n}b"), &format!("172.31.{}.1/24", x + 100))?,
    ];
    let dir = TestDir::new("fds")?;
    let data = dir.sparse_image("data.img", 16 * MIB)?;
    let mut a = ApiVm::start(&dir, &[])?;
    a.configure(&dir, 1, 256, "")?;
    put_data_drive(&mut a, &data)?;
    for (i, tap) in taps.iter().enumerate() {
        a.api
            .put_network_interface(&NetworkInterface {
                iface_id: format!("eth{i}"),
                host_dev_name: tap.name.clone(),
                ..Default::default()
            })
            .map_err(|e| format!("PUT /network-interfaces/eth{i}: {e}"))?;
    }
    a.start_guest()?;
    let images: Vec<(String, String)> = [("rootfs", dir.join("rootfs.ext4")), ("data", data)]
        .into_iter()
        .map(|(id, p)| {
            let p = std::fs::canonicalize(&p).unwrap_or(p);
            (id.to_string(), p.display().to_string())
        })
        .collect();
    let snapshot = |a: &mut ApiVm| -> Result<Vec<(String, Vec<String>)>> {
        let mut out = Vec::new();
        for d in a.api.skiff_devices().map_err(|e| e.to_string())?.devices {
            let pid = d.pid.ok_or(format!("device '{}' has no process", d.id))?;
            let image = images
                .iter()
                .find(|(id, _)| *id == d.id)
                .map(|(_, p)| p.as_str());
            let kinds = fd_kinds(pid, image, &d.id)?;
            let is_net = d.id.starts_with("eth");
            let count = |k: &str| kinds.iter().filter(|x| x.as_str() == k).count();
            let allowed = |k: &str| {
                matches!(
                    k,
                    "own image"
                        | "own metrics page"
                        | "socket"
                        | "/dev/net/tun"
                        | "/memfd:skiff-guest-ram (deleted)"
                        | "/memfd:skiff-blk-inflight (deleted)"
                ) || (k.starts_with("anon_inode:") && !k.contains("kvm"))
            };
            let bad: Vec<&String> = kinds.iter().filter(|k| !allowed(k)).collect();
            ensure!(
                bad.is_empty(),
                "device '{}' (pid {pid}) holds fds not meant for it: {bad:?}\nall: {kinds:?}",
                d.id
            );
            ensure!(
                count("/dev/net/tun") == usize::from(is_net),
                "device '{}' (pid {pid}) holds {} TAP fds: {kinds:?}",
                d.id,
                count("/dev/net/tun")
            );
            ensure!(
                is_net || count("own image") == 1,
                "device '{}' (pid {pid}) does not hold its image once: {kinds:?}",
                d.id
            );
            // Kick, call and error fd per ring (blk 1, net 2 here) and the backend's own
            // (its workers' exit and vring events, the metrics timer): fewer than 16.
            let eventfds = count("anon_inode:[eventfd]");
            ensure!(
                eventfds < 16,
                "device '{}' (pid {pid}) holds {eventfds} eventfds: {kinds:?}",
                d.id
            );
            println!(
                "device '{}': {} fds past stdio, {eventfds} eventfds",
                d.id,
                kinds.len()
            );
            out.push((d.id, kinds));
        }
        Ok(out)
    };
    let boot = snapshot(&mut a)?;
    let all = a
        .api
        .upgrade_all(&Default::default())
        .map_err(|e| format!("PUT /skiff/upgrade: {e}"))?;
    ensure!(all.devices.len() == 4, "PUT /skiff/upgrade: {all:?}");
    // The new processes have taken their rings; what they received over vhost-user is the
    // same as at boot.
    let upgraded = snapshot(&mut a)?;
    const RING: &str = "anon_inode:[io_uring]";
    for ((id, before), (_, after)) in boot.iter().zip(&upgraded) {
        // skiff-blk's default engine is sync: no io_uring at boot. (With --io-engine
        // io-uring, a skiff-blk started now would start under this skiff's seccomp filter,
        // no skiff-jailer here, which allows no io_uring_setup, and hold no ring either:
        // docs/CONTRACTS.md.) Everything else is the same.
        let rings = before.iter().filter(|k| k.as_str() == RING).count();
        let want = 0;
        ensure!(
            rings == want,
            "device '{id}' holds {rings} io_uring(s) at boot, not {want}: {before:?}"
        );
        ensure!(
            !after.iter().any(|k| k == RING),
            "device '{id}': the upgraded process, started under skiff's filter, holds an io_uring: {after:?}"
        );
        let before: Vec<&String> = before.iter().filter(|k| k.as_str() != RING).collect();
        let after: Vec<&String> = after.iter().collect();
        ensure!(
            before == after,
            "device '{id}': the upgraded process holds other fds than the one started at \
             boot:\nboot:     {before:?}\nupgraded: {after:?}"
        );
    }
    let r = a.vm.reboot_and_wait(EXIT);
    drop(taps);
    r
}

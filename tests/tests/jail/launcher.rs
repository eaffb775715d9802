//! skiff-jailer's launcher against a compromised VMM: `launcher-probe` (tests/src/bin) runs
//! in skiff's place in the cell, sends requests a hostile skiff could send, and has one real
//! skiff-blk started, whose cell this test then inspects from outside.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tests::{ensure, Result, TestDir};

use super::{check_device_cell, nothing_left, some_controller, Jail, ParentCgroup};

pub fn jailer_launcher_confines_devices_and_refuses_hostile_requests() -> Result {
    let dir = TestDir::new("jailer-launcher")?;
    let parent = ParentCgroup::new("launcher");
    let base = dir.join("base");
    let id = "launcher-1";
    // The probe in skiff's place, with the real device binaries beside it.
    let bins = dir.join("bins");
    std::fs::create_dir(&bins).map_err(|e| e.to_string())?;
    for (from, to) in [
        ("launcher-probe", "skiff"),
        ("skiff-blk", "skiff-blk"),
        ("skiff-net", "skiff-net"),
    ] {
        std::fs::copy(tests::binary(from)?, bins.join(to)).map_err(|e| format!("{from}: {e}"))?;
    }
    let image = dir.sparse_image("probe.img", 1 << 20)?;
    // The cgroup needs a controller only so that it is made the same way as a VM's.
    let controller = some_controller()?;
    let (file, value) = super::controller_file(&controller);
    let mut jl = Jail::new(&base, id, &parent.0)?;
    jl.exec_file = bins.join("skiff").display().to_string();
    jl.extra = vec![
        "--cgroup".into(),
        format!("{file}={value}"),
        "--stage".into(),
        format!("{}:/images/probe.img:rw", image.display()),
    ];
    jl.skiff = vec!["--image".into(), "/images/probe.img".into()];
    let mut child = jl
        .command()?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run skiff-jailer: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut said = Vec::new();
    let mut device_checked = None;
    let cell = base.join("skiff").join(id).join("root");
    let cgroup = format!("{}/{id}", parent.0);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                return Err(format!(
                    "the probe did not finish in 60 s; it said:\n{}",
                    said.join("\n")
                ));
            }
            Err(_) => break,
        };
        said.push(line.clone());
        if let Some(pid) = line.strip_prefix("DEVICE ") {
            let pid: u32 = pid.parse().map_err(|e| format!("DEVICE {pid}: {e}"))?;
            let skiff: u32 = std::fs::read_to_string(cell.join("skiff.pid"))
                .map_err(|e| e.to_string())?
                .trim()
                .parse()
                .map_err(|e| format!("skiff.pid: {e}"))?;
            device_checked = Some(check_device_cell(
                pid,
                skiff,
                "the launched skiff-blk",
                &cell,
                &cgroup,
            ));
            writeln!(stdin, "go").map_err(|e| e.to_string())?;
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let all = said.join("\n");
    println!("{all}");
    ensure!(
        status.success(),
        "the probe (skiff's stand-in) ended with {status}:\n{all}\nstderr:\n{err}"
    );
    for case in [
        "REFUSED ../../bin/sh",
        "REFUSED /bin/sh",
        "REFUSED sh",
        "REFUSED skiff-blk/..",
        "REFUSED fd-number-2000",
        "REFUSED no-seccomp",
        "REFUSED the launcher socket",
        "REFUSED status 1",
        "REFUSED kill 1",
        "OK fds at 4 and 5",
        "OK launch skiff-blk",
        "OK running",
        "OK ended",
    ] {
        ensure!(all.contains(case), "the probe never said {case:?}:\n{all}");
    }
    device_checked.ok_or("the probe never reported its device")??;
    nothing_left(&base, id, &parent.0)
}

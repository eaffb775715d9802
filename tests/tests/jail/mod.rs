//! skiff-jailer: bad input refused before the host is touched (and nothing left behind when
//! a later step fails), skiff confined as asked (uid/gid, no groups, no_new_privs, its root
//! the cell, its own mount and PID namespaces, the cgroup and its limits, rlimits, an empty
//! environment, only its own fds), API paths that try to leave the cell refused, and a guest
//! that boots, does I/O, survives device upgrades and device crashes inside the cell.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use api_server::client::{ApiClient, ClientError};
use api_server::models::BootSource;
use tests::{ensure, Result, TestDir};

mod booted;
mod guest;
mod kept_alive;
mod launcher;
mod vmm_upgrade;
pub use guest::*;
pub use launcher::*;
pub use vmm_upgrade::*;

/// The unprivileged ids the tests jail skiff as.
pub const UID: u32 = 10_000;
pub const GID: u32 = 10_000;

/// The cgroup v2 mount point (an oracle independent of the jailer's own lookup).
pub fn cgroup_root() -> Result<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    mi.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| "no cgroup2 mount in /proc/self/mountinfo".to_string())
}

/// A controller the cgroup v2 root offers, for the tests that need one.
pub fn some_controller() -> Result<String> {
    let root = cgroup_root()?;
    let list = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    ["pids", "memory", "hugetlb"]
        .iter()
        .find(|c| list.split_whitespace().any(|x| x == **c))
        .map(|c| c.to_string())
        .ok_or_else(|| {
            format!(
                "the cgroup v2 root {} offers none of pids, memory, hugetlb",
                root.display()
            )
        })
}

/// A writable interface file of `controller` and a valid value for it.
pub fn controller_file(controller: &str) -> (&'static str, &'static str) {
    match controller {
        "pids" => ("pids.max", "256"),
        "memory" => ("memory.max", "2147483648"),
        _ => ("hugetlb.2MB.max", "0"),
    }
}

/// skiff-jailer's arguments; [`Jail::command`] puts them in order.
#[derive(Clone)]
pub struct Jail {
    pub id: String,
    pub exec_file: String,
    pub uid: String,
    pub gid: String,
    pub base: PathBuf,
    pub parent: String,
    /// Further jailer flags (--cgroup, --stage, --netns, ...).
    pub extra: Vec<String>,
    /// skiff's arguments, after `--`.
    pub skiff: Vec<String>,
}

impl Jail {
    /// The usual: the built skiff, [`UID`]/[`GID`], `base`, the parent cgroup `parent`.
    pub fn new(base: &Path, id: &str, parent: &str) -> Result<Jail> {
        Ok(Jail {
            id: id.into(),
            exec_file: tests::binary("skiff")?.display().to_string(),
            uid: UID.to_string(),
            gid: GID.to_string(),
            base: base.to_path_buf(),
            parent: parent.into(),
            extra: Vec::new(),
            skiff: Vec::new(),
        })
    }

    pub fn command(&self) -> Result<Command> {
        let mut cmd = Command::new(tests::binary("skiff-jailer")?);
        cmd.args(["--id", &self.id, "--exec-file", &self.exec_file])
            .args(["--uid", &self.uid, "--gid", &self.gid])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(["--parent-cgroup", &self.parent])
            .args(&self.extra)
            .arg("--")
            .args(&self.skiff);
        Ok(cmd)
    }
}

/// Neither the cell nor the cgroup of `id` is left.
pub fn nothing_left(base: &Path, id: &str, parent: &str) -> Result {
    let cell = base.join("skiff").join(id);
    ensure!(
        std::fs::symlink_metadata(&cell).is_err(),
        "the cell {} was left behind",
        cell.display()
    );
    let cg = cgroup_root()?.join(parent).join(id);
    ensure!(!cg.exists(), "the cgroup {} was left behind", cg.display());
    Ok(())
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .map_err(|e| format!("cannot run skiff-jailer: {e}"))
}

/// A unique parent cgroup for one test, removed when dropped.
pub struct ParentCgroup(pub String);

impl ParentCgroup {
    /// Unique per call: a test the runner starts again (after a nested-host fault) gets a
    /// new one, whatever the failed attempt left behind.
    pub fn new(label: &str) -> ParentCgroup {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ParentCgroup(format!("skiff-test-{label}-{}-{n}", std::process::id()))
    }
}

impl Drop for ParentCgroup {
    fn drop(&mut self) {
        if let Ok(root) = cgroup_root() {
            let _ = std::fs::remove_dir(root.join(&self.0));
        }
    }
}

pub fn jailer_bad_input() -> Result {
    let dir = TestDir::new("jailer-bad")?;
    let parent = ParentCgroup::new("bad");
    let p = parent.0.as_str();
    let skiff = tests::binary("skiff")?;
    let script = dir.join("script.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").map_err(|e| e.to_string())?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let lonely = dir.join("lonely");
    std::fs::create_dir(&lonely).map_err(|e| e.to_string())?;
    std::fs::copy(&skiff, lonely.join("skiff")).map_err(|e| e.to_string())?;
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "x").map_err(|e| e.to_string())?;
    let controller = some_controller()?;
    let bad_value = format!("{}=not-a-number", controller_file(&controller).0);
    let long_id = "a".repeat(65);
    let s = |p: &Path| p.display().to_string();

    let base = |i: usize| dir.join(&format!("base{i}"));
    let j = |i: usize, id: &str| Jail::new(&base(i), id, p);
    let with = |mut jl: Jail, f: &dyn Fn(&mut Jail)| {
        f(&mut jl);
        jl
    };
    let extra =
        |jl: Jail, args: &[&str]| with(jl, &|x| x.extra.extend(args.iter().map(|a| a.to_string())));
    // (label, arguments, words the message must hold)
    let cases: Vec<(&str, Jail, Vec<String>)> = vec![
        (
            "id with a slash",
            j(0, "bad/id")?,
            vec!["--id".into(), "bad/id".into()],
        ),
        ("id too long", j(1, &long_id)?, vec!["--id".into()]),
        (
            "unknown user",
            with(j(2, "u1")?, &|x| x.uid = "no-such-user-skiff".into()),
            vec!["no such user".into()],
        ),
        (
            "uid 0",
            with(j(3, "u2")?, &|x| x.uid = "0".into()),
            vec!["--uid".into(), "root".into()],
        ),
        (
            "unknown group",
            with(j(4, "u3")?, &|x| x.gid = "no-such-group-skiff".into()),
            vec!["no such group".into()],
        ),
        (
            "missing exec file",
            with(j(5, "e1")?, &|x| x.exec_file = "/nonexistent/skiff".into()),
            vec!["/nonexistent/skiff".into()],
        ),
        (
            "exec file not ELF",
            with(j(6, "e2")?, &|x| x.exec_file = s(&script)),
            vec!["not an ELF".into()],
        ),
        (
            "exec file alone",
            with(j(7, "e3")?, &|x| x.exec_file = s(&lonely.join("skiff"))),
            vec!["skiff-blk".into(), "missing".into()],
        ),
        (
            "base dir on a file",
            with(j(8, "b1")?, &|x| x.base = a_file.join("base")),
            vec!["not a directory".into()],
        ),
        (
            "relative base dir",
            with(j(9, "b2")?, &|x| x.base = "relative/base".into()),
            vec!["absolute".into()],
        ),
        (
            "cgroup v1",
            extra(j(10, "c1")?, &["--cgroup-version", "1"]),
            vec!["cgroup v2".into()],
        ),
        (
            "cgroup without value",
            extra(j(11, "c2")?, &["--cgroup", "pids.max"]),
            vec!["FILE=VALUE".into()],
        ),
        (
            "missing controller",
            extra(j(12, "c3")?, &["--cgroup", "nosuchctl.max=1"]),
            vec!["nosuchctl".into(), "not available".into()],
        ),
        (
            "parent cgroup escapes",
            with(j(13, "c4")?, &|x| x.parent = "../x".into()),
            vec!["--parent-cgroup".into()],
        ),
        (
            "netns missing",
            extra(j(14, "n1")?, &["--netns", "/nonexistent/netns"]),
            vec!["/nonexistent/netns".into()],
        ),
        (
            "netns of another kind",
            extra(j(15, "n2")?, &["--netns", "/proc/self/ns/mnt"]),
            vec!["not a network namespace".into()],
        ),
        (
            "bad resource limit",
            extra(j(16, "r1")?, &["--resource-limit", "cores=1"]),
            vec!["--resource-limit".into()],
        ),
        (
            "stage missing",
            extra(j(17, "s1")?, &["--stage", "/nonexistent/k:/k"]),
            vec!["--stage".into()],
        ),
        (
            "stage into /bin",
            extra(
                j(18, "s2")?,
                &["--stage", &format!("{}:/bin/skiff", s(&a_file))],
            ),
            vec!["--stage".into()],
        ),
        (
            "id in skiff args",
            with(j(19, "i1")?, &|x| {
                x.skiff = vec!["--id".into(), "other".into()]
            }),
            vec!["--id".into()],
        ),
        (
            "launcher fd in skiff args",
            with(j(22, "i2")?, &|x| x.skiff = vec!["--launcher-fd=3".into()]),
            vec!["--launcher-fd".into()],
        ),
        (
            "device uid is skiff's",
            extra(j(23, "d1")?, &["--device-uid", &UID.to_string()]),
            vec!["--device-uid".into(), "must differ".into()],
        ),
        (
            "device gid root",
            extra(j(24, "d2")?, &["--device-gid", "0"]),
            vec!["--device-gid".into()],
        ),
        // Past validation: the cell and the cgroup exist when these fail.
        (
            "cgroup value refused",
            extra(j(20, "v1")?, &["--cgroup", &bad_value]),
            vec![bad_value.clone()],
        ),
        (
            "skiff refuses its arguments",
            with(j(21, "v2")?, &|x| x.skiff = vec!["--no-such-flag".into()]),
            vec!["--no-such-flag".into()],
        ),
    ];
    for (label, jl, words) in &cases {
        let out = output(&mut jl.command()?)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success(),
            "{label}: skiff-jailer succeeded; stderr: {stderr}"
        );
        for w in words {
            ensure!(
                stderr.contains(w.as_str()),
                "{label}: the message does not name {w:?}: {stderr}"
            );
        }
        let id = jl.id.as_str();
        if !jl.base.is_absolute() || jl.id.contains('/') {
            continue;
        }
        nothing_left(&jl.base, id, p).map_err(|e| format!("{label}: {e}"))?;
        if jl.base.exists() {
            let left: Vec<_> = std::fs::read_dir(&jl.base)
                .map_err(|e| e.to_string())?
                .flatten()
                .map(|e| e.file_name())
                .collect();
            ensure!(
                left.is_empty(),
                "{label}: {} holds {left:?} after the failure",
                jl.base.display()
            );
        }
        println!("{label}: refused: {}", stderr.trim());
    }
    // An existing cell is never taken over, and never removed.
    let base = dir.join("base-existing");
    let cell = base.join("skiff").join("taken");
    std::fs::create_dir_all(cell.join("root")).map_err(|e| e.to_string())?;
    let out = output(&mut Jail::new(&base, "taken", p)?.command()?)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("already exists"),
        "an existing cell: {stderr}"
    );
    ensure!(cell.join("root").is_dir(), "the existing cell was removed");
    Ok(())
}

/// Reads a `Name:\tvalue` line of /proc/PID/status.
pub fn status_field(pid: u32, name: &str) -> Result<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("pid {pid}: {e}"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_string())
        })
        .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))
}

/// Checks process `pid` (and each of its threads) against the jail: ids, groups,
/// no_new_privs, root, mount namespace, cgroup.
pub fn check_confined(pid: u32, what: &str, cell_root: &Path, cgroup: &str) -> Result {
    check_jailed(pid, what, Some(cell_root), cgroup, (UID, GID))
}

/// Every thread of `pid` runs under a seccomp filter (Seccomp: 2 in /proc/PID/task/*/status).
pub fn check_filtered(pid: u32, what: &str) -> Result {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("{what}: {e}"))?;
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue; // ended meanwhile
        };
        let mode = s
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .map(str::trim)
            .unwrap_or_default();
        let name = s
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .map(str::trim)
            .unwrap_or_default();
        ensure!(
            mode == "2",
            "{what} thread {tid} ({name}): Seccomp {mode:?}, want 2 (filtered)"
        );
    }
    Ok(())
}

/// The default --device-uid/--device-gid: the VM's + 1.
pub const DEVICE_UID: u32 = UID + 1;
/// See [`DEVICE_UID`].
pub const DEVICE_GID: u32 = GID + 1;

/// A device process started by the jailer's launcher: as [`check_confined`] with the device
/// uid/gid, and in a cell of its own: its root is not skiff's cell and holds no /dev/kvm,
/// no /dev/net/tun, no image, no binary; its mount and network namespaces are neither the
/// host's nor skiff's; every fd it holds is stdio, a socket, an anonymous inode (eventfd,
/// epoll), a memfd (guest RAM, metrics page, inflight area), or, for a block device, the
/// image it was given and, for a net device, the TAP.
pub fn check_device_cell(
    pid: u32,
    skiff: u32,
    what: &str,
    cell_root: &Path,
    cgroup: &str,
) -> Result {
    check_jailed(pid, what, None, cgroup, (DEVICE_UID, DEVICE_GID))?;
    let root =
        std::fs::metadata(format!("/proc/{pid}/root/")).map_err(|e| format!("{what}: {e}"))?;
    let cell = std::fs::metadata(cell_root).map_err(|e| e.to_string())?;
    ensure!(
        (root.dev(), root.ino()) != (cell.dev(), cell.ino()),
        "{what}: its root is skiff's cell"
    );
    for p in ["dev/kvm", "dev/net/tun", "images", "bin", "run", "tmp"] {
        ensure!(
            std::fs::symlink_metadata(format!("/proc/{pid}/root/{p}")).is_err(),
            "{what}: /{p} is in its root"
        );
    }
    let ns = |p: u32, n: &str| {
        std::fs::read_link(format!("/proc/{p}/ns/{n}"))
            .map(|l| l.display().to_string())
            .unwrap_or_default()
    };
    for n in ["mnt", "net"] {
        ensure!(
            ns(pid, n) != ns(skiff, n) && ns(pid, n) != ns(1, n),
            "{what}: shares a {n} namespace with skiff or the host"
        );
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| format!("{what}: {e}"))?;
    for f in fds.flatten() {
        let n: u32 = f.file_name().to_string_lossy().parse().unwrap_or(0);
        let target = std::fs::read_link(f.path())
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        let ok = n <= 2
            || target.starts_with("socket:")
            || target.starts_with("anon_inode:")
            || target.starts_with("/memfd:")
            || target.ends_with("/dev/net/tun")
            // The staged image (the path as seen from outside its mount namespace).
            || target.contains("/images/");
        ensure!(ok, "{what}: holds fd {n} -> {target}");
    }
    Ok(())
}

fn check_jailed(
    pid: u32,
    what: &str,
    cell_root: Option<&Path>,
    cgroup: &str,
    (uid, gid): (u32, u32),
) -> Result {
    let ids = format!("{uid}\t{uid}\t{uid}\t{uid}");
    let gids = format!("{gid}\t{gid}\t{gid}\t{gid}");
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| format!("{what}: {e}"))?;
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        // A thread that ended since the directory was read (an upgrade's helper) is gone.
        let s = match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) {
            Ok(s) => s,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ESRCH) =>
            {
                continue
            }
            Err(e) => return Err(format!("{what} thread {tid}: {e}")),
        };
        let field = |n: &str| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!("{n}:"))
                        .map(|v| v.trim().to_string())
                })
                .unwrap_or_default()
        };
        ensure!(
            field("Uid") == ids,
            "{what} thread {tid}: Uid {}",
            field("Uid")
        );
        ensure!(
            field("Gid") == gids,
            "{what} thread {tid}: Gid {}",
            field("Gid")
        );
        ensure!(
            field("Groups").is_empty(),
            "{what} thread {tid}: Groups {}",
            field("Groups")
        );
        ensure!(
            field("NoNewPrivs") == "1",
            "{what} thread {tid}: NoNewPrivs {}",
            field("NoNewPrivs")
        );
        ensure!(
            field("CapEff") == "0000000000000000",
            "{what} thread {tid}: CapEff {}",
            field("CapEff")
        );
    }
    if let Some(cell_root) = cell_root {
        let root =
            std::fs::metadata(format!("/proc/{pid}/root/")).map_err(|e| format!("{what}: {e}"))?;
        let cell = std::fs::metadata(cell_root).map_err(|e| e.to_string())?;
        ensure!(
            (root.dev(), root.ino()) == (cell.dev(), cell.ino()),
            "{what}: its root is not the cell {}",
            cell_root.display()
        );
    }
    let ns = |p: &str| {
        std::fs::read_link(p)
            .map(|l| l.display().to_string())
            .unwrap_or_default()
    };
    ensure!(
        ns(&format!("/proc/{pid}/ns/mnt")) != ns("/proc/1/ns/mnt"),
        "{what}: in the host's mount namespace"
    );
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| e.to_string())?;
    ensure!(
        cg.lines().any(|l| l == format!("0::/{cgroup}")),
        "{what}: not in the cgroup /{cgroup}: {cg}"
    );
    let env = std::fs::read(format!("/proc/{pid}/environ")).map_err(|e| e.to_string())?;
    ensure!(
        env.is_empty(),
        "{what}: environment {:?}",
        String::from_utf8_lossy(&env)
    );
    Ok(())
}

/// Waits for the API socket skiff makes in the cell.
pub fn wait_socket(sock: &Path, what: &str) -> Result<ApiClient> {
    api_server::client::wait_ready(sock, Duration::from_secs(30)).map_err(|e| {
        format!(
            "{what}: the API socket {} never accepted: {e}",
            sock.display()
        )
    })?;
    Ok(ApiClient::new(sock))
}

/// A 400 whose message names `path`.
fn refused_naming(r: std::result::Result<(), ClientError>, path: &str, what: &str) -> Result {
    match r {
        Err(ClientError::Fault {
            status: 400,
            message,
        }) if message.contains(path) => {
            println!("{what}: 400 {message}");
            Ok(())
        }
        other => Err(format!("{what}: want a 400 naming {path}, got {other:?}")),
    }
}

pub fn jailer_confines_skiff() -> Result {
    let dir = TestDir::new("jailer-confines")?;
    let parent = ParentCgroup::new("confine");
    let base = dir.join("base");
    let id = "confined-1";
    let controller = some_controller()?;
    let (file, value) = controller_file(&controller);
    let cg_arg = format!("{file}={value}");
    let mut jl = Jail::new(&base, id, &parent.0)?;
    jl.extra = [
        "--cgroup",
        &cg_arg,
        "--resource-limit",
        "no-file=512",
        "--resource-limit",
        "fsize=1073741824",
    ]
    .map(String::from)
    .to_vec();
    jl.skiff = vec!["--api-sock".into(), "/run/api.sock".into()];
    let mut cmd = jl.command()?;
    let t0 = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let cell = base.join("skiff").join(id).join("root");
    let sock = cell.join("run/api.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while api_server::client::wait_ready(&sock, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(format!("skiff-jailer ended with {status}: {err}"));
        }
        ensure!(
            Instant::now() < deadline,
            "the jailed skiff's API socket {} never accepted",
            sock.display()
        );
    }
    let mut api = ApiClient::new(&sock);
    println!("jailer exec to API socket: {} ms", t0.elapsed().as_millis());
    let info = api.instance_info().map_err(|e| e.to_string())?;
    ensure!(info.id == id, "GET / says id {}", info.id);
    let pid: u32 = std::fs::read_to_string(cell.join("skiff.pid"))
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|e| format!("skiff.pid: {e}"))?;
    let cgroup = format!("{}/{id}", parent.0);
    check_confined(pid, "skiff", &cell, &cgroup)?;
    let limits =
        std::fs::read_to_string(format!("/proc/{pid}/limits")).map_err(|e| e.to_string())?;
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    ensure!(
        limit("Max open files").contains("512 512"),
        "{}",
        limit("Max open files")
    );
    ensure!(
        limit("Max file size").contains("1073741824 1073741824"),
        "{}",
        limit("Max file size")
    );
    let got = std::fs::read_to_string(cgroup_root()?.join(&cgroup).join(file))
        .map_err(|e| e.to_string())?;
    ensure!(got.trim() == value, "{file} reads {got:?}, want {value}");
    // Only stdio, skiff's own fds, and files inside the cell.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| e.to_string())?
        .flatten()
    {
        let n: u32 = fd.file_name().to_string_lossy().parse().unwrap_or(0);
        let link = std::fs::read_link(fd.path())
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        // A path is shown as skiff sees it: it must be that file of the cell.
        let in_cell = link.starts_with('/')
            && match (
                std::fs::metadata(fd.path()),
                std::fs::metadata(cell.join(link.trim_start_matches('/'))),
            ) {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            };
        ensure!(
            n < 3 || link.starts_with("anon_inode:") || link.starts_with("socket:") || in_cell,
            "skiff holds fd {n} -> {link}"
        );
    }
    // Paths that try to leave the cell.
    let outside = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .display()
        .to_string();
    std::os::unix::fs::symlink(&outside, cell.join("run/out-abs")).map_err(|e| e.to_string())?;
    std::os::unix::fs::symlink(
        "../../../../../../../../etc/hostname",
        cell.join("run/out-rel"),
    )
    .map_err(|e| e.to_string())?;
    for (what, path) in [
        ("a host path", outside.as_str()),
        ("a path with ..", "/run/../../../../../../../etc/hostname"),
        ("a planted absolute symlink", "/run/out-abs"),
        ("a planted relative symlink", "/run/out-rel"),
    ] {
        refused_naming(
            api.put_boot_source(&BootSource {
                kernel_image_path: path.to_string(),
                boot_args: None,
                initrd_path: None,
            }),
            path,
            what,
        )?;
    }
    // SIGTERM to the jailer: skiff ends the same way, the cell and the cgroup go.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().map_err(|e| e.to_string())?;
    ensure!(
        status.code() == Some(128 + libc::SIGTERM),
        "skiff-jailer ended with {status} after SIGTERM"
    );
    nothing_left(&base, id, &parent.0)?;

    // --daemonize --new-pid-ns: back at once; skiff is PID 1 of its own PID namespace.
    let id = "confined-2";
    let mut jl = Jail::new(&base, id, &parent.0)?;
    jl.extra = vec!["--daemonize".into(), "--new-pid-ns".into()];
    jl.skiff = vec!["--api-sock".into(), "/run/api.sock".into()];
    let out = output(&mut jl.command()?)?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "--daemonize: {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let num_after = |key: &str| -> Result<u32> {
        said.split(key)
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no {key:?} in {said:?}"))
    };
    let (pid, supervisor) = (num_after("skiff pid ")?, num_after("supervisor pid ")?);
    let cell = base.join("skiff").join(id).join("root");
    let _api = wait_socket(&cell.join("run/api.sock"), "daemonized skiff")?;
    check_confined(pid, "skiff", &cell, &format!("{}/{id}", parent.0))?;
    let nspid = status_field(pid, "NSpid")?;
    ensure!(
        nspid.split_whitespace().last() == Some("1"),
        "skiff is not PID 1 of its namespace: NSpid {nspid}"
    );
    // Its /proc: its own PID namespace's processes (skiff alone, no VM yet), no kernel files.
    let mut procs: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/proc"))
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    procs.sort();
    ensure!(
        procs == ["1", "self", "thread-self"],
        "the cell's /proc shows more than skiff: {procs:?}"
    );
    // SAFETY: kill(2) on the supervisor the jailer reported.
    unsafe { libc::kill(supervisor as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{supervisor}")).exists() {
        ensure!(
            Instant::now() < deadline,
            "the daemonized supervisor did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nothing_left(&base, id, &parent.0)
}

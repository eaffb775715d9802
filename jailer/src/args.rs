//! skiff-jailer's command line, and its validation into a [`Plan`] before anything on the
//! host is touched.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use clap::Parser;

/// Longest `--id`, as Firecracker's jailer.
pub const ID_MAX: usize = 64;
/// The device-process binaries that must sit beside the exec file.
pub const SIBLINGS: &[&str] = &["skiff-blk", "skiff-net"];
/// `RLIMIT_NOFILE` when `--resource-limit no-file` is not given (as Firecracker's jailer).
const DEFAULT_NO_FILE: u64 = 2048;
/// Filesystem magic numbers (statfs f_type).
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `ioctl(ns_fd, NS_GET_NSTYPE)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// skiff-jailer: starts skiff confined in a cell of its own, and removes the cell when the VM
/// ends.
///
/// The cell is <chroot-base-dir>/skiff/<id>/root. skiff-jailer validates every argument
/// first (and refuses, naming the bad value, before touching the host), then creates the
/// cell: /bin with copies of --exec-file and the skiff-blk and skiff-net beside it (owned by
/// root, read-only), /dev with kvm, net/tun (owned by --uid/--gid), urandom and null, /run
/// and /tmp (owned by --uid/--gid, for the API socket and skiff's temporary files), files
/// given by --stage. It creates the cgroup v2 <parent-cgroup>/<id> with the --cgroup values,
/// then starts skiff: in the network namespace of --netns, in a new mount namespace whose
/// root is the cell (pivot_root; /proc mounted with hidepid=invisible,subset=pid), in a new
/// PID namespace with --new-pid-ns (skiff is its PID 1), in the cgroup, with the resource
/// limits, with no fd but 0-2, an empty environment, --uid/--gid and no supplementary groups,
/// no_new_privs, and its end of the launcher socket as fd 3 (`--launcher-fd 3`).
///
/// skiff does not start its device processes itself: it asks skiff-jailer (the launcher),
/// which starts each skiff-blk and skiff-net from the cell's /bin in a cell of its own: the
/// VM's cgroup, new mount, network, IPC and UTS namespaces, an empty read-only root (only
/// /dev/null, /dev/urandom, /proc and the libraries), --device-uid/--device-gid, no_new_privs,
/// exactly the fds skiff passed (its vhost-user socket, image or TAP, metrics page).
///
/// skiff-jailer stays as skiff's parent (signals SIGTERM, SIGINT, SIGHUP and SIGQUIT are
/// passed on to skiff) and exits with skiff's status once it has removed the cell and the
/// cgroup (and killed anything left in it); --keep-cell keeps both. A failure at any step
/// removes what was made. Paths given to skiff (API requests, --config-file) are inside the
/// cell: put kernels and images there with --stage, or with hard links or bind mounts into
/// <cell> while skiff waits for its configuration over the API.
///
/// Only cgroup v2 is supported (found through /proc/self/mountinfo).
#[derive(Parser, Debug)]
#[command(name = "skiff-jailer", version, verbatim_doc_comment)]
pub struct Args {
    /// The VM's id: 1 to 64 characters, letters, digits and '-'. Names the cell and the cgroup,
    /// and is passed to skiff as --id.
    #[arg(long)]
    pub id: String,
    /// The skiff binary to run (skiff-blk and skiff-net must sit beside it). Copied into the
    /// cell's /bin.
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The user skiff runs as: a number or a name from the user database; not 0.
    #[arg(long)]
    pub uid: String,
    /// The group skiff runs as: a number or a name from the group database; not 0.
    #[arg(long)]
    pub gid: String,
    /// The user skiff's device processes (skiff-blk, skiff-net) run as: a number or a name;
    /// not 0 and not --uid. Default: --uid + 1 (allocate two uids per VM).
    #[arg(long)]
    pub device_uid: Option<String>,
    /// The group of the device processes: a number or a name; not 0 and not --gid. Default:
    /// --gid + 1.
    #[arg(long)]
    pub device_gid: Option<String>,
    /// Where cells are made: <chroot-base-dir>/skiff/<id>/root.
    #[arg(long, value_name = "DIR", default_value = "/srv/skiff")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// The cgroup version: only 2 is supported.
    #[arg(long, value_name = "2", default_value_t = 2)]
    pub cgroup_version: u32,
    /// A cgroup v2 interface file of the VM's cgroup and its value, e.g. memory.max=512M,
    /// cpu.max="50000 100000", pids.max=64 (repeatable). The controller must be available.
    #[arg(long, value_name = "FILE=VALUE")]
    pub cgroup: Vec<String>,
    /// The cgroup the VM's cgroup <id> is made in, relative to the cgroup v2 root.
    #[arg(long, value_name = "PATH", default_value = "skiff")]
    pub parent_cgroup: String,
    /// no-file=N (RLIMIT_NOFILE, default 2048) or fsize=N (RLIMIT_FSIZE, bytes); repeatable.
    #[arg(long, value_name = "RESOURCE=N")]
    pub resource_limit: Vec<String>,
    /// Puts a host file into the cell before skiff starts: HOST_PATH:CELL_PATH[:rw], CELL_PATH
    /// absolute as skiff sees it (e.g. /images/rootfs.ext4). A hard link, so on the same
    /// filesystem as --chroot-base-dir; with :rw the file is given to --uid/--gid while the VM
    /// runs (its owner is restored afterwards); repeatable.
    #[arg(long, value_name = "HOST:CELL[:rw]")]
    pub stage: Vec<String>,
    /// Detach: a new session, stdio on /dev/null; skiff-jailer returns once skiff runs,
    /// printing the supervisor's and skiff's pids.
    #[arg(long)]
    pub daemonize: bool,
    /// Start skiff as PID 1 of a new PID namespace (its pid outside is written to
    /// <cell>/skiff.pid).
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Keep the cell and the cgroup when the VM ends, for inspection.
    #[arg(long)]
    pub keep_cell: bool,
    /// skiff's own arguments, after `--` (skiff-jailer appends --id <id>).
    #[arg(last = true, value_name = "SKIFF ARGS")]
    pub skiff_args: Vec<OsString>,
}

/// A file put into the cell.
#[derive(Debug, Clone)]
pub struct Stage {
    pub host: PathBuf,
    /// Relative to the cell root.
    pub cell: PathBuf,
    pub rw: bool,
}

/// Everything skiff-jailer will do, validated.
#[derive(Debug)]
pub struct Plan {
    pub id: String,
    pub exec_file: PathBuf,
    pub exec_name: String,
    pub siblings: Vec<PathBuf>,
    /// The interpreter and libraries the binaries need (none when they are static).
    pub runtime_files: Vec<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub device_uid: u32,
    pub device_gid: u32,
    pub base: PathBuf,
    pub netns: Option<OwnedFd>,
    pub cgroup_values: Vec<(String, String)>,
    pub parent_cgroup: PathBuf,
    pub no_file: u64,
    pub fsize: Option<u64>,
    pub stages: Vec<Stage>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub keep_cell: bool,
    pub skiff_args: Vec<OsString>,
}

impl Plan {
    /// <base>/skiff/<id>: the cell's own directory.
    pub fn cell_dir(&self) -> PathBuf {
        self.base.join("skiff").join(&self.id)
    }
}

/// What is wrong with the command line or the host, named.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("--id {0:?}: must be 1 to {ID_MAX} characters, letters, digits and '-'")]
    Id(String),
    #[error("--{flag} {value:?}: {why}")]
    Ident {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error("--exec-file {}: {why}", .path.display())]
    ExecFile { path: PathBuf, why: String },
    #[error("--exec-file {}: {name} is missing beside it ({}): {why}", .exec.display(), .path.display())]
    Sibling {
        exec: PathBuf,
        name: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("--chroot-base-dir {}: {why}", .path.display())]
    Base { path: PathBuf, why: String },
    #[error("the cell {} already exists (is a VM with --id {id} running, or was it kept with --keep-cell?)", .path.display())]
    CellExists { path: PathBuf, id: String },
    #[error("--netns {}: {why}", .path.display())]
    Netns { path: PathBuf, why: String },
    #[error("--cgroup-version {0}: only cgroup v2 is supported")]
    CgroupVersion(u32),
    #[error(
        "--cgroup {0:?}: want FILE=VALUE with FILE a cgroup interface file such as memory.max"
    )]
    CgroupArg(String),
    #[error("--parent-cgroup {0:?}: want a relative path of names (letters, digits, '_', '-', '.'), no '..'")]
    ParentCgroup(String),
    #[error("--resource-limit {0:?}: want no-file=N or fsize=N")]
    ResourceLimit(String),
    #[error("--stage {arg:?}: {why}")]
    Stage { arg: String, why: String },
    #[error("--exec-file: what it needs to run cannot be found")]
    Runtime(#[source] crate::elf::ElfError),
    #[error("skiff's arguments: {0} is given by skiff-jailer")]
    SkiffArg(String),
}

fn ident_err(flag: &'static str, value: &str, why: impl Into<String>) -> ArgsError {
    ArgsError::Ident {
        flag,
        value: value.to_string(),
        why: why.into(),
    }
}

/// The device processes' uid and gid: given, or the VM's + 1; never 0, never the VM's.
fn device_ids(args: &Args, uid: u32, gid: u32) -> Result<(u32, u32), ArgsError> {
    let pick = |flag: &'static str, given: &Option<String>, vm: u32, user: bool| {
        let id = match given {
            Some(v) => resolve_id(flag, v, user)?,
            None => vm
                .checked_add(1)
                .filter(|n| *n != u32::MAX)
                .ok_or_else(|| ArgsError::Ident {
                    flag,
                    value: format!("{vm} + 1"),
                    why: "out of range; give it".into(),
                })?,
        };
        if id == vm {
            return Err(ArgsError::Ident {
                flag,
                value: id.to_string(),
                why: format!(
                    "must differ from --{}: a device process must not be able to signal or \
                     trace skiff",
                    &flag[7..]
                ),
            });
        }
        Ok(id)
    };
    Ok((
        pick("device-uid", &args.device_uid, uid, true)?,
        pick("device-gid", &args.device_gid, gid, false)?,
    ))
}

/// A uid or gid: a number, or a name looked up in the user or group database.
fn resolve_id(flag: &'static str, value: &str, user: bool) -> Result<u32, ArgsError> {
    let id = if let Ok(n) = value.parse::<u32>() {
        n
    } else {
        let name = CString::new(value).map_err(|_| ident_err(flag, value, "holds a NUL byte"))?;
        let mut buf = vec![0u8; 16384];
        let mut out: i32 = -1;
        let found = if user {
            // SAFETY: zeroed passwd is a valid out-parameter; `buf` outlives the call and its
            // length is passed; `res` is checked before `pw` is read.
            unsafe {
                let mut pw: libc::passwd = std::mem::zeroed();
                let mut res: *mut libc::passwd = std::ptr::null_mut();
                let rc = libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut res,
                );
                if rc == 0 && !res.is_null() {
                    out = pw.pw_uid as i32;
                }
                rc == 0 && !res.is_null()
            }
        } else {
            // SAFETY: as above, for the group database.
            unsafe {
                let mut gr: libc::group = std::mem::zeroed();
                let mut res: *mut libc::group = std::ptr::null_mut();
                let rc = libc::getgrnam_r(
                    name.as_ptr(),
                    &mut gr,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut res,
                );
                if rc == 0 && !res.is_null() {
                    out = gr.gr_gid as i32;
                }
                rc == 0 && !res.is_null()
            }
        };
        if !found {
            let db = if user { "user" } else { "group" };
            return Err(ident_err(flag, value, format!("no such {db}")));
        }
        out as u32
    };
    if id == 0 {
        return Err(ident_err(flag, value, "root is not a confinement"));
    }
    if id == u32::MAX {
        return Err(ident_err(flag, value, "-1 is not an id"));
    }
    Ok(id)
}

/// A regular ELF file with an execute bit.
fn check_elf(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable".into());
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if magic != *b"\x7fELF" {
        return Err("not an ELF executable".into());
    }
    Ok(())
}

/// Opens `path` and checks that it is a network namespace.
fn open_netns(path: &Path) -> Result<OwnedFd, ArgsError> {
    let err = |why: String| ArgsError::Netns {
        path: path.to_path_buf(),
        why,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    // SAFETY: zeroed statfs is a valid out-parameter for fstatfs on an open fd.
    let fs_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(file.as_raw_fd(), &mut st) != 0 {
            return Err(err(std::io::Error::last_os_error().to_string()));
        }
        st.f_type
    };
    if fs_type != NSFS_MAGIC {
        return Err(err("not a namespace file (nsfs)".into()));
    }
    // SAFETY: NS_GET_NSTYPE takes no argument and only returns a value.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind != libc::CLONE_NEWNET {
        return Err(err("not a network namespace".into()));
    }
    Ok(file.into())
}

/// A relative path of plain names.
fn plain_relative(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    if p.is_empty() || path.is_absolute() {
        return None;
    }
    let ok = path.components().all(|c| match c {
        Component::Normal(s) => s.to_str().is_some_and(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        }),
        _ => false,
    });
    ok.then(|| path.to_path_buf())
}

fn parse_stage(arg: &str) -> Result<Stage, ArgsError> {
    let err = |why: &str| ArgsError::Stage {
        arg: arg.to_string(),
        why: why.to_string(),
    };
    let (rest, rw) = match arg.strip_suffix(":rw") {
        Some(r) => (r, true),
        None => (arg, false),
    };
    let (host, cell) = rest
        .rsplit_once(':')
        .ok_or_else(|| err("want HOST_PATH:CELL_PATH[:rw]"))?;
    let host = PathBuf::from(host);
    let meta = std::fs::symlink_metadata(&host).map_err(|e| err(&e.to_string()))?;
    if !meta.is_file() {
        return Err(err(
            "the host path is not a regular file (links are not followed)",
        ));
    }
    let inner = cell
        .strip_prefix('/')
        .and_then(plain_relative)
        .ok_or_else(|| err("the cell path must be absolute, made of plain names, no '..'"))?;
    let first = inner
        .components()
        .next()
        .and_then(|c| c.as_os_str().to_str());
    if matches!(first, Some("bin" | "dev" | "proc" | "run" | "tmp")) {
        return Err(err(
            "the cell path is in a directory skiff-jailer makes itself",
        ));
    }
    Ok(Stage {
        host,
        cell: inner,
        rw,
    })
}

impl Args {
    /// Checks everything; opens the netns. Touches nothing on the host.
    pub fn validate(self) -> Result<Plan, ArgsError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= ID_MAX
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !id_ok {
            return Err(ArgsError::Id(self.id));
        }
        let uid = resolve_id("uid", &self.uid, true)?;
        let gid = resolve_id("gid", &self.gid, false)?;
        let (device_uid, device_gid) = device_ids(&self, uid, gid)?;

        let exec_file =
            std::fs::canonicalize(&self.exec_file).map_err(|e| ArgsError::ExecFile {
                path: self.exec_file.clone(),
                why: e.to_string(),
            })?;
        check_elf(&exec_file).map_err(|why| ArgsError::ExecFile {
            path: self.exec_file.clone(),
            why,
        })?;
        let exec_name = exec_file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| ArgsError::ExecFile {
                path: self.exec_file.clone(),
                why: "its name is not UTF-8".into(),
            })?;
        let dir = exec_file.parent().unwrap_or(Path::new("/"));
        let mut siblings = Vec::new();
        for name in SIBLINGS {
            let path = dir.join(name);
            check_elf(&path).map_err(|why| ArgsError::Sibling {
                exec: self.exec_file.clone(),
                name,
                path: path.clone(),
                why,
            })?;
            siblings.push(path);
        }
        let mut all = vec![exec_file.clone()];
        all.extend(siblings.iter().cloned());
        let runtime_files = crate::elf::runtime_files(&all)
            .map_err(ArgsError::Runtime)?
            .into_iter()
            .collect();

        let base = &self.chroot_base_dir;
        let base_err = |why: &str| ArgsError::Base {
            path: base.clone(),
            why: why.to_string(),
        };
        if !base.is_absolute() {
            return Err(base_err("must be an absolute path"));
        }
        // The deepest existing ancestor must be a real directory (not a file, not a link).
        let mut probe = base.as_path();
        loop {
            match std::fs::symlink_metadata(probe) {
                Ok(m) if m.is_dir() => break,
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(base_err(&format!("{} is a symbolic link", probe.display())))
                }
                Ok(_) => return Err(base_err(&format!("{} is not a directory", probe.display()))),
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    probe = probe.parent().unwrap_or(Path::new("/"));
                }
                Err(e) => return Err(base_err(&e.to_string())),
            }
        }
        let cell = base.join("skiff").join(&self.id);
        if std::fs::symlink_metadata(&cell).is_ok() {
            return Err(ArgsError::CellExists {
                path: cell,
                id: self.id,
            });
        }

        let netns = self.netns.as_deref().map(open_netns).transpose()?;

        if self.cgroup_version != 2 {
            return Err(ArgsError::CgroupVersion(self.cgroup_version));
        }
        let mut cgroup_values = Vec::new();
        for c in &self.cgroup {
            let (file, value) = c
                .split_once('=')
                .ok_or_else(|| ArgsError::CgroupArg(c.clone()))?;
            let file_ok = file.contains('.')
                && !file.starts_with("cgroup.")
                && file
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
            if !file_ok || value.is_empty() || value.contains('\n') {
                return Err(ArgsError::CgroupArg(c.clone()));
            }
            cgroup_values.push((file.to_string(), value.to_string()));
        }
        let parent_cgroup = plain_relative(&self.parent_cgroup)
            .ok_or_else(|| ArgsError::ParentCgroup(self.parent_cgroup.clone()))?;

        let mut no_file = DEFAULT_NO_FILE;
        let mut fsize = None;
        for r in &self.resource_limit {
            let bad = || ArgsError::ResourceLimit(r.clone());
            let (what, n) = r.split_once('=').ok_or_else(bad)?;
            let n: u64 = n.parse().map_err(|_| bad())?;
            match what {
                "no-file" if n > 0 => no_file = n,
                "fsize" => fsize = Some(n),
                _ => return Err(bad()),
            }
        }

        let stages = self
            .stage
            .iter()
            .map(|s| parse_stage(s))
            .collect::<Result<Vec<_>, _>>()?;
        for a in &self.skiff_args {
            let s = a.to_string_lossy();
            for own in ["--id", "--launcher-fd"] {
                if s == own || s.starts_with(&format!("{own}=")) {
                    return Err(ArgsError::SkiffArg(own.into()));
                }
            }
        }
        Ok(Plan {
            id: self.id,
            exec_file,
            exec_name,
            siblings,
            runtime_files,
            uid,
            gid,
            device_uid,
            device_gid,
            base: self.chroot_base_dir,
            netns,
            cgroup_values,
            parent_cgroup,
            no_file,
            fsize,
            stages,
            daemonize: self.daemonize,
            new_pid_ns: self.new_pid_ns,
            keep_cell: self.keep_cell,
            skiff_args: self.skiff_args,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_plain_names_only() {
        assert!(plain_relative("skiff").is_some());
        assert!(plain_relative("a/b-c/d_e.1").is_some());
        for bad in ["", "/abs", "../x", "a/../b", "./a", "a b", "a\nb"] {
            assert!(plain_relative(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn stage_arguments() {
        let exe = std::env::current_exe().expect("exe");
        let e = exe.display();
        let s = parse_stage(&format!("{e}:/images/x.img:rw")).expect("rw stage");
        assert!(s.rw);
        assert_eq!(s.cell, PathBuf::from("images/x.img"));
        let s = parse_stage(&format!("{e}:/k")).expect("ro stage");
        assert!(!s.rw);
        for bad in [
            format!("{e}"),
            format!("{e}:images/x"),
            format!("{e}:/a/../b"),
            format!("{e}:/bin/skiff"),
            format!("{e}:/dev/kvm"),
            "/nonexistent/file:/x".to_string(),
            "/tmp:/x".to_string(),
        ] {
            assert!(parse_stage(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_resolve_by_number_and_name() {
        assert_eq!(resolve_id("uid", "1234", true).expect("number"), 1234);
        assert!(resolve_id("uid", "0", true).is_err());
        assert!(resolve_id("uid", "root", true).is_err());
        assert!(resolve_id("uid", "4294967295", true).is_err());
        let e = resolve_id("uid", "no-such-user-skiff", true)
            .expect_err("unknown user")
            .to_string();
        assert!(e.contains("no such user"), "{e}");
        assert!(resolve_id("gid", "no-such-group-skiff", false).is_err());
    }
}

//! The cell: <base>/skiff/<id>/root, what skiff may see and nothing else, and its removal.

use std::ffi::CString;
use std::fs::DirBuilder;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::args::{Plan, Stage};

/// Character devices skiff may need: (path in the cell, major, minor, mode, owned by the VM's
/// user).
const DEVICES: &[(&str, u32, u32, u32, bool)] = &[
    ("dev/kvm", 10, 232, 0o600, true),
    ("dev/net/tun", 10, 200, 0o600, true),
    ("dev/urandom", 1, 9, 0o666, false),
    ("dev/null", 1, 3, 0o666, false),
];

/// Errors of the cell steps.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    #[error("cannot create {}", .0.display())]
    Mkdir(PathBuf, #[source] std::io::Error),
    #[error("cannot copy {} to {}", .0.display(), .1.display())]
    Copy(PathBuf, PathBuf, #[source] std::io::Error),
    #[error("cannot set owner or mode of {}", .0.display())]
    Own(PathBuf, #[source] std::io::Error),
    #[error("cannot create the device node {}", .0.display())]
    Mknod(PathBuf, #[source] std::io::Error),
    #[error("device nodes do not work under {} (a nodev mount?): opening {} failed", .base.display(), .node.display())]
    NoDev {
        base: PathBuf,
        node: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--stage {}: cannot link it to {} (hard links need the same filesystem as --chroot-base-dir)", .0.display(), .1.display())]
    Link(PathBuf, PathBuf, #[source] std::io::Error),
    #[error("--stage {}: not readable by uid {uid} gid {gid} (stage it with :rw, or change its mode)", .path.display())]
    Unreadable { path: PathBuf, uid: u32, gid: u32 },
    #[error("cannot remove the cell {}", .0.display())]
    Remove(PathBuf, #[source] std::io::Error),
}

/// A file given to the VM's user for the VM's life: owner and mode to restore.
#[derive(Debug)]
struct Lent {
    path: PathBuf,
    uid: u32,
    gid: u32,
    mode: u32,
}

/// A cell on the host.
#[derive(Debug)]
pub struct Cell {
    /// <base>/skiff/<id>
    pub dir: PathBuf,
    /// <base>/skiff/<id>/root: skiff's `/`.
    pub root: PathBuf,
    /// Directories above `dir` this run created, deepest last (removed when empty).
    created_above: Vec<PathBuf>,
    /// Whether this run made `dir` (never remove another VM's cell).
    made: bool,
    lent: Vec<Lent>,
}

fn mkdir(path: &Path, mode: u32) -> Result<(), CellError> {
    DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| CellError::Mkdir(path.to_path_buf(), e))?;
    // Not the umask's choice.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| CellError::Own(path.to_path_buf(), e))
}

fn own(path: &Path, uid: u32, gid: u32, mode: u32) -> Result<(), CellError> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| CellError::Own(path.to_path_buf(), e))
}

fn mknod(path: &Path, major: u32, minor: u32) -> Result<(), CellError> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| CellError::Mknod(path.to_path_buf(), std::io::Error::other(e)))?;
    // SAFETY: `c` is a valid NUL-terminated path; mknod only reads it.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o600,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        return Err(CellError::Mknod(
            path.to_path_buf(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Can `uid`/`gid` (no supplementary groups) read a file with this metadata?
fn readable_by(meta: &std::fs::Metadata, uid: u32, gid: u32) -> bool {
    let mode = meta.mode();
    if meta.uid() == uid {
        mode & 0o400 != 0
    } else if meta.gid() == gid {
        mode & 0o040 != 0
    } else {
        mode & 0o004 != 0
    }
}

impl Cell {
    /// Creates the cell for `plan`; on error removes what it made.
    pub fn create(plan: &Plan) -> Result<Cell, CellError> {
        let dir = plan.cell_dir();
        let mut cell = Cell {
            root: dir.join("root"),
            dir,
            created_above: Vec::new(),
            made: false,
            lent: Vec::new(),
        };
        match cell.build(plan) {
            Ok(()) => Ok(cell),
            Err(e) => {
                let _ = cell.remove();
                Err(e)
            }
        }
    }

    fn build(&mut self, plan: &Plan) -> Result<(), CellError> {
        // <base> and <base>/skiff, shared by every cell: made when missing.
        let mut missing = Vec::new();
        let mut p = self.dir.parent();
        while let Some(d) = p {
            if std::fs::symlink_metadata(d).is_ok() {
                break;
            }
            missing.push(d.to_path_buf());
            p = d.parent();
        }
        for d in missing.into_iter().rev() {
            mkdir(&d, 0o755)?;
            self.created_above.push(d);
        }
        // The cell's own directory: fails when it exists (another VM with this id).
        DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| CellError::Mkdir(self.dir.clone(), e))?;
        self.made = true;
        let (uid, gid) = (plan.uid, plan.gid);
        let root = self.root.clone();
        mkdir(&root, 0o755)?;
        for d in ["bin", "dev", "dev/net", "proc"] {
            mkdir(&root.join(d), if d == "proc" { 0o555 } else { 0o755 })?;
        }
        for d in ["run", "tmp"] {
            mkdir(&root.join(d), 0o700)?;
            own(&root.join(d), uid, gid, 0o700)?;
        }
        // The binaries: root's, read-only, so the jailed user cannot change what runs.
        let mut bins = vec![(plan.exec_file.clone(), plan.exec_name.clone())];
        for s in &plan.siblings {
            let name = s
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            bins.push((s.clone(), name));
        }
        for (from, name) in bins {
            let to = root.join("bin").join(name);
            std::fs::copy(&from, &to).map_err(|e| CellError::Copy(from.clone(), to.clone(), e))?;
            own(&to, 0, 0, 0o555)?;
        }
        // A dynamically linked build: its loader and libraries, at the same paths.
        for lib in &plan.runtime_files {
            let rel = lib.strip_prefix("/").unwrap_or(lib);
            let to = root.join(rel);
            self.mkdirs(to.parent())?;
            std::fs::copy(lib, &to).map_err(|e| CellError::Copy(lib.clone(), to.clone(), e))?;
            own(&to, 0, 0, 0o555)?;
        }
        for (path, major, minor, mode, users) in DEVICES {
            let node = root.join(path);
            mknod(&node, *major, *minor)?;
            let (u, g) = if *users { (uid, gid) } else { (0, 0) };
            own(&node, u, g, *mode)?;
        }
        let null = root.join("dev/null");
        std::fs::File::open(&null).map_err(|source| CellError::NoDev {
            base: plan.base.clone(),
            node: null.clone(),
            source,
        })?;
        for s in &plan.stages {
            self.stage(s, uid, gid)?;
        }
        Ok(())
    }

    /// Makes the missing directories of `dir` inside the cell (root's, 0755).
    fn mkdirs(&self, dir: Option<&Path>) -> Result<(), CellError> {
        let mut todo = Vec::new();
        let mut d = dir;
        while let Some(x) = d {
            if x == self.root || std::fs::symlink_metadata(x).is_ok() {
                break;
            }
            todo.push(x.to_path_buf());
            d = x.parent();
        }
        for x in todo.into_iter().rev() {
            mkdir(&x, 0o755)?;
        }
        Ok(())
    }

    fn stage(&mut self, s: &Stage, uid: u32, gid: u32) -> Result<(), CellError> {
        let to = self.root.join(&s.cell);
        self.mkdirs(to.parent())?;
        std::fs::hard_link(&s.host, &to)
            .map_err(|e| CellError::Link(s.host.clone(), to.clone(), e))?;
        let meta = std::fs::symlink_metadata(&to).map_err(|e| CellError::Own(to.clone(), e))?;
        if s.rw {
            self.lent.push(Lent {
                path: to.clone(),
                uid: meta.uid(),
                gid: meta.gid(),
                mode: meta.mode() & 0o7777,
            });
            own(&to, uid, gid, 0o600)?;
        } else if !readable_by(&meta, uid, gid) {
            return Err(CellError::Unreadable {
                path: s.host.clone(),
                uid,
                gid,
            });
        }
        Ok(())
    }

    /// Gives lent files back, removes the cell (links are not followed), and the shared
    /// directories above it this run made, when they are empty.
    pub fn remove(&mut self) -> Result<(), CellError> {
        for l in self.lent.drain(..) {
            let _ = own(&l.path, l.uid, l.gid, l.mode);
        }
        let mut result = Ok(());
        if self.made {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                result = Err(CellError::Remove(self.dir.clone(), e));
            }
        }
        while let Some(d) = self.created_above.pop() {
            let _ = std::fs::remove_dir(&d);
        }
        result
    }
}

//! The VM's cgroup v2: <root>/<parent>/<id>, its limits, and its removal (with anything
//! still in it killed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::args::Plan;

/// How long removal waits for the killed processes of the cgroup to be gone.
const DRAIN: Duration = Duration::from_secs(5);

/// Errors of the cgroup steps.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (none in /proc/self/mountinfo)")]
    NoV2,
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("--cgroup {file}: the {controller} controller is not available in the cgroup v2 hierarchy at {} (available: {available})", .root.display())]
    Controller {
        file: String,
        controller: String,
        root: PathBuf,
        available: String,
    },
    #[error("the cgroup {} already exists (is a VM with this id running?)", .0.display())]
    Exists(PathBuf),
    #[error("cannot create the cgroup {}", .0.display())]
    Create(PathBuf, #[source] std::io::Error),
    #[error("cannot enable the {controller} controller in {}", .path.display())]
    Enable {
        controller: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cgroup {file}={value}: cannot write it to {}", .path.display())]
    Value {
        file: String,
        value: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot remove the cgroup {}", .0.display())]
    Remove(PathBuf, #[source] std::io::Error),
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the first cgroup2 filesystem in `mountinfo`.
fn v2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace()
            .nth(4)
            .map(|m| PathBuf::from(unescape(m)))
    })
}

/// The VM's cgroup, created.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// Ancestors this run created (removed again when empty), deepest last.
    created: Vec<PathBuf>,
}

/// The cgroup v2 root and the controllers `plan` needs, checked against what it offers.
pub fn check(plan: &Plan) -> Result<(PathBuf, Vec<String>), CgroupError> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| CgroupError::Read("/proc/self/mountinfo".into(), e))?;
    let root = v2_root_in(&mi).ok_or(CgroupError::NoV2)?;
    let list = root.join("cgroup.controllers");
    let available = std::fs::read_to_string(&list).map_err(|e| CgroupError::Read(list, e))?;
    let available: Vec<&str> = available.split_whitespace().collect();
    let mut needed: Vec<String> = Vec::new();
    for (file, _) in &plan.cgroup_values {
        let controller = file.split('.').next().unwrap_or_default().to_string();
        if !available.contains(&controller.as_str()) {
            return Err(CgroupError::Controller {
                file: file.clone(),
                controller,
                root,
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(" ")
                },
            });
        }
        if !needed.contains(&controller) {
            needed.push(controller);
        }
    }
    if std::fs::symlink_metadata(root.join(&plan.parent_cgroup).join(&plan.id)).is_ok() {
        return Err(CgroupError::Exists(
            root.join(&plan.parent_cgroup).join(&plan.id),
        ));
    }
    Ok((root, needed))
}

fn enable(dir: &Path, controllers: &[String]) -> Result<(), CgroupError> {
    let control = dir.join("cgroup.subtree_control");
    let on =
        std::fs::read_to_string(&control).map_err(|e| CgroupError::Read(control.clone(), e))?;
    for c in controllers {
        if on.split_whitespace().any(|x| x == c) {
            continue;
        }
        std::fs::write(&control, format!("+{c}")).map_err(|source| CgroupError::Enable {
            controller: c.clone(),
            path: control.clone(),
            source,
        })?;
    }
    Ok(())
}

impl Cgroup {
    /// Creates <root>/<parent>/<id> with the controllers enabled down to it and the values
    /// written. On error, removes what it made.
    pub fn create(plan: &Plan, root: &Path, controllers: &[String]) -> Result<Cgroup, CgroupError> {
        let mut cg = Cgroup {
            path: root.join(&plan.parent_cgroup).join(&plan.id),
            created: Vec::new(),
        };
        match cg.build(plan, root, controllers) {
            Ok(()) => Ok(cg),
            Err(e) => {
                let _ = cg.remove();
                Err(e)
            }
        }
    }

    fn build(
        &mut self,
        plan: &Plan,
        root: &Path,
        controllers: &[String],
    ) -> Result<(), CgroupError> {
        let mut dir = root.to_path_buf();
        enable(&dir, controllers)?;
        for part in plan.parent_cgroup.components() {
            dir.push(part);
            match std::fs::create_dir(&dir) {
                Ok(()) => self.created.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(CgroupError::Create(dir, e)),
            }
            enable(&dir, controllers)?;
        }
        match std::fs::create_dir(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Not ours: never remove it.
                let path = std::mem::take(&mut self.path);
                return Err(CgroupError::Exists(path));
            }
            Err(e) => {
                let path = std::mem::take(&mut self.path);
                return Err(CgroupError::Create(path, e));
            }
        }
        for (file, value) in &plan.cgroup_values {
            let path = self.path.join(file);
            std::fs::write(&path, value).map_err(|source| CgroupError::Value {
                file: file.clone(),
                value: value.clone(),
                path,
                source,
            })?;
        }
        Ok(())
    }

    /// `cgroup.procs` of the VM's cgroup: a process joins by writing "0" to it.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    fn populated(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|t| t.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills whatever is left in the cgroup, removes it and the ancestors this run made
    /// (when empty).
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        if !self.path.as_os_str().is_empty() && self.path.exists() {
            let deadline = Instant::now() + DRAIN;
            while self.populated() && Instant::now() < deadline {
                if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                    // Before Linux 5.14: kill them one by one.
                    for pid in std::fs::read_to_string(self.procs())
                        .unwrap_or_default()
                        .lines()
                    {
                        if let Ok(pid) = pid.trim().parse::<i32>() {
                            // SAFETY: kill has no memory-safety preconditions.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            std::fs::remove_dir(&self.path)
                .map_err(|e| CgroupError::Remove(self.path.clone(), e))?;
        }
        while let Some(dir) = self.created.pop() {
            // Shared with other VMs: it may hold their cgroups by now.
            let _ = std::fs::remove_dir(&dir);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount() {
        let mi = "25 1 0:23 / /sys rw - sysfs sysfs rw\n\
                  30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                  36 25 0:31 / /sys/fs/cgroup/uni\\040fied rw shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            v2_root_in(mi),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(v2_root_in("25 1 0:23 / /sys rw - sysfs sysfs rw\n"), None);
    }
}

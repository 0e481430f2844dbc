//! Pods' cgroups, as a kubelet makes them: each pod's processes live under a cgroup
//! whose path names the pod's UID (`.../kubepods/besteffort/pod<uid>/<container>`, the
//! cgroupfs driver's layout), so a node agent finds a running pod's processes, and
//! through them its network namespace, the way it does on a real node.
//!
//! The sandbox's tree is under `weft.slice/<sandbox>/` of the first writable cgroup
//! hierarchy (the unified one when mounted), as a kubelet with `--cgroup-root` would
//! nest it, and is removed with the sandbox.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The sandbox's part of a cgroup hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
}

/// Cgroup filesystems mounted on this machine, unified (v2) first.
fn hierarchies() -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    let mut v2 = Vec::new();
    let mut v1 = Vec::new();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (_, Some(at), Some(fs), Some(options)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        match fs {
            "cgroup2" => v2.push(PathBuf::from(at)),
            // A named hierarchy without controllers, or the pids one, only groups.
            "cgroup" if options.contains("name=systemd") || options.contains("pids") => {
                v1.push(PathBuf::from(at))
            }
            _ => {}
        }
    }
    v2.extend(v1);
    v2
}

impl Cgroups {
    /// The sandbox `name`'s cgroup tree, made in the first hierarchy that takes it.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let mut tried = Vec::new();
        for hierarchy in hierarchies() {
            let root = hierarchy.join("weft.slice").join(name);
            match std::fs::create_dir_all(root.join("kubepods").join("besteffort")) {
                Ok(()) => return Ok(Cgroups { root }),
                Err(e) => tried.push(format!("{}: {e}", hierarchy.display())),
            }
        }
        anyhow::bail!(
            "no writable cgroup hierarchy for the pods' cgroups (tried {:?}); the sandbox's kubelet needs one, as a real one does",
            tried
        )
    }

    /// The cgroup of one container (`pause` or the app's) of pod `uid`, made if needed.
    pub fn container(&self, uid: &str, container: &str) -> std::io::Result<PathBuf> {
        let dir = self
            .root
            .join("kubepods")
            .join("besteffort")
            .join(format!("pod{uid}"))
            .join(container);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Removes pod `uid`'s cgroups (their processes must have exited).
    pub fn remove_pod(&self, uid: &str) {
        remove_tree(
            &self
                .root
                .join("kubepods")
                .join("besteffort")
                .join(format!("pod{uid}")),
        );
    }

    /// Removes the sandbox's whole tree.
    pub fn remove_all(&self) {
        remove_tree(&self.root);
        if let Some(parent) = self.root.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Removes a cgroup directory and the ones below it (cgroup directories are removed with
/// rmdir, deepest first).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// `command`, started inside `cgroup`: a shell moves itself there and then becomes the
/// command, so the process and everything it starts belong to the pod from the first
/// instruction.
pub fn in_cgroup(cgroup: &Path, program: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo 0 > "$0/cgroup.procs" && exec "$@""#)
        .arg(cgroup)
        .arg(program)
        .args(args);
    cmd
}

//! Finding a running pod's network namespace as a node agent does: through its
//! processes under `/proc`, whose cgroup path the kubelet names after the pod's UID.
//!
//! ```text
//!  /proc/<pid>/cgroup  "0::/kubepods.slice/kubepods-besteffort.slice/
//!                        kubepods-besteffort-pod3f1c9a52_7d0e_..._0c2f5e8d1b47.slice/cri-..."
//!                  or  "4:memory:/kubepods/besteffort/pod3f1c9a52-7d0e-.../<container>"
//!     -> pod UID -> /proc/<pid>/ns/net (not the node's own) -> the pod's namespace
//! ```
//!
//! Both kubelet cgroup drivers (cgroupfs and systemd), cgroup v1 and v2, and any prefix
//! before the kubelet's tree (nested nodes, `--cgroup-root`) are read.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use crate::plan::NetnsId;

/// The UID of the pod a cgroup path (one line of `/proc/<pid>/cgroup`, or all of them)
/// belongs to, with dashes, if the kubelet made it.
pub fn pod_uid(cgroup: &str) -> Option<String> {
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or(line);
        for component in path.split('/') {
            let mut rest = component;
            while let Some(at) = rest.find("pod") {
                let tail = &rest[at + 3..];
                if let Some(uid) = uid_prefix(tail) {
                    return Some(uid);
                }
                rest = tail;
            }
        }
    }
    None
}

/// A UID at the start of `text` (8-4-4-4-12 hex digits, `-` or `_` between; the systemd
/// driver writes `_`), followed by the end or `.slice`.
fn uid_prefix(text: &str) -> Option<String> {
    let candidate = text.get(..36)?;
    let after = &text[36..];
    if !(after.is_empty() || after.starts_with('.')) {
        return None;
    }
    let ok = candidate.char_indices().all(|(i, c)| match i {
        8 | 13 | 18 | 23 => c == '-' || c == '_',
        _ => c.is_ascii_hexdigit(),
    });
    ok.then(|| candidate.replace('_', "-").to_ascii_lowercase())
}

/// A pod found under `/proc`: a process of it, and its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// A process of the pod, to open its namespace through.
    pub pid: u32,
    /// The pod's namespace.
    pub netns: NetnsId,
}

/// Looks under `proc` (`/proc`) for a process of each pod in `uids`, in a network
/// namespace other than `node` (the node's own: a pod sharing it is host-network and has
/// nothing to capture).
pub fn scan(proc: &Path, uids: &BTreeSet<String>, node: NetnsId) -> BTreeMap<String, Found> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(proc) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A process may exit while it is read: then it is simply not there.
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let Some(uid) = pod_uid(&cgroup).filter(|u| uids.contains(u)) else {
            continue;
        };
        if found.contains_key(&uid) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(entry.path().join("ns/net")) else {
            continue;
        };
        let netns = (
            std::os::unix::fs::MetadataExt::dev(&meta),
            std::os::unix::fs::MetadataExt::ino(&meta),
        );
        if netns != node {
            found.insert(uid, Found { pid, netns });
        }
    }
    found
}

/// Opens a found pod's namespace, checking it is still the one that was found (the
/// process may have exited, and its PID been reused).
pub fn open(proc: &Path, found: &Found) -> std::io::Result<File> {
    let file = File::open(proc.join(found.pid.to_string()).join("ns/net"))?;
    let id = ipc::datagram::file_id(&file)?;
    if id != found.netns {
        return Err(std::io::Error::other(format!(
            "process {} is in another network namespace now (it exited?)",
            found.pid
        )));
    }
    Ok(file)
}

/// The calling process's own network namespace (the node's, for a host-network agent).
pub fn own_netns(proc: &Path) -> std::io::Result<NetnsId> {
    ipc::datagram::file_id(File::open(proc.join("self/ns/net"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b47";

    #[test]
    fn both_cgroup_drivers_and_nested_trees_name_the_pod() {
        let cases = [
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod3f1c9a52_7d0e_4b8e_9a61_0c2f5e8d1b47.slice/cri-containerd-abc.scope",
            "0::/kubepods.slice/kubepods-pod3f1c9a52_7d0e_4b8e_9a61_0c2f5e8d1b47.slice/crio-abc.scope",
            "4:memory:/kubepods/besteffort/pod3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b47/0123456789ab",
            "1:name=systemd:/kubepods/pod3F1C9A52-7D0E-4B8E-9A61-0C2F5E8D1B47/x",
            "0::/system.slice/docker-1.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod3f1c9a52_7d0e_4b8e_9a61_0c2f5e8d1b47.slice/cri-containerd-1.scope",
            "0::/weft.slice/demo/kubepods/besteffort/pod3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b47/pause",
        ];
        for case in cases {
            assert_eq!(pod_uid(case).as_deref(), Some(UID), "{case}");
        }
    }

    #[test]
    fn other_processes_name_no_pod() {
        for case in [
            "0::/",
            "0::/system.slice/kubelet.service",
            "0::/user.slice/user-0.slice/session-1.scope",
            "4:memory:/kubepods/besteffort/pod3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b4",
            "4:memory:/kubepods/besteffort/pod3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b47x",
            "0::/podcast/3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b47",
        ] {
            assert_eq!(pod_uid(case), None, "{case}");
        }
    }

    #[test]
    fn a_scan_finds_this_process_by_its_cgroup_unless_in_the_node_namespace() {
        let own = own_netns(Path::new("/proc")).expect("own netns");
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
        // This process is in no pod: nothing is found for any UID.
        let uids = BTreeSet::from([UID.to_owned()]);
        assert!(scan(Path::new("/proc"), &uids, own).is_empty(), "{cgroup}");
    }
}

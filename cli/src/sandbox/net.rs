//! The sandbox's network, laid out as a cluster's: a fabric namespace with a bridge (the
//! nodes' network), a namespace per node joined to it (the node's own network, where its
//! kubelet probes from and its node agent runs), and the pods behind each node, joined
//! to it by the CNI chain the runtime runs (Debian's `bridge` + `host-local`, then
//! `weft-cni`). Nodes route each other's pod ranges. Built with iproute2; nothing is
//! created in the host's own namespace, so sandboxes with different names do not
//! collide.
//!
//! ```text
//!  fabric: br0 10.244.0.1/24
//!    |-- node-1 netns: eth0 10.244.0.2, cni0 10.244.1.1/24 --> pods 10.244.1.x
//!    |                 route 10.244.2.0/24 via 10.244.0.3
//!    '-- node-2 netns: eth0 10.244.0.3, cni0 10.244.2.1/24 --> pods 10.244.2.x
//! ```

use std::net::Ipv4Addr;
use std::process::Command;

/// The fabric bridge's address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The nodes' network prefix length (10.244.0.0/24).
pub const NODE_PREFIX: u8 = 24;

/// Why the network could not be built.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `ip` could not run.
    #[error("cannot run `ip {args}`: {source} (is iproute2 installed?)")]
    Spawn {
        /// The arguments.
        args: String,
        /// Why.
        source: std::io::Error,
    },
    /// `ip` failed.
    #[error("`ip {args}` failed: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

/// Runs `ip` with `args`.
pub fn ip(args: &[&str]) -> Result<String, NetError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The i-th node's address on the fabric: 10.244.0.2, .3, ...
pub fn node_ip(i: u16) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, (i + 2).min(254) as u8)
}

/// The i-th node's pod range: 10.244.1.0/24, 10.244.2.0/24, ...
pub fn pod_subnet(i: u16) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, (i + 1).min(255) as u8, 0)
}

/// The j-th service address: 10.96.0.10, 10.96.0.11, ...
pub fn service_ip(j: usize) -> Ipv4Addr {
    let n = u32::try_from(j).unwrap_or(u32::MAX).saturating_add(10);
    Ipv4Addr::new(10, 96, (n / 256) as u8, (n % 256) as u8)
}

/// Creates the fabric namespace and its bridge.
pub fn create_fabric(fabric: &str) -> Result<(), NetError> {
    ip(&["netns", "add", fabric])?;
    ip(&["-n", fabric, "link", "set", "lo", "up"])?;
    ip(&["-n", fabric, "link", "add", "br0", "type", "bridge"])?;
    let gw = format!("{GATEWAY}/{NODE_PREFIX}");
    ip(&["-n", fabric, "addr", "add", &gw, "dev", "br0"])?;
    ip(&["-n", fabric, "link", "set", "br0", "up"])?;
    Ok(())
}

/// Creates node `i`'s namespace: `eth0` at its address on the fabric bridge (via the
/// fabric-side interface `port`), forwarding on, as a node routes its pods' traffic.
pub fn create_node(fabric: &str, netns: &str, port: &str, i: u16) -> Result<(), NetError> {
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ])?;
    ip(&["-n", fabric, "link", "set", port, "master", "br0", "up"])?;
    let cidr = format!("{}/{NODE_PREFIX}", node_ip(i));
    ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    let forwarding = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ])
        .output()
        .map_err(|source| NetError::Spawn {
            args: format!("netns exec {netns} sysctl"),
            source,
        })?;
    if !forwarding.status.success() {
        return Err(NetError::Failed {
            args: format!("netns exec {netns} sysctl -w net.ipv4.ip_forward=1"),
            stderr: String::from_utf8_lossy(&forwarding.stderr)
                .trim()
                .to_owned(),
        });
    }
    Ok(())
}

/// Routes node `to`'s pod range from node namespace `netns` via that node's address.
pub fn route_to_node(netns: &str, to: u16) -> Result<(), NetError> {
    let subnet = format!("{}/24", pod_subnet(to));
    let via = node_ip(to).to_string();
    ip(&["-n", netns, "route", "replace", &subnet, "via", &via])?;
    Ok(())
}

/// Kills every process still running in a namespace.
pub fn kill_netns_pids(netns: &str) {
    for pid in ip(&["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
    {
        if let Ok(pid) = pid.parse::<i32>() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Deletes a namespace; one that is already gone is fine.
pub fn delete_netns(netns: &str) {
    let _ = ip(&["netns", "delete", netns]);
}

/// The namespaces whose names start with `prefix`.
pub fn list_netns(prefix: &str) -> Vec<String> {
    ip(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_in_range() {
        assert_eq!(node_ip(0), Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(pod_subnet(0), Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(pod_subnet(1), Ipv4Addr::new(10, 244, 2, 0));
        assert_ne!(node_ip(0), GATEWAY);
        assert_eq!(service_ip(0), Ipv4Addr::new(10, 96, 0, 10));
        assert_ne!(service_ip(300), service_ip(44));
    }
}

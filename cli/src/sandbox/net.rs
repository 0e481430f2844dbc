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
//!
//! With IPv6 ([`IpFamily`]) the same layout has unique local addresses beside (dual
//! stack) or instead of (IPv6 only) the IPv4 ones: the fabric `fd00:10:244::/64`, node
//! i's pods `fd00:10:244:<i+1>::/64`, services `fd00:10:96::/112`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

/// The fabric bridge's address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The fabric bridge's IPv6 address.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
/// The nodes' network prefix length (10.244.0.0/24).
pub const NODE_PREFIX: u8 = 24;
/// The nodes' IPv6 prefix length, and each node's pod range's.
pub const PREFIX6: u8 = 64;

/// The address families of the sandbox's cluster network, as a cluster's
/// `--service-cluster-ip-range` and pod CIDRs set them.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    /// IPv4 only.
    #[default]
    Ipv4,
    /// IPv4 and IPv6, IPv4 first (the primary family: a pod's `status.podIP`, a
    /// single-stack service's address).
    Dual,
    /// IPv6 only.
    Ipv6,
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Dual => "dual",
            IpFamily::Ipv6 => "ipv6",
        })
    }
}

impl IpFamily {
    /// Has IPv4 addresses.
    pub fn v4(self) -> bool {
        self != IpFamily::Ipv6
    }

    /// Has IPv6 addresses.
    pub fn v6(self) -> bool {
        self != IpFamily::Ipv4
    }

    /// The primary family is IPv6.
    pub fn v6_first(self) -> bool {
        self == IpFamily::Ipv6
    }
}

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

/// The i-th node's IPv6 address on the fabric: fd00:10:244::2, ::3, ...
pub fn node_ip6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, i.saturating_add(2))
}

/// The i-th node's IPv6 pod range: fd00:10:244:1::/64, fd00:10:244:2::/64, ...
pub fn pod_subnet6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, i.saturating_add(1), 0, 0, 0, 0)
}

/// The j-th service address: 10.96.0.10, 10.96.0.11, ...
pub fn service_ip(j: usize) -> Ipv4Addr {
    let n = u32::try_from(j).unwrap_or(u32::MAX).saturating_add(10);
    Ipv4Addr::new(10, 96, (n / 256) as u8, (n % 256) as u8)
}

/// The j-th IPv6 service address: fd00:10:96::a, fd00:10:96::b, ...
pub fn service_ip6(j: usize) -> Ipv6Addr {
    let n = u16::try_from(j).unwrap_or(u16::MAX).saturating_add(10);
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, n)
}

/// The j-th service address of `v6`'s family.
pub fn service_ip_of(v6: bool, j: usize) -> IpAddr {
    match v6 {
        false => service_ip(j).into(),
        true => service_ip6(j).into(),
    }
}

/// Runs `sysctl -qw setting` in `netns`.
fn sysctl(netns: &str, setting: &str) -> Result<(), NetError> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw", setting])
        .output()
        .map_err(|source| NetError::Spawn {
            args: format!("netns exec {netns} sysctl"),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Failed {
            args: format!("netns exec {netns} sysctl -w {setting}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Turns off IPv6 duplicate address detection in `netns`: its addresses are usable at
/// once (the sandbox hands out every address once, so none is duplicated).
pub fn no_dad(netns: &str) -> Result<(), NetError> {
    sysctl(netns, "net.ipv6.conf.all.accept_dad=0")?;
    sysctl(netns, "net.ipv6.conf.default.accept_dad=0")
}

/// Creates the fabric namespace and its bridge.
pub fn create_fabric(fabric: &str, family: IpFamily) -> Result<(), NetError> {
    ip(&["netns", "add", fabric])?;
    ip(&["-n", fabric, "link", "set", "lo", "up"])?;
    if family.v6() {
        no_dad(fabric)?;
    }
    ip(&["-n", fabric, "link", "add", "br0", "type", "bridge"])?;
    if family.v4() {
        let gw = format!("{GATEWAY}/{NODE_PREFIX}");
        ip(&["-n", fabric, "addr", "add", &gw, "dev", "br0"])?;
    }
    if family.v6() {
        let gw = format!("{GATEWAY6}/{PREFIX6}");
        ip(&["-n", fabric, "addr", "add", &gw, "dev", "br0", "nodad"])?;
    }
    ip(&["-n", fabric, "link", "set", "br0", "up"])?;
    Ok(())
}

/// Creates node `i`'s namespace: `eth0` at its addresses on the fabric bridge (via the
/// fabric-side interface `port`), forwarding on, as a node routes its pods' traffic.
pub fn create_node(
    fabric: &str,
    netns: &str,
    port: &str,
    i: u16,
    family: IpFamily,
) -> Result<(), NetError> {
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    if family.v6() {
        no_dad(netns)?;
    }
    ip(&[
        "-n", fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ])?;
    ip(&["-n", fabric, "link", "set", port, "master", "br0", "up"])?;
    if family.v4() {
        let cidr = format!("{}/{NODE_PREFIX}", node_ip(i));
        ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
    }
    if family.v6() {
        let cidr = format!("{}/{PREFIX6}", node_ip6(i));
        ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
    }
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    sysctl(netns, "net.ipv4.ip_forward=1")?;
    if family.v6() {
        sysctl(netns, "net.ipv6.conf.all.forwarding=1")?;
    }
    Ok(())
}

/// Routes node `to`'s pod ranges from node namespace `netns` via that node's addresses.
pub fn route_to_node(netns: &str, to: u16, family: IpFamily) -> Result<(), NetError> {
    if family.v4() {
        let subnet = format!("{}/24", pod_subnet(to));
        let via = node_ip(to).to_string();
        ip(&["-n", netns, "route", "replace", &subnet, "via", &via])?;
    }
    if family.v6() {
        let subnet = format!("{}/{PREFIX6}", pod_subnet6(to));
        let via = node_ip6(to).to_string();
        ip(&["-n", netns, "-6", "route", "replace", &subnet, "via", &via])?;
    }
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
        assert_eq!(node_ip6(0).to_string(), "fd00:10:244::2");
        assert_eq!(pod_subnet6(1).to_string(), "fd00:10:244:2::");
        assert_eq!(service_ip6(0).to_string(), "fd00:10:96::a");
        assert_ne!(node_ip6(0), GATEWAY6);
    }
}

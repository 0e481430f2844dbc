//! The sandbox's network: a fabric namespace with a bridge, and one namespace per pod
//! joined to it by a veth pair. Built with iproute2; nothing is created in the host's
//! own namespace, so sandboxes with different names do not collide.

use std::net::Ipv4Addr;
use std::process::Command;

/// The bridge address, the pods' default gateway.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The pod network's prefix length (10.244.0.0/16).
pub const POD_PREFIX: u8 = 16;

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

/// The i-th pod address: 10.244.1.2, 10.244.1.3, ... (the 10.244.0.0/24 block holds the
/// gateway).
pub fn pod_ip(i: usize) -> Ipv4Addr {
    let n = u32::try_from(i).unwrap_or(u32::MAX);
    Ipv4Addr::new(10, 244, (1 + n / 250) as u8, (n % 250) as u8 + 2)
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
    let gw = format!("{GATEWAY}/{POD_PREFIX}");
    ip(&["-n", fabric, "addr", "add", &gw, "dev", "br0"])?;
    ip(&["-n", fabric, "link", "set", "br0", "up"])?;
    Ok(())
}

/// Creates a pod namespace with `eth0` at `addr`, attached to the fabric bridge via the
/// fabric-side interface `port`.
pub fn create_pod(fabric: &str, netns: &str, port: &str, addr: Ipv4Addr) -> Result<(), NetError> {
    ip(&["netns", "add", netns])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", fabric, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ])?;
    ip(&["-n", fabric, "link", "set", port, "master", "br0", "up"])?;
    let cidr = format!("{addr}/{POD_PREFIX}");
    ip(&["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    let gw = GATEWAY.to_string();
    ip(&["-n", netns, "route", "add", "default", "via", &gw])?;
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
        let ips: std::collections::HashSet<_> = (0..2000).map(pod_ip).collect();
        assert_eq!(ips.len(), 2000);
        assert!(ips
            .iter()
            .all(|ip| ip.octets()[0..2] == [10, 244] && *ip != GATEWAY));
        assert_eq!(pod_ip(0), Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(pod_ip(250), Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(service_ip(0), Ipv4Addr::new(10, 96, 0, 10));
        assert_ne!(service_ip(300), service_ip(44));
    }
}

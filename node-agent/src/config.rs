//! The agent's configuration, from flags or environment variables.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// What the node agent is told.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// The node this agent serves (in a cluster: `spec.nodeName`, from the downward API).
    #[arg(long, env = "WEFT_NODE")]
    pub node: String,
    /// Read the node's pods and the namespaces from this directory of objects instead of
    /// the API server (the sandbox keeps the objects it holds there).
    #[arg(long, env = "WEFT_OBJECTS")]
    pub objects: Option<PathBuf>,
    /// node-proxy's handoff socket.
    #[arg(
        long,
        env = "WEFT_HANDOFF_SOCKET",
        default_value = runtime::handoff::DEFAULT_SOCKET
    )]
    pub handoff: PathBuf,
    /// The socket weft-cni asks on.
    #[arg(long, env = "WEFT_AGENT_SOCKET", default_value = ipc::agent::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where the enrolled namespaces are published for weft-cni, for while the agent is
    /// down.
    #[arg(long, env = "WEFT_AGENT_STATE", default_value = ipc::agent::DEFAULT_STATE)]
    pub state: PathBuf,
    /// The container runtime's CNI plugin directory (the node's, mounted).
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The container runtime's CNI configuration directory (the node's, mounted).
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The weft-cni binary to install on the node (default: beside this one).
    #[arg(long, env = "WEFT_CNI_PLUGIN")]
    pub cni_plugin: Option<PathBuf>,
    /// Namespaces whose pods weft-cni never asks about, so Weft can never hold up their
    /// creation (`kube-system` always); comma-separated.
    #[arg(
        long,
        env = "WEFT_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub exclude_namespaces: Vec<String>,
    /// Let an enrolled pod whose capture cannot be installed start anyway, uncaptured,
    /// instead of failing its creation until it can.
    #[arg(long, env = "WEFT_CNI_FAIL_OPEN")]
    pub cni_fail_open: bool,
    /// The address the node's probes reach captured IPv4 pods from: link-local, used
    /// by nothing else.
    #[arg(long, env = "WEFT_PROBE_SOURCE", default_value_t = crate::capture::PROBE_SOURCE.v4)]
    pub probe_source: Ipv4Addr,
    /// The address the node's probes reach captured IPv6 pods from: unique local, in
    /// no pod range.
    #[arg(long, env = "WEFT_PROBE_SOURCE_V6", default_value_t = crate::capture::PROBE_SOURCE.v6)]
    pub probe_source_v6: std::net::Ipv6Addr,
    /// Admin endpoint (`/metrics`, `/healthz`, `/ready`, `/pods`).
    #[arg(long, env = "WEFT_AGENT_ADMIN", default_value = "127.0.0.1:15022")]
    pub admin: SocketAddr,
    /// In a cluster: when stopped, remove Weft from the node (the plugin, every pod's
    /// capture) if this DaemonSet, NAMESPACE/NAME, is gone or being deleted.
    #[arg(long, env = "WEFT_UNTIL_REMOVED", value_name = "NAMESPACE/NAME", value_parser = namespaced_name)]
    pub until_removed: Option<String>,
    /// Where processes are listed.
    #[arg(long, env = "WEFT_PROC", default_value = "/proc", hide = true)]
    pub proc: PathBuf,
}

/// A `NAMESPACE/NAME` argument.
fn namespaced_name(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_owned())
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

impl Config {
    /// `--until-removed` as (namespace, name).
    pub fn until_removed(&self) -> Option<(&str, &str)> {
        self.until_removed
            .as_deref()
            .and_then(|s| s.split_once('/'))
    }

    /// The namespaces the plugin never asks about: the configured ones and
    /// `kube-system`, sorted.
    pub fn excluded(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .exclude_namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .chain([ipc::agent::ALWAYS_EXCLUDED.to_owned()])
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn until_removed_names_a_namespaced_daemonset() {
        let parse =
            |v: &str| Cli::try_parse_from(["node-agent", "--node", "n1", "--until-removed", v]);
        let ok = parse("weft-system/weft-node-agent").expect("valid").config;
        assert_eq!(ok.until_removed(), Some(("weft-system", "weft-node-agent")));
        for bad in [
            "weft-node-agent",
            "/weft-node-agent",
            "weft-system/",
            "a/b/c",
        ] {
            let e = parse(bad).expect_err(bad).to_string();
            assert!(e.contains("is not NAMESPACE/NAME"), "{e}");
        }
    }
}

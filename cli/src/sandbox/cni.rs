//! The part of a container runtime the sandbox plays for the network: each pod sandbox
//! gets a network namespace, and the node's CNI chain runs for it exactly as a runtime
//! runs it (libcni's rules): the lexically first configuration file of the node's
//! configuration directory, each plugin of its list in turn with the previous one's
//! result, `CNI_*` in the environment, inside the node's own namespace; DEL in reverse
//! with the cached result.
//!
//! Plugins run with `PATH` set to the CNI plugin directories only, as a runtime's
//! minimal environment may be: no `nft`, no `ip`. The primary network plugin is
//! Debian's `bridge` with `host-local` addresses, whose configuration the sandbox writes
//! as a cluster's network plugin installer would; the node agent chains `weft-cni` after
//! it.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Where Debian's `containernetworking-plugins` puts the plugins.
pub const SYSTEM_PLUGINS: &str = "/usr/lib/cni";
/// The file the sandbox's network plugin writes (the primary CNI configuration).
pub const PRIMARY_CONFLIST: &str = "10-weft-sandbox.conflist";
/// The longest a plugin may run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a CNI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CniFailure {
    /// The node has no configuration a runtime would use.
    #[error("no usable CNI configuration in {dir}: {why}")]
    NoConfig {
        /// The configuration directory.
        dir: PathBuf,
        /// Why.
        why: String,
    },
    /// A plugin could not be run.
    #[error("cannot run CNI plugin {plugin}: {why}")]
    Exec {
        /// Its type.
        plugin: String,
        /// Why.
        why: String,
    },
    /// A plugin failed: its error as it printed it.
    #[error("CNI plugin {plugin} failed ({command}, code {code}): {msg}")]
    Plugin {
        /// Its type.
        plugin: String,
        /// ADD or DEL.
        command: &'static str,
        /// The CNI error code.
        code: u64,
        /// Its message and details.
        msg: String,
    },
}

impl CniFailure {
    /// The CNI error code, if a plugin gave one.
    pub fn code(&self) -> Option<u64> {
        match self {
            CniFailure::Plugin { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A node's CNI setup.
#[derive(Debug, Clone)]
pub struct Cni {
    /// The node's configuration directory.
    pub conf_dir: PathBuf,
    /// Where plugins are looked for, in order.
    pub bin_dirs: Vec<PathBuf>,
    /// The node's network namespace, where plugins run.
    pub node_netns: String,
    /// `ip`, to run a plugin in the node's namespace.
    pub ip: PathBuf,
    /// Pods get IPv6 addresses.
    pub ipv6: bool,
}

/// A pod sandbox as the runtime names it to the plugins.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// The sandbox's container ID.
    pub container_id: String,
    /// Its network namespace.
    pub netns: PathBuf,
}

/// The primary configuration of node `i`: a bridge `cni0` with `host-local` addresses
/// from the node's pod ranges (`subnets`, one per family, the primary first), the node as
/// the pods' default gateway.
pub fn primary_conflist(subnets: &[String], ipam_dir: &Path) -> Value {
    let ranges: Vec<Value> = subnets.iter().map(|s| json!([{"subnet": s}])).collect();
    json!({
        "cniVersion": "1.0.0",
        "name": "weft-sandbox",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "dataDir": ipam_dir.display().to_string(),
            }
        }]
    })
}

impl Cni {
    /// The configuration a runtime would use: the lexically first `.conf`, `.conflist`
    /// or `.json` file; a plain `.conf` is a list of one.
    pub fn conflist(&self) -> Result<Value, CniFailure> {
        let no = |why: String| CniFailure::NoConfig {
            dir: self.conf_dir.clone(),
            why,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .map_err(|e| no(e.to_string()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("conf" | "conflist" | "json")
                    )
            })
            .collect();
        files.sort();
        let first = files
            .first()
            .ok_or_else(|| no("no configuration file".into()))?;
        let text =
            std::fs::read_to_string(first).map_err(|e| no(format!("{}: {e}", first.display())))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| no(format!("{}: {e}", first.display())))?;
        if value.get("plugins").is_some() {
            return Ok(value);
        }
        Ok(json!({
            "cniVersion": value["cniVersion"],
            "name": value["name"],
            "plugins": [value],
        }))
    }

    /// ADD through the chain: each plugin's result is the next one's `prevResult`. The
    /// final result, and the pod's addresses in it. On failure, DEL for what was added.
    pub fn add(&self, a: &Attachment) -> Result<(Value, Vec<IpAddr>), CniFailure> {
        let list = self.conflist()?;
        let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
        let mut prev: Option<Value> = None;
        for (i, plugin) in plugins.iter().enumerate() {
            match self.run(&list, plugin, "ADD", a, prev.as_ref()) {
                Ok(result) => prev = result.or(prev),
                Err(e) => {
                    // As a runtime does: the sandbox is torn down before a retry.
                    let _ = self.del_with(&list, &plugins[..=i], a, prev.as_ref());
                    return Err(e);
                }
            }
        }
        let result = prev.unwrap_or_else(|| json!({}));
        Ok((result.clone(), pod_ips(&result)))
    }

    /// DEL through the chain in reverse, with the result ADD cached.
    pub fn del(&self, a: &Attachment, cached: Option<&Value>) -> Result<(), CniFailure> {
        let list = self.conflist()?;
        let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
        self.del_with(&list, &plugins, a, cached)
    }

    fn del_with(
        &self,
        list: &Value,
        plugins: &[Value],
        a: &Attachment,
        cached: Option<&Value>,
    ) -> Result<(), CniFailure> {
        let mut first = None;
        for plugin in plugins.iter().rev() {
            if let Err(e) = self.run(list, plugin, "DEL", a, cached) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Runs one plugin; its result (ADD prints one).
    fn run(
        &self,
        list: &Value,
        plugin: &Value,
        command: &'static str,
        a: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, CniFailure> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_owned();
        let exec = |why: String| CniFailure::Exec {
            plugin: kind.clone(),
            why,
        };
        let program = self
            .bin_dirs
            .iter()
            .map(|d| d.join(&kind))
            .find(|p| p.is_file())
            .ok_or_else(|| exec(format!("not found in {:?}", self.bin_dirs)))?;
        let mut conf = plugin.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let path = std::env::join_paths(&self.bin_dirs).map_err(|e| exec(e.to_string()))?;
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            a.namespace, a.name, a.container_id, a.uid
        );
        let mut child = Command::new(&self.ip)
            .args(["netns", "exec", &self.node_netns])
            .arg(&program)
            .env_clear()
            .env("PATH", &path)
            .env("CNI_PATH", &path)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &a.container_id)
            .env("CNI_NETNS", &a.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| exec(e.to_string()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(conf.to_string().as_bytes())
                .map_err(|e| exec(format!("writing its configuration: {e}")))?;
        }
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < PLUGIN_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(exec(format!(
                        "no answer after {} s",
                        PLUGIN_TIMEOUT.as_secs()
                    )));
                }
                Err(e) => return Err(exec(e.to_string())),
            }
        };
        let mut stdout = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        if !stderr.trim().is_empty() {
            tracing::debug!(plugin = %kind, command, pod = %format!("{}/{}", a.namespace, a.name), "{}", stderr.trim());
        }
        if !status.success() {
            let error: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
            let msg = match (error["msg"].as_str(), error["details"].as_str()) {
                (Some(m), Some(d)) if !m.contains(d) => format!("{m}: {d}"),
                (Some(m), _) => m.to_owned(),
                _ => format!("{} {}", stdout.trim(), stderr.trim())
                    .trim()
                    .to_owned(),
            };
            return Err(CniFailure::Plugin {
                plugin: kind,
                command,
                code: error["code"].as_u64().unwrap_or(999),
                msg,
            });
        }
        match stdout.trim() {
            "" => Ok(None),
            text => serde_json::from_str(text)
                .map(Some)
                .map_err(|e| exec(format!("its result is not JSON: {e}"))),
        }
    }
}

/// The pod's addresses in a CNI result: those on an interface inside the sandbox.
pub fn pod_ips(result: &Value) -> Vec<IpAddr> {
    let interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| match ip["interface"].as_u64() {
            None => true,
            Some(i) => interfaces
                .get(usize::try_from(i).unwrap_or(usize::MAX))
                .and_then(|iface| iface["sandbox"].as_str())
                .is_some_and(|s| !s.is_empty()),
        })
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pods_addresses_are_read_from_the_result() {
        let result = json!({
            "interfaces": [
                {"name": "cni0"},
                {"name": "vethx"},
                {"name": "eth0", "sandbox": "/run/netns/p"}
            ],
            "ips": [
                {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 2},
                {"address": "10.244.1.1/24", "interface": 0}
            ]
        });
        assert_eq!(
            pod_ips(&result),
            vec!["10.244.1.5".parse::<IpAddr>().expect("ip")]
        );
    }

    #[test]
    fn the_first_configuration_file_is_the_one_used() {
        let dir = std::env::temp_dir().join(format!("weft-sandbox-cni-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let cni = Cni {
            conf_dir: dir.clone(),
            bin_dirs: vec![],
            node_netns: "n".into(),
            ip: "ip".into(),
            ipv6: false,
        };
        assert!(matches!(cni.conflist(), Err(CniFailure::NoConfig { .. })));
        std::fs::write(
            dir.join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[]}"#,
        )
        .expect("write");
        std::fs::write(
            dir.join("10-a.conf"),
            r#"{"cniVersion":"1.0.0","name":"a","type":"bridge"}"#,
        )
        .expect("write");
        let list = cni.conflist().expect("a list");
        assert_eq!(list["name"], "a");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

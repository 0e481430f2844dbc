//! What the runtime gives the plugin, parsed: the `CNI_*` environment and the network
//! configuration on stdin (with the previous plugin's result). Nothing downstream sees
//! a raw string.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::error::CniError;

/// The CNI versions this plugin speaks: from 0.3.0, whose results list `ips` and
/// `interfaces` as today's do.
pub use ipc::agent::CNI_VERSIONS as SUPPORTED_VERSIONS;
/// The newest of them, for output when the configuration gives none.
pub const LATEST_VERSION: &str = "1.1.0";
/// A namespace whose pods the plugin never asks about, whatever the configuration says.
pub use ipc::agent::ALWAYS_EXCLUDED;

/// Where the plugin reads its environment: the process's, or a map in tests.
pub trait Env {
    /// The variable's value; an error if it is set but not UTF-8.
    fn var(&self, name: &'static str) -> Result<Option<String>, CniError>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &'static str) -> Result<Option<String>, CniError> {
        match std::env::var(name) {
            Ok(v) => Ok(Some(v)),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(CniError::Env {
                var: name,
                reason: "is not UTF-8".into(),
            }),
        }
    }
}

impl Env for BTreeMap<&str, &str> {
    fn var(&self, name: &'static str) -> Result<Option<String>, CniError> {
        Ok(self.get(name).map(|v| (*v).to_owned()))
    }
}

/// A CNI command (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach: ask the node agent to capture the pod if it is enrolled.
    Add,
    /// Detach: tell the node agent.
    Del,
    /// Verify an attachment.
    Check,
    /// Print the supported versions.
    Version,
    /// CNI 1.1: is the plugin ready for ADDs.
    Status,
    /// CNI 1.1: clean up attachments the runtime no longer knows.
    Gc,
}

impl Command {
    fn parse(text: &str) -> Result<Self, CniError> {
        Ok(match text {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::Env {
                    var: "CNI_COMMAND",
                    reason: format!(
                        "{other:?} is not a CNI command (ADD, DEL, CHECK, VERSION, STATUS, GC)"
                    ),
                })
            }
        })
    }
}

/// The Kubernetes facts a runtime passes in `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_UID`.
    pub pod_uid: Option<String>,
}

impl CniArgs {
    /// Parses `K=V;K=V`; keys other than the pod's are ignored (as `IgnoreUnknown`
    /// asks).
    pub fn parse(text: &str) -> Result<Self, CniError> {
        let mut args = CniArgs::default();
        for pair in text.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(CniError::Env {
                    var: "CNI_ARGS",
                    reason: format!("{pair:?} is not KEY=VALUE (pairs are separated by ';')"),
                });
            };
            let value = Some(value.to_owned()).filter(|v| !v.is_empty());
            match key {
                "K8S_POD_NAMESPACE" => args.pod_namespace = value,
                "K8S_POD_NAME" => args.pod_name = value,
                "K8S_POD_UID" => args.pod_uid = value,
                "" => {
                    return Err(CniError::Env {
                        var: "CNI_ARGS",
                        reason: format!("{pair:?} has an empty key"),
                    })
                }
                _ => {}
            }
        }
        Ok(args)
    }

    /// The pod's namespace and name, if the runtime is Kubernetes'.
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((self.pod_namespace.as_deref()?, self.pod_name.as_deref()?))
    }
}

/// The parsed `CNI_*` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for VERSION, STATUS and GC).
    pub container_id: String,
    /// `CNI_NETNS`: required for ADD and CHECK, optional for DEL.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME` (empty for VERSION, STATUS and GC).
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: CniArgs,
}

impl CniEnv {
    /// Reads the variables the command needs, refusing missing or malformed ones.
    pub fn from_env(env: &impl Env) -> Result<Self, CniError> {
        let required = |var: &'static str| -> Result<String, CniError> {
            env.var(var)?
                .filter(|v| !v.is_empty())
                .ok_or_else(|| CniError::Env {
                    var,
                    reason: "is not set; the container runtime sets it".into(),
                })
        };
        let command = Command::parse(&required("CNI_COMMAND")?)?;
        let attach = matches!(command, Command::Add | Command::Del | Command::Check);
        if !attach {
            return Ok(CniEnv {
                command,
                container_id: String::new(),
                netns: None,
                ifname: String::new(),
                args: CniArgs::default(),
            });
        }
        let container_id = required("CNI_CONTAINERID")?;
        let valid_id = container_id
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !valid_id {
            return Err(CniError::Env {
                var: "CNI_CONTAINERID",
                reason: format!("{container_id:?} is not a container ID (letters, digits, '_', '.', '-', starting with a letter or digit)"),
            });
        }
        let ifname = required("CNI_IFNAME")?;
        let valid_ifname = ifname.len() <= 15
            && ifname != "."
            && ifname != ".."
            && !ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace());
        if !valid_ifname {
            return Err(CniError::Env {
                var: "CNI_IFNAME",
                reason: format!("{ifname:?} is not an interface name (at most 15 characters, no '/', ':' or spaces)"),
            });
        }
        let netns = match command {
            Command::Del => env.var("CNI_NETNS")?.filter(|v| !v.is_empty()),
            _ => Some(required("CNI_NETNS")?),
        };
        if let Some(path) = &netns {
            if !path.starts_with('/') {
                return Err(CniError::Env {
                    var: "CNI_NETNS",
                    reason: format!("{path:?} is not an absolute path"),
                });
            }
        }
        let args = CniArgs::parse(&env.var("CNI_ARGS")?.unwrap_or_default())?;
        Ok(CniEnv {
            command,
            container_id,
            netns: netns.map(PathBuf::from),
            ifname,
            args,
        })
    }
}

/// A CNI version, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(u32, u32, u32);

impl Version {
    /// Parses `a.b.c` (a missing patch is 0).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version(
            parts.next()??,
            parts.next()??,
            parts.next().unwrap_or(Some(0))?,
        );
        parts.next().is_none().then_some(v)
    }
}

/// The network configuration, as far as this plugin reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// `name`: the network's.
    pub name: String,
    /// `agentSocket`: where the node agent listens.
    pub agent_socket: PathBuf,
    /// `agentState`: where the agent publishes the enrolled namespaces.
    pub agent_state: PathBuf,
    /// `excludeNamespaces`: namespaces never asked about (`kube-system` always).
    pub exclude_namespaces: Vec<String>,
    /// `failOpen`: an enrolled pod whose capture cannot be installed starts anyway.
    pub fail_open: bool,
    /// `prevResult`: what the plugins before this one attached, passed through.
    pub prev_result: Option<Value>,
}

/// A value as compact JSON, cut to 40 bytes: enough to recognize it in an error.
fn excerpt(value: &Value) -> String {
    let mut text = value.to_string();
    if text.len() > 40 {
        let mut cut = 40;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

fn field<'a>(conf: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    conf.get(name).filter(|v| !v.is_null())
}

fn string(conf: &Map<String, Value>, name: &str) -> Result<Option<String>, CniError> {
    match field(conf, name) {
        None => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(Value::String(_)) => Err(CniError::Config {
            field: name.into(),
            reason: "is empty".into(),
        }),
        Some(other) => Err(CniError::Config {
            field: name.into(),
            reason: format!("must be a string, not {}", excerpt(other)),
        }),
    }
}

impl NetConf {
    /// The `cniVersion` of whatever is on stdin, if it says one: for error output even
    /// when the rest is unreadable.
    pub fn version_of(stdin: &[u8]) -> Option<String> {
        let v: Value = serde_json::from_slice(stdin).ok()?;
        v.get("cniVersion")?.as_str().map(str::to_owned)
    }

    /// Parses stdin for `command` (which decides whether `prevResult` is required and
    /// which versions are accepted).
    pub fn parse(stdin: &[u8], command: Command) -> Result<Self, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::Decode(match stdin.iter().all(u8::is_ascii_whitespace) {
                true => "stdin is empty; the runtime writes the network configuration there".into(),
                false => format!("not JSON: {e}"),
            })
        })?;
        let Value::Object(conf) = value else {
            return Err(CniError::Decode(format!(
                "expected a JSON object, got {}",
                excerpt(&value)
            )));
        };
        let missing = |name: &str| CniError::Config {
            field: name.into(),
            reason: "is missing".into(),
        };
        let cni_version = string(&conf, "cniVersion")?.ok_or_else(|| missing("cniVersion"))?;
        let version = Version::parse(&cni_version);
        let supported = SUPPORTED_VERSIONS.join(", ");
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::Version {
                version: cni_version,
                why: String::new(),
                supported,
            });
        }
        if command == Command::Check && version < Version::parse("0.4.0") {
            return Err(CniError::Version {
                version: cni_version,
                why: " for CHECK (it needs 0.4.0 or later)".into(),
                supported,
            });
        }
        let name = string(&conf, "name")?.ok_or_else(|| missing("name"))?;
        match string(&conf, "type")?.as_deref() {
            Some("weft-cni") => {}
            Some(other) => {
                return Err(CniError::Config {
                    field: "type".into(),
                    reason: format!("is {other:?}; this plugin is \"weft-cni\""),
                })
            }
            None => return Err(missing("type")),
        }
        let agent_socket =
            string(&conf, "agentSocket")?.unwrap_or_else(|| ipc::agent::DEFAULT_SOCKET.into());
        let agent_state =
            string(&conf, "agentState")?.unwrap_or_else(|| ipc::agent::DEFAULT_STATE.into());
        let exclude_namespaces = match field(&conf, "excludeNamespaces") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    other => Err(CniError::Config {
                        field: format!("excludeNamespaces[{i}]"),
                        reason: format!("must be a namespace name, not {}", excerpt(other)),
                    }),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(CniError::Config {
                    field: "excludeNamespaces".into(),
                    reason: format!("must be a list of namespace names, not {}", excerpt(other)),
                })
            }
        };
        let fail_open = match field(&conf, "failOpen") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(CniError::Config {
                    field: "failOpen".into(),
                    reason: format!("must be true or false, not {}", excerpt(other)),
                })
            }
        };
        let prev_result = field(&conf, "prevResult").cloned();
        match &prev_result {
            Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(CniError::Config {
                    field: "prevResult".into(),
                    reason: format!("must be an object, not {}", excerpt(other)),
                })
            }
            None if matches!(command, Command::Add | Command::Check) => {
                return Err(CniError::Config {
                    field: "prevResult".into(),
                    reason: "is missing: weft-cni is a chained plugin; list it after the plugin that gives the pod its interface and addresses".into(),
                })
            }
            None => {}
        }
        Ok(NetConf {
            cni_version,
            name,
            agent_socket: agent_socket.into(),
            agent_state: agent_state.into(),
            exclude_namespaces,
            fail_open,
            prev_result,
        })
    }

    /// Whether pods of `namespace` are never asked about.
    pub fn excluded(&self, namespace: &str) -> bool {
        namespace == ALWAYS_EXCLUDED || self.exclude_namespaces.iter().any(|n| n == namespace)
    }

    /// The pod's IPs from `prevResult`: every address on an interface inside the pod's
    /// namespace (one with a `sandbox`), or on no named interface, in the order given.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(prev) = &self.prev_result else {
            return Ok(Vec::new());
        };
        let bad = |field: String, reason: String| CniError::Config { field, reason };
        let interfaces = match prev.get("interfaces") {
            None | Some(Value::Null) => &Vec::new(),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(bad("prevResult.interfaces".into(), "must be a list".into())),
        };
        let ips = match prev.get("ips") {
            None | Some(Value::Null) => &Vec::new(),
            Some(Value::Array(list)) => list,
            Some(_) => return Err(bad("prevResult.ips".into(), "must be a list".into())),
        };
        let mut out = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let field = format!("prevResult.ips[{i}]");
            let address = ip
                .get("address")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{field}.address"), "is missing".into()))?;
            let addr = address.split_once('/').map_or(address, |(a, _)| a);
            let addr: IpAddr = addr.parse().map_err(|_| {
                bad(
                    format!("{field}.address"),
                    format!("{address:?} is not an IP address with a prefix length"),
                )
            })?;
            let in_pod = match ip.get("interface") {
                None | Some(Value::Null) => true,
                Some(index) => {
                    let interface = index
                        .as_u64()
                        .and_then(|i| interfaces.get(usize::try_from(i).ok()?))
                        .ok_or_else(|| {
                            bad(
                                format!("{field}.interface"),
                                format!(
                                    "{} is not an index into prevResult.interfaces",
                                    excerpt(index)
                                ),
                            )
                        })?;
                    interface
                        .get("sandbox")
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                }
            };
            let addr = addr.to_canonical();
            if in_pod && !out.contains(&addr) {
                out.push(addr);
            }
        }
        Ok(out)
    }

    /// The result to print after ADD: `prevResult` unchanged, in the configuration's
    /// version.
    pub fn result(&self) -> String {
        let mut result = self
            .prev_result
            .clone()
            .unwrap_or_else(|| Value::Object(Map::new()));
        if let Value::Object(map) = &mut result {
            map.entry("cniVersion")
                .or_insert_with(|| Value::String(self.cni_version.clone()));
        }
        result.to_string()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn env<'a>(pairs: &[(&'a str, &'a str)]) -> BTreeMap<&'a str, &'a str> {
        pairs.iter().copied().collect()
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/var/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-1;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1",
        ),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    fn with(
        base: &[(&'static str, &'static str)],
        key: &'static str,
        value: Option<&'static str>,
    ) -> BTreeMap<&'static str, &'static str> {
        let mut m = env(base);
        match value {
            Some(v) => m.insert(key, v),
            None => m.remove(key),
        };
        m
    }

    fn env_error(m: &BTreeMap<&str, &str>) -> String {
        match CniEnv::from_env(m) {
            Err(e @ CniError::Env { .. }) => {
                assert_eq!(e.code(), 4);
                e.to_string()
            }
            other => panic!("expected an environment error, got {other:?}"),
        }
    }

    #[test]
    fn add_environment() {
        let e = CniEnv::from_env(&env(ADD)).expect("valid");
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.netns, Some(PathBuf::from("/var/run/netns/pod")));
        assert_eq!(e.args.pod(), Some(("shop", "cart-1")));
        assert_eq!(e.args.pod_uid.as_deref(), Some("u-1"));
    }

    #[test]
    fn del_needs_no_netns_and_version_needs_nothing_else() {
        let mut del = with(ADD, "CNI_COMMAND", Some("DEL"));
        del.remove("CNI_NETNS");
        assert_eq!(CniEnv::from_env(&del).expect("DEL").netns, None);
        let version = env(&[("CNI_COMMAND", "VERSION")]);
        assert_eq!(
            CniEnv::from_env(&version).expect("VERSION").command,
            Command::Version
        );
    }

    #[test]
    fn malformed_environment_is_refused_by_name() {
        let cases: &[(&str, Option<&str>, &str)] = &[
            ("CNI_COMMAND", None, "CNI_COMMAND: is not set"),
            ("CNI_COMMAND", Some("FROB"), "\"FROB\" is not a CNI command"),
            ("CNI_CONTAINERID", None, "CNI_CONTAINERID: is not set"),
            ("CNI_CONTAINERID", Some("-bad id"), "is not a container ID"),
            ("CNI_NETNS", None, "CNI_NETNS: is not set"),
            ("CNI_NETNS", Some("relative/ns"), "is not an absolute path"),
            ("CNI_IFNAME", None, "CNI_IFNAME: is not set"),
            (
                "CNI_IFNAME",
                Some("a-very-long-interface"),
                "is not an interface name",
            ),
            (
                "CNI_ARGS",
                Some("K8S_POD_NAME"),
                "\"K8S_POD_NAME\" is not KEY=VALUE",
            ),
            ("CNI_ARGS", Some("=x"), "has an empty key"),
        ];
        for (var, value, want) in cases {
            let got = env_error(&with(ADD, var, *value));
            assert!(got.contains(want), "{var}={value:?}: {got}");
        }
    }

    fn conf(extra: Value) -> Vec<u8> {
        let mut base = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "weft-cni",
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                    {"name": "veth1", "mac": "aa:bb:cc:dd:ee:02"},
                    {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/var/run/netns/pod"}
                ],
                "ips": [
                    {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 2},
                    {"address": "10.244.1.1/24", "interface": 0},
                    {"address": "fd00:10:244:1::7/64", "interface": 2}
                ]
            }
        });
        if let (Value::Object(b), Value::Object(e)) = (&mut base, extra) {
            for (k, v) in e {
                b.insert(k, v);
            }
        }
        base.to_string().into_bytes()
    }

    #[test]
    fn network_configuration() {
        let c = NetConf::parse(&conf(json!({})), Command::Add).expect("valid");
        assert_eq!(c.agent_socket, PathBuf::from(ipc::agent::DEFAULT_SOCKET));
        assert_eq!(c.agent_state, PathBuf::from(ipc::agent::DEFAULT_STATE));
        assert!(!c.fail_open);
        assert!(c.excluded("kube-system"), "always");
        assert!(!c.excluded("shop"));
        let ips: Vec<IpAddr> = ["10.244.1.7", "fd00:10:244:1::7"]
            .iter()
            .map(|s| s.parse().expect("ip"))
            .collect();
        assert_eq!(
            c.pod_ips().expect("ips"),
            ips,
            "the bridge's own address is not the pod's"
        );
        let result: Value = serde_json::from_str(&c.result()).expect("JSON");
        assert_eq!(Some(&result), c.prev_result.as_ref(), "passed through");
        let k = NetConf::parse(
            &conf(
                json!({"agentSocket": "/run/x.sock", "agentState": "/run/x.json",
                         "excludeNamespaces": ["infra"], "failOpen": true}),
            ),
            Command::Add,
        )
        .expect("valid");
        assert_eq!(k.agent_socket, PathBuf::from("/run/x.sock"));
        assert_eq!(k.agent_state, PathBuf::from("/run/x.json"));
        assert!(k.excluded("infra") && k.excluded("kube-system"));
        assert!(k.fail_open);
        let del = NetConf::parse(&conf(json!({"prevResult": null})), Command::Del).expect("DEL");
        assert_eq!(del.pod_ips().expect("none"), Vec::<IpAddr>::new());
    }

    #[test]
    fn malformed_configuration_is_refused_with_its_code() {
        let cases: Vec<(Vec<u8>, Command, u32, &str)> = vec![
            (b"".to_vec(), Command::Add, 6, "stdin is empty"),
            (b"{not json".to_vec(), Command::Add, 6, "not JSON"),
            (
                b"[1, 2]".to_vec(),
                Command::Add,
                6,
                "expected a JSON object",
            ),
            (
                conf(json!({"cniVersion": null})),
                Command::Add,
                7,
                "cniVersion: is missing",
            ),
            (
                conf(json!({"cniVersion": "0.2.0"})),
                Command::Add,
                1,
                "\"0.2.0\" is not supported",
            ),
            (
                conf(json!({"cniVersion": "0.3.1"})),
                Command::Check,
                1,
                "for CHECK",
            ),
            (
                conf(json!({"name": 3})),
                Command::Add,
                7,
                "name: must be a string",
            ),
            (
                conf(json!({"type": "bridge"})),
                Command::Add,
                7,
                "this plugin is \"weft-cni\"",
            ),
            (
                conf(json!({"agentSocket": ""})),
                Command::Add,
                7,
                "agentSocket: is empty",
            ),
            (
                conf(json!({"excludeNamespaces": "kube-system"})),
                Command::Add,
                7,
                "excludeNamespaces: must be a list",
            ),
            (
                conf(json!({"excludeNamespaces": ["a", 3]})),
                Command::Add,
                7,
                "excludeNamespaces[1]",
            ),
            (
                conf(json!({"failOpen": "yes"})),
                Command::Add,
                7,
                "failOpen: must be true or false",
            ),
            (
                conf(json!({"prevResult": null})),
                Command::Add,
                7,
                "chained plugin",
            ),
            (
                conf(json!({"prevResult": []})),
                Command::Add,
                7,
                "must be an object",
            ),
        ];
        for (stdin, command, code, want) in cases {
            let text = String::from_utf8_lossy(&stdin).into_owned();
            match NetConf::parse(&stdin, command) {
                Ok(c) => panic!("{text}: accepted as {c:?}"),
                Err(e) => {
                    assert_eq!(e.code(), code, "{text}: {e}");
                    assert!(e.to_string().contains(want), "{text}: {e}");
                }
            }
        }
    }

    #[test]
    fn malformed_prev_result_is_refused_by_field() {
        let cases = [
            (json!({"ips": {}}), "prevResult.ips: must be a list"),
            (
                json!({"ips": [{"gateway": "1.2.3.4"}]}),
                "prevResult.ips[0].address: is missing",
            ),
            (
                json!({"ips": [{"address": "10.0.0.300/24"}]}),
                "is not an IP address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.3/24", "interface": 4}]}),
                "prevResult.ips[0].interface",
            ),
            (
                json!({"interfaces": 1, "ips": []}),
                "prevResult.interfaces: must be a list",
            ),
        ];
        for (prev, want) in cases {
            let c =
                NetConf::parse(&conf(json!({"prevResult": prev})), Command::Add).expect("parses");
            let e = c.pod_ips().expect_err("refused");
            assert_eq!(e.code(), 7);
            assert!(e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn versions_order() {
        assert!(Version::parse("0.4.0") > Version::parse("0.3.1"));
        assert!(Version::parse("1.0.0") > Version::parse("0.4.0"));
        assert_eq!(Version::parse("1.0"), Version::parse("1.0.0"));
        assert_eq!(Version::parse("x"), None);
        assert_eq!(Version::parse("1.0.0.0"), None);
    }
}

//! Fuzz harness for what the runtime gives `weft-cni`: the `CNI_*` environment
//! (`CNI_ARGS` included) and the network configuration on stdin with its `prevResult`.
//! Used by the `cni_invocation` target of `fuzz/` (cargo-fuzz) and by
//! `tests/fuzz_corpus.rs`, which replays the committed corpus.
//!
//! Input: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_NETNS` and `CNI_ARGS`,
//! each ended by a NUL byte (a variable with no NUL left is unset), then stdin. Nothing
//! is sent to an agent: the harness stops where the plugin would connect.

use std::collections::BTreeMap;

use crate::config::{CniEnv, Command, NetConf, SUPPORTED_VERSIONS};
use crate::error::CniError;

const VARS: [&str; 5] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_IFNAME",
    "CNI_NETNS",
    "CNI_ARGS",
];

/// Parses one invocation as the plugin does and checks what the runtime relies on: an
/// error is CNI error JSON of bounded size in a version the plugin speaks, the result
/// of an ADD is a JSON object carrying `cniVersion`, `kube-system` is never asked about, and the
/// pod's addresses come out canonical and without duplicates.
pub fn invocation(data: &[u8]) {
    let mut rest = data;
    let mut values = Vec::new();
    for _ in VARS {
        let Some(end) = rest.iter().position(|b| *b == 0) else {
            break;
        };
        values.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[end + 1..];
    }
    let env: BTreeMap<&str, &str> = VARS
        .iter()
        .zip(&values)
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let stdin = rest;
    if let Err(e) = parse(&env, stdin) {
        let version = crate::error_version(stdin);
        assert!(SUPPORTED_VERSIONS.contains(&version.as_str()));
        let json = e.to_json(&version);
        let v: serde_json::Value = serde_json::from_str(&json).expect("an error is JSON");
        assert_eq!(v["code"], e.code());
        for field in ["msg", "details"] {
            let text = v[field].as_str().expect("a string");
            assert!(
                text.len() <= ipc::MAX_ERROR_TEXT,
                "a {}-byte {field} for the runtime",
                text.len()
            );
        }
    }
}

fn parse(env: &BTreeMap<&str, &str>, stdin: &[u8]) -> Result<(), CniError> {
    let cni = CniEnv::from_env(env)?;
    if cni.command == Command::Version {
        return Ok(());
    }
    let conf = NetConf::parse(stdin, cni.command)?;
    assert!(conf.excluded(crate::config::ALWAYS_EXCLUDED));
    if let Some((namespace, name)) = cni.args.pod() {
        assert!(!namespace.is_empty() && !name.is_empty());
    }
    let ips = conf.pod_ips()?;
    for (i, ip) in ips.iter().enumerate() {
        assert_eq!(*ip, ip.to_canonical());
        assert!(!ips[..i].contains(ip), "{ip} listed twice");
    }
    let result: serde_json::Value =
        serde_json::from_str(&conf.result()).expect("the result is JSON");
    assert!(result.is_object() && result.get("cniVersion").is_some());
    Ok(())
}

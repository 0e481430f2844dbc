//! The plugin's errors and how they reach the runtime: a JSON object on stdout
//! (`{"cniVersion","code","msg","details"}`) and a non-zero exit, per the CNI spec.

use std::path::PathBuf;

use ipc::agent::AgentError;
use serde::Serialize;

/// Error codes the CNI specification reserves (0-99); ours are 100 and up.
pub mod code {
    /// The network configuration's `cniVersion` is not one this plugin supports.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// The container (its network namespace) is unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// A required environment variable is missing or invalid.
    pub const INVALID_ENV: u32 = 4;
    /// An I/O failure.
    pub const IO: u32 = 5;
    /// stdin could not be decoded.
    pub const DECODE: u32 = 6;
    /// The network configuration is invalid.
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient failure: the runtime should retry.
    pub const TRY_AGAIN: u32 = 11;
    /// The node agent refused the pod (for a reason a retry does not change).
    pub const REFUSED: u32 = 101;
    /// CHECK: the pod's capture rules are not (all) there.
    pub const RULES_MISSING: u32 = 102;
    /// A bug in weft-cni (it panicked).
    pub const INTERNAL: u32 = 199;
}

/// Why a CNI command failed. Each message names the input and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// An environment variable is missing or malformed.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// stdin is not a JSON object.
    #[error("cannot decode the network configuration on stdin: {0}")]
    Decode(String),
    /// A field of the network configuration is missing or invalid.
    #[error("network configuration field {field}: {reason}")]
    Config {
        /// The field (`prevResult.ips[0].address`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration's version is not supported (or too old for the command).
    #[error("cniVersion {version:?} is not supported{why}; weft-cni supports {supported}")]
    Version {
        /// The version asked for.
        version: String,
        /// For which command, if only that one refuses it.
        why: String,
        /// The versions this plugin speaks.
        supported: String,
    },
    /// The pod's network namespace cannot be opened.
    #[error("cannot open the network namespace {path} (CNI_NETNS): {source}")]
    Netns {
        /// `CNI_NETNS`.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The node agent is not running, and the pod's namespace is enrolled: the pod waits.
    #[error("pod {pod} is in namespace {namespace}, which is enrolled in the mesh, but {source}; the runtime retries the pod once the agent is back")]
    AgentDown {
        /// `namespace/name`.
        pod: String,
        /// Its namespace.
        namespace: String,
        /// The connect error, naming the socket.
        source: AgentError,
    },
    /// The node agent did not answer.
    #[error("pod {pod}: {source}; the runtime retries the pod")]
    AgentFailed {
        /// `namespace/name`.
        pod: String,
        /// What went wrong.
        source: AgentError,
    },
    /// The node agent answered with an error.
    #[error("{message}")]
    Agent {
        /// Its message, naming the pod and the cause.
        message: String,
        /// A retry may succeed.
        retry: bool,
    },
    /// CHECK: the pod is enrolled but not captured as it should be.
    #[error("{message}; delete the pod so it is recreated with its capture")]
    RulesMissing {
        /// The agent's account, naming the pod and what is missing.
        message: String,
    },
    /// weft-cni itself failed (a panic, caught): a bug to report.
    #[error("internal error (please report it): {0}")]
    Internal(String),
}

impl CniError {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            CniError::Env { .. } => code::INVALID_ENV,
            CniError::Decode(_) => code::DECODE,
            CniError::Config { .. } => code::INVALID_CONFIG,
            CniError::Version { .. } => code::INCOMPATIBLE_VERSION,
            CniError::Netns { .. } => code::UNKNOWN_CONTAINER,
            CniError::AgentDown { .. } | CniError::AgentFailed { .. } => code::TRY_AGAIN,
            CniError::Agent { retry: true, .. } => code::TRY_AGAIN,
            CniError::Agent { retry: false, .. } => code::REFUSED,
            CniError::RulesMissing { .. } => code::RULES_MISSING,
            CniError::Internal(_) => code::INTERNAL,
        }
    }

    /// A short summary for `msg`; the whole message goes to `details`.
    fn summary(&self) -> &'static str {
        match self {
            CniError::Env { .. } => "invalid environment variable",
            CniError::Decode(_) => "cannot decode the network configuration",
            CniError::Config { .. } => "invalid network configuration",
            CniError::Version { .. } => "incompatible CNI version",
            CniError::Netns { .. } => "cannot open the pod's network namespace",
            CniError::AgentDown { .. } => "the node agent is not running",
            CniError::AgentFailed { .. } => "the node agent did not answer",
            CniError::Agent { retry: true, .. } => "the pod cannot be captured yet",
            CniError::Agent { retry: false, .. } => "the node agent refused the pod",
            CniError::RulesMissing { .. } => "capture rules are missing",
            CniError::Internal(_) => "internal error",
        }
    }

    /// The error as the runtime reads it, for `cni_version` (the configuration's, or the
    /// newest this plugin speaks when the configuration could not be read).
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Out<'a> {
            cni_version: &'a str,
            code: u32,
            msg: String,
            details: String,
        }
        // Errors quote what they refuse; runtimes put the text in events and logs.
        let details = ipc::shorten(self.to_string(), ipc::MAX_ERROR_TEXT);
        let out = Out {
            cni_version,
            code: self.code(),
            // Runtimes often show only `msg`: it carries the whole story, prefixed.
            msg: ipc::shorten(
                format!("weft-cni: {}: {details}", self.summary()),
                ipc::MAX_ERROR_TEXT,
            ),
            details,
        };
        serde_json::to_string(&out).expect("a struct of strings and a number always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_cni_json() {
        let e = CniError::Env {
            var: "CNI_COMMAND",
            reason: "is not set".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).expect("JSON");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 4);
        assert_eq!(
            v["msg"],
            "weft-cni: invalid environment variable: environment variable CNI_COMMAND: is not set"
        );
        assert_eq!(v["details"], "environment variable CNI_COMMAND: is not set");
    }

    #[test]
    fn agent_down_names_the_socket_and_asks_for_a_retry() {
        let e = CniError::AgentDown {
            pod: "shop/cart-1".into(),
            namespace: "shop".into(),
            source: AgentError::Unreachable {
                path: "/run/weft/node-agent.sock".into(),
                source: std::io::ErrorKind::NotFound.into(),
            },
        };
        assert_eq!(e.code(), code::TRY_AGAIN);
        let text = e.to_string();
        assert!(text.contains("/run/weft/node-agent.sock"), "{text}");
        assert!(text.contains("node agent"), "{text}");
    }
}

//! `weft-cni`: the chained CNI plugin. It tells the node agent about each new and deleted
//! pod sandbox and reports the agent's verdict; the agent decides, installs and hands
//! over. The plugin makes no API call and runs no other program, so it works on any node
//! and never holds up a pod Weft would not enroll. `docs/cni.md` is the user's page.
//!
//! ```text
//!  runtime --CNI_* env + config with prevResult (stdin)--> weft-cni
//!    ADD:   not a Kubernetes pod, or namespace excluded (kube-system always) --> pass
//!           agent socket --add {pod, IPs of prevResult} + netns fd--> agent
//!               captured | passed        --> prevResult out
//!               error (retry)            --> CNI error 11 (try again), naming the cause
//!           agent not running: namespace enrolled (the agent's published list)?
//!               yes --> CNI error 11 naming the agent (failOpen: pass)   no --> pass
//!    DEL:   agent socket --del--> agent (best effort: the agent also sees the pod go)
//!    CHECK: agent socket --check + netns fd--> agent: captured as it should be?
//!  error --> {"cniVersion","code","msg","details"} on stdout, exit 1
//! ```

pub mod config;
pub mod error;
pub mod fuzzing;

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use ipc::agent::{self as agent_api, AgentError, CniPod, Request, VERSION};
use tracing::{info, warn};

use config::{CniEnv, Command, Env, NetConf, LATEST_VERSION, SUPPORTED_VERSIONS};
use error::CniError;

/// How long the agent may take to answer an ADD: longer than it waits for a restarting
/// node-proxy.
const ADD_WAIT: Duration = Duration::from_secs(60);
/// How long DEL and CHECK wait.
const OTHER_WAIT: Duration = Duration::from_secs(10);

/// Runs one CNI invocation: what to print on success (`None`: nothing), or the error to
/// print as CNI error JSON.
pub fn run(env: &impl Env, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let cni = CniEnv::from_env(env)?;
    match cni.command {
        Command::Version => Ok(Some(version_json())),
        Command::Status | Command::Gc => {
            // Nothing to wait for or collect: the agent forgets pods that are gone.
            NetConf::parse(stdin, cni.command)?;
            Ok(None)
        }
        Command::Add => {
            let conf = NetConf::parse(stdin, cni.command)?;
            add(&cni, &conf)?;
            Ok(Some(conf.result()))
        }
        Command::Del => {
            let conf = NetConf::parse(stdin, cni.command)?;
            del(&cni, &conf);
            Ok(None)
        }
        Command::Check => {
            let conf = NetConf::parse(stdin, cni.command)?;
            check(&cni, &conf)?;
            Ok(None)
        }
    }
}

/// The version to write errors in: the configuration's, if it names one this plugin
/// speaks.
pub fn error_version(stdin: &[u8]) -> String {
    NetConf::version_of(stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_owned())
}

/// The answer to VERSION.
pub fn version_json() -> String {
    serde_json::json!({
        "cniVersion": LATEST_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// The pod the runtime names, if it is a Kubernetes pod the agent is to be asked about.
fn asked(cni: &CniEnv, conf: &NetConf) -> Option<CniPod> {
    let Some((namespace, name)) = cni.args.pod() else {
        info!(container = %cni.container_id, "not a Kubernetes pod (no K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS): passing through");
        return None;
    };
    if conf.excluded(namespace) {
        info!(pod = %format!("{namespace}/{name}"), "namespace {namespace} is excluded: passing through without asking");
        return None;
    }
    Some(CniPod {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid: cni.args.pod_uid.clone(),
        container_id: cni.container_id.clone(),
        ips: Vec::new(),
    })
}

/// The pod's network namespace (`CNI_NETNS`), opened.
fn open_netns(cni: &CniEnv) -> Result<File, CniError> {
    let path = cni.netns.clone().ok_or_else(|| CniError::Env {
        var: "CNI_NETNS",
        reason: "is not set; the container runtime sets it".into(),
    })?;
    File::open(&path).map_err(|source| CniError::Netns { path, source })
}

/// What the agent last published: whether `namespace` is enrolled (`None` if it
/// published nothing readable).
fn enrolled_per_agent(state: &Path, namespace: &str) -> Option<bool> {
    ipc::agent::PublishedState::read(state).map(|p| p.enrolls(namespace))
}

/// Turns a refusal into a pass when the configuration fails open.
fn or_fail_open(conf: &NetConf, pod: &CniPod, e: CniError) -> Result<(), CniError> {
    if conf.fail_open {
        warn!(pod = %pod, "failOpen: starting the pod uncaptured: {e}");
        return Ok(());
    }
    Err(e)
}

fn add(cni: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let Some(mut pod) = asked(cni, conf) else {
        return Ok(());
    };
    pod.ips = conf.pod_ips()?;
    let netns = open_netns(cni)?;
    let request = Request::Add {
        version: VERSION,
        pod: pod.clone(),
    };
    match agent_api::call(&conf.agent_socket, &request, Some(netns.as_fd()), ADD_WAIT) {
        Ok(reply) if reply.ok => {
            info!(pod = %pod, verdict = ?reply.verdict, "{}", reply.message);
            Ok(())
        }
        Ok(reply) => {
            let e = CniError::Agent {
                message: reply.message,
                retry: reply.retry,
            };
            or_fail_open(conf, &pod, e)
        }
        Err(source @ AgentError::Unreachable { .. }) => {
            match enrolled_per_agent(&conf.agent_state, &pod.namespace) {
                Some(true) => {
                    let e = CniError::AgentDown {
                        pod: pod.to_string(),
                        namespace: pod.namespace.clone(),
                        source,
                    };
                    or_fail_open(conf, &pod, e)
                }
                Some(false) => {
                    info!(pod = %pod, "the node agent is not running; namespace {} is not enrolled: passing through", pod.namespace);
                    Ok(())
                }
                None => {
                    warn!(pod = %pod, "the node agent is not running and has published no enrolled namespaces ({}): passing through", conf.agent_state.display());
                    Ok(())
                }
            }
        }
        Err(source) => {
            let e = CniError::AgentFailed {
                pod: pod.to_string(),
                source,
            };
            or_fail_open(conf, &pod, e)
        }
    }
}

/// Best effort: a pod sandbox must always be deletable, and the agent also sees the pod
/// leave its source.
fn del(cni: &CniEnv, conf: &NetConf) {
    let Some(pod) = asked(cni, conf) else {
        return;
    };
    let request = Request::Del {
        version: VERSION,
        pod: pod.clone(),
    };
    match agent_api::call(&conf.agent_socket, &request, None, OTHER_WAIT) {
        Ok(reply) if reply.ok => info!(pod = %pod, "{}", reply.message),
        Ok(reply) => warn!(pod = %pod, "the node agent: {}", reply.message),
        Err(e) => info!(pod = %pod, "{e}; the agent forgets the pod when it sees it gone"),
    }
}

fn check(cni: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let Some(mut pod) = asked(cni, conf) else {
        return Ok(());
    };
    pod.ips = conf.pod_ips()?;
    let netns = open_netns(cni)?;
    let request = Request::Check {
        version: VERSION,
        pod: pod.clone(),
    };
    match agent_api::call(
        &conf.agent_socket,
        &request,
        Some(netns.as_fd()),
        OTHER_WAIT,
    ) {
        Ok(reply) if reply.ok => Ok(()),
        Ok(reply) if reply.retry => Err(CniError::Agent {
            message: reply.message,
            retry: true,
        }),
        Ok(reply) => Err(CniError::RulesMissing {
            message: reply.message,
        }),
        Err(source @ AgentError::Unreachable { .. }) => {
            match enrolled_per_agent(&conf.agent_state, &pod.namespace) {
                Some(true) => Err(CniError::AgentDown {
                    pod: pod.to_string(),
                    namespace: pod.namespace.clone(),
                    source,
                }),
                _ => Ok(()),
            }
        }
        Err(source) => Err(CniError::AgentFailed {
            pod: pod.to_string(),
            source,
        }),
    }
}

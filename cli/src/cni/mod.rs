//! `weft-cni`: the chained CNI plugin that brings a new pod of an enrolled namespace into
//! the mesh, and its installer. `docs/cni.md` is the user's page.
//!
//! ```text
//!  runtime --CNI_* env + config with prevResult (stdin)--> weft-cni
//!    ADD:   K8S_POD_* (CNI_ARGS) --lookup (API server | manifests)--> enrolled?
//!             no  --> prevResult out, pod untouched
//!             yes --> handoff add {pod, IPs of prevResult} + netns fd --> node-proxy
//!                     (down: CNI error 11 naming the socket, the runtime retries)
//!                 --> capture rules in the pod's netns (node_proxy::redirect)
//!                 --> prevResult out
//!    DEL:   rules removed if any are there, handoff remove {uid}; all of it may be gone
//!    CHECK: enrolled pods must still have every part of their rules
//!  error --> {"cniVersion","code","msg","details"} on stdout, exit 1
//! ```
//!
//! [`config`] parses the environment and stdin, [`lookup`] reads the pod and its
//! namespace, [`install`] puts the plugin into a node's chained configuration.

pub mod cluster;
pub mod config;
pub mod error;
pub mod install;
pub mod lookup;

use std::fs::File;
use std::os::fd::AsFd;

use controller::translate::enrollment::{namespace_enrolled, pod_enrolled};
use node_proxy::redirect;
use runtime::handoff::{HandoffClient, HandoffError, PodInfo};
use runtime::netns::Netns;
use tracing::{info, warn};

use config::{CniEnv, Command, Env, NetConf, LATEST_VERSION, SUPPORTED_VERSIONS};
use error::CniError;
use lookup::Lookup;

/// Runs one CNI invocation: what to print on success (`None`: nothing), or the error to
/// print as CNI error JSON.
pub fn run(env: &impl Env, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let cni = CniEnv::from_env(env)?;
    match cni.command {
        Command::Version => Ok(Some(version_json())),
        Command::Status | Command::Gc => {
            // Nothing to wait for or collect: node-proxy's own snapshot replay forgets
            // pods that are gone, and a pod of a namespace that is not enrolled must
            // never wait for node-proxy.
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
            del(&cni, &conf)?;
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

/// What to do with a pod.
#[derive(Debug)]
enum Decision {
    /// Leave it alone, for this reason.
    Pass(String),
    /// Capture it: it is this pod.
    Capture(PodInfo),
}

/// Whether the pod is enrolled (the controller's rule) and, if so, who it is.
fn decide(cni: &CniEnv, conf: &NetConf) -> Result<Decision, CniError> {
    let Some((namespace, name)) = cni.args.pod() else {
        return Ok(Decision::Pass(
            "not a Kubernetes pod (no K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS)".into(),
        ));
    };
    let lookup = Lookup::open(&conf.source)?;
    let Some(labels) = lookup.namespace(namespace)? else {
        return Ok(Decision::Pass(format!(
            "namespace {namespace} is not in {}",
            lookup.describe()
        )));
    };
    let enrolled = namespace_enrolled(&labels).unwrap_or_else(|unknown| {
        warn!(namespace, "label weft.dev/mesh: {unknown}");
        false
    });
    if !enrolled {
        return Ok(Decision::Pass(format!(
            "namespace {namespace} is not enrolled"
        )));
    }
    let pod = lookup.pod(namespace, name)?.ok_or_else(|| {
        CniError::Lookup(format!(
            "pod {namespace}/{name} is not in {} yet; its namespace is enrolled, so the pod waits for it",
            lookup.describe()
        ))
    })?;
    if !pod_enrolled(enrolled, &pod.labels, pod.host_network) {
        return Ok(Decision::Pass(format!(
            "pod {namespace}/{name} opted out (weft.dev/mesh=disabled or hostNetwork)"
        )));
    }
    let uid = match (&cni.args.pod_uid, &pod.uid) {
        (Some(runtime), Some(object)) if runtime != object => {
            return Err(CniError::Lookup(format!(
                "pod {namespace}/{name} in {} has UID {object}, the runtime's (K8S_POD_UID) is {runtime}: an older pod of that name; the pod waits for the new one",
                lookup.describe()
            )))
        }
        (Some(uid), _) | (None, Some(uid)) => uid.clone(),
        (None, None) => {
            return Err(CniError::Lookup(format!(
                "pod {namespace}/{name} has no UID in {} and CNI_ARGS has no K8S_POD_UID",
                lookup.describe()
            )))
        }
    };
    let ips = conf.pod_ips()?;
    if ips.is_empty() {
        return Err(CniError::Config {
            field: "prevResult.ips".into(),
            reason: format!("holds no address of pod {namespace}/{name}; list weft-cni after the plugin that assigns them"),
        });
    }
    Ok(Decision::Capture(PodInfo {
        uid,
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: pod.service_account,
        ips,
    }))
}

/// The pod's network namespace (`CNI_NETNS`), opened and entered.
fn enter(cni: &CniEnv, who: &str) -> Result<(File, Netns), CniError> {
    let path = cni.netns.clone().ok_or_else(|| CniError::Env {
        var: "CNI_NETNS",
        reason: "is not set; the container runtime sets it".into(),
    })?;
    let file = File::open(&path).map_err(|source| CniError::Netns {
        path: path.clone(),
        source,
    })?;
    let fd = file.try_clone().map_err(|source| CniError::Netns {
        path: path.clone(),
        source,
    })?;
    let ns = Netns::enter(fd.into(), who).map_err(|source| CniError::Enter {
        pod: who.to_owned(),
        source,
    })?;
    Ok((file, ns))
}

fn add(cni: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let pod = match decide(cni, conf)? {
        Decision::Pass(why) => {
            info!(container = %cni.container_id, "passing through: {why}");
            return Ok(());
        }
        Decision::Capture(pod) => pod,
    };
    let who = pod.to_string();
    let (file, ns) = enter(cni, &who)?;
    let mut client = HandoffClient::connect(&conf.socket).map_err(|source| match source {
        HandoffError::Connect(..) => CniError::NodeProxyDown {
            pod: who.clone(),
            source,
        },
        source => CniError::Handoff {
            pod: who.clone(),
            source,
        },
    })?;
    // node-proxy first: the rules send the pod's traffic to listeners it opens.
    client
        .add(&pod, file.as_fd(), None)
        .map_err(|source| CniError::Handoff {
            pod: who.clone(),
            source,
        })?;
    if let Err(e) = redirect::install(&ns, &who) {
        // The runtime deletes and retries a failed ADD; leave nothing behind meanwhile.
        if let Err(undo) = client.remove(&pod.uid) {
            warn!(pod = %who, "cannot take the pod back from node-proxy: {undo}");
        }
        return Err(e.into());
    }
    info!(pod = %who, uid = %pod.uid, ips = ?pod.ips, "pod captured and handed to node-proxy");
    Ok(())
}

fn del(cni: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let Some((namespace, name)) = cni.args.pod() else {
        return Ok(());
    };
    let who = format!("{namespace}/{name}");
    // Rules: only where some part is there, so other pods stay untouched. A namespace
    // that is gone took its rules with it.
    if let Some(path) = &cni.netns {
        match File::open(path).and_then(|f| Netns::enter(f.into(), &who)) {
            Ok(ns) => {
                if !redirect::installed(&ns, &who)?.present.is_empty() {
                    redirect::remove(&ns, &who)?;
                }
            }
            Err(e) => info!(pod = %who, "network namespace {} is gone ({e})", path.display()),
        }
    }
    // node-proxy: by UID, the runtime's or, failing that, the Pod object's.
    let uid = cni.args.pod_uid.clone().or_else(|| {
        let lookup = Lookup::open(&conf.source).ok()?;
        lookup.pod(namespace, name).ok()??.uid
    });
    let Some(uid) = uid else {
        info!(pod = %who, "no UID for the pod (no K8S_POD_UID, no Pod object): nothing to tell node-proxy");
        return Ok(());
    };
    let handoff = |source| CniError::Handoff {
        pod: who.clone(),
        source,
    };
    match HandoffClient::connect(&conf.socket) {
        // Not running: it serves nothing, and a restarted one learns the node's pods
        // from a snapshot.
        Err(e @ HandoffError::Connect(..)) => info!(pod = %who, "{e}; nothing to remove"),
        Err(e) => return Err(handoff(e)),
        Ok(mut client) => match client.remove(&uid) {
            Ok(()) => info!(pod = %who, %uid, "removed from node-proxy"),
            // The one refusal that means done (docs/handoff.md, `remove`).
            Err(HandoffError::Rejected(why)) if why.contains("no pod with uid") => {}
            Err(e) => return Err(handoff(e)),
        },
    }
    Ok(())
}

fn check(cni: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let pod = match decide(cni, conf)? {
        Decision::Pass(_) => return Ok(()),
        Decision::Capture(pod) => pod,
    };
    let who = pod.to_string();
    let (_file, ns) = enter(cni, &who)?;
    let parts = redirect::installed(&ns, &who)?;
    if !parts.missing.is_empty() {
        return Err(CniError::RulesMissing {
            pod: who,
            missing: parts.missing.join(", "),
        });
    }
    Ok(())
}

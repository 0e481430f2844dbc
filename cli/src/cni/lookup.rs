//! What the plugin must know of a pod that the runtime does not pass: its namespace's
//! labels (enrollment), and its labels, service account and UID. Read from the API
//! server (a kubeconfig) or from a manifest directory as the controller's `--manifests`
//! mode reads it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use api::ObjectName;
use k8s_openapi::api::core::v1::{Namespace, Pod};

use super::config::LookupSource;
use super::error::CniError;

/// How long one API request may take; the runtime retries the whole ADD after.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// What the plugin reads of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `spec.serviceAccountName`, `default` when unset (as Kubernetes does).
    pub service_account: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

impl From<&Pod> for PodFacts {
    fn from(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        PodFacts {
            uid: pod.metadata.uid.clone().filter(|u| !u.is_empty()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        }
    }
}

/// A lookup source, opened.
pub enum Lookup {
    /// The API server.
    Kube {
        /// For the requests.
        runtime: tokio::runtime::Runtime,
        /// The client.
        client: kube::Client,
        /// The kubeconfig, for errors.
        path: PathBuf,
    },
    /// A manifest directory, read once.
    Manifests {
        /// What it holds.
        objects: std::sync::Arc<controller::objects::Objects>,
        /// The directory, for errors.
        dir: PathBuf,
    },
}

impl Lookup {
    /// Opens `source`: reads the kubeconfig (no request yet) or the manifest directory.
    pub fn open(source: &LookupSource) -> Result<Self, CniError> {
        match source {
            LookupSource::Manifests(dir) => {
                let snapshot = controller::manifests::load(std::slice::from_ref(dir))
                    .map_err(|e| CniError::LookupIo(format!("manifests: {e}")))?;
                Ok(Lookup::Manifests {
                    objects: snapshot.objects,
                    dir: dir.clone(),
                })
            }
            LookupSource::Kubeconfig(path) => {
                let io = |what: String| {
                    CniError::LookupIo(format!("kubeconfig {}: {what}", path.display()))
                };
                let kubeconfig =
                    kube::config::Kubeconfig::read_from(path).map_err(|e| io(e.to_string()))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| io(format!("cannot start a runtime: {e}")))?;
                let options = kube::config::KubeConfigOptions::default();
                let config = runtime
                    .block_on(kube::Config::from_custom_kubeconfig(kubeconfig, &options))
                    .map_err(|e| io(e.to_string()))?;
                let client = {
                    // The client's connector needs the runtime it will run on.
                    let _entered = runtime.enter();
                    kube::Client::try_from(config).map_err(|e| io(e.to_string()))?
                };
                Ok(Lookup::Kube {
                    runtime,
                    client,
                    path: path.clone(),
                })
            }
        }
    }

    /// Where it reads, for messages.
    pub fn describe(&self) -> String {
        match self {
            Lookup::Kube { path, .. } => format!("the API server (kubeconfig {})", path.display()),
            Lookup::Manifests { dir, .. } => format!("the manifests in {}", dir.display()),
        }
    }

    /// The labels of namespace `name`, or `None` if there is no such namespace.
    pub fn namespace(&self, name: &str) -> Result<Option<BTreeMap<String, String>>, CniError> {
        match self {
            Lookup::Manifests { objects, .. } => Ok(objects
                .namespaces
                .get(name)
                .map(|ns| ns.value.metadata.labels.clone().unwrap_or_default())),
            Lookup::Kube {
                runtime, client, ..
            } => {
                let api: kube::Api<Namespace> = kube::Api::all(client.clone());
                let ns = self.request(runtime, format!("namespace {name}"), api.get_opt(name))?;
                Ok(ns.map(|ns| ns.metadata.labels.unwrap_or_default()))
            }
        }
    }

    /// Pod `namespace/name`, or `None` if there is no such pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodFacts>, CniError> {
        match self {
            Lookup::Manifests { objects, .. } => Ok(objects
                .pods
                .get(&ObjectName::new(namespace, name))
                .map(|p| PodFacts::from(&*p.value))),
            Lookup::Kube {
                runtime, client, ..
            } => {
                let api: kube::Api<Pod> = kube::Api::namespaced(client.clone(), namespace);
                let what = format!("pod {namespace}/{name}");
                let pod = self.request(runtime, what, api.get_opt(name))?;
                Ok(pod.as_ref().map(PodFacts::from))
            }
        }
    }

    fn request<T>(
        &self,
        runtime: &tokio::runtime::Runtime,
        what: String,
        request: impl std::future::Future<Output = kube::Result<T>>,
    ) -> Result<T, CniError> {
        let source = self.describe();
        match runtime.block_on(tokio::time::timeout(API_TIMEOUT, request)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(CniError::Lookup(format!(
                "cannot read {what} from {source}: {e}"
            ))),
            Err(_) => Err(CniError::Lookup(format!(
                "reading {what} from {source} took more than {} s",
                API_TIMEOUT.as_secs()
            ))),
        }
    }
}

//! The cluster's source: the API server, through two watches: the Pods whose
//! `spec.nodeName` is this node (a field selector: the agent never holds the cluster's
//! pods), and all Namespaces (their labels enroll pods).

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Source, View};

/// The API server.
pub struct Kube {
    client: Client,
}

impl Kube {
    /// Reads through `client`.
    pub fn new(client: Client) -> Self {
        Kube { client }
    }
}

/// Which watch an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Pods,
    Namespaces,
}

/// What an event means here: the stores hold the objects.
enum Signal {
    /// The initial list is complete.
    Listed,
    /// Something changed.
    Changed,
    /// Part of an initial list.
    Listing,
    /// The watch failed; it retries.
    Failed(String),
}

fn signal<K>(event: Result<watcher::Event<K>, watcher::Error>) -> Signal {
    match event {
        Ok(watcher::Event::InitDone) => Signal::Listed,
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Signal::Listing,
        Ok(_) => Signal::Changed,
        Err(e) => Signal::Failed(e.to_string()),
    }
}

fn view(node: &str, pods: &Store<Pod>, namespaces: &Store<Namespace>) -> View {
    let pods = pods.state();
    let namespaces = namespaces.state();
    View::new(
        node,
        pods.iter().map(|p| &**p),
        namespaces.iter().map(|n| &**n),
    )
}

impl Source for Kube {
    fn describe(&self) -> String {
        "the API server".into()
    }

    fn run(
        self: Box<Self>,
        node: String,
        out: watch::Sender<Arc<View>>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let (pod_store, pod_writer) = reflector::store::<Pod>();
            let (ns_store, ns_writer) = reflector::store::<Namespace>();
            let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
            let pods = reflector::reflector(
                pod_writer,
                watcher(Api::<Pod>::all(self.client.clone()), on_node)
                    .default_backoff()
                    .modify(|p: &mut Pod| p.managed_fields_mut().clear()),
            )
            .map(|e| (Which::Pods, signal(e)));
            let namespaces = reflector::reflector(
                ns_writer,
                watcher(
                    Api::<Namespace>::all(self.client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff()
                .modify(|n: &mut Namespace| n.managed_fields_mut().clear()),
            )
            .map(|e| (Which::Namespaces, signal(e)));
            let events = futures::stream::select(pods, namespaces);
            tokio::pin!(events);
            let (mut pods_listed, mut namespaces_listed) = (false, false);
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = events.next() => e,
                };
                let Some((which, signal)) = event else { return };
                let changed = match signal {
                    Signal::Listed => {
                        match which {
                            Which::Pods => pods_listed = true,
                            Which::Namespaces => namespaces_listed = true,
                        }
                        true
                    }
                    Signal::Changed => true,
                    Signal::Listing => false,
                    Signal::Failed(e) => {
                        warn!("watching {which:?}: {e}; retrying");
                        false
                    }
                };
                if changed && pods_listed && namespaces_listed {
                    let view = view(&node, &pod_store, &ns_store);
                    out.send_if_modified(|current| {
                        let changed = **current != view;
                        if changed {
                            *current = Arc::new(view);
                        }
                        changed
                    });
                }
            }
        })
    }
}

//! The node agent's Kubernetes source against a scripted API server
//! (`tower_test::mock`): the initial lists (this node's pods only, by field selector,
//! and every namespace), watch events that change a pod's enrollment, the DaemonSet read
//! on stop, and that the agent's RBAC in `weftctl install` is exactly what these calls
//! need.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use kube::client::Body;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use weft_node_agent::source::{kube::Kube, Source, View};

type ResponseBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// What the fake API server holds and was asked.
#[derive(Default)]
struct Fake {
    items: HashMap<&'static str, Vec<Value>>,
    watches: HashMap<&'static str, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// (method, path, query) of every request.
    calls: Vec<(String, String, String)>,
    daemonset: Option<Value>,
}

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";

fn full(status: StatusCode, body: Value) -> Response<ResponseBody> {
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
    let mut r = Response::new(
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

impl Fake {
    fn answer(&mut self, path: &str, query: &str) -> Response<ResponseBody> {
        let kind = match path {
            PODS => PODS,
            NAMESPACES => NAMESPACES,
            "/apis/apps/v1/namespaces/weft-system/daemonsets/weft-node-agent" => {
                return match &self.daemonset {
                    Some(ds) => full(StatusCode::OK, ds.clone()),
                    None => full(
                        StatusCode::NOT_FOUND,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404}),
                    ),
                };
            }
            _ => panic!("the agent asked for {path}?{query}"),
        };
        if query.contains("watch=true") {
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            self.watches.entry(kind).or_default().push(tx);
            let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            use futures::StreamExt;
            let body = StreamBody::new(
                stream.map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b))),
            );
            return Response::new(body.boxed_unsync());
        }
        let list_kind = if kind == PODS {
            "PodList"
        } else {
            "NamespaceList"
        };
        full(
            StatusCode::OK,
            json!({"kind": list_kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                   "items": self.items.get(kind).cloned().unwrap_or_default()}),
        )
    }

    fn event(&mut self, kind: &'static str, type_: &str, object: Value) {
        let line = Bytes::from(format!("{}\n", json!({"type": type_, "object": object})));
        if let Some(w) = self.watches.get_mut(kind) {
            w.retain(|w| w.send(line.clone()).is_ok());
        }
    }
}

fn client(state: &Arc<Mutex<Fake>>) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
    let state = state.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let mut f = state.lock().unwrap();
            f.calls
                .push((request.method().to_string(), path.clone(), query.clone()));
            send.send_response(f.answer(&path, &query));
        }
    });
    kube::Client::new(service, "default")
}

fn pod(name: &str, uid: &str, labels: Value, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": labels, "resourceVersion": rv},
        "spec": {"nodeName": "node-1", "serviceAccountName": "cart", "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.7"}})
}

async fn until(
    views: &mut watch::Receiver<std::sync::Arc<View>>,
    ok: impl Fn(&View) -> bool,
) -> View {
    let view = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let v = views.borrow_and_update().clone();
            if ok(&v) {
                return v;
            }
            views.changed().await.unwrap();
        }
    })
    .await;
    (*view.expect("the view gets there")).clone()
}

#[tokio::test]
async fn the_api_server_source_lists_this_nodes_pods_and_follows_their_enrollment() {
    let state = Arc::new(Mutex::new(Fake::default()));
    {
        let mut f = state.lock().unwrap();
        f.items.insert(
            NAMESPACES,
            vec![json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": "shop", "labels": {"weft.dev/mesh": "enabled"}, "resourceVersion": "1"}})],
        );
        f.items.insert(
            PODS,
            vec![pod("cart-1", "u-1", json!({"app": "cart"}), "1")],
        );
    }
    let kube = client(&state);
    let (tx, mut views) = watch::channel(std::sync::Arc::new(View::default()));
    let shutdown = CancellationToken::new();
    let source: Box<dyn Source> = Box::new(Kube::new(kube.clone()));
    assert_eq!(source.describe(), "the API server");
    tokio::spawn(source.run("node-1".into(), tx, shutdown.clone()));

    let listed = until(&mut views, |v| v.synced).await;
    assert!(listed.wants(&listed.pods["u-1"]), "{listed:?}");
    // The pod opts out: the next view does not want it.
    let out = pod(
        "cart-1",
        "u-1",
        json!({"app": "cart", "weft.dev/mesh": "disabled"}),
        "2",
    );
    state.lock().unwrap().event(PODS, "MODIFIED", out);
    let changed = until(&mut views, |v| {
        v.pods.get("u-1").is_some_and(|p| !v.wants(p))
    })
    .await;
    assert_eq!(changed.pods.len(), 1);
    // The namespace's label goes: no pod of it is wanted.
    state.lock().unwrap().event(
        NAMESPACES,
        "MODIFIED",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "resourceVersion": "3"}}),
    );
    until(&mut views, |v| v.enrolled_namespaces().is_empty()).await;

    // On stop: the DaemonSet is gone, so Weft leaves the node.
    let read = weft_node_agent::daemonset(kube, "weft-system", "weft-node-agent").await;
    assert_eq!(
        weft_node_agent::on_stop(read).0,
        weft_node_agent::OnStop::Uninstall
    );
    shutdown.cancel();

    let calls = state.lock().unwrap().calls.clone();
    for (_, path, query) in calls.iter().filter(|(_, p, _)| p == PODS) {
        assert!(
            query.contains("fieldSelector=spec.nodeName%3Dnode-1"),
            "pods are read for this node only: {path}?{query}"
        );
    }
    // The agent's RBAC grants exactly what it calls.
    let verb = |method: &str, path: &str, query: &str| match (method, path.split('/').count()) {
        ("GET", _) if path.contains("/daemonsets/") => "get",
        ("GET", _) if query.contains("watch=true") => "watch",
        ("GET", _) => "list",
        _ => panic!("the agent writes nothing: {method} {path}"),
    };
    let cluster = controller::install::node_agent_cluster_rules();
    let namespaced = controller::install::node_agent_namespace_rules();
    let mut used = std::collections::BTreeSet::new();
    for (method, path, query) in &calls {
        let v = verb(method, path, query);
        let (group, resource, name) = match path.as_str() {
            PODS => ("", "pods", None),
            NAMESPACES => ("", "namespaces", None),
            p => ("apps", "daemonsets", p.rsplit('/').next()),
        };
        let allowed = cluster.iter().chain(&namespaced).any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|x| x == v)
                && r.resource_names
                    .as_ref()
                    .is_none_or(|names| name.is_some_and(|n| names.iter().any(|x| x == n)))
        });
        assert!(
            allowed,
            "the agent calls {v} {group}/{resource}, which its RBAC does not allow"
        );
        used.insert((v.to_owned(), resource.to_owned()));
    }
    for rule in cluster.iter().chain(&namespaced) {
        for resource in rule.resources.iter().flatten() {
            for v in &rule.verbs {
                assert!(
                    used.contains(&(v.clone(), resource.clone())),
                    "the RBAC grants {v} on {resource}, which the agent never calls"
                );
            }
        }
    }
}

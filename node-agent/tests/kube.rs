//! The node agent's Kubernetes source against a scripted API server
//! (`tower_test::mock`): the initial lists (this node's pods only, by field selector,
//! and every namespace), watch events that change a pod's enrollment, the agent's watch
//! of its own DaemonSet (an uninstall deletes the agent's RBAC right after it), and that
//! the agent's RBAC in `weftctl install` is exactly what these calls need.

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
use weft_node_agent::{OnStop, Seen};

type ResponseBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// What the fake API server holds and was asked.
#[derive(Default)]
struct Fake {
    items: HashMap<&'static str, Vec<Value>>,
    watches: HashMap<&'static str, Vec<mpsc::UnboundedSender<Bytes>>>,
    /// (method, path, query) of every request.
    calls: Vec<(String, String, String)>,
    daemonset: Option<Value>,
    /// The agent's RBAC (403) or ServiceAccount (401) is deleted: every request is
    /// refused with this status.
    refuse: Option<u16>,
}

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const DAEMONSETS: &str = "/apis/apps/v1/namespaces/weft-system/daemonsets";
const DAEMONSET: &str = "/apis/apps/v1/namespaces/weft-system/daemonsets/weft-node-agent";

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
        if let Some(code) = self.refuse {
            let reason = if code == 401 {
                "Unauthorized"
            } else {
                "Forbidden"
            };
            return full(
                StatusCode::from_u16(code).unwrap(),
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "code": code}),
            );
        }
        let kind = match path {
            PODS => PODS,
            NAMESPACES => NAMESPACES,
            DAEMONSETS => {
                assert!(
                    query.contains("fieldSelector=metadata.name%3Dweft-node-agent"),
                    "the agent watches its own DaemonSet only: {query}"
                );
                DAEMONSETS
            }
            DAEMONSET => {
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
        let list_kind = match kind {
            PODS => "PodList",
            NAMESPACES => "NamespaceList",
            _ => "DaemonSetList",
        };
        let items = match kind {
            DAEMONSETS => self.daemonset.iter().cloned().collect(),
            _ => self.items.get(kind).cloned().unwrap_or_default(),
        };
        full(
            StatusCode::OK,
            json!({"kind": list_kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                   "items": items}),
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
    let read = weft_node_agent::daemonset(kube.clone(), "weft-system", "weft-node-agent").await;
    assert_eq!(
        weft_node_agent::on_stop(Seen::Unknown, Some(read)).0,
        OnStop::Uninstall
    );
    shutdown.cancel();

    let calls = state.lock().unwrap().calls.clone();
    check_rbac(&calls);
}

fn daemonset(deleting: bool) -> Value {
    let mut ds = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "weft-node-agent", "namespace": "weft-system", "resourceVersion": "5"},
        "spec": {"selector": {"matchLabels": {"app": "weft-node-agent"}},
                 "template": {"spec": {"containers": []}}}});
    if deleting {
        ds["metadata"]["deletionTimestamp"] = json!("2026-12-06T05:00:00Z");
        ds["metadata"]["resourceVersion"] = json!("6");
    }
    ds
}

async fn seen_become(seen: &watch::Receiver<Seen>, want: Seen) {
    let mut seen = seen.clone();
    tokio::time::timeout(Duration::from_secs(10), seen.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("the agent sees its DaemonSet {want:?} in time"))
        .unwrap();
}

#[tokio::test]
async fn an_uninstall_that_deletes_the_agents_rbac_still_takes_weft_off_the_node() {
    let state = Arc::new(Mutex::new(Fake {
        daemonset: Some(daemonset(false)),
        ..Fake::default()
    }));
    let kube = client(&state);
    let (tx, seen) = watch::channel(Seen::Unknown);
    let shutdown = CancellationToken::new();
    tokio::spawn(weft_node_agent::follow_daemonset(
        kube.clone(),
        "weft-system".into(),
        "weft-node-agent".into(),
        tx,
        shutdown.clone(),
    ));
    seen_become(&seen, Seen::Present).await;
    // An upgrade: the DaemonSet stays, so does everything on the node, even when the
    // API server cannot be asked at the stop.
    let read = weft_node_agent::daemonset(kube.clone(), "weft-system", "weft-node-agent").await;
    assert_eq!(
        weft_node_agent::on_stop(*seen.borrow(), Some(read)).0,
        OnStop::Keep
    );
    let unreachable = Some(Err(weft_node_agent::ReadError::Failed("timed out".into())));
    assert_eq!(
        weft_node_agent::on_stop(*seen.borrow(), unreachable).0,
        OnStop::Keep
    );
    // `weftctl uninstall | kubectl delete -f -`: the DaemonSet is deleted (a deletion
    // timestamp, then gone), then the agent's RBAC, before the agent is stopped.
    let event = |type_, deleting| {
        state
            .lock()
            .unwrap()
            .event(DAEMONSETS, type_, daemonset(deleting))
    };
    event("MODIFIED", true);
    seen_become(&seen, Seen::Deleting).await;
    event("DELETED", true);
    seen_become(&seen, Seen::Gone).await;
    state.lock().unwrap().refuse = Some(403);
    let read = weft_node_agent::daemonset(kube, "weft-system", "weft-node-agent").await;
    assert!(read.is_err(), "the RBAC is gone: {read:?}");
    assert_eq!(
        weft_node_agent::on_stop(*seen.borrow(), None).0,
        OnStop::Uninstall,
        "the watch saw the DaemonSet go: Weft leaves the node"
    );
    shutdown.cancel();
    let calls = state.lock().unwrap().calls.clone();
    check_rbac(&calls);
}

/// The agent stopped without its watch having seen the DaemonSet go (it was restarting,
/// or the watch lagged): the last read decides. Gone (404), being deleted, or the agent
/// refused because the uninstall already deleted its RBAC (403) or ServiceAccount (401):
/// Weft leaves the node. Present: everything stays, the plugin included.
#[tokio::test]
async fn on_stop_the_last_read_decides_and_a_refusal_means_removed() {
    let cases: [(Option<Value>, Option<u16>, OnStop); 5] = [
        (Some(daemonset(false)), None, OnStop::Keep),
        (Some(daemonset(true)), None, OnStop::Uninstall),
        (None, None, OnStop::Uninstall),
        (Some(daemonset(false)), Some(403), OnStop::Uninstall),
        (Some(daemonset(false)), Some(401), OnStop::Uninstall),
    ];
    for (ds, refuse, want) in cases {
        let state = Arc::new(Mutex::new(Fake {
            daemonset: ds.clone(),
            refuse,
            ..Fake::default()
        }));
        let read =
            weft_node_agent::daemonset(client(&state), "weft-system", "weft-node-agent").await;
        let (decision, why) = weft_node_agent::on_stop(Seen::Unknown, Some(read));
        assert_eq!(decision, want, "{ds:?} refused {refuse:?}: {why}");
        if refuse.is_some() {
            assert!(why.contains("RBAC is gone"), "{why}");
        }
    }
}

/// The agent's RBAC allows every call in `calls`; once both tests ran, that each rule
/// was needed by one of them.
fn check_rbac(calls: &[(String, String, String)]) {
    static USED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    for (_, path, query) in calls.iter().filter(|(_, p, _)| p == PODS) {
        assert!(
            query.contains("fieldSelector=spec.nodeName%3Dnode-1"),
            "pods are read for this node only: {path}?{query}"
        );
    }
    let verb = |method: &str, path: &str, query: &str| match method {
        "GET" if path.contains("/daemonsets/") => "get",
        "GET" if query.contains("watch=true") => "watch",
        "GET" => "list",
        _ => panic!("the agent writes nothing: {method} {path}"),
    };
    let cluster = controller::install::node_agent_cluster_rules();
    let namespaced = controller::install::node_agent_namespace_rules();
    let mut used = USED.lock().unwrap();
    for (method, path, query) in calls {
        let v = verb(method, path, query);
        let (group, resource, name) = match path.as_str() {
            PODS => ("", "pods", None),
            NAMESPACES => ("", "namespaces", None),
            DAEMONSET => ("apps", "daemonsets", Some("weft-node-agent")),
            // A list or watch names its object by field selector, as resourceNames needs.
            DAEMONSETS if query.contains("fieldSelector=metadata.name%3Dweft-node-agent") => {
                ("apps", "daemonsets", Some("weft-node-agent"))
            }
            p => panic!("the agent asked for {p}?{query}"),
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
        let key = (v.to_owned(), resource.to_owned());
        if !used.contains(&key) {
            used.push(key);
        }
    }
    if RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
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
}

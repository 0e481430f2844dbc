//! The Kubernetes side against a scripted API server (`tower_test::mock`): the initial
//! list of every kind, watch events, a watch that fails with 410 and is relisted, a
//! kind whose CRD is not installed, the status patches written for an invalid HTTPRoute
//! and an invalid AuthorizationPolicy, TokenReview, and the root kept in a Secret.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use controller::auth::Authenticator;
use controller::kubernetes::{KubeSource, StatusWriter, TokenReviewer};
use controller::source::Source;
use controller::translate::{translate, Settings};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use kube::client::Body;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

type ResponseBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// Every request any fake API server of this file answered: (method, path, query).
static CALLS: Mutex<Vec<(String, String, String)>> = Mutex::new(Vec::new());

/// The kinds' collection paths, their list kinds, and what they hold.
struct Kind {
    list_kind: &'static str,
    api_version: &'static str,
    items: Vec<Value>,
    /// Not served (a CRD not installed).
    missing: bool,
    watches: Vec<mpsc::UnboundedSender<Bytes>>,
    lists: usize,
}

#[derive(Default)]
struct Fake {
    kinds: HashMap<&'static str, Kind>,
    rv: u64,
    /// (method, path, body) of every write.
    writes: Vec<(String, String, Value)>,
    secrets: HashMap<String, Value>,
    configmaps: HashMap<String, Value>,
    /// Discovery of the Gateway API group: (plural, kind, served versions) per CRD;
    /// empty, every discovery request is answered 404.
    discovery: Vec<(String, String, Vec<String>)>,
    /// Another writer's route parent, added to the route (a new resourceVersion) right
    /// after the controller's next read of a route's status: a write racing the controller's.
    interleave: Option<Value>,
    /// Status patches refused for a stale resourceVersion (409).
    conflicts: usize,
    /// Leases, by name (in weft-system).
    leases: HashMap<String, Value>,
    /// The field managers owning each Deployment's `spec.replicas` (by its path), as
    /// server-side apply keeps them: one removing the field from what it applies
    /// gives it up, and the field goes (back to its default, 1) when no one owns it.
    replica_owners: HashMap<String, std::collections::BTreeSet<String>>,
}

const PATHS: [(&str, &str, &str); 16] = [
    // What the controller applies for a waypoint, and watches for drift.
    ("/apis/apps/v1/deployments", "DeploymentList", "apps/v1"),
    ("/api/v1/serviceaccounts", "ServiceAccountList", "v1"),
    ("/api/v1/configmaps", "ConfigMapList", "v1"),
    (
        "/apis/policy/v1/poddisruptionbudgets",
        "PodDisruptionBudgetList",
        "policy/v1",
    ),
    (
        "/apis/autoscaling/v2/horizontalpodautoscalers",
        "HorizontalPodAutoscalerList",
        "autoscaling/v2",
    ),
    ("/api/v1/namespaces", "NamespaceList", "v1"),
    ("/api/v1/pods", "PodList", "v1"),
    ("/api/v1/services", "ServiceList", "v1"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSliceList",
        "discovery.k8s.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/gateways",
        "GatewayList",
        "gateway.networking.k8s.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "HTTPRouteList",
        "gateway.networking.k8s.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        "GRPCRouteList",
        "gateway.networking.k8s.io/v1",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/referencegrants",
        "ReferenceGrantList",
        "gateway.networking.k8s.io/v1",
    ),
    (
        "/apis/weft.dev/v1alpha1/authorizationpolicies",
        "AuthorizationPolicyList",
        "weft.dev/v1alpha1",
    ),
    (
        "/apis/weft.dev/v1alpha1/trafficpolicies",
        "TrafficPolicyList",
        "weft.dev/v1alpha1",
    ),
    (
        "/apis/weft.dev/v1alpha1/waypointparameters",
        "WaypointParametersList",
        "weft.dev/v1alpha1",
    ),
];

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

fn not_found(what: &str) -> Response<ResponseBody> {
    full(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{what} not found"), "reason": "NotFound", "code": 404}),
    )
}

impl Fake {
    fn new() -> Arc<Mutex<Self>> {
        let mut f = Fake {
            rv: 1,
            ..Fake::default()
        };
        for (path, list_kind, api_version) in PATHS {
            f.kinds.insert(
                path,
                Kind {
                    list_kind,
                    api_version,
                    items: Vec::new(),
                    missing: false,
                    watches: Vec::new(),
                    lists: 0,
                },
            );
        }
        Arc::new(Mutex::new(f))
    }

    fn kind(&mut self, path: &str) -> &mut Kind {
        self.kinds.get_mut(path).unwrap()
    }

    /// Stores `object` in the kind at `list_path` (replacing the one of its name) with a new
    /// resourceVersion, or deletes it, and tells the kind's watchers.
    fn put(&mut self, list_path: &str, type_: &str, object: Value) {
        let (ns, name) = (
            object["metadata"]["namespace"].clone(),
            object["metadata"]["name"].clone(),
        );
        self.event(list_path, type_, object.clone());
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let items = &mut self.kind(list_path).items;
        items.retain(|i| i["metadata"]["namespace"] != ns || i["metadata"]["name"] != name);
        if type_ != "DELETED" {
            items.push(object);
        }
    }

    /// Sends a watch event to the watchers of a kind.
    fn event(&mut self, path: &str, type_: &str, object: Value) {
        self.rv += 1;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let line = Bytes::from(format!("{}\n", json!({"type": type_, "object": object})));
        let kind = self.kind(path);
        kind.watches.retain(|w| w.send(line.clone()).is_ok());
    }

    async fn serve(
        state: Arc<Mutex<Self>>,
        mut handle: tower_test::mock::Handle<Request<Body>, Response<ResponseBody>>,
    ) {
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().to_string();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            CALLS
                .lock()
                .unwrap()
                .push((method.clone(), path.clone(), query.clone()));
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let response = state.lock().unwrap().answer(&method, &path, &query, body);
            send.send_response(response);
        }
    }

    fn answer(
        &mut self,
        method: &str,
        path: &str,
        query: &str,
        body: Value,
    ) -> Response<ResponseBody> {
        // Server-side apply (the waypoints' objects): taken as given, and kept (with a
        // generation bumped by a spec change) where the kind is listed and watched.
        if method == "PATCH" && query.contains("fieldManager=") {
            self.writes
                .push((method.to_owned(), path.to_owned(), body.clone()));
            let Some((list_path, ns, name)) = collection_of(path) else {
                return full(StatusCode::OK, body);
            };
            if !self.kinds.contains_key(list_path.as_str()) {
                return full(StatusCode::OK, body);
            }
            let same =
                |i: &Value| i["metadata"]["namespace"] == ns && i["metadata"]["name"] == name;
            let manager = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("fieldManager="))
                .unwrap_or_default()
                .to_owned();
            let old = self
                .kind(&list_path)
                .items
                .iter()
                .find(|i| same(i))
                .cloned();
            let mut object = body;
            if list_path.ends_with("/deployments") {
                let owners = self.replica_owners.entry(path.to_owned()).or_default();
                let had = old.as_ref().map(|o| o["spec"]["replicas"].clone());
                if let (Some(old), false) = (&old, object["spec"]["template"].is_object()) {
                    // A partial apply (of the count alone) keeps the rest.
                    let count = object["spec"]["replicas"].clone();
                    object = old.clone();
                    object["metadata"]
                        .as_object_mut()
                        .map(|m| (m.remove("resourceVersion"), m.remove("generation")));
                    object.as_object_mut().map(|o| o.remove("status"));
                    object["spec"]["replicas"] = count;
                }
                if object["spec"]["replicas"].is_null() {
                    owners.remove(&manager);
                    object["spec"]["replicas"] = match (&had, owners.is_empty()) {
                        (Some(had), false) => had.clone(),
                        _ => json!(1),
                    };
                } else {
                    // Forced: a different count takes the field from its other owners.
                    if had.as_ref() != Some(&object["spec"]["replicas"]) {
                        owners.clear();
                    }
                    owners.insert(manager);
                }
            }
            let kind = self
                .kinds
                .get_mut(list_path.as_str())
                .expect("checked above");
            // Applying what is there already changes nothing (no new resourceVersion).
            let unchanged = kind.items.iter().find(|i| {
                let mut i = (*i).clone();
                i["metadata"]
                    .as_object_mut()
                    .map(|m| (m.remove("resourceVersion"), m.remove("generation")));
                i.as_object_mut().map(|o| o.remove("status"));
                same(&i) && i == object
            });
            if let Some(stored) = unchanged {
                return full(StatusCode::OK, stored.clone());
            }
            let (type_, generation) = match kind.items.iter().find(|i| same(i)) {
                Some(old) => {
                    let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                    (
                        "MODIFIED",
                        if old["spec"] == object["spec"] {
                            g
                        } else {
                            g + 1
                        },
                    )
                }
                None => ("ADDED", 1),
            };
            // HorizontalPodAutoscalers get no generation without a recent feature gate.
            if !list_path.ends_with("/horizontalpodautoscalers") {
                object["metadata"]["generation"] = json!(generation);
            }
            self.put(&list_path, type_, object.clone());
            let stored = self
                .kind(&list_path)
                .items
                .iter()
                .find(|i| same(i))
                .cloned()
                .unwrap();
            return full(StatusCode::OK, stored);
        }
        if let Some(version) = path.strip_prefix("/apis/gateway.networking.k8s.io/") {
            if !version.contains('/') {
                let resources: Vec<Value> = self
                    .discovery
                    .iter()
                    .filter(|(_, _, served)| served.iter().any(|v| v == version))
                    .map(|(plural, kind, _)| {
                        json!({"name": plural, "singularName": "", "namespaced": true, "kind": kind,
                        "verbs": ["get", "list", "watch", "patch"]})
                    })
                    .collect();
                if resources.is_empty() {
                    return not_found(path);
                }
                return full(
                    StatusCode::OK,
                    json!({"kind": "APIResourceList", "apiVersion": "v1",
                        "groupVersion": format!("gateway.networking.k8s.io/{version}"), "resources": resources}),
                );
            }
        }
        if let Some(kind) = self.kinds.get_mut(path) {
            if kind.missing {
                return not_found(path);
            }
            if query.contains("watch=true") {
                let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                kind.watches.push(tx);
                let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
                use futures::StreamExt;
                let body = StreamBody::new(
                    stream.map(|b| Ok::<_, std::io::Error>(hyper::body::Frame::data(b))),
                );
                return Response::new(body.boxed_unsync());
            }
            kind.lists += 1;
            let list = json!({
                "kind": kind.list_kind,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": self.rv.to_string()},
                "items": kind.items,
            });
            return full(StatusCode::OK, list);
        }
        // Status subresources: /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>/status
        if let Some(rest) = path.strip_suffix("/status") {
            let parts: Vec<&str> = rest.split('/').collect();
            let (plural, name) = (parts[parts.len() - 2], parts[parts.len() - 1]);
            // The kind's list path at the same group and version: /apis/<g>/<v>/<plural>.
            let version_path = match rest.split_once("/namespaces/") {
                Some((at, _)) => at.to_owned(),
                // Cluster-scoped: /apis/<g>/<v>/<plural>/<name>.
                None => parts[..parts.len() - 2].join("/"),
            };
            let list_path = format!("{version_path}/{plural}");
            let found = self
                .kinds
                .iter()
                .find(|(p, _)| **p == list_path)
                .and_then(|(_, k)| {
                    k.items
                        .iter()
                        .find(|i| i["metadata"]["name"] == name)
                        .cloned()
                });
            if found.is_none() {
                return not_found(path);
            }
            let rv = self.rv;
            let stored = self
                .kinds
                .get_mut(list_path.as_str())
                .and_then(|k| k.items.iter_mut().find(|i| i["metadata"]["name"] == name))
                .expect("found above");
            // Every stored object has a resourceVersion.
            if stored["metadata"]["resourceVersion"].is_null() {
                stored["metadata"]["resourceVersion"] = json!(rv.to_string());
            }
            let object = stored.clone();
            if method == "PATCH" {
                // A merge patch, with the API server's optimistic concurrency.
                if let Some(expected) = body["metadata"]["resourceVersion"].as_str() {
                    if stored["metadata"]["resourceVersion"].as_str() != Some(expected) {
                        self.conflicts += 1;
                        return full(
                            StatusCode::CONFLICT,
                            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": "the object has been modified; please apply your changes to the latest version and try again",
                                "reason": "Conflict", "code": 409}),
                        );
                    }
                }
                let mut status = body["status"].clone();
                merge(&mut stored["status"], std::mem::take(&mut status));
                stored["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
                let object = stored.clone();
                self.rv += 1;
                self.writes.push((method.to_owned(), path.to_owned(), body));
                return full(StatusCode::OK, object);
            }
            if let Some(parent) = self
                .interleave
                .take_if(|_| list_path.ends_with("/httproutes"))
            {
                let parents = &mut stored["status"]["parents"];
                if !parents.is_array() {
                    *parents = json!([]);
                }
                parents.as_array_mut().unwrap().push(parent);
                stored["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
                self.rv += 1;
            }
            return full(StatusCode::OK, object);
        }
        if path.starts_with("/apis/events.k8s.io/v1/namespaces/") {
            self.writes
                .push((method.to_owned(), path.to_owned(), body.clone()));
            return full(StatusCode::CREATED, body);
        }
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let token = body["spec"]["token"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            self.writes.push((method.to_owned(), path.to_owned(), body));
            let status = match token.as_str() {
                "node-1-token" => {
                    json!({"authenticated": true, "audiences": ["weft-controller"], "user": {
                    "username": "system:serviceaccount:weft-system:weft-node-proxy",
                    "extra": {"authentication.kubernetes.io/node-name": ["node-1"]}}})
                }
                "pod-bound" => {
                    json!({"authenticated": true, "audiences": ["weft-controller"], "user": {
                    "username": "system:serviceaccount:weft-system:weft-node-proxy",
                    "extra": {"authentication.kubernetes.io/pod-name": ["weft-node-proxy-x1"]}}})
                }
                "other-sa" => {
                    json!({"authenticated": true, "audiences": ["weft-controller"], "user": {"username": "system:serviceaccount:demo:waypoint"}})
                }
                "a-person" => {
                    json!({"authenticated": true, "audiences": ["weft-controller"], "user": {"username": "alice@example.com"}})
                }
                _ => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            return full(
                StatusCode::CREATED,
                json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {}, "status": status}),
            );
        }
        if let Some(rest) =
            path.strip_prefix("/apis/coordination.k8s.io/v1/namespaces/weft-system/leases")
        {
            let name = rest.trim_start_matches('/').to_owned();
            let conflict = || {
                full(
                    StatusCode::CONFLICT,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "conflict", "reason": "Conflict", "code": 409}),
                )
            };
            match method {
                "GET" => {
                    return match self.leases.get(&name) {
                        Some(l) => full(StatusCode::OK, l.clone()),
                        None => not_found(path),
                    }
                }
                "POST" => {
                    let name = body["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    if self.leases.contains_key(&name) {
                        return full(
                            StatusCode::CONFLICT,
                            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                "message": "already exists", "reason": "AlreadyExists", "code": 409}),
                        );
                    }
                    self.rv += 1;
                    let mut lease = body;
                    lease["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                    self.leases.insert(name, lease.clone());
                    self.writes
                        .push((method.to_owned(), path.to_owned(), lease.clone()));
                    return full(StatusCode::CREATED, lease);
                }
                "PUT" => {
                    let Some(current) = self.leases.get(&name) else {
                        return not_found(path);
                    };
                    if current["metadata"]["resourceVersion"] != body["metadata"]["resourceVersion"]
                    {
                        return conflict();
                    }
                    self.rv += 1;
                    let mut lease = body;
                    lease["metadata"]["resourceVersion"] = json!(self.rv.to_string());
                    self.leases.insert(name, lease.clone());
                    self.writes
                        .push((method.to_owned(), path.to_owned(), lease.clone()));
                    return full(StatusCode::OK, lease);
                }
                _ => return not_found(path),
            }
        }
        if path == "/apis/authorization.k8s.io/v1/subjectaccessreviews" {
            // Alice may read the debug views; nobody else may.
            let allowed = body["spec"]["user"] == "alice@example.com"
                && body["spec"]["nonResourceAttributes"]["verb"] == "get";
            self.writes.push((method.to_owned(), path.to_owned(), body));
            return full(
                StatusCode::CREATED,
                json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": {},
                    "status": {"allowed": allowed, "reason": if allowed { "" } else { "no RBAC policy matched" }}}),
            );
        }
        if path == "/api/v1/namespaces/weft-system/pods/weft-node-proxy-x1" {
            return full(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "weft-node-proxy-x1", "namespace": "weft-system"},
                    "spec": {"nodeName": "node-2", "containers": [{"name": "node-proxy"}]}}),
            );
        }
        if let Some(name) = path.strip_prefix("/api/v1/namespaces/weft-system/secrets/") {
            return match self.secrets.get(name) {
                Some(s) => full(StatusCode::OK, s.clone()),
                None => not_found(path),
            };
        }
        if path == "/api/v1/namespaces/weft-system/configmaps" && method == "POST" {
            let name = body["metadata"]["name"].as_str().unwrap_or_default();
            self.configmaps.insert(name.to_owned(), body.clone());
            self.writes
                .push((method.to_owned(), path.to_owned(), body.clone()));
            return full(StatusCode::CREATED, body);
        }
        if let Some(name) = path.strip_prefix("/api/v1/namespaces/weft-system/configmaps/") {
            if method == "PUT" {
                self.configmaps.insert(name.to_owned(), body.clone());
                self.writes
                    .push((method.to_owned(), path.to_owned(), body.clone()));
                return full(StatusCode::OK, body);
            }
            return match self.configmaps.get(name) {
                Some(c) => full(StatusCode::OK, c.clone()),
                None => not_found(path),
            };
        }
        if path == "/api/v1/namespaces/weft-system/secrets" && method == "POST" {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            self.secrets.insert(name, body.clone());
            self.writes
                .push((method.to_owned(), path.to_owned(), body.clone()));
            return full(StatusCode::CREATED, body);
        }
        // An object of a listed kind, by name.
        if let Some((list_path, ns, name)) = collection_of(path) {
            if method == "DELETE" && self.kinds.contains_key(list_path.as_str()) {
                self.writes.push((method.to_owned(), path.to_owned(), body));
                let found = self
                    .kind(&list_path)
                    .items
                    .iter()
                    .find(|i| i["metadata"]["namespace"] == ns && i["metadata"]["name"] == name)
                    .cloned();
                return match found {
                    Some(i) => {
                        self.put(&list_path, "DELETED", i.clone());
                        full(StatusCode::OK, i)
                    }
                    None => not_found(path),
                };
            }
            if method == "GET" {
                if let Some(kind) = self.kinds.get(list_path.as_str()) {
                    return match kind
                        .items
                        .iter()
                        .find(|i| i["metadata"]["namespace"] == ns && i["metadata"]["name"] == name)
                    {
                        Some(i) => full(StatusCode::OK, i.clone()),
                        None => not_found(path),
                    };
                }
            }
        }
        not_found(path)
    }
}

/// The collection path, namespace and name of a namespaced object's path.
fn collection_of(path: &str) -> Option<(String, String, String)> {
    let (prefix, rest) = path.split_once("/namespaces/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [ns, plural, name] => Some((
            format!("{prefix}/{plural}"),
            (*ns).to_owned(),
            (*name).to_owned(),
        )),
        _ => None,
    }
}

/// What the tests' deployers run waypoints with, `image` telling them apart.
fn waypoint_settings(image: &str) -> controller::waypoints::Settings {
    controller::waypoints::Settings {
        image: image.into(),
        controller: "weft-controller.weft-system.svc:15012".into(),
        controller_name: "weft-controller.weft-system.svc".into(),
        trust_domain: "cluster.local".into(),
        roots_pem: "ROOTS".into(),
    }
}

/// The Gateway `demo/wp` of class weft-waypoint.
fn waypoint_gateway() -> Arc<gateway_api::gateways::Gateway> {
    Arc::new(
        serde_json::from_value(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": "demo", "uid": "uid-wp"},
            "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}))
        .unwrap(),
    )
}

/// A JSON merge patch (RFC 7386), as the API server applies one.
fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().unwrap();
            for (k, v) in fields {
                if v.is_null() {
                    object.remove(&k);
                } else {
                    merge(object.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

fn client(state: &Arc<Mutex<Fake>>) -> kube::Client {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
    tokio::spawn(Fake::serve(state.clone(), handle));
    kube::Client::new(service, "default")
}

fn pod(name: &str, uid: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "demo", "uid": uid, "labels": {"app": name},
        "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"nodeName": node, "serviceAccountName": "sa", "containers": [{"name": "main"}]},
        "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
}

/// The body of the first PATCH to `path` the scripted API server records (waiting up to
/// 5 s for it).
async fn patched(state: &Arc<Mutex<Fake>>, path: &str) -> Option<Value> {
    for _ in 0..200 {
        let found = state
            .lock()
            .unwrap()
            .writes
            .iter()
            .find(|(m, p, _)| m == "PATCH" && p == path)
            .map(|(_, _, body)| body.clone());
        if found.is_some() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    None
}

/// Waits until the source's snapshot satisfies `ok`.
async fn until(
    source: &KubeSource,
    what: &str,
    ok: impl Fn(&controller::source::Snapshot) -> bool,
) -> controller::source::Snapshot {
    for _ in 0..200 {
        let s = source.snapshot();
        if ok(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: never");
}

#[tokio::test]
async fn lists_watches_relists_and_writes_status() {
    let state = Fake::new();
    {
        let mut f = state.lock().unwrap();
        f.kind("/api/v1/namespaces").items.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo", "labels": {"weft.dev/mesh": "enabled"}}}));
        f.kind("/api/v1/pods")
            .items
            .push(pod("a", "uid-a", "node-1", "10.244.1.2"));
        f.kind("/api/v1/services").items.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "b"}, "ports": [{"port": 80, "targetPort": 8080}]}}));
        // An HTTPRoute with a regular expression that does not compile.
        f.kind("/apis/gateway.networking.k8s.io/v1/httproutes").items.push(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "bad-route", "namespace": "demo", "generation": 4},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                     "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/("}}], "backendRefs": [{"name": "echo", "port": 80}]}]},
            "status": {"parents": [{"controllerName": "example.com/other", "parentRef": {"name": "gw"}, "conditions": []}]}}));
        // An AuthorizationPolicy with a selector operator that does not exist.
        f.kind("/apis/weft.dev/v1alpha1/authorizationpolicies").items.push(json!({"apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "bad-policy", "namespace": "demo", "generation": 2},
            "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "Equals", "values": ["b"]}]}, "action": "DENY", "rules": [{}]}}));
        // TrafficPolicy's CRD is not installed.
        f.kind("/apis/weft.dev/v1alpha1/trafficpolicies").missing = true;
    }
    let kube = client(&state);
    let changed = Arc::new(Notify::new());
    let shutdown = CancellationToken::new();
    let source = KubeSource::start(kube.clone(), changed.clone(), shutdown.clone());

    // Initial lists: ready once every kind is listed or known not to be served.
    let s = until(&source, "initial list", |s| s.ready).await;
    assert_eq!(s.objects.pods.len(), 1);
    assert!(
        s.objects.pods.values().all(|p| p
            .value
            .metadata
            .managed_fields
            .as_ref()
            .is_none_or(Vec::is_empty)),
        "managedFields are dropped"
    );

    // A watch event: pod b added.
    state.lock().unwrap().event(
        "/api/v1/pods",
        "ADDED",
        pod("b", "uid-b", "node-2", "10.244.1.3"),
    );
    let s = until(&source, "watch ADDED", |s| s.objects.pods.len() == 2).await;
    let t = translate(&s.objects, &Settings::default());
    assert!(
        t.entries.keys().any(|k| k.name == "uid-b"),
        "pod b reached the model"
    );

    // The pod watch fails (410 Gone); the watcher lists again and finds what changed
    // meanwhile: a deleted, c added.
    let lists_before = {
        let mut f = state.lock().unwrap();
        let pods = f.kind("/api/v1/pods");
        pods.items = vec![
            pod("b", "uid-b", "node-2", "10.244.1.3"),
            pod("c", "uid-c", "node-1", "10.244.1.4"),
        ];
        let lists = pods.lists;
        f.event(
            "/api/v1/pods",
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}),
        );
        lists
    };
    let s = until(&source, "relist after 410", |s| {
        let names: Vec<&str> = s.objects.pods.keys().map(|n| n.name.as_str()).collect();
        names == ["b", "c"]
    })
    .await;
    assert!(
        state.lock().unwrap().kind("/api/v1/pods").lists > lists_before,
        "the pods were listed again"
    );

    // Status for the invalid route and policy.
    let t = translate(&s.objects, &Settings::default());
    let mut registry = Registry::default();
    let writer = StatusWriter::new(
        kube.clone(),
        controller::metrics::Metrics::new(&mut registry),
    );
    // Another controller writes its own parent on the route between the controller's
    // read and its write.
    state.lock().unwrap().interleave = Some(json!({"controllerName": "example.com/racing",
        "parentRef": {"name": "racing-gw"}, "conditions": []}));
    writer.write(t.statuses.clone());
    let mut writes = Vec::new();
    for _ in 0..200 {
        writes = state.lock().unwrap().writes.clone();
        if writes.iter().filter(|(m, _, _)| m == "PATCH").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let route = writes
        .iter()
        .find(|(m, p, _)| m == "PATCH" && p == "/apis/gateway.networking.k8s.io/v1/namespaces/demo/httproutes/bad-route/status")
        .unwrap_or_else(|| panic!("a status patch for the route: {writes:?}"));
    let parents = route.2["status"]["parents"].as_array().unwrap();
    let controllers: Vec<&str> = parents
        .iter()
        .map(|p| p["controllerName"].as_str().unwrap())
        .collect();
    assert_eq!(
        controllers,
        [
            "example.com/other",
            "example.com/racing",
            "weft.dev/controller"
        ],
        "the other controllers' parents are kept, even one written meanwhile"
    );
    assert!(
        state.lock().unwrap().conflicts >= 1,
        "the racing write made the first patch stale"
    );
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == "weft.dev/controller")
        .unwrap();
    let accepted = ours["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Accepted")
        .unwrap();
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "UnsupportedValue");
    assert_eq!(accepted["observedGeneration"], 4);
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("not a valid regular expression"),
        "{accepted}"
    );
    let policy = writes
        .iter()
        .find(|(m, p, _)| m == "PATCH" && p == "/apis/weft.dev/v1alpha1/namespaces/demo/authorizationpolicies/bad-policy/status")
        .unwrap_or_else(|| panic!("a status patch for the policy: {writes:?}"));
    let condition = &policy.2["status"]["conditions"][0];
    assert_eq!(
        (
            condition["type"].as_str(),
            condition["status"].as_str(),
            condition["reason"].as_str()
        ),
        (Some("Accepted"), Some("False"), Some("Invalid"))
    );
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("spec.selector.matchExpressions[0].operator"),
        "{condition}"
    );
    // Each rejection is an Event on its object, as `kubectl describe` shows it.
    let event = writes
        .iter()
        .find(|(m, p, b)| {
            m == "POST"
                && p == "/apis/events.k8s.io/v1/namespaces/demo/events"
                && b["regarding"]["name"] == "bad-route"
        })
        .unwrap_or_else(|| panic!("an event for the route: {writes:?}"));
    assert_eq!(event.2["type"], "Warning");
    assert_eq!(event.2["reason"], "UnsupportedValue");
    assert_eq!(event.2["regarding"]["kind"], "HTTPRoute");
    assert_eq!(
        event.2["regarding"]["apiVersion"],
        "gateway.networking.k8s.io/v1"
    );
    assert!(
        event.2["note"]
            .as_str()
            .unwrap()
            .contains("not a valid regular expression"),
        "{}",
        event.2
    );
    // Written once: the same statuses again write nothing.
    writer.write(t.statuses.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let patches = state
        .lock()
        .unwrap()
        .writes
        .iter()
        .filter(|(m, _, _)| m == "PATCH")
        .count();
    assert_eq!(patches, 2, "unchanged statuses are not written again");
    // The route leaves the mesh: a status without parents for it (as
    // `translate::routes_left` gives it) removes Weft's parent entry, the other
    // controllers' stay.
    let mut without_route: Vec<_> = t
        .statuses
        .iter()
        .filter(|d| d.object.name != "bad-route")
        .cloned()
        .collect();
    let route = t
        .statuses
        .iter()
        .find(|d| d.object.name == "bad-route")
        .unwrap();
    without_route.push(controller::translate::DesiredStatus {
        object: route.object.clone(),
        generation: route.generation,
        parents: Vec::new(),
    });
    let before = state.lock().unwrap().writes.len();
    writer.write(without_route);
    let mut left = None;
    for _ in 0..200 {
        left = state.lock().unwrap().writes[before..]
            .iter()
            .find(|(m, p, _)| {
                m == "PATCH"
                    && p == "/apis/gateway.networking.k8s.io/v1/namespaces/demo/httproutes/bad-route/status"
            })
            .cloned();
        if left.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let left = left.expect("the route's status written once it left the mesh");
    let controllers: Vec<&str> = left.2["status"]["parents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["controllerName"].as_str().unwrap())
        .collect();
    assert_eq!(controllers, ["example.com/other", "example.com/racing"]);
    shutdown.cancel();
}

#[tokio::test]
async fn token_review_names_the_node_or_the_service_account_and_refuses_other_tokens() {
    let state = Fake::new();
    let reviewer = TokenReviewer::new(
        client(&state),
        "weft-controller".into(),
        "system:serviceaccount:weft-system:weft-node-proxy".into(),
    );
    let caller = reviewer.authenticate("node-1-token").await.unwrap();
    assert_eq!(caller, controller::auth::Caller::Node("node-1".into()));
    // Cached: a second check asks the API server nothing.
    reviewer.authenticate("node-1-token").await.unwrap();
    let reviews = state
        .lock()
        .unwrap()
        .writes
        .iter()
        .filter(|(_, p, _)| p.ends_with("tokenreviews"))
        .count();
    assert_eq!(reviews, 1);
    let sent = state.lock().unwrap().writes[0].2.clone();
    assert_eq!(
        sent["spec"]["audiences"],
        json!(["weft-controller"]),
        "the audience is checked by the API server"
    );
    // A token bound to a pod (older API servers name no node): its pod's node.
    assert_eq!(
        reviewer.authenticate("pod-bound").await.unwrap(),
        controller::auth::Caller::Node("node-2".into())
    );
    // Another service account is a workload, which may ask only for itself.
    assert_eq!(
        reviewer.authenticate("other-sa").await.unwrap(),
        controller::auth::Caller::Workload {
            namespace: "demo".into(),
            service_account: "waypoint".into()
        }
    );
    assert_eq!(
        reviewer.authenticate("a-person").await.unwrap_err().label(),
        "not_node_proxy"
    );
    assert_eq!(
        reviewer.authenticate("garbage").await.unwrap_err().label(),
        "invalid"
    );
}

#[tokio::test]
async fn the_root_is_created_once_in_a_secret() {
    let state = Fake::new();
    let ttl = Duration::from_secs(3600);
    let first =
        controller::kubernetes::root_ca(client(&state), "weft-system", "cluster.local", ttl)
            .await
            .unwrap();
    let created = state
        .lock()
        .unwrap()
        .writes
        .iter()
        .filter(|(m, p, _)| m == "POST" && p.ends_with("/secrets"))
        .count();
    assert_eq!(created, 1);
    let again =
        controller::kubernetes::root_ca(client(&state), "weft-system", "cluster.local", ttl)
            .await
            .unwrap();
    assert_eq!(
        first.bundle(),
        again.bundle(),
        "a restart loads the same root"
    );
    let created = state
        .lock()
        .unwrap()
        .writes
        .iter()
        .filter(|(m, p, _)| m == "POST" && p.ends_with("/secrets"))
        .count();
    assert_eq!(created, 1, "and creates nothing");
}

#[tokio::test]
async fn the_roots_are_published_in_a_configmap_without_the_key() {
    let state = Fake::new();
    let publish = |pem: &'static str| {
        let kube = client(&state);
        async move { controller::kubernetes::publish_roots(kube, "weft-system", pem).await }
    };
    let writes = |state: &Arc<Mutex<Fake>>| -> Vec<(String, String)> {
        let f = state.lock().unwrap();
        f.writes
            .iter()
            .filter(|(_, p, _)| p.contains("/configmaps"))
            .map(|(m, p, _)| (m.clone(), p.clone()))
            .collect()
    };
    publish("ROOT-1").await.unwrap();
    publish("ROOT-1").await.unwrap();
    assert_eq!(
        writes(&state),
        [(
            "POST".to_owned(),
            "/api/v1/namespaces/weft-system/configmaps".to_owned()
        )],
        "created once; the same roots again write nothing"
    );
    publish("ROOT-2").await.unwrap();
    let stored = state.lock().unwrap().configmaps["weft-root-ca"].clone();
    assert_eq!(
        stored["data"],
        json!({"root.pem": "ROOT-2"}),
        "only the roots, no key"
    );
    assert_eq!(
        writes(&state).last().unwrap().0,
        "PUT",
        "other roots are replaced"
    );
}

#[tokio::test]
async fn a_waypoint_gateway_is_deployed_by_server_side_apply_once() {
    let state = Fake::new();
    let deployer =
        controller::waypoints::Deployer::new(client(&state), waypoint_settings("weft:test"));
    let gateway = |class: &str, name: &str| -> Arc<gateway_api::gateways::Gateway> {
        Arc::new(
            serde_json::from_value(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": name, "namespace": "demo", "uid": format!("uid-{name}")},
                "spec": {"gatewayClassName": class, "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}))
            .unwrap(),
        )
    };
    let applies = |state: &Arc<Mutex<Fake>>| -> Vec<(String, Value)> {
        state
            .lock()
            .unwrap()
            .writes
            .iter()
            .filter(|(m, _, _)| m == "PATCH")
            .map(|(_, p, b)| (p.clone(), b.clone()))
            .collect()
    };
    let gateways = vec![
        gateway("weft-waypoint", "wp"),
        gateway("other-class", "edge"),
    ];
    deployer.write(gateways.clone());
    for _ in 0..200 {
        if applies(&state).len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = applies(&state);
    let paths: Vec<&str> = done.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/demo/serviceaccounts/wp",
            "/api/v1/namespaces/demo/configmaps/weft-root-ca",
            "/apis/apps/v1/namespaces/demo/deployments/wp",
            "/api/v1/namespaces/demo/services/wp",
            "/apis/policy/v1/namespaces/demo/poddisruptionbudgets/wp",
        ],
        "the waypoint's objects, and nothing for a Gateway of another class"
    );
    let deployment = &done[2].1;
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["uid"],
        "uid-wp"
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "weft:test"
    );
    // The same Gateways again: nothing is sent again.
    deployer.write(gateways);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(applies(&state).len(), 5);
}

/// A waypoint's Deployment deleted by hand is recreated, and edited by hand is
/// reverted, within 5 s, each with a WaypointRepaired event on its Gateway; a status
/// update (no new generation) is left alone.
#[tokio::test]
async fn a_waypoint_deleted_or_edited_by_hand_is_repaired_within_5_s() {
    let state = Fake::new();
    let deployer =
        controller::waypoints::Deployer::new(client(&state), waypoint_settings("weft:test"));
    let gateway = waypoint_gateway();
    const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/demo/deployments/wp";
    const DEPLOYMENTS: &str = "/apis/apps/v1/deployments";
    let applies = |state: &Arc<Mutex<Fake>>| {
        state
            .lock()
            .unwrap()
            .writes
            .iter()
            .filter(|(m, p, _)| m == "PATCH" && p == DEPLOYMENT)
            .map(|(_, _, b)| b.clone())
            .collect::<Vec<_>>()
    };
    // Waits up to 5 s for the Deployment's `n`th apply.
    let applied = |n: usize| {
        let state = state.clone();
        async move {
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Some(b) = applies(&state).get(n - 1) {
                    return b.clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the Deployment was not applied a {n}th time within 5 s");
        }
    };
    let repaired = |why: &'static str| {
        let state = state.clone();
        async move {
            for _ in 0..200 {
                let found = state.lock().unwrap().writes.iter().any(|(m, p, b)| {
                    (m == "POST" || m == "PATCH")
                        && p.starts_with("/apis/events.k8s.io/v1/namespaces/demo/events")
                        && b["reason"] == "WaypointRepaired"
                        && b["regarding"]["uid"] == "uid-wp"
                        && b["note"].as_str().unwrap_or_default().contains(why)
                });
                if found {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("no WaypointRepaired event saying {why}");
        }
    };
    deployer.write(vec![gateway]);
    applied(1).await;
    // The watches are up (each kind listed and watched).
    for _ in 0..200 {
        if !state.lock().unwrap().kind(DEPLOYMENTS).watches.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Deleted by hand: recreated.
    {
        let mut f = state.lock().unwrap();
        let d = f.kind(DEPLOYMENTS).items[0].clone();
        f.put(DEPLOYMENTS, "DELETED", d);
    }
    let again = applied(2).await;
    assert_eq!(again["spec"]["replicas"], 2);
    repaired("Deployment wp was deleted").await;

    // Edited by hand (a spec change: a new generation): reverted.
    {
        let mut f = state.lock().unwrap();
        let mut d = f.kind(DEPLOYMENTS).items[0].clone();
        d["spec"]["replicas"] = json!(5);
        d["spec"]["template"]["spec"]["containers"][0]["image"] = json!("someone/else:latest");
        d["metadata"]["generation"] = json!(d["metadata"]["generation"].as_i64().unwrap() + 1);
        f.put(DEPLOYMENTS, "MODIFIED", d);
    }
    let reverted = applied(3).await;
    assert_eq!(reverted["spec"]["replicas"], 2);
    assert_eq!(
        reverted["spec"]["template"]["spec"]["containers"][0]["image"],
        "weft:test"
    );
    repaired("Deployment wp was changed").await;

    // Its status updated (same generation): nothing to repair.
    {
        let mut f = state.lock().unwrap();
        let mut d = f.kind(DEPLOYMENTS).items[0].clone();
        d["status"] = json!({"availableReplicas": 2});
        f.put(DEPLOYMENTS, "MODIFIED", d);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(applies(&state).len(), 3, "a status update is not drift");
}

/// A waypoint turned autoscaled keeps the pods it runs (its count is handed over, not
/// dropped to the default of one) and gets a HorizontalPodAutoscaler; the
/// autoscaler's changes to the count are left alone, without a WaypointRepaired event;
/// turned back to a fixed count, its autoscaler is deleted and the count applied.
#[tokio::test]
async fn an_autoscaled_waypoint_is_left_to_its_autoscaler() {
    const DEPLOYMENTS: &str = "/apis/apps/v1/deployments";
    const AUTOSCALER: &str = "/apis/autoscaling/v2/namespaces/demo/horizontalpodautoscalers/wp";
    let state = Fake::new();
    let deployer =
        controller::waypoints::Deployer::new(client(&state), waypoint_settings("weft:test"));
    let parameters = |p: Value| -> Option<controller::crd::WaypointParametersSpec> {
        Some(serde_json::from_value(p).unwrap())
    };
    let replicas = |state: &Arc<Mutex<Fake>>| {
        let mut f = state.lock().unwrap();
        f.kind(DEPLOYMENTS)
            .items
            .first()
            .map(|d| d["spec"]["replicas"].clone())
    };
    let writes = |state: &Arc<Mutex<Fake>>, method: &str, path: &str| {
        state
            .lock()
            .unwrap()
            .writes
            .iter()
            .filter(|(m, p, _)| m == method && p == path)
            .map(|(_, _, b)| b.clone())
            .collect::<Vec<_>>()
    };
    // Waits up to 5 s for `f` to hold.
    let eventually = |what: &'static str, f: Box<dyn Fn() -> bool>| async move {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 5 s: {what}");
    };
    deployer.write_with(vec![(
        waypoint_gateway(),
        parameters(json!({"replicas": 3})),
    )]);
    let s = state.clone();
    eventually(
        "3 replicas",
        Box::new(move || replicas(&s) == Some(json!(3))),
    )
    .await;
    // The watches are up.
    let watched = |state: &Arc<Mutex<Fake>>| {
        let mut f = state.lock().unwrap();
        !f.kind(DEPLOYMENTS).watches.is_empty()
            && !f
                .kind("/apis/autoscaling/v2/horizontalpodautoscalers")
                .watches
                .is_empty()
    };
    let s = state.clone();
    eventually("watched", Box::new(move || watched(&s))).await;

    // Autoscaled: the HPA is applied, the Deployment keeps its 3 pods.
    deployer.write_with(vec![(
        waypoint_gateway(),
        parameters(json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 6}})),
    )]);
    let s = state.clone();
    eventually(
        "the autoscaler applied",
        Box::new(move || !writes(&s, "PATCH", AUTOSCALER).is_empty()),
    )
    .await;
    let hpa = writes(&state, "PATCH", AUTOSCALER)[0].clone();
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "wp");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        (
            hpa["spec"]["minReplicas"].clone(),
            hpa["spec"]["maxReplicas"].clone()
        ),
        (json!(2), json!(6))
    );
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        80
    );
    let deployments = writes(
        &state,
        "PATCH",
        "/apis/apps/v1/namespaces/demo/deployments/wp",
    );
    assert!(
        deployments.last().unwrap()["spec"]["replicas"].is_null(),
        "the controller no longer sets the count"
    );
    assert_eq!(
        replicas(&state),
        Some(json!(3)),
        "the pods running are kept"
    );

    // The autoscaler scales it (an update by another manager, a new generation).
    let applies_before = deployments.len();
    {
        let mut f = state.lock().unwrap();
        let mut d = f.kind(DEPLOYMENTS).items[0].clone();
        d["spec"]["replicas"] = json!(5);
        d["metadata"]["generation"] = json!(d["metadata"]["generation"].as_i64().unwrap() + 1);
        f.replica_owners.insert(
            "/apis/apps/v1/namespaces/demo/deployments/wp".into(),
            ["kube-controller-manager".to_owned()].into(),
        );
        f.put(DEPLOYMENTS, "MODIFIED", d.clone());
        // The Deployment's controller updates its status right after.
        d["status"] = json!({"replicas": 5});
        f.put(DEPLOYMENTS, "MODIFIED", d);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        replicas(&state),
        Some(json!(5)),
        "the autoscaler's count stays"
    );
    let repaired = state.lock().unwrap().writes.iter().any(|(_, p, b)| {
        p.starts_with("/apis/events.k8s.io/") && b["reason"] == "WaypointRepaired"
    });
    assert!(!repaired, "an autoscaler's change is not a repair");
    assert!(
        writes(
            &state,
            "PATCH",
            "/apis/apps/v1/namespaces/demo/deployments/wp"
        )
        .len()
            <= applies_before + 1,
        "applied again at most once, changing nothing"
    );

    // The autoscaler's status changes (no generation, as on most clusters): nothing to
    // apply; its spec edited by hand: applied again, and said so.
    const AUTOSCALERS: &str = "/apis/autoscaling/v2/horizontalpodautoscalers";
    let hpa_applies = writes(&state, "PATCH", AUTOSCALER).len();
    {
        let mut f = state.lock().unwrap();
        let mut h = f.kind(AUTOSCALERS).items[0].clone();
        assert!(h["metadata"]["generation"].is_null());
        h["status"] = json!({"currentReplicas": 5, "desiredReplicas": 5});
        f.put(AUTOSCALERS, "MODIFIED", h);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        writes(&state, "PATCH", AUTOSCALER).len(),
        hpa_applies,
        "a status update is not drift"
    );
    {
        let mut f = state.lock().unwrap();
        let mut h = f.kind(AUTOSCALERS).items[0].clone();
        h["spec"]["maxReplicas"] = json!(50);
        f.put(AUTOSCALERS, "MODIFIED", h);
    }
    let s = state.clone();
    eventually(
        "the autoscaler reverted",
        Box::new(move || {
            s.lock().unwrap().kind(AUTOSCALERS).items[0]["spec"]["maxReplicas"] == json!(6)
        }),
    )
    .await;
    let s = state.clone();
    eventually(
        "the autoscaler's repair reported",
        Box::new(move || {
            s.lock().unwrap().writes.iter().any(|(_, p, b)| {
                p.starts_with("/apis/events.k8s.io/")
                    && b["reason"] == "WaypointRepaired"
                    && b["note"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("HorizontalPodAutoscaler wp was changed")
            })
        }),
    )
    .await;

    // A fixed count again: the autoscaler goes, then the count is applied.
    deployer.write_with(vec![(
        waypoint_gateway(),
        parameters(json!({"replicas": 2})),
    )]);
    let s = state.clone();
    eventually(
        "2 replicas",
        Box::new(move || replicas(&s) == Some(json!(2))),
    )
    .await;
    assert_eq!(
        writes(&state, "DELETE", AUTOSCALER).len(),
        1,
        "the autoscaler is deleted"
    );
    assert!(state
        .lock()
        .unwrap()
        .kind("/apis/autoscaling/v2/horizontalpodautoscalers")
        .items
        .is_empty());
}

/// The status line and body of a GET of `path` on `addr`, with `token` as a bearer
/// token if given.
async fn admin_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// In a cluster, the debug views that name the mesh's objects answer only a caller
/// the API server authenticates (TokenReview) and allows (SubjectAccessReview);
/// health, metrics and the status summary stay open.
#[tokio::test]
async fn debug_views_refuse_an_unauthenticated_or_unauthorized_request() {
    let state = Fake::new();
    let dir = std::env::temp_dir().join(format!(
        "weft-debug-auth-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let ca =
        controller::ca::Ca::from_dir(&dir.join("ca"), "cluster.local", Duration::from_secs(3600))
            .unwrap();
    let mut registry = Registry::default();
    let metrics = controller::metrics::Metrics::new(&mut registry);
    let shutdown = CancellationToken::new();
    let shared = controller::server::Shared::new(
        1,
        Arc::new(ca),
        Arc::new(TokenReviewer::new(
            client(&state),
            "weft-controller".into(),
            "system:serviceaccount:weft-system:weft-node-proxy".into(),
        )),
        metrics,
        shutdown.clone(),
    );
    let admin = Arc::new(controller::admin::Admin {
        shared,
        registry,
        problems: Arc::new(Mutex::new(Vec::new())),
        debug_auth: Some(Arc::new(controller::kubernetes::DebugReviewer::new(
            client(&state),
        ))),
        leading: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(admin.clone().serve(listener, shutdown.clone()));

    for path in controller::admin::PROTECTED {
        let (code, body) = admin_get(addr, path, None).await;
        assert_eq!(code, 401, "{path} without a token: {body}");
        assert!(body.contains("bearer token"), "{body}");
        let (code, _) = admin_get(addr, path, Some("made-up")).await;
        assert_eq!(code, 401, "{path} with a token the API server refuses");
        let (code, body) = admin_get(addr, path, Some("other-sa")).await;
        assert_eq!(code, 403, "{path} for a user RBAC does not allow: {body}");
        assert!(
            body.contains("system:serviceaccount:demo:waypoint may not get"),
            "{body}"
        );
        let (code, body) = admin_get(addr, path, Some("a-person")).await;
        assert_eq!(code, 200, "{path} for a user RBAC allows: {body}");
    }
    for path in ["/healthz", "/metrics", "/debug/status"] {
        assert_eq!(admin_get(addr, path, None).await.0, 200, "{path} is open");
    }
    // What the open summary holds of a subscription names no object and no peer.
    admin.shared.subscribers.lock().unwrap().insert(
        1,
        controller::server::SubscriberStatus {
            node: "node-1".into(),
            peer: Some("10.0.0.1:5000".parse().unwrap()),
            since: 0,
            start: "full",
            sent_version: 3,
            acked_version: 2,
            proxy_version: "0.1.0".into(),
            rejected: 1,
            last_rejection: Some("workload/shop/secret-thing: bad port".into()),
            refused_routes: vec![controller::server::RefusedRoute {
                kind: "http_route",
                name: "shop/secret-route".into(),
                reason: "bad".into(),
            }],
        },
    );
    let (_, open) = admin_get(addr, "/debug/status", None).await;
    assert!(open.contains("\"ackedVersion\": 2"), "{open}");
    assert!(
        !open.contains("secret-thing")
            && !open.contains("secret-route")
            && !open.contains("10.0.0.1"),
        "{open}"
    );
    let (_, full) = admin_get(addr, "/debug/subscribers", Some("a-person")).await;
    assert!(full.contains("secret-thing"), "{full}");
    // What was asked: the path, as a non-resource URL, for the reviewed user.
    let asked: Vec<Value> = state
        .lock()
        .unwrap()
        .writes
        .iter()
        .filter(|(_, p, _)| p.ends_with("/subjectaccessreviews"))
        .map(|(_, _, b)| b["spec"]["nonResourceAttributes"]["path"].clone())
        .collect();
    assert!(asked.contains(&json!("/debug/model")), "{asked:?}");
    shutdown.cancel();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two controller replicas: one Lease holder writes waypoints at a time. Killed (its
/// election aborted, the Lease not given up), the other takes over once the Lease runs
/// out and applies the waypoint itself; a replica that stops gracefully hands over at
/// the next try.
#[tokio::test]
async fn two_replicas_elect_one_writer_and_the_other_takes_over() {
    use controller::leader;
    let state = Fake::new();
    let timing = leader::Timing {
        // Whole seconds: the Lease holds its duration in seconds.
        duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry: Duration::from_millis(100),
    };
    let gateway = waypoint_gateway();
    // Each replica applies with its own image, so the writes tell who wrote.
    let replica = |name: &str, shutdown: &CancellationToken| {
        let (leading, task) = leader::spawn(
            client(&state),
            "weft-system",
            name.to_owned(),
            timing,
            shutdown.clone(),
        );
        let deployer = controller::waypoints::Deployer::with_leader(
            client(&state),
            waypoint_settings(&format!("weft:{name}")),
            leading.clone(),
        );
        deployer.write(vec![gateway.clone()]);
        (leading, task, deployer)
    };
    let writers = |state: &Arc<Mutex<Fake>>| -> Vec<String> {
        state
            .lock()
            .unwrap()
            .writes
            .iter()
            .filter(|(m, p, _)| m == "PATCH" && p == "/apis/apps/v1/namespaces/demo/deployments/wp")
            .map(|(_, _, b)| {
                b["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let holder = |state: &Arc<Mutex<Fake>>| {
        state
            .lock()
            .unwrap()
            .leases
            .get("weft-controller")
            .map(|l| {
                l["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
    };
    // b starts first and leads; a follows; only b writes.
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let (leading_b, _task_b, _deployer_b) = replica("b", &stop_b);
    for _ in 0..100 {
        if leader::is_leading(&leading_b) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (leading_a, task_a, _deployer_a) = replica("a", &stop_a);
    assert_eq!(holder(&state).as_deref(), Some("b"));
    for _ in 0..200 {
        if !writers(&state).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!leader::is_leading(&leading_a), "never two leaders");
    assert_eq!(writers(&state), ["weft:b"], "only the leader applies");

    // b stops gracefully: it gives the Lease up and a takes over at its next try, then
    // applies with its own settings.
    stop_b.cancel();
    let start = std::time::Instant::now();
    while !leader::is_leading(&leading_a) {
        assert!(start.elapsed() < Duration::from_secs(10), "a takes over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // b emptied the Lease's holder rather than leaving it to run out.
    assert!(
        state.lock().unwrap().writes.iter().any(|(m, p, b)| {
            m == "PUT"
                && p.ends_with("/leases/weft-controller")
                && b["spec"]["holderIdentity"].is_null()
        }),
        "b gave the Lease up"
    );
    let start = std::time::Instant::now();
    while writers(&state).last().map(String::as_str) != Some("weft:a") {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a applies once it leads"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // b comes back, as a follower; then a dies.
    let stop_b2 = CancellationToken::new();
    let (leading_b2, _t, _d) = replica("b", &stop_b2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!leader::is_leading(&leading_b2));
    kill_a_then_b_takes_over(&state, task_a, leading_b2, timing, writers, holder).await;
}

async fn kill_a_then_b_takes_over(
    state: &Arc<Mutex<Fake>>,
    task_a: tokio::task::JoinHandle<()>,
    leading_b: controller::leader::Leading,
    timing: controller::leader::Timing,
    writers: impl Fn(&Arc<Mutex<Fake>>) -> Vec<String>,
    holder: impl Fn(&Arc<Mutex<Fake>>) -> Option<String>,
) {
    let before = writers(state).len();
    task_a.abort();
    let killed = std::time::Instant::now();
    while !controller::leader::is_leading(&leading_b) {
        assert!(
            killed.elapsed() < timing.duration + Duration::from_secs(2),
            "b takes over within the lease's duration"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        killed.elapsed() >= timing.duration - Duration::from_millis(200),
        "not before the dead leader's lease ran out ({:?})",
        killed.elapsed()
    );
    assert_eq!(holder(state).as_deref(), Some("b"));
    while writers(state).len() == before {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "b applies once it leads"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(writers(state)[before], "weft:b", "the new leader writes");
}

/// One API call as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    verb: &'static str,
    group: String,
    /// `plural` or `plural/subresource`.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

/// The calls RBAC authorizes for one request: a server-side apply is a patch, and a
/// create when the object is absent.
fn calls(method: &str, path: &str, query: &str) -> Vec<Call> {
    // Discovery (`/apis/<group>/<version>`) is a non-resource URL every authenticated
    // user may read (the default `system:discovery` role): no grant of Weft's.
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if method == "GET" && segments.len() == 3 && segments[0] == "apis" {
        return Vec::new();
    }
    let c = call(method, path, query);
    if method == "PATCH" && query.contains("fieldManager=") {
        let create = Call {
            verb: "create",
            ..c.clone()
        };
        return vec![c, create];
    }
    vec![c]
}

fn call(method: &str, path: &str, query: &str) -> Call {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => ((*group).to_owned(), rest),
        _ => panic!("not an API path: {path}"),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        rest => (None, rest),
    };
    let resource = match rest {
        [plural, _name, sub] => format!("{plural}/{sub}"),
        [plural, ..] => (*plural).to_owned(),
        [] => panic!("no resource in {path}"),
    };
    // As the API server's request info: a list or watch of one name (a field selector
    // on metadata.name) is authorized as that name.
    let named = rest.get(1).is_some();
    let name = rest.get(1).map(|n| (*n).to_owned()).or_else(|| {
        query
            .split('&')
            .find_map(|kv| kv.strip_prefix("fieldSelector=metadata.name%3D"))
            .map(str::to_owned)
    });
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.contains("watch=true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => panic!("unexpected {method} {path}"),
    };
    Call {
        verb,
        group,
        resource,
        namespace,
        name,
    }
}

fn allows(rule: &k8s_openapi::api::rbac::v1::PolicyRule, c: &Call) -> bool {
    let has = |list: &Option<Vec<String>>, x: &str| {
        list.as_ref().is_some_and(|l| l.iter().any(|v| v == x))
    };
    has(&rule.api_groups, &c.group)
        && has(&rule.resources, &c.resource)
        && rule.verbs.iter().any(|v| v == c.verb)
        && match &rule.resource_names {
            None => true,
            Some(names) => c.name.as_ref().is_some_and(|n| names.contains(n)),
        }
}

/// The controller's RBAC in `weftctl install` is exactly what its code calls: every
/// request the scenarios above make is allowed (the namespaced Role only in Weft's
/// namespace), and every verb on every resource the rules grant is used by one.
#[test]
fn the_rbac_rules_are_what_the_code_calls() {
    lists_watches_relists_and_writes_status();
    token_review_names_the_node_or_the_service_account_and_refuses_other_tokens();
    the_root_is_created_once_in_a_secret();
    the_roots_are_published_in_a_configmap_without_the_key();
    a_waypoint_gateway_is_deployed_by_server_side_apply_once();
    a_waypoint_deleted_or_edited_by_hand_is_repaired_within_5_s();
    an_autoscaled_waypoint_is_left_to_its_autoscaler();
    debug_views_refuse_an_unauthenticated_or_unauthorized_request();
    two_replicas_elect_one_writer_and_the_other_takes_over();
    // Every kind served: the source lists and then watches each; the status of a
    // GRPCRoute and a TrafficPolicy (the scenarios above write the other kinds').
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let state = Fake::new();
        {
            let mut f = state.lock().unwrap();
            f.kind("/api/v1/namespaces").items.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}));
            f.kind("/api/v1/services").items.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": "demo"},
                "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "b"}, "ports": [{"port": 80}]}}));
            f.kind("/apis/gateway.networking.k8s.io/v1/grpcroutes").items.push(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
                "metadata": {"name": "rpc", "namespace": "demo", "generation": 1},
                "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]}}));
            f.kind("/apis/weft.dev/v1alpha1/trafficpolicies").items.push(json!({"apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": "tp", "namespace": "demo", "generation": 1},
                "spec": {"targetRef": {"group": "", "kind": "Service", "name": "echo"}}}));
            f.kind("/apis/gateway.networking.k8s.io/v1/gateways").items.push(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                "metadata": {"name": "wp", "namespace": "demo", "uid": "uid-wp", "generation": 1},
                "spec": {"gatewayClassName": "weft-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}));
            f.kinds.insert(
                "/apis/gateway.networking.k8s.io/v1/gatewayclasses",
                Kind {
                    list_kind: "GatewayClassList",
                    api_version: "gateway.networking.k8s.io/v1",
                    items: vec![json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                        "metadata": {"name": "weft-waypoint", "generation": 1},
                        "spec": {"controllerName": "weft.dev/controller"}})],
                    missing: false,
                    watches: Vec::new(),
                    lists: 0,
                },
            );
        }
        let kube = client(&state);
        let shutdown = CancellationToken::new();
        let source = KubeSource::start(kube.clone(), Arc::new(Notify::new()), shutdown.clone());
        let s = until(&source, "initial list", |s| s.ready).await;
        let t = translate(&s.objects, &Settings::default());
        let mut registry = Registry::default();
        let writer = StatusWriter::new(kube, controller::metrics::Metrics::new(&mut registry));
        let mut statuses = t.statuses.clone();
        statuses.extend(controller::translate::gateway_statuses(&s.objects));
        writer.write(statuses.clone());
        // The route refused twice, for two reasons of one kind: two events in a series.
        let refused = |message: &str| controller::translate::DesiredStatus {
            object: controller::objects::ObjectRef {
                kind: controller::objects::ObjectKind::GrpcRoute,
                namespace: Some("demo".into()),
                name: "rpc".into(),
            },
            generation: Some(1),
            parents: vec![(
                Some(json!({"name": "echo"})),
                vec![controller::translate::Condition {
                    type_: "Accepted",
                    status: false,
                    reason: "UnsupportedValue",
                    message: message.into(),
                }],
            )],
        };
        let events = |f: &Fake, method: &str| {
            f.writes
                .iter()
                .filter(|(m, p, _)| m == method && p.contains("/events"))
                .count()
        };
        for message in ["first", "second"] {
            let mut statuses = statuses.clone();
            statuses.push(refused(message));
            writer.write(statuses);
            for _ in 0..200 {
                if events(&state.lock().unwrap(), "POST") >= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        for _ in 0..400 {
            let done = {
                let f = state.lock().unwrap();
                let patched = |plural: &str| {
                    f.writes
                        .iter()
                        .any(|(m, p, _)| m == "PATCH" && p.contains(plural))
                };
                // Every watched kind is watched (GatewayClasses are only read).
                f.kinds
                    .iter()
                    .filter(|(p, _)| !p.ends_with("/gatewayclasses"))
                    .all(|(_, k)| !k.watches.is_empty())
                    && patched("/grpcroutes/")
                    && patched("/trafficpolicies/")
                    && patched("/gateways/")
                    && patched("/gatewayclasses/")
                    && events(&f, "PATCH") >= 1
            };
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        shutdown.cancel();
    });
    let calls: std::collections::BTreeSet<Call> = CALLS
        .lock()
        .unwrap()
        .iter()
        .flat_map(|(m, p, q)| calls(m, p, q))
        .collect();
    let cluster = controller::install::controller_cluster_rules();
    let namespaced = controller::install::controller_namespace_rules();
    let own = |c: &Call| c.namespace.as_deref() == Some("weft-system");
    for c in &calls {
        let ok = cluster.iter().any(|r| allows(r, c))
            || (own(c) && namespaced.iter().any(|r| allows(r, c)));
        assert!(
            ok,
            "the controller calls {c:?}, which its RBAC does not allow"
        );
    }
    for (rules, scope) in [(&cluster, "ClusterRole"), (&namespaced, "Role")] {
        for rule in rules.iter() {
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    for verb in &rule.verbs {
                        let used = calls.iter().any(|c| {
                            &c.group == group
                                && &c.resource == resource
                                && c.verb == verb
                                && allows(rule, c)
                                && (scope == "ClusterRole" || own(c))
                        });
                        assert!(
                            used,
                            "the {scope} grants {verb} on {group}/{resource}, which no code path calls"
                        );
                    }
                }
            }
        }
    }
}

/// What a Gateway API release's CRDs serve: (plural, kind, served versions).
fn release_crds(release: &str) -> Vec<(String, String, Vec<String>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/gateway-api")
        .join(release)
        .join("standard");
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the Gateway API CRDs are read from shared/gateway-api beside the repository",
            dir.display()
        )
    });
    for entry in entries {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let crd: Value = serde_json::to_value(
                <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap(),
            )
            .unwrap();
            if crd["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let served = crd["spec"]["versions"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["served"] == true)
                .map(|v| v["name"].as_str().unwrap().to_owned())
                .collect();
            out.push((
                crd["spec"]["names"]["plural"].as_str().unwrap().to_owned(),
                crd["spec"]["names"]["kind"].as_str().unwrap().to_owned(),
                served,
            ));
        }
    }
    out
}

/// A scripted API server serving `release`'s Gateway API CRDs (discovery and paths at
/// the versions each serves): namespaces a and b, Services a/web and b/api, HTTPRoutes
/// a/to-b (to b/api) and a/future (a filter of no release), and a ReferenceGrant in b
/// letting a's routes reach b's Services.
fn release_fake(release: &str) -> Arc<Mutex<Fake>> {
    const GROUP: &str = "gateway.networking.k8s.io";
    let crds = release_crds(release);
    let grants_at = |v: &str| {
        crds.iter()
            .any(|(plural, _, served)| plural == "referencegrants" && served.iter().any(|s| s == v))
    };
    let state = Fake::new();
    {
        let mut f = state.lock().unwrap();
        // This release's Gateway API paths only, at the versions it serves.
        f.kinds
            .retain(|path, _| !path.starts_with(&format!("/apis/{GROUP}/")));
        for (plural, kind, served) in &crds {
            for version in served {
                f.kinds.insert(
                    Box::leak(format!("/apis/{GROUP}/{version}/{plural}").into_boxed_str()),
                    Kind {
                        list_kind: Box::leak(format!("{kind}List").into_boxed_str()),
                        api_version: Box::leak(format!("{GROUP}/{version}").into_boxed_str()),
                        items: Vec::new(),
                        missing: false,
                        watches: Vec::new(),
                        lists: 0,
                    },
                );
            }
        }
        f.discovery = crds.clone();
        let ns = |name: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"weft.dev/mesh": "enabled"}}});
        f.kind("/api/v1/namespaces")
            .items
            .extend([ns("a"), ns("b")]);
        let svc = |ns: &str, name: &str, ip: &str| {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]}})
        };
        f.kind("/api/v1/services")
            .items
            .extend([svc("a", "web", "10.96.0.10"), svc("b", "api", "10.96.0.11")]);
        let route = |name: &str, filters: Value| {
            json!({"apiVersion": format!("{GROUP}/v1"), "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "a", "uid": format!("uid-{name}"), "generation": 1},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                     "rules": [{"filters": filters, "backendRefs": [{"name": "api", "namespace": "b", "port": 80}]}]}})
        };
        let routes = f.kind(&format!("/apis/{GROUP}/v1/httproutes"));
        routes.items.push(route("to-b", json!([])));
        // A filter type of no release: this route alone is rejected.
        routes.items.push(route(
            "future",
            json!([{"type": "FutureFilter", "futureFilter": {}}]),
        ));
        let version = if grants_at("v1") { "v1" } else { "v1beta1" };
        f.kind(&format!("/apis/{GROUP}/{version}/referencegrants"))
            .items
            .push(json!({
            "apiVersion": format!("{GROUP}/{version}"), "kind": "ReferenceGrant",
            "metadata": {"name": "from-a", "namespace": "b", "uid": "uid-grant"},
            "spec": {"from": [{"group": GROUP, "kind": "HTTPRoute", "namespace": "a"}],
                     "to": [{"group": "", "kind": "Service"}]}}));
    }
    state
}

/// The controller against API servers serving each Gateway API release's CRDs (standard
/// channel), discovery answered from those CRDs: it reads each kind at a version the
/// release serves (ReferenceGrant at v1beta1 before v1.5), so a cross-namespace backend
/// with a ReferenceGrant works on all four; a route with a filter type no release has is
/// rejected alone, naming itself, while the others apply.
#[tokio::test]
async fn every_gateway_api_release_is_read_at_a_version_it_serves() {
    for release in ["v1.2.1", "v1.4.1", "v1.5.1", "v1.6.1"] {
        let crds = release_crds(release);
        let grants_at = |v: &str| {
            crds.iter().any(|(plural, _, served)| {
                plural == "referencegrants" && served.iter().any(|s| s == v)
            })
        };
        assert_eq!(
            grants_at("v1"),
            release >= "v1.5",
            "{release}: ReferenceGrant v1 is served from v1.5 on"
        );
        let state = release_fake(release);
        let kube = client(&state);
        let shutdown = CancellationToken::new();
        let source = KubeSource::start(kube, Arc::new(Notify::new()), shutdown.clone());
        let s = until(&source, release, |s| {
            s.ready && !s.objects.reference_grants.is_empty()
        })
        .await;
        let t = translate(&s.objects, &Settings::default());
        let refused: Vec<String> = t
            .problems
            .iter()
            .chain(&s.problems)
            .map(|p| p.to_string())
            .filter(|p| p.contains("ReferenceGrant"))
            .collect();
        assert!(
            refused.is_empty(),
            "{release}: the grant is read: {refused:?}"
        );
        assert!(
            s.objects
                .http_routes
                .values()
                .any(|r| r.value.metadata.name.as_deref() == Some("to-b")),
            "{release}: the readable route applies"
        );
        let rejected: Vec<String> = s.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            rejected.len() == 1
                && rejected[0].contains("HTTPRoute a/future")
                && rejected[0].contains("FutureFilter"),
            "{release}: the unreadable route alone is rejected, named: {rejected:?}"
        );
        // And gets its status, at its Service parent, as a readable route would.
        assert_eq!(s.statuses.len(), 1, "{release}: {:?}", s.statuses);
        let writer = StatusWriter::new(
            client(&state),
            controller::metrics::Metrics::new(&mut Registry::default()),
        );
        writer.write(s.statuses.clone());
        let path = "/apis/gateway.networking.k8s.io/v1/namespaces/a/httproutes/future/status";
        let written = patched(&state, path).await;
        let body = written.unwrap_or_else(|| panic!("{release}: no status written for a/future"));
        let parent = &body["status"]["parents"][0];
        assert_eq!(parent["parentRef"]["name"], "web", "{body}");
        assert_eq!(parent["controllerName"], "weft.dev/controller", "{body}");
        let accepted = &parent["conditions"][0];
        assert_eq!(accepted["type"], "Accepted");
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "UnsupportedValue");
        assert!(
            accepted["message"]
                .as_str()
                .unwrap_or("")
                .contains("FutureFilter"),
            "{body}"
        );
        shutdown.cancel();
    }
}

/// Gateway API CRDs installed while the controller runs: ReferenceGrant is not served
/// when it starts (the kind counts as empty), then is installed at v1beta1 only (Gateway
/// API v1.4, where the controller first looked for v1): the controller finds it there by
/// discovery again and reads the grant, without a restart.
#[tokio::test]
async fn a_kind_installed_later_at_another_version_is_read_there() {
    const GRANTS: &str = "/apis/gateway.networking.k8s.io/v1beta1/referencegrants";
    let state = release_fake("v1.4.1");
    let (grants, discovered) = {
        let mut f = state.lock().unwrap();
        let grants = f
            .kinds
            .remove(GRANTS)
            .expect("v1.4.1 serves grants at v1beta1");
        let at = f
            .discovery
            .iter()
            .position(|(plural, _, _)| plural == "referencegrants")
            .expect("in discovery");
        (grants, f.discovery.remove(at))
    };
    let shutdown = CancellationToken::new();
    let source = KubeSource::start(client(&state), Arc::new(Notify::new()), shutdown.clone());
    let s = until(&source, "ready without grants", |s| s.ready).await;
    assert!(s.objects.reference_grants.is_empty());
    {
        let mut f = state.lock().unwrap();
        f.kinds.insert(GRANTS, grants);
        f.discovery.push(discovered);
    }
    let mut found = false;
    for _ in 0..150 {
        if !source.snapshot().objects.reference_grants.is_empty() {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(found, "the grant installed later is read");
    shutdown.cancel();
}

/// A waypoint Gateway's status: Accepted, and Programmed once a waypoint pod is ready,
/// written to its status subresource (as Gateway API asks of the Gateway's controller).
#[tokio::test]
async fn a_waypoint_gateway_is_accepted_then_programmed_once_its_pod_is_ready() {
    const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/gateways";
    let state = release_fake("v1.6.1");
    state.lock().unwrap().kind(GATEWAYS).items.push(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": "a", "uid": "uid-wp", "generation": 3},
        "spec": {"gatewayClassName": "weft-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}));
    let shutdown = CancellationToken::new();
    let source = KubeSource::start(client(&state), Arc::new(Notify::new()), shutdown.clone());
    let s = until(&source, "the gateway", |s| {
        s.ready && !s.objects.gateways.is_empty()
    })
    .await;
    let conditions = |statuses: &[controller::translate::DesiredStatus]| {
        statuses[0].parents[0]
            .1
            .iter()
            .map(|c| (c.type_, c.status, c.reason))
            .collect::<Vec<_>>()
    };
    let pending = controller::translate::gateway_statuses(&s.objects);
    assert_eq!(
        conditions(&pending),
        [
            ("Accepted", true, "Accepted"),
            ("Programmed", false, "Pending")
        ]
    );
    // Its pod becomes ready.
    state.lock().unwrap().event(
        "/api/v1/pods",
        "ADDED",
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "wp-7d9f-abcde", "namespace": "a", "uid": "uid-wp-pod",
                         "labels": {"gateway.networking.k8s.io/gateway-name": "wp"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "waypoint"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.9",
                       "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    let s = until(&source, "the pod", |s| !s.objects.pods.is_empty()).await;
    let programmed = controller::translate::gateway_statuses(&s.objects);
    assert_eq!(
        conditions(&programmed),
        [
            ("Accepted", true, "Accepted"),
            ("Programmed", true, "Programmed")
        ]
    );
    let writer = StatusWriter::new(
        client(&state),
        controller::metrics::Metrics::new(&mut Registry::default()),
    );
    writer.write(programmed);
    let path = "/apis/gateway.networking.k8s.io/v1/namespaces/a/gateways/wp/status";
    let written = patched(&state, path).await;
    let body = written.expect("the Gateway's status is written");
    let conditions = body["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 2, "{body}");
    assert!(
        conditions.iter().any(|c| c["type"] == "Programmed"
            && c["status"] == "True"
            && c["observedGeneration"] == 3),
        "{body}"
    );
    // Each listener's status, as the spec requires of a Gateway's controller.
    let listener = &body["status"]["listeners"][0];
    assert_eq!(listener["name"], "mesh", "{body}");
    assert_eq!(listener["attachedRoutes"], 0, "{body}");
    assert!(listener["supportedKinds"].is_array(), "{body}");
    let types: Vec<&str> = listener["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert_eq!(types, ["Accepted", "Programmed", "ResolvedRefs"], "{body}");
    // The Gateway with that status is what Gateway API's CRD (schema and rules) accepts.
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/gateway-api/v1.6.1/standard/gateway.networking.k8s.io_gateways.yaml");
    let crd: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut gateway = state.lock().unwrap().kind(GATEWAYS).items[0].clone();
    gateway["status"] = body["status"].clone();
    let violations = crdcheck::Crd::new(&crd).unwrap().check(&gateway);
    assert!(violations.is_empty(), "{violations:?}");
    shutdown.cancel();
}

/// The controller keeps its GatewayClass Accepted, naming the Gateway API releases it
/// reads, for the class's current generation.
#[tokio::test]
async fn the_waypoint_gateway_class_is_accepted() {
    const CLASSES: &str = "/apis/gateway.networking.k8s.io/v1/gatewayclasses";
    let state = release_fake("v1.6.1");
    state.lock().unwrap().kinds.insert(
        CLASSES,
        Kind {
            list_kind: "GatewayClassList",
            api_version: "gateway.networking.k8s.io/v1",
            items: vec![json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                "metadata": {"name": "weft-waypoint", "uid": "uid-class", "generation": 2},
                "spec": {"controllerName": "weft.dev/controller"}})],
            missing: false,
            watches: Vec::new(),
            lists: 0,
        },
    );
    let _writer = StatusWriter::new(
        client(&state),
        controller::metrics::Metrics::new(&mut Registry::default()),
    );
    let path = format!("{CLASSES}/weft-waypoint/status");
    let written = patched(&state, &path).await;
    let body = written.expect("the GatewayClass's status is written");
    let accepted = &body["status"]["conditions"][0];
    assert_eq!(accepted["type"], "Accepted", "{body}");
    assert_eq!(accepted["status"], "True", "{body}");
    assert_eq!(accepted["observedGeneration"], 2, "{body}");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap_or("")
            .contains("v1.2 to v1.6"),
        "{body}"
    );
}

//! The API-server side: one reflector per kind feeding the same translation as the
//! manifest source, the root kept in a Secret (its certificates published in a
//! ConfigMap for node-proxies), node-proxy tokens checked with TokenReview, and status
//! conditions written back on the objects.
//!
//! ```text
//!  watch per kind --(strip managedFields)--> reflector store --notify--> translate
//!  a kind whose CRD is not installed counts as empty (retried with backoff)
//!  DesiredStatus (changed only) --> PATCH .../status (merge at the resourceVersion read,
//!      again on 409: other controllers' parents kept) --> Event if something is refused
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::ByteString;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt as _};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tunnel::identity::CertificateAuthority;

use crate::auth::{AuthError, Authenticator, Caller};
use crate::ca::{Ca, CaSetupError};
use crate::crd::{AuthorizationPolicy, TrafficPolicy, WaypointParameters};
use crate::metrics::Metrics;
use crate::objects::{AnyObject, Effect, ObjectKind, ObjectRef, Objects, Origin, Problem};
use crate::source::{Snapshot, Source};
use crate::translate::{DesiredStatus, CONTROLLER_NAME};

/// The Secret the root is kept in.
pub const ROOT_SECRET: &str = "weft-root-ca";
/// The ConfigMap the roots (certificates only, no key) are published in, beside the
/// Secret: node-proxies mount it to trust the controller with, and so never see the key.
pub const ROOTS_CONFIGMAP: &str = "weft-root-ca";
/// The ConfigMap's key holding the roots (PEM).
pub const ROOTS_KEY: &str = "root.pem";

/// One kind's reflector.
struct Kind<K: Resource + 'static>
where
    K::DynamicType: Hash + Eq + Clone,
{
    store: Store<K>,
    /// Listed at least once, or known not to be served (CRD not installed).
    ready: Arc<AtomicBool>,
}

fn reflect<K>(
    client: &Client,
    kind: ObjectKind,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) -> Kind<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Hash + Eq + Clone + Send + Sync,
{
    let api: Api<K> = Api::all(client.clone());
    let (store, writer) = reflector::store::<K>();
    let ready = Arc::new(AtomicBool::new(false));
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        // managedFields are most of a big object's size and nothing reads them.
        .modify(|o: &mut K| o.managed_fields_mut().clear());
    let stream = reflector::reflector(writer, stream);
    let not_served = Arc::new(AtomicBool::new(false));
    tokio::spawn(follow(
        stream,
        kind,
        ready.clone(),
        changed,
        shutdown,
        not_served,
    ));
    Kind { store, ready }
}

/// Drives a kind's reflector stream until `shutdown`: `ready` once listed (or known not
/// to be served), `changed` notified on every event.
async fn follow<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    kind: ObjectKind,
    flag: Arc<AtomicBool>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
    not_served: Arc<AtomicBool>,
) {
    {
        tokio::pin!(stream);
        let mut absent_logged = false;
        loop {
            let event = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                None => return,
                Some(Ok(watcher::Event::InitDone)) => {
                    not_served.store(false, Ordering::SeqCst);
                    flag.store(true, Ordering::SeqCst);
                    changed.notify_one();
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                Some(Ok(_)) => changed.notify_one(),
                Some(Err(e)) => {
                    let missing = matches!(&e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.is_not_found());
                    if missing {
                        // The kind's CRD is not installed: nothing of it exists.
                        not_served.store(true, Ordering::SeqCst);
                        if !absent_logged {
                            warn!("{} is not served by the API server (CRD not installed?); treating it as empty", kind.kind());
                            absent_logged = true;
                        }
                        if !flag.swap(true, Ordering::SeqCst) {
                            changed.notify_one();
                        }
                    } else {
                        warn!("watching {}: {e}; retrying", kind.kind());
                    }
                }
            }
        }
    }
}

/// A Gateway API kind, read as raw objects at the version the cluster serves and decoded
/// one by one: an object the controller cannot read (a field or enum value of a newer
/// release, from any implementation) is rejected alone, as a problem naming it, and
/// never stops the list or the watch.
struct Raw {
    kind: ObjectKind,
    /// Replaced when the kind is read at another version.
    store: Arc<arc_swap::ArcSwap<Store<DynamicObject>>>,
    /// Listed at least once, or known not to be served (CRD not installed).
    ready: Arc<AtomicBool>,
    /// By UID: the resourceVersion last decoded, and what that gave.
    decoded: Mutex<HashMap<String, Decoded>>,
}

/// An object as decoded at one resourceVersion.
type Decoded = (String, Result<AnyObject, Box<Problem>>);

/// The plural (the resource's path segment) of a Gateway API kind.
fn plural(kind: ObjectKind) -> &'static str {
    match kind {
        ObjectKind::Gateway => "gateways",
        ObjectKind::HttpRoute => "httproutes",
        ObjectKind::GrpcRoute => "grpcroutes",
        _ => "referencegrants",
    }
}

/// The versions a kind is read at, the newest first.
fn preferred_versions(kind: ObjectKind) -> Vec<&'static str> {
    let mut versions = kind.versions().to_vec();
    versions.sort_by_key(|v| match *v {
        "v1" => 0,
        "v1beta1" => 1,
        _ => 2,
    });
    versions
}

/// The newest version of `kind` the API server serves, by discovery. `None` when it
/// serves none (its CRD is not installed). Retried while the API server cannot answer.
async fn served_version(
    client: &Client,
    kind: ObjectKind,
    shutdown: &CancellationToken,
) -> Option<&'static str> {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut unanswered = None;
        for version in preferred_versions(kind) {
            let group_version = format!("{}/{version}", kind.group());
            match client.list_api_group_resources(&group_version).await {
                Ok(list) if list.resources.iter().any(|r| r.name == plural(kind)) => {
                    return Some(version)
                }
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_not_found() => {}
                Err(e) => unanswered = Some(e),
            }
        }
        let e = unanswered?;
        warn!(
            "cannot discover which version of {} the API server serves: {e}; retrying",
            kind.kind()
        );
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// How often a kind the API server does not serve (at the version it is read at) is
/// looked up again: CRDs installed or upgraded while the controller runs are picked up.
const REDISCOVER_EVERY: Duration = Duration::from_secs(10);

/// Returns, once the kind is not served at `at` (`not_served`), the other version
/// discovery then finds it served at; pending otherwise (and on shutdown).
async fn rediscover(
    client: &Client,
    kind: ObjectKind,
    at: &'static str,
    not_served: &AtomicBool,
    shutdown: &CancellationToken,
) -> &'static str {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => std::future::pending::<()>().await,
            _ = tokio::time::sleep(REDISCOVER_EVERY) => {}
        }
        if !not_served.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(found) = served_version(client, kind, shutdown).await {
            if found != at {
                return found;
            }
        }
    }
}

fn reflect_raw(
    client: &Client,
    kind: ObjectKind,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) -> Raw {
    let resource = move |version: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(kind.group(), version, kind.kind()),
            plural(kind),
        )
    };
    let preferred = preferred_versions(kind)[0];
    let writer = reflector::store::Writer::<DynamicObject>::new(resource(preferred));
    let store = Arc::new(arc_swap::ArcSwap::from_pointee(writer.as_reader()));
    let ready = Arc::new(AtomicBool::new(false));
    let client = client.clone();
    let flag = ready.clone();
    let stores = store.clone();
    tokio::spawn(async move {
        let mut version = served_version(&client, kind, &shutdown).await;
        let mut writer = Some(writer);
        loop {
            let at = match version {
                Some(v) => {
                    info!(
                        "reading {} at {}/{v}, the version the API server serves",
                        kind.kind(),
                        kind.group()
                    );
                    v
                }
                // Not served: the watch finds it missing and the kind counts as empty.
                None => preferred,
            };
            let writer = match (writer.take(), at == preferred) {
                (Some(w), true) => w,
                _ => {
                    let w = reflector::store::Writer::<DynamicObject>::new(resource(at));
                    stores.store(Arc::new(w.as_reader()));
                    w
                }
            };
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource(at));
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(|o: &mut DynamicObject| o.managed_fields_mut().clear());
            let stream = reflector::reflector(writer, stream);
            let not_served = Arc::new(AtomicBool::new(false));
            let followed = follow(
                stream,
                kind,
                flag.clone(),
                changed.clone(),
                shutdown.clone(),
                not_served.clone(),
            );
            tokio::select! {
                () = followed => return,
                found = rediscover(&client, kind, at, &not_served, &shutdown) => {
                    info!(
                        "{} is now served at {}/{found} (its CRDs changed); reading it there",
                        kind.kind(),
                        kind.group()
                    );
                    version = Some(found);
                }
            }
        }
    });
    Raw {
        kind,
        store,
        ready,
        decoded: Mutex::new(HashMap::new()),
    }
}

impl Raw {
    /// Every object, decoded (once per resourceVersion): the readable ones into
    /// `objects`, the others as problems, and for an unreadable route its status.
    fn add_to(
        &self,
        objects: &mut Objects,
        problems: &mut Vec<Problem>,
        statuses: &mut Vec<DesiredStatus>,
    ) {
        let mut decoded = self
            .decoded
            .lock()
            .expect("decode cache lock is never poisoned");
        let mut seen = std::collections::HashSet::new();
        for raw in self.store.load().state() {
            // Keyed by name and UID: an object recreated under its name is decoded anew.
            let uid = format!(
                "{}/{}/{}",
                raw.metadata.namespace.as_deref().unwrap_or_default(),
                raw.metadata.name.as_deref().unwrap_or_default(),
                raw.metadata.uid.as_deref().unwrap_or_default()
            );
            let version = raw.metadata.resource_version.clone().unwrap_or_default();
            seen.insert(uid.clone());
            let entry = decoded
                .entry(uid)
                .and_modify(|e| {
                    if e.0 != version {
                        *e = (version.clone(), decode(self.kind, &raw));
                    }
                })
                .or_insert_with(|| (version.clone(), decode(self.kind, &raw)));
            match &entry.1 {
                Ok(object) => {
                    let _ = objects.insert(object.clone(), Origin::Cluster, true);
                }
                Err(problem) => {
                    if let Some(status) = unreadable_route_status(&raw, problem) {
                        statuses.push(status);
                    }
                    problems.push((**problem).clone());
                }
            }
        }
        decoded.retain(|uid, _| seen.contains(uid));
    }
}

/// The status of a route the controller cannot read: Accepted=False with reason
/// UnsupportedValue at each of its Service parents (the mesh's, GAMMA), naming why; `None`
/// for other kinds, or a route with no Service parent (another implementation's).
fn unreadable_route_status(raw: &DynamicObject, problem: &Problem) -> Option<DesiredStatus> {
    let kind = problem.object.as_ref()?.kind;
    if !matches!(kind, ObjectKind::HttpRoute | ObjectKind::GrpcRoute) {
        return None;
    }
    let parents: Vec<serde_json::Value> = raw.data["spec"]["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["group"].as_str().unwrap_or("").is_empty() && p["kind"].as_str() == Some("Service")
        })
        .cloned()
        .collect();
    if parents.is_empty() {
        return None;
    }
    let condition = crate::translate::Condition {
        type_: "Accepted",
        status: false,
        reason: "UnsupportedValue",
        message: problem.reason.clone(),
    };
    Some(DesiredStatus {
        object: problem.object.clone()?,
        generation: raw.metadata.generation,
        parents: parents
            .into_iter()
            .map(|p| (Some(p), vec![condition.clone()]))
            .collect(),
    })
}

/// One object of `kind` as its Rust type, or the problem saying why it cannot be.
fn decode(kind: ObjectKind, raw: &DynamicObject) -> Result<AnyObject, Box<Problem>> {
    let reference = ObjectRef {
        kind,
        namespace: raw.metadata.namespace.clone(),
        name: raw.metadata.name.clone().unwrap_or_default(),
    };
    serde_yaml_ng::to_value(raw)
        .map_err(|e| e.to_string())
        .and_then(|value| crate::manifests::decode(kind, value).map_err(|e| e.to_string()))
        .map_err(|reason| {
            Box::new(Problem {
            object: Some(reference),
            origin: Origin::Cluster,
            field: String::new(),
            reason: format!(
                "cannot be read: {reason} (a field or value of a newer Gateway API release than Weft reads?); this object is ignored, the others apply"
            ),
            effect: Effect::Rejected,
            condition_reason: "UnsupportedValue",
        })
        })
}

/// Every kind's reflector, as a [`Source`].
pub struct KubeSource {
    namespaces: Kind<Namespace>,
    pods: Kind<Pod>,
    services: Kind<Service>,
    endpoint_slices: Kind<EndpointSlice>,
    gateways: Raw,
    http_routes: Raw,
    grpc_routes: Raw,
    reference_grants: Raw,
    authorization_policies: Kind<AuthorizationPolicy>,
    traffic_policies: Kind<TrafficPolicy>,
    waypoint_parameters: Kind<WaypointParameters>,
}

impl KubeSource {
    /// Starts watching every kind; `changed` is notified on every event.
    pub fn start(client: Client, changed: Arc<Notify>, shutdown: CancellationToken) -> Arc<Self> {
        let (c, n, s) = (&client, changed, shutdown);
        Arc::new(KubeSource {
            namespaces: reflect(c, ObjectKind::Namespace, n.clone(), s.clone()),
            pods: reflect(c, ObjectKind::Pod, n.clone(), s.clone()),
            services: reflect(c, ObjectKind::Service, n.clone(), s.clone()),
            endpoint_slices: reflect(c, ObjectKind::EndpointSlice, n.clone(), s.clone()),
            gateways: reflect_raw(c, ObjectKind::Gateway, n.clone(), s.clone()),
            http_routes: reflect_raw(c, ObjectKind::HttpRoute, n.clone(), s.clone()),
            grpc_routes: reflect_raw(c, ObjectKind::GrpcRoute, n.clone(), s.clone()),
            reference_grants: reflect_raw(c, ObjectKind::ReferenceGrant, n.clone(), s.clone()),
            authorization_policies: reflect(
                c,
                ObjectKind::AuthorizationPolicy,
                n.clone(),
                s.clone(),
            ),
            traffic_policies: reflect(c, ObjectKind::TrafficPolicy, n.clone(), s.clone()),
            waypoint_parameters: reflect(c, ObjectKind::WaypointParameters, n, s),
        })
    }

    fn ready(&self) -> bool {
        [
            &self.namespaces.ready,
            &self.pods.ready,
            &self.services.ready,
            &self.endpoint_slices.ready,
            &self.gateways.ready,
            &self.http_routes.ready,
            &self.grpc_routes.ready,
            &self.reference_grants.ready,
            &self.authorization_policies.ready,
            &self.traffic_policies.ready,
            &self.waypoint_parameters.ready,
        ]
        .iter()
        .all(|r| r.load(Ordering::SeqCst))
    }
}

impl Source for KubeSource {
    fn snapshot(&self) -> Snapshot {
        let mut objects = Objects::default();
        fn add<K: Resource + Clone + 'static>(
            objects: &mut Objects,
            store: &Store<K>,
            wrap: fn(Arc<K>) -> AnyObject,
        ) where
            K::DynamicType: Hash + Eq + Clone,
        {
            for o in store.state() {
                let _ = objects.insert(wrap(o), Origin::Cluster, true);
            }
        }
        add(&mut objects, &self.namespaces.store, AnyObject::Namespace);
        add(&mut objects, &self.pods.store, AnyObject::Pod);
        add(&mut objects, &self.services.store, AnyObject::Service);
        add(
            &mut objects,
            &self.endpoint_slices.store,
            AnyObject::EndpointSlice,
        );
        let mut problems = Vec::new();
        let mut statuses = Vec::new();
        for raw in [
            &self.gateways,
            &self.http_routes,
            &self.grpc_routes,
            &self.reference_grants,
        ] {
            raw.add_to(&mut objects, &mut problems, &mut statuses);
        }
        add(
            &mut objects,
            &self.authorization_policies.store,
            AnyObject::AuthorizationPolicy,
        );
        add(
            &mut objects,
            &self.traffic_policies.store,
            AnyObject::TrafficPolicy,
        );
        add(
            &mut objects,
            &self.waypoint_parameters.store,
            AnyObject::WaypointParameters,
        );
        Snapshot {
            objects: Arc::new(objects),
            problems,
            ready: self.ready(),
            statuses,
        }
    }
}

/// The mesh root from the Secret `ROOT_SECRET` in `namespace`, created there on
/// first start. Two controllers starting at once agree: the one whose create loses
/// reads the winner's.
pub async fn root_ca(
    client: Client,
    namespace: &str,
    trust_domain: &str,
    leaf_ttl: Duration,
) -> Result<Ca, CaSetupError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let name = format!("{namespace}/{ROOT_SECRET}");
    let fail = |reason: String| CaSetupError::Secret {
        name: name.clone(),
        reason,
    };
    let load = |secret: &Secret| -> Result<Ca, CaSetupError> {
        let data = secret.data.clone().unwrap_or_default();
        let field = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
                .ok_or_else(|| fail(format!("has no {k}")))
        };
        let authority = CertificateAuthority::from_pem(&field("ca.crt")?, &field("ca.key")?)
            .map_err(|e| fail(e.to_string()))?;
        Ok(Ca::new(authority, Vec::new(), trust_domain, leaf_ttl))
    };
    if let Some(s) = api
        .get_opt(ROOT_SECRET)
        .await
        .map_err(|e| fail(e.to_string()))?
    {
        info!("mesh root loaded from Secret {name}");
        return load(&s);
    }
    let authority =
        CertificateAuthority::self_signed(trust_domain).map_err(|e| fail(e.to_string()))?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(ROOT_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                "ca.crt".to_owned(),
                ByteString(authority.cert_pem().into_bytes()),
            ),
            (
                "ca.key".to_owned(),
                ByteString(authority.key_pem().as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!("mesh root created in Secret {name}");
            Ok(Ca::new(authority, Vec::new(), trust_domain, leaf_ttl))
        }
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            let s = api
                .get(ROOT_SECRET)
                .await
                .map_err(|e| fail(e.to_string()))?;
            load(&s)
        }
        Err(e) => Err(fail(e.to_string())),
    }
}

/// Publishes `roots_pem` (the roots proxies trust, public) in the ConfigMap
/// `ROOTS_CONFIGMAP` of `namespace`: created if absent, replaced if it holds other roots,
/// left alone if it is current.
pub async fn publish_roots(
    client: Client,
    namespace: &str,
    roots_pem: &str,
) -> Result<(), CaSetupError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let name = format!("{namespace}/{ROOTS_CONFIGMAP}");
    let fail = |reason: String| CaSetupError::RootsConfigMap {
        name: name.clone(),
        reason,
    };
    let data = BTreeMap::from([(ROOTS_KEY.to_owned(), roots_pem.to_owned())]);
    let wanted = |metadata: kube::api::ObjectMeta| ConfigMap {
        metadata,
        data: Some(data.clone()),
        ..Default::default()
    };
    // Two tries: a create that loses to another replica's is followed by a replace.
    for _ in 0..2 {
        match api
            .get_opt(ROOTS_CONFIGMAP)
            .await
            .map_err(|e| fail(e.to_string()))?
        {
            Some(current) if current.data.as_ref() == Some(&data) => return Ok(()),
            Some(current) => {
                // The resourceVersion makes the replace fail rather than overwrite a
                // concurrent change; the next try reads it.
                match api
                    .replace(
                        ROOTS_CONFIGMAP,
                        &PostParams::default(),
                        &wanted(current.metadata),
                    )
                    .await
                {
                    Ok(_) => {
                        info!("mesh roots published in ConfigMap {name}");
                        return Ok(());
                    }
                    Err(kube::Error::Api(s)) if s.is_conflict() => continue,
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
            None => {
                let metadata = kube::api::ObjectMeta {
                    name: Some(ROOTS_CONFIGMAP.into()),
                    namespace: Some(namespace.into()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &wanted(metadata)).await {
                    Ok(_) => {
                        info!("mesh roots published in ConfigMap {name}");
                        return Ok(());
                    }
                    Err(kube::Error::Api(s)) if s.is_already_exists() => continue,
                    Err(e) => return Err(fail(e.to_string())),
                }
            }
        }
    }
    Err(fail(
        "it kept changing while being written; is another controller with other roots running?"
            .into(),
    ))
}

/// Node-proxy tokens checked with TokenReview. The node comes from the token's
/// bound node name, or from the pod it is bound to. Results are kept for a minute so a
/// reconnect storm does not become a TokenReview storm.
pub struct TokenReviewer {
    client: Client,
    audience: String,
    username: String,
    cache: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
    /// Reviews in flight at once ([`REVIEWS_AT_ONCE`]).
    reviews: tokio::sync::Semaphore,
}

const REVIEW_CACHE: Duration = Duration::from_secs(60);
/// TokenReviews sent to the API server at once. Only valid tokens are cached, so a
/// caller presenting made-up tokens costs a review each: past this many they queue,
/// and the API server sees a bounded load whatever the callers do.
const REVIEWS_AT_ONCE: usize = 8;

impl TokenReviewer {
    /// A reviewer expecting tokens of `username` (`system:serviceaccount:<ns>:<sa>`)
    /// for `audience`.
    pub fn new(client: Client, audience: String, username: String) -> Self {
        TokenReviewer {
            client,
            audience,
            username,
            cache: Mutex::new(HashMap::new()),
            reviews: tokio::sync::Semaphore::new(REVIEWS_AT_ONCE),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let done = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Invalid(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if let Some(auds) = &status.audiences {
            if !auds.contains(&self.audience) {
                return Err(AuthError::Invalid(format!(
                    "the token is not for audience {}",
                    self.audience
                )));
            }
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            // Another service account: a workload (a waypoint) asking for itself.
            let mut parts = username.splitn(4, ':');
            return match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("system"), Some("serviceaccount"), Some(ns), Some(sa)) => {
                    Ok(Caller::Workload {
                        namespace: ns.to_owned(),
                        service_account: sa.to_owned(),
                    })
                }
                _ => Err(AuthError::NotNodeProxy(format!(
                    "it belongs to {username}, not {} or another service account",
                    self.username
                ))),
            };
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        if let Some(node) = first("authentication.kubernetes.io/node-name") {
            return Ok(Caller::Node(node));
        }
        let Some(pod) = first("authentication.kubernetes.io/pod-name") else {
            return Err(AuthError::NotNodeProxy(
                "it is not bound to a pod; use a projected service-account token".into(),
            ));
        };
        let namespace = username.split(':').nth(2).unwrap_or_default().to_owned();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let pod = pods.get(&pod).await.map_err(|e| {
            AuthError::Unavailable(format!("cannot read pod {namespace}/{pod}: {e}"))
        })?;
        let node = pod
            .spec
            .and_then(|s| s.node_name)
            .ok_or_else(|| AuthError::NotNodeProxy("its pod is not scheduled on a node".into()))?;
        Ok(Caller::Node(node))
    }
}

fn token_hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let hash = token_hash(token);
            {
                let cache = self
                    .cache
                    .lock()
                    .expect("review cache lock is never poisoned");
                if let Some((caller, at)) = cache.get(&hash) {
                    if at.elapsed() < REVIEW_CACHE {
                        return Ok(caller.clone());
                    }
                }
            }
            let caller = {
                let _turn = self.reviews.acquire().await.map_err(|_| {
                    AuthError::Unavailable("the controller is shutting down".into())
                })?;
                self.review(token).await?
            };
            let mut cache = self
                .cache
                .lock()
                .expect("review cache lock is never poisoned");
            cache.retain(|_, (_, at)| at.elapsed() < REVIEW_CACHE);
            cache.insert(hash, (caller.clone(), Instant::now()));
            Ok(caller)
        })
    }
}

/// Authorizes the admin endpoint's protected debug views in a cluster: the bearer
/// token is reviewed (TokenReview, the API server's own audiences), then the user is
/// asked about (SubjectAccessReview: `get` on the path as a non-resource URL). Only
/// allowed answers are cached, for a minute, and reviews in flight are bounded.
pub struct DebugReviewer {
    client: Client,
    cache: Mutex<HashMap<([u8; 32], String), Instant>>,
    reviews: tokio::sync::Semaphore,
}

impl DebugReviewer {
    /// A reviewer asking `client`'s API server.
    pub fn new(client: Client) -> Self {
        DebugReviewer {
            client,
            cache: Mutex::new(HashMap::new()),
            reviews: tokio::sync::Semaphore::new(REVIEWS_AT_ONCE),
        }
    }

    async fn review(&self, token: &str, path: &str) -> Result<(), crate::admin::DebugDenied> {
        use crate::admin::DebugDenied;
        use k8s_openapi::api::authorization::v1::{
            NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &TokenReview {
                    spec: TokenReviewSpec {
                        token: token.to_owned(),
                        audiences: None,
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| DebugDenied::Unavailable(e.to_string()))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(DebugDenied::Unauthenticated(
                status
                    .error
                    .unwrap_or_else(|| "the token is not valid".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.clone().unwrap_or_default();
        let asked = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &SubjectAccessReview {
                    spec: SubjectAccessReviewSpec {
                        user: user.username,
                        groups: user.groups,
                        uid: user.uid,
                        extra: user.extra,
                        non_resource_attributes: Some(NonResourceAttributes {
                            path: Some(path.to_owned()),
                            verb: Some("get".into()),
                        }),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| DebugDenied::Unavailable(e.to_string()))?;
        let answer = asked.status.unwrap_or_default();
        if answer.allowed {
            Ok(())
        } else {
            Err(DebugDenied::Forbidden(format!(
                "{username} may not get {path}{}",
                answer
                    .reason
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )))
        }
    }
}

impl crate::admin::DebugAuth for DebugReviewer {
    fn authorize<'a>(
        &'a self,
        token: Option<&'a str>,
        path: &'a str,
    ) -> BoxFuture<'a, Result<(), crate::admin::DebugDenied>> {
        Box::pin(async move {
            let token = token.ok_or_else(|| {
                crate::admin::DebugDenied::Unauthenticated(
                    "send a bearer token (Authorization: Bearer ...) of a user allowed to get this path".into(),
                )
            })?;
            let key = (token_hash(token), path.to_owned());
            {
                let mut cache = self
                    .cache
                    .lock()
                    .expect("debug cache lock is never poisoned");
                cache.retain(|_, at| at.elapsed() < REVIEW_CACHE);
                if cache.contains_key(&key) {
                    return Ok(());
                }
            }
            let _turn = self.reviews.acquire().await.map_err(|_| {
                crate::admin::DebugDenied::Unavailable("the controller is shutting down".into())
            })?;
            self.review(token, path).await?;
            self.cache
                .lock()
                .expect("debug cache lock is never poisoned")
                .insert(key, Instant::now());
            Ok(())
        })
    }
}

/// Writes status conditions in the background: only what changed since the last
/// write, latest translation wins.
pub struct StatusWriter {
    tx: watch::Sender<Arc<Vec<DesiredStatus>>>,
}

impl StatusWriter {
    /// A writer patching through `client`, always (a single replica).
    pub fn new(client: Client, metrics: Metrics) -> Self {
        Self::with_leader(client, metrics, crate::leader::fixed(true))
    }

    /// A writer patching through `client` while `leading`: on becoming the leader it
    /// writes every status again (the previous leader's view may differ).
    pub fn with_leader(client: Client, metrics: Metrics, leading: crate::leader::Leading) -> Self {
        tokio::spawn(class_loop(client.clone(), leading.clone()));
        let events = kube::runtime::events::Recorder::new(client.clone(), reporter());
        Self::to(Arc::new(KubeSink { client, events }), metrics, leading)
    }

    /// A writer to `sink` while `leading`.
    pub fn to(
        sink: Arc<dyn StatusSink>,
        metrics: Metrics,
        leading: crate::leader::Leading,
    ) -> Self {
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        tokio::spawn(write_loop(sink, metrics, rx, leading));
        StatusWriter { tx }
    }

    /// The statuses of the latest translation.
    pub fn write(&self, statuses: Vec<DesiredStatus>) {
        self.tx.send_replace(Arc::new(statuses));
    }
}

/// The Gateway API releases the controller reads (tested against each).
pub const GATEWAY_API_RELEASES: &str = "v1.2 to v1.6";

/// Keeps the `weft-waypoint` GatewayClass Accepted, for its current generation: checked
/// every 30 s (the class may be created, or edited, after the controller starts).
async fn class_loop(client: Client, mut leading: crate::leader::Leading) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "GatewayClass"),
        "gatewayclasses",
    );
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut written: Option<i64> = None;
    loop {
        if !crate::leader::is_leading(&leading) {
            written = None;
            crate::leader::changed(&mut leading).await;
            continue;
        }
        match api.get_status(crate::translate::WAYPOINT_CLASS).await {
            Ok(class) => {
                let generation = class.metadata.generation.unwrap_or(0);
                let ours = class.data["spec"]["controllerName"].as_str() == Some(CONTROLLER_NAME);
                if ours && written != Some(generation) {
                    let patch = serde_json::json!({"status": {"conditions": [{
                        "type": "Accepted",
                        "status": "True",
                        "reason": "Accepted",
                        "message": format!("Weft's waypoints; Gateway API {GATEWAY_API_RELEASES} (standard channel; route retries need the experimental one)"),
                        "observedGeneration": generation,
                        "lastTransitionTime": now_rfc3339(),
                    }]}});
                    match api
                        .patch_status(
                            crate::translate::WAYPOINT_CLASS,
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await
                    {
                        Ok(_) => written = Some(generation),
                        Err(e) => warn!(
                            "cannot write the status of GatewayClass {}: {e}",
                            crate::translate::WAYPOINT_CLASS
                        ),
                    }
                }
            }
            Err(kube::Error::Api(s)) if s.is_not_found() => written = None,
            Err(e) => debug!(
                "cannot read GatewayClass {}: {e}",
                crate::translate::WAYPOINT_CLASS
            ),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            _ = crate::leader::changed(&mut leading) => {}
        }
    }
}

/// Now, as Kubernetes writes times (RFC 3339, UTC, seconds).
fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The JSON merge patch that sets `status` as desired, keeping other controllers'
/// route parents (`current` is the object's present status). A condition whose status
/// is unchanged keeps its `lastTransitionTime`.
pub fn status_patch(
    desired: &DesiredStatus,
    current: Option<&serde_json::Value>,
) -> serde_json::Value {
    let now = now_rfc3339();
    // The conditions as they stand: ours on the route parent `parent`, or the object's.
    let present = |parent: Option<&serde_json::Value>| -> Vec<serde_json::Value> {
        let list = match (desired.object.kind, parent) {
            (ObjectKind::HttpRoute | ObjectKind::GrpcRoute, Some(parent)) => current
                .and_then(|s| s.get("parents"))
                .and_then(|p| p.as_array())
                .and_then(|ps| {
                    ps.iter().find(|p| {
                        p.get("controllerName").and_then(|c| c.as_str()) == Some(CONTROLLER_NAME)
                            && p.get("parentRef") == Some(parent)
                    })
                })
                .and_then(|p| p.get("conditions")),
            (ObjectKind::Gateway, Some(listener)) => current
                .and_then(|s| s.get("listeners"))
                .and_then(|l| l.as_array())
                .and_then(|ls| {
                    ls.iter()
                        .find(|l| l.get("name") == listener.get("listener"))
                })
                .and_then(|l| l.get("conditions")),
            _ => current.and_then(|s| s.get("conditions")),
        };
        list.and_then(|l| l.as_array()).cloned().unwrap_or_default()
    };
    let condition = |c: &crate::translate::Condition, present: &[serde_json::Value]| {
        let status = if c.status { "True" } else { "False" };
        let since = present
            .iter()
            .find(|p| p.get("type").and_then(|t| t.as_str()) == Some(c.type_))
            .filter(|p| p.get("status").and_then(|s| s.as_str()) == Some(status))
            .and_then(|p| p.get("lastTransitionTime").cloned())
            .unwrap_or_else(|| serde_json::Value::String(now.clone()));
        serde_json::json!({
            "type": c.type_,
            "status": status,
            "reason": c.reason,
            "message": c.message,
            "observedGeneration": desired.generation.unwrap_or(0),
            "lastTransitionTime": since,
        })
    };
    let conditions = |key: Option<&serde_json::Value>, cs: &[crate::translate::Condition]| {
        let present = present(key);
        cs.iter()
            .map(|c| condition(c, &present))
            .collect::<Vec<_>>()
    };
    match desired.object.kind {
        ObjectKind::HttpRoute | ObjectKind::GrpcRoute => {
            let mut parents: Vec<serde_json::Value> = current
                .and_then(|s| s.get("parents"))
                .and_then(|p| p.as_array())
                .map(|ps| {
                    ps.iter()
                        .filter(|p| {
                            p.get("controllerName").and_then(|c| c.as_str())
                                != Some(CONTROLLER_NAME)
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            for (parent, cs) in &desired.parents {
                let parent_ref = parent.clone().unwrap_or_default();
                parents.push(serde_json::json!({
                    "parentRef": parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": conditions(Some(&parent_ref), cs),
                }));
            }
            serde_json::json!({ "status": { "parents": parents } })
        }
        ObjectKind::Gateway => {
            let own: Vec<serde_json::Value> = desired
                .parents
                .iter()
                .filter(|(key, _)| key.is_none())
                .flat_map(|(_, cs)| conditions(None, cs))
                .collect();
            let listeners: Vec<serde_json::Value> = desired
                .parents
                .iter()
                .filter_map(|(key, cs)| {
                    let name = key.as_ref()?.get("listener")?.clone();
                    Some(serde_json::json!({
                        "name": name,
                        "supportedKinds": [],
                        "attachedRoutes": 0,
                        "conditions": conditions(key.as_ref(), cs),
                    }))
                })
                .collect();
            serde_json::json!({ "status": { "conditions": own, "listeners": listeners } })
        }
        _ => {
            let own: Vec<serde_json::Value> = desired
                .parents
                .iter()
                .flat_map(|(_, cs)| conditions(None, cs))
                .collect();
            serde_json::json!({ "status": { "conditions": own } })
        }
    }
}

/// How often a status write is tried again at once when another writer changed the
/// object between the read and the write (409 Conflict).
const STATUS_CONFLICT_RETRIES: usize = 5;

/// Writes one object's status: reads it, then patches with its `resourceVersion`, so a
/// concurrent write (another controller's route parent) is never overwritten: on 409
/// the object is read again. `status.parents` is an atomic list in every Gateway API
/// release, so server-side apply per parent is not possible; this is its equivalent.
/// Returns the object's uid, for events.
async fn patch_one(client: &Client, desired: &DesiredStatus) -> Result<String, kube::Error> {
    let mut attempt = 0;
    loop {
        match patch_once(client, desired).await {
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < STATUS_CONFLICT_RETRIES => {
                debug!(object = %desired.object, "status changed meanwhile; reading it again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

async fn patch_once(client: &Client, desired: &DesiredStatus) -> Result<String, kube::Error> {
    let name = desired.object.name.clone();
    let ns = desired.object.namespace.clone().unwrap_or_default();
    let params = PatchParams::default();
    let with_version = |mut patch: serde_json::Value, meta: &kube::api::ObjectMeta| {
        patch["metadata"] = serde_json::json!({ "resourceVersion": meta.resource_version });
        patch
    };
    macro_rules! patch {
        ($t:ty) => {{
            let api: Api<$t> = Api::namespaced(client.clone(), &ns);
            let current = api.get_status(&name).await?;
            let status = serde_json::to_value(&current)
                .ok()
                .and_then(|v| v.get("status").cloned());
            let patch = with_version(status_patch(desired, status.as_ref()), &current.metadata);
            api.patch_status(&name, &params, &Patch::Merge(&patch))
                .await?;
            current.metadata.uid.unwrap_or_default()
        }};
    }
    let uid = match desired.object.kind {
        // As raw objects: a route the controller cannot read still gets its status.
        // All three are served at v1 by every Gateway API release Weft supports.
        kind @ (ObjectKind::HttpRoute | ObjectKind::GrpcRoute | ObjectKind::Gateway) => {
            let resource = ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk(kind.group(), "v1", kind.kind()),
                plural(kind),
            );
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
            let current = api.get_status(&name).await?;
            let patch = with_version(
                status_patch(desired, current.data.get("status")),
                &current.metadata,
            );
            api.patch_status(&name, &params, &Patch::Merge(&patch))
                .await?;
            current.metadata.uid.unwrap_or_default()
        }
        ObjectKind::AuthorizationPolicy => patch!(AuthorizationPolicy),
        ObjectKind::TrafficPolicy => patch!(TrafficPolicy),
        _ => String::new(),
    };
    Ok(uid)
}

/// The event for a status written: a warning naming what was refused, if anything was.
fn rejection_event(desired: &DesiredStatus) -> Option<kube::runtime::events::Event> {
    let refused: Vec<&crate::translate::Condition> = desired
        .parents
        .iter()
        .flat_map(|(_, cs)| cs.iter())
        .filter(|c| !c.status && c.type_ != "Programmed")
        .collect();
    let first = refused.first()?;
    let mut note: String = refused
        .iter()
        .map(|c| format!("{}: {}", c.type_, c.message))
        .collect::<Vec<_>>()
        .join("; ");
    // The Events API takes at most 1 kB of note.
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    Some(kube::runtime::events::Event {
        type_: kube::runtime::events::EventType::Warning,
        reason: first.reason.to_owned(),
        note: Some(note),
        action: "Translate".into(),
        secondary: None,
    })
}

/// The `apiVersion` statuses are written at: Weft's kinds at theirs, the others at
/// `v1` (served by every Gateway API release Weft supports).
fn status_api_version(kind: ObjectKind) -> String {
    let version = match kind.group() {
        "weft.dev" => "v1alpha1",
        _ => "v1",
    };
    match kind.group() {
        "" => version.to_owned(),
        group => format!("{group}/{version}"),
    }
}

/// A reference to `object` (with its uid, so `kubectl describe` shows its events).
pub fn object_reference(
    object: &ObjectRef,
    uid: &str,
) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(status_api_version(object.kind)),
        kind: Some(object.kind.kind().to_owned()),
        name: Some(object.name.clone()),
        namespace: object.namespace.clone(),
        uid: (!uid.is_empty()).then(|| uid.to_owned()),
        ..Default::default()
    }
}

/// The reporter of the controller's events: this replica (its pod's name).
pub fn reporter() -> kube::runtime::events::Reporter {
    kube::runtime::events::Reporter {
        controller: crate::waypoints::FIELD_MANAGER.into(),
        instance: std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()),
    }
}

/// Where statuses go: the API server in a cluster, files in manifest mode.
pub trait StatusSink: Send + Sync + 'static {
    /// Writes one object's status.
    fn write<'a>(&'a self, desired: &'a DesiredStatus) -> BoxFuture<'a, Result<(), String>>;
    /// The object's status is no longer wanted (the object is gone).
    fn forget<'a>(&'a self, object: &'a ObjectRef) -> BoxFuture<'a, ()>;
}

/// The API server: status patched, an event for what is refused.
struct KubeSink {
    client: Client,
    events: kube::runtime::events::Recorder,
}

impl StatusSink for KubeSink {
    fn write<'a>(&'a self, d: &'a DesiredStatus) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let uid = patch_one(&self.client, d)
                .await
                .map_err(|e| e.to_string())?;
            if let Some(event) = rejection_event(d) {
                let regarding = object_reference(&d.object, &uid);
                if let Err(e) = self.events.publish(&event, &regarding).await {
                    debug!(object = %d.object, "cannot record an event: {e}");
                }
            }
            Ok(())
        })
    }

    fn forget<'a>(&'a self, _: &'a ObjectRef) -> BoxFuture<'a, ()> {
        // The object is gone, and its status with it. (A route that left the mesh has
        // its Weft parents removed by a status without parents, `translate::routes_left`.)
        Box::pin(async {})
    }
}

/// Manifest mode: each object's status in `<dir>/<kind>/<namespace>/<name>.yaml`, as the
/// object's `status` would read in a cluster (the same conditions, merged the same way),
/// with the writing replica in the annotation `weft.dev/written-by`.
pub struct FileSink {
    dir: std::path::PathBuf,
    identity: String,
}

/// The annotation naming the replica that wrote a status file.
pub const WRITTEN_BY: &str = "weft.dev/written-by";

impl FileSink {
    /// Statuses under `dir`, written as `identity`.
    pub fn new(dir: std::path::PathBuf, identity: String) -> Self {
        FileSink { dir, identity }
    }

    /// Where `object`'s status is kept.
    pub fn path(dir: &std::path::Path, object: &ObjectRef) -> std::path::PathBuf {
        dir.join(object.kind.kind().to_ascii_lowercase())
            .join(object.namespace.as_deref().unwrap_or("_cluster"))
            .join(format!("{}.yaml", object.name))
    }

    fn write_file(&self, d: &DesiredStatus) -> std::io::Result<()> {
        let path = Self::path(&self.dir, &d.object);
        let current: Option<serde_json::Value> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_yaml_ng::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("status").cloned());
        let patch = status_patch(d, current.as_ref());
        let kind = d.object.kind;
        let document = serde_json::json!({
            "apiVersion": status_api_version(kind),
            "kind": kind.kind(),
            "metadata": {
                "name": d.object.name,
                "namespace": d.object.namespace,
                "generation": d.generation,
                "annotations": { WRITTEN_BY: self.identity },
            },
            "status": patch["status"],
        });
        let text = serde_yaml_ng::to_string(&document).map_err(std::io::Error::other)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension("yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)
    }
}

impl StatusSink for FileSink {
    fn write<'a>(&'a self, d: &'a DesiredStatus) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.write_file(d).map_err(|e| e.to_string()) })
    }

    fn forget<'a>(&'a self, object: &'a ObjectRef) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let _ = std::fs::remove_file(Self::path(&self.dir, object));
        })
    }
}

async fn write_loop(
    sink: Arc<dyn StatusSink>,
    metrics: Metrics,
    mut rx: watch::Receiver<Arc<Vec<DesiredStatus>>>,
    mut leading: crate::leader::Leading,
) {
    // What was written last, per object; a failed write is retried on the next round,
    // at the latest after 30 s.
    let mut written: HashMap<crate::objects::ObjectRef, DesiredStatus> = HashMap::new();
    let mut was_leading = false;
    let mut retry = tokio::time::interval(Duration::from_secs(30));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = crate::leader::changed(&mut leading) => {}
            _ = retry.tick() => {}
        }
        let now_leading = crate::leader::is_leading(&leading);
        if now_leading && !was_leading {
            // A new leader writes everything again (the last one's view may differ).
            written.clear();
        }
        was_leading = now_leading;
        if !now_leading {
            continue;
        }
        let desired = rx.borrow_and_update().clone();
        let present: std::collections::HashSet<_> =
            desired.iter().map(|d| d.object.clone()).collect();
        let gone: Vec<ObjectRef> = written
            .keys()
            .filter(|k| !present.contains(*k))
            .cloned()
            .collect();
        for object in gone {
            sink.forget(&object).await;
            written.remove(&object);
        }
        for d in desired.iter() {
            if written.get(&d.object) == Some(d) {
                continue;
            }
            // Leadership may be lost during a round: a follower writes nothing more.
            if !crate::leader::is_leading(&leading) {
                break;
            }
            match sink.write(d).await {
                Ok(()) => {
                    debug!(object = %d.object, "status written");
                    Metrics::count(&metrics.status_writes, "ok");
                    written.insert(d.object.clone(), d.clone());
                }
                Err(e) => {
                    warn!(object = %d.object, "cannot write status: {e}");
                    Metrics::count(&metrics.status_writes, "error");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::translate::Condition;

    fn route_status(accepted: bool) -> DesiredStatus {
        DesiredStatus {
            object: ObjectRef {
                kind: ObjectKind::HttpRoute,
                namespace: Some("demo".into()),
                name: "r".into(),
            },
            generation: Some(3),
            parents: vec![(
                Some(serde_json::json!({"name": "echo"})),
                vec![Condition {
                    type_: "Accepted",
                    status: accepted,
                    reason: if accepted {
                        "Accepted"
                    } else {
                        "UnsupportedValue"
                    },
                    message: "m".into(),
                }],
            )],
        }
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let current = serde_json::json!({"parents": [
            {"controllerName": "example.com/other", "parentRef": {"name": "gw"}, "conditions": []},
            {"controllerName": CONTROLLER_NAME, "parentRef": {"name": "echo"}, "conditions": [
                {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "old",
                 "observedGeneration": 2, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]});
        let same = status_patch(&route_status(true), Some(&current));
        let parents = same["status"]["parents"].as_array().expect("parents");
        assert_eq!(parents.len(), 2, "the other controller's parent is kept");
        let ours = &parents[1]["conditions"][0];
        assert_eq!(ours["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(ours["observedGeneration"], 3);
        let flipped = status_patch(&route_status(false), Some(&current));
        let ours = &flipped["status"]["parents"][1]["conditions"][0];
        assert_ne!(ours["lastTransitionTime"], "2026-01-01T00:00:00Z");
        assert_eq!(ours["status"], "False");
    }
}

//! node-proxy and the controller in one process, on loopback: a real controller (gRPC
//! over TLS, its CA, a manifest directory) and real node-proxy subscription and CA
//! clients. Full sync, deltas, refused updates, resume after a reconnect (within one
//! controller's life and across a restart), impersonation, and bad subscribers.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::Model;
use arc_swap::ArcSwap;
use controller::metrics::{KindLabel, ReasonLabel};
use controller::testing::{namespace_yaml, pod_yaml, TestController};
use runtime::config_client::{
    self, CaClient, Changed, ConfigMetrics, ControllerConfig, Subscription,
};
use runtime::state::{CertError, CertSource, Identities, ModelStatus, SharedModel};
use tokio_util::sync::CancellationToken;

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("weft-control-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Manifests: namespace demo (enrolled), pods on node-1 and node-2.
fn cluster() -> Vec<(String, String)> {
    vec![
        ("00-ns.yaml".into(), namespace_yaml("demo", true)),
        ("pod-a.yaml".into(), pod_yaml("demo", "a", "uid-a", "node-1", "client", "10.244.1.2", &[("app", "a")])),
        ("pod-b.yaml".into(), pod_yaml("demo", "b", "uid-b", "node-2", "db", "10.244.1.3", &[("app", "b")])),
        (
            "svc.yaml".into(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: demo}\nspec: {clusterIP: 10.96.0.10, selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}\n".into(),
        ),
    ]
}

async fn start_controller(dir: &std::path::Path) -> TestController {
    let files = cluster();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    TestController::start(dir, &["node-1", "node-2"], &files)
        .await
        .expect("the controller starts")
}

/// A node-proxy's subscription, as node-proxy runs it.
struct Proxy {
    model: SharedModel,
    identities: Arc<Identities>,
    status: Arc<Mutex<ModelStatus>>,
    changed: tokio::sync::watch::Receiver<Changed>,
    ca: CaClient,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn controller_config(c: &TestController, node: &str) -> ControllerConfig {
    ControllerConfig {
        addr: c.grpc.to_string(),
        server_name: controller::testing::SERVER_NAME.into(),
        roots: c.root.clone(),
        token: c.token(node),
        node: node.into(),
        waypoint: None,
    }
}

fn subscribe(c: &TestController, node: &str, model: Option<SharedModel>) -> Proxy {
    subscribe_with(c, node, model, None)
}

fn subscribe_with(
    c: &TestController,
    node: &str,
    model: Option<SharedModel>,
    check: Option<config_client::Check>,
) -> Proxy {
    let config = controller_config(c, node);
    let channel = config_client::channel(&config);
    let shutdown = CancellationToken::new();
    let ca = CaClient::new(config.clone(), channel.clone());
    let identities = Identities::new(
        Arc::new(CaClient::new(config.clone(), channel.clone())),
        shutdown.clone(),
    );
    let held = identities.clone();
    let model = model.unwrap_or_else(|| Arc::new(ArcSwap::from_pointee(Model::default())));
    let status = Arc::new(Mutex::new(ModelStatus::default()));
    let (tx, rx) = tokio::sync::watch::channel(Changed::default());
    let subscription = Subscription {
        config,
        channel,
        model: model.clone(),
        status: status.clone(),
        changed: tx,
        identities,
        metrics: ConfigMetrics::default(),
        check,
    };
    let task = tokio::spawn(subscription.run(shutdown.clone()));
    Proxy {
        model,
        identities: held,
        status,
        changed: rx,
        ca,
        shutdown,
        task,
    }
}

impl Proxy {
    /// Waits (10 s at most) until `ok` holds for the model.
    async fn until(&mut self, what: &str, ok: impl Fn(&Model) -> bool) {
        let reached = config_client::wait_for(
            &self.model,
            &mut self.changed,
            Duration::from_secs(10),
            |m| ok(m).then_some(()),
        )
        .await;
        assert!(
            reached.is_some(),
            "{what}: model at version {}: {:?}",
            self.model.load().version(),
            self.status.lock().unwrap()
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

fn pushes(c: &TestController, kind: &str) -> u64 {
    c.shared
        .metrics
        .pushes
        .get_or_create(&KindLabel { kind: kind.into() })
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_sync_then_deltas_then_resume_without_a_full_resend() {
    let d = dir("sync");
    let c = start_controller(&d).await;
    let mut p = subscribe(&c, "node-1", None);
    p.until("the full state", |m| {
        m.workload("uid-a").is_some() && m.workload("uid-b").is_some()
    })
    .await;
    let m = p.model.load();
    let (svc, _) = m
        .service_by_vip("10.96.0.10:80".parse().unwrap())
        .expect("the service");
    let endpoints = m.endpoints(&svc.object_name(), 80);
    assert_eq!(endpoints.len(), 1);
    assert_eq!(
        endpoints[0].addr.to_string(),
        "10.244.1.3:8080",
        "endpoints come computed"
    );
    assert!(
        m.trust_bundle().is_some(),
        "the trust bundle is part of the model"
    );
    assert_eq!(pushes(&c, "full"), 1);

    // A delta: one pod added.
    let bytes_before = c.shared.metrics.pushed_bytes.get();
    c.write(
        "pod-c.yaml",
        &pod_yaml(
            "demo",
            "c",
            "uid-c",
            "node-2",
            "db",
            "10.244.1.4",
            &[("app", "b")],
        ),
    )
    .unwrap();
    p.until("pod c", |m| {
        m.workload("uid-c").is_some()
            && m.endpoints(&api::ObjectName::new("demo", "b"), 80).len() == 2
    })
    .await;
    assert!(pushes(&c, "delta") >= 1);
    let delta_bytes = c.shared.metrics.pushed_bytes.get() - bytes_before;
    assert!(
        delta_bytes < 2048,
        "a one-pod change pushes {delta_bytes} bytes"
    );

    // The proxy goes away; a change meanwhile; it comes back from where it was.
    let model = p.model.clone();
    p.stop().await;
    c.remove("pod-a.yaml").unwrap();
    let v = c.version() + 1;
    c.wait_version(v).await.unwrap();
    let mut p = subscribe(&c, "node-1", Some(model));
    p.until("pod a gone", |m| m.workload("uid-a").is_none())
        .await;
    assert_eq!(pushes(&c, "resume"), 1, "resumed from its version");
    assert_eq!(pushes(&c, "full"), 1, "no second full state");

    // The controller restarts (a new epoch, no history); nothing changed: the proxy
    // resyncs by digests and is sent nothing.
    let before = p.model.load().position();
    let addr = c.grpc;
    c.stop().await;
    let c = start_controller_again(&d, addr).await;
    p.until("a new epoch", |m| m.epoch() != before.epoch).await;
    assert_eq!(pushes(&c, "full"), 0, "no full resend after the restart");
    assert_eq!(pushes(&c, "resync"), 1);
    assert_eq!(
        c.shared.metrics.pushed_resources.get(),
        0,
        "every bucket matched: nothing resent"
    );
    assert_eq!(p.model.load().position().buckets, before.buckets);

    // Something changed while the controller was away: only that is resent.
    let model = p.model.clone();
    p.stop().await;
    c.stop().await;
    std::fs::write(
        d.join("manifests/pod-d.yaml"),
        pod_yaml("demo", "d", "uid-d", "node-1", "client", "10.244.1.5", &[]),
    )
    .unwrap();
    let c = start_controller_again(&d, addr).await;
    let mut p = subscribe(&c, "node-1", Some(model));
    p.until("pod d", |m| m.workload("uid-d").is_some()).await;
    let resent = c.shared.metrics.pushed_resources.get();
    assert!(
        (1..20).contains(&resent),
        "only the changed bucket is resent ({resent} resources)"
    );
    p.stop().await;
    c.stop().await;
}

async fn start_controller_again(d: &std::path::Path, addr: std::net::SocketAddr) -> TestController {
    // The same directory (root, tokens, manifests) and address, as a restarted pod
    // behind its Service.
    TestController::start_with(d, &["node-1", "node-2"], &[], |c| c.listen = addr)
        .await
        .expect("the controller restarts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_the_proxy_refuses_is_reported_and_the_rest_applies() {
    let d = dir("refused");
    let c = start_controller(&d).await;
    let mut p = subscribe(&c, "node-1", None);
    p.until("the full state", |m| m.workload("uid-b").is_some())
        .await;
    // Publish, as a buggy or newer controller might, a workload claiming b's IP next to
    // a good change.
    let objects = controller::manifests::load(&[d.join("manifests")])
        .unwrap()
        .objects;
    let settings = controller::translate::Settings {
        trust_domain: "cluster.local".into(),
        trust_bundle: c.shared.ca.bundle().iter().map(|r| r.to_vec()).collect(),
    };
    let mut entries = controller::translate::translate(&objects, &settings).entries;
    let thief = api::Workload {
        uid: "uid-thief".into(),
        name: "thief".into(),
        namespace: "demo".into(),
        service_account: "x".into(),
        node: "node-2".into(),
        ips: vec!["10.244.1.3".parse().unwrap()],
        enrolled: true,
        ready: true,
        services: vec![],
        authorization_policies: vec![],
        waypoint: None,
    };
    let good = api::Namespace {
        name: "extra".into(),
        enrolled: false,
        mtls_mode: api::MtlsMode::Permissive,
    };
    for r in [
        api::Resource::Workload(thief),
        api::Resource::Namespace(good),
    ] {
        entries.insert(
            r.key(),
            controller::translate::Entry {
                resource: r,
                audience: controller::translate::Audience::All,
            },
        );
    }
    let version = {
        let mut store = c.shared.store.write().unwrap();
        store.publish(entries).expect("a change").version
    };
    c.shared.version.send_replace(version);
    p.until("the good part", |m| m.namespace("extra").is_some())
        .await;
    let m = p.model.load();
    assert!(
        m.workload("uid-thief").is_none(),
        "the refused workload is not applied"
    );
    assert_eq!(
        m.workload_by_ip("10.244.1.3".parse().unwrap())
            .map(|w| w.uid.as_str()),
        Some("uid-b")
    );
    assert!(p.status.lock().unwrap().rejected[0]
        .contains("10.244.1.3 is already used by workload demo/b"));
    // The controller hears about it: counted, and shown per subscriber.
    let refused = async {
        loop {
            let subs = c.shared.subscribers();
            if let Some(s) = subs.iter().find(|s| s.rejected > 0) {
                return s.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let s = tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("the refusal reaches the controller");
    assert_eq!(s.node, "node-1");
    assert!(s.last_rejection.unwrap().contains("workload uid-thief"));
    assert_eq!(
        c.shared
            .metrics
            .rejections
            .get_or_create(&KindLabel {
                kind: "workload".into()
            })
            .get(),
        1
    );
    assert_eq!(s.acked_version, version);
    p.stop().await;
    c.stop().await;
}

/// A proxy's own check of a model (a waypoint compiling its routes) refuses what it
/// cannot use in the ack, as a refusal of the model's would be: the controller counts
/// it and shows it for that subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_proxys_own_check_refuses_reaches_the_controller_in_the_ack() {
    let d = dir("checked");
    let c = start_controller(&d).await;
    let check: config_client::Check = Arc::new(|m: &Arc<Model>| {
        m.workload("uid-b")
            .map(|_| {
                (
                    api::Key::new(api::Kind::HttpRoute, "demo/broken"),
                    "rules[0]: matches[0]: cannot be compiled".to_owned(),
                )
            })
            .into_iter()
            .collect()
    });
    let mut p = subscribe_with(&c, "node-1", None, Some(check));
    p.until("the full state", |m| m.workload("uid-b").is_some())
        .await;
    let refused = async {
        loop {
            if let Some(s) = c.shared.subscribers().into_iter().find(|s| s.rejected > 0) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let s = tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("the refusal reaches the controller");
    let last = s.last_rejection.unwrap_or_default();
    assert!(
        last.contains("demo/broken") && last.contains("cannot be compiled"),
        "{last}"
    );
    // Kept as a refused route, which the route's status then shows.
    assert_eq!(
        s.refused_routes,
        vec![controller::server::RefusedRoute {
            kind: "http_route",
            name: "demo/broken".into(),
            reason: "rules[0]: matches[0]: cannot be compiled".into(),
        }]
    );
    assert!(p.status.lock().unwrap().rejected[0].contains("demo/broken"));
    p.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_certificates_only_for_its_own_pods() {
    let d = dir("impersonate");
    let c = start_controller(&d).await;
    let p = subscribe(&c, "node-1", None);
    // a runs as demo/client on node-1: signed.
    let own = tunnel::identity::Identity::new("cluster.local", "demo", "client").unwrap();
    let (cert, bundle) =
        p.ca.fetch(&own)
            .await
            .expect("node-1 gets its own pod's identity");
    assert_eq!(cert.identity, own);
    assert_eq!(bundle.roots().len(), 1);
    // b runs as demo/db on node-2: node-1 asking for it is refused, and counted.
    let other = tunnel::identity::Identity::new("cluster.local", "demo", "db").unwrap();
    match p.ca.fetch(&other).await {
        Err(CertError::Refused(why)) => assert!(
            why.contains(
                "no pod in the mesh on node node-1 runs as spiffe://cluster.local/ns/demo/sa/db"
            ),
            "{why}"
        ),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let refusals = c
        .shared
        .metrics
        .certificate_refusals
        .get_or_create(&ReasonLabel {
            reason: "not_on_node",
        })
        .get();
    assert_eq!(refusals, 1);
    // Another node's token does not make a node-1 subscription either.
    let mut wrong = controller_config(&c, "node-1");
    wrong.token = c.token("node-2");
    let ca = CaClient::new(wrong.clone(), config_client::channel(&wrong));
    assert!(
        matches!(ca.fetch(&own).await, Err(CertError::Refused(_))),
        "node-2's token does not get node-1's identities"
    );
    p.stop().await;
    c.stop().await;
}

/// A raw HTTP/2 connection to the controller over TLS, for clients that misbehave;
/// `window` is the stream flow-control window it grants.
async fn raw_h2(c: &TestController, window: u32) -> h2::client::SendRequest<bytes::Bytes> {
    let pem = std::fs::read_to_string(&c.root).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in tunnel::identity::TrustBundle::from_pem(&pem)
        .unwrap()
        .roots()
    {
        roots.add(cert.clone()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(tunnel::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(c.grpc).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(controller::testing::SERVER_NAME).unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(stream)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

fn grpc_frame(message: &[u8]) -> bytes::Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame.into()
}

fn hello(node: &str) -> Vec<u8> {
    use prost::Message;
    api::proto::SubscribeRequest {
        message: Some(api::proto::subscribe_request::Message::Hello(
            api::proto::Hello {
                node: node.into(),
                role: api::proto::Role::NodeProxy as i32,
                position: None,
                proxy_version: "test".into(),
                waypoint: String::new(),
            },
        )),
    }
    .encode_to_vec()
}

/// Opens a Subscribe stream sending `data`; returns the response and the request body.
async fn raw_subscribe(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    token: Option<&str>,
    data: bytes::Bytes,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let mut req =
        http::Request::post("https://weft-controller/weft.mesh.v1alpha1.MeshConfig/Subscribe")
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let mut ready = send.clone().ready().await.unwrap();
    let (response, mut body) = ready.send_request(req.body(()).unwrap(), false).unwrap();
    body.send_data(data, false).unwrap();
    (response, body)
}

/// The grpc-status a misbehaving stream ends with.
async fn grpc_status(response: h2::client::ResponseFuture) -> String {
    let response = tokio::time::timeout(Duration::from_secs(15), response)
        .await
        .expect("an answer")
        .unwrap();
    if let Some(s) = response.headers().get("grpc-status") {
        return s.to_str().unwrap().to_owned();
    }
    let mut body = response.into_body();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(15), body.data())
        .await
        .expect("the stream ends")
    {
        let _ = chunk;
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    trailers
        .get("grpc-status")
        .map(|s| s.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_end_only_their_own_subscription() {
    let d = dir("malformed");
    let c = start_controller(&d).await;
    let mut good = subscribe(&c, "node-1", None);
    good.until("the full state", |m| m.workload("uid-a").is_some())
        .await;
    let token = std::fs::read_to_string(c.token("node-1")).unwrap();
    let mut h2 = raw_h2(&c, 65_535).await;
    let cases: [(&str, Option<&str>, bytes::Bytes, &str); 6] = [
        ("not protobuf", Some(&token), grpc_frame(&[0xff; 7]), "3"),
        (
            "a 2 GiB length prefix",
            Some(&token),
            bytes::Bytes::from_static(&[0, 0x7f, 0xff, 0xff, 0xff, 1, 2, 3]),
            "3",
        ),
        (
            "an Ack before the Hello",
            Some(&token),
            grpc_frame(&{
                use prost::Message;
                api::proto::SubscribeRequest {
                    message: Some(api::proto::subscribe_request::Message::Ack(
                        api::proto::Ack::default(),
                    )),
                }
                .encode_to_vec()
            }),
            "3",
        ),
        (
            "another node's Hello",
            Some(&token),
            grpc_frame(&hello("node-2")),
            "7",
        ),
        ("no token", None, grpc_frame(&hello("node-1")), "16"),
        (
            "a token nobody has",
            Some("forged"),
            grpc_frame(&hello("node-1")),
            "16",
        ),
    ];
    for (what, token, data, want) in cases {
        let (response, _body) = raw_subscribe(&mut h2, token, data).await;
        assert_eq!(grpc_status(response).await, want, "{what}");
    }
    let refused: u64 = [
        "bad_message",
        "no_hello",
        "wrong_node",
        "missing",
        "invalid",
    ]
    .iter()
    .map(|r| {
        c.shared
            .metrics
            .subscribe_refusals
            .get_or_create(&ReasonLabel { reason: r })
            .get()
    })
    .sum();
    assert!(refused >= 5, "refusals are counted ({refused})");
    // The controller is up and the good subscriber keeps getting changes.
    c.write(
        "pod-e.yaml",
        &pod_yaml("demo", "e", "uid-e", "node-2", "db", "10.244.1.6", &[]),
    )
    .unwrap();
    good.until("pod e after the bad clients", |m| {
        m.workload("uid-e").is_some()
    })
    .await;
    good.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_holds_up_nobody() {
    let d = dir("stalled");
    let c = start_controller(&d).await;
    let token = std::fs::read_to_string(c.token("node-2")).unwrap();
    // It grants a window smaller than the first update and never reads.
    let mut h2 = raw_h2(&c, 256).await;
    let (response, _body) =
        raw_subscribe(&mut h2, Some(&token), grpc_frame(&hello("node-2"))).await;
    let _response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("headers")
        .unwrap();
    let mut good = subscribe(&c, "node-1", None);
    good.until("the full state", |m| m.workload("uid-a").is_some())
        .await;
    for i in 0..30 {
        let name = format!("p{i}");
        c.write(
            &format!("pod-{name}.yaml"),
            &pod_yaml(
                "demo",
                &name,
                &format!("uid-{name}"),
                "node-1",
                "client",
                &format!("10.244.2.{}", i + 1),
                &[],
            ),
        )
        .unwrap();
        good.until("every pod", |m| {
            m.workload(&format!("uid-{name}")).is_some()
        })
        .await;
    }
    let statuses = c.shared.subscribers();
    let stalled = statuses
        .iter()
        .find(|s| s.node == "node-2")
        .expect("the stalled subscriber is still there");
    let fine = statuses
        .iter()
        .find(|s| s.node == "node-1")
        .expect("the good one");
    assert!(
        stalled.sent_version < fine.sent_version,
        "the stalled one is behind: {statuses:?}"
    );
    assert_eq!(stalled.acked_version, 0, "it never read a thing");
    assert_eq!(fine.sent_version, c.version());
    good.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_trust_bundle_reaches_live_credentials() {
    let d = dir("bundle");
    let c = start_controller(&d).await;
    let mut p = subscribe(&c, "node-1", None);
    p.until("the full state", |m| m.trust_bundle().is_some())
        .await;
    let own = tunnel::identity::Identity::new("cluster.local", "demo", "client").unwrap();
    let lease = p
        .identities
        .get(&own)
        .await
        .expect("a leaf for node-1's pod");
    let before = lease.tls().generation();
    // A second root joins the bundle (a root rotation beginning).
    let next_root = tunnel::identity::CertificateAuthority::self_signed("cluster.local").unwrap();
    let objects = controller::manifests::load(&[d.join("manifests")])
        .unwrap()
        .objects;
    let mut roots: Vec<Vec<u8>> = c.shared.ca.bundle().iter().map(|r| r.to_vec()).collect();
    roots.push(next_root.cert_der().to_vec());
    let settings = controller::translate::Settings {
        trust_domain: "cluster.local".into(),
        trust_bundle: roots,
    };
    let entries = controller::translate::translate(&objects, &settings).entries;
    let version = c
        .shared
        .store
        .write()
        .unwrap()
        .publish(entries)
        .expect("a change")
        .version;
    c.shared.version.send_replace(version);
    p.until("two roots", |m| {
        m.trust_bundle().is_some_and(|b| b.roots.len() == 2)
    })
    .await;
    assert_ne!(
        lease.tls().generation(),
        before,
        "the held credentials took the new bundle"
    );
    p.stop().await;
    c.stop().await;
}

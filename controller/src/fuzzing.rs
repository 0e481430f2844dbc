//! Fuzz harnesses for what reaches the controller from outside: manifest files (YAML,
//! `List` kinds, several documents) read and translated into the model, and the gRPC
//! requests of proxies (the subscription's Hello and acknowledgements, certificate
//! signing requests). Used by the `manifests` and `controller_requests` targets of
//! `fuzz/` (cargo-fuzz) and by `tests/fuzz_corpus.rs`, which replays the committed
//! corpora.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use api::proto::{self, subscribe_request};
use api::{Model, Resource};
use prost::Message as _;
use tunnel::identity::{build_csr, identity_of_leaf, CertificateAuthority, Identity};

use crate::ca::Ca;
use crate::manifests::parse_file;
use crate::objects::Objects;
use crate::server::{initial, read_ack};
use crate::store::{Store, View};
use crate::translate::{translate, Settings};

/// Reads `data` as a manifest file and translates what it holds, checking that a syntax
/// error names a line of the file, that every object read comes from a line of it, and
/// that everything the controller would send is a resource a proxy accepts.
pub fn manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let lines = crate::manifests::yaml_lines(text);
    let file = match parse_file(Path::new("fuzz.yaml"), text) {
        Ok(file) => file,
        Err(e) => {
            assert!((1..=lines).contains(&e.line), "line {} of {lines}", e.line);
            return;
        }
    };
    let mut objects = Objects::default();
    for (object, origin) in file.objects {
        let _ = objects.insert(object, origin, false);
    }
    for (key, entry) in translate(&objects, &Settings::default()).entries {
        match Resource::from_proto(&entry.resource.to_proto()) {
            Ok(Some((read, _))) => assert_eq!(read, key),
            other => panic!("the controller would send {key}, which a proxy refuses: {other:?}"),
        }
    }
}

/// The first byte chooses the service (even: a subscription message, odd: a
/// certificate request), the rest is the protobuf message.
pub fn request(data: &[u8]) {
    let Some((&service, message)) = data.split_first() else {
        return;
    };
    match service % 2 {
        0 => subscription(message),
        _ => certificate(message),
    }
}

/// A Hello is answered from a small model for the node it names and for a waypoint: a
/// proxy accepts every resource of the first update, and a full state holds exactly
/// what the subscriber's view does. An acknowledgement's refusals are each read.
fn subscription(message: &[u8]) {
    let Ok(request) = proto::SubscribeRequest::decode(message) else {
        return;
    };
    match request.message {
        Some(subscribe_request::Message::Hello(hello)) => {
            let store = store();
            for view in [View::Node(hello.node.clone()), View::Waypoint] {
                let (start, update) = initial(store, &view, hello.position.clone());
                let applied = Model::default().apply(&update);
                assert!(applied.rejected.is_empty(), "{:?}", applied.rejected);
                if start == "full" {
                    assert_eq!(
                        applied.model.position().buckets,
                        api::digest::to_wire(&store.digests(&view))
                    );
                }
            }
        }
        Some(subscribe_request::Message::Ack(ack)) => {
            let reading = read_ack(&ack);
            assert_eq!(reading.refusals.len(), ack.rejected.len());
        }
        None => {}
    }
}

/// A certificate is signed only for the identity asked, whatever the CSR holds.
fn certificate(message: &[u8]) {
    let Ok(request) = proto::SignRequest::decode(message) else {
        return;
    };
    let Ok(identity) = request.identity.parse::<Identity>() else {
        return;
    };
    let ca = ca();
    if identity.trust_domain() != ca.trust_domain() {
        return;
    }
    if let Ok(chain) = ca.sign(&identity, &request.csr) {
        let leaf = chain.first().expect("a signed chain has a leaf");
        let signed = identity_of_leaf(leaf).expect("a signed leaf names an identity");
        assert_eq!(signed, identity);
    }
}

fn ca() -> &'static Ca {
    static CA: OnceLock<Ca> = OnceLock::new();
    CA.get_or_init(|| {
        let authority = CertificateAuthority::self_signed("cluster.local").expect("a root");
        Ca::new(
            authority,
            Vec::new(),
            "cluster.local",
            Duration::from_secs(3600),
        )
    })
}

/// A store at version 2 with a namespace, pods on two nodes, a service and a policy.
fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let mut store = Store::new(7);
        for text in [MODEL_V1.to_owned(), model_v2()] {
            let file = parse_file(Path::new("model.yaml"), &text).expect("the fixture is YAML");
            let mut objects = Objects::default();
            for (object, origin) in file.objects {
                objects
                    .insert(object, origin, false)
                    .expect("no duplicates");
            }
            store.publish(translate(&objects, &Settings::default()).entries);
        }
        store
    })
}

const MODEL_V1: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-1, namespace: shop, uid: u1, labels: {app: cart}}
spec: {nodeName: node-a, serviceAccountName: cart, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}
";

const MODEL_V2_ADDS: &str = "\
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u2, labels: {app: web}}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c, image: i}]}
status: {phase: Running, podIP: 10.244.2.7, podIPs: [{ip: 10.244.2.7}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: cart-from-web, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  action: ALLOW
  rules: [{from: [{serviceAccounts: [shop/web]}]}]
";

/// Hand-made inputs to start fuzzing from (the corpus replay runs them too): each
/// kind of request, and manifests of each kind the controller reads.
pub fn request_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let hello = |position: Option<proto::Position>, node: &str| {
        let mut bytes = vec![0];
        proto::SubscribeRequest {
            message: Some(subscribe_request::Message::Hello(proto::Hello {
                node: node.into(),
                position,
                ..Default::default()
            })),
        }
        .encode(&mut bytes)
        .expect("a Vec grows");
        bytes
    };
    let store = store();
    let resync = proto::Position {
        epoch: 3,
        version: 9,
        buckets: api::digest::to_wire(&store.digests(&View::Node("node-a".into()))),
    };
    let resume = proto::Position {
        epoch: 7,
        version: 1,
        buckets: Vec::new(),
    };
    let mut ack = vec![0];
    proto::SubscribeRequest {
        message: Some(subscribe_request::Message::Ack(proto::Ack {
            epoch: 7,
            version: 2,
            rejected: vec![proto::Rejection {
                key: Some(api::Key::new(api::Kind::HttpRoute, "shop/r").to_proto()),
                reason: "a regex that does not compile".into(),
            }],
        })),
    }
    .encode(&mut ack)
    .expect("a Vec grows");
    let identity: Identity = "spiffe://cluster.local/ns/shop/sa/cart"
        .parse()
        .expect("an identity");
    let csr = build_csr(&identity).expect("a CSR");
    let sign = |identity: &str| {
        let mut bytes = vec![1];
        proto::SignRequest {
            identity: identity.into(),
            csr: csr.der.to_vec(),
        }
        .encode(&mut bytes)
        .expect("a Vec grows");
        bytes
    };
    vec![
        ("seed-hello-full", hello(None, "node-a")),
        ("seed-hello-resync", hello(Some(resync), "node-a")),
        ("seed-hello-resume", hello(Some(resume), "node-b")),
        ("seed-ack-refusing-a-route", ack),
        ("seed-sign", sign(identity.as_str())),
        (
            "seed-sign-other-identity",
            sign("spiffe://cluster.local/ns/shop/sa/web"),
        ),
    ]
}

/// Version 2 of the fixture: version 1, a pod on node-b and a policy.
fn model_v2() -> String {
    format!("{MODEL_V1}{MODEL_V2_ADDS}")
}

/// The fixture's manifests, as seeds for `manifests`.
pub fn manifest_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("seed-model-v1", MODEL_V1.into()),
        ("seed-model-v2", model_v2().into()),
    ]
}

/// Updates as the controller sends them (full states, a delta, a resync), each a
/// length-delimited sequence as a subscription delivers it: seeds for the model's
/// `model_updates` target, which cannot make them itself.
pub fn model_update_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let store = store();
    let node = View::Node("node-a".into());
    let encode = |updates: &[proto::Update]| {
        let mut bytes = Vec::new();
        for u in updates {
            u.encode_length_delimited(&mut bytes).expect("a Vec grows");
        }
        bytes
    };
    let full = store.full(&node);
    let delta = store.delta(&node, 1).expect("version 1 is kept");
    let empty = api::digest::to_wire(&[0; api::digest::BUCKETS]);
    let resync = store.resync(
        &View::Waypoint,
        &api::digest::from_wire(&empty).expect("digests"),
    );
    vec![
        ("seed-full-node", encode(std::slice::from_ref(&full))),
        ("seed-full-then-delta", encode(&[full, delta])),
        ("seed-full-waypoint", encode(&[store.full(&View::Waypoint)])),
        ("seed-resync-waypoint", encode(&[resync])),
    ]
}

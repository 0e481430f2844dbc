//! Fuzz harness for the model a proxy builds from the controller's updates: deltas,
//! resyncs and full states applied in sequence, and a restart from a full state. Used by
//! the `model_updates` target of `fuzz/` (cargo-fuzz) and by `tests/fuzz_corpus.rs`,
//! which replays the committed corpus.
//!
//! Input: a sequence of length-delimited `Update` messages, as a subscription delivers
//! them.

use prost::Message as _;

use crate::digest;
use crate::model::Model;
use crate::proto;

/// Applies each update of `data` in turn and checks, after each: the position a proxy
/// resumes from describes what it holds; the same update applied again changes
/// nothing; every workload and service is found by its addresses; and a proxy that
/// restarts from a full state of the same content holds the same resources and
/// endpoints.
pub fn updates(data: &[u8]) {
    let mut rest = data;
    let mut model = Model::default();
    while !rest.is_empty() {
        let Ok(update) = proto::Update::decode_length_delimited(&mut rest) else {
            return;
        };
        let applied = model.apply(&update);
        check(&applied.model);
        let again = applied.model.apply(&update);
        assert!(
            again.changed.is_empty(),
            "the same update applied twice changed {:?}",
            again.changed
        );
        model = applied.model;
    }
}

fn check(model: &Model) {
    let hashes = model.hashes().map(|(k, h)| (k, *h));
    assert_eq!(
        model.position().buckets,
        digest::to_wire(&crate::model::digests_of(hashes)),
        "the position does not describe the content"
    );
    for w in model.workloads() {
        for ip in &w.ips {
            let found = model.workload_by_ip(*ip).map(|f| f.uid.as_str());
            assert_eq!(found, Some(w.uid.as_str()), "workload {} at {ip}", w.uid);
        }
    }
    for s in model.services() {
        for vip in &s.vips {
            for port in &s.ports {
                let addr = std::net::SocketAddr::new(*vip, port.port);
                let found = model.service_by_vip(addr).map(|(f, _)| f.object_name());
                assert_eq!(found, Some(s.object_name()), "service at {addr}");
            }
        }
    }
    // A restart: the same content as one full state.
    let upserts = model
        .hashes()
        .map(|(key, _)| {
            model
                .resource(key)
                .unwrap_or_else(|| panic!("{key} is held but has no resource"))
                .to_proto()
        })
        .collect();
    let full = proto::Update {
        kind: proto::UpdateKind::Full as i32,
        epoch: model.epoch(),
        version: model.version(),
        upserts,
        ..Default::default()
    };
    let restarted = Model::default().apply(&full);
    assert!(restarted.rejected.is_empty(), "{:?}", restarted.rejected);
    let restarted = restarted.model;
    assert_eq!(restarted.len(), model.len());
    for (key, _) in model.hashes() {
        assert_eq!(restarted.resource(key), model.resource(key), "{key}");
    }
    for s in model.services() {
        for port in &s.ports {
            let name = s.object_name();
            assert_eq!(
                restarted.endpoints(&name, port.port),
                model.endpoints(&name, port.port),
                "endpoints of {name} port {}",
                port.port
            );
        }
    }
}

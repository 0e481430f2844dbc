//! Replays every committed fuzz corpus (`fuzz/corpus/<target>`) through its harness on
//! stable Rust, so every seed, and every crash input added after a fix, is checked by
//! each `.ci/run`. Seeds that a harness makes itself (protobuf messages, a real CSR) are
//! replayed too; `WEFT_FUZZ_WRITE_SEEDS=1` writes them into the corpus for `scripts/fuzz`.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// Runs `harness` on each file of the target's corpus and on `seeds`; a corpus holds at
/// least `min` files (the hand-written seeds, so a missing directory fails).
fn replay(target: &str, min: usize, seeds: Vec<(&str, Vec<u8>)>, harness: fn(&[u8])) {
    let dir = corpus(target);
    if std::env::var_os("WEFT_FUZZ_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).expect("write a seed");
        }
    }
    for (_, bytes) in &seeds {
        harness(bytes);
    }
    let mut n = 0;
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {} is committed: {e}", dir.display()))
    {
        let path = entry.expect("a corpus entry").path();
        let data = std::fs::read(&path).expect("a corpus file");
        harness(&data);
        n += 1;
    }
    assert!(
        n >= min,
        "expected at least {min} inputs in {}, found {n}",
        dir.display()
    );
}

#[test]
fn hbone_connect() {
    replay(
        "hbone_connect",
        10,
        Vec::new(),
        tunnel::testing::fuzz_connect,
    );
}

#[test]
fn route_request() {
    replay("route_request", 8, Vec::new(), waypoint::fuzzing::request);
}

#[test]
fn handoff_messages() {
    replay("handoff_messages", 5, Vec::new(), runtime::fuzzing::handoff);
}

#[test]
fn agent_requests() {
    replay(
        "agent_requests",
        4,
        Vec::new(),
        node_agent::fuzzing::request,
    );
}

#[test]
fn cni_invocation() {
    replay("cni_invocation", 4, Vec::new(), cni::fuzzing::invocation);
}

/// The test suite's manifests are seeds too (`scripts/fuzz` passes their directory to
/// the fuzzer beside the corpus).
#[test]
fn manifests() {
    let seeds = controller::fuzzing::manifest_seeds();
    replay("manifests", 2, seeds, controller::fuzzing::manifests);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut n = 0;
    for set in std::fs::read_dir(&dir).expect("tests/manifests") {
        for file in std::fs::read_dir(set.expect("an entry").path()).expect("a directory") {
            let data = std::fs::read(file.expect("an entry").path()).expect("a manifest");
            controller::fuzzing::manifests(&data);
            n += 1;
        }
    }
    assert!(n >= 10, "expected the test manifests in {}", dir.display());
}

#[test]
fn model_updates() {
    let seeds = controller::fuzzing::model_update_seeds();
    replay("model_updates", 4, seeds, api::fuzzing::updates);
}

#[test]
fn controller_requests() {
    let seeds = controller::fuzzing::request_seeds();
    replay(
        "controller_requests",
        6,
        seeds,
        controller::fuzzing::request,
    );
}

//! Replays the committed fuzz corpus (`waypoint/fuzz/corpus`) through the fuzz harness
//! on stable Rust, so every seed, and every crash input added after a fix, is checked
//! by each `.ci/run`.

use std::path::Path;

#[test]
fn route_request_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/route_request");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the corpus directory is committed") {
        let path = entry.expect("a corpus entry").path();
        let data = std::fs::read(&path).expect("a corpus file");
        waypoint::fuzzing::request(&data);
        n += 1;
    }
    assert!(
        n >= 8,
        "expected the committed seeds in {}, found {n}",
        dir.display()
    );
}

//! Replays the committed fuzz corpus through the fuzz harness, so every seed (and every
//! crash input added to the corpus after a fix) is checked on stable Rust in CI.

use std::path::Path;

#[test]
fn hbone_connect_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/hbone_connect");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory is committed") {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).expect("read corpus file");
        weft_tunnel::testing::fuzz_connect(&data);
        n += 1;
    }
    assert!(
        n >= 10,
        "expected the committed seeds in {}, found {n}",
        dir.display()
    );
}

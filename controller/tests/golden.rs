//! Golden translation tests: each directory under `tests/golden/` holds manifests
//! (`*.yaml`) and `expected.out`, the model, problems and statuses the controller makes
//! of them. A case fails when what the controller makes differs; after a deliberate
//! change, `WEFT_UPDATE_GOLDEN=1 cargo test -p weft-controller --test golden` rewrites
//! the expected files, to be reviewed in the diff.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use controller::translate::{translate, Audience, Settings, Translation};

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/golden exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// The translation as text: resources (key, audience, content), problems, statuses,
/// identities, with the case's directory removed from paths.
fn render(dir: &Path, problems: &[controller::objects::Problem], t: &Translation) -> String {
    let mut out = String::new();
    let strip = |s: String| s.replace(&format!("{}/", dir.display()), "");
    writeln!(out, "# resources").ok();
    let mut entries: Vec<_> = t.entries.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (key, entry) in entries {
        let audience = match &entry.audience {
            Audience::All => "all".to_owned(),
            Audience::Waypoints => "waypoints".to_owned(),
            Audience::Nodes(n) => {
                format!("nodes {}", n.iter().cloned().collect::<Vec<_>>().join(","))
            }
        };
        let spec = serde_json::to_string(&entry.resource).expect("resources serialize");
        writeln!(out, "{key} [{audience}]\n  {spec}").ok();
    }
    writeln!(out, "# problems").ok();
    for p in problems {
        writeln!(out, "{}", strip(p.to_string())).ok();
    }
    writeln!(out, "# statuses").ok();
    for s in &t.statuses {
        writeln!(out, "{}", s.object).ok();
        for (parent, conditions) in &s.parents {
            if let Some(parent) = parent {
                writeln!(out, "  parent {parent}").ok();
            }
            for c in conditions {
                writeln!(
                    out,
                    "    {} {} {}: {}",
                    c.type_, c.status, c.reason, c.message
                )
                .ok();
            }
        }
    }
    writeln!(out, "# identities").ok();
    let mut nodes: Vec<_> = t.identities.iter().collect();
    nodes.sort();
    for (node, ids) in nodes {
        writeln!(
            out,
            "{node}: {}",
            ids.iter().cloned().collect::<Vec<_>>().join(" ")
        )
        .ok();
    }
    out
}

#[test]
fn golden_translations() {
    let update = std::env::var_os("WEFT_UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for dir in cases() {
        let snapshot = controller::manifests::load(std::slice::from_ref(&dir))
            .expect("the case's directory reads");
        let settings = Settings {
            trust_domain: "cluster.local".into(),
            trust_bundle: Vec::new(),
        };
        let t = translate(&snapshot.objects, &settings);
        let mut problems = snapshot.problems.clone();
        problems.extend(t.problems.iter().cloned());
        let got = render(&dir, &problems, &t);
        let path = dir.join("expected.out");
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            if update {
                std::fs::write(&path, &got).expect("expected.out is writable");
            } else {
                failed.push(format!(
                    "{}:\n--- expected\n{want}\n--- got\n{got}",
                    dir.display()
                ));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "translations differ from tests/golden (rerun with WEFT_UPDATE_GOLDEN=1 to accept, then review the diff):\n{}",
        failed.join("\n")
    );
}

//! `weftctl install` and `uninstall` from the command line: each flag changes exactly the
//! fields it should, recorded per flag as golden files in `cli/tests/golden/` (the
//! fields that differ from the default rendering, one per line). Regenerate them after
//! an intended change with `WEFT_UPDATE_GOLDEN=1 cargo test -p weft-cli --test install`.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn weftctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rendered documents, in order.
fn documents(yaml: &str) -> Vec<Value> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v: Value = serde_json::to_value(
            <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc).unwrap(),
        )
        .unwrap();
        if !v.is_null() {
            out.push(v);
        }
    }
    out
}

/// `kind namespace/name` of each document.
fn names(docs: &[Value]) -> std::collections::BTreeSet<String> {
    docs.iter()
        .map(|v| {
            let md = &v["metadata"];
            format!(
                "{} {}/{}",
                v["kind"].as_str().unwrap(),
                md["namespace"].as_str().unwrap_or(""),
                md["name"].as_str().unwrap()
            )
        })
        .collect()
}

/// Every leaf as `path = value`.
fn leaves(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                leaves(&format!("{prefix}.{k}"), x, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(&format!("{prefix}[{i}]"), x, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), leaf.to_string());
        }
    }
}

/// What differs between two renderings, one field per line.
fn diff(base: &str, changed: &str) -> String {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    // Keyed by position and kind, so a renamed object shows as its changed fields.
    for (docs, out) in [(documents(base), &mut a), (documents(changed), &mut b)] {
        for (i, doc) in docs.iter().enumerate() {
            leaves(
                &format!("#{i:02} {}", doc["kind"].as_str().unwrap()),
                doc,
                out,
            );
        }
    }
    let mut out = String::new();
    for (path, old) in &a {
        match b.get(path) {
            Some(new) if new == old => {}
            Some(new) => out.push_str(&format!("~ {path}: {old} -> {new}\n")),
            None => out.push_str(&format!("- {path}: {old}\n")),
        }
    }
    for (path, new) in &b {
        if !a.contains_key(path) {
            out.push_str(&format!("+ {path}: {new}\n"));
        }
    }
    out
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs from what was rendered; if the change is intended, regenerate with \
         WEFT_UPDATE_GOLDEN=1 cargo test -p weft-cli --test install\n--- rendered:\n{actual}",
        path.display()
    );
}

#[test]
fn each_flag_changes_exactly_its_fields() {
    let (code, base, err) = weftctl(&["install"]);
    assert_eq!(code, 0, "{err}");
    for (flag, value) in [
        ("namespace", "mesh"),
        ("trust-domain", "prod.example"),
        ("image", "registry.internal/weft:9.9.9"),
        ("log-level", "weft=debug,info"),
    ] {
        let (code, out, err) = weftctl(&["install", &format!("--{flag}"), value]);
        assert_eq!(code, 0, "--{flag}: {err}");
        let changed = diff(&base, &out);
        assert!(!changed.is_empty(), "--{flag} changed nothing");
        golden(&format!("install--{flag}.txt"), &changed);
    }
}

#[test]
fn the_default_is_deploy_weft_yaml() {
    let (code, out, err) = weftctl(&["install"]);
    assert_eq!(code, 0, "{err}");
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/weft.yaml"))
            .unwrap();
    assert!(
        out == committed,
        "deploy/weft.yaml is not what weftctl install prints"
    );
}

#[test]
fn uninstall_names_every_installed_object_dependents_first() {
    for args in [&[][..], &["--namespace", "mesh"][..]] {
        let (_, installed, _) = weftctl(&[&["install"][..], args].concat());
        let (code, removed, err) = weftctl(&[&["uninstall"][..], args].concat());
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            names(&documents(&installed)),
            names(&documents(&removed)),
            "uninstall names what install creates"
        );
        // The DaemonSet goes before its namespace: its CNI installers see it gone.
        let ds = removed.find("kind: DaemonSet").unwrap();
        let ns = removed.find("kind: Namespace").unwrap();
        assert!(ds < ns);
    }
}

#[test]
fn a_bad_flag_value_is_refused_naming_the_flag() {
    let (code, out, err) = weftctl(&["install", "--namespace", "Weft_System"]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "nothing half-rendered: {out}");
    assert!(err.contains("--namespace \"Weft_System\""), "{err}");
}

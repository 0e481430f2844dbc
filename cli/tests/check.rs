//! `weftctl check`: the controller's reading of a manifest directory, from the command
//! line: every problem with file, line, object, field and reason, and the exit code.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::process::Command;

fn check(dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .arg("check")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_demo_is_clean() {
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let (code, stdout, stderr) = check(&demo);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("0 problems"), "{stderr}");
}

#[test]
fn problems_are_named_and_fail_the_check() {
    let dir = std::env::temp_dir().join(format!("weft-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("apps.yaml"),
        "apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{principals: [\"spiffe://cluster.local/ns/*/sa/x\"]}]}]
",
    )
    .unwrap();
    std::fs::write(dir.join("broken.yml"), "kind: [\n").unwrap();
    let (code, stdout, _) = check(&dir);
    assert_eq!(code, 1, "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let apps = dir.join("apps.yaml").display().to_string();
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "{apps}:5: Service shop/cart: spec.clusterIP: \"10.96.0.300\" is not an IP address"
        ))),
        "{stdout}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "{apps}:10: AuthorizationPolicy shop/typo: spec.rules[0].from[0].principals[0]:"
        )) && l.contains("denies every connection until it is fixed")),
        "{stdout}"
    );
    let broken = dir.join("broken.yml").display().to_string();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{broken}:")) && l.contains("not valid YAML")),
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

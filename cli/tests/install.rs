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
        // The header lists the order kubectl deletes in: the documents' order, the node
        // agents' DaemonSet before any RBAC.
        let listed: Vec<String> = removed
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter_map(|l| l.trim_start_matches('#').trim_start().split_once(". "))
            .filter(|(n, _)| n.parse::<usize>().is_ok())
            .map(|(_, what)| what.to_owned())
            .collect();
        let docs: Vec<String> = documents(&removed)
            .iter()
            .map(|v| {
                let md = &v["metadata"];
                match md["namespace"].as_str() {
                    Some(ns) => format!(
                        "{} {ns}/{}",
                        v["kind"].as_str().unwrap(),
                        md["name"].as_str().unwrap()
                    ),
                    None => format!(
                        "{} {}",
                        v["kind"].as_str().unwrap(),
                        md["name"].as_str().unwrap()
                    ),
                }
            })
            .collect();
        assert_eq!(listed, docs);
        let agent = listed
            .iter()
            .position(|l| l.starts_with("DaemonSet") && l.ends_with("weft-node-agent"))
            .unwrap();
        let first_rbac = listed.iter().position(|l| l.contains("Role")).unwrap();
        assert!(agent < first_rbac, "{listed:?}");
    }
}

#[test]
fn a_bad_flag_value_is_refused_naming_the_flag() {
    let (code, out, err) = weftctl(&["install", "--namespace", "Weft_System"]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "nothing half-rendered: {out}");
    assert!(err.contains("--namespace \"Weft_System\""), "{err}");
}

/// Each platform's whole rendering, as a golden file (`generic` is `deploy/weft.yaml`).
#[test]
fn each_platform_renders_its_golden_file() {
    for platform in controller::install::Platform::ALL {
        let (code, out, err) = weftctl(&["install", "--platform", platform.name()]);
        assert_eq!(code, 0, "--platform {platform}: {err}");
        if platform == controller::install::Platform::Generic {
            let (_, default, _) = weftctl(&["install"]);
            assert_eq!(out, default, "generic is the default");
            continue;
        }
        golden(&format!("platform/{platform}.yaml"), &out);
    }
    // What the platform flags set, each checked in its rendering.
    let docs = |args: &[&str]| documents(&weftctl(&[&["install"][..], args].concat()).1);
    let agent_volumes = |docs: &[Value]| -> Vec<String> {
        let ds = docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "weft-node-agent")
            .unwrap();
        ds["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_owned))
            .collect()
    };
    let gke = docs(&["--platform", "gke"]);
    assert!(agent_volumes(&gke).contains(&"/home/kubernetes/bin".to_owned()));
    assert!(gke.iter().any(|d| d["kind"] == "ResourceQuota"));
    let k3s = docs(&["--platform", "k3s", "--cni-bin-dir", "/opt/k3s/bin"]);
    let volumes = agent_volumes(&k3s);
    assert!(volumes.contains(&"/opt/k3s/bin".to_owned()), "{volumes:?}");
    assert!(volumes.contains(&"/var/lib/rancher/k3s/agent/etc/cni/net.d".to_owned()));
    let openshift = serde_json::to_string(&docs(&["--platform", "openshift"])).unwrap();
    for wanted in [
        "spc_t",
        "securitycontextconstraints",
        "podSecurityLabelSync",
    ] {
        assert!(openshift.contains(wanted), "openshift lacks {wanted}");
    }
}

/// The node agent publishes the enrolled namespaces for `weft-cni` in a node directory
/// a reboot keeps: after one, the plugin (still in the node's CNI configuration) runs
/// before the agent is back, and without the file it would start enrolled pods
/// uncaptured. The plugin reads the path the agent writes, so the mount is at the
/// node's own path.
#[test]
fn the_agents_published_state_outlives_a_reboot() {
    for platform in controller::install::Platform::ALL {
        let docs = documents(&weftctl(&["install", "--platform", platform.name()]).1);
        let pod = &docs
            .iter()
            .find(|d| d["kind"] == "DaemonSet" && d["metadata"]["name"] == "weft-node-agent")
            .unwrap()["spec"]["template"]["spec"];
        let agent = &pod["containers"][0];
        let args: Vec<&str> = agent["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let state = args
            .iter()
            .position(|a| *a == "--state")
            .and_then(|i| args.get(i + 1))
            .unwrap_or_else(|| panic!("{platform}: the agent is given no --state: {args:?}"));
        let volume = agent["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| {
                m["mountPath"]
                    .as_str()
                    .is_some_and(|p| state.starts_with(&format!("{p}/")))
            })
            .and_then(|m| {
                pod["volumes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .map(|v| (m["mountPath"].clone(), v["hostPath"]["path"].clone()))
            })
            .unwrap_or_else(|| panic!("{platform}: {state} is on no volume"));
        assert_eq!(
            volume.0, volume.1,
            "{platform}: {state} is not at the node's own path"
        );
        assert!(
            !state.starts_with("/run/") && !state.starts_with("/var/run/"),
            "{platform}: {state} is emptied by a reboot"
        );
    }
}

/// Every rendering, a waypoint's objects and the demo pass the API server's own schemas, as `kubernetes-validate --strict`
/// applies them (unknown fields refused), at the oldest Kubernetes release Weft supports
/// and the newest the tool knows.
#[test]
#[ignore = "needs kubernetes-validate (scripts/deps installs it)"]
fn every_platform_passes_the_api_servers_schemas() {
    let tool = kubernetes_validate();
    let dir = std::env::temp_dir().join(format!("weft-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for platform in controller::install::Platform::ALL {
        let (code, out, err) = weftctl(&["install", "--platform", platform.name()]);
        assert_eq!(code, 0, "{err}");
        let file = dir.join(format!("{platform}.yaml"));
        std::fs::write(&file, out).unwrap();
        files.push(file);
    }
    // And what the controller applies for a waypoint Gateway.
    let gateway: gateway_api::gateways::Gateway = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "uid": "4d2c1f4e-0000-4000-8000-000000000001"},
        "spec": {"gatewayClassName": "weft-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    }))
    .unwrap();
    let settings = controller::waypoints::Settings {
        image: controller::install::DEFAULT_IMAGE.into(),
        controller: "weft-controller.weft-system.svc:15012".into(),
        controller_name: "weft-controller.weft-system.svc".into(),
        trust_domain: "cluster.local".into(),
        roots_pem: "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n".into(),
    };
    // Autoscaled too, for its HorizontalPodAutoscaler (named apart).
    let mut autoscaled = gateway.clone();
    autoscaled.metadata.name = Some("autoscaled".into());
    let parameters: controller::crd::WaypointParametersSpec =
        serde_json::from_value(serde_json::json!({"autoscaling": {"maxReplicas": 6}})).unwrap();
    let waypoint: String = controller::waypoints::desired(&gateway, &settings)
        .unwrap()
        .into_iter()
        .chain(
            controller::waypoints::desired_with(&autoscaled, Some(&parameters), &settings)
                .unwrap()
                .into_iter()
                .filter(|(kind, _)| *kind != "ConfigMap"),
        )
        .map(|(_, object)| format!("---\n{}", serde_yaml_ng::to_string(&object).unwrap()))
        .collect();
    let file = dir.join("waypoint.yaml");
    std::fs::write(&file, waypoint).unwrap();
    files.push(file);
    // And the demo, which applies to a cluster as written.
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let mut examples: Vec<_> = std::fs::read_dir(&demo)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    examples.sort();
    assert!(!examples.is_empty());
    files.extend(examples);
    let (_, uninstall, _) = weftctl(&["uninstall", "--platform", "openshift"]);
    assert!(!uninstall.is_empty());
    for version in [controller::install::OLDEST_KUBERNETES, "1.37"] {
        let out = Command::new(&tool)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .args(&files)
            .output()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The Gateway API and SCC kinds are not Kubernetes' own: the tool has no schema
        // for them and says so; anything else it says is a refusal.
        let problems: Vec<&str> = report
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("Couldn't find schema for kind"))
            .collect();
        assert!(
            out.status.success() && problems.is_empty(),
            "Kubernetes {version}:\n{report}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `kubernetes-validate` that scripts/deps installs (or one on PATH).
fn kubernetes_validate() -> std::path::PathBuf {
    let venv = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".cache/weft/venv/bin/kubernetes-validate"))
        .filter(|p| p.exists());
    venv.unwrap_or_else(|| "kubernetes-validate".into())
}

#[test]
fn an_image_without_a_release_or_malformed_is_refused() {
    for good in [
        "registry.internal/weft:9.9.9",
        "registry.internal:5000/team/weft:1.0.0-rc.1",
        "localhost/weft:dev",
        "weft@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "Registry.Internal:5000/team/web-app__x:1.0@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "MyRegistry/weft:1",
    ] {
        let (code, _, err) = weftctl(&["install", "--image", good]);
        assert_eq!(code, 0, "{good}: {err}");
    }
    for (bad, why) in [
        ("registry.internal/weft", "no tag or digest"),
        ("Registry/Weft:1", "repository"),
        ("weft:1 0", "tag"),
        ("weft:", "tag"),
        ("registry.internal:99999/weft:1", "registry"),
        ("weft@sha256:xyz", "digest"),
        (
            "weft@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "digest",
        ),
        ("weft@sha256:0123456789abcdef0123456789abcdef", "digest"),
        ("registry.internal/a..b:1", "repository"),
        ("registry.internal/a.-b:1", "repository"),
    ] {
        let (code, out, err) = weftctl(&["install", "--image", bad]);
        assert_ne!(code, 0, "{bad} accepted");
        assert!(out.is_empty(), "nothing half-rendered: {out}");
        assert!(err.contains("--image") && err.contains(why), "{bad}: {err}");
    }
    let (_, out, _) = weftctl(&["install"]);
    let image = format!(
        "image: registry.weft.dev/weft:{}",
        env!("CARGO_PKG_VERSION")
    );
    assert!(out.contains(&image), "the default names this release");
}

#[test]
fn a_cni_directory_must_be_an_absolute_node_path() {
    for bad in ["opt/cni/bin", "/opt/../etc", "/opt/cni bin"] {
        let (code, _, err) = weftctl(&["install", "--cni-bin-dir", bad]);
        assert_ne!(code, 0, "{bad} accepted");
        assert!(err.contains("--cni-bin-dir"), "{err}");
    }
    let (code, _, err) = weftctl(&["install", "--platform", "minikube"]);
    assert_ne!(code, 0);
    assert!(err.contains("openshift"), "names the platforms: {err}");
}

/// The validation tier refuses what an API server refuses: a deliberately invalid object
/// of each built-in kind Weft renders or ships is refused by `kubernetes-validate
/// --strict` at the oldest and newest Kubernetes (an unknown field, a wrong type, a
/// missing required field).
#[test]
#[ignore = "needs kubernetes-validate (scripts/deps installs it)"]
fn the_validation_tier_refuses_an_invalid_object_of_each_kind() {
    let tool = kubernetes_validate();
    let dir = std::env::temp_dir().join(format!("weft-invalid-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let invalid = [
        ("Namespace", "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\nspec: {finalizerz: []}\n"),
        ("ServiceAccount", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\nautomountServiceAccountToken: sometimes\n"),
        ("ConfigMap", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: {a: {b: c}}\n"),
        ("Service", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: http}]}\n"),
        ("Pod", "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c, imagePullPolicy: Always, nodeNme: y}]}\n"),
        ("Deployment", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {replicas: two, selector: {}, template: {}}\n"),
        ("DaemonSet", "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\nspec: {template: {spec: {containers: [{name: c}]}}}\n"),
        ("PodDisruptionBudget", "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {name: x}\nspec: {minAvailable: 1, selector: {matchLabelz: {}}}\n"),
        ("ClusterRole", "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {name: x}\nrules: [{apiGroups: [''], resources: [pods]}]\n"),
        ("ClusterRoleBinding", "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: x}\nsubjects: []\n"),
        ("Role", "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: x}\nrules: {}\n"),
        ("RoleBinding", "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: x}\nroleRef: {kind: Role}\n"),
        ("ResourceQuota", "apiVersion: v1\nkind: ResourceQuota\nmetadata: {name: x}\nspec: {hardd: {pods: \"1\"}}\n"),
        ("ValidatingAdmissionPolicy", "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy\nmetadata: {name: x}\nspec: {validations: [{message: m}]}\n"),
        ("ValidatingAdmissionPolicyBinding", "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicyBinding\nmetadata: {name: x}\nspec: {validationActions: [Deny], policyNam: x}\n"),
        ("CustomResourceDefinition", "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: x}\nspec: {group: g, scope: Somewhere}\n"),
    ];
    // Every kind `weftctl install` and the waypoints render is among them.
    let (_, rendered, _) = weftctl(&["install", "--platform", "gke"]);
    for doc in serde_yaml_ng::Deserializer::from_str(&rendered) {
        let doc = <Value as serde::Deserialize>::deserialize(doc).unwrap();
        let kind = doc["kind"].as_str().unwrap_or_default();
        if kind.is_empty() || kind == "GatewayClass" {
            continue;
        }
        assert!(
            invalid.iter().any(|(k, _)| *k == kind),
            "no deliberately invalid {kind} here"
        );
    }
    for version in [controller::install::OLDEST_KUBERNETES, "1.37"] {
        for (kind, text) in invalid {
            let file = dir.join(format!("{kind}.yaml"));
            std::fs::write(&file, text).unwrap();
            let out = Command::new(&tool)
                .args(["--strict", "--quiet", "--kubernetes-version", version])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "Kubernetes {version} accepts the invalid {kind}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

//! `weftctl check DIR...`: the controller's reading of manifest directories, without a
//! controller: every problem with its file, line, object, field and reason.

use std::path::PathBuf;

use controller::translate::{translate, Settings};

/// Prints the problems found in `dirs` (to stdout) and a summary (to stderr); returns
/// how many there are.
pub fn check(dirs: &[PathBuf], trust_domain: &str) -> anyhow::Result<usize> {
    let snapshot = controller::manifests::load(dirs)?;
    let settings = Settings {
        trust_domain: trust_domain.to_owned(),
        trust_bundle: Vec::new(),
    };
    let translation = translate(&snapshot.objects, &settings);
    let mut problems = snapshot.problems;
    problems.extend(translation.problems);
    for p in &problems {
        println!("{p}");
    }
    eprintln!(
        "{} objects read, {} resources in the model, {} problem{}",
        snapshot.objects.len(),
        translation.entries.len(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    Ok(problems.len())
}

/// One pre-install check: what was checked and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    /// What is checked.
    pub what: &'static str,
    /// `Ok(found)` or `Err(what is wrong and what to do)`.
    pub result: Result<String, String>,
}

/// Checks a node can run Weft before installing: network namespaces, the kernel's
/// nftables as the node agent reaches it (netlink; no `nft` binary needed), and a chained
/// CNI configuration in `cni_conf_dir` for weft-cni to join.
pub async fn preflight(cni_conf_dir: &std::path::Path) -> Vec<Preflight> {
    let nftables = node_agent::capture::nftables_usable()
        .await
        .map(|tables| format!("the kernel's nftables answers ({tables} tables)"))
        .map_err(|e| e.to_string());
    let mut out = Vec::new();
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(|e| format!("uname: {e}"));
    out.push(Preflight {
        what: "kernel",
        result: kernel.map(|release| format!("Linux {release}")),
    });
    out.push(Preflight {
        what: "network namespaces",
        result: if std::path::Path::new("/proc/self/ns/net").exists() {
            Ok("/proc/self/ns/net present".into())
        } else {
            Err("/proc/self/ns/net is missing: the kernel has no network namespaces (CONFIG_NET_NS)".into())
        },
    });
    out.push(Preflight {
        what: "nftables",
        result: nftables.map_err(|e| {
            format!("{e} (run as root; the kernel needs nf_tables, which the node agent programs over netlink)")
        }),
    });
    out.push(Preflight {
        what: "CNI configuration",
        result: match node_agent::chain::primary_conflist(cni_conf_dir) {
            Ok(p) => Ok(format!("{} (weft-cni joins this chain)", p.display())),
            Err(node_agent::chain::InstallError::NotAConflist { first }) => Ok(format!(
                "{} (one plugin: the node agent makes it a chain with weft-cni)",
                first.display()
            )),
            Err(e) => Err(e.to_string()),
        },
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result<'a>(checks: &'a [Preflight], what: &str) -> &'a Result<String, String> {
        &checks
            .iter()
            .find(|c| c.what == what)
            .expect("every check is reported")
            .result
    }

    #[ignore = "needs root"]
    #[tokio::test(flavor = "current_thread")]
    async fn preflight_reads_nftables_over_netlink_and_names_a_missing_chain() {
        let dir = std::env::temp_dir().join(format!("weft-preflight-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let checks = preflight(&dir).await;
        assert!(
            result(&checks, "nftables").is_ok(),
            "{:?}",
            result(&checks, "nftables")
        );
        let missing = result(&checks, "CNI configuration");
        assert!(
            missing
                .as_ref()
                .is_err_and(|e| e.contains(&dir.display().to_string())),
            "{missing:?}"
        );
        std::fs::write(dir.join("10-net.conflist"), r#"{"plugins": []}"#).expect("write");
        let checks = preflight(&dir).await;
        assert!(result(&checks, "CNI configuration").is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Where CRDs to check manifests against come from.
#[derive(Debug, Clone)]
pub enum CrdSource {
    /// Files (or directories of files) of CustomResourceDefinitions.
    Files(Vec<PathBuf>),
    /// The cluster's API server (the current kubeconfig).
    Cluster,
}

/// What an API server with the given CRDs would say of one object of the manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdFinding {
    /// The file.
    pub file: PathBuf,
    /// `Kind namespace/name`.
    pub object: String,
    /// `field: what is wrong`, as the API server words it.
    pub violation: String,
    /// The CRD bundle it was checked against (Gateway API's `bundle-version` and
    /// `channel` annotations), when it says.
    pub bundle: Option<String>,
}

impl std::fmt::Display for CrdFinding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.object,
            self.violation
        )?;
        if self.violation.contains("was unexpected") {
            write!(
                f,
                " — these CRDs do not have this field: `kubectl apply` refuses the object, \
                 or (without strict field validation) stores it with the field dropped"
            )?;
        }
        if let Some(b) = &self.bundle {
            write!(f, " (CRDs: {b})")?;
        }
        Ok(())
    }
}

/// The CustomResourceDefinitions among the YAML documents of `paths` (files, or
/// directories of `*.yaml`/`*.yml`).
pub fn crds_from_files(paths: &[PathBuf]) -> anyhow::Result<Vec<serde_json::Value>> {
    use anyhow::Context;
    let mut out = Vec::new();
    for path in paths {
        for file in yaml_files(path)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            out.extend(
                documents(&text)
                    .with_context(|| format!("{} is not YAML", file.display()))?
                    .into_iter()
                    .filter(|d| d["kind"] == "CustomResourceDefinition"),
            );
        }
    }
    Ok(out)
}

/// The cluster's CustomResourceDefinitions of Gateway API and Weft.
pub async fn crds_from_cluster(client: &kube::Client) -> anyhow::Result<Vec<serde_json::Value>> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    let list = api
        .list(&kube::api::ListParams::default())
        .await
        .map_err(|e| anyhow::anyhow!("cannot list the cluster's CustomResourceDefinitions: {e}"))?;
    Ok(list
        .items
        .into_iter()
        .filter(|c| c.spec.group == "gateway.networking.k8s.io" || c.spec.group == "weft.dev")
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect())
}

/// Checks every object of `dirs` that `crds` define as an API server with them would:
/// what it would refuse, field by field.
pub fn check_against_crds(
    dirs: &[PathBuf],
    crds: &[serde_json::Value],
) -> anyhow::Result<Vec<CrdFinding>> {
    use anyhow::Context;
    let checks = crdcheck::Crds::new(crds).context("cannot use the CRDs")?;
    let bundles: Vec<(String, String, Option<String>)> = crds
        .iter()
        .map(|c| {
            let a = &c["metadata"]["annotations"];
            let bundle = a["gateway.networking.k8s.io/bundle-version"]
                .as_str()
                .map(|v| match a["gateway.networking.k8s.io/channel"].as_str() {
                    Some(ch) => format!("Gateway API {v}, {ch} channel"),
                    None => format!("Gateway API {v}"),
                });
            (
                c["spec"]["group"].as_str().unwrap_or_default().to_owned(),
                c["spec"]["names"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                bundle,
            )
        })
        .collect();
    let mut findings = Vec::new();
    for dir in dirs {
        for file in yaml_files(dir)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let Ok(objects) = documents(&text) else {
                // Not YAML: the controller's reading reports it.
                continue;
            };
            for object in objects {
                let Some(crd) = checks.for_object(&object) else {
                    continue;
                };
                let (group, kind) = crd.group_kind();
                let bundle = bundles
                    .iter()
                    .find(|(g, k, _)| g == group && k == kind)
                    .and_then(|(_, _, b)| b.clone());
                for v in crd.check(&object) {
                    findings.push(CrdFinding {
                        file: file.clone(),
                        object: format!(
                            "{} {}/{}",
                            kind,
                            object["metadata"]["namespace"]
                                .as_str()
                                .unwrap_or("default"),
                            object["metadata"]["name"].as_str().unwrap_or_default()
                        ),
                        violation: v.to_string(),
                        bundle: bundle.clone(),
                    });
                }
            }
        }
    }
    Ok(findings)
}

fn yaml_files(path: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context;
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot list {}", path.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn documents(text: &str) -> Result<Vec<serde_json::Value>, serde_yaml_ng::Error> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for d in serde_yaml_ng::Deserializer::from_str(text) {
        let v = serde_json::Value::deserialize(d)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod crd_tests {
    use super::*;

    fn repo() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn gateway_api(release: &str, channel: &str) -> PathBuf {
        repo()
            .join("../shared/gateway-api")
            .join(release)
            .join(channel)
    }

    /// The test manifests' retried routes, against Gateway API's standard channel: each
    /// named with its field, the CRD bundle, and what happens to it; the experimental
    /// channel takes them.
    #[test]
    fn routes_using_a_field_the_crds_lack_are_named_with_the_bundle() {
        let manifests = [repo().join("tests/manifests/waypoint")];
        let standard = crds_from_files(&[gateway_api("v1.4.1", "standard")]).expect("CRDs");
        let findings = check_against_crds(&manifests, &standard).expect("checked");
        let text: Vec<String> = findings.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("HTTPRoute shop/flaky-retry: spec.rules[0]")
                    && t.contains("'retry'")
                    && t.contains("stores it with the field dropped")
                    && t.contains("(CRDs: Gateway API v1.4.1, standard channel)")),
            "{text:#?}"
        );
        let experimental = crds_from_files(&[gateway_api("v1.4.1", "experimental")]).expect("CRDs");
        let none = check_against_crds(&manifests, &experimental).expect("checked");
        assert!(none.is_empty(), "{none:#?}");
    }

    /// The same against the cluster's CRDs, read from its API server.
    #[tokio::test]
    async fn the_clusters_crds_are_read_from_its_api_server() {
        let standard = crds_from_files(&[gateway_api("v1.6.1", "standard")]).expect("CRDs");
        let list = serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinitionList",
            "metadata": {},
            "items": standard,
        });
        let client = crate::testing::api_server(move |path, _| {
            match path == "/apis/apiextensions.k8s.io/v1/customresourcedefinitions" {
                true => (200, list.clone()),
                false => crate::testing::not_found(),
            }
        });
        let crds = crds_from_cluster(&client).await.expect("listed");
        assert!(crds.len() >= 5, "{}", crds.len());
        let findings = check_against_crds(&[repo().join("examples/demo")], &crds).expect("checked");
        assert!(
            findings
                .iter()
                .any(|f| f.object == "HTTPRoute demo/echo-canary"
                    && f.bundle.as_deref() == Some("Gateway API v1.6.1, standard channel")),
            "{findings:#?}"
        );
    }
}

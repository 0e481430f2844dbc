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

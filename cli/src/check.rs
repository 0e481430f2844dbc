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

/// Checks a node can run Weft before installing: network namespaces, nftables usable
/// (the capture rules), and a chained CNI configuration in `cni_conf_dir` for weft-cni
/// to join.
pub fn preflight(cni_conf_dir: &std::path::Path) -> Vec<Preflight> {
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
    let nft = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output();
    out.push(Preflight {
        what: "nftables",
        result: match nft {
            Err(e) => Err(format!(
                "cannot run nft ({e}); install the nftables package"
            )),
            Ok(o) if !o.status.success() => Err(format!(
                "nft list tables failed: {} (run as root; the kernel needs nf_tables)",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Ok(_) => Ok("nft can read the ruleset".into()),
        },
    });
    out.push(Preflight {
        what: "CNI configuration",
        result: node_agent::chain::primary_conflist(cni_conf_dir)
            .map(|p| format!("{} (weft-cni joins this chain)", p.display()))
            .map_err(|e| e.to_string()),
    });
    out
}

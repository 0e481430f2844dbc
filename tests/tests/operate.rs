//! Operating a running mesh: `weftctl status` and `weftctl check --local` against a
//! sandbox through its admin ports: all synced at first; then one node-proxy stopped
//! (SIGSTOP: it holds its sockets but answers nothing) and one left on a stale model
//! (its token no longer valid, so after a controller restart it cannot resubscribe and
//! serves on from its last model) are each named, and `check` fails.

#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use weft_e2e::{eventually, repo_root, weftctl, Sandbox, TempManifests};

fn status(sb: &Sandbox, json: bool) -> String {
    let mut cmd = std::process::Command::new(weftctl().unwrap());
    cmd.args(["status", "--local", &sb.name, "--state-dir"])
        .arg(&sb.state_dir);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn check(sb: &Sandbox) -> (i32, String) {
    let out = std::process::Command::new(weftctl().unwrap())
        .args(["check", "--local", &sb.name, "--state-dir"])
        .arg(&sb.state_dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Resumes a stopped process when dropped, so the sandbox can be torn down.
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

#[test]
#[ignore = "needs root"]
fn status_and_check_name_a_stopped_and_a_stale_node_proxy() {
    let manifests = TempManifests::copy(&repo_root().join("tests/manifests/mesh")).unwrap();
    let mut sb = Sandbox::up("e2e-status", manifests.path()).unwrap();
    // One connection across the mesh, so node-proxies hold certificates.
    let echo = sb.ip("shop/echo").unwrap();
    let (code, body) = sb
        .curl("shop/client", &format!("http://{echo}:8080/"))
        .unwrap();
    assert_eq!(code, 0, "{body}");

    // Healthy: every node-proxy synced (acknowledging may lag a moment).
    let healthy = eventually(Duration::from_secs(10), || {
        let (code, out) = check(&sb);
        (code == 0).then_some(out)
    });
    assert!(
        healthy.is_some(),
        "check fails on a healthy sandbox: {:?}",
        check(&sb)
    );
    let report: Value = serde_json::from_str(&status(&sb, true)).unwrap();
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{report}");
    let controller = &report["controller"];
    for n in nodes {
        assert_eq!(n["epoch"], controller["epoch"], "{report}");
        assert_eq!(n["modelVersion"], controller["modelVersion"], "{report}");
        assert_eq!(n["version"], controller["version"], "{report}");
        assert!(n["pods"].as_u64().unwrap() >= 2, "{report}");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let with_certs: Vec<&Value> = nodes
        .iter()
        .filter(|n| n["certificates"].as_u64().unwrap() > 0)
        .collect();
    assert!(
        !with_certs.is_empty(),
        "no node-proxy holds a certificate: {report}"
    );
    for n in with_certs {
        assert!(
            n["earliestExpiry"].as_u64().unwrap() > now + 3600,
            "{report}"
        );
    }
    let table = status(&sb, false);
    assert_eq!(table.matches(" synced ").count(), 2, "{table}");

    // node-2's token stops being valid; a controller restart makes it resubscribe,
    // which is refused: it serves on from its last model, now stale.
    let token = sb.state["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-2")
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::write(&token, "not-the-token\n").unwrap();
    for step in ["stop", "start"] {
        sb.run_local(&["controller", step]).unwrap();
    }
    sb.refresh().unwrap();
    // node-1 resubscribes to the new controller; then it is stopped.
    let resynced = eventually(Duration::from_secs(30), || {
        let report: Value = serde_json::from_str(&status(&sb, true)).ok()?;
        let node1 = report["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["node"] == "node-1")?
            .clone();
        (node1["epoch"] == report["controller"]["epoch"]
            && node1["modelVersion"] == report["controller"]["modelVersion"])
            .then_some(())
    });
    assert!(
        resynced.is_some(),
        "node-1 never resubscribed:\n{}",
        status(&sb, false)
    );
    let stopped = Stopped(sb.node_pid("node-1").unwrap());
    kill(Pid::from_raw(stopped.0), Signal::SIGSTOP).unwrap();

    let (code, out) = check(&sb);
    assert_eq!(code, 1, "{out}");
    let line = |node: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("node-proxy on {node}:")))
            .unwrap_or_else(|| panic!("nothing about {node}:\n{out}"))
            .to_owned()
    };
    assert!(line("node-1").contains("not reachable"), "{out}");
    let stale = line("node-2");
    assert!(stale.contains("stale configuration"), "{out}");
    assert!(
        stale.contains("last error"),
        "the reason it cannot resubscribe is shown: {out}"
    );
    let table = status(&sb, false);
    let row = |node: &str| {
        table
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("no row for {node}:\n{table}"))
            .to_owned()
    };
    eprintln!("weftctl check --local:\n{out}\nweftctl status --local:\n{table}");
    assert!(row("node-1").contains(" down "), "{table}");
    assert!(row("node-2").contains(" stale "), "{table}");
    drop(stopped);
    sb.stop().unwrap();
}

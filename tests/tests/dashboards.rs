//! The Grafana dashboards of `deploy/dashboards/` against a real Prometheus: the demo runs
//! in the sandbox with `--prometheus` (Debian's `prometheus`, scraping every second), and
//! every PromQL expression of every panel must parse and return data.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cli::prometheus::{label_variables, panels, query, substitute};
use serde_json::Value;
use weft_e2e::{repo_root, Sandbox, TempManifests};

/// Grafana's interval variables as a dashboard on a 1 s scrape would see them.
const INTERVALS: [(&str, &str); 3] = [
    ("__rate_interval", "10s"),
    ("__interval", "2s"),
    ("__range", "1m"),
];

/// `values` as Grafana renders a multi-value selection into a regex matcher, escaped for
/// a PromQL string.
fn all_of(values: &[String]) -> String {
    let escaped: Vec<String> = values
        .iter()
        .map(|v| {
            v.chars()
                .flat_map(|c| match c {
                    '.' | '+' | '*' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' | '^' | '$'
                    | '\\' => vec!['\\', '\\', c],
                    '"' => vec!['\\', '"'],
                    c => vec![c],
                })
                .collect()
        })
        .collect();
    format!("({})", escaped.join("|"))
}

struct Dashboard {
    title: String,
    json: Value,
}

fn dashboards() -> Vec<Dashboard> {
    let dir = repo_root().join("deploy/dashboards");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let text =
                std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let json: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let title = json["title"].as_str().unwrap_or("?").to_owned();
            Dashboard { title, json }
        })
        .collect()
}

/// (dashboard, panel, expr as evaluated, series or the error).
type Outcome = (String, String, String, Result<usize, String>);

fn evaluate(prom: SocketAddr, all: &[Dashboard]) -> Vec<Outcome> {
    let mut out = Vec::new();
    for d in all {
        // Template variables: every value Prometheus knows, as "All" selected by hand.
        let mut values: Vec<(String, String)> = Vec::new();
        for (name, metric, label) in label_variables(&d.json) {
            let found: Vec<String> = query(prom, &format!("group by ({label}) ({metric})"))
                .map(|s| {
                    s.into_iter()
                        .filter_map(|s| s.labels.get(&label).cloned())
                        .collect()
                })
                .unwrap_or_default();
            values.push((name, all_of(&found)));
        }
        let mut vars: Vec<(&str, &str)> = INTERVALS.to_vec();
        vars.extend(values.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        for q in panels(&d.json) {
            let expr = substitute(&q.expr, &vars);
            let result = match query(prom, &expr) {
                Ok(series) if series.is_empty() => Err("no data".to_owned()),
                Ok(series) => Ok(series.len()),
                Err(e) => Err(e.to_string()),
            };
            out.push((
                d.title.clone(),
                format!("{} [{}]", q.panel, q.ref_id),
                expr,
                result,
            ));
        }
    }
    out
}

#[test]
#[ignore = "needs root"]
fn every_dashboard_panel_returns_data() {
    let all = dashboards();
    assert!(all.len() >= 2, "dashboards in deploy/dashboards");
    let manifests = TempManifests::copy(&repo_root().join("examples/demo")).unwrap();
    let sb = Sandbox::up_with("e2e-dash", manifests.path(), &["--prometheus"]).unwrap();
    let prom: SocketAddr = sb.state["prometheus"]["url"]
        .as_str()
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("state.json names the Prometheus: {}", sb.state));
    assert!(prom.ip().is_loopback(), "{prom}");
    let pods = sb.state["pods"].as_array().cloned().unwrap_or_default();
    let targets = 1 + sb.nodes().len() + pods.iter().filter(|p| p["admin"].is_string()).count();
    assert!(
        pods.iter().any(|p| p["admin"].is_string()),
        "the demo runs a waypoint"
    );
    let echo_ip = pods
        .iter()
        .find(|p| {
            p["namespace"] == "demo" && p["name"].as_str().is_some_and(|n| n.starts_with("echo-"))
        })
        .and_then(|p| p["ip"].as_str())
        .expect("the demo runs echo pods")
        .to_owned();

    // The demo's clients make requests through the waypoint on their own. What it does not
    // do, done here repeatedly so every refusal series exists: the intruder straight to an
    // echo pod (denied at L4 by 30-policy.yaml), and plaintext HTTP to a pod's HBONE port
    // (a handshake failure, `not_tls`).
    let provoke = || {
        let _ = sb.curl("demo/intruder", &format!("http://{echo_ip}:8080/"));
        let _ = sb.curl("legacy/legacy-client", &format!("http://{echo_ip}:15008/"));
    };
    let up = || {
        query(prom, "sum(up)")
            .ok()
            .and_then(|s| s.first().map(|s| s.value))
            .unwrap_or(0.0)
    };
    // Bounded: every target up and every panel with data, or the report below says which not.
    let start = Instant::now();
    let limit = Duration::from_secs(120);
    let outcomes = loop {
        provoke();
        let ready = up() as usize == targets;
        let outcomes = evaluate(prom, &all);
        if ready && outcomes.iter().all(|o| o.3.is_ok()) || start.elapsed() > limit {
            break outcomes;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    let mut failed = Vec::new();
    for (dashboard, panel, expr, result) in &outcomes {
        match result {
            Ok(n) => println!("ok   {dashboard} / {panel} / {n} series / {expr}"),
            Err(e) => {
                println!("FAIL {dashboard} / {panel} / {e} / {expr}");
                failed.push(format!("{dashboard} / {panel}: {e}\n    {expr}"));
            }
        }
    }
    println!(
        "{} expressions of {} dashboards evaluated, {} failed; targets up: {} of {targets}",
        outcomes.len(),
        all.len(),
        failed.len(),
        up()
    );
    assert!(
        failed.is_empty(),
        "panels without data or with errors:\n{}\nPrometheus log: {}",
        failed.join("\n"),
        Path::new(&sb.state_dir)
            .join("prometheus/prometheus.log")
            .display()
    );
}

//! The live traffic summary: node-proxies' metrics folded into one table of who talks
//! to whom.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Fetches `path` from an admin endpoint over plain HTTP/1.0.
pub fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// One sample: labels and value.
pub fn parse_sample(line: &str) -> Option<(&str, BTreeMap<&str, &str>, f64)> {
    let (name, rest) = line.split_once('{')?;
    let (labels, value) = rest.rsplit_once('}')?;
    let mut map = BTreeMap::new();
    let mut rest = labels;
    while let Some((key, after)) = rest.split_once("=\"") {
        let (value, tail) = after.split_once('"')?;
        map.insert(key.trim_start_matches(','), value);
        rest = tail;
    }
    Some((name, map, value.trim().parse().ok()?))
}

/// Traffic between two workloads.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Flow {
    /// Connections opened.
    pub connections: f64,
    /// Bytes both ways (counted when connections close).
    pub bytes: f64,
}

/// Folds metrics texts of every node-proxy into flows keyed by (source, destination,
/// security). Each connection is counted once: at its source when the source is in the
/// mesh (outbound), at its destination otherwise (inbound plaintext).
pub fn flows(texts: &[String]) -> BTreeMap<(String, String, String), Flow> {
    let mut out: BTreeMap<(String, String, String), Flow> = BTreeMap::new();
    for text in texts {
        for line in text.lines().filter(|l| l.starts_with("weft_tcp_")) {
            let Some((name, labels, value)) = parse_sample(line) else {
                continue;
            };
            let outbound = labels.get("direction") == Some(&"outbound");
            let plaintext_in = labels.get("direction") == Some(&"inbound")
                && labels.get("connection_security_policy") == Some(&"none");
            if !(outbound || plaintext_in) {
                continue;
            }
            let who = |ns: &str, wl: &str| match (labels.get(ns), labels.get(wl)) {
                (Some(n), Some(w)) if !w.is_empty() => format!("{n}/{w}"),
                _ => "(outside the mesh)".to_owned(),
            };
            let key = (
                who("source_namespace", "source_workload"),
                who("destination_namespace", "destination_workload"),
                labels
                    .get("connection_security_policy")
                    .copied()
                    .unwrap_or("none")
                    .to_owned(),
            );
            let flow = out.entry(key).or_default();
            match name {
                "weft_tcp_connections_opened_total" => flow.connections += value,
                "weft_tcp_sent_bytes_total" | "weft_tcp_received_bytes_total" => {
                    flow.bytes += value
                }
                _ => {}
            }
        }
    }
    out
}

/// The table, as printed.
pub fn render(flows: &BTreeMap<(String, String, String), Flow>) -> String {
    let mut s = format!(
        "  {:<28} {:<28} {:<11} {:>11} {:>10}\n",
        "SOURCE", "DESTINATION", "SECURITY", "CONNECTIONS", "BYTES"
    );
    if flows.is_empty() {
        s.push_str("  (no traffic yet)\n");
    }
    for ((src, dst, sec), f) in flows {
        s.push_str(&format!(
            "  {src:<28} {dst:<28} {sec:<11} {:>11} {:>10}\n",
            f.connections,
            human_bytes(f.bytes)
        ));
    }
    s
}

/// The sum of the samples of `metric` (with `_total` for counters) in `text` whose
/// labels include every pair of `labels`.
pub fn sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| {
            if let Some((name, map, value)) = parse_sample(l) {
                (name == metric && labels.iter().all(|(k, v)| map.get(k) == Some(v)))
                    .then_some(value)
            } else {
                let (name, value) = l.split_once(' ')?;
                (name == metric && labels.is_empty())
                    .then(|| value.trim().parse().ok())
                    .flatten()
            }
        })
        .sum()
}

/// The waypoints' requests since start: per service, the workload that answered and
/// the status, with what the waypoint did (retried, denied, ...). Empty without
/// waypoints.
pub fn requests(waypoints: &[String]) -> String {
    let mut rows: BTreeMap<(String, String, String, String), f64> = BTreeMap::new();
    for text in waypoints {
        for l in text
            .lines()
            .filter(|l| l.starts_with("weft_requests_total{"))
        {
            let Some((_, labels, value)) = parse_sample(l) else {
                continue;
            };
            let get = |k: &str| labels.get(k).copied().unwrap_or("").to_owned();
            let workload = match get("destination_workload") {
                w if w.is_empty() => "(the waypoint)".to_owned(),
                w => w,
            };
            *rows
                .entry((
                    get("destination_service"),
                    workload,
                    get("response_code"),
                    get("response_flags"),
                ))
                .or_default() += value;
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "  requests through the waypoint:\n  {:<22} {:<22} {:<6} {:<16} {:>9}\n",
        "SERVICE", "ANSWERED BY", "CODE", "FLAGS", "REQUESTS"
    );
    for ((svc, wl, code, flags), n) in rows {
        s.push_str(&format!(
            "  {svc:<22} {wl:<22} {code:<6} {flags:<16} {n:>9}\n"
        ));
    }
    s
}

/// One line on the controller and the policy decisions: model version, subscribed
/// proxies, problems found, certificates signed, connections denied (and who decided).
pub fn control_plane(controller: Option<&str>, nodes: &[String]) -> String {
    let mut line = match controller {
        None => "  controller: unreachable (the node-proxies serve on from what they hold)".to_owned(),
        Some(text) => format!(
            "  controller: model version {}, {} proxies subscribed, {} problems in the manifests, {} certificates signed",
            sum(text, "weft_controller_model_version", &[]),
            sum(text, "weft_controller_subscribers", &[]),
            sum(text, "weft_controller_problems", &[]),
            sum(text, "weft_ca_certificates_signed_total", &[]),
        ),
    };
    let mut denials: BTreeMap<String, f64> = BTreeMap::new();
    for text in nodes {
        for l in text
            .lines()
            .filter(|l| l.starts_with("weft_authorization_denials_total{"))
        {
            if let Some((_, labels, value)) = parse_sample(l) {
                *denials
                    .entry(labels.get("policy").copied().unwrap_or("?").to_owned())
                    .or_default() += value;
            }
        }
    }
    let denied: Vec<String> = denials.iter().map(|(p, n)| format!("{n} by {p}")).collect();
    if !denied.is_empty() {
        line.push_str(&format!("\n  connections denied: {}", denied.join(", ")));
    }
    line.push('\n');
    line
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1024.0 * 1024.0 => format!("{:.1} MiB", b / 1024.0 / 1024.0),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        b => format!("{b} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_outbound_and_plaintext_inbound() {
        let node1 = r#"# TYPE weft_tcp_connections_opened counter
weft_tcp_connections_opened_total{direction="outbound",source_workload="client",source_namespace="demo",source_principal="spiffe://x",destination_workload="echo-0",destination_namespace="demo",destination_principal="p",destination_service="demo/echo",connection_security_policy="mutual_tls"} 3
weft_tcp_sent_bytes_total{direction="outbound",source_workload="client",source_namespace="demo",source_principal="spiffe://x",destination_workload="echo-0",destination_namespace="demo",destination_principal="p",destination_service="demo/echo",connection_security_policy="mutual_tls"} 2048
"#;
        let node2 = r#"weft_tcp_connections_opened_total{direction="inbound",source_workload="client",source_namespace="demo",source_principal="spiffe://x",destination_workload="echo-0",destination_namespace="demo",destination_principal="p",destination_service="",connection_security_policy="mutual_tls"} 3
weft_tcp_connections_opened_total{direction="inbound",source_workload="",source_namespace="",source_principal="",destination_workload="echo-0",destination_namespace="demo",destination_principal="p",destination_service="",connection_security_policy="none"} 1
"#;
        let f = flows(&[node1.to_owned(), node2.to_owned()]);
        assert_eq!(f.len(), 2, "{f:?}");
        let mesh = &f[&(
            "demo/client".into(),
            "demo/echo-0".into(),
            "mutual_tls".into(),
        )];
        assert_eq!((mesh.connections, mesh.bytes), (3.0, 2048.0));
        let plain = &f[&(
            "(outside the mesh)".into(),
            "demo/echo-0".into(),
            "none".into(),
        )];
        assert_eq!(plain.connections, 1.0);
        assert!(render(&f).contains("demo/client"));
    }

    #[test]
    fn waypoint_requests_by_service_workload_and_code() {
        let wp = r#"weft_requests_total{source_workload="client",source_namespace="demo",source_principal="p",destination_service="demo/echo",destination_workload="echo-v2-0",destination_principal="q",route="demo/canary",response_code="200",response_flags="retried"} 2
weft_requests_total{source_workload="intruder",source_namespace="demo",source_principal="p",destination_service="demo/echo",destination_workload="",destination_principal="",route="",response_code="403",response_flags="denied"} 5
"#;
        let text = requests(&[wp.to_owned()]);
        assert!(text.contains("echo-v2-0"), "{text}");
        assert!(text.contains("(the waypoint)"), "{text}");
        assert!(text.contains("403    denied"), "{text}");
        assert!(requests(&[]).is_empty());
    }

    #[test]
    fn control_plane_line() {
        let controller = "weft_controller_model_version 7\nweft_controller_subscribers 2\nweft_controller_problems 1\nweft_ca_certificates_signed_total 3\n";
        let node = r#"weft_authorization_denials_total{policy="demo/only-client",reason="no_allow_match",when="connect"} 4
"#;
        let line = control_plane(Some(controller), &[node.to_owned()]);
        assert!(
            line.contains("model version 7, 2 proxies subscribed, 1 problems"),
            "{line}"
        );
        assert!(line.contains("4 by demo/only-client"), "{line}");
        assert!(control_plane(None, &[]).contains("unreachable"));
    }
}

//! A real Prometheus beside the sandbox: `weftctl local up --prometheus` and the
//! dashboards' end-to-end test run the same code here.
//!
//! ```text
//!  sandbox state.json --targets()--> <dir>/targets.json (file_sd, rewritten on change)
//!  prometheus.yml (scrape every second) --> Debian's `prometheus` on 127.0.0.1:<port>
//!     scrapes every node-proxy, the controller and every waypoint's /metrics
//!  query() --> /api/v1/query (instant PromQL)
//!  dashboards: panels() lists every PromQL expression of a Grafana dashboard
//! ```
//!
//! Each target carries `component` (`node-proxy`, `controller`, `waypoint`), `sandbox`,
//! and `node` (node-proxies, waypoints) or `namespace` and `pod` (waypoints): the labels
//! the dashboards in `deploy/dashboards/` select on.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::sandbox::State;

/// What can go wrong running or asking Prometheus.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The binary is missing.
    #[error("cannot run {program:?}: {source}; install Debian's `prometheus` package (scripts/deps test)")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file of its configuration could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No free loopback port.
    #[error("cannot find a free loopback port for Prometheus: {0}")]
    Port(std::io::Error),
    /// It exited before it was ready.
    #[error("prometheus exited ({status}) before it was ready; its log {log}:\n{tail}")]
    Exited {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// It did not become ready in time.
    #[error("prometheus on {addr} not ready after {} s; see {log}", .waited.as_secs())]
    NotReady {
        /// Its address.
        addr: SocketAddr,
        /// How long we waited.
        waited: Duration,
        /// Its log.
        log: PathBuf,
    },
    /// The HTTP API could not be reached or answered garbage.
    #[error("prometheus API {url}: {reason}")]
    Api {
        /// What was asked.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A query was refused (a PromQL parse or evaluation error).
    #[error("query {query:?} failed: {error_type}: {message}")]
    Query {
        /// The expression.
        query: String,
        /// Prometheus's `errorType`.
        error_type: String,
        /// Prometheus's `error`.
        message: String,
    },
}

/// How to run Prometheus.
#[derive(Debug, Clone)]
pub struct Options {
    /// Its directory: configuration, targets, storage (`data/`) and log.
    pub dir: PathBuf,
    /// Where it listens; port 0 picks a free loopback port.
    pub listen: SocketAddr,
    /// How often it scrapes (and evaluates).
    pub scrape_interval: Duration,
    /// The program (`prometheus` on `PATH`).
    pub program: PathBuf,
}

impl Options {
    /// Defaults for a sandbox: `<state_dir>/prometheus`, a free loopback port, one
    /// scrape a second.
    pub fn for_sandbox(state_dir: &Path) -> Self {
        Options {
            dir: state_dir.join("prometheus"),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            scrape_interval: Duration::from_secs(1),
            program: PathBuf::from("prometheus"),
        }
    }
}

/// One file_sd target group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetGroup {
    /// `host:port`.
    pub targets: Vec<String>,
    /// Labels added to every series scraped from them.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The scrape targets of a sandbox: its node-proxies, its controller and its waypoints.
pub fn targets(state: &State) -> Vec<TargetGroup> {
    let group = |addr: SocketAddr, labels: &[(&str, &str)]| TargetGroup {
        targets: vec![addr.to_string()],
        labels: [("sandbox", state.name.as_str())]
            .iter()
            .chain(labels)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    let mut out = vec![group(
        state.controller.admin,
        &[("component", "controller")],
    )];
    for n in &state.nodes {
        out.push(group(
            n.admin,
            &[("component", "node-proxy"), ("node", &n.name)],
        ));
    }
    for p in &state.pods {
        if let Some(admin) = p.admin {
            out.push(group(
                admin,
                &[
                    ("component", "waypoint"),
                    ("node", &p.node),
                    ("namespace", &p.namespace),
                    ("pod", &p.name),
                ],
            ));
        }
    }
    out
}

/// `prometheus.yml`: one job, `weft`, whose targets come from `targets_file`.
pub fn config(scrape_interval: Duration, targets_file: &Path) -> String {
    let every = format!("{}ms", scrape_interval.as_millis().max(1));
    // JSON strings are valid YAML scalars: the path needs no escaping of its own.
    let file = Value::String(targets_file.display().to_string());
    format!(
        "# Written by weftctl: scrapes a Weft sandbox.\n\
         global:\n  scrape_interval: {every}\n  scrape_timeout: {every}\n  evaluation_interval: {every}\n\
         scrape_configs:\n  - job_name: weft\n    file_sd_configs:\n      - files: [{file}]\n        refresh_interval: 5s\n"
    )
}

/// A running Prometheus; stopped (and its storage removed) when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Option<Child>,
    addr: SocketAddr,
    dir: PathBuf,
    targets_file: PathBuf,
}

fn write(path: &Path, contents: &[u8]) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, contents).map_err(err)?;
    // Renamed into place: Prometheus never reads half a targets file.
    std::fs::rename(&tmp, path).map_err(err)
}

fn free_port(listen: SocketAddr) -> Result<SocketAddr, Error> {
    if listen.port() != 0 {
        return Ok(listen);
    }
    let l = TcpListener::bind(listen).map_err(Error::Port)?;
    l.local_addr().map_err(Error::Port)
}

impl Prometheus {
    /// Writes the configuration with `state`'s targets, starts Prometheus and waits (up to
    /// 30 s) until it answers `/-/ready`.
    pub fn start(opts: &Options, state: &State) -> Result<Self, Error> {
        let data = opts.dir.join("data");
        // A fresh store: figures of an earlier sandbox would only confuse.
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data).map_err(|source| Error::Write {
            path: data.clone(),
            source,
        })?;
        let targets_file = opts.dir.join("targets.json");
        let config_file = opts.dir.join("prometheus.yml");
        let log = opts.dir.join("prometheus.log");
        let addr = free_port(opts.listen)?;
        let mut p = Prometheus {
            child: None,
            addr,
            dir: opts.dir.clone(),
            targets_file: targets_file.clone(),
        };
        p.update(state)?;
        write(
            &config_file,
            config(opts.scrape_interval, &targets_file).as_bytes(),
        )?;
        let log_err = |source| Error::Write {
            path: log.clone(),
            source,
        };
        let out = std::fs::File::create(&log).map_err(log_err)?;
        let err = out.try_clone().map_err(log_err)?;
        let child = Command::new(&opts.program)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--storage.tsdb.retention.time=1d")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| Error::Spawn {
                program: opts.program.clone(),
                source,
            })?;
        p.child = Some(child);
        let limit = Duration::from_secs(30);
        let start = Instant::now();
        loop {
            if let Some(Ok(Some(status))) = p.child.as_mut().map(Child::try_wait) {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                return Err(Error::Exited {
                    status,
                    log,
                    tail: lines[lines.len().saturating_sub(10)..].join("\n"),
                });
            }
            if http_get(addr, "/-/ready").is_ok_and(|(code, _)| code == 200) {
                return Ok(p);
            }
            if start.elapsed() > limit {
                return Err(Error::NotReady {
                    addr,
                    waited: limit,
                    log,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Rewrites the targets from `state` (pods come and go); Prometheus picks the file
    /// up within seconds.
    pub fn update(&self, state: &State) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(&targets(state))
            .expect("target groups are plain strings and maps");
        write(&self.targets_file, &json)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its process ID (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Evaluates `expr` now (`/api/v1/query`).
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>, Error> {
        query(self.addr, expr)
    }

    /// Stops it (SIGTERM, then SIGKILL after 5 s) and removes its storage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            let _ = std::fs::remove_dir_all(self.dir.join("data"));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One series of a query's result: its labels and value (instant vectors and scalars).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Labels, `{}` for a scalar.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The value (may be NaN, as `histogram_quantile` of no requests is).
    pub value: f64,
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `GET path` over HTTP/1.0: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut bytes = Vec::new();
    s.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Evaluates `expr` at Prometheus on `addr` now (`/api/v1/query`): its series, or the
/// parse or evaluation error Prometheus gave.
pub fn query(addr: SocketAddr, expr: &str) -> Result<Vec<Sample>, Error> {
    let path = format!("/api/v1/query?query={}", percent_encode(expr));
    let api = |reason: String| Error::Api {
        url: format!("http://{addr}{path}"),
        reason,
    };
    let (_, body) = http_get(addr, &path).map_err(|e| api(e.to_string()))?;
    let v: Value =
        serde_json::from_str(&body).map_err(|e| api(format!("not JSON ({e}): {body}")))?;
    if v["status"] != "success" {
        return Err(Error::Query {
            query: expr.to_owned(),
            error_type: v["errorType"].as_str().unwrap_or("unknown").to_owned(),
            message: v["error"].as_str().unwrap_or_default().to_owned(),
        });
    }
    let value = |pair: &Value| {
        pair.get(1)
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let data = &v["data"];
    Ok(match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| Sample {
                        labels: r["metric"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                                    .collect()
                            })
                            .unwrap_or_default(),
                        value: value(&r["value"]),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Some("scalar") => vec![Sample {
            labels: Default::default(),
            value: value(&data["result"]),
        }],
        other => return Err(api(format!("unexpected result type {other:?}"))),
    })
}

/// One PromQL expression of a dashboard panel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PanelQuery {
    /// The panel's title.
    pub panel: String,
    /// The target's `refId`.
    pub ref_id: String,
    /// The expression, Grafana variables and all.
    pub expr: String,
}

/// Every PromQL expression of every panel of a Grafana dashboard, rows' panels included.
pub fn panels(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &Value, out: &mut Vec<PanelQuery>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("(untitled)");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push(PanelQuery {
                        panel: title.to_owned(),
                        ref_id: t["refId"].as_str().unwrap_or("").to_owned(),
                        expr: expr.to_owned(),
                    });
                }
            }
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// A dashboard's query variables: (name, metric, label) of each `label_values(metric,
/// label)` template variable.
pub fn label_variables(dashboard: &Value) -> Vec<(String, String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .filter_map(|v| {
            let name = v["name"].as_str()?;
            let q = v["query"]
                .as_str()
                .or_else(|| v["query"]["query"].as_str())?;
            let inner = q.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
            let (metric, label) = inner.rsplit_once(',')?;
            Some((
                name.to_owned(),
                metric.trim().to_owned(),
                label.trim().to_owned(),
            ))
        })
        .collect()
}

/// `expr` with Grafana's variables replaced as Grafana would: `$name` and `${name}` by
/// `values` (longer names first, so `$node` does not eat `$nodes`).
pub fn substitute(expr: &str, values: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = values.iter().collect();
    sorted.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    let mut out = expr.to_owned();
    for (name, value) in sorted {
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dashboards() -> Vec<(String, Value)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dashboards");
        let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
            .expect("deploy/dashboards exists")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("dashboard readable");
                let v = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
                (p.display().to_string(), v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn every_dashboard_has_queries_and_known_variables() {
        let all = dashboards();
        assert!(all.len() >= 2, "node and workload dashboards at least");
        for (path, d) in &all {
            let qs = panels(d);
            assert!(!qs.is_empty(), "{path} has no queries");
            let vars: Vec<String> = label_variables(d).into_iter().map(|v| v.0).collect();
            for q in &qs {
                let mut values: Vec<(&str, &str)> = vec![
                    ("__rate_interval", "5s"),
                    ("__interval", "1s"),
                    ("__range", "5m"),
                ];
                values.extend(vars.iter().map(|v| (v.as_str(), "x")));
                let done = substitute(&q.expr, &values);
                assert!(
                    !done.contains('$'),
                    "{path}: panel {:?} uses an unknown variable: {}",
                    q.panel,
                    q.expr
                );
            }
        }
    }

    #[test]
    fn substitutes_longest_names_first() {
        assert_eq!(
            substitute(
                "rate(x{node=~\"$node\",n=\"${nodes}\"}[$__rate_interval])",
                &[("node", "a"), ("nodes", "b"), ("__rate_interval", "5s")]
            ),
            "rate(x{node=~\"a\",n=\"b\"}[5s])"
        );
    }

    #[test]
    fn finds_nested_panels_and_variables() {
        let d = serde_json::json!({
            "panels": [
                {"title": "a", "targets": [{"refId": "A", "expr": "up"}]},
                {"title": "row", "type": "row", "panels": [
                    {"title": "b", "targets": [{"refId": "B", "expr": "x"}, {"refId": "C"}]}
                ]}
            ],
            "templating": {"list": [
                {"name": "datasource", "type": "datasource"},
                {"name": "node", "type": "query", "query": {"query": "label_values(weft_config_version, node)"}}
            ]}
        });
        let qs = panels(&d);
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[1].panel, "b");
        assert_eq!(
            label_variables(&d),
            vec![(
                "node".to_owned(),
                "weft_config_version".to_owned(),
                "node".to_owned()
            )]
        );
    }

    #[test]
    fn config_names_the_targets_file() {
        let c = config(Duration::from_secs(1), Path::new("/run/x/targets.json"));
        assert!(c.contains("scrape_interval: 1000ms"), "{c}");
        assert!(c.contains("files: [\"/run/x/targets.json\"]"), "{c}");
    }
}

//! The chaos run: request loops over L4 (pod to pod by IP and by name) and L7 (through
//! the waypoint, with a canary split) while a seeded schedule kills, with SIGKILL, the
//! controller, each node-proxy, each node agent and each of the waypoint's two replicas
//! (the sandbox restarts each, as Kubernetes would), and leaves rotate every 15 s (a 30 s
//! TTL). Every failed
//! request is counted with its cause. Afterwards the model, certificates, pods and
//! capture rules are back where they were (compared through the admin dumps), memory
//! and descriptors of every long-lived process are within 10% of the start, and no
//! network namespace or process is left over.
//!
//! `WEFT_CHAOS_SECONDS` (default 120) sets how long the schedule runs, `WEFT_CHAOS_SEED`
//! (default 29) which victims it picks and when.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_e2e::{eventually, http_get, is_root, Load, Request, Sandbox, TempManifests};

/// What a request goes through; a kill of one of them while it is in flight excuses its
/// failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Part {
    NodeProxy1,
    NodeProxy2,
    Agent1,
    Agent2,
    Controller,
    /// The waypoint's first replica, `waypoint-0`.
    Waypoint0,
    /// Its second, `waypoint-1`.
    Waypoint1,
}

const VICTIMS: [Part; 7] = [
    Part::Controller,
    Part::NodeProxy1,
    Part::NodeProxy2,
    Part::Agent1,
    Part::Agent2,
    Part::Waypoint0,
    Part::Waypoint1,
];

/// A small deterministic generator (xorshift64*), so a seed replays a schedule.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One kill: the victim, when the signal was sent, when it was seen dead.
#[derive(Debug)]
struct Kill {
    part: Part,
    killed: Instant,
    died: Instant,
}

fn pid_of(sb: &Sandbox, part: Part) -> i32 {
    match part {
        Part::NodeProxy1 => sb.node_pid("node-1").unwrap_or_default(),
        Part::NodeProxy2 => sb.node_pid("node-2").unwrap_or_default(),
        Part::Agent1 => sb.agent_pid("node-1"),
        Part::Agent2 => sb.agent_pid("node-2"),
        Part::Controller => sb.controller_pid(),
        Part::Waypoint0 => sb.pid("shop/waypoint-0").unwrap_or_default(),
        Part::Waypoint1 => sb.pid("shop/waypoint-1").unwrap_or_default(),
    }
}

/// Whether `part` (the process with `pid`, not the one killed) serves.
fn serves(sb: &Sandbox, part: Part) -> bool {
    let ok = |addr: Option<std::net::SocketAddr>| {
        addr.and_then(|a| http_get(a, "/ready").ok())
            .is_some_and(|(status, _)| status == 200)
    };
    match part {
        Part::NodeProxy1 => ok(sb.admin("node-1").ok()),
        Part::NodeProxy2 => ok(sb.admin("node-2").ok()),
        Part::Agent1 => sb.agent_get("node-1", "/ready").is_some(),
        Part::Agent2 => sb.agent_get("node-2", "/ready").is_some(),
        Part::Controller => ok(sb.controller_admin().ok()),
        Part::Waypoint0 => sb.waypoint_metrics("shop/waypoint-0").is_ok(),
        Part::Waypoint1 => sb.waypoint_metrics("shop/waypoint-1").is_ok(),
    }
}

fn wait_dead(pid: i32) -> Instant {
    eventually(Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        (stat.is_empty() || state.starts_with('Z')).then(Instant::now)
    })
    .expect("a killed process dies")
}

/// What a process's descriptors are, counted by kind (`socket`, `anon_inode:[eventfd]`,
/// a path): printed when a leak check fails.
fn fd_kinds(pid: i32) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let target = target.to_string_lossy();
        let kind = target.split(":[").next().unwrap_or_default().to_owned();
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
}

/// The processes descended from `root`.
fn descendants(root: u32) -> BTreeSet<u32> {
    let mut parent = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    parent
        .keys()
        .copied()
        .filter(|pid| {
            let mut p = *pid;
            for _ in 0..64 {
                match parent.get(&p) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

fn netns_count(prefix: &str) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines().filter(|l| l.starts_with(prefix)).count()
}

/// Drops what legitimately changes across restarts (versions, epochs, expiries, PIDs,
/// counters, timestamps) and the order of lists.
fn stable(v: &Value) -> Value {
    const VOLATILE: [&str; 16] = [
        "nodeProxyPid",
        "replays",
        "epoch",
        "version",
        "notAfter",
        "certificates",
        "pid",
        "since",
        "starts",
        "restarts",
        "hboneConnections",
        "modelStatus",
        "lastError",
        "generation",
        "updated",
        "at",
    ];
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !VOLATILE.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), stable(v)))
                .collect(),
        ),
        // Lists from maps come in any order: compared as sets.
        Value::Array(items) => {
            let mut items: Vec<Value> = items.iter().map(stable).collect();
            items.sort_by_key(Value::to_string);
            Value::Array(items)
        }
        other => other.clone(),
    }
}

/// The mesh's state as its admin endpoints show it, without what changes on a restart.
fn state(sb: &Sandbox) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for node in ["node-1", "node-2"] {
        let dump = sb
            .admin(node)
            .ok()
            .and_then(|a| http_get(a, "/config_dump").ok())
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .unwrap_or_default();
        out.insert(format!("{node} node-proxy"), stable(&dump));
        let pods = sb
            .agent_get(node, "/pods")
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
            .unwrap_or_default();
        out.insert(format!("{node} agent"), stable(&pods));
    }
    let model = sb
        .controller_admin()
        .ok()
        .and_then(|a| http_get(a, "/debug/model").ok())
        .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
        .unwrap_or_default();
    out.insert("controller".into(), stable(&model));
    for pod in ["shop/client", "shop/echo-v1-0", "shop/echo-v2-0"] {
        // The rules without their counters.
        let rules = sb.rules(pod).unwrap_or_default();
        let rules: String = rules
            .lines()
            .map(|l| l.split(" counter ").next().unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        out.insert(format!("{pod} rules"), Value::String(rules));
    }
    out
}

#[test]
#[ignore = "needs root"]
fn the_mesh_serves_through_a_seeded_schedule_of_kills() {
    assert!(is_root(), "run as root (network namespaces)");
    let seconds: u64 = std::env::var("WEFT_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("WEFT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(29);
    let manifests =
        TempManifests::copy(&weft_e2e::repo_root().join("tests/manifests/waypoint")).unwrap();
    // Its L7 DENY policy refuses, at node-proxy, traffic that does not go through the
    // waypoint; the L4 loops go direct.
    std::fs::remove_file(manifests.path().join("50-policy.yaml")).unwrap();
    // Two waypoint replicas, as a cluster runs by default: while one is down, node-proxy
    // sends new connections to the other.
    let shop = std::fs::read_to_string(manifests.path().join("00-shop.yaml")).unwrap();
    assert!(shop.contains("  replicas: 1 "), "{shop}");
    manifests
        .write(
            "00-shop.yaml",
            &shop.replace("  replicas: 1 ", "  replicas: 2 "),
        )
        .unwrap();
    let mut sb = Sandbox::up_with("e2e-chaos", manifests.path(), &["--leaf-ttl", "30s"]).unwrap();
    let prefix = sb.name.clone();
    let supervisor = sb.state["supervisorPid"].as_u64().unwrap_or_default() as u32;
    let echo_v1 = sb.ip("shop/echo-v1-0").unwrap();
    let client = sb.netns("shop/client").unwrap();
    let all_ready = |sb: &Sandbox| VICTIMS.iter().all(|p| serves(sb, *p));
    assert!(
        eventually(Duration::from_secs(30), || all_ready(&sb).then_some(())).is_some(),
        "every component serves before the run"
    );

    let before = state(&sb);
    let processes_before = descendants(supervisor).len();
    let netns_before = netns_count(&prefix);

    // (name, url, what it goes through)
    let paths: [(&str, String, &[Part]); 3] = [
        (
            "L4 pod to pod by IP",
            format!("http://{echo_v1}:8080/"),
            &[Part::NodeProxy1, Part::NodeProxy2],
        ),
        (
            "L4 pod to pod by name",
            "http://echo-v1.shop/".into(),
            &[Part::NodeProxy1, Part::NodeProxy2],
        ),
        (
            "L7 through the waypoint, canary split",
            "http://echo.shop/".into(),
            &[
                Part::NodeProxy1,
                Part::NodeProxy2,
                Part::Waypoint0,
                Part::Waypoint1,
            ],
        ),
    ];
    for (name, url, _) in &paths {
        let answers = eventually(Duration::from_secs(20), || {
            let out = sb
                .exec("shop/client", &["curl", "-sf", "-o", "/dev/null", url])
                .ok()?;
            out.status.success().then_some(())
        });
        assert!(answers.is_some(), "{name}: {url} answers before the run");
    }
    // Measured with the paths warm (their pooled connections open), as after the run.
    let start_usage: BTreeMap<Part, (u64, usize)> = VICTIMS
        .iter()
        .map(|p| (*p, weft_e2e::usage(pid_of(&sb, *p))))
        .collect();
    let start_fds: BTreeMap<Part, BTreeMap<String, usize>> = VICTIMS
        .iter()
        .map(|p| (*p, fd_kinds(pid_of(&sb, *p))))
        .collect();
    let limit = Duration::from_secs(seconds + 120);
    let loads: Vec<Load> = paths
        .iter()
        .map(|(_, url, _)| Load::start(&client, url, Duration::from_millis(100), limit))
        .collect();

    // The schedule: every victim in a seeded order, again and again, one at a time,
    // 2 to 6 s after the last one served again.
    let mut rng = Rng(seed.max(1));
    let mut kills = Vec::new();
    let run = Instant::now();
    let mut order: Vec<Part> = Vec::new();
    while run.elapsed() < Duration::from_secs(seconds) {
        if order.is_empty() {
            order = VICTIMS.to_vec();
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let part = order.pop().expect("refilled above");
        std::thread::sleep(Duration::from_millis(2000 + rng.below(4000)));
        sb.refresh().unwrap();
        let pid = pid_of(&sb, part);
        assert!(pid > 0, "{part:?} runs");
        let killed = Instant::now();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let died = wait_dead(pid);
        let back = eventually(Duration::from_secs(60), || {
            sb.refresh().ok()?;
            let now = pid_of(&sb, part);
            (now > 0 && now != pid && serves(&sb, part)).then(Instant::now)
        })
        .unwrap_or_else(|| panic!("{part:?} serves again after its kill"));
        println!(
            "killed {part:?} (pid {pid}) at {:.2} s; it served again {} ms later",
            died.duration_since(run).as_secs_f64(),
            back.duration_since(died).as_millis()
        );
        kills.push(Kill { part, killed, died });
    }
    std::thread::sleep(Duration::from_secs(3));
    let results: Vec<Vec<Request>> = loads.into_iter().map(Load::stop_timed).collect();

    // Every failure, by cause.
    let mut causes: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexcused = Vec::new();
    for ((name, _, through), requests) in paths.iter().zip(&results) {
        let failed: Vec<&Request> = requests.iter().filter(|r| !r.ok).collect();
        println!(
            "{name}: {} requests, {} failed",
            requests.len(),
            failed.len()
        );
        assert!(requests.len() > 100, "{name}: the loop ran");
        for r in failed {
            // A kill on its path while it was in flight.
            let in_flight = kills
                .iter()
                .find(|k| through.contains(&k.part) && r.start <= k.died && r.end >= k.killed);
            // Nothing else is excused: not a request made while a waypoint replica was
            // down (the other serves), nor one made during a restart.
            let cause = match in_flight {
                Some(k) => format!("{name}: in flight through the killed {:?}", k.part),
                None => {
                    let at = |t: Instant| t.saturating_duration_since(run).as_secs_f64();
                    unexcused.push(format!(
                        "{name}: {:.2}-{:.2} s: {}",
                        at(r.start),
                        at(r.end),
                        r.why
                    ));
                    format!("{name}: not excused ({})", r.why)
                }
            };
            *causes.entry(cause).or_default() += 1;
        }
    }
    println!("failed requests by cause:");
    for (cause, n) in &causes {
        println!("  {n:5}  {cause}");
    }
    let victims: BTreeSet<Part> = kills.iter().map(|k| k.part).collect();
    assert_eq!(
        victims.len(),
        VICTIMS.len(),
        "every component was killed: {kills:?}"
    );
    assert!(
        unexcused.is_empty(),
        "failed requests no kill explains: {unexcused:?}"
    );

    // Convergence: the same state as before the run.
    let converged = eventually(Duration::from_secs(60), || {
        sb.refresh().ok()?;
        (state(&sb) == before).then_some(())
    });
    if converged.is_none() {
        let after = state(&sb);
        for (key, value) in &before {
            if after.get(key) != Some(value) {
                let after = after.get(key).map(Value::to_string).unwrap_or_default();
                println!("{key} before: {value}\n{key} after: {after}");
            }
        }
    }
    assert!(
        converged.is_some(),
        "the mesh converges to its state before the run"
    );

    // Leaks: memory and descriptors within 10% of the start, no namespace or process
    // more.
    for part in VICTIMS {
        let (rss0, fds0) = start_usage[&part];
        // Pooled HBONE connections opened during the run (by a waypoint restarted near
        // its end, say) close after 60 to 120 s idle: the pool checks once a minute.
        let settled = eventually(Duration::from_secs(135), || {
            let (rss, fds) = weft_e2e::usage(pid_of(&sb, part));
            (rss * 10 <= rss0 * 11 && fds * 10 <= fds0 * 11).then_some((rss, fds))
        });
        let (rss, fds) = weft_e2e::usage(pid_of(&sb, part));
        println!(
            "{part:?}: {} KiB resident, {fds} descriptors (at the start {} KiB, {fds0})",
            rss / 1024,
            rss0 / 1024
        );
        if settled.is_none() {
            println!(
                "{part:?} descriptors now: {:?}",
                fd_kinds(pid_of(&sb, part))
            );
            println!("{part:?} descriptors at the start: {:?}", start_fds[&part]);
        }
        assert!(
            settled.is_some(),
            "{part:?}: memory or descriptors more than 10% over the start"
        );
    }
    assert_eq!(netns_count(&prefix), netns_before, "network namespaces");
    assert_eq!(descendants(supervisor).len(), processes_before, "processes");
    sb.stop().unwrap();
}

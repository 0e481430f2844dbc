//! The kubelet's probes: one thread per node, inside the node's network namespace, so
//! probes come from the node's own address as a kubelet's do (through the node agent's
//! probe exemption when the pod is captured). It reports each probe's state when it
//! changes, after the probe's success or failure threshold.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api::ObjectName;

use super::manifest::{Probe, ProbeAction};

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `readinessProbe`: decides the Ready condition.
    Readiness,
    /// `livenessProbe`: failing, the container is restarted.
    Liveness,
}

/// A probe's state changed.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The pod.
    pub pod: ObjectName,
    /// Its UID (a recreated pod's old probes are not its).
    pub uid: String,
    /// Which probe.
    pub kind: Kind,
    /// Passing now.
    pub passing: bool,
    /// What the last run saw.
    pub detail: String,
}

/// What to probe of one pod.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its UID.
    pub uid: String,
    /// Its address.
    pub ip: IpAddr,
    /// Its probes.
    pub probes: Vec<(Kind, Probe)>,
}

enum Command {
    Set(ObjectName, Target),
    Remove(ObjectName),
}

/// A node's prober.
pub struct Prober {
    commands: mpsc::Sender<Command>,
}

struct Running {
    target: Target,
    /// Per probe: when next, consecutive successes and failures, passing.
    state: Vec<(Instant, u32, u32, bool)>,
}

impl Prober {
    /// Starts the prober inside the node namespace `node`, reporting on `results`.
    pub fn start(
        name: &str,
        node: OwnedFd,
        results: mpsc::Sender<Outcome>,
    ) -> std::io::Result<Self> {
        let (commands, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("prober {name}"))
            .spawn(move || {
                if let Err(e) = nix::sched::setns(&node, nix::sched::CloneFlags::CLONE_NEWNET) {
                    tracing::warn!("prober cannot enter the node's namespace: {e}");
                    return;
                }
                run(&rx, &results);
            })?;
        Ok(Prober { commands })
    }

    /// Probes `pod` as `target` says, from now on (a restarted container starts over).
    pub fn set(&self, pod: ObjectName, target: Target) {
        let _ = self.commands.send(Command::Set(pod, target));
    }

    /// Stops probing `pod`.
    pub fn remove(&self, pod: ObjectName) {
        let _ = self.commands.send(Command::Remove(pod));
    }
}

fn run(commands: &mpsc::Receiver<Command>, results: &mpsc::Sender<Outcome>) {
    let mut pods: BTreeMap<ObjectName, Running> = BTreeMap::new();
    loop {
        match commands.recv_timeout(Duration::from_millis(50)) {
            Ok(Command::Set(pod, target)) => {
                let now = Instant::now();
                let state = target
                    .probes
                    .iter()
                    .map(|(kind, p)| (now + p.initial_delay, 0, 0, *kind == Kind::Liveness))
                    .collect();
                pods.insert(pod, Running { target, state });
            }
            Ok(Command::Remove(pod)) => {
                pods.remove(&pod);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        for (pod, running) in &mut pods {
            for (i, (kind, probe)) in running.target.probes.iter().enumerate() {
                let (due, ok_run, fail_run, passing) = &mut running.state[i];
                if now < *due {
                    continue;
                }
                *due = now + probe.period;
                let result = check(running.target.ip, probe);
                let was = *passing;
                match &result {
                    Ok(_) => {
                        *ok_run += 1;
                        *fail_run = 0;
                        if *ok_run >= probe.success_threshold {
                            *passing = true;
                        }
                    }
                    Err(_) => {
                        *fail_run += 1;
                        *ok_run = 0;
                        if *fail_run >= probe.failure_threshold {
                            *passing = false;
                        }
                    }
                }
                if *passing != was {
                    let detail = match result {
                        Ok(d) | Err(d) => d,
                    };
                    let _ = results.send(Outcome {
                        pod: pod.clone(),
                        uid: running.target.uid.clone(),
                        kind: *kind,
                        passing: *passing,
                        detail,
                    });
                }
            }
        }
    }
}

/// Runs a probe once: what it saw, as a success or a failure.
fn check(ip: IpAddr, probe: &Probe) -> Result<String, String> {
    let port = match &probe.action {
        ProbeAction::Http { port, .. } | ProbeAction::Tcp { port } => *port,
    };
    let addr = SocketAddr::new(ip, port);
    let mut stream = TcpStream::connect_timeout(&addr, probe.timeout)
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let ProbeAction::Http { path, .. } = &probe.action else {
        return Ok(format!("{addr} accepts connections"));
    };
    let _ = stream.set_read_timeout(Some(probe.timeout));
    let _ = stream.set_write_timeout(Some(probe.timeout));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let mut head = [0u8; 64];
    let n = stream
        .read(&mut head)
        .map_err(|e| format!("GET http://{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&head[..n]);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET http://{addr}{path}: not an HTTP answer: {text:?}"))?;
    match status {
        200..=399 => Ok(format!("GET http://{addr}{path}: {status}")),
        _ => Err(format!("GET http://{addr}{path}: {status}")),
    }
}

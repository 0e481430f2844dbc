//! The reconciler: the one task that owns the node's pods. It takes every input (the
//! source's views, the plugin's requests, node-proxy connecting and going away, a
//! timer), asks [`plan`](crate::plan::plan) what to do, does it, and asks again until
//! nothing is left to do.
//!
//! ```text
//!  source view ----+
//!  CNI add/del ----+--> attach (a pod's netns from the runtime) --> plan --> execute
//!  link up/down ---+                                                 ^        |
//!  tick (retries, looks under /proc) --------------------------------+--------+
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipc::agent::{Reply, Request, Verdict};
use runtime::handoff::{HandedPod, PodInfo};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::capture;
use crate::cni::CniRequest;
use crate::discover::{self, Found};
use crate::link::{self, Handed, Link, LinkError};
use crate::metrics::Metrics;
use crate::plan::{self, Action, Held, NetnsId};
use crate::source::View;

/// How long a CNI ADD waits for its pod to reach the source (the kubelet learns of a pod
/// before the agent's watch may).
const SOURCE_WAIT: Duration = Duration::from_secs(5);
/// How long a CNI ADD of an enrolled pod waits for it to be captured (node-proxy may be
/// restarting).
const CAPTURE_WAIT: Duration = Duration::from_secs(15);
/// Looks under `/proc` happen at most this often when asked for...
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// ... and this often anyway while pods are held, to notice sandboxes that went away.
const RESCAN_EVERY: Duration = Duration::from_secs(5);
/// The first retry of a failed capture; doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A pod sandbox the runtime deleted is not adopted again from its leftover processes.
const TOMBSTONE: Duration = Duration::from_secs(120);

/// What the reconciler needs to know of its setting.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where processes are listed (`/proc`).
    pub proc: PathBuf,
    /// The node's own network namespace (pods sharing it are not captured).
    pub node_netns: NetnsId,
    /// The address the node's probes reach captured pods from.
    pub probe_source: capture::ProbeSource,
    /// What the source is, for messages.
    pub source: String,
    /// node-proxy's handoff socket, for messages.
    pub handoff: PathBuf,
}

/// One pod the agent holds.
#[derive(Debug, Default)]
struct Pod {
    /// `namespace/name`, for logs.
    name: String,
    summary: Held,
    netns: Option<OwnedFd>,
    /// The listeners the agent opened (or took back from node-proxy): they stay open
    /// while node-proxy restarts, so a connection then waits instead of being refused.
    listeners: Option<[OwnedFd; 3]>,
    /// Why the last attempt failed.
    error: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// A CNI ADD waiting for its answer.
struct PendingAdd {
    request: ipc::agent::CniPod,
    netns: Option<OwnedFd>,
    /// The UID it was attached as.
    attached: Option<String>,
    since: Instant,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

/// What `/pods` shows of a held pod.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// UID.
    pub uid: String,
    /// `namespace/name`.
    pub name: String,
    /// The inode of its network namespace.
    pub netns: Option<u64>,
    /// Capture rules installed.
    pub rules: bool,
    /// node-proxy serves it.
    pub served: bool,
    /// The agent holds its listeners.
    pub listeners: bool,
    /// The last error, if the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the admin endpoint and the state file show.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The source has listed everything.
    pub synced: bool,
    /// node-proxy is connected and has the full set.
    pub node_proxy: bool,
    /// node-proxy's process, while connected.
    pub node_proxy_pid: Option<u32>,
    /// Replays sent so far (one per node-proxy connection).
    pub replays: u64,
    /// The held pods.
    pub pods: Vec<PodStatus>,
    /// Enrolled namespaces, per the source.
    pub enrolled_namespaces: Vec<String>,
}

/// The inputs the reconciler waits on.
pub struct Inputs {
    /// The source's views.
    pub views: watch::Receiver<Arc<View>>,
    /// The plugin's requests.
    pub cni: mpsc::Receiver<CniRequest>,
    /// The node-proxy link's events.
    pub link_events: mpsc::UnboundedReceiver<link::Event>,
}

/// The reconciler.
pub struct Agent {
    settings: Settings,
    view: Arc<View>,
    held: BTreeMap<String, Pod>,
    link: Link,
    link_state: plan::Link,
    link_pid: Option<u32>,
    /// What node-proxy said it serves when it connected; taken by adoption.
    inventory: HashMap<String, HandedPod>,
    /// The last look under `/proc`, for the next decision, and what it found.
    found: Option<BTreeMap<String, Found>>,
    last_found: BTreeMap<String, Found>,
    last_scan: Option<Instant>,
    /// The pods the last look was for.
    looked_for: BTreeSet<String>,
    probes: BTreeSet<IpAddr>,
    probes_retry: Option<Instant>,
    pending: Vec<PendingAdd>,
    tombstones: HashMap<String, (NetnsId, Instant)>,
    status: Arc<Mutex<Status>>,
    metrics: Arc<Metrics>,
    /// The pods outside the mesh were looked at for rules left from before this agent.
    swept: bool,
}

impl Agent {
    /// A reconciler with nothing held.
    pub fn new(
        settings: Settings,
        link: Link,
        status: Arc<Mutex<Status>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Agent {
            settings,
            view: Arc::default(),
            held: BTreeMap::new(),
            link,
            link_state: plan::Link::Down,
            link_pid: None,
            inventory: HashMap::new(),
            found: None,
            last_found: BTreeMap::new(),
            last_scan: None,
            looked_for: BTreeSet::new(),
            probes: BTreeSet::new(),
            probes_retry: None,
            pending: Vec::new(),
            tombstones: HashMap::new(),
            status,
            metrics,
            swept: false,
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(mut self, mut inputs: Inputs, shutdown: CancellationToken) -> Self {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = inputs.views.changed() => {
                    if changed.is_err() { break }
                    self.view = inputs.views.borrow_and_update().clone();
                }
                request = inputs.cni.recv() => match request {
                    Some(r) => self.request(r).await,
                    None => break,
                },
                event = inputs.link_events.recv() => match event {
                    Some(e) => self.link_event(e),
                    None => break,
                },
                _ = tick.tick() => self.tick(),
            }
            if !self.swept && self.view.synced {
                self.swept = true;
                self.sweep().await;
            }
            self.attach_pending();
            // What is decided already is not held up by acting (a slow node-proxy).
            self.answer_pending();
            self.settle().await;
            self.answer_pending();
            self.publish();
        }
        self
    }

    fn link_event(&mut self, event: link::Event) {
        match event {
            link::Event::Up { pid, inventory } => {
                self.link_state = plan::Link::Up { replayed: false };
                self.link_pid = pid;
                self.inventory = inventory
                    .into_iter()
                    .map(|p| (p.pod.uid.clone(), p))
                    .collect();
                // Pods found before node-proxy answered take their listeners back now.
                let uids: Vec<String> = self.held.keys().cloned().collect();
                for uid in uids {
                    let listeners = self.take_inventory(&uid);
                    if let Some(pod) = self.held.get_mut(&uid) {
                        pod.summary.served = listeners.is_some();
                        if pod.listeners.is_none() {
                            pod.listeners = listeners;
                        }
                    }
                }
            }
            link::Event::Down { why } => {
                if self.link_state != plan::Link::Down {
                    warn!("node-proxy went away ({why}); its pods stay captured and their connections wait for the next one");
                }
                self.link_state = plan::Link::Down;
                self.link_pid = None;
                self.inventory.clear();
                for pod in self.held.values_mut() {
                    pod.summary.served = false;
                }
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        for pod in self.held.values_mut() {
            if pod.retry_at.is_some_and(|at| at <= now) {
                pod.retry_at = None;
                pod.summary.backoff = false;
            }
        }
        if self.probes_retry.is_some_and(|at| at <= now) {
            self.probes_retry = None;
            // What is installed is unknown after a failure: have it set again.
            self.probes.insert(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        }
        self.tombstones
            .retain(|_, (_, at)| now.duration_since(*at) < TOMBSTONE);
        let due = self
            .last_scan
            .is_none_or(|at| now.duration_since(at) >= RESCAN_EVERY);
        if due && self.view.synced && !self.held.is_empty() {
            self.scan();
        }
    }

    /// Looks under `/proc` for the pods the source wants.
    fn scan(&mut self) {
        let uids: BTreeSet<String> = self
            .view
            .pods
            .iter()
            .filter(|(_, p)| self.view.wants(p))
            .map(|(uid, _)| uid.clone())
            .collect();
        let proc = self.settings.proc.clone();
        let mut found = discover::scan(&proc, &uids, self.settings.node_netns);
        // A sandbox the runtime deleted may still have processes for a moment.
        found.retain(|uid, f| {
            self.tombstones
                .get(uid)
                .is_none_or(|(netns, _)| *netns != f.netns)
        });
        self.metrics.scans.inc();
        self.last_scan = Some(Instant::now());
        self.last_found = found.clone();
        self.found = Some(found);
    }

    /// Takes the capture rules out of this node's pods that are outside the mesh and not
    /// held: a namespace unlabelled (or a pod labelled `weft.dev/mesh=disabled`) while no
    /// agent ran, during a restart or an upgrade, leaves its pods' rules in place, and
    /// they send every connection to listeners nobody serves. Once, when the source has
    /// listed everything: a running agent releases what it holds.
    async fn sweep(&mut self) {
        let uids: BTreeSet<String> = self
            .view
            .pods
            .iter()
            .filter(|(uid, p)| {
                !self.view.keeps(p) && !p.host_network && !self.held.contains_key(*uid)
            })
            .map(|(uid, _)| uid.clone())
            .collect();
        if uids.is_empty() {
            return;
        }
        let proc = self.settings.proc.clone();
        let found = discover::scan(&proc, &uids, self.settings.node_netns);
        for (uid, found) in found {
            let name = self
                .view
                .pods
                .get(&uid)
                .map_or_else(|| uid.clone(), |p| p.name());
            let file = match discover::open(&proc, &found) {
                Ok(f) => OwnedFd::from(f),
                // It exited while it was looked at: nothing left to serve.
                Err(e) => {
                    debug!(pod = %name, "cannot open its namespace: {e}");
                    continue;
                }
            };
            let left = match capture::installed(file.as_fd(), &name).await {
                Ok(installed) => installed.present,
                Err(e) => {
                    warn!(pod = %name, "cannot read its network namespace's rules: {e}");
                    continue;
                }
            };
            if left.is_empty() {
                continue;
            }
            match capture::remove(file.as_fd(), &name).await {
                Ok(()) => info!(
                    pod = %name,
                    "removed the capture rules left from when it was in the mesh ({})",
                    left.join(", ")
                ),
                Err(e) => warn!(
                    pod = %name,
                    "cannot remove the capture rules left from when it was in the mesh: {e}"
                ),
            }
        }
    }

    /// Decides and acts until nothing is left to do (bounded: a pod whose action fails
    /// waits for its retry).
    async fn settle(&mut self) {
        for _ in 0..16 {
            let found: Option<BTreeMap<String, NetnsId>> = self
                .found
                .take()
                .map(|f| f.into_iter().map(|(uid, f)| (uid, f.netns)).collect());
            if let Some(found) = &found {
                for (uid, pod) in &mut self.held {
                    if found.get(uid).is_some() && found.get(uid) == pod.summary.netns.as_ref() {
                        pod.summary.seen = true;
                    }
                }
            }
            let held: BTreeMap<String, Held> = self
                .held
                .iter()
                .map(|(uid, p)| (uid.clone(), p.summary.clone()))
                .collect();
            let actions = plan::plan(&plan::Inputs {
                view: &self.view,
                held: &held,
                link: self.link_state,
                found: found.as_ref(),
                probes: &self.probes,
            });
            if actions.is_empty() {
                return;
            }
            let mut progressed = false;
            for action in actions {
                progressed |= self.execute(action).await;
            }
            if !progressed {
                return;
            }
        }
    }

    /// Carries out one action; whether it changed anything the next decision reads.
    async fn execute(&mut self, action: Action) -> bool {
        debug!(?action, "acting");
        match action {
            Action::Discover(uids) => {
                // A pod looked for already waits for the next look; a pod the source
                // has just come to want (a namespace labelled) is looked for at once.
                let recent = self.last_scan.is_some_and(|at| at.elapsed() < SCAN_EVERY);
                let replay_waits = self.link_state == (plan::Link::Up { replayed: false });
                let new = uids.iter().any(|u| !self.looked_for.contains(u));
                if recent && !replay_waits && !new {
                    return false;
                }
                self.looked_for = uids.into_iter().collect();
                self.scan();
                true
            }
            Action::Adopt { uid, netns } => {
                self.adopt(&uid, netns).await;
                true
            }
            Action::Lost(uid) => {
                if let Some(pod) = self.held.remove(&uid) {
                    info!(pod = %pod.name, "the pod's network namespace is gone; dropping it");
                    if self.link_state != plan::Link::Down {
                        let _ = self.link.remove(&uid).await;
                    }
                }
                true
            }
            Action::Capture(uid) => {
                self.capture(&uid).await;
                true
            }
            Action::Serve(uid) => {
                self.serve(&uid).await;
                true
            }
            Action::Replay(uids) => {
                self.replay(uids).await;
                true
            }
            Action::Release(uid) => {
                self.release(&uid).await;
                true
            }
            Action::Forget(uid) => {
                self.held.remove(&uid);
                true
            }
            Action::Probes(set) => {
                // Not before the pods captured before a restart have been found again:
                // until then the set would be empty, and the node's probes captured.
                if self.last_scan.is_none() {
                    return false;
                }
                self.set_probes(set).await;
                true
            }
        }
    }

    async fn adopt(&mut self, uid: &str, netns: NetnsId) {
        let name = self
            .view
            .pods
            .get(uid)
            .map_or_else(|| uid.to_owned(), |p| p.name());
        let Some(found) = self.last_found.get(uid).copied() else {
            return;
        };
        let file = match discover::open(&self.settings.proc, &found) {
            Ok(f) => OwnedFd::from(f),
            Err(e) => {
                debug!(pod = %name, "cannot open the namespace found: {e}");
                self.last_found.remove(uid);
                return;
            }
        };
        let rules = match capture::installed(file.as_fd(), &name).await {
            Ok(parts) => parts.complete(),
            Err(e) => {
                warn!(pod = %name, "cannot read its capture rules: {e}");
                false
            }
        };
        let previous = self.held.remove(uid);
        let served = self.take_inventory_at(uid, netns);
        let ips = previous
            .as_ref()
            .filter(|p| p.summary.netns == Some(netns))
            .map(|p| p.summary.ips.clone())
            .unwrap_or_default();
        info!(
            pod = %name,
            netns = netns.1,
            rules,
            served = served.is_some(),
            "found the pod's network namespace under /proc"
        );
        self.held.insert(
            uid.to_owned(),
            Pod {
                name,
                summary: Held {
                    netns: Some(netns),
                    seen: true,
                    ips,
                    rules,
                    served: served.is_some() && self.link_state != plan::Link::Down,
                    backoff: false,
                },
                netns: Some(file),
                listeners: served,
                ..Pod::default()
            },
        );
    }

    /// The listeners node-proxy serves a held pod on, from its inventory, if it serves
    /// the pod in the namespace the agent holds.
    fn take_inventory(&mut self, uid: &str) -> Option<[OwnedFd; 3]> {
        let netns = self.held.get(uid)?.summary.netns?;
        self.take_inventory_at(uid, netns)
    }

    /// As [`take_inventory`](Self::take_inventory), for a pod in namespace `netns`.
    fn take_inventory_at(&mut self, uid: &str, netns: NetnsId) -> Option<[OwnedFd; 3]> {
        let p = self.inventory.remove(uid)?;
        let same = ipc::datagram::file_id(&p.netns).ok() == Some(netns);
        same.then_some(p.listeners)
    }

    /// The pod as node-proxy is told of it.
    fn info(&self, uid: &str) -> Option<PodInfo> {
        let source = self.view.pods.get(uid)?;
        let held = self.held.get(uid)?;
        let ips = match held.summary.ips.is_empty() {
            true => source.ips.clone(),
            false => held.summary.ips.clone(),
        };
        Some(PodInfo {
            uid: uid.to_owned(),
            name: source.name.clone(),
            namespace: source.namespace.clone(),
            service_account: source.service_account.clone(),
            ips,
        })
    }

    /// Opens the pod's listeners if the agent holds none, and duplicates of everything
    /// node-proxy needs.
    fn handed(&mut self, uid: &str) -> Result<Handed, String> {
        let info = self
            .info(uid)
            .ok_or("it is not in the source or not held")?;
        let addrs = runtime::netns::pod_listen_addrs(&info.ips)?;
        let pod = self.held.get_mut(uid).ok_or("it is not held")?;
        let netns = pod
            .netns
            .as_ref()
            .ok_or("its network namespace is not held")?;
        if pod.listeners.is_none() {
            match runtime::netns::listen_in(netns.as_fd(), &addrs) {
                Ok(opened) => pod.listeners = <[OwnedFd; 3]>::try_from(opened).ok(),
                // Taken: node-proxy serves the pod on listeners of its own (opened before
                // this agent held any). It keeps them; their connections do not survive
                // its next restart, but none is dropped now.
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                    warn!(pod = %pod.name, "its ports are in use, by node-proxy's own listeners; handing it over without the agent's");
                }
                Err(e) => return Err(format!("cannot open its listeners: {e}")),
            }
        }
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| format!("cannot duplicate a descriptor: {e}"))
        };
        let listeners = match pod.listeners.as_ref() {
            Some([a, b, c]) => Some([dup(a)?, dup(b)?, dup(c)?]),
            None => None,
        };
        Ok(Handed {
            info,
            netns: dup(netns)?,
            listeners,
        })
    }

    fn failed(&mut self, uid: &str, step: Step, why: String) {
        let Some(pod) = self.held.get_mut(uid) else {
            return;
        };
        warn!(pod = %pod.name, "cannot {}: {why} (retrying)", step.doing());
        pod.backoff = (pod.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        pod.retry_at = Some(Instant::now() + pod.backoff);
        pod.summary.backoff = true;
        pod.error = Some(why);
        crate::metrics::count(&self.metrics.failures, step.label());
    }

    fn succeeded(&mut self, uid: &str) {
        if let Some(pod) = self.held.get_mut(uid) {
            pod.error = None;
            pod.backoff = Duration::ZERO;
        }
    }

    async fn capture(&mut self, uid: &str) {
        let handed = match self.handed(uid) {
            Ok(h) => h,
            Err(e) => return self.failed(uid, Step::Capture, e),
        };
        let name = handed.info.to_string();
        let handed_ips = handed.info.ips.clone();
        // Served before captured: the rules send traffic to listeners node-proxy serves.
        if let Err(e) = self.link.add(handed).await {
            return self.failed(uid, Step::Handoff, e.to_string());
        }
        if let Some(p) = self.held.get_mut(uid) {
            p.summary.served = true;
        }
        // IPv6 is captured only into listeners known to take it: the ones the agent
        // opened. Without them (node-proxy serves listeners of its own, perhaps an
        // earlier release's IPv4 ones) IPv6 passes uncaptured rather than to nothing.
        let held_listeners = self.held.get(uid).is_some_and(|p| p.listeners.is_some());
        let ipv6 = held_listeners
            && runtime::netns::pod_listen_addrs(&handed_ips)
                .is_ok_and(|[outbound, _, _]| outbound.is_ipv6());
        let result = match self.held.get(uid).and_then(|p| p.netns.as_ref()) {
            Some(netns) => capture::install(netns.as_fd(), &name, self.settings.probe_source, ipv6)
                .await
                .map_err(|e| e.to_string()),
            None => Err("its network namespace is not held".into()),
        };
        if !ipv6 && handed_ips_have_v6(&handed_ips) {
            warn!(pod = %name, "its IPv6 connections are not captured: node-proxy serves it on listeners the agent did not open (an earlier release's?); they are captured once the pod is recreated");
        }
        match result {
            Ok(()) => {
                if let Some(p) = self.held.get_mut(uid) {
                    p.summary.rules = true;
                }
                self.succeeded(uid);
                self.metrics.captures.inc();
                info!(pod = %name, "captured: node-proxy serves it and its traffic goes through it");
            }
            Err(e) => {
                // Nothing half-done: node-proxy lets go of it until the next attempt.
                let _ = self.link.remove(uid).await;
                if let Some(p) = self.held.get_mut(uid) {
                    p.summary.served = false;
                }
                self.failed(uid, Step::Rules, e);
            }
        }
    }

    async fn serve(&mut self, uid: &str) {
        let handed = match self.handed(uid) {
            Ok(h) => h,
            Err(e) => return self.failed(uid, Step::Handoff, e),
        };
        match self.link.add(handed).await {
            Ok(()) => {
                if let Some(p) = self.held.get_mut(uid) {
                    p.summary.served = true;
                }
                self.succeeded(uid);
            }
            Err(e) => self.failed(uid, Step::Handoff, e.to_string()),
        }
    }

    async fn replay(&mut self, uids: Vec<String>) {
        let mut pods = Vec::new();
        let mut order = Vec::new();
        for uid in uids {
            match self.handed(&uid) {
                Ok(h) => {
                    pods.push(h);
                    order.push(uid);
                }
                Err(e) => self.failed(&uid, Step::Handoff, e),
            }
        }
        let count = pods.len();
        match self.link.snapshot(pods).await {
            Ok(each) => {
                for (uid, result) in order.iter().zip(each) {
                    match result {
                        Ok(()) => {
                            if let Some(p) = self.held.get_mut(uid) {
                                p.summary.served = true;
                            }
                            self.succeeded(uid);
                        }
                        Err(e) => {
                            if let Some(p) = self.held.get_mut(uid) {
                                p.summary.served = false;
                            }
                            self.failed(uid, Step::Handoff, e.to_string());
                        }
                    }
                }
                self.link_state = plan::Link::Up { replayed: true };
                self.inventory.clear();
                self.metrics.replays.inc();
                info!(
                    pods = count,
                    pid = self.link_pid,
                    "node-proxy has the node's pods"
                );
            }
            // The link reports the disconnection; the next connection replays.
            Err(e) => warn!("replay to node-proxy failed: {e}"),
        }
    }

    async fn release(&mut self, uid: &str) {
        let Some(pod) = self.held.get_mut(uid) else {
            return;
        };
        let name = pod.name.clone();
        // Rules first: no new connection is sent to the listeners while they close.
        if let (Some(netns), true) = (pod.netns.as_ref(), pod.summary.rules) {
            if let Err(e) = capture::remove(netns.as_fd(), &name).await {
                // The namespace is held, so removal fails only for a reason worth telling:
                // if the pod lives on, its connections go to listeners that close.
                warn!(pod = %name, "cannot remove its capture rules: {e}; if the pod keeps running, its connections fail until it is recreated or the agent restarts (a starting agent removes leftover rules)");
            }
        }
        pod.summary.rules = false;
        if self.link_state != plan::Link::Down {
            if let Err(e) = self.link.remove(uid).await {
                debug!(pod = %name, "taking it from node-proxy: {e}");
            }
        }
        if let Some(pod) = self.held.get_mut(uid) {
            pod.summary.served = false;
            pod.listeners = None;
        }
        info!(pod = %name, "released: its traffic no longer goes through node-proxy");
    }

    async fn set_probes(&mut self, set: BTreeSet<IpAddr>) {
        let pods: BTreeSet<IpAddr> = set
            .iter()
            .copied()
            .filter(|ip| !ip.is_unspecified())
            .collect();
        match capture::node_probes(&pods, self.settings.probe_source).await {
            Ok(()) => debug!(pods = pods.len(), "node probe exemption set"),
            Err(e) => {
                warn!("cannot set the node's probe exemption: {e} (retrying in 5 s)");
                self.probes_retry = Some(Instant::now() + Duration::from_secs(5));
            }
        }
        self.probes = set;
    }

    async fn request(&mut self, r: CniRequest) {
        let CniRequest {
            request,
            netns,
            reply,
        } = r;
        crate::metrics::count(&self.metrics.cni_requests, request.kind());
        match request {
            Request::Add { pod, .. } => self.pending.push(PendingAdd {
                request: pod,
                netns,
                attached: None,
                since: Instant::now(),
                reply,
            }),
            Request::Del { pod, .. } => {
                let uid = self.uid_of(&pod);
                // A pending add for the same sandbox is over.
                self.pending
                    .retain(|p| p.request.container_id != pod.container_id);
                if let Some(uid) = uid {
                    if let Some(netns) = self.held.get(&uid).and_then(|p| p.summary.netns) {
                        self.tombstones.insert(uid.clone(), (netns, Instant::now()));
                    }
                    if self.held.contains_key(&uid) {
                        self.release(&uid).await;
                        self.held.remove(&uid);
                    }
                }
                let _ = reply.send(Reply::ok(None, format!("pod {pod} detached")));
            }
            Request::Check { pod, .. } => {
                let answer = self.check(&pod, netns).await;
                let _ = reply.send(answer);
            }
        }
    }

    /// The UID of the pod a request names: the runtime's, or the source's by name.
    fn uid_of(&self, pod: &ipc::agent::CniPod) -> Option<String> {
        pod.uid.clone().or_else(|| {
            self.view
                .by_name(&pod.namespace, &pod.name)
                .map(|p| p.uid.clone())
                .or_else(|| {
                    self.held
                        .iter()
                        .find(|(_, p)| p.name == format!("{}/{}", pod.namespace, pod.name))
                        .map(|(uid, _)| uid.clone())
                })
        })
    }

    async fn check(&self, pod: &ipc::agent::CniPod, netns: Option<OwnedFd>) -> Reply {
        let Some(source) = self.source_pod(pod) else {
            return Reply::error(
                format!("pod {pod} is not in {}", self.settings.source),
                true,
            );
        };
        if !self.view.wants(source) {
            return Reply::ok(None, format!("pod {pod} is not enrolled"));
        }
        let Some(held) = self.held.get(&source.uid) else {
            return Reply::error(format!("pod {pod} is enrolled but not captured"), false);
        };
        let same = netns.and_then(|fd| ipc::datagram::file_id(&fd).ok()) == held.summary.netns;
        if !same {
            return Reply::error(
                format!("pod {pod} is captured in another network namespace than the runtime's"),
                false,
            );
        }
        let parts = match held.netns.as_ref() {
            Some(fd) => capture::installed(fd.as_fd(), &held.name).await,
            None => return Reply::error(format!("pod {pod}: its namespace is not held"), false),
        };
        match parts {
            Ok(p) if p.complete() && held.summary.served => Reply::ok(None, "captured"),
            Ok(p) if !p.complete() => Reply::error(
                format!(
                    "pod {pod} is enrolled but its capture rules are missing: {}",
                    p.missing.join(", ")
                ),
                false,
            ),
            Ok(_) => Reply::error(
                format!("pod {pod} is captured but node-proxy does not serve it"),
                true,
            ),
            Err(e) => Reply::error(e.to_string(), true),
        }
    }

    fn source_pod(&self, pod: &ipc::agent::CniPod) -> Option<&crate::source::SourcePod> {
        let found = self.view.by_name(&pod.namespace, &pod.name)?;
        match &pod.uid {
            Some(uid) if *uid != found.uid => None,
            _ => Some(found),
        }
    }

    /// Takes each pending ADD's namespace as its pod's, once the source knows the pod
    /// and wants it.
    fn attach_pending(&mut self) {
        for p in &mut self.pending {
            if p.attached.is_some() || p.netns.is_none() {
                continue;
            }
            let Some(source) = self
                .view
                .by_name(&p.request.namespace, &p.request.name)
                .filter(|s| p.request.uid.as_ref().is_none_or(|u| *u == s.uid))
            else {
                continue;
            };
            if !self.view.wants(source) || p.request.ips.is_empty() {
                continue;
            }
            let Some(fd) = p.netns.take() else { continue };
            let Ok(id) = ipc::datagram::file_id(&fd) else {
                continue;
            };
            let uid = source.uid.clone();
            self.tombstones.remove(&uid);
            let replaced = self.held.insert(
                uid.clone(),
                Pod {
                    name: source.name(),
                    summary: Held {
                        netns: Some(id),
                        seen: false,
                        ips: p.request.ips.iter().map(|ip| ip.to_canonical()).collect(),
                        rules: false,
                        served: false,
                        backoff: false,
                    },
                    netns: Some(fd),
                    ..Pod::default()
                },
            );
            if replaced.is_some_and(|old| old.summary.netns != Some(id)) {
                info!(pod = %source.name(), "the runtime made the pod a new sandbox; capturing it there");
            }
            p.attached = Some(uid);
        }
    }

    /// Answers the pending ADDs that are decided (or out of time).
    fn answer_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for p in pending {
            match self.decide_add(&p) {
                Some(reply) => {
                    let answer = match (reply.ok, reply.verdict) {
                        (true, Some(Verdict::Captured)) => "captured",
                        (true, _) => "passed",
                        (false, _) => "failed",
                    };
                    crate::metrics::count(&self.metrics.cni_answers, answer);
                    let _ = p.reply.send(reply);
                }
                None => self.pending.push(p),
            }
        }
    }

    fn decide_add(&self, p: &PendingAdd) -> Option<Reply> {
        let pod = &p.request;
        let waited = p.since.elapsed();
        if !self.view.synced {
            return (waited > SOURCE_WAIT).then(|| {
                Reply::error(
                    format!(
                        "the node agent has not read {} yet; pod {pod} waits",
                        self.settings.source
                    ),
                    true,
                )
            });
        }
        let Some(source) = self.source_pod(pod) else {
            return (waited > SOURCE_WAIT).then(|| {
                Reply::error(
                    format!(
                        "pod {pod} is not in {} yet (or has another UID there); it waits for it",
                        self.settings.source
                    ),
                    true,
                )
            });
        };
        if !self.view.wants(source) {
            let why = if !self.view.namespace_enrolled(&pod.namespace) {
                format!("namespace {} is not enrolled", pod.namespace)
            } else {
                format!("pod {pod} opted out (weft.dev/mesh=disabled, hostNetwork, or finished)")
            };
            return Some(Reply::ok(Some(Verdict::Passed), why));
        }
        if pod.ips.is_empty() {
            return Some(Reply::error(
                format!("pod {pod} is enrolled but prevResult holds no address of it; list weft-cni after the plugin that assigns them"),
                false,
            ));
        }
        let uid = p.attached.as_ref()?;
        let held = self.held.get(uid);
        if let Some(h) = held.filter(|h| h.summary.rules && h.summary.served) {
            return Some(Reply::ok(
                Some(Verdict::Captured),
                format!(
                    "pod {pod} captured (netns {})",
                    h.summary.netns.map_or(0, |n| n.1)
                ),
            ));
        }
        if waited < CAPTURE_WAIT {
            return None;
        }
        let why = match (self.link_state, held.and_then(|h| h.error.clone())) {
            (_, Some(e)) => e,
            (plan::Link::Down, None) => {
                LinkError::Down(self.settings.handoff.display().to_string()).to_string()
            }
            _ => "capture did not finish in time".into(),
        };
        Some(Reply::error(
            format!("pod {pod} is enrolled, but its capture could not be installed: {why}"),
            true,
        ))
    }

    /// Updates what the admin endpoint shows.
    fn publish(&self) {
        let pods = self
            .held
            .iter()
            .map(|(uid, p)| PodStatus {
                uid: uid.clone(),
                name: p.name.clone(),
                netns: p.summary.netns.map(|n| n.1),
                rules: p.summary.rules,
                served: p.summary.served,
                listeners: p.listeners.is_some(),
                error: p.error.clone(),
            })
            .collect();
        let captured = self.held.values().filter(|p| p.summary.rules).count();
        self.metrics
            .captured
            .set(i64::try_from(captured).unwrap_or(i64::MAX));
        self.metrics.node_proxy.set(i64::from(
            self.link_state == (plan::Link::Up { replayed: true }),
        ));
        let mut status = self.status.lock().expect("status lock is never poisoned");
        *status = Status {
            synced: self.view.synced,
            node_proxy: self.link_state == (plan::Link::Up { replayed: true }),
            node_proxy_pid: self.link_pid,
            replays: self.metrics.replays.get(),
            pods,
            enrolled_namespaces: self.view.enrolled_namespaces(),
        };
    }

    /// Removes every pod's capture and the node's probe exemption (Weft leaves the node).
    pub async fn uninstall(&mut self) {
        let uids: Vec<String> = self.held.keys().cloned().collect();
        for uid in uids {
            self.release(&uid).await;
        }
        self.held.clear();
        if let Err(e) = capture::remove_node_probes().await {
            warn!("cannot remove the node's probe exemption: {e}");
        }
    }
}

/// A step of enrolling a pod that can fail (and is retried with a backoff).
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Opening the pod's namespace and listeners.
    Capture,
    /// Installing its capture rules.
    Rules,
    /// Handing it to node-proxy.
    Handoff,
}

impl Step {
    /// For the log: "cannot ...".
    fn doing(self) -> &'static str {
        match self {
            Step::Capture => "capture the pod",
            Step::Rules => "install the capture rules",
            Step::Handoff => "hand the pod to node-proxy",
        }
    }

    /// The `what` label of `weft_agent_failures_total`.
    fn label(self) -> &'static str {
        match self {
            Step::Capture => "capture",
            Step::Rules => "rules",
            Step::Handoff => "handoff",
        }
    }
}

fn handed_ips_have_v6(ips: &[IpAddr]) -> bool {
    ips.iter().any(|ip| ip.to_canonical().is_ipv6())
}

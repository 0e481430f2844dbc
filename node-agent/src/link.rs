//! The agent's connection to node-proxy's handoff socket, on a thread of its own (the
//! handoff client is blocking). It connects, and reconnects whenever node-proxy goes
//! away (a crash, an OOM kill, the old process of an upgrade exiting), reporting each
//! connection with node-proxy's inventory so the reconciler can replay the full set
//! before anything else.
//!
//! ```text
//!  reconciler --Command (pods with duplicated fds)--> link thread --handoff--> node-proxy
//!  reconciler <--Event::Up {inventory} / Event::Down-- link thread
//! ```

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use runtime::handoff::{HandedPod, HandoffClient, HandoffError, PodInfo, SnapshotPod};
use std::os::fd::{AsFd, OwnedFd};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How often a node-proxy that is away is looked for, and an idle connection checked.
const TICK: Duration = Duration::from_millis(100);

/// A pod as handed to node-proxy: duplicates of its namespace and listeners, closed
/// once sent.
#[derive(Debug)]
pub struct Handed {
    /// The pod.
    pub info: PodInfo,
    /// Its network namespace.
    pub netns: OwnedFd,
    /// Its listeners: outbound, inbound plaintext, HBONE (none: node-proxy's own).
    pub listeners: Option<[OwnedFd; 3]>,
}

/// Why node-proxy did not take a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// Not connected: node-proxy is down or restarting.
    #[error("node-proxy is not connected at {0} (is it running on this node?)")]
    Down(String),
    /// node-proxy answered with an error about this pod.
    #[error("{0}")]
    Refused(String),
    /// The connection failed while the change was on its way; it is re-made.
    #[error("{0}")]
    Transport(String),
}

type Reply<T> = oneshot::Sender<Result<T, LinkError>>;

enum Command {
    Snapshot(Vec<Handed>, Reply<Vec<Result<(), LinkError>>>),
    Add(Handed, Reply<()>),
    Remove(String, Reply<()>),
}

/// What the link reports.
#[derive(Debug)]
pub enum Event {
    /// Connected to a node-proxy (process `pid`), which serves the `inventory` pods.
    Up {
        /// Its process, if the socket tells.
        pid: Option<u32>,
        /// The pods it serves already, with their namespaces and listeners.
        inventory: Vec<HandedPod>,
    },
    /// The connection ended.
    Down {
        /// Why.
        why: String,
    },
}

/// The reconciler's handle on the link.
#[derive(Clone)]
pub struct Link {
    commands: mpsc::Sender<Command>,
    path: PathBuf,
}

impl Link {
    /// Starts the link thread for node-proxy's socket at `path`; `events` hears of every
    /// connection and disconnection.
    pub fn start(
        path: PathBuf,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let (commands, rx) = mpsc::channel();
        let at = path.clone();
        std::thread::Builder::new()
            .name("node-proxy link".into())
            .spawn(move || run(&at, &rx, &events, &shutdown))?;
        Ok(Link { commands, path })
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, LinkError> {
        let (tx, rx) = oneshot::channel();
        let down = || LinkError::Down(self.path.display().to_string());
        self.commands.send(make(tx)).map_err(|_| down())?;
        rx.await.map_err(|_| down())?
    }

    /// Replays the full set: node-proxy serves these pods and drops any other. Each
    /// pod's own answer, in order.
    pub async fn snapshot(
        &self,
        pods: Vec<Handed>,
    ) -> Result<Vec<Result<(), LinkError>>, LinkError> {
        self.ask(|r| Command::Snapshot(pods, r)).await
    }

    /// Hands one pod over.
    pub async fn add(&self, pod: Handed) -> Result<(), LinkError> {
        self.ask(|r| Command::Add(pod, r)).await
    }

    /// Takes a pod back (done if node-proxy does not serve it).
    pub async fn remove(&self, uid: &str) -> Result<(), LinkError> {
        let uid = uid.to_owned();
        self.ask(|r| Command::Remove(uid, r)).await
    }
}

fn refused_or_transport(e: HandoffError) -> LinkError {
    match e {
        HandoffError::Rejected(why) | HandoffError::Invalid(why) => LinkError::Refused(why),
        other => LinkError::Transport(other.to_string()),
    }
}

fn run(
    path: &Path,
    commands: &mpsc::Receiver<Command>,
    events: &tokio::sync::mpsc::UnboundedSender<Event>,
    shutdown: &CancellationToken,
) {
    let mut away_logged = false;
    while !shutdown.is_cancelled() {
        // Changes asked for while disconnected are refused at once: the reconciler
        // replays everything on the next connection.
        while let Ok(command) = commands.try_recv() {
            refuse(command, LinkError::Down(path.display().to_string()));
        }
        let mut client = match HandoffClient::connect(path) {
            Ok(c) => c,
            Err(e) => {
                if !away_logged {
                    info!("waiting for node-proxy: {e}");
                    away_logged = true;
                }
                std::thread::sleep(TICK);
                continue;
            }
        };
        away_logged = false;
        let pid = client.peer_pid();
        let inventory = match client.inventory() {
            Ok(pods) => pods,
            Err(e) => {
                warn!("node-proxy (pid {pid:?}) did not give its inventory: {e}; reconnecting");
                std::thread::sleep(TICK);
                continue;
            }
        };
        info!(pid, pods = inventory.len(), "connected to node-proxy");
        if events.send(Event::Up { pid, inventory }).is_err() {
            return;
        }
        let why = serve(&mut client, commands, shutdown);
        debug!("node-proxy link down: {why}");
        if events.send(Event::Down { why }).is_err() {
            return;
        }
    }
}

/// Carries commands over one connection until it ends; returns why it ended.
fn serve(
    client: &mut HandoffClient,
    commands: &mpsc::Receiver<Command>,
    shutdown: &CancellationToken,
) -> String {
    loop {
        if shutdown.is_cancelled() {
            return "the agent is stopping".into();
        }
        let command = match commands.recv_timeout(TICK) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Timeout) if client.closed() => {
                return "node-proxy closed the connection".into()
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return "the agent is stopping".into(),
        };
        let ended = match command {
            Command::Add(pod, reply) => {
                let listeners = pod
                    .listeners
                    .as_ref()
                    .map(|l| l.each_ref().map(|l| l.as_fd()));
                let r = client
                    .add(&pod.info, pod.netns.as_fd(), listeners)
                    .map_err(refused_or_transport);
                answer(reply, r)
            }
            Command::Remove(uid, reply) => {
                answer(reply, client.remove(&uid).map_err(refused_or_transport))
            }
            Command::Snapshot(pods, reply) => {
                let listed: Vec<SnapshotPod<'_>> = pods
                    .iter()
                    .map(|p| SnapshotPod {
                        pod: &p.info,
                        netns: p.netns.as_fd(),
                        listeners: p
                            .listeners
                            .as_ref()
                            .map(|l| l.each_ref().map(|l| l.as_fd())),
                    })
                    .collect();
                let r = client
                    .snapshot_each(&listed)
                    .map(|each| {
                        each.into_iter()
                            .map(|r| r.map_err(refused_or_transport))
                            .collect()
                    })
                    .map_err(refused_or_transport);
                answer(reply, r)
            }
        };
        if let Some(why) = ended {
            return why;
        }
    }
}

/// Sends the answer; a transport failure ends the connection (its text is returned).
fn answer<T>(reply: Reply<T>, result: Result<T, LinkError>) -> Option<String> {
    let ended = match &result {
        Err(LinkError::Transport(why)) => Some(why.clone()),
        _ => None,
    };
    let _ = reply.send(result);
    ended
}

fn refuse(command: Command, e: LinkError) {
    match command {
        Command::Snapshot(_, r) => drop(r.send(Err(e))),
        Command::Add(_, r) => drop(r.send(Err(e))),
        Command::Remove(_, r) => drop(r.send(Err(e))),
    }
}

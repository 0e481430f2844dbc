//! The socket `weft-cni` asks on: one request per connection, answered by the
//! reconciler (which alone decides about pods), then closed.
//!
//! ```text
//!  weft-cni --add/del/check (+ netns fd)--> accept (at most 256 at once) --> reconciler
//!          <-------------------------------- reply (captured | passed | error) --'
//!          <-- passed: an ADD outside the enrolled namespaces (triage, no reconciler)
//! ```
//!
//! The reconciler answers one thing at a time, and may be held up for a while: by a
//! node-proxy that does not answer the handoff (up to its reply timeout), or, after a
//! restart, by a source it has not read yet. Pods outside the mesh, most of a cluster's,
//! do not wait for it: the socket passes them itself.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipc::agent::{PublishedState, Reply, Request, Verdict, MAX_MESSAGE, VERSION};
use ipc::datagram;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::{count, Metrics};
use crate::source::View;

/// The most plugin connections served at once (a task each; a buffer only while one
/// is read); more wait in the socket's backlog, at most [`READ_TIMEOUT`] when the others
/// send nothing.
const MAX_CONNECTIONS: usize = 256;
/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A plugin's request, for the reconciler.
#[derive(Debug)]
pub struct CniRequest {
    /// What it asks.
    pub request: Request,
    /// The pod's network namespace (`add`, `check`), checked to be one.
    pub netns: Option<OwnedFd>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Reply>,
}

/// What the socket answers without the reconciler: an ADD of a pod whose namespace
/// is not enrolled.
pub struct Triage {
    /// The source's view, as the reconciler gets it.
    pub views: watch::Receiver<Arc<View>>,
    /// What the agent published before this start (the state file), read until the
    /// source has been: the plugin goes by the same while no agent runs.
    pub published: Option<PublishedState>,
    /// Where requests and answers are counted.
    pub metrics: Arc<Metrics>,
}

impl Triage {
    /// The answer to `request` if it needs no reconciler: a pass for a pod whose
    /// namespace the source shows not enrolled, or, before the source is read, one the
    /// last published state did not list. Anything else (a namespace not seen yet, no
    /// published state) goes to the reconciler, which waits to know.
    fn answer(&self, request: &Request) -> Option<Reply> {
        let Request::Add { pod, .. } = request else {
            return None;
        };
        let why = {
            let view = self.views.borrow();
            if view.synced {
                if view.enrollment(&pod.namespace)? {
                    return None;
                }
                format!("namespace {} is not enrolled", pod.namespace)
            } else {
                if self.published.as_ref()?.enrolls(&pod.namespace) {
                    return None;
                }
                format!(
                    "namespace {} is not enrolled (as the agent last published; its source is being read again)",
                    pod.namespace
                )
            }
        };
        count(&self.metrics.cni_requests, request.kind());
        count(&self.metrics.cni_answers, "passed");
        debug!(pod = %pod, "passed: {why}");
        Some(Reply::ok(Some(Verdict::Passed), why))
    }
}

/// Serves the plugin socket at `path` until `shutdown`, answering what `triage` can and
/// passing the other requests to `to`.
pub async fn serve(
    path: &Path,
    to: mpsc::Sender<CniRequest>,
    triage: Triage,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let triage = Arc::new(triage);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = runtime::handoff::seqpacket_listener(path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("agent socket {}: {e}", path.display()))
    })?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            p = slots.clone().acquire_owned() => p.map_err(std::io::Error::other)?,
        };
        let sock = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => sock,
                Err(e) => {
                    // Out of descriptors or similar: back off instead of spinning.
                    warn!("agent socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let to = to.clone();
        let triage = triage.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = one(sock, to, &triage).await {
                debug!("plugin connection: {e}");
            }
        });
    }
}

async fn one(
    sock: UnixStream,
    to: mpsc::Sender<CniRequest>,
    triage: &Triage,
) -> std::io::Result<()> {
    // The buffer only once there is something to read: a connection that sends
    // nothing costs a task, not 64 KiB.
    tokio::time::timeout(READ_TIMEOUT, sock.readable())
        .await
        .map_err(|_| std::io::Error::other("the plugin sent nothing in time"))??;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let received = tokio::time::timeout(
        READ_TIMEOUT,
        sock.async_io(Interest::READABLE, || {
            datagram::recv(sock.as_fd(), &mut buf)
        }),
    )
    .await
    .map_err(|_| std::io::Error::other("the plugin sent nothing in time"))??;
    if received.is_end() {
        return Ok(());
    }
    let reply = match parse(&buf[..received.len], received.truncated, received.fds) {
        Err(e) => Reply::error(e, false),
        Ok((request, netns)) => match triage.answer(&request) {
            Some(reply) => reply,
            None => forward(request, netns, &to).await,
        },
    };
    let bytes = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    sock.async_io(Interest::WRITABLE, || {
        datagram::send(sock.as_fd(), &bytes, &[])
    })
    .await
}

/// The reconciler's answer to `request`.
async fn forward(request: Request, netns: Option<OwnedFd>, to: &mpsc::Sender<CniRequest>) -> Reply {
    let (tx, rx) = oneshot::channel();
    let request = CniRequest {
        request,
        netns,
        reply: tx,
    };
    match to.send(request).await {
        Ok(()) => rx
            .await
            .unwrap_or_else(|_| Reply::error("the node agent is stopping", true)),
        Err(_) => Reply::error("the node agent is stopping", true),
    }
}

/// A request and its namespace, or why it is refused.
pub(crate) fn parse(
    bytes: &[u8],
    truncated: bool,
    fds: Vec<OwnedFd>,
) -> Result<(Request, Option<OwnedFd>), String> {
    if truncated {
        return Err(format!("request larger than {MAX_MESSAGE} bytes"));
    }
    let request: Request =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable request: {e}"))?;
    if request.version() != VERSION {
        return Err(format!(
            "{}: protocol version {} is not supported; this node agent speaks version {VERSION} (upgrade the older of weft-cni and the agent)",
            request.kind(),
            request.version()
        ));
    }
    let what = format!("{} for pod {}", request.kind(), request.pod());
    let mut fds = fds.into_iter();
    let netns = match (request.wants_netns(), fds.next(), fds.next()) {
        (true, Some(fd), None) => {
            datagram::check_netns(&fd).map_err(|e| format!("{what}: {e}"))?;
            Some(fd)
        }
        (false, None, None) => None,
        (wants, _, _) => {
            return Err(format!(
                "{what}: expected {} file descriptor(s)",
                if wants {
                    "1 (the pod's network namespace)"
                } else {
                    "no"
                }
            ))
        }
    };
    if request.pod().namespace.is_empty() || request.pod().name.is_empty() {
        return Err(format!("{what}: the pod's namespace and name must be set"));
    }
    Ok((request, netns))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::agent::CniPod;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// The socket of one test, its directory removed on drop.
    struct Socket(PathBuf);

    impl Socket {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("weft-cni-socket-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Socket(dir.join("agent.sock"))
        }
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// `web` is not enrolled, `shop` is; `new` is not seen yet.
    fn view(synced: bool) -> View {
        let labels = |v: &str| BTreeMap::from([("weft.dev/mesh".to_owned(), v.to_owned())]);
        View {
            synced,
            pods: BTreeMap::new(),
            namespaces: if synced {
                BTreeMap::from([
                    ("shop".to_owned(), labels("enabled")),
                    ("web".to_owned(), BTreeMap::new()),
                ])
            } else {
                BTreeMap::new()
            },
        }
    }

    fn add_in(namespace: &str) -> Request {
        let Request::Add { version, mut pod } = add() else {
            unreachable!("add() is an ADD")
        };
        pod.namespace = namespace.into();
        Request::Add { version, pod }
    }

    /// Sends an ADD for a pod of each namespace to a socket whose reconciler answers
    /// nothing until told: which ADDs were answered without it, and which reached it.
    async fn triaged(
        name: &str,
        view: View,
        published: Option<PublishedState>,
    ) -> (Vec<String>, Vec<String>) {
        let socket = Socket::new(name);
        let (to, mut reconciler) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let triage = Triage {
            views: watch::channel(Arc::new(view)).1,
            published,
            metrics: Arc::new(Metrics::default()),
        };
        let path = socket.0.clone();
        let stop = shutdown.clone();
        let server = tokio::spawn(async move { serve(&path, to, triage, stop).await });
        while !socket.0.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut passed = Vec::new();
        let mut held = Vec::new();
        for namespace in ["web", "shop", "new"] {
            let path = socket.0.clone();
            let request = add_in(namespace);
            let call = tokio::task::spawn_blocking(move || {
                let netns = std::fs::File::open("/proc/self/ns/net").expect("netns");
                ipc::agent::call(
                    &path,
                    &request,
                    Some(netns.as_fd()),
                    Duration::from_secs(60),
                )
            });
            // Whichever comes first: the plugin's answer, or the request at the
            // reconciler (answered then, so that the plugin returns).
            tokio::select! {
                reply = call => {
                    let reply = reply.expect("call").expect("reply");
                    assert!(reply.ok, "{namespace}: {reply:?}");
                    assert_eq!(reply.verdict, Some(Verdict::Passed), "{namespace}: {reply:?}");
                    assert!(reply.message.contains(&format!("namespace {namespace} is not enrolled")), "{reply:?}");
                    passed.push(namespace.to_owned());
                }
                request = reconciler.recv() => {
                    let request = request.expect("request");
                    assert_eq!(request.request.pod().namespace, namespace);
                    assert!(request.netns.is_some(), "the namespace goes with it");
                    let _ = request.reply.send(Reply::error("not decided here", true));
                    held.push(namespace.to_owned());
                }
            }
        }
        shutdown.cancel();
        server.await.expect("join").expect("serve");
        (passed, held)
    }

    #[tokio::test]
    async fn adds_outside_the_enrolled_namespaces_do_not_wait_for_the_reconciler() {
        let published = |enrolled: &[&str]| PublishedState {
            version: VERSION,
            node: "n1".into(),
            enrolled_namespaces: enrolled.iter().map(|n| n.to_string()).collect(),
        };
        // Source read: what it shows.
        let (passed, held) = triaged("synced", view(true), Some(published(&["web"]))).await;
        assert_eq!(
            (passed, held),
            (vec!["web".into()], vec!["shop".into(), "new".into()])
        );
        // Not yet: what the last run published.
        let (passed, held) = triaged("published", view(false), Some(published(&["shop"]))).await;
        assert_eq!(
            (passed, held),
            (vec!["web".into(), "new".into()], vec!["shop".into()])
        );
        // Neither: the reconciler waits to know.
        let (passed, held) = triaged("unknown", view(false), None).await;
        assert!(passed.is_empty(), "{passed:?}");
        assert_eq!(held.len(), 3);
    }

    fn add() -> Request {
        Request::Add {
            version: VERSION,
            pod: CniPod {
                namespace: "shop".into(),
                name: "cart".into(),
                uid: None,
                container_id: "c1".into(),
                ips: vec!["10.244.1.7".parse().expect("ip")],
            },
        }
    }

    #[test]
    fn requests_are_checked_before_the_reconciler_sees_them() {
        let bytes = serde_json::to_vec(&add()).expect("json");
        let netns = || OwnedFd::from(std::fs::File::open("/proc/self/ns/net").expect("netns"));
        assert!(parse(&bytes, false, vec![netns()]).is_ok());
        let e = parse(&bytes, false, vec![]).unwrap_err();
        assert!(
            e.contains("add for pod shop/cart: expected 1 (the pod's network namespace)"),
            "{e}"
        );
        let e = parse(&bytes, false, vec![netns(), netns()]).unwrap_err();
        assert!(e.contains("expected 1"), "{e}");
        let file = OwnedFd::from(std::fs::File::open("/proc/self/status").expect("file"));
        assert!(parse(&bytes, false, vec![file])
            .unwrap_err()
            .contains("not a network namespace"));
        let newer = serde_json::to_vec(&serde_json::json!({
            "type": "add", "version": 2,
            "pod": {"namespace": "shop", "name": "cart", "containerId": "c1"}
        }))
        .expect("json");
        assert!(parse(&newer, false, vec![netns()])
            .unwrap_err()
            .contains("version 2 is not supported"));
        assert!(parse(b"{", false, vec![])
            .unwrap_err()
            .contains("unreadable"));
        assert!(parse(&bytes, true, vec![]).unwrap_err().contains("larger"));
    }
}

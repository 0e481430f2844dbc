//! The socket `weft-cni` asks on: one request per connection, answered by the
//! reconciler (which alone decides about pods), then closed.
//!
//! ```text
//!  weft-cni --add/del/check (+ netns fd)--> accept (at most 64 at once) --> reconciler
//!          <-------------------------------- reply (captured | passed | error) --'
//! ```

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipc::agent::{Reply, Request, MAX_MESSAGE, VERSION};
use ipc::datagram;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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

/// Serves the plugin socket at `path` until `shutdown`, passing requests to `to`.
pub async fn serve(
    path: &Path,
    to: mpsc::Sender<CniRequest>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
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
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = one(sock, to).await {
                debug!("plugin connection: {e}");
            }
        });
    }
}

async fn one(sock: UnixStream, to: mpsc::Sender<CniRequest>) -> std::io::Result<()> {
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
        Ok((request, netns)) => {
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
    };
    let bytes = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    sock.async_io(Interest::WRITABLE, || {
        datagram::send(sock.as_fd(), &bytes, &[])
    })
    .await
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

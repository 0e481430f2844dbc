//! L4 authorization at the destination. Every inbound connection (HBONE or plaintext)
//! is checked when it opens against the policies of its pod, and stays registered while
//! it is open; when policies, namespaces or this node's workloads change, one task
//! checks every registered connection again and closes those no longer allowed.
//!
//! ```text
//!  open: decide(model, pod, peer, port) --deny--> refuse (logged, counted by policy)
//!                                      --allow--> register(conn) --> copy | closed
//!  model update (authorization changed) --> recheck(pods) --> deny: close + count
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use api::authz::{self, Allowed, Connection, Denied};
use api::{Model, MtlsMode};
use tokio::sync::Notify;
use tunnel::identity::Identity;

/// Why a connection may not stay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// An authorization policy denies it.
    Policy(Denied),
    /// It is plaintext and the namespace requires mTLS.
    StrictMtls,
}

impl Refused {
    /// The policy (or mode) named in logs and metrics.
    pub fn policy(&self) -> String {
        match self {
            Refused::Policy(d) => d.policy(),
            Refused::StrictMtls => "STRICT mTLS".into(),
        }
    }

    /// A metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Policy(d) => d.reason(),
            Refused::StrictMtls => "strict_mtls",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Policy(d) => d.fmt(f),
            Refused::StrictMtls => {
                f.write_str("plaintext is refused: the namespace requires mTLS (STRICT)")
            }
        }
    }
}

/// Who is connecting, as far as the connection proves it.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The mTLS identity; `None` for plaintext.
    pub identity: Option<Identity>,
    /// The client's address, for logs.
    pub source: std::net::SocketAddr,
    /// The destination (application) port.
    pub port: u16,
    /// It came through a waypoint, which checked the HTTP conditions per request;
    /// `identity` is then the client's the waypoint spoke for.
    pub via_waypoint: bool,
}

/// Whether `peer` may connect to the pod `uid` (in `namespace`) under `model`.
pub fn decide(model: &Model, uid: &str, namespace: &str, peer: &Peer) -> Result<Allowed, Refused> {
    if peer.identity.is_none()
        && model
            .namespace(namespace)
            .is_some_and(|n| n.mtls_mode == MtlsMode::Strict)
    {
        return Err(Refused::StrictMtls);
    }
    let Some(workload) = model.workload(uid) else {
        // Not (or no longer) in the model: its handoff decides whether it is served.
        return Ok(Allowed { by: None });
    };
    let conn = Connection {
        principal: peer.identity.as_ref().map(Identity::as_str),
        namespace: peer.identity.as_ref().map(Identity::namespace),
        port: peer.port,
        http: match peer.via_waypoint {
            true => authz::Http::CheckedByWaypoint,
            false => authz::Http::Unseen,
        },
    };
    authz::check(model.policies_for(workload).map(|p| &**p), &conn).map_err(Refused::Policy)
}

struct Live {
    peer: Peer,
    close: Arc<Notify>,
}

/// The open inbound connections of one pod.
#[derive(Default)]
pub struct Conns {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Live>>,
}

/// A registered connection: closed when `closed()` completes; unregistered on drop.
pub struct Registered {
    conns: Arc<Conns>,
    id: u64,
    close: Arc<Notify>,
}

impl Registered {
    /// Completes when a policy change no longer allows the connection.
    pub async fn closed(&self) {
        self.close.notified().await;
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conns
            .live
            .lock()
            .expect("connections lock is never poisoned")
            .remove(&self.id);
    }
}

impl Conns {
    /// Registers an allowed connection.
    pub fn register(self: &Arc<Self>, peer: Peer) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.live
            .lock()
            .expect("connections lock is never poisoned")
            .insert(
                id,
                Live {
                    peer,
                    close: close.clone(),
                },
            );
        Registered {
            conns: self.clone(),
            id,
            close,
        }
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.live
            .lock()
            .expect("connections lock is never poisoned")
            .len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every open connection against `model` and closes the refused ones;
    /// returns them with why.
    pub fn recheck(&self, model: &Model, uid: &str, namespace: &str) -> Vec<(Peer, Refused)> {
        let live = self
            .live
            .lock()
            .expect("connections lock is never poisoned");
        let mut closed = Vec::new();
        for conn in live.values() {
            if let Err(why) = decide(model, uid, namespace, &conn.peer) {
                conn.close.notify_one();
                closed.push((conn.peer.clone(), why));
            }
        }
        closed
    }
}

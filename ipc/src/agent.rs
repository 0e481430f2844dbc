//! What `weft-cni` asks the node agent, and what it answers.
//!
//! ```text
//!  weft-cni --connect--> agent socket (SOCK_SEQPACKET, mode 0600)
//!    add {version, pod, ips} + the pod's netns fd   --> captured | passed | error
//!    del {version, pod}                              --> ok
//!    check {version, pod, ips} + netns fd            --> ok | error
//! ```
//!
//! One request per connection, one reply, then the plugin closes. Every request carries
//! the protocol version, so an agent and a plugin of different releases tell each other
//! so instead of misreading. `docs/cni.md` describes it for people.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::datagram;

/// The CNI versions `weft-cni` speaks: from 0.3.0, whose results list `ips` and
/// `interfaces` as today's do. The agent chains it only into a list of one of them.
pub const CNI_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The protocol version both sides state.
pub const VERSION: u32 = 1;
/// The largest message either side sends.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Where the agent listens when the configuration names no other socket.
pub const DEFAULT_SOCKET: &str = "/run/weft/node-agent.sock";
/// Where the agent publishes what the plugin needs while the agent is down, when the
/// configuration names no other file. Not under `/run`, which a reboot empties: the
/// plugin, still chained, runs before the agent is back, and must still tell an
/// enrolled pod from another.
pub const DEFAULT_STATE: &str = "/var/lib/weft/node-agent.json";

/// The namespace whose pods are never asked about, whatever is configured.
pub const ALWAYS_EXCLUDED: &str = "kube-system";

/// What the agent publishes in its state file, for the plugin to read while the agent
/// is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PublishedState {
    /// The protocol version ([`VERSION`]).
    pub version: u32,
    /// The node.
    pub node: String,
    /// The namespaces whose pods the agent would capture.
    pub enrolled_namespaces: Vec<String>,
}

impl PublishedState {
    /// The state the agent last published at `path` (`None`: nothing readable there).
    pub fn read(path: &Path) -> Option<Self> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Whether pods of `namespace` were enrolled.
    pub fn enrolls(&self, namespace: &str) -> bool {
        self.enrolled_namespaces.iter().any(|n| n == namespace)
    }
}

/// A pod as the runtime names it to the plugin (`CNI_ARGS`, `CNI_CONTAINERID`) and the
/// addresses the plugins before `weft-cni` gave it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CniPod {
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// `CNI_CONTAINERID`: the pod sandbox.
    pub container_id: String,
    /// The pod's addresses from `prevResult` (empty for `del`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
}

impl fmt::Display for CniPod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A request of the plugin. `add` and `check` carry the pod's network namespace as the
/// one descriptor of their datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// A new pod sandbox (CNI ADD): capture it if it is enrolled.
    Add {
        /// [`VERSION`].
        version: u32,
        /// The pod.
        pod: CniPod,
    },
    /// A pod sandbox goes away (CNI DEL).
    Del {
        /// [`VERSION`].
        version: u32,
        /// The pod.
        pod: CniPod,
    },
    /// Is the pod captured as it should be (CNI CHECK)?
    Check {
        /// [`VERSION`].
        version: u32,
        /// The pod.
        pod: CniPod,
    },
}

impl Request {
    /// The pod it is about.
    pub fn pod(&self) -> &CniPod {
        match self {
            Request::Add { pod, .. } | Request::Del { pod, .. } | Request::Check { pod, .. } => pod,
        }
    }

    /// The version it was sent in.
    pub fn version(&self) -> u32 {
        match self {
            Request::Add { version, .. }
            | Request::Del { version, .. }
            | Request::Check { version, .. } => *version,
        }
    }

    /// Whether its datagram carries the pod's network namespace.
    pub fn wants_netns(&self) -> bool {
        matches!(self, Request::Add { .. } | Request::Check { .. })
    }

    /// `add`, `del` or `check`, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Del { .. } => "del",
            Request::Check { .. } => "check",
        }
    }
}

/// What the agent did with an `add`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The pod is in the mesh: node-proxy serves it and its traffic is captured.
    Captured,
    /// The pod is not enrolled; nothing was done.
    Passed,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// For a successful `add`: what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Why, for people: the pod and the cause.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// For a failure: a later retry may succeed (CNI's "try again later").
    #[serde(default)]
    pub retry: bool,
    /// The agent's protocol version.
    pub version: u32,
}

impl Reply {
    /// A success.
    pub fn ok(verdict: Option<Verdict>, message: impl Into<String>) -> Self {
        Reply {
            ok: true,
            verdict,
            message: message.into(),
            retry: false,
            version: VERSION,
        }
    }

    /// A failure; `retry`: it is transient. The message is cut to
    /// [`MAX_ERROR_TEXT`](crate::MAX_ERROR_TEXT).
    pub fn error(message: impl Into<String>, retry: bool) -> Self {
        Reply {
            ok: false,
            verdict: None,
            message: crate::shorten(message.into(), crate::MAX_ERROR_TEXT),
            retry,
            version: VERSION,
        }
    }
}

/// Why the plugin got no answer from the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Nothing listens at the socket: the agent is not running (or elsewhere).
    #[error("cannot reach the node agent at {path}: {source} (is weft-node-agent running on this node?)", path = .path.display())]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The agent did not answer in time.
    #[error("the node agent at {path} did not answer within {secs} s", path = .0.display(), secs = .1.as_secs())]
    Timeout(PathBuf, Duration),
    /// Sending or receiving failed, or the agent closed without answering.
    #[error("node agent socket {path}: {1}", path = .0.display())]
    Io(PathBuf, io::Error),
    /// The answer could not be read.
    #[error("the node agent at {path} sent an unreadable reply: {1}", path = .0.display())]
    BadReply(PathBuf, String),
}

/// Sends one request to the agent at `path` (with the pod's network namespace for `add`
/// and `check`) and waits up to `timeout` for its reply.
pub fn call(
    path: &Path,
    request: &Request,
    netns: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<Reply, AgentError> {
    let io_error = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            AgentError::Timeout(path.to_path_buf(), timeout)
        }
        _ => AgentError::Io(path.to_path_buf(), e),
    };
    let fd = seqpacket_connect(path).map_err(|source| AgentError::Unreachable {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = serde_json::to_vec(request)
        .map_err(|e| AgentError::BadReply(path.to_path_buf(), e.to_string()))?;
    set_timeouts(&fd, timeout).map_err(io_error)?;
    let fds: Vec<BorrowedFd<'_>> = netns.into_iter().collect();
    datagram::send(fd.as_fd(), &bytes, &fds).map_err(io_error)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let got = datagram::recv(fd.as_fd(), &mut buf).map_err(io_error)?;
    if got.is_end() {
        return Err(AgentError::Io(
            path.to_path_buf(),
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without answering (did it restart?)",
            ),
        ));
    }
    if got.truncated {
        return Err(AgentError::BadReply(
            path.to_path_buf(),
            format!("larger than {MAX_MESSAGE} bytes"),
        ));
    }
    serde_json::from_slice(&buf[..got.len])
        .map_err(|e| AgentError::BadReply(path.to_path_buf(), e.to_string()))
}

fn seqpacket_connect(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    Ok(fd)
}

fn set_timeouts(fd: &impl AsFd, timeout: Duration) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let tv = nix::sys::time::TimeVal::new(
        i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        i64::from(timeout.subsec_micros()),
    );
    setsockopt(fd, sockopt::ReceiveTimeout, &tv)?;
    setsockopt(fd, sockopt::SendTimeout, &tv)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> CniPod {
        CniPod {
            namespace: "shop".into(),
            name: "cart-1".into(),
            uid: Some("3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b47".into()),
            container_id: "c0ffee".into(),
            ips: vec!["10.244.1.7".parse().expect("literal")],
        }
    }

    #[test]
    fn requests_read_as_documented() {
        let add = Request::Add {
            version: VERSION,
            pod: pod(),
        };
        let text = serde_json::to_value(&add).expect("encode");
        assert_eq!(
            text,
            serde_json::json!({
                "type": "add", "version": 1,
                "pod": {"namespace": "shop", "name": "cart-1",
                        "uid": "3f1c9a52-7d0e-4b8e-9a61-0c2f5e8d1b47",
                        "containerId": "c0ffee", "ips": ["10.244.1.7"]}
            })
        );
        let back: Request = serde_json::from_value(text).expect("decode");
        assert_eq!(back, add);
        let unknown = serde_json::json!({"type": "add", "version": 1, "pod": pod(), "color": 1});
        assert!(serde_json::from_value::<Request>(unknown).is_err());
    }

    #[test]
    fn nobody_listening_is_unreachable_and_names_the_socket() {
        let path = std::env::temp_dir().join(format!("weft-ipc-none-{}.sock", std::process::id()));
        let request = Request::Del {
            version: VERSION,
            pod: pod(),
        };
        let e = call(&path, &request, None, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, AgentError::Unreachable { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
}

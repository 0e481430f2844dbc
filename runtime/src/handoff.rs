//! The pod handoff protocol: how a sender (the sandbox in `weftctl`, later the CNI node
//! agent) hands each enrolled pod and its network namespace to node-proxy.
//!
//! node-proxy listens on a `SOCK_SEQPACKET` Unix socket (mode 0600). Each message is one
//! datagram of at most 64 KiB: a JSON header tagged by `type`, with any file descriptor
//! attached to the same datagram as `SCM_RIGHTS`. Every message gets exactly one reply,
//! `{"ok":true}` or `{"ok":false,"error":"..."}`.
//!
//! ```text
//! sender                                    node-proxy
//!   hello {version}                 -->   ok {version}     (mismatch: error, then close)
//!   add {pod} + netns fd            -->   ok | error       (one message per pod)
//!   remove {uid}                    -->   ok | error
//!   snapshot_start, add.., snapshot_end   at the end, pods not re-added are forgotten
//!
//! a new node-proxy                           the node-proxy it replaces
//!   takeover                        -->   admin + listener fd, pod {pod} + 4 fds (one
//!                                         message each), then ok; it keeps serving
//!   takeover_done                   -->   ok; now it drains (a connection closed before
//!                                         this leaves it serving)
//! ```
//!
//! Malformed input gets an error reply naming the problem and leaves the connection
//! usable. `docs/handoff.md` is the full specification for other senders.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipc::datagram;
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

/// The protocol version both sides state in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// The largest message, header included.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// How long [`HandoffClient`] waits for each reply: longer than node-proxy waits for a
/// pod's workload to reach the model (10 s by default).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long node-proxy waits for a new connection's `hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How many senders node-proxy serves at once (the node agent, a node-proxy taking
/// over, tools), each with a 64 KiB buffer; more wait until one closes, at most
/// [`HELLO_TIMEOUT`] when the others say nothing.
pub const MAX_CONNECTIONS: usize = 256;

/// Where node-proxy serves the handoff socket on a node.
pub const DEFAULT_SOCKET: &str = "/run/weft/handoff.sock";

/// A pod handed to node-proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodInfo {
    /// The pod's UID, its key in node-proxy.
    pub uid: String,
    /// The pod's name.
    pub name: String,
    /// The pod's Kubernetes namespace.
    pub namespace: String,
    /// The service account its workload identity is issued for.
    pub service_account: String,
    /// The pod's IPs; the first is the one it is served on.
    pub ips: Vec<IpAddr>,
}

impl PodInfo {
    /// Checks what serde cannot: no empty names, at least one IP.
    pub fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("uid", &self.uid),
            ("name", &self.name),
            ("namespace", &self.namespace),
            ("serviceAccount", &self.service_account),
        ] {
            if value.is_empty() {
                return Err(format!("{field} is empty"));
            }
        }
        if self.ips.is_empty() {
            return Err("ips is empty; a pod needs at least one IP".into());
        }
        Ok(())
    }
}

impl fmt::Display for PodInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A message from sender to node-proxy.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Message {
    Hello { version: u32 },
    Add { pod: PodInfo },
    Remove { uid: String },
    // `{}` so that deny_unknown_fields applies to them too.
    SnapshotStart {},
    SnapshotEnd {},
    Takeover {},
    TakeoverDone {},
    Inventory {},
}

/// One part of a takeover answer, with its descriptors attached.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Handed {
    /// The admin listener.
    Admin {},
    /// A pod: its namespace, then its outbound, inbound plaintext and HBONE listeners.
    Pod { pod: PodInfo },
}

/// What a node-proxy hands to the one replacing it.
#[derive(Debug, Default)]
pub struct Takeover {
    /// Its admin endpoint's listener.
    pub admin: Option<OwnedFd>,
    /// Its pods, each with its network namespace and listeners.
    pub pods: Vec<HandedPod>,
}

/// A pod as handed over in a [`Takeover`].
#[derive(Debug)]
pub struct HandedPod {
    /// The pod.
    pub pod: PodInfo,
    /// Its network namespace.
    pub netns: OwnedFd,
    /// Its listeners: outbound, inbound plaintext, inbound HBONE.
    pub listeners: [OwnedFd; 3],
}

/// A pod in a [`HandoffClient::snapshot`]: its namespace and, when the sender holds
/// them, its listeners (outbound, inbound plaintext, HBONE).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotPod<'a> {
    /// The pod.
    pub pod: &'a PodInfo,
    /// Its network namespace.
    pub netns: BorrowedFd<'a>,
    /// Its listeners, if the sender opened them.
    pub listeners: Option<[BorrowedFd<'a>; 3]>,
}

/// node-proxy's answer to one message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
}

impl Reply {
    pub(crate) fn encode(result: Result<(), String>, version: Option<u32>) -> Vec<u8> {
        let (ok, error) = match result {
            Ok(()) => (true, None),
            // Errors quote what they refuse: cut, so the reply fits the sender's buffer.
            Err(e) => (false, Some(ipc::shorten(e, ipc::MAX_ERROR_TEXT))),
        };
        serde_json::to_vec(&Reply { ok, error, version })
            .expect("a reply of bools and strings always serializes")
    }

    pub(crate) fn into_result(self) -> Result<(), HandoffError> {
        match self.ok {
            true => Ok(()),
            false => Err(HandoffError::Rejected(self.error.unwrap_or_default())),
        }
    }
}

/// A request node-proxy must act on and then answer with [`HandoffConn::reply`].
#[derive(Debug)]
pub enum Request {
    /// Serve this pod, whose network namespace is `netns` (checked to be one), on the
    /// listeners the sender opened there (outbound, inbound plaintext, HBONE), or on
    /// listeners of node-proxy's own when it sent none.
    Add {
        /// The pod, validated.
        pod: PodInfo,
        /// The pod's network namespace.
        netns: OwnedFd,
        /// Its listeners, when the sender holds them.
        listeners: Option<[OwnedFd; 3]>,
    },
    /// Stop serving the pod with this UID.
    Remove {
        /// The pod's UID.
        uid: String,
    },
    /// A full list of pods follows as `Add`s.
    SnapshotStart,
    /// The list is complete: forget pods not added since `SnapshotStart`.
    SnapshotEnd,
    /// A new node-proxy asks for the listeners: answer with [`HandoffConn::hand_over`]
    /// and keep serving until `TakeoverDone` on the same connection.
    Takeover,
    /// The new node-proxy serves everything it was handed: reply, then drain. If the
    /// connection ends before this, the takeover was abandoned: keep serving.
    TakeoverDone,
    /// A sender that restarted asks for every pod with duplicates of its namespace and
    /// listeners: answer with [`HandoffConn::hand_over`] (no admin listener); nothing
    /// else changes.
    Inventory,
}

/// A handoff failure, on either side. Paths are the socket's.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The sender could not connect.
    #[error("cannot reach node-proxy at {path}: {1} (is node-proxy running for this node?)", path = .0.display())]
    Connect(PathBuf, #[source] io::Error),
    /// Sending or receiving failed.
    #[error("handoff socket {path}: {1}", path = .0.display())]
    Io(PathBuf, #[source] io::Error),
    /// node-proxy did not answer within [`REPLY_TIMEOUT`].
    #[error("node-proxy at {} did not answer within {}s (is it stuck? reconnect and replay a snapshot)", .0.display(), REPLY_TIMEOUT.as_secs())]
    Timeout(PathBuf),
    /// node-proxy closed the connection.
    #[error("node-proxy at {} closed the connection (did it restart? reconnect and replay a snapshot)", .0.display())]
    Closed(PathBuf),
    /// The two sides speak different protocol versions.
    #[error("handoff peer at {} speaks protocol version {theirs}, this side speaks {ours}; upgrade the older of node-proxy and its sender", path.display())]
    VersionMismatch {
        /// The socket path.
        path: PathBuf,
        /// Our version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// A sender connected and said no `hello` within [`HELLO_TIMEOUT`].
    #[error("a sender on {} said no hello within {}s; closed", .0.display(), HELLO_TIMEOUT.as_secs())]
    NoHello(PathBuf),
    /// node-proxy's reply could not be read.
    #[error("node-proxy at {path} sent an unreadable reply: {1}", path = .0.display())]
    BadReply(PathBuf, String),
    /// The sender was asked to send something invalid; nothing was sent.
    #[error("cannot send {0}")]
    Invalid(String),
    /// An earlier error left the connection out of step with node-proxy.
    #[error("connection to node-proxy at {} is unusable after an earlier error; reconnect", .0.display())]
    Broken(PathBuf),
    /// node-proxy answered with an error, which names the pod and the problem.
    #[error("node-proxy refused: {0}")]
    Rejected(String),
}

/// node-proxy's end: the listening handoff socket.
///
/// The seqpacket sockets live in tokio's `UnixListener`/`UnixStream`, used only through
/// `async_io` with `sendmsg`/`recvmsg`, nothing of which depends on the socket type. The
/// alternative, `AsyncFd`, has only `unsafe` constructors since tokio 1.54 (the safe ones
/// are deprecated as unsound), and this crate forbids `unsafe`.
pub struct HandoffListener {
    listener: UnixListener,
    path: Arc<Path>,
}

impl HandoffListener {
    /// Listens at `path`, replacing the socket an earlier node-proxy left there (but not a
    /// file that is not a socket). Must be called inside a tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref();
        let listener = seqpacket_listener(path).map_err(|e| {
            io::Error::new(e.kind(), format!("handoff socket {}: {e}", path.display()))
        })?;
        Ok(Self {
            listener,
            path: path.into(),
        })
    }

    /// Moves the socket to `path` (a rename: senders connecting there from now on reach
    /// this listener), replacing what was there.
    pub fn publish(&mut self, path: &Path) -> io::Result<()> {
        std::fs::rename(&*self.path, path)?;
        self.path = path.into();
        Ok(())
    }

    /// Accepts the next sender. Cancel-safe. The hello happens on the connection's first
    /// [`HandoffConn::next`], so a slow sender cannot hold up this loop.
    pub async fn accept(&self) -> io::Result<HandoffConn> {
        let (sock, _) = self.listener.accept().await?;
        Ok(HandoffConn {
            sock,
            path: self.path.clone(),
            buf: vec![0; MAX_MESSAGE],
            conversation: Conversation::default(),
            awaiting_reply: false,
            unsent: None,
        })
    }
}

/// A `SOCK_SEQPACKET` listener at `path` with mode 0600 (only root connects), replacing
/// a socket an earlier process left there but not a file that is not a socket. Must be
/// called inside a tokio runtime.
pub fn seqpacket_listener(path: &Path) -> io::Result<UnixListener> {
    let addr = SockAddr::unix(path)?;
    remove_stale(path)?;
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET.nonblocking(), None)?;
    sock.bind(&addr)?;
    // Before listen(), so no sender can connect while the mode is still the umask's.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    sock.listen(128)?;
    let listener = std::os::unix::net::UnixListener::from(OwnedFd::from(sock));
    UnixListener::from_std(listener)
}

/// Removes the socket an earlier node-proxy left at `path`. A live one is replaced too:
/// during a surge rollout the new node-proxy takes over, and each sender moves to it when
/// the old one exits and it reconnects.
fn remove_stale(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists and is not a socket; remove it by hand",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// One sender's connection, as node-proxy sees it.
pub struct HandoffConn {
    sock: UnixStream,
    path: Arc<Path>,
    buf: Vec<u8>,
    conversation: Conversation,
    awaiting_reply: bool,
    /// A reply not yet sent, kept so that a cancelled `next` or `reply` loses nothing.
    unsent: Option<Vec<u8>>,
}

/// Where a sender's conversation stands: what each next message is checked against.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Conversation {
    greeted: bool,
    in_snapshot: bool,
}

/// What to do with one received message.
#[derive(Debug)]
pub(crate) enum Outcome {
    Deliver(Request),
    Answer(Result<(), String>),
    Mismatch(u32),
}

impl HandoffConn {
    /// The process at the other end (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> Option<u32> {
        self.sock
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|p| u32::try_from(p).ok())
    }

    /// The next valid request, or `None` once the sender has closed. Answers the hello
    /// and every malformed message itself. Cancel-safe. Ends with an error only on a
    /// version mismatch or a socket error.
    pub async fn next(&mut self) -> Result<Option<Request>, HandoffError> {
        if std::mem::take(&mut self.awaiting_reply) {
            warn!("handoff request left unanswered; sending an error reply");
            self.unsent = Some(Reply::encode(
                Err("node-proxy did not answer this message".into()),
                None,
            ));
        }
        loop {
            match self.flush().await {
                Err(HandoffError::Io(_, e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                    return Ok(None)
                }
                r => r?,
            }
            let sock = &self.sock;
            let buf = &mut self.buf;
            let recv = sock.async_io(Interest::READABLE, || datagram::recv(sock.as_fd(), buf));
            // A sender says hello first thing; a connection that does not holds a slot
            // of the listener's for nothing.
            let received = match self.conversation.greeted() {
                true => recv.await,
                false => tokio::time::timeout(HELLO_TIMEOUT, recv)
                    .await
                    .map_err(|_| HandoffError::NoHello(self.path.to_path_buf()))?,
            }
            .map_err(|source| self.io(source))?;
            if received.is_end() {
                return Ok(None);
            }
            match self.conversation.interpret(received, &self.buf) {
                Outcome::Deliver(request) => {
                    self.awaiting_reply = true;
                    return Ok(Some(request));
                }
                Outcome::Answer(result) => {
                    let version = result.is_ok().then_some(PROTOCOL_VERSION);
                    self.unsent = Some(Reply::encode(result, version));
                }
                Outcome::Mismatch(theirs) => {
                    let error = format!(
                        "hello: protocol version {theirs} is not supported; \
                         this node-proxy speaks version {PROTOCOL_VERSION}"
                    );
                    self.unsent = Some(Reply::encode(Err(error), Some(PROTOCOL_VERSION)));
                    self.flush().await?;
                    let (path, ours) = (self.path.to_path_buf(), PROTOCOL_VERSION);
                    return Err(HandoffError::VersionMismatch { path, ours, theirs });
                }
            }
        }
    }

    /// Answers the request [`next`](Self::next) returned; an `Err` reaches the sender as
    /// its error text, so name the pod in it.
    pub async fn reply(&mut self, result: Result<(), String>) -> Result<(), HandoffError> {
        if !std::mem::take(&mut self.awaiting_reply) {
            warn!("handoff reply without a request; not sent");
            return Ok(());
        }
        self.unsent = Some(Reply::encode(result, None));
        self.flush().await
    }

    /// Answers a [`Request::Takeover`]: the admin listener and every pod with its
    /// namespace and listeners (duplicates are sent; the caller keeps its own), one
    /// message each, then `ok`. The caller keeps serving until `takeover_done`.
    pub async fn hand_over(
        &mut self,
        admin: Option<BorrowedFd<'_>>,
        pods: &[(PodInfo, [BorrowedFd<'_>; 4])],
    ) -> Result<(), HandoffError> {
        if !std::mem::take(&mut self.awaiting_reply) {
            warn!("takeover answer without a request; not sent");
            return Ok(());
        }
        let encode = |h: &Handed| {
            serde_json::to_vec(h).map_err(|e| HandoffError::Invalid(format!("takeover: {e}")))
        };
        let mut parts: Vec<(Vec<u8>, Vec<BorrowedFd<'_>>)> = Vec::new();
        if let Some(fd) = admin {
            parts.push((encode(&Handed::Admin {})?, vec![fd]));
        }
        for (pod, fds) in pods {
            let bytes = encode(&Handed::Pod { pod: pod.clone() })?;
            parts.push((bytes, fds.to_vec()));
        }
        for (bytes, fds) in &parts {
            self.sock
                .async_io(Interest::WRITABLE, || {
                    datagram::send(self.sock.as_fd(), bytes, fds)
                })
                .await
                .map_err(|source| self.io(source))?;
        }
        self.unsent = Some(Reply::encode(Ok(()), None));
        self.flush().await
    }

    async fn flush(&mut self) -> Result<(), HandoffError> {
        if let Some(bytes) = &self.unsent {
            self.sock
                .async_io(Interest::WRITABLE, || {
                    datagram::send(self.sock.as_fd(), bytes, &[])
                })
                .await
                .map_err(|source| self.io(source))?;
            self.unsent = None;
        }
        Ok(())
    }

    fn io(&self, source: io::Error) -> HandoffError {
        HandoffError::Io(self.path.to_path_buf(), source)
    }
}

impl Conversation {
    /// Whether the sender said hello.
    pub(crate) fn greeted(&self) -> bool {
        self.greeted
    }

    /// Checks one message (`buf[..received.len]`) against the conversation so far.
    pub(crate) fn interpret(&mut self, received: datagram::Received, buf: &[u8]) -> Outcome {
        let datagram::Received {
            len,
            truncated,
            fds_truncated,
            fds,
        } = received;
        if truncated {
            let e = format!(
                "message rejected: larger than the {} KiB limit",
                MAX_MESSAGE / 1024
            );
            return Outcome::Answer(Err(e));
        }
        if fds_truncated {
            return Outcome::Answer(Err("message rejected: too many file descriptors".into()));
        }
        let (message, what) = match parse(&buf[..len]) {
            Ok(parsed) => parsed,
            Err(e) => return Outcome::Answer(Err(e)),
        };
        let (nfds, is_add) = (fds.len(), matches!(message, Message::Add { .. }));
        let result = match message {
            Message::Hello { version } if version != PROTOCOL_VERSION => {
                return Outcome::Mismatch(version)
            }
            _ if nfds != 0 && !is_add => Err(format!("expected no file descriptors, got {nfds}")),
            Message::Hello { .. } if self.greeted => {
                Err("already received on this connection".into())
            }
            Message::Hello { .. } => {
                self.greeted = true;
                return Outcome::Answer(Ok(()));
            }
            _ if !self.greeted => Err("expected hello first".into()),
            Message::Add { pod } => pod.validate().and_then(|()| {
                let (netns, listeners) = take_add_fds(fds)?;
                Ok(Request::Add {
                    pod,
                    netns,
                    listeners,
                })
            }),
            Message::Remove { uid } if uid.is_empty() => Err("uid is empty".into()),
            Message::Remove { uid } => Ok(Request::Remove { uid }),
            Message::SnapshotStart {} if self.in_snapshot => {
                Err("a snapshot is already in progress; end it with snapshot_end".into())
            }
            Message::SnapshotEnd {} if !self.in_snapshot => {
                Err("no snapshot_start before it".into())
            }
            Message::SnapshotStart {} => Ok(Request::SnapshotStart),
            Message::SnapshotEnd {} => Ok(Request::SnapshotEnd),
            Message::Takeover {} => Ok(Request::Takeover),
            Message::TakeoverDone {} => Ok(Request::TakeoverDone),
            Message::Inventory {} => Ok(Request::Inventory),
        };
        match result {
            Ok(request) => {
                if let Request::SnapshotStart | Request::SnapshotEnd = request {
                    self.in_snapshot = matches!(request, Request::SnapshotStart);
                }
                Outcome::Deliver(request)
            }
            Err(e) => Outcome::Answer(Err(format!("{what}: {e}"))),
        }
    }
}

/// Parses a message, returning it with a description for error texts
/// ("add for pod shop/cart-1"); the description is found even when parsing fails.
fn parse(bytes: &[u8]) -> Result<(Message, String), String> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("message is not JSON: {e}"))?;
    let pod = value.get("pod").and_then(|p| {
        Some(format!(
            "{}/{}",
            p.get("namespace")?.as_str()?,
            p.get("name")?.as_str()?
        ))
    });
    let ty = value.get("type").and_then(|t| t.as_str());
    // Every version must understand every other's hello, so only its version is read.
    if let (Some("hello"), Some(v)) = (ty, value.get("version").and_then(|v| v.as_u64())) {
        let version = u32::try_from(v).unwrap_or(u32::MAX);
        return Ok((Message::Hello { version }, "hello".into()));
    }
    let what = match (ty, pod) {
        (Some("add"), Some(pod)) => format!("add for pod {pod}"),
        (
            Some(
                ty @ ("hello" | "add" | "remove" | "snapshot_start" | "snapshot_end" | "takeover"
                | "takeover_done" | "inventory"),
            ),
            _,
        ) => ty.to_owned(),
        (Some(ty), _) => format!("message of type {ty:?}"),
        (None, _) => "message".to_owned(),
    };
    match serde_json::from_value(value) {
        Ok(message) => Ok((message, what)),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// The descriptors of an `add`: the pod's network namespace (checked to be one), and
/// optionally its three listeners (node-proxy checks they are listening sockets of that
/// namespace when it serves them).
fn take_add_fds(fds: Vec<OwnedFd>) -> Result<(OwnedFd, Option<[OwnedFd; 3]>), String> {
    let n = fds.len();
    let mut fds = fds.into_iter();
    let (Some(netns), 1 | 4) = (fds.next(), n) else {
        return Err(format!(
            "expected 1 file descriptor (the pod's network namespace), or 4 (it and its \
             outbound, inbound plaintext and HBONE listeners), got {n}"
        ));
    };
    datagram::check_netns(&netns)?;
    let listeners = match (fds.next(), fds.next(), fds.next()) {
        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
        _ => None,
    };
    Ok((netns, listeners))
}

/// Maps a blocking socket's error to what it means for the sender.
fn transport_error(path: &Path) -> impl Fn(io::Error) -> HandoffError + '_ {
    move |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            HandoffError::Timeout(path.to_path_buf())
        }
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
            HandoffError::Closed(path.to_path_buf())
        }
        _ => HandoffError::Io(path.to_path_buf(), e),
    }
}

/// The sender's end: a blocking connection to node-proxy. Each call waits for its reply
/// up to [`REPLY_TIMEOUT`]; after a socket error or a timeout, reconnect.
pub struct HandoffClient {
    sock: Socket,
    path: PathBuf,
    broken: bool,
    buf: Vec<u8>,
}

impl HandoffClient {
    /// The process at the other end (`SO_PEERCRED`): while one node-proxy replaces
    /// another, the path may still lead to the old one.
    pub fn peer_pid(&self) -> Option<u32> {
        nix::sys::socket::getsockopt(&self.sock, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .and_then(|c| u32::try_from(c.pid()).ok())
    }

    /// Connects to node-proxy at `path` and says hello.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, HandoffError> {
        let path = path.as_ref().to_path_buf();
        let open = || -> io::Result<Socket> {
            let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
            sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
            sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
            sock.connect(&SockAddr::unix(&path)?)?;
            Ok(sock)
        };
        let sock = open().map_err(|e| HandoffError::Connect(path.clone(), e))?;
        let mut client = Self {
            sock,
            path,
            broken: false,
            buf: vec![0; MAX_MESSAGE],
        };
        let reply = client.call(
            "hello",
            &Message::Hello {
                version: PROTOCOL_VERSION,
            },
            &[],
        )?;
        match reply.version {
            Some(theirs) if theirs != PROTOCOL_VERSION => {
                let (path, ours) = (client.path, PROTOCOL_VERSION);
                Err(HandoffError::VersionMismatch { path, ours, theirs })
            }
            _ => reply.into_result().map(|()| client),
        }
    }

    /// Hands over a pod and its network namespace, and the listeners the caller opened
    /// there (outbound, inbound plaintext, HBONE), if it did; without them node-proxy
    /// opens its own. Duplicates are sent: the descriptors stay the caller's.
    pub fn add(
        &mut self,
        pod: &PodInfo,
        netns: BorrowedFd<'_>,
        listeners: Option<[BorrowedFd<'_>; 3]>,
    ) -> Result<(), HandoffError> {
        let what = format!("add for pod {pod}");
        pod.validate()
            .map_err(|e| HandoffError::Invalid(format!("{what}: {e}")))?;
        let message = Message::Add { pod: pod.clone() };
        let mut fds = vec![netns];
        fds.extend(listeners.into_iter().flatten());
        self.call(&what, &message, &fds)?.into_result()
    }

    /// Tells node-proxy the pod with this UID is gone.
    pub fn remove(&mut self, uid: &str) -> Result<(), HandoffError> {
        let message = Message::Remove {
            uid: uid.to_owned(),
        };
        self.call(&format!("remove for pod uid {uid}"), &message, &[])?
            .into_result()
    }

    /// Replays the full list of pods; node-proxy forgets any pod not in it. A refused pod
    /// does not stop the replay: its error is returned once the replay is complete.
    pub fn snapshot(&mut self, pods: &[SnapshotPod<'_>]) -> Result<(), HandoffError> {
        let each = self.snapshot_each(pods)?;
        each.into_iter().find_map(Result::err).map_or(Ok(()), Err)
    }

    /// As [`snapshot`](Self::snapshot), with each pod's own answer (in order): a refused
    /// pod is an `Err` there; a transport failure ends the whole call.
    pub fn snapshot_each(
        &mut self,
        pods: &[SnapshotPod<'_>],
    ) -> Result<Vec<Result<(), HandoffError>>, HandoffError> {
        self.call("snapshot_start", &Message::SnapshotStart {}, &[])?
            .into_result()?;
        let mut each = Vec::with_capacity(pods.len());
        for p in pods {
            match self.add(p.pod, p.netns, p.listeners) {
                Err(e @ (HandoffError::Rejected(_) | HandoffError::Invalid(_))) => {
                    each.push(Err(e));
                }
                r => each.push(Ok(r?)),
            }
        }
        self.call("snapshot_end", &Message::SnapshotEnd {}, &[])?
            .into_result()?;
        Ok(each)
    }

    /// Whether node-proxy has closed the connection (it exited), without waiting: it
    /// never sends anything unasked, so a readable idle connection has ended.
    pub fn closed(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => false,
            Ok(_) => fds[0].revents().is_some_and(|r| !r.is_empty()),
            Err(_) => true,
        }
    }

    /// Asks the node-proxy at the other end to hand over its admin listener and its pods
    /// with their listeners, for a new node-proxy replacing it. It keeps serving until
    /// [`takeover_done`](Self::takeover_done) on this connection, and serves on if the
    /// connection closes first. A node-proxy that does not know `takeover` answers an
    /// error.
    pub fn take_over(&mut self) -> Result<Takeover, HandoffError> {
        self.parts("takeover", &Message::Takeover {})
    }

    /// Asks node-proxy for every pod it serves, each with duplicates of its network
    /// namespace and listeners, and changes nothing: how a sender that restarted gets
    /// back the listeners it held.
    pub fn inventory(&mut self) -> Result<Vec<HandedPod>, HandoffError> {
        Ok(self.parts("inventory", &Message::Inventory {})?.pods)
    }

    /// Sends `message` and reads the parts that answer it, each with its descriptors,
    /// up to the reply.
    fn parts(&mut self, what: &str, message: &Message) -> Result<Takeover, HandoffError> {
        let path = self.path.clone();
        if self.broken {
            return Err(HandoffError::Broken(path));
        }
        let bytes = serde_json::to_vec(message)
            .map_err(|e| HandoffError::Invalid(format!("{what}: {e}")))?;
        self.broken = true;
        let transport = transport_error(&path);
        datagram::send(self.sock.as_fd(), &bytes, &[]).map_err(&transport)?;
        let mut handed = Takeover::default();
        loop {
            let received = datagram::recv(self.sock.as_fd(), &mut self.buf).map_err(&transport)?;
            if received.is_end() {
                return Err(HandoffError::Closed(path.clone()));
            }
            if received.truncated || received.fds_truncated {
                return Err(HandoffError::BadReply(
                    path.clone(),
                    format!("truncated {what} message"),
                ));
            }
            let fds = received.fds;
            let text = &self.buf[..received.len];
            if let Ok(reply) = serde_json::from_slice::<Reply>(text) {
                self.broken = false;
                return reply.into_result().map(|()| handed);
            }
            let part: Handed = serde_json::from_slice(text)
                .map_err(|e| HandoffError::BadReply(path.clone(), e.to_string()))?;
            let bad = |what: &str, n: usize| {
                HandoffError::BadReply(path.clone(), format!("{what} with {n} file descriptors"))
            };
            match part {
                Handed::Admin {} => {
                    let n = fds.len();
                    let [fd] = <[OwnedFd; 1]>::try_from(fds).map_err(|_| bad("admin", n))?;
                    handed.admin = Some(fd);
                }
                Handed::Pod { pod } => {
                    let n = fds.len();
                    let [netns, outbound, plaintext, hbone] =
                        <[OwnedFd; 4]>::try_from(fds).map_err(|_| bad("pod", n))?;
                    handed.pods.push(HandedPod {
                        pod,
                        netns,
                        listeners: [outbound, plaintext, hbone],
                    });
                }
            }
        }
    }

    /// Tells the node-proxy that handed over (see [`take_over`](Self::take_over)) that
    /// this one now serves everything: it drains and exits. Until this, it keeps serving,
    /// and keeps serving if this connection closes first.
    pub fn takeover_done(&mut self) -> Result<(), HandoffError> {
        self.call("takeover_done", &Message::TakeoverDone {}, &[])?
            .into_result()
    }

    /// Sends one message and reads its reply. Marks the connection broken until the
    /// reply is read, so a late reply is never taken for the next message's.
    fn call(
        &mut self,
        what: &str,
        message: &Message,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, HandoffError> {
        let path = self.path.clone();
        if self.broken {
            return Err(HandoffError::Broken(path));
        }
        let bytes = serde_json::to_vec(message)
            .map_err(|e| HandoffError::Invalid(format!("{what}: {e}")))?;
        if bytes.len() > MAX_MESSAGE {
            let len = bytes.len();
            return Err(HandoffError::Invalid(format!(
                "{what}: {len} bytes, over the {MAX_MESSAGE}-byte limit"
            )));
        }
        self.broken = true;
        let transport = transport_error(&path);
        datagram::send(self.sock.as_fd(), &bytes, fds).map_err(&transport)?;
        let received = datagram::recv(self.sock.as_fd(), &mut self.buf).map_err(&transport)?;
        drop(transport);
        // Replies carry no descriptors; any that came are closed with `received`.
        let len = received.len;
        if received.is_end() {
            return Err(HandoffError::Closed(path));
        }
        if received.truncated {
            return Err(HandoffError::BadReply(
                path,
                format!("larger than {MAX_MESSAGE} bytes"),
            ));
        }
        let reply = serde_json::from_slice(&self.buf[..len])
            .map_err(|e| HandoffError::BadReply(path, e.to_string()))?;
        self.broken = false;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::stat::fstat;
    use serde_json::{json, Value};
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    use super::*;

    /// What the test server saw; an `Add`'s namespace as (st_dev, st_ino).
    #[derive(Debug, PartialEq)]
    enum Seen {
        Add(PodInfo, (u64, u64)),
        AddListening(PodInfo, (u64, u64), [u16; 3]),
        Inventory,
        Remove(String),
        SnapshotStart,
        SnapshotEnd,
        Takeover,
        TakeoverDone,
        Ended(String),
    }

    fn ns_id(fd: impl AsFd) -> (u64, u64) {
        let st = fstat(fd).expect("fstat a namespace fd");
        (st.st_dev as u64, st.st_ino as u64)
    }

    fn own_netns() -> std::fs::File {
        std::fs::File::open("/proc/self/ns/net").expect("open /proc/self/ns/net")
    }

    fn pod(i: usize) -> PodInfo {
        PodInfo {
            uid: format!("uid-{i}"),
            name: format!("cart-{i}"),
            namespace: "shop".into(),
            service_account: "cart".into(),
            ips: vec![IpAddr::from([10, 244, (i / 200) as u8, (i % 200) as u8])],
        }
    }

    /// A node-proxy stand-in in its own directory (removed on drop) that reports every
    /// request and refuses to remove uid "refuse-me".
    struct Server {
        dir: PathBuf,
        path: PathBuf,
        seen: UnboundedReceiver<Seen>,
    }

    impl Server {
        fn start(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("weft-handoff-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create test dir");
            let path = dir.join("handoff.sock");
            let listener = HandoffListener::bind(&path).expect("bind");
            let (tx, seen) = unbounded_channel();
            tokio::spawn(async move {
                while let Ok(mut conn) = listener.accept().await {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        while let Some(request) = conn.next().await.transpose() {
                            let (seen, refuse) = match request {
                                Ok(Request::Add {
                                    pod,
                                    netns,
                                    listeners: None,
                                }) => (Seen::Add(pod, ns_id(netns)), false),
                                Ok(Request::Add {
                                    pod,
                                    netns,
                                    listeners: Some(l),
                                }) => {
                                    let ports = l.map(|l| {
                                        let l = std::net::TcpListener::from(l);
                                        l.local_addr().map(|a| a.port()).unwrap_or(0)
                                    });
                                    (Seen::AddListening(pod, ns_id(netns), ports), false)
                                }
                                Ok(Request::Remove { uid }) => {
                                    (Seen::Remove(uid.clone()), uid == "refuse-me")
                                }
                                Ok(Request::SnapshotStart) => (Seen::SnapshotStart, false),
                                Ok(Request::SnapshotEnd) => (Seen::SnapshotEnd, false),
                                Ok(Request::Takeover) => {
                                    let _ = tx.send(Seen::Takeover);
                                    // An admin listener and one pod with three; all are
                                    // closed here once sent.
                                    let bind = || std::net::TcpListener::bind("127.0.0.1:0");
                                    let admin = bind().expect("bind");
                                    let l = [bind(), bind(), bind()].map(|l| l.expect("bind"));
                                    let ns = own_netns();
                                    let fds =
                                        [ns.as_fd(), l[0].as_fd(), l[1].as_fd(), l[2].as_fd()];
                                    conn.hand_over(Some(admin.as_fd()), &[(pod(7), fds)])
                                        .await
                                        .expect("hand over");
                                    continue;
                                }
                                Ok(Request::TakeoverDone) => (Seen::TakeoverDone, false),
                                Ok(Request::Inventory) => {
                                    let _ = tx.send(Seen::Inventory);
                                    let bind = || std::net::TcpListener::bind("127.0.0.1:0");
                                    let l = [bind(), bind(), bind()].map(|l| l.expect("bind"));
                                    let ns = own_netns();
                                    let fds =
                                        [ns.as_fd(), l[0].as_fd(), l[1].as_fd(), l[2].as_fd()];
                                    conn.hand_over(None, &[(pod(8), fds)])
                                        .await
                                        .expect("inventory");
                                    continue;
                                }
                                Err(e) => return drop(tx.send(Seen::Ended(e.to_string()))),
                            };
                            let _ = tx.send(seen);
                            let result = if refuse {
                                Err("remove: test refusal".into())
                            } else {
                                Ok(())
                            };
                            conn.reply(result).await.expect("reply");
                        }
                    });
                }
            });
            Self { dir, path, seen }
        }

        /// A raw sender, for datagrams [`HandoffClient`] would never send.
        fn raw(&self) -> Socket {
            let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None).expect("socket");
            sock.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
            sock.connect(&SockAddr::unix(&self.path).expect("addr"))
                .expect("connect");
            sock
        }

        async fn expect(&mut self, seen: impl IntoIterator<Item = Seen>) {
            for expected in seen {
                assert_eq!(self.seen.recv().await, Some(expected));
            }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The next reply, `Value::Null` at end of stream.
    fn raw_recv(sock: &Socket) -> Value {
        let mut buf = vec![0; MAX_MESSAGE];
        match datagram::recv(sock.as_fd(), &mut buf).expect("recv").len {
            0 => Value::Null,
            len => serde_json::from_slice(&buf[..len]).expect("reply is JSON"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn takeover_hands_over_live_listeners() {
        let mut server = Server::start("takeover");
        let path = server.path.clone();
        let handed = tokio::task::spawn_blocking(move || {
            let mut client = HandoffClient::connect(&path)?;
            let handed = client.take_over()?;
            client.takeover_done()?;
            // The connection stays usable after the takeover's answer.
            client.remove("uid-1")?;
            Ok::<_, HandoffError>(handed)
        })
        .await
        .expect("client thread")
        .expect("takeover");
        server
            .expect([
                Seen::Takeover,
                Seen::TakeoverDone,
                Seen::Remove("uid-1".into()),
            ])
            .await;
        let [p] = &handed.pods[..] else {
            panic!("one pod handed over: {handed:?}")
        };
        assert_eq!(p.pod, pod(7));
        assert_eq!(ns_id(&p.netns), ns_id(own_netns()));
        // The sockets are the sender's own, still listening after it closed its copies:
        // a connection made now waits in the queue and is accepted here.
        let admin = handed.admin.expect("admin listener");
        for fd in std::iter::once(admin).chain(p.listeners.iter().map(|l| l.try_clone().unwrap())) {
            let listener = std::net::TcpListener::from(fd);
            let addr = listener.local_addr().expect("bound");
            let _client = std::net::TcpStream::connect(addr).expect("connect");
            let (_, peer) = listener
                .accept()
                .expect("accepted from the handed-over queue");
            assert_eq!(peer.ip(), addr.ip());
        }
    }

    #[test]
    fn a_takeover_part_with_the_wrong_descriptors_is_refused() {
        let dir = std::env::temp_dir().join(format!("weft-handoff-{}-ctrunc", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test dir");
        let path = dir.join("handoff.sock");
        let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).expect("socket");
        listener
            .bind(&SockAddr::unix(&path).expect("addr"))
            .expect("bind");
        listener.listen(3).expect("listen");
        // 3: one fewer than a pod part has, 5: one more; 9: more than the receive
        // buffer holds (truncated).
        let counts = [3, 5, 9];
        // A peer that answers hello, then sends a pod part with `count` descriptors.
        let peer = std::thread::spawn(move || {
            for count in counts {
                let (conn, _) = listener.accept().expect("accept");
                let _hello = raw_recv(&conn);
                datagram::send(conn.as_fd(), br#"{"ok":true,"version":1}"#, &[]).expect("send");
                let _takeover = raw_recv(&conn);
                let ns = own_netns();
                let part =
                    serde_json::to_vec(&json!({"type": "pod", "pod": pod(1)})).expect("json");
                let fds = vec![ns.as_fd(); count];
                datagram::send(conn.as_fd(), &part, &fds).expect("send");
                let _ = raw_recv(&conn); // until the client hangs up
            }
        });
        for count in counts {
            let mut client = HandoffClient::connect(&path).expect("connect");
            let err = client.take_over().expect_err("refused");
            assert!(matches!(&err, HandoffError::BadReply(..)), "{count}: {err}");
        }
        peer.join().expect("peer");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip() {
        let mut server = Server::start("round-trip");
        let path = server.path.clone();
        let client = tokio::task::spawn_blocking(move || {
            let netns = own_netns();
            let mut client = HandoffClient::connect(&path)?;
            client.add(&pod(1), netns.as_fd(), None)?;
            client.remove("uid-1")?;
            let refused = client.remove("refuse-me").expect_err("refused").to_string();
            assert_eq!(refused, "node-proxy refused: remove: test refusal");
            let (p2, p3) = (pod(2), pod(3));
            let at = |pod| SnapshotPod {
                pod,
                netns: netns.as_fd(),
                listeners: None,
            };
            client.snapshot(&[at(&p2), at(&p3)])
        });
        client.await.expect("client thread").expect("client");
        let ns = ns_id(own_netns());
        let removes = [
            Seen::Remove("uid-1".into()),
            Seen::Remove("refuse-me".into()),
        ];
        server.expect([Seen::Add(pod(1), ns)]).await;
        server.expect(removes).await;
        server
            .expect([
                Seen::SnapshotStart,
                Seen::Add(pod(2), ns),
                Seen::Add(pod(3), ns),
            ])
            .await;
        server.expect([Seen::SnapshotEnd]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listeners_travel_with_an_add_and_come_back_in_an_inventory() {
        let mut server = Server::start("inventory");
        let path = server.path.clone();
        let bind = || std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let held = [bind(), bind(), bind()];
        let ports = held
            .each_ref()
            .map(|l| l.local_addr().expect("bound").port());
        let client = tokio::task::spawn_blocking(move || {
            let netns = own_netns();
            let mut client = HandoffClient::connect(&path)?;
            let listeners = held.each_ref().map(|l| l.as_fd());
            client.add(&pod(1), netns.as_fd(), Some(listeners))?;
            client.inventory()
        });
        let pods = client.await.expect("client thread").expect("client");
        let ns = ns_id(own_netns());
        server
            .expect([Seen::AddListening(pod(1), ns, ports), Seen::Inventory])
            .await;
        let [p] = &pods[..] else {
            panic!("one pod in the inventory: {pods:?}")
        };
        assert_eq!(p.pod, pod(8));
        assert_eq!(ns_id(&p.netns), ns);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_input_is_answered_and_the_connection_survives() {
        let mut server = Server::start("bad-input");
        let (dir, raw) = (server.dir.clone(), server.raw());
        let sender = tokio::task::spawn_blocking(move || {
            let check = |message: &str, fds: &[BorrowedFd<'_>], want: &str| {
                datagram::send(raw.as_fd(), message.as_bytes(), fds).expect("send");
                let reply = raw_recv(&raw);
                let error = reply["error"].as_str().unwrap_or_default();
                let ok = reply["ok"] == json!(want.is_empty()) && error.contains(want);
                assert!(ok, "{message:.60}: got {reply}, want {want:?}");
            };
            let netns = own_netns();
            let ns = netns.as_fd();
            let file = std::fs::File::create(dir.join("plain")).expect("create file");
            let user_ns = std::fs::File::open("/proc/self/ns/user").expect("open user ns");
            let add_with = |field: &str, value: Value| {
                let mut add = json!({"type": "add", "pod": pod(1)});
                add["pod"][field] = value;
                add.to_string()
            };
            let add = add_with("uid", json!("uid-1"));
            let hello = r#"{"type":"hello","version":1}"#;
            check(&add, &[ns], "add for pod shop/cart-1: expected hello first");
            check(hello, &[], "");
            check("{not json", &[], "message is not JSON");
            check(
                r#"{"type":"frob"}"#,
                &[],
                r#"message of type "frob": unknown variant `frob`"#,
            );
            check(
                &add,
                &[],
                "add for pod shop/cart-1: expected 1 file descriptor (the pod's network namespace), or 4 (it and its outbound, inbound plaintext and HBONE listeners), got 0",
            );
            check(
                &add,
                &[ns, ns],
                "or 4 (it and its outbound, inbound plaintext and HBONE listeners), got 2",
            );
            let plain = format!(
                "not a network namespace (it refers to {})",
                dir.join("plain").display()
            );
            check(&add, &[file.as_fd()], &plain);
            check(
                &add,
                &[user_ns.as_fd()],
                "not a network namespace (it refers to user:[",
            );
            check(
                &add_with("ips", json!([])),
                &[ns],
                "add for pod shop/cart-1: ips is empty",
            );
            check(
                &add_with("name", json!("")),
                &[ns],
                "add for pod shop/: name is empty",
            );
            check(
                &add_with("ips", json!(["10.0.0.300"])),
                &[ns],
                "add for pod shop/cart-1: invalid IP",
            );
            check(
                &add_with("color", json!("blue")),
                &[ns],
                "unknown field `color`",
            );
            check(
                r#"{"type":"remove","uid":"x"}"#,
                &[ns],
                "remove: expected no file descriptors, got 1",
            );
            check(r#"{"type":"remove"}"#, &[], "remove: missing field `uid`");
            check(
                r#"{"type":"remove","uid":"x","y":1}"#,
                &[],
                "remove: unknown field `y`",
            );
            check(
                r#"{"type":"snapshot_end","y":1}"#,
                &[],
                "snapshot_end: unknown field `y`",
            );
            check(
                r#"{"type":"snapshot_end"}"#,
                &[],
                "snapshot_end: no snapshot_start before it",
            );
            check(r#"{"type":"snapshot_start"}"#, &[], "");
            check(
                r#"{"type":"snapshot_start"}"#,
                &[],
                "snapshot_start: a snapshot is already in",
            );
            check(
                &" ".repeat(MAX_MESSAGE + 1),
                &[],
                "larger than the 64 KiB limit",
            );
            check(hello, &[], "hello: already received");
            check(&add, &[ns], "");
            check(r#"{"type":"snapshot_end"}"#, &[], "");
        });
        sender.await.expect("sender thread");
        let ns = ns_id(own_netns());
        server
            .expect([
                Seen::SnapshotStart,
                Seen::Add(pod(1), ns),
                Seen::SnapshotEnd,
            ])
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_mismatch_closes() {
        let mut server = Server::start("version");
        let raw = server.raw();
        let replies = tokio::task::spawn_blocking(move || {
            let hello = br#"{"type":"hello","version":2,"features":["x"]}"#;
            datagram::send(raw.as_fd(), hello, &[]).expect("send");
            (raw_recv(&raw), raw_recv(&raw))
        });
        let (reply, after) = replies.await.expect("sender thread");
        let want = "hello: protocol version 2 is not supported; this node-proxy speaks version 1";
        assert_eq!(reply, json!({"ok": false, "error": want, "version": 1}));
        assert_eq!(after, Value::Null, "the connection is closed");
        let ended = server.seen.recv().await;
        let want = "speaks protocol version 2, this side speaks 1";
        assert!(
            matches!(&ended, Some(Seen::Ended(e)) if e.contains(want)),
            "{ended:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn snapshot_of_300_pods_arrives_whole() {
        let mut server = Server::start("snapshot");
        let path = server.path.clone();
        let sent = tokio::task::spawn_blocking(move || {
            let netns = own_netns();
            let pods: Vec<_> = (0..300).map(pod).collect();
            let pods: Vec<_> = pods
                .iter()
                .map(|pod| SnapshotPod {
                    pod,
                    netns: netns.as_fd(),
                    listeners: None,
                })
                .collect();
            HandoffClient::connect(&path)?.snapshot(&pods)
        });
        sent.await.expect("client thread").expect("snapshot");
        let ns = ns_id(own_netns());
        server.expect([Seen::SnapshotStart]).await;
        server.expect((0..300).map(|i| Seen::Add(pod(i), ns))).await;
        server.expect([Seen::SnapshotEnd]).await;
    }

    #[tokio::test]
    async fn bind_replaces_a_socket_but_not_a_file() {
        let server = Server::start("bind");
        let mode = std::fs::metadata(&server.path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let error = |path: &Path| HandoffListener::bind(path).err().map(|e| e.to_string());
        let stale = server.dir.join("stale.sock");
        drop(HandoffListener::bind(&stale).expect("first bind"));
        assert_eq!(error(&stale), None, "a stale socket is replaced");
        let file = server.dir.join("file");
        std::fs::write(&file, "x").expect("write");
        let file = error(&file).unwrap_or_default();
        assert!(
            file.ends_with("exists and is not a socket; remove it by hand"),
            "{file}"
        );
    }

    #[test]
    fn client_errors_name_the_socket_and_the_pod() {
        let path = std::env::temp_dir().join("weft-handoff-no-such-dir/handoff.sock");
        let e = HandoffClient::connect(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.starts_with(&format!("cannot reach node-proxy at {}: ", path.display())),
            "{e}"
        );
        assert!(e.ends_with("(is node-proxy running for this node?)"), "{e}");
        let mut bad = pod(1);
        bad.service_account.clear();
        assert_eq!(bad.validate(), Err("serviceAccount is empty".into()));
    }
}

//! Abuse of every listener of a running mesh: connections opened and never used, slow
//! clients (one byte a second), half-closed connections and oversize requests, all at
//! once. For each listener, a well-behaved client is served as before (every request
//! succeeds, its median latency within a few times the median measured before the abuse
//! in the same run), each process's memory stays under a stated bound, the connections
//! a listener should drop are dropped, and the descriptors come back when the abuse
//! ends. The outcomes are printed, counted per listener.
//!
//! Listeners: node-proxy's HBONE (15008), inbound plaintext (15006) and outbound
//! (15001) paths; the waypoint's HBONE listener and the HTTP streams it serves; the
//! node-proxy, controller admin endpoints; the controller's gRPC port; the handoff and
//! node agent sockets.
//!
//! The controller's gRPC port also gets subscriptions that never read their updates
//! (some never polled, some on a connection that stops reading its socket) while the
//! model changes, and messages over its size limits.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use api::proto::certificates_client::CertificatesClient;
use api::proto::mesh_config_client::MeshConfigClient;
use api::proto::{self, subscribe_request};
use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use runtime::config_client::ControllerConfig;
use runtime::netns::Netns;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use weft_e2e::{eventually, http_get, is_root, weftctl, Sandbox, TempManifests};

/// Idle connections per listener.
const IDLE: usize = 200;
/// Slow clients per TCP listener, each sending one byte a second.
const SLOW: usize = 20;
/// Half-closed connections per TCP listener.
const HALF: usize = 20;
/// Samples of a well-behaved client, before and during the abuse.
const SAMPLES: usize = 7;
/// A well-behaved client's median latency during the abuse, at most this many times
/// its median before it.
const LATENCY_RATIO: f64 = 4.0;
/// The smallest baseline a ratio is taken against: below it, a loaded 2-core machine's
/// scheduling noise (a timer firing, a log flushed) is as large as the latency itself.
const RESOLUTION: Duration = Duration::from_millis(2);
/// Memory a process may add while abused: this much per abusive connection, plus a
/// fixed allowance for allocator and scheduling noise.
const PER_CONNECTION: u64 = 64 * 1024;
const ALLOWANCE: u64 = 24 * 1024 * 1024;
/// Subscriptions to the controller's model that never read it, of each kind.
const NEVER_READ: usize = 10;
/// What the never-reading subscriptions' Hellos give as their build, so that the
/// controller's `/debug/subscribers` tells them apart.
const NEVER_POLLED: &str = "abuse: never polls its updates";
const NOT_READING: &str = "abuse: stops reading its socket";
/// The receive buffer of a subscription that stops reading its socket: small, so that
/// what the controller sends it backs up into the controller rather than the kernel.
const STALLED_RCVBUF: u32 = 4096;
/// Services the model change made during the abuse adds: updates for the controller to
/// push to every subscriber, read or not.
const EXTRA_SERVICES: usize = 20;
/// Named ports of each: enough (some 50 KiB a subscriber) that what a subscriber not
/// reading its socket is sent backs up past the kernel's buffers into the controller.
const EXTRA_PORTS: u16 = 100;

/// A pod outside the mesh on node-1: abuse comes from there, as from any workload.
const OUTSIDER: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata:
  name: outsider
  namespace: legacy
spec:
  nodeName: node-1
  containers:
    - name: outsider
      command: [\"sleep\", \"infinity\"]
";

/// Where abusive connections are made from.
#[derive(Clone)]
enum Origin {
    /// The test's own network namespace (the admin and controller ports).
    Host,
    /// A pod's.
    Pod(Arc<Netns>),
}

impl Origin {
    /// Connects, once more if the first attempt times out: the abuser's connections
    /// are not what is measured, and a loaded 2-core machine may drop a SYN or two.
    fn connect(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let go = move || {
            let first = TcpStream::connect_timeout(&addr, Duration::from_secs(10));
            match first {
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    println!("connect {addr}: timed out, once more");
                    TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                }
                other => other,
            }
        };
        match self {
            Origin::Host => go(),
            Origin::Pod(ns) => ns.run_blocking(go)?,
        }
    }
}

/// Whether the server closed `s` (end of stream or reset); data it sent is read away.
fn closed(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 4096];
    let mut reader = s;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// The abuse of one TCP listener.
struct TcpAbuse {
    name: String,
    idle: Vec<TcpStream>,
    half: Vec<TcpStream>,
    slow: Vec<TcpStream>,
    /// Whether the listener should drop idle and slow connections (a handshake or
    /// request-head deadline), or keep them (plain TCP relays, whose clients may idle).
    drops: bool,
}

impl TcpAbuse {
    fn start(
        name: &str,
        origin: &Origin,
        addr: SocketAddr,
        slow_prefix: &[u8],
        drops: bool,
    ) -> Self {
        let open = |n: usize| -> Vec<TcpStream> {
            (0..n)
                .map(|i| {
                    origin
                        .connect(addr)
                        .unwrap_or_else(|e| panic!("{name}: connection {i} to {addr}: {e}"))
                })
                .collect()
        };
        let idle = open(IDLE);
        let half = open(HALF);
        for s in &half {
            let _ = s.shutdown(Shutdown::Write);
        }
        let mut slow = open(SLOW);
        for s in &mut slow {
            let _ = s.write_all(slow_prefix);
        }
        TcpAbuse {
            name: name.to_owned(),
            idle,
            half,
            slow,
            drops,
        }
    }

    fn connections(&self) -> usize {
        self.idle.len() + self.half.len() + self.slow.len()
    }

    /// One more byte on each slow connection still open.
    fn drip(&mut self) {
        for s in &mut self.slow {
            let _ = s.write_all(b"a");
        }
    }

    /// (idle, half-closed, slow) connections the server has closed.
    fn outcomes(&mut self) -> (usize, usize, usize) {
        let count = |v: &mut Vec<TcpStream>| v.iter().filter(|s| closed(s)).count();
        (
            count(&mut self.idle),
            count(&mut self.half),
            count(&mut self.slow),
        )
    }
}

/// The abuse of one `SOCK_SEQPACKET` socket: idle connections and an oversize message.
struct UnixAbuse {
    name: String,
    idle: Vec<OwnedFd>,
}

fn seqpacket(path: &Path, flags: SockFlag) -> std::io::Result<OwnedFd> {
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | flags,
        None,
    )?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

impl UnixAbuse {
    /// Opens the idle connections in the background (a full listener queues them), and
    /// sends one oversize message, returning the answer to it.
    fn start(name: &str, path: &Path) -> (Self, String) {
        let big = seqpacket(path, SockFlag::empty()).expect("connect for the oversize message");
        let message = vec![b' '; 100 * 1024];
        let _ = socket::send(big.as_raw_fd(), &message, MsgFlags::empty());
        let mut reply = vec![0u8; 64 * 1024];
        let answer = match socket::recv(big.as_raw_fd(), &mut reply, MsgFlags::empty()) {
            Ok(n) => String::from_utf8_lossy(&reply[..n]).into_owned(),
            Err(e) => format!("no answer: {e}"),
        };
        // Without blocking: connections past a full backlog are refused, not waited for.
        let idle: Vec<OwnedFd> = (0..IDLE)
            .filter_map(|_| seqpacket(path, SockFlag::SOCK_NONBLOCK).ok())
            .collect();
        (
            UnixAbuse {
                name: name.to_owned(),
                idle,
            },
            answer,
        )
    }

    /// Idle connections the server has closed.
    fn closed(&self) -> usize {
        let mut buf = [0u8; 16];
        self.idle
            .iter()
            .filter(|fd| {
                let raw = fd.as_raw_fd();
                matches!(
                    socket::recv(raw, &mut buf, MsgFlags::MSG_DONTWAIT),
                    Ok(0) | Err(nix::errno::Errno::ECONNRESET)
                )
            })
            .count()
    }
}

/// The controller's gRPC port, as node-1's node-proxy reaches it.
struct GrpcPort {
    addr: SocketAddr,
    roots: PathBuf,
    token: PathBuf,
}

impl GrpcPort {
    /// A channel on a connection of its own, made as node-1's node-proxy makes it.
    fn channel(&self) -> Channel {
        runtime::config_client::channel(&ControllerConfig {
            addr: self.addr.to_string(),
            server_name: cli::sandbox::CONTROLLER_NAME.to_owned(),
            roots: self.roots.clone(),
            token: self.token.clone(),
            node: "node-1".to_owned(),
            waypoint: None,
        })
    }

    /// A channel on a connection that stops reading its socket once `stalled` is set:
    /// beneath TLS, so that nothing the controller sends is read from then on, not even
    /// its keepalive pings.
    async fn stalling_channel(&self, stalled: Arc<AtomicBool>) -> Result<Channel, String> {
        let tls = runtime::config_client::client_tls(&self.roots).map_err(|e| e.to_string())?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
        let addr = self.addr;
        let connect = tower::service_fn(move |_: tonic::transport::Uri| {
            let (connector, stalled) = (connector.clone(), stalled.clone());
            async move {
                let socket = match addr {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                socket.set_recv_buffer_size(STALLED_RCVBUF)?;
                let tcp = socket.connect(addr).await?;
                let name = rustls::pki_types::ServerName::try_from(cli::sandbox::CONTROLLER_NAME)
                    .map_err(std::io::Error::other)?;
                let tls = connector.connect(name, Stalling { tcp, stalled }).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        Endpoint::from_static("http://weft-controller")
            .connect_with_connector(connect)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))
    }

    /// `message` with node-1's token, as its node-proxy sends it.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let token = std::fs::read_to_string(&self.token).expect("node-1's token file is readable");
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", token.trim())
            .parse()
            .expect("a token is printable ASCII, so a header can carry it");
        request.metadata_mut().insert("authorization", value);
        request
    }
}

/// A TCP connection that stops reading once `stalled` is set: its reader is never woken
/// again, and the socket's receive buffer fills.
struct Stalling {
    tcp: tokio::net::TcpStream,
    stalled: Arc<AtomicBool>,
}

impl AsyncRead for Stalling {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.stalled.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stalling {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A subscription's request stream (open while the sender is held) and its updates.
type Subscription = (
    tokio::sync::mpsc::Sender<proto::SubscribeRequest>,
    tonic::Streaming<proto::Update>,
);

/// Subscribes on `channel` with a Hello like node-1's node-proxy's (see
/// `runtime::config_client`), giving `proxy_version` as its build.
async fn subscribe(
    port: &GrpcPort,
    channel: Channel,
    proxy_version: String,
) -> Result<Subscription, Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let hello = proto::Hello {
        node: "node-1".to_owned(),
        role: proto::Role::NodeProxy as i32,
        waypoint: String::new(),
        position: None,
        proxy_version,
    };
    tx.send(proto::SubscribeRequest {
        message: Some(subscribe_request::Message::Hello(hello)),
    })
    .await
    .map_err(|_| Status::internal("the request stream closed before the Hello"))?;
    let request = port.request(tokio_stream::wrappers::ReceiverStream::new(rx));
    let updates = MeshConfigClient::new(channel)
        .subscribe(request)
        .await?
        .into_inner();
    Ok((tx, updates))
}

/// Subscriptions to the controller's model that never read what it sends: half never
/// poll their updates (their HTTP/2 layer still reads into the stream's window and
/// answers pings), half are on a connection that stops reading its socket once
/// subscribed.
struct SubscriberAbuse {
    /// Each one's request and updates (never polled), and its channel.
    open: Vec<(Subscription, Channel)>,
    /// Their client side runs here, in the background; dropped last.
    rt: tokio::runtime::Runtime,
}

impl SubscriberAbuse {
    fn start(port: &GrpcPort) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the gRPC clients");
        let open = rt.block_on(async {
            let mut open = Vec::new();
            for i in 0..NEVER_READ {
                let channel = port.channel();
                let sub = subscribe(port, channel.clone(), NEVER_POLLED.to_owned())
                    .await
                    .unwrap_or_else(|s| panic!("never-polled subscription {i}: {s:?}"));
                open.push((sub, channel));
            }
            for i in 0..NEVER_READ {
                let stalled = Arc::new(AtomicBool::new(false));
                let channel = port
                    .stalling_channel(stalled.clone())
                    .await
                    .unwrap_or_else(|e| panic!("subscription {i} that stops reading: {e}"));
                let sub = subscribe(port, channel.clone(), NOT_READING.to_owned())
                    .await
                    .unwrap_or_else(|s| panic!("subscription {i} that stops reading: {s:?}"));
                // Subscribed: the controller read the Hello. Not a byte more is read.
                stalled.store(true, Ordering::Relaxed);
                open.push((sub, channel));
            }
            open
        });
        SubscriberAbuse { open, rt }
    }

    fn connections(&self) -> usize {
        self.open.len()
    }

    /// What the controller answers a Hello over its limit on subscription messages
    /// (1 MiB), and a certificate request whose CSR is over its limit on those (64 KiB).
    fn oversize(&self, port: &GrpcPort) -> (Result<(), Status>, Result<(), Status>) {
        let answer = |r: Result<Result<(), Status>, _>| {
            r.unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer within 60 s")))
        };
        self.rt.block_on(async {
            let hello = subscribe(port, port.channel(), "x".repeat(2 * 1024 * 1024));
            let hello = tokio::time::timeout(Duration::from_secs(60), hello).await;
            let request = port.request(proto::SignRequest {
                identity: "spiffe://cluster.local/ns/shop/sa/client".to_owned(),
                csr: vec![0x30; 128 * 1024],
            });
            let mut certificates = CertificatesClient::new(port.channel());
            let sign = tokio::time::timeout(Duration::from_secs(60), certificates.sign(request));
            (
                answer(hello.map(|r| r.map(|_| ()))),
                answer(sign.await.map(|r| r.map(|_| ()))),
            )
        })
    }
}

/// The controller's subscriptions whose Hello gave `proxy_version` as their build.
fn subscribed(sb: &Sandbox, proxy_version: &str) -> Option<usize> {
    let (status, body) = http_get(sb.controller_admin().ok()?, "/debug/subscribers").ok()?;
    if status != 200 {
        return None;
    }
    let subscribers: serde_json::Value = serde_json::from_str(&body).ok()?;
    let n = subscribers
        .as_array()?
        .iter()
        .filter(|s| s["proxyVersion"] == proxy_version)
        .count();
    Some(n)
}

/// A status, or "served".
fn outcome(r: &Result<(), Status>) -> String {
    match r {
        Ok(()) => "served".to_owned(),
        Err(s) => format!("{:?}: {}", s.code(), s.message()),
    }
}

/// Services for the model change made during the abuse.
fn extra_services() -> String {
    let ports: String = (1000..1000 + EXTRA_PORTS)
        .map(|p| format!("    - {{name: http-{p}, port: {p}, targetPort: 8080}}\n"))
        .collect();
    (0..EXTRA_SERVICES)
        .map(|i| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: abuse-extra-{i}, namespace: shop}}\n\
                 spec:\n  selector: {{app: echo}}\n  ports:\n{ports}"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The bytes of model updates the controller has sent.
fn pushed_bytes(sb: &Sandbox) -> Option<u64> {
    let text = sb.controller_metrics().ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("weft_controller_pushed_bytes_total "))?
        .trim()
        .parse()
        .ok()
}

/// How many of the extra services `node`'s node-proxy has in its model.
fn extra_services_in(sb: &Sandbox, node: &str) -> Option<usize> {
    let (_, dump) = http_get(sb.admin(node).ok()?, "/config_dump").ok()?;
    let dump: serde_json::Value = serde_json::from_str(&dump).ok()?;
    let n = dump["model"]["services"]
        .as_array()?
        .iter()
        .filter(|s| {
            s["namespace"] == "shop"
                && s["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("abuse-extra-"))
        })
        .count();
    Some(n)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A well-behaved client: a name and one request, `Err` on failure.
struct Probe<'a> {
    name: &'static str,
    run: Box<dyn Fn() -> Result<(), String> + 'a>,
}

impl Probe<'_> {
    fn sample(&self) -> Vec<Duration> {
        (0..SAMPLES)
            .map(|i| {
                let start = Instant::now();
                if let Err(e) = (self.run)() {
                    panic!("{}: request {i} failed: {e}", self.name);
                }
                start.elapsed()
            })
            .collect()
    }
}

fn curl(sb: &Sandbox, pod: &str, url: &str) -> Result<(), String> {
    match sb.curl(pod, url) {
        Ok((0, _)) => Ok(()),
        Ok((code, out)) => Err(format!("curl {url}: exit {code}: {out}")),
        Err(e) => Err(e.to_string()),
    }
}

fn get(addr: SocketAddr, path: &str) -> Result<(), String> {
    match http_get(addr, path) {
        Ok((200, _)) => Ok(()),
        Ok((status, body)) => Err(format!("GET {path}: {status} {body}")),
        Err(e) => Err(format!("GET {path}: {e}")),
    }
}

fn enter(sb: &Sandbox, pod: &str) -> Origin {
    Origin::Pod(Arc::new(sb.enter(pod).expect("enter the namespace")))
}

#[test]
#[ignore = "needs root"]
fn every_listener_keeps_serving_under_abuse() {
    assert!(is_root(), "run as root (network namespaces)");
    let manifests =
        TempManifests::copy(&weft_e2e::repo_root().join("tests/manifests/waypoint")).unwrap();
    manifests.write("90-outsider.yaml", OUTSIDER).unwrap();
    // Its L7 DENY policy refuses plaintext from outside the mesh at node-proxy, which
    // cannot read paths; the outsider's requests are the plaintext listener's probe.
    std::fs::remove_file(manifests.path().join("50-policy.yaml")).unwrap();
    let sb = Sandbox::up("e2e-abuse", manifests.path()).unwrap();
    let outsider = enter(&sb, "legacy/outsider");
    let client = enter(&sb, "shop/client");
    let at = |ip: String, port: u16| -> SocketAddr { format!("{ip}:{port}").parse().unwrap() };
    let echo_v1 = sb.ip("shop/echo-v1-0").unwrap();
    let echo_vip = sb.vips("shop/echo").unwrap()[0].clone();
    let node = |n: &str| {
        sb.state["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|x| x["name"] == n))
            .cloned()
            .unwrap_or_else(|| panic!("no node {n}"))
    };
    let (node1, node2) = (node("node-1"), node("node-2"));
    let path = |v: &serde_json::Value| PathBuf::from(v.as_str().unwrap_or_default());
    let controller_grpc: SocketAddr = sb.state["controller"]["grpc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let port = GrpcPort {
        addr: controller_grpc,
        roots: sb.state_dir.join("ca/root.pem"),
        token: sb.state_dir.join("node-1/token"),
    };

    // The well-behaved clients, one per path the abuse loads.
    let certificate = || -> Result<(), String> {
        let out = std::process::Command::new(weftctl().map_err(|e| e.to_string())?)
            .args(["debug", "certificate", "--controller"])
            .arg(controller_grpc.to_string())
            .arg("--controller-ca")
            .arg(sb.state_dir.join("ca/root.pem"))
            .arg("--token-file")
            .arg(sb.state_dir.join("node-1/token"))
            .args(["--identity", "spiffe://cluster.local/ns/shop/sa/client"])
            .output()
            .map_err(|e| e.to_string())?;
        match out.status.success() {
            true => Ok(()),
            false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    };
    let handoff_path = path(&node1["handoff"]);
    let agent_path = path(&node1["agent"]["socket"]);
    let probes: Vec<Probe<'_>> = vec![
        Probe {
            name: "mesh client -> echo, through the waypoint (15001, waypoint, 15008)",
            run: Box::new(|| curl(&sb, "shop/client", &format!("http://{echo_vip}/"))),
        },
        Probe {
            name: "outside client -> echo-v1 (15006)",
            run: Box::new(|| curl(&sb, "legacy/outsider", &format!("http://{echo_v1}:8080/"))),
        },
        Probe {
            name: "node-proxy admin /ready",
            run: Box::new(|| get(sb.admin("node-1").map_err(|e| e.to_string())?, "/ready")),
        },
        Probe {
            name: "controller admin /ready",
            run: Box::new(|| get(sb.controller_admin().map_err(|e| e.to_string())?, "/ready")),
        },
        Probe {
            name: "controller gRPC: a certificate for node-1's client",
            run: Box::new(certificate),
        },
        Probe {
            name: "handoff socket: hello and inventory",
            run: Box::new(|| {
                let mut c = runtime::handoff::HandoffClient::connect(&handoff_path)
                    .map_err(|e| e.to_string())?;
                c.inventory().map(|_| ()).map_err(|e| e.to_string())
            }),
        },
        Probe {
            name: "node agent socket: del of an unknown pod",
            run: Box::new(|| {
                let request = ipc::agent::Request::Del {
                    version: ipc::agent::VERSION,
                    pod: ipc::agent::CniPod {
                        namespace: "legacy".into(),
                        name: "gone".into(),
                        uid: None,
                        container_id: "c0ffee".into(),
                        ips: Vec::new(),
                    },
                };
                match ipc::agent::call(&agent_path, &request, None, Duration::from_secs(30)) {
                    Ok(reply) if reply.ok => Ok(()),
                    Ok(reply) => Err(reply.message),
                    Err(e) => Err(e.to_string()),
                }
            }),
        },
    ];
    let before: Vec<Duration> = probes.iter().map(|p| median(p.sample())).collect();

    let processes = [
        (
            "node-proxy node-1",
            node1["pid"].as_i64().unwrap_or_default() as i32,
        ),
        (
            "node-proxy node-2",
            node2["pid"].as_i64().unwrap_or_default() as i32,
        ),
        ("waypoint", sb.pid("shop/waypoint-0").unwrap()),
        ("controller", sb.controller_pid()),
        ("node agent node-1", sb.agent_pid("node-1")),
    ];
    let start_usage: Vec<(u64, usize)> = processes
        .iter()
        .map(|(_, pid)| weft_e2e::usage(*pid))
        .collect();

    // The abuse, all at once. TLS listeners get a record header and then one byte a
    // second; HTTP listeners a request head that never ends.
    let tls = b"\x16\x03\x01\x02\x00\x01";
    let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let admin1 = sb.admin("node-1").unwrap();
    let mut tcp = vec![
        // (abuse, the processes whose memory it loads, by index in `processes`)
        (
            TcpAbuse::start(
                "node-proxy HBONE 15008 (echo-v1)",
                &outsider,
                at(echo_v1.clone(), 15008),
                tls,
                true,
            ),
            &[1][..],
        ),
        (
            TcpAbuse::start(
                "node-proxy inbound plaintext 15006 (echo-v1:8080)",
                &outsider,
                at(echo_v1.clone(), 8080),
                head,
                false,
            ),
            &[1][..],
        ),
        (
            TcpAbuse::start(
                "node-proxy outbound 15001 (client -> echo-v1:8080)",
                &client,
                at(echo_v1.clone(), 8080),
                head,
                false,
            ),
            // node-1's outbound side, and node-2's HBONE side of each connection.
            &[0, 1][..],
        ),
        (
            TcpAbuse::start(
                "waypoint HBONE 15008",
                &outsider,
                at(sb.ip("shop/waypoint-0").unwrap(), 15008),
                tls,
                true,
            ),
            &[2][..],
        ),
        (
            // Streams of an HTTP service: the waypoint closes one that sends nothing or
            // a request head that never ends, after 30 s (REQUEST_HEAD_TIMEOUT).
            TcpAbuse::start(
                "waypoint HTTP streams (client -> echo, via 15001)",
                &client,
                at(echo_vip.clone(), 80),
                head,
                true,
            ),
            &[0, 2][..],
        ),
        (
            TcpAbuse::start("node-proxy admin", &Origin::Host, admin1, head, true),
            &[0][..],
        ),
        (
            TcpAbuse::start("controller gRPC", &Origin::Host, controller_grpc, tls, true),
            &[3][..],
        ),
        (
            TcpAbuse::start(
                "controller admin",
                &Origin::Host,
                sb.controller_admin().unwrap(),
                head,
                true,
            ),
            &[3][..],
        ),
    ];
    let (handoff, handoff_oversize) = UnixAbuse::start("handoff socket", &handoff_path);
    let (agent, agent_oversize) = UnixAbuse::start("node agent socket", &agent_path);
    println!("handoff socket, a 100 KiB message: {handoff_oversize}");
    println!("agent socket, a 100 KiB message: {agent_oversize}");
    assert!(
        handoff_oversize.contains("larger than"),
        "{handoff_oversize}"
    );
    assert!(agent_oversize.contains("larger than"), "{agent_oversize}");
    let oversize = {
        let mut s = TcpStream::connect(admin1).unwrap();
        let mut request = b"GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        request.resize(request.len() + 1024 * 1024, b'a');
        let _ = s.write_all(&request);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .lines()
            .next()
            .unwrap_or("closed without an answer")
            .to_owned()
    };
    println!("node-proxy admin, a 1 MiB request head: {oversize}");
    assert!(
        !oversize.contains(" 200 "),
        "an oversize head is refused: {oversize}"
    );
    let subscribers = SubscriberAbuse::start(&port);
    let (hello, sign) = subscribers.oversize(&port);
    println!("controller gRPC, a 2 MiB Hello: {}", outcome(&hello));
    println!(
        "controller gRPC, a certificate request with a 128 KiB CSR: {}",
        outcome(&sign)
    );
    // The Hello's read error ends the subscription as an invalid argument; the
    // certificate request is refused by the decoder, before the CA sees it.
    assert!(
        matches!(&hello, Err(s) if matches!(s.code(), Code::InvalidArgument | Code::OutOfRange | Code::ResourceExhausted)),
        "an oversize Hello is refused: {}",
        outcome(&hello)
    );
    assert!(
        matches!(&sign, Err(s) if matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted)),
        "an oversize certificate request is refused unread: {}",
        outcome(&sign)
    );

    // Memory is counted against every abusive connection a process holds.
    let mut load = [0usize; 5];
    for (a, loaded) in &tcp {
        for process in *loaded {
            load[*process] += a.connections();
        }
    }
    load[0] += handoff.idle.len();
    load[4] += agent.idle.len();
    load[3] += subscribers.connections();
    let within_bound = |i: usize| {
        let ((name, pid), (rss0, _)) = (processes[i], start_usage[i]);
        let (rss, fds) = weft_e2e::usage(pid);
        let bound = rss0 + ALLOWANCE + PER_CONNECTION * load[i] as u64;
        println!(
            "{name}: {} KiB resident ({} KiB before, bound {} KiB), {fds} descriptors",
            rss / 1024,
            rss0 / 1024,
            bound / 1024
        );
        assert!(
            rss <= bound,
            "{name}: {} KiB resident, over its bound of {} KiB",
            rss / 1024,
            bound / 1024
        );
    };

    // A model change while those subscriptions read nothing: the controller has updates
    // to push to every subscriber, and the node-proxies, which read, get them.
    let held = |sb: &Sandbox| (subscribed(sb, NEVER_POLLED), subscribed(sb, NOT_READING));
    let (polled, reading) = held(&sb);
    println!(
        "controller gRPC, subscriptions that never read: {polled:?}/{NEVER_READ} never polled, \
         {reading:?}/{NEVER_READ} not reading their socket subscribed"
    );
    assert_eq!(
        (polled, reading),
        (Some(NEVER_READ), Some(NEVER_READ)),
        "the controller serves each subscription that never reads, as any"
    );
    let pushed_before = pushed_bytes(&sb);
    manifests
        .write("95-abuse-extra.yaml", &extra_services())
        .unwrap();
    let converged = eventually(Duration::from_secs(60), || {
        let counts = (
            extra_services_in(&sb, "node-1")?,
            extra_services_in(&sb, "node-2")?,
        );
        (counts == (EXTRA_SERVICES, EXTRA_SERVICES)).then_some(())
    });
    println!(
        "node-proxies, the {EXTRA_SERVICES} services added during the abuse: {:?} on node-1, {:?} on node-2",
        extra_services_in(&sb, "node-1"),
        extra_services_in(&sb, "node-2")
    );
    assert!(
        converged.is_some(),
        "the node-proxies get a model change while subscriptions that never read are open"
    );
    if let (Some(before), Some(after)) = (pushed_before, pushed_bytes(&sb)) {
        println!(
            "controller: {} KiB of updates sent for the model change",
            after.saturating_sub(before) / 1024
        );
    }
    let (polled, reading) = held(&sb);
    println!(
        "controller gRPC, after the model change: {polled:?}/{NEVER_READ} never polled, \
         {reading:?}/{NEVER_READ} not reading their socket subscribed"
    );
    within_bound(3);

    // The well-behaved clients during the abuse, while the slow ones drip.
    let stop = Arc::new(AtomicBool::new(false));
    let during: Vec<Duration> = std::thread::scope(|scope| {
        let dripping: Vec<_> = tcp.iter_mut().map(|(a, _)| a).collect();
        let stop2 = stop.clone();
        scope.spawn(move || {
            let mut dripping = dripping;
            while !stop2.load(Ordering::Relaxed) {
                for a in dripping.iter_mut() {
                    a.drip();
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        // Stops the dripping also when a probe fails: the scope waits for it.
        struct Stop(Arc<AtomicBool>);
        impl Drop for Stop {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(stop.clone());
        probes.iter().map(|p| median(p.sample())).collect()
    });
    for ((p, b), d) in probes.iter().zip(&before).zip(&during) {
        let ratio = d.as_secs_f64() / b.max(&RESOLUTION).as_secs_f64();
        println!(
            "{}: median {b:?} before, {d:?} during ({ratio:.2}x)",
            p.name
        );
        assert!(
            ratio <= LATENCY_RATIO,
            "{}: {ratio:.2}x its latency before the abuse",
            p.name
        );
    }

    // Memory and descriptors while every abusive connection is open.
    for i in 0..processes.len() {
        within_bound(i);
    }

    // The listeners with a deadline drop what never completes; the plain relays keep
    // idle connections, as their clients may idle.
    let mut tcp: Vec<TcpAbuse> = tcp.into_iter().map(|(a, _)| a).collect();
    let dropped = eventually(Duration::from_secs(60), || {
        let all = tcp.iter_mut().filter(|a| a.drops).all(|a| {
            let (idle, half, slow) = a.outcomes();
            idle == IDLE && half == HALF && slow == SLOW
        });
        let unix = handoff.closed() == handoff.idle.len() && agent.closed() == agent.idle.len();
        (all && unix).then_some(())
    });
    for a in &mut tcp {
        let (idle, half, slow) = a.outcomes();
        println!("{}: closed by the server: {idle}/{IDLE} idle, {half}/{HALF} half-closed, {slow}/{SLOW} slow", a.name);
        if !a.drops {
            assert_eq!(
                idle, 0,
                "{}: a plain relay keeps an idle connection",
                a.name
            );
        }
    }
    println!(
        "{}: {}/{} idle connections closed",
        handoff.name,
        handoff.closed(),
        handoff.idle.len()
    );
    println!(
        "{}: {}/{} idle connections closed",
        agent.name,
        agent.closed(),
        agent.idle.len()
    );
    assert!(
        dropped.is_some(),
        "every listener with a deadline dropped its idle, half-closed and slow connections"
    );
    // A subscription that reads nothing answers no keepalive ping, and is dropped; one
    // whose HTTP/2 layer reads is kept, and flow control bounds what it is sent.
    let stalled_dropped = eventually(Duration::from_secs(60), || {
        (subscribed(&sb, NOT_READING)? == 0).then_some(())
    });
    let (polled, reading) = held(&sb);
    println!(
        "controller gRPC, subscriptions that never read, still subscribed: {polled:?}/{NEVER_READ} \
         never polled, {reading:?}/{NEVER_READ} not reading their socket"
    );
    assert!(
        stalled_dropped.is_some(),
        "the controller drops a subscription that reads nothing, not even its pings"
    );

    // When the abuse ends, the descriptors come back.
    drop(tcp);
    drop(handoff);
    drop(agent);
    drop(subscribers);
    for ((name, pid), (_, fds0)) in processes.iter().zip(&start_usage) {
        let back = eventually(Duration::from_secs(30), || {
            let (_, fds) = weft_e2e::usage(*pid);
            (fds <= fds0 + fds0 / 10 + 2).then_some(fds)
        });
        assert!(
            back.is_some(),
            "{name}: descriptors did not come back to {fds0}: {:?}",
            weft_e2e::usage(*pid)
        );
    }
}

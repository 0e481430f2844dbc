//! Network namespaces: a thread that lives in a pod's netns and makes sockets there.
//!
//! A socket belongs to the network namespace it was created in, whichever thread uses it
//! later. So node-proxy keeps one small thread per pod that has `setns`-ed into the
//! pod's namespace; it creates listeners on request and hands them to the async
//! runtime, which serves them like any other socket. Child processes spawned from that
//! thread (e.g. `nft`) also start in the pod's namespace. Sockets made per connection
//! are made on the runtime's own thread, which steps into the pod's namespace for the
//! few system calls that takes and straight back.

use std::cell::OnceCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::oneshot;

/// Socket mark of the proxy's own outgoing connections (HBONE and passthrough): the
/// pod's redirect rules let marked packets through instead of capturing them again.
pub const MARK_OUTBOUND: u32 = 0x539;
/// Socket mark of inbound connections the proxy makes to the application with the
/// client's source address (transparent). The rules route the application's replies to
/// these back to the proxy.
pub const MARK_INBOUND: u32 = 0x53a;

/// The port of a captured pod's outbound listener (on its loopback).
pub const OUTBOUND_PORT: u16 = 15001;
/// The port of its inbound plaintext listener (on its address).
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// The port of its inbound HBONE listener (on its address).
pub const HBONE_PORT: u16 = tunnel::hbone::PORT;

/// The addresses of a captured pod's three listeners, outbound, inbound plaintext and
/// HBONE, from its IPs. An IPv4 pod's are on loopback and on its (first) IPv4 address. A
/// pod with an IPv6 address has them on the unspecified address, each one socket that
/// takes both families (IPv4 as IPv4-mapped addresses): the kernel redirects IPv6 to an
/// address of the interface it chooses (a link-local one, on some kernels), which only
/// the unspecified address is sure to cover. A connection made straight to one of these
/// ports, not redirected, is refused by the proxy (its destination is the port itself).
pub fn pod_listen_addrs(ips: &[IpAddr]) -> Result<[SocketAddr; 3], String> {
    if ips.iter().any(|ip| ip.to_canonical().is_ipv6()) {
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        return Ok([OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT]
            .map(|port| SocketAddr::new(any, port)));
    }
    ipv4_listen_addrs(ips).ok_or_else(|| "it has no IP address".to_owned())
}

/// The listener addresses an earlier release gave a pod (IPv4 only: loopback and its
/// first IPv4 address), which a node-proxy may still be handed for a pod with IPv6.
pub fn ipv4_listen_addrs(ips: &[IpAddr]) -> Option<[SocketAddr; 3]> {
    let ip = ips
        .iter()
        .map(|ip| ip.to_canonical())
        .find(IpAddr::is_ipv4)?;
    Some([
        SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)),
        SocketAddr::new(ip, INBOUND_PLAINTEXT_PORT),
        SocketAddr::new(ip, HBONE_PORT),
    ])
}

/// `addr` with an IPv4-mapped IPv6 address as the IPv4 address it stands for: how a
/// dual-stack socket reports an IPv4 peer.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The IP of `ips` in `like`'s family, if there is one: the source to use towards `like`.
pub fn same_family(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    let v6 = like.to_canonical().is_ipv6();
    ips.iter()
        .map(|ip| ip.to_canonical())
        .find(|ip| ip.is_ipv6() == v6)
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside one network namespace.
#[derive(Debug)]
pub struct Netns {
    jobs: mpsc::Sender<Job>,
    name: String,
    /// The namespace itself, for making sockets there from the calling thread.
    fd: OwnedFd,
}

impl Netns {
    /// Starts a thread in the namespace `fd` refers to. `name` is for thread names and
    /// errors (the pod's namespace/name).
    pub fn enter(fd: OwnedFd, name: &str) -> io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let keep = fd.try_clone()?;
        std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn(move || {
                if let Err(e) = setns(&fd, CloneFlags::CLONE_NEWNET) {
                    let _ = ready_tx.send(Err(io::Error::from(e)));
                    return;
                }
                drop(fd);
                let _ = ready_tx.send(Ok(()));
                // Runs until every `Netns` handle is gone.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns thread exited before entering"))?
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot enter the network namespace of {name}: {e}"),
                )
            })?;
        Ok(Netns {
            jobs,
            name: name.to_owned(),
            fd: keep,
        })
    }

    /// Queues `f` on the namespace's thread; `reply` carries its result back.
    fn send<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
        reply: impl FnOnce(T) + Send + 'static,
    ) -> io::Result<()> {
        self.jobs
            .send(Box::new(move || reply(f())))
            .map_err(|_| self.gone())
    }

    fn gone(&self) -> io::Error {
        io::Error::other(format!("netns thread of {} is gone", self.name))
    }

    /// Runs `f` on the namespace's thread and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(f, move |v| {
            let _ = tx.send(v);
        })?;
        rx.await.map_err(|_| self.gone())
    }

    /// As [`run`](Self::run), for callers outside the runtime.
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.send(f, move |v| {
            let _ = tx.send(v);
        })?;
        rx.recv().map_err(|_| self.gone())
    }

    /// Runs `f` on the calling thread, inside this namespace for its duration.
    ///
    /// For making a socket without a round trip to the namespace's thread (two thread
    /// wake-ups per connection, and a wait behind any other job queued there). `f` must
    /// not await, block or call `here` again: it runs on a runtime worker that no other
    /// task can use meanwhile, and the thread returns to where it was when `f` ends.
    fn here<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        /// Puts the thread back, also if `f` panics.
        struct Back<'a>(BorrowedFd<'a>);
        impl Drop for Back<'_> {
            fn drop(&mut self) {
                // setns allocates; retry a transient failure before giving up.
                for _ in 0..3 {
                    if setns(self.0, CloneFlags::CLONE_NEWNET).is_ok() {
                        return;
                    }
                }
                // A worker left in a pod's namespace would make every later socket
                // there; stopping is the only safe outcome.
                eprintln!("node-proxy: cannot return a thread to its network namespace");
                std::process::abort();
            }
        }
        thread_local! {
            /// This thread's own namespace, opened on its first call: one descriptor
            /// per runtime thread instead of an open and a close per connection (in
            /// the sandbox those were ~4% of the server side's CPU per connection).
            static HOME: OnceCell<OwnedFd> = const { OnceCell::new() };
        }
        HOME.with(|home| {
            let home = match home.get() {
                Some(fd) => fd,
                None => {
                    let opened = std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot open this thread's network namespace: {e}"),
                        )
                    })?;
                    home.get_or_init(|| opened.into())
                }
            };
            setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("cannot enter the network namespace of {}: {e}", self.name),
                )
            })?;
            let _back = Back(home.as_fd());
            f()
        })
    }

    /// The namespace, for handing it to another process.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// A non-blocking TCP listener on `addr` in this namespace.
    ///
    /// An address still in use is retried for up to a second: a previous owner (the same
    /// pod just removed, or a node-proxy that is still exiting) may be letting go of it.
    pub async fn listen(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let mut tries = 0;
        loop {
            match self.run(move || listener(addr)).await? {
                Ok(std) => return tokio::net::TcpListener::from_std(std),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 40 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// An unconnected, marked TCP socket in this namespace for an outgoing connection.
    pub fn outbound_socket(&self, dst: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let socket = self.here(move || {
            let s = Socket::new(Domain::for_address(dst), stream_type(), Some(Protocol::TCP))?;
            s.set_mark(MARK_OUTBOUND)?;
            s.set_tcp_nodelay(true)?;
            Ok(s)
        })?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// An unconnected TCP socket in this namespace bound to `src` (an address that need
    /// not be local: the original client's), for connecting to the application while
    /// preserving the client's source address.
    pub fn transparent_socket(&self, src: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let socket = self.here(move || {
            let s = Socket::new(Domain::for_address(src), stream_type(), Some(Protocol::TCP))?;
            s.set_mark(MARK_INBOUND)?;
            if src.is_ipv4() {
                s.set_ip_transparent_v4(true)?;
            } else {
                s.set_ip_transparent_v6(true)?;
            }
            s.set_tcp_nodelay(true)?;
            pod_local_congestion(&s);
            bind_transparent(&s, src.ip())?;
            Ok(s)
        })?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }
}

/// The source ports of connections made from a client's address to the application:
/// below the range Linux hands out by default (32768-60999). A client with that range
/// never opens a connection of its own from one of them, so its next connection cannot
/// have the 4-tuple of one of ours: connection tracking in the pod would take that
/// client's SYN for our connection's, and neither would survive.
///
/// Letting the kernel choose at connect time (`IP_BIND_ADDRESS_NO_PORT`) did collide: it
/// picks by a hash of the 4-tuple with a secret of the kernel's, so a client on the same
/// node, connecting at the same moment, was given the very same port.
pub const TRANSPARENT_PORTS: std::ops::Range<u16> = 1024..32768;
/// Random ports tried before the kernel is left to choose.
const TRANSPARENT_TRIES: usize = 8;

/// Binds `s` to `ip` and a random port of [`TRANSPARENT_PORTS`]; when every try is in use
/// (tens of thousands of recent connections from that one client), to a port the kernel
/// chooses at connect time.
fn bind_transparent(s: &Socket, ip: IpAddr) -> io::Result<()> {
    let mut random = [0u8; 2 * TRANSPARENT_TRIES];
    // Spread, not secrecy: a failure leaves zeros, and the kernel's choice.
    let _ = aws_lc_rs::rand::fill(&mut random);
    let span = TRANSPARENT_PORTS.end - TRANSPARENT_PORTS.start;
    for pair in random.chunks_exact(2) {
        let port = TRANSPARENT_PORTS.start + u16::from_le_bytes([pair[0], pair[1]]) % span;
        match s.bind(&SockAddr::from(SocketAddr::new(ip, port))) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    s.bind(&SockAddr::from(SocketAddr::new(ip, 0)))
}

/// Makes outbound sockets inside a pod's namespace, for the HBONE client pool.
pub struct PodSockets(pub std::sync::Arc<Netns>);

impl tunnel::hbone::SocketFactory for PodSockets {
    fn socket(
        &self,
        dst: SocketAddr,
    ) -> tunnel::hbone::BoxFuture<'_, io::Result<tokio::net::TcpSocket>> {
        Box::pin(std::future::ready(self.0.outbound_socket(dst)))
    }
}

/// The congestion control for connections that never leave the pod: the proxy's
/// connections to and from the application over the pod's loopback.
pub const POD_LOCAL_CONGESTION: &str = "reno";

/// Sets [`POD_LOCAL_CONGESTION`] on a socket that only carries traffic inside the pod.
///
/// A node's default may be BBR, which paces every send with a high-resolution timer.
/// Across the network that is the operator's choice and the proxy's network sockets
/// keep it; on loopback there is no path to pace or congest, and the timers cost CPU:
/// in the sandbox (a VM, where every timer reprogramming traps) they halved the mesh's
/// bulk throughput. Reno is built into every kernel and may be chosen without
/// privileges. Best effort: a failure leaves the node's default.
pub fn pod_local_congestion(socket: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(socket).set_tcp_congestion(POD_LOCAL_CONGESTION.as_bytes());
}

/// A non-blocking stream socket type, set in the `socket()` call itself rather than
/// with two `fcntl()`s per connection afterwards (socket2 adds close-on-exec).
fn stream_type() -> Type {
    Type::STREAM.nonblocking()
}

fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Both families, whatever the node's `net.ipv6.bindv6only`.
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&SockAddr::from(addr))?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Opens TCP listeners on `addrs` inside the network namespace `netns`, from a thread
/// that enters it for that and ends: for a process that holds a pod's listeners without
/// serving them (the node agent, which hands them to node-proxy and keeps them open
/// across its restarts). All or nothing.
pub fn listen_in(netns: BorrowedFd<'_>, addrs: &[SocketAddr]) -> io::Result<Vec<OwnedFd>> {
    let netns = netns.try_clone_to_owned()?;
    let addrs = addrs.to_vec();
    std::thread::Builder::new()
        .name("netns listen".into())
        .spawn(move || {
            setns(&netns, CloneFlags::CLONE_NEWNET)?;
            addrs
                .iter()
                .map(|a| {
                    listener(*a)
                        .map(OwnedFd::from)
                        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))
                })
                .collect()
        })?
        .join()
        .map_err(|_| io::Error::other("the thread opening listeners panicked"))?
}

/// Inodes of the TCP sockets listening in the calling thread's network namespace (from
/// `/proc/thread-self/net/tcp` and `tcp6`), read line by line. Run it on a namespace's
/// own thread ([`Netns::run`]) to list that namespace's.
pub fn listening_inodes() -> io::Result<std::collections::HashSet<u64>> {
    use std::io::BufRead;
    const LISTEN: &str = "0A";
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let file = match std::fs::File::open(table) {
            Ok(f) => f,
            // No IPv6 in this kernel: nothing listens there.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in std::io::BufReader::new(file).lines().skip(1) {
            let line = line?;
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let mut fields = line.split_whitespace();
            if fields.nth(3) != Some(LISTEN) {
                continue;
            }
            if let Some(inode) = fields.nth(5).and_then(|f| f.parse().ok()) {
                inodes.insert(inode);
            }
        }
    }
    Ok(inodes)
}

/// The destination a redirected connection was originally sent to (SO_ORIGINAL_DST),
/// an IPv4 address for an IPv4 connection taken by a dual-stack listener.
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match canonical(stream.local_addr()?) {
        // IPv4 conntrack answers for an IPv4-mapped connection on an IPv6 socket.
        SocketAddr::V4(_) => sock.original_dst_v4()?,
        SocketAddr::V6(_) => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .map(canonical)
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// A stream's own address, IPv4-mapped addresses as IPv4 ([`canonical`]).
pub fn local_addr(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    stream.local_addr().map(canonical)
}

/// A stream's peer, IPv4-mapped addresses as IPv4 ([`canonical`]).
pub fn peer_addr(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    stream.peer_addr().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns_link() -> String {
        std::fs::read_link("/proc/thread-self/ns/net")
            .unwrap()
            .display()
            .to_string()
    }

    /// A fresh network namespace with loopback up, as a pod's would be.
    fn fresh_netns() -> OwnedFd {
        std::thread::spawn(|| {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).unwrap();
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(up.success());
            OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn an_ipv4_pod_listens_on_its_address_a_pod_with_ipv6_on_both_families() {
        let v6: IpAddr = "fd00::7".parse().unwrap();
        let v4: IpAddr = "10.244.1.7".parse().unwrap();
        let addrs = pod_listen_addrs(&[v4]).unwrap();
        assert_eq!(addrs[0], "127.0.0.1:15001".parse().unwrap());
        assert_eq!(addrs[1], SocketAddr::new(v4, 15006));
        assert_eq!(addrs[2], SocketAddr::new(v4, 15008));
        for ips in [vec![v4, v6], vec![v6, v4], vec![v6]] {
            let addrs = pod_listen_addrs(&ips).unwrap();
            assert_eq!(
                addrs.map(|a| a.to_string()),
                ["[::]:15001", "[::]:15006", "[::]:15008"],
                "{ips:?}"
            );
        }
        let refused = pod_listen_addrs(&[]).unwrap_err();
        assert!(refused.contains("no IP address"), "{refused}");
        assert_eq!(same_family(&[v4, v6], "fd00::1".parse().unwrap()), Some(v6));
        assert_eq!(
            same_family(&[v4, v6], "::ffff:10.0.0.1".parse().unwrap()),
            Some(v4)
        );
        assert_eq!(same_family(&[v4], "fd00::1".parse().unwrap()), None);
    }

    /// A dual-stack listener takes IPv4 connections too, and reports them (and their
    /// original destination) as IPv4.
    #[tokio::test]
    async fn a_dual_stack_listener_reports_ipv4_peers_as_ipv4() {
        let std = listener("[::]:0".parse().unwrap()).expect("IPv6 in this kernel");
        let l = tokio::net::TcpListener::from_std(std).unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(
            local_addr(&s).unwrap(),
            SocketAddr::from(([127, 0, 0, 1], port))
        );
        assert!(peer_addr(&s).unwrap().is_ipv4());
    }

    #[ignore = "needs root"]
    #[tokio::test(flavor = "current_thread")]
    async fn per_connection_sockets_are_made_in_the_pod_and_the_thread_comes_back() {
        let ns = Netns::enter(fresh_netns(), "shop/cart").unwrap();
        // The same address listens in the pod and on the host: the connection must
        // arrive at the pod's.
        let pod = ns.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = pod.local_addr().unwrap();
        let host = std::net::TcpListener::bind(addr).unwrap();
        host.set_nonblocking(true).unwrap();
        let home = netns_link();
        let socket = ns.outbound_socket(addr).unwrap();
        assert_eq!(netns_link(), home, "the thread is back in its namespace");
        let _conn = socket.connect(addr).await.unwrap();
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(5), pod.accept()).await;
        assert!(
            accepted.is_ok(),
            "the connection reached the pod's listener"
        );
        assert!(
            host.accept().is_err(),
            "nothing reached the host's listener"
        );
        // A later socket made on this thread without the pod lands on the host.
        let own = tokio::net::TcpSocket::new_v4().unwrap();
        let _conn = own.connect(addr).await.unwrap();
        assert!(
            host.accept().is_ok(),
            "the thread makes sockets on the host again"
        );
    }

    #[ignore = "needs root"]
    #[tokio::test(flavor = "current_thread")]
    async fn connections_from_a_clients_address_use_ports_no_default_client_picks() {
        let ns = Netns::enter(fresh_netns(), "shop/cart").unwrap();
        let app = ns.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let target = app.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..64 {
            let socket = ns
                .transparent_socket("127.0.0.2:40000".parse().unwrap())
                .unwrap();
            let conn = socket.connect(target).await.unwrap();
            let port = conn.local_addr().unwrap().port();
            assert!(TRANSPARENT_PORTS.contains(&port), "port {port}");
            held.push((conn, app.accept().await.unwrap()));
        }
    }

    #[test]
    fn pod_local_sockets_do_not_pace() {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        pod_local_congestion(&s);
        let name = s.tcp_congestion().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&name).trim_end_matches('\0'),
            POD_LOCAL_CONGESTION
        );
    }
}

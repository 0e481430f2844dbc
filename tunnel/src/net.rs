//! Socket helpers every component's listeners share.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

/// How long an accept loop waits after a failed `accept`.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection on `listener`, and its peer (an IPv4 peer of a dual-stack
/// listener as IPv4, not IPv4-mapped IPv6). A failed `accept` (out of file descriptors,
/// most often) is logged, naming `what` listens, and retried after a short pause: the
/// condition persists until connections close, so retrying at once would spin a core.
/// Cancel-safe, like [`TcpListener::accept`].
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                return (
                    stream,
                    SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                )
            }
            Err(e) => {
                warn!("{what}: accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// A listener on `addr`. An unspecified address (`0.0.0.0` or `[::]`) listens on both
/// families, so the same flags serve IPv4, dual-stack and IPv6-only clusters: one IPv6
/// socket that also accepts IPv4 (as IPv4-mapped addresses); where the kernel has no
/// IPv6, IPv4 alone. A specific address is bound as it is.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let open = |addr: SocketAddr, dual: bool| -> std::io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if dual {
            socket.set_only_v6(false)?;
        }
        // As tokio's bind: a restarted process gets its port back at once.
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        socket.set_nonblocking(true)?;
        TcpListener::from_std(socket.into())
    };
    if !addr.ip().is_unspecified() {
        return open(addr, false);
    }
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, addr.port()));
    match open(any6, true) {
        Ok(l) => Ok(l),
        // The port is taken, or this is not allowed: so it would be for IPv4 too.
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            Err(e)
        }
        // No IPv6 in this kernel or namespace (EAFNOSUPPORT, EADDRNOTAVAIL).
        Err(_) => open(SocketAddr::from(([0, 0, 0, 0], addr.port())), false),
    }
}

#[cfg(test)]
mod listen_tests {
    use super::*;

    #[tokio::test]
    async fn an_unspecified_address_listens_on_both_families() {
        for any in ["0.0.0.0:0", "[::]:0"] {
            let listener = listen(any.parse().expect("literal")).expect("listen");
            let port = listener.local_addr().expect("addr").port();
            for to in [
                SocketAddr::from(([127, 0, 0, 1], port)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            ] {
                let client = TcpStream::connect(to).await;
                assert!(client.is_ok(), "{any}: connecting to {to}: {client:?}");
                let (_, peer) = accept(&listener, "test").await;
                assert_eq!(
                    peer.ip(),
                    to.ip(),
                    "{any}: an IPv4 peer is reported as IPv4"
                );
            }
        }
        // A specific address stays that address.
        let v4 = listen("127.0.0.1:0".parse().expect("literal")).expect("listen");
        let port = v4.local_addr().expect("addr").port();
        let v6 = TcpStream::connect(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))).await;
        assert!(v6.is_err(), "127.0.0.1 is not ::1");
    }
}

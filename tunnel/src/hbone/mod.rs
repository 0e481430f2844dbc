//! HBONE: TCP streams carried as HTTP/2 CONNECT requests over mutual TLS, wire
//! compatible with Istio ztunnel.
//!
//! The facts a peer relies on: TLS 1.3 only, no SNI, ALPN `h2`, no session resumption;
//! each stream is `:method CONNECT` with `:authority` = the original destination
//! `ip:port` and no `:scheme` or `:path`; optional `forwarded: for="<ip:port>"`,
//! `traceparent` and `baggage` headers. The answer is 200 (stream open), 400 (malformed
//! request), 401 (policy denial) or 503 (target unreachable or one of the proxy's own
//! ports).

mod client;
mod readahead;
mod server;
mod stream;

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, Method, StatusCode, Uri};

pub use client::{
    BoxFuture, ConnectError, ConnectRequest, Pool, PoolConfig, SocketFactory, EARLY_DATA_MAX,
};
pub use server::{Forward, Handler, InboundRequest, Server, ServerConfig};
pub use stream::{H2Stream, Progress};

/// The port HBONE listens on by convention.
pub const PORT: u16 = 15008;

/// The default for how long an HBONE connection's peer may stay silent before the
/// connection is given up ([`PoolConfig::peer_silence`], [`ServerConfig::peer_silence`]).
/// A node powered off or cut off sends no RST: without this, a pooled connection to it
/// would take new streams until the kernel stops retransmitting (about 15 minutes), and
/// the streams of a client that vanished would be held for good.
pub const PEER_SILENCE: std::time::Duration = std::time::Duration::from_secs(90);

/// Has the kernel give up `tcp` once its peer has been silent for `silence`: an idle
/// connection is probed (TCP keepalive) after two thirds of it, then every ninth of it,
/// three times; data left unacknowledged for `silence` ends it too (`TCP_USER_TIMEOUT`).
/// Probes are the kernel's: nothing runs per message.
pub(crate) fn watch_peer(tcp: &tokio::net::TcpStream, silence: std::time::Duration) {
    use std::time::Duration;
    // The kernel counts keepalive times in whole seconds.
    let at_least_a_second = |d: Duration| d.max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(at_least_a_second(silence * 2 / 3))
        .with_interval(at_least_a_second(silence / 9))
        .with_retries(3);
    let socket = socket2::SockRef::from(tcp);
    // Without them the connection still works, as it did before; nothing to refuse.
    if let Err(e) = socket
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| socket.set_tcp_user_timeout(Some(silence)))
    {
        tracing::debug!("cannot set TCP keepalive on an HBONE connection: {e}");
    }
}

/// Ports of the proxy itself. A CONNECT to one of them would loop back into the proxy,
/// so it is refused with 503 (as ztunnel does).
pub const PROXY_PORTS: &[u16] = &[15000, 15001, 15006, 15008, 15020, 15021];

// Flow control. Defaults (64 KiB windows) cap a stream at one window per round trip:
// ~500 Mbit/s at 1 ms RTT. Windows sized to a bandwidth-delay product of 10 Gbit/s x
// ~3 ms let one stream fill a fast link; the connection window is four stream windows so
// a few bulk streams share a connection at full rate while it still bounds the memory one
// connection can pin in the receiver. A window is a ceiling, not an allocation: memory is
// only used while the application does not read. Matches ztunnel's choices, so mixed
// meshes behave the same in both directions.
/// Per-stream receive window.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection receive window.
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest DATA frame we accept: fewer, larger frames mean fewer headers and wakeups
/// per byte on bulk transfers.
pub(crate) const MAX_FRAME: u32 = 1024 * 1024;
/// Bytes h2 may buffer per stream before a writer is made to wait. Enough to keep a
/// full frame queued behind the one being written.
pub(crate) const SEND_BUFFER: usize = 2 * 1024 * 1024;
/// Largest header block (decoded, as HTTP/2 counts it) a peer may send: a CONNECT and
/// its answer carry a few hundred bytes. h2's own default is 16 MiB, which HPACK
/// references can inflate from a few KiB on the wire, per stream. A request over it is
/// answered 431 and its stream refused.
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;
/// TLS records rustls may hold before they are written (its default is 64 KiB): each
/// write to the socket then carries up to this much, fewer and larger writes per byte.
pub(crate) const TLS_WRITE_BUFFER: usize = 256 * 1024;

/// Why a CONNECT stream is refused: each maps to the status the peer sees and a
/// metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The method is not CONNECT.
    #[error("method is not CONNECT")]
    BadMethod,
    /// The authority is not `ip:port`.
    #[error("authority is not an ip:port")]
    BadAuthority,
    /// The authority IP is not the address the connection was made to.
    #[error("authority IP is not the address dialled")]
    AuthorityMismatch,
    /// The `forwarded` header is present but unreadable.
    #[error("forwarded header is malformed")]
    BadForwarded,
    /// The target is one of the proxy's own ports.
    #[error("target is one of the proxy's own ports")]
    ProxyPort,
    /// The target refused or did not answer.
    #[error("target is unreachable")]
    Unreachable,
    /// Authorization policy denied the stream.
    #[error("denied by policy")]
    Denied,
}

impl Refusal {
    /// The HTTP status sent to the peer.
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::BadMethod
            | Refusal::BadAuthority
            | Refusal::AuthorityMismatch
            | Refusal::BadForwarded => StatusCode::BAD_REQUEST,
            Refusal::ProxyPort | Refusal::Unreachable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Denied => StatusCode::UNAUTHORIZED,
        }
    }

    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadMethod => "bad_method",
            Refusal::BadAuthority => "bad_authority",
            Refusal::AuthorityMismatch => "authority_mismatch",
            Refusal::BadForwarded => "bad_forwarded",
            Refusal::ProxyPort => "proxy_port",
            Refusal::Unreachable => "unreachable",
            Refusal::Denied => "denied",
        }
    }
}

/// The CONNECT header in which a waypoint names the client it forwards for.
pub const SOURCE_PRINCIPAL: &str = "weft-source-principal";

/// What a well-formed CONNECT asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// The original destination.
    pub target: SocketAddr,
    /// The original source, from `forwarded: for=`.
    pub forwarded_for: Option<SocketAddr>,
}

/// Checks a request's method, authority and headers. Pure, so it can be fuzzed.
pub fn parse_connect(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Connect, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::BadMethod);
    }
    if uri.scheme().is_some() || uri.path_and_query().is_some_and(|p| !p.as_str().is_empty()) {
        return Err(Refusal::BadAuthority);
    }
    let target = parse_authority(uri.authority().map(|a| a.as_str()).unwrap_or(""))?;
    let forwarded_for = match headers.get(http::header::FORWARDED) {
        None => None,
        Some(v) => {
            let v = v.to_str().map_err(|_| Refusal::BadForwarded)?;
            Some(parse_forwarded_for(v).ok_or(Refusal::BadForwarded)?)
        }
    };
    Ok(Connect {
        target,
        forwarded_for,
    })
}

/// Parses an authority that must be a literal `ip:port` (`[v6]:port` for IPv6) with a
/// non-zero port.
pub fn parse_authority(authority: &str) -> Result<SocketAddr, Refusal> {
    let addr: SocketAddr = authority.parse().map_err(|_| Refusal::BadAuthority)?;
    if addr.port() == 0 {
        return Err(Refusal::BadAuthority);
    }
    // `[::ffff:a.b.c.d]` is the IPv4 address it maps.
    Ok(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// Reads the `for=` parameter of the first element of a `forwarded` header (RFC 7239),
/// accepting `for="ip:port"`, `for="[v6]:port"` and `for=ip` (port 0 when absent).
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let node = match node.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => node,
    };
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// The `forwarded` header value for a source address.
pub fn forwarded_value(src: SocketAddr) -> String {
    format!("for=\"{src}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(authority: &str) -> Result<Connect, Refusal> {
        let uri: Uri = authority.parse().map_err(|_| Refusal::BadAuthority)?;
        parse_connect(&Method::CONNECT, &uri, &HeaderMap::new())
    }

    #[test]
    fn authority_forms() {
        assert_eq!(
            connect("10.244.1.7:8080").unwrap().target,
            "10.244.1.7:8080".parse().unwrap()
        );
        assert_eq!(
            connect("[fd00::1]:80").unwrap().target,
            "[fd00::1]:80".parse().unwrap()
        );
        assert_eq!(
            connect("[::ffff:10.244.1.7]:80").unwrap().target,
            "10.244.1.7:80".parse().unwrap()
        );
        for bad in [
            "10.244.1.7",
            "echo.default:80",
            "10.244.1.7:0",
            "10.1.2.3:99999",
            ":80",
        ] {
            assert_eq!(connect(bad), Err(Refusal::BadAuthority), "{bad}");
        }
        let get = parse_connect(
            &Method::GET,
            &"10.0.0.1:80".parse().unwrap(),
            &HeaderMap::new(),
        );
        assert_eq!(get, Err(Refusal::BadMethod));
        let with_path: Uri = "http://10.0.0.1:80/x".parse().unwrap();
        assert_eq!(
            parse_connect(&Method::CONNECT, &with_path, &HeaderMap::new()),
            Err(Refusal::BadAuthority)
        );
    }

    #[test]
    fn forwarded_forms() {
        let p = parse_forwarded_for;
        assert_eq!(
            p("for=\"10.0.0.1:5000\""),
            Some("10.0.0.1:5000".parse().unwrap())
        );
        assert_eq!(
            p("For=\"[fd00::1]:5\";proto=http"),
            Some("[fd00::1]:5".parse().unwrap())
        );
        assert_eq!(
            p("proto=http; for=10.0.0.2"),
            Some("10.0.0.2:0".parse().unwrap())
        );
        assert_eq!(p("for=\"[fd00::2]\""), Some("[fd00::2]:0".parse().unwrap()));
        assert_eq!(p("for=unknown"), None);
        assert_eq!(p("for=\"10.0.0.1:5000"), None);
        assert_eq!(p(""), None);
        assert_eq!(
            p(&forwarded_value("10.1.1.1:9".parse().unwrap())),
            Some("10.1.1.1:9".parse().unwrap())
        );
        let mut h = HeaderMap::new();
        h.insert(http::header::FORWARDED, "for=garbage".parse().unwrap());
        assert_eq!(
            parse_connect(&Method::CONNECT, &"10.0.0.1:80".parse().unwrap(), &h),
            Err(Refusal::BadForwarded)
        );
    }
}

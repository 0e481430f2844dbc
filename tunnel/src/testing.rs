//! Fixtures for tests and benchmarks (feature `testing`): a CA with workloads, an HBONE
//! server on loopback, a TCP echo target. Not for production use.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::hbone::{Handler, Server, ServerConfig};
use crate::identity::{CertificateAuthority, Identity, TrustBundle, WorkloadCert, LEAF_TTL};
use crate::metrics::Metrics;
use crate::tls::TlsIdentity;

/// A CA and its bundle, minting workloads of `cluster.local`.
pub struct TestMesh {
    /// The CA.
    pub ca: CertificateAuthority,
    /// A bundle holding just its root.
    pub bundle: TrustBundle,
}

impl Default for TestMesh {
    fn default() -> Self {
        Self::new()
    }
}

impl TestMesh {
    /// A fresh self-signed CA.
    pub fn new() -> Self {
        let ca = CertificateAuthority::self_signed("cluster.local").expect("create test CA");
        let bundle = TrustBundle::new(vec![ca.cert_der().clone()]).expect("test bundle");
        TestMesh { ca, bundle }
    }

    /// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
    pub fn identity(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).expect("valid test identity")
    }

    /// A leaf for `ns`/`sa`.
    pub fn cert(&self, ns: &str, sa: &str) -> WorkloadCert {
        self.ca
            .issue(&Self::identity(ns, sa), LEAF_TTL)
            .expect("issue test leaf")
    }

    /// Credentials for `ns`/`sa`, trusting this CA.
    pub fn workload(&self, ns: &str, sa: &str) -> Arc<TlsIdentity> {
        TlsIdentity::new(&self.cert(ns, sa), self.bundle.clone()).expect("test credentials")
    }
}

/// An HBONE server running on loopback.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its counters.
    pub metrics: Metrics,
    /// Cancel to drain it.
    pub drain: CancellationToken,
    /// The accept loop; finishes after a drain.
    pub task: JoinHandle<()>,
}

/// Starts an HBONE server for `tls` on `127.0.0.1:0` (or `addr`).
pub async fn start_server<H: Handler>(
    tls: &Arc<TlsIdentity>,
    config: ServerConfig,
    handler: Arc<H>,
    addr: Option<SocketAddr>,
) -> TestServer {
    let listener = TcpListener::bind(addr.unwrap_or_else(|| ([127, 0, 0, 1], 0).into()))
        .await
        .expect("bind test HBONE listener");
    let addr = listener.local_addr().expect("listener address");
    let metrics = Metrics::default();
    let server = Arc::new(Server::new(tls, config, metrics.clone()));
    let drain = CancellationToken::new();
    let task =
        tokio::spawn(server.serve(listener, handler, drain.clone(), Duration::from_millis(200)));
    TestServer {
        addr,
        metrics,
        drain,
        task,
    }
}

/// A TCP echo server on loopback: echoes until the client half-closes, then closes.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind echo listener");
    let addr = listener.local_addr().expect("listener address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// Deterministic bytes for payload checks: the same `seed` gives the same stream.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        // A cheap mix of position and seed; it only has to catch reordering and loss.
        let x = (offset + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
        *b = (x >> 29) as u8;
    }
}

/// The fuzz harness for CONNECT request checking, shared by the `cargo fuzz` target
/// (`tunnel/fuzz`) and the test that replays its committed corpus.
///
/// Input: up to three newline-separated fields — method, authority, `forwarded`
/// header value. Whatever the bytes, checking must not panic, and what it accepts must
/// be consistent.
pub fn fuzz_connect(data: &[u8]) {
    use crate::hbone::{forwarded_value, parse_authority, parse_connect, parse_forwarded_for};

    let mut fields = data.splitn(3, |b| *b == b'\n');
    let method = fields.next().unwrap_or_default();
    let authority = fields.next().unwrap_or_default();
    let forwarded = fields.next();

    if let Ok(text) = std::str::from_utf8(authority) {
        if let Ok(addr) = parse_authority(text) {
            assert_ne!(addr.port(), 0, "accepted port 0 in {text:?}");
        }
    }
    if let Some(Ok(text)) = forwarded.map(std::str::from_utf8) {
        if let Some(addr) = parse_forwarded_for(text) {
            // What we accept, we can also write and read back.
            assert_eq!(parse_forwarded_for(&forwarded_value(addr)), Some(addr));
        }
    }
    let (Ok(method), Ok(uri)) = (
        http::Method::from_bytes(method),
        http::Uri::try_from(authority),
    ) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    if let Some(Ok(v)) = forwarded.map(http::HeaderValue::from_bytes) {
        headers.insert(http::header::FORWARDED, v);
    }
    if let Ok(c) = parse_connect(&method, &uri, &headers) {
        assert_eq!(method, http::Method::CONNECT);
        assert_ne!(c.target.port(), 0);
        assert_eq!(
            c.forwarded_for.is_some(),
            headers.contains_key(http::header::FORWARDED)
        );
    }
}

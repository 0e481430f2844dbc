//! HBONE on loopback: payloads, pooling, rotation, key exchange and every refusal.
#![allow(clippy::unwrap_used)] // a test fails by panicking

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_tunnel::hbone::{
    ConnectError, ConnectRequest, Forward, H2Stream, Handler, InboundRequest, Pool, PoolConfig,
    ServerConfig,
};
use weft_tunnel::identity::{build_csr, CertificateAuthority, Identity, LEAF_TTL};
use weft_tunnel::metrics::{Metrics, INBOUND, OUTBOUND};
use weft_tunnel::testing::{echo_server, fill_pattern, start_server, TestMesh, TestServer};
use weft_tunnel::tls::{self, TlsIdentity};

fn request(
    src: &Arc<TlsIdentity>,
    dst: Identity,
    hbone: SocketAddr,
    target: SocketAddr,
) -> ConnectRequest {
    ConnectRequest {
        src: src.clone(),
        src_addr: None,
        socket: None,
        dst,
        dst_addr: hbone,
        target,
        forwarded_for: None,
        traceparent: None,
        on_behalf_of: None,
    }
}

fn pool() -> Pool {
    pool_with(PoolConfig::default())
}

fn pool_with(config: PoolConfig) -> Pool {
    Pool::new(config, Metrics::default())
}

/// Writes `len` pattern bytes, half-closes, and checks the echo byte for byte.
async fn echo_check(stream: H2Stream, len: u64, seed: u64) {
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(buf.len() as u64) as usize;
            fill_pattern(seed, off, &mut buf[..n]);
            w.write_all(&buf[..n]).await.expect("write payload");
            off += n as u64;
        }
        w.shutdown().await.expect("half-close");
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        let n = r.read(&mut buf).await.expect("read echo");
        if n == 0 {
            break;
        }
        fill_pattern(seed, off, &mut want[..n]);
        assert!(
            buf[..n] == want[..n],
            "echo differs within bytes {off}..{}",
            off + n as u64
        );
        off += n as u64;
    }
    assert_eq!(off, len, "echo length");
    writer.await.expect("writer task");
}

/// Forwards like `Forward`, remembering who connected with which leaf.
#[derive(Default)]
struct Recording {
    seen: Mutex<Vec<(Identity, CertificateDer<'static>)>>,
}

impl Handler for Recording {
    async fn handle(self: Arc<Self>, request: InboundRequest) {
        self.seen
            .lock()
            .unwrap()
            .push((request.peer.clone(), (*request.peer_leaf).clone()));
        Arc::new(Forward::default()).handle(request).await
    }
}

async fn forward_server(mesh: &TestMesh, config: ServerConfig) -> (Arc<TlsIdentity>, TestServer) {
    let tls = mesh.workload("shop", "cart");
    let server = start_server(&tls, config, Arc::new(Forward::default()), None).await;
    (tls, server)
}

#[tokio::test]
async fn payloads_round_trip_byte_exact() {
    let Fixture {
        server_tls,
        server,
        client,
        target,
        ..
    } = fixture(ServerConfig::default()).await;
    let pool = pool();
    for (seed, len) in [(1u64, 1u64), (2, 64 * 1024), (3, 256 * 1024 * 1024)] {
        let req = request(&client, server_tls.identity(), server.addr, target);
        let stream = pool.connect(&req).await.expect("open stream");
        echo_check(stream, len, seed).await;
    }
    // All three streams rode one pooled connection.
    assert_eq!(inbound_connections(&server), 1);
    assert_eq!(server.metrics.streams.get_or_create(&dir(INBOUND)).get(), 3);
}

fn dir(direction: &'static str) -> weft_tunnel::metrics::DirectionLabels {
    weft_tunnel::metrics::DirectionLabels { direction }
}

/// Inbound connections open now.
fn open_connections(server: &TestServer) -> i64 {
    server
        .metrics
        .connections_open
        .get_or_create(&dir(INBOUND))
        .get()
}

fn inbound_connections(server: &TestServer) -> u64 {
    server
        .metrics
        .connections
        .get_or_create(&dir(INBOUND))
        .get()
}

/// The usual cast: a CA, a forwarding server as shop/cart, a client as web/frontend,
/// and an echo target.
struct Fixture {
    mesh: TestMesh,
    server_tls: Arc<TlsIdentity>,
    server: TestServer,
    client: Arc<TlsIdentity>,
    target: SocketAddr,
}

async fn fixture(config: ServerConfig) -> Fixture {
    let mesh = TestMesh::new();
    let (server_tls, server) = forward_server(&mesh, config).await;
    let client = mesh.workload("web", "frontend");
    let target = echo_server().await;
    Fixture {
        mesh,
        server_tls,
        server,
        client,
        target,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_share_one_connection() {
    let Fixture {
        server_tls,
        server,
        client,
        target,
        ..
    } = fixture(ServerConfig::default()).await;
    let pool = Arc::new(pool());
    const N: usize = 1000;
    let all_open = Arc::new(tokio::sync::Barrier::new(N + 1));
    let mut tasks = Vec::new();
    for i in 0..N {
        let (pool, all_open) = (pool.clone(), all_open.clone());
        let req = request(&client, server_tls.identity(), server.addr, target);
        tasks.push(tokio::spawn(async move {
            let mut s = pool.connect(&req).await.expect("open stream");
            let msg = format!("stream {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
            // Hold the stream until all N are open at once.
            all_open.wait().await;
            s
        }));
    }
    all_open.wait().await;
    assert_eq!(
        server
            .metrics
            .streams_open
            .get_or_create(&dir(INBOUND))
            .get(),
        N as i64,
        "all streams open concurrently"
    );
    assert_eq!(pool.connections(), 1);
    assert_eq!(inbound_connections(&server), 1);
    for t in tasks {
        drop(t.await.unwrap());
    }
}

#[tokio::test]
async fn stream_limit_opens_another_connection() {
    let mesh = TestMesh::new();
    let config = ServerConfig {
        max_streams_per_connection: 10,
        ..ServerConfig::default()
    };
    let (server_tls, server) = forward_server(&mesh, config).await;
    let client = mesh.workload("web", "frontend");
    let target = echo_server().await;
    let pool = pool();
    let mut streams = Vec::new();
    for _ in 0..25 {
        let req = request(&client, server_tls.identity(), server.addr, target);
        let mut s = pool.connect(&req).await.expect("open stream");
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        streams.push(s);
    }
    assert_eq!(pool.connections(), 3, "25 streams at 10 per connection");
    assert_eq!(inbound_connections(&server), 3);
    // Freed slots are reused rather than dialling again.
    streams.truncate(5);
    for _ in 0..5 {
        let req = request(&client, server_tls.identity(), server.addr, target);
        streams.push(pool.connect(&req).await.expect("reuse slot"));
    }
    assert_eq!(inbound_connections(&server), 3);
}

#[tokio::test]
async fn dead_connection_is_replaced() {
    let Fixture {
        server_tls,
        server,
        client,
        target,
        ..
    } = fixture(ServerConfig::default()).await;
    let pool = pool();
    let req = request(&client, server_tls.identity(), server.addr, target);
    echo_check(pool.connect(&req).await.unwrap(), 10, 7).await;
    // Kill the server (drain with nothing open closes every connection), then serve
    // again on the same address.
    server.drain.cancel();
    server.task.await.unwrap();
    let again = start_server(
        &server_tls,
        ServerConfig::default(),
        Arc::new(Forward::default()),
        Some(server.addr),
    )
    .await;
    echo_check(
        pool.connect(&req).await.expect("stream after reconnect"),
        10,
        8,
    )
    .await;
    assert_eq!(inbound_connections(&again), 1);
}

#[tokio::test]
async fn identities_checked_on_both_sides() {
    let mesh = TestMesh::new();
    let server_tls = mesh.workload("shop", "cart");
    let handler = Arc::new(Recording::default());
    let server = start_server(&server_tls, ServerConfig::default(), handler.clone(), None).await;
    let client = mesh.workload("web", "frontend");
    let target = echo_server().await;
    let client_metrics = Metrics::default();
    let pool = Pool::new(PoolConfig::default(), client_metrics.clone());

    // The server learns the client's identity.
    let req = request(&client, server_tls.identity(), server.addr, target);
    echo_check(pool.connect(&req).await.unwrap(), 3, 1).await;
    assert_eq!(handler.seen.lock().unwrap()[0].0, client.identity());

    // The client refuses a server that proves another identity.
    let imposter = TestMesh::identity("shop", "payments");
    let req = request(&client, imposter.clone(), server.addr, target);
    let err = pool.connect(&req).await.expect_err("wrong server identity");
    let msg = err.to_string();
    assert!(matches!(err, ConnectError::Tls { .. }), "{err:?}");
    assert!(
        msg.ends_with(&format!(
            "peer is {}, expected {}",
            server_tls.identity(),
            imposter
        )),
        "error names expected and found identities: {msg}"
    );
    assert_eq!(client_metrics.refusals(OUTBOUND, "tls"), 1);
    wait_for(|| server.metrics.refusals(INBOUND, "peer_rejected_cert") == 1).await;
}

/// Polls a condition the server updates asynchronously; bounded, never a timing check.
async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 5 s");
}

type ClientCert = (
    Vec<CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
);

/// A TLS client config with an arbitrary client certificate (or none) that accepts any
/// server, for presenting bad credentials.
fn any_server_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    client_cert: Option<ClientCert>,
) -> rustls::ClientConfig {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            tls::provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match client_cert {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

async fn raw_tls_with(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(tls::server_name(addr.ip()), tcp)
        .await?;
    // TLS 1.3 client auth failures surface on the first read after the handshake; a
    // healthy HBONE server sends its HTTP/2 SETTINGS first.
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut b)).await {
        Ok(Ok(0)) => Err(std::io::ErrorKind::UnexpectedEof.into()),
        Ok(Err(e)) => Err(e),
        Ok(Ok(_)) => Ok(tls),
        Err(_) => panic!("server neither spoke nor closed"),
    }
}

async fn raw_tls(
    addr: SocketAddr,
    client_cert: Option<ClientCert>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    raw_tls_with(addr, any_server_config(tls::provider(), client_cert)).await
}

#[tokio::test]
async fn bad_peers_refused_without_disturbing_others() {
    let Fixture {
        mesh,
        server_tls,
        server,
        client,
        target,
    } = fixture(ServerConfig::default()).await;
    let pool = pool();
    let req = request(&client, server_tls.identity(), server.addr, target);
    let mut bystander = pool.connect(&req).await.unwrap();

    // Untrusted chain: a leaf from another CA.
    let other = TestMesh::new().cert("web", "frontend");
    assert!(raw_tls(server.addr, Some((other.chain, other.key)))
        .await
        .is_err());
    wait_for(|| server.metrics.refusals(INBOUND, "untrusted_chain") == 1).await;

    // Expired leaf from the right CA.
    let id = TestMesh::identity("web", "frontend");
    let csr = build_csr(&id).unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(2 * 86400);
    let chain = mesh
        .ca
        .sign_between(&csr.der, &id, past, past + Duration::from_secs(3600))
        .unwrap();
    let expired = csr.into_cert(id, chain).unwrap();
    assert!(raw_tls(server.addr, Some((expired.chain, expired.key)))
        .await
        .is_err());
    wait_for(|| server.metrics.refusals(INBOUND, "expired") == 1).await;

    // A SPIFFE ID of another trust domain, signed by our CA.
    let foreign_id = Identity::new("other.example", "web", "frontend").unwrap();
    let foreign = mesh
        .ca
        .issue(&foreign_id, Duration::from_secs(3600))
        .unwrap();
    assert!(raw_tls(server.addr, Some((foreign.chain, foreign.key)))
        .await
        .is_err());
    wait_for(|| server.metrics.refusals(INBOUND, "wrong_identity") == 1).await;

    // No client certificate.
    assert!(raw_tls(server.addr, None).await.is_err());
    wait_for(|| server.metrics.refusals(INBOUND, "no_client_cert") == 1).await;

    // Plaintext HTTP/1 on the HBONE port: closed, never answered in HTTP.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer"
    );
    wait_for(|| server.metrics.refusals(INBOUND, "not_tls") == 1).await;

    // The established stream was not disturbed.
    bystander.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    bystander.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
}

/// An mTLS + HTTP/2 client that can send any request, for malformed CONNECTs.
async fn raw_h2(
    client: &Arc<TlsIdentity>,
    expected: Identity,
    addr: SocketAddr,
) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.client_config(expected))
        .connect(tls::server_name(addr.ip()), tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

async fn status_of(send: &h2::client::SendRequest<Bytes>, req: http::Request<()>) -> u16 {
    let mut send = send.clone().ready().await.unwrap();
    let (resp, _body) = send.send_request(req, false).unwrap();
    resp.await.expect("a status, not a reset").status().as_u16()
}

#[tokio::test]
async fn malformed_connects_refused() {
    let Fixture {
        server_tls,
        server,
        client,
        target,
        ..
    } = fixture(ServerConfig::default()).await;
    let send = raw_h2(&client, server_tls.identity(), server.addr).await;
    let connect = |authority: &str| {
        http::Request::builder()
            .method("CONNECT")
            .uri(authority)
            .body(())
            .unwrap()
    };
    // Non-CONNECT method.
    let get = http::Request::builder()
        .method("GET")
        .uri(format!("http://{target}/"))
        .body(())
        .unwrap();
    assert_eq!(status_of(&send, get).await, 400);
    // Authority without a port, and a host name instead of an IP.
    assert_eq!(status_of(&send, connect("127.0.0.1")).await, 400);
    assert_eq!(status_of(&send, connect("localhost:8080")).await, 400);
    // An IP other than the one dialled.
    assert_eq!(status_of(&send, connect("10.244.9.9:8080")).await, 400);
    // One of the proxy's own ports.
    assert_eq!(status_of(&send, connect("127.0.0.1:15006")).await, 503);
    // Malformed forwarded header.
    let mut bad_fwd = connect(&target.to_string());
    bad_fwd
        .headers_mut()
        .insert("forwarded", "for=nonsense".parse().unwrap());
    assert_eq!(status_of(&send, bad_fwd).await, 400);
    // A header block over the limit: refused before it is handed to the handler.
    let mut oversized = connect(&target.to_string());
    for i in 0..40 {
        oversized.headers_mut().insert(
            http::HeaderName::try_from(format!("x-pad-{i}")).unwrap(),
            "x".repeat(500).parse().unwrap(),
        );
    }
    assert_eq!(status_of(&send, oversized).await, 431);
    // A well-formed CONNECT with forwarded and trace headers still works.
    let mut good = connect(&target.to_string());
    good.headers_mut()
        .insert("forwarded", "for=\"10.244.0.5:40000\"".parse().unwrap());
    good.headers_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    assert_eq!(status_of(&send, good).await, 200);

    let m = &server.metrics;
    assert_eq!(m.refusals(INBOUND, "bad_method"), 1);
    assert_eq!(m.refusals(INBOUND, "bad_authority"), 2);
    assert_eq!(m.refusals(INBOUND, "authority_mismatch"), 1);
    assert_eq!(m.refusals(INBOUND, "proxy_port"), 1);
    assert_eq!(m.refusals(INBOUND, "bad_forwarded"), 1);

    // An unreachable target is a prompt 503, not a hang.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let pool = pool();
    let req = request(&client, server_tls.identity(), server.addr, closed);
    let err = pool.connect(&req).await.expect_err("closed port");
    assert_eq!(err.status().map(|s| s.as_u16()), Some(503), "{err}");
    assert!(err.to_string().contains("unreachable"), "{err}");
    wait_for(|| m.refusals(INBOUND, "unreachable") == 1).await;

    // A trace context that is not a header value is the caller's error, not a panic,
    // and the connection's stream slot is given back.
    let mut bad = request(&client, server_tls.identity(), server.addr, target);
    bad.traceparent = Some("00-abc\r\nx-injected: 1".into());
    let err = pool.connect(&bad).await.expect_err("invalid header value");
    assert_eq!(err.reason(), "bad_request", "{err}");
    let ok = request(&client, server_tls.identity(), server.addr, target);
    echo_check(pool.connect(&ok).await.unwrap(), 100, 7).await;
}

#[tokio::test]
async fn rotation_keeps_streams_and_new_streams_use_new_leaf() {
    let mesh = TestMesh::new();
    let server_tls = mesh.workload("shop", "cart");
    let handler = Arc::new(Recording::default());
    let server = start_server(&server_tls, ServerConfig::default(), handler.clone(), None).await;
    let client = mesh.workload("web", "frontend");
    let target = echo_server().await;
    let pool = pool();
    let req = request(&client, server_tls.identity(), server.addr, target);
    let mut old_stream = pool.connect(&req).await.unwrap();
    old_stream.write_all(b"before").await.unwrap();
    let mut b = [0u8; 6];
    old_stream.read_exact(&mut b).await.unwrap();

    let new_client = mesh.cert("web", "frontend");
    let new_server = mesh.cert("shop", "cart");
    client.rotate(&new_client).unwrap();
    server_tls.rotate(&new_server).unwrap();

    // The stream opened before the rotation keeps working.
    old_stream.write_all(b"after!").await.unwrap();
    old_stream.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"after!");

    // A new stream goes over a new connection made with the new client leaf.
    echo_check(pool.connect(&req).await.unwrap(), 100, 9).await;
    let seen = handler.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_ne!(seen[0].1, seen[1].1, "second stream used a different leaf");
    assert_eq!(
        seen[1].1, new_client.chain[0],
        "second stream used the new leaf"
    );
    assert_eq!(inbound_connections(&server), 2);

    // And the server presents its new leaf to new handshakes.
    let fresh = raw_tls(
        server.addr,
        Some((new_client.chain.clone(), new_client.key.clone_key())),
    )
    .await
    .unwrap();
    let presented = fresh.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(presented, new_server.chain[0]);

    // Rotating to another identity's leaf is refused.
    let other = mesh.cert("web", "admin");
    assert!(client.rotate(&other).is_err());
}

#[tokio::test]
async fn post_quantum_key_exchange_preferred() {
    let mesh = TestMesh::new();
    let (server_tls, server) = forward_server(&mesh, ServerConfig::default()).await;
    let client = mesh.workload("web", "frontend");
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.client_config(server_tls.identity()))
        .connect(tls::server_name(server.addr.ip()), tcp)
        .await
        .unwrap();
    let conn = tls.get_ref().1;
    assert_eq!(
        tls::negotiated_group(conn),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));

    // A classical peer (X25519 only) still connects, over X25519.
    let mut classical = (*tls::provider()).clone();
    classical
        .kx_groups
        .retain(|g| g.name() == rustls::NamedGroup::X25519);
    let cert = mesh.cert("web", "frontend");
    let config = any_server_config(Arc::new(classical), Some((cert.chain, cert.key)));
    let fallback = raw_tls_with(server.addr, config).await.unwrap();
    let conn = fallback.get_ref().1;
    assert_eq!(
        tls::negotiated_group(conn),
        Some(rustls::NamedGroup::X25519)
    );
}

#[tokio::test]
async fn half_close_and_reset_propagate() {
    let mesh = TestMesh::new();
    let (server_tls, server) = forward_server(&mesh, ServerConfig::default()).await;
    let client = mesh.workload("web", "frontend");
    let pool = pool();

    // A target that reads to EOF, then answers and closes: only works if our
    // half-close reaches it while its answer can still come back.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let half_close_target = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes())
            .await
            .unwrap();
    });
    let mut s = pool
        .connect(&request(
            &client,
            server_tls.identity(),
            server.addr,
            half_close_target,
        ))
        .await
        .unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    assert_eq!(answer, "got 5 bytes");

    // A target that resets: the client sees a reset, not a clean end.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_target = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 1];
        s.read_exact(&mut buf).await.unwrap();
        #[allow(deprecated)] // linger 0 never blocks: it is how a test sends a RST
        s.set_linger(Some(Duration::ZERO)).unwrap();
        drop(s);
    });
    let mut s = pool
        .connect(&request(
            &client,
            server_tls.identity(),
            server.addr,
            reset_target,
        ))
        .await
        .unwrap();
    s.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let err = s
        .read(&mut buf)
        .await
        .expect_err("reset must surface as an error");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // A client reset ends the target's connection.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf).await.unwrap();
        let end = s.read(&mut buf).await;
        let _ = tx.send((n, end.map_err(|e| e.kind())));
    });
    let mut s = pool
        .connect(&request(
            &client,
            server_tls.identity(),
            server.addr,
            target,
        ))
        .await
        .unwrap();
    s.write_all(b"y").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.reset();
    let (n, end) = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 1);
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "target connection ended: {end:?}"
    );
}

#[tokio::test]
async fn bundle_with_two_roots_and_an_intermediate() {
    // Root rotation in progress: the client's leaf is from the old root, the server's
    // from an intermediate under the new root; both trust both roots.
    let old = TestMesh::new();
    let new_root = CertificateAuthority::self_signed("cluster.local").unwrap();
    let mid = new_root.new_intermediate("cluster.local").unwrap();
    let bundle = old.bundle.with(new_root.cert_der().clone()).unwrap();
    assert_eq!(bundle.roots().len(), 2);
    let server_id = TestMesh::identity("shop", "cart");
    let server_tls =
        TlsIdentity::new(&mid.issue(&server_id, LEAF_TTL).unwrap(), bundle.clone()).unwrap();
    let server = start_server(
        &server_tls,
        ServerConfig::default(),
        Arc::new(Forward::default()),
        None,
    )
    .await;
    let target = echo_server().await;
    let client = TlsIdentity::new(&old.cert("web", "frontend"), bundle.clone()).unwrap();
    let pool = pool();
    let stream = pool
        .connect(&request(&client, server_id.clone(), server.addr, target))
        .await
        .expect("both roots trusted");
    echo_check(stream, 1000, 4).await;

    // A client that still trusts only the old root refuses the new chain.
    let stale = TlsIdentity::new(&old.cert("web", "frontend"), old.bundle.clone()).unwrap();
    let err = pool
        .connect(&request(&stale, server_id, server.addr, target))
        .await
        .expect_err("new root not trusted yet");
    assert!(matches!(err, ConnectError::Tls { .. }), "{err}");
    // Both roots share a subject name, so webpki reports the old root's failed
    // signature check rather than an unknown issuer.
    assert!(
        err.to_string().contains("invalid peer certificate"),
        "{err}"
    );
}

/// Collects formatted log lines.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Single-threaded, so the test's thread-local subscriber sees the server's tasks.
#[tokio::test(flavor = "current_thread")]
async fn refusals_are_logged_with_their_reason() {
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mesh = TestMesh::new();
    let (server_tls, server) = forward_server(&mesh, ServerConfig::default()).await;
    let client = mesh.workload("web", "frontend");
    let send = raw_h2(&client, server_tls.identity(), server.addr).await;
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("10.244.9.9:8080")
        .body(())
        .unwrap();
    assert_eq!(status_of(&send, req).await, 400);
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _ = plain.read_to_end(&mut Vec::new()).await;
    wait_for(|| server.metrics.refusals(INBOUND, "not_tls") == 1).await;

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle:?} in:\n{text}"))
            .to_owned()
    };
    let refused = line("authority_mismatch");
    assert!(
        refused.contains("HBONE stream refused")
            && refused.contains("10.244.9.9:8080")
            && refused.contains(client.identity().as_str()),
        "names the peer, the authority and the reason: {refused}"
    );
    let not_tls = line("reason=\"not_tls\"");
    assert!(not_tls.contains("TLS handshake failed"), "{not_tls}");
}

#[tokio::test]
async fn idle_connections_close_and_leave_the_pool() {
    let Fixture {
        server_tls,
        server,
        client,
        target,
        ..
    } = fixture(ServerConfig::default()).await;
    let pool = pool_with(PoolConfig {
        idle_timeout: Duration::from_millis(100),
        ..PoolConfig::default()
    });
    let req = request(&client, server_tls.identity(), server.addr, target);
    let stream = pool.connect(&req).await.unwrap();
    // Busy connections stay, however long the stream lives.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(pool.connections(), 1);
    echo_check(stream, 10, 5).await;
    wait_for(|| pool.connections() == 0 && open_connections(&server) == 0).await;
    // The next stream simply dials again.
    echo_check(pool.connect(&req).await.unwrap(), 10, 6).await;
    assert_eq!(inbound_connections(&server), 2);
}

#[tokio::test]
async fn the_server_closes_connections_left_without_streams() {
    let Fixture {
        server_tls,
        server,
        client,
        target,
        ..
    } = fixture(ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await;
    // The pool would keep its connection for a minute: the server closes it first.
    let pool = pool();
    let req = request(&client, server_tls.identity(), server.addr, target);
    // A stream open across several idle periods keeps its connection.
    let stream = pool.connect(&req).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(open_connections(&server), 1);
    echo_check(stream, 10, 8).await;
    // Without streams it is closed within two periods, and the pool dials again.
    wait_for(|| open_connections(&server) == 0).await;
    echo_check(pool.connect(&req).await.unwrap(), 10, 9).await;
    assert_eq!(inbound_connections(&server), 2);
}

/// A server of `config`, and a connection to it from a peer of the mesh that has
/// finished TLS.
async fn mesh_peer(
    config: ServerConfig,
) -> (TestServer, tokio_rustls::client::TlsStream<TcpStream>) {
    let Fixture { mesh, server, .. } = fixture(config).await;
    let c = mesh.cert("web", "frontend");
    let tls = raw_tls(server.addr, Some((c.chain, c.key)))
        .await
        .expect("a peer of the mesh completes TLS");
    (server, tls)
}

/// Whether the server closes `tls` (within a bound that only keeps the test finite).
async fn closed_by_the_server(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test]
async fn a_peer_that_says_nothing_after_tls_is_cut_off() {
    let (server, mut tls) = mesh_peer(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    })
    .await;
    // No HTTP/2 preface follows: the server closes the connection.
    assert!(
        closed_by_the_server(&mut tls).await,
        "the server still holds the connection"
    );
    wait_for(|| server.metrics.refusals(INBOUND, "timeout") == 1).await;
}

#[tokio::test]
async fn a_peer_that_does_not_let_an_idle_connection_close_is_cut_off() {
    let (server, mut tls) = mesh_peer(ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await;
    // The preface and SETTINGS, then nothing: no stream, and no answer to the PING
    // that comes with the server's GOAWAY.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert!(
        closed_by_the_server(&mut tls).await,
        "the server still holds the connection"
    );
    wait_for(|| open_connections(&server) == 0).await;
}

/// Runs `test` on a thread in a network namespace of its own, whose loopback the test
/// may cut (root). Commands the test runs are forked from that thread, so they act on
/// the same namespace.
fn in_own_netns<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F + Send + 'static) {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("a network namespace of its own (needs root)");
        run(&["ip", "link", "set", "lo", "up"]);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test());
    })
    .join()
    .expect("the test thread");
}

fn run(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run");
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// From now on, every packet to or from `port` in this namespace is lost.
fn cut(port: u16) {
    run(&[
        "nft",
        &format!(
            "add table inet cut; add chain inet cut out {{ type filter hook output priority 0; }}; \
             add rule inet cut out tcp dport {port} drop; add rule inet cut out tcp sport {port} drop"
        ),
    ]);
}

/// A peer that goes silent without a word (its node powered off, a partition): both
/// ends give the connection up once `peer_silence` has passed.
#[test]
#[ignore = "needs root"]
fn a_silent_peer_is_given_up_at_both_ends() {
    in_own_netns(|| async {
        let silence = Duration::from_secs(3);
        let Fixture {
            server_tls,
            server,
            client,
            target,
            ..
        } = fixture(ServerConfig {
            peer_silence: silence,
            ..ServerConfig::default()
        })
        .await;
        let pool = pool_with(PoolConfig {
            peer_silence: silence,
            ..PoolConfig::default()
        });
        let req = request(&client, server_tls.identity(), server.addr, target);
        let mut stream = pool.connect(&req).await.unwrap();
        stream.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        stream.read_exact(&mut b).await.unwrap();
        assert_eq!(pool.connections(), 1);
        cut(server.addr.port());
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut b)).await;
        assert!(
            matches!(read, Ok(Err(_)) | Ok(Ok(0))),
            "the client's stream ends instead of waiting for good: {read:?}"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while (pool.connections() > 0 || open_connections(&server) > 0)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(pool.connections(), 0, "the pool lets the connection go");
        assert_eq!(open_connections(&server), 0, "and so does the server");
    });
}

/// A CONNECT left unanswered: the next stream does not go on that connection.
#[test]
#[ignore = "needs root"]
fn a_connection_that_leaves_a_connect_unanswered_takes_no_more_streams() {
    in_own_netns(|| async {
        let Fixture {
            server_tls,
            server,
            client,
            target,
            ..
        } = fixture(ServerConfig::default()).await;
        let pool = pool_with(PoolConfig {
            response_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
            ..PoolConfig::default()
        });
        let req = request(&client, server_tls.identity(), server.addr, target);
        echo_check(pool.connect(&req).await.unwrap(), 10, 12).await;
        assert_eq!(pool.connections(), 1);
        cut(server.addr.port());
        let err = pool.connect(&req).await.expect_err("no answer");
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
        assert_eq!(pool.connections(), 0, "the connection left the pool");
        // The next stream dials a fresh connection (which the cut stops too).
        let err = pool.connect(&req).await.expect_err("no answer");
        assert!(err.before_stream(), "a new connection was dialled: {err}");
    });
}

/// A destination that swallows SYNs: the streams waiting for the one dial to it fail
/// with it, rather than each dialling in turn after the one before timed out.
#[test]
#[ignore = "needs root"]
fn streams_waiting_for_a_dial_that_fails_fail_with_it() {
    in_own_netns(|| async {
        let Fixture {
            server_tls,
            server,
            client,
            target,
            ..
        } = fixture(ServerConfig::default()).await;
        let pool = Arc::new(pool_with(PoolConfig {
            connect_timeout: Duration::from_secs(2),
            ..PoolConfig::default()
        }));
        cut(server.addr.port());
        let streams: Vec<_> = (0..5)
            .map(|_| {
                let (pool, req) = (
                    pool.clone(),
                    request(&client, server_tls.identity(), server.addr, target),
                );
                tokio::spawn(async move { pool.connect(&req).await.map(drop) })
            })
            .collect();
        let mut dialled = 0;
        for s in streams {
            let err = s.await.unwrap().expect_err("nothing answers");
            assert!(err.before_stream(), "another endpoint may be tried: {err}");
            assert_eq!(err.reason(), "timeout", "{err}");
            if matches!(err, ConnectError::Timeout { .. }) {
                dialled += 1;
            } else {
                assert!(
                    err.to_string().contains("TCP connect"),
                    "names the dial's failure: {err}"
                );
            }
        }
        assert_eq!(dialled, 1, "one dial for the five streams");
        assert_eq!(pool.dialling(), 0, "and nothing of it is kept");
    });
}

#[tokio::test]
async fn a_copy_cut_from_outside_resets_both_sides() {
    // A policy that no longer allows the connection, or a drain's grace run out, drops
    // the copy: the application and the stream's far end see a cut, not an end.
    let (mut app, proxy, req, server) = app_spoke_first(b"ping", false).await;
    let pool = pool();
    let (stream, _) = pool.connect_sending(&req, &proxy).await.unwrap();
    let (cut, cancelled) = tokio::sync::oneshot::channel::<()>();
    let copy = tokio::spawn(async move {
        tokio::select! {
            _ = stream.copy_bidirectional(proxy) => {}
            _ = cancelled => {}
        }
    });
    let mut b = [0u8; 4];
    app.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
    cut.send(()).unwrap();
    copy.await.unwrap();
    let read = app.read(&mut b).await;
    assert!(
        read.is_err(),
        "the application sees a reset, not an end: {read:?}"
    );
    // The server reads its stream until the end: a reset fails that read.
    let ended = server.await;
    assert!(
        ended.is_err(),
        "the far end's stream was reset, not ended: {ended:?}"
    );
}

#[tokio::test]
async fn drain_lets_open_streams_finish_then_forces_close() {
    let Fixture {
        server_tls,
        server,
        client,
        target,
        ..
    } = fixture(ServerConfig::default()).await;
    let pool = pool();
    let req = request(&client, server_tls.identity(), server.addr, target);
    let mut open = pool.connect(&req).await.unwrap();

    server.drain.cancel();
    // The open stream keeps working during the grace period...
    open.write_all(b"draining").await.unwrap();
    let mut b = [0u8; 8];
    open.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"draining");
    // ...while new streams are turned away (GOAWAY, then the listener is gone).
    let err = pool.connect(&req).await.expect_err("draining server");
    assert!(matches!(err, ConnectError::Tcp { .. }), "{err}");

    // After the grace period (200 ms in the test server) the rest is closed.
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("server finished after its grace period")
        .unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
        .await
        .expect("the forced close ends the stream");
    assert!(
        end.is_err() || rest.is_empty(),
        "stream was closed: {end:?}"
    );
}

/// A bare HBONE server for early-data tests: on each connection it accepts one CONNECT
/// and reads `before` bytes of its body *before* answering. On the first connection it
/// hangs up instead of answering when `hang_up_first`; otherwise it answers 200 and
/// echoes what it read and everything after, until the client ends the stream. Yields
/// what each connection read before answering.
async fn reading_server(
    tls: Arc<TlsIdentity>,
    before: usize,
    hang_up_first: bool,
) -> (SocketAddr, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        for n in 0..1 + usize::from(hang_up_first) {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(tls.server_config())
                .accept(tcp)
                .await
                .unwrap();
            let mut conn = h2::server::handshake(tls).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            // Keep the connection's frames moving while this stream is read.
            let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
            let mut body = req.into_body();
            let mut read = Vec::new();
            while read.len() < before {
                let data = body.data().await.expect("body ended early").unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                read.extend_from_slice(&data);
            }
            seen.push(read.clone());
            if hang_up_first && n == 0 {
                driver.abort();
                continue;
            }
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from(read), false).unwrap();
            while let Some(data) = body.data().await {
                let data = data.unwrap();
                let _ = body.flow_control().release_capacity(data.len());
                send.send_data(data, false).unwrap();
            }
            // The detached driver flushes the end and lives as long as the client
            // keeps the connection.
            send.send_data(Bytes::new(), true).unwrap();
        }
        seen
    });
    (addr, task)
}

/// A connected pair on loopback: (the application's end, the proxy's end).
async fn app_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (proxy, _) = listener.accept().await.unwrap();
    (app, proxy)
}

type Relay = tokio::task::JoinHandle<std::io::Result<(u64, u64)>>;
type Seen = tokio::task::JoinHandle<Vec<Vec<u8>>>;

/// The application writes "hello", then a stream is opened for it to a
/// [`reading_server`] that answers only once it has those 5 bytes: without early data
/// both sides would wait for each other. Returns the application's end, the relay
/// The application has written `hello` before a stream is opened for it to a
/// [`reading_server`] that reads as many bytes before it answers (and hangs up first when
/// `hang_up_first`). Returns the application's end, the proxy's end, the request and the
/// server.
async fn app_spoke_first(
    hello: &[u8],
    hang_up_first: bool,
) -> (TcpStream, TcpStream, ConnectRequest, Seen) {
    let mesh = TestMesh::new();
    let server_tls = mesh.workload("shop", "cart");
    let client = mesh.workload("web", "frontend");
    let (addr, server) = reading_server(server_tls.clone(), hello.len(), hang_up_first).await;
    let (mut app, proxy) = app_pair().await;
    app.write_all(hello).await.unwrap();
    let req = request(&client, server_tls.identity(), addr, addr);
    (app, proxy, req, server)
}

/// between it and the stream, and the server.
async fn hello_before_the_answer() -> (TcpStream, Relay, Seen) {
    let (app, proxy, req, server) = app_spoke_first(b"hello", false).await;
    let (stream, early) = tokio::time::timeout(
        Duration::from_secs(10),
        pool().connect_sending(&req, &proxy),
    )
    .await
    .expect("the CONNECT was answered")
    .unwrap();
    assert_eq!(early, 5, "bytes forwarded before the answer");
    (app, tokio::spawn(stream.copy_bidirectional(proxy)), server)
}

#[tokio::test]
async fn bytes_sent_before_the_answer_are_forwarded_at_once() {
    let (mut app, relay, server) = hello_before_the_answer().await;
    app.write_all(b" world").await.unwrap();
    app.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    app.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"hello world", "each byte once, in order");
    assert_eq!(relay.await.unwrap().unwrap(), (6, 11));
    assert_eq!(server.await.unwrap(), vec![b"hello".to_vec()]);
}

#[tokio::test]
async fn early_data_is_bounded_and_the_rest_follows_in_order() {
    let mesh = TestMesh::new();
    let server_tls = mesh.workload("shop", "cart");
    let client = mesh.workload("web", "frontend");
    let (addr, server) = reading_server(server_tls.clone(), 1, false).await;
    let (app, proxy) = app_pair().await;
    let (mut app_rd, mut app_wr) = app.into_split();
    // Far more than the bound, written before and while the CONNECT is in flight.
    const LEN: u64 = 1024 * 1024;
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; LEN as usize];
        fill_pattern(11, 0, &mut buf);
        app_wr.write_all(&buf).await.unwrap();
        app_wr.shutdown().await.unwrap();
    });
    // Let the application's bytes pile up in the socket first.
    wait_for(|| {
        let mut b = [0u8; 1];
        std::net::TcpStream::from(proxy_peek_dup(&proxy))
            .peek(&mut b)
            .is_ok_and(|n| n == 1)
    })
    .await;
    let req = request(&client, server_tls.identity(), addr, addr);
    let pool = pool();
    let (stream, early) = pool.connect_sending(&req, &proxy).await.unwrap();
    assert!(
        early as usize <= weft_tunnel::hbone::EARLY_DATA_MAX,
        "{early} bytes forwarded before the answer"
    );
    assert!(early >= 1);
    let relay = tokio::spawn(stream.copy_bidirectional(proxy));
    let mut echoed = Vec::new();
    app_rd.read_to_end(&mut echoed).await.unwrap();
    let mut want = vec![0u8; LEN as usize];
    fill_pattern(11, 0, &mut want);
    assert_eq!(echoed.len(), want.len());
    assert!(echoed == want, "the echo differs from what was sent");
    writer.await.unwrap();
    let (up, down) = relay.await.unwrap().unwrap();
    assert_eq!((up + early, down), (LEN, LEN));
    server.await.unwrap();
}

/// A blocking handle on the same socket, only for peeking.
fn proxy_peek_dup(s: &TcpStream) -> std::os::fd::OwnedFd {
    use std::os::fd::AsFd;
    s.as_fd().try_clone_to_owned().unwrap()
}

#[tokio::test]
async fn early_data_is_never_sent_twice() {
    // The first connection takes the CONNECT and its bytes, then hangs up unanswered.
    // The server may have passed them on to its application: opening the stream again
    // elsewhere would deliver them twice, so the stream fails instead.
    let (_app, proxy, req, server) = app_spoke_first(b"hello", true).await;
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        pool().connect_sending(&req, &proxy),
    )
    .await
    .expect("the CONNECT fails without waiting for its answer");
    let err = failed.expect_err("the connection died with the bytes in flight");
    assert!(
        !err.before_stream(),
        "no other endpoint may be tried: {err}"
    );
    server.abort();
    let seen = server.await;
    assert!(
        seen.is_err_and(|e| e.is_cancelled()),
        "the server still waited for a second connection: it saw the bytes once"
    );
}

//! The controller's TLS: a serving certificate for its service names, signed by the
//! mesh root (which node-proxies are given to trust it) and renewed in place at half
//! its life, so a long-running controller never serves an expired certificate.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::Stream;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ca::Ca;

/// How long a serving certificate lives.
const SERVING_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once (handshaking or served): one per node-proxy and waypoint,
/// with room to spare. Past it the controller accepts no more until one closes; new
/// ones wait in the listen backlog, so no one can exhaust its memory or descriptors
/// with connections, authenticated or not.
pub const MAX_CONNECTIONS: usize = 16_384;

#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The serving certificate and the acceptor using it.
#[derive(Clone)]
pub struct ServingTls {
    ca: Arc<Ca>,
    names: Vec<String>,
    resolver: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
}

fn certified(ca: &Ca, names: &[String]) -> anyhow::Result<Arc<CertifiedKey>> {
    let (chain, key) = ca.serving_cert(names, SERVING_TTL)?;
    let key = CertifiedKey::from_der(chain, key, &tunnel::tls::provider())?;
    Ok(Arc::new(key))
}

impl ServingTls {
    /// A certificate for `names` (DNS names or IP addresses).
    pub fn new(ca: Arc<Ca>, names: Vec<String>) -> anyhow::Result<Self> {
        let resolver = Arc::new(Resolver(ArcSwap::new(certified(&ca, &names)?)));
        let mut config = rustls::ServerConfig::builder_with_provider(tunnel::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ServingTls {
            ca,
            names,
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Renews the certificate at half its life, and at once when the CA is read again
    /// (the chain it sends names the CA), until `shutdown`.
    pub async fn renew(self, shutdown: CancellationToken) {
        let mut reloads = self.ca.reloads();
        loop {
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SERVING_TTL / 2) => "renewed",
                changed = reloads.changed() => match changed {
                    Ok(()) => "issued again by the CA just read",
                    Err(_) => return,
                },
            };
            match certified(&self.ca, &self.names) {
                Ok(key) => {
                    self.resolver.0.store(key);
                    info!("serving certificate {why}");
                }
                Err(e) => {
                    warn!("cannot renew the serving certificate, keeping the current one: {e}")
                }
            }
        }
    }

    /// TLS connections accepted on `listener`, at most `max_connections` open at once;
    /// handshakes run concurrently, so a slow client does not hold up the next.
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
        max_connections: usize,
    ) -> impl Stream<Item = Result<Counted<TlsStream<TcpStream>>, std::io::Error>> + use<> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        let limit = Arc::new(Semaphore::new(max_connections));
        tokio::spawn(async move {
            loop {
                let permit = match limit.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        warn!("{max_connections} connections open; accepting no more until one closes");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            permit = limit.clone().acquire_owned() => match permit {
                                Ok(permit) => permit,
                                Err(_) => return,
                            },
                        }
                    }
                };
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = tunnel::net::accept(&listener, "controller") => accepted,
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx
                                .send(Ok(Counted {
                                    io: tls,
                                    _permit: permit,
                                }))
                                .await;
                        }
                        Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A connection that holds its place under the limit of [`ServingTls::incoming`] until
/// it is dropped; reads and writes go straight through.
pub struct Counted<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Counted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tunnel::identity::CertificateAuthority;

    /// A TLS client of the controller's serving certificate.
    async fn client(
        ca: &Ca,
        addr: std::net::SocketAddr,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in ca.bundle() {
            roots.add(cert.clone()).expect("root");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(tunnel::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name"),
                tcp,
            )
            .await
            .expect("handshake")
    }

    /// A CA read again is in the chain the controller serves from then on, so the
    /// controller's own certificate does not end with the CA it replaced.
    #[tokio::test]
    async fn the_serving_certificate_follows_a_reloaded_ca() {
        let dir = std::env::temp_dir().join(format!("weft-tls-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        let root = CertificateAuthority::self_signed("cluster.local").expect("root");
        let write = |int: &CertificateAuthority| {
            std::fs::write(&cert, int.cert_pem() + &root.cert_pem()).expect("write");
            std::fs::write(&key, int.key_pem()).expect("write");
        };
        let first = root
            .new_intermediate("cluster.local")
            .expect("intermediate");
        write(&first);
        let ca = Arc::new(
            Ca::from_files(
                &cert,
                &key,
                None,
                "cluster.local",
                Duration::from_secs(3600),
            )
            .expect("CA"),
        );
        let tls = ServingTls::new(ca.clone(), vec!["127.0.0.1".into()]).expect("serving TLS");
        let shutdown = CancellationToken::new();
        tokio::spawn(tls.clone().renew(shutdown.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = Box::pin(tls.incoming(listener, shutdown.clone(), 8));
        // Served and closed: the test only reads the chain of each handshake.
        tokio::spawn(async move { while let Some(Ok(_)) = incoming.next().await {} });
        let intermediate = |ca: Arc<Ca>| async move {
            let c = tokio::time::timeout(Duration::from_secs(10), client(&ca, addr))
                .await
                .expect("a handshake within 10 s");
            c.get_ref().1.peer_certificates().expect("a chain")[1].clone()
        };
        assert_eq!(&intermediate(ca.clone()).await, first.cert_der());
        let renewed = root
            .new_intermediate("cluster.local")
            .expect("intermediate");
        write(&renewed);
        assert!(ca.reload().expect("read").is_some());
        let mut served = None;
        for _ in 0..100 {
            served = Some(intermediate(ca.clone()).await);
            if served.as_ref() == Some(renewed.cert_der()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            served.as_ref(),
            Some(renewed.cert_der()),
            "served by the renewed CA"
        );
        shutdown.cancel();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_until_one_closes() {
        let authority = CertificateAuthority::self_signed("cluster.local").expect("CA");
        let ca = Arc::new(Ca::new(
            authority,
            Vec::new(),
            "cluster.local",
            Duration::from_secs(3600),
        ));
        let tls = ServingTls::new(ca.clone(), vec!["127.0.0.1".into()]).expect("serving TLS");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let mut incoming = Box::pin(tls.incoming(listener, shutdown.clone(), 2));
        let _a = client(&ca, addr).await;
        let _b = client(&ca, addr).await;
        let first = incoming.next().await.expect("first").expect("tls");
        let _second = incoming.next().await.expect("second").expect("tls");
        // The third connects (the kernel's backlog), but is not accepted while two are open.
        let third = tokio::spawn(async move { client(&ca, addr).await });
        let waited = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(
            waited.is_err(),
            "a third connection was served past the limit"
        );
        drop(first);
        let served = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(
            matches!(served, Ok(Some(Ok(_)))),
            "the third is served once one closes"
        );
        let _c = third.await.expect("client");
        shutdown.cancel();
    }
}

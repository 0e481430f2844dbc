//! The controller's TLS: a serving certificate for its service names, signed by the
//! mesh root (which node-proxies are given to trust it) and renewed in place at half
//! its life, so a long-running controller never serves an expired certificate.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::Stream;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ca::Ca;

/// How long a serving certificate lives.
const SERVING_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// A handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

    /// Renews the certificate at half its life until `shutdown`.
    pub async fn renew(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SERVING_TTL / 2) => {}
            }
            match certified(&self.ca, &self.names) {
                Ok(key) => {
                    self.resolver.0.store(key);
                    info!("serving certificate renewed");
                }
                Err(e) => {
                    warn!("cannot renew the serving certificate, keeping the current one: {e}")
                }
            }
        }
    }

    /// TLS connections accepted on `listener`; handshakes run concurrently, so a slow
    /// client does not hold up the next.
    pub fn incoming(
        &self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + use<> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = self.acceptor.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = tunnel::net::accept(&listener, "controller") => accepted,
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
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

//! Mutual TLS between workloads: rustls with aws-lc-rs, TLS 1.3 only, X25519MLKEM768
//! preferred with X25519 fallback, SPIFFE identities checked on both sides.
//!
//! A [`TlsIdentity`] holds one workload's certificate and the trust bundle behind an
//! `ArcSwap`: rotation swaps them for the next handshake while established
//! connections keep the keys they negotiated.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, ResolvesClientCert, Resumption};
use rustls::crypto::{aws_lc_rs, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    NamedGroup, OtherError, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::{identity_of_leaf, Identity, TrustBundle, WorkloadCert};

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors loading or rotating credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The private key could not be loaded or does not match the leaf.
    #[error("workload key for {identity} is unusable: {source}")]
    Key {
        /// Whose key.
        identity: Identity,
        /// What rustls said.
        source: rustls::Error,
    },
    /// A rotation tried to replace a certificate with one of another identity.
    #[error("cannot rotate the certificate of {current} to one for {new}: identities differ")]
    IdentityChanged {
        /// The identity this holder serves.
        current: Identity,
        /// The identity of the rejected certificate.
        new: Identity,
    },
}

/// A peer presented a valid chain for the wrong identity.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    /// Client side: the server is not the workload we meant to reach.
    #[error("peer is {found}, expected {expected}")]
    Unexpected {
        /// Whom we dialled.
        expected: Identity,
        /// Who answered.
        found: Identity,
    },
    /// Server side: the client's identity belongs to another trust domain.
    #[error("peer identity {found} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// Ours.
        trust_domain: String,
        /// The client's.
        found: Identity,
    },
    /// The leaf carries no SPIFFE ID, or more than one.
    #[error("peer certificate has no usable SPIFFE identity: {0}")]
    Missing(String),
}

/// The crypto provider every Weft endpoint uses: aws-lc-rs, TLS 1.3 suites only,
/// key exchange X25519MLKEM768 first, X25519 as the fallback for classical peers.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let base = aws_lc_rs::default_provider();
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
                ],
                kx_groups: vec![
                    aws_lc_rs::kx_group::X25519MLKEM768,
                    aws_lc_rs::kx_group::X25519,
                ],
                ..base
            })
        })
        .clone()
}

fn sig_algs() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// The key exchange group a finished handshake used, e.g. `X25519MLKEM768`.
pub fn negotiated_group(conn: &CommonState) -> Option<NamedGroup> {
    conn.negotiated_key_exchange_group().map(|g| g.name())
}

/// One set of credentials: what a handshake started now presents and trusts.
struct Credentials {
    identity: Identity,
    key: Arc<CertifiedKey>,
    bundle: TrustBundle,
    generation: u64,
}

/// A workload's swappable certificate and trust bundle.
pub struct TlsIdentity {
    current: ArcSwap<Credentials>,
}

/// Generations are unique across all holders, so a connection made with one holder's
/// credentials is never mistaken for another's, even for the same identity.
fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.current.load();
        write!(
            f,
            "TlsIdentity({}, generation {})",
            c.identity, c.generation
        )
    }
}

fn certified_key(cert: &WorkloadCert) -> Result<Arc<CertifiedKey>, TlsError> {
    CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &provider())
        .map(Arc::new)
        .map_err(|source| TlsError::Key {
            identity: cert.identity.clone(),
            source,
        })
}

impl TlsIdentity {
    /// Credentials for `cert`, trusting `bundle`.
    pub fn new(cert: &WorkloadCert, bundle: TrustBundle) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(TlsIdentity {
            current: ArcSwap::from_pointee(Credentials {
                identity: cert.identity.clone(),
                key: certified_key(cert)?,
                bundle,
                generation: next_generation(),
            }),
        }))
    }

    /// The identity these credentials prove.
    pub fn identity(&self) -> Identity {
        self.current.load().identity.clone()
    }

    /// Changes on every rotation (unique across holders); connections made under
    /// another generation are not given new streams.
    pub fn generation(&self) -> u64 {
        self.current.load().generation
    }

    /// Replaces the leaf (same identity) for every later handshake.
    pub fn rotate(&self, cert: &WorkloadCert) -> Result<(), TlsError> {
        let key = certified_key(cert)?;
        let old = self.current.load();
        if cert.identity != old.identity {
            return Err(TlsError::IdentityChanged {
                current: old.identity.clone(),
                new: cert.identity.clone(),
            });
        }
        self.swap(key, old.bundle.clone());
        Ok(())
    }

    /// Replaces the trust bundle (root rotation) for every later handshake.
    pub fn set_bundle(&self, bundle: TrustBundle) {
        let key = self.current.load().key.clone();
        self.swap(key, bundle);
    }

    fn swap(&self, key: Arc<CertifiedKey>, bundle: TrustBundle) {
        let generation = next_generation();
        let identity = self.current.load().identity.clone();
        self.current.store(Arc::new(Credentials {
            identity,
            key,
            bundle,
            generation,
        }));
    }

    /// A server config presenting these credentials and requiring a client certificate
    /// of the same trust domain. Build it once per listener; rotation needs no rebuild.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the provider supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier(self.clone())))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        // HBONE peers never resume: every connection proves its identity afresh.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Arc::new(config)
    }

    /// A client config presenting these credentials and accepting only a server that
    /// proves `expected`.
    pub fn client_config(self: &Arc<Self>, expected: Identity) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                tls: self.clone(),
                expected,
            }))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.resumption = Resumption::disabled();
        config.enable_sni = false;
        Arc::new(config)
    }
}

/// The server name handed to rustls. With SNI off it is never sent; the
/// verifier checks the SPIFFE ID instead of a DNS name.
pub fn server_name(addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

/// The identity of the peer of a finished handshake.
pub fn peer_identity(conn: &CommonState) -> Result<Identity, PeerIdentityError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| PeerIdentityError::Missing("no certificate presented".into()))?;
    identity_of_leaf(leaf).map_err(|e| PeerIdentityError::Missing(e.to_string()))
}

/// A readable cause for a failed handshake: the identity mismatch in words when that is
/// what failed, otherwise what rustls said.
pub fn describe_handshake_error(e: &std::io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = tls {
        if let Some(id) = inner.downcast_ref::<PeerIdentityError>() {
            return id.to_string();
        }
    }
    tls.to_string()
}

fn identity_error(e: PeerIdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

#[derive(Debug)]
struct Resolver(Arc<TlsIdentity>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side: the server's chain must lead to the bundle and its SPIFFE ID must be the
/// destination workload's.
#[derive(Debug)]
struct SpiffeServerVerifier {
    tls: Arc<TlsIdentity>,
    expected: Identity,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let creds = self.tls.current.load();
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            creds.bundle.store(),
            intermediates,
            now,
            sig_algs().all,
        )?;
        let found = identity_of_leaf(end_entity)
            .map_err(|e| identity_error(PeerIdentityError::Missing(e.to_string())))?;
        if found != self.expected {
            return Err(identity_error(PeerIdentityError::Unexpected {
                expected: self.expected.clone(),
                found,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only, so a TLS 1.2 signature is a protocol error.
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &sig_algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        sig_algs().supported_schemes()
    }
}

/// Server side: the client must present a chain leading to the bundle, with a SPIFFE
/// ID of our trust domain. Which identities may do what is authorization's job.
#[derive(Debug)]
struct SpiffeClientVerifier(Arc<TlsIdentity>);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every client holds exactly one certificate of the mesh.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let creds = self.0.current.load();
        creds
            .bundle
            .client_verifier()
            .verify_client_cert(end_entity, intermediates, now)?;
        let found = identity_of_leaf(end_entity)
            .map_err(|e| identity_error(PeerIdentityError::Missing(e.to_string())))?;
        if found.trust_domain() != creds.identity.trust_domain() {
            return Err(identity_error(PeerIdentityError::ForeignTrustDomain {
                trust_domain: creds.identity.trust_domain().to_owned(),
                found,
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &sig_algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        sig_algs().supported_schemes()
    }
}

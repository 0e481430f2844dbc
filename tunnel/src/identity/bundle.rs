//! The set of roots a peer's chain must lead to. More than one root is normal while a
//! root is being rotated: leaves of the old and the new root are both accepted.

use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::ca::pem_encode;

/// Why a trust bundle could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrustBundleError {
    /// The PEM text held no certificate.
    #[error("trust bundle has no certificate")]
    Empty,
    /// A block could not be read as PEM.
    #[error("trust bundle is not valid PEM: {0}")]
    Pem(String),
    /// A certificate is not usable as a trust anchor.
    #[error("trust bundle certificate #{index} is not a usable trust anchor: {reason}")]
    Anchor {
        /// Zero-based position in the bundle.
        index: usize,
        /// What webpki said.
        reason: String,
    },
}

/// Trusted roots, with the verifier state derived from them built once.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustBundle({} roots)", self.roots.len())
    }
}

impl TrustBundle {
    /// A bundle of the given DER roots.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, TrustBundleError> {
        if roots.is_empty() {
            return Err(TrustBundleError::Empty);
        }
        let mut store = RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            store
                .add(root.clone())
                .map_err(|e| TrustBundleError::Anchor {
                    index,
                    reason: e.to_string(),
                })?;
        }
        let store = Arc::new(store);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(store.clone(), crate::tls::provider())
                .build()
                .map_err(|e| TrustBundleError::Anchor {
                    index: 0,
                    reason: e.to_string(),
                })?;
        Ok(TrustBundle {
            roots,
            store,
            client_verifier,
        })
    }

    /// A bundle of every CERTIFICATE block in `pem`.
    pub fn from_pem(pem: &str) -> Result<Self, TrustBundleError> {
        let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TrustBundleError::Pem(e.to_string()))?;
        Self::new(roots)
    }

    /// This bundle plus `root` (the new root during a rotation).
    pub fn with(&self, root: CertificateDer<'static>) -> Result<Self, TrustBundleError> {
        let mut roots = self.roots.clone();
        roots.push(root);
        Self::new(roots)
    }

    /// The roots, in order.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as concatenated PEM.
    pub fn to_pem(&self) -> String {
        self.roots
            .iter()
            .map(|r| pem_encode("CERTIFICATE", r))
            .collect()
    }

    pub(crate) fn store(&self) -> &RootCertStore {
        &self.store
    }

    pub(crate) fn client_verifier(&self) -> &Arc<dyn ClientCertVerifier> {
        &self.client_verifier
    }
}

//! The mesh CA: the root (created on first start and persisted, or provided by the
//! operator), leaves signed from node-proxies' CSRs, and the controller's own serving
//! certificate. Leaves are never written anywhere. An operator-provided CA is read
//! again from its files when they change ([`Ca::reload`]), so a renewed intermediate is
//! used before the old one expires.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use tracing::info;
use tunnel::identity::{CaError, CertificateAuthority, Identity};

/// Why the CA could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaSetupError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate or key is unusable.
    #[error("{path}: {source}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Why.
        source: CaError,
    },
    /// The root directory holds a certificate without its key, or the reverse.
    #[error("{dir} holds {present} but not {missing}; restore the missing file or remove both to create a new root (every workload certificate will then be reissued)")]
    HalfRoot {
        /// The directory.
        dir: PathBuf,
        /// The file present.
        present: &'static str,
        /// The file missing.
        missing: &'static str,
    },
    /// No root is known for an intermediate.
    #[error("the CA certificate in {0} is an intermediate and no root was given; add the root after it in the same file, or pass --ca-bundle")]
    NoRoot(PathBuf),
    /// A bundle file holds no certificate.
    #[error("{0}: no certificate found")]
    EmptyBundle(PathBuf),
    /// The CA files hold a certificate that has expired (a Secret rolled back?).
    #[error("{0}: the CA certificate there, or one above it, has expired; it is not taken")]
    Expired(PathBuf),
    /// The CA files now chain to other roots than the ones published.
    #[error("{0}: the new CA chains to other roots than the ones in use; a change of roots is taken on a restart of the controller, which publishes them (restart it once every workload trusts both)")]
    RootsChanged(PathBuf),
    /// Kubernetes did not store or return the root Secret.
    #[error("root Secret {name}: {reason}")]
    Secret {
        /// `namespace/name`.
        name: String,
        /// Why.
        reason: String,
    },
    /// Kubernetes did not store the ConfigMap the roots are published in.
    #[error("roots ConfigMap {name}: {reason} (node-proxies trust the controller with the roots it holds)")]
    RootsConfigMap {
        /// `namespace/name`.
        name: String,
        /// Why.
        reason: String,
    },
}

/// The root certificate's file in a CA directory.
pub const ROOT_CERT: &str = "root.pem";
/// The root key's file (mode 0600).
pub const ROOT_KEY: &str = "root-key.pem";

/// The mesh CA.
pub struct Ca {
    authority: ArcSwap<CertificateAuthority>,
    bundle: Vec<CertificateDer<'static>>,
    trust_domain: String,
    leaf_ttl: Duration,
    /// The operator's files it was read from, to read again.
    files: Option<Files>,
    /// Counts the reloads, for what must follow one (the serving certificate).
    reloaded: tokio::sync::watch::Sender<u64>,
}

/// Where an operator-provided CA is read from, and what was read last.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    bundle: Option<PathBuf>,
    /// The certificate and key PEM last read.
    read: Mutex<(String, String)>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.bundle.len())
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaSetupError + '_ {
    move |source| CaSetupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CaSetupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Ca {
    /// A CA from a held authority; `bundle` defaults to the authority's roots.
    pub fn new(
        authority: CertificateAuthority,
        bundle: Vec<CertificateDer<'static>>,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Self {
        let bundle = if bundle.is_empty() {
            authority.roots()
        } else {
            bundle
        };
        Ca {
            authority: ArcSwap::from_pointee(authority),
            bundle,
            trust_domain: trust_domain.to_owned(),
            leaf_ttl,
            files: None,
            reloaded: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes each time another CA is taken by [`Ca::reload`].
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloaded.subscribe()
    }

    /// The root in `dir` (`root.pem`, `root-key.pem`), created on first use.
    pub fn from_dir(
        dir: &Path,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, CaSetupError> {
        let (cert, key) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        match (cert.exists(), key.exists()) {
            (true, true) => {
                let c = std::fs::read_to_string(&cert).map_err(io(&cert))?;
                let k = std::fs::read_to_string(&key).map_err(io(&key))?;
                let authority =
                    CertificateAuthority::from_pem(&c, &k).map_err(|source| CaSetupError::Ca {
                        path: cert.clone(),
                        source,
                    })?;
                info!("mesh root loaded from {}", cert.display());
                Ok(Ca::new(authority, Vec::new(), trust_domain, leaf_ttl))
            }
            (false, false) => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(io(dir))?;
                let authority =
                    CertificateAuthority::self_signed(trust_domain).map_err(|source| {
                        CaSetupError::Ca {
                            path: cert.clone(),
                            source,
                        }
                    })?;
                // The key first: a crash between the two leaves a key without a
                // certificate, which the next start reports instead of overwriting.
                write_file(&key, authority.key_pem(), 0o600)?;
                write_file(&cert, &authority.cert_pem(), 0o644)?;
                info!("mesh root created in {}", dir.display());
                Ok(Ca::new(authority, Vec::new(), trust_domain, leaf_ttl))
            }
            (true, false) => Err(CaSetupError::HalfRoot {
                dir: dir.to_owned(),
                present: ROOT_CERT,
                missing: ROOT_KEY,
            }),
            (false, true) => Err(CaSetupError::HalfRoot {
                dir: dir.to_owned(),
                present: ROOT_KEY,
                missing: ROOT_CERT,
            }),
        }
    }

    /// An operator-provided root or intermediate: `cert` (the CA certificate, then any
    /// above it), `key`, and optionally a `bundle` of roots to distribute.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        bundle: Option<&Path>,
        trust_domain: &str,
        leaf_ttl: Duration,
    ) -> Result<Self, CaSetupError> {
        let (authority, roots, read) = read_files(cert, key, bundle)?;
        let mut ca = Ca::new(authority, roots, trust_domain, leaf_ttl);
        ca.files = Some(Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            bundle: bundle.map(Path::to_owned),
            read: Mutex::new(read),
        });
        Ok(ca)
    }

    /// Reads an operator-provided CA's files again (nothing to do for another CA) and
    /// takes a changed one if it is valid and chains to the same roots: the new expiry,
    /// or `None` when nothing changed. On an error the CA in use stays. A certificate
    /// and key written one after the other are read in between as a pair that does not
    /// match: an error this time, taken at the next read.
    pub fn reload(&self) -> Result<Option<SystemTime>, CaSetupError> {
        let Some(files) = &self.files else {
            return Ok(None);
        };
        let c = std::fs::read_to_string(&files.cert).map_err(io(&files.cert))?;
        let k = std::fs::read_to_string(&files.key).map_err(io(&files.key))?;
        let mut read = files.read.lock().unwrap_or_else(|e| e.into_inner());
        if read.0 == c && read.1 == k {
            return Ok(None);
        }
        let (authority, roots, now_read) =
            read_files(&files.cert, &files.key, files.bundle.as_deref())?;
        if roots != self.bundle {
            return Err(CaSetupError::RootsChanged(files.cert.clone()));
        }
        let expires = authority.expires();
        if expires <= SystemTime::now() {
            return Err(CaSetupError::Expired(files.cert.clone()));
        }
        self.authority.store(Arc::new(authority));
        *read = now_read;
        self.reloaded.send_modify(|n| *n += 1);
        info!("mesh CA read again from {}", files.cert.display());
        Ok(Some(expires))
    }

    /// When the CA certificate, or the first above it, expires: no leaf outlives it.
    pub fn expires(&self) -> SystemTime {
        self.authority.load().expires()
    }

    /// The roots every certificate chains to.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The bundle as PEM (what node-proxies are given to trust the controller).
    pub fn bundle_pem(&self) -> String {
        self.bundle
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
            .collect()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// How long leaves live.
    pub fn leaf_ttl(&self) -> Duration {
        self.leaf_ttl
    }

    /// Signs a leaf for `identity` from `csr`.
    pub fn sign(
        &self,
        identity: &Identity,
        csr: &[u8],
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let csr = CertificateSigningRequestDer::from(csr.to_vec());
        self.authority.load().sign(&csr, identity, self.leaf_ttl)
    }

    /// A serving certificate for the controller's own `names`.
    pub fn serving_cert(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        self.authority.load().issue_server(names, ttl)
    }

    /// The authority in use (to persist it in a Secret).
    pub fn authority(&self) -> Arc<CertificateAuthority> {
        self.authority.load_full()
    }
}

/// A CA read from files: the authority, the roots it chains to, and the PEM read
/// (certificate, key).
type Read = (
    CertificateAuthority,
    Vec<CertificateDer<'static>>,
    (String, String),
);

/// The CA in `cert` and `key`, the roots it chains to (from `bundle`, else above it in
/// `cert`), and the PEM read.
fn read_files(cert: &Path, key: &Path, bundle: Option<&Path>) -> Result<Read, CaSetupError> {
    let c = std::fs::read_to_string(cert).map_err(io(cert))?;
    let k = std::fs::read_to_string(key).map_err(io(key))?;
    let authority = CertificateAuthority::from_pem(&c, &k).map_err(|source| CaSetupError::Ca {
        path: cert.to_owned(),
        source,
    })?;
    let roots = match bundle {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(io(path))?;
            let b = tunnel::identity::TrustBundle::from_pem(&text)
                .map_err(|_| CaSetupError::EmptyBundle(path.to_owned()))?;
            b.roots().to_vec()
        }
        None => authority.roots(),
    };
    if roots.is_empty() {
        return Err(CaSetupError::NoRoot(cert.to_owned()));
    }
    Ok((authority, roots, (c, k)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_is_created_once_then_loaded() {
        let dir = std::env::temp_dir().join(format!("weft-ca-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = Ca::from_dir(&dir, "cluster.local", Duration::from_secs(60)).expect("created");
        let again = Ca::from_dir(&dir, "cluster.local", Duration::from_secs(60)).expect("loaded");
        assert_eq!(first.bundle(), again.bundle());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(ROOT_KEY))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
        std::fs::remove_file(dir.join(ROOT_CERT)).expect("remove");
        let e =
            Ca::from_dir(&dir, "cluster.local", Duration::from_secs(60)).expect_err("half a root");
        assert!(
            e.to_string()
                .contains("holds root-key.pem but not root.pem"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A renewed intermediate written over the files is signed with from the next
    /// read; a pair that does not match (written half-way) or one under other roots is
    /// refused, saying why, and the CA in use stays.
    #[test]
    fn a_renewed_ca_is_read_again_and_a_bad_one_is_not_taken() {
        let dir = std::env::temp_dir().join(format!("weft-ca-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        let write = |int: &CertificateAuthority, root: &CertificateAuthority| {
            std::fs::write(&cert, int.cert_pem() + &root.cert_pem()).expect("write");
            std::fs::write(&key, int.key_pem()).expect("write");
        };
        let root = CertificateAuthority::self_signed("cluster.local").expect("root");
        let first = root
            .new_intermediate("cluster.local")
            .expect("intermediate");
        write(&first, &root);
        let ca = Ca::from_files(&cert, &key, None, "cluster.local", Duration::from_secs(60))
            .expect("loaded");
        let identity = Identity::new("cluster.local", "shop", "cart").expect("identity");
        let signer = |ca: &Ca| {
            let csr = tunnel::identity::build_csr(&identity).expect("csr");
            ca.sign(&identity, &csr.der).expect("signed")[1].clone()
        };
        assert_eq!(&signer(&ca), first.cert_der());
        assert_eq!(ca.reload().expect("read"), None, "nothing changed");

        let renewed = root
            .new_intermediate("cluster.local")
            .expect("intermediate");
        write(&renewed, &root);
        assert_eq!(ca.reload().expect("read"), Some(renewed.expires()));
        assert_eq!(
            &signer(&ca),
            renewed.cert_der(),
            "signed by the renewed one"
        );

        // Half-written: the next one's certificate with the current key.
        let next = root
            .new_intermediate("cluster.local")
            .expect("intermediate");
        std::fs::write(&cert, next.cert_pem() + &root.cert_pem()).expect("write");
        let e = ca.reload().expect_err("a mismatched pair");
        assert!(e.to_string().contains("does not belong"), "{e}");
        assert_eq!(&signer(&ca), renewed.cert_der(), "the CA in use stays");

        // Under another root.
        let other = CertificateAuthority::self_signed("cluster.local").expect("root");
        let theirs = other
            .new_intermediate("cluster.local")
            .expect("intermediate");
        write(&theirs, &other);
        let e = ca.reload().expect_err("other roots");
        assert!(matches!(e, CaSetupError::RootsChanged(_)), "{e}");
        assert_eq!(&signer(&ca), renewed.cert_der(), "the CA in use stays");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_intermediate_needs_its_root() {
        let dir = std::env::temp_dir().join(format!("weft-ca-int-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let root = CertificateAuthority::self_signed("cluster.local").expect("root");
        let int = root
            .new_intermediate("cluster.local")
            .expect("intermediate");
        let (cert, key, with_root) = (
            dir.join("int.pem"),
            dir.join("int-key.pem"),
            dir.join("chain.pem"),
        );
        std::fs::write(&cert, int.cert_pem()).expect("write");
        std::fs::write(&key, int.key_pem()).expect("write");
        std::fs::write(&with_root, int.cert_pem() + &root.cert_pem()).expect("write");
        let e = Ca::from_files(&cert, &key, None, "cluster.local", Duration::from_secs(60))
            .expect_err("no root");
        assert!(matches!(e, CaSetupError::NoRoot(_)), "{e}");
        let ca = Ca::from_files(
            &with_root,
            &key,
            None,
            "cluster.local",
            Duration::from_secs(60),
        )
        .expect("root found in the chain");
        assert_eq!(ca.bundle(), &[root.cert_der().clone()]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

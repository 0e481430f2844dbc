//! The mesh certificate authority: a root (self-signed or operator-provided), CSRs for
//! identities, and leaves signed from them.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Identity, IdentityError};

/// Default lifetime of a workload leaf.
pub const LEAF_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Lifetime of a self-signed root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Lifetime of an intermediate made by [`CertificateAuthority::new_intermediate`].
const INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Leaves start this long before issuance so a peer whose clock is slightly behind
/// does not see them as not yet valid.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Errors from the CA primitives. Each names the input that was wrong.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Generating a key or encoding a certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA certificate PEM had no certificate or could not be parsed.
    #[error("CA certificate: {0}")]
    CaCert(String),
    /// The CA key PEM could not be parsed or does not match the certificate.
    #[error("CA key: {0}")]
    CaKey(String),
    /// The CSR could not be parsed or its signature is wrong.
    #[error("certificate signing request is invalid: {0}")]
    Csr(String),
    /// The CSR does not ask for exactly the identity it was submitted for.
    #[error("certificate signing request asks for {found}, but it was submitted for {expected}; a CSR must carry exactly one URI SAN equal to the workload identity")]
    CsrIdentity {
        /// What the caller is entitled to.
        expected: Identity,
        /// What the CSR carried, rendered for the message.
        found: String,
    },
    /// A certificate did not carry a usable SPIFFE identity.
    #[error("certificate has no usable SPIFFE identity: {0}")]
    NoIdentity(String),
    /// A certificate carried a URI SAN that is not a valid identity.
    #[error(transparent)]
    BadIdentity(#[from] IdentityError),
    /// The CA certificate, or one above it, is no longer valid: nothing it signs would be.
    #[error(
        "the CA certificate, or one above it, expired at {0}; give the CA a valid certificate"
    )]
    Expired(String),
}

/// A certificate signing request for one identity, with the private key that stays with
/// the requester (a node-proxy) and is never sent or written to disk.
pub struct Csr {
    /// The DER-encoded PKCS#10 request, to send to the CA.
    pub der: CertificateSigningRequestDer<'static>,
    key: KeyPair,
}

impl Csr {
    /// Pairs the signed chain the CA returned with this request's key.
    pub fn into_cert(
        self,
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<WorkloadCert, CaError> {
        WorkloadCert::new(identity, chain, self.key.serialize_der())
    }
}

/// Builds a CSR (ECDSA P-256 key generated here) whose only SAN is `identity`.
pub fn build_csr(identity: &Identity) -> Result<Csr, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok(Csr {
        der: csr.der().clone(),
        key,
    })
}

/// A workload's certificate chain (leaf first) and private key, in memory only.
#[derive(Debug)]
pub struct WorkloadCert {
    /// The identity the leaf carries.
    pub identity: Identity,
    /// Leaf first, then any intermediates; never the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key of the leaf.
    pub key: PrivateKeyDer<'static>,
    /// When the leaf stops being valid.
    pub not_after: SystemTime,
    not_before: SystemTime,
    /// When this value was made from the certificate.
    received: SystemTime,
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        WorkloadCert {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            not_after: self.not_after,
            not_before: self.not_before,
            received: self.received,
        }
    }
}

impl WorkloadCert {
    /// Checks that the leaf carries `identity` and records its validity.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        pkcs8_key: Vec<u8>,
    ) -> Result<Self, CaError> {
        let leaf = chain
            .first()
            .ok_or_else(|| CaError::NoIdentity("the chain is empty".into()))?;
        let found = identity_of_leaf(leaf)?;
        if found != identity {
            return Err(CaError::CsrIdentity {
                expected: identity,
                found: found.to_string(),
            });
        }
        let (not_before, not_after) = validity(leaf)?;
        Ok(WorkloadCert {
            identity,
            chain,
            key: PrivateKeyDer::Pkcs8(pkcs8_key.into()),
            not_before,
            not_after,
            received: SystemTime::now(),
        })
    }

    /// When this leaf should be replaced: half-way through what is left of its validity
    /// from when it started being usable. A CA backdates leaves by a few minutes for
    /// clock skew; counting from `notBefore` would put the half-way point of a
    /// short-lived leaf in the past, so the clock starts at the later of `notBefore` and
    /// receipt.
    pub fn refresh_at(&self) -> SystemTime {
        let start = self.not_before.max(self.received);
        let life = self.not_after.duration_since(start).unwrap_or_default();
        start + life / 2
    }
}

/// The mesh CA: signs workload leaves for identities of its trust domain.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
    cert: CertificateDer<'static>,
    /// Certificates between `cert` and the root, sent with every leaf.
    chain: Vec<CertificateDer<'static>>,
    self_signed: bool,
    /// When the first of `cert` and `chain` stops being valid: no leaf outlives it.
    expires: SystemTime,
}

/// When the first of `certs` stops being valid.
fn first_expiry<'a>(
    certs: impl IntoIterator<Item = &'a CertificateDer<'static>>,
) -> Result<SystemTime, CaError> {
    let mut first: Option<SystemTime> = None;
    for c in certs {
        let (_, not_after) = validity(c).map_err(|e| CaError::CaCert(e.to_string()))?;
        first = Some(first.map_or(not_after, |f| f.min(not_after)));
    }
    first.ok_or_else(|| CaError::CaCert("no certificate".into()))
}

impl CertificateAuthority {
    /// Creates a new self-signed root (ECDSA P-256, valid ten years).
    pub fn self_signed(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(trust_domain, "Weft mesh root CA", ROOT_TTL);
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let cert = cert.der().clone();
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            key_pem,
            expires: first_expiry([&cert])?,
            cert,
            chain: Vec::new(),
            self_signed: true,
        })
    }

    /// Creates an intermediate CA signed by this one (ECDSA P-256, valid one year): how
    /// an operator keeps the root offline and hands the mesh only the intermediate.
    pub fn new_intermediate(&self, trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(trust_domain, "Weft mesh intermediate CA", INTERMEDIATE_TTL);
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = Vec::new();
        if !self.self_signed {
            chain.push(self.cert.clone());
            chain.extend(self.chain.iter().cloned());
        }
        let key_pem = key.serialize_pem();
        let cert = cert.der().clone();
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            key_pem,
            expires: first_expiry([&cert])?.min(self.expires),
            cert,
            chain,
            self_signed: false,
        })
    }

    /// Loads an operator-provided root or intermediate: `cert_pem` holds the signing
    /// certificate first, then any certificates above it; `key_pem` its private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let mut certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaError::CaCert(format!("not valid PEM: {e}")))?
            .into_iter();
        let cert = certs
            .next()
            .ok_or_else(|| CaError::CaCert("no CERTIFICATE block found".into()))?;
        let (_, parsed) = X509Certificate::from_der(&cert)
            .map_err(|e| CaError::CaCert(format!("not a valid X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(CaError::CaCert(
                "it is not a CA certificate (basicConstraints CA:TRUE is missing)".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::CaKey(format!("not a valid private key PEM: {e}")))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(CaError::CaKey(
                "the key does not belong to the CA certificate".into(),
            ));
        }
        let self_signed = parsed.subject() == parsed.issuer();
        let issuer = Issuer::from_ca_cert_der(&cert, key)
            .map_err(|e| CaError::CaCert(format!("cannot use as issuer: {e}")))?;
        let chain: Vec<_> = certs.collect();
        Ok(CertificateAuthority {
            issuer,
            key_pem: key_pem.to_owned(),
            expires: first_expiry(std::iter::once(&cert).chain(&chain))?,
            cert,
            chain,
            self_signed,
        })
    }

    /// The CA certificate (the root, for a self-signed CA).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The CA certificate as PEM, to persist or to publish as a trust anchor.
    pub fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.cert)
    }

    /// The CA private key as PEM, to persist (in a Secret or a 0600 file).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// When the CA certificate, or the first certificate above it, stops being valid:
    /// no leaf it signs is valid longer.
    pub fn expires(&self) -> SystemTime {
        self.expires
    }

    /// The end of a leaf's validity asked for as `not_after`: no later than the CA's
    /// own. An error once the CA has expired.
    fn capped(&self, not_after: OffsetDateTime) -> Result<OffsetDateTime, CaError> {
        let expires = OffsetDateTime::from(self.expires);
        if expires <= OffsetDateTime::now_utc() {
            let at = expires
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| expires.to_string());
            return Err(CaError::Expired(at));
        }
        Ok(not_after.min(expires))
    }

    /// Signs `csr` into a leaf for `identity`, valid `ttl` from now, or until the CA
    /// expires if that is sooner.
    ///
    /// Everything but the public key is decided here, not taken from the CSR: the
    /// request must carry exactly one URI SAN equal to `identity`, and the leaf gets
    /// that SAN, digitalSignature, serverAuth + clientAuth, CA:FALSE and a random
    /// serial. Returns the chain to present: leaf, then any intermediates.
    pub fn sign(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let now = OffsetDateTime::now_utc();
        self.sign_between(csr, identity, now - CLOCK_SKEW, now + ttl)
    }

    /// As [`sign`](Self::sign), with an explicit validity window (for backdated or
    /// short-lived leaves).
    pub fn sign_between(
        &self,
        csr: &CertificateSigningRequestDer<'_>,
        identity: &Identity,
        not_before: impl Into<OffsetDateTime>,
        not_after: impl Into<OffsetDateTime>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let req = CertificateSigningRequestParams::from_der(csr)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let requested: Vec<String> = req
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested.len() != 1 || requested[0] != identity.as_str() {
            return Err(CaError::CsrIdentity {
                expected: identity.clone(),
                found: if requested.is_empty() {
                    "no SAN".into()
                } else {
                    requested.join(", ")
                },
            });
        }
        if req.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Csr("the key must be ECDSA P-256".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = self.capped(not_after.into())?;
        params.serial_number = Some(random_serial());
        let leaf = params.signed_by(&req.public_key, &self.issuer)?;
        let mut chain = vec![leaf.der().clone()];
        if !self.self_signed {
            chain.push(self.cert.clone());
            chain.extend(self.chain.iter().cloned());
        }
        Ok(chain)
    }

    /// Whether this CA is a self-signed root (else an intermediate).
    pub fn is_root(&self) -> bool {
        self.self_signed
    }

    /// The roots this CA's leaves chain to, as far as it knows them: itself when it is
    /// a root, else the self-signed certificates given above it.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        if self.self_signed {
            return vec![self.cert.clone()];
        }
        self.chain
            .iter()
            .filter(|c| {
                X509Certificate::from_der(c)
                    .map(|(_, p)| p.subject() == p.issuer())
                    .unwrap_or(false)
            })
            .cloned()
            .collect()
    }

    /// A TLS server certificate for DNS `names` (the controller's own), with a fresh
    /// ECDSA P-256 key: the chain (leaf first) and the PKCS#8 key.
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, first);
        }
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = self.capped(now + ttl)?;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        if !self.self_signed {
            chain.push(self.cert.clone());
            chain.extend(self.chain.iter().cloned());
        }
        Ok((chain, PrivateKeyDer::Pkcs8(key.serialize_der().into())))
    }

    /// Generates a key, a CSR and a leaf for `identity` in one step.
    ///
    /// For callers that hold the CA in-process (the local sandbox and tests); it runs
    /// the same CSR path a remote node-proxy uses.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        let csr = build_csr(identity)?;
        let chain = self.sign(&csr.der, identity, ttl)?;
        csr.into_cert(identity.clone(), chain)
    }
}

fn ca_params(trust_domain: &str, common_name: &str, ttl: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + ttl;
    params.serial_number = Some(random_serial());
    params
}

/// The identity carried by a leaf: its only URI SAN, parsed.
pub fn identity_of_leaf(der: &CertificateDer<'_>) -> Result<Identity, CaError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CaError::NoIdentity(format!("not a valid X.509 certificate: {e}")))?;
    let mut uris = cert
        .extensions()
        .iter()
        .flat_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => san
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        });
    let uri = uris
        .next()
        .ok_or_else(|| CaError::NoIdentity("no URI SAN".into()))?;
    if uris.next().is_some() {
        return Err(CaError::NoIdentity("more than one URI SAN".into()));
    }
    Ok(uri.parse()?)
}

fn validity(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), CaError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CaError::NoIdentity(format!("not a valid X.509 certificate: {e}")))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    };
    Ok((
        at(cert.validity().not_before),
        at(cert.validity().not_after),
    ))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A failing system RNG means no certificate can be trusted anyway.
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the system random number generator must work");
    // Positive and non-zero as RFC 5280 requires.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

#[cfg(test)]
mod tests {
    use x509_parser::extensions::KeyUsage;

    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa).unwrap()
    }

    fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
        X509Certificate::from_der(der).unwrap().1
    }

    /// No leaf outlives its CA: one asked to live past the CA's end ends with it, and
    /// an expired CA signs nothing, saying when it expired.
    #[test]
    fn a_leaf_ends_no_later_than_its_ca() {
        let root = CertificateAuthority::self_signed("cluster.local").unwrap();
        // An intermediate valid for one more hour.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = ca_params("cluster.local", "short-lived", Duration::from_secs(3600));
        params.not_after = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        let cert = params.signed_by(&key, &root.issuer).unwrap();
        let pem = format!(
            "{}{}",
            pem_encode("CERTIFICATE", cert.der()),
            root.cert_pem()
        );
        let ca = CertificateAuthority::from_pem(&pem, &key.serialize_pem()).unwrap();
        let (_, ends) = validity(cert.der()).unwrap();
        assert_eq!(ca.expires(), ends);
        let leaf = ca
            .issue(&id("cart"), Duration::from_secs(24 * 3600))
            .unwrap();
        assert_eq!(leaf.not_after, ends, "cut to the CA's end");
        let short = ca.issue(&id("cart"), Duration::from_secs(600)).unwrap();
        assert!(short.not_after < ends, "a shorter one keeps its own");
        let (served, _) = ca
            .issue_server(&["weft-controller".into()], Duration::from_secs(24 * 3600))
            .unwrap();
        assert_eq!(validity(&served[0]).unwrap().1, ends);
        // Expired an hour ago.
        let mut params = ca_params("cluster.local", "expired", Duration::from_secs(3600));
        params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
        params.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
        let cert = params.signed_by(&key, &root.issuer).unwrap();
        let pem = format!(
            "{}{}",
            pem_encode("CERTIFICATE", cert.der()),
            root.cert_pem()
        );
        let expired = CertificateAuthority::from_pem(&pem, &key.serialize_pem()).unwrap();
        let e = expired.issue(&id("cart"), LEAF_TTL).unwrap_err();
        assert!(matches!(e, CaError::Expired(_)), "{e}");
        assert!(e.to_string().contains("expired at 20"), "{e}");
    }

    #[test]
    fn leaf_has_identity_key_usages_and_lifetime() {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        let cert = ca.issue(&id("cart"), LEAF_TTL).unwrap();
        assert_eq!(cert.chain.len(), 1, "a self-signed root is not sent");
        let leaf = parse(&cert.chain[0]);
        assert!(!leaf.is_ca());
        assert_eq!(identity_of_leaf(&cert.chain[0]).unwrap(), id("cart"));
        let san = leaf.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 1, "the identity is the only SAN");
        let ku: &KeyUsage = leaf.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let lifetime = cert.not_after.duration_since(cert.not_before).unwrap();
        assert_eq!(lifetime, LEAF_TTL + CLOCK_SKEW);
        // Refreshed half-way through what is left once received, not from the
        // backdated notBefore: for a short leaf that would be in the past.
        let now = SystemTime::now();
        let until = cert.refresh_at().duration_since(now).unwrap();
        assert!(
            until.abs_diff(LEAF_TTL / 2) < Duration::from_secs(2),
            "{until:?}"
        );
        let short = ca.issue(&id("cart"), Duration::from_secs(8)).unwrap();
        let until = short
            .refresh_at()
            .duration_since(SystemTime::now())
            .unwrap();
        assert!(
            (Duration::from_secs(3)..=Duration::from_secs(4)).contains(&until),
            "{until:?}"
        );
        // Signed by the root, with a P-256 key.
        let root = parse(ca.cert_der());
        leaf.verify_signature(Some(root.public_key())).unwrap();
        assert_eq!(
            leaf.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        // Two leaves for one identity differ in key and serial.
        let again = ca.issue(&id("cart"), LEAF_TTL).unwrap();
        assert_ne!(parse(&again.chain[0]).serial, leaf.serial);
    }

    #[test]
    fn csr_must_ask_for_exactly_the_identity() {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        let csr = build_csr(&id("cart")).unwrap();
        let err = ca.sign(&csr.der, &id("payments"), LEAF_TTL).unwrap_err();
        assert!(matches!(err, CaError::CsrIdentity { .. }), "{err}");
        assert!(err.to_string().contains("sa/payments"), "{err}");

        // A CSR smuggling a second name is refused.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(id("cart").as_str().try_into().unwrap()),
            SanType::DnsName("evil.example".try_into().unwrap()),
        ];
        let two = params.serialize_request(&key).unwrap();
        let err = ca.sign(two.der(), &id("cart"), LEAF_TTL).unwrap_err();
        assert!(matches!(err, CaError::CsrIdentity { .. }), "{err}");

        let garbage = CertificateSigningRequestDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            ca.sign(&garbage, &id("cart"), LEAF_TTL),
            Err(CaError::Csr(_))
        ));
    }

    #[test]
    fn load_root_from_pem_and_check_it() {
        let ca = CertificateAuthority::self_signed("cluster.local").unwrap();
        let loaded = CertificateAuthority::from_pem(&ca.cert_pem(), ca.key_pem()).unwrap();
        let cert = loaded.issue(&id("cart"), LEAF_TTL).unwrap();
        parse(&cert.chain[0])
            .verify_signature(Some(parse(ca.cert_der()).public_key()))
            .unwrap();

        let other = CertificateAuthority::self_signed("cluster.local").unwrap();
        let err = CertificateAuthority::from_pem(&ca.cert_pem(), other.key_pem());
        assert!(matches!(err, Err(CaError::CaKey(ref m)) if m.contains("does not belong")));

        let leaf_pem = pem_encode("CERTIFICATE", &cert.chain[0]);
        let err = CertificateAuthority::from_pem(&leaf_pem, ca.key_pem());
        assert!(matches!(err, Err(CaError::CaCert(ref m)) if m.contains("not a CA")));

        let err = CertificateAuthority::from_pem("nothing here", ca.key_pem());
        assert!(matches!(err, Err(CaError::CaCert(_))));
    }

    #[test]
    fn intermediate_leaves_carry_the_chain() {
        let root = CertificateAuthority::self_signed("cluster.local").unwrap();
        let mid = root.new_intermediate("cluster.local").unwrap();
        // Round-trip through PEM, as an operator would provide it.
        let chain_pem = mid.cert_pem();
        let mid = CertificateAuthority::from_pem(&chain_pem, mid.key_pem()).unwrap();
        let cert = mid.issue(&id("cart"), LEAF_TTL).unwrap();
        assert_eq!(cert.chain.len(), 2, "leaf, then the intermediate");
        let (leaf, inter) = (parse(&cert.chain[0]), parse(&cert.chain[1]));
        leaf.verify_signature(Some(inter.public_key())).unwrap();
        inter
            .verify_signature(Some(parse(root.cert_der()).public_key()))
            .unwrap();
    }
}

//! Workload identity: the SPIFFE ID a pod runs as, and the CA primitives that issue and
//! check the X.509 certificates carrying it.
//!
//! An identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` and is the
//! only URI SAN of a leaf certificate.

mod bundle;
mod ca;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use bundle::{TrustBundle, TrustBundleError};
pub use ca::{
    build_csr, identity_of_leaf, CaError, CertificateAuthority, Csr, WorkloadCert, LEAF_TTL,
};

/// The trust domain used when none is configured, as in Kubernetes' `cluster.local`.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";

/// A parsed workload identity.
///
/// Held as its three parts plus the rendered URI, so it can be compared, hashed and
/// displayed without allocation on the connection path.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    // Shared, so cloning an identity onto every connection and metric is a refcount.
    uri: Arc<str>,
    // Byte offsets into `uri`; parsing caps the whole URI well below u16::MAX.
    td_end: u16,
    ns: (u16, u16),
    sa: (u16, u16),
}

/// Why a string is not a Weft workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("identity {0:?} must start with \"spiffe://\"")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("identity {0:?} must have the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    /// The trust domain is empty, too long or has characters SPIFFE does not allow.
    #[error("identity {uri:?}: trust domain {td:?} is invalid: {why}")]
    TrustDomain {
        /// The whole input.
        uri: String,
        /// The trust domain as given.
        td: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The namespace or service account is not a valid Kubernetes name.
    #[error("identity {uri:?}: {field} {value:?} is invalid: {why}")]
    Name {
        /// The whole input.
        uri: String,
        /// `namespace` or `service account`.
        field: &'static str,
        /// The part as given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl Identity {
    /// Builds the identity of a service account in a namespace, validating each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..usize::from(self.td_end)]
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.uri[usize::from(self.ns.0)..usize::from(self.ns.1)]
    }

    /// The Kubernetes service account.
    pub fn service_account(&self) -> &str {
        &self.uri[usize::from(self.sa.0)..usize::from(self.sa.1)]
    }

    /// The full `spiffe://` URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(uri.to_owned()))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| IdentityError::Shape(uri.to_owned()))?;
        check_trust_domain(td).map_err(|why| IdentityError::TrustDomain {
            uri: uri.to_owned(),
            td: td.to_owned(),
            why,
        })?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(IdentityError::Shape(uri.to_owned()));
        };
        let name_err = |field, value: &str, why| IdentityError::Name {
            uri: uri.to_owned(),
            field,
            value: value.to_owned(),
            why,
        };
        check_dns_label(ns).map_err(|why| name_err("namespace", ns, why))?;
        check_dns_subdomain(sa).map_err(|why| name_err("service account", sa, why))?;
        // Bounded by the checks above: 9 + 255 + 4 + 63 + 4 + 253 bytes.
        let at = |n: usize| u16::try_from(n).expect("identity length is bounded by parsing");
        let td_end = SCHEME.len() + td.len();
        let ns_start = td_end + "/ns/".len();
        let sa_start = ns_start + ns.len() + "/sa/".len();
        Ok(Identity {
            uri: uri.into(),
            td_end: at(td_end),
            ns: (at(ns_start), at(ns_start + ns.len())),
            sa: (at(sa_start), at(sa_start + sa.len())),
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.uri)
    }
}

/// SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`, at most 255 bytes.
fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("it is empty");
    }
    if td.len() > 255 {
        return Err("it is longer than 255 characters");
    }
    if td.contains(':') {
        return Err("a port is not allowed");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only lowercase letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

/// Kubernetes DNS-1123 label (namespace names): at most 63 lowercase alphanumerics and
/// '-', starting and ending with an alphanumeric. The error says what is wrong.
pub fn check_dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

/// Kubernetes DNS-1123 subdomain (service account names, and the names of most
/// objects): dot-separated DNS-1123 labels, at most 253 characters.
pub fn check_dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    if s.split('.').count() > 1 && s.split('.').any(str::is_empty) {
        return Err("it must start and end with a letter or digit, with no '..'");
    }
    s.split('.').try_for_each(check_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_parts() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(Identity::new("cluster.local", "shop", "cart").unwrap(), id);
        let dotted: Identity = "spiffe://td/ns/a/sa/b.c".parse().unwrap();
        assert_eq!(dotted.service_account(), "b.c");
    }

    #[test]
    fn precise_errors() {
        let err = |s: &str| s.parse::<Identity>().unwrap_err();
        assert!(matches!(
            err("http://cluster.local/ns/a/sa/b"),
            IdentityError::Scheme(_)
        ));
        assert!(matches!(
            err("spiffe://cluster.local"),
            IdentityError::Shape(_)
        ));
        assert!(matches!(
            err("spiffe://cluster.local/ns/a"),
            IdentityError::Shape(_)
        ));
        assert!(matches!(
            err("spiffe://cluster.local/ns/a/sa/b/x"),
            IdentityError::Shape(_)
        ));
        assert!(matches!(
            err("spiffe://cluster.local/sa/b/ns/a"),
            IdentityError::Shape(_)
        ));
        assert!(matches!(
            err("spiffe:///ns/a/sa/b"),
            IdentityError::TrustDomain {
                why: "it is empty",
                ..
            }
        ));
        assert!(matches!(
            err("spiffe://Cluster.local/ns/a/sa/b"),
            IdentityError::TrustDomain { .. }
        ));
        assert!(matches!(
            err("spiffe://td:443/ns/a/sa/b"),
            IdentityError::TrustDomain {
                why: "a port is not allowed",
                ..
            }
        ));
        match err("spiffe://td/ns/Shop/sa/b") {
            IdentityError::Name { field, value, .. } => {
                assert_eq!((field, value.as_str()), ("namespace", "Shop"))
            }
            other => panic!("unexpected {other:?}"),
        }
        match err("spiffe://td/ns/shop/sa/-b") {
            IdentityError::Name { field, .. } => assert_eq!(field, "service account"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            err("spiffe://td/ns//sa/b"),
            IdentityError::Name { .. }
        ));
        let long = "a".repeat(64);
        assert!(matches!(
            err(&format!("spiffe://td/ns/{long}/sa/b")),
            IdentityError::Name {
                field: "namespace",
                ..
            }
        ));
        // The message names the input and the field.
        let msg = err("spiffe://td/ns/Shop/sa/b").to_string();
        assert!(
            msg.contains("spiffe://td/ns/Shop/sa/b") && msg.contains("namespace"),
            "{msg}"
        );
    }
}

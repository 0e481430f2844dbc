//! Who is calling: each node-proxy proves which node it serves, and each waypoint which
//! service account it runs as, with a bearer token. In the cluster that is a projected
//! service-account token with the controller as its audience, checked with a
//! TokenReview; in manifest mode (the sandbox) a token from a directory only the
//! controller and that caller can read: `<node>.token` for a node,
//! `serviceaccount/<namespace>/<name>.token` for a workload.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use tracing::debug;

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node-proxy, by the node its credential belongs to.
    Node(String),
    /// A workload (a waypoint), by its service account.
    Workload {
        /// The service account's namespace.
        namespace: String,
        /// The service account.
        service_account: String,
    },
}

impl Caller {
    /// The node, for a node-proxy.
    pub fn node(&self) -> Option<&str> {
        match self {
            Caller::Node(n) => Some(n),
            Caller::Workload { .. } => None,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "node {n}"),
            Caller::Workload {
                namespace,
                service_account,
            } => write!(f, "service account {namespace}/{service_account}"),
        }
    }
}

/// Why a caller is not let in; the label is a metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer ...` metadata.
    #[error("no bearer token in the request's authorization metadata")]
    Missing,
    /// The token is not one the controller knows.
    #[error("the token is not valid: {0}")]
    Invalid(String),
    /// The token is valid but names no node and no workload this controller serves.
    #[error("the token does not belong to a node-proxy or a waypoint: {0}")]
    NotNodeProxy(String),
    /// The check itself failed (API server unreachable).
    #[error("the token could not be checked: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// A metric label.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid(_) => "invalid",
            AuthError::NotNodeProxy(_) => "not_node_proxy",
            AuthError::Unavailable(_) => "unavailable",
        }
    }
}

/// Checks bearer tokens.
pub trait Authenticator: Send + Sync + 'static {
    /// The caller a token proves.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>>;
}

/// The bearer token of a request's metadata.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Result<&str, AuthError> {
    let value = metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Missing)?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)
}

fn token_hash(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Tokens from a directory: `<node>.token` holds a node's token,
/// `serviceaccount/<namespace>/<name>.token` a workload's. Only hashes are kept, and
/// lookups go by hash, so comparing leaks nothing about a token.
pub struct NodeTokens {
    dir: PathBuf,
    tokens: Mutex<Held>,
}

/// The tokens read, when, and the directories' modification times then.
struct Held {
    at: Instant,
    stamp: Vec<(Option<SystemTime>, usize)>,
    tokens: HashMap<[u8; 32], Caller>,
}

/// File suffix of a token.
pub const TOKEN_SUFFIX: &str = ".token";
/// Subdirectory of workloads' tokens.
pub const SERVICE_ACCOUNTS: &str = "serviceaccount";

impl NodeTokens {
    /// Reads `dir`. When an unknown token arrives it is re-read at once if a token was
    /// added since (a directory changed), else at most once a second (a token rewritten
    /// in place), so nodes and waypoints added later are found without a refusal.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let stamp = stamp(dir);
        let tokens = read_tokens(dir)?;
        Ok(NodeTokens {
            dir: dir.to_owned(),
            tokens: Mutex::new(Held {
                at: Instant::now(),
                stamp,
                tokens,
            }),
        })
    }

    /// Writes a fresh random token for `node` into `dir` (mode 0600) and returns it; the
    /// sandbox does this for each node it runs.
    pub fn create(dir: &Path, node: &str) -> std::io::Result<String> {
        write_token(dir, &format!("{node}{TOKEN_SUFFIX}"))
    }

    /// Writes a fresh token for the service account `namespace/name` (a waypoint's)
    /// and returns it.
    pub fn create_workload(dir: &Path, namespace: &str, name: &str) -> std::io::Result<String> {
        write_token(
            &dir.join(SERVICE_ACCOUNTS).join(namespace),
            &format!("{name}{TOKEN_SUFFIX}"),
        )
    }
}

fn write_token(dir: &Path, file: &str) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| std::io::Error::other("the system random number generator failed"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(dir)?;
    // Written aside and renamed: a reader sees the whole token or none.
    let aside = dir.join(format!(".{file}.new"));
    let mut f = std::fs::File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&aside)?;
    f.write_all(token.as_bytes())?;
    drop(f);
    std::fs::rename(&aside, dir.join(file))?;
    Ok(token)
}

/// The tokens of `dir` (`*.token`) by hash, each naming its caller.
fn tokens_in(
    dir: &Path,
    caller: impl Fn(&str) -> Caller,
    into: &mut HashMap<[u8; 32], Caller>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(TOKEN_SUFFIX))
        else {
            continue;
        };
        let token = std::fs::read_to_string(&path)?;
        let token = token.trim();
        if !token.is_empty() {
            into.insert(token_hash(token), caller(name));
        }
    }
    Ok(())
}

/// The modification time and number of entries of `dir`, its service-account
/// directory and each namespace in it: a token added or removed changes one (the count
/// even when the clock's tick is coarser than the change).
fn stamp(dir: &Path) -> Vec<(Option<SystemTime>, usize)> {
    let of = |p: &Path| {
        let mtime = std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let entries: Vec<PathBuf> = std::fs::read_dir(p)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        ((mtime, entries.len()), entries)
    };
    let (top, _) = of(dir);
    let (accounts, mut namespaces) = of(&dir.join(SERVICE_ACCOUNTS));
    namespaces.sort();
    let mut out = vec![top, accounts];
    out.extend(namespaces.iter().map(|ns| of(ns).0));
    out
}

fn read_tokens(dir: &Path) -> std::io::Result<HashMap<[u8; 32], Caller>> {
    let mut tokens = HashMap::new();
    tokens_in(dir, |n| Caller::Node(n.to_owned()), &mut tokens)?;
    let accounts = dir.join(SERVICE_ACCOUNTS);
    if accounts.is_dir() {
        for entry in std::fs::read_dir(&accounts)? {
            let entry = entry?;
            let Some(namespace) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if entry.file_type()?.is_dir() {
                tokens_in(
                    &entry.path(),
                    |n| Caller::Workload {
                        namespace: namespace.clone(),
                        service_account: n.to_owned(),
                    },
                    &mut tokens,
                )?;
            }
        }
    }
    Ok(tokens)
}

impl Authenticator for NodeTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let hash = token_hash(token);
            let mut held = self.tokens.lock().expect("tokens lock is never poisoned");
            if let Some(caller) = held.tokens.get(&hash) {
                return Ok(caller.clone());
            }
            let now = stamp(&self.dir);
            if now != held.stamp || held.at.elapsed() > Duration::from_secs(1) {
                match read_tokens(&self.dir) {
                    Ok(tokens) => {
                        *held = Held {
                            at: Instant::now(),
                            stamp: now,
                            tokens,
                        }
                    }
                    Err(e) => debug!("cannot re-read tokens in {}: {e}", self.dir.display()),
                }
                if let Some(caller) = held.tokens.get(&hash) {
                    return Ok(caller.clone());
                }
            }
            Err(AuthError::Invalid(
                "no node or service account has this token".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_name_their_node() {
        let dir = std::env::temp_dir().join(format!("weft-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t1 = NodeTokens::create(&dir, "node-1").expect("token");
        let auth = NodeTokens::new(&dir).expect("dir");
        assert_eq!(
            auth.authenticate(&t1).await,
            Ok(Caller::Node("node-1".into()))
        );
        assert_eq!(
            auth.authenticate("guess").await.map_err(|e| e.label()),
            Err("invalid")
        );
        // A node and a waypoint added later are found at once, though an unknown token
        // was just looked up.
        let t2 = NodeTokens::create(&dir, "node-2").expect("token");
        let w = NodeTokens::create_workload(&dir, "demo", "waypoint").expect("token");
        assert_eq!(
            auth.authenticate(&t2).await,
            Ok(Caller::Node("node-2".into()))
        );
        assert_eq!(
            auth.authenticate(&w).await,
            Ok(Caller::Workload {
                namespace: "demo".into(),
                service_account: "waypoint".into()
            })
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The installer in a cluster, as the node-proxy DaemonSet runs it: it writes the
//! kubeconfig the plugin looks pods up with (from the container's service account, so
//! the plugin on the host speaks to the API server as the node-proxy), keeps its token
//! current, and on shutdown takes the plugin off the node only if Weft is being
//! removed, not when its pod is replaced by an upgrade.
//!
//! ```text
//!  install, write kubeconfig ──> wait: every minute rewrite it if the token changed
//!                                 SIGTERM ──> GET its DaemonSet
//!                                   gone or being deleted ──> uninstall (a new pod on the
//!                                                             node would fail otherwise)
//!                                   still there (an upgrade) ──> leave everything
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::ByteString;

use super::install::InstallError;

/// Where Kubernetes mounts a pod's service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The API server as a pod reaches it (`KUBERNETES_SERVICE_HOST` and `_PORT`).
pub fn api_server_from_env() -> Result<String, InstallError> {
    let var = |name: &str| {
        std::env::var(name).map_err(|_| InstallError::Invalid {
            path: PathBuf::from(SERVICE_ACCOUNT_DIR),
            reason: format!("{name} is not set: --in-cluster-kubeconfig works only in a pod"),
        })
    };
    let host = var("KUBERNETES_SERVICE_HOST")?;
    let port = var("KUBERNETES_SERVICE_PORT")?;
    Ok(if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    })
}

/// A kubeconfig for `server` with the CA and token of the service account in `sa_dir`.
pub fn kubeconfig(server: &str, sa_dir: &Path) -> Result<String, InstallError> {
    let read = |name: &str| {
        let path = sa_dir.join(name);
        std::fs::read(&path).map_err(|source| InstallError::Io { path, source })
    };
    let ca = read("ca.crt")?;
    let token = String::from_utf8(read("token")?).map_err(|_| InstallError::Invalid {
        path: sa_dir.join("token"),
        reason: "is not text".into(),
    })?;
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "weft", "cluster": {
            "server": server,
            "certificate-authority-data": ByteString(ca),
        }}],
        "users": [{"name": "weft-cni", "user": {"token": token.trim()}}],
        "contexts": [{"name": "weft", "context": {"cluster": "weft", "user": "weft-cni"}}],
        "current-context": "weft",
    });
    let mut text = String::from(
        "# Written by weft-cni's installer for the weft-cni plugin; rewritten as its token rotates.\n",
    );
    text.push_str(
        &serde_yaml_ng::to_string(&config).map_err(|e| InstallError::Invalid {
            path: sa_dir.to_owned(),
            reason: e.to_string(),
        })?,
    );
    Ok(text)
}

/// Writes `text` to `path` (owner-only: it holds a token) unless it already holds it.
/// Returns whether it wrote.
pub fn write_kubeconfig(path: &Path, text: &str) -> Result<bool, InstallError> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    super::install::write_atomic(path, text.as_bytes(), 0o600)?;
    Ok(true)
}

/// What the installer does when its pod stops, from what reading its DaemonSet gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    /// The DaemonSet is gone or being deleted: Weft is being removed from the node.
    Uninstall,
    /// The DaemonSet is there: this pod is being replaced (an upgrade, a restart).
    Keep,
}

/// The decision on stop: uninstall only when the DaemonSet is known to be going. When
/// the API server cannot be asked, the plugin stays: a node-proxy coming back needs it,
/// and `weft-cni uninstall` on the node removes it by hand.
pub fn on_stop(read: Result<Option<DaemonSet>, String>) -> (OnStop, String) {
    match read {
        Ok(None) => (OnStop::Uninstall, "the DaemonSet is gone".into()),
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => {
            (OnStop::Uninstall, "the DaemonSet is being deleted".into())
        }
        Ok(Some(_)) => (
            OnStop::Keep,
            "the DaemonSet is still there (an upgrade or restart)".into(),
        ),
        Err(e) => (
            OnStop::Keep,
            format!("cannot read the DaemonSet ({e}); leaving the plugin in place"),
        ),
    }
}

/// Waits for SIGTERM or SIGINT, rewriting the kubeconfig at `written` every minute
/// (the projected token rotates), then decides from DaemonSet `namespace/name` whether
/// to uninstall. Returns the decision and its reason.
pub fn wait_until_stopped(
    written: &Path,
    server: &str,
    daemonset: (&str, &str),
) -> Result<(OnStop, String), InstallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| InstallError::Io {
            path: written.to_owned(),
            source,
        })?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let signal_err = |source| InstallError::Io {
            path: PathBuf::from("signal"),
            source,
        };
        let mut term = signal(SignalKind::terminate()).map_err(signal_err)?;
        let mut int = signal(SignalKind::interrupt()).map_err(signal_err)?;
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = tick.tick() => {
                    match kubeconfig(server, Path::new(SERVICE_ACCOUNT_DIR))
                        .and_then(|text| write_kubeconfig(written, &text))
                    {
                        Ok(true) => tracing::info!("token rotated: rewrote {}", written.display()),
                        Ok(false) => {}
                        Err(e) => tracing::warn!("cannot refresh the kubeconfig: {e}"),
                    }
                }
            }
        }
        let read = async {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| e.to_string())?;
            let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, daemonset.0);
            api.get_opt(daemonset.1).await.map_err(|e| e.to_string())
        };
        let read = tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .unwrap_or_else(|_| Err("no answer within 10 s".into()));
        Ok(on_stop(read))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_carries_the_service_account_and_is_read_by_kube() {
        let dir = std::env::temp_dir().join(format!("weft-cni-sa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ca.crt"),
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(dir.join("token"), "abc.def.ghi\n").unwrap();
        let text = kubeconfig("https://10.96.0.1:443", &dir).unwrap();
        let path = dir.join("weft-cni.kubeconfig");
        assert!(write_kubeconfig(&path, &text).unwrap());
        assert!(
            !write_kubeconfig(&path, &text).unwrap(),
            "unchanged: not rewritten"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let parsed = kube::config::Kubeconfig::read_from(&path).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.96.0.1:443"));
        assert!(cluster.certificate_authority_data.is_some());
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            kubeconfig("https://x", &dir).is_err(),
            "no service account: an error"
        );
    }

    #[test]
    fn the_plugin_is_removed_only_when_the_daemonset_goes() {
        assert_eq!(on_stop(Ok(None)).0, OnStop::Uninstall);
        let mut ds = DaemonSet::default();
        assert_eq!(on_stop(Ok(Some(ds.clone()))).0, OnStop::Keep);
        ds.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert_eq!(on_stop(Ok(Some(ds))).0, OnStop::Uninstall);
        assert_eq!(on_stop(Err("connection refused".into())).0, OnStop::Keep);
    }
}

//! A real controller on loopback, reading a manifest directory the test writes, for the
//! integration tests of this and other crates (feature `testing`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::server::Shared;
use crate::{Config, Controller};

/// The name in the test controller's certificate.
pub const SERVER_NAME: &str = "weft-controller.weft-system.svc";

/// A running controller.
pub struct TestController {
    /// Its directory: `manifests/`, `ca/`, `tokens/`.
    pub dir: PathBuf,
    /// Where proxies connect.
    pub grpc: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// The root proxies trust it with.
    pub root: PathBuf,
    /// Its state.
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestController {
    /// Starts a controller on `dir` (its manifests are `files`), with a token for each
    /// of `nodes`. Waits until it has published its first model.
    pub async fn start(dir: &Path, nodes: &[&str], files: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_with(dir, nodes, files, |_| {}).await
    }

    /// As [`start`](Self::start), with the configuration adjusted by `tweak`.
    pub async fn start_with(
        dir: &Path,
        nodes: &[&str],
        files: &[(&str, &str)],
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let manifests = dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        for (name, text) in files {
            std::fs::write(manifests.join(name), text)?;
        }
        let tokens = dir.join("tokens");
        for node in nodes {
            if !tokens
                .join(format!("{node}{}", crate::auth::TOKEN_SUFFIX))
                .exists()
            {
                crate::auth::NodeTokens::create(&tokens, node)?;
            }
        }
        std::fs::create_dir_all(&tokens)?;
        let mut config = Config {
            manifests: vec![manifests],
            ca_dir: Some(dir.join("ca")),
            node_tokens: Some(tokens),
            ..Config::default()
        };
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let controller = Controller::start(config, shutdown.clone()).await?;
        let (grpc, admin, shared) = (
            controller.grpc_addr,
            controller.admin_addr,
            controller.shared.clone(),
        );
        let task = tokio::spawn(controller.run());
        let this = TestController {
            root: dir.join("ca").join(crate::ca::ROOT_CERT),
            dir: dir.to_owned(),
            grpc,
            admin,
            shared,
            shutdown,
            task,
        };
        this.wait_version(1).await?;
        Ok(this)
    }

    /// The token file of `node`.
    pub fn token(&self, node: &str) -> PathBuf {
        self.dir
            .join("tokens")
            .join(format!("{node}{}", crate::auth::TOKEN_SUFFIX))
    }

    /// Writes (or replaces, atomically) a manifest file.
    pub fn write(&self, name: &str, text: &str) -> std::io::Result<()> {
        let path = self.dir.join("manifests").join(name);
        let tmp = self.dir.join("manifests").join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(tmp, path)
    }

    /// Removes a manifest file.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.dir.join("manifests").join(name))
    }

    /// The model's current version.
    pub fn version(&self) -> u64 {
        *self.shared.version.borrow()
    }

    /// Waits (up to 10 s) until the model's version is at least `version`.
    pub async fn wait_version(&self, version: u64) -> anyhow::Result<u64> {
        let mut rx = self.shared.version.subscribe();
        let reached =
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| *v >= version)).await;
        match reached {
            Ok(Ok(v)) => Ok(*v),
            _ => anyhow::bail!(
                "the controller did not reach version {version} (it is at {})",
                self.version()
            ),
        }
    }

    /// Stops it and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A Namespace manifest.
pub fn namespace_yaml(name: &str, enrolled: bool) -> String {
    let label = if enrolled {
        "\n  labels: {weft.dev/mesh: enabled}"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{label}\n")
}

/// A Pod manifest as a runtime writes it once the pod runs: UID, node, IP, Ready.
pub fn pod_yaml(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    service_account: &str,
    ip: &str,
    labels: &[(&str, &str)],
) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: {uid}\n  labels: {{{}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {service_account}\n  containers: [{{name: main}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
        labels.join(", ")
    )
}

//! The sandbox's source: a directory where the sandbox, playing the API server, keeps
//! the Pod and Namespace objects it holds (one YAML file each, written atomically).
//! Other kinds and files are skipped; a file that cannot be read keeps what it held the
//! last time it could.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Source, View};

/// A directory of objects.
pub struct Files {
    dir: PathBuf,
}

impl Files {
    /// Reads `dir`.
    pub fn new(dir: PathBuf) -> Self {
        Files { dir }
    }
}

/// What one file held.
#[derive(Default, Clone)]
struct Held {
    pods: Vec<Pod>,
    namespaces: Vec<Namespace>,
}

/// The objects of one file's documents, or why it cannot be read.
fn read_file(path: &Path) -> Result<Held, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut held = Held::default();
    for document in serde_yaml_ng::Deserializer::from_str(&text) {
        let value = serde_yaml_ng::Value::deserialize(document).map_err(|e| e.to_string())?;
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        match kind {
            "Pod" => held
                .pods
                .push(serde_yaml_ng::from_value(value).map_err(|e| format!("a Pod: {e}"))?),
            "Namespace" => held
                .namespaces
                .push(serde_yaml_ng::from_value(value).map_err(|e| format!("a Namespace: {e}"))?),
            _ => {}
        }
    }
    Ok(held)
}

/// Reads every `*.yaml`/`*.yml` of `dir` into `files` (a file that fails keeps its last
/// reading; one that is gone is dropped) and returns the view of `node`.
fn read_dir(dir: &Path, node: &str, files: &mut BTreeMap<PathBuf, Held>) -> View {
    let paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect()
        })
        .unwrap_or_else(|e| {
            warn!(dir = %dir.display(), "cannot list the objects: {e}");
            files.keys().cloned().collect()
        });
    files.retain(|p, _| paths.contains(p));
    for path in paths {
        match read_file(&path) {
            Ok(held) => {
                files.insert(path, held);
            }
            Err(e) => warn!(file = %path.display(), "cannot read (keeping what it held): {e}"),
        }
    }
    View::new(
        node,
        files.values().flat_map(|h| &h.pods),
        files.values().flat_map(|h| &h.namespaces),
    )
}

impl Source for Files {
    fn describe(&self) -> String {
        format!("the objects in {}", self.dir.display())
    }

    fn run(
        self: Box<Self>,
        node: String,
        out: watch::Sender<Arc<View>>,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
            // inotify for promptness; a slow poll in case an event is missed.
            let watcher = crate::dir_watch::edits(&self.dir, tx);
            if let Err(e) = &watcher {
                warn!(dir = %self.dir.display(), "cannot watch (polling instead): {e}");
            }
            let mut files = BTreeMap::new();
            loop {
                let view = read_dir(&self.dir, &node, &mut files);
                out.send_if_modified(|current| {
                    let changed = **current != view;
                    if changed {
                        *current = Arc::new(view);
                    }
                    changed
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = rx.recv() => {
                        // A burst of writes is one reading.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        while rx.try_recv().is_ok() {}
                    }
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_and_namespaces_are_read_and_other_kinds_skipped() {
        let dir = std::env::temp_dir().join(format!("weft-agent-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).expect("write");
        write(
            "pod_shop_cart.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: cart, namespace: shop, uid: u-1}\nspec: {nodeName: node-1, containers: [{name: c}]}\n",
        );
        write(
            "more.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {weft.dev/mesh: enabled}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: db, namespace: shop, uid: u-2}\nspec: {nodeName: node-2, containers: [{name: c}]}\n",
        );
        write("notes.txt", "not an object");
        let mut files = BTreeMap::new();
        let view = read_dir(&dir, "node-1", &mut files);
        assert_eq!(
            view.pods.keys().collect::<Vec<_>>(),
            ["u-1"],
            "node-1's only"
        );
        assert!(view.namespace_enrolled("shop"));
        // A file broken later keeps what it held.
        write("pod_shop_cart.yaml", "kind: Pod\nmetadata: [");
        let again = read_dir(&dir, "node-1", &mut files);
        assert_eq!(again, view);
        // A file removed takes its objects with it.
        std::fs::remove_file(dir.join("pod_shop_cart.yaml")).expect("remove");
        assert!(read_dir(&dir, "node-1", &mut files).pods.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! Keeping `weft-cni` in the node's CNI chain: the agent copies the plugin into the
//! runtime's plugin directory and appends a `weft-cni` entry to the node's chained
//! configuration (the first `*.conflist`, which the cluster's network plugin wrote),
//! rewriting that file atomically. A single-plugin configuration (`.conf`, as Multus
//! writes on OpenShift) is turned into the one-plugin chain a runtime makes of it, with
//! the entry appended, under the same name ending in `.conflist`; then it watches the directory and chains the plugin
//! again whenever the network plugin rewrites its configuration without it. Installing
//! again replaces the entry, so there is always at most one; uninstalling removes the
//! entry and the binary.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipc::agent::CNI_VERSIONS as SUPPORTED_VERSIONS;
use serde_json::{Map, Value};

/// The plugin's name: its binary's and its entry's `type`.
pub const PLUGIN: &str = "weft-cni";

/// Why installing or uninstalling failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The configuration directory holds no chained configuration to join.
    #[error("no *.conflist in {0}: weft-cni is a chained plugin; install the cluster's network plugin first (it writes one)")]
    NoConflist(PathBuf),
    /// The file the runtime reads is a single-plugin configuration (`.conf`, `.json`):
    /// [`install`] makes it a chain.
    #[error("the runtime reads {first} first (the lexically first .conf, .conflist or .json), and it is not a .conflist; weft-cni turns it into one when it installs")]
    NotAConflist {
        /// The file.
        first: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is not what a runtime would accept.
    #[error("{path}: {reason}", path = .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the agent writes into the chained configuration: how the plugin reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The agent's socket.
    pub agent_socket: PathBuf,
    /// The file the agent publishes the enrolled namespaces in, for while it is down.
    pub agent_state: PathBuf,
    /// Namespaces whose pods the plugin never asks about (`kube-system` always).
    pub exclude_namespaces: Vec<String>,
    /// An enrolled pod whose capture cannot be installed starts anyway, uncaptured.
    pub fail_open: bool,
}

impl Entry {
    /// The entry as JSON.
    pub fn to_json(&self) -> Value {
        let mut entry = Map::new();
        entry.insert("type".into(), PLUGIN.into());
        entry.insert(
            "agentSocket".into(),
            self.agent_socket.display().to_string().into(),
        );
        entry.insert(
            "agentState".into(),
            self.agent_state.display().to_string().into(),
        );
        entry.insert(
            "excludeNamespaces".into(),
            Value::Array(
                self.exclude_namespaces
                    .iter()
                    .map(|n| n.as_str().into())
                    .collect(),
            ),
        );
        if self.fail_open {
            entry.insert("failOpen".into(), true.into());
        }
        Value::Object(entry)
    }
}

/// The chained configuration the runtime reads in `conf_dir`: as libcni picks it, the
/// lexically first file ending in `.conf`, `.conflist` or `.json`, which must be a
/// `.conflist` (weft-cni joins a chain; it does not start one).
pub fn primary_conflist(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(conf_dir).map_err(io(conf_dir))? {
        let path = entry.map_err(io(conf_dir))?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("conf" | "conflist" | "json")) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    match files.into_iter().next() {
        None => Err(InstallError::NoConflist(conf_dir.to_owned())),
        Some(p) if p.extension().and_then(|e| e.to_str()) == Some("conflist") => Ok(p),
        Some(first) => Err(InstallError::NotAConflist { first }),
    }
}

/// The conflist's fields, and apart from them its plugins.
fn parse(path: &Path, text: &str) -> Result<(Map<String, Value>, Vec<Value>), InstallError> {
    let invalid = |reason: String| InstallError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let Value::Object(mut list) = value else {
        return Err(invalid("not a JSON object".into()));
    };
    match list.remove("plugins") {
        Some(Value::Array(plugins)) => Ok((list, plugins)),
        _ => Err(invalid("has no \"plugins\" list".into())),
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// `text` (a conflist) with `entry` as its last plugin and no other weft-cni entry;
/// `None` if it already is exactly that.
pub fn with_entry(path: &Path, text: &str, entry: &Entry) -> Result<Option<String>, InstallError> {
    let (mut list, mut plugins) = parse(path, text)?;
    let version = list
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !SUPPORTED_VERSIONS.contains(&version) {
        // The runtime hands each plugin the list's version: weft-cni must speak it.
        return Err(InstallError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "cniVersion {version:?} is not one weft-cni speaks ({})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        });
    }
    let before = plugins.clone();
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(InstallError::Invalid {
            path: path.to_owned(),
            reason: "lists no plugin but weft-cni; the chain needs the network plugin first".into(),
        });
    }
    plugins.push(entry.to_json());
    if plugins == before {
        return Ok(None);
    }
    list.insert("plugins".into(), Value::Array(plugins));
    Ok(Some(render(&list)))
}

/// `text` (a conflist) without weft-cni entries; `None` if it has none.
pub fn without_entry(path: &Path, text: &str) -> Result<Option<String>, InstallError> {
    let (mut list, mut plugins) = parse(path, text)?;
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    list.insert("plugins".into(), Value::Array(plugins));
    Ok(Some(render(&list)))
}

fn render(list: &Map<String, Value>) -> String {
    let mut text = serde_json::to_string_pretty(list).expect("a JSON map always serializes");
    text.push('\n');
    text
}

/// Writes `contents` to `path` by renaming a finished file over it, with `mode`, so a
/// runtime reading the directory sees the old file or the new one, never a part. The
/// staging file's name is hidden and ends in neither `.conf`, `.conflist` nor `.json`.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    replace(path, None, contents, mode).map(|_| ())
}

/// [`write_atomic`], done only if `path` still holds `was` when the new file is ready
/// (`false`: it changed, nothing was written; read it again). A network plugin that
/// rewrites its configuration while the agent edits it keeps its change, bar a window
/// of one read and a rename, instead of losing it to the agent's stale copy.
fn replace_if_unchanged(
    path: &Path,
    was: &str,
    contents: &[u8],
    mode: u32,
) -> Result<bool, InstallError> {
    replace(path, Some(was), contents, mode)
}

fn replace(
    path: &Path,
    was: Option<&str>,
    contents: &[u8],
    mode: u32,
) -> Result<bool, InstallError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.weft-cni-tmp"));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        if let Some(was) = was {
            if std::fs::read_to_string(path)? != was {
                std::fs::remove_file(&tmp)?;
                return Ok(false);
            }
        }
        std::fs::rename(&tmp, path).map(|()| true)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(path)(e)
    })
}

/// How many times in a row a configuration may change under an edit before the edit
/// gives up until the next pass.
const EDIT_RACES: usize = 5;

/// What an install or uninstall did, one line each.
pub type Report = Vec<String>;

/// Copies `binary` to `<bin_dir>/weft-cni` and adds `entry` to the node's chained
/// configuration in `conf_dir`.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Entry,
) -> Result<Report, InstallError> {
    for _ in 0..EDIT_RACES {
        if let Some(report) = install_once(binary, bin_dir, conf_dir, entry)? {
            return Ok(report);
        }
    }
    Err(rewritten_meanwhile(conf_dir))
}

fn rewritten_meanwhile(conf_dir: &Path) -> InstallError {
    InstallError::Invalid {
        path: conf_dir.to_owned(),
        reason: format!(
            "the configuration changed while weft-cni was being edited in, {EDIT_RACES} times in a row (another writer?); trying again later"
        ),
    }
}

/// One [`install`]; `None` if the configuration changed since it was read.
fn install_once(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Entry,
) -> Result<Option<Report>, InstallError> {
    let mut report = Vec::new();
    // The configuration first: a directory without a chain to join fails before the
    // binary is copied.
    let (conflist, text, single) = match primary_conflist(conf_dir) {
        Ok(path) => {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            (path, text, None)
        }
        Err(InstallError::NotAConflist { first }) => {
            let text = std::fs::read_to_string(&first).map_err(io(&first))?;
            let list = single_as_list(&first, &text)?;
            (first.with_extension("conflist"), list, Some((first, text)))
        }
        Err(e) => return Err(e),
    };
    let updated = with_entry(&conflist, &text, entry)?;
    // The plugin before the configuration that names it.
    copy_plugin(&mut report, binary, bin_dir)?;
    if let Some((single, was)) = single {
        // The chain is written beside the single configuration, then that goes, so the
        // runtime reads one or the other, whole; neither while the single one is
        // rewritten meanwhile.
        let unchanged = || {
            std::fs::read_to_string(&single)
                .map(|now| now == was)
                .map_err(io(&single))
        };
        let mode = std::fs::metadata(&single)
            .map_err(io(&single))?
            .permissions()
            .mode()
            & 0o7777;
        if !unchanged()? {
            return Ok(None);
        }
        write_atomic(&conflist, updated.unwrap_or(text).as_bytes(), mode)?;
        if !unchanged()? {
            let _ = std::fs::remove_file(&conflist);
            return Ok(None);
        }
        std::fs::remove_file(&single).map_err(io(&single))?;
        report.push(format!(
            "made {} a chain, {}, with weft-cni",
            single.display(),
            conflist.display()
        ));
        return Ok(Some(report));
    }
    finish(report, &conflist, &text, updated)
}

/// A single-plugin configuration as the chain a runtime makes of it: the list takes its
/// `cniVersion` and `name`, the plugin is its one entry.
fn single_as_list(path: &Path, text: &str) -> Result<String, InstallError> {
    let invalid = |reason: &str| InstallError::Invalid {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let value: Value = serde_json::from_str(text).map_err(|e| InstallError::Invalid {
        path: path.to_owned(),
        reason: format!("not JSON: {e}"),
    })?;
    let Value::Object(mut plugin) = value else {
        return Err(invalid("not a JSON object"));
    };
    if !plugin.get("type").is_some_and(Value::is_string) {
        return Err(invalid(
            "has no plugin \"type\": not a single-plugin configuration",
        ));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = plugin.remove(key) {
            list.insert(key.into(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(plugin)]));
    Ok(render(&list))
}

/// Copies the plugin into `bin_dir`, unless it is there already.
fn copy_plugin(report: &mut Report, binary: &Path, bin_dir: &Path) -> Result<(), InstallError> {
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    let target = bin_dir.join(PLUGIN);
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(binary, &target) {
        return Ok(());
    }
    let bytes = std::fs::read(binary).map_err(io(binary))?;
    // Rewritten only when it differs: a runtime may be running it right now.
    if std::fs::read(&target).ok().as_deref() == Some(&bytes[..]) {
        return Ok(());
    }
    write_atomic(&target, &bytes, 0o755)?;
    report.push(format!(
        "copied {} to {}",
        binary.display(),
        target.display()
    ));
    Ok(())
}

/// Writes the conflist with the entry, if it changed.
fn finish(
    mut report: Report,
    conflist: &Path,
    was: &str,
    updated: Option<String>,
) -> Result<Option<Report>, InstallError> {
    match updated {
        Some(text) => {
            let mode = std::fs::metadata(conflist)
                .map_err(io(conflist))?
                .permissions()
                .mode()
                & 0o7777;
            if !replace_if_unchanged(conflist, was, text.as_bytes(), mode)? {
                return Ok(None);
            }
            report.push(format!("added weft-cni to {}", conflist.display()));
        }
        None => report.push(format!("{} already chains weft-cni", conflist.display())),
    }
    Ok(Some(report))
}

/// Whether `conf_dir`'s chain ends with exactly `entry` and the plugin is in `bin_dir`:
/// a cheap check, read every second.
pub fn chained(bin_dir: &Path, conf_dir: &Path, entry: &Entry) -> bool {
    let Ok(conflist) = primary_conflist(conf_dir) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(&conflist) else {
        return false;
    };
    bin_dir.join(PLUGIN).is_file() && matches!(with_entry(&conflist, &text, entry), Ok(None))
}

/// Where the plugin comes from and goes, and the entry that chains it.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The plugin binary to copy (in the agent's image).
    pub binary: PathBuf,
    /// The runtime's plugin directory.
    pub bin_dir: PathBuf,
    /// The runtime's configuration directory.
    pub conf_dir: PathBuf,
    /// The entry.
    pub entry: Entry,
}

/// Keeps weft-cni chained until `shutdown`: installs it, then looks at the
/// configuration directory every second (and whenever it changes) and chains the plugin
/// again when the cluster's network plugin has rewritten its configuration without it.
/// `chained` says whether it is in the chain now.
///
/// The first pass installs whatever [`chained`] says: an upgraded agent finds the chain
/// in place and an older plugin in `bin_dir`, which [`install`] replaces (it rewrites
/// only what differs). The later passes only check.
pub async fn keep(
    chain: Chain,
    chained_now: tokio::sync::watch::Sender<bool>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = crate::dir_watch::edits(&chain.conf_dir, tx);
    if let Err(e) = &watcher {
        tracing::warn!(dir = %chain.conf_dir.display(), "cannot watch (checking every second): {e}");
    }
    let mut last_error = None;
    let mut first = true;
    loop {
        if first || !chained(&chain.bin_dir, &chain.conf_dir, &chain.entry) {
            let c = chain.clone();
            let result = tokio::task::spawn_blocking(move || {
                install(&c.binary, &c.bin_dir, &c.conf_dir, &c.entry)
            })
            .await
            .unwrap_or_else(|e| {
                Err(InstallError::Invalid {
                    path: chain.conf_dir.clone(),
                    reason: format!("the install task failed: {e}"),
                })
            });
            match result {
                Ok(report) => {
                    for line in report {
                        match first {
                            true => tracing::info!("{line}"),
                            false => tracing::warn!(
                                "the node's CNI configuration lost weft-cni (rewritten by the network plugin?): {line}"
                            ),
                        }
                    }
                    last_error = None;
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!("cannot chain weft-cni (retrying): {text}");
                        last_error = Some(text);
                    }
                }
            }
        }
        first = false;
        chained_now.send_replace(chained(&chain.bin_dir, &chain.conf_dir, &chain.entry));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = rx.recv() => {
                // The network plugin may write several files in a row.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// Removes weft-cni from every chained configuration in `conf_dir` and its binary from
/// `bin_dir`; what is already gone is not an error.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Report, InstallError> {
    let mut report = Vec::new();
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries
            .collect::<Result<Vec<_>, _>>()
            .map_err(io(conf_dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    let mut lists: Vec<PathBuf> = entries
        .into_iter()
        .map(|e| e.path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("conflist"))
        .collect();
    lists.sort();
    for conflist in lists {
        let mut removed = false;
        for _ in 0..EDIT_RACES {
            let was = std::fs::read_to_string(&conflist).map_err(io(&conflist))?;
            let Some(text) = without_entry(&conflist, &was)? else {
                removed = true;
                break;
            };
            let mode = std::fs::metadata(&conflist)
                .map_err(io(&conflist))?
                .permissions()
                .mode()
                & 0o7777;
            if replace_if_unchanged(&conflist, &was, text.as_bytes(), mode)? {
                report.push(format!("removed weft-cni from {}", conflist.display()));
                removed = true;
                break;
            }
        }
        if !removed {
            return Err(rewritten_meanwhile(conf_dir));
        }
    }
    let target = bin_dir.join(PLUGIN);
    match std::fs::remove_file(&target) {
        Ok(()) => report.push(format!("removed {}", target.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&target)(e)),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A scratch directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("weft-cni-install-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("net.d")).expect("create test dir");
            Dir(dir)
        }
        fn conf(&self) -> PathBuf {
            self.0.join("net.d")
        }
        fn bin(&self) -> PathBuf {
            self.0.join("bin")
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.conf().join(name);
            std::fs::write(&p, text).expect("write");
            p
        }
        /// A stand-in for the plugin binary.
        fn binary(&self) -> PathBuf {
            let p = self.0.join("weft-cni-build");
            std::fs::write(&p, "#!/bin/sh\n").expect("write");
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    fn entry() -> Entry {
        Entry {
            agent_socket: "/run/weft/node-agent.sock".into(),
            agent_state: "/run/weft/node-agent.json".into(),
            exclude_namespaces: vec!["kube-system".into()],
            fail_open: false,
        }
    }

    fn plugins(path: &Path) -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON");
        v["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// The network plugin rewrote its configuration after the agent read it: the agent's
    /// edit of the old text is not written over the new, and leaves no staging file.
    #[test]
    fn a_configuration_rewritten_after_it_was_read_is_not_written_over() {
        let dir = Dir::new("race");
        let path = dir.write("10-net.conflist", BRIDGE);
        let rewritten = BRIDGE.replace("10.244.1.0/24", "10.244.9.0/24");
        let read_before = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, &rewritten).expect("the network plugin writes");
        let edit = with_entry(&path, &read_before, &entry())
            .expect("edit")
            .expect("an entry to add");
        assert!(!replace_if_unchanged(&path, &read_before, edit.as_bytes(), 0o644).expect("io"));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), rewritten);
        let left: Vec<_> = std::fs::read_dir(dir.conf())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("10-net.conflist")]);
        // Read again, the edit goes in, over the network plugin's text.
        let report = install(&dir.binary(), &dir.bin(), &dir.conf(), &entry()).expect("install");
        assert!(
            report.iter().any(|l| l.starts_with("added weft-cni")),
            "{report:?}"
        );
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.contains("10.244.9.0/24") && text.contains("weft-cni"),
            "{text}"
        );
    }

    #[test]
    fn install_twice_leaves_one_entry_and_uninstall_removes_it() {
        let d = Dir::new("twice");
        let list = d.write("10-bridge.conflist", BRIDGE);
        d.write("99-other.conflist", BRIDGE);
        let binary = d.binary();
        let first = install(&binary, &d.bin(), &d.conf(), &entry()).expect("install");
        assert_eq!(first.len(), 2, "{first:?}");
        let after_first = std::fs::read_to_string(&list).expect("read");
        let second = install(&binary, &d.bin(), &d.conf(), &entry()).expect("install again");
        assert!(
            second.iter().any(|l| l.contains("already chains")),
            "{second:?}"
        );
        assert_eq!(
            std::fs::read_to_string(&list).expect("read"),
            after_first,
            "unchanged"
        );
        let p = plugins(&list);
        assert_eq!(p.len(), 3);
        assert_eq!(p[0]["type"], "bridge", "the chain keeps its order");
        assert_eq!(p[0]["ipam"]["subnet"], "10.244.1.0/24", "and its fields");
        assert_eq!(
            p[2],
            json!({"type": "weft-cni", "agentSocket": "/run/weft/node-agent.sock",
                   "agentState": "/run/weft/node-agent.json",
                   "excludeNamespaces": ["kube-system"]})
        );
        assert_eq!(
            plugins(&d.conf().join("99-other.conflist")).len(),
            2,
            "only the first list"
        );
        let bin = d.bin().join(PLUGIN);
        assert_eq!(
            std::fs::metadata(&bin)
                .expect("copied")
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        let leftovers: Vec<_> = std::fs::read_dir(d.conf())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "no staging files: {leftovers:?}");

        // New options replace the entry.
        let other = Entry {
            agent_socket: "/run/weft/other.sock".into(),
            fail_open: true,
            ..entry()
        };
        install(&binary, &d.bin(), &d.conf(), &other).expect("reinstall");
        let p = plugins(&list);
        assert_eq!(p.len(), 3);
        assert_eq!(p[2]["agentSocket"], "/run/weft/other.sock");
        assert_eq!(p[2]["failOpen"], true);

        let removed = uninstall(&d.bin(), &d.conf()).expect("uninstall");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(plugins(&list).len(), 2);
        assert!(!bin.exists());
        let again = uninstall(&d.bin(), &d.conf()).expect("uninstall again");
        assert!(again.is_empty(), "{again:?}");
    }

    /// An upgrade of the agent finds the chain in place, made by the release before,
    /// and that release's plugin in the runtime's directory: the new plugin replaces it.
    #[tokio::test]
    async fn an_upgraded_agent_replaces_the_plugin_of_the_release_before() {
        let d = Dir::new("upgrade");
        d.write("10-bridge.conflist", BRIDGE);
        let binary = d.binary();
        install(&binary, &d.bin(), &d.conf(), &entry()).expect("install");
        std::fs::write(&binary, "#!/bin/sh\n# the next release\n").expect("write");
        assert!(
            chained(&d.bin(), &d.conf(), &entry()),
            "the chain is in place"
        );

        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let chain = Chain {
            binary: binary.clone(),
            bin_dir: d.bin(),
            conf_dir: d.conf(),
            entry: entry(),
        };
        let kept = tokio::spawn(keep(chain, tx, shutdown.clone()));
        rx.wait_for(|chained| *chained).await.expect("keep runs");
        shutdown.cancel();
        kept.await.expect("keep ends");
        assert_eq!(
            std::fs::read(d.bin().join(PLUGIN)).expect("read the plugin"),
            std::fs::read(&binary).expect("read the new plugin"),
            "the runtime's plugin is the new release's"
        );
    }

    /// Multus on OpenShift writes `00-multus.conf`, one plugin: the runtime reads it
    /// first, so weft-cni joins it as the one-plugin chain the runtime makes of it.
    #[test]
    fn a_single_plugin_configuration_becomes_a_chain_with_weft_cni() {
        let d = Dir::new("single");
        let single = d.write(
            "00-multus.conf",
            r#"{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus-shim","logLevel":"verbose"}"#,
        );
        d.write("10-ovn-kubernetes.conflist", BRIDGE);
        let binary = d.binary();
        assert!(!chained(&d.bin(), &d.conf(), &entry()));
        let report = install(&binary, &d.bin(), &d.conf(), &entry()).expect("install");
        assert!(
            report[0].starts_with("copied"),
            "the plugin first: {report:?}"
        );
        assert!(report[1].contains("made"), "{report:?}");
        assert!(!single.exists(), "the single configuration is replaced");
        let list = d.conf().join("00-multus.conflist");
        assert_eq!(
            primary_conflist(&d.conf()).expect("a chain now"),
            list,
            "the runtime reads the chain first"
        );
        let text: Value =
            serde_json::from_str(&std::fs::read_to_string(&list).expect("read")).expect("JSON");
        assert_eq!(text["cniVersion"], "0.3.1");
        assert_eq!(text["name"], "multus-cni-network");
        let p = plugins(&list);
        assert_eq!(
            p[0],
            json!({"type": "multus-shim", "logLevel": "verbose"}),
            "the plugin, whole"
        );
        assert_eq!(p[1]["type"], PLUGIN);
        assert!(chained(&d.bin(), &d.conf(), &entry()));
        // Multus writes its file again: chained again, one entry.
        d.write(
            "00-multus.conf",
            r#"{"cniVersion":"0.3.1","name":"multus-cni-network","type":"multus-shim"}"#,
        );
        assert!(!chained(&d.bin(), &d.conf(), &entry()));
        install(&binary, &d.bin(), &d.conf(), &entry()).expect("again");
        assert_eq!(plugins(&list).len(), 2);
        uninstall(&d.bin(), &d.conf()).expect("uninstall");
        assert_eq!(
            plugins(&list).len(),
            1,
            "the chain is left with the plugin alone"
        );
    }

    #[test]
    fn install_refuses_what_it_cannot_join() {
        let d = Dir::new("refuse");
        let binary = d.binary();
        let err = |d: &Dir| {
            install(&binary, &d.bin(), &d.conf(), &entry())
                .expect_err("refused")
                .to_string()
        };
        assert!(err(&d).starts_with("no *.conflist in"), "{}", err(&d));
        d.write("05-single.conf", r#"{"cniVersion":"1.0.0","name":"n"}"#);
        assert!(err(&d).contains("has no plugin \"type\""), "{}", err(&d));
        std::fs::remove_file(d.conf().join("05-single.conf")).expect("rm");
        let list = d.write("10-bridge.conflist", "{not json");
        assert!(err(&d).contains("not JSON"), "{}", err(&d));
        d.write("10-bridge.conflist", r#"{"cniVersion":"1.0.0","name":"n"}"#);
        assert!(err(&d).contains("has no \"plugins\" list"), "{}", err(&d));
        d.write(
            "10-bridge.conflist",
            r#"{"cniVersion":"0.2.0","name":"n","plugins":[{"type":"bridge"}]}"#,
        );
        assert!(
            err(&d).contains("\"0.2.0\" is not one weft-cni speaks"),
            "{}",
            err(&d)
        );
        d.write(
            "10-bridge.conflist",
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"weft-cni"}]}"#,
        );
        assert!(
            err(&d).contains("needs the network plugin first"),
            "{}",
            err(&d)
        );
        assert!(!d.bin().join(PLUGIN).exists(), "nothing copied on failure");
        assert_eq!(plugins(&list).len(), 1, "the file is left as it was");
    }
}

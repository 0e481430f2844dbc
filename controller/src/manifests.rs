//! The manifest-directory source: `--manifests DIR` (repeatable) read and watched as
//! the cluster's objects.
//!
//! ```text
//!  DIR/*.yaml|*.yml (sorted) -> documents (split at `---`) -> YAML -> kind dispatch
//!     -> typed objects (k8s-openapi, gateway-api, weft CRDs) with file and line
//!  inotify -> changed files re-read -> Objects (later DIR overrides earlier) -> translate
//! ```
//!
//! One bad document costs only itself: it becomes a [`Problem`] and the rest of the
//! file is used. A file that is not valid YAML at all keeps the objects it held the last
//! time it was read (nothing half-applied), and the problem names the file and line.
//! Kinds the controller does not read (Deployments, ConfigMaps, ...) are skipped, so a
//! directory of a real application's manifests can be pointed at as it is.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::objects::{AnyObject, Effect, ObjectKind, ObjectRef, Objects, Origin, Problem};
use crate::source::{Snapshot, Source};

/// One YAML document of a file, and the line it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Document<'a> {
    /// Its text.
    pub text: &'a str,
    /// The line of its first line in the file, from 1.
    pub line: usize,
}

/// Splits a YAML stream into documents at `---` lines, as kubectl does, keeping each
/// document's first line so errors can point into the file.
pub fn documents(text: &str) -> Vec<Document<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        let separator = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
        if separator {
            out.push(Document {
                text: &text[start..offset],
                line: start_line,
            });
            start = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    out.push(Document {
        text: &text[start..],
        line: start_line,
    });
    out.retain(|d| !d.text.trim().is_empty());
    out
}

/// A YAML or decoding error of a document, as `message (line N, column M)` with the
/// line counted in the whole file.
pub fn describe_yaml_error(doc: &Document<'_>, e: &serde_yaml_ng::Error) -> (usize, String) {
    let text = e.to_string();
    let message = text
        .find(" at line ")
        .map_or(text.as_str(), |at| &text[..at])
        .to_owned();
    match e.location() {
        Some(loc) => {
            // At the end of a text without a final line break the parser points one
            // line past it: name the last line instead.
            let line = doc.line + loc.line().saturating_sub(1).min(yaml_lines(doc.text) - 1);
            (
                line,
                format!("{message} (line {line}, column {})", loc.column()),
            )
        }
        None => (doc.line, message),
    }
}

/// How many lines YAML counts in `text`: a line ends at `\n`, `\r\n` or a lone `\r`.
pub fn yaml_lines(text: &str) -> usize {
    text.replace("\r\n", "\n").split(['\r', '\n']).count()
}

/// A file that is not YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// The line, in the whole file.
    pub line: usize,
    /// What the parser said, with line and column.
    pub message: String,
}

/// What one file holds.
#[derive(Debug, Clone, Default)]
pub struct FileObjects {
    /// The objects the controller reads, with their origins.
    pub objects: Vec<(AnyObject, Origin)>,
    /// Documents that could not be used.
    pub problems: Vec<Problem>,
    /// Documents of kinds the controller does not read.
    pub skipped: usize,
}

/// Reads one file's text. A YAML syntax error anywhere fails the whole file (what the
/// edit meant is unknown); documents that are YAML but not valid objects are reported
/// one by one.
pub fn parse_file(path: &Path, text: &str) -> Result<FileObjects, SyntaxError> {
    let path: Arc<Path> = Arc::from(path);
    let docs = documents(text);
    let mut values = Vec::with_capacity(docs.len());
    for doc in &docs {
        match serde_yaml_ng::from_str::<Value>(doc.text) {
            Ok(v) => values.push(v),
            Err(e) => {
                let (line, message) = describe_yaml_error(doc, &e);
                return Err(SyntaxError { line, message });
            }
        }
    }
    let mut out = FileObjects::default();
    for (doc, value) in docs.iter().zip(values) {
        let origin = Origin::File {
            path: path.clone(),
            line: doc.line,
        };
        if value.is_null() {
            continue;
        }
        read_document(&mut out, doc, &value, &origin);
    }
    Ok(out)
}

fn file_problem(origin: &Origin, reason: String) -> Problem {
    Problem {
        object: None,
        origin: origin.clone(),
        field: String::new(),
        reason,
        effect: Effect::Rejected,
        condition_reason: "Invalid",
    }
}

fn read_document(out: &mut FileObjects, doc: &Document<'_>, value: &Value, origin: &Origin) {
    let str_field = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) =
        (str_field(value, "apiVersion"), str_field(value, "kind"))
    else {
        out.problems.push(file_problem(
            origin,
            "the document has no apiVersion or kind; every document must be a Kubernetes object"
                .into(),
        ));
        return;
    };
    if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
        let items = value
            .get("items")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for (i, item) in items.iter().enumerate() {
            read_value(out, item, origin, &format!("items[{i}]"));
        }
        return;
    }
    let Some((object_kind, version)) = ObjectKind::of(&api_version, &kind) else {
        out.skipped += 1;
        return;
    };
    let reference = reference_of(object_kind, value);
    if version.is_empty() {
        out.problems.push(Problem {
            object: Some(reference),
            origin: origin.clone(),
            field: "apiVersion".into(),
            reason: format!(
                "{api_version} is not a version Weft reads; use {}/{}",
                object_kind.group(),
                object_kind.versions()[0]
            )
            .replace("//", "/")
            .trim_start_matches('/')
            .to_owned(),
            effect: Effect::Rejected,
            condition_reason: "Invalid",
        });
        return;
    }
    // Decoded from the document's own text, so schema errors carry line and column.
    let decoded = decode(object_kind, serde_yaml_ng::Deserializer::from_str(doc.text));
    push_decoded(
        out,
        reference,
        origin,
        decoded.map_err(|e| describe_yaml_error(doc, &e).1),
    );
}

fn read_value(out: &mut FileObjects, value: &Value, origin: &Origin, at: &str) {
    let str_field = |key: &str| value.get(key).and_then(Value::as_str).map(str::to_owned);
    let (Some(api_version), Some(kind)) = (str_field("apiVersion"), str_field("kind")) else {
        out.problems.push(file_problem(
            origin,
            format!("{at}: has no apiVersion or kind"),
        ));
        return;
    };
    let Some((object_kind, version)) = ObjectKind::of(&api_version, &kind) else {
        out.skipped += 1;
        return;
    };
    let reference = reference_of(object_kind, value);
    if version.is_empty() {
        out.problems.push(Problem {
            object: Some(reference),
            origin: origin.clone(),
            field: format!("{at}.apiVersion"),
            reason: format!("{api_version} is not a version Weft reads"),
            effect: Effect::Rejected,
            condition_reason: "Invalid",
        });
        return;
    }
    let decoded = decode(object_kind, value.clone()).map_err(|e| format!("{at}: {e}"));
    push_decoded(out, reference, origin, decoded);
}

fn push_decoded(
    out: &mut FileObjects,
    reference: ObjectRef,
    origin: &Origin,
    decoded: Result<AnyObject, String>,
) {
    if reference.name.is_empty() {
        out.problems.push(Problem {
            object: Some(reference),
            origin: origin.clone(),
            field: "metadata.name".into(),
            reason: "is missing; give every object a name".into(),
            effect: Effect::Rejected,
            condition_reason: "Invalid",
        });
        return;
    }
    match decoded {
        // Checked as decoded, which is what the controller uses: a tag with no value
        // (`namespace: !x`) reads as no namespace in the text but decodes as "".
        Ok(object) => match check_names(&object.reference()).and_then(|()| check_labels(&object)) {
            Ok(()) => out.objects.push((object, origin.clone())),
            Err((field, reason)) => out.problems.push(Problem {
                object: Some(object.reference()),
                origin: origin.clone(),
                field,
                reason,
                effect: Effect::Rejected,
                condition_reason: "Invalid",
            }),
        },
        Err(reason) => out.problems.push(Problem {
            object: Some(reference),
            origin: origin.clone(),
            field: String::new(),
            reason: format!("does not match the schema of its kind: {reason}"),
            effect: Effect::Rejected,
            condition_reason: "Invalid",
        }),
    }
}

/// The API server's checks of `metadata.name` and `metadata.namespace`, which a
/// manifest directory stands in for: a namespace name is a DNS-1123 label, a Service
/// name a DNS-1035 label (it starts with a letter), every other name a DNS-1123
/// subdomain. A name outside them would become a key a proxy refuses.
fn check_names(reference: &ObjectRef) -> Result<(), (String, String)> {
    use tunnel::identity::{check_dns_label, check_dns_subdomain};
    let explain = |field: &str, value: &str, rule: &str, why: &str| {
        (
            field.to_owned(),
            format!("{value:?} is not a {rule}: {why}"),
        )
    };
    if let Some(namespace) = &reference.namespace {
        check_dns_label(namespace)
            .map_err(|why| explain("metadata.namespace", namespace, "namespace name", why))?;
    }
    let name = reference.name.as_str();
    let (rule, checked) = match reference.kind {
        ObjectKind::Namespace => ("DNS-1123 label", check_dns_label(name)),
        ObjectKind::Service => (
            "DNS-1035 label, as a Service name must be",
            check_dns_label(name).and_then(|()| {
                if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                    Ok(())
                } else {
                    Err("it must start with a letter")
                }
            }),
        ),
        _ => ("DNS-1123 subdomain", check_dns_subdomain(name)),
    };
    checked.map_err(|why| explain("metadata.name", name, rule, why))
}

/// The API server's checks of `metadata.labels` and `metadata.annotations`: every key a
/// qualified name (`[prefix/]name`), every label value at most 63 characters of the same
/// alphabet or empty, the annotations at most 256 KiB in all.
fn check_labels(object: &AnyObject) -> Result<(), (String, String)> {
    let meta = object.metadata();
    for (key, value) in meta.labels.iter().flatten() {
        check_qualified_name(key).map_err(|why| {
            (
                "metadata.labels".into(),
                format!("key {key:?} is invalid: {why}"),
            )
        })?;
        if !value.is_empty() {
            check_name_part(value).map_err(|why| {
                (
                    format!("metadata.labels[{key}]"),
                    format!("{value:?} is not a label value: {why}"),
                )
            })?;
        }
    }
    let mut size = 0;
    for (key, value) in meta.annotations.iter().flatten() {
        check_qualified_name(&key.to_ascii_lowercase()).map_err(|why| {
            (
                "metadata.annotations".into(),
                format!("key {key:?} is invalid: {why}"),
            )
        })?;
        size += key.len() + value.len();
    }
    if size > 256 * 1024 {
        return Err((
            "metadata.annotations".into(),
            format!("they hold {size} bytes; the API server takes at most 262144"),
        ));
    }
    Ok(())
}

/// A qualified name, as label and annotation keys are: an optional DNS-1123 subdomain
/// prefix and `/`, then a name part.
fn check_qualified_name(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            tunnel::identity::check_dns_subdomain(prefix).map_err(|why| {
                format!("its prefix {prefix:?} is not a DNS-1123 subdomain: {why}")
            })?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("the name after the prefix is empty".into());
    }
    check_name_part(name).map_err(str::to_owned)
}

/// The name part of a qualified name, and a non-empty label value: at most 63
/// characters, letters, digits, '-', '_' and '.', starting and ending with a letter or
/// digit.
fn check_name_part(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    if !s.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !s.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

fn reference_of(kind: ObjectKind, value: &Value) -> ObjectRef {
    let meta = |key: &str| {
        value
            .get("metadata")
            .and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    ObjectRef {
        kind,
        namespace: kind
            .namespaced()
            .then(|| meta("namespace").unwrap_or_else(|| "default".into())),
        name: meta("name").unwrap_or_default(),
    }
}

/// One object of `kind` from a YAML deserializer (a document's text, or a value).
pub(crate) fn decode<'de, D>(kind: ObjectKind, d: D) -> Result<AnyObject, serde_yaml_ng::Error>
where
    D: serde::Deserializer<'de, Error = serde_yaml_ng::Error>,
{
    fn typed<
        'de,
        T: DeserializeOwned,
        D: serde::Deserializer<'de, Error = serde_yaml_ng::Error>,
    >(
        d: D,
    ) -> Result<Arc<T>, serde_yaml_ng::Error> {
        T::deserialize(d).map(Arc::new)
    }
    Ok(match kind {
        ObjectKind::Namespace => AnyObject::Namespace(typed(d)?),
        ObjectKind::Pod => AnyObject::Pod(typed(d)?),
        ObjectKind::Service => AnyObject::Service(typed(d)?),
        ObjectKind::EndpointSlice => AnyObject::EndpointSlice(typed(d)?),
        ObjectKind::Gateway => AnyObject::Gateway(typed(d)?),
        ObjectKind::HttpRoute => AnyObject::HttpRoute(typed(d)?),
        ObjectKind::GrpcRoute => AnyObject::GrpcRoute(typed(d)?),
        ObjectKind::ReferenceGrant => AnyObject::ReferenceGrant(typed(d)?),
        ObjectKind::AuthorizationPolicy => AnyObject::AuthorizationPolicy(typed(d)?),
        ObjectKind::TrafficPolicy => AnyObject::TrafficPolicy(typed(d)?),
        ObjectKind::WaypointParameters => AnyObject::WaypointParameters(typed(d)?),
    })
}

/// The YAML files directly in `dir`, in name order.
pub fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if is_yaml(&path) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// A file as last read.
#[derive(Debug, Default)]
struct FileState {
    /// (modified, length) when read.
    stamp: Option<(SystemTime, u64)>,
    text: String,
    /// What it held the last time it was valid YAML.
    good: Option<Arc<FileObjects>>,
    /// Why the current text is not used.
    error: Option<SyntaxError>,
}

#[derive(Debug, Default)]
struct Files {
    /// Per directory (in `--manifests` order), per file.
    dirs: Vec<BTreeMap<PathBuf, FileState>>,
    /// Directories that could not be listed, with why.
    unreadable: BTreeMap<usize, String>,
}

/// The manifest directories as a [`Source`].
pub struct ManifestSource {
    dirs: Vec<PathBuf>,
    files: Mutex<Files>,
}

impl ManifestSource {
    /// Reads `dirs` once; fails if one cannot be listed (a typo in a flag should stop
    /// the controller, not produce an empty mesh).
    pub fn new(dirs: Vec<PathBuf>) -> Result<Arc<Self>, std::io::Error> {
        for dir in &dirs {
            std::fs::read_dir(dir).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot read manifest directory {}: {e}", dir.display()),
                )
            })?;
        }
        let source = Arc::new(ManifestSource {
            files: Mutex::new(Files {
                dirs: dirs.iter().map(|_| BTreeMap::new()).collect(),
                unreadable: BTreeMap::new(),
            }),
            dirs,
        });
        source.rescan(None);
        Ok(source)
    }

    /// Re-reads the files of every directory, or only `paths` when given; true when
    /// anything changed.
    fn rescan(&self, paths: Option<&HashSet<PathBuf>>) -> bool {
        let mut files = self
            .files
            .lock()
            .expect("manifest files lock is never poisoned");
        let mut changed = false;
        for (i, dir) in self.dirs.iter().enumerate() {
            if let Some(only) = paths {
                // Only the files an event named: a directory of thousands is not listed
                // for one edit.
                let state = &mut files.dirs[i];
                for path in only
                    .iter()
                    .filter(|p| p.parent() == Some(dir.as_path()) && is_yaml(p))
                {
                    if path.is_file() {
                        changed |= read_into(state.entry(path.clone()).or_default(), path);
                    } else {
                        changed |= state.remove(path).is_some();
                    }
                }
                continue;
            }
            let listed = match yaml_files(dir) {
                Ok(l) => {
                    changed |= files.unreadable.remove(&i).is_some();
                    l
                }
                Err(e) => {
                    let why = format!("cannot list {}: {e}; keeping what it held", dir.display());
                    if files.unreadable.get(&i) != Some(&why) {
                        warn!("{why}");
                        files.unreadable.insert(i, why);
                        changed = true;
                    }
                    continue;
                }
            };
            let state = &mut files.dirs[i];
            let present: HashSet<&PathBuf> = listed.iter().collect();
            let before = state.len();
            state.retain(|p, _| present.contains(p));
            changed |= state.len() != before;
            for path in &listed {
                changed |= read_into(state.entry(path.clone()).or_default(), path);
            }
        }
        changed
    }

    /// Watches the directories until `shutdown`, notifying `changed` after each batch of
    /// edits. inotify events name the files to re-read; a full rescan every 30 s
    /// catches anything they missed.
    pub async fn watch(self: Arc<Self>, changed: Arc<Notify>, shutdown: CancellationToken) {
        use notify::Watcher;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<Vec<PathBuf>>>();
        let handler = move |event: notify::Result<notify::Event>| match event {
            Ok(e) if is_edit(&e.kind) => {
                let _ = tx.send(Some(e.paths));
            }
            Ok(_) => {}
            Err(_) => {
                let _ = tx.send(None);
            }
        };
        let mut watcher = match notify::recommended_watcher(handler) {
            Ok(w) => Some(w),
            Err(e) => {
                warn!("cannot watch the manifest directories ({e}); rescanning them every second instead");
                None
            }
        };
        if let Some(w) = watcher.as_mut() {
            for dir in &self.dirs {
                if let Err(e) = w.watch(dir, notify::RecursiveMode::NonRecursive) {
                    warn!(
                        "cannot watch {}: {e}; rescanning it periodically",
                        dir.display()
                    );
                }
            }
        }
        let full_every = if watcher.is_some() {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(1)
        };
        let mut full = tokio::time::interval(full_every);
        full.tick().await;
        loop {
            let mut paths = HashSet::new();
            let mut everything = false;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = full.tick() => everything = true,
                event = rx.recv() => match event {
                    None => return,
                    Some(None) => everything = true,
                    Some(Some(p)) => paths.extend(p),
                },
            }
            // Editors and `kubectl`-like writers touch a file several times in a row:
            // take what arrives within a few milliseconds as one change.
            let settle = tokio::time::sleep(Duration::from_millis(5));
            tokio::pin!(settle);
            loop {
                tokio::select! {
                    _ = &mut settle => break,
                    event = rx.recv() => match event {
                        Some(Some(p)) => paths.extend(p),
                        Some(None) => everything = true,
                        None => break,
                    },
                }
            }
            let this = self.clone();
            let only = (!everything).then_some(paths);
            let changed_now = tokio::task::spawn_blocking(move || this.rescan(only.as_ref()))
                .await
                .unwrap_or(false);
            if changed_now {
                changed.notify_one();
            }
        }
    }
}

/// Whether an inotify event can mean a manifest changed. inotify also reports a file
/// being opened (notify's `Access`); counted as a change, every reader of the directories
/// (the sandbox's node agents, this watcher's own rescans) would keep the controller
/// rescanning. A file closed after writing is a change.
fn is_edit(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Re-reads one file into its state; true when what it contributes changed.
fn read_into(state: &mut FileState, path: &Path) -> bool {
    let stamp = std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())));
    if stamp.is_some() && stamp == state.stamp {
        return false;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            let error = SyntaxError {
                line: 1,
                message: format!("cannot read: {e}"),
            };
            let changed = state.error.as_ref() != Some(&error);
            state.error = Some(error);
            return changed;
        }
    };
    state.stamp = stamp;
    if text == state.text && (state.good.is_some() || state.error.is_some()) {
        return false;
    }
    state.text = text;
    match parse_file(path, &state.text) {
        Ok(objects) => {
            if state.error.take().is_some() {
                info!("{}: valid YAML again", path.display());
            }
            debug!(file = %path.display(), objects = objects.objects.len(), "manifest read");
            state.good = Some(Arc::new(objects));
        }
        Err(e) => {
            warn!(
                "{}:{}: not valid YAML: {}; keeping the objects it held before",
                path.display(),
                e.line,
                e.message
            );
            state.error = Some(e);
        }
    }
    true
}

impl Source for ManifestSource {
    fn snapshot(&self) -> Snapshot {
        let files = self
            .files
            .lock()
            .expect("manifest files lock is never poisoned");
        let mut objects = Objects::default();
        let mut problems = Vec::new();
        for (i, dir) in files.dirs.iter().enumerate() {
            if let Some(why) = files.unreadable.get(&i) {
                problems.push(file_problem(
                    &Origin::File {
                        path: Arc::from(self.dirs[i].as_path()),
                        line: 1,
                    },
                    why.clone(),
                ));
            }
            // A later directory overrides the objects of earlier ones (the sandbox adds
            // what an API server would: UIDs, addresses); within one, a second definition
            // is an error.
            // The first directory's objects go straight into the set (nothing is
            // there to override): most sources have one, and this is their cost.
            let first = objects.is_empty();
            let mut later = Objects::default();
            let here = if first { &mut objects } else { &mut later };
            for (path, state) in dir {
                if let Some(e) = &state.error {
                    problems.push(Problem {
                        object: None,
                        origin: Origin::File {
                            path: Arc::from(path.as_path()),
                            line: e.line,
                        },
                        field: String::new(),
                        reason: format!("not valid YAML: {}", e.message),
                        // With nothing read from it before, there is nothing to keep.
                        effect: match state.good {
                            Some(_) => Effect::KeptLastGood,
                            None => Effect::Rejected,
                        },
                        condition_reason: "Invalid",
                    });
                }
                let Some(good) = &state.good else { continue };
                problems.extend(good.problems.iter().cloned());
                for (object, origin) in &good.objects {
                    let reference = object.reference();
                    if let Err(dup) = here.insert(object.clone(), origin.clone(), false) {
                        problems.push(Problem {
                            object: Some(reference),
                            origin: origin.clone(),
                            field: "metadata.name".into(),
                            reason: format!(
                                "is defined twice; the first definition, at {}, is used",
                                dup.first
                            ),
                            effect: Effect::Rejected,
                            condition_reason: "Invalid",
                        });
                    }
                }
            }
            if !first {
                merge(&mut objects, later);
            }
        }
        Snapshot {
            objects: Arc::new(objects),
            problems,
            ready: true,
            statuses: Vec::new(),
        }
    }
}

fn merge(into: &mut Objects, from: Objects) {
    into.namespaces.extend(from.namespaces);
    into.pods.extend(from.pods);
    into.services.extend(from.services);
    into.endpoint_slices.extend(from.endpoint_slices);
    into.gateways.extend(from.gateways);
    into.http_routes.extend(from.http_routes);
    into.grpc_routes.extend(from.grpc_routes);
    into.reference_grants.extend(from.reference_grants);
    into.authorization_policies
        .extend(from.authorization_policies);
    into.traffic_policies.extend(from.traffic_policies);
    into.waypoint_parameters.extend(from.waypoint_parameters);
}

/// Reads directories once, for `weftctl check`: the objects and every problem found.
pub fn load(dirs: &[PathBuf]) -> Result<Snapshot, std::io::Error> {
    Ok(ManifestSource::new(dirs.to_vec())?.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_manifests_is_not_an_edit_and_writing_one_is() {
        use notify::Watcher;
        let dir = std::env::temp_dir().join(format!("weft-manifest-edits-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a.yaml"), "a: 1\n").expect("write");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            if let Ok(e) = e {
                let _ = tx.send(e.kind);
            }
        })
        .expect("watcher");
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .expect("watch");
        let edits = |wait| {
            let mut kinds = Vec::new();
            while let Ok(kind) = rx.recv_timeout(wait) {
                kinds.push(kind);
            }
            let seen = kinds.len();
            kinds.retain(is_edit);
            (seen, kinds)
        };
        for entry in std::fs::read_dir(&dir).expect("list") {
            std::fs::read_to_string(entry.expect("entry").path()).expect("read");
        }
        let (seen, read) = edits(Duration::from_millis(300));
        assert!(seen > 0, "inotify reported nothing of the reads");
        assert_eq!(read, [], "reading a manifest was taken for an edit");
        std::fs::write(dir.join("a.yaml"), "a: 2\n").expect("write");
        let (_, written) = edits(Duration::from_millis(300));
        assert!(!written.is_empty(), "writing a manifest was not an edit");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn documents_keep_their_lines() {
        let text = "a: 1\n---\nb: 2\nc: 3\n--- # next\n\n---\nd: 4\n";
        let docs = documents(text);
        assert_eq!(
            docs,
            [
                Document {
                    text: "a: 1\n",
                    line: 1
                },
                Document {
                    text: "b: 2\nc: 3\n",
                    line: 3
                },
                Document {
                    text: "d: 4\n",
                    line: 8
                },
            ]
        );
    }

    #[test]
    fn a_bad_document_costs_only_itself() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: demo}
spec:
  ports: not-a-list
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: skipped}
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Namespace
    metadata: {name: from-list}
";
        let f = parse_file(Path::new("x.yaml"), text).expect("valid YAML");
        let names: Vec<String> = f
            .objects
            .iter()
            .map(|(o, _)| o.reference().to_string())
            .collect();
        assert_eq!(names, ["Namespace demo", "Namespace from-list"]);
        assert_eq!(f.skipped, 1);
        assert_eq!(f.problems.len(), 1);
        let p = f.problems[0].to_string();
        assert!(
            p.starts_with("x.yaml:5: Service demo/bad: does not match the schema"),
            "{p}"
        );
        assert!(p.contains("(line 9, column 10)"), "{p}");
    }

    #[test]
    fn broken_yaml_names_the_line() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n";
        let e = parse_file(Path::new("x.yaml"), text).expect_err("not YAML");
        assert_eq!(e.line, 6, "{e:?}");
    }

    #[test]
    fn a_version_weft_does_not_read_is_named() {
        let text = "apiVersion: weft.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n";
        let f = parse_file(Path::new("x.yaml"), text).expect("YAML");
        assert!(
            f.problems[0].to_string().contains("use weft.dev/v1alpha1"),
            "{}",
            f.problems[0]
        );
        // Istio's AuthorizationPolicy is not Weft's: skipped, not an error.
        let text =
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n";
        assert_eq!(
            parse_file(Path::new("x.yaml"), text).expect("YAML").skipped,
            1
        );
    }

    /// The fuzzer's find: a Gateway named `w!!!~aypoin/` became the waypoint key
    /// `shop/w!!!~aypoin/`, which every proxy refuses. Names are now checked as the API
    /// server checks them, and the refusal names the object and field.
    #[test]
    fn names_the_api_server_refuses_are_refused() {
        let text = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: w!!!~aypoin/, namespace: shop}
spec:
  gatewayClassName: weft-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: 9lives, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: Shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: a.b}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop, labels: {etfw .dev/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop, labels: {istio.io/use-waypoint: \"w!\"}}
---
apiVersion: v1
kind: Service
metadata: {name: tagged, namespace: !x, labels: {app: web}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1.shop
  namespace: shop
  labels: {app: web, weft.dev/empty: \"\"}
  annotations: {Weft.dev/Note: \"Anything at all, with spaces\"}
spec: {containers: [{name: c, image: i}]}
";
        let f = parse_file(Path::new("x.yaml"), text).expect("YAML");
        let problems: Vec<String> = f.problems.iter().map(ToString::to_string).collect();
        let expected = [
            "x.yaml:1: Gateway shop/w!!!~aypoin/: metadata.name: \"w!!!~aypoin/\" is not a DNS-1123 subdomain",
            "x.yaml:8: Service shop/9lives: metadata.name: \"9lives\" is not a DNS-1035 label",
            "x.yaml:12: Service Shop/web: metadata.namespace: \"Shop\" is not a namespace name",
            "x.yaml:16: Namespace a.b: metadata.name: \"a.b\" is not a DNS-1123 label",
            "x.yaml:20: Service shop/cart: metadata.labels: key \"etfw .dev/use-waypoint\" is invalid: its prefix",
            "x.yaml:24: Service shop/cart: metadata.labels[istio.io/use-waypoint]: \"w!\" is not a label value: only letters",
            "x.yaml:28: Service /tagged: metadata.namespace: \"\" is not a namespace name: it is empty",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (p, e) in problems.iter().zip(expected) {
            assert!(p.starts_with(e), "{p}\n does not start with\n{e}");
        }
        // A dotted name is a subdomain, as Pods may have.
        let names: Vec<String> = f
            .objects
            .iter()
            .map(|(o, _)| o.reference().to_string())
            .collect();
        assert_eq!(names, ["Pod shop/web-1.shop"]);
    }
}

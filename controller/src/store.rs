//! The published model: every resource by key in its wire form, with its audience; one
//! version per publication that changed something, and the keys each version changed,
//! so a subscriber is sent only what changed since the version it has.
//!
//! Versions only mean something within one epoch (a random number per controller
//! start); across epochs a subscriber is resumed by comparing bucket digests.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use api::digest::{self, Digests, BUCKETS};
use api::{proto, Key, Resource};

use crate::translate::{Audience, Entry};

/// One resource as published.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its wire form, with key and hash.
    pub wire: Arc<proto::Resource>,
    /// Who gets it.
    pub audience: Audience,
    resource: Resource,
    /// The publication that last saw it.
    round: u64,
}

impl Stored {
    /// Its content hash.
    pub fn hash(&self) -> u64 {
        self.wire.hash
    }
}

/// Which resources a subscriber is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// A node-proxy of this node.
    Node(String),
    /// A waypoint: everything.
    Waypoint,
}

impl View {
    /// Whether the subscriber gets `stored`.
    pub fn includes(&self, stored: &Stored) -> bool {
        match self {
            View::Node(node) => stored.audience.node_proxy(node),
            View::Waypoint => true,
        }
    }
}

/// At most this many changed keys are remembered across versions; a subscriber
/// further behind is resumed by digests.
const HISTORY_KEYS: usize = 200_000;

/// The versioned store.
#[derive(Debug)]
pub struct Store {
    epoch: u64,
    version: u64,
    entries: HashMap<Key, Stored>,
    /// (version, keys changed from the version before it), oldest first.
    history: VecDeque<(u64, Arc<[Key]>)>,
    history_keys: usize,
    /// Publications so far.
    round: u64,
}

/// What one publication changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The new version.
    pub version: u64,
    /// Keys upserted or removed.
    pub changed: usize,
}

impl Store {
    /// An empty store at version 0 of `epoch`.
    pub fn new(epoch: u64) -> Self {
        Store {
            epoch,
            version: 0,
            entries: HashMap::new(),
            history: VecDeque::new(),
            history_keys: 0,
            round: 0,
        }
    }

    /// The controller instance.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The current version; 0 before the first publication.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many resources.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One resource.
    pub fn get(&self, key: &Key) -> Option<&Stored> {
        self.entries.get(key)
    }

    /// Every resource.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, &Stored)> {
        self.entries.iter()
    }

    /// Replaces the content with `entries`; a new version if anything changed. Only
    /// the changed resources are encoded.
    pub fn publish(
        &mut self,
        entries: impl IntoIterator<Item = (Key, Entry)>,
    ) -> Option<Published> {
        // In place: each publication marks what it saw; what it did not see is gone.
        self.round = self.round.wrapping_add(1);
        let round = self.round;
        let mut changed = Vec::new();
        for (key, entry) in entries {
            self.upsert(key, entry, &mut changed);
        }
        self.entries.retain(|key, s| {
            let kept = s.round == round;
            if !kept {
                changed.push(key.clone());
            }
            kept
        });
        self.commit(changed)
    }

    /// Changes only the resources named, upserting `upserts` and removing `removals`,
    /// leaving the rest as it is; a new version if anything changed. This is how an
    /// incremental translation is published: the cost is that of the change, not of
    /// the model.
    pub fn apply(
        &mut self,
        upserts: impl IntoIterator<Item = (Key, Entry)>,
        removals: impl IntoIterator<Item = Key>,
    ) -> Option<Published> {
        let mut changed = Vec::new();
        for (key, entry) in upserts {
            // Marked as seen by the last full publication, so a later one keeps it.
            self.upsert(key, entry, &mut changed);
        }
        for key in removals {
            if self.entries.remove(&key).is_some() {
                changed.push(key);
            }
        }
        self.commit(changed)
    }

    /// Puts one resource in, marking it seen by the current round; records its key in
    /// `changed` when its content or audience is new.
    fn upsert(&mut self, key: Key, entry: Entry, changed: &mut Vec<Key>) {
        let round = self.round;
        match self.entries.get_mut(&key) {
            Some(old) if old.resource == entry.resource && old.audience == entry.audience => {
                old.round = round;
            }
            Some(old) => {
                // Content unchanged, audience changed: the same wire form reaches other
                // subscribers.
                if old.resource != entry.resource {
                    old.wire = Arc::new(entry.resource.to_proto());
                    old.resource = entry.resource;
                }
                old.audience = entry.audience;
                old.round = round;
                changed.push(key);
            }
            None => {
                self.entries.insert(
                    key.clone(),
                    Stored {
                        wire: Arc::new(entry.resource.to_proto()),
                        audience: entry.audience,
                        resource: entry.resource,
                        round,
                    },
                );
                changed.push(key);
            }
        }
    }

    /// A new version holding `changed`, unless it is empty (the first publication
    /// always makes version 1, even of an empty model).
    fn commit(&mut self, changed: Vec<Key>) -> Option<Published> {
        if changed.is_empty() && self.version != 0 {
            return None;
        }
        self.version += 1;
        let n = changed.len();
        self.history_keys += n;
        self.history.push_back((self.version, changed.into()));
        while self.history_keys > HISTORY_KEYS && self.history.len() > 1 {
            if let Some((_, keys)) = self.history.pop_front() {
                self.history_keys -= keys.len();
            }
        }
        Some(Published {
            version: self.version,
            changed: n,
        })
    }

    /// The keys changed after `version` up to the current one; `None` when the history
    /// no longer reaches back that far (or `version` is from the future).
    pub fn changed_since(&self, version: u64) -> Option<BTreeSet<Key>> {
        if version > self.version {
            return None;
        }
        if version == self.version {
            return Some(BTreeSet::new());
        }
        let oldest = self.history.front()?.0;
        // The history must hold every version after `version`.
        if version + 1 < oldest {
            return None;
        }
        let mut keys = BTreeSet::new();
        for (v, changed) in &self.history {
            if *v > version {
                keys.extend(changed.iter().cloned());
            }
        }
        Some(keys)
    }

    /// The digests of what `view` should hold.
    pub fn digests(&self, view: &View) -> Digests {
        let mut d = [0; BUCKETS];
        for (key, stored) in &self.entries {
            if view.includes(stored) {
                digest::toggle(&mut d, key, stored.hash());
            }
        }
        d
    }

    /// Everything `view` gets.
    pub fn full(&self, view: &View) -> proto::Update {
        proto::Update {
            epoch: self.epoch,
            version: self.version,
            kind: proto::UpdateKind::Full as i32,
            buckets: Vec::new(),
            upserts: self
                .entries
                .values()
                .filter(|s| view.includes(s))
                .map(|s| (*s.wire).clone())
                .collect(),
            removals: Vec::new(),
        }
    }

    /// What changed for `view` since `version`, or `None` if the history does not
    /// reach back that far.
    pub fn delta(&self, view: &View, version: u64) -> Option<proto::Update> {
        let keys = self.changed_since(version)?;
        let mut update = proto::Update {
            epoch: self.epoch,
            version: self.version,
            kind: proto::UpdateKind::Delta as i32,
            ..Default::default()
        };
        for key in keys {
            match self.entries.get(&key) {
                Some(s) if view.includes(s) => update.upserts.push((*s.wire).clone()),
                _ => update.removals.push(key.to_proto()),
            }
        }
        Some(update)
    }

    /// A resync of the buckets whose digests differ from `held`: the subscriber keeps
    /// the buckets that match. Empty when everything matches.
    pub fn resync(&self, view: &View, held: &Digests) -> proto::Update {
        let want = self.digests(view);
        let buckets: BTreeSet<usize> = (0..BUCKETS).filter(|b| want[*b] != held[*b]).collect();
        proto::Update {
            epoch: self.epoch,
            version: self.version,
            kind: proto::UpdateKind::Resync as i32,
            buckets: buckets.iter().map(|b| *b as u32).collect(),
            upserts: self
                .entries
                .iter()
                .filter(|(k, s)| buckets.contains(&digest::bucket(k)) && view.includes(s))
                .map(|(_, s)| (*s.wire).clone())
                .collect(),
            removals: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use api::{Model, MtlsMode, Namespace};

    fn ns(name: &str, strict: bool) -> (Key, Entry) {
        let resource = Resource::Namespace(Namespace {
            name: name.into(),
            enrolled: true,
            mtls_mode: if strict {
                MtlsMode::Strict
            } else {
                MtlsMode::Permissive
            },
        });
        (
            resource.key(),
            Entry {
                resource,
                audience: Audience::All,
            },
        )
    }

    fn policy_for(node: &str) -> (Key, Entry) {
        let resource = Resource::AuthorizationPolicy(api::AuthorizationPolicy {
            namespace: "a".into(),
            name: "p".into(),
            scope: api::Scope::NamespaceWide,
            action: api::Action::Deny,
            rules: vec![],
        });
        (
            resource.key(),
            Entry {
                resource,
                audience: Audience::Nodes([node.to_owned()].into()),
            },
        )
    }

    #[test]
    fn versions_advance_only_on_change() {
        let mut s = Store::new(1);
        let first = s.publish([ns("a", false)]);
        assert_eq!(
            first,
            Some(Published {
                version: 1,
                changed: 1
            })
        );
        assert_eq!(s.publish([ns("a", false)]), None);
        assert_eq!(s.publish([ns("a", true)]).map(|p| p.version), Some(2));
        assert_eq!(s.changed_since(1).map(|k| k.len()), Some(1));
        assert_eq!(s.changed_since(2).map(|k| k.len()), Some(0));
        assert_eq!(s.changed_since(3), None);
    }

    #[test]
    fn a_delta_brings_a_model_to_the_same_place_as_a_full_state() {
        let node1 = View::Node("n1".into());
        let mut s = Store::new(9);
        s.publish([ns("a", false), ns("b", false)]);
        let mut model = Model::default().apply(&s.full(&node1)).model;
        s.publish([ns("a", true), ns("c", false), policy_for("n1")]);
        let delta = s.delta(&node1, 1).expect("history reaches");
        assert_eq!(delta.removals.len(), 1, "b removed");
        model = model.apply(&delta).model;
        let fresh = Model::default().apply(&s.full(&node1)).model;
        assert_eq!(model.position(), fresh.position());
        assert_eq!(model.position().buckets, s.digests(&node1).to_vec());
        // Another node is not sent the policy.
        let node2 = View::Node("n2".into());
        let d2 = s.delta(&node2, 1).expect("history reaches");
        assert!(d2.upserts.iter().all(
            |r| r.key.as_ref().map(|k| k.kind) != Some(proto::Kind::AuthorizationPolicy as i32)
        ));
    }

    #[test]
    fn applying_changes_touches_only_the_keys_named() {
        let mut s = Store::new(9);
        s.publish([ns("a", false), ns("b", false), ns("c", false)]);
        let (key_a, strict_a) = ns("a", true);
        let (key_b, _) = ns("b", false);
        let p = s
            .apply([(key_a.clone(), strict_a.clone())], [key_b.clone()])
            .expect("a change");
        assert_eq!((p.version, p.changed), (2, 2));
        assert_eq!(
            s.changed_since(1),
            Some(BTreeSet::from([key_a.clone(), key_b]))
        );
        assert_eq!(s.len(), 2, "c is kept, b is gone");
        // The same content again is no new version.
        assert_eq!(s.apply([(key_a, strict_a)], []), None);
        // A full publication after it agrees with it: nothing changed.
        assert_eq!(s.publish([ns("a", true), ns("c", false)]), None);
    }

    #[test]
    fn a_resync_sends_only_the_buckets_that_differ() {
        let view = View::Node("n1".into());
        let mut s = Store::new(1);
        let many: BTreeMap<Key, Entry> = (0..200).map(|i| ns(&format!("ns-{i}"), false)).collect();
        s.publish(many.clone());
        let model = Model::default().apply(&s.full(&view)).model;
        // A new controller (new epoch) with one namespace changed.
        let mut restarted = Store::new(2);
        let mut changed = many;
        let (k, e) = ns("ns-7", true);
        changed.insert(k, e);
        restarted.publish(changed);
        let held = api::digest::from_wire(&model.position().buckets).expect("64 digests");
        let resync = restarted.resync(&view, &held);
        assert_eq!(resync.buckets.len(), 1);
        assert!(resync.upserts.len() < 20, "{} resent", resync.upserts.len());
        let model = model.apply(&resync).model;
        assert_eq!(model.position().buckets, restarted.digests(&view).to_vec());
        // Nothing changed: nothing resent.
        let held = api::digest::from_wire(&model.position().buckets).expect("64 digests");
        let again = restarted.resync(&view, &held);
        assert!(again.buckets.is_empty() && again.upserts.is_empty());
    }
}

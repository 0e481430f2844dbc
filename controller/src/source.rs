//! Where cluster objects come from: the API server ([`crate::kubernetes`]) or manifest
//! directories ([`crate::manifests`]), behind one trait so both feed the same
//! translation.

use std::sync::Arc;

use crate::objects::{Objects, Problem};

/// Everything a source holds at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The objects.
    pub objects: Arc<Objects>,
    /// Problems met reading them (files that are not YAML, documents that are not
    /// objects); translation adds its own.
    pub problems: Vec<Problem>,
    /// Whether every kind has been listed at least once; no model is published before.
    pub ready: bool,
    /// Statuses the source itself knows: routes it could not read, each Accepted=False at
    /// its Service parents, naming why. Translation adds the others'.
    pub statuses: Vec<crate::translate::DesiredStatus>,
}

/// A source of cluster objects. Sources signal changes on the `Notify` they are run
/// with; the controller then takes a snapshot, so a burst of changes costs one
/// translation.
pub trait Source: Send + Sync + 'static {
    /// The current objects.
    fn snapshot(&self) -> Snapshot;
}

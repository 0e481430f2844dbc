//! The mesh model the controller computes and every proxy consumes.
//!
//! ```text
//!  controller: cluster objects or manifests --translate--> Snapshot (one version)
//!      |                                                        |
//!      | stream over gRPC                          Model::new validates and indexes
//!      v                                                        v
//!  node-proxy / waypoint: Arc<Model> --> workload_by_ip, service_by_vip, endpoints
//! ```
//!
//! - [`model`]: the serde types of one [`Snapshot`] and the validated, indexed [`Model`].
//!
//! Later this crate also carries the protobuf messages and the gRPC service that stream
//! snapshots and their deltas from the controller to the proxies.

pub mod model;

pub use model::{
    Model, ModelError, MtlsMode, Namespace, ObjectKind, ObjectRef, Service, ServicePort, Snapshot,
    Workload,
};

//! The mesh model the controller computes and every proxy consumes, and the gRPC
//! contract that carries it.
//!
//! ```text
//!  controller: cluster objects --translate--> Resources (keyed, typed)
//!      |  encode + hash (resource::to_proto)          Subscribe (proto::mesh_config_*)
//!      v                                                   |
//!  Update { upserts, removals, version } ==== gRPC ====> Model::apply -> new Model
//!                                                          |  (persistent maps: the old
//!  node-proxy / waypoint hot path: Arc<Model> lookups  <---+   model stays valid)
//! ```
//!
//! - [`proto`]: the generated protobuf messages and tonic services (`mesh.proto`).
//! - [`resource`]: typed resources, [`Key`]s, and their conversion from and to protobuf;
//!   conversion from protobuf validates, so a proxy refuses a bad resource by name.
//! - [`model`]: the indexed store proxies query, updated by keyed upserts and removals.
//! - [`enrollment`]: which pods the mesh captures, the one rule the controller and the
//!   node agent both apply.
//! - [`authz`]: the L4 authorization decision, a pure function of policies and a
//!   connection.
//! - [`digest`]: content hashes and bucket digests that let a proxy resume without a
//!   full resend.

pub mod authz;
pub mod digest;
pub mod enrollment;
pub mod fuzzing;
pub mod model;
pub mod resource;

/// The demo application's gRPC service (`proto/weft/echo/v1/echo.proto`), served by
/// `weftctl echo --grpc-port` and called by `weftctl debug grpc`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod echo_proto {
    include!(concat!(env!("OUT_DIR"), "/weft.echo.v1.rs"));
}

/// The protobuf messages and services, generated from `proto/weft/mesh/v1alpha1/mesh.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/weft.mesh.v1alpha1.rs"));
}

pub use model::{Applied, Model, Target};
pub use resource::{
    Action, AppProtocol, AuthorizationPolicy, Endpoint, Key, Kind, MtlsMode, Namespace, ObjectName,
    Operation, Pattern, PortMapping, Resource, ResourceError, Rule, Scope, Service, ServiceBinding,
    ServicePort, Source, TrustBundle, Waypoint, Workload,
};

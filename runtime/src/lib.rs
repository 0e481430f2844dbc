//! The runtime Weft's node-side and L7 processes share: node-proxy, the node agent and
//! the waypoint each run some of it, and none of them depends on another's crate.
//!
//! ```text
//!  controller --gRPC--> config_client (model subscription, CSRs) --> state (model,
//!                       certificate leases renewed at half-life)
//!  netns: a thread inside a pod's network namespace; sockets made there
//!  handoff: node agent --SOCK_SEQPACKET + fds--> node-proxy (pods, their namespaces
//!           and listeners); a new node-proxy takes the listeners of the one it replaces
//!  startup: logging, signals, the open-file limit; admin: /metrics, /ready, dumps
//! ```

pub mod admin;
pub mod config_client;
pub mod fuzzing;
pub mod handoff;
pub mod metrics;
pub mod netns;
pub mod startup;
pub mod state;

//! Unix-socket messages between Weft's processes on a node.
//!
//! ```text
//!  weft-cni (run by the container runtime) --agent::Request + the pod's netns fd-->
//!      node agent --agent::Reply--> weft-cni
//!  node agent --handoff (weft-runtime)--> node-proxy
//! ```
//!
//! Both sockets are `SOCK_SEQPACKET`: one message is one datagram of JSON, with any file
//! descriptors attached to the same `sendmsg` ([`datagram`]). This crate is small on
//! purpose: `weft-cni` links it, and it runs on every node's host for every pod.

pub mod agent;
pub mod datagram;

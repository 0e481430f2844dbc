//! weftctl: the local sandbox, `weftctl check`, the demo echo app, and node-proxy and
//! the controller for the sandbox.

pub mod check;
pub mod debug;
pub mod echo;
pub mod grpc;
pub mod prometheus;
pub mod sandbox;
pub mod status;
#[cfg(test)]
mod testing;

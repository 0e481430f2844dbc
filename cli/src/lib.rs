//! weftctl: the local sandbox, the demo echo app, and node-proxy for the sandbox.

pub mod debug;
pub mod echo;
pub mod sandbox;

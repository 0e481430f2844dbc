//! weftctl: the local sandbox, `weftctl check`, the demo echo app, and node-proxy and
//! the controller for the sandbox.

pub mod check;
pub mod cni;
pub mod debug;
pub mod echo;
pub mod grpc;
pub mod prometheus;
pub mod sandbox;
pub mod status;

/// Logs to stderr at `RUST_LOG` (default `info`), as weftctl and node-proxy do.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

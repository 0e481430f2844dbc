//! The node-proxy binary: flags in, [`node_proxy::run`] until SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Weft's per-node L4 proxy.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: node_proxy::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only for a person at a terminal; log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    node_proxy::cancel_on_signals(shutdown.clone())?;
    node_proxy::run(cli.config, shutdown).await
}

//! The node agent binary, what the node agent DaemonSet and the sandbox run on each
//! node: flags in, [`weft_node_agent::run`] until SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Weft's node agent: owns the node's enrolled pods (their network namespaces and
/// capture rules) and hands them to node-proxy.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: weft_node_agent::Config,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    runtime::startup::init_logging();
    let cli = Cli::parse();
    let shutdown = CancellationToken::new();
    runtime::startup::cancel_on_signals(shutdown.clone())?;
    weft_node_agent::run(cli.config, shutdown).await
}

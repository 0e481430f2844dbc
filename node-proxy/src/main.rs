//! The node-proxy binary, what the DaemonSet and the sandbox run: flags in,
//! [`node_proxy::run`] until SIGTERM. The same as `weftctl node-proxy`, in a binary
//! of under a third of weftctl's size: the node role does not link the controller, the
//! waypoint or the Kubernetes client, so its resident code stays small.

use anyhow::Context;
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

fn main() -> anyhow::Result<()> {
    runtime::startup::init_logging();
    let cli = Cli::parse();
    runtime::startup::raise_fd_limit();
    // One worker (the default): everything on this thread, `run` included.
    let runtime = runtime::startup::proxy_runtime(usize::from(cli.config.worker_threads))
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        runtime::startup::cancel_on_signals(shutdown.clone())?;
        node_proxy::run(cli.config, shutdown).await
    })
}

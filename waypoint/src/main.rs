//! The waypoint binary, what a Gateway's Deployment and the sandbox's waypoint pods
//! run: flags in, [`waypoint::run`] until SIGTERM. The same as `weftctl waypoint`, in a
//! binary that does not link the controller or the Kubernetes client, so its resident
//! code stays small.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Weft's L7 proxy for the services attached to one Gateway.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    config: waypoint::Config,
}

fn main() -> anyhow::Result<()> {
    runtime::startup::init_logging();
    let cli = Cli::parse();
    runtime::startup::raise_fd_limit();
    let runtime = runtime::startup::proxy_runtime(cli.config.worker_threads)
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        runtime::startup::cancel_on_signals(shutdown.clone())?;
        waypoint::run(cli.config, shutdown).await
    })
}

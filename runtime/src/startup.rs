//! Process setup every Weft binary does first: logging, the open-file limit, signals.

use tokio_util::sync::CancellationToken;

/// Logs to stderr at `RUST_LOG` (default `info`): what each of Weft's binaries sets up
/// first.
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

/// Raises the open-file limit as far as allowed: a proxy holds two or three sockets per
/// connection (and `weftctl debug hold` tens of thousands).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // Root may raise the hard limit too; others get up to their hard limit.
        let want = hard.max(262_144);
        if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// The async runtime for a proxy serving on `worker_threads` threads. With one, Tokio's
/// current-thread runtime: everything runs on the calling thread, nothing is handed
/// between threads, and the scheduler keeps no per-batch statistics (the multi-threaded
/// one reads the clock four times and takes a `powf` each time its worker wakes).
/// Measured in docs/performance.md; blocking work goes to Tokio's blocking pool either
/// way.
pub fn proxy_runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(worker_threads);
        b
    };
    builder.enable_all().build()
}

/// Runs `f` every `period` (the first time at once) until `shutdown`.
pub async fn every(period: std::time::Duration, shutdown: CancellationToken, mut f: impl FnMut()) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => f(),
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        token.cancel();
    });
    Ok(())
}

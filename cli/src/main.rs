//! weftctl: runs the local sandbox, the demo echo app, and (for the sandbox) node-proxy.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use weft_cli::echo::EchoConfig;
use weft_cli::sandbox;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Weft's command-line tool.
#[derive(Parser)]
#[command(name = "weftctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The local sandbox: a mesh of network namespaces on this machine.
    Local {
        #[command(subcommand)]
        command: Local,
    },
    /// The demo HTTP server: answers with its pod, version and the request's headers.
    Echo {
        /// Port to listen on (all addresses).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Version string to report.
        #[arg(long, env = "VERSION", default_value = "v1")]
        version: String,
        /// Delay before every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Fraction of requests answered 503 (0.0 to 1.0).
        #[arg(long, default_value_t = 0.0)]
        failure_rate: f64,
    },
    /// Tools for poking at a mesh by hand.
    Debug {
        #[command(subcommand)]
        command: Debug,
    },
    /// Runs node-proxy (the sandbox starts it this way).
    #[command(hide = true)]
    NodeProxy {
        #[command(flatten)]
        config: node_proxy::Config,
    },
}

#[derive(Subcommand)]
enum Debug {
    /// Opens one HBONE stream with any identity the CA can mint and prints the answer.
    Hbone(weft_cli::debug::HboneArgs),
    /// A TCP echo server (benchmark target).
    TcpEcho {
        /// Port.
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
    /// One-byte ping-pong latency to a TCP echo server; prints p50 and p99 in µs.
    Pingpong {
        /// Server address.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// Round trips measured (a tenth more are warm-up).
        #[arg(long, default_value_t = 10000)]
        rounds: usize,
    },
    /// New connections per second (connect, one byte each way, close).
    Connrate {
        /// Server address.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// How long.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Opens idle connections and holds them until killed.
    Hold {
        /// Server address.
        #[arg(long)]
        to: std::net::SocketAddr,
        /// How many.
        #[arg(long, default_value_t = 10000)]
        count: usize,
    },
}

#[derive(Subcommand)]
enum Local {
    /// Builds the sandbox from a directory of Kubernetes YAML and runs it until Ctrl-C.
    Up {
        /// Directory of manifests (Namespace, Pod, Deployment, Service).
        dir: PathBuf,
        /// Sandbox name (prefix of its network namespaces).
        #[arg(long, default_value = "weft")]
        name: String,
        /// State directory (default /run/weft/sandbox/<name>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// First node-proxy admin port on 127.0.0.1.
        #[arg(long, default_value_t = 15000)]
        admin_base_port: u16,
        /// Seconds between traffic summaries (0: none).
        #[arg(long, default_value_t = 5)]
        summary_every: u64,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Removes a sandbox (also one whose `up` was killed).
    Down {
        /// Sandbox name.
        #[arg(long, default_value = "weft")]
        name: String,
        /// State directory (default /run/weft/sandbox/<name>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Replaces every node-proxy of a running sandbox with a new process (of the weftctl
    /// binary the sandbox was started from, as rebuilt since), one node at a time, without
    /// refusing a connection; waits until the old ones have drained and exited.
    Upgrade {
        /// Sandbox name.
        #[arg(long, default_value = "weft")]
        name: String,
        /// State directory (default /run/weft/sandbox/<name>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Prints the capture rules installed in a pod (namespace/name).
    Rules {
        /// The pod.
        pod: String,
        /// Sandbox name.
        #[arg(long, default_value = "weft")]
        name: String,
        /// State directory (default /run/weft/sandbox/<name>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal; log files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    weft_cli::debug::raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    node_proxy::cancel_on_signals(shutdown.clone())?;
    match cli.command {
        Cmd::NodeProxy { config } => node_proxy::run(config, shutdown).await,
        Cmd::Debug { command } => match command {
            Debug::Hbone(args) => {
                println!("{}", weft_cli::debug::hbone(args).await?);
                Ok(())
            }
            Debug::TcpEcho { port } => weft_cli::debug::tcp_echo(port).await,
            Debug::Pingpong { to, rounds } => {
                let (p50, p99) = weft_cli::debug::pingpong(to, rounds).await?;
                println!("{{\"p50_us\": {p50:.1}, \"p99_us\": {p99:.1}}}");
                Ok(())
            }
            Debug::Connrate { to, seconds } => {
                let rate = weft_cli::debug::connrate(to, seconds).await?;
                println!("{{\"per_second\": {rate:.1}}}");
                Ok(())
            }
            Debug::Hold { to, count } => weft_cli::debug::hold(to, count).await,
        },
        Cmd::Echo {
            port,
            version,
            latency_ms,
            failure_rate,
        } => {
            let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
                .await
                .with_context(|| format!("cannot listen on port {port}"))?;
            let config = EchoConfig {
                pod: std::env::var("POD_NAME").unwrap_or_else(|_| "echo".into()),
                namespace: std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into()),
                version,
                latency: Duration::from_millis(latency_ms),
                failure_rate,
            };
            weft_cli::echo::serve(listener, config, shutdown).await
        }
        Cmd::Local { command } => match command {
            Local::Up {
                dir,
                name,
                state_dir,
                admin_base_port,
                summary_every,
                duration,
            } => {
                let opts = sandbox::UpOptions {
                    state_dir: state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name)),
                    dir,
                    name,
                    admin_base_port,
                    summary_every: (summary_every > 0).then(|| Duration::from_secs(summary_every)),
                    duration: duration.map(Duration::from_secs),
                    exe: std::env::current_exe().context("cannot find weftctl's own path")?,
                };
                sandbox::up(opts, shutdown).await
            }
            Local::Down { name, state_dir } => {
                let dir = state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name));
                sandbox::down(&name, &dir)
            }
            Local::Upgrade { name, state_dir } => {
                let dir = state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name));
                sandbox::upgrade(&dir)
            }
            Local::Rules {
                pod,
                name,
                state_dir,
            } => {
                let dir = state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name));
                print!("{}", sandbox::rules(&dir, &pod)?);
                Ok(())
            }
        },
    }
}

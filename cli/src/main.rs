//! weftctl: runs the local sandbox, checks manifests, runs the demo echo app, and (for
//! the sandbox) node-proxy and the controller.

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
        /// Answer every request 503 while the file `<DIR>/<pod name>` exists, so a test
        /// can make one replica fail and recover.
        #[arg(long, value_name = "DIR")]
        fail_while_exists: Option<std::path::PathBuf>,
        /// Also serve the gRPC service weft.echo.v1.Echo (plaintext HTTP/2) on this port.
        #[arg(long)]
        grpc_port: Option<u16>,
    },
    /// Tools for poking at a mesh by hand.
    Debug {
        #[command(subcommand)]
        command: Debug,
    },
    /// Checks manifest directories as the controller reads them (every problem: file,
    /// object, field, reason), a running sandbox (--local: controller reachable, every
    /// node-proxy synced, certificates valid), or a node before install (--pre); exits
    /// non-zero if anything is wrong.
    Check {
        /// Directories of manifests (a later one overrides objects of earlier ones).
        /// Without any (and without --local or --pre): check the cluster of the current
        /// kubeconfig through its API server.
        dirs: Vec<PathBuf>,
        /// The SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Check the running sandbox of this name, through its admin ports.
        #[arg(long, value_name = "NAME", conflicts_with_all = ["dirs", "pre"])]
        local: Option<String>,
        /// The sandbox's state directory (default: /run/weft/sandbox/NAME).
        #[arg(long, requires = "local")]
        state_dir: Option<PathBuf>,
        /// Check this machine before installing: kernel, nftables, CNI configuration.
        #[arg(long, conflicts_with = "dirs")]
        pre: bool,
        /// The CNI configuration directory, for --pre.
        #[arg(long, default_value = "/etc/cni/net.d", requires = "pre")]
        cni_conf_dir: PathBuf,
        /// Weft's namespace, for a cluster.
        #[arg(long, default_value = "weft-system")]
        namespace: String,
        /// Also check the directories' Gateway API and Weft objects as an API server with
        /// these CustomResourceDefinitions would (files or directories of them): a field
        /// the CRDs lack (refused, or dropped), a value their schema or rules refuse.
        #[arg(long, value_name = "PATH", requires = "dirs")]
        crds: Vec<PathBuf>,
        /// The same with the CRDs the cluster of the current kubeconfig has installed.
        #[arg(long, requires = "dirs", conflicts_with = "crds")]
        cluster_crds: bool,
    },
    /// Shows each node-proxy: version, state (synced, stale, offline, down), the model
    /// applied, and for a sandbox its pods and certificates with their earliest expiry.
    /// Reads the cluster of the current kubeconfig through its API server, or a sandbox
    /// through its admin ports (--local).
    Status {
        /// The sandbox's name.
        #[arg(long, value_name = "NAME")]
        local: Option<String>,
        /// Weft's namespace, for a cluster.
        #[arg(long, default_value = "weft-system", conflicts_with = "local")]
        namespace: String,
        /// The sandbox's state directory (default: /run/weft/sandbox/NAME).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Prints the manifests that install Weft on a cluster:
    /// `weftctl install | kubectl apply -f -` (docs/install.md).
    Install {
        #[command(flatten)]
        options: InstallArgs,
    },
    /// Prints what removes Weft from a cluster: `weftctl uninstall | kubectl delete -f -`.
    Uninstall {
        #[command(flatten)]
        options: InstallArgs,
    },
    /// Runs the controller (the sandbox starts it this way).
    #[command(hide = true)]
    Controller {
        #[command(flatten)]
        config: Box<controller::Config>,
    },
}

#[derive(Subcommand)]
enum Debug {
    /// Opens one HBONE stream with any identity the CA can mint and prints the answer.
    Hbone(weft_cli::debug::HboneArgs),
    /// Asks the controller for a workload certificate as a node-proxy would.
    Certificate(weft_cli::debug::CertificateArgs),
    /// A TCP echo server (benchmark target).
    TcpEcho {
        /// Port.
        #[arg(long, default_value_t = 9000)]
        port: u16,
    },
    /// One gRPC call to weft.echo.v1.Echo (unary, or server-streaming with --stream N);
    /// prints the replies or the status as JSON.
    Grpc {
        /// The server, e.g. http://echo:9090.
        #[arg(long)]
        to: String,
        /// The message ("fail:<code>" makes the server answer that status).
        #[arg(long, default_value = "hello")]
        message: String,
        /// Replies to ask for in one server-streaming call; 0 makes a unary call.
        #[arg(long, default_value_t = 0)]
        stream: u32,
    },
    /// A WebSocket client: sends text messages and checks each comes back; prints JSON.
    Websocket {
        /// e.g. ws://echo/ws.
        #[arg(long)]
        to: String,
        /// Messages to send.
        #[arg(long, default_value_t = 10)]
        messages: u32,
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

/// The flags of `weftctl install` (and `uninstall`, which must be given the same
/// `--namespace`).
#[derive(clap::Args)]
struct InstallArgs {
    /// The namespace Weft runs in.
    #[arg(long, default_value = "weft-system")]
    namespace: String,
    /// The SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The image with Weft's binaries: weftctl (the controller), node-agent, weft-cni,
    /// node-proxy, waypoint (see the Dockerfile), with its tag or digest.
    #[arg(long, default_value = controller::install::DEFAULT_IMAGE)]
    image: String,
    /// The log filter of every component (RUST_LOG syntax).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// The platform: generic, gke, eks, aks, k3s, rke2, microk8s, openshift or kind. It
    /// sets the node's CNI directories and what else its nodes need (docs/install.md).
    #[arg(long, default_value = "generic")]
    platform: controller::install::Platform,
    /// The node's CNI plugin directory (the container runtime's), if not the platform's.
    #[arg(long)]
    cni_bin_dir: Option<String>,
    /// The node's CNI configuration directory (the runtime's), if not the platform's.
    #[arg(long)]
    cni_conf_dir: Option<String>,
}

impl From<InstallArgs> for controller::install::Options {
    fn from(a: InstallArgs) -> Self {
        controller::install::Options {
            namespace: a.namespace,
            trust_domain: a.trust_domain,
            image: a.image,
            log_level: a.log_level,
            platform: a.platform,
            cni_bin_dir: a.cni_bin_dir,
            cni_conf_dir: a.cni_conf_dir,
        }
    }
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
        /// Lifetime of workload certificates, e.g. 24h or 30s (renewed at half-life).
        #[arg(long)]
        leaf_ttl: Option<String>,
        /// Waypoints export a span per request to this OTLP/gRPC endpoint, e.g.
        /// http://127.0.0.1:4317.
        #[arg(long)]
        otlp_endpoint: Option<String>,
        /// Runs Prometheus (Debian's `prometheus`) scraping the sandbox every second and
        /// prints its URL; `--prometheus=127.0.0.1:9090` picks its address (default: a
        /// free loopback port).
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "127.0.0.1:0")]
        prometheus: Option<std::net::SocketAddr>,
        /// The cluster network's address families: `ipv4`, `dual` (IPv4 and IPv6, IPv4
        /// the primary) or `ipv6` (IPv6 only).
        #[arg(long, value_enum, default_value_t = sandbox::net::IpFamily::Ipv4)]
        ip_family: sandbox::net::IpFamily,
        /// Controller replicas, as the install's Deployment runs two: the first on
        /// 127.0.0.1, the others on 127.0.0.2 and up, at the same ports; every proxy is
        /// given them all and fails over between them.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        controller_replicas: u8,
        /// The Gateway API CRDs to install in the sandbox (a directory of their YAML, e.g.
        /// a release's `standard` or `experimental` files): Gateway API objects are then
        /// checked as an API server with them checks them, and refused naming the field.
        #[arg(long)]
        gateway_api_crds: Option<PathBuf>,
        /// Nodes a pod without `spec.nodeName` is scheduled on (`node-1`..`node-N`).
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=12))]
        nodes: u16,
    },
    /// Stops or starts a running sandbox's controller (the mesh serves on meanwhile).
    Controller {
        /// `stop` or `start`.
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        /// Sandbox name.
        #[arg(long, default_value = "weft")]
        name: String,
        /// State directory (default /run/weft/sandbox/<name>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Stops or starts the node agent of one node of a running sandbox (as deleting its
    /// pod would; pods stay captured meanwhile, new enrolled pods wait for it).
    Agent {
        /// `stop` or `start`.
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        /// The node.
        #[arg(long)]
        node: String,
        /// Sandbox name.
        #[arg(long, default_value = "weft")]
        name: String,
        /// State directory (default /run/weft/sandbox/<name>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
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
    /// Replaces every node-proxy of a running sandbox with a new process (of the
    /// node-proxy binary next to the weftctl it was started from, as rebuilt since), one
    /// node at a time, without
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
    runtime::startup::init_logging();
    let cli = Cli::parse();
    runtime::startup::raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    runtime::startup::cancel_on_signals(shutdown.clone())?;
    match cli.command {
        Cmd::Controller { config } => controller::run(*config, shutdown).await,
        Cmd::Install { options } => {
            print!("{}", controller::install::yaml(&options.into())?);
            Ok(())
        }
        Cmd::Uninstall { options } => {
            print!("{}", controller::install::uninstall_yaml(&options.into())?);
            Ok(())
        }
        Cmd::Check {
            dirs,
            trust_domain,
            local,
            state_dir,
            pre,
            cni_conf_dir,
            namespace,
            crds,
            cluster_crds,
        } => {
            let failed = if pre {
                let checks = weft_cli::check::preflight(&cni_conf_dir).await;
                for c in &checks {
                    match &c.result {
                        Ok(found) => println!("ok    {}: {found}", c.what),
                        Err(why) => println!("FAIL  {}: {why}", c.what),
                    }
                }
                checks.iter().filter(|c| c.result.is_err()).count()
            } else if local.is_some() || dirs.is_empty() {
                let report =
                    weft_cli::status::read(local.as_deref(), state_dir.as_deref(), &namespace)
                        .await?;
                let problems = weft_cli::status::problems(&report, weft_cli::status::now());
                for p in &problems {
                    println!("{}: {}", p.subject, p.what);
                }
                eprintln!(
                    "controller and {} node-proxies checked, {} problem{}",
                    report.nodes.len(),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                );
                problems.len()
            } else {
                let mut failed = weft_cli::check::check(&dirs, &trust_domain)?;
                let against = match (cluster_crds, crds.is_empty()) {
                    (true, _) => {
                        let client = kube::Client::try_default().await.context(
                            "cannot reach the cluster's API server (kubeconfig or in-cluster config)",
                        )?;
                        Some(weft_cli::check::crds_from_cluster(&client).await?)
                    }
                    (false, false) => Some(weft_cli::check::crds_from_files(&crds)?),
                    (false, true) => None,
                };
                if let Some(against) = against {
                    let findings = weft_cli::check::check_against_crds(&dirs, &against)?;
                    for f in &findings {
                        println!("{f}");
                    }
                    eprintln!(
                        "{} CRDs checked against, {} object{} they refuse",
                        against.len(),
                        findings.len(),
                        if findings.len() == 1 { "" } else { "s" }
                    );
                    failed += findings.len();
                }
                failed
            };
            if failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Status {
            local,
            namespace,
            state_dir,
            json,
        } => {
            let report =
                weft_cli::status::read(local.as_deref(), state_dir.as_deref(), &namespace).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!(
                    "{}",
                    weft_cli::status::table(&report, weft_cli::status::now())
                );
            }
            Ok(())
        }
        Cmd::Debug { command } => match command {
            Debug::Hbone(args) => {
                println!("{}", weft_cli::debug::hbone(args).await?);
                Ok(())
            }
            Debug::Certificate(args) => {
                println!("{}", weft_cli::debug::certificate(args).await?);
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
            Debug::Websocket { to, messages } => {
                println!("{}", weft_cli::grpc::websocket(&to, messages).await?);
                Ok(())
            }
            Debug::Grpc {
                to,
                message,
                stream,
            } => {
                println!("{}", weft_cli::grpc::call(&to, &message, stream).await?);
                Ok(())
            }
        },
        Cmd::Echo {
            port,
            version,
            latency_ms,
            failure_rate,
            fail_while_exists,
            grpc_port,
        } => {
            // Both families: the pod's IPv4 and IPv6 addresses on a dual-stack cluster.
            let listener = tunnel::net::listen(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
                .with_context(|| format!("cannot listen on port {port}"))?;
            let pod = std::env::var("POD_NAME").unwrap_or_else(|_| "echo".into());
            let config = EchoConfig {
                fail_flag: fail_while_exists.map(|dir| dir.join(&pod)),
                pod,
                namespace: std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into()),
                version,
                latency: Duration::from_millis(latency_ms),
                failure_rate,
            };
            if let Some(port) = grpc_port {
                let grpc = weft_cli::grpc::GrpcEcho {
                    pod: config.pod.clone(),
                    version: config.version.clone(),
                };
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
                    if let Err(e) = weft_cli::grpc::serve(addr, grpc, shutdown).await {
                        tracing::error!("gRPC echo on port {port} stopped: {e}");
                    }
                });
            }
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
                leaf_ttl,
                otlp_endpoint,
                prometheus,
                ip_family,
                controller_replicas,
                gateway_api_crds,
                nodes,
            } => {
                let opts = sandbox::UpOptions {
                    state_dir: state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name)),
                    dir,
                    name,
                    admin_base_port,
                    summary_every: (summary_every > 0).then(|| Duration::from_secs(summary_every)),
                    duration: duration.map(Duration::from_secs),
                    exe: std::env::current_exe().context("cannot find weftctl's own path")?,
                    leaf_ttl,
                    otlp_endpoint,
                    prometheus,
                    ip_family,
                    controller_replicas,
                    gateway_api_crds,
                    nodes,
                };
                sandbox::up(opts, shutdown).await
            }
            Local::Down { name, state_dir } => {
                let dir = state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name));
                sandbox::down(&name, &dir)
            }
            Local::Controller {
                action,
                name,
                state_dir,
            } => {
                let dir = state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name));
                sandbox::controller(&dir, action == "start")
            }
            Local::Agent {
                action,
                node,
                name,
                state_dir,
            } => {
                let dir = state_dir.unwrap_or_else(|| sandbox::default_state_dir(&name));
                sandbox::agent(&dir, &node, action == "start")
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

//! weft-cni: the chained CNI plugin that hands new pods of enrolled namespaces to
//! node-proxy (run by the container runtime with no arguments, `CNI_*` in the
//! environment and the network configuration on stdin), and its installer
//! (`weft-cni install`, `weft-cni uninstall`). The logic is `weft_cli::cni`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_cli::cni::cluster;
use weft_cli::cni::config::{LookupSource, ProcessEnv};
use weft_cli::cni::error::CniError;
use weft_cli::cni::install::{self, Entry};

/// The largest network configuration read from stdin.
const MAX_STDIN: u64 = 4 << 20;

/// weft-cni's installer (the runtime runs the plugin itself without arguments).
#[derive(Parser)]
#[command(name = "weft-cni", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copies this binary into the plugin directory and chains weft-cni into the node's
    /// CNI configuration (the first *.conflist); running it again changes nothing.
    Install {
        /// The runtime's plugin directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The runtime's configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// Look pods up in this manifest directory (the sandbox, tests).
        #[arg(
            long,
            conflicts_with_all = ["kubeconfig", "in_cluster_kubeconfig"],
            required_unless_present_any = ["kubeconfig", "in_cluster_kubeconfig"]
        )]
        manifests: Option<PathBuf>,
        /// Look pods up through the API server with this kubeconfig.
        #[arg(long, conflicts_with = "in_cluster_kubeconfig")]
        kubeconfig: Option<PathBuf>,
        /// In a pod: write a kubeconfig from this pod's service account into --conf-dir
        /// under this path's file name, and have the plugin read it at this (host) path.
        #[arg(long)]
        in_cluster_kubeconfig: Option<PathBuf>,
        /// In a pod: stay running (refreshing the kubeconfig's token) until stopped,
        /// then remove the plugin if DaemonSet NAMESPACE/NAME is gone or being deleted.
        #[arg(
            long,
            value_name = "NAMESPACE/NAME",
            requires = "in_cluster_kubeconfig"
        )]
        until_removed: Option<String>,
        /// node-proxy's handoff socket (default: /run/weft/handoff.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Removes weft-cni from the node's CNI configuration and its binary.
    Uninstall {
        /// The runtime's plugin directory.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// The runtime's configuration directory.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    // stdout belongs to the CNI result; logs go to stderr, which runtimes keep.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_CNI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if std::env::args_os().len() <= 1 {
        return plugin();
    }
    let result = match Cli::parse().command {
        Cmd::Install {
            bin_dir,
            conf_dir,
            manifests,
            kubeconfig,
            in_cluster_kubeconfig,
            until_removed,
            socket,
        } => install_command(
            bin_dir,
            conf_dir,
            manifests,
            kubeconfig.or(in_cluster_kubeconfig.clone()),
            in_cluster_kubeconfig.is_some(),
            until_removed,
            socket,
        ),
        Cmd::Uninstall { bin_dir, conf_dir } => {
            install::uninstall(&bin_dir, &conf_dir).map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(report) => {
            for line in report {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weft-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

fn install_command(
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    manifests: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    in_cluster: bool,
    until_removed: Option<String>,
    socket: Option<PathBuf>,
) -> Result<install::Report, String> {
    let source = match (manifests, kubeconfig.clone()) {
        (Some(dir), _) => LookupSource::Manifests(dir),
        (None, Some(path)) => LookupSource::Kubeconfig(path),
        (None, None) => return Err("give --manifests DIR or --kubeconfig PATH".to_owned()),
    };
    let daemonset = match until_removed.as_deref().map(|s| s.split_once('/')) {
        None => None,
        Some(Some((ns, name))) if !ns.is_empty() && !name.is_empty() => Some((ns, name)),
        Some(_) => {
            return Err(format!(
                "--until-removed {:?}: give the DaemonSet as NAMESPACE/NAME",
                until_removed.unwrap_or_default()
            ))
        }
    };
    let mut report = Vec::new();
    // In a pod: the kubeconfig is written into the mounted conf dir under the file name
    // the plugin will read on the host.
    let written = match (
        in_cluster,
        kubeconfig.as_deref().and_then(|p| p.file_name()),
    ) {
        (true, Some(file)) => {
            let server = cluster::api_server_from_env().map_err(|e| e.to_string())?;
            let path = conf_dir.join(file);
            let text =
                cluster::kubeconfig(&server, std::path::Path::new(cluster::SERVICE_ACCOUNT_DIR))
                    .map_err(|e| e.to_string())?;
            cluster::write_kubeconfig(&path, &text).map_err(|e| e.to_string())?;
            report.push(format!("wrote {}", path.display()));
            Some((path, server))
        }
        (true, None) => return Err("--in-cluster-kubeconfig needs a file path".to_owned()),
        (false, _) => None,
    };
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find this binary to copy: {e}"))?;
    let entry = Entry { source, socket };
    report.extend(install::install(&exe, &bin_dir, &conf_dir, &entry).map_err(|e| e.to_string())?);
    let (Some(daemonset), Some((written, server))) = (daemonset, written) else {
        return Ok(report);
    };
    for line in report.drain(..) {
        println!("{line}");
    }
    println!(
        "staying until stopped; the plugin is removed if DaemonSet {}/{} goes",
        daemonset.0, daemonset.1
    );
    let (decision, why) =
        cluster::wait_until_stopped(&written, &server, daemonset).map_err(|e| e.to_string())?;
    report.push(format!("stopping: {why}"));
    if decision == cluster::OnStop::Uninstall {
        report.extend(install::uninstall(&bin_dir, &conf_dir).map_err(|e| e.to_string())?);
        match std::fs::remove_file(&written) {
            Ok(()) => report.push(format!("removed {}", written.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", written.display())),
        }
    }
    Ok(report)
}

/// One CNI invocation: the result or the error JSON on stdout.
fn plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    let version = weft_cli::cni::error_version(&stdin);
    let outcome = match read {
        Err(e) => Err(CniError::Decode(format!("cannot read stdin: {e}"))),
        Ok(_) => std::panic::catch_unwind(|| weft_cli::cni::run(&ProcessEnv, &stdin))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(CniError::Internal(format!("panicked: {what}")))
            }),
    };
    let (text, code) = match outcome {
        Ok(Some(out)) => (out, ExitCode::SUCCESS),
        Ok(None) => (String::new(), ExitCode::SUCCESS),
        Err(e) => {
            tracing::warn!(code = e.code(), "{e}");
            (e.to_json(&version), ExitCode::FAILURE)
        }
    };
    let mut stdout = std::io::stdout().lock();
    if !text.is_empty()
        && writeln!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_err()
    {
        return ExitCode::FAILURE;
    }
    code
}

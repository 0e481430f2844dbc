//! weft-cni: the chained CNI plugin that tells the node agent about new and deleted pod
//! sandboxes (run by the container runtime with no arguments, `CNI_*` in the environment
//! and the network configuration on stdin). The node agent installs it and keeps it
//! chained; the logic is [`weft_cni::run`].

use std::io::{Read, Write};
use std::process::ExitCode;

use weft_cni::config::ProcessEnv;
use weft_cni::error::CniError;

/// The largest network configuration read from stdin.
const MAX_STDIN: u64 = 4 << 20;

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
    match std::env::args().nth(1).as_deref() {
        None => plugin(),
        Some("--version" | "-V") => {
            println!("weft-cni {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(_) => {
            eprintln!(
                "weft-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND and the \
                 network configuration on stdin, and the node agent installs it (docs/cni.md)"
            );
            ExitCode::from(2)
        }
    }
}

/// One CNI invocation: the result or the error JSON on stdout.
fn plugin() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    let version = weft_cni::error_version(&stdin);
    let outcome = match read {
        Err(e) => Err(CniError::Decode(format!("cannot read stdin: {e}"))),
        Ok(_) => std::panic::catch_unwind(|| weft_cni::run(&ProcessEnv, &stdin)).unwrap_or_else(
            |panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(CniError::Internal(format!("panicked: {what}")))
            },
        ),
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

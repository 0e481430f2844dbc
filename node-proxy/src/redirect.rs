//! Traffic capture rules inside a pod's network namespace (nftables + policy routing).
//!
//! ```text
//!  app --connect(any:port)--> [nat output]     --redirect--> 127.0.0.1:15001 (outbound)
//!  peer --> pod-ip:15008  ------------------------------------> HBONE listener
//!  peer --> pod-ip:port   --> [nat prerouting] --redirect--> :15006 (inbound plaintext)
//!  proxy sockets (mark 0x539/0x53a) and loopback traffic pass untouched.
//!  app replies to a transparent inbound connection (ct mark 0x53a) --> fwmark rule -->
//!  table 100 "local default dev lo" --> back to the proxy's socket.
//! ```
//!
//! One function installs, one removes and one lists; the sandbox calls them today, the
//! CNI plugin will call the same ones. Installing twice leaves one copy.

use std::io::Write;
use std::process::{Command, Stdio};

use runtime::netns::{Netns, MARK_INBOUND, MARK_OUTBOUND};

/// The nftables table the rules live in.
pub const TABLE: &str = "weft";
/// The routing table for replies to transparent inbound connections.
pub const ROUTE_TABLE: u32 = 100;

/// Why capture rules could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// A command could not be started (not installed?).
    #[error("{pod}: cannot run {command}: {source} (is the nftables package installed?)")]
    Spawn {
        /// The pod.
        pod: String,
        /// The program.
        command: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("{pod}: {command} failed: {stderr}")]
    Failed {
        /// The pod.
        pod: String,
        /// The command line.
        command: String,
        /// Its error output.
        stderr: String,
    },
}

/// The complete rule set, replaced atomically: declaring the table, deleting it and
/// declaring it again in one `nft -f` transaction makes installation idempotent.
pub fn ruleset() -> String {
    format!(
        r#"table ip {TABLE}
delete table ip {TABLE}
table ip {TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority -100; policy accept;
    meta l4proto != tcp accept
    iifname "lo" accept
    tcp dport 15008 accept
    fib daddr type local meta l4proto tcp redirect to :15006
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta l4proto != tcp accept
    meta mark {MARK_OUTBOUND:#x} accept
    meta mark {MARK_INBOUND:#x} accept
    oifname "lo" accept
    ip daddr 127.0.0.0/8 accept
    meta l4proto tcp redirect to :15001
  }}
  chain mark_replies {{
    type route hook output priority -150; policy accept;
    meta mark {MARK_INBOUND:#x} ct mark set {MARK_INBOUND:#x}
    ct direction reply ct mark {MARK_INBOUND:#x} meta mark set {MARK_INBOUND:#x}
  }}
}}
"#
    )
}

fn run(
    ns: &Netns,
    pod: &str,
    program: &'static str,
    args: &[&str],
    stdin: Option<String>,
) -> Result<String, RedirectError> {
    let command = format!("{program} {}", args.join(" "));
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = ns
        .run_blocking(move || {
            let mut child = Command::new(program)
                .args(&args)
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(text.as_bytes())?;
            }
            child.wait_with_output()
        })
        .and_then(|r| r)
        .map_err(|source| RedirectError::Spawn {
            pod: pod.to_owned(),
            command: program,
            source,
        })?;
    if !out.status.success() {
        return Err(RedirectError::Failed {
            pod: pod.to_owned(),
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the policy rule sending marked replies to the local table is present.
fn has_reply_rule(ns: &Netns, pod: &str) -> Result<bool, RedirectError> {
    let rules = run(ns, pod, "ip", &["rule", "show"], None)?;
    Ok(rules.contains(&format!("fwmark {MARK_INBOUND:#x} lookup {ROUTE_TABLE}")))
}

/// Installs (or re-installs) the capture rules in the pod's namespace.
pub fn install(ns: &Netns, pod: &str) -> Result<(), RedirectError> {
    run(ns, pod, "nft", &["-f", "-"], Some(ruleset()))?;
    let (mark, table) = (format!("{MARK_INBOUND:#x}"), ROUTE_TABLE.to_string());
    if !has_reply_rule(ns, pod)? {
        let args = [
            "rule", "add", "fwmark", &mark, "lookup", &table, "pref", &table,
        ];
        run(ns, pod, "ip", &args, None)?;
    }
    let args = [
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ];
    run(ns, pod, "ip", &args, None)?;
    Ok(())
}

/// Removes the capture rules; removing what is not there is not an error.
pub fn remove(ns: &Netns, pod: &str) -> Result<(), RedirectError> {
    let script = format!("table ip {TABLE}\ndelete table ip {TABLE}\n");
    run(ns, pod, "nft", &["-f", "-"], Some(script))?;
    let (mark, table) = (format!("{MARK_INBOUND:#x}"), ROUTE_TABLE.to_string());
    if has_reply_rule(ns, pod)? {
        let args = ["rule", "del", "fwmark", &mark, "lookup", &table];
        run(ns, pod, "ip", &args, None)?;
    }
    let _ = run(ns, pod, "ip", &["route", "flush", "table", &table], None);
    Ok(())
}

/// The rules as installed, for debugging: the nftables table, the policy rule and the
/// route table.
pub fn list(ns: &Netns, pod: &str) -> Result<String, RedirectError> {
    let nft = run(ns, pod, "nft", &["list", "table", "ip", TABLE], None)
        .unwrap_or_else(|e| format!("# no nftables table ip {TABLE}: {e}\n"));
    let rules = run(ns, pod, "ip", &["rule", "show"], None)?;
    let table = ROUTE_TABLE.to_string();
    let routes = run(ns, pod, "ip", &["route", "show", "table", &table], None)?;
    Ok(format!(
        "{nft}\n# ip rule\n{rules}\n# ip route table {ROUTE_TABLE}\n{routes}"
    ))
}

/// Which parts of the capture rules a pod's namespace holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The parts in place.
    pub present: Vec<String>,
    /// The parts missing: empty when the rules are complete.
    pub missing: Vec<String>,
}

/// Which parts of the capture rules are in the pod's namespace, for the CNI plugin's
/// CHECK (all of them?) and DEL (any of them?): the nftables table and its chains, the
/// policy rule for replies to transparent inbound connections, and its route.
pub fn installed(ns: &Netns, pod: &str) -> Result<Installed, RedirectError> {
    let mut parts = Installed::default();
    let mut note = |there: bool, part: String| match there {
        true => parts.present.push(part),
        false => parts.missing.push(part),
    };
    match run(ns, pod, "nft", &["list", "table", "ip", TABLE], None) {
        Ok(table) => {
            for chain in ["prerouting", "output", "mark_replies"] {
                let there = table.contains(&format!("chain {chain} {{"));
                note(there, format!("nftables chain ip {TABLE} {chain}"));
            }
        }
        // nft fails for a table that does not exist; one that cannot run is an error.
        Err(RedirectError::Failed { .. }) => note(false, format!("nftables table ip {TABLE}")),
        Err(e) => return Err(e),
    }
    let rule = has_reply_rule(ns, pod)?;
    note(
        rule,
        format!("ip rule fwmark {MARK_INBOUND:#x} lookup {ROUTE_TABLE}"),
    );
    let table = ROUTE_TABLE.to_string();
    // `ip route show` fails for a table that was never made: no route.
    let routes = match run(ns, pod, "ip", &["route", "show", "table", &table], None) {
        Ok(routes) => routes,
        Err(RedirectError::Failed { .. }) => String::new(),
        Err(e) => return Err(e),
    };
    let route = routes.contains("local default dev lo");
    note(
        route,
        format!("ip route local default dev lo table {ROUTE_TABLE}"),
    );
    Ok(parts)
}

//! The capture rules, programmed over netlink from the agent's own process: nftables
//! and policy routing inside each pod's network namespace, and the node's exemption of
//! kubelet probes. No `nft` or `ip` binary is run, the host's or any other.
//!
//! ```text
//!  in the pod (table ip weft):
//!   app --connect(any:port)--> [nat output]     --redirect--> 127.0.0.1:15001 (outbound)
//!   peer --> pod-ip:15008  ------------------------------------> HBONE listener
//!   169.254.7.127 (the node: a probe) --> pod-ip:port --------> the application itself
//!   peer --> pod-ip:port   --> [nat prerouting] --redirect--> :15006 (inbound plaintext)
//!   proxy sockets (mark 0x539/0x53a) and loopback pass; replies to a transparent
//!   inbound connection (ct mark 0x53a) --fwmark rule--> table 100 "local default dev lo"
//!
//!  on the node (table ip weft, table bridge weft):
//!   the node's own TCP to a captured pod --[nat postrouting]--> source 169.254.7.127
//!   a packet that arrives from elsewhere with source 169.254.7.127 --> dropped
//! ```
//!
//! Only the node can originate traffic from the probe address: its own connections are
//! source-NATed to it, and the same source from any pod (routed or bridged through the
//! node) is dropped, so nothing else can pass for the kubelet.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::fd::BorrowedFd;

use nlink::netlink::nftables::{
    BaseChain, Chain, CtDirection, Family, FibFlags, FilterHook, NatHook, Policy, Priority, Rule,
    Set, SetElement, SetKeyType, Transaction,
};
use nlink::netlink::route::Ipv4Route;
use nlink::netlink::rule::RuleBuilder;
use nlink::netlink::types::route::RouteType;
use nlink::netlink::{Connection, Nftables, Route};
use runtime::netns::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_INBOUND, MARK_OUTBOUND, OUTBOUND_PORT,
};

/// The nftables table the rules live in (in the pod, and on the node).
pub const TABLE: &str = "weft";
/// The routing table for replies to transparent inbound connections.
pub const ROUTE_TABLE: u32 = 100;
/// The address the node's probes reach captured pods from (link-local: no pod has it).
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// The node's set of captured pod IPs its probes are source-NATed for.
const PROBE_TARGETS: &str = "probe_targets";
const TCP: u8 = 6;

/// Why rules could not be changed or read.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// A netlink request failed.
    #[error("{target}: cannot {what}: {source}")]
    Netlink {
        /// The pod (`namespace/name`) or "the node".
        target: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        source: nlink::Error,
    },
}

fn netlink<'a>(
    target: &'a str,
    what: &'static str,
) -> impl FnOnce(nlink::Error) -> CaptureError + 'a {
    move |source| CaptureError::Netlink {
        target: target.to_owned(),
        what,
        source,
    }
}

/// A transaction that replaces `table` (of `family`) with what `build` adds: the old
/// one is deleted in the same batch if it exists, so the change is atomic and
/// installing twice leaves one copy.
async fn replace_table(
    conn: &Connection<Nftables>,
    family: Family,
    target: &str,
    build: impl FnOnce(Transaction) -> Result<Transaction, nlink::Error>,
) -> Result<(), CaptureError> {
    let genid = conn
        .generation()
        .await
        .map_err(netlink(target, "read the nftables generation"))?;
    let exists = conn
        .list_tables_in(family)
        .await
        .map_err(netlink(target, "list nftables tables"))?
        .iter()
        .any(|t| t.name == TABLE);
    let mut tx = conn.transaction().expect_generation(genid);
    if exists {
        tx = tx.del_table(TABLE, family);
    }
    let tx = build(tx.add_table(TABLE, family)).map_err(netlink(target, "build the rules"))?;
    tx.commit(conn)
        .await
        .map_err(netlink(target, "install the nftables rules"))
}

/// Installs (or re-installs, atomically) the capture rules in a pod's namespace.
/// `pod` names it in errors.
pub async fn install(
    netns: BorrowedFd<'_>,
    pod: &str,
    probe_source: Ipv4Addr,
) -> Result<(), CaptureError> {
    let nft = Connection::<Nftables>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    let ip = Family::Ip;
    replace_table(&nft, ip, pod, |tx| {
        let rule = |chain: &str| Rule::new(TABLE, chain).family(ip);
        Ok(tx
            .add_chain(
                Chain::new(TABLE, "prerouting")?.family(ip).base(
                    BaseChain::nat(NatHook::Prerouting, Priority::DstNat).policy(Policy::Accept),
                ),
            )
            .add_chain(
                Chain::new(TABLE, "output")?
                    .family(ip)
                    .base(BaseChain::nat(NatHook::Output, Priority::DstNat).policy(Policy::Accept)),
            )
            .add_chain(
                Chain::new(TABLE, "mark_replies")?
                    .family(ip)
                    .base(BaseChain::route(Priority::Mangle).policy(Policy::Accept)),
            )
            .add_rule(rule("prerouting").match_l4proto_not(TCP).accept())
            .add_rule(rule("prerouting").match_iif("lo").accept())
            // The node's probes reach the application itself, without identity or
            // policy: the node only ever sends them from this address.
            .add_rule(rule("prerouting").match_saddr_v4(probe_source, 32).accept())
            .add_rule(rule("prerouting").match_tcp_dport(HBONE_PORT).accept())
            .add_rule(
                rule("prerouting")
                    .match_fib_type(FibFlags::DADDR, RouteType::Local)
                    .match_l4proto(TCP)
                    .redirect(Some(INBOUND_PLAINTEXT_PORT)),
            )
            .add_rule(rule("output").match_l4proto_not(TCP).accept())
            .add_rule(rule("output").match_mark(MARK_OUTBOUND).accept())
            .add_rule(rule("output").match_mark(MARK_INBOUND).accept())
            .add_rule(rule("output").match_oif("lo").accept())
            .add_rule(
                rule("output")
                    .match_daddr_v4(Ipv4Addr::LOCALHOST, 8)
                    .accept(),
            )
            .add_rule(
                rule("output")
                    .match_l4proto(TCP)
                    .redirect(Some(OUTBOUND_PORT)),
            )
            .add_rule(
                rule("mark_replies")
                    .match_mark(MARK_INBOUND)
                    .set_ct_mark(MARK_INBOUND),
            )
            .add_rule(
                rule("mark_replies")
                    .match_ct_direction(CtDirection::Reply)
                    .match_ct_mark(MARK_INBOUND)
                    .set_mark(MARK_INBOUND),
            ))
    })
    .await?;
    let rt = Connection::<Route>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    if !has_reply_rule(&rt, pod).await? {
        rt.add_rule(reply_rule())
            .await
            .map_err(netlink(pod, "add the policy rule for transparent replies"))?;
    }
    rt.replace_route(reply_route())
        .await
        .map_err(netlink(pod, "add the local route for transparent replies"))
}

fn reply_rule() -> RuleBuilder {
    RuleBuilder::v4()
        .fwmark(MARK_INBOUND)
        .table(ROUTE_TABLE)
        .priority(ROUTE_TABLE)
}

fn reply_route() -> Ipv4Route {
    Ipv4Route::new(Ipv4Addr::UNSPECIFIED, 0)
        .route_type(RouteType::Local)
        .dev("lo")
        .table(ROUTE_TABLE)
}

async fn has_reply_rule(rt: &Connection<Route>, pod: &str) -> Result<bool, CaptureError> {
    Ok(rt
        .get_rules_v4()
        .await
        .map_err(netlink(pod, "list policy rules"))?
        .iter()
        .any(|r| r.fwmark() == Some(MARK_INBOUND) && r.table() == ROUTE_TABLE))
}

/// Removes the capture rules from a pod's namespace; what is not there is not an error.
pub async fn remove(netns: BorrowedFd<'_>, pod: &str) -> Result<(), CaptureError> {
    let nft = Connection::<Nftables>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    nft.del_table_if_exists(TABLE, Family::Ip)
        .await
        .map_err(netlink(pod, "delete the nftables rules"))?;
    let rt = Connection::<Route>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    rt.del_rule_if_exists(reply_rule())
        .await
        .map_err(netlink(pod, "delete the policy rule"))?;
    rt.del_route_if_exists(reply_route())
        .await
        .map_err(netlink(pod, "delete the local route"))?;
    Ok(())
}

/// Which parts of the capture rules a pod's namespace holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    /// The parts in place.
    pub present: Vec<String>,
    /// The parts missing: empty when the rules are complete.
    pub missing: Vec<String>,
}

impl Installed {
    /// Every part is there.
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Which parts of the capture rules are in a pod's namespace: the nftables table and
/// its chains, the policy rule for replies to transparent inbound connections, and its
/// route.
pub async fn installed(netns: BorrowedFd<'_>, pod: &str) -> Result<Installed, CaptureError> {
    let mut parts = Installed::default();
    let mut note = |there: bool, part: String| match there {
        true => parts.present.push(part),
        false => parts.missing.push(part),
    };
    let nft = Connection::<Nftables>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    let has_table = nft
        .list_tables_in(Family::Ip)
        .await
        .map_err(netlink(pod, "list nftables tables"))?
        .iter()
        .any(|t| t.name == TABLE);
    if has_table {
        let chains = nft
            .list_chains_in(TABLE, Family::Ip)
            .await
            .map_err(netlink(pod, "list nftables chains"))?;
        for chain in ["prerouting", "output", "mark_replies"] {
            note(
                chains.iter().any(|c| c.name == chain),
                format!("nftables chain ip {TABLE} {chain}"),
            );
        }
    } else {
        note(false, format!("nftables table ip {TABLE}"));
    }
    let rt = Connection::<Route>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    note(
        has_reply_rule(&rt, pod).await?,
        format!("ip rule fwmark {MARK_INBOUND:#x} lookup {ROUTE_TABLE}"),
    );
    let route = rt
        .get_routes_for_table(ROUTE_TABLE)
        .await
        .map_err(netlink(pod, "list routes"))?
        .iter()
        .any(|r| r.route_type() == RouteType::Local && r.dst_len() == 0);
    note(
        route,
        format!("ip route local default dev lo table {ROUTE_TABLE}"),
    );
    Ok(parts)
}

/// Sets the node's probe exemption (in the calling process's network namespace, the
/// node's): TCP the node itself opens to one of `pods` leaves with `probe_source` as
/// its source, which those pods' rules let through; the same source arriving from
/// anywhere else is dropped. Replaced atomically.
pub async fn node_probes(
    pods: &BTreeSet<Ipv4Addr>,
    probe_source: Ipv4Addr,
) -> Result<(), CaptureError> {
    let target = "the node";
    let nft = Connection::<Nftables>::new().map_err(netlink(target, "open netlink"))?;
    let ip = Family::Ip;
    replace_table(&nft, ip, target, |tx| {
        let set = Set::new(TABLE, PROBE_TARGETS)
            .family(ip)
            .key_type(SetKeyType::Ipv4Addr);
        let elements: Vec<SetElement> = pods.iter().map(|a| SetElement::ipv4(*a)).collect();
        let mut tx = tx
            .add_set(set.clone())
            .add_chain(Chain::new(TABLE, "probes")?.family(ip).base(
                BaseChain::nat(NatHook::Postrouting, Priority::SrcNat).policy(Policy::Accept),
            ))
            .add_chain(Chain::new(TABLE, "forward")?.family(ip).base(
                BaseChain::filter(FilterHook::Forward, Priority::Filter).policy(Policy::Accept),
            ))
            .add_rule(
                Rule::new(TABLE, "probes")
                    .family(ip)
                    .match_daddr_in_set(PROBE_TARGETS)
                    .match_fib_type(FibFlags::SADDR, RouteType::Local)
                    .match_l4proto(TCP)
                    .snat(probe_source, None),
            )
            .add_rule(
                Rule::new(TABLE, "forward")
                    .family(ip)
                    .match_saddr_v4(probe_source, 32)
                    .drop(),
            );
        if !elements.is_empty() {
            tx = tx.add_set_elements(&set, &elements);
        }
        Ok(tx)
    })
    .await?;
    // Pods on one bridge reach each other without the node routing them: drop the probe
    // source there too.
    let bridge = Family::Bridge;
    replace_table(&nft, bridge, target, |tx| {
        Ok(tx
            .add_chain(Chain::new(TABLE, "forward")?.family(bridge).base(
                BaseChain::filter(FilterHook::Forward, Priority::Filter).policy(Policy::Accept),
            ))
            .add_rule(
                Rule::new(TABLE, "forward")
                    .family(bridge)
                    .match_saddr_v4(probe_source, 32)
                    .drop(),
            ))
    })
    .await
}

/// Whether the kernel's nftables answers over netlink here: the number of tables (of
/// any family) it holds.
pub async fn nftables_usable() -> Result<usize, CaptureError> {
    let target = "this node";
    let nft = Connection::<Nftables>::new().map_err(netlink(target, "open netlink"))?;
    Ok(nft
        .list_tables()
        .await
        .map_err(netlink(target, "list nftables tables"))?
        .len())
}

/// Removes the node's probe exemption (on uninstall).
pub async fn remove_node_probes() -> Result<(), CaptureError> {
    let target = "the node";
    let nft = Connection::<Nftables>::new().map_err(netlink(target, "open netlink"))?;
    for family in [Family::Ip, Family::Bridge] {
        nft.del_table_if_exists(TABLE, family)
            .await
            .map_err(netlink(target, "delete the nftables rules"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::process::Command;

    use super::*;

    /// A fresh network namespace with loopback up, and a way to run commands in it.
    struct Ns(OwnedFd);

    impl Ns {
        fn new() -> Self {
            let fd = std::thread::spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
                let up = Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .status();
                assert!(up.expect("ip").success());
                OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").expect("netns"))
            })
            .join()
            .expect("thread");
            Ns(fd)
        }

        /// What `args` prints inside (the test's own check, not the agent's way).
        fn run(&self, args: &[&str]) -> String {
            let fd = self.0.try_clone().expect("dup");
            let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
            std::thread::spawn(move || {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let out = Command::new(&args[0])
                    .args(&args[1..])
                    .output()
                    .expect("run");
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .join()
            .expect("thread")
        }
    }

    #[ignore = "needs root"]
    #[tokio::test]
    async fn rules_install_once_read_back_and_go_away() {
        let ns = Ns::new();
        let pod = "shop/cart";
        let before = installed(ns.0.as_fd(), pod).await.expect("read");
        assert!(before.present.is_empty(), "{before:?}");
        install(ns.0.as_fd(), pod, PROBE_SOURCE)
            .await
            .expect("install");
        let first = ns.run(&["nft", "list", "ruleset"]);
        assert!(first.contains("redirect to :15001"), "{first}");
        assert!(first.contains("ip saddr 169.254.7.127 accept"), "{first}");
        assert!(first.contains("redirect to :15006"), "{first}");
        assert!(installed(ns.0.as_fd(), pod).await.expect("read").complete());
        // Again: the same rules, once.
        install(ns.0.as_fd(), pod, PROBE_SOURCE)
            .await
            .expect("install again");
        assert_eq!(ns.run(&["nft", "list", "ruleset"]), first);
        let rules = ns.run(&["ip", "rule"]);
        assert_eq!(
            rules.matches("fwmark 0x53a lookup 100").count(),
            1,
            "{rules}"
        );
        assert!(ns
            .run(&["ip", "route", "show", "table", "100"])
            .contains("local default dev lo"));
        remove(ns.0.as_fd(), pod).await.expect("remove");
        let after = installed(ns.0.as_fd(), pod).await.expect("read");
        assert!(after.present.is_empty(), "{after:?}");
        assert_eq!(ns.run(&["nft", "list", "ruleset"]).trim(), "");
        remove(ns.0.as_fd(), pod)
            .await
            .expect("removing nothing is fine");
    }

    #[ignore = "needs root"]
    #[test]
    fn the_node_exempts_probes_to_captured_pods_only() {
        let ns = Ns::new();
        let fd = ns.0.try_clone().expect("dup");
        // node_probes works in the calling thread's namespace: run it inside.
        std::thread::spawn(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let pods =
                    BTreeSet::from([Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3)]);
                node_probes(&pods, PROBE_SOURCE).await.expect("set");
                node_probes(&pods, PROBE_SOURCE).await.expect("set again");
            });
        })
        .join()
        .expect("thread");
        let ruleset = ns.run(&["nft", "list", "ruleset"]);
        assert!(ruleset.contains("10.244.1.2"), "{ruleset}");
        assert!(ruleset.contains("snat to 169.254.7.127"), "{ruleset}");
        assert!(ruleset.contains("table bridge weft"), "{ruleset}");
        assert_eq!(ruleset.matches("table ip weft").count(), 1, "{ruleset}");
        assert!(ruleset.contains("ip saddr 169.254.7.127 drop"), "{ruleset}");
    }
}

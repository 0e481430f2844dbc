//! The capture rules, programmed over netlink from the agent's own process: nftables
//! and policy routing inside each pod's network namespace, and the node's exemption of
//! kubelet probes. No `nft` or `ip` binary is run, the host's or any other.
//!
//! ```text
//!  in the pod (table inet weft: IPv4 and IPv6 alike):
//!   app --connect(any:port)--> [nat output]     --redirect--> loopback:15001 (outbound)
//!   (connections the pod had open before its rules keep their path: set open_before_v4/v6)
//!   peer --> pod-ip:15008  ------------------------------------> HBONE listener
//!   169.254.7.127 / fd77:6566:74::7f (the node: a probe) --> pod-ip:port --> the app
//!   peer --> pod-ip:port   --> [nat prerouting] --redirect--> :15006 (inbound plaintext)
//!   proxy sockets (mark 0x539/0x53a), loopback and IPv6 link-local pass; replies to a transparent
//!   inbound connection (ct mark 0x53a) --fwmark rule--> table 100 "local default dev lo"
//!   (one rule and route per family)
//!
//!  on the node (table inet weft, table bridge weft):
//!   the node's own TCP to a captured pod --[nat postrouting]--> the probe source
//!   a packet that arrives from elsewhere with a probe source --> dropped
//! ```
//!
//! Only the node can originate traffic from the probe address: its own connections are
//! source-NATed to it, and the same source from any pod (routed or bridged through the
//! node) is dropped, so nothing else can pass for the kubelet.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;

use nlink::netlink::nftables::{
    BaseChain, Chain, CtDirection, Family, FibFlags, FilterHook, NatHook, PacketField, Policy,
    Priority, Rule, Set, SetElement, SetKeyType, TcpFlags, Transaction,
};
use nlink::netlink::route::{Ipv4Route, Ipv6Route};
use nlink::netlink::rule::RuleBuilder;
use nlink::netlink::types::route::RouteType;
use nlink::netlink::{Connection, Nftables, Route, SockDiag};
use runtime::netns::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, MARK_INBOUND, MARK_OUTBOUND, OUTBOUND_PORT,
};

/// The nftables table the rules live in (in the pod, and on the node).
pub const TABLE: &str = "weft";
/// The routing table for replies to transparent inbound connections.
pub const ROUTE_TABLE: u32 = 100;
/// The addresses the node's probes reach captured pods from, one per family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSource {
    /// For IPv4 pods.
    pub v4: Ipv4Addr,
    /// For IPv6 pods.
    pub v6: Ipv6Addr,
}

/// The default probe sources: IPv4 link-local, and an address of a unique local
/// (`fd00::/8`) prefix of Weft's own: no pod has either.
pub const PROBE_SOURCE: ProbeSource = ProbeSource {
    v4: Ipv4Addr::new(169, 254, 7, 127),
    v6: Ipv6Addr::new(0xfd77, 0x6566, 0x74, 0, 0, 0, 0, 0x7f),
};
/// The marker chain of rules that leave IPv6 uncaptured.
const IPV4_ONLY: &str = "ipv4_only";
/// IPv6 link-local addresses (`fe80::/10`): never captured on the way out.
const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0);
/// The node's sets of captured pod IPs its probes are source-NATed for.
const PROBE_TARGETS: &str = "probe_targets";
const PROBE_TARGETS_V6: &str = "probe_targets_v6";
/// The table an earlier release kept its rules in (IPv4 only): replaced by the `inet`
/// one, and removed with it.
const LEGACY: Family = Family::Ip;
const TCP: u8 = 6;
/// The flags that tell a connection's first segment: a pure SYN (ECN's bits aside). A
/// connection the pod had open before its rules first shows up mid-stream (connection
/// tracking starts with the rules and picks it up on its next segment).
const OPENING: TcpFlags =
    TcpFlags(TcpFlags::SYN.0 | TcpFlags::ACK.0 | TcpFlags::RST.0 | TcpFlags::FIN.0);

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
/// one is deleted in the same batch if it exists (and, for `inet`, an earlier release's
/// `ip` table), so the change is atomic and installing twice leaves one copy.
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
    let legacy = family == Family::Inet
        && conn
            .list_tables_in(LEGACY)
            .await
            .map_err(netlink(target, "list nftables tables"))?
            .iter()
            .any(|t| t.name == TABLE);
    let mut tx = conn.transaction().expect_generation(genid);
    if exists {
        tx = tx.del_table(TABLE, family);
    }
    if legacy {
        tx = tx.del_table(TABLE, LEGACY);
    }
    let tx = build(tx.add_table(TABLE, family)).map_err(netlink(target, "build the rules"))?;
    tx.commit(conn)
        .await
        .map_err(netlink(target, "install the nftables rules"))
}

/// Installs (or re-installs, atomically) the capture rules in a pod's namespace.
/// `pod` names it in errors. `ipv6`: capture its IPv6 connections too, which needs
/// listeners that take IPv6 ([`runtime::netns::pod_listen_addrs`] for a pod with an IPv6
/// address); without, IPv6 passes uncaptured, as an earlier release left it.
///
/// Connections the pod already has open keep their path until they close: redirecting
/// one mid-stream to a proxy that never saw its handshake would hang it. The rules go
/// in twice. First every new connection (its SYN) is redirected and any other segment
/// passes; then, with nothing able to open uncaptured, the pod's open connections are
/// listed and only their segments keep passing. A stranger's segment without a SYN
/// (which a listener could take as a SYN cookie) is redirected, as before, and refused.
pub async fn install(
    netns: BorrowedFd<'_>,
    pod: &str,
    probe_source: ProbeSource,
    ipv6: bool,
) -> Result<(), CaptureError> {
    let nft = Connection::<Nftables>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    replace_table(&nft, Family::Inet, pod, |tx| {
        pod_rules(tx, probe_source, ipv6)
    })
    .await?;
    let kept = match open_connections(netns, pod).await {
        Ok(open) => keep_open(&nft, pod, &open).await,
        Err(e) => Err(e),
    };
    if let Err(e) = kept {
        // Nothing half-installed: the caller takes the pod back from node-proxy.
        let _ = nft.del_table_if_exists(TABLE, Family::Inet).await;
        return Err(e);
    }
    let routed = async {
        let rt = Connection::<Route>::new_in(netns)
            .map_err(netlink(pod, "open netlink in its network namespace"))?;
        for v6 in [false, true] {
            if v6 && !has_ipv6(&rt, pod).await? {
                continue;
            }
            if !has_reply_rule(&rt, pod, v6).await? {
                rt.add_rule(reply_rule(v6))
                    .await
                    .map_err(netlink(pod, "add the policy rule for transparent replies"))?;
            }
            match v6 {
                false => rt.replace_route(reply_route()).await,
                true => rt.replace_route(reply_route_v6()).await,
            }
            .map_err(netlink(pod, "add the local route for transparent replies"))?;
        }
        Ok(())
    }
    .await;
    if routed.is_err() {
        // Redirects without the route back would hang inbound connections: none of it
        // stays (the caller retries the whole install).
        let _ = remove(netns, pod).await;
    }
    routed
}

/// The connections a pod had open, as set elements keyed peer address, peer port, pod
/// address, pod port (IPv4 and IPv6 apart).
#[derive(Debug, Default)]
struct Open {
    v4: Vec<SetElement>,
    v6: Vec<SetElement>,
}

/// The most open connections kept on their path; any more are captured (and so reset)
/// on their next segment. It bounds the rules' size (under 1 MB of set elements).
const OPEN_MAX: usize = 16_384;
/// The marker chain of the second pass of [`install`]: without it, the pod's rules are
/// not complete.
const KEPT_OPEN: &str = "kept_open";
/// Set elements per netlink message: an IPv6 connection's takes about 52 bytes of the
/// 64 KiB a message's list can hold.
const ELEMENTS_PER_MESSAGE: usize = 1024;
/// The sets of open connections, for the two families.
const OPEN_V4: &str = "open_before_v4";
const OPEN_V6: &str = "open_before_v6";

/// The pod's TCP connections (every state but listening) with a peer off loopback, but
/// for node-proxy's own on its listeners (already captured).
async fn open_connections(netns: BorrowedFd<'_>, pod: &str) -> Result<Open, CaptureError> {
    let diag = Connection::<SockDiag>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    let sockets = diag
        .query_tcp()
        .await
        .map_err(netlink(pod, "list its TCP connections"))?;
    let mut open = Open::default();
    let mut left = 0;
    for s in sockets {
        let (peer, local) = (s.remote.ip().to_canonical(), s.local.ip().to_canonical());
        let proxied = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT].contains(&s.local.port());
        if s.remote.port() == 0 || peer.is_loopback() || peer.is_unspecified() || proxied {
            continue;
        }
        if open.v4.len() + open.v6.len() >= OPEN_MAX {
            left += 1;
            continue;
        }
        let ports = (
            SetElement::port(s.remote.port()),
            SetElement::port(s.local.port()),
        );
        match (peer, local) {
            (IpAddr::V4(p), IpAddr::V4(l)) => open.v4.push(SetElement::concat([
                SetElement::ipv4(p),
                ports.0,
                SetElement::ipv4(l),
                ports.1,
            ])),
            (IpAddr::V6(p), IpAddr::V6(l)) => open.v6.push(SetElement::concat([
                SetElement::ipv6(p),
                ports.0,
                SetElement::ipv6(l),
                ports.1,
            ])),
            _ => {}
        }
    }
    if left > 0 {
        tracing::warn!(
            pod,
            kept = OPEN_MAX,
            left,
            "more connections open than are kept on their path: the rest are reset"
        );
    }
    Ok(open)
}

/// The pod's rules as the first pass of [`install`] leaves them: a SYN is redirected,
/// any other segment passes.
fn pod_rules(
    tx: Transaction,
    probe_source: ProbeSource,
    ipv6: bool,
) -> Result<Transaction, nlink::Error> {
    let ip = Family::Inet;
    let rule = |chain: &str| Rule::new(TABLE, chain).family(ip);
    let mut tx = tx
        .add_chain(
            Chain::new(TABLE, "prerouting")?
                .family(ip)
                .base(BaseChain::nat(NatHook::Prerouting, Priority::DstNat).policy(Policy::Accept)),
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
        );
    if !ipv6 {
        // Any IPv6 packet (the address matchers carry the family's guard).
        let any6 = |chain: &str| rule(chain).match_saddr_v6(Ipv6Addr::UNSPECIFIED, 0);
        tx = tx
            .add_chain(Chain::new(TABLE, IPV4_ONLY)?.family(ip))
            .add_rule(any6("prerouting").accept())
            .add_rule(any6("output").accept());
    }
    let inbound = || {
        rule("prerouting")
            .match_fib_type(FibFlags::DADDR, RouteType::Local)
            .match_l4proto(TCP)
    };
    let outbound = || rule("output").match_l4proto(TCP);
    tx = tx
        .add_rule(rule("prerouting").match_l4proto_not(TCP).accept())
        .add_rule(rule("prerouting").match_iif("lo").accept())
        // The node's probes reach the application itself, without identity or
        // policy: the node only ever sends them from this address.
        .add_rule(
            rule("prerouting")
                .match_saddr_v4(probe_source.v4, 32)
                .accept(),
        )
        .add_rule(
            rule("prerouting")
                .match_saddr_v6(probe_source.v6, 128)
                .accept(),
        )
        .add_rule(rule("prerouting").match_tcp_dport(HBONE_PORT).accept())
        .add_rule(
            inbound()
                .match_tcp_flags(TcpFlags::SYN, OPENING)
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
                .match_daddr_v6(Ipv6Addr::LOCALHOST, 128)
                .accept(),
        )
        // Link-local destinations need the interface, which a redirect loses: they
        // leave uncaptured, and a captured peer checks them as it does plaintext.
        .add_rule(rule("output").match_daddr_v6(LINK_LOCAL, 10).accept())
        .add_rule(
            outbound()
                .match_tcp_flags(TcpFlags::SYN, OPENING)
                .redirect(Some(OUTBOUND_PORT)),
        );
    Ok(tx
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
}

/// The second pass of [`install`]: the pod's `open` connections are let through and any
/// other segment without a SYN is redirected (and refused). The sets are filled a message
/// per transaction (a batch is bounded by the socket's buffer), then the rules and their
/// marker chain go in at once.
async fn keep_open(nft: &Connection<Nftables>, pod: &str, open: &Open) -> Result<(), CaptureError> {
    use PacketField::{Ip4Daddr, Ip4Saddr, Ip6Daddr, Ip6Saddr, TcpDport, TcpSport};
    let ip = Family::Inet;
    let key = |addr: SetKeyType| {
        SetKeyType::Concat(vec![
            addr.clone(),
            SetKeyType::InetService,
            addr,
            SetKeyType::InetService,
        ])
    };
    let v4 = Set::new(TABLE, OPEN_V4)
        .family(ip)
        .key_type(key(SetKeyType::Ipv4Addr));
    let v6 = Set::new(TABLE, OPEN_V6)
        .family(ip)
        .key_type(key(SetKeyType::Ipv6Addr));
    let failed = |what| netlink(pod, what);
    nft.transaction()
        .add_set(v4.clone())
        .add_set(v6.clone())
        .commit(nft)
        .await
        .map_err(failed("add the sets of its open connections"))?;
    for (set, elements) in [(&v4, &open.v4), (&v6, &open.v6)] {
        // A message's list of elements is one attribute, at most 64 KiB long.
        for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
            nft.transaction()
                .add_set_elements(set, chunk)
                .commit(nft)
                .await
                .map_err(failed("list its open connections in the rules"))?;
        }
    }
    let rule = |chain: &str| Rule::new(TABLE, chain).family(ip).match_l4proto(TCP);
    let inbound = || rule("prerouting").match_fib_type(FibFlags::DADDR, RouteType::Local);
    let outbound = || rule("output");
    // The peer first: its source on the way in, its destination on the way out.
    nft.transaction()
        .add_chain(
            Chain::new(TABLE, KEPT_OPEN)
                .map_err(failed("name a chain"))?
                .family(ip),
        )
        .add_rule(
            inbound()
                .match_concat_in_set(&[Ip4Saddr, TcpSport, Ip4Daddr, TcpDport], OPEN_V4)
                .accept(),
        )
        .add_rule(
            inbound()
                .match_concat_in_set(&[Ip6Saddr, TcpSport, Ip6Daddr, TcpDport], OPEN_V6)
                .accept(),
        )
        .add_rule(inbound().redirect(Some(INBOUND_PLAINTEXT_PORT)))
        .add_rule(
            outbound()
                .match_concat_in_set(&[Ip4Daddr, TcpDport, Ip4Saddr, TcpSport], OPEN_V4)
                .accept(),
        )
        .add_rule(
            outbound()
                .match_concat_in_set(&[Ip6Daddr, TcpDport, Ip6Saddr, TcpSport], OPEN_V6)
                .accept(),
        )
        .add_rule(outbound().redirect(Some(OUTBOUND_PORT)))
        .commit(nft)
        .await
        .map_err(failed("refuse segments of no open connection"))
}

fn reply_rule(v6: bool) -> RuleBuilder {
    match v6 {
        false => RuleBuilder::v4(),
        true => RuleBuilder::v6(),
    }
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

fn reply_route_v6() -> Ipv6Route {
    Ipv6Route::new(Ipv6Addr::UNSPECIFIED, 0)
        .route_type(RouteType::Local)
        .dev("lo")
        .table(ROUTE_TABLE)
}

/// Whether the namespace has IPv6 (an address on an interface other than loopback):
/// a pod without it needs no IPv6 reply rule, and a kernel without IPv6 takes none.
async fn has_ipv6(rt: &Connection<Route>, pod: &str) -> Result<bool, CaptureError> {
    Ok(rt
        .get_addresses()
        .await
        .map_err(netlink(pod, "list its addresses"))?
        .iter()
        .any(|a| matches!(a.address(), Some(IpAddr::V6(ip)) if !ip.is_loopback())))
}

async fn has_reply_rule(rt: &Connection<Route>, pod: &str, v6: bool) -> Result<bool, CaptureError> {
    let rules = match v6 {
        false => rt.get_rules_v4().await,
        true => rt.get_rules_v6().await,
    }
    .map_err(netlink(pod, "list policy rules"))?;
    Ok(rules
        .iter()
        .any(|r| r.fwmark() == Some(MARK_INBOUND) && r.table() == ROUTE_TABLE))
}

/// Removes the capture rules from a pod's namespace (an earlier release's too); what is
/// not there is not an error.
pub async fn remove(netns: BorrowedFd<'_>, pod: &str) -> Result<(), CaptureError> {
    let nft = Connection::<Nftables>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    for family in [Family::Inet, LEGACY] {
        nft.del_table_if_exists(TABLE, family)
            .await
            .map_err(netlink(pod, "delete the nftables rules"))?;
    }
    let rt = Connection::<Route>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    rt.del_rule_if_exists(reply_rule(false))
        .await
        .map_err(netlink(pod, "delete the policy rule"))?;
    rt.del_route_if_exists(reply_route())
        .await
        .map_err(netlink(pod, "delete the local route"))?;
    // Whatever addresses are left (the interface may be gone): a kernel without IPv6
    // has neither, and says so.
    let _ = rt.del_rule_if_exists(reply_rule(true)).await;
    let _ = rt.del_route_if_exists(reply_route_v6()).await;
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
        .list_tables_in(Family::Inet)
        .await
        .map_err(netlink(pod, "list nftables tables"))?
        .iter()
        .any(|t| t.name == TABLE);
    if has_table {
        let chains = nft
            .list_chains_in(TABLE, Family::Inet)
            .await
            .map_err(netlink(pod, "list nftables chains"))?;
        for chain in ["prerouting", "output", "mark_replies", KEPT_OPEN] {
            note(
                chains.iter().any(|c| c.name == chain),
                format!("nftables chain inet {TABLE} {chain}"),
            );
        }
        if chains.iter().any(|c| c.name == IPV4_ONLY) {
            // Not a missing part: the pod's listeners take IPv4 only.
            note(true, "IPv6 left uncaptured (IPv4-only listeners)".into());
        }
    } else {
        note(false, format!("nftables table inet {TABLE}"));
    }
    let rt = Connection::<Route>::new_in(netns)
        .map_err(netlink(pod, "open netlink in its network namespace"))?;
    let routes = rt
        .get_routes_for_table(ROUTE_TABLE)
        .await
        .map_err(netlink(pod, "list routes"))?;
    let families = match has_ipv6(&rt, pod).await? {
        true => &[false, true][..],
        false => &[false][..],
    };
    for &v6 in families {
        // AF_INET, AF_INET6.
        let (ip, family) = match v6 {
            false => ("ip", 2),
            true => ("ip -6", 10),
        };
        note(
            has_reply_rule(&rt, pod, v6).await?,
            format!("{ip} rule fwmark {MARK_INBOUND:#x} lookup {ROUTE_TABLE}"),
        );
        let route = routes.iter().any(|r| {
            r.route_type() == RouteType::Local && r.dst_len() == 0 && r.family() == family
        });
        note(
            route,
            format!("{ip} route local default dev lo table {ROUTE_TABLE}"),
        );
    }
    Ok(parts)
}

/// Sets the node's probe exemption (in the calling process's network namespace, the
/// node's): TCP the node itself opens to one of `pods` leaves with the probe source of
/// its family as its source, which those pods' rules let through; the same sources
/// arriving from anywhere else are dropped. Replaced atomically.
pub async fn node_probes(
    pods: &BTreeSet<IpAddr>,
    probe_source: ProbeSource,
) -> Result<(), CaptureError> {
    let target = "the node";
    let nft = Connection::<Nftables>::new().map_err(netlink(target, "open netlink"))?;
    let inet = Family::Inet;
    replace_table(&nft, inet, target, |tx| {
        let set = Set::new(TABLE, PROBE_TARGETS)
            .family(inet)
            .key_type(SetKeyType::Ipv4Addr);
        let set6 = Set::new(TABLE, PROBE_TARGETS_V6)
            .family(inet)
            .key_type(SetKeyType::Ipv6Addr);
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for ip in pods {
            match ip.to_canonical() {
                IpAddr::V4(a) => v4.push(SetElement::ipv4(a)),
                IpAddr::V6(a) => v6.push(SetElement::ipv6(a)),
            }
        }
        let rule = |chain: &str| Rule::new(TABLE, chain).family(inet);
        let mut tx = tx
            .add_set(set.clone())
            .add_set(set6.clone())
            .add_chain(Chain::new(TABLE, "probes")?.family(inet).base(
                BaseChain::nat(NatHook::Postrouting, Priority::SrcNat).policy(Policy::Accept),
            ))
            .add_chain(Chain::new(TABLE, "forward")?.family(inet).base(
                BaseChain::filter(FilterHook::Forward, Priority::Filter).policy(Policy::Accept),
            ))
            .add_rule(
                rule("probes")
                    .match_daddr_in_set(PROBE_TARGETS)
                    .match_fib_type(FibFlags::SADDR, RouteType::Local)
                    .match_l4proto(TCP)
                    .snat(probe_source.v4, None),
            )
            .add_rule(
                rule("probes")
                    .match_in_set(PacketField::Ip6Daddr, PROBE_TARGETS_V6)
                    .match_fib_type(FibFlags::SADDR, RouteType::Local)
                    .match_l4proto(TCP)
                    .snat_v6(probe_source.v6, None),
            )
            .add_rule(rule("forward").match_saddr_v4(probe_source.v4, 32).drop())
            .add_rule(rule("forward").match_saddr_v6(probe_source.v6, 128).drop());
        if !v4.is_empty() {
            tx = tx.add_set_elements(&set, &v4);
        }
        if !v6.is_empty() {
            tx = tx.add_set_elements(&set6, &v6);
        }
        Ok(tx)
    })
    .await?;
    // Pods on one bridge reach each other without the node routing them: drop the probe
    // sources there too.
    let bridge = Family::Bridge;
    replace_table(&nft, bridge, target, |tx| {
        let rule = |chain: &str| Rule::new(TABLE, chain).family(bridge);
        Ok(tx
            .add_chain(Chain::new(TABLE, "forward")?.family(bridge).base(
                BaseChain::filter(FilterHook::Forward, Priority::Filter).policy(Policy::Accept),
            ))
            .add_rule(rule("forward").match_saddr_v4(probe_source.v4, 32).drop())
            .add_rule(rule("forward").match_saddr_v6(probe_source.v6, 128).drop()))
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
    for family in [Family::Inet, LEGACY, Family::Bridge] {
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
        // A dual-stack pod, and the IPv4-only table an earlier release left.
        ns.run(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ]);
        ns.run(&[
            "ip",
            "addr",
            "add",
            "fd00:10:244:1::5/64",
            "dev",
            "eth0",
            "nodad",
        ]);
        ns.run(&["ip", "link", "set", "eth0", "up"]);
        ns.run(&["nft", "add", "table", "ip", "weft"]);
        let before = installed(ns.0.as_fd(), pod).await.expect("read");
        assert!(before.present.is_empty(), "{before:?}");
        assert_eq!(before.missing.len(), 5, "{before:?}");
        install(ns.0.as_fd(), pod, PROBE_SOURCE, true)
            .await
            .expect("install");
        let first = ns.run(&["nft", "list", "ruleset"]);
        assert!(!first.contains("table ip weft"), "{first}");
        assert!(first.contains("redirect to :15001"), "{first}");
        assert!(first.contains("table inet weft"), "{first}");
        assert!(first.contains("ip saddr 169.254.7.127 accept"), "{first}");
        assert!(
            first.contains("ip6 saddr fd77:6566:74::7f accept"),
            "{first}"
        );
        assert!(first.contains("ip6 daddr ::1 accept"), "{first}");
        assert!(first.contains("ip6 daddr fe80::/10 accept"), "{first}");
        assert!(first.contains("redirect to :15006"), "{first}");
        assert!(installed(ns.0.as_fd(), pod).await.expect("read").complete());
        // Again: the same rules, once.
        install(ns.0.as_fd(), pod, PROBE_SOURCE, true)
            .await
            .expect("install again");
        assert_eq!(ns.run(&["nft", "list", "ruleset"]), first);
        for ip in ["-4", "-6"] {
            let rules = ns.run(&["ip", ip, "rule"]);
            assert_eq!(
                rules.matches("fwmark 0x53a lookup 100").count(),
                1,
                "{ip} {rules}"
            );
            assert!(ns
                .run(&["ip", ip, "route", "show", "table", "100"])
                .contains("local default dev lo"));
        }
        remove(ns.0.as_fd(), pod).await.expect("remove");
        let after = installed(ns.0.as_fd(), pod).await.expect("read");
        assert!(after.present.is_empty(), "{after:?}");
        assert_eq!(ns.run(&["nft", "list", "ruleset"]).trim(), "");
        assert!(!ns.run(&["ip", "-6", "rule"]).contains("0x53a"));
        // Without IPv6 listeners: IPv6 passes before anything is redirected.
        install(ns.0.as_fd(), pod, PROBE_SOURCE, false)
            .await
            .expect("install for IPv4 only");
        let v4_only = ns.run(&["nft", "list", "ruleset"]);
        assert!(v4_only.contains("chain ipv4_only"), "{v4_only}");
        let prerouting = v4_only.split("chain prerouting").nth(1).unwrap_or("");
        let first = prerouting.lines().nth(2).unwrap_or("");
        assert!(
            first.contains("ip6 saddr ::/0 accept") || first.contains("meta nfproto ipv6 accept"),
            "{v4_only}"
        );
        let parts = installed(ns.0.as_fd(), pod).await.expect("read");
        assert!(parts.complete(), "{parts:?}");
        assert!(
            parts
                .present
                .iter()
                .any(|p| p.contains("IPv6 left uncaptured")),
            "{parts:?}"
        );
        remove(ns.0.as_fd(), pod).await.expect("remove");
        remove(ns.0.as_fd(), pod)
            .await
            .expect("removing nothing is fine");
    }

    #[ignore = "needs root"]
    #[tokio::test]
    async fn connections_open_before_the_rules_keep_their_path_and_the_most_fit() {
        let ns = Ns::new();
        let pod = "shop/cart";
        ns.run(&[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ]);
        ns.run(&["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"]);
        ns.run(&["ip", "addr", "add", "fd00::1/64", "dev", "eth0", "nodad"]);
        ns.run(&["ip", "link", "set", "eth0", "up"]);
        // Two connections the pod has open (to itself, off loopback), one per family.
        let inside =
            runtime::netns::Netns::enter(ns.0.try_clone().expect("dup"), pod).expect("enter");
        let open = inside
            .run_blocking(|| -> std::io::Result<Vec<std::net::TcpStream>> {
                let mut held = Vec::new();
                for at in ["10.0.0.1:9000", "[fd00::1]:9000"] {
                    let listener = std::net::TcpListener::bind(at)?;
                    held.push(std::net::TcpStream::connect(at)?);
                    held.push(listener.accept()?.0);
                }
                Ok(held)
            })
            .expect("run")
            .expect("connections");
        install(ns.0.as_fd(), pod, PROBE_SOURCE, true)
            .await
            .expect("install");
        let ruleset = ns.run(&["nft", "-n", "list", "ruleset"]);
        for s in &open {
            let (local, peer) = (s.local_addr().expect("local"), s.peer_addr().expect("peer"));
            let element = format!(
                "{} . {} . {} . {}",
                peer.ip(),
                peer.port(),
                local.ip(),
                local.port()
            );
            assert!(ruleset.contains(&element), "{element}: {ruleset}");
        }
        // A SYN is redirected before the open connections are let through.
        let output = ruleset.split("chain output").nth(1).unwrap_or("");
        let syn = output.find("redirect to :15001").unwrap_or(usize::MAX);
        let kept = output.find("@open_before_v4 accept").unwrap_or(0);
        assert!(syn < kept, "{output}");
        // The most there can be fit in one transaction (IPv6's are the longest).
        let most = Open {
            v4: Vec::new(),
            v6: (0..OPEN_MAX)
                .map(|i| {
                    let peer = Ipv6Addr::from(0xfd00_u128 << 112 | i as u128);
                    SetElement::concat([
                        SetElement::ipv6(peer),
                        SetElement::port(443),
                        SetElement::ipv6("fd00::1".parse().expect("literal")),
                        SetElement::port(40_000),
                    ])
                })
                .collect(),
        };
        let nft = Connection::<Nftables>::new_in(ns.0.as_fd()).expect("netlink");
        replace_table(&nft, Family::Inet, pod, |tx| {
            pod_rules(tx, PROBE_SOURCE, true)
        })
        .await
        .expect("first pass");
        keep_open(&nft, pod, &most)
            .await
            .expect("the most open connections");
        let set = ns.run(&["nft", "-n", "list", "set", "inet", "weft", OPEN_V6]);
        assert_eq!(set.matches(". 443 .").count(), OPEN_MAX);
        drop(open);
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
                let pods: BTreeSet<IpAddr> = ["10.244.1.2", "10.244.1.3", "fd00:10:244:1::2"]
                    .iter()
                    .map(|ip| ip.parse().expect("literal"))
                    .collect();
                node_probes(&pods, PROBE_SOURCE).await.expect("set");
                node_probes(&pods, PROBE_SOURCE).await.expect("set again");
            });
        })
        .join()
        .expect("thread");
        let ruleset = ns.run(&["nft", "list", "ruleset"]);
        assert!(ruleset.contains("10.244.1.2"), "{ruleset}");
        assert!(ruleset.contains("snat ip to 169.254.7.127"), "{ruleset}");
        assert!(ruleset.contains("table bridge weft"), "{ruleset}");
        assert_eq!(ruleset.matches("table inet weft").count(), 1, "{ruleset}");
        assert!(ruleset.contains("ip saddr 169.254.7.127 drop"), "{ruleset}");
        assert!(ruleset.contains("fd00:10:244:1::2"), "{ruleset}");
        assert!(
            ruleset.contains("snat ip6 to fd77:6566:74::7f"),
            "{ruleset}"
        );
        assert!(
            ruleset.contains("ip6 saddr fd77:6566:74::7f drop"),
            "{ruleset}"
        );
    }
}

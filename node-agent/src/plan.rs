//! The agent's decisions, as a pure function: what the source says, what the agent
//! holds, what node-proxy has been told and which namespaces the last look under
//! `/proc` found, in; the actions that make them agree, out. No I/O here: the
//! reconciler carries the actions out and calls [`plan`] again until it returns none.
//!
//! ```text
//!  source (pods of this node, namespace labels) --+
//!  held (netns, rules, served, listeners)  --------+--> plan --> [Adopt, Capture, Serve,
//!  node-proxy link (down | up, replayed?)  --------+             Replay, Release, Forget,
//!  found under /proc (uid -> netns), if looked ----+             Lost, Discover, Probes]
//! ```
//!
//! The order inside a pod: listeners, node-proxy, rules on the way in; rules, node-proxy,
//! listeners on the way out, so no connection meets a closed port. After node-proxy
//! (re)connects, the first thing it gets is the full set (a snapshot), and only once
//! every pod the source wants has been looked for: a replay that missed a pod would make
//! node-proxy drop it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::source::{Phase, View};

/// A network namespace: (device, inode) of its file.
pub type NetnsId = (u64, u64);

/// What the agent holds of one pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// Its network namespace, open.
    pub netns: Option<NetnsId>,
    /// A look under `/proc` found a process of the pod in that namespace (a namespace
    /// from a CNI ADD has none until the runtime starts the pod's containers).
    pub seen: bool,
    /// Its IPs, from the CNI ADD (the source may not list them yet).
    pub ips: Vec<IpAddr>,
    /// The capture rules are installed in its namespace.
    pub rules: bool,
    /// node-proxy serves it, on the current connection.
    pub served: bool,
    /// The last attempt to capture or serve it failed; wait before trying again.
    pub backoff: bool,
}

/// The connection to node-proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Not connected (node-proxy is down or restarting).
    Down,
    /// Connected; `replayed` once it has been given the full set.
    Up {
        /// The snapshot has been sent on this connection.
        replayed: bool,
    },
}

/// Everything a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The source's view of the node's pods and the namespaces.
    pub view: &'a View,
    /// What the agent holds, by pod UID.
    pub held: &'a BTreeMap<String, Held>,
    /// The node-proxy link.
    pub link: Link,
    /// The pods whose processes the last look under `/proc` found, with their
    /// namespace; `None` when there has been no look since the last decision.
    pub found: Option<&'a BTreeMap<String, NetnsId>>,
    /// The pod IPs whose probes the node exempts now.
    pub probes: &'a BTreeSet<IpAddr>,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Look under `/proc` for these running pods' namespaces.
    Discover(Vec<String>),
    /// Hold the namespace found for a pod: the first one the agent knows of, or a new
    /// one (its sandbox was recreated).
    Adopt {
        /// The pod.
        uid: String,
        /// Its namespace, as found.
        netns: NetnsId,
    },
    /// Capture a held pod: its listeners, node-proxy serving them, then the rules.
    Capture(String),
    /// node-proxy does not serve a captured pod: hand it over.
    Serve(String),
    /// node-proxy (re)connected: give it every captured pod, in one snapshot; it drops
    /// any other.
    Replay(Vec<String>),
    /// Undo a capture: rules, node-proxy, listeners.
    Release(String),
    /// Drop a pod the source no longer wants that holds nothing installed.
    Forget(String),
    /// The pod's namespace is gone (no process of the pod lives in it any more): drop
    /// it and what served it.
    Lost(String),
    /// Exempt probes to exactly these pod IPs on the node.
    Probes(BTreeSet<IpAddr>),
}

/// The actions that bring what the agent holds in line with the source.
pub fn plan(inputs: &Inputs<'_>) -> Vec<Action> {
    let Inputs {
        view,
        held,
        link,
        found,
        probes,
    } = *inputs;
    // Before the source has listed everything, an absent pod may only be unlisted yet.
    if !view.synced {
        return Vec::new();
    }
    let mut actions = Vec::new();
    let mut discover = Vec::new();
    // Held pods stay while the source keeps them; new ones come in only while it wants them.
    let wanted = |uid: &str| view.pods.get(uid).is_some_and(|p| view.keeps(p));

    // Namespaces: adopt what was found, notice what vanished, look for what is missing.
    for (uid, pod) in &view.pods {
        if !view.wants(pod) {
            continue;
        }
        let h = held.get(uid);
        let found_here = found.and_then(|f| f.get(uid));
        match (h.and_then(|h| h.netns), found_here) {
            (current, Some(&netns)) if current != Some(netns) => actions.push(Action::Adopt {
                uid: uid.clone(),
                netns,
            }),
            (Some(_), None) if found.is_some() && h.is_some_and(|h| h.seen) => {
                actions.push(Action::Lost(uid.clone()))
            }
            (None, None) if pod.phase == Phase::Running => discover.push(uid.clone()),
            _ => {}
        }
    }
    // Held pods the source does not want (any more).
    for (uid, h) in held {
        if wanted(uid) {
            continue;
        }
        if h.rules || h.served {
            actions.push(Action::Release(uid.clone()));
        } else {
            actions.push(Action::Forget(uid.clone()));
        }
    }

    let pending_namespaces = actions
        .iter()
        .any(|a| matches!(a, Action::Adopt { .. } | Action::Lost(_)));
    match link {
        Link::Up { replayed: false } => {
            // The full set first, once every wanted pod has been looked for: a pod still
            // being adopted would be missing from it, and node-proxy would drop it. A pod
            // the look did not find has no namespace to serve; it is captured once found.
            if !pending_namespaces && found.is_some() {
                let captured = held
                    .iter()
                    .filter(|(uid, h)| wanted(uid) && h.netns.is_some() && h.rules)
                    .map(|(uid, _)| uid.clone())
                    .collect();
                actions.push(Action::Replay(captured));
            } else if found.is_none() && !pending_namespaces {
                // Look now, even for pods held already: the replay needs a fresh look.
                discover.extend(
                    view.pods
                        .iter()
                        .filter(|(_, p)| view.wants(p) && p.phase == Phase::Running)
                        .map(|(uid, _)| uid.clone()),
                );
                discover.sort();
                discover.dedup();
            }
        }
        Link::Up { replayed: true } => {
            for (uid, h) in held {
                if !wanted(uid) || h.netns.is_none() || h.backoff {
                    continue;
                }
                if actions.iter().any(
                    |a| matches!(a, Action::Adopt { uid: u, .. } | Action::Lost(u) if u == uid),
                ) {
                    continue;
                }
                // Not captured yet and terminating: not taken in now.
                let terminating = view.pods.get(uid).is_some_and(|p| !view.wants(p));
                if !h.rules && !terminating {
                    actions.push(Action::Capture(uid.clone()));
                } else if h.rules && !h.served {
                    actions.push(Action::Serve(uid.clone()));
                }
            }
        }
        Link::Down => {}
    }

    // The node lets probes through to captured pods only.
    let exempt: BTreeSet<IpAddr> = held
        .iter()
        .filter(|(uid, h)| h.rules && wanted(uid))
        .flat_map(|(uid, h)| {
            let ips = match h.ips.is_empty() {
                true => view
                    .pods
                    .get(uid)
                    .map(|p| p.ips.clone())
                    .unwrap_or_default(),
                false => h.ips.clone(),
            };
            ips.into_iter()
        })
        .collect();
    if exempt != *probes {
        actions.push(Action::Probes(exempt));
    }
    // A replay needs a fresh look even when no pod is missing.
    let replay_waits = link == Link::Up { replayed: false } && !pending_namespaces;
    if found.is_none() && (!discover.is_empty() || replay_waits) {
        actions.push(Action::Discover(discover));
    }
    actions
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::source::SourcePod;

    fn pod(uid: &str, ns: &str, ip: &str) -> SourcePod {
        SourcePod {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("pod-{uid}"),
            service_account: "default".into(),
            labels: BTreeMap::new(),
            host_network: false,
            ips: vec![ip.parse().expect("ip")],
            phase: Phase::Running,
            deleting: false,
        }
    }

    /// `shop` is enrolled, `plain` is not; pods a and b in shop, c in plain.
    fn view() -> View {
        let enrolled = BTreeMap::from([("weft.dev/mesh".to_owned(), "enabled".to_owned())]);
        View {
            synced: true,
            pods: [
                pod("a", "shop", "10.244.1.2"),
                pod("b", "shop", "10.244.1.3"),
                pod("c", "plain", "10.244.1.4"),
            ]
            .into_iter()
            .map(|p| (p.uid.clone(), p))
            .collect(),
            namespaces: BTreeMap::from([
                ("shop".to_owned(), enrolled),
                ("plain".to_owned(), BTreeMap::new()),
            ]),
        }
    }

    fn captured(ns: u64) -> Held {
        Held {
            netns: Some((1, ns)),
            seen: true,
            ips: Vec::new(),
            rules: true,
            served: true,
            backoff: false,
        }
    }

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|s| s.parse().expect("ip")).collect()
    }

    fn run(
        view: &View,
        held: &BTreeMap<String, Held>,
        link: Link,
        found: Option<&BTreeMap<String, NetnsId>>,
        probes: &BTreeSet<IpAddr>,
    ) -> Vec<Action> {
        plan(&Inputs {
            view,
            held,
            link,
            found,
            probes,
        })
    }

    #[test]
    fn nothing_is_decided_before_the_source_has_listed_everything() {
        let held = BTreeMap::from([("gone".to_owned(), captured(9))]);
        let view = View::default();
        let up = Link::Up { replayed: true };
        assert!(run(&view, &held, up, None, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn running_enrolled_pods_are_looked_for_then_adopted_then_captured() {
        let view = view();
        let mut held = BTreeMap::new();
        let up = Link::Up { replayed: true };
        // Nothing held: look for a and b (c is not enrolled).
        let first = run(&view, &held, up, None, &BTreeSet::new());
        assert_eq!(first, vec![Action::Discover(vec!["a".into(), "b".into()])]);
        // The look found a only.
        let found = BTreeMap::from([("a".to_owned(), (1, 10))]);
        let second = run(&view, &held, up, Some(&found), &BTreeSet::new());
        assert_eq!(
            second,
            vec![Action::Adopt {
                uid: "a".into(),
                netns: (1, 10)
            }]
        );
        // Held: capture it; the probe exemption follows the rules.
        held.insert(
            "a".to_owned(),
            Held {
                netns: Some((1, 10)),
                seen: true,
                ..Held::default()
            },
        );
        let third = run(&view, &held, up, None, &BTreeSet::new());
        assert_eq!(
            third,
            vec![
                Action::Capture("a".into()),
                Action::Discover(vec!["b".into()])
            ]
        );
        held.insert("a".to_owned(), captured(10));
        let fourth = run(&view, &held, up, None, &BTreeSet::new());
        assert_eq!(
            fourth,
            vec![
                Action::Probes(ips(&["10.244.1.2"])),
                Action::Discover(vec!["b".into()])
            ]
        );
    }

    #[test]
    fn replay_after_reconnect_waits_for_a_fresh_look_and_holds_every_captured_pod() {
        let view = view();
        let held = BTreeMap::from([
            ("a".to_owned(), captured(10)),
            ("b".to_owned(), captured(11)),
        ]);
        let probes = ips(&["10.244.1.2", "10.244.1.3"]);
        let fresh = Link::Up { replayed: false };
        // node-proxy reconnected: look first.
        assert_eq!(
            run(&view, &held, fresh, None, &probes),
            vec![Action::Discover(vec!["a".into(), "b".into()])]
        );
        // Both found where they were: the full set, in one snapshot.
        let found = BTreeMap::from([("a".to_owned(), (1, 10)), ("b".to_owned(), (1, 11))]);
        assert_eq!(
            run(&view, &held, fresh, Some(&found), &probes),
            vec![Action::Replay(vec!["a".into(), "b".into()])]
        );
        // While node-proxy is down nothing goes its way, and nothing is released.
        assert!(run(&view, &held, Link::Down, None, &probes).is_empty());
    }

    #[test]
    fn a_pod_not_found_does_not_hold_the_replay_back() {
        let view = view();
        let held = BTreeMap::from([("a".to_owned(), captured(10))]);
        let probes = ips(&["10.244.1.2"]);
        // b runs, says the source, but nothing of it is under /proc (yet).
        let found = BTreeMap::from([("a".to_owned(), (1, 10))]);
        let fresh = Link::Up { replayed: false };
        assert_eq!(
            run(&view, &held, fresh, Some(&found), &probes),
            vec![Action::Replay(vec!["a".into()])]
        );
    }

    #[test]
    fn a_pod_whose_netns_vanished_is_dropped_before_the_replay() {
        let view = view();
        let held = BTreeMap::from([
            ("a".to_owned(), captured(10)),
            ("b".to_owned(), captured(11)),
        ]);
        let probes = ips(&["10.244.1.2", "10.244.1.3"]);
        let fresh = Link::Up { replayed: false };
        // b's processes are gone: its namespace vanished.
        let found = BTreeMap::from([("a".to_owned(), (1, 10))]);
        assert_eq!(
            run(&view, &held, fresh, Some(&found), &probes),
            vec![Action::Lost("b".into())]
        );
        // Once dropped, the replay holds a only, and b's probes are no longer exempt.
        let held = BTreeMap::from([("a".to_owned(), captured(10))]);
        assert_eq!(
            run(&view, &held, fresh, Some(&found), &probes),
            vec![
                Action::Replay(vec!["a".into()]),
                Action::Probes(ips(&["10.244.1.2"]))
            ]
        );
    }

    #[test]
    fn a_namespace_from_cni_add_is_not_lost_before_its_processes_start() {
        let view = view();
        let fresh_add = Held {
            netns: Some((1, 20)),
            seen: false,
            ips: vec!["10.244.1.2".parse().expect("ip")],
            ..Held::default()
        };
        let held = BTreeMap::from([("a".to_owned(), fresh_add)]);
        let found = BTreeMap::new();
        let up = Link::Up { replayed: true };
        let actions = run(&view, &held, up, Some(&found), &BTreeSet::new());
        assert!(
            actions.contains(&Action::Capture("a".into())),
            "{actions:?}"
        );
        assert!(!actions.contains(&Action::Lost("a".into())), "{actions:?}");
    }

    #[test]
    fn a_recreated_sandbox_is_adopted_anew() {
        let view = view();
        let held = BTreeMap::from([("a".to_owned(), captured(10))]);
        let found = BTreeMap::from([("a".to_owned(), (1, 30))]);
        let up = Link::Up { replayed: true };
        let actions = run(&view, &held, up, Some(&found), &ips(&["10.244.1.2"]));
        assert_eq!(
            actions[0],
            Action::Adopt {
                uid: "a".into(),
                netns: (1, 30)
            }
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Serve(_))));
    }

    #[test]
    fn unenrolled_or_deleted_pods_are_released_and_forgotten() {
        let mut view = view();
        let held = BTreeMap::from([
            ("a".to_owned(), captured(10)),
            ("b".to_owned(), captured(11)),
            ("c".to_owned(), Held::default()),
        ]);
        // a's namespace loses its label; b is deleted; c was never enrolled.
        view.pods.remove("b");
        view.namespaces.insert("shop".into(), BTreeMap::new());
        let up = Link::Up { replayed: true };
        let actions = run(&view, &held, up, None, &ips(&["10.244.1.2", "10.244.1.3"]));
        assert_eq!(
            actions,
            vec![
                Action::Release("a".into()),
                Action::Release("b".into()),
                Action::Forget("c".into()),
                Action::Probes(BTreeSet::new()),
            ]
        );
    }

    #[test]
    fn a_terminating_pod_stays_captured_until_it_is_gone_and_is_never_taken_in() {
        let mut view = view();
        // a is captured and now terminating; b, terminating, was never held.
        view.pods.get_mut("a").expect("a").deleting = true;
        view.pods.get_mut("b").expect("b").deleting = true;
        // b's namespace is held (its CNI ADD came) but it was never captured.
        let mut added = captured(11);
        added.rules = false;
        added.served = false;
        let held = BTreeMap::from([("a".to_owned(), captured(10)), ("b".to_owned(), added)]);
        let probes = ips(&["10.244.1.2"]);
        let up = Link::Up { replayed: true };
        assert_eq!(run(&view, &held, up, None, &probes), Vec::new());
        // A replay after node-proxy restarts still holds it.
        let found = BTreeMap::from([("a".to_owned(), (1, 10))]);
        let replay = run(
            &view,
            &held,
            Link::Up { replayed: false },
            Some(&found),
            &probes,
        );
        assert_eq!(replay, vec![Action::Replay(vec!["a".into()])]);
        // Gone from the source: released (b, holding nothing installed, forgotten).
        view.pods.remove("a");
        view.pods.remove("b");
        assert_eq!(
            run(&view, &held, up, None, &probes),
            vec![
                Action::Release("a".into()),
                Action::Forget("b".into()),
                Action::Probes(BTreeSet::new())
            ]
        );
    }

    #[test]
    fn a_pod_in_backoff_waits_and_one_node_proxy_refused_is_served_again() {
        let view = view();
        let mut refused = captured(10);
        refused.served = false;
        let mut failing = captured(11);
        failing.rules = false;
        failing.served = false;
        failing.backoff = true;
        let held = BTreeMap::from([("a".to_owned(), refused), ("b".to_owned(), failing)]);
        let up = Link::Up { replayed: true };
        let actions = run(&view, &held, up, None, &ips(&["10.244.1.2"]));
        assert_eq!(actions, vec![Action::Serve("a".into())]);
    }
}

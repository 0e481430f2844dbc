//! Fuzz harness for the node agent's socket, both ends: the request `weft-cni` sends
//! (read by the agent) and the reply the agent sends (read by the plugin), and the state
//! file the plugin reads while the agent is down. Used by the `agent_requests` target of
//! `fuzz/` (cargo-fuzz) and by `tests/fuzz_corpus.rs`, which replays the committed
//! corpus.
//!
//! Input: one datagram, received without descriptors.

use ipc::agent::{PublishedState, Reply, Request, MAX_MESSAGE};

/// Reads `data` as the agent reads a request, and as the plugin reads a reply and the
/// published state; checks that a request needing the pod's namespace is never accepted
/// without one, that an accepted request names its pod, and that the refusal the agent
/// sends back fits in the datagram the plugin reads.
pub fn request(data: &[u8]) {
    match crate::cni::parse(data, false, Vec::new()) {
        Ok((request, netns)) => {
            assert!(netns.is_none());
            assert!(
                !request.wants_netns(),
                "{request:?} accepted without its namespace"
            );
            assert!(!request.pod().namespace.is_empty() && !request.pod().name.is_empty());
            assert!(matches!(request, Request::Del { .. }));
        }
        Err(e) => {
            let reply = serde_json::to_vec(&Reply::error(e, false)).expect("a reply serializes");
            assert!(
                reply.len() <= MAX_MESSAGE,
                "a {}-byte reply is cut short at the plugin",
                reply.len()
            );
        }
    }
    let _ = serde_json::from_slice::<Reply>(data);
    let _ = serde_json::from_slice::<PublishedState>(data);
}

//! Fuzz harness for the handoff protocol's messages, both ends: what node-proxy reads
//! from a sender (checked against the conversation so far) and what a sender reads back
//! (replies and takeover parts). Used by the `handoff_messages` target of `fuzz/`
//! (cargo-fuzz) and by `tests/fuzz_corpus.rs`, which replays the committed corpus.
//!
//! Input: datagrams separated by the byte `0xFF` (which UTF-8, and so JSON, never
//! contains), each received without descriptors.

use ipc::datagram::Received;

use crate::handoff::PROTOCOL_VERSION;
use crate::handoff::{Conversation, Handed, Outcome, Reply, Request, MAX_MESSAGE};

/// Feeds each datagram of `data` to one conversation and checks what a sender relies
/// on: nothing is delivered before `hello`, an `add` never without its namespace, a
/// refused message changes nothing, and every answer fits in a datagram the sender
/// reads whole and reads back as written.
pub fn handoff(data: &[u8]) {
    let mut conversation = Conversation::default();
    for message in data.split(|b| *b == 0xFF) {
        let before = conversation;
        let received = Received {
            len: message.len(),
            truncated: false,
            fds_truncated: false,
            fds: Vec::new(),
        };
        match conversation.interpret(received, message) {
            Outcome::Deliver(request) => {
                assert!(before.greeted(), "delivered before hello: {request:?}");
                assert!(
                    !matches!(request, Request::Add { .. }),
                    "an add delivered without its network namespace"
                );
            }
            Outcome::Answer(result) => {
                if result.is_err() {
                    assert_eq!(before, conversation, "a refused message changed the state");
                }
                let reply = Reply::encode(result.clone(), Some(PROTOCOL_VERSION));
                assert!(
                    reply.len() <= MAX_MESSAGE,
                    "a {}-byte reply is cut short at the sender",
                    reply.len()
                );
                let back: Reply = serde_json::from_slice(&reply).expect("a reply reads back");
                assert_eq!(back.error.is_some(), result.is_err());
            }
            Outcome::Mismatch(version) => assert_ne!(version, PROTOCOL_VERSION),
        }
        // The sender's end: a reply, or a part of a takeover answer.
        if let Ok(reply) = serde_json::from_slice::<Reply>(message) {
            let _ = reply.into_result();
        }
        let _ = serde_json::from_slice::<Handed>(message);
    }
}

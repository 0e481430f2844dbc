//! Unix-socket messages between Weft's processes on a node.
//!
//! ```text
//!  weft-cni (run by the container runtime) --agent::Request + the pod's netns fd-->
//!      node agent --agent::Reply--> weft-cni
//!  node agent --handoff (weft-runtime)--> node-proxy
//! ```
//!
//! Both sockets are `SOCK_SEQPACKET`: one message is one datagram of JSON, with any file
//! descriptors attached to the same `sendmsg` ([`datagram`]). This crate is small on
//! purpose: `weft-cni` links it, and it runs on every node's host for every pod.

pub mod agent;
pub mod datagram;

/// The longest error text either socket's reply carries: errors quote what they refuse,
/// and a reply must stay readable and fit in one message (escaped as JSON, at most six
/// bytes a byte: well under [`agent::MAX_MESSAGE`]).
pub const MAX_ERROR_TEXT: usize = 4096;

/// Cuts `text` to at most `max` bytes, at a character boundary, saying how many bytes
/// were cut.
pub fn shorten(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max.saturating_sub(32);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = text.len() - cut;
    text.truncate(cut);
    text.push_str(&format!("... ({dropped} bytes cut)"));
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn shorten_cuts_at_a_character_boundary_and_says_so() {
        assert_eq!(super::shorten("short".into(), 64), "short");
        let long = "é".repeat(100);
        let cut = super::shorten(long, 64);
        assert!(cut.len() <= 64, "{cut}");
        assert!(cut.ends_with("bytes cut)"), "{cut}");
        assert!(cut.starts_with("éé"), "{cut}");
    }
}

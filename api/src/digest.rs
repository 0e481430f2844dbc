//! Content hashes and bucket digests.
//!
//! Every resource carries a hash of its key and content, computed by the controller.
//! Keys fall into [`BUCKETS`] buckets; a bucket's digest is the XOR of the hashes of the
//! resources in it. A proxy that reconnects sends its digests; the controller resends
//! only the buckets that differ from what the proxy should hold, so a controller that
//! restarted without any history still resumes a proxy without a full resend.

use prost::Message;

use crate::proto;
use crate::resource::Key;

/// Buckets keys are spread over.
pub const BUCKETS: usize = 64;

/// A digest per bucket.
pub type Digests = [u64; BUCKETS];

/// The hash of a resource: SHA-256 of its key and encoded content, first 8 bytes.
pub fn resource_hash(key: &Key, kind: &proto::resource::Kind) -> u64 {
    let wire = proto::Resource {
        key: Some(key.to_proto()),
        hash: 0,
        kind: Some(kind.clone()),
    };
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &wire.encode_to_vec());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// The bucket of a key (FNV-1a of kind and name): the same on every side and build.
pub fn bucket(key: &Key) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    for byte in key.kind.as_str().bytes().chain([0]).chain(key.name.bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    (h % BUCKETS as u64) as usize
}

/// Adds (or, applied again, removes) a resource's hash to the digests.
pub fn toggle(digests: &mut Digests, key: &Key, hash: u64) {
    digests[bucket(key)] ^= hash;
}

/// The digests as they travel.
pub fn to_wire(digests: &Digests) -> Vec<u64> {
    digests.to_vec()
}

/// Digests from the wire; `None` unless there are exactly [`BUCKETS`].
pub fn from_wire(values: &[u64]) -> Option<Digests> {
    values.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resource::Kind;

    #[test]
    fn buckets_are_stable_and_spread() {
        // Fixed values: the bucket function is part of the wire contract.
        assert_eq!(
            bucket(&Key::new(Kind::Workload, "uid-1")),
            bucket(&Key::new(Kind::Workload, "uid-1"))
        );
        let mut seen = [0usize; BUCKETS];
        for i in 0..6400 {
            seen[bucket(&Key::new(Kind::Workload, format!("pod-{i}")))] += 1;
        }
        assert!(seen.iter().all(|&n| (50..150).contains(&n)), "{seen:?}");
    }

    #[test]
    fn toggling_twice_restores() {
        let mut d = [0; BUCKETS];
        let k = Key::new(Kind::Service, "demo/echo");
        toggle(&mut d, &k, 42);
        assert_ne!(d, [0; BUCKETS]);
        toggle(&mut d, &k, 42);
        assert_eq!(d, [0; BUCKETS]);
    }
}

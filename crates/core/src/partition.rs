//! Where a conversation lives in a cluster: the partition it hashes into, and the live node
//! that owns each partition.
//!
//! A cluster has a fixed number of partitions. Every message of a conversation goes through
//! the owner of its partition, so that one serial path orders them. Partitions are spread over
//! the live nodes by rendezvous hashing: each node scores each partition, and the highest score
//! owns it. A node joining takes about 1/N of the partitions (only those it now scores highest
//! on), and a node leaving hands over only its own; no other partition moves.
//!
//! Every node of a cluster, whatever its version, must compute the same partition for a
//! conversation and the same owner for a partition from the same live nodes. So the hashes are
//! spelled out here (FNV-1a 64 over the bytes, then the SplitMix64 finalizer) rather than taken
//! from a library whose output may change, and tests pin their values.

/// FNV-1a, 64 bits, over `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The SplitMix64 finalizer: spreads every input bit over every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The partition of conversation `conv` among `partitions` (at least 1): the finalized FNV-1a
/// hash of its id's UTF-8 bytes, modulo `partitions`.
pub fn partition_of(conv: &str, partitions: u32) -> u32 {
    (mix(fnv1a(conv.as_bytes())) % u64::from(partitions.max(1))) as u32
}

/// Node `node`'s score for `partition`: of the live nodes, the one with the highest score owns
/// the partition.
pub fn score(node: &str, partition: u32) -> u64 {
    mix(fnv1a(node.as_bytes()) ^ mix(u64::from(partition) + 1))
}

/// The owner of `partition` among the live `nodes`: the highest score, and of equal scores the
/// smallest id. `None` without nodes.
pub fn owner<S: AsRef<str>>(partition: u32, nodes: &[S]) -> Option<&str> {
    nodes.iter().map(AsRef::as_ref).max_by(|a, b| {
        score(a, partition)
            .cmp(&score(b, partition))
            .then_with(|| b.cmp(a))
    })
}

/// The owner of every partition `0..partitions` among the live `nodes`, as an index into
/// `nodes` (`None` without nodes).
pub fn assign<S: AsRef<str>>(partitions: u32, nodes: &[S]) -> Vec<Option<usize>> {
    (0..partitions)
        .map(|p| {
            let best = owner(p, nodes)?;
            nodes.iter().position(|n| n.as_ref() == best)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_hashes_never_change() {
        // Nodes of different versions must agree: a change here moves conversations.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(partition_of("g", 1024), 148);
        assert_eq!(partition_of("d:alice:bob", 1024), 26);
        assert_eq!(score("node-a", 7), 0xff0b_65de_9086_935f);
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(
            partition_of("anything", 0),
            0,
            "no partitions is read as one"
        );
    }

    #[test]
    fn partitions_spread_evenly_over_nodes() {
        let nodes = ["n1", "n2", "n3"];
        let owners = assign(3000, &nodes);
        for i in 0..nodes.len() {
            let share = owners.iter().filter(|o| **o == Some(i)).count();
            assert!(
                (800..=1200).contains(&share),
                "node {i} owns {share} of 3000"
            );
        }
        assert!(assign(10, &[] as &[&str]).iter().all(Option::is_none));
    }

    #[test]
    fn conversations_spread_evenly_over_partitions() {
        let mut counts = vec![0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("conv-{i}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|c| (800..=1200).contains(c)),
            "{counts:?}"
        );
    }

    proptest! {
        /// A node leaving hands over only its own partitions; one joining takes only
        /// partitions it now owns, about 1/N of them.
        #[test]
        fn membership_changes_move_only_what_they_must(
            n in 1usize..8,
            seed in any::<u64>(),
        ) {
            let nodes: Vec<String> = (0..=n).map(|i| format!("node-{seed:x}-{i}")).collect();
            let (before, joined) = (&nodes[..n], &nodes[n]);
            let partitions = 2048;
            let old = assign(partitions, before);
            let new = assign(partitions, &nodes);
            let mut moved = 0;
            for p in 0..partitions as usize {
                if old[p] != new[p] {
                    moved += 1;
                    prop_assert_eq!(nodes[new[p].unwrap()].as_str(), joined.as_str());
                }
            }
            let expected = f64::from(partitions) / (n as f64 + 1.0);
            prop_assert!((moved as f64 - expected).abs() < expected * 0.25 + 20.0,
                "{} moved, about {} expected", moved, expected);
            // And back: the joined node leaving gives every partition to its old owner.
            prop_assert_eq!(assign(partitions, before), old);
        }
    }
}

//! Tenant -> shard: a stable hash, so a tenant's jobs always land on the same shard queue and a
//! flood from one tenant fills only that shard.
//!
//! The function is part of the wire contract (producers in other languages compute it too), so it
//! is small and exactly specified in `docs/wire-format.md`:
//!
//! 1. `h = FNV-1a 64` of the tenant id's UTF-8 bytes;
//! 2. the candidate shards are `0..shards` minus every shard a pin points at (a pinned shard is
//!    dedicated to its tenants); if that leaves none, all shards are candidates;
//! 3. `candidates[jump(h, candidates.len())]`, with Lamping & Veach's jump consistent hash, so
//!    growing `shards` moves only about `1/shards` of the tenants;
//! 4. a pinned tenant goes to its pinned shard.

use std::collections::BTreeMap;
use std::hash::Hasher;

use fnv::FnvHasher;

/// FNV-1a, 64 bit, of the raw bytes (not `Hash for str`, which appends a terminator byte).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hasher = FnvHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

/// Jump consistent hash: maps `key` to a bucket in `0..buckets` (`buckets` >= 1).
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The shard of `tenant` among `shards` queues, honouring `pins` (tenant -> shard).
pub fn shard_for(tenant: &str, shards: u16, pins: &BTreeMap<String, u16>) -> u16 {
    if let Some(&pinned) = pins.get(tenant) {
        return pinned;
    }
    let shards = shards.max(1);
    let candidates: Vec<u16> = (0..shards)
        .filter(|s| !pins.values().any(|p| p == s))
        .collect();
    let h = fnv1a64(tenant.as_bytes());
    if candidates.is_empty() {
        return jump_hash(h, u32::from(shards)) as u16;
    }
    candidates[jump_hash(h, candidates.len() as u32) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_pins() -> BTreeMap<String, u16> {
        BTreeMap::new()
    }

    #[test]
    fn fnv_known_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn stable_values() {
        // These are in docs/wire-format.md; a change here breaks every producer out there.
        // Computed with the Python reference in the doc, not with this code.
        assert_eq!(shard_for("acme", 8, &no_pins()), 7);
        assert_eq!(shard_for("globex", 8, &no_pins()), 1);
        assert_eq!(shard_for("tenant-1", 8, &no_pins()), 1);
        assert_eq!(shard_for("anything", 1, &no_pins()), 0);
        let pins = BTreeMap::from([("big-customer".to_string(), 7u16)]);
        assert_eq!(shard_for("acme", 8, &pins), 5);
    }

    #[test]
    fn spreads_evenly() {
        let shards = 8u16;
        let mut counts = [0u32; 8];
        for i in 0..16_000 {
            counts[usize::from(shard_for(&format!("tenant-{i}"), shards, &no_pins()))] += 1;
        }
        // Expected 2,000 each; allow +-10%.
        for (shard, &n) in counts.iter().enumerate() {
            assert!(
                (1800..=2200).contains(&n),
                "shard {shard} got {n}: {counts:?}"
            );
        }
    }

    #[test]
    fn growing_moves_few_tenants() {
        let moved = (0..10_000)
            .filter(|i| {
                let t = format!("t{i}");
                shard_for(&t, 8, &no_pins()) != shard_for(&t, 9, &no_pins())
            })
            .count();
        // Ideal is 1/9 of the tenants (about 1,111).
        assert!(moved < 1_400, "{moved} tenants moved");
    }

    #[test]
    fn pins_are_dedicated() {
        let pins = BTreeMap::from([("big-customer".to_string(), 7u16)]);
        assert_eq!(shard_for("big-customer", 8, &pins), 7);
        for i in 0..2_000 {
            assert_ne!(shard_for(&format!("tenant-{i}"), 8, &pins), 7);
        }
    }
}

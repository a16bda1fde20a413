//! The two layers identities are kept in: a base built once, and an overlay of what changed
//! since, merged into a new base when it passes [`OVERLAY_LIMIT`] entries. Keys' base is an
//! array sorted by hash; customers' a hash map.

use std::sync::Arc;

use super::{KeyEntry, Map, OVERLAY_LIMIT};

/// Keys: a sorted base and an overlay of changed ones, both by hash.
#[derive(Debug, Clone)]
pub(super) struct Keys {
    pub(super) base: Arc<SortedKeys>,
    pub(super) overlay: Arc<Map<[u8; 32], KeyEntry>>,
}

/// Keys sorted by hash, with the start of each run of equal first two bytes: a lookup reads one
/// slot of the 256 KiB bucket table, then searches the ~15 neighbouring entries of its bucket
/// (at a million keys) instead of binary-searching the whole array.
#[derive(Debug)]
pub(super) struct SortedKeys {
    pub(super) entries: Vec<KeyEntry>,
    /// `buckets[b]..buckets[b + 1]` are the entries whose hash starts with the 16 bits `b`.
    buckets: Vec<u32>,
}

impl SortedKeys {
    /// Sorts `entries` and indexes them.
    pub(super) fn new(mut entries: Vec<KeyEntry>) -> Self {
        entries.sort_unstable_by_key(|entry| entry.hash);
        entries.shrink_to_fit();
        let mut buckets = Vec::with_capacity(BUCKETS + 1);
        let mut position = 0;
        for bucket in 0..BUCKETS {
            while position < entries.len() && bucket_of(&entries[position].hash) < bucket {
                position += 1;
            }
            buckets.push(u32::try_from(position).unwrap_or(u32::MAX));
        }
        buckets.push(u32::try_from(entries.len()).unwrap_or(u32::MAX));
        Self { entries, buckets }
    }

    fn find(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        let bucket = bucket_of(hash);
        let range = self.buckets[bucket] as usize..self.buckets[bucket + 1] as usize;
        let candidates = &self.entries[range];
        // The search compares SHA-256 values, which say nothing about how much of a real key
        // a guess shares; the final comparison looks at every byte.
        let index = candidates
            .binary_search_by(|entry| entry.hash.cmp(hash))
            .ok()?;
        let entry = &candidates[index];
        constant_time_eq(&entry.hash, hash).then_some(entry)
    }
}

const BUCKETS: usize = 1 << 16;

fn bucket_of(hash: &[u8; 32]) -> usize {
    usize::from(u16::from_be_bytes([hash[0], hash[1]]))
}

impl Keys {
    pub(super) fn find(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        if let Some(entry) = self.overlay.get(hash) {
            return Some(entry);
        }
        self.base_find(hash)
    }

    pub(super) fn base_find(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        self.base.find(hash)
    }

    pub(super) fn insert(&mut self, entry: KeyEntry) {
        Arc::make_mut(&mut self.overlay).insert(entry.hash, entry);
    }

    pub(super) fn compact_if_large(&mut self) {
        if self.overlay.len() <= OVERLAY_LIMIT {
            return;
        }
        let mut merged: Vec<KeyEntry> = self
            .base
            .entries
            .iter()
            .filter(|entry| !self.overlay.contains_key(&entry.hash))
            .cloned()
            .collect();
        merged.extend(self.overlay.values().cloned());
        self.base = Arc::new(SortedKeys::new(merged));
        self.overlay = Arc::new(Map::default());
    }
}

/// Compares two hashes looking at every byte whatever they hold.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// A map whose changes go to a small overlay, merged into the base when it grows.
#[derive(Debug, Clone)]
pub(super) struct Layered<K, V> {
    base: Arc<Map<K, V>>,
    overlay: Arc<Map<K, V>>,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Layered<K, V> {
    pub(super) fn new(base: Map<K, V>) -> Self {
        Self {
            base: Arc::new(base),
            overlay: Arc::new(Map::default()),
        }
    }

    pub(super) fn get(&self, key: &K) -> Option<&V> {
        self.overlay.get(key).or_else(|| self.base.get(key))
    }

    pub(super) fn insert(&mut self, key: K, value: V) {
        Arc::make_mut(&mut self.overlay).insert(key, value);
    }

    pub(super) fn compact_if_large(&mut self) {
        if self.overlay.len() <= OVERLAY_LIMIT {
            return;
        }
        let mut merged = (*self.base).clone();
        merged.extend(self.overlay.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.base = Arc::new(merged);
        self.overlay = Arc::new(Map::default());
    }
}

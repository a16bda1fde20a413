//! The identities a gateway enforces, indexed for the hot path: one immutable value per config
//! version, swapped atomically, never locked.
//!
//! Keys are the bulk (a million is a normal size), so they are kept compact: a sorted array of
//! fixed-size entries (96 bytes each) searched by the key's SHA-256, plus a small overlay of
//! the keys changed since the array was built. Applying a change copies only the overlay; once
//! the overlay passes [`OVERLAY_LIMIT`] entries it is merged into a new array. Customers work the
//! same way with a hash map as the base. Plans are few and copied whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use tollgate_model::customer::CustomerStatus;
use tollgate_model::feed::{ChangedEntity, CustomerRecord, KeyRecord, PeriodMs};
use tollgate_model::plan::Plan;

/// Overlay size past which it is merged into its base.
pub const OVERLAY_LIMIT: usize = 4096;

/// A binary id: the 16 bytes behind `key_…` and `cus_…` (32 hex digits).
pub type Id = [u8; 16];

/// The maps a request reads (plans, customers, changed keys). Their keys are ids and key hashes
/// the control plane made, not a client's input, so they need no SipHash: foldhash, seeded per
/// process, costs a fraction of it on every lookup.
pub type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A key's route scopes; `None` is every route. Equal sets share one allocation.
pub type Scopes = Option<Arc<[Box<str>]>>;

/// One key as the hot path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// The key's id.
    pub id: Id,
    /// Its customer's id.
    pub customer: Id,
    /// Unix ms after which it no longer works (`i64::MAX`: never).
    pub expires_at_ms: i64,
    /// Unix ms from which it no longer works: revoked, or the end of a rotation's grace
    /// (`i64::MAX`: not revoked).
    pub revoked_at_ms: i64,
    /// Routes it may call.
    pub scopes: Scopes,
}

/// One customer as the hot path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEntry {
    /// The plan that applies.
    pub plan_id: Arc<str>,
    /// Active or suspended.
    pub status: CustomerStatus,
    /// `cus_…` as the upstream receives it, made once rather than per request.
    pub id_header: HeaderValue,
    /// The plan id as the upstream receives it.
    pub plan_header: HeaderValue,
    /// The subscription's billing period, which the quota counts in.
    pub billing_period: Option<PeriodMs>,
}

/// Why a record of the feed cannot be indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `prefix_` and 32 hex digits.
pub fn parse_id(prefix: &str, text: &str) -> Option<Id> {
    let digits = text.strip_prefix(prefix)?.strip_prefix('_')?;
    let mut id = [0u8; 16];
    hex::decode_to_slice(digits, &mut id).ok().map(|()| id)
}

/// Formats an id back as `prefix_` and 32 hex digits.
pub fn format_id(prefix: &str, id: &Id) -> String {
    format!("{prefix}_{}", hex::encode(id))
}

/// An id as `prefix_` and 32 hex digits, formatted on the stack: what the request path writes
/// without allocating.
#[derive(Clone, Copy)]
pub struct IdText([u8; 36]);

impl IdText {
    /// `prefix` (three letters, such as `cus`), `_`, and the id in hex.
    pub fn new(prefix: &[u8; 3], id: &Id) -> Self {
        let mut text = [b'_'; 36];
        text[..3].copy_from_slice(prefix);
        // 32 digits for 16 bytes: the slice is always the right size.
        let _ = hex::encode_to_slice(id, &mut text[4..]);
        Self(text)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for IdText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Equal scope sets, shared.
#[derive(Debug, Default)]
pub struct ScopeInterner {
    seen: HashMap<Vec<String>, Arc<[Box<str>]>>,
}

impl ScopeInterner {
    /// The shared form of `scopes`.
    pub fn intern(&mut self, scopes: Option<Vec<String>>) -> Scopes {
        let scopes = scopes?;
        if let Some(shared) = self.seen.get(&scopes) {
            return Some(Arc::clone(shared));
        }
        let shared: Arc<[Box<str>]> = scopes.iter().map(|s| s.as_str().into()).collect();
        self.seen.insert(scopes, Arc::clone(&shared));
        Some(shared)
    }
}

/// A key record of the feed as an entry.
pub fn key_entry(record: &KeyRecord, interner: &mut ScopeInterner) -> Result<KeyEntry, Invalid> {
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(&record.hash, &mut hash).is_err() {
        return Err(Invalid(format!(
            "key {}: hash is not 64 hex digits",
            record.id
        )));
    }
    let id = parse_id("key", &record.id).ok_or_else(|| {
        Invalid(format!(
            "key id {:?} is not key_ and 32 hex digits",
            record.id
        ))
    })?;
    let customer = parse_id("cus", &record.customer_id).ok_or_else(|| {
        Invalid(format!(
            "key {}: customer id {:?} is not cus_ and 32 hex digits",
            record.id, record.customer_id
        ))
    })?;
    Ok(KeyEntry {
        hash,
        id,
        customer,
        expires_at_ms: record.expires_at_ms.unwrap_or(i64::MAX),
        revoked_at_ms: record.revoked_at_ms.unwrap_or(i64::MAX),
        scopes: interner.intern(record.scopes.clone()),
    })
}

/// A customer record of the feed as an entry.
pub fn customer_entry(record: &CustomerRecord) -> Result<(Id, CustomerEntry), Invalid> {
    let id = parse_id("cus", &record.id).ok_or_else(|| {
        Invalid(format!(
            "customer id {:?} is not cus_ and 32 hex digits",
            record.id
        ))
    })?;
    let plan_header = HeaderValue::from_str(&record.plan_id).map_err(|_| {
        Invalid(format!(
            "customer {}: plan id {:?} is not a valid header value",
            record.id, record.plan_id
        ))
    })?;
    Ok((
        id,
        CustomerEntry {
            plan_id: record.plan_id.as_str().into(),
            status: record.status,
            id_header: id_header("cus", &id),
            plan_header,
            billing_period: record.billing_period,
        },
    ))
}

/// `prefix_` and the id's 32 hex digits as a header value, without an intermediate string.
pub fn id_header(prefix: &str, id: &Id) -> HeaderValue {
    let mut text = [0u8; 40];
    let start = prefix.len() + 1;
    text[..prefix.len()].copy_from_slice(prefix.as_bytes());
    text[prefix.len()] = b'_';
    // 32 hex digits always fit after a prefix of up to 7 bytes.
    let _ = hex::encode_to_slice(id, &mut text[start..start + 32]);
    // Letters, digits and '_' only: always a valid header value.
    HeaderValue::from_bytes(&text[..start + 32]).unwrap_or(HeaderValue::from_static(""))
}

/// Everything enforced at one config version.
#[derive(Debug, Clone)]
pub struct Identities {
    /// The config version.
    pub version: i64,
    /// When the store made the change of `version` (its history's mark, sent back when asking
    /// for the changes after it), if the control plane said.
    pub version_at_ms: Option<i64>,
    /// When this version was applied here.
    pub applied_at: SystemTime,
    plans: Arc<Map<Arc<str>, Arc<Plan>>>,
    customers: Layered<Id, CustomerEntry>,
    keys: Keys,
}

/// Everything a snapshot holds, checked: the start of an [`Identities`].
#[derive(Debug, Default)]
pub struct Builder {
    /// The snapshot's version.
    pub version: i64,
    /// When its change was made, if said.
    pub version_at_ms: Option<i64>,
    /// Plans by id.
    pub plans: Map<Arc<str>, Arc<Plan>>,
    /// Customers by id.
    pub customers: Map<Id, CustomerEntry>,
    /// Keys, in any order.
    pub keys: Vec<KeyEntry>,
}

impl Builder {
    /// Checks references and uniqueness, then indexes.
    pub fn build(self) -> Result<Identities, Invalid> {
        for (id, customer) in &self.customers {
            if !self.plans.contains_key(&customer.plan_id) {
                return Err(Invalid(format!(
                    "customer {} is on plan {}, which the snapshot does not have",
                    format_id("cus", id),
                    customer.plan_id
                )));
            }
        }
        if let Some(key) = self
            .keys
            .iter()
            .find(|k| !self.customers.contains_key(&k.customer))
        {
            return Err(Invalid(format!(
                "key {} belongs to customer {}, which the snapshot does not have",
                format_id("key", &key.id),
                format_id("cus", &key.customer)
            )));
        }
        let mut ids: Vec<Id> = self.keys.iter().map(|key| key.id).collect();
        let sorted = SortedKeys::new(self.keys);
        if let Some(pair) = sorted.entries.windows(2).find(|w| w[0].hash == w[1].hash) {
            return Err(Invalid(format!(
                "keys {} and {} have the same hash",
                format_id("key", &pair[0].id),
                format_id("key", &pair[1].id)
            )));
        }
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(Invalid(format!(
                "key {} appears twice, with different hashes",
                format_id("key", &pair[0])
            )));
        }
        drop(ids);
        Ok(Identities {
            version: self.version,
            version_at_ms: self.version_at_ms,
            applied_at: SystemTime::now(),
            plans: Arc::new(self.plans),
            customers: Layered::new(self.customers),
            keys: Keys {
                base: Arc::new(sorted),
                overlay: Arc::new(Map::default()),
            },
        })
    }
}

/// What a change needs besides the current identities.
#[derive(Debug, Clone)]
pub enum Applied {
    /// The identities with the changes applied.
    Next(Identities),
    /// A change cannot be applied incrementally (something was deleted): take a new snapshot.
    NeedsSnapshot(String),
}

impl Identities {
    /// The number of keys.
    pub fn key_count(&self) -> usize {
        self.keys.base.entries.len()
            + self
                .keys
                .overlay
                .keys()
                .filter(|hash| self.keys.base_find(hash).is_none())
                .count()
    }

    /// The key with this SHA-256, in constant time with respect to partial matches.
    pub fn key(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        self.keys.find(hash)
    }

    /// A customer by id.
    pub fn customer(&self, id: &Id) -> Option<&CustomerEntry> {
        self.customers.get(id)
    }

    /// A plan by id.
    pub fn plan(&self, id: &str) -> Option<&Arc<Plan>> {
        self.plans.get(id)
    }

    /// These identities with `changes` (in version order, the last at `version`, made at
    /// `version_at_ms` when the control plane said) applied.
    pub fn apply<'a>(
        &self,
        version: i64,
        version_at_ms: Option<i64>,
        changes: impl Iterator<Item = &'a ChangedEntity> + Clone,
        interner: &mut ScopeInterner,
    ) -> Result<Applied, Invalid> {
        let mut plans: Option<Map<Arc<str>, Arc<Plan>>> = None;
        let mut customers = self.customers.clone();
        let mut keys = self.keys.clone();
        for change in changes.clone() {
            match change {
                ChangedEntity::Plan { id, plan } => {
                    let plans = plans.get_or_insert_with(|| (*self.plans).clone());
                    match plan {
                        Some(plan) => {
                            plans.insert(id.as_str().into(), Arc::new(plan.clone()));
                        }
                        None => {
                            plans.remove(id.as_str());
                        }
                    }
                }
                ChangedEntity::Customer { id, customer } => match customer {
                    Some(record) => {
                        let (id, entry) = customer_entry(record)?;
                        customers.insert(id, entry);
                    }
                    None => {
                        return Ok(Applied::NeedsSnapshot(format!("customer {id} was deleted")));
                    }
                },
                ChangedEntity::Key { id, key } => match key {
                    Some(record) => keys.insert(key_entry(record, interner)?),
                    None => return Ok(Applied::NeedsSnapshot(format!("key {id} was deleted"))),
                },
            }
        }
        let plans = plans.map_or_else(|| Arc::clone(&self.plans), Arc::new);
        // What changed must still refer to what exists. A page carries each entity as it is
        // when the page is read, which can name one made after the page's last change (a
        // customer moved to a plan made since): not a fault of the control plane, so a snapshot
        // is taken, which is checked whole.
        for change in changes {
            match change {
                ChangedEntity::Customer {
                    customer: Some(record),
                    ..
                } if !plans.contains_key(record.plan_id.as_str()) => {
                    return Ok(Applied::NeedsSnapshot(format!(
                        "customer {} is on plan {}, which this page does not hold",
                        record.id, record.plan_id
                    )));
                }
                ChangedEntity::Key {
                    key: Some(record), ..
                } if parse_id("cus", &record.customer_id)
                    .is_none_or(|id| customers.get(&id).is_none()) =>
                {
                    return Ok(Applied::NeedsSnapshot(format!(
                        "key {} belongs to customer {}, which this page does not hold",
                        record.id, record.customer_id
                    )));
                }
                _ => {}
            }
        }
        customers.compact_if_large();
        keys.compact_if_large();
        Ok(Applied::Next(Identities {
            version,
            version_at_ms,
            applied_at: SystemTime::now(),
            plans,
            customers,
            keys,
        }))
    }
}

/// Keys: a sorted base and an overlay of changed ones, both by hash.
#[derive(Debug, Clone)]
struct Keys {
    base: Arc<SortedKeys>,
    overlay: Arc<Map<[u8; 32], KeyEntry>>,
}

/// Keys sorted by hash, with the start of each run of equal first two bytes: a lookup reads one
/// slot of the 256 KiB bucket table, then searches the ~15 neighbouring entries of its bucket
/// (at a million keys) instead of binary-searching the whole array.
#[derive(Debug)]
struct SortedKeys {
    entries: Vec<KeyEntry>,
    /// `buckets[b]..buckets[b + 1]` are the entries whose hash starts with the 16 bits `b`.
    buckets: Vec<u32>,
}

impl SortedKeys {
    /// Sorts `entries` and indexes them.
    fn new(mut entries: Vec<KeyEntry>) -> Self {
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
    fn find(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        if let Some(entry) = self.overlay.get(hash) {
            return Some(entry);
        }
        self.base_find(hash)
    }

    fn base_find(&self, hash: &[u8; 32]) -> Option<&KeyEntry> {
        self.base.find(hash)
    }

    fn insert(&mut self, entry: KeyEntry) {
        Arc::make_mut(&mut self.overlay).insert(entry.hash, entry);
    }

    fn compact_if_large(&mut self) {
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
struct Layered<K, V> {
    base: Arc<Map<K, V>>,
    overlay: Arc<Map<K, V>>,
}

impl<K: std::hash::Hash + Eq + Clone, V: Clone> Layered<K, V> {
    fn new(base: Map<K, V>) -> Self {
        Self {
            base: Arc::new(base),
            overlay: Arc::new(Map::default()),
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.overlay.get(key).or_else(|| self.base.get(key))
    }

    fn insert(&mut self, key: K, value: V) {
        Arc::make_mut(&mut self.overlay).insert(key, value);
    }

    fn compact_if_large(&mut self) {
        if self.overlay.len() <= OVERLAY_LIMIT {
            return;
        }
        let mut merged = (*self.base).clone();
        merged.extend(self.overlay.iter().map(|(k, v)| (k.clone(), v.clone())));
        self.base = Arc::new(merged);
        self.overlay = Arc::new(Map::default());
    }
}

#[cfg(test)]
mod tests;

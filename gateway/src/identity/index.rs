//! The identities a gateway enforces, indexed for the hot path: one immutable value per config
//! version, swapped atomically, never locked.
//!
//! Keys are the bulk (a million is a normal size), so they are kept compact: a sorted array of
//! fixed-size entries (96 bytes each) searched by the key's SHA-256, plus a small overlay of
//! the keys changed since the array was built. Applying a change copies only the overlay; once
//! the overlay passes [`OVERLAY_LIMIT`] entries it is merged into a new array. Customers work the
//! same way with a hash map as the base. Plans are few and copied whole.
//!
//! # Layout
//! - here: the identities of one version, built from a snapshot or from the last with changes.
//! - `entry`: ids, and one key or customer as the hot path reads it.
//! - `layered`: the base and overlay keys and customers are kept in.

mod entry;
mod layered;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use tollgate_model::feed::ChangedEntity;
use tollgate_model::plan::Plan;

pub use entry::{
    CustomerEntry, IdText, Invalid, KeyEntry, ScopeInterner, customer_entry, format_id, id_header,
    key_entry, parse_id,
};
use layered::{Keys, Layered, SortedKeys};

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

#[cfg(test)]
mod tests;

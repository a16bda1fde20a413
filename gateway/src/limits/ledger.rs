//! Where quota counters are rebuilt from: the usage ledger, the store's record of every metered
//! request. A seam with two sides: the embedded store in standalone mode, the control plane's
//! API in cluster mode.

use std::fmt::Debug;

use async_trait::async_trait;

use super::period::Period;
use crate::identity::index::Id;

/// The usage ledger, as the counters read it.
#[async_trait]
pub trait Ledger: Send + Sync + Debug {
    /// Units (and overage units) stored for `customer` in `period`.
    async fn period_usage(&self, customer: &Id, period: Period) -> anyhow::Result<(u64, u64)>;
}

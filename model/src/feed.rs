//! What gateways receive from the control plane: a full snapshot at a config version, then the
//! changes after it, each carrying the entity as it now is (or its removal).

use serde::{Deserialize, Serialize};

use crate::customer::CustomerStatus;
use crate::plan::Plan;

/// The response header of `GET /v1/gateway/snapshot` that gives the snapshot's version before
/// its body is read.
pub const SNAPSHOT_VERSION_HEADER: &str = "x-tollgate-config-version";

/// Everything a gateway enforces, as of `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Snapshot {
    /// The config version this snapshot is at (the last change it includes).
    pub version: i64,
    /// When the change of `version` was made, Unix ms by the store's clock (absent at version
    /// 0). With the version it names the store's history: a gateway sends it back as
    /// `since_at_ms`, so that a store replaced or restored from a backup, whose version of that
    /// number is another change, is not followed from a state it never had.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_at_ms: Option<i64>,
    /// Every plan, archived ones included (customers may still use them).
    pub plans: Vec<Plan>,
    /// Every customer, with the state and plan that apply.
    pub customers: Vec<CustomerRecord>,
    /// Every key, by hash.
    pub keys: Vec<KeyRecord>,
}

/// A customer as gateways need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CustomerRecord {
    /// Id.
    pub id: String,
    /// The plan that applies.
    pub plan_id: String,
    /// Active or suspended.
    pub status: CustomerStatus,
    /// The billing period the quota counts in, when the customer has a subscription.
    #[serde(default)]
    pub billing_period: Option<PeriodMs>,
}

/// A billing period in Unix milliseconds: `start_ms` included, `end_ms` excluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PeriodMs {
    /// Start, included.
    pub start_ms: i64,
    /// End, excluded; after `start_ms`.
    pub end_ms: i64,
}

/// A key as gateways need it: its hash and when it works.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyRecord {
    /// Id.
    pub id: String,
    /// Its customer.
    pub customer_id: String,
    /// Hex SHA-256 of the key.
    pub hash: String,
    /// Unix milliseconds after which it no longer works.
    pub expires_at_ms: Option<i64>,
    /// Unix milliseconds from which it no longer works (revocation, or a rotation's grace end).
    pub revoked_at_ms: Option<i64>,
    /// Route names it may call; `None` is every route.
    pub scopes: Option<Vec<String>>,
}

/// One change after a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Change {
    /// Its config version; changes come in increasing version order.
    pub version: i64,
    /// What changed, as it is now; `None` fields mean the entity is gone.
    #[serde(flatten)]
    pub entity: ChangedEntity,
}

/// The entity a change concerns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ChangedEntity {
    /// A plan, or its id when it was deleted.
    Plan {
        /// Id.
        id: String,
        /// The plan now; `None` when deleted.
        plan: Option<Plan>,
    },
    /// A customer now.
    Customer {
        /// Id.
        id: String,
        /// The customer now; `None` when deleted.
        customer: Option<CustomerRecord>,
    },
    /// A key now.
    Key {
        /// Id.
        id: String,
        /// The key now; `None` when deleted.
        key: Option<KeyRecord>,
    },
}

/// A page of changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Changes {
    /// The version the gateway is at once it applied these (the last change's, or the version it
    /// asked from when there are none).
    pub version: i64,
    /// When the last change was made, Unix ms by the store's clock (absent when there are none):
    /// see [`Snapshot::version_at_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_at_ms: Option<i64>,
    /// The changes, in version order.
    pub changes: Vec<Change>,
}

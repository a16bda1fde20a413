//! Customers: who calls through the gateway, on which plan.

use serde::{Deserialize, Serialize};

/// A customer as stored and published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Customer {
    /// `cus_` followed by a time-ordered id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Contact address, unique.
    pub email: String,
    /// The plan that applies to the customer's calls.
    pub plan_id: String,
    /// `active` customers may call; `suspended` ones are refused.
    pub status: CustomerStatus,
    /// The subscription's current billing period, which the quota counts in; `null` without a
    /// subscription (the quota then counts per calendar month in UTC).
    #[serde(default)]
    pub billing_period: Option<BillingPeriod>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

/// A billing period: the quota counts the requests made from `start` (included) to `end`
/// (excluded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BillingPeriod {
    /// RFC 3339 start, included.
    #[cfg_attr(feature = "openapi", schema(format = DateTime))]
    pub start: String,
    /// RFC 3339 end, excluded; after `start`.
    #[cfg_attr(feature = "openapi", schema(format = DateTime))]
    pub end: String,
}

/// The state of a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CustomerStatus {
    /// Calls are served.
    Active,
    /// Calls are refused with 403.
    Suspended,
}

impl CustomerStatus {
    /// The stored and wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            CustomerStatus::Active => "active",
            CustomerStatus::Suspended => "suspended",
        }
    }

    /// Parses the stored and wire form.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(CustomerStatus::Active),
            "suspended" => Some(CustomerStatus::Suspended),
            _ => None,
        }
    }
}

//! Plans: what a customer buys (rate limits, a quota, a price).

use serde::{Deserialize, Serialize};

/// A plan as stored and published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    /// `plan_` followed by a time-ordered id.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Every window applies at once (e.g. 10/s and 500/min).
    pub rate_limits: Vec<RateLimit>,
    /// Requests per billing period, if limited.
    pub quota: Option<Quota>,
    /// Price per billable unit, if billed.
    pub price: Option<Price>,
    /// Where a customer who ran out of quota can upgrade; given in the `quota-exceeded` problem.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(format = "uri", max_length = 2048))]
    pub upgrade_url: Option<String>,
    /// `active`, or `archived` once deleted while customers still use it.
    pub status: PlanStatus,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

/// A rate-limit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RateLimit {
    /// Requests allowed per window (at least 1).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 4294967295_u64))]
    pub requests: u64,
    /// Window length in seconds (at least 1, at most 31 days).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2678400))]
    pub window_seconds: u64,
}

/// A billing-period quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Quota {
    /// Requests per period (at least 1).
    #[cfg_attr(
        feature = "openapi",
        schema(minimum = 1, maximum = 9223372036854775807_u64)
    )]
    pub requests: u64,
    /// `true`: requests past the quota are refused; `false`: they pass and count as overage.
    pub hard: bool,
}

/// A per-unit price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Price {
    /// ISO 4217 code, lowercase (`usd`).
    #[cfg_attr(feature = "openapi", schema(pattern = "^[A-Za-z]{3}$"))]
    pub currency: String,
    /// Price of one unit in millionths of the currency's main unit (1000 = 0.001 USD).
    #[cfg_attr(feature = "openapi", schema(maximum = 9223372036854775807_u64))]
    pub unit_amount_micros: u64,
}

/// The state of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PlanStatus {
    /// Can be given to customers.
    Active,
    /// Deleted while in use: existing customers keep it, new ones cannot get it.
    Archived,
}

impl PlanStatus {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanStatus::Active => "active",
            PlanStatus::Archived => "archived",
        }
    }

    /// Parses the stored form.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(PlanStatus::Active),
            "archived" => Some(PlanStatus::Archived),
            _ => None,
        }
    }
}

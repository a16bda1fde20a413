//! The usage ledger, as the gateway uses it: where the flusher stores events, and where quota
//! counters are rebuilt from. A seam with two sides: the embedded store in standalone mode, the
//! control plane's API in cluster mode.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tollgate_control_plane::store::Store;
use tollgate_model::usage::{PeriodUsage, UsageEvent, UsageStored};

use crate::identity::index::{Id, format_id};
use crate::limits::period::Period;

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The ledger refused this batch for good (it will never take it as it is).
    #[error("the ledger refused the batch: {0}")]
    Rejected(String),
    /// The batch is too large for the ledger (or a proxy in front of it): a smaller one may
    /// pass.
    #[error("the batch is too large for the ledger: {0}")]
    TooLarge(String),
    /// The ledger could not be reached or failed: try again later.
    #[error(transparent)]
    Unavailable(#[from] anyhow::Error),
}

/// The usage ledger.
#[async_trait]
pub trait Ledger: Send + Sync + Debug {
    /// Stores `events`, each id once.
    async fn record(&self, events: &[UsageEvent]) -> Result<UsageStored, LedgerError>;

    /// Units and overage units stored for `customer` in `period`.
    async fn period_usage(&self, customer: &Id, period: Period) -> anyhow::Result<(u64, u64)>;
}

/// The embedded control plane's store.
#[derive(Debug, Clone)]
pub struct StoreLedger(pub Store);

#[async_trait]
impl Ledger for StoreLedger {
    async fn record(&self, events: &[UsageEvent]) -> Result<UsageStored, LedgerError> {
        self.0
            .record_usage(events)
            .await
            .map_err(|e| LedgerError::Unavailable(e.into()))
    }

    async fn period_usage(&self, customer: &Id, period: Period) -> anyhow::Result<(u64, u64)> {
        let usage = self
            .0
            .period_usage(&format_id("cus", customer), period.start_ms, period.end_ms)
            .await?;
        Ok((usage.units, usage.overage))
    }
}

/// A separate control plane, through its gateway API.
#[derive(Debug, Clone)]
pub struct HttpLedger {
    base_url: String,
    token: String,
    client: reqwest::Client,
}

impl HttpLedger {
    /// The control plane at `base_url`, with this gateway's token.
    pub fn new(base_url: &str, token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }
}

/// A `tollgate_model::usage::UsageBatch` as it is sent: the same JSON, serialized from the
/// events where they are rather than from a copy of each.
#[derive(serde::Serialize)]
struct BorrowedBatch<'a> {
    events: &'a [UsageEvent],
}

#[async_trait]
impl Ledger for HttpLedger {
    async fn record(&self, events: &[UsageEvent]) -> Result<UsageStored, LedgerError> {
        let response = self
            .client
            .post(format!("{}/v1/gateway/usage", self.base_url))
            .bearer_auth(&self.token)
            .json(&BorrowedBatch { events })
            .send()
            .await
            .context("cannot reach the control plane")?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            // Too large for the control plane or a proxy in front of it: smaller batches pass.
            if status == reqwest::StatusCode::PAYLOAD_TOO_LARGE {
                return Err(LedgerError::TooLarge(format!("{status}: {body}")));
            }
            // A body the control plane will never take; anything else (a token being rotated,
            // an overloaded or failing control plane) may pass later.
            if matches!(status.as_u16(), 400 | 422) {
                return Err(LedgerError::Rejected(format!("{status}: {body}")));
            }
            return Err(anyhow::anyhow!("the control plane answered {status}: {body}").into());
        }
        Ok(response.json().await.context("an unreadable answer")?)
    }

    async fn period_usage(&self, customer: &Id, period: Period) -> anyhow::Result<(u64, u64)> {
        let response = self
            .client
            .get(format!("{}/v1/gateway/usage/period", self.base_url))
            .bearer_auth(&self.token)
            .query(&[
                ("customer_id", format_id("cus", customer)),
                ("start_ms", period.start_ms.to_string()),
                ("end_ms", period.end_ms.to_string()),
            ])
            .send()
            .await
            .context("cannot reach the control plane")?;
        let status = response.status();
        if !status.is_success() {
            anyhow::bail!("the control plane answered {status} for a period's usage");
        }
        let usage: PeriodUsage = response.json().await?;
        Ok((usage.units, usage.overage))
    }
}

//! The usage ledger, as the gateway uses it: where the flusher stores events, and where quota
//! counters are rebuilt from. A seam with two sides: the embedded store in standalone mode, the
//! control plane's API in cluster mode.

use std::fmt::Debug;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tollgate_control_plane::store::Store;
use tollgate_model::problem::{PROBLEM_TYPE_PREFIX, Problem};
use tollgate_model::usage::{PeriodUsage, UsageEvent, UsageStored};

use crate::identity::follow::Token;
use crate::identity::index::{Id, format_id};
use crate::limits::period::Period;

/// Why a batch was not stored.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The ledger refused this batch for good (it will never take it as it is).
    #[error("the ledger refused the batch: {0}")]
    Rejected(String),
    /// The ledger refused these events of the batch for good (their positions in it, in order,
    /// each once), and would take the others.
    #[error("the ledger refused {count} event(s) of the batch: {reason}", count = .0.len(), reason = .1)]
    RefusedEvents(Vec<usize>, String),
    /// The batch is too large for the ledger (or a proxy in front of it): a smaller one may
    /// pass.
    #[error("the batch is too large for the ledger: {0}")]
    TooLarge(String),
    /// The ledger could not be reached or failed: try again later.
    #[error(transparent)]
    Unavailable(#[from] anyhow::Error),
}

/// Takes out of `batch` the events at `positions` (a [`LedgerError::RefusedEvents`] answer to
/// it) and returns them, in order; the others stay. `None`, and the batch untouched, unless the
/// positions are some, ascending, each once and within the batch: a ledger naming none (or ones
/// the batch does not have) must not have the same batch sent for ever.
pub fn take_refused(batch: &mut Vec<UsageEvent>, positions: &[usize]) -> Option<Vec<UsageEvent>> {
    let valid = !positions.is_empty()
        && positions.iter().all(|&p| p < batch.len())
        && positions.windows(2).all(|w| w[0] < w[1]);
    if !valid {
        return None;
    }
    let mut refused = Vec::with_capacity(positions.len());
    let mut position = 0;
    batch.retain(|event| {
        let keep = positions.binary_search(&position).is_err();
        if !keep {
            refused.push(event.clone());
        }
        position += 1;
        keep
    });
    Some(refused)
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
    token: Token,
    client: reqwest::Client,
}

impl HttpLedger {
    /// The control plane at `base_url`, with this gateway's token.
    pub fn new(base_url: &str, token: &str) -> anyhow::Result<Self> {
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token: Token::new(token.to_owned()),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }
}

/// The events a validation problem names (`events[17].method`), when it names only events of a
/// batch of `len`: the control plane checks every event and lists each invalid field, so the
/// events it does not name would pass. `None` when the problem is about the batch as a whole, or
/// is not one the control plane writes.
fn refused_events(body: &str, len: usize) -> Option<Vec<usize>> {
    let problem: Problem = serde_json::from_str(body).ok()?;
    if problem.kind != format!("{PROBLEM_TYPE_PREFIX}validation") || problem.errors.is_empty() {
        return None;
    }
    let mut positions = problem
        .errors
        .iter()
        .map(|error| {
            let (index, rest) = error.path.strip_prefix("events[")?.split_once(']')?;
            // Digits as the control plane writes a position: no sign, no leading zero.
            let position: usize = index.parse().ok()?;
            let canonical = position.to_string() == index;
            (canonical && position < len && (rest.is_empty() || rest.starts_with('.')))
                .then_some(position)
        })
        .collect::<Option<Vec<usize>>>()?;
    positions.sort_unstable();
    positions.dedup();
    Some(positions)
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
            .bearer_auth(self.token.expose())
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
                let reason = format!("{status}: {body}");
                let refused = (status == reqwest::StatusCode::UNPROCESSABLE_ENTITY)
                    .then(|| refused_events(&body, events.len()))
                    .flatten();
                return Err(match refused {
                    Some(positions) => LedgerError::RefusedEvents(positions, reason),
                    None => LedgerError::Rejected(reason),
                });
            }
            return Err(anyhow::anyhow!("the control plane answered {status}: {body}").into());
        }
        Ok(response.json().await.context("an unreadable answer")?)
    }

    async fn period_usage(&self, customer: &Id, period: Period) -> anyhow::Result<(u64, u64)> {
        let response = self
            .client
            .get(format!("{}/v1/gateway/usage/period", self.base_url))
            .bearer_auth(self.token.expose())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(paths: &[&str]) -> String {
        let errors: Vec<serde_json::Value> = paths
            .iter()
            .map(|path| serde_json::json!({"path": path, "message": "invalid"}))
            .collect();
        serde_json::json!({
            "type": "urn:tollgate:problem:validation",
            "title": "Invalid request",
            "status": 422,
            "errors": errors,
        })
        .to_string()
    }

    #[tokio::test]
    async fn the_control_planes_own_refusal_names_the_events_it_refuses() {
        use axum::response::IntoResponse;
        use tollgate_control_plane::api::error::ApiError;
        use tollgate_control_plane::api::usage::batch;

        use crate::metering::spool::tests::event;
        let mut bad = event(2, 1);
        bad.method = "X".repeat(40);
        let events = [event(1, 1), bad, event(3, 1)];
        let serde_json::Value::Object(fields) = serde_json::json!({ "events": events }) else {
            unreachable!("a JSON object")
        };
        let errors = batch::events(fields).unwrap_err();
        let response = ApiError::Invalid(errors).into_response();
        assert_eq!(response.status(), 422);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = std::str::from_utf8(&body).unwrap();
        assert_eq!(refused_events(body, 3), Some(vec![1]), "{body}");
    }

    #[test]
    fn a_problem_naming_only_events_refuses_those_events_each_once() {
        let body = problem(&["events[7].method", "events[2]", "events[7].status"]);
        assert_eq!(refused_events(&body, 10), Some(vec![2, 7]));
    }

    #[test]
    fn a_problem_about_the_batch_or_not_from_the_control_plane_refuses_all_of_it() {
        // The batch as a whole, or a field beside the events.
        assert_eq!(refused_events(&problem(&["events"]), 10), None);
        assert_eq!(
            refused_events(&problem(&["events[1].method", "extra"]), 10),
            None
        );
        // A position the batch does not have, or a path that only looks like one.
        assert_eq!(refused_events(&problem(&["events[10].method"]), 10), None);
        assert_eq!(refused_events(&problem(&["events[1]x"]), 10), None);
        assert_eq!(refused_events(&problem(&["events[-1]"]), 10), None);
        assert_eq!(refused_events(&problem(&["events[+1]"]), 10), None);
        assert_eq!(refused_events(&problem(&["events[01]"]), 10), None);
        // No field named, not a validation problem, or not a problem at all (a proxy's page).
        assert_eq!(refused_events(&problem(&[]), 10), None);
        let other = problem(&["events[1].method"]).replace("validation", "bad-request");
        assert_eq!(refused_events(&other, 10), None);
        assert_eq!(refused_events("<html>Bad Request</html>", 10), None);
    }
}

//! The audit log (who changed what, before and after) and the change log (the config version
//! gateways follow). Both are written inside the transaction of the change they describe.

use serde_json::Value;
use sqlx::{AnyConnection, Row};

use super::{StoreError, now_ms};

/// Who makes a change, and under which request.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The admin token's id.
    pub id: String,
    /// The request's `X-Request-Id`.
    pub request_id: Option<String>,
}

/// One audited change.
#[derive(Debug, Clone)]
pub struct Change<'a> {
    /// Such as `plan.create`.
    pub action: &'a str,
    /// Such as `plan`.
    pub target_type: &'a str,
    /// The changed entity's id.
    pub target_id: &'a str,
    /// The entity before the change.
    pub before: Option<Value>,
    /// The entity after it.
    pub after: Option<Value>,
}

/// Writes the audit entry and the change-log row of `change`; returns the new config version.
pub(crate) async fn record(
    connection: &mut AnyConnection,
    actor: &Actor,
    change: Change<'_>,
) -> Result<i64, StoreError> {
    let at = now_ms();
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, target_type, target_id, before_json, after_json, request_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(at)
    .bind(&actor.id)
    .bind(change.action)
    .bind(change.target_type)
    .bind(change.target_id)
    .bind(change.before.map(|v| v.to_string()))
    .bind(change.after.map(|v| v.to_string()))
    .bind(actor.request_id.clone())
    .execute(&mut *connection)
    .await?;
    let version: i64 = sqlx::query(
        "INSERT INTO change_log (at, kind, entity_id) VALUES ($1, $2, $3) RETURNING version",
    )
    .bind(at)
    .bind(change.target_type)
    .bind(change.target_id)
    .fetch_one(&mut *connection)
    .await?
    .try_get("version")?;
    Ok(version)
}

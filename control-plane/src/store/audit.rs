//! The audit log (who changed what, before and after) and the change log (the config version
//! gateways follow). Both are written inside the transaction of the change they describe.

use serde::Serialize;
use serde_json::Value;
use sqlx::{AnyConnection, Row};

use super::{Store, StoreError, now_ms, rfc3339};

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
    /// Whether gateways enforce what changed (plans, customers, keys): then the change gets a
    /// config version in the change log.
    pub publish: bool,
}

/// Writes the audit entry of `change`, and when the change concerns what gateways enforce
/// (`publish`), its change-log row, whose key is the new config version.
pub(crate) async fn record(
    connection: &mut AnyConnection,
    actor: &Actor,
    change: Change<'_>,
) -> Result<Option<i64>, StoreError> {
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
    if !change.publish {
        return Ok(None);
    }
    publish(connection, change.target_type, change.target_id)
        .await
        .map(Some)
}

/// Writes a change-log row for an entity gateways enforce (`kind` `plan`, `customer` or
/// `key`); returns the new config version. [`record`] does it for the audited entity; a change
/// that touches a second entity publishes it with this.
pub(crate) async fn publish(
    connection: &mut AnyConnection,
    kind: &str,
    entity_id: &str,
) -> Result<i64, StoreError> {
    // Versions must become visible in the order they are numbered, or a gateway that has seen
    // N could miss N - 1 committed after it. SQLite has one writer; on Postgres, writers of the
    // change log take one lock held to their commit, so numbering and commit order agree.
    if connection.backend_name() == "PostgreSQL" {
        sqlx::query("SELECT pg_advisory_xact_lock(7461736701)")
            .execute(&mut *connection)
            .await?;
    }
    Ok(sqlx::query(
        "INSERT INTO change_log (at, kind, entity_id) VALUES ($1, $2, $3) RETURNING version",
    )
    .bind(now_ms())
    .bind(kind)
    .bind(entity_id)
    .fetch_one(&mut *connection)
    .await?
    .try_get("version")?)
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Position in the log; later entries have larger ones.
    pub seq: i64,
    /// RFC 3339 time.
    pub at: String,
    /// The admin token's id, or `system`.
    pub actor: String,
    /// Such as `plan.create`.
    pub action: String,
    /// Such as `plan`.
    pub target_type: String,
    /// The entity's id.
    pub target_id: String,
    /// The entity before the change.
    pub before: Option<Value>,
    /// The entity after it.
    pub after: Option<Value>,
    /// The request's id.
    pub request_id: Option<String>,
}

impl Store {
    /// Up to `limit` audit entries older than `before_seq`, newest first.
    pub async fn audit_log(
        &self,
        limit: u32,
        before_seq: Option<i64>,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, actor, action, target_type, target_id, before_json, after_json, request_id \
             FROM audit_log WHERE seq < $1 ORDER BY seq DESC LIMIT $2",
        )
        .bind(before_seq.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| {
                let json = |name: &str| -> Result<Option<Value>, StoreError> {
                    let text: Option<String> = row.try_get(name)?;
                    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
                };
                Ok(AuditEntry {
                    seq: row.try_get("seq")?,
                    at: rfc3339(row.try_get("at")?),
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target_type: row.try_get("target_type")?,
                    target_id: row.try_get("target_id")?,
                    before: json("before_json")?,
                    after: json("after_json")?,
                    request_id: row.try_get("request_id")?,
                })
            })
            .collect()
    }
}

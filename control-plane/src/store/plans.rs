//! Plans in the store.

use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;
use tollgate_model::plan::{Plan, PlanStatus, Price, Quota, RateLimit};

use super::audit::{self, Actor, Change};
use super::{Store, StoreError, new_id, now_ms, rfc3339};

/// A plan to create, already validated.
#[derive(Debug, Clone)]
pub struct NewPlan {
    /// Unique name.
    pub name: String,
    /// Rate-limit windows.
    pub rate_limits: Vec<RateLimit>,
    /// Quota.
    pub quota: Option<Quota>,
    /// Price.
    pub price: Option<Price>,
    /// Where a customer out of quota can upgrade.
    pub upgrade_url: Option<String>,
}

/// Changes to a plan; `None` leaves a field as it is, `Some(None)` clears an optional one.
#[derive(Debug, Clone, Default)]
pub struct PlanPatch {
    /// New name.
    pub name: Option<String>,
    /// New windows.
    pub rate_limits: Option<Vec<RateLimit>>,
    /// New quota, or none.
    pub quota: Option<Option<Quota>>,
    /// New price, or none.
    pub price: Option<Option<Price>>,
    /// New upgrade URL, or none.
    pub upgrade_url: Option<Option<String>>,
}

/// What deleting a plan did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// No customer used it: it is gone.
    Removed,
    /// Customers use it: it is archived instead.
    Archived(Plan),
}

const COLUMNS: &str =
    "id, name, rate_limits, quota, price, upgrade_url, status, created_at, updated_at";

impl Store {
    /// Creates a plan.
    pub async fn create_plan(&self, plan: NewPlan, actor: &Actor) -> Result<Plan, StoreError> {
        let now = now_ms();
        let id = new_id("plan");
        let mut tx = self.pool().begin().await?;
        sqlx::query(&format!(
            "INSERT INTO plans ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(&id)
        .bind(&plan.name)
        .bind(json!(plan.rate_limits).to_string())
        .bind(plan.quota.map(|q| json!(q).to_string()))
        .bind(plan.price.as_ref().map(|p| json!(p).to_string()))
        .bind(plan.upgrade_url.as_deref())
        .bind(PlanStatus::Active.as_str())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_name(e, &plan.name))?;
        let created = fetch(&mut tx, &id).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "plan.create",
                target_type: "plan",
                target_id: &id,
                before: None,
                after: Some(json!(created)),
                publish: true,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(created)
    }

    /// The plan with this id.
    pub async fn plan(&self, id: &str) -> Result<Plan, StoreError> {
        let mut connection = self.pool().acquire().await?;
        fetch(&mut connection, id).await
    }

    /// Up to `limit` plans with ids after `after`, in id (creation) order.
    pub async fn plans(&self, limit: u32, after: Option<&str>) -> Result<Vec<Plan>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM plans WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Applies `patch` to a plan.
    pub async fn update_plan(
        &self,
        id: &str,
        patch: PlanPatch,
        actor: &Actor,
    ) -> Result<Plan, StoreError> {
        let mut tx = self.pool().begin().await?;
        let before = fetch(&mut tx, id).await?;
        let name = patch.name.unwrap_or_else(|| before.name.clone());
        let rate_limits = patch
            .rate_limits
            .unwrap_or_else(|| before.rate_limits.clone());
        let quota = patch.quota.unwrap_or(before.quota);
        let price = patch.price.unwrap_or_else(|| before.price.clone());
        let upgrade_url = patch
            .upgrade_url
            .unwrap_or_else(|| before.upgrade_url.clone());
        if (&name, &rate_limits, quota, &price, &upgrade_url)
            == (
                &before.name,
                &before.rate_limits,
                before.quota,
                &before.price,
                &before.upgrade_url,
            )
        {
            // Nothing changes: no write, no audit entry, no change for gateways to load.
            return Ok(before);
        }
        sqlx::query(
            "UPDATE plans SET name = $1, rate_limits = $2, quota = $3, price = $4, upgrade_url = $5, \
             updated_at = $6 WHERE id = $7",
        )
        .bind(&name)
        .bind(json!(rate_limits).to_string())
        .bind(quota.map(|q| json!(q).to_string()))
        .bind(price.as_ref().map(|p| json!(p).to_string()))
        .bind(upgrade_url.as_deref())
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_name(e, &name))?;
        let after = fetch(&mut tx, id).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "plan.update",
                target_type: "plan",
                target_id: id,
                before: Some(json!(before)),
                after: Some(json!(after)),
                publish: true,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    /// Deletes a plan, or archives it when customers use it.
    pub async fn delete_plan(&self, id: &str, actor: &Actor) -> Result<Deleted, StoreError> {
        let mut tx = self.pool().begin().await?;
        let before = fetch(&mut tx, id).await?;
        let users: i64 = sqlx::query("SELECT COUNT(*) AS n FROM customers WHERE plan_id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get("n")?;
        let (outcome, action, after) = if users == 0 {
            sqlx::query("DELETE FROM plans WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            (Deleted::Removed, "plan.delete", None)
        } else {
            sqlx::query("UPDATE plans SET status = $1, updated_at = $2 WHERE id = $3")
                .bind(PlanStatus::Archived.as_str())
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let archived = fetch(&mut tx, id).await?;
            (
                Deleted::Archived(archived.clone()),
                "plan.archive",
                Some(json!(archived)),
            )
        };
        audit::record(
            &mut tx,
            actor,
            Change {
                action,
                target_type: "plan",
                target_id: id,
                before: Some(json!(before)),
                after,
                publish: true,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

pub(crate) async fn fetch(
    connection: &mut sqlx::AnyConnection,
    id: &str,
) -> Result<Plan, StoreError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM plans WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or(StoreError::NotFound)?;
    decode(&row)
}

fn decode(row: &AnyRow) -> Result<Plan, StoreError> {
    let json_column = |name: &str| -> Result<Option<serde_json::Value>, StoreError> {
        let text: Option<String> = row.try_get(name)?;
        text.map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
    };
    let status: String = row.try_get("status")?;
    Ok(Plan {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        rate_limits: from_json(json_column("rate_limits")?.unwrap_or_else(|| json!([])))?,
        quota: json_column("quota")?.map(from_json).transpose()?,
        price: json_column("price")?.map(from_json).transpose()?,
        upgrade_url: row.try_get("upgrade_url")?,
        status: PlanStatus::parse(&status).ok_or_else(|| {
            StoreError::Database(sqlx::Error::Decode(
                format!("plan status {status:?}").into(),
            ))
        })?,
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
    })
}

fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, StoreError> {
    serde_json::from_value(value)
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))
}

fn conflict_on_name(error: sqlx::Error, name: &str) -> StoreError {
    match StoreError::from(error) {
        StoreError::Conflict(_) => StoreError::Conflict(format!("a plan named {name:?} exists")),
        other => other,
    }
}

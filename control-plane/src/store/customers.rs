//! Customers in the store.

use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;
use tollgate_model::customer::{BillingPeriod, Customer, CustomerStatus};
use tollgate_model::feed::PeriodMs;

use super::audit::{self, Actor, Change};
use super::{Store, StoreError, new_id, now_ms, rfc3339};

/// A customer to create, already validated.
#[derive(Debug, Clone)]
pub struct NewCustomer {
    /// Display name.
    pub name: String,
    /// Unique email.
    pub email: String,
    /// An active plan's id.
    pub plan_id: String,
}

/// Changes to a customer; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CustomerPatch {
    /// New name.
    pub name: Option<String>,
    /// New email.
    pub email: Option<String>,
    /// New plan (must be active).
    pub plan_id: Option<String>,
    /// New state.
    pub status: Option<CustomerStatus>,
    /// New billing period, or none.
    pub billing_period: Option<Option<PeriodMs>>,
}

/// Why a customer change was refused before it reached the database.
#[derive(Debug)]
pub enum CustomerError {
    /// `plan_id` names no active plan.
    NoSuchPlan,
    /// Anything else.
    Store(StoreError),
}

impl From<StoreError> for CustomerError {
    fn from(error: StoreError) -> Self {
        CustomerError::Store(error)
    }
}

impl From<sqlx::Error> for CustomerError {
    fn from(error: sqlx::Error) -> Self {
        CustomerError::Store(error.into())
    }
}

const COLUMNS: &str =
    "id, name, email, plan_id, status, period_start, period_end, created_at, updated_at";

impl Store {
    /// Creates a customer on an active plan.
    pub async fn create_customer(
        &self,
        customer: NewCustomer,
        actor: &Actor,
    ) -> Result<Customer, CustomerError> {
        let now = now_ms();
        let id = new_id("cus");
        let mut tx = self.pool().begin().await?;
        require_active_plan(&mut tx, &customer.plan_id).await?;
        sqlx::query(
            "INSERT INTO customers (id, name, email, plan_id, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&id)
        .bind(&customer.name)
        .bind(&customer.email)
        .bind(&customer.plan_id)
        .bind(CustomerStatus::Active.as_str())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_email(e, &customer.email))?;
        let created = fetch(&mut tx, &id).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "customer.create",
                target_type: "customer",
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

    /// The customer with this id.
    pub async fn customer(&self, id: &str) -> Result<Customer, StoreError> {
        let mut connection = self.pool().acquire().await?;
        fetch(&mut connection, id).await
    }

    /// Up to `limit` customers with ids after `after`, in id (creation) order.
    pub async fn customers(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<Customer>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM customers WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Applies `patch` to a customer.
    pub async fn update_customer(
        &self,
        id: &str,
        patch: CustomerPatch,
        actor: &Actor,
    ) -> Result<Customer, CustomerError> {
        let mut tx = self.pool().begin().await?;
        let (before, stored_period) = fetch_with_period(&mut tx, id).await?;
        if let Some(plan_id) = &patch.plan_id
            && *plan_id != before.plan_id
        {
            require_active_plan(&mut tx, plan_id).await?;
        }
        let name = patch.name.unwrap_or_else(|| before.name.clone());
        let email = patch.email.unwrap_or_else(|| before.email.clone());
        let plan_id = patch.plan_id.unwrap_or_else(|| before.plan_id.clone());
        let status = patch.status.unwrap_or(before.status);
        let period = patch.billing_period.unwrap_or(stored_period);
        if (&name, &email, &plan_id, status, period)
            == (
                &before.name,
                &before.email,
                &before.plan_id,
                before.status,
                stored_period,
            )
        {
            // Nothing changes: no write, no audit entry, no change for gateways to load.
            return Ok(before);
        }
        sqlx::query(
            "UPDATE customers SET name = $1, email = $2, plan_id = $3, status = $4, \
             period_start = $5, period_end = $6, updated_at = $7 WHERE id = $8",
        )
        .bind(name)
        .bind(&email)
        .bind(plan_id)
        .bind(status.as_str())
        .bind(period.map(|p| p.start_ms))
        .bind(period.map(|p| p.end_ms))
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_email(e, &email))?;
        let after = fetch(&mut tx, id).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "customer.update",
                target_type: "customer",
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
}

async fn require_active_plan(
    connection: &mut sqlx::AnyConnection,
    plan_id: &str,
) -> Result<(), CustomerError> {
    let found = sqlx::query("SELECT id FROM plans WHERE id = $1 AND status = 'active'")
        .bind(plan_id)
        .fetch_optional(&mut *connection)
        .await?;
    found.map(|_| ()).ok_or(CustomerError::NoSuchPlan)
}

async fn fetch(connection: &mut sqlx::AnyConnection, id: &str) -> Result<Customer, StoreError> {
    fetch_with_period(connection, id)
        .await
        .map(|(customer, _)| customer)
}

/// A customer and its billing period in milliseconds, from one read of its row.
async fn fetch_with_period(
    connection: &mut sqlx::AnyConnection,
    id: &str,
) -> Result<(Customer, Option<PeriodMs>), StoreError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM customers WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *connection)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok((decode(&row)?, billing_period(&row)?))
}

fn decode(row: &AnyRow) -> Result<Customer, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Customer {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        email: row.try_get("email")?,
        plan_id: row.try_get("plan_id")?,
        status: CustomerStatus::parse(&status).ok_or_else(|| {
            StoreError::Database(sqlx::Error::Decode(
                format!("customer status {status:?}").into(),
            ))
        })?,
        billing_period: billing_period(row)?.map(|period| BillingPeriod {
            start: rfc3339(period.start_ms),
            end: rfc3339(period.end_ms),
        }),
        created_at: rfc3339(row.try_get("created_at")?),
        updated_at: rfc3339(row.try_get("updated_at")?),
    })
}

/// The billing period of a customer row (`period_start`, `period_end`), when both are set.
pub(crate) fn billing_period(row: &AnyRow) -> Result<Option<PeriodMs>, StoreError> {
    let start: Option<i64> = row.try_get("period_start")?;
    let end: Option<i64> = row.try_get("period_end")?;
    Ok(start
        .zip(end)
        .map(|(start_ms, end_ms)| PeriodMs { start_ms, end_ms }))
}

fn conflict_on_email(error: sqlx::Error, email: &str) -> StoreError {
    match StoreError::from(error) {
        StoreError::Conflict(_) => {
            StoreError::Conflict(format!("a customer with email {email:?} exists"))
        }
        other => other,
    }
}

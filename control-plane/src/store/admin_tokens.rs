//! Admin tokens in the store: only their SHA-256 hashes are kept.

use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::audit::{self, Actor, Change};
use super::{Store, StoreError, new_id, now_ms, rfc3339};
use crate::secret::Role;

/// An admin token as stored and listed: never its secret nor its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AdminToken {
    /// `adm_...`.
    pub id: String,
    /// Free text.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// Why a token could not be deleted.
#[derive(Debug)]
pub enum DeleteTokenError {
    /// It is the last admin token: nobody could manage the control plane any more.
    LastAdmin,
    /// Anything else.
    Store(StoreError),
}

impl From<sqlx::Error> for DeleteTokenError {
    fn from(error: sqlx::Error) -> Self {
        DeleteTokenError::Store(error.into())
    }
}

impl From<StoreError> for DeleteTokenError {
    fn from(error: StoreError) -> Self {
        DeleteTokenError::Store(error)
    }
}

fn decode(row: &AnyRow) -> Result<AdminToken, StoreError> {
    let role: String = row.try_get("role")?;
    Ok(AdminToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        created_at: rfc3339(row.try_get("created_at")?),
    })
}

impl Store {
    /// Stores a token by its hash (at start-up, with no one to audit).
    pub async fn create_admin_token(
        &self,
        name: &str,
        role: Role,
        hash: &str,
    ) -> Result<AdminToken, StoreError> {
        let mut connection = self.pool().acquire().await?;
        insert(&mut connection, name, role, hash).await
    }

    /// Replaces every token named `name` with `role` by one with this hash (at start-up, with no
    /// one to audit): for the token a gateway gives its own embedded control plane, and the one
    /// `TOLLGATE_ADMIN_TOKEN` sets, whose replaced tokens are `retire`d: remembered as deleted,
    /// so that an old value set again (a rollback, a stale replica) does not bring one back. The
    /// new token, and how many it replaced.
    pub async fn replace_admin_token(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        retire: bool,
    ) -> Result<(AdminToken, u64), StoreError> {
        let mut tx = self.pool().begin().await?;
        if retire {
            sqlx::query(
                "INSERT INTO deleted_admin_tokens (hash, deleted_at) \
                 SELECT hash, $3 FROM admin_tokens WHERE name = $1 AND role = $2 \
                 ON CONFLICT (hash) DO NOTHING",
            )
            .bind(name)
            .bind(role.as_str())
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        let replaced = sqlx::query("DELETE FROM admin_tokens WHERE name = $1 AND role = $2")
            .bind(name)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let token = insert(&mut tx, name, role, hash).await?;
        tx.commit().await?;
        Ok((token, replaced))
    }

    /// Stores a token by its hash, on behalf of `actor`.
    pub async fn create_admin_token_as(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        actor: &Actor,
    ) -> Result<AdminToken, StoreError> {
        let mut tx = self.pool().begin().await?;
        let token = insert(&mut tx, name, role, hash).await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "admin_token.create",
                target_type: "admin_token",
                target_id: &token.id,
                before: None,
                after: Some(json!(token)),
                publish: false,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(token)
    }

    /// Up to `limit` tokens with ids after `after`.
    pub async fn admin_tokens(
        &self,
        limit: u32,
        after: Option<&str>,
    ) -> Result<Vec<AdminToken>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, role, created_at FROM admin_tokens WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(decode).collect()
    }

    /// Deletes a token, unless it is the last admin one.
    pub async fn delete_admin_token(
        &self,
        id: &str,
        actor: &Actor,
    ) -> Result<(), DeleteTokenError> {
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query("SELECT id, name, role, created_at FROM admin_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let token = decode(&row)?;
        if token.role == Role::Admin {
            let admins: i64 =
                sqlx::query("SELECT COUNT(*) AS n FROM admin_tokens WHERE role = 'admin'")
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("n")?;
            if admins <= 1 {
                return Err(DeleteTokenError::LastAdmin);
            }
        }
        // Remembered, so that `TOLLGATE_ADMIN_TOKEN` still set to it does not bring it back.
        sqlx::query(
            "INSERT INTO deleted_admin_tokens (hash, deleted_at) \
             SELECT hash, $2 FROM admin_tokens WHERE id = $1 ON CONFLICT (hash) DO NOTHING",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM admin_tokens WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            actor,
            Change {
                action: "admin_token.delete",
                target_type: "admin_token",
                target_id: id,
                before: Some(json!(token)),
                after: None,
                publish: false,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The token whose hash is `hash`.
    pub async fn admin_token_by_hash(&self, hash: &str) -> Result<Option<AdminToken>, StoreError> {
        let row =
            sqlx::query("SELECT id, name, role, created_at FROM admin_tokens WHERE hash = $1")
                .bind(hash)
                .fetch_optional(self.pool())
                .await?;
        row.as_ref().map(decode).transpose()
    }

    /// Whether a token whose hash is `hash` was deleted through the API.
    pub async fn admin_token_was_deleted(&self, hash: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT hash FROM deleted_admin_tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(self.pool())
            .await?;
        Ok(row.is_some())
    }

    /// How many admin tokens exist.
    pub async fn admin_token_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM admin_tokens")
            .fetch_one(self.pool())
            .await?
            .try_get("n")?)
    }
}

async fn insert(
    connection: &mut sqlx::AnyConnection,
    name: &str,
    role: Role,
    hash: &str,
) -> Result<AdminToken, StoreError> {
    let id = new_id("adm");
    let now = now_ms();
    sqlx::query(
        "INSERT INTO admin_tokens (id, name, role, hash, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(name)
    .bind(role.as_str())
    .bind(hash)
    .bind(now)
    .execute(&mut *connection)
    .await?;
    Ok(AdminToken {
        id,
        name: name.to_owned(),
        role,
        created_at: rfc3339(now),
    })
}

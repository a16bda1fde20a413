//! Admin tokens in the store: only their SHA-256 hashes are kept.

use sqlx::Row;

use super::{Store, StoreError, new_id, now_ms};
use crate::secret::Role;

/// An admin token as stored (no secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// `adm_...`.
    pub id: String,
    /// Free text.
    pub name: String,
    /// What it may do.
    pub role: Role,
}

impl Store {
    /// Stores a token by its hash.
    pub async fn create_admin_token(
        &self,
        name: &str,
        role: Role,
        hash: &str,
    ) -> Result<AdminToken, StoreError> {
        let id = new_id("adm");
        sqlx::query("INSERT INTO admin_tokens (id, name, role, hash, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&id)
            .bind(name)
            .bind(role.as_str())
            .bind(hash)
            .bind(now_ms())
            .execute(self.pool())
            .await?;
        Ok(AdminToken {
            id,
            name: name.to_owned(),
            role,
        })
    }

    /// The token whose hash is `hash`.
    pub async fn admin_token_by_hash(&self, hash: &str) -> Result<Option<AdminToken>, StoreError> {
        let row = sqlx::query("SELECT id, name, role FROM admin_tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(self.pool())
            .await?;
        row.map(|row| {
            let role: String = row.try_get("role")?;
            Ok(AdminToken {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                role: Role::parse(&role).unwrap_or(Role::Viewer),
            })
        })
        .transpose()
    }

    /// How many admin tokens exist.
    pub async fn admin_token_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM admin_tokens")
            .fetch_one(self.pool())
            .await?
            .try_get("n")?)
    }
}

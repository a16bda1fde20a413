//! Admin-token authentication: `Authorization: Bearer <token>`, looked up by its SHA-256.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::secret::{Role, hash};
use crate::store::audit::Actor;

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who, for the audit log.
    pub actor: Actor,
    /// What it may do.
    pub role: Role,
}

impl Caller {
    /// Refuses viewers.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::Viewer => Err(ApiError::Forbidden),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(ApiError::Unauthenticated)?;
        let found = state
            .store
            .admin_token_by_hash(&hash(token))
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Caller {
            actor: Actor {
                id: found.id,
                request_id,
            },
            role: found.role,
        })
    }
}

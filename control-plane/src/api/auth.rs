//! Admin-token authentication: `Authorization: Bearer <token>`, looked up by its SHA-256.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::AppState;
use super::error::ApiError;
use crate::secret::{Role, hash};
use crate::store::admin_tokens::AdminToken;
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
            Role::Viewer | Role::Gateway => {
                Err(ApiError::Forbidden("this token's role may only read"))
            }
        }
    }
}

/// A gateway following the feed or sending usage (`/v1/gateway/*`): only `gateway` tokens.
#[derive(Debug, Clone)]
pub struct GatewayCaller {
    /// The token's id.
    pub id: String,
}

impl FromRequestParts<AppState> for GatewayCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = authenticate(parts, state).await?;
        match token.role {
            Role::Gateway => Ok(GatewayCaller { id: token.id }),
            Role::Admin | Role::Viewer => Err(ApiError::Forbidden(
                "/v1/gateway is for gateway tokens (role \"gateway\")",
            )),
        }
    }
}

/// The token of an `Authorization: Bearer` header (the scheme's name in any case, RFC 9110).
pub(super) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

async fn authenticate(parts: &Parts, state: &AppState) -> Result<AdminToken, ApiError> {
    let token = bearer_token(&parts.headers).ok_or(ApiError::Unauthenticated)?;
    state
        .store
        .admin_token_by_hash(&hash(token))
        .await?
        .ok_or(ApiError::Unauthenticated)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let found = authenticate(parts, state).await?;
        if found.role == Role::Gateway {
            return Err(ApiError::Forbidden(
                "gateway tokens may only use /v1/gateway",
            ));
        }
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

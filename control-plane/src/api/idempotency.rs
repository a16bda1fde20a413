//! `Idempotency-Key` on `POST`s: a retried request with the same key (from the same admin token)
//! gets the first answer again, marked `Idempotent-Replayed: true`, and changes nothing; the
//! same key with a different request is refused with 422. Only successful answers are
//! remembered, so a request that failed can be retried under its key.
//!
//! Usage batches ([`NOT_REMEMBERED`]) pass through without it: their event ids already make a
//! retry count nothing twice, and their bodies are larger than what is remembered.
//!
//! An answer may hold a secret shown once (a new key, a rotated key, a new admin token), and the
//! store keeps only hashes of those. So the body is kept sealed (ChaCha20-Poly1305) with a key
//! made from the caller's token and the `Idempotency-Key`; the store holds the key and the
//! token's hash, not the token: only the caller's retry can open it, and a copy of the store
//! holds no usable secret without a token that was valid when it was written. Answers are kept
//! [`KEPT_MS`] (24 h), and replayed only to a caller whose token still works.

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_model::FieldError;

use super::AppState;
use super::body::MAX_BODY;
use super::error::ApiError;
use crate::store::idempotency::Remembered;

/// The header.
pub const HEADER: &str = "idempotency-key";
/// Marks a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";

/// How long an answer is remembered: a retry later than this is a new request.
pub const KEPT_MS: i64 = 24 * 3_600_000;

/// `POST` paths that do not read `Idempotency-Key`: idempotent by their content.
pub const NOT_REMEMBERED: [&str; 1] = ["/v1/gateway/usage"];

/// The middleware.
pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || NOT_REMEMBERED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Some(key) = request.headers().get(HEADER).cloned() else {
        return next.run(request).await;
    };
    let key = match key.to_str() {
        Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
            key.to_owned()
        }
        _ => {
            return ApiError::Invalid(vec![FieldError {
                path: "Idempotency-Key".into(),
                message: "must be 1 to 255 visible ASCII characters".into(),
            }])
            .into_response();
        }
    };
    // Only for a caller whose token works now: a deleted token gets no answer remembered for it
    // (the handler refuses it).
    let Some(token) = super::auth::bearer_token(request.headers()).map(str::to_owned) else {
        return next.run(request).await;
    };
    match state
        .store
        .admin_token_by_hash(&crate::secret::hash(&token))
        .await
    {
        Ok(Some(_)) => {}
        Ok(None) => return next.run(request).await,
        Err(error) => return ApiError::from(error).into_response(),
    }
    // Keyed by the caller's token (hashed): keys of different admins never collide. The header
    // as `Bearer <token>` whatever the scheme's case, as earlier versions keyed it.
    let authorization = format!("Bearer {token}");
    let actor = crate::secret::hash(&authorization);
    let seal_key = seal_key(&authorization, &key);
    let path = request.uri().path().to_owned();
    let (parts, body) = request.into_parts();
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        return ApiError::TooLarge(MAX_BODY).into_response();
    };
    let request_hash = hex::encode(
        Sha256::new()
            .chain_update(parts.method.as_str())
            .chain_update(b" ")
            .chain_update(&path)
            .chain_update(b"\n")
            .chain_update(&body)
            .finalize(),
    );
    match state.store.remembered(&actor, &key, KEPT_MS).await {
        // Written unsealed by an earlier version (one still running during an upgrade, maybe,
        // after the migration dropped the others): it may hold a secret, so it is deleted, and
        // the request is made as a new one.
        Ok(Some(remembered)) if !is_sealed(&remembered) => {
            if let Err(error) = state.store.forget_remembered(&actor, &key).await {
                return ApiError::from(error).into_response();
            }
        }
        Ok(Some(remembered)) if remembered.request_hash == request_hash => {
            return replay(&remembered, &seal_key);
        }
        Ok(Some(_)) => {
            return ApiError::Invalid(vec![FieldError {
                path: "Idempotency-Key".into(),
                message: "was already used for a different request".into(),
            }])
            .into_response();
        }
        Ok(None) => {}
        Err(error) => return ApiError::from(error).into_response(),
    }
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    if !response.status().is_success() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(body) = to_bytes(body, MAX_BODY).await else {
        return ApiError::Internal("response body too large to remember".into()).into_response();
    };
    let header_text = |name: header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let Some(sealed) = seal(&seal_key, &request_hash, &body) else {
        return ApiError::Internal("cannot seal an idempotent answer".into()).into_response();
    };
    let stored = json!({
        "content_type": header_text(header::CONTENT_TYPE),
        "location": header_text(header::LOCATION),
        "sealed": sealed,
    });
    let answer = Remembered {
        request_hash,
        status: parts.status.as_u16(),
        response: stored.to_string(),
    };
    if let Err(error) = state
        .store
        .remember(&actor, &key, &path, &answer, KEPT_MS)
        .await
    {
        tracing::warn!(%error, "cannot remember an idempotent answer");
    }
    Response::from_parts(parts, Body::from(body))
}

/// Whether `remembered` was kept sealed (by this version), not in plaintext (by an earlier one).
fn is_sealed(remembered: &Remembered) -> bool {
    serde_json::from_str::<Value>(&remembered.response)
        .is_ok_and(|stored| stored["sealed"].is_string())
}

fn replay(remembered: &Remembered, seal_key: &LessSafeKey) -> Response {
    let stored: Value = serde_json::from_str(&remembered.response).unwrap_or(Value::Null);
    let status = StatusCode::from_u16(remembered.status).unwrap_or(StatusCode::OK);
    let opened = stored["sealed"]
        .as_str()
        .and_then(|sealed| open(seal_key, &remembered.request_hash, sealed));
    let Some(body) = opened else {
        return ApiError::Internal("a remembered answer cannot be opened".into()).into_response();
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    for (name, field) in [
        (header::CONTENT_TYPE, "content_type"),
        (header::LOCATION, "location"),
    ] {
        if let Some(value) = stored[field]
            .as_str()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            headers.insert(name, value);
        }
    }
    headers.insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

/// The key an answer to `authorization` under `idempotency_key` is sealed with.
fn seal_key(authorization: &str, idempotency_key: &str) -> LessSafeKey {
    let digest = Sha256::new()
        .chain_update(b"tollgate idempotent answer v1\0")
        .chain_update(authorization)
        .chain_update(b"\0")
        .chain_update(idempotency_key)
        .finalize();
    let key = UnboundKey::new(&CHACHA20_POLY1305, &digest)
        .unwrap_or_else(|_| unreachable!("a SHA-256 is a ChaCha20 key's 32 bytes"));
    LessSafeKey::new(key)
}

/// `body` sealed under `key` for the request `request_hash`: a random nonce, then the
/// ciphertext and its tag, in hex. `None` only for a body beyond the cipher's limit (256 GiB).
fn seal(key: &LessSafeKey, request_hash: &str, body: &[u8]) -> Option<String> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    let mut sealed = body.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(request_hash.as_bytes()),
        &mut sealed,
    )
    .ok()?;
    Some(hex::encode([&nonce[..], &sealed].concat()))
}

/// What [`seal`] sealed, when `key` and `request_hash` are the ones it was sealed with.
fn open(key: &LessSafeKey, request_hash: &str, sealed: &str) -> Option<Vec<u8>> {
    let sealed = hex::decode(sealed).ok()?;
    let (nonce, ciphertext) = sealed.split_at_checked(NONCE_LEN)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut ciphertext = ciphertext.to_vec();
    let body = key
        .open_in_place(nonce, Aad::from(request_hash.as_bytes()), &mut ciphertext)
        .ok()?;
    Some(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_opens_only_with_the_callers_header_key_and_request() {
        let key = seal_key("Bearer tga_1", "retry-1");
        let sealed = seal(&key, "hash-1", b"{\"key\":\"tg_secret\"}").unwrap();
        assert!(!sealed.contains("tg_secret"));
        assert_eq!(
            open(&key, "hash-1", &sealed).as_deref(),
            Some(&b"{\"key\":\"tg_secret\"}"[..])
        );
        assert_eq!(
            open(&seal_key("Bearer tga_2", "retry-1"), "hash-1", &sealed),
            None
        );
        assert_eq!(
            open(&seal_key("Bearer tga_1", "retry-2"), "hash-1", &sealed),
            None
        );
        assert_eq!(open(&key, "hash-2", &sealed), None);
        assert_eq!(open(&key, "hash-1", "00"), None);
        assert_eq!(open(&key, "hash-1", "not hex"), None);
    }
}

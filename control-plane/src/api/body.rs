//! Request bodies and queries: bodies are read as JSON objects and checked field by field, so
//! that a 422 lists every invalid field with its path; every rejection is a problem.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tollgate_model::FieldError;
use utoipa::ToSchema;

use super::error::ApiError;

/// Largest request body read, and largest answer remembered for idempotent replays.
pub const MAX_BODY: usize = 1 << 20;

/// A request body that is a JSON object (400 otherwise, 413 past [`MAX_BODY`]).
#[derive(Debug)]
pub struct Object(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for Object {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes(request, state).await?;
        object(&bytes, true).map(Object)
    }
}

/// A request body that is a JSON object of up to `LIMIT` bytes, for the routes given a larger
/// body limit than [`MAX_BODY`] (with `DefaultBodyLimit::max(LIMIT)` on the route): 400
/// otherwise, 413 past `LIMIT`.
#[derive(Debug)]
pub struct LargeObject<const LIMIT: usize>(pub Map<String, Value>);

impl<S: Send + Sync, const LIMIT: usize> FromRequest<S> for LargeObject<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes_up_to(request, state, LIMIT).await?;
        // Written by gateways from their records, so never naming a field twice: a second
        // parse of a batch of thousands of events would be all cost.
        object(&bytes, false).map(LargeObject)
    }
}

/// A request body that is a JSON object or empty (an empty object then).
#[derive(Debug)]
pub struct OptionalObject(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for OptionalObject {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = bytes(request, state).await?;
        if bytes.is_empty() {
            Ok(OptionalObject(Map::new()))
        } else {
            object(&bytes, true).map(OptionalObject)
        }
    }
}

/// Query parameters, a 400 problem when they do not parse.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(query)| Query(query))
            .map_err(|rejection: QueryRejection| {
                // axum's "Failed to deserialize query string: limit: …", in this API's words.
                let text = rejection.body_text();
                let reason = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                ApiError::BadRequest(format!("a query parameter does not parse: {reason}"))
            })
    }
}

async fn bytes<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    bytes_up_to(request, state, MAX_BODY).await
}

/// The body, read up to the route's limit, which is `limit` (for the 413's message).
async fn bytes_up_to<S: Send + Sync>(
    request: Request,
    state: &S,
    limit: usize,
) -> Result<Bytes, ApiError> {
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection: BytesRejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(limit)
            } else {
                ApiError::BadRequest(rejection.body_text())
            }
        })
}

/// The JSON object `body`; with `fields_once`, refused when an object in it names a field twice.
fn object(body: &[u8], fields_once: bool) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) if !fields_once => Ok(map),
        // An object naming a field twice would keep the last silently: which one was meant is
        // the caller's to say (RFC 8259 leaves it to the receiver).
        Ok(Value::Object(map)) => match serde_json::from_slice::<FieldsOnce>(body) {
            Ok(FieldsOnce) => Ok(map),
            Err(error) => Err(ApiError::BadRequest(format!(
                "the body is ambiguous: {error}"
            ))),
        },
        Ok(_) => Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        )),
        Err(error) => Err(ApiError::BadRequest(format!(
            "the body is not valid JSON: {error}"
        ))),
    }
}

/// A JSON value in which no object names a field twice (at any depth).
struct FieldsOnce;

impl<'de> serde::Deserialize<'de> for FieldsOnce {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldsOnceVisitor)
    }
}

struct FieldsOnceVisitor;

impl<'de> serde::de::Visitor<'de> for FieldsOnceVisitor {
    type Value = FieldsOnce;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<FieldsOnce, E> {
        Ok(FieldsOnce)
    }

    fn visit_i64<E>(self, _: i64) -> Result<FieldsOnce, E> {
        Ok(FieldsOnce)
    }

    fn visit_u64<E>(self, _: u64) -> Result<FieldsOnce, E> {
        Ok(FieldsOnce)
    }

    fn visit_f64<E>(self, _: f64) -> Result<FieldsOnce, E> {
        Ok(FieldsOnce)
    }

    fn visit_str<E>(self, _: &str) -> Result<FieldsOnce, E> {
        Ok(FieldsOnce)
    }

    fn visit_unit<E>(self) -> Result<FieldsOnce, E> {
        Ok(FieldsOnce)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<FieldsOnce, A::Error> {
        while seq.next_element::<FieldsOnce>()?.is_some() {}
        Ok(FieldsOnce)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<FieldsOnce, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the field \"{name}\" is given twice"
                )));
            }
            map.next_value::<FieldsOnce>()?;
        }
        Ok(FieldsOnce)
    }
}

/// A field error.
pub fn error(path: &str, message: &str) -> FieldError {
    FieldError {
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

/// Reports every key of `fields` that is not in `known`, under `prefix`.
pub fn unknown_fields(
    fields: &Map<String, Value>,
    known: &[&str],
    prefix: &str,
    errors: &mut Vec<FieldError>,
) {
    for key in fields.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(error(&format!("{prefix}{key}"), "unknown field"));
        }
    }
}

/// A name: 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn name(value: &Value, path: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match value.as_str() {
        Some(name)
            if (1..=64).contains(&name.len())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) =>
        {
            Some(name.to_owned())
        }
        _ => {
            errors.push(error(
                path,
                "must be 1 to 64 letters, digits, '-', '_' or '.'",
            ));
            None
        }
    }
}

/// Unix milliseconds of an RFC 3339 time (`2027-01-31T00:00:00Z`, any offset), `None` unless
/// it is one at or after 1970 ([`crate::calendar::parse_rfc3339`]).
pub fn rfc3339_ms(text: &str) -> Option<i64> {
    crate::calendar::parse_rfc3339(text)
}

/// Longest upgrade URL accepted, in bytes (what browsers and proxies reliably carry).
pub const MAX_UPGRADE_URL: usize = 2048;

/// An upgrade URL or `null`: an absolute `https://` or `http://` URL with a host, at most
/// [`MAX_UPGRADE_URL`] bytes, without whitespace or control characters (it is put as is into
/// problem bodies that clients read).
pub fn upgrade_url(value: &Value, errors: &mut Vec<FieldError>) -> Option<Option<String>> {
    if value.is_null() {
        return Some(None);
    }
    let valid = value.as_str().filter(|url| {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        url.len() <= MAX_UPGRADE_URL
            && !url.chars().any(|c| c.is_whitespace() || c.is_control())
            && rest.is_some_and(|rest| {
                !rest.is_empty() && !rest.starts_with(['/', '?', '#', '@', ':'])
            })
    });
    match valid {
        Some(url) => Some(Some(url.to_owned())),
        None => {
            errors.push(error(
                "upgrade_url",
                &format!(
                    "must be an absolute https:// or http:// URL of at most {MAX_UPGRADE_URL} \
                     characters, without spaces, or null"
                ),
            ));
            None
        }
    }
}

/// The page size of a list, 1 to 100 (default 20), or 422.
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(20);
    if (1..=100).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::Invalid(vec![error("limit", "must be 1 to 100")]))
    }
}

/// A page of a listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    /// The items, in the listing's order.
    pub data: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// The first `limit` of `items` (fetched `limit + 1` to know whether more follow) and the cursor
/// of the next page.
pub fn page<T>(mut items: Vec<T>, limit: u32, cursor: impl Fn(&T) -> String) -> Json<Page<T>> {
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(cursor)
    } else {
        None
    };
    Json(Page {
        data: items,
        next_cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(body: &str) -> String {
        match object(body.as_bytes(), true) {
            Err(ApiError::BadRequest(detail)) => detail,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn a_field_given_twice_is_refused_at_any_depth() {
        assert_eq!(
            refusal(r#"{"name": "a", "name": "b"}"#),
            "the body is ambiguous: the field \"name\" is given twice at line 1 column 20"
        );
        assert!(
            refusal(r#"{"quota": {"requests": 1, "hard": true, "requests": 2}}"#)
                .contains("\"requests\" is given twice"),
        );
        assert!(refusal(r#"{"rate_limits": [{"a": 1}, {"b": 1, "b": 2}]}"#).contains("\"b\""));
        // Escapes decode first: the same name.
        assert!(refusal(r#"{"name": 1, "n\u0061me": 2}"#).contains("\"name\""));
        let fields = object(
            br#"{"name": "a", "nested": {"name": "b"}, "list": [{"name": 1}, {"name": 2}]}"#,
            true,
        )
        .unwrap();
        // Gateways' usage batches are not checked (written from records, never repeating).
        assert!(object(br#"{"a": 1, "a": 2}"#, false).is_ok());
        assert_eq!(fields.len(), 3);
        assert_eq!(refusal("[1]"), "the body must be a JSON object");
    }
}

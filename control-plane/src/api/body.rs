//! Request bodies: read as JSON objects and checked field by field, so that a 422 lists every
//! invalid field with its path.

use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tollgate_model::FieldError;

use super::error::ApiError;

/// The body as a JSON object, or 400.
pub fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        )),
        Err(error) => Err(ApiError::BadRequest(format!(
            "the body is not valid JSON: {error}"
        ))),
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

/// The page size of a list, 1 to 100 (default 20), or 422.
pub fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(20);
    if (1..=100).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::Invalid(vec![error("limit", "must be 1 to 100")]))
    }
}

/// A page of a listing: the first `limit` of `items` (fetched `limit + 1` to know whether more
/// follow) and the cursor of the next page, `null` on the last one.
pub fn page<T: Serialize>(
    mut items: Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> String,
) -> Json<Value> {
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(cursor)
    } else {
        None
    };
    Json(json!({"data": items, "next_cursor": next_cursor}))
}

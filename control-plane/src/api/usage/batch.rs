//! Reading a usage batch: every event checked field by field into a [`UsageEvent`], every
//! problem reported with its path (`events[3].id`), nothing stored unless all of it is valid.
//!
//! The bounds keep each number representable in the store's `BIGINT` columns and each day's
//! roll-up sums far from overflowing: per event at most 2^32 - 1 units and 2^53 - 1 bytes or
//! microseconds (the largest integers any JSON reader keeps exactly), and `at_ms` up to the
//! last millisecond of year 9999 so that its day prints as `YYYY-MM-DD`.

use serde_json::{Map, Value};
use tollgate_model::FieldError;
use tollgate_model::usage::UsageEvent;

use super::super::body::{error, unknown_fields};
use crate::store::usage::MAX_BATCH;

/// The fields of an event.
pub const EVENT_FIELDS: [&str; 13] = [
    "id",
    "request_id",
    "customer_id",
    "key_id",
    "route",
    "method",
    "status",
    "latency_us",
    "bytes_in",
    "bytes_out",
    "at_ms",
    "units",
    "overage",
];
/// Most billable units one request may count.
pub const MAX_UNITS: u64 = u32::MAX as u64;
/// Most bytes or microseconds one request may report.
pub const MAX_AMOUNT: u64 = (1 << 53) - 1;
/// The last millisecond of 9999-12-31, UTC.
pub const MAX_AT_MS: i64 = 253_402_300_799_999;
/// Longest request id accepted.
pub const MAX_REQUEST_ID: usize = 128;
/// Longest route name accepted.
pub const MAX_ROUTE: usize = 128;
/// Longest method accepted.
pub const MAX_METHOD: usize = 32;

/// The events of a batch body `{"events": [...]}`, or every invalid field.
pub fn events(mut fields: Map<String, Value>) -> Result<Vec<UsageEvent>, Vec<FieldError>> {
    let mut errors = Vec::new();
    unknown_fields(&fields, &["events"], "", &mut errors);
    let items = match fields.remove("events") {
        Some(Value::Array(items)) if (1..=MAX_BATCH).contains(&items.len()) => items,
        Some(Value::Array(items)) => {
            errors.push(error(
                "events",
                &format!("must hold 1 to {MAX_BATCH} events, not {}", items.len()),
            ));
            return Err(errors);
        }
        Some(_) => {
            errors.push(error("events", "must be an array of events"));
            return Err(errors);
        }
        None => {
            errors.push(error("events", "is required"));
            return Err(errors);
        }
    };
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let path = format!("events[{i}]");
        match item {
            Value::Object(fields) => {
                if let Some(event) = event(fields, &path, &mut errors) {
                    events.push(event);
                }
            }
            _ => errors.push(error(&path, "must be an event object")),
        }
    }
    if errors.is_empty() {
        Ok(events)
    } else {
        Err(errors)
    }
}

/// One event at `path`, or `None` with its problems added to `errors`.
fn event(
    mut fields: Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) -> Option<UsageEvent> {
    let before = errors.len();
    unknown_fields(&fields, &EVENT_FIELDS, &format!("{path}."), errors);
    let mut field = |name: &str| (fields.remove(name), format!("{path}.{name}"));
    let (value, at) = field("id");
    let event_id = id(value, &at, "evt", errors);
    let (value, at) = field("request_id");
    let request_id = text(value, &at, MAX_REQUEST_ID, |b| b.is_ascii_graphic(), errors);
    let (value, at) = field("customer_id");
    let customer_id = id(value, &at, "cus", errors);
    let key_id = match field("key_id") {
        (None | Some(Value::Null), _) => Some(None),
        (value, at) => id(value, &at, "key", errors).map(Some),
    };
    let (value, at) = field("route");
    let route = text(value, &at, MAX_ROUTE, |b| b.is_ascii_graphic(), errors);
    let (value, at) = field("method");
    let method = text(value, &at, MAX_METHOD, is_token_byte, errors);
    let (value, at) = field("status");
    let status = number(value, &at, 100, 599, errors).and_then(|s| u16::try_from(s).ok());
    let (value, at) = field("latency_us");
    let latency_us = number(value, &at, 0, MAX_AMOUNT, errors);
    let (value, at) = field("bytes_in");
    let bytes_in = number(value, &at, 0, MAX_AMOUNT, errors);
    let (value, at) = field("bytes_out");
    let bytes_out = number(value, &at, 0, MAX_AMOUNT, errors);
    let (value, at) = field("at_ms");
    let at_ms = number(value, &at, 0, MAX_AT_MS as u64, errors).and_then(|n| i64::try_from(n).ok());
    let (value, at) = field("units");
    let units = number(value, &at, 0, MAX_UNITS, errors);
    let (value, at) = field("overage");
    let overage = match (number(value, &at, 0, MAX_UNITS, errors), units) {
        (Some(overage), Some(units)) if overage > units => {
            errors.push(error(&at, "must not be more than units"));
            None
        }
        (overage, _) => overage,
    };
    if errors.len() > before {
        return None;
    }
    Some(UsageEvent {
        id: event_id?,
        request_id: request_id?,
        customer_id: customer_id?,
        key_id: key_id?,
        route: route?,
        method: method?,
        status: status?,
        latency_us: latency_us?,
        bytes_in: bytes_in?,
        bytes_out: bytes_out?,
        at_ms: at_ms?,
        units: units?,
        overage: overage?,
    })
}

/// `prefix_` and 32 lowercase hex digits, as the store and gateways make ids.
fn id(
    value: Option<Value>,
    path: &str,
    prefix: &str,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match value {
        Some(Value::String(id))
            if id
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('_'))
                .is_some_and(|hex| {
                    hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                }) =>
        {
            Some(id)
        }
        None => required(path, errors),
        Some(_) => {
            errors.push(error(
                path,
                &format!("must be {prefix}_ and 32 lowercase hex digits"),
            ));
            None
        }
    }
}

/// 1 to `max` bytes, each accepted by `allowed`.
fn text(
    value: Option<Value>,
    path: &str,
    max: usize,
    allowed: fn(&u8) -> bool,
    errors: &mut Vec<FieldError>,
) -> Option<String> {
    match value {
        Some(Value::String(text))
            if (1..=max).contains(&text.len()) && text.bytes().all(|b| allowed(&b)) =>
        {
            Some(text)
        }
        None => required(path, errors),
        Some(_) => {
            errors.push(error(
                path,
                &format!("must be 1 to {max} visible ASCII characters"),
            ));
            None
        }
    }
}

/// An integer from `min` to `max`.
fn number(
    value: Option<Value>,
    path: &str,
    min: u64,
    max: u64,
    errors: &mut Vec<FieldError>,
) -> Option<u64> {
    match value.as_ref().map(Value::as_u64) {
        Some(Some(n)) if (min..=max).contains(&n) => Some(n),
        None => required(path, errors),
        Some(_) => {
            errors.push(error(
                path,
                &format!("must be an integer from {min} to {max}"),
            ));
            None
        }
    }
}

fn required<T>(path: &str, errors: &mut Vec<FieldError>) -> Option<T> {
    errors.push(error(path, "is required"));
    None
}

/// A byte of an HTTP token (RFC 9110 `tchar`), what a method is made of.
fn is_token_byte(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good() -> Value {
        json!({
            "id": format!("evt_{}", "0".repeat(32)),
            "request_id": "0192f0c4-e1a3-7f4c-8d2b-6a9e01234567",
            "customer_id": format!("cus_{}", "a".repeat(32)),
            "key_id": null,
            "route": "orders",
            "method": "GET",
            "status": 200,
            "latency_us": 1500,
            "bytes_in": 0,
            "bytes_out": 512,
            "at_ms": 1_796_083_200_000_i64,
            "units": 1,
            "overage": 0
        })
    }

    fn body(events: Vec<Value>) -> Map<String, Value> {
        json!({ "events": events })
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    fn paths(result: Result<Vec<UsageEvent>, Vec<FieldError>>) -> Vec<(String, String)> {
        result
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| (e.path, e.message))
            .collect()
    }

    #[test]
    fn reads_a_valid_event_with_or_without_a_key() {
        let mut keyed = good();
        keyed["key_id"] = json!(format!("key_{}", "f".repeat(32)));
        let mut keyless = good();
        keyless
            .as_object_mut()
            .map(|fields| fields.remove("key_id"));
        let events = events(body(vec![good(), keyed, keyless])).unwrap_or_default();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].key_id, None);
        assert_eq!(events[1].key_id.as_deref().map(str::len), Some(36));
        assert_eq!(events[2].key_id, None);
        assert_eq!(
            (events[0].status, events[0].at_ms, events[0].bytes_out),
            (200, 1_796_083_200_000, 512)
        );
    }

    #[test]
    fn lists_every_bad_field_with_its_path() {
        let mut bad = good();
        bad["id"] = json!(format!("evt_{}", "A".repeat(32)));
        bad["customer_id"] = json!("cus_1");
        bad["key_id"] = json!(7);
        bad["route"] = json!("");
        bad["method"] = json!("GE T");
        bad["status"] = json!(600);
        bad["latency_us"] = json!(-1);
        bad["bytes_in"] = json!(1.5);
        bad["bytes_out"] = json!(MAX_AMOUNT + 1);
        bad["at_ms"] = json!(MAX_AT_MS + 1);
        bad["units"] = json!(2);
        bad["overage"] = json!(3);
        bad["colour"] = json!("red");
        bad.as_object_mut().map(|f| f.remove("request_id"));
        let found = paths(events(body(vec![good(), bad, json!("x")])));
        let expected = [
            ("events[1].colour", "unknown field"),
            ("events[1].id", "must be evt_ and 32 lowercase hex digits"),
            ("events[1].request_id", "is required"),
            (
                "events[1].customer_id",
                "must be cus_ and 32 lowercase hex digits",
            ),
            (
                "events[1].key_id",
                "must be key_ and 32 lowercase hex digits",
            ),
            (
                "events[1].route",
                "must be 1 to 128 visible ASCII characters",
            ),
            (
                "events[1].method",
                "must be 1 to 32 visible ASCII characters",
            ),
            ("events[1].status", "must be an integer from 100 to 599"),
            (
                "events[1].latency_us",
                "must be an integer from 0 to 9007199254740991",
            ),
            (
                "events[1].bytes_in",
                "must be an integer from 0 to 9007199254740991",
            ),
            (
                "events[1].bytes_out",
                "must be an integer from 0 to 9007199254740991",
            ),
            (
                "events[1].at_ms",
                "must be an integer from 0 to 253402300799999",
            ),
            ("events[1].overage", "must not be more than units"),
            ("events[2]", "must be an event object"),
        ];
        let expected: Vec<(String, String)> = expected
            .iter()
            .map(|(p, m)| ((*p).to_owned(), (*m).to_owned()))
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn a_batch_holds_1_to_5000_events() {
        assert_eq!(
            paths(events(body(Vec::new()))),
            vec![(
                "events".to_owned(),
                "must hold 1 to 5000 events, not 0".to_owned()
            )]
        );
        assert_eq!(
            paths(events(body(vec![good(); 5001]))),
            vec![(
                "events".to_owned(),
                "must hold 1 to 5000 events, not 5001".to_owned()
            )]
        );
        assert_eq!(events(body(vec![good(); 5000])).map(|e| e.len()), Ok(5000));
        let no_events = json!({"event": []})
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            paths(events(no_events)),
            vec![
                ("event".to_owned(), "unknown field".to_owned()),
                ("events".to_owned(), "is required".to_owned())
            ]
        );
    }
}

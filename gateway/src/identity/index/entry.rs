//! Ids, and one key or customer as the hot path reads it, made from the control plane's records.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;
use tollgate_model::customer::CustomerStatus;
use tollgate_model::feed::{CustomerRecord, KeyRecord, PeriodMs};

use super::{Id, Scopes};

/// One key as the hot path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// SHA-256 of the key.
    pub hash: [u8; 32],
    /// The key's id.
    pub id: Id,
    /// Its customer's id.
    pub customer: Id,
    /// Unix ms after which it no longer works (`i64::MAX`: never).
    pub expires_at_ms: i64,
    /// Unix ms from which it no longer works: revoked, or the end of a rotation's grace
    /// (`i64::MAX`: not revoked).
    pub revoked_at_ms: i64,
    /// Routes it may call.
    pub scopes: Scopes,
}

/// One customer as the hot path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEntry {
    /// The plan that applies.
    pub plan_id: Arc<str>,
    /// Active or suspended.
    pub status: CustomerStatus,
    /// `cus_…` as the upstream receives it, made once rather than per request.
    pub id_header: HeaderValue,
    /// The plan id as the upstream receives it.
    pub plan_header: HeaderValue,
    /// The subscription's billing period, which the quota counts in.
    pub billing_period: Option<PeriodMs>,
}

/// Why a record of the feed cannot be indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses `prefix_` and 32 hex digits.
pub fn parse_id(prefix: &str, text: &str) -> Option<Id> {
    let digits = text.strip_prefix(prefix)?.strip_prefix('_')?;
    let mut id = [0u8; 16];
    hex::decode_to_slice(digits, &mut id).ok().map(|()| id)
}

/// Formats an id back as `prefix_` and 32 hex digits.
pub fn format_id(prefix: &str, id: &Id) -> String {
    format!("{prefix}_{}", hex::encode(id))
}

/// An id as `prefix_` and 32 hex digits, formatted on the stack: what the request path writes
/// without allocating.
#[derive(Clone, Copy)]
pub struct IdText([u8; 36]);

impl IdText {
    /// `prefix` (three letters, such as `cus`), `_`, and the id in hex.
    pub fn new(prefix: &[u8; 3], id: &Id) -> Self {
        let mut text = [b'_'; 36];
        text[..3].copy_from_slice(prefix);
        // 32 digits for 16 bytes: the slice is always the right size.
        let _ = hex::encode_to_slice(id, &mut text[4..]);
        Self(text)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for IdText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Equal scope sets, shared.
#[derive(Debug, Default)]
pub struct ScopeInterner {
    seen: HashMap<Vec<String>, Arc<[Box<str>]>>,
}

impl ScopeInterner {
    /// The shared form of `scopes`.
    pub fn intern(&mut self, scopes: Option<Vec<String>>) -> Scopes {
        let scopes = scopes?;
        if let Some(shared) = self.seen.get(&scopes) {
            return Some(Arc::clone(shared));
        }
        let shared: Arc<[Box<str>]> = scopes.iter().map(|s| s.as_str().into()).collect();
        self.seen.insert(scopes, Arc::clone(&shared));
        Some(shared)
    }
}

/// A key record of the feed as an entry.
pub fn key_entry(record: &KeyRecord, interner: &mut ScopeInterner) -> Result<KeyEntry, Invalid> {
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(&record.hash, &mut hash).is_err() {
        return Err(Invalid(format!(
            "key {}: hash is not 64 hex digits",
            record.id
        )));
    }
    let id = parse_id("key", &record.id).ok_or_else(|| {
        Invalid(format!(
            "key id {:?} is not key_ and 32 hex digits",
            record.id
        ))
    })?;
    let customer = parse_id("cus", &record.customer_id).ok_or_else(|| {
        Invalid(format!(
            "key {}: customer id {:?} is not cus_ and 32 hex digits",
            record.id, record.customer_id
        ))
    })?;
    Ok(KeyEntry {
        hash,
        id,
        customer,
        expires_at_ms: record.expires_at_ms.unwrap_or(i64::MAX),
        revoked_at_ms: record.revoked_at_ms.unwrap_or(i64::MAX),
        scopes: interner.intern(record.scopes.clone()),
    })
}

/// A customer record of the feed as an entry.
pub fn customer_entry(record: &CustomerRecord) -> Result<(Id, CustomerEntry), Invalid> {
    let id = parse_id("cus", &record.id).ok_or_else(|| {
        Invalid(format!(
            "customer id {:?} is not cus_ and 32 hex digits",
            record.id
        ))
    })?;
    let plan_header = HeaderValue::from_str(&record.plan_id).map_err(|_| {
        Invalid(format!(
            "customer {}: plan id {:?} is not a valid header value",
            record.id, record.plan_id
        ))
    })?;
    Ok((
        id,
        CustomerEntry {
            plan_id: record.plan_id.as_str().into(),
            status: record.status,
            id_header: id_header("cus", &id),
            plan_header,
            billing_period: record.billing_period,
        },
    ))
}

/// `prefix_` and the id's 32 hex digits as a header value, without an intermediate string.
pub fn id_header(prefix: &str, id: &Id) -> HeaderValue {
    let mut text = [0u8; 40];
    let start = prefix.len() + 1;
    text[..prefix.len()].copy_from_slice(prefix.as_bytes());
    text[prefix.len()] = b'_';
    // 32 hex digits always fit after a prefix of up to 7 bytes.
    let _ = hex::encode_to_slice(id, &mut text[start..start + 32]);
    // Letters, digits and '_' only: always a valid header value.
    HeaderValue::from_bytes(&text[..start + 32]).unwrap_or(HeaderValue::from_static(""))
}

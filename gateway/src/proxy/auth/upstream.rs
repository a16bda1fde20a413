//! The upstream's view of an authenticated request: the client's own identity headers and
//! every copy of the key removed, the caller's identity added.

use http::HeaderName;
use http::HeaderValue;
use http::header::AUTHORIZATION;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType, Result};
use tollgate_model::key::{KEY_LEN, KEY_PREFIX, is_well_formed};

use super::{
    IDENTITY_HEADER_NAMES, Source, X_API_KEY, X_CUSTOMER_ID, X_KEY_ID, X_PLAN_ID, X_SUBJECT,
    decoded, decodes_to,
};
use crate::config::Route;
use crate::identity::Caller;
use crate::identity::index::id_header;

/// The upstream's view: the client's identity headers removed; on an authenticated request the
/// credential removed and the caller's identity added.
pub fn rewrite_upstream(
    upstream_request: &mut RequestHeader,
    route: &Route,
    caller: Option<&(Caller, Source)>,
) -> Result<()> {
    // One pass over the names the client sent finds ours, also in the spelling CGI-style
    // upstreams read as ours (`X_Tollgate_Customer_Id`), and on an authenticated request the
    // key's own header; the common case finds none and allocates nothing.
    let authenticated = caller.is_some();
    let doomed: Vec<HeaderName> = upstream_request
        .headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            IDENTITY_HEADER_NAMES
                .iter()
                .any(|ours| same_but_underscores(ours, name))
                || (authenticated && name == X_API_KEY)
        })
        .cloned()
        .collect();
    for name in &doomed {
        upstream_request.remove_header(name);
    }
    let Some((caller, source)) = caller else {
        return Ok(());
    };
    // The credential goes, and so does any other copy of a key in a form not read as one
    // (`Authorization: Token tg_…` beside X-API-Key, `?API_KEY=tg_…`): the customer's key is
    // the gateway's business, never the upstream's.
    if *source == Source::Authorization
        || upstream_request
            .headers
            .get(AUTHORIZATION)
            .is_some_and(|value| authorization_holds_key(value.as_bytes()))
    {
        upstream_request.remove_header(&AUTHORIZATION);
    }
    remove_query_keys(upstream_request, route.auth.key_query_param.as_deref())?;
    upstream_request.insert_header(X_CUSTOMER_ID, caller.customer_header.clone())?;
    upstream_request.insert_header(X_PLAN_ID, caller.plan_header.clone())?;
    if let Some(key) = &caller.key {
        upstream_request.insert_header(X_KEY_ID, id_header("key", key))?;
    }
    if let Some(subject) = &caller.subject
        && let Ok(value) = HeaderValue::from_str(subject)
    {
        upstream_request.insert_header(X_SUBJECT, value)?;
    }
    Ok(())
}

/// Whether `name` is `ours`, or `ours` with `_` for some of its `-`.
pub(super) fn same_but_underscores(ours: &str, name: &str) -> bool {
    ours.len() == name.len()
        && ours
            .bytes()
            .zip(name.bytes())
            .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
}

/// Whether `bytes` hold a well-formed key anywhere (its checksum makes a chance match
/// practically impossible).
pub(super) fn holds_key(bytes: &[u8]) -> bool {
    let prefix = KEY_PREFIX.as_bytes();
    (0..bytes.len().saturating_sub(KEY_LEN - 1)).any(|at| {
        bytes[at..].starts_with(prefix)
            && std::str::from_utf8(&bytes[at..at + KEY_LEN]).is_ok_and(is_well_formed)
    })
}

/// Whether an `Authorization` value holds a well-formed key: as it is (`Token tg_…`), or
/// base64-encoded under the Basic scheme (`curl -u tg_…:`, as some clients send API keys).
pub(super) fn authorization_holds_key(value: &[u8]) -> bool {
    use base64::Engine;
    if holds_key(value) {
        return true;
    }
    let Some((scheme, encoded)) = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().split_once(' '))
    else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    // Whatever an encoder wrote: with or without padding, in the standard alphabet or, when
    // that does not decode, the URL-safe one (a value in both alphabets decodes the same).
    let lenient = base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
    let decode =
        |alphabet| base64::engine::GeneralPurpose::new(alphabet, lenient).decode(encoded.trim());
    decode(&base64::alphabet::STANDARD)
        .or_else(|_| decode(&base64::alphabet::URL_SAFE))
        .is_ok_and(|credentials| holds_key(&credentials))
}

/// Whether a query parameter's value, its `%XX` escapes decoded, is a well-formed key.
pub(super) fn is_key_value(raw: &str) -> bool {
    if raw.len() < KEY_LEN || raw.len() > 3 * KEY_LEN {
        return false;
    }
    is_well_formed(&decoded(raw))
}

/// Removes from the upstream's query the route's key parameter (also spelled with escapes,
/// `api%5Fkey`, which the upstream's framework decodes to the name itself) and any parameter
/// whose value is a key; the query is left as it is when there is none.
pub(super) fn remove_query_keys(
    upstream_request: &mut RequestHeader,
    name: Option<&str>,
) -> Result<()> {
    let Some(query) = upstream_request.uri.query() else {
        return Ok(());
    };
    let doomed = |pair: &str| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        name.is_some_and(|name| decodes_to(key, name)) || is_key_value(value)
    };
    if !query.split('&').any(doomed) {
        return Ok(());
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !doomed(pair)).collect();
    let path = upstream_request.uri.path();
    let rebuilt = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    let uri = rebuilt
        .parse::<http::Uri>()
        .map_err(|e| Error::because(ErrorType::InternalError, "query without the key", e))?;
    upstream_request.set_uri(uri);
    Ok(())
}

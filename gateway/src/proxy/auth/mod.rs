//! Authentication on the request path: the credential (an API key or a JWT) is taken from the
//! request, checked against the identities in memory (never a database), and replaced, for the
//! upstream, by the caller's identity headers.

use std::borrow::Cow;
use std::net::IpAddr;

use http::HeaderValue;
use http::header::AUTHORIZATION;
use pingora::http::RequestHeader;

use super::problem::GatewayProblem;
use crate::config::{Route, RouteAction, RouteAuth};
use crate::identity::{Caller, Refusal, check_jwt, check_key, unix_ms};
use crate::state::Gateway;

/// The API-key header.
pub const X_API_KEY: &str = "x-api-key";
/// The customer's id, for the upstream.
pub const X_CUSTOMER_ID: &str = "x-tollgate-customer-id";
/// The customer's plan id, for the upstream.
pub const X_PLAN_ID: &str = "x-tollgate-plan-id";
/// The id of the key used, for the upstream.
pub const X_KEY_ID: &str = "x-tollgate-key-id";
/// The JWT's `sub`, for the upstream.
pub const X_SUBJECT: &str = "x-tollgate-subject";
/// Identity headers only the gateway may set: a client's own are always removed.
const IDENTITY_HEADER_NAMES: [&str; 4] = [X_CUSTOMER_ID, X_PLAN_ID, X_KEY_ID, X_SUBJECT];

/// A credential as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    /// An API key.
    Key(&'a str),
    /// A JWT.
    Jwt(&'a str),
    /// More than one where the credential is read (two `Authorization` or `X-API-Key` headers,
    /// or the key's query parameter twice): which one counts is ambiguous, so none is checked.
    /// Says what to send instead.
    Repeated(&'static str),
}

/// Where the credential came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `Authorization: Bearer`.
    Authorization,
    /// `X-API-Key`.
    Header,
    /// The route's query parameter.
    Query,
}

/// The credential of a request, as far as the route accepts one: `Authorization: Bearer` (a
/// `tg_` key, else a JWT when the route takes JWTs), then `X-API-Key`, then the route's query
/// parameter. A bearer token that is not a key yields to a key in `X-API-Key` or the query: it
/// is then the upstream's own credential (a user's session token beside the product key),
/// forwarded untouched. Except, on a route that takes JWTs too, a token shaped as a JWT: that
/// is the credential, checked (one the gateway did not verify never reaches the upstream as if
/// it had). A credential sent twice in its place is [`Credential::Repeated`]: a proxy in front
/// may read the other one (RFC 6750's `invalid_request`), and the upstream gets neither.
pub fn credential<'a>(
    req: &'a RequestHeader,
    auth: &RouteAuth,
) -> Option<(Credential<'a>, Source)> {
    let Some(authorization) = single(req, AUTHORIZATION.as_str()) else {
        return Some((
            Credential::Repeated("send one Authorization header, not several"),
            Source::Authorization,
        ));
    };
    let bearer_token = authorization.and_then(|v| v.to_str().ok()).and_then(bearer);
    if let Some(token) = bearer_token
        && auth.key
        && token.starts_with(tollgate_model::key::KEY_PREFIX)
    {
        return Some((Credential::Key(token), Source::Authorization));
    }
    if auth.key
        && !bearer_token.is_some_and(|token| auth.jwt.is_some() && jwt_shaped(token))
        && let Some(found) = elsewhere(req, auth)
    {
        return Some(found);
    }
    let token = bearer_token?;
    let credential = if auth.jwt.is_some() {
        Credential::Jwt(token)
    } else {
        Credential::Key(token)
    };
    Some((credential, Source::Authorization))
}

/// Whether `token` has a JWT's form (JWS compact: three parts separated by dots).
fn jwt_shaped(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2
}

/// What an `X-API-Key` value that is not visible ASCII is taken as: a key no check accepts.
const NOT_A_KEY: &str = "\u{fffd}";

/// The one value of the header `name`, if any; `None` when it is sent more than once.
fn single<'a>(req: &'a RequestHeader, name: &str) -> Option<Option<&'a HeaderValue>> {
    let mut values = req.headers.get_all(name).iter();
    let first = values.next();
    values.next().is_none().then_some(first)
}

/// A key in `X-API-Key`, else in the route's query parameter.
fn elsewhere<'a>(req: &'a RequestHeader, auth: &RouteAuth) -> Option<(Credential<'a>, Source)> {
    let Some(x_api_key) = single(req, X_API_KEY) else {
        return Some((
            Credential::Repeated("send one X-API-Key header, not several"),
            Source::Header,
        ));
    };
    if let Some(key) = x_api_key
        // A value that is not visible ASCII is no key: malformed, not missing.
        .map(|v| v.to_str().unwrap_or(NOT_A_KEY))
        .map(str::trim)
        .filter(|k| !k.is_empty())
    {
        return Some((Credential::Key(key), Source::Header));
    }
    let name = auth.key_query_param.as_deref()?;
    let mut values = query_values(req.uri.query()?, name);
    let key = values.next()?;
    let credential = match values.next() {
        None => Credential::Key(key),
        Some(_) => Credential::Repeated("send the key's query parameter once"),
    };
    Some((credential, Source::Query))
}

fn bearer(value: &str) -> Option<&str> {
    // The usual `Bearer <token>` first, then any spacing and case.
    let token = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => &value[7..],
        _ => {
            let (scheme, token) = value.trim().split_once(' ')?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return None;
            }
            token
        }
    };
    Some(token.trim()).filter(|t| !t.is_empty())
}

/// The values of the parameter `name` (also spelled with escapes, as it is removed upstream).
fn query_values<'a>(query: &'a str, name: &str) -> impl Iterator<Item = &'a str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(move |(key, _)| decodes_to(key, name))
        .map(|(_, value)| value)
}

/// The address failed authentications count against: the peer's, or, when the peer is one of
/// the `trusted` proxies, the right-most address of `X-Forwarded-For` (every line of it, in
/// order) that is not one of them. Entries to its left are the client's own to write, so never
/// taken; an entry that is not an address stops the walk at the last trusted one.
pub fn client_address(
    peer: Option<IpAddr>,
    req: &RequestHeader,
    trusted: &[crate::config::IpBlock],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|block| block.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let lines: Vec<&str> = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    let mut client = peer;
    for entry in lines.iter().rev().flat_map(|line| line.rsplit(',')) {
        let Ok(ip) = entry.trim().parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    Some(client)
}

/// Checks the request's credential for `route`. Failures count against the client address,
/// which is refused (429) before any check once over the limit.
pub fn authenticate(
    gateway: &Gateway,
    req: &RequestHeader,
    route: &Route,
    client: Option<IpAddr>,
) -> Result<(Caller, Source), GatewayProblem> {
    let now = unix_ms();
    if let Some(ip) = client
        && let Some(retry_after) = gateway.failed_auth.blocked(ip, now)
    {
        gateway.metrics.auth_decision("throttled");
        return Err(GatewayProblem::TooManyFailedAuthentications { retry_after });
    }
    let result = gateway.identity.with_current(|identities| {
        // Without identities nothing can be checked, whatever the credential: 503.
        let Some(identities) = identities else {
            return Err(Refusal::Unavailable);
        };
        match credential(req, &route.auth) {
            None => Err(Refusal::Missing(what_to_send(&route.auth))),
            Some((Credential::Key(key), source)) => {
                let now = gateway.identity.control_plane_now_ms(now);
                let key = as_sent(key, source);
                // Scopes name the routes a key may call; its customer's own usage view is
                // readable with any of its keys.
                let scope = match route.action {
                    RouteAction::Usage => None,
                    _ => Some(route.name.as_str()),
                };
                check_key(identities, &key, scope, now).map(|caller| (caller, source))
            }
            Some((Credential::Repeated(what), _)) => Err(Refusal::Repeated(what)),
            Some((Credential::Jwt(token), source)) => {
                // Providers are set up at start; a reload naming a new one needs a restart.
                let name = route.auth.jwt.as_deref();
                match gateway.jwt.iter().find(|v| Some(v.name.as_str()) == name) {
                    Some(verifier) => {
                        check_jwt(identities, verifier, token).map(|caller| (caller, source))
                    }
                    // A provider added by a reload, not set up yet: the gateway's fault, not
                    // the caller's (503, not counted as a failure).
                    None => Err(Refusal::Unavailable),
                }
            }
        }
    });
    match result {
        Ok(found) => {
            gateway.metrics.auth_decision("ok");
            Ok(found)
        }
        Err(refusal) => {
            gateway.metrics.auth_decision(refusal.label());
            if refusal.is_failure()
                && let Some(ip) = client
            {
                gateway.failed_auth.record(ip, now);
            }
            Err(GatewayProblem::Refused(refusal))
        }
    }
}

/// The key `raw` read from `source`: from the query, its `%XX` escapes decoded (`tg%5F…`), as
/// the upstream's framework would decode it.
fn as_sent(raw: &str, source: Source) -> Cow<'_, str> {
    match source {
        Source::Query => decoded(raw),
        Source::Authorization | Source::Header => Cow::Borrowed(raw),
    }
}

/// What a request without a credential `auth` accepts is told to send.
fn what_to_send(auth: &RouteAuth) -> &'static str {
    match (auth.key, auth.jwt.is_some(), auth.key_query_param.is_some()) {
        (true, true, false) => {
            "send an API key as Authorization: Bearer <key> or X-API-Key: <key>, or a JWT as \
             Authorization: Bearer <token>"
        }
        (true, true, true) => {
            "send an API key as Authorization: Bearer <key>, X-API-Key: <key> or in this route's \
             query parameter, or a JWT as Authorization: Bearer <token>"
        }
        (true, false, false) => {
            "send an API key as Authorization: Bearer <key> or X-API-Key: <key>"
        }
        (true, false, true) => {
            "send an API key as Authorization: Bearer <key>, X-API-Key: <key> or in this route's \
             query parameter"
        }
        (false, _, _) => "send a JWT as Authorization: Bearer <token>",
    }
}

/// The bytes of `raw` with its `%XX` escapes decoded (a `%` not followed by two hex digits is
/// kept as it is).
fn unescaped(raw: &str) -> impl Iterator<Item = u8> + '_ {
    let bytes = raw.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        let escaped = match bytes.get(at..at + 3) {
            Some([b'%', high, low]) => {
                let hex = |b: &u8| (*b as char).to_digit(16);
                hex(high).zip(hex(low)).map(|(h, l)| (h * 16 + l) as u8)
            }
            _ => None,
        };
        let (byte, width) = escaped.map_or((*bytes.get(at)?, 1), |byte| (byte, 3));
        at += width;
        Some(byte)
    })
}

/// `raw` with its `%XX` escapes decoded, borrowed when it has none; bytes that are not UTF-8
/// once decoded become U+FFFD, which no key or name holds.
fn decoded(raw: &str) -> Cow<'_, str> {
    if raw.contains('%') {
        Cow::Owned(String::from_utf8_lossy(&unescaped(raw).collect::<Vec<u8>>()).into_owned())
    } else {
        Cow::Borrowed(raw)
    }
}

/// Whether the query parameter name `raw`, its `%XX` escapes decoded, is `name`.
fn decodes_to(raw: &str, name: &str) -> bool {
    unescaped(raw).eq(name.bytes())
}

mod upstream;
pub use upstream::rewrite_upstream;

#[cfg(test)]
mod tests;

//! `[[routes]]`: what each route matches, what it does, who may call it, and routes that
//! overlap.

use std::collections::HashMap;

use http::{Method, StatusCode};

use super::super::cors::{Cors, check_cors};
use super::super::file::{Entry, RouteAuthConfig, RouteConfig, SecurityHeadersConfig};
use super::super::headers::{check_security_headers, header_pairs, resolve_security_headers};
use super::super::{HostMatch, Route, RouteAction, RouteAuth, StaticResponse};
use super::{Errors, check_name};

/// What checking a route needs from the rest of the file.
pub(super) struct RouteContext<'a> {
    /// Declared JWT provider names, in order (`None` where unreadable).
    pub(super) jwt_providers: &'a [Option<&'a str>],
    pub(super) upstreams: &'a HashMap<&'a str, usize>,
    pub(super) declared_upstreams: &'a [Option<&'a str>],
    pub(super) global_headers: &'a SecurityHeadersConfig,
    /// `[cors]`, checked: the policy of routes without their own.
    pub(super) global_cors: Option<&'a Cors>,
    pub(super) default_body_limit: u64,
}

pub(super) fn route(
    file: &RouteConfig,
    path: &str,
    context: &RouteContext<'_>,
    errors: &mut Errors,
) -> Option<Route> {
    let before = errors.0.len();
    check_name(&file.name, &format!("{path}.name"), errors);
    if !file.path_prefix.starts_with('/') {
        errors.push(format!("{path}.path_prefix"), "must start with /");
    } else if file.path_prefix.contains(['?', '#', ' ']) {
        errors.push(
            format!("{path}.path_prefix"),
            "must be a path without ?, # or spaces",
        );
    }
    let host = file
        .host
        .as_deref()
        .and_then(|host| host_match(host, &format!("{path}.host"), errors));
    let methods = file.methods.as_ref().map(|methods| {
        if methods.is_empty() {
            errors.push(
                format!("{path}.methods"),
                "must not be empty (leave it out to allow all)",
            );
        }
        methods
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let upper = m.to_ascii_uppercase();
                match Method::from_bytes(upper.as_bytes()) {
                    Ok(method) if m.chars().all(|c| c.is_ascii_alphabetic()) => Some(method),
                    _ => {
                        errors.push(
                            format!("{path}.methods[{i}]"),
                            format!("invalid method {m:?}"),
                        );
                        None
                    }
                }
            })
            .collect::<Vec<_>>()
    });
    let action = match (&file.upstream, &file.respond) {
        _ if file.usage => {
            if file.upstream.is_some() || file.respond.is_some() {
                errors.push(
                    path,
                    "set one of upstream, respond and usage = true, not several",
                );
            }
            if file.auth == RouteAuthConfig::None {
                errors.push(
                    format!("{path}.usage"),
                    "needs auth: the usage shown is the calling customer's",
                );
            }
            Some(RouteAction::Usage)
        }
        (Some(name), None) => match context.upstreams.get(name.as_str()) {
            Some(index) => Some(RouteAction::Proxy(*index)),
            None => {
                // An upstream that is declared but invalid already has its own errors.
                if !context.declared_upstreams.contains(&Some(name.as_str())) {
                    errors.push(
                        format!("{path}.upstream"),
                        format!("no upstream named {name:?} is defined"),
                    );
                }
                None
            }
        },
        (None, Some(respond)) => {
            let status = StatusCode::from_u16(respond.status)
                .ok()
                .filter(|s| (200..=599).contains(&s.as_u16()));
            if status.is_none() {
                errors.push(
                    format!("{path}.respond.status"),
                    format!("invalid status {}: must be 200 to 599", respond.status),
                );
            }
            let headers =
                header_pairs(&respond.headers, &format!("{path}.respond.headers"), errors);
            status.map(|status| {
                RouteAction::Respond(StaticResponse {
                    status,
                    headers,
                    body: bytes::Bytes::from(respond.body.clone()),
                })
            })
        }
        (Some(_), Some(_)) => {
            errors.push(path, "set either upstream or respond, not both");
            None
        }
        (None, None) => {
            errors.push(
                path,
                "missing upstream, respond or usage = true: a route must proxy or answer",
            );
            None
        }
    };
    if let Some(level) = file.compression_level
        && !(1..=9).contains(&level)
    {
        errors.push(
            format!("{path}.compression_level"),
            format!("{level} is not 1 to 9"),
        );
    }
    let security_headers = match &file.security_headers {
        Some(overrides) => {
            check_security_headers(overrides, &format!("{path}.security_headers"), errors);
            resolve_security_headers(&[context.global_headers, overrides])
        }
        None => resolve_security_headers(&[context.global_headers]),
    };
    let auth = route_auth(file, path, context, errors);
    // From the setting, not from `auth`: a JWT route whose provider is missing has its own error.
    let authenticated = file.auth != RouteAuthConfig::None;
    let metered = match file.metered {
        Some(true) if !authenticated => {
            errors.push(
                format!("{path}.metered"),
                "only authenticated routes are metered: a public call has no customer to count",
            );
            false
        }
        Some(true) if file.usage => {
            errors.push(
                format!("{path}.metered"),
                "a usage view is never metered: reading one's usage is free",
            );
            false
        }
        Some(metered) => metered,
        None => authenticated && !file.usage,
    };
    let cors = match &file.cors {
        Some(own) => check_cors(own, methods.as_deref(), &format!("{path}.cors"), errors),
        None => context
            .global_cors
            .map(|global| global.for_methods(methods.as_deref())),
    };
    if cors.is_some() {
        // The policy is the one source of a route's CORS headers: one set elsewhere could open
        // it to origins the policy does not name.
        let is_cors = |name: &str| name.to_ascii_lowercase().starts_with("access-control-");
        for name in file.respond.iter().flat_map(|r| r.headers.keys()) {
            if is_cors(name) {
                errors.push(
                    format!("{path}.respond.headers.{name}"),
                    "the route's cors policy sets the CORS headers: remove it here",
                );
            }
        }
        for (name, _) in &security_headers.always {
            if is_cors(name.as_str()) {
                errors.push(
                    format!("{path}.cors"),
                    format!(
                        "security_headers.extra sets {name}, which this policy sets: remove it \
                         there"
                    ),
                );
            }
        }
    }
    let action = action?;
    (errors.0.len() == before).then(|| Route {
        name: file.name.clone(),
        host,
        path_prefix: file.path_prefix.clone(),
        methods: methods.filter(|m| !m.is_empty()),
        strip_prefix: file.strip_prefix,
        action,
        compression_level: file.compression_level,
        max_request_body_bytes: file
            .max_request_body_bytes
            .unwrap_or(context.default_body_limit),
        security_headers,
        auth,
        metered,
        cors,
    })
}

fn route_auth(
    file: &RouteConfig,
    path: &str,
    context: &RouteContext<'_>,
    errors: &mut Errors,
) -> RouteAuth {
    let key = matches!(file.auth, RouteAuthConfig::Key | RouteAuthConfig::KeyOrJwt);
    let wants_jwt = matches!(file.auth, RouteAuthConfig::Jwt | RouteAuthConfig::KeyOrJwt);
    if let Some(name) = &file.key_query_param {
        if !key {
            errors.push(
                format!("{path}.key_query_param"),
                "only applies to routes with auth = \"key\" or \"key_or_jwt\"",
            );
        } else if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            errors.push(
                format!("{path}.key_query_param"),
                format!("invalid parameter name {name:?}: use letters, digits, '_' or '-'"),
            );
        }
    }
    let providers = context.jwt_providers;
    let jwt = match (&file.jwt_provider, wants_jwt) {
        (Some(_), false) => {
            errors.push(
                format!("{path}.jwt_provider"),
                "only applies to routes with auth = \"jwt\" or \"key_or_jwt\"",
            );
            None
        }
        (None, false) => None,
        (Some(name), true) => {
            if !providers.contains(&Some(name.as_str())) {
                errors.push(
                    format!("{path}.jwt_provider"),
                    format!("no [[jwt_providers]] entry is named {name:?}"),
                );
            }
            Some(name.clone())
        }
        (None, true) if providers.len() == 1 => providers[0].map(str::to_owned),
        (None, true) if providers.is_empty() => {
            errors.push(
                format!("{path}.auth"),
                "accepting JWTs needs a [[jwt_providers]] entry",
            );
            None
        }
        (None, true) => {
            errors.push(
                format!("{path}.jwt_provider"),
                "several [[jwt_providers]] are defined: name the one this route accepts",
            );
            None
        }
    };
    RouteAuth {
        key,
        jwt,
        key_query_param: file.key_query_param.clone().filter(|_| key),
    }
}

fn host_match(host: &str, path: &str, errors: &mut Errors) -> Option<HostMatch> {
    let lower = host.to_ascii_lowercase();
    let (wildcard, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        errors.push(path, format!("invalid host {host:?}: expected a name like api.example.com or *.example.com, without a port"));
        return None;
    }
    Some(if wildcard {
        HostMatch::Wildcard(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_owned())
    })
}

/// Two routes with the same host and prefix whose methods overlap could never both be reached.
pub(super) fn overlapping_routes(routes: &[Entry<RouteConfig>], errors: &mut Errors) {
    for (i, route) in routes.iter().enumerate() {
        let Some(route) = route.valid() else { continue };
        for (j, earlier) in routes.iter().enumerate().take(i) {
            let Some(earlier) = earlier.valid() else {
                continue;
            };
            let same_host = route.host.as_deref().map(str::to_ascii_lowercase)
                == earlier.host.as_deref().map(str::to_ascii_lowercase);
            let methods_overlap = match (&route.methods, &earlier.methods) {
                (Some(a), Some(b)) => a
                    .iter()
                    .any(|m| b.iter().any(|n| m.eq_ignore_ascii_case(n))),
                _ => true,
            };
            if same_host && route.path_prefix == earlier.path_prefix && methods_overlap {
                errors.push(
                    format!("routes[{i}].path_prefix"),
                    format!(
                        "routes[{j}] ({:?}) already matches this host, prefix and method",
                        earlier.name
                    ),
                );
            }
        }
    }
}

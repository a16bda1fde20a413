//! Semantic checks: from the file types to [`Config`], or every problem with its field path.
//!
//! Every check runs even when others failed, so an operator sees all problems at once; an
//! element that could not be read is skipped without hiding the problems of the others, and a
//! reference to it (by name) is not reported a second time.

mod jwt;
mod redis;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use http::{Method, StatusCode};

use super::file::{
    ControlPlaneConfig, Entry, GatewayConfig, JwtProviderConfig, MeteringConfig, RouteAuthConfig,
    RouteConfig, SecurityHeadersConfig, ServerConfig, UpstreamConfig,
};
use super::headers::{check_security_headers, header_pairs, resolve_security_headers};
use super::{
    AuthSettings, Config, ConfigError, ConfigErrors, ControlPlane, FeedSource, HostMatch, Limits,
    Metering, Route, RouteAction, RouteAuth, ServerSettings, StaticResponse, TlsListener, Upstream,
};

/// Checks a parsed file, adding its problems to those `parse_errors` already found. Relative
/// certificate paths are taken from `base`.
pub fn validate(
    file: GatewayConfig,
    parse_errors: Vec<ConfigError>,
    base: &Path,
) -> Result<Config, ConfigErrors> {
    let mut errors = Errors(parse_errors);
    let server = file
        .server
        .as_ref()
        .and_then(|server| self::server(server, base, &mut errors));
    let upstreams: Vec<Upstream> = file
        .upstreams
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            upstream::upstream(entry.valid()?, &format!("upstreams[{i}]"), &mut errors)
        })
        .collect();
    let declared_upstreams: Vec<Option<&str>> = file.upstreams.iter().map(entry_name).collect();
    unique_names(&declared_upstreams, "upstreams", &mut errors);
    let upstream_index: HashMap<&str, usize> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();

    let global_headers = &file.security_headers;
    check_security_headers(global_headers, "security_headers", &mut errors);
    let default_body_limit = file
        .server
        .as_ref()
        .map_or(DEFAULT_MAX_REQUEST_BODY_BYTES, |s| s.max_request_body_bytes);
    let jwt_providers: Vec<crate::config::JwtProvider> = file
        .jwt_providers
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            jwt::provider(
                entry.valid()?,
                &format!("jwt_providers[{i}]"),
                base,
                &mut errors,
            )
        })
        .collect();
    let declared_providers: Vec<Option<&str>> = file.jwt_providers.iter().map(entry_name).collect();
    unique_names(&declared_providers, "jwt_providers", &mut errors);
    let context = RouteContext {
        jwt_providers: &declared_providers,
        upstreams: &upstream_index,
        declared_upstreams: &declared_upstreams,
        global_headers,
        default_body_limit,
    };
    let control_plane = file
        .control_plane
        .as_ref()
        .and_then(|cp| self::control_plane(cp, base, &mut errors));
    let metering = self::metering(&file.metering, base, &mut errors);
    let redis = file
        .redis
        .as_ref()
        .and_then(|redis| self::redis::redis(redis, base, &mut errors));
    if file.auth.failed_per_minute == 0 {
        errors.push(
            "auth.failed_per_minute",
            "must be at least 1 (failed authentications per client address and minute)",
        );
    }
    let routes: Vec<Route> = file
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            self::route(
                entry.valid()?,
                &format!("routes[{i}]"),
                &context,
                &mut errors,
            )
        })
        .collect();
    for (i, entry) in file.routes.iter().enumerate() {
        if let Some(route) = entry.valid()
            && route.auth != RouteAuthConfig::None
            && file.control_plane.is_none()
        {
            errors.push(
                format!("routes[{i}].auth"),
                "needs a [control_plane] section: the keys come from the control plane",
            );
        }
    }
    let route_names: Vec<Option<&str>> = file.routes.iter().map(entry_name).collect();
    unique_names(&route_names, "routes", &mut errors);
    overlapping_routes(&file.routes, &mut errors);
    check_log_level(&file.log.level, &mut errors);

    match (server, file.server, metering, errors.0.is_empty()) {
        (Some(server), Some(file_server), Some(metering), true) => Ok(Config {
            server,
            log: file.log,
            limits: Limits {
                max_request_headers: file_server.max_request_headers,
                max_request_header_bytes: file_server.max_request_header_bytes,
            },
            upstreams,
            routes,
            security_headers: resolve_security_headers(&[global_headers]),
            control_plane,
            auth: AuthSettings {
                failed_per_minute: file.auth.failed_per_minute,
            },
            jwt_providers,
            metering,
            redis,
        }),
        _ => Err(ConfigErrors(errors.0)),
    }
}

/// Pingora answers requests with more headers than this itself, before any filter runs.
const PINGORA_MAX_HEADERS: usize = 256;
/// Header bytes accepted at most: well under Pingora's own 1 MiB limit on the raw header block.
const MAX_HEADER_BYTES: usize = 512 * 1024;
/// `server.max_request_body_bytes` when `[server]` cannot be read.
const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 10 * 1024 * 1024;

fn entry_name<T: Named>(entry: &Entry<T>) -> Option<&str> {
    match entry {
        Entry::Valid(value) => Some(value.name()),
        Entry::Invalid { name } => name.as_deref(),
    }
}

/// Elements with a `name`.
trait Named {
    fn name(&self) -> &str;
}

impl Named for UpstreamConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for JwtProviderConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Named for RouteConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

/// What checking a route needs from the rest of the file.
struct RouteContext<'a> {
    /// Declared JWT provider names, in order (`None` where unreadable).
    jwt_providers: &'a [Option<&'a str>],
    upstreams: &'a HashMap<&'a str, usize>,
    declared_upstreams: &'a [Option<&'a str>],
    global_headers: &'a SecurityHeadersConfig,
    default_body_limit: u64,
}

/// Problems found so far.
#[derive(Default)]
pub(super) struct Errors(pub(super) Vec<ConfigError>);

impl Errors {
    pub(super) fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(path, message));
    }
}

fn server(file: &ServerConfig, base: &Path, errors: &mut Errors) -> Option<ServerSettings> {
    let before = errors.0.len();
    let listen: Vec<SocketAddr> = match &file.listen {
        super::file::Listen::Many(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, a)| socket_addr(a, &format!("server.listen[{i}]"), errors))
            .collect(),
        other => other
            .addresses()
            .iter()
            .filter_map(|a| socket_addr(a, "server.listen", errors))
            .collect(),
    };
    let mut tls = Vec::new();
    for (i, listener) in file.tls.iter().enumerate() {
        let path = format!("server.tls[{i}]");
        let address = socket_addr(&listener.listen, &format!("{path}.listen"), errors);
        let cert = readable_file(&listener.cert, base, &format!("{path}.cert"), errors);
        let key = readable_file(&listener.key, base, &format!("{path}.key"), errors);
        if let (Some(listen), Some(cert), Some(key)) = (address, cert, key) {
            tls.push(TlsListener {
                listen,
                cert,
                key,
                http2: listener.http2,
            });
        }
    }
    if listen.is_empty() && tls.is_empty() && errors.0.len() == before {
        errors.push(
            "server.listen",
            "no proxy listener: set server.listen or add a [[server.tls]] listener",
        );
    }
    let admin_listen = socket_addr(&file.admin_listen, "server.admin_listen", errors);
    if let Some(admin) = admin_listen {
        let proxies = listen.iter().chain(tls.iter().map(|t| &t.listen));
        if admin.port() != 0 && proxies.clone().any(|p| *p == admin) {
            errors.push(
                "server.admin_listen",
                format!("{admin} is also a proxy listener; the admin listener must be separate"),
            );
        }
    }
    let mut seen = HashMap::new();
    for (i, address) in listen
        .iter()
        .chain(tls.iter().map(|t| &t.listen))
        .enumerate()
    {
        if address.port() != 0 && seen.insert(*address, i).is_some() {
            errors.push("server.listen", format!("{address} is listed twice"));
        }
    }
    if file.threads == Some(0) {
        errors.push("server.threads", "must be at least 1");
    }
    if !(1..=PINGORA_MAX_HEADERS).contains(&file.max_request_headers) {
        errors.push(
            "server.max_request_headers",
            format!("must be 1 to {PINGORA_MAX_HEADERS}"),
        );
    }
    if !(1024..=MAX_HEADER_BYTES).contains(&file.max_request_header_bytes) {
        errors.push(
            "server.max_request_header_bytes",
            format!("must be 1024 to {MAX_HEADER_BYTES}"),
        );
    }
    let upstream_ca_file = file
        .upstream_ca_file
        .as_deref()
        .and_then(|name| readable_file(name, base, "server.upstream_ca_file", errors));
    let threads = file.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    (errors.0.len() == before).then(|| ServerSettings {
        listen,
        tls,
        admin_listen: admin_listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        threads,
        grace_period: file.grace_period,
        upstream_keepalive_pool_size: file.upstream_keepalive_pool_size,
        watch_config: file.watch_config,
        upstream_ca_file,
    })
}

fn socket_addr(text: &str, path: &str, errors: &mut Errors) -> Option<SocketAddr> {
    match text.parse::<SocketAddr>() {
        Ok(address) => Some(address),
        Err(_) => {
            errors.push(
                path,
                format!(
                    "invalid address {text:?}: expected an IP and a port, like \"127.0.0.1:8080\""
                ),
            );
            None
        }
    }
}

pub(super) fn readable_file(
    name: &str,
    base: &Path,
    path: &str,
    errors: &mut Errors,
) -> Option<std::path::PathBuf> {
    let full = base.join(name);
    match std::fs::metadata(&full) {
        Ok(meta) if meta.is_file() => Some(full),
        Ok(_) => {
            errors.push(path, format!("{} is not a file", full.display()));
            None
        }
        Err(error) => {
            errors.push(path, format!("cannot read {}: {error}", full.display()));
            None
        }
    }
}

fn route(
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

/// Default store of the embedded control plane, next to the config file.
const EMBEDDED_DATABASE: &str = "sqlite://tollgate.db?mode=rwc";

/// Largest batch the control plane takes.
const MAX_BATCH: usize = tollgate_control_plane::store::usage::MAX_BATCH;

fn metering(file: &MeteringConfig, base: &Path, errors: &mut Errors) -> Option<Metering> {
    let before = errors.0.len();
    if file.spool_dir.is_empty() {
        errors.push("metering.spool_dir", "must name a directory");
    }
    if file.spool_max_bytes < 1 << 20 {
        errors.push(
            "metering.spool_max_bytes",
            "must be at least 1048576 (1 MiB)",
        );
    }
    if file.flush_interval < std::time::Duration::from_millis(100)
        || file.flush_interval > std::time::Duration::from_secs(60)
    {
        errors.push("metering.flush_interval", "must be between 100ms and 60s");
    }
    if let Some(size) = file.batch_size
        && !(1..=MAX_BATCH).contains(&size)
    {
        errors.push(
            "metering.batch_size",
            format!("must be between 1 and {MAX_BATCH}"),
        );
    }
    (errors.0.len() == before).then(|| Metering {
        refund_upstream_5xx: file.refund_upstream_5xx,
        spool_dir: base.join(&file.spool_dir),
        spool_max_bytes: file.spool_max_bytes,
        flush_interval: file.flush_interval,
        batch_size: file.batch_size,
    })
}

fn control_plane(
    file: &ControlPlaneConfig,
    base: &Path,
    errors: &mut Errors,
) -> Option<ControlPlane> {
    let source = match (file.embedded, &file.url) {
        (true, None) => {
            let url = file.database_url.as_deref().unwrap_or(EMBEDDED_DATABASE);
            if let Some(rest) = url.strip_prefix("sqlite://") {
                let relative = !rest.starts_with('/') && !rest.starts_with(":memory:");
                Some(FeedSource::Embedded {
                    database_url: if relative {
                        format!("sqlite://{}", base.join(rest).display())
                    } else {
                        url.to_owned()
                    },
                })
            } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Some(FeedSource::Embedded {
                    database_url: url.to_owned(),
                })
            } else {
                errors.push(
                    "control_plane.database_url",
                    format!("{url:?} is neither sqlite://… nor postgres://…"),
                );
                None
            }
        }
        (false, Some(url)) => {
            if file.database_url.is_some() {
                errors.push(
                    "control_plane.database_url",
                    "only applies with embedded = true (a separate control plane has its own)",
                );
            }
            let valid = (url.starts_with("http://") || url.starts_with("https://"))
                && url
                    .parse::<http::Uri>()
                    .is_ok_and(|uri| uri.host().is_some() && uri.query().is_none());
            if !valid {
                errors.push(
                    "control_plane.url",
                    format!("invalid URL {url:?}: expected http://host:port"),
                );
            }
            if file.token_env.is_empty() {
                errors.push(
                    "control_plane.token_env",
                    "must name the environment variable holding the gateway token",
                );
            }
            valid.then(|| FeedSource::Remote {
                url: url.trim_end_matches('/').to_owned(),
                token_env: file.token_env.clone(),
            })
        }
        (true, Some(_)) => {
            errors.push(
                "control_plane",
                "set either embedded = true or url, not both",
            );
            None
        }
        (false, None) => {
            errors.push(
                "control_plane",
                "set embedded = true (run it in this process) or url (follow a separate one)",
            );
            None
        }
    };
    if file.snapshot_file.is_empty() {
        errors.push("control_plane.snapshot_file", "must not be empty");
        return None;
    }
    Some(ControlPlane {
        source: source?,
        snapshot_file: base.join(&file.snapshot_file),
    })
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

pub(super) fn check_name(name: &str, path: &str, errors: &mut Errors) {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !valid {
        errors.push(
            path,
            format!("invalid name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"),
        );
    }
}

fn unique_names(names: &[Option<&str>], section: &str, errors: &mut Errors) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let Some(name) = name else { continue };
        if let Some(first) = seen.insert(name, i) {
            errors.push(
                format!("{section}[{i}].name"),
                format!("duplicate name {name:?} (also {section}[{first}])"),
            );
        }
    }
}

/// Two routes with the same host and prefix whose methods overlap could never both be reached.
fn overlapping_routes(routes: &[Entry<RouteConfig>], errors: &mut Errors) {
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

fn check_log_level(level: &str, errors: &mut Errors) {
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        errors.push(
            "log.level",
            format!("invalid filter {level:?}: expected e.g. \"info\" or \"info,pingora=warn\""),
        );
    }
}

#[cfg(test)]
mod tests;

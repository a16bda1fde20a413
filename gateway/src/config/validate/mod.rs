//! Semantic checks: from the file types to [`Config`], or every problem with its field path.
//!
//! Every check runs even when others failed, so an operator sees all problems at once; an
//! element that could not be read is skipped without hiding the problems of the others, and a
//! reference to it (by name) is not reported a second time.
//!
//! # Layout
//! - here: the whole file, `[server]`, names, and what the sections share.
//! - `route`: `[[routes]]`, and routes that overlap.
//! - `upstream`: `[[upstreams]]`.
//! - `jwt`: `[[jwt_providers]]`.
//! - `redis`: `[redis]`.
//! - `control_plane`: `[metering]` and `[control_plane]`.

mod control_plane;
mod jwt;
mod redis;
mod route;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use super::file::{
    Entry, GatewayConfig, JwtProviderConfig, RouteAuthConfig, RouteConfig, ServerConfig,
    UpstreamConfig,
};
use super::headers::{check_security_headers, resolve_security_headers};
use super::{
    AuthSettings, Config, ConfigError, ConfigErrors, Limits, Route, ServerSettings, TlsListener,
    Upstream,
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
    let global_cors = file
        .cors
        .as_ref()
        .and_then(|cors| super::cors::check_cors(cors, None, "cors", &mut errors));
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
    let context = route::RouteContext {
        jwt_providers: &declared_providers,
        upstreams: &upstream_index,
        declared_upstreams: &declared_upstreams,
        global_headers,
        global_cors: global_cors.as_ref(),
        default_body_limit,
    };
    let control_plane = file
        .control_plane
        .as_ref()
        .and_then(|cp| control_plane::control_plane(cp, base, &mut errors));
    let metering = control_plane::metering(&file.metering, base, &mut errors);
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
    let mut trusted_proxies = Vec::new();
    for (i, text) in file.auth.trusted_proxies.iter().enumerate() {
        match crate::config::IpBlock::parse(text) {
            Some(block) => trusted_proxies.push(block),
            None => errors.push(
                format!("auth.trusted_proxies[{i}]"),
                format!(
                    "{text:?} is not an IP address or a CIDR block such as 10.0.0.0/8 or \
                     2001:db8::/32"
                ),
            ),
        }
    }
    let routes: Vec<Route> = file
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, entry)| {
            route::route(
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
    route::overlapping_routes(&file.routes, &mut errors);
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
                trusted_proxies,
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

/// Checks that `name` (at `path`) names an environment variable a shell can set: a letter or
/// `_`, then letters, digits and `_`. Whether it is set is checked at start: `--validate` may run
/// where the gateway's secrets are not.
pub(super) fn check_variable_name(name: &str, path: &str, errors: &mut Errors) -> bool {
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        errors.push(
            path,
            format!(
                "{name:?} is not an environment variable's name: a letter or '_', then letters, \
                 digits and '_'"
            ),
        );
    }
    valid
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

//! Semantic checks: from the file types to [`Config`], or every problem with its field path.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::file::{
    GatewayConfig, HealthCheckConfig, RouteConfig, SecurityHeadersConfig, ServerConfig,
    UpstreamConfig,
};
use super::{
    Config, ConfigError, ConfigErrors, HealthCheck, HostMatch, Limits, PassiveHealth, Route,
    RouteAction, SecurityHeaders, ServerSettings, StaticResponse, Target, Timeouts, TlsListener,
    Upstream,
};

const DEFAULT_HSTS: &str = "max-age=31536000; includeSubDomains";
const DEFAULT_CONTENT_TYPE_OPTIONS: &str = "nosniff";
const DEFAULT_FRAME_OPTIONS: &str = "DENY";
const DEFAULT_REFERRER_POLICY: &str = "no-referrer";
const DEFAULT_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Checks a parsed file. Relative certificate paths are taken from `base`.
pub fn validate(file: GatewayConfig, base: &Path) -> Result<Config, ConfigErrors> {
    let mut errors = Errors::default();
    let server = server(&file.server, base, &mut errors);
    let upstreams: Vec<Upstream> = file
        .upstreams
        .iter()
        .enumerate()
        .filter_map(|(i, upstream)| {
            self::upstream(upstream, &format!("upstreams[{i}]"), &mut errors)
        })
        .collect();
    unique_names(
        file.upstreams.iter().map(|u| u.name.as_str()),
        "upstreams",
        &mut errors,
    );
    let upstream_index: HashMap<&str, usize> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.as_str(), i))
        .collect();

    let global_headers = &file.security_headers;
    check_security_headers(global_headers, "security_headers", &mut errors);
    let routes: Vec<Route> = file
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, route)| {
            self::route(
                route,
                &format!("routes[{i}]"),
                &upstream_index,
                file.upstreams.iter().map(|u| u.name.as_str()).collect(),
                global_headers,
                file.server.max_request_body_bytes,
                &mut errors,
            )
        })
        .collect();
    unique_names(
        file.routes.iter().map(|r| r.name.as_str()),
        "routes",
        &mut errors,
    );
    overlapping_routes(&file.routes, &mut errors);
    check_log_level(&file.log.level, &mut errors);

    match (server, errors.0.is_empty()) {
        (Some(server), true) => Ok(Config {
            server,
            log: file.log,
            limits: Limits {
                max_request_headers: file.server.max_request_headers,
                max_request_header_bytes: file.server.max_request_header_bytes,
            },
            upstreams,
            routes,
            security_headers: resolve_security_headers(&[global_headers]),
        }),
        _ => Err(ConfigErrors(errors.0)),
    }
}

#[derive(Default)]
struct Errors(Vec<ConfigError>);

impl Errors {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
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
    if file.max_request_headers == 0 {
        errors.push("server.max_request_headers", "must be at least 1");
    }
    if file.max_request_header_bytes < 1024 {
        errors.push("server.max_request_header_bytes", "must be at least 1024");
    }
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

fn readable_file(
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

fn upstream(file: &UpstreamConfig, path: &str, errors: &mut Errors) -> Option<Upstream> {
    let before = errors.0.len();
    check_name(&file.name, &format!("{path}.name"), errors);
    if file.targets.is_empty() {
        errors.push(format!("{path}.targets"), "must list at least one target");
    }
    let mut targets: Vec<Target> = Vec::new();
    for (i, text) in file.targets.iter().enumerate() {
        let target_path = format!("{path}.targets[{i}]");
        if let Some(target) = target(text, &target_path, errors) {
            if targets.iter().any(|t| t.address == target.address) {
                errors.push(
                    target_path,
                    format!(
                        "{text:?} resolves to {} like an earlier target",
                        target.address
                    ),
                );
            } else {
                targets.push(target);
            }
        }
    }
    let host_header = file
        .host_header
        .as_deref()
        .and_then(|host| header_value(host, &format!("{path}.host_header"), errors));
    for (field, value) in [
        ("connect_timeout", file.connect_timeout),
        ("read_timeout", file.read_timeout),
        ("write_timeout", file.write_timeout),
        ("idle_timeout", file.idle_timeout),
    ] {
        if value.is_zero() {
            errors.push(format!("{path}.{field}"), "must be longer than zero");
        }
    }
    if file.request_timeout.is_some_and(|t| t.is_zero()) {
        errors.push(
            format!("{path}.request_timeout"),
            "must be longer than zero",
        );
    }
    if file.passive.fail_timeout.is_zero() && file.passive.max_fails > 0 {
        errors.push(
            format!("{path}.passive.fail_timeout"),
            "must be longer than zero",
        );
    }
    let health_check = file
        .health_check
        .as_ref()
        .and_then(|check| health_check(check, &format!("{path}.health_check"), errors));
    (errors.0.len() == before).then(|| Upstream {
        name: file.name.clone(),
        targets,
        tls: file.tls,
        sni: file.sni.clone(),
        host_header,
        timeouts: Timeouts {
            connect: file.connect_timeout,
            read: file.read_timeout,
            write: file.write_timeout,
            request: file.request_timeout,
            idle: file.idle_timeout,
        },
        connect_retries: file.connect_retries,
        health_check,
        passive: PassiveHealth {
            max_fails: file.passive.max_fails,
            fail_timeout: file.passive.fail_timeout,
        },
    })
}

/// Parses `host:port` (IPv6 in brackets) and resolves the host once, now.
fn target(text: &str, path: &str, errors: &mut Errors) -> Option<Target> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Some(Target {
            name: text.to_owned(),
            address,
            host: address.ip().to_string(),
        });
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        errors.push(
            path,
            format!("invalid target {text:?}: expected \"host:port\""),
        );
        return None;
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        errors.push(
            path,
            format!("invalid target {text:?}: expected \"host:port\""),
        );
        return None;
    }
    match text.to_socket_addrs().map(|mut found| found.next()) {
        Ok(Some(address)) => Some(Target {
            name: text.to_owned(),
            address,
            host: host.trim_matches(['[', ']']).to_owned(),
        }),
        Ok(None) | Err(_) => {
            errors.push(path, format!("cannot resolve {host:?}"));
            None
        }
    }
}

fn health_check(file: &HealthCheckConfig, path: &str, errors: &mut Errors) -> Option<HealthCheck> {
    let before = errors.0.len();
    if !file.path.starts_with('/') || file.path.contains(char::is_whitespace) {
        errors.push(
            format!("{path}.path"),
            "must start with / and contain no spaces",
        );
    }
    if file.interval.is_zero() {
        errors.push(format!("{path}.interval"), "must be longer than zero");
    }
    if file.timeout.is_zero() {
        errors.push(format!("{path}.timeout"), "must be longer than zero");
    }
    if file.healthy_threshold == 0 {
        errors.push(format!("{path}.healthy_threshold"), "must be at least 1");
    }
    if file.unhealthy_threshold == 0 {
        errors.push(format!("{path}.unhealthy_threshold"), "must be at least 1");
    }
    (errors.0.len() == before).then(|| HealthCheck {
        path: file.path.clone(),
        interval: file.interval,
        timeout: file.timeout,
        healthy_threshold: file.healthy_threshold,
        unhealthy_threshold: file.unhealthy_threshold,
        host: file.host.clone(),
    })
}

fn route(
    file: &RouteConfig,
    path: &str,
    upstreams: &HashMap<&str, usize>,
    declared_upstreams: Vec<&str>,
    global_headers: &SecurityHeadersConfig,
    default_body_limit: u64,
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
        (Some(name), None) => match upstreams.get(name.as_str()) {
            Some(index) => Some(RouteAction::Proxy(*index)),
            None => {
                // An upstream that is declared but invalid already has its own errors.
                if !declared_upstreams.contains(&name.as_str()) {
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
                "missing upstream or respond: a route must proxy or answer",
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
            resolve_security_headers(&[global_headers, overrides])
        }
        None => resolve_security_headers(&[global_headers]),
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
        max_request_body_bytes: file.max_request_body_bytes.unwrap_or(default_body_limit),
        security_headers,
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

fn check_name(name: &str, path: &str, errors: &mut Errors) {
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

fn unique_names<'a>(names: impl Iterator<Item = &'a str>, section: &str, errors: &mut Errors) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, name) in names.enumerate() {
        if let Some(first) = seen.insert(name, i) {
            errors.push(
                format!("{section}[{i}].name"),
                format!("duplicate name {name:?} (also {section}[{first}])"),
            );
        }
    }
}

/// Two routes with the same host and prefix whose methods overlap could never both be reached.
fn overlapping_routes(routes: &[RouteConfig], errors: &mut Errors) {
    for (i, route) in routes.iter().enumerate() {
        for (j, earlier) in routes.iter().enumerate().take(i) {
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

fn check_security_headers(file: &SecurityHeadersConfig, path: &str, errors: &mut Errors) {
    for (field, value) in [
        ("strict_transport_security", &file.strict_transport_security),
        ("content_type_options", &file.content_type_options),
        ("frame_options", &file.frame_options),
        ("referrer_policy", &file.referrer_policy),
        ("content_security_policy", &file.content_security_policy),
    ] {
        if let Some(value) = value {
            header_value(value, &format!("{path}.{field}"), errors);
        }
    }
    header_pairs(&file.extra, &format!("{path}.extra"), errors);
}

/// Later layers override earlier ones, field by field; an empty value removes the header.
fn resolve_security_headers(layers: &[&SecurityHeadersConfig]) -> SecurityHeaders {
    let pick = |get: fn(&SecurityHeadersConfig) -> &Option<String>, default: &str| {
        let value = layers
            .iter()
            .rev()
            .find_map(|layer| get(layer).clone())
            .unwrap_or_else(|| default.to_owned());
        (!value.is_empty())
            .then(|| HeaderValue::from_str(&value).ok())
            .flatten()
    };
    let enabled = layers
        .iter()
        .rev()
        .find_map(|layer| layer.enabled)
        .unwrap_or(true);
    if !enabled {
        return SecurityHeaders::default();
    }
    let mut always = Vec::new();
    for (name, value) in [
        (
            "x-content-type-options",
            pick(|l| &l.content_type_options, DEFAULT_CONTENT_TYPE_OPTIONS),
        ),
        (
            "x-frame-options",
            pick(|l| &l.frame_options, DEFAULT_FRAME_OPTIONS),
        ),
        (
            "referrer-policy",
            pick(|l| &l.referrer_policy, DEFAULT_REFERRER_POLICY),
        ),
    ] {
        if let Some(value) = value {
            always.push((HeaderName::from_static(name), value));
        }
    }
    let mut extra: BTreeMap<String, String> = BTreeMap::new();
    for layer in layers {
        for (name, value) in &layer.extra {
            extra.insert(name.to_ascii_lowercase(), value.clone());
        }
    }
    for (name, value) in extra {
        if value.is_empty() {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            always.push((name, value));
        }
    }
    SecurityHeaders {
        always,
        hsts: pick(|l| &l.strict_transport_security, DEFAULT_HSTS),
        csp: pick(|l| &l.content_security_policy, DEFAULT_CSP),
    }
}

fn header_value(value: &str, path: &str, errors: &mut Errors) -> Option<HeaderValue> {
    match HeaderValue::from_str(value) {
        Ok(value) => Some(value),
        Err(_) => {
            errors.push(path, format!("invalid header value {value:?}"));
            None
        }
    }
}

fn header_pairs(
    map: &BTreeMap<String, String>,
    path: &str,
    errors: &mut Errors,
) -> Vec<(HeaderName, HeaderValue)> {
    map.iter()
        .filter_map(|(name, value)| {
            let header_path = format!("{path}.{name}");
            let parsed_name = match HeaderName::from_bytes(name.as_bytes()) {
                Ok(parsed) => Some(parsed),
                Err(_) => {
                    errors.push(&header_path, format!("invalid header name {name:?}"));
                    None
                }
            };
            let parsed_value = header_value(value, &header_path, errors);
            parsed_name.zip(parsed_value)
        })
        .collect()
}

fn check_log_level(level: &str, errors: &mut Errors) {
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        errors.push(
            "log.level",
            format!("invalid filter {level:?}: expected e.g. \"info\" or \"info,pingora=warn\""),
        );
    }
}

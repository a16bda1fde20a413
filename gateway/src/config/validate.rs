//! Semantic checks: from the file types to [`Config`], or every problem with its field path.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use http::{Method, StatusCode};

use super::file::{
    GatewayConfig, HealthCheckConfig, RouteConfig, SecurityHeadersConfig, ServerConfig,
    UpstreamConfig,
};
use super::headers::{
    check_security_headers, header_pairs, header_value, resolve_security_headers,
};
use super::{
    Config, ConfigError, ConfigErrors, HealthCheck, HostMatch, Limits, PassiveHealth, Route,
    RouteAction, ServerSettings, StaticResponse, Target, Timeouts, TlsListener, Upstream,
};

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

fn check_log_level(level: &str, errors: &mut Errors) {
    if tracing_subscriber::EnvFilter::try_new(level).is_err() {
        errors.push(
            "log.level",
            format!("invalid filter {level:?}: expected e.g. \"info\" or \"info,pingora=warn\""),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse;

    fn problems(text: &str) -> Vec<String> {
        let file = parse(text).expect("typed parse");
        validate(file, Path::new("."))
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const SERVER: &str =
        "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n";

    #[test]
    fn the_admin_listener_cannot_be_a_proxy_listener() {
        let errors =
            problems("[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n");
        assert_eq!(
            errors,
            vec![
                "server.admin_listen: 127.0.0.1:8080 is also a proxy listener; the admin listener must be separate"
            ]
        );
    }

    #[test]
    fn a_gateway_needs_a_proxy_listener() {
        let errors = problems("[server]\nadmin_listen = \"127.0.0.1:9090\"\n");
        assert_eq!(
            errors,
            vec![
                "server.listen: no proxy listener: set server.listen or add a [[server.tls]] listener"
            ]
        );
    }

    #[test]
    fn routes_that_can_never_be_reached_are_refused() {
        let errors = problems(&format!(
            "{SERVER}
[[routes]]
name = \"a\"
path_prefix = \"/x\"
methods = [\"GET\", \"POST\"]
respond = {{ body = \"a\" }}
[[routes]]
name = \"b\"
path_prefix = \"/x\"
methods = [\"post\"]
respond = {{ body = \"b\" }}
[[routes]]
name = \"c\"
path_prefix = \"/x\"
methods = [\"DELETE\"]
respond = {{ body = \"c\" }}
"
        ));
        assert_eq!(
            errors,
            vec![
                "routes[1].path_prefix: routes[0] (\"a\") already matches this host, prefix and method"
            ]
        );
    }

    #[test]
    fn route_fields_are_checked_one_by_one() {
        let errors = problems(&format!(
            "{SERVER}
[[routes]]
name = \"bad name!\"
path_prefix = \"/x?y\"
host = \"api.example.com:443\"
methods = [\"GET\", \"G E T\"]
compression_level = 12
respond = {{ status = 200, headers = {{ \"x-ok\" = \"1\", \"bad header\" = \"2\" }} }}
[[routes]]
name = \"neither\"
path_prefix = \"/n\"
"
        ));
        assert_eq!(
            errors,
            vec![
                "routes[0].name: invalid name \"bad name!\": use 1 to 64 letters, digits, '-', '_' or '.'",
                "routes[0].path_prefix: must be a path without ?, # or spaces",
                "routes[0].host: invalid host \"api.example.com:443\": expected a name like api.example.com or *.example.com, without a port",
                "routes[0].methods[1]: invalid method \"G E T\"",
                "routes[0].respond.headers.bad header: invalid header name \"bad header\"",
                "routes[0].compression_level: 12 is not 1 to 9",
                "routes[1]: missing upstream or respond: a route must proxy or answer",
            ]
        );
    }

    #[test]
    fn upstream_fields_are_checked_one_by_one() {
        let errors = problems(&format!(
            "{SERVER}
[[upstreams]]
name = \"u\"
targets = [\"127.0.0.1:1\", \"127.0.0.1:1\", \"no-port\", \"nonexistent.invalid:80\"]
connect_timeout = \"0s\"
[upstreams.health_check]
path = \"health\"
healthy_threshold = 0
[[upstreams]]
name = \"empty\"
targets = []
"
        ));
        assert_eq!(
            errors,
            vec![
                "upstreams[0].targets[1]: \"127.0.0.1:1\" resolves to 127.0.0.1:1 like an earlier target",
                "upstreams[0].targets[2]: invalid target \"no-port\": expected \"host:port\"",
                "upstreams[0].targets[3]: cannot resolve \"nonexistent.invalid\"",
                "upstreams[0].connect_timeout: must be longer than zero",
                "upstreams[0].health_check.path: must start with / and contain no spaces",
                "upstreams[0].health_check.healthy_threshold: must be at least 1",
                "upstreams[1].targets: must list at least one target",
            ]
        );
    }

    #[test]
    fn a_route_to_an_invalid_upstream_is_not_reported_twice() {
        let errors = problems(&format!(
            "{SERVER}
[[upstreams]]
name = \"u\"
targets = []
[[routes]]
name = \"r\"
path_prefix = \"/\"
upstream = \"u\"
"
        ));
        assert_eq!(
            errors,
            vec!["upstreams[0].targets: must list at least one target"]
        );
    }

    #[test]
    fn tls_files_must_exist() {
        let errors = problems(
            "[server]
admin_listen = \"127.0.0.1:9090\"
[[server.tls]]
listen = \"127.0.0.1:8443\"
cert = \"missing.crt\"
key = \"missing.key\"
",
        );
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("server.tls[0].cert: cannot read ./missing.crt"));
        assert!(errors[1].starts_with("server.tls[0].key: cannot read ./missing.key"));
    }

    #[test]
    fn a_valid_file_becomes_checked_types() {
        let file = parse(&format!(
            "{SERVER}
[[upstreams]]
name = \"u\"
targets = [\"127.0.0.1:8000\", \"localhost:8001\"]
request_timeout = \"2s\"
[[routes]]
name = \"r\"
path_prefix = \"/r\"
host = \"*.Example.com\"
methods = [\"get\"]
upstream = \"u\"
"
        ))
        .unwrap();
        let config = validate(file, Path::new(".")).unwrap();
        assert_eq!(
            config.server.listen,
            vec!["127.0.0.1:8080".parse().unwrap()]
        );
        let upstream = &config.upstreams[0];
        assert_eq!(upstream.targets[1].host, "localhost");
        assert_eq!(
            upstream.timeouts.request,
            Some(std::time::Duration::from_secs(2))
        );
        let route = &config.routes[0];
        assert_eq!(route.host, Some(HostMatch::Wildcard(".example.com".into())));
        assert_eq!(route.methods, Some(vec![Method::GET]));
        assert!(matches!(route.action, RouteAction::Proxy(0)));
        assert_eq!(route.max_request_body_bytes, 10 * 1024 * 1024);
    }
}

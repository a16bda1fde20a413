//! Semantic checks, one behaviour per test, with the exact messages operators see.
use http::Method;

use super::super::{FeedSource, HostMatch, RouteAction};
use super::*;
use crate::config::load::parse;
use std::path::Path;

fn problems(text: &str) -> Vec<String> {
    let (file, parse_errors) = parse(text).expect("TOML syntax");
    validate(file, parse_errors, Path::new("."))
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect()
}

const SERVER: &str = "[server]\nlisten = \"127.0.0.1:8080\"\nadmin_listen = \"127.0.0.1:9090\"\n";

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
            "routes[1]: missing upstream, respond or usage = true: a route must proxy or answer",
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
    let (file, parse_errors) = parse(&format!(
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
    assert!(parse_errors.is_empty());
    let config = validate(file, parse_errors, Path::new(".")).unwrap();
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

#[test]
fn parse_and_semantic_problems_are_reported_together() {
    let errors = problems(
        "[server]
listen = \"127.0.0.1:8080\"
admin_listen = \"127.0.0.1:9090\"
colour = 1
[[upstreams]]
name = \"u\"
targets = [\"127.0.0.1:1\"]
timeout = \"1s\"
[[routes]]
name = \"a\"
path_prefix = \"/a\"
upstream = \"u\"
[[routes]]
name = \"a\"
path_prefix = \"/b\"
upstream = \"missing\"
",
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert_eq!(
        errors,
        [
            "server.colour: unknown key",
            "upstreams[0].timeout: unknown key",
            "routes[1].upstream: no upstream named \"missing\" is defined",
            "routes[1].name: duplicate name \"a\" (also routes[0])",
        ]
    );
}

#[test]
fn header_limits_stay_within_what_pingora_accepts() {
    let errors = problems(
        "[server]
listen = \"127.0.0.1:8080\"
admin_listen = \"127.0.0.1:9090\"
max_request_headers = 300
max_request_header_bytes = 2000000
",
    );
    assert_eq!(
        errors,
        vec![
            "server.max_request_headers: must be 1 to 256",
            "server.max_request_header_bytes: must be 1024 to 524288",
        ]
    );
}

#[test]
fn a_route_to_an_unreadable_upstream_is_not_reported_twice() {
    let errors = problems(
        "[server]
listen = \"127.0.0.1:8080\"
admin_listen = \"127.0.0.1:9090\"
[[upstreams]]
name = \"u\"
targets = \"127.0.0.1:1\"
[[routes]]
name = \"r\"
path_prefix = \"/\"
upstream = \"u\"
",
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("upstreams[0].targets: invalid type: string"),
        "{errors:?}"
    );
}

fn config(text: &str) -> Config {
    let (file, parse_errors) = parse(text).expect("TOML syntax");
    validate(file, parse_errors, Path::new("/etc/tollgate")).expect("valid")
}

#[test]
fn a_route_with_auth_needs_a_control_plane_and_the_query_key_needs_auth() {
    let errors = problems(&format!(
        "{SERVER}
[[routes]]
name = \"a\"
path_prefix = \"/a\"
auth = \"key\"
respond = {{ body = \"a\" }}
[[routes]]
name = \"b\"
path_prefix = \"/b\"
key_query_param = \"api_key\"
respond = {{ body = \"b\" }}
[[routes]]
name = \"c\"
path_prefix = \"/c\"
auth = \"password\"
respond = {{ body = \"c\" }}
"
    ));
    assert_eq!(
        errors,
        vec![
            "routes[2].auth: unknown variant `password`, expected one of `none`, `key`, `jwt`, `key_or_jwt`",
            "routes[1].key_query_param: only applies to routes with auth = \"key\" or \"key_or_jwt\"",
            "routes[0].auth: needs a [control_plane] section: the keys come from the control plane",
        ]
    );
}

#[test]
fn the_control_plane_is_embedded_or_followed_by_url_not_both() {
    for (section, expected) in [
        (
            "embedded = true\nurl = \"http://cp:9100\"",
            "control_plane: set either embedded = true or url, not both",
        ),
        (
            "snapshot_file = \"s.json.gz\"",
            "control_plane: set embedded = true (run it in this process) or url (follow a separate one)",
        ),
        (
            "url = \"cp:9100\"",
            "control_plane.url: invalid URL \"cp:9100\": expected http://host:port",
        ),
        (
            "url = \"http://cp:9100\"\ndatabase_url = \"sqlite://x.db\"",
            "control_plane.database_url: only applies with embedded = true (a separate control plane has its own)",
        ),
        (
            "embedded = true\ndatabase_url = \"mysql://db\"",
            "control_plane.database_url: \"mysql://db\" is neither sqlite://… nor postgres://…",
        ),
        (
            "embedded = true\nsurprise = 1",
            "control_plane.surprise: unknown key",
        ),
    ] {
        let errors = problems(&format!("{SERVER}\n[control_plane]\n{section}\n"));
        assert_eq!(errors, vec![expected], "{section}");
    }
    let errors = problems(&format!("{SERVER}\n[auth]\nfailed_per_minute = 0\n"));
    assert_eq!(
        errors,
        vec![
            "auth.failed_per_minute: must be at least 1 (failed authentications per client address and minute)"
        ]
    );
    let errors = problems(&format!(
        "{SERVER}\n[auth]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\", \"10.0.0.0/33\", \"lb.internal\"]\n"
    ));
    assert_eq!(
        errors,
        vec![
            "auth.trusted_proxies[2]: \"10.0.0.0/33\" is not an IP address or a CIDR block such as 10.0.0.0/8 or 2001:db8::/32",
            "auth.trusted_proxies[3]: \"lb.internal\" is not an IP address or a CIDR block such as 10.0.0.0/8 or 2001:db8::/32",
        ]
    );
}

#[test]
fn an_address_block_holds_the_addresses_its_prefix_covers() {
    let block = |text| crate::config::IpBlock::parse(text).unwrap();
    let ip = |text: &str| text.parse::<std::net::IpAddr>().unwrap();
    assert!(block("10.0.0.0/8").contains(ip("10.255.0.1")));
    assert!(!block("10.0.0.0/8").contains(ip("11.0.0.1")));
    assert!(block("0.0.0.0/0").contains(ip("203.0.113.1")));
    assert!(block("127.0.0.1").contains(ip("127.0.0.1")));
    assert!(!block("127.0.0.1").contains(ip("127.0.0.2")));
    assert!(block("2001:db8::/32").contains(ip("2001:db8:1::5")));
    assert!(!block("2001:db8::/32").contains(ip("2001:db9::5")));
    assert!(block("::/0").contains(ip("::1")));
    // IPv4 written as IPv6 is IPv4; the families do not mix otherwise.
    assert!(block("10.0.0.0/8").contains(ip("::ffff:10.1.1.1")));
    assert!(!block("::/0").contains(ip("10.1.1.1")));
    for bad in [
        "10.0.0.0/",
        "10.0.0.0/-1",
        "10.0.0.0/+8",
        "::/129",
        "10.0.0/8",
        "",
    ] {
        assert!(crate::config::IpBlock::parse(bad).is_none(), "{bad}");
    }
}

#[test]
fn relative_store_and_snapshot_paths_are_next_to_the_config_file() {
    let embedded = config(&format!("{SERVER}\n[control_plane]\nembedded = true\n"));
    let control_plane = embedded.control_plane.unwrap();
    assert_eq!(
        control_plane.source,
        FeedSource::Embedded {
            database_url: "sqlite:///etc/tollgate/tollgate.db?mode=rwc".into()
        }
    );
    assert_eq!(
        control_plane.snapshot_file,
        Path::new("/etc/tollgate/tollgate-snapshot.json.gz")
    );
    let remote = config(&format!(
        "{SERVER}\n[control_plane]\nurl = \"https://cp.internal:9100/\"\nsnapshot_file = \"/var/lib/tollgate/s.gz\"\n"
    ));
    let control_plane = remote.control_plane.unwrap();
    assert_eq!(
        control_plane.source,
        FeedSource::Remote {
            url: "https://cp.internal:9100".into(),
            token_env: "TOLLGATE_GATEWAY_TOKEN".into()
        }
    );
    assert_eq!(
        control_plane.snapshot_file,
        Path::new("/var/lib/tollgate/s.gz")
    );
}

#[test]
fn variables_named_for_secrets_must_be_names_a_shell_can_set() {
    let remote = |name: &str| {
        problems(&format!(
            "{SERVER}\n[control_plane]\nurl = \"http://127.0.0.1:9100\"\ntoken_env = \"{name}\"\n"
        ))
    };
    assert_eq!(
        remote("MY GW TOKEN"),
        vec![
            "control_plane.token_env: \"MY GW TOKEN\" is not an environment variable's name: a letter \
             or '_', then letters, digits and '_'"
        ]
    );
    assert_eq!(
        remote("1TOKEN").len(),
        1,
        "a name cannot start with a digit"
    );
    config(&format!(
        "{SERVER}\n[control_plane]\nurl = \"http://127.0.0.1:9100\"\ntoken_env = \"_GW_TOKEN_2\"\n"
    ));
    assert_eq!(
        problems(&provider(
            "algorithms = [\"HS256\"]\nsecret_env = \"JWT-SECRET\""
        )),
        vec![
            "jwt_providers[0].secret_env: \"JWT-SECRET\" is not an environment variable's name: a \
             letter or '_', then letters, digits and '_'"
        ]
    );
}

const CONTROL_PLANE: &str = "[control_plane]\nembedded = true\n";

fn provider(lines: &str) -> String {
    format!(
        "{SERVER}{CONTROL_PLANE}
[[jwt_providers]]
name = \"idp\"
issuer = \"https://idp.test/\"
audiences = [\"api\"]
{lines}
"
    )
}

#[test]
fn jwt_providers_refuse_none_mixed_families_and_keys_of_the_wrong_kind() {
    for (lines, expected) in [
        (
            "algorithms = [\"none\"]\nsecret_env = \"S\"",
            vec![
                "jwt_providers[0].algorithms[0]: unknown algorithm \"none\": use HS256/384/512, RS256/384/512, PS256/384/512, ES256/384 or EdDSA (never \"none\")",
            ],
        ),
        (
            "algorithms = [\"HS256\", \"RS256\"]\njwks_url = \"https://idp.test/jwks\"",
            vec![
                "jwt_providers[0].algorithms: mixes algorithm families: one provider checks either HMAC or one kind of public key",
                "jwt_providers[0].algorithms: HS* tokens are checked with secret_env, not with public keys",
            ],
        ),
        (
            "algorithms = [\"RS256\"]\nsecret_env = \"S\"",
            vec!["jwt_providers[0].algorithms: a secret checks HS256, HS384 or HS512 only"],
        ),
        (
            "algorithms = [\"RS256\"]\nsecret_env = \"S\"\njwks_url = \"https://idp.test/jwks\"",
            vec!["jwt_providers[0]: set exactly one of jwks_url, public_keys or secret_env"],
        ),
        (
            "algorithms = [\"ES256\"]\njwks_url = \"http://idp.test/jwks\"",
            vec![
                "jwt_providers[0].jwks_url: \"http://idp.test/jwks\" must be an https:// URL (http:// only on the loopback interface)",
            ],
        ),
        (
            "algorithms = [\"HS256\"]\nsecret_env = \"S\"\nleeway = \"2m\"",
            vec!["jwt_providers[0].leeway: must be at most 60s"],
        ),
        (
            "algorithms = [\"ES256\"]\njwks_url = \"https://idp.test/jwks\"\njwks_refresh = \"0s\"\njwks_min_refresh = \"0s\"",
            vec![
                "jwt_providers[0].jwks_refresh: must be at least 1s",
                "jwt_providers[0].jwks_min_refresh: must be at least 1s",
            ],
        ),
        (
            "algorithms = [\"ES256\"]\njwks_url = \"https://idp.test/jwks\"\njwks_refresh = \"5s\"\njwks_min_refresh = \"10s\"",
            vec!["jwt_providers[0].jwks_min_refresh: must not be longer than jwks_refresh"],
        ),
        (
            "algorithms = [\"ES256\"]\npublic_keys = [{ file = \"missing.pem\" }]",
            vec![
                "jwt_providers[0].public_keys[0].file: cannot read ./missing.pem: No such file or directory (os error 2)",
            ],
        ),
        (
            "algorithms = [\"ES256\"]\npublic_keys = [{ file = \"../tests/fixtures/jwt/rsa-public.pem\" }]",
            vec![
                "jwt_providers[0].public_keys[0].file: ./../tests/fixtures/jwt/rsa-public.pem is not a PEM public key for ES256: ES256 takes an EC public key (P-256 for ES256, P-384 for ES384)",
            ],
        ),
    ] {
        assert_eq!(problems(&provider(lines)), expected, "{lines}");
    }
    let no_audience = format!(
        "{SERVER}{CONTROL_PLANE}[[jwt_providers]]\nname = \"idp\"\nissuer = \"i\"\naudiences = []\nalgorithms = [\"HS256\"]\nsecret_env = \"S\"\n"
    );
    assert_eq!(
        problems(&no_audience),
        vec![
            "jwt_providers[0].audiences: must list the audience values (aud) this gateway accepts"
        ]
    );
}

#[test]
fn jwt_routes_name_their_provider_unless_there_is_one() {
    let two = format!(
        "{}
[[jwt_providers]]
name = \"other\"
issuer = \"i\"
audiences = [\"api\"]
algorithms = [\"HS512\"]
secret_env = \"S2\"
[[routes]]
name = \"a\"
path_prefix = \"/a\"
auth = \"jwt\"
respond = {{ body = \"a\" }}
[[routes]]
name = \"b\"
path_prefix = \"/b\"
auth = \"key_or_jwt\"
jwt_provider = \"nobody\"
respond = {{ body = \"b\" }}
[[routes]]
name = \"c\"
path_prefix = \"/c\"
auth = \"key\"
jwt_provider = \"idp\"
respond = {{ body = \"c\" }}
",
        provider("algorithms = [\"HS256\"]\nsecret_env = \"S\"")
    );
    assert_eq!(
        problems(&two),
        vec![
            "routes[0].jwt_provider: several [[jwt_providers]] are defined: name the one this route accepts",
            "routes[1].jwt_provider: no [[jwt_providers]] entry is named \"nobody\"",
            "routes[2].jwt_provider: only applies to routes with auth = \"jwt\" or \"key_or_jwt\"",
        ]
    );
    let one = format!(
        "{}
[[routes]]
name = \"a\"
path_prefix = \"/a\"
auth = \"jwt\"
respond = {{ body = \"a\" }}
",
        provider("algorithms = [\"HS256\"]\nsecret_env = \"S\"")
    );
    let config = config(&one);
    assert_eq!(config.routes[0].auth.jwt.as_deref(), Some("idp"));
    assert!(!config.routes[0].auth.key);
}

#[test]
fn redis_needs_one_usable_url_and_a_short_timeout() {
    let errors = problems(&format!(
        "{SERVER}
[redis]
url = \"redis://127.0.0.1:6379\"
cluster_urls = [\"redis://10.0.0.1:7000\"]
timeout = \"2s\"
retry_after = \"0s\"
key_prefix = \"bad prefix\"
"
    ));
    assert_eq!(
        errors,
        vec![
            "redis: set either url or cluster_urls, not both",
            "redis.timeout: must be between 1ms and 1s: requests wait this long before counting in process",
            "redis.retry_after: must be more than 0s",
            "redis.key_prefix: must be 1 to 64 letters, digits, '-', '_', '.' or ':'",
        ]
    );
    let errors = problems(&format!(
        "{SERVER}
[redis]
cluster_urls = [\"redis://10.0.0.1:7000\", \"http://10.0.0.2:7000\", \"rediss://10.0.0.3:7000\"]
"
    ));
    assert_eq!(
        errors,
        vec![
            "redis.cluster_urls[1]: invalid URL \"http://10.0.0.2:7000\": expected redis://host:port[/db] or rediss:// (TLS)",
            "redis.cluster_urls: mixes rediss:// and redis://: a cluster's nodes are all reached with TLS or all without",
        ]
    );
    let errors = problems(&format!(
        "{SERVER}
[redis]
url = \"redis://10.0.0.1:6379\"
tls_ca_file = \"ca.pem\"
"
    ));
    assert_eq!(
        errors,
        vec!["redis.tls_ca_file: is for TLS to Redis: the URLs must be rediss://"]
    );
    let errors = problems(&format!(
        "{SERVER}
[redis]
url = \"rediss://10.0.0.1:6379\"
tls_ca_file = \"/nonexistent/ca.pem\"
"
    ));
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("redis.tls_ca_file: cannot read /nonexistent/ca.pem:"),
        "{errors:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("key.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    assert_eq!(
        problems(&format!(
            "{SERVER}\n[redis]\nurl = \"rediss://10.0.0.1:6379\"\ntls_ca_file = {:?}\n",
            not_pem.display().to_string()
        )),
        vec![format!(
            "redis.tls_ca_file: {} holds no PEM certificate",
            not_pem.display()
        )]
    );
    assert_eq!(
        problems(&format!("{SERVER}\n[redis]\ntimeout = \"10ms\"\n")),
        vec!["redis: needs url (one server) or cluster_urls (a Redis Cluster's nodes)"]
    );
}

#[test]
fn metering_settings_are_bounded() {
    let errors = problems(&format!(
        "{SERVER}
[metering]
spool_dir = \"\"
spool_max_bytes = 1000
flush_interval = \"10ms\"
batch_size = 5001
"
    ));
    assert_eq!(
        errors,
        vec![
            "metering.spool_dir: must name a directory",
            "metering.spool_max_bytes: must be at least 1048576 (1 MiB)",
            "metering.flush_interval: must be between 100ms and 60s",
            "metering.batch_size: must be between 1 and 5000",
        ]
    );
}

#[test]
fn a_batch_size_not_configured_depends_on_where_usage_goes() {
    let checked = |metering: &str| {
        let (file, parse_errors) = parse(&format!("{SERVER}{metering}")).unwrap();
        validate(file, parse_errors, Path::new("."))
            .unwrap()
            .metering
    };
    let default = checked("");
    assert_eq!(default.batch_size(true), 5000, "into the embedded store");
    assert_eq!(default.batch_size(false), 1000, "to a control plane");
    let configured = checked("[metering]\nbatch_size = 200\n");
    assert_eq!(configured.batch_size(true), 200);
    assert_eq!(configured.batch_size(false), 200);
}

#[test]
fn a_usage_route_needs_auth_and_nothing_else_to_answer_with() {
    let errors = problems(&format!(
        "{SERVER}
[control_plane]
embedded = true
[[routes]]
name = \"me\"
path_prefix = \"/me\"
usage = true
respond = {{ body = \"x\" }}
"
    ));
    assert_eq!(
        errors,
        vec![
            "routes[0]: set one of upstream, respond and usage = true, not several",
            "routes[0].usage: needs auth: the usage shown is the calling customer's",
        ]
    );
}

#[test]
fn authenticated_routes_are_metered_unless_set_otherwise_and_only_they_can_be() {
    let routes = "
[control_plane]
embedded = true
[[routes]]
name = \"paid\"
path_prefix = \"/paid\"
auth = \"key\"
respond = { body = \"a\" }
[[routes]]
name = \"free\"
path_prefix = \"/free\"
auth = \"key\"
metered = false
respond = { body = \"b\" }
[[routes]]
name = \"usage\"
path_prefix = \"/usage\"
auth = \"key\"
usage = true
[[routes]]
name = \"public\"
path_prefix = \"/public\"
respond = { body = \"c\" }
";
    let checked = config(&format!("{SERVER}{routes}"));
    let metered: Vec<(&str, bool)> = checked
        .routes
        .iter()
        .map(|route| (route.name.as_str(), route.metered))
        .collect();
    assert_eq!(
        metered,
        vec![
            ("paid", true),
            ("free", false),
            ("usage", false),
            ("public", false)
        ]
    );

    let errors = problems(&format!(
        "{SERVER}
[control_plane]
embedded = true
[[routes]]
name = \"public\"
path_prefix = \"/public\"
metered = true
respond = {{ body = \"a\" }}
[[routes]]
name = \"usage\"
path_prefix = \"/usage\"
auth = \"key\"
usage = true
metered = true
[[routes]]
name = \"token\"
path_prefix = \"/token\"
auth = \"jwt\"
metered = true
respond = {{ body = \"t\" }}
"
    ));
    // The JWT route without a provider is still an authenticated route: one error, its own.
    assert_eq!(
        errors,
        vec![
            "routes[0].metered: only authenticated routes are metered: a public call has no customer to count",
            "routes[1].metered: a usage view is never metered: reading one's usage is free",
            "routes[2].auth: accepting JWTs needs a [[jwt_providers]] entry",
        ]
    );
}

#[test]
fn a_cors_route_takes_its_cors_headers_from_its_policy_alone() {
    let errors = problems(&format!(
        "{SERVER}
[security_headers]
extra = {{ \"Access-Control-Allow-Origin\" = \"*\" }}
[[routes]]
name = \"a\"
path_prefix = \"/a\"
respond = {{ body = \"a\", headers = {{ \"access-control-allow-credentials\" = \"true\" }} }}
cors = {{ allowed_origins = [\"https://app.example.com\"] }}
[[routes]]
name = \"b\"
path_prefix = \"/b\"
respond = {{ body = \"b\", headers = {{ \"access-control-allow-origin\" = \"*\" }} }}
"
    ));
    assert_eq!(
        errors,
        vec![
            "routes[0].respond.headers.access-control-allow-credentials: the route's cors policy sets the CORS headers: remove it here",
            "routes[0].cors: security_headers.extra sets access-control-allow-origin, which this policy sets: remove it there",
        ],
        "a route without a policy sets what it likes"
    );
}

#[test]
fn the_global_cors_policy_applies_to_each_route_without_its_own() {
    let (file, parse_errors) = parse(&format!(
        "{SERVER}
[cors]
allowed_origins = [\"https://app.example.com\"]
[[routes]]
name = \"reads\"
path_prefix = \"/reads\"
methods = [\"GET\"]
respond = {{ body = \"r\" }}
[[routes]]
name = \"own\"
path_prefix = \"/own\"
respond = {{ body = \"o\" }}
cors = {{ allowed_origins = [\"*\"] }}
[[routes]]
name = \"closed\"
path_prefix = \"/closed\"
respond = {{ body = \"c\" }}
cors = {{ enabled = false }}
"
    ))
    .unwrap();
    assert!(parse_errors.is_empty(), "{parse_errors:?}");
    let config = validate(file, parse_errors, Path::new(".")).unwrap();
    let reads = config.routes[0].cors.as_ref().expect("the global policy");
    assert!(reads.allows(b"https://app.example.com"));
    assert_eq!(reads.allow_methods, "GET", "with the route's own methods");
    let own = config.routes[1].cors.as_ref().expect("its own policy");
    assert_eq!(
        own.origins, None,
        "its own replaces the global one: any origin"
    );
    assert_eq!(config.routes[2].cors, None, "turned off");

    // A mistake in the global policy is named once, at its own path.
    let errors = problems(&format!(
        "{SERVER}
[cors]
allowed_origins = [\"app.example.com\"]
[[routes]]
name = \"a\"
path_prefix = \"/a\"
respond = {{ body = \"a\" }}
[[routes]]
name = \"b\"
path_prefix = \"/b\"
respond = {{ body = \"b\" }}
"
    ));
    assert_eq!(
        errors,
        vec![
            "cors.allowed_origins[0]: must be an origin such as \"https://app.example.com\" (scheme and host)"
        ]
    );
}

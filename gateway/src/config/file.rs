//! The shape of `gateway.toml`, exactly as an operator writes it.
//!
//! These types only describe the file: durations are written as `"5s"` or `"250ms"`, and nothing
//! here is checked beyond its type. Unknown keys are refused by [`super::load`], which reports
//! each of them (serde's `deny_unknown_fields` would stop at the first one and hide the rest). [`super::validate`] turns them
//! into the gateway's internal types and reports every semantic problem with its field path.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// The whole file, as far as it could be read.
///
/// A section or an array element that fails to deserialize is left out (or marked
/// [`Entry::Invalid`]) and its error reported, so that [`super::validate`] can still check the rest
/// and `--validate` prints every problem of the file at once.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Listeners, worker threads, limits and shutdown; `None` if `[server]` is missing or invalid.
    pub server: Option<ServerConfig>,
    /// Log format and level.
    pub log: LogConfig,
    /// Security headers added to every response, unless a route overrides them.
    pub security_headers: SecurityHeadersConfig,
    /// Pools of upstream targets that routes send requests to.
    pub upstreams: Vec<Entry<UpstreamConfig>>,
    /// Rules that map a request (host, path prefix, method) to an upstream or a static response.
    pub routes: Vec<Entry<RouteConfig>>,
    /// `[control_plane]`: where plans, customers and keys come from; none without it.
    pub control_plane: Option<ControlPlaneConfig>,
    /// `[auth]`: protection of authenticated routes.
    pub auth: AuthConfig,
    /// `[[jwt_providers]]`: issuers whose JWTs routes may accept.
    pub jwt_providers: Vec<Entry<JwtProviderConfig>>,
    /// `[metering]`: what counts against quotas and how usage is recorded.
    pub metering: MeteringConfig,
    /// `[redis]`: shared rate-limit and quota counters; counted in process without it.
    pub redis: Option<RedisConfig>,
}

/// One element of `[[upstreams]]` or `[[routes]]`.
#[derive(Debug, Clone)]
pub enum Entry<T> {
    /// It deserialized.
    Valid(T),
    /// It did not (the error is reported); its `name`, if it had a readable one, still counts for
    /// references and duplicates.
    Invalid {
        /// The `name` key, if it was a string.
        name: Option<String>,
    },
}

impl<T> Entry<T> {
    /// The deserialized element, if any.
    pub fn valid(&self) -> Option<&T> {
        match self {
            Entry::Valid(value) => Some(value),
            Entry::Invalid { .. } => None,
        }
    }
}

/// `[server]`: things fixed for the life of the process (a reload warns if they change).
#[derive(Debug, Clone, Deserialize)]
pub struct ServerConfig {
    /// Plain HTTP proxy listeners: one `"host:port"` or a list of them. Port 0 picks a free port.
    #[serde(default)]
    pub listen: Listen,
    /// TLS proxy listeners (HTTP/2 offered by ALPN unless disabled).
    #[serde(default)]
    pub tls: Vec<TlsListenerConfig>,
    /// The admin listener: `/health`, `/health/ready`, `/metrics`. Never a proxy listener.
    pub admin_listen: String,
    /// Worker threads of the proxy; defaults to the number of CPUs.
    pub threads: Option<usize>,
    /// How long SIGTERM waits for in-flight requests before exiting.
    #[serde(default = "defaults::grace_period", deserialize_with = "duration")]
    pub grace_period: Duration,
    /// Largest request body accepted, in bytes (413 beyond it).
    #[serde(default = "defaults::max_request_body_bytes")]
    pub max_request_body_bytes: u64,
    /// Most request headers accepted (431 beyond it).
    #[serde(default = "defaults::max_request_headers")]
    pub max_request_headers: usize,
    /// Largest total size of request header names and values, in bytes (431 beyond it).
    #[serde(default = "defaults::max_request_header_bytes")]
    pub max_request_header_bytes: usize,
    /// Idle upstream connections kept for reuse, across all upstreams.
    #[serde(default = "defaults::upstream_keepalive_pool_size")]
    pub upstream_keepalive_pool_size: usize,
    /// Reload when the config file changes (default true); SIGHUP reloads either way.
    #[serde(default = "defaults::yes")]
    pub watch_config: bool,
    /// PEM bundle of the CAs that upstream TLS certificates are checked against (default: the
    /// system's trusted roots).
    pub upstream_ca_file: Option<String>,
}

/// One listen address or several.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(untagged, expecting = "a \"host:port\" string or a list of them")]
pub enum Listen {
    /// No plain listener.
    #[default]
    None,
    /// `listen = "127.0.0.1:8080"`.
    One(String),
    /// `listen = ["127.0.0.1:8080", "[::1]:8080"]`.
    Many(Vec<String>),
}

impl Listen {
    /// The addresses as written.
    pub fn addresses(&self) -> Vec<String> {
        match self {
            Listen::None => Vec::new(),
            Listen::One(address) => vec![address.clone()],
            Listen::Many(addresses) => addresses.clone(),
        }
    }
}

/// `[[server.tls]]`: a TLS listener.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TlsListenerConfig {
    /// `"host:port"` to listen on.
    pub listen: String,
    /// PEM certificate chain file.
    pub cert: String,
    /// PEM private key file.
    pub key: String,
    /// Offer HTTP/2 by ALPN (default true).
    #[serde(default = "defaults::yes")]
    pub http2: bool,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct LogConfig {
    /// `"text"` or `"json"`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `"info"` or `"info,pingora=warn"`; `RUST_LOG` overrides it.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// One structured line per request, target `tollgate::access` (default true).
    #[serde(default = "defaults::yes")]
    pub access_log: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: defaults::log_level(),
            access_log: true,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Security headers. Every field is optional so that a route's table can override single headers;
/// an empty string removes a header.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct SecurityHeadersConfig {
    /// `false` turns every security header off.
    pub enabled: Option<bool>,
    /// `Strict-Transport-Security`, sent on TLS listeners only.
    pub strict_transport_security: Option<String>,
    /// `X-Content-Type-Options`.
    pub content_type_options: Option<String>,
    /// `X-Frame-Options`.
    pub frame_options: Option<String>,
    /// `Referrer-Policy`.
    pub referrer_policy: Option<String>,
    /// `Content-Security-Policy`, sent on bodies the gateway generates itself (problems, static
    /// responses), never on proxied ones.
    pub content_security_policy: Option<String>,
    /// Any further headers, by name.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// `[[upstreams]]`: a pool of targets.
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamConfig {
    /// Unique name that routes refer to.
    pub name: String,
    /// `"host:port"` targets; host names are resolved when the config is loaded.
    pub targets: Vec<String>,
    /// Connect to the targets over TLS.
    #[serde(default)]
    pub tls: bool,
    /// SNI and certificate name for TLS targets (default: the target's host).
    pub sni: Option<String>,
    /// `Host` header sent upstream (default: the client's).
    pub host_header: Option<String>,
    /// TCP (and TLS) connect timeout.
    #[serde(default = "defaults::connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// Longest wait for the response header or between two reads from the target.
    #[serde(default = "defaults::read_timeout", deserialize_with = "duration")]
    pub read_timeout: Duration,
    /// Longest wait for one write to the target.
    #[serde(default = "defaults::write_timeout", deserialize_with = "duration")]
    pub write_timeout: Duration,
    /// Deadline for the whole exchange with the upstream, from the request's arrival to the
    /// response's last byte (not applied to WebSocket upgrades). None by default.
    #[serde(default, deserialize_with = "optional_duration")]
    pub request_timeout: Option<Duration>,
    /// How long an idle pooled connection to a target is kept.
    #[serde(default = "defaults::idle_timeout", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// For upgrade (WebSocket) requests, replaces `read_timeout` when longer: how long the
    /// upstream may take to answer the upgrade, then how long the connection may stay silent.
    #[serde(
        default = "defaults::websocket_idle_timeout",
        deserialize_with = "duration"
    )]
    pub websocket_idle_timeout: Duration,
    /// Further targets tried when a connection cannot be made (default 1).
    #[serde(default = "defaults::connect_retries")]
    pub connect_retries: usize,
    /// Active health checks.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive failure marking.
    #[serde(default)]
    pub passive: PassiveHealthConfig,
}

/// `[upstreams.health_check]`.
#[derive(Debug, Clone, Deserialize)]
pub struct HealthCheckConfig {
    /// Path requested with `GET`.
    #[serde(default = "defaults::health_path")]
    pub path: String,
    /// Time between two checks of a target.
    #[serde(default = "defaults::health_interval", deserialize_with = "duration")]
    pub interval: Duration,
    /// Time a check may take.
    #[serde(default = "defaults::health_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// Consecutive successes that bring a target back.
    #[serde(default = "defaults::threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures that take a target out.
    #[serde(default = "defaults::threshold")]
    pub unhealthy_threshold: u32,
    /// `Host` header of the check (default: the target address).
    pub host: Option<String>,
}

/// `[upstreams.passive]`: a target that fails `max_fails` times in a row (connection errors and
/// timeouts) is skipped for `fail_timeout`.
#[derive(Debug, Clone, Deserialize)]
pub struct PassiveHealthConfig {
    /// Consecutive failures before the target is skipped; 0 disables passive marking.
    #[serde(default = "defaults::max_fails")]
    pub max_fails: u32,
    /// How long a failed target is skipped.
    #[serde(default = "defaults::fail_timeout", deserialize_with = "duration")]
    pub fail_timeout: Duration,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        Self {
            max_fails: defaults::max_fails(),
            fail_timeout: defaults::fail_timeout(),
        }
    }
}

/// `[[routes]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct RouteConfig {
    /// Unique name, used in metrics and logs.
    pub name: String,
    /// Requests whose path starts with this (at a segment boundary) match; longest prefix wins.
    pub path_prefix: String,
    /// Exact host, or `*.example.com` for any subdomain; absent means any host.
    pub host: Option<String>,
    /// Methods the route accepts; absent means all.
    pub methods: Option<Vec<String>>,
    /// Remove `path_prefix` from the path sent upstream.
    #[serde(default)]
    pub strip_prefix: bool,
    /// The upstream to proxy to. Exactly one of `upstream` and `respond` is required.
    pub upstream: Option<String>,
    /// A static response the gateway answers with itself.
    pub respond: Option<StaticResponseConfig>,
    /// The gateway answers with the calling customer's usage (an authenticated route, not
    /// metered itself).
    #[serde(default)]
    pub usage: bool,
    /// Whether the caller's plan applies: rate limits, quota, limit headers and a usage event.
    /// Default: true on authenticated routes other than usage views. `false` makes the route
    /// authenticated only, and its calls free. Public routes and usage views are never metered.
    pub metered: Option<bool>,
    /// Compress responses (gzip, brotli or zstd, as the client accepts) at this level (1-9).
    pub compression_level: Option<u32>,
    /// Largest request body for this route, overriding `server.max_request_body_bytes`.
    pub max_request_body_bytes: Option<u64>,
    /// Overrides of the global security headers for this route.
    pub security_headers: Option<SecurityHeadersConfig>,
    /// Who may call the route.
    #[serde(default)]
    pub auth: RouteAuthConfig,
    /// Also take the API key from this query parameter.
    pub key_query_param: Option<String>,
    /// The JWT provider of `auth = "jwt"` or `"key_or_jwt"`; default: the only one.
    pub jwt_provider: Option<String>,
}

/// `respond = { status = 200, headers = { ... }, body = "..." }`.
/// How a route authenticates its callers.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RouteAuthConfig {
    /// Public: no credential is read.
    #[default]
    None,
    /// An API key.
    Key,
    /// A JWT.
    Jwt,
    /// An API key or a JWT.
    KeyOrJwt,
}

/// One `[[jwt_providers]]`: an issuer, how its tokens are checked and mapped to a customer.
#[derive(Debug, Clone, Deserialize)]
pub struct JwtProviderConfig {
    /// Unique; routes refer to it.
    pub name: String,
    /// The `iss` tokens must carry.
    pub issuer: String,
    /// `aud` values accepted; a token must carry one of them.
    pub audiences: Vec<String>,
    /// Accepted `alg` values, all of one family (HS*, or RS*/PS*/ES*/EdDSA).
    pub algorithms: Vec<String>,
    /// Keys from a JWKS URL, refreshed in the background.
    pub jwks_url: Option<String>,
    /// Or static public keys (PEM files, relative to the config file).
    #[serde(default)]
    pub public_keys: Vec<PublicKeyConfig>,
    /// Or, for HS*, the environment variable holding the secret (at least 32 bytes).
    pub secret_env: Option<String>,
    /// The claim holding the customer id (`cus_…`).
    #[serde(default = "defaults::customer_claim")]
    pub customer_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, at most 60 s.
    #[serde(default = "defaults::jwt_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// How often the JWKS is fetched again.
    #[serde(default = "defaults::jwks_refresh", deserialize_with = "duration")]
    pub jwks_refresh: Duration,
    /// Least time between two fetches, including those an unknown `kid` asks for.
    #[serde(default = "defaults::jwks_min_refresh", deserialize_with = "duration")]
    pub jwks_min_refresh: Duration,
}

/// A static public key of a JWT provider.
#[derive(Debug, Clone, Deserialize)]
pub struct PublicKeyConfig {
    /// The `kid` tokens name it by; may be left out when it is the only key, which then checks
    /// tokens naming no `kid` or one no key is named by.
    pub kid: Option<String>,
    /// PEM file of the public key.
    pub file: String,
}

/// `[control_plane]`.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlPlaneConfig {
    /// Standalone: run the control plane in this process, on the admin listener.
    #[serde(default)]
    pub embedded: bool,
    /// Embedded: its store. Relative SQLite paths are relative to the config file.
    pub database_url: Option<String>,
    /// Cluster: the control plane's base URL (`http://host:port`).
    pub url: Option<String>,
    /// Cluster: the environment variable holding this gateway's token (role `gateway`).
    #[serde(default = "defaults::gateway_token_env")]
    pub token_env: String,
    /// Where the last good snapshot is kept, relative to the config file.
    #[serde(default = "defaults::snapshot_file")]
    pub snapshot_file: String,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
pub struct AuthConfig {
    /// Failed authentications per client address and minute; past it, 429 before any lookup.
    #[serde(default = "defaults::failed_auth_per_minute")]
    pub failed_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            failed_per_minute: defaults::failed_auth_per_minute(),
        }
    }
}

/// `[redis]`.
#[derive(Debug, Clone, Deserialize)]
pub struct RedisConfig {
    /// One Redis server: `redis://host:port[/db]`.
    pub url: Option<String>,
    /// Or the seed nodes of a Redis Cluster.
    #[serde(default)]
    pub cluster_urls: Vec<String>,
    /// How long a request waits for its counter call before counting in process instead.
    #[serde(default = "defaults::redis_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// After a failed call, how long to count in process before trying Redis again.
    #[serde(default = "defaults::redis_retry_after", deserialize_with = "duration")]
    pub retry_after: Duration,
    /// Prefix of every key this gateway writes.
    #[serde(default = "defaults::redis_key_prefix")]
    pub key_prefix: String,
    /// For `rediss://`: a PEM file of the certificate authorities to trust instead of the
    /// system's (a private CA), relative to the config file.
    pub tls_ca_file: Option<String>,
}

/// `[metering]`.
#[derive(Debug, Clone, Deserialize)]
pub struct MeteringConfig {
    /// Whether a request the upstream answers with a 5xx is given back to the quota (and billed
    /// as 0 units).
    #[serde(default = "defaults::yes")]
    pub refund_upstream_5xx: bool,
    /// Directory of the usage spool, relative to the config file.
    #[serde(default = "defaults::spool_dir")]
    pub spool_dir: String,
    /// Bytes the spool may hold before metered requests are refused.
    #[serde(default = "defaults::spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// How often the spool is sent to the usage ledger.
    #[serde(default = "defaults::flush_interval", deserialize_with = "duration")]
    pub flush_interval: Duration,
    /// Events per batch sent; by default 1000 to a control plane, 5000 into the embedded store.
    #[serde(default)]
    pub batch_size: Option<usize>,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            refund_upstream_5xx: true,
            spool_dir: defaults::spool_dir(),
            spool_max_bytes: defaults::spool_max_bytes(),
            flush_interval: defaults::flush_interval(),
            batch_size: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct StaticResponseConfig {
    /// Status code (default 200).
    #[serde(default = "defaults::status_ok")]
    pub status: u16,
    /// Response headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Response body.
    #[serde(default)]
    pub body: String,
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text).map_err(|error| {
        serde::de::Error::custom(format!(
            "invalid duration {text:?} ({error}); write it like \"5s\" or \"250ms\""
        ))
    })
}

fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

mod defaults {
    use std::time::Duration;

    pub fn gateway_token_env() -> String {
        "TOLLGATE_GATEWAY_TOKEN".into()
    }
    pub fn snapshot_file() -> String {
        "tollgate-snapshot.json.gz".into()
    }
    pub fn failed_auth_per_minute() -> u32 {
        60
    }
    pub fn customer_claim() -> String {
        "sub".into()
    }
    pub fn spool_dir() -> String {
        "tollgate-spool".to_owned()
    }

    pub fn spool_max_bytes() -> u64 {
        1 << 30
    }

    pub fn flush_interval() -> Duration {
        Duration::from_secs(1)
    }

    pub fn redis_timeout() -> Duration {
        Duration::from_millis(50)
    }

    pub fn redis_retry_after() -> Duration {
        Duration::from_secs(1)
    }

    pub fn redis_key_prefix() -> String {
        "tollgate".to_owned()
    }

    pub fn jwt_leeway() -> Duration {
        Duration::from_secs(30)
    }
    pub fn jwks_refresh() -> Duration {
        Duration::from_secs(300)
    }
    pub fn jwks_min_refresh() -> Duration {
        Duration::from_secs(10)
    }

    pub fn yes() -> bool {
        true
    }
    pub fn grace_period() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_request_body_bytes() -> u64 {
        10 * 1024 * 1024
    }
    pub fn max_request_headers() -> usize {
        100
    }
    pub fn max_request_header_bytes() -> usize {
        32 * 1024
    }
    pub fn upstream_keepalive_pool_size() -> usize {
        1024
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn read_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn write_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn websocket_idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn connect_retries() -> usize {
        1
    }
    pub fn health_path() -> String {
        "/".to_owned()
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn threshold() -> u32 {
        2
    }
    pub fn max_fails() -> u32 {
        3
    }
    pub fn fail_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn status_ok() -> u16 {
        200
    }
}

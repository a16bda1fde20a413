//! `[[upstreams]]` and `[[routes]]` of `gateway.toml`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{SecurityHeadersConfig, defaults, duration, optional_duration};

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
    /// Which web origins may call the route from a browser: preflights answered by the gateway,
    /// CORS headers on every response. Replaces the global `[cors]` (`enabled = false`: none);
    /// without either, the gateway adds none (an upstream's own pass).
    pub cors: Option<CorsConfig>,
}

/// `[cors]`, or a route's `cors = { allowed_origins = ["https://app.example.com"], ... }`.
#[derive(Debug, Clone, Deserialize)]
pub struct CorsConfig {
    /// `false`: no policy (a route's own table turns the global one off so).
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    /// Origins (`https://app.example.com`, `http://localhost:3000`) whose pages may call the
    /// route, or `["*"]` for any; required unless `enabled = false`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Request headers pages may send beyond `Authorization`, `Content-Type`, `X-API-Key` and
    /// `X-Request-Id`.
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// Response headers pages may read beyond the limit headers, `Retry-After` and
    /// `X-Request-Id`.
    #[serde(default)]
    pub exposed_headers: Vec<String>,
    /// How long a browser may keep a preflight's answer (at most 24h).
    #[serde(default = "defaults::cors_max_age", deserialize_with = "duration")]
    pub max_age: Duration,
    /// Pages may send cookies and other credentials (not with `["*"]`).
    #[serde(default)]
    pub allow_credentials: bool,
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

//! The shape of `gateway.toml`, exactly as an operator writes it.
//!
//! These types only describe the file: durations are written as `"5s"` or `"250ms"`, and nothing
//! here is checked beyond its type. Unknown keys are refused by [`super::load`], which reports
//! each of them (serde's `deny_unknown_fields` would stop at the first one and hide the rest). [`super::validate`] turns them
//! into the gateway's internal types and reports every semantic problem with its field path.
//!
//! # Layout
//! - here: the file as a whole, `[server]` (listeners, TLS, logging, security headers), and how
//!   durations are read.
//! - `routing`: `[[upstreams]]` and `[[routes]]`.
//! - `plans`: what plans need: `[control_plane]`, `[auth]`, `[[jwt_providers]]`, `[redis]` and
//!   `[metering]`.
//! - `defaults`: the value of every setting left out.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod defaults;
mod plans;
mod routing;

pub use plans::{
    AuthConfig, ControlPlaneConfig, JwtProviderConfig, MeteringConfig, PublicKeyConfig, RedisConfig,
};
pub use routing::{
    CorsConfig, HealthCheckConfig, PassiveHealthConfig, RouteAuthConfig, RouteConfig,
    StaticResponseConfig, UpstreamConfig,
};

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
    /// `[cors]`: the CORS policy of every route without its own.
    pub cors: Option<CorsConfig>,
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

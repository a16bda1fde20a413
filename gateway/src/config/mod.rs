//! Configuration: the file (`gateway.toml`) and the checked, internal form the gateway runs on.
//!
//! [`load`] reads the file into [`file`](mod@file) types, [`validate`] converts them into [`Config`] or
//! returns every problem with its field path. Nothing outside this module sees the file types.
//! The checked types are here, those plans need (control plane, authentication, Redis, metering)
//! in `plans`.

mod cors;
pub mod file;
mod headers;
pub mod load;
mod plans;
pub mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

pub use cors::{AllowedOrigin, Cors};
pub use file::LogFormat;
pub use load::{ConfigError, ConfigErrors};
pub use plans::{
    AuthSettings, ControlPlane, EMBEDDED_BATCH, FeedSource, IpBlock, JwtKeys, JwtProvider,
    Metering, REMOTE_BATCH, Redis, RedisNodes, RouteAuth, StaticKey,
};

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Settings fixed for the life of the process.
    pub server: ServerSettings,
    /// Logging, also fixed for the life of the process.
    pub log: file::LogConfig,
    /// Request limits.
    pub limits: Limits,
    /// Upstream pools, in file order.
    pub upstreams: Vec<Upstream>,
    /// Routes, in file order.
    pub routes: Vec<Route>,
    /// Security headers of responses that match no route.
    pub security_headers: SecurityHeaders,
    /// Where plans, customers and keys come from; `None` when no route needs them.
    pub control_plane: Option<ControlPlane>,
    /// Protection of authenticated routes.
    pub auth: AuthSettings,
    /// Issuers whose JWTs routes may accept.
    pub jwt_providers: Vec<JwtProvider>,
    /// What counts against quotas and how usage is recorded.
    pub metering: Metering,
    /// Shared counters; `None`: counted in process.
    pub redis: Option<Redis>,
}

impl Config {
    /// Reads, parses and checks the file at `path`. Returns the file's text too, so a reload can
    /// tell whether anything changed.
    pub fn from_file(path: &Path) -> Result<(String, Config), ConfigErrors> {
        let (text, file, parse_errors) = load::read_file(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let config = validate::validate(file, parse_errors, base)?;
        Ok((text, config))
    }
}

/// `[server]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Plain HTTP proxy listeners.
    pub listen: Vec<SocketAddr>,
    /// TLS proxy listeners.
    pub tls: Vec<TlsListener>,
    /// The admin listener.
    pub admin_listen: SocketAddr,
    /// Proxy worker threads.
    pub threads: usize,
    /// SIGTERM drain period.
    pub grace_period: Duration,
    /// Idle upstream connections kept.
    pub upstream_keepalive_pool_size: usize,
    /// Reload on file changes.
    pub watch_config: bool,
    /// CAs for upstream TLS certificates; `None` is the system's roots.
    pub upstream_ca_file: Option<PathBuf>,
}

/// A TLS proxy listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Offer HTTP/2.
    pub http2: bool,
}

/// Limits on requests, for every route.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most headers accepted.
    pub max_request_headers: usize,
    /// Largest total header size accepted.
    pub max_request_header_bytes: usize,
}

/// A pool of targets.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Unique name.
    pub name: String,
    /// Resolved targets.
    pub targets: Vec<Target>,
    /// Connect over TLS.
    pub tls: bool,
    /// SNI for TLS targets.
    pub sni: Option<String>,
    /// `Host` header sent upstream, replacing the client's.
    pub host_header: Option<HeaderValue>,
    /// Timeouts of every exchange with a target.
    pub timeouts: Timeouts,
    /// Further targets tried when a connection cannot be made.
    pub connect_retries: usize,
    /// Active health checks.
    pub health_check: Option<HealthCheck>,
    /// Passive failure marking; `max_fails == 0` disables it.
    pub passive: PassiveHealth,
}

impl Upstream {
    /// The TLS server name for `target`: the configured `sni`, else the target's host for TLS
    /// upstreams, else none.
    pub fn sni_for(&self, target: &Target) -> String {
        match (&self.sni, self.tls) {
            (Some(sni), _) => sni.clone(),
            (None, true) => target.host.clone(),
            (None, false) => String::new(),
        }
    }
}

/// One target of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The target as written in the file.
    pub name: String,
    /// Its resolved address.
    pub address: SocketAddr,
    /// Its host part, for SNI and health-check `Host` headers.
    pub host: String,
}

/// Timeouts towards an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP and TLS connect.
    pub connect: Duration,
    /// Each read, including the wait for the response header.
    pub read: Duration,
    /// Each write.
    pub write: Duration,
    /// The whole exchange.
    pub request: Option<Duration>,
    /// Idle pooled connections.
    pub idle: Duration,
    /// Silence allowed on an upgraded (WebSocket) connection.
    pub websocket_idle: Duration,
}

/// Active health-check settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Path requested with `GET`.
    pub path: String,
    /// Time between checks.
    pub interval: Duration,
    /// Time a check may take.
    pub timeout: Duration,
    /// Successes that bring a target back.
    pub healthy_threshold: u32,
    /// Failures that take it out.
    pub unhealthy_threshold: u32,
    /// `Host` header of the check.
    pub host: Option<String>,
}

/// Passive failure-marking settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveHealth {
    /// Consecutive failures before the target is skipped.
    pub max_fails: u32,
    /// How long it is skipped.
    pub fail_timeout: Duration,
}

/// A route, checked.
#[derive(Debug, Clone)]
pub struct Route {
    /// Unique name.
    pub name: String,
    /// Host to match.
    pub host: Option<HostMatch>,
    /// Path prefix to match.
    pub path_prefix: String,
    /// Methods accepted; `None` is all.
    pub methods: Option<Vec<Method>>,
    /// Remove the prefix from the upstream path.
    pub strip_prefix: bool,
    /// What the route does.
    pub action: RouteAction,
    /// Response compression level.
    pub compression_level: Option<u32>,
    /// Largest request body.
    pub max_request_body_bytes: u64,
    /// Security headers of this route.
    pub security_headers: SecurityHeaders,
    /// Who may call it.
    pub auth: RouteAuth,
    /// The caller's plan applies (rate limits, quota, limit headers, a usage event): an
    /// authenticated route that does not answer with a usage view and was not set
    /// `metered = false`.
    pub metered: bool,
    /// Which web origins may call it from a browser.
    pub cors: Option<Cors>,
}

/// How a route matches the request's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// This host exactly (lowercase, no port).
    Exact(String),
    /// Any subdomain of this suffix (stored as `.example.com`).
    Wildcard(String),
}

/// What a route does with a request.
#[derive(Debug, Clone)]
pub enum RouteAction {
    /// Proxy to the upstream at this index of [`Config::upstreams`].
    Proxy(usize),
    /// Answer with this response.
    Respond(StaticResponse),
    /// Answer with the calling customer's usage in the current period.
    Usage,
}

/// A response the gateway writes itself.
#[derive(Debug, Clone)]
pub struct StaticResponse {
    /// Status code.
    pub status: http::StatusCode,
    /// Headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Body.
    pub body: bytes::Bytes,
}

/// Resolved security headers of one route.
#[derive(Debug, Clone, Default)]
pub struct SecurityHeaders {
    /// Sent on every response.
    pub always: Vec<(HeaderName, HeaderValue)>,
    /// `Strict-Transport-Security`, sent on TLS listeners only.
    pub hsts: Option<HeaderValue>,
    /// `Content-Security-Policy`, sent on gateway-generated bodies only.
    pub csp: Option<HeaderValue>,
}

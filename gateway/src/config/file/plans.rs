//! What plans need of `gateway.toml`: `[control_plane]`, `[auth]`, `[[jwt_providers]]`, `[redis]`
//! and `[metering]`.

use std::time::Duration;

use serde::Deserialize;

use super::{defaults, duration};

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
    /// Addresses and CIDR blocks of proxies in front of the gateway whose `X-Forwarded-For`
    /// names the client, for counting failed authentications.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            failed_per_minute: defaults::failed_auth_per_minute(),
            trusted_proxies: Vec::new(),
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

//! The checked settings plans need: the control plane, authentication (keys and JWT
//! providers), Redis and metering.

use std::path::PathBuf;
use std::time::Duration;

/// What counts against quotas, and how usage is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metering {
    /// Whether an upstream 5xx gives its unit back.
    pub refund_upstream_5xx: bool,
    /// The spool's directory.
    pub spool_dir: PathBuf,
    /// The spool's bound.
    pub spool_max_bytes: u64,
    /// How often the spool is sent.
    pub flush_interval: Duration,
    /// Events per batch, as configured.
    pub batch_size: Option<usize>,
}

/// Events per batch sent to a control plane's ingest API unless configured: a request body of
/// about 340 KB of JSON.
pub const REMOTE_BATCH: usize = 1000;
/// Events per batch stored into the embedded store unless configured: its largest. One
/// transaction per 5000 events instead of per 1000 writes a third fewer pages (each commit
/// rewrites the last page of each index) and halves the metered route's context switches
/// (BENCHMARKS.md, session 19). The price: the store's one SQLite connection is held about 55 ms
/// per batch of new events (`usage_bench`: 92,000 events/s on an idle machine; a batch partly
/// stored already, replayed after a crash, is inserted, taken back and inserted again, so
/// longer: not measured), where a quota seed's ledger read, which waits for it, may take 1 s.
pub const EMBEDDED_BATCH: usize = tollgate_control_plane::store::usage::MAX_BATCH;

impl Metering {
    /// Events per batch into the embedded store (`embedded`) or to a control plane.
    pub fn batch_size(&self, embedded: bool) -> usize {
        self.batch_size.unwrap_or(if embedded {
            EMBEDDED_BATCH
        } else {
            REMOTE_BATCH
        })
    }
}

/// Shared rate-limit and quota counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redis {
    /// One server, or a cluster's seed nodes.
    pub nodes: RedisNodes,
    /// How long a request waits for its counter call.
    pub timeout: Duration,
    /// How long to count in process after a failed call.
    pub retry_after: Duration,
    /// Prefix of every key.
    pub key_prefix: String,
    /// For `rediss://`: the certificate authorities to trust instead of the system's (PEM).
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// Where the Redis counters are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisNodes {
    /// One server.
    Single(String),
    /// A Redis Cluster, by seed nodes.
    Cluster(Vec<String>),
}

/// A JWT issuer: how its tokens are checked and mapped to a customer.
#[derive(Debug, Clone)]
pub struct JwtProvider {
    /// Unique name.
    pub name: String,
    /// Required `iss`.
    pub issuer: String,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Accepted algorithms, all of one family.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Where its keys come from.
    pub keys: JwtKeys,
    /// The claim holding the customer id.
    pub customer_claim: String,
    /// Allowed clock skew.
    pub leeway: Duration,
    /// JWKS refresh interval.
    pub jwks_refresh: Duration,
    /// Least time between two JWKS fetches.
    pub jwks_min_refresh: Duration,
}

/// Where a JWT provider's keys come from.
#[derive(Debug, Clone)]
pub enum JwtKeys {
    /// A JWKS document, fetched and refreshed in the background.
    Jwks {
        /// Its URL.
        url: String,
    },
    /// Public keys from PEM files, read when the config is loaded.
    Static(Vec<StaticKey>),
    /// An HMAC secret from this environment variable, read at start.
    Secret {
        /// The variable's name.
        env: String,
    },
}

/// A static public key.
#[derive(Debug, Clone)]
pub struct StaticKey {
    /// Its `kid`, if it has one.
    pub kid: Option<String>,
    /// The key, decoded from its PEM file.
    pub key: jsonwebtoken::DecodingKey,
}

/// The control plane a gateway follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    /// Where the feed comes from.
    pub source: FeedSource,
    /// Where the last good snapshot is kept.
    pub snapshot_file: PathBuf,
}

/// Where the feed comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedSource {
    /// A control plane run in this process, on the admin listener, over this store.
    Embedded {
        /// `sqlite://…` or `postgres://…`.
        database_url: String,
    },
    /// A separate control plane.
    Remote {
        /// Its base URL, without a trailing `/`.
        url: String,
        /// The environment variable holding the gateway token.
        token_env: String,
    },
}

/// Protection of authenticated routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSettings {
    /// Failed authentications per client address and minute before 429.
    pub failed_per_minute: u32,
    /// Proxies whose `X-Forwarded-For` names the client the failures count against.
    pub trusted_proxies: Vec<IpBlock>,
}

/// An address block: an address and how many of its leading bits a member shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpBlock {
    /// `10.0.0.0/8`, `2001:db8::/32`, or one address (`127.0.0.1`: all its bits); `None` for
    /// anything else, or a prefix longer than the address.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr.parse().ok()?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) if prefix.bytes().all(|b| b.is_ascii_digit()) => prefix.parse().ok()?,
            Some(_) => return None,
            None => bits,
        };
        (prefix <= bits).then_some(Self { addr, prefix })
    }

    /// Whether `ip` is in the block (an IPv4 address written as IPv6, `::ffff:a.b.c.d`, as its
    /// IPv4 self).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        let masked = |bits: u128, width: u32| {
            let shift = width - u32::from(self.prefix);
            if shift >= 128 { 0 } else { bits >> shift }
        };
        match (self.addr, ip.to_canonical()) {
            (std::net::IpAddr::V4(block), std::net::IpAddr::V4(ip)) => {
                masked(u128::from(u32::from(block)), 32) == masked(u128::from(u32::from(ip)), 32)
            }
            (std::net::IpAddr::V6(block), std::net::IpAddr::V6(ip)) => {
                masked(u128::from(block), 128) == masked(u128::from(ip), 128)
            }
            _ => false,
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteAuth {
    /// An API key is accepted.
    pub key: bool,
    /// A JWT of the provider with this name is accepted.
    pub jwt: Option<String>,
    /// The key may also come in this query parameter.
    pub key_query_param: Option<String>,
}

impl RouteAuth {
    /// Whether the route needs a credential.
    pub fn required(&self) -> bool {
        self.key || self.jwt.is_some()
    }
}

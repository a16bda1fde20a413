//! The value of every setting left out of `gateway.toml`.

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

pub fn cors_max_age() -> Duration {
    Duration::from_secs(3600)
}

pub fn enabled() -> bool {
    true
}

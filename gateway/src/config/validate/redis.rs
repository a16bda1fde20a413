//! Checks of `[redis]`: one server or a cluster's nodes, URLs a client can use (TLS with
//! `rediss://`, all of them or none), and a call timeout short enough for the request path.

use std::path::Path;
use std::time::Duration;

use super::Errors;
use crate::config::file::RedisConfig;
use crate::config::{Redis, RedisNodes};

/// The longest a request may wait for its counter call.
const MAX_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn redis(file: &RedisConfig, base: &Path, errors: &mut Errors) -> Option<Redis> {
    let before = errors.0.len();
    let nodes = match (&file.url, file.cluster_urls.is_empty()) {
        (Some(url), true) => {
            check_url(url, "redis.url", errors);
            Some(RedisNodes::Single(url.clone()))
        }
        (None, false) => {
            for (i, url) in file.cluster_urls.iter().enumerate() {
                check_url(url, &format!("redis.cluster_urls[{i}]"), errors);
            }
            Some(RedisNodes::Cluster(file.cluster_urls.clone()))
        }
        (Some(_), false) => {
            errors.push("redis", "set either url or cluster_urls, not both");
            None
        }
        (None, true) => {
            errors.push(
                "redis",
                "needs url (one server) or cluster_urls (a Redis Cluster's nodes)",
            );
            None
        }
    };
    if file.timeout.is_zero() || file.timeout > MAX_TIMEOUT {
        errors.push(
            "redis.timeout",
            "must be between 1ms and 1s: requests wait this long before counting in process",
        );
    }
    if file.retry_after.is_zero() {
        errors.push("redis.retry_after", "must be more than 0s");
    }
    let prefix_ok = !file.key_prefix.is_empty()
        && file.key_prefix.len() <= 64
        && file
            .key_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !prefix_ok {
        errors.push(
            "redis.key_prefix",
            "must be 1 to 64 letters, digits, '-', '_', '.' or ':'",
        );
    }
    let urls: Vec<&String> = file.url.iter().chain(&file.cluster_urls).collect();
    let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if tls > 0 && tls < urls.len() {
        errors.push(
            "redis.cluster_urls",
            "mixes rediss:// and redis://: a cluster's nodes are all reached with TLS or all without",
        );
    }
    let tls_ca_file = match &file.tls_ca_file {
        Some(_) if tls == 0 => {
            errors.push(
                "redis.tls_ca_file",
                "is for TLS to Redis: the URLs must be rediss://",
            );
            None
        }
        Some(name) => super::readable_file(name, base, "redis.tls_ca_file", errors)
            .filter(|path| holds_a_certificate(path, errors)),
        None => None,
    };
    if errors.0.len() > before {
        return None;
    }
    Some(Redis {
        nodes: nodes?,
        timeout: file.timeout,
        retry_after: file.retry_after,
        key_prefix: file.key_prefix.clone(),
        tls_ca_file,
    })
}

/// Whether the file at `path` holds a PEM certificate; an error saying so when not.
fn holds_a_certificate(path: &Path, errors: &mut Errors) -> bool {
    let holds = std::fs::read(path)
        .is_ok_and(|pem| pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----"));
    if !holds {
        errors.push(
            "redis.tls_ca_file",
            format!("{} holds no PEM certificate", path.display()),
        );
    }
    holds
}

fn check_url(url: &str, path: &str, errors: &mut Errors) {
    let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
    if !scheme_ok || redis::parse_redis_url(url).is_none() {
        errors.push(
            path,
            format!("invalid URL {url:?}: expected redis://host:port[/db] or rediss:// (TLS)"),
        );
    }
}

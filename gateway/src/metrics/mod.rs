//! Prometheus metrics: every name in one place (`names`), and the per-route handles the request
//! path uses.
//!
//! Labels carry only operator-chosen names (routes, upstreams), target positions, methods and
//! status classes: never a key, token or address. Per-route counters are resolved once when a
//! config is built, so recording a request is a few atomic adds, not a label lookup.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

mod names;

pub use names::*;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Methods with their own label value; anything else is `OTHER`.
const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
];
/// Status classes; `none` when no response could be written (the client went away).
const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "none"];

/// Every metric of one gateway, in its own registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    /// Target availability.
    pub target_healthy: IntGaugeVec,
    upstream_failures: IntCounterVec,
    upstream_retries: IntCounterVec,
    reloads: IntCounterVec,
    /// Running config version.
    pub config_version: IntGauge,
    /// When the running config was loaded.
    pub config_loaded: IntGauge,
    /// Requests in flight.
    pub in_flight: IntGauge,
    identity_version: IntGauge,
    identity_keys: IntGauge,
    /// Seconds since the control plane answered, set when metrics are read.
    pub identity_sync_age: IntGauge,
    identity_sync_failures: IntCounter,
    identity_snapshots: IntCounterVec,
    auth_decisions: Vec<IntCounter>,
    jwks_fetches: IntCounterVec,
    identity_registered: std::sync::Arc<std::sync::Once>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS_TOTAL,
                "Requests answered, by route, method and status class.",
            ),
            &["route", "method", "status_class"],
        );
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                REQUEST_DURATION,
                "Time from request arrival to the end of the response.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        );
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                UPSTREAM_DURATION,
                "Time from the first connect attempt to the upstream response header.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["upstream"],
        );
        let target_healthy = IntGaugeVec::new(
            Opts::new(
                UPSTREAM_TARGET_HEALTHY,
                "1 when the target takes requests, 0 when it is marked down; target is its position in the upstream's list.",
            ),
            &["upstream", "target"],
        );
        let upstream_failures = IntCounterVec::new(
            Opts::new(
                UPSTREAM_FAILURES_TOTAL,
                "Failed connection attempts and timeouts towards targets.",
            ),
            &["upstream"],
        );
        let upstream_retries = IntCounterVec::new(
            Opts::new(
                UPSTREAM_RETRIES_TOTAL,
                "Requests retried on another target after a failed connection.",
            ),
            &["upstream"],
        );
        let reloads = IntCounterVec::new(
            Opts::new(CONFIG_RELOADS_TOTAL, "Config reloads, by result."),
            &["result"],
        );
        let config_version = IntGauge::new(CONFIG_VERSION, "Version of the running config.");
        let config_loaded = IntGauge::new(
            CONFIG_LOADED_TIMESTAMP,
            "Unix time the running config was loaded.",
        );
        let in_flight = IntGauge::new(REQUESTS_IN_FLIGHT, "Requests being processed.");
        let identity_version = IntGauge::new(
            IDENTITY_VERSION,
            "Config version of the plans, customers and keys in use.",
        );
        let identity_keys = IntGauge::new(IDENTITY_KEYS, "Keys in the identities in use.");
        let identity_sync_age = IntGauge::new(
            IDENTITY_SYNC_AGE,
            "Seconds since the control plane last answered this gateway.",
        );
        let identity_sync_failures = IntCounter::new(
            IDENTITY_SYNC_FAILURES_TOTAL,
            "Failed attempts to reach or read the control plane.",
        );
        let identity_snapshots = IntCounterVec::new(
            Opts::new(IDENTITY_SNAPSHOTS_TOTAL, "Snapshots, by result."),
            &["result"],
        );
        let jwks_fetches = IntCounterVec::new(
            Opts::new(
                JWKS_FETCHES_TOTAL,
                "JWKS fetches, by JWT provider and result.",
            ),
            &["provider", "result"],
        );
        let auth_decisions = IntCounterVec::new(
            Opts::new(AUTH_DECISIONS_TOTAL, "Authentication decisions, by result."),
            &["result"],
        );
        // The options above are static and valid, and each name is registered once.
        let metrics = (|| -> prometheus::Result<Metrics> {
            let mut metrics = Metrics {
                registry,
                requests: requests?,
                request_duration: request_duration?,
                upstream_duration: upstream_duration?,
                target_healthy: target_healthy?,
                upstream_failures: upstream_failures?,
                upstream_retries: upstream_retries?,
                reloads: reloads?,
                config_version: config_version?,
                config_loaded: config_loaded?,
                in_flight: in_flight?,
                identity_version: identity_version?,
                identity_keys: identity_keys?,
                identity_sync_age: identity_sync_age?,
                identity_sync_failures: identity_sync_failures?,
                identity_snapshots: identity_snapshots?,
                auth_decisions: Vec::new(),
                jwks_fetches: jwks_fetches?,
                identity_registered: std::sync::Arc::new(std::sync::Once::new()),
            };
            let r = &metrics.registry;
            r.register(Box::new(metrics.requests.clone()))?;
            r.register(Box::new(metrics.request_duration.clone()))?;
            r.register(Box::new(metrics.upstream_duration.clone()))?;
            r.register(Box::new(metrics.target_healthy.clone()))?;
            r.register(Box::new(metrics.upstream_failures.clone()))?;
            r.register(Box::new(metrics.upstream_retries.clone()))?;
            r.register(Box::new(metrics.reloads.clone()))?;
            r.register(Box::new(metrics.config_version.clone()))?;
            r.register(Box::new(metrics.config_loaded.clone()))?;
            r.register(Box::new(metrics.in_flight.clone()))?;
            r.register(Box::new(metrics.identity_sync_failures.clone()))?;
            r.register(Box::new(metrics.identity_snapshots.clone()))?;
            let auth_decisions = auth_decisions?;
            r.register(Box::new(auth_decisions.clone()))?;
            metrics.auth_decisions = AUTH_RESULTS
                .iter()
                .map(|result| auth_decisions.with_label_values(&[result]))
                .collect();
            r.register(Box::new(metrics.jwks_fetches.clone()))?;
            for result in ["applied", "restored", "refused"] {
                metrics.identity_snapshots.with_label_values(&[result]);
            }
            for result in ["ok", "failed"] {
                metrics.reloads.with_label_values(&[result]);
            }
            Ok(metrics)
        })();
        metrics.unwrap_or_else(|error| panic!("metric definitions are static and valid: {error}"))
    }

    /// Adds a metric defined elsewhere (under a name from this module) to the registry.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// The handles of one route.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let requests = METHODS
            .iter()
            .flat_map(|method| {
                STATUS_CLASSES
                    .iter()
                    .map(move |class| self.requests.with_label_values(&[route, method, class]))
            })
            .collect();
        RouteMetrics {
            requests,
            duration: self.request_duration.with_label_values(&[route]),
        }
    }

    /// The handles of one upstream.
    pub fn upstream(&self, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics {
            duration: self.upstream_duration.with_label_values(&[upstream]),
            failures: self.upstream_failures.with_label_values(&[upstream]),
            retries: self.upstream_retries.with_label_values(&[upstream]),
        }
    }

    /// Counts a config reload.
    pub fn reload(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Publishes the version and size of the identities now in use. The version, key count
    /// and sync age series appear with the first identities.
    pub fn set_identities(&self, identities: &crate::identity::index::Identities) {
        self.identity_registered.call_once(|| {
            for gauge in [
                &self.identity_version,
                &self.identity_keys,
                &self.identity_sync_age,
            ] {
                if let Err(error) = self.registry.register(Box::new(gauge.clone())) {
                    tracing::error!(%error, "cannot register an identity metric");
                }
            }
        });
        self.identity_version.set(identities.version);
        self.identity_keys
            .set(i64::try_from(identities.key_count()).unwrap_or(i64::MAX));
    }

    /// Counts a snapshot by result.
    pub fn identity_snapshot(&self, result: &str) {
        self.identity_snapshots.with_label_values(&[result]).inc();
    }

    /// Counts a failed sync attempt.
    pub fn identity_sync_failure(&self) {
        self.identity_sync_failures.inc();
    }

    /// Counts a JWKS fetch of a provider.
    pub fn jwks_fetch(&self, provider: &str, ok: bool) {
        self.jwks_fetches
            .with_label_values(&[provider, if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Counts an authentication decision; `result` is one of [`AUTH_RESULTS`]. The counters
    /// are resolved once, so this is a short scan and an atomic add.
    pub fn auth_decision(&self, result: &str) {
        if let Some(index) = AUTH_RESULTS.iter().position(|r| *r == result) {
            self.auth_decisions[index].inc();
        }
    }

    /// Sets a target's availability gauge.
    pub fn set_target_healthy(&self, upstream: &str, position: usize, healthy: bool) {
        self.target_healthy
            .with_label_values(&[upstream, &position.to_string()])
            .set(i64::from(healthy));
    }

    /// Drops the series of a removed upstream's targets.
    pub fn forget_targets(&self, upstream: &str, positions: std::ops::Range<usize>) {
        for position in positions {
            let _ = self
                .target_healthy
                .remove_label_values(&[upstream, &position.to_string()]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "cannot encode metrics");
        }
        out
    }
}

/// Handles of one route.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    requests: Vec<IntCounter>,
    duration: Histogram,
}

impl RouteMetrics {
    /// Records one answered request; `status` 0 means no response was written.
    pub fn record(&self, method: &http::Method, status: u16, seconds: f64) {
        let method_index = METHODS
            .iter()
            .position(|m| *m == method.as_str())
            .unwrap_or(METHODS.len() - 1);
        let class_index = match status {
            100..=599 => usize::from(status / 100) - 1,
            _ => STATUS_CLASSES.len() - 1,
        };
        self.requests[method_index * STATUS_CLASSES.len() + class_index].inc();
        self.duration.observe(seconds);
    }
}

/// Handles of one upstream.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    /// Time to the response header.
    pub duration: Histogram,
    /// Failed connections and timeouts.
    pub failures: IntCounter,
    /// Retries on another target.
    pub retries: IntCounter,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_requests_under_their_labels() {
        let metrics = Metrics::new();
        let route = metrics.route("orders");
        route.record(&http::Method::GET, 204, 0.002);
        route.record(&http::Method::from_bytes(b"PURGE").unwrap(), 503, 0.002);
        route.record(&http::Method::POST, 0, 0.002);
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains(
                r#"tollgate_requests_total{method="GET",route="orders",status_class="2xx"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"tollgate_requests_total{method="OTHER",route="orders",status_class="5xx"} 1"#
        ));
        assert!(text.contains(
            r#"tollgate_requests_total{method="POST",route="orders",status_class="none"} 1"#
        ));
        assert!(text.contains(r#"tollgate_request_duration_seconds_count{route="orders"} 3"#));
    }
}

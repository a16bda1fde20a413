//! The gateway's shared state: the running config, swapped atomically on reload.
//!
//! Requests take one `Arc<Live>` when they start and use it to the end, so a reload never changes
//! the rules under a request in flight, and the old config is freed when its last request ends.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::{Config, Limits, RouteAction, SecurityHeaders, ServerSettings};
use crate::identity::IdentityState;
use crate::identity::failures::FailedAuth;
use crate::identity::jwt::Verifier;
use anyhow::Context;

use crate::limits::Limiter;
use crate::limits::clock::SystemClock;
use crate::limits::metrics::LimitMetrics;
use crate::limits::redis::RedisCounters;
use crate::metering::Meter;
use crate::metering::metrics::MeteringMetrics;
use crate::metering::spool::Spool;
use crate::metrics::{Metrics, RouteMetrics, UpstreamMetrics};
use crate::routing::RouteTable;
use crate::upstream::Pool;
use crate::upstream::health::{HealthRegistry, now_ms};

/// One config in its runtime form.
#[derive(Debug)]
pub struct Live {
    /// 1 for the config loaded at start, +1 per applied reload.
    pub version: u64,
    /// When it was loaded.
    pub loaded_at: SystemTime,
    /// Routes, ordered for matching.
    pub routes: RouteTable,
    /// Metric handles of each route, by file index.
    pub route_metrics: Vec<RouteMetrics>,
    /// Handles for requests that match no route.
    pub no_route_metrics: RouteMetrics,
    /// Upstream pools, by file index.
    pub pools: Vec<Arc<Pool>>,
    /// Metric handles of each upstream, by file index.
    pub upstream_metrics: Vec<UpstreamMetrics>,
    /// Request limits.
    pub limits: Limits,
    /// Security headers of responses that match no route.
    pub security_headers: SecurityHeaders,
    /// What counts against quotas.
    pub metering: crate::config::Metering,
    /// Proxies whose `X-Forwarded-For` names the client failed authentications count against.
    pub trusted_proxies: Vec<crate::config::IpBlock>,
}

/// State shared by every part of one gateway process.
#[derive(Debug)]
pub struct Gateway {
    live: ArcSwap<Live>,
    /// The config file, re-read on reload.
    pub config_path: PathBuf,
    /// The settings the process started with (a reload cannot change them).
    pub server: ServerSettings,
    /// The log settings the process started with.
    pub log: crate::config::file::LogConfig,
    /// Health of every target, kept across reloads.
    pub health: HealthRegistry,
    /// Every metric.
    pub metrics: Metrics,
    /// The text of the running config, to skip reloads that change nothing.
    text: Mutex<String>,
    version: AtomicU64,
    changed: watch::Sender<u64>,
    /// Set once SIGTERM is received.
    pub draining: AtomicBool,
    /// Set once SIGHUP and the file watch are handled.
    pub reload_handlers_ready: AtomicBool,
    /// Set once SIGTERM, SIGINT and SIGQUIT are handled.
    pub shutdown_handlers_ready: AtomicBool,
    /// When the process started.
    pub started: Instant,
    /// Plans, customers and keys from the control plane.
    pub identity: IdentityState,
    /// Failed authentications per client address.
    pub failed_auth: FailedAuth,
    /// The control plane followed, as configured at start.
    pub control_plane: Option<crate::config::ControlPlane>,
    /// JWT verifiers, by position in `jwt_providers`, as configured at start.
    pub jwt: Vec<Arc<Verifier>>,
    /// The providers they were made from, described, to notice a reload that changes them.
    pub jwt_described: Vec<String>,
    /// Rate-limit and quota counters.
    pub limiter: Limiter,
    /// The usage spool and its metrics, with a control plane (fixed at start).
    pub meter: Option<Arc<Meter>>,
    /// `[redis]` as configured at start, to notice a reload that changes it.
    pub redis: Option<crate::config::Redis>,
    /// `[metering]` as configured at start (only `refund_upstream_5xx` follows reloads).
    pub metering: crate::config::Metering,
    /// Recent ledger reads of customers' usage views.
    pub usage_views: crate::proxy::usage::UsageViews,
    /// The flusher's last pass, after the drain.
    pub final_flush: crate::metering::flush::FinalFlush,
}

impl Gateway {
    /// The state for the config first loaded from `path`, whose text was `text`. Fails when a
    /// JWT provider's secret is missing or too short.
    pub fn new(config_path: PathBuf, text: String, config: Config) -> anyhow::Result<Arc<Self>> {
        let jwt = config
            .jwt_providers
            .iter()
            .enumerate()
            .map(|(i, provider)| {
                Verifier::new(provider, &format!("jwt_providers[{i}]")).map(Arc::new)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let jwt_described = config
            .jwt_providers
            .iter()
            .map(crate::identity::jwt::describe)
            .collect();
        let metrics = Metrics::new();
        let limit_metrics = LimitMetrics::new(&metrics)?;
        let metering_metrics = MeteringMetrics::new(&metrics)?;
        let meter = match &config.control_plane {
            Some(_) => {
                let dir = &config.metering.spool_dir;
                let spool = Spool::open(
                    dir,
                    config.metering.spool_max_bytes,
                    crate::identity::unix_ms(),
                )
                .with_context(|| format!("cannot open the usage spool in {}", dir.display()))?;
                metering_metrics.spool_bytes(spool.bytes());
                metering_metrics.spool_max_bytes(spool.max_bytes());
                Some(Arc::new(Meter {
                    spool,
                    metrics: metering_metrics,
                }))
            }
            None => None,
        };
        let limiter = match &config.redis {
            Some(redis) => Limiter::shared(
                Arc::new(SystemClock),
                limit_metrics,
                RedisCounters::new(redis.clone(), &metrics)?,
            ),
            None => Limiter::local(Arc::new(SystemClock), limit_metrics),
        };
        let health = HealthRegistry::default();
        let server = config.server.clone();
        let log = config.log.clone();
        let failed_auth = FailedAuth::new(config.auth.failed_per_minute);
        let control_plane = config.control_plane.clone();
        let redis = config.redis.clone();
        let metering = config.metering.clone();
        let live = build_live(1, config, &health, &metrics);
        let (changed, _) = watch::channel(1);
        let gateway = Arc::new(Self {
            live: ArcSwap::from_pointee(live),
            config_path,
            server,
            log,
            health,
            metrics,
            text: Mutex::new(text),
            version: AtomicU64::new(1),
            changed,
            draining: AtomicBool::new(false),
            reload_handlers_ready: AtomicBool::new(false),
            shutdown_handlers_ready: AtomicBool::new(false),
            started: Instant::now(),
            identity: IdentityState::default(),
            failed_auth,
            control_plane,
            jwt,
            jwt_described,
            limiter,
            meter,
            redis,
            metering,
            usage_views: crate::proxy::usage::UsageViews::default(),
            final_flush: crate::metering::flush::FinalFlush::default(),
        });
        gateway.publish_gauges();
        Ok(gateway)
    }

    /// Whether every signal handler and the file watch are in place.
    pub fn handlers_ready(&self) -> bool {
        self.reload_handlers_ready.load(Ordering::SeqCst)
            && self.shutdown_handlers_ready.load(Ordering::SeqCst)
    }

    /// The running config.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Notified with the new version after every applied reload.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Whether `text` is the text of the running config.
    pub fn is_current_text(&self, text: &str) -> bool {
        *self
            .text
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            == text
    }

    /// Swaps in a new config; returns its version.
    pub fn apply(&self, text: String, config: Config) -> u64 {
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        let old = self.live();
        self.failed_auth.set_limit(config.auth.failed_per_minute);
        let live = build_live(version, config, &self.health, &self.metrics);
        // Forget health and gauges of targets that are gone.
        self.health.retain(|upstream, address| {
            live.pools.iter().any(|p| {
                p.upstream.name == upstream
                    && p.upstream.targets.iter().any(|t| t.address == *address)
            })
        });
        for pool in &old.pools {
            let now = live
                .pools
                .iter()
                .find(|p| p.upstream.name == pool.upstream.name)
                .map_or(0, |p| p.upstream.targets.len());
            self.metrics.forget_targets(
                &pool.upstream.name,
                now..pool.upstream.targets.len().max(now),
            );
        }
        self.live.store(Arc::new(live));
        *self
            .text
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = text;
        self.publish_gauges();
        self.changed.send_replace(version);
        version
    }

    fn publish_gauges(&self) {
        let live = self.live();
        self.metrics
            .config_version
            .set(i64::try_from(live.version).unwrap_or(i64::MAX));
        let loaded = live
            .loaded_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.metrics.config_loaded.set(loaded);
        self.publish_health();
    }

    /// Sets the availability gauge of every target.
    pub fn publish_health(&self) {
        let now = now_ms();
        for pool in &self.live().pools {
            for (position, health) in pool.health.iter().enumerate() {
                self.metrics.set_target_healthy(
                    &pool.upstream.name,
                    position,
                    health.is_available(now),
                );
            }
        }
    }
}

fn build_live(version: u64, config: Config, health: &HealthRegistry, metrics: &Metrics) -> Live {
    let pools: Vec<Arc<Pool>> = config
        .upstreams
        .into_iter()
        .map(|upstream| Arc::new(Pool::new(upstream, health)))
        .collect();
    let upstream_metrics = pools
        .iter()
        .map(|pool| metrics.upstream(&pool.upstream.name))
        .collect();
    let route_metrics = config
        .routes
        .iter()
        .map(|route| metrics.route(&route.name))
        .collect();
    debug_assert!(config.routes.iter().all(|route| match route.action {
        RouteAction::Proxy(i) => i < pools.len(),
        RouteAction::Respond(_) | RouteAction::Usage => true,
    }));
    Live {
        version,
        loaded_at: SystemTime::now(),
        routes: RouteTable::new(config.routes),
        route_metrics,
        no_route_metrics: metrics.route(crate::metrics::NO_ROUTE),
        pools,
        upstream_metrics,
        limits: config.limits,
        security_headers: config.security_headers,
        metering: config.metering,
        trusted_proxies: config.auth.trusted_proxies,
    }
}

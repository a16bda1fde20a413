//! Active health checks: `GET <path>` on every target of every upstream that configures them.
//!
//! One task per checked upstream; all of them are restarted when the config changes (the health
//! state itself lives in the registry and survives). A target is healthy after
//! `healthy_threshold` answers in 200..=399 in a row and unhealthy after `unhealthy_threshold`
//! failures (connection error, timeout or another status) in a row.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::connectors::ConnectorOptions;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use tokio::task::JoinSet;

use crate::config::HealthCheck;
use crate::state::Gateway;
use crate::upstream::Pool;

/// The background service.
pub struct HealthChecker {
    gateway: Arc<Gateway>,
    /// The proxy's own connector settings (upstream CAs), so checks judge TLS as requests do.
    connector: ConnectorOptions,
}

impl std::fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthChecker").finish_non_exhaustive()
    }
}

impl HealthChecker {
    /// Checks the upstreams of `gateway`'s running config.
    pub fn new(gateway: Arc<Gateway>, connector: ConnectorOptions) -> Self {
        Self { gateway, connector }
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut changes = self.gateway.subscribe();
        let connector = Arc::new(Connector::new(Some(self.connector.clone())));
        loop {
            let mut tasks = JoinSet::new();
            for pool in &self.gateway.live().pools {
                if let Some(check) = pool.upstream.health_check.clone() {
                    let pool = pool.clone();
                    let gateway = self.gateway.clone();
                    let connector = connector.clone();
                    tasks
                        .spawn(async move { check_forever(gateway, pool, check, connector).await });
                }
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = changes.changed() => {
                    tasks.shutdown().await;
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

async fn check_forever(
    gateway: Arc<Gateway>,
    pool: Arc<Pool>,
    check: HealthCheck,
    connector: Arc<Connector>,
) {
    let mut interval = tokio::time::interval(check.interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let mut probes = JoinSet::new();
        for position in 0..pool.upstream.targets.len() {
            let (pool, check, connector) = (pool.clone(), check.clone(), connector.clone());
            probes
                .spawn(async move { (position, probe(&pool, position, &check, &connector).await) });
        }
        while let Some(Ok((position, result))) = probes.join_next().await {
            let target = pool.target(position);
            let health = &pool.health[position];
            if let Some(healthy) = health.record_check(
                result.is_ok(),
                check.healthy_threshold,
                check.unhealthy_threshold,
            ) {
                if healthy {
                    tracing::info!(upstream = %pool.upstream.name, target = %target.name, "health check: target is healthy again");
                } else {
                    tracing::warn!(
                        upstream = %pool.upstream.name,
                        target = %target.name,
                        reason = %result.err().unwrap_or_default(),
                        "health check: target marked unhealthy"
                    );
                }
                gateway.metrics.set_target_healthy(
                    &pool.upstream.name,
                    position,
                    health.is_available(crate::upstream::health::now_ms()),
                );
            }
        }
    }
}

async fn probe(
    pool: &Pool,
    position: usize,
    check: &HealthCheck,
    connector: &Connector,
) -> Result<(), String> {
    let upstream = &pool.upstream;
    let target = pool.target(position);
    let mut peer = HttpPeer::new(target.address, upstream.tls, upstream.sni_for(target));
    peer.options.connection_timeout = Some(check.timeout);
    peer.options.total_connection_timeout = Some(check.timeout);
    peer.options.read_timeout = Some(check.timeout);
    peer.options.write_timeout = Some(check.timeout);
    let host = check.host.clone().unwrap_or_else(|| target.name.clone());
    let exchange = async {
        // A fresh connection each time: a pooled one could hide a target that stopped accepting.
        let (mut session, _) = connector
            .get_http_session(&peer)
            .await
            .map_err(|e| e.to_string())?;
        let mut request =
            RequestHeader::build("GET", check.path.as_bytes(), None).map_err(|e| e.to_string())?;
        request
            .insert_header("host", host)
            .map_err(|e| e.to_string())?;
        request
            .insert_header("user-agent", "tollgate-health-check")
            .map_err(|e| e.to_string())?;
        request
            .insert_header("connection", "close")
            .map_err(|e| e.to_string())?;
        session
            .write_request_header(Box::new(request))
            .await
            .map_err(|e| e.to_string())?;
        session
            .finish_request_body()
            .await
            .map_err(|e| e.to_string())?;
        session
            .read_response_header()
            .await
            .map_err(|e| e.to_string())?;
        let status = session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(0);
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(check.timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

//! The upstream side of a request: which target it goes to and with which timeouts, what a
//! failure to reach it means for the target's health, and whether to try another.

use std::time::Instant;

use pingora::proxy::Session;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

use super::RequestCtx;
use super::problem::GatewayProblem;
use crate::config::RouteAction;
use crate::state::Gateway;
use crate::upstream::health::now_ms;

/// The target of the next attempt, and its timeouts: the route's upstream's, the read timeout
/// capped by what is left of `request_timeout`.
pub fn choose(session: &Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
    // A second handle on the config, so `ctx` can be updated while the pool is borrowed.
    let live = ctx.live.clone();
    let Some(&RouteAction::Proxy(upstream_index)) = ctx.route().map(|r| &r.action) else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "upstream_peer without a proxy route",
        ));
    };
    let pool = &live.pools[upstream_index];
    // A retry replays the buffered body through `request_body_filter`: count it afresh.
    ctx.body_bytes = 0;
    let Some(target_index) = pool.pick(&ctx.failed, now_ms()) else {
        let problem = if ctx.attempts == 0 {
            GatewayProblem::NoHealthyTarget
        } else {
            GatewayProblem::UpstreamUnreachable
        };
        let status = problem.status();
        ctx.problem = Some(problem);
        return Err(Error::explain(
            ErrorType::HTTPStatus(status),
            "no available target",
        ));
    };
    let upstream = &pool.upstream;
    let target = pool.target(target_index);
    let timeouts = upstream.timeouts;
    let upgrade = session.is_upgrade_req();
    // After an upgrade the read timeout is how long a WebSocket may stay silent.
    let mut read_timeout = if upgrade {
        timeouts.read.max(timeouts.websocket_idle)
    } else {
        timeouts.read
    };
    if let Some(total) = timeouts.request
        && !upgrade
    {
        let deadline = *ctx.deadline.get_or_insert(ctx.started + total);
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(Error::explain(
                ErrorType::HTTPStatus(504),
                "request_timeout elapsed",
            ));
        }
        read_timeout = read_timeout.min(remaining);
    }
    let mut peer = HttpPeer::new(target.address, upstream.tls, upstream.sni_for(target));
    peer.options.connection_timeout = Some(timeouts.connect);
    peer.options.total_connection_timeout = Some(timeouts.connect);
    peer.options.read_timeout = Some(read_timeout);
    peer.options.write_timeout = Some(timeouts.write);
    peer.options.idle_timeout = Some(timeouts.idle);
    if ctx.attempts > 0 {
        live.upstream_metrics[upstream_index].retries.inc();
    }
    ctx.attempts += 1;
    ctx.target = Some(target_index);
    ctx.upstream_started.get_or_insert_with(Instant::now);
    Ok(Box::new(peer))
}

/// A connection to the target failed: the target's failure is recorded, and the request is
/// retried only when another target can take it.
pub fn connect_failed(gateway: &Gateway, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
    mark_target_failure(gateway, ctx);
    if let Some(target) = ctx.target {
        ctx.failed.push(target);
    }
    // Retry only when another target can take the request; otherwise the client gets the
    // status of this failure (504 for a connect timeout, 502 for a refusal).
    let another = ctx.pool().is_some_and(|(pool, _)| {
        ctx.failed.len() <= pool.upstream.connect_retries
            && pool.has_available(&ctx.failed, now_ms())
    });
    e.set_retry(another);
    e
}

/// The exchange with the target failed after connecting.
pub fn proxy_failed(
    gateway: &Gateway,
    peer: &HttpPeer,
    session: &Session,
    e: Box<Error>,
    ctx: &RequestCtx,
    client_reused: bool,
) -> Box<Error> {
    // A WebSocket that stays silent past its idle timeout says nothing about the target.
    if GatewayProblem::is_target_failure(&e) && !session.was_upgraded() {
        mark_target_failure(gateway, ctx);
    }
    let mut e = e.more_context(format!("peer: {peer}"));
    // Only idempotent requests whose body can be replayed are retried, and only on a reused
    // connection (the target may simply have closed an idle one).
    if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated() {
        e.set_retry(false);
    } else {
        e.retry.decide_reuse(client_reused);
    }
    e
}

/// The target's response header arrived: the upstream's time and the target's success.
pub fn answered(ctx: &mut RequestCtx) {
    if ctx.upstream_elapsed.is_none()
        && let Some(started) = ctx.upstream_started
    {
        let elapsed = started.elapsed();
        ctx.upstream_elapsed = Some(elapsed);
        if let Some((pool, index)) = ctx.pool() {
            ctx.live.upstream_metrics[index]
                .duration
                .observe(elapsed.as_secs_f64());
            if let Some(target) = ctx.target {
                pool.health[target].record_success();
            }
        }
    }
}

fn mark_target_failure(gateway: &Gateway, ctx: &RequestCtx) {
    let Some((pool, index)) = ctx.pool() else {
        return;
    };
    let Some(target) = ctx.target else {
        return;
    };
    ctx.live.upstream_metrics[index].failures.inc();
    if pool.health[target].record_failure(&pool.upstream.passive, now_ms()) {
        tracing::warn!(
            upstream = %pool.upstream.name,
            target = %pool.target(target).name,
            fail_timeout_ms = pool.upstream.passive.fail_timeout.as_millis() as u64,
            "target marked down after consecutive failures"
        );
        gateway
            .metrics
            .set_target_healthy(&pool.upstream.name, target, false);
    }
}

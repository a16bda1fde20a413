//! What a finished request leaves behind: its metrics, and one structured access-log line
//! (target `tollgate::access`) unless the access log is off.

use http::header::HOST;
use pingora::Error;
use pingora::proxy::Session;

use super::RequestCtx;

/// Records the request in the route's metrics and, when `access_log` is on, in the access log.
pub fn record(session: &Session, e: Option<&Error>, ctx: &RequestCtx, access_log: bool) {
    let status = session.response_written().map_or(0, |h| h.status.as_u16());
    let elapsed = ctx.started.elapsed();
    let req = session.req_header();
    let metrics = ctx
        .route
        .map_or(&ctx.live.no_route_metrics, |i| &ctx.live.route_metrics[i]);
    metrics.record(&req.method, status, elapsed.as_secs_f64());
    if !access_log {
        return;
    }
    let target = ctx
        .pool()
        .zip(ctx.target)
        .map(|((pool, _), t)| pool.target(t).name.as_str());
    tracing::info!(
        target: "tollgate::access",
        request_id = %ctx.request_id,
        client = %session.client_addr().map(ToString::to_string).unwrap_or_default(),
        method = %req.method,
        host = req.uri.host().or_else(|| req.headers.get(HOST).and_then(|h| h.to_str().ok())).unwrap_or(""),
        path = req.uri.path(),
        route = ctx.route().map_or(crate::metrics::NO_ROUTE, |r| r.name.as_str()),
        status,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        upstream_target = target.unwrap_or(""),
        upstream_ms = ctx.upstream_elapsed.map(|d| d.as_secs_f64() * 1000.0),
        attempts = ctx.attempts,
        bytes_in = session.body_bytes_read(),
        bytes_out = session.body_bytes_sent(),
        error = e.map(|e| e.etype().as_str()).unwrap_or(""),
        "request"
    );
}

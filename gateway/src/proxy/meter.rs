//! Plans on the request path: the rate-limit and quota decision in `request_filter`, and its
//! settlement in `logging`.

use pingora::proxy::Session;

use super::RequestCtx;
use super::problem::GatewayProblem;
use crate::limits::Verdict;
use crate::state::Gateway;

/// Decides the authenticated request of `ctx` against its customer's plan; the problem to answer
/// when it is refused. The decision stays in `ctx` for the response headers and the settlement.
pub async fn admit(gateway: &Gateway, ctx: &mut RequestCtx) -> Option<GatewayProblem> {
    let (caller, _) = ctx.caller.as_ref()?;
    let decision = gateway
        .limiter
        .admit(&caller.customer, &caller.plan, caller.billing_period, 1)
        .await;
    let problem = match decision.verdict {
        Verdict::Admitted => None,
        Verdict::RateLimited => Some(GatewayProblem::RateLimited {
            retry_after: decision.retry_after(),
        }),
        Verdict::QuotaExceeded => Some(GatewayProblem::QuotaExceeded {
            retry_after: decision.retry_after(),
            upgrade_url: caller.plan.upgrade_url.clone(),
        }),
    };
    ctx.limit = Some(decision);
    problem
}

/// Settles the request's quota reservation once it is over: a request that got no response, one
/// the gateway answered itself after admitting it (the upstream failed, the body was too large),
/// and one the upstream answered with a 5xx (unless `refund_upstream_5xx` is off) give their unit
/// back.
pub async fn settle(gateway: &Gateway, session: &Session, ctx: &RequestCtx) {
    let Some(reservation) = ctx.limit.as_ref().and_then(|d| d.reservation.as_ref()) else {
        return;
    };
    let Some((caller, _)) = &ctx.caller else {
        return;
    };
    let refund = match session.response_written().map(|h| h.status.as_u16()) {
        None => true,
        Some(_) if ctx.proxy_failed => true,
        Some(status) => status >= 500 && ctx.live.metering.refund_upstream_5xx,
    };
    if refund {
        gateway.limiter.refund(&caller.customer, reservation).await;
    }
}

//! Plans on the request path: the rate-limit and quota decision in `request_filter`, the usage
//! record as the response header goes out, and the settlement in `logging`.

use std::sync::Arc;

use pingora::proxy::Session;

use super::RequestCtx;
use super::problem::GatewayProblem;
use crate::identity::index::IdText;
use crate::limits::Verdict;
use crate::metering::Metered;
use crate::metering::record::Usage;
use crate::state::Gateway;

/// Decides the authenticated request of `ctx` against its customer's plan; the problem to answer
/// when it is refused. The decision stays in `ctx` for the response headers and the settlement.
pub async fn admit(gateway: &Gateway, ctx: &mut RequestCtx) -> Option<GatewayProblem> {
    let (caller, _) = ctx.caller.as_ref()?;
    let meter = gateway.meter.as_ref()?;
    // Its usage could not be recorded: refused before anything is counted.
    if meter.spool.is_full() {
        meter.metrics.full_refusal();
        tracing::error!(
            bytes = meter.spool.bytes(),
            "the usage spool is full: metered requests are refused until the ledger takes it"
        );
        return Some(GatewayProblem::MeteringUnavailable);
    }
    let decision = gateway
        .limiter
        .admit(&caller.customer, &caller.plan, caller.billing_period, 1)
        .await;
    let problem = match decision.verdict {
        Verdict::Admitted => {
            ctx.metered = Some(Metered {
                meter: Arc::clone(meter),
                written: None,
            });
            None
        }
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

/// Whether a response with `status` counts: not when the gateway answered for an upstream that
/// failed, nor (unless turned off) when the upstream answered with a 5xx.
fn counts(status: u16, ctx: &RequestCtx) -> bool {
    let refunded_5xx = status >= 500 && ctx.live.metering.refund_upstream_5xx;
    !(ctx.proxy_failed || refunded_5xx)
}

/// Records the usage of an admitted request as its response header goes out, before the client
/// can have any of it: from here on the request counts, even if this process dies.
pub fn on_response_header(session: &Session, ctx: &mut RequestCtx, status: u16) {
    let Some(metered) = &ctx.metered else {
        return;
    };
    if metered.written.is_some() {
        return;
    }
    let (Some(decision), Some((caller, _))) = (&ctx.limit, &ctx.caller) else {
        return;
    };
    let Some(reservation) = decision.reservation else {
        return;
    };
    let counted = counts(status, ctx);
    let id = IdText::new(b"evt", &uuid::Uuid::now_v7().into_bytes());
    let customer_id = IdText::new(b"cus", &caller.customer);
    let key_id = caller.key.map(|key| IdText::new(b"key", &key));
    let usage = Usage {
        id: id.as_str(),
        request_id: &ctx.request_id,
        customer_id: customer_id.as_str(),
        key_id: key_id.as_ref().map(IdText::as_str),
        route: ctx.route().map_or("", |r| r.name.as_str()),
        method: method_label(session.req_header().method.as_str()),
        status: status.clamp(100, 599),
        latency_us: latency_us(ctx),
        bytes_in: session.body_bytes_read() as u64,
        bytes_out: 0,
        at_ms: decision.at_ms,
        units: if counted { reservation.units } else { 0 },
        overage: if counted { reservation.overage } else { 0 },
    };
    let written = metered.meter.append_pending(&usage);
    if let Some(metered) = &mut ctx.metered {
        metered.written = Some(written);
    }
}

/// Microseconds since the request arrived.
fn latency_us(ctx: &RequestCtx) -> u64 {
    u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The method as the ledger takes it (an HTTP token of at most 32 bytes): a longer one, which
/// only a client playing games sends, is recorded as `OTHER` rather than let it make the
/// control plane refuse the batch it is in.
fn method_label(method: &str) -> &str {
    if method.len() <= 32 { method } else { "OTHER" }
}

/// Settles the request once it is over: its final usage record (latency and sizes), and its
/// quota unit given back when it must not count (no response reached the client, the gateway
/// answered for a failed upstream, or the upstream answered 5xx).
pub async fn settle(gateway: &Gateway, session: &Session, ctx: &mut RequestCtx) {
    let Some(reservation) = ctx.limit.as_ref().and_then(|d| d.reservation) else {
        return;
    };
    let Some((caller, _)) = &ctx.caller else {
        return;
    };
    if let Some((metered, written)) = ctx
        .metered
        .as_ref()
        .and_then(|m| Some((m, m.written.as_ref()?)))
    {
        metered.meter.write_final(
            written,
            latency_us(ctx),
            session.body_bytes_read() as u64,
            session.body_bytes_sent() as u64,
        );
    }
    if given_back(ctx) > 0 {
        gateway.limiter.refund(&caller.customer, &reservation).await;
    }
}

/// The units of the request's reservation its settlement gives back: all of them when no usage
/// record counts it (none was written: no response reached the client; or the one written
/// counts nothing), else none. The limit headers report the quota with these given back.
pub fn given_back(ctx: &RequestCtx) -> u64 {
    let Some(reservation) = ctx.limit.as_ref().and_then(|d| d.reservation) else {
        return 0;
    };
    match ctx.metered.as_ref().and_then(|m| m.written.as_ref()) {
        Some(written) if written.units > 0 => 0,
        _ => reservation.units,
    }
}

/// The gateway answers `status` for a failed upstream after the upstream's response header was
/// recorded (in `response_filter`) but before it went out to the client: the request does not
/// count, and its usage record says what the client got.
pub fn answered_instead(ctx: &mut RequestCtx, status: u16) {
    if let Some(written) = ctx.metered.as_mut().and_then(|m| m.written.as_mut()) {
        written.answered_instead(status);
    }
}

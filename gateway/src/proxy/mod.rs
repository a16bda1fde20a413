//! The request path: a thin [`ProxyHttp`] that matches the route, answers what the gateway
//! answers itself, picks a target and decorates the response.
//!
//! # Layout
//! - [`problem`]: the problems the gateway answers with, and the one mapping from errors to them.
//! - [`respond`]: writing gateway-generated responses; headers every response carries.
//! - [`request_id`]: `X-Request-Id` validation and generation.
//! - `access_log`: the metrics and the access-log line of each finished request.
//! - [`auth`]: API-key authentication and the identity headers the upstream receives.
//! - `cors`: the route's CORS policy: preflights answered, its headers on every response.
//! - `ctx`: per-request state.
//! - `forward`: the request as the upstream receives it.
//! - `meter`: the rate-limit and quota decision, and its settlement once the request is over.
//! - `peer`: the target of each attempt, its timeouts, and what its failures mean.
//! - `usage`: the calling customer's usage, on routes with `usage = true`.

mod access_log;
pub mod auth;
mod cors;
mod ctx;
mod forward;
pub(crate) mod meter;
mod peer;
pub mod problem;
pub mod request_id;
pub mod respond;
pub(crate) mod usage;

use ctx::InFlight;
pub use ctx::RequestCtx;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONTENT_LENGTH, HOST};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::compression::ResponseCompression;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType, Result};

use crate::config::{Limits, RouteAction};
use crate::routing::{Miss, has_dot_segment};
use crate::state::Gateway;
use problem::GatewayProblem;

/// The proxy service.
#[derive(Debug, Clone)]
pub struct Proxy {
    gateway: Arc<Gateway>,
}

impl Proxy {
    /// A proxy over the gateway's running config.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            live: self.gateway.live(),
            request_id: String::new(),
            tls: false,
            route: None,
            miss: None,
            started: Instant::now(),
            failed: Vec::new(),
            target: None,
            attempts: 0,
            upstream_started: None,
            upstream_elapsed: None,
            deadline: None,
            body_bytes: 0,
            problem: None,
            caller: None,
            limit: None,
            proxy_failed: false,
            metered: None,
            preflight: false,
            cors_origin: None,
            _in_flight: InFlight::new(&self.gateway.metrics.in_flight),
        }
    }

    /// Runs before Pingora's modules see the request, so the route's compression setting is in
    /// place when the compression module reads `Accept-Encoding`. Only matches; `request_filter`
    /// answers.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let req = session.req_header();
        ctx.request_id = request_id::from_header(
            req.headers
                .get(request_id::HEADER)
                .map(HeaderValue::as_bytes),
        );
        ctx.tls = session
            .digest()
            .is_some_and(|digest| digest.ssl_digest.is_some());
        let host = req
            .uri
            .host()
            .or_else(|| req.headers.get(HOST).and_then(|h| h.to_str().ok()));
        let routes = &ctx.live.routes;
        // A CORS preflight is matched by the method it asks about, on a route with a policy.
        let preflight = cors::preflight_method(req)
            .and_then(|asked| routes.find(host, req.uri.path(), &asked).ok())
            .filter(|&index| routes.routes()[index].cors.is_some());
        ctx.preflight = preflight.is_some();
        match preflight.map_or_else(|| routes.find(host, req.uri.path(), &req.method), Ok) {
            Ok(index) => {
                ctx.route = Some(index);
                if let Some(cors) = &routes.routes()[index].cors {
                    ctx.cors_origin = cors::allowed_origin(req, cors);
                }
            }
            Err(miss) => ctx.miss = Some(miss),
        }
        if let Some(level) = ctx.route().and_then(|route| route.compression_level)
            && let Some(compression) = session
                .downstream_modules_ctx
                .get_mut::<ResponseCompression>()
        {
            compression.adjust_level(level);
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(problem) = check_headers(session.req_header(), &ctx.live.limits) {
            respond::problem(session, ctx, &problem).await?;
            return Ok(true);
        }
        if has_dot_segment(session.req_header().uri.path()) {
            respond::problem(session, ctx, &GatewayProblem::InvalidPath).await?;
            return Ok(true);
        }
        if let Some(miss) = ctx.miss.take() {
            let problem = match miss {
                Miss::NotFound => GatewayProblem::NoRoute,
                Miss::MethodNotAllowed(allowed) => GatewayProblem::MethodNotAllowed(allowed),
            };
            respond::problem(session, ctx, &problem).await?;
            return Ok(true);
        }
        let Some(route) = ctx.route() else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no route and no miss",
            ));
        };
        if ctx.preflight {
            cors::answer_preflight(session, ctx).await?;
            return Ok(true);
        }
        if let Some(length) = content_length(session.req_header())
            && length > route.max_request_body_bytes
        {
            let problem = GatewayProblem::BodyTooLarge {
                limit: route.max_request_body_bytes,
            };
            respond::problem(session, ctx, &problem).await?;
            return Ok(true);
        }
        let metered = route.metered;
        if route.auth.required() {
            let peer = session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip());
            let client =
                auth::client_address(peer, session.req_header(), &ctx.live.trusted_proxies);
            match auth::authenticate(&self.gateway, session.req_header(), route, client) {
                Ok(caller) => ctx.caller = Some(caller),
                Err(problem) => {
                    respond::problem(session, ctx, &problem).await?;
                    return Ok(true);
                }
            }
            if metered && let Some(problem) = meter::admit(&self.gateway, ctx).await {
                respond::problem(session, ctx, &problem).await?;
                return Ok(true);
            }
        }
        // A second handle on the config, so `ctx` can be written while the route is borrowed.
        let live = Arc::clone(&ctx.live);
        let Some(route) = ctx.route.map(|i| &live.routes.routes()[i]) else {
            return Err(Error::explain(ErrorType::InternalError, "route vanished"));
        };
        match &route.action {
            RouteAction::Respond(response) => {
                let body = response.body.clone();
                respond::write(
                    session,
                    ctx,
                    response.status.as_u16(),
                    &response.headers,
                    body,
                )
                .await?;
                Ok(true)
            }
            RouteAction::Usage => {
                usage::answer(&self.gateway, session, ctx).await?;
                Ok(true)
            }
            RouteAction::Proxy(_) => Ok(false),
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(chunk) = body else { return Ok(()) };
        ctx.body_bytes += chunk.len() as u64;
        let limit = ctx.route().map_or(u64::MAX, |r| r.max_request_body_bytes);
        if ctx.body_bytes > limit && !session.was_upgraded() {
            ctx.problem = Some(GatewayProblem::BodyTooLarge { limit });
            return Err(Error::explain(
                ErrorType::HTTPStatus(413),
                "request body over the limit",
            ));
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        peer::choose(session, ctx)
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        e: Box<Error>,
    ) -> Box<Error> {
        peer::connect_failed(&self.gateway, ctx, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        peer::proxy_failed(&self.gateway, peer, session, e, ctx, client_reused)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        forward::prepare(session, upstream_request, ctx)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        peer::answered(ctx);
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = upstream_response.status;
        // An interim response (`100 Continue`, `103 Early Hints`) comes before the response:
        // the request is recorded and decorated when its final status is known. A `101` is
        // final (the connection is switched).
        if status.is_informational() && status != http::StatusCode::SWITCHING_PROTOCOLS {
            return Ok(());
        }
        meter::on_response_header(session, ctx, status.as_u16());
        respond::decorate(upstream_response, ctx, false)
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(deadline) = ctx.deadline
            && Instant::now() > deadline
        {
            return Err(
                Error::new_up(ErrorType::ReadTimedout).more_context("request_timeout elapsed")
            );
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        ctx.proxy_failed = true;
        let problem = ctx.problem.take().or_else(|| GatewayProblem::from_error(e));
        let error_code = match problem {
            // Nothing sent yet but perhaps an interim `100 Continue`: the final response is
            // still ours to write.
            Some(problem)
                if session
                    .response_written()
                    .is_none_or(|header| header.status.is_informational()) =>
            {
                // Pingora closes the client connection after a failed proxy attempt; say so, or
                // a client may send its next request on a connection that is going away.
                session.set_keepalive(None);
                // An upstream header already recorded (filtered, then its body failed before
                // either went out) is not what the client gets.
                meter::answered_instead(ctx, problem.status());
                if let Err(error) = respond::problem(session, ctx, &problem).await {
                    tracing::debug!(request_id = %ctx.request_id, %error, "cannot write the error response");
                }
                problem.status()
            }
            Some(problem) => problem.status(),
            None => 0,
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        meter::settle(&self.gateway, session, ctx).await;
        access_log::record(session, e, ctx, self.gateway.log.access_log);
    }
}

fn content_length(req: &RequestHeader) -> Option<u64> {
    req.headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn check_headers(req: &RequestHeader, limits: &Limits) -> Option<GatewayProblem> {
    let count = req.headers.len();
    if count > limits.max_request_headers {
        return Some(GatewayProblem::HeadersTooLarge {
            detail: format!(
                "{count} headers exceed the limit of {}",
                limits.max_request_headers
            ),
        });
    }
    let bytes: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > limits.max_request_header_bytes {
        return Some(GatewayProblem::HeadersTooLarge {
            detail: format!(
                "{bytes} bytes of headers exceed the limit of {}",
                limits.max_request_header_bytes
            ),
        });
    }
    None
}

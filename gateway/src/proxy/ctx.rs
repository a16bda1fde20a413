//! Per-request state, created when a request arrives and dropped when it is logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Route, RouteAction, SecurityHeaders};
use crate::routing::Miss;
use crate::state::Live;
use crate::upstream::Pool;

use super::problem::GatewayProblem;

/// Per-request state.
#[derive(Debug)]
pub struct RequestCtx {
    /// The config this request runs under, from its start to its end.
    pub live: Arc<Live>,
    /// The request id, kept or generated.
    pub request_id: String,
    /// Whether the client connected over TLS.
    pub tls: bool,
    pub(super) route: Option<usize>,
    pub(super) miss: Option<Miss>,
    pub(super) started: Instant,
    /// Targets that refused or timed out a connection, by position in the pool.
    pub(super) failed: Vec<usize>,
    /// The target of the current attempt.
    pub(super) target: Option<usize>,
    /// Attempts made, retries included.
    pub(super) attempts: usize,
    pub(super) upstream_started: Option<Instant>,
    pub(super) upstream_elapsed: Option<Duration>,
    pub(super) deadline: Option<Instant>,
    pub(super) body_bytes: u64,
    pub(super) problem: Option<GatewayProblem>,
    /// The authenticated caller, on routes that require one.
    pub(super) caller: Option<(crate::identity::Caller, super::auth::Source)>,
    /// The rate-limit and quota decision, on metered routes.
    pub(super) limit: Option<crate::limits::Decision>,
    /// Set when the gateway answered instead of the upstream after the request was admitted.
    pub(super) proxy_failed: bool,
    /// The usage of an admitted metered request.
    pub(super) metered: Option<crate::metering::Metered>,
    /// A CORS preflight the route's policy answers (matched by the method it asks about).
    pub(super) preflight: bool,
    /// The `Access-Control-Allow-Origin` the route's CORS policy gives this request's origin.
    pub(super) cors_origin: Option<http::HeaderValue>,
    /// Held for its `Drop`, which ends the request's count in flight.
    pub(super) _in_flight: InFlight,
}

impl RequestCtx {
    /// The matched route, if any.
    pub fn route(&self) -> Option<&Route> {
        self.route.map(|i| &self.live.routes.routes()[i])
    }

    /// The security headers that apply: the route's, or the global ones.
    pub fn security_headers(&self) -> &SecurityHeaders {
        self.route()
            .map_or(&self.live.security_headers, |route| &route.security_headers)
    }

    pub(super) fn pool(&self) -> Option<(&Pool, usize)> {
        match self.route()?.action {
            RouteAction::Proxy(index) => Some((&self.live.pools[index], index)),
            RouteAction::Respond(_) | RouteAction::Usage => None,
        }
    }
}

/// Counts a request in flight for as long as its context lives.
#[derive(Debug)]
pub(super) struct InFlight(prometheus::IntGauge);

impl InFlight {
    pub(super) fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

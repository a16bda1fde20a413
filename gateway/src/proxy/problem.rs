//! The problems the gateway answers with itself, and the one place errors become statuses.

use http::Method;
use pingora::{Error, ErrorSource, ErrorType};
use tollgate_model::Problem;

use crate::identity::Refusal;

/// A response the gateway produces instead of a proxied one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayProblem {
    /// No route matches host and path (404).
    NoRoute,
    /// A route matches but not this method (405).
    MethodNotAllowed(Vec<Method>),
    /// The body is over the route's limit (413).
    BodyTooLarge { limit: u64 },
    /// Too many or too large headers (431).
    HeadersTooLarge { detail: String },
    /// The request is malformed (400).
    BadRequest,
    /// The path has `.` or `..` segments (400).
    InvalidPath,
    /// A CORS preflight from an origin the route's policy does not name (403).
    OriginNotAllowed,
    /// Every target of the upstream is marked down (503).
    NoHealthyTarget,
    /// No connection to any tried target could be made, or the upstream broke the exchange (502).
    UpstreamUnreachable,
    /// The upstream did not answer in time (504).
    UpstreamTimeout,
    /// Something failed inside the gateway (500).
    Internal,
    /// The credential was missing or refused (401, 403, or 503 without identities).
    Refused(Refusal),
    /// Too many failed authentications from this client address (429).
    TooManyFailedAuthentications {
        /// Seconds until the address may try again.
        retry_after: u64,
    },
    /// A rate-limit window of the customer's plan is full (429).
    RateLimited {
        /// Seconds until it has room.
        retry_after: u64,
    },
    /// The usage spool is full: a metered request could not be recorded (503).
    MeteringUnavailable,
    /// The usage ledger did not answer for a usage view (503).
    UsageUnavailable,
    /// The customer's hard quota for the period is spent (429).
    QuotaExceeded {
        /// Seconds until the period ends.
        retry_after: u64,
        /// The plan's upgrade URL.
        upgrade_url: Option<String>,
    },
}

impl GatewayProblem {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::NoRoute => 404,
            Self::MethodNotAllowed(_) => 405,
            Self::BodyTooLarge { .. } => 413,
            Self::HeadersTooLarge { .. } => 431,
            Self::BadRequest | Self::InvalidPath => 400,
            Self::OriginNotAllowed => 403,
            Self::NoHealthyTarget | Self::MeteringUnavailable | Self::UsageUnavailable => 503,
            Self::UpstreamUnreachable => 502,
            Self::UpstreamTimeout => 504,
            Self::Internal => 500,
            Self::Refused(Refusal::Suspended | Refusal::OutOfScope | Refusal::UnknownCustomer) => {
                403
            }
            Self::Refused(Refusal::Unavailable) => 503,
            Self::Refused(Refusal::Repeated(_)) => 400,
            Self::Refused(_) => 401,
            Self::TooManyFailedAuthentications { .. }
            | Self::RateLimited { .. }
            | Self::QuotaExceeded { .. } => 429,
        }
    }

    /// The RFC 9457 body, with a detail safe to show to any client.
    pub fn to_problem(&self, request_id: &str) -> Problem {
        let (slug, title, detail) = match self {
            Self::NoRoute => (
                "no-route",
                "No route matches this request",
                "no route is configured for this host and path".to_owned(),
            ),
            Self::MethodNotAllowed(allowed) => (
                "method-not-allowed",
                "Method not allowed",
                format!(
                    "this path accepts {}",
                    allowed
                        .iter()
                        .map(Method::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Self::BodyTooLarge { limit } => (
                "request-too-large",
                "Request body too large",
                format!("the request body exceeds the limit of {limit} bytes"),
            ),
            Self::HeadersTooLarge { detail } => (
                "headers-too-large",
                "Request headers too large",
                detail.clone(),
            ),
            Self::BadRequest => (
                "bad-request",
                "Bad request",
                "the request could not be parsed".to_owned(),
            ),
            Self::InvalidPath => (
                "invalid-path",
                "Invalid path",
                "the path has a \".\" or \"..\" segment; send the resolved path".to_owned(),
            ),
            Self::OriginNotAllowed => (
                "origin-not-allowed",
                "Origin not allowed",
                "this route's CORS policy does not name the request's origin".to_owned(),
            ),
            Self::NoHealthyTarget => (
                "upstream-unavailable",
                "Upstream unavailable",
                "no healthy upstream target is available; retry later".to_owned(),
            ),
            Self::UpstreamUnreachable => (
                "upstream-unreachable",
                "Bad gateway",
                "the upstream service could not be reached or failed to answer".to_owned(),
            ),
            Self::UpstreamTimeout => (
                "upstream-timeout",
                "Gateway timeout",
                "the upstream service did not answer in time".to_owned(),
            ),
            Self::Internal => (
                "internal",
                "Internal error",
                "the gateway failed to handle the request".to_owned(),
            ),
            Self::Refused(
                Refusal::InvalidToken(reason)
                | Refusal::UnknownSigningKey(reason)
                | Refusal::InvalidClaims(reason),
            ) => (
                "invalid-token",
                "Invalid token",
                format!("the JWT was refused: {reason}"),
            ),
            Self::Refused(refusal) => {
                let (slug, title, detail) = refusal_text(*refusal);
                (slug, title, detail.to_owned())
            }
            Self::TooManyFailedAuthentications { retry_after } => (
                "too-many-failed-authentications",
                "Too many failed authentications",
                format!(
                    "too many invalid credentials came from this address; retry in {retry_after} s"
                ),
            ),
            Self::UsageUnavailable => (
                "usage-unavailable",
                "Usage unavailable",
                "your usage cannot be read right now; retry shortly".to_owned(),
            ),
            Self::MeteringUnavailable => (
                "metering-unavailable",
                "Metering unavailable",
                "usage cannot be recorded right now; retry shortly".to_owned(),
            ),
            Self::RateLimited { retry_after } => (
                "rate-limited",
                "Rate limit exceeded",
                format!("your plan's rate limit is reached; retry in {retry_after} s"),
            ),
            Self::QuotaExceeded { retry_after, .. } => (
                "quota-exceeded",
                "Quota exceeded",
                format!(
                    "your plan's quota for this period is used up; it resets in {retry_after} s"
                ),
            ),
        };
        let upgrade_url = match self {
            Self::QuotaExceeded { upgrade_url, .. } => upgrade_url.clone(),
            _ => None,
        };
        Problem::new(slug, title, self.status())
            .with_detail(detail)
            .with_request_id(request_id)
            .with_upgrade_url(upgrade_url)
    }

    /// What to answer for an error raised while proxying; `None` when the client is gone and no
    /// response can be written.
    pub fn from_error(error: &Error) -> Option<Self> {
        use ErrorType::*;
        let problem = match (error.etype(), error.esource()) {
            (HTTPStatus(413), _) => Self::BodyTooLarge { limit: 0 },
            (HTTPStatus(400), _) => Self::BadRequest,
            (HTTPStatus(503), _) => Self::NoHealthyTarget,
            (HTTPStatus(504), _) => Self::UpstreamTimeout,
            (HTTPStatus(code), _) if (500..600).contains(code) => Self::UpstreamUnreachable,
            (ConnectTimedout | ReadTimedout | WriteTimedout, ErrorSource::Upstream) => {
                Self::UpstreamTimeout
            }
            (_, ErrorSource::Upstream) => Self::UpstreamUnreachable,
            (
                ReadError | WriteError | ConnectionClosed | ReadTimedout | WriteTimedout,
                ErrorSource::Downstream,
            ) => {
                return None;
            }
            (_, ErrorSource::Downstream) => Self::BadRequest,
            (_, ErrorSource::Internal | ErrorSource::Unset) => Self::Internal,
        };
        Some(problem)
    }

    /// Whether this error counts against a target's passive health.
    pub fn is_target_failure(error: &Error) -> bool {
        use ErrorType::*;
        error.esource() == &ErrorSource::Upstream
            && matches!(
                error.etype(),
                ConnectTimedout
                    | ConnectRefused
                    | ConnectNoRoute
                    | ConnectError
                    | TLSHandshakeFailure
                    | TLSHandshakeTimedout
                    | ReadTimedout
                    | WriteTimedout
            )
    }
}

fn refusal_text(refusal: Refusal) -> (&'static str, &'static str, &'static str) {
    match refusal {
        Refusal::Missing(what) => ("missing-credential", "Authentication required", what),
        Refusal::Repeated(what) => (
            "repeated-credential",
            "Credential sent more than once",
            what,
        ),
        Refusal::InvalidToken(_) | Refusal::UnknownSigningKey(_) | Refusal::InvalidClaims(_) => {
            ("invalid-token", "Invalid token", "the JWT was refused")
        }
        Refusal::ExpiredToken => ("expired-token", "Expired token", "the JWT has expired"),
        Refusal::UnknownCustomer => (
            "unknown-customer",
            "Unknown customer",
            "the token's customer claim names no customer of this API",
        ),
        Refusal::Malformed => (
            "malformed-key",
            "Malformed API key",
            "this is not a Tollgate API key: check that it was copied whole",
        ),
        Refusal::Unknown => ("unknown-key", "Unknown API key", "no such API key"),
        Refusal::Revoked => (
            "revoked-key",
            "Revoked API key",
            "this API key was revoked or replaced",
        ),
        Refusal::Expired => ("expired-key", "Expired API key", "this API key has expired"),
        Refusal::Suspended => (
            "customer-suspended",
            "Customer suspended",
            "the customer this credential belongs to is suspended",
        ),
        Refusal::OutOfScope => (
            "key-not-allowed",
            "API key not allowed here",
            "this API key's scopes do not include this route",
        ),
        Refusal::Unavailable => (
            "identities-unavailable",
            "Authentication unavailable",
            "the gateway has not yet received its API keys; retry shortly",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_timeouts_are_504_and_refusals_502() {
        let timeout = Error::new_up(ErrorType::ReadTimedout);
        assert_eq!(
            GatewayProblem::from_error(&timeout),
            Some(GatewayProblem::UpstreamTimeout)
        );
        let refused = Error::new_up(ErrorType::ConnectRefused);
        assert_eq!(
            GatewayProblem::from_error(&refused),
            Some(GatewayProblem::UpstreamUnreachable)
        );
        assert!(GatewayProblem::is_target_failure(&refused));
    }

    #[test]
    fn a_vanished_client_gets_no_response() {
        let gone = Error::new_down(ErrorType::ConnectionClosed);
        assert_eq!(GatewayProblem::from_error(&gone), None);
        assert!(!GatewayProblem::is_target_failure(&gone));
    }

    #[test]
    fn internal_errors_never_leak_their_message() {
        let error = Error::explain(
            ErrorType::InternalError,
            "secret database password is hunter2",
        );
        let problem = GatewayProblem::from_error(&error).unwrap();
        let body = String::from_utf8(problem.to_problem("rid").to_json()).unwrap();
        assert!(!body.contains("hunter2"));
        assert!(body.contains(r#""status":500"#));
    }
}

//! Writing responses the gateway produces itself, and the headers every response carries.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderName, HeaderValue};
use pingora::Result;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use tollgate_model::PROBLEM_CONTENT_TYPE;

use super::RequestCtx;
use super::problem::GatewayProblem;
use super::request_id;
use crate::config::SecurityHeaders;
use crate::identity::Refusal;

static STRICT_TRANSPORT_SECURITY: HeaderName = http::header::STRICT_TRANSPORT_SECURITY;
static CONTENT_SECURITY_POLICY: HeaderName = http::header::CONTENT_SECURITY_POLICY;

/// Adds the request id and the route's security headers to a response. Headers an upstream set
/// itself are kept. `generated` adds the CSP meant for bodies the gateway wrote.
pub fn decorate(header: &mut ResponseHeader, ctx: &RequestCtx, generated: bool) -> Result<()> {
    header.insert_header(request_id::HEADER, ctx.request_id.as_str())?;
    if let Some(decision) = &ctx.limit {
        // A response that will not count (the gateway's answer for a failed upstream, a refunded
        // upstream 5xx) shows the quota as its settlement in `logging` leaves it. Its usage
        // record is written by now (before this call on every path), and says so.
        let given_back = super::meter::given_back(ctx);
        crate::limits::headers::write(header, decision, given_back)?;
    }
    if let Some(cors) = ctx.route().and_then(|route| route.cors.as_ref()) {
        super::cors::decorate(header, cors, ctx.cors_origin.as_ref(), !generated)?;
    }
    let security = ctx.security_headers();
    add_security_headers(header, security, ctx.tls, generated)
}

fn add_security_headers(
    header: &mut ResponseHeader,
    security: &SecurityHeaders,
    tls: bool,
    generated: bool,
) -> Result<()> {
    for (name, value) in &security.always {
        if !header.headers.contains_key(name) {
            header.insert_header(name.clone(), value.clone())?;
        }
    }
    if tls
        && let Some(hsts) = &security.hsts
        && !header.headers.contains_key(&STRICT_TRANSPORT_SECURITY)
    {
        header.insert_header(STRICT_TRANSPORT_SECURITY.clone(), hsts.clone())?;
    }
    if generated
        && let Some(csp) = &security.csp
        && !header.headers.contains_key(&CONTENT_SECURITY_POLICY)
    {
        header.insert_header(CONTENT_SECURITY_POLICY.clone(), csp.clone())?;
    }
    Ok(())
}

/// Writes a complete response with the given status, headers and body.
pub async fn write(
    session: &mut Session,
    ctx: &mut RequestCtx,
    status: u16,
    headers: &[(HeaderName, HeaderValue)],
    body: Bytes,
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(headers.len() + 8))?;
    for (name, value) in headers {
        header.append_header(name.clone(), value.clone())?;
    }
    // A 204 has no body, so no length either (RFC 9110, section 8.6).
    if status != 204 {
        header.insert_header(CONTENT_LENGTH, body.len())?;
    }
    super::meter::on_response_header(session, ctx, status);
    decorate(&mut header, ctx, true)?;
    // An unread request body would have to be drained before the connection could be reused;
    // closing is cheaper and cannot be stalled by a slow client.
    if !session.is_body_done() && may_have_body(session.req_header()) {
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    let body = if head_only { Bytes::new() } else { body };
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// Writes a problem response. Keep-alive is turned off when the request body may be unread, so
/// the gateway never has to drain a large or slow body first.
pub async fn problem(
    session: &mut Session,
    ctx: &mut RequestCtx,
    problem: &GatewayProblem,
) -> Result<()> {
    let mut headers = vec![
        (CONTENT_TYPE, HeaderValue::from_static(PROBLEM_CONTENT_TYPE)),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    if let GatewayProblem::MethodNotAllowed(allowed) = problem {
        let list = allowed
            .iter()
            .map(http::Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(value) = HeaderValue::from_str(&list) {
            headers.push((http::header::ALLOW, value));
        }
    }
    match problem {
        GatewayProblem::NoHealthyTarget => {
            headers.push((http::header::RETRY_AFTER, HeaderValue::from_static("1")));
        }
        GatewayProblem::MeteringUnavailable
        | GatewayProblem::UsageUnavailable
        | GatewayProblem::Refused(Refusal::Unavailable) => {
            headers.push((http::header::RETRY_AFTER, HeaderValue::from_static("5")));
        }
        GatewayProblem::Refused(refusal) => {
            if let Some(challenge) = challenge(*refusal) {
                headers.push((http::header::WWW_AUTHENTICATE, challenge));
            }
        }
        GatewayProblem::TooManyFailedAuthentications { retry_after }
        | GatewayProblem::RateLimited { retry_after }
        | GatewayProblem::QuotaExceeded { retry_after, .. } => {
            headers.push((http::header::RETRY_AFTER, HeaderValue::from(*retry_after)));
        }
        _ => {}
    }
    let body = problem.to_problem(&ctx.request_id).to_json();
    write(session, ctx, problem.status(), &headers, Bytes::from(body)).await
}

/// The `WWW-Authenticate` challenge of a refusal (RFC 6750 section 3): none where the credential
/// is not at fault (a suspended customer, a gateway without identities).
fn challenge(refusal: Refusal) -> Option<HeaderValue> {
    let value = match refusal {
        Refusal::Missing(_) => "Bearer realm=\"tollgate\"",
        Refusal::Repeated(_) => "Bearer realm=\"tollgate\", error=\"invalid_request\"",
        Refusal::OutOfScope => "Bearer realm=\"tollgate\", error=\"insufficient_scope\"",
        Refusal::Suspended | Refusal::UnknownCustomer | Refusal::Unavailable => return None,
        Refusal::Malformed
        | Refusal::Unknown
        | Refusal::Revoked
        | Refusal::Expired
        | Refusal::InvalidToken(_)
        | Refusal::UnknownSigningKey(_)
        | Refusal::InvalidClaims(_)
        | Refusal::ExpiredToken => "Bearer realm=\"tollgate\", error=\"invalid_token\"",
    };
    Some(HeaderValue::from_static(value))
}

fn may_have_body(req: &pingora::http::RequestHeader) -> bool {
    req.headers.contains_key(http::header::TRANSFER_ENCODING)
        || req
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

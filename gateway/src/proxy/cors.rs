//! CORS on routes with a policy (`cors = { ... }`): the gateway answers preflights itself,
//! before any credential is asked for (browsers send none with them), and puts the policy's
//! headers on every response of the route, its own answers included, so that a page can read a
//! 401 or a 429 and its limit headers. A route without a policy is left as it was: no header
//! added, and an `OPTIONS` goes where any request would.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderName, HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use crate::config::Cors;

use super::RequestCtx;
use super::problem::GatewayProblem;
use super::respond;

/// The CORS headers an upstream may set, which the route's policy replaces: two
/// `Access-Control-Allow-Origin` headers make a browser refuse the response, and an upstream
/// must not open the route wider than its policy.
static UPSTREAM_CORS_HEADERS: [HeaderName; 6] = [
    ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_ALLOW_CREDENTIALS,
    ACCESS_CONTROL_EXPOSE_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_MAX_AGE,
];

/// The method a CORS preflight asks about: an `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`.
pub fn preflight_method(req: &RequestHeader) -> Option<Method> {
    if req.method != Method::OPTIONS || !req.headers.contains_key(ORIGIN) {
        return None;
    }
    let asked = req.headers.get(ACCESS_CONTROL_REQUEST_METHOD)?;
    Method::from_bytes(asked.as_bytes()).ok()
}

/// The `Access-Control-Allow-Origin` a request from `req`'s origin gets under `cors`: `*` on
/// a route open to every origin (on every response, with an `Origin` or not, so that a cache
/// may hand any of them to any page), else the origin itself when the policy names it; `None`
/// otherwise.
pub fn allowed_origin(req: &RequestHeader, cors: &Cors) -> Option<HeaderValue> {
    // Validated: a route open to every origin takes no credentials.
    if cors.origins.is_none() {
        return Some(HeaderValue::from_static("*"));
    }
    let origin = req.headers.get(ORIGIN)?;
    cors.allows(origin.as_bytes()).then(|| origin.clone())
}

/// Puts the policy's headers on a response of the route, on an upstream's in place of its own
/// CORS headers (`proxied`): for an allowed origin, who may read it and which headers; and
/// `Vary: Origin` where the answer depends on the origin, so that a shared cache does not hand
/// one origin's answer to another.
pub fn decorate(
    header: &mut ResponseHeader,
    cors: &Cors,
    origin: Option<&HeaderValue>,
    proxied: bool,
) -> Result<()> {
    if proxied {
        for name in &UPSTREAM_CORS_HEADERS {
            // One lookup whether or not it is there.
            header.remove_header(name);
        }
    }
    if cors.origins.is_some() || cors.allow_credentials {
        header.append_header(VARY, HeaderValue::from_static("Origin"))?;
    }
    let Some(origin) = origin else {
        return Ok(());
    };
    header.insert_header(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone())?;
    if cors.allow_credentials {
        header.insert_header(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        )?;
    }
    header.insert_header(ACCESS_CONTROL_EXPOSE_HEADERS, cors.expose_headers.clone())?;
    Ok(())
}

/// The headers of the answer to an allowed preflight (with those of [`decorate`]): the route's
/// methods, the headers a page may send, how long the browser may keep the answer, and that
/// the answer depends on what the preflight asked (which route matched it, or none).
pub fn preflight_headers(cors: &Cors) -> [(HeaderName, HeaderValue); 4] {
    [
        (ACCESS_CONTROL_ALLOW_METHODS, cors.allow_methods.clone()),
        (ACCESS_CONTROL_ALLOW_HEADERS, cors.allow_headers.clone()),
        (ACCESS_CONTROL_MAX_AGE, cors.max_age.clone()),
        (
            VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        ),
    ]
}

/// Answers the preflight of `ctx` (matched on a route with a policy): 204 with the policy's
/// headers for an origin it names, else 403 `origin-not-allowed` (which a browser reports as a
/// failed preflight, and which says why to anyone reading it).
pub async fn answer_preflight(session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
    // A second handle on the config, so `ctx` can be written while the policy is borrowed.
    let live = std::sync::Arc::clone(&ctx.live);
    let Some(cors) = ctx
        .route
        .and_then(|index| live.routes.routes()[index].cors.as_ref())
    else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "a preflight on a route without a CORS policy",
        ));
    };
    if ctx.cors_origin.is_none() {
        return respond::problem(session, ctx, &GatewayProblem::OriginNotAllowed).await;
    }
    respond::write(
        session,
        ctx,
        204,
        &preflight_headers(cors),
        bytes::Bytes::new(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: Option<&[&str]>, allow_credentials: bool) -> Cors {
        Cors {
            origins: origins.map(|list| {
                list.iter()
                    .map(|o| crate::config::AllowedOrigin::parse(o).unwrap())
                    .collect()
            }),
            allow_credentials,
            allow_methods: HeaderValue::from_static("GET, POST"),
            allow_headers: HeaderValue::from_static("authorization, x-api-key"),
            expose_headers: HeaderValue::from_static("ratelimit, x-request-id"),
            max_age: HeaderValue::from_static("3600"),
        }
    }

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/orders", None).unwrap();
        for (name, value) in headers {
            req.insert_header(name.to_string(), *value).unwrap();
        }
        req
    }

    #[test]
    fn a_preflight_is_an_options_with_an_origin_and_the_method_it_asks_about() {
        let asks = [
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "POST"),
        ];
        assert_eq!(
            preflight_method(&request("OPTIONS", &asks)),
            Some(Method::POST)
        );
        assert_eq!(preflight_method(&request("GET", &asks)), None);
        assert_eq!(preflight_method(&request("OPTIONS", &asks[1..])), None);
        assert_eq!(preflight_method(&request("OPTIONS", &asks[..1])), None);
    }

    #[test]
    fn an_allowed_origin_is_echoed_or_answered_with_a_star() {
        let from = |origin| request("GET", &[("origin", origin)]);
        let listed = cors(Some(&["https://app.example.com"]), false);
        assert_eq!(
            allowed_origin(&from("https://app.example.com"), &listed).unwrap(),
            "https://app.example.com"
        );
        assert_eq!(allowed_origin(&from("https://evil.test"), &listed), None);
        assert_eq!(allowed_origin(&request("GET", &[]), &listed), None);
        let any = cors(None, false);
        assert_eq!(
            allowed_origin(&from("https://evil.test"), &any).unwrap(),
            "*"
        );
        assert_eq!(
            allowed_origin(&request("GET", &[]), &any).unwrap(),
            "*",
            "the same answer for a request without an Origin, which a cache may hand to a page"
        );
    }

    #[test]
    fn the_policy_replaces_the_upstream_s_cors_headers() {
        let mut header = ResponseHeader::build(200, None).unwrap();
        header
            .insert_header("access-control-allow-origin", "*")
            .unwrap();
        header
            .insert_header("access-control-allow-credentials", "true")
            .unwrap();
        header.insert_header("vary", "Accept-Encoding").unwrap();
        let policy = cors(Some(&["https://app.example.com"]), false);
        let origin = HeaderValue::from_static("https://app.example.com");
        decorate(&mut header, &policy, Some(&origin), true).unwrap();
        assert_eq!(
            header.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert!(
            !header
                .headers
                .contains_key("access-control-allow-credentials")
        );
        assert_eq!(
            header.headers["access-control-expose-headers"],
            "ratelimit, x-request-id"
        );
        let vary: Vec<_> = header.headers.get_all("vary").iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);
        // An origin the policy does not name: nothing opens the response to it.
        let mut header = ResponseHeader::build(200, None).unwrap();
        header
            .insert_header("access-control-allow-origin", "*")
            .unwrap();
        decorate(&mut header, &policy, None, true).unwrap();
        assert!(!header.headers.contains_key("access-control-allow-origin"));
        assert_eq!(header.headers["vary"], "Origin");
    }

    #[test]
    fn credentials_are_allowed_only_where_the_policy_says_so() {
        let policy = cors(Some(&["https://app.example.com"]), true);
        let origin = HeaderValue::from_static("https://app.example.com");
        let mut header = ResponseHeader::build(401, None).unwrap();
        decorate(&mut header, &policy, Some(&origin), false).unwrap();
        assert_eq!(header.headers["access-control-allow-credentials"], "true");
        assert_eq!(
            header.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(header.headers["vary"], "Origin");
        // Open to every origin: `*`, and nothing varies with the origin.
        let mut header = ResponseHeader::build(200, None).unwrap();
        let star = HeaderValue::from_static("*");
        decorate(&mut header, &cors(None, false), Some(&star), true).unwrap();
        assert!(
            !header
                .headers
                .contains_key("access-control-allow-credentials")
        );
        assert!(!header.headers.contains_key("vary"));
    }
}

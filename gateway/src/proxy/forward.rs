//! What the upstream receives: the rewritten path, the `Host` it expects, the request id, the
//! caller's identity in place of its credential, and `X-Forwarded-*` headers describing the
//! client.

use http::HeaderValue;
use http::header::HOST;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use super::RequestCtx;
use super::request_id;
use crate::routing::strip_prefix;

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_FORWARDED_HOST: &str = "x-forwarded-host";

/// Rewrites the request sent upstream.
pub fn prepare(
    session: &Session,
    upstream_request: &mut RequestHeader,
    ctx: &RequestCtx,
) -> Result<()> {
    let Some(route) = ctx.route() else {
        return Ok(());
    };
    if route.strip_prefix {
        let path = upstream_request
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str());
        let stripped = strip_prefix(&route.path_prefix, path);
        let uri = stripped
            .parse::<http::Uri>()
            .map_err(|e| Error::because(ErrorType::InternalError, "stripped path", e))?;
        upstream_request.set_uri(uri);
    }
    let client_host = upstream_request.headers.get(HOST).cloned().or_else(|| {
        session
            .req_header()
            .uri
            .host()
            .and_then(|h| HeaderValue::from_str(h).ok())
    });
    if let Some(host) = &client_host {
        upstream_request.insert_header(X_FORWARDED_HOST, host.clone())?;
    }
    if let Some((pool, _)) = ctx.pool()
        && let Some(host) = &pool.upstream.host_header
    {
        upstream_request.insert_header(HOST, host.clone())?;
    } else if let Some(host) = client_host
        && !upstream_request.headers.contains_key(HOST)
    {
        // HTTP/2 clients send :authority, HTTP/1.1 upstreams need Host.
        upstream_request.insert_header(HOST, host)?;
    }
    super::auth::rewrite_upstream(upstream_request, route, ctx.caller.as_ref())?;
    upstream_request.insert_header(request_id::HEADER, ctx.request_id.as_str())?;
    if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
        let ip = client.ip().to_string();
        let forwarded = match upstream_request
            .headers
            .get(X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
        {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip,
        };
        upstream_request.insert_header(X_FORWARDED_FOR, forwarded)?;
    }
    upstream_request.insert_header(X_FORWARDED_PROTO, if ctx.tls { "https" } else { "http" })?;
    Ok(())
}

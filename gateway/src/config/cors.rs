//! A route's CORS policy (`cors = { allowed_origins = [...] }`): which web origins may call it
//! from a browser, checked once at load and turned into the header values the gateway sends.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

use super::file::CorsConfig;
use super::validate::Errors;

/// Request headers a browser may always send on a CORS route: the credentials the gateway
/// reads, a JSON body's type, and the request id.
const ALWAYS_ALLOWED: [&str; 4] = ["authorization", "content-type", "x-api-key", "x-request-id"];

/// Response headers a page may always read beside the limit headers: `Retry-After` and the
/// request id (a browser hides every header but a few unless the response names it).
const ALWAYS_EXPOSED: [&str; 2] = ["retry-after", "x-request-id"];

/// The longest `max_age`: a day, past which browsers cap it anyway.
const MAX_AGE_LIMIT: Duration = Duration::from_secs(86_400);

/// Methods a preflight allows on a route that accepts every method.
const EVERY_METHOD: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// A route's CORS policy, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// The origins allowed; `None` is any origin.
    pub origins: Option<Vec<AllowedOrigin>>,
    /// Pages may send credentials (cookies, TLS client certificates, HTTP authentication).
    pub allow_credentials: bool,
    /// `Access-Control-Allow-Methods`: the route's methods.
    pub allow_methods: HeaderValue,
    /// `Access-Control-Allow-Headers`.
    pub allow_headers: HeaderValue,
    /// `Access-Control-Expose-Headers`.
    pub expose_headers: HeaderValue,
    /// `Access-Control-Max-Age`, in seconds.
    pub max_age: HeaderValue,
}

impl Cors {
    /// Whether a page of `origin` may call the route.
    pub fn allows(&self, origin: &[u8]) -> bool {
        match &self.origins {
            None => true,
            Some(origins) => origins.iter().any(|allowed| allowed.matches(origin)),
        }
    }
}

/// An origin a CORS policy names, checked ([`AllowedOrigin::parse`] is the only way to one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(Pattern);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// One origin, as browsers send it (`https://app.example.com`, lowercase).
    Exact(String),
    /// Every subdomain of a domain (`https://*.example.com`): `scheme` with its `://`
    /// (`https://`), then one or more labels, then `suffix`: what followed the `*`, from its
    /// dot (`.example.com`, and the port if one was named; lowercase).
    Subdomains { scheme: String, suffix: String },
}

impl AllowedOrigin {
    /// `origin` as configured (`scheme://host[:port]`, or `scheme://*.domain[:port]`), or why
    /// it is not one.
    pub fn parse(origin: &str) -> Result<Self, &'static str> {
        let origin = origin.to_ascii_lowercase();
        let Some((scheme, rest)) = origin.split_once("://") else {
            return Err("must be an origin such as \"https://app.example.com\" (scheme and host)");
        };
        let default_port = match scheme {
            "https" => "443",
            "http" => "80",
            _ => return Err("must start with https:// or http://"),
        };
        const WHOLE_LABELS: &str =
            "a wildcard stands for whole first labels only, as in \"https://*.example.com\"";
        let (host, wildcard) = match rest.strip_prefix('*') {
            None => (rest, false),
            Some(after) => match after.strip_prefix('.') {
                Some(domain) => (domain, true),
                None if after.is_empty() => ("", true),
                None => return Err(WHOLE_LABELS),
            },
        };
        if host.contains(['/', '?', '#', ' ', '@']) {
            return Err(
                "must be a scheme and host with no path, such as \"https://app.example.com\" (an \
                 origin has no path)",
            );
        }
        if host.contains('*') {
            return Err(WHOLE_LABELS);
        }
        let (name, port) = split_port(host);
        if name.is_empty() {
            return Err(if wildcard {
                "a wildcard must be followed by a domain, as in \"https://*.example.com\""
            } else {
                "must name a host, such as \"https://app.example.com\""
            });
        }
        if let Some(port) = port {
            if port == default_port {
                return Err(
                    "names the scheme's default port, which browsers leave out of Origin: write \
                     the origin without it",
                );
            }
            if port.parse::<u16>().map_or(true, |p| p == 0)
                || !port.bytes().all(|b| b.is_ascii_digit())
            {
                return Err("the port must be a number from 1 to 65535");
            }
        }
        if !wildcard {
            return Ok(Self(Pattern::Exact(origin)));
        }
        if !name.contains('.') || name.split('.').any(str::is_empty) {
            return Err(
                "a wildcard must leave a domain of two labels or more, as in \
                 \"https://*.example.com\" (\"https://*.com\" would allow every site under .com)",
            );
        }
        if name
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err("a wildcard over an IP address names other addresses: list each origin");
        }
        Ok(Self(Pattern::Subdomains {
            suffix: format!(".{host}"),
            scheme: format!("{scheme}://"),
        }))
    }

    /// Whether a page of `origin` (the `Origin` header's bytes) is this one.
    fn matches(&self, origin: &[u8]) -> bool {
        match &self.0 {
            Pattern::Exact(allowed) => allowed.as_bytes().eq_ignore_ascii_case(origin),
            Pattern::Subdomains { scheme, suffix } => {
                let Some(rest) = strip_prefix_ignoring_case(origin, scheme.as_bytes()) else {
                    return false;
                };
                let Some(labels) = rest
                    .len()
                    .checked_sub(suffix.len())
                    .filter(|&at| rest[at..].eq_ignore_ascii_case(suffix.as_bytes()))
                    .map(|at| &rest[..at])
                else {
                    return false;
                };
                // One or more labels: letters, digits and hyphens, separated by single dots
                // (what a browser sends for a host name; `a.evil.test:1#` and the like are not).
                !labels.is_empty()
                    && labels.split(|&b| b == b'.').all(|label| {
                        !label.is_empty()
                            && label
                                .iter()
                                .all(|&b| b.is_ascii_alphanumeric() || b == b'-')
                    })
            }
        }
    }
}

/// A host and its port, if it names one (`[::1]:3000` is `[::1]` and `3000`).
fn split_port(host: &str) -> (&str, Option<&str>) {
    let after_name = if host.starts_with('[') {
        host.find(']').map_or(host.len(), |end| end + 1)
    } else {
        host.find(':').unwrap_or(host.len())
    };
    let (name, port) = host.split_at(after_name);
    (name, port.strip_prefix(':'))
}

/// `bytes` without `prefix`, compared without regard to ASCII case.
fn strip_prefix_ignoring_case<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = bytes.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &bytes[prefix.len()..])
}

impl Cors {
    /// This policy on a route accepting `methods` (`None`: all), as a preflight answers them.
    pub(super) fn for_methods(&self, methods: Option<&[Method]>) -> Cors {
        Cors {
            allow_methods: allow_methods(methods),
            ..self.clone()
        }
    }
}

/// `Access-Control-Allow-Methods` of a route accepting `methods` (`None`: all).
fn allow_methods(methods: Option<&[Method]>) -> HeaderValue {
    // Methods are tokens, which are header values.
    match methods {
        None => HeaderValue::from_static(EVERY_METHOD),
        Some(methods) => list_value(methods.iter().map(Method::as_str)),
    }
}

/// Checks a `cors` table at `path` (`[cors]`, or a route's), for a route accepting `methods`
/// (`None`: all); `None` when it is turned off (`enabled = false`) or has a mistake.
pub(super) fn check_cors(
    file: &CorsConfig,
    methods: Option<&[Method]>,
    path: &str,
    errors: &mut Errors,
) -> Option<Cors> {
    if !file.enabled {
        return None;
    }
    let before = errors.0.len();
    let any = file.allowed_origins.iter().any(|origin| origin == "*");
    if file.allowed_origins.is_empty() {
        errors.push(
            format!("{path}.allowed_origins"),
            "must name at least one origin, such as \"https://app.example.com\", or be [\"*\"]",
        );
    } else if any && file.allowed_origins.len() > 1 {
        errors.push(
            format!("{path}.allowed_origins"),
            "\"*\" allows every origin: list it alone",
        );
    }
    if any && file.allow_credentials {
        errors.push(
            format!("{path}.allow_credentials"),
            "cannot be true with allowed_origins = [\"*\"]: browsers refuse credentials from a \
             route open to every origin; list the origins",
        );
    }
    let origins: Vec<AllowedOrigin> = file
        .allowed_origins
        .iter()
        .enumerate()
        .filter(|(_, origin)| *origin != "*")
        .filter_map(|(i, origin)| match AllowedOrigin::parse(origin) {
            Ok(allowed) => Some(allowed),
            Err(why) => {
                errors.push(format!("{path}.allowed_origins[{i}]"), why);
                None
            }
        })
        .collect();
    let allow_headers = header_list(
        ALWAYS_ALLOWED
            .iter()
            .map(|name| (*name).to_owned())
            .collect(),
        &file.allowed_headers,
        &format!("{path}.allowed_headers"),
        errors,
    );
    let always_exposed = crate::limits::headers::NAMES
        .iter()
        .chain(&ALWAYS_EXPOSED)
        .map(|name| name.to_ascii_lowercase())
        .collect();
    let expose_headers = header_list(
        always_exposed,
        &file.exposed_headers,
        &format!("{path}.exposed_headers"),
        errors,
    );
    if file.max_age > MAX_AGE_LIMIT {
        errors.push(
            format!("{path}.max_age"),
            "must be at most 24h (browsers keep a preflight's answer no longer)",
        );
    }
    (errors.0.len() == before).then(|| Cors {
        origins: (!any).then_some(origins),
        allow_credentials: file.allow_credentials,
        allow_methods: allow_methods(methods),
        allow_headers,
        expose_headers,
        max_age: HeaderValue::from(file.max_age.as_secs()),
    })
}

/// The names in `always` (lower case), then each of `extra` not among them, as one header
/// value; each of `extra` must be a header name.
fn header_list(
    mut names: Vec<String>,
    extra: &[String],
    path: &str,
    errors: &mut Errors,
) -> HeaderValue {
    for (i, name) in extra.iter().enumerate() {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(parsed) if !names.iter().any(|known| known == parsed.as_str()) => {
                names.push(parsed.as_str().to_owned());
            }
            Ok(_) => {}
            Err(_) => errors.push(
                format!("{path}[{i}]"),
                format!("invalid header name {name:?}"),
            ),
        }
    }
    list_value(names.iter().map(String::as_str))
}

/// Tokens (methods, header names) as one comma-separated header value.
fn list_value<'a>(tokens: impl Iterator<Item = &'a str>) -> HeaderValue {
    let list = tokens.collect::<Vec<_>>().join(", ");
    // Tokens are visible ASCII, so always a header value.
    HeaderValue::from_str(&list).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(origins: &[&str]) -> CorsConfig {
        CorsConfig {
            enabled: true,
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            allowed_headers: Vec::new(),
            exposed_headers: Vec::new(),
            max_age: Duration::from_secs(600),
            allow_credentials: false,
        }
    }

    fn check(file: &CorsConfig, methods: Option<&[Method]>) -> Result<Cors, Vec<String>> {
        let mut errors = Errors(Vec::new());
        let cors = check_cors(file, methods, "routes[0].cors", &mut errors);
        match cors {
            Some(cors) if errors.0.is_empty() => Ok(cors),
            _ => Err(errors.0.iter().map(ToString::to_string).collect()),
        }
    }

    #[test]
    fn origins_match_exactly_whatever_their_case() {
        let cors = check(
            &config(&["https://App.example.com", "http://localhost:3000"]),
            None,
        )
        .unwrap();
        assert!(cors.allows(b"https://app.example.com"));
        assert!(cors.allows(b"http://localhost:3000"));
        assert!(!cors.allows(b"https://app.example.com:8443"));
        assert!(!cors.allows(b"https://evil.app.example.com"));
        assert!(!cors.allows(b"https://app.example.com.evil.test"));
        assert!(!cors.allows(b"null"));
        let any = check(&config(&["*"]), None).unwrap();
        assert!(any.allows(b"https://anything.test") && any.allows(b"null"));
    }

    #[test]
    fn a_wildcard_origin_allows_every_subdomain_of_its_domain_and_nothing_else() {
        let cors = check(
            &config(&[
                "https://*.Example.com",
                "http://*.dev.example.test:3000",
                "http://[::1]:3000",
            ]),
            None,
        )
        .unwrap();
        for allowed in [
            "https://app.example.com",
            "https://a.b.example.com",
            "https://App-1.EXAMPLE.com",
            "http://web.dev.example.test:3000",
            "http://[::1]:3000",
        ] {
            assert!(cors.allows(allowed.as_bytes()), "{allowed}");
        }
        for refused in [
            // The domain itself is no subdomain of it.
            "https://example.com",
            "https://.example.com",
            "https://a..example.com",
            // Another scheme, port or domain.
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://evilexample.com",
            "https://app.example.com.evil.test",
            "https://evil.test/.example.com",
            "https://evil.test?.example.com",
            "https://user@app.example.com",
            "http://web.dev.example.test",
            "http://web.dev.example.test:30001",
            "null",
        ] {
            assert!(!cors.allows(refused.as_bytes()), "{refused}");
        }
        // A wildcard stands only for whole first labels, over a domain of two labels at least.
        for (origin, why) in [
            ("https://*.com", "two labels"),
            ("https://*", "followed by a domain"),
            ("https://*.", "followed by a domain"),
            ("https://*.:8443", "followed by a domain"),
            ("https://app.*.example.com", "whole first labels"),
            ("https://*app.example.com", "whole first labels"),
            ("https://*.*.example.com", "whole first labels"),
            ("https://*.example.", "two labels"),
            ("https://*.example..com", "two labels"),
            ("http://*.0.0.1", "IP address"),
            ("https://*.example.com:", "from 1 to 65535"),
            ("https://*.example.com:abc", "from 1 to 65535"),
            ("https://*.example.com:443", "default port"),
            ("https://app.example.com:443", "default port"),
            ("http://app.example.com:80", "default port"),
            ("https://app.example.com:0", "from 1 to 65535"),
            ("https://app.example.com:99999", "from 1 to 65535"),
            ("https://:8443", "name a host"),
        ] {
            let errors = check(&config(&[origin]), None).unwrap_err();
            assert!(
                errors[0].starts_with("routes[0].cors.allowed_origins[0]:")
                    && errors[0].contains(why),
                "{origin}: {errors:?}"
            );
        }
    }

    #[test]
    fn the_lists_hold_the_defaults_then_the_route_s_own() {
        let mut file = config(&["https://app.example.com"]);
        file.allowed_headers = vec!["X-Trace".into(), "Authorization".into()];
        file.exposed_headers = vec!["ETag".into()];
        let methods = [Method::GET, Method::POST];
        let cors = check(&file, Some(&methods)).unwrap();
        assert_eq!(
            cors.allow_headers,
            "authorization, content-type, x-api-key, x-request-id, x-trace"
        );
        assert!(
            cors.expose_headers
                .to_str()
                .unwrap()
                .starts_with("ratelimit-policy, ratelimit, ")
        );
        assert!(
            cors.expose_headers
                .to_str()
                .unwrap()
                .ends_with("x-request-id, etag")
        );
        assert_eq!(cors.allow_methods, "GET, POST");
        assert_eq!(cors.max_age, "600");
        assert_eq!(check(&file, None).unwrap().allow_methods, EVERY_METHOD);
        // The global policy on a route of its own methods.
        let global = check(&file, None).unwrap();
        assert_eq!(global.for_methods(Some(&methods)), cors);
    }

    #[test]
    fn each_mistake_is_named_with_its_field() {
        let mut file = config(&[
            "app.example.com",
            "https://a.test/path",
            "ftp://a.test",
            "*",
        ]);
        file.allow_credentials = true;
        file.allowed_headers = vec!["bad header".into()];
        file.max_age = Duration::from_secs(2 * 86_400);
        let errors = check(&file, None).unwrap_err();
        let fields: Vec<&str> = errors
            .iter()
            .map(|e| e.split(':').next().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "routes[0].cors.allowed_origins",
                "routes[0].cors.allow_credentials",
                "routes[0].cors.allowed_origins[0]",
                "routes[0].cors.allowed_origins[1]",
                "routes[0].cors.allowed_origins[2]",
                "routes[0].cors.allowed_headers[0]",
                "routes[0].cors.max_age",
            ],
            "{errors:#?}"
        );
        assert!(check(&config(&[]), None).unwrap_err()[0].contains("at least one origin"));
        // Turned off: nothing to check, no policy.
        let mut off = config(&[]);
        off.enabled = false;
        let mut errors = Errors(Vec::new());
        assert_eq!(check_cors(&off, None, "routes[0].cors", &mut errors), None);
        assert!(errors.0.is_empty());
        let mut credentials = config(&["https://app.example.com"]);
        credentials.allow_credentials = true;
        assert!(check(&credentials, None).unwrap().allow_credentials);
    }
}

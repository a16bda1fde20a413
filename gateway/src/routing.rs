//! Route matching: host, then longest path prefix, then method.
//!
//! The table is built once per config and only read on the request path. Routes are kept sorted
//! most specific first (longer prefix, then exact host, then wildcard host, then any host), so a
//! lookup is one scan that stops at the first route whose host and prefix match and whose methods
//! allow the request. A scan over a few hundred short prefixes is cheaper than any map here.

use http::Method;

use crate::config::{HostMatch, Route};

/// The routes of one config, ordered for matching.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Indices into `routes`, most specific first.
    order: Vec<usize>,
}

/// Why no route was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// No route matches host and path.
    NotFound,
    /// Routes match host and path, but none allows this method; these do.
    MethodNotAllowed(Vec<Method>),
}

impl RouteTable {
    /// Orders `routes` for matching; their indices stay those of the file.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut order: Vec<usize> = (0..routes.len()).collect();
        order.sort_by_key(|&i| {
            let route = &routes[i];
            let host_rank = match &route.host {
                Some(HostMatch::Exact(_)) => 0,
                Some(HostMatch::Wildcard(suffix)) => 1 + usize::MAX / 2 - suffix.len(),
                None => usize::MAX,
            };
            // Routes with the same prefix stay together: two different prefixes of one length
            // never both match a path.
            (
                std::cmp::Reverse(route.path_prefix.len()),
                route.path_prefix.clone(),
                host_rank,
                route.methods.is_none(),
                i,
            )
        });
        Self { routes, order }
    }

    /// Every route, in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The file index of the route for a request. `host` may carry a port; `path` excludes the
    /// query.
    ///
    /// The longest matching prefix decides: when routes with that prefix exist but none allows
    /// the method, the answer is 405, never a route with a shorter prefix (a catch-all `/` route
    /// must not take the `POST` that a `GET`-only `/admin` route refuses).
    pub fn find(&self, host: Option<&str>, path: &str, method: &Method) -> Result<usize, Miss> {
        let host = host.map(strip_port);
        let mut allowed: Vec<Method> = Vec::new();
        let mut winning_prefix: Option<&str> = None;
        for &i in &self.order {
            let route = &self.routes[i];
            if winning_prefix.is_some_and(|prefix| prefix != route.path_prefix) {
                break;
            }
            if !prefix_matches(&route.path_prefix, path) || !host_matches(route.host.as_ref(), host)
            {
                continue;
            }
            winning_prefix = Some(&route.path_prefix);
            match &route.methods {
                None => return Ok(i),
                Some(methods) if methods.contains(method) => return Ok(i),
                Some(methods) => allowed.extend(methods.iter().cloned()),
            }
        }
        if allowed.is_empty() {
            Err(Miss::NotFound)
        } else {
            allowed.dedup();
            Err(Miss::MethodNotAllowed(allowed))
        }
    }
}

/// `/orders` matches `/orders`, `/orders/` and `/orders/7`, never `/ordersx`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

fn host_matches(rule: Option<&HostMatch>, host: Option<&str>) -> bool {
    match (rule, host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(HostMatch::Exact(name)), Some(host)) => host.eq_ignore_ascii_case(name),
        (Some(HostMatch::Wildcard(suffix)), Some(host)) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split_once(']').map_or(host, |(v6, _)| &v6[1..]);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

/// Whether `path` has a `.` or `..` segment an upstream might resolve.
///
/// Routes match the path as written; an upstream that resolves dot segments would otherwise see
/// `/public/../admin` as `/admin` after the gateway matched it as `/public`. Such paths are
/// refused rather than rewritten, as no well-behaved client sends them. Segments are split at
/// `/`, and also at `\`, `%2f` and `%5c` (which some servers decode into separators), and cut
/// at `;` (path parameters: some servers read `..;` as `..`); a segment is a dot segment when
/// what is left is `.` or `..`, written plainly or as `%2e`.
pub fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    let mut dots = 0usize;
    let mut other = false;
    let mut in_params = false;
    let mut i = 0;
    let dot_segment = |dots: usize, other: bool| !other && (dots == 1 || dots == 2);
    while i <= bytes.len() {
        let (separator, width) = match bytes.get(i) {
            None => (true, 1),
            Some(b'/' | b'\\') => (true, 1),
            Some(b'%')
                if matches!(bytes.get(i + 1..i + 3), Some(b"2f" | b"2F" | b"5c" | b"5C")) =>
            {
                (true, 3)
            }
            _ => (false, 1),
        };
        if separator {
            if dot_segment(dots, other) {
                return true;
            }
            dots = 0;
            other = false;
            in_params = false;
            i += width;
            continue;
        }
        if !in_params {
            match bytes[i] {
                b';' => in_params = true,
                b'.' => dots += 1,
                b'%' if matches!(bytes.get(i + 1..i + 3), Some(b"2e" | b"2E")) => {
                    dots += 1;
                    i += 2;
                }
                _ => other = true,
            }
        }
        i += 1;
    }
    false
}

/// The path (and query) sent upstream once `prefix` is removed from `path_and_query`.
pub fn strip_prefix(prefix: &str, path_and_query: &str) -> String {
    let rest = path_and_query
        .strip_prefix(prefix.trim_end_matches('/'))
        .unwrap_or(path_and_query);
    if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RouteAction, SecurityHeaders, StaticResponse};

    fn route(
        name: &str,
        prefix: &str,
        host: Option<HostMatch>,
        methods: Option<&[Method]>,
    ) -> Route {
        Route {
            name: name.to_owned(),
            host,
            path_prefix: prefix.to_owned(),
            methods: methods.map(<[Method]>::to_vec),
            strip_prefix: false,
            action: RouteAction::Respond(StaticResponse {
                status: http::StatusCode::OK,
                headers: Vec::new(),
                body: bytes::Bytes::new(),
            }),
            compression_level: None,
            max_request_body_bytes: 0,
            security_headers: SecurityHeaders::default(),
            auth: crate::config::RouteAuth::default(),
            metered: false,
            cors: None,
        }
    }

    fn name(
        table: &RouteTable,
        host: Option<&str>,
        path: &str,
        method: Method,
    ) -> Result<String, Miss> {
        table
            .find(host, path, &method)
            .map(|i| table.routes()[i].name.clone())
    }

    #[test]
    fn longest_prefix_wins_at_segment_boundaries() {
        let table = RouteTable::new(vec![
            route("root", "/", None, None),
            route("orders", "/orders", None, None),
            route("order-items", "/orders/items", None, None),
        ]);
        assert_eq!(
            name(&table, None, "/orders", Method::GET).unwrap(),
            "orders"
        );
        assert_eq!(
            name(&table, None, "/orders/7", Method::GET).unwrap(),
            "orders"
        );
        assert_eq!(
            name(&table, None, "/orders/items/3", Method::GET).unwrap(),
            "order-items"
        );
        assert_eq!(name(&table, None, "/ordersx", Method::GET).unwrap(), "root");
        assert_eq!(name(&table, None, "/", Method::GET).unwrap(), "root");
    }

    #[test]
    fn no_match_is_not_found() {
        let table = RouteTable::new(vec![route("orders", "/orders", None, None)]);
        assert_eq!(
            name(&table, None, "/users", Method::GET),
            Err(Miss::NotFound)
        );
        assert_eq!(
            name(&table, None, "/ordersx", Method::GET),
            Err(Miss::NotFound)
        );
    }

    #[test]
    fn exact_host_beats_wildcard_beats_any_host() {
        let table = RouteTable::new(vec![
            route("any", "/", None, None),
            route(
                "wild",
                "/",
                Some(HostMatch::Wildcard(".example.com".into())),
                None,
            ),
            route(
                "exact",
                "/",
                Some(HostMatch::Exact("api.example.com".into())),
                None,
            ),
        ]);
        assert_eq!(
            name(&table, Some("api.example.com:8080"), "/x", Method::GET).unwrap(),
            "exact"
        );
        assert_eq!(
            name(&table, Some("API.example.com"), "/x", Method::GET).unwrap(),
            "exact"
        );
        assert_eq!(
            name(&table, Some("www.example.com"), "/x", Method::GET).unwrap(),
            "wild"
        );
        assert_eq!(
            name(&table, Some("example.com"), "/x", Method::GET).unwrap(),
            "any"
        );
        assert_eq!(name(&table, None, "/x", Method::GET).unwrap(), "any");
    }

    #[test]
    fn longer_prefix_beats_more_specific_host() {
        let table = RouteTable::new(vec![
            route("host", "/", Some(HostMatch::Exact("a.test".into())), None),
            route("path", "/deep", None, None),
        ]);
        assert_eq!(
            name(&table, Some("a.test"), "/deep/x", Method::GET).unwrap(),
            "path"
        );
    }

    #[test]
    fn methods_select_among_routes_with_the_same_prefix() {
        let table = RouteTable::new(vec![
            route("read", "/items", None, Some(&[Method::GET, Method::HEAD])),
            route("write", "/items", None, Some(&[Method::POST])),
        ]);
        assert_eq!(name(&table, None, "/items", Method::GET).unwrap(), "read");
        assert_eq!(
            name(&table, None, "/items/1", Method::POST).unwrap(),
            "write"
        );
        assert_eq!(
            name(&table, None, "/items", Method::DELETE),
            Err(Miss::MethodNotAllowed(vec![
                Method::GET,
                Method::HEAD,
                Method::POST
            ]))
        );
    }

    #[test]
    fn a_method_refused_on_the_longest_prefix_is_405_even_with_a_catch_all() {
        let table = RouteTable::new(vec![
            route("root", "/", None, None),
            route("read", "/items", None, Some(&[Method::GET])),
        ]);
        assert_eq!(
            name(&table, None, "/items/1", Method::POST),
            Err(Miss::MethodNotAllowed(vec![Method::GET]))
        );
        assert_eq!(name(&table, None, "/other", Method::POST).unwrap(), "root");
    }

    #[test]
    fn routes_with_the_same_prefix_are_considered_together() {
        let table = RouteTable::new(vec![
            route(
                "x-host",
                "/x",
                Some(HostMatch::Exact("a.test".into())),
                Some(&[Method::GET]),
            ),
            route(
                "y-host",
                "/y",
                Some(HostMatch::Exact("a.test".into())),
                None,
            ),
            route("x-any", "/x", None, Some(&[Method::POST])),
        ]);
        assert_eq!(
            name(&table, Some("a.test"), "/x", Method::POST).unwrap(),
            "x-any"
        );
    }

    #[test]
    fn any_host_route_with_the_same_prefix_can_take_the_method() {
        let table = RouteTable::new(vec![
            route(
                "read",
                "/x",
                Some(HostMatch::Exact("a.test".into())),
                Some(&[Method::GET]),
            ),
            route("write", "/x", None, Some(&[Method::POST])),
            route("root", "/", None, None),
        ]);
        assert_eq!(
            name(&table, Some("a.test"), "/x", Method::POST).unwrap(),
            "write"
        );
        assert_eq!(
            name(&table, Some("a.test"), "/x", Method::GET).unwrap(),
            "read"
        );
        assert_eq!(
            name(&table, Some("a.test"), "/x", Method::DELETE),
            Err(Miss::MethodNotAllowed(vec![Method::GET, Method::POST]))
        );
    }

    #[test]
    fn strips_the_prefix_and_keeps_the_query() {
        assert_eq!(strip_prefix("/orders", "/orders/7?x=1"), "/7?x=1");
        assert_eq!(strip_prefix("/orders", "/orders"), "/");
        assert_eq!(strip_prefix("/orders", "/orders?x=1"), "/?x=1");
        assert_eq!(strip_prefix("/orders/", "/orders/7"), "/7");
        assert_eq!(strip_prefix("/", "/a/b"), "/a/b");
    }

    #[test]
    fn finds_dot_segments_plain_encoded_and_disguised() {
        for path in [
            "/a/../b",
            "/a/./b",
            "/a/..",
            "/..",
            "/a/%2e%2e/b",
            "/a/%2E./b",
            "/a/.%2e",
            "/a/..;/b",
            "/a/..;jsessionid=1/b",
            "/a/..%2fb",
            "/a/..%2Fb",
            "/a/..%5cb",
            "/a/..\\b",
            "/a\\..\\b",
        ] {
            assert!(has_dot_segment(path), "{path}");
        }
        for path in [
            "/",
            "/a/b",
            "/a/.../b",
            "/a/..b/c",
            "/a/b.json",
            "/.well-known/x",
            "/a//b",
            "/a/%2f/b",
            "/projects/group%2Fproject",
            "/a/b;v=1.2",
            "/a/%2e%2e%2e",
        ] {
            assert!(!has_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn strips_ports_from_hosts() {
        assert_eq!(strip_port("a.test:80"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}

//! The credential's place, the upstream's view, and the client address failures count against.

use http::HeaderName;

use super::upstream::*;
use super::*;

fn request(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut req = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
    for (name, value) in headers {
        req.insert_header(name.to_string(), *value).unwrap();
    }
    req
}

fn auth(query: Option<&str>) -> RouteAuth {
    RouteAuth {
        key: true,
        jwt: None,
        key_query_param: query.map(str::to_owned),
    }
}

#[test]
fn the_key_comes_from_authorization_then_x_api_key_then_the_query() {
    let req = request(
        "/a?api_key=q",
        &[("authorization", "bearer  tg_k1 "), ("x-api-key", "k2")],
    );
    assert_eq!(
        credential(&req, &auth(Some("api_key"))),
        Some((Credential::Key("tg_k1"), Source::Authorization))
    );
    let req = request("/a?api_key=q", &[("x-api-key", "k2")]);
    assert_eq!(
        credential(&req, &auth(Some("api_key"))),
        Some((Credential::Key("k2"), Source::Header))
    );
    let req = request("/a?x=1&api_key=q", &[("authorization", "Basic abc")]);
    assert_eq!(
        credential(&req, &auth(Some("api_key"))),
        Some((Credential::Key("q"), Source::Query))
    );
    assert_eq!(credential(&req, &auth(None)), None, "query not allowed");
    // Spelled with escapes, as it is also removed before the upstream.
    let req = request("/a?api%5Fkey=q", &[]);
    assert_eq!(
        credential(&req, &auth(Some("api_key"))),
        Some((Credential::Key("q"), Source::Query))
    );
    // An X-API-Key that is not visible ASCII is sent, and malformed: not a missing key.
    let mut req = request("/a", &[]);
    req.insert_header(
        "x-api-key",
        http::HeaderValue::from_bytes(b"tg_\xc3\xa9").unwrap(),
    )
    .unwrap();
    assert_eq!(
        credential(&req, &auth(None)),
        Some((Credential::Key(NOT_A_KEY), Source::Header))
    );
}

#[test]
fn a_bearer_token_that_is_not_a_key_yields_to_a_key_elsewhere_unless_it_is_a_jwt_where_taken() {
    let either = RouteAuth {
        key: true,
        jwt: Some("idp".into()),
        key_query_param: Some("api_key".into()),
    };
    let key_only = auth(Some("api_key"));
    /// A request's URI and headers, the route's auth, and the credential read.
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, &'a str)],
        &'a RouteAuth,
        Credential<'a>,
        Source,
    );
    let cases: [Case<'_>; 8] = [
        // The upstream's own token beside the product key, on a route of keys only.
        (
            "/a",
            &[
                ("authorization", "Bearer user-session"),
                ("x-api-key", "tg_k"),
            ],
            &key_only,
            Credential::Key("tg_k"),
            Source::Header,
        ),
        (
            "/a?api_key=tg_q",
            &[("authorization", "Bearer user-session")],
            &key_only,
            Credential::Key("tg_q"),
            Source::Query,
        ),
        // Where JWTs are taken, one shaped as a JWT is the credential, and it is checked: a
        // key beside it does not let an unverified token through to the upstream.
        (
            "/a?api_key=tg_q",
            &[("authorization", "Bearer eyJ.a.b"), ("x-api-key", "tg_k")],
            &either,
            Credential::Jwt("eyJ.a.b"),
            Source::Authorization,
        ),
        // A token of another shape cannot be one: it yields there too.
        (
            "/a",
            &[
                ("authorization", "Bearer user-session"),
                ("x-api-key", "tg_k"),
            ],
            &either,
            Credential::Key("tg_k"),
            Source::Header,
        ),
        // Without a bearer token, a key-or-JWT route reads the key where it is.
        (
            "/a?api_key=tg_q",
            &[],
            &either,
            Credential::Key("tg_q"),
            Source::Query,
        ),
        // Alone, it is read as before: a JWT where the route takes them, else a key.
        (
            "/a",
            &[("authorization", "Bearer user-session")],
            &key_only,
            Credential::Key("user-session"),
            Source::Authorization,
        ),
        (
            "/a",
            &[("authorization", "Bearer user-session")],
            &either,
            Credential::Jwt("user-session"),
            Source::Authorization,
        ),
        // A `tg_` bearer still comes first.
        (
            "/a",
            &[("authorization", "Bearer tg_a"), ("x-api-key", "tg_b")],
            &either,
            Credential::Key("tg_a"),
            Source::Authorization,
        ),
    ];
    for (uri, headers, route, expected, source) in cases {
        let req = request(uri, headers);
        assert_eq!(
            credential(&req, route),
            Some((expected, source)),
            "{uri} {headers:?}"
        );
    }
}

#[test]
fn a_credential_sent_twice_where_it_is_read_is_repeated() {
    let twice = |name: &str, values: [&str; 2], uri: &str| {
        let mut req = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        for value in values {
            req.append_header(name.to_owned(), value).unwrap();
        }
        req
    };
    let repeated = |req: &RequestHeader, auth: &RouteAuth| {
        matches!(credential(req, auth), Some((Credential::Repeated(_), _)))
    };
    let jwt_only = RouteAuth {
        key: false,
        jwt: Some("idp".into()),
        key_query_param: None,
    };
    let req = twice("authorization", ["Bearer tg_a", "Bearer tg_b"], "/");
    assert!(repeated(&req, &auth(None)));
    assert!(repeated(&req, &jwt_only));
    // Whatever the first one holds: the second may be the credential a proxy reads.
    let req = twice("authorization", ["Basic abc", "Bearer tg_b"], "/");
    assert!(repeated(&req, &auth(None)));
    let req = twice("x-api-key", ["tg_a", "tg_b"], "/");
    assert!(repeated(&req, &auth(None)));
    assert_eq!(
        credential(&req, &jwt_only),
        None,
        "a JWT route reads no X-API-Key"
    );
    // X-API-Key is not read when Authorization holds the key (and goes, as every copy).
    let mut req = twice("x-api-key", ["tg_a", "tg_b"], "/");
    req.insert_header("authorization", "Bearer tg_c").unwrap();
    assert_eq!(
        credential(&req, &auth(None)),
        Some((Credential::Key("tg_c"), Source::Authorization))
    );
    let query = auth(Some("api_key"));
    let req = request("/a?api_key=tg_a&x=1&api%5fkey=tg_b", &[]);
    assert!(repeated(&req, &query));
    let req = request("/a?api_key=tg_a&api_keys=tg_b", &[]);
    assert_eq!(
        credential(&req, &query),
        Some((Credential::Key("tg_a"), Source::Query))
    );
}

#[test]
fn a_bearer_token_is_a_key_when_it_looks_like_one_else_a_jwt_where_accepted() {
    let either = RouteAuth {
        key: true,
        jwt: Some("idp".into()),
        key_query_param: None,
    };
    let jwt_only = RouteAuth {
        key: false,
        jwt: Some("idp".into()),
        key_query_param: None,
    };
    let req = request("/", &[("authorization", "Bearer tg_abc")]);
    assert_eq!(
        credential(&req, &either),
        Some((Credential::Key("tg_abc"), Source::Authorization))
    );
    let req = request("/", &[("authorization", "Bearer eyJ.a.b")]);
    assert_eq!(
        credential(&req, &either),
        Some((Credential::Jwt("eyJ.a.b"), Source::Authorization))
    );
    assert_eq!(
        credential(&req, &auth(None)),
        Some((Credential::Key("eyJ.a.b"), Source::Authorization)),
        "a key route reads any bearer as a key (and refuses it as malformed)"
    );
    let req = request("/", &[("x-api-key", "tg_abc")]);
    assert_eq!(
        credential(&req, &jwt_only),
        None,
        "a JWT route reads no X-API-Key"
    );
}

#[test]
fn a_clients_identity_headers_go_in_every_spelling_and_nothing_else_does() {
    let route = Route {
        name: "public".to_owned(),
        host: None,
        path_prefix: "/".to_owned(),
        methods: None,
        strip_prefix: false,
        action: crate::config::RouteAction::Proxy(0),
        compression_level: None,
        max_request_body_bytes: 0,
        security_headers: crate::config::SecurityHeaders::default(),
        auth: RouteAuth::default(),
        metered: false,
        cors: None,
    };
    let mut req = request(
        "/a",
        &[
            ("X-Tollgate-Customer-Id", "cus_forged"),
            ("x_tollgate_plan_id", "plan_forged"),
            ("X-Tollgate_Key-Id", "key_forged"),
            ("X_TOLLGATE_SUBJECT", "forged"),
            ("X-Tollgate-Customer", "kept"),
            ("X-Tollgate-Customer-Idx", "kept"),
            ("X-Tollgate.Plan-Id", "kept"),
            ("X-API-Key", "kept on a public route"),
        ],
    );
    rewrite_upstream(&mut req, &route, None).unwrap();
    let mut left: Vec<&str> = req.headers.keys().map(HeaderName::as_str).collect();
    left.sort_unstable();
    assert_eq!(
        left,
        [
            "x-api-key",
            "x-tollgate-customer",
            "x-tollgate-customer-idx",
            "x-tollgate.plan-id"
        ]
    );
}

#[test]
fn behind_trusted_proxies_the_client_is_the_right_most_untrusted_forwarded_address() {
    let trusted = [
        crate::config::IpBlock::parse("10.0.0.0/8").unwrap(),
        crate::config::IpBlock::parse("127.0.0.1").unwrap(),
    ];
    let ip = |text: &str| text.parse::<IpAddr>().unwrap();
    let client = |peer: &str, forwarded: &[&str]| {
        let headers: Vec<(&str, &str)> =
            forwarded.iter().map(|f| ("x-forwarded-for", *f)).collect();
        client_address(Some(ip(peer)), &request("/a", &headers), &trusted)
    };
    // An untrusted peer is the client, whatever it forwards.
    assert_eq!(
        client("203.0.113.9", &["198.51.100.1"]),
        Some(ip("203.0.113.9"))
    );
    // A trusted one: the right-most address that is not a trusted proxy; what the client
    // wrote to its left is not taken.
    assert_eq!(
        client("127.0.0.1", &["6.6.6.6, 198.51.100.1, 10.1.2.3"]),
        Some(ip("198.51.100.1"))
    );
    assert_eq!(
        client("10.0.0.1", &["6.6.6.6", "198.51.100.2"]),
        Some(ip("198.51.100.2"))
    );
    // Nothing forwarded, or nothing usable: the proxy itself.
    assert_eq!(client("10.0.0.1", &[]), Some(ip("10.0.0.1")));
    assert_eq!(client("10.0.0.1", &["unknown"]), Some(ip("10.0.0.1")));
    // IPv4 written as IPv6 is matched as IPv4.
    assert_eq!(
        client("::ffff:10.0.0.1", &["2001:db8::7"]),
        Some(ip("2001:db8::7"))
    );
}

#[test]
fn the_query_key_is_removed_and_the_rest_kept() {
    let mut req = request("/a/b?x=1&api_key=secret&y=2", &[]);
    remove_query_keys(&mut req, Some("api_key")).unwrap();
    assert_eq!(req.uri.to_string(), "/a/b?x=1&y=2");
    let mut req = request("/a?api_key=secret", &[]);
    remove_query_keys(&mut req, Some("api_key")).unwrap();
    assert_eq!(req.uri.to_string(), "/a");
    // Spelled with escapes, as the upstream's framework would decode it: removed too.
    let mut req = request(
        "/a?api%5Fkey=one&api%5fkey=two&%61pi_key=three&api_keys=4",
        &[],
    );
    remove_query_keys(&mut req, Some("api_key")).unwrap();
    assert_eq!(req.uri.to_string(), "/a?api_keys=4");
    assert!(!decodes_to("api%5", "api_key") && !decodes_to("api", "api_key"));
    assert!(decodes_to("api%5fkey", "api_key") && decodes_to("%", "%"));
}

#[test]
fn a_key_goes_from_the_query_under_any_name_and_from_authorization_in_any_form() {
    let key = tollgate_model::key::from_random([7; 16]);
    let escaped = key.replace('_', "%5F");
    let mut req = request(
        &format!(
            "/a?x=1&API_KEY={key}&token={escaped}&y=tg_notakey&z={}",
            &key[..20]
        ),
        &[],
    );
    remove_query_keys(&mut req, None).unwrap();
    assert_eq!(
        req.uri.to_string(),
        format!("/a?x=1&y=tg_notakey&z={}", &key[..20]),
        "a value that is not a whole key stays"
    );
    // Without a key anywhere, the query is left as it was.
    let mut req = request("/a?b=2&a=1", &[]);
    remove_query_keys(&mut req, None).unwrap();
    assert_eq!(req.uri.to_string(), "/a?b=2&a=1");
    assert!(holds_key(format!("Token {key}").as_bytes()));
    assert!(holds_key(key.as_bytes()));
    assert!(!holds_key(
        format!("Token {}", &key[..key.len() - 1]).as_bytes()
    ));
    let mut typo = key.clone().into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'A' { b'B' } else { b'A' };
    assert!(
        !holds_key(&typo),
        "a checksum that does not match is no key"
    );
    assert!(!holds_key(b"Bearer eyJhbGciOi.tg_.x"));
}

#[test]
fn a_key_in_a_basic_authorization_is_found_as_user_or_password() {
    use base64::Engine;
    let key = tollgate_model::key::from_random([9; 16]);
    let basic = |credentials: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    };
    for credentials in [format!("{key}:"), format!("api:{key}"), key.clone()] {
        assert!(
            authorization_holds_key(basic(&credentials).as_bytes()),
            "{credentials}"
        );
    }
    assert!(authorization_holds_key(
        format!("  basic  {}", &basic(&format!("{key}:"))[6..]).as_bytes()
    ));
    assert!(authorization_holds_key(format!("Token {key}").as_bytes()));
    // Without padding, and in the URL-safe alphabet, as some encoders write it.
    for engine in [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        let encoded = engine.encode(format!("{key}:"));
        assert!(
            authorization_holds_key(format!("Basic {encoded}").as_bytes()),
            "{encoded}"
        );
    }
    assert!(!authorization_holds_key(basic("user:password").as_bytes()));
    assert!(!authorization_holds_key(
        basic(&format!("{}:", &key[..key.len() - 1])).as_bytes()
    ));
    assert!(!authorization_holds_key(b"Basic not-base64!"));
    assert!(!authorization_holds_key(b"Basic"));
}

#[test]
fn a_key_in_the_query_is_read_with_its_escapes_decoded() {
    let key = tollgate_model::key::from_random([5; 16]);
    let escaped = key.replace('_', "%5F");
    assert_eq!(as_sent(&escaped, Source::Query), key);
    assert_eq!(as_sent(&key.replace('_', "%5f"), Source::Query), key);
    assert!(matches!(as_sent(&key, Source::Query), Cow::Borrowed(_)));
    // Only the query's are escaped: a header's value is the key as sent.
    assert_eq!(as_sent(&escaped, Source::Header), escaped);
    // Escapes that make no UTF-8, or that are cut short, make no well-formed key.
    for odd in [format!("{key}%FF"), format!("{key}%"), format!("{key}%4")] {
        let read = as_sent(&odd, Source::Query);
        assert!(!tollgate_model::key::is_well_formed(&read), "{odd}: {read}");
    }
    assert_eq!(as_sent("%", Source::Query), "%");
    assert_eq!(as_sent("a%FFb", Source::Query), "a\u{fffd}b");
}

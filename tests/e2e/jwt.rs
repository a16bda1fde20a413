//! JWTs on the request path: HMAC secrets, static RSA keys and JWKS (EC, Ed25519), every claim
//! check and every known attack, and the mapping of a claim to a customer and so to a plan.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tollgate_tests::control_plane::{AdminApi, ControlPlane, PostgresDatabase, admin_token};
use tollgate_tests::{Gateway, Upstream, client, config};

const ISSUER: &str = "https://idp.example.test/";
const AUDIENCE: &str = "https://api.example.test";
const SECRET: &str = "a-test-secret-of-more-than-32-bytes-for-hs";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/jwt");

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Claims for `customer`, valid for a minute; `change` edits them.
fn claims(customer: &str, change: impl FnOnce(&mut Value)) -> Value {
    let mut claims = json!({
        "sub": format!("user-of-{customer}"),
        "customer_id": customer,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 60,
    });
    change(&mut claims);
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hmac(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
}

/// An RS256 token naming `kid`, signed with the fixture's RSA key.
fn rsa_named(kid: Option<&str>, claims: &Value) -> String {
    let pem = std::fs::read(format!("{FIXTURES}/rsa-private.pem")).unwrap();
    sign(
        Algorithm::RS256,
        kid,
        claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
}

fn rsa(alg: Algorithm, claims: &Value) -> String {
    let pem = std::fs::read(format!("{FIXTURES}/rsa-private.pem")).unwrap();
    sign(alg, None, claims, &EncodingKey::from_rsa_pem(&pem).unwrap())
}

async fn status_and_type(gateway: &Gateway, path: &str, token: &str) -> (u16, String, Value) {
    let response = client()
        .get(gateway.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let kind = body["type"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("urn:tollgate:problem:")
        .to_owned();
    (status, kind, body)
}

/// Where the gateway's control plane runs.
#[derive(Clone, Copy)]
enum Backend {
    /// In the gateway's process, on SQLite.
    Embedded,
    /// A separate process, on a Postgres database of its own.
    Postgres,
}

/// A separate control plane and its database, kept for as long as the test needs them.
type Separate = Option<(ControlPlane, PostgresDatabase)>;

/// A standalone gateway with `providers` and routes `/hs` (HMAC JWT), `/rs` (RSA JWT or key),
/// plus `extra` routes; returns it, its admin API and a customer id with its plan id.
async fn gateway_with(
    upstream: &Upstream,
    providers: &str,
    extra_routes: &str,
) -> (Gateway, AdminApi, String, String) {
    let (gateway, api, customer, plan, _) = gateway_on(
        Backend::Embedded,
        upstream,
        providers,
        extra_routes,
        NOT_THROTTLED,
    )
    .await;
    (gateway, api, customer, plan)
}

/// `[auth] failed_per_minute` high enough that no test's refused tokens throttle it.
const NOT_THROTTLED: u32 = 100_000;

/// [`gateway_with`], its control plane on `backend`, throttling addresses past
/// `failed_per_minute` failed authentications.
async fn gateway_on(
    backend: Backend,
    upstream: &Upstream,
    providers: &str,
    extra_routes: &str,
    failed_per_minute: u32,
) -> (Gateway, AdminApi, String, String, Separate) {
    let token = admin_token();
    let (control_plane, separate, api) = match backend {
        Backend::Embedded => ("embedded = true".to_owned(), None, None),
        Backend::Postgres => {
            let database = PostgresDatabase::create().await;
            let control_plane = ControlPlane::start(&database.url()).await;
            let api = control_plane.api();
            let section = format!(
                "url = \"http://{}\"\ntoken_env = \"TOLLGATE_GATEWAY_TOKEN\"",
                control_plane.address
            );
            (section, Some((control_plane, database)), Some(api))
        }
    };
    let gateway_token = match &api {
        Some(api) => api.gateway_token().await,
        None => String::new(),
    };
    let text = config(&format!(
        r#"
[auth]
failed_per_minute = {failed_per_minute}

[control_plane]
{control_plane}

{providers}

[[upstreams]]
name = "api"
targets = ["{target}"]

[[routes]]
name = "hs"
path_prefix = "/hs"
upstream = "api"
auth = "jwt"
jwt_provider = "hs"

[[routes]]
name = "rs"
path_prefix = "/rs"
upstream = "api"
auth = "key_or_jwt"
jwt_provider = "rs"

{extra_routes}
"#,
        target = upstream.target()
    ));
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        format!("{FIXTURES}/rsa-public.pem"),
        dir.path().join("rsa-public.pem"),
    )
    .unwrap();
    let gateway = Gateway::start_with_env(
        dir,
        &text,
        &[
            ("TOLLGATE_ADMIN_TOKEN", token.as_str()),
            ("TOLLGATE_GATEWAY_TOKEN", gateway_token.as_str()),
            ("TEST_JWT_SECRET", SECRET),
        ],
    )
    .await;
    let api = api.unwrap_or_else(|| AdminApi::new(&format!("http://{}", gateway.admin), &token));
    let (plan, customer, _) = api.customer_with_key("jwt").await;
    let customer = customer["id"].as_str().unwrap().to_owned();
    // Wait until the gateway knows the customer.
    let started = Instant::now();
    while gateway.ready().await["identities"]["keys"] != 1 {
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (
        gateway,
        api,
        customer,
        plan["id"].as_str().unwrap().to_owned(),
        separate,
    )
}

const HS_AND_RS: &str = r#"
[[jwt_providers]]
name = "hs"
issuer = "https://idp.example.test/"
audiences = ["https://api.example.test"]
algorithms = ["HS256", "HS384", "HS512"]
secret_env = "TEST_JWT_SECRET"
customer_claim = "customer_id"
leeway = "30s"

[[jwt_providers]]
name = "rs"
issuer = "https://idp.example.test/"
audiences = ["https://api.example.test", "https://other.example.test"]
algorithms = ["RS256", "RS384", "RS512", "PS256"]
public_keys = [{ file = "rsa-public.pem" }]
customer_claim = "customer_id"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_tokens_map_to_a_customer_and_every_claim_is_checked() {
    hmac_tokens(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_tokens_are_checked_alike_with_a_separate_postgres_control_plane() {
    hmac_tokens(Backend::Postgres).await;
}

/// HMAC tokens through a gateway whose control plane is on `backend`: the upstream's view, and
/// each claim checked.
async fn hmac_tokens(backend: Backend) {
    let upstream = Upstream::start("api");
    let (gateway, _api, customer, plan, _separate) =
        gateway_on(backend, &upstream, HS_AND_RS, "", NOT_THROTTLED).await;

    let token = hmac(&claims(&customer, |_| {}));
    let response = client()
        .get(gateway.url("/hs/orders"))
        .bearer_auth(&token)
        .header("x-tollgate-subject", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    let headers = &echo["headers"];
    assert_eq!(headers["x-tollgate-customer-id"], customer.as_str());
    assert_eq!(headers["x-tollgate-plan-id"], plan.as_str());
    assert_eq!(
        headers["x-tollgate-subject"],
        format!("user-of-{customer}").as_str()
    );
    assert!(headers.get("x-tollgate-key-id").is_none());
    assert!(
        headers.get("authorization").is_none(),
        "the token is not forwarded"
    );

    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign(
            alg,
            None,
            &claims(&customer, |_| {}),
            &EncodingKey::from_secret(SECRET.as_bytes()),
        );
        assert_eq!(
            status_and_type(&gateway, "/hs", &token).await.0,
            200,
            "{alg:?}"
        );
    }
    // Within the leeway an expired token still passes; beyond it, it does not.
    let late = hmac(&claims(&customer, |c| c["exp"] = json!(now() - 10)));
    assert_eq!(status_and_type(&gateway, "/hs", &late).await.0, 200);

    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            hmac(&claims(&customer, |c| c["exp"] = json!(now() - 120))),
            401,
            "expired-token",
        ),
        (
            "not valid yet",
            hmac(&claims(&customer, |c| c["nbf"] = json!(now() + 120))),
            401,
            "invalid-token",
        ),
        (
            "another issuer",
            hmac(&claims(&customer, |c| {
                c["iss"] = json!("https://evil.test/")
            })),
            401,
            "invalid-token",
        ),
        (
            "another audience",
            hmac(&claims(&customer, |c| {
                c["aud"] = json!("https://elsewhere.test")
            })),
            401,
            "invalid-token",
        ),
        (
            "no exp",
            hmac(&claims(&customer, |c| {
                c.as_object_mut().unwrap().remove("exp");
            })),
            401,
            "invalid-token",
        ),
        (
            "another secret",
            sign(
                Algorithm::HS256,
                None,
                &claims(&customer, |_| {}),
                &EncodingKey::from_secret(b"another-secret-that-is-long-enough-too"),
            ),
            401,
            "invalid-token",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(claims(&customer, |_| {}).to_string())
            ),
            401,
            "invalid-token",
        ),
        ("garbage", "not.a.jwt".to_owned(), 401, "invalid-token"),
        (
            "unknown customer",
            hmac(&claims("cus_00000000000000000000000000000abc", |_| {})),
            403,
            "unknown-customer",
        ),
        (
            "no customer claim",
            hmac(&claims(&customer, |c| {
                c.as_object_mut().unwrap().remove("customer_id");
            })),
            401,
            "invalid-token",
        ),
        (
            "an RSA token on the HMAC route",
            rsa(Algorithm::RS256, &claims(&customer, |_| {})),
            401,
            "invalid-token",
        ),
    ];
    for (case, token, status, kind) in cases {
        let (got, got_kind, body) = status_and_type(&gateway, "/hs", &token).await;
        assert_eq!((got, got_kind.as_str()), (status, kind), "{case}: {body}");
    }
    // The detail says why.
    let mut critical = Header::new(Algorithm::HS256);
    critical.crit = Some(vec!["x-unknown".to_owned()]);
    let critical = jsonwebtoken::encode(
        &critical,
        &claims(&customer, |_| {}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let why = [
        (
            critical,
            "the header names critical extensions (crit), which are not supported",
        ),
        (
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
                URL_SAFE_NO_PAD.encode(claims(&customer, |_| {}).to_string())
            ),
            "alg none is never accepted",
        ),
        ("not.a.jwt".to_owned(), "not a JWT"),
        (
            hmac(&claims(&customer, |c| c["exp"] = json!("9999999999"))),
            "exp is missing or not a number of seconds",
        ),
        (
            hmac(&claims(&customer, |c| c["customer_id"] = json!(12345))),
            "the customer claim is not a string",
        ),
    ];
    for (token, reason) in why {
        let (status, _, body) = status_and_type(&gateway, "/hs", &token).await;
        assert_eq!(
            (status, body["detail"].as_str()),
            (401, Some(format!("the JWT was refused: {reason}").as_str()))
        );
    }
    // A JWT-only route says what it takes: not the key sent.
    let response = client()
        .get(gateway.url("/hs"))
        .header("x-api-key", "tg_whatever")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (body["type"].as_str(), body["detail"].as_str()),
        (
            Some("urn:tollgate:problem:missing-credential"),
            Some("send a JWT as Authorization: Bearer <token>")
        )
    );
    let metrics = gateway.metrics().await;
    assert!(metrics.contains("tollgate_auth_decisions_total{result=\"expired-token\"} 1"));
    assert!(metrics.contains("tollgate_auth_decisions_total{result=\"invalid-token\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_providers_refuse_algorithm_confusion_and_routes_may_take_keys_too() {
    public_key_tokens(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_key_tokens_are_checked_alike_with_a_separate_postgres_control_plane() {
    public_key_tokens(Backend::Postgres).await;
}

/// RSA tokens through a gateway whose control plane is on `backend`: each algorithm, algorithm
/// confusion refused, and a route that takes a key or a token.
async fn public_key_tokens(backend: Backend) {
    let upstream = Upstream::start("api");
    let (gateway, api, customer, _, _separate) =
        gateway_on(backend, &upstream, HS_AND_RS, "", NOT_THROTTLED).await;
    for alg in [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
    ] {
        let token = rsa(alg, &claims(&customer, |_| {}));
        let (status, _, body) = status_and_type(&gateway, "/rs", &token).await;
        assert_eq!(status, 200, "{alg:?}: {body}");
    }
    // Algorithm confusion: an HMAC token whose secret is the RSA public key.
    let public_pem = std::fs::read(format!("{FIXTURES}/rsa-public.pem")).unwrap();
    let forged = sign(
        Algorithm::HS256,
        None,
        &claims(&customer, |_| {}),
        &EncodingKey::from_secret(&public_pem),
    );
    let (status, kind, _) = status_and_type(&gateway, "/rs", &forged).await;
    assert_eq!((status, kind.as_str()), (401, "invalid-token"));
    // The provider's key has no kid in the config: it checks a token naming any kid.
    let named = rsa_named(Some("idp-key-2026"), &claims(&customer, |_| {}));
    let (status, _, body) = status_and_type(&gateway, "/rs", &named).await;
    assert_eq!(status, 200, "{body}");
    // The other audience of the provider is accepted.
    let other = rsa(
        Algorithm::RS256,
        &claims(&customer, |c| {
            c["aud"] = json!(["https://other.example.test"])
        }),
    );
    assert_eq!(status_and_type(&gateway, "/rs", &other).await.0, 200);
    // The key_or_jwt route takes an API key as well.
    let key = api
        .create(
            &format!("/v1/customers/{customer}/keys"),
            json!({"name": "second"}),
        )
        .await;
    let key = key["key"].as_str().unwrap();
    let started = Instant::now();
    while status_and_type(&gateway, "/rs", key).await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the key did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let response = client()
        .get(gateway.url("/rs"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let beside_the_key = |bearer: &str| {
        client()
            .get(gateway.url("/rs"))
            .header("x-api-key", key)
            .bearer_auth(bearer)
            .send()
    };
    // Beside that key, a bearer token that does not verify is still the credential it
    // claims to be: refused, never handed to the upstream as if checked.
    let response = beside_the_key(&forged).await.unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:invalid-token", "{body}");
    // A bearer token that cannot be a JWT is the upstream's own, beside the key.
    let response = beside_the_key("user-session-token").await.unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(
        echo["headers"]["authorization"], "Bearer user-session-token",
        "{echo}"
    );
    assert!(echo["headers"].get("x-api-key").is_none(), "{echo}");
    // A suspended customer's tokens are refused like its keys.
    api.call(
        "PATCH",
        &format!("/v1/customers/{customer}"),
        Some(json!({"status": "suspended"})),
    )
    .await;
    let token = rsa(Algorithm::RS256, &claims(&customer, |_| {}));
    let started = Instant::now();
    loop {
        let (status, kind, body) = status_and_type(&gateway, "/rs", &token).await;
        if status == 403 {
            assert_eq!(kind, "customer-suspended");
            assert_eq!(
                body["detail"],
                "the customer this credential belongs to is suspended"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "suspension took over 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The provider `ed`: EdDSA keys from the JWKS the fake identity provider at `idp` serves at
/// `/ed/jwks.json`.
fn ed_provider(idp: std::net::SocketAddr) -> String {
    format!(
        r#"
[[jwt_providers]]
name = "ed"
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["EdDSA"]
jwks_url = "http://{idp}/ed/jwks.json"
customer_claim = "customer_id"
"#
    )
}

/// The route `/ed`, checked by the provider `ed`.
const ED_ROUTE: &str = r#"
[[routes]]
name = "ed"
path_prefix = "/ed"
upstream = "api"
auth = "jwt"
jwt_provider = "ed"
"#;

/// An identity provider serving JWKS documents that the test changes; counts fetches.
struct FakeIdp {
    address: std::net::SocketAddr,
    ec: Arc<std::sync::Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

async fn fake_idp(ec: Value, ed: Value) -> FakeIdp {
    use axum::routing::get;
    let ec = Arc::new(std::sync::Mutex::new(ec));
    let fetches = Arc::new(AtomicUsize::new(0));
    let (served, count) = (Arc::clone(&ec), Arc::clone(&fetches));
    let app = axum::Router::new()
        .route(
            "/ec/jwks.json",
            get(move || {
                count.fetch_add(1, Ordering::SeqCst);
                let body = served.lock().unwrap().clone();
                async move { axum::Json(body) }
            }),
        )
        .route(
            "/ed/jwks.json",
            get(move || {
                let body = ed.clone();
                async move { axum::Json(body) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeIdp {
        address,
        ec,
        fetches,
    }
}

/// A generated key: its signing key and its public JWK.
fn generated(
    alg: &'static rcgen::SignatureAlgorithm,
    kid: &str,
    jwt_alg: &str,
) -> (EncodingKey, Value) {
    let pair = rcgen::KeyPair::generate_for(alg).unwrap();
    let raw = pair.public_key_raw();
    let pem = pair.serialize_pem();
    if jwt_alg == "EdDSA" {
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
            "x": URL_SAFE_NO_PAD.encode(raw)});
        (EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(), jwk)
    } else {
        let half = (raw.len() - 1) / 2;
        let crv = if half == 32 { "P-256" } else { "P-384" };
        let jwk = json!({"kty": "EC", "crv": crv, "kid": kid, "alg": jwt_alg,
            "x": URL_SAFE_NO_PAD.encode(&raw[1..=half]),
            "y": URL_SAFE_NO_PAD.encode(&raw[half + 1..])});
        (EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(), jwk)
    }
}

/// A provider whose only key, the fixture's RSA key, is named `rsa-1`.
const NAMED_RS: &str = r#"
[[jwt_providers]]
name = "named"
issuer = "https://idp.example.test/"
audiences = ["https://api.example.test"]
algorithms = ["RS256"]
public_keys = [{ file = "rsa-public.pem", kid = "rsa-1" }]
customer_claim = "customer_id"
"#;

const NAMED_RS_ROUTE: &str = r#"
[[routes]]
name = "named"
path_prefix = "/named"
upstream = "api"
auth = "jwt"
jwt_provider = "named"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_keys_are_fetched_in_the_background_and_an_unknown_kid_refreshes_them_at_most_once_per_interval()
 {
    let (p256, k1) = generated(&rcgen::PKCS_ECDSA_P256_SHA256, "k1", "ES256");
    let (p384, k2) = generated(&rcgen::PKCS_ECDSA_P384_SHA384, "k2", "ES384");
    let (ed, k3) = generated(&rcgen::PKCS_ED25519, "k3", "EdDSA");
    let idp = fake_idp(json!({"keys": [k1.clone()]}), json!({"keys": [k3]})).await;
    let providers = format!(
        r#"{HS_AND_RS}
[[jwt_providers]]
name = "ec"
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256", "ES384"]
jwks_url = "http://{idp}/ec/jwks.json"
jwks_min_refresh = "1s"
customer_claim = "customer_id"

{ed}"#,
        idp = idp.address,
        ed = ed_provider(idp.address),
    );
    let routes = r#"
[[routes]]
name = "ec"
path_prefix = "/ec"
upstream = "api"
auth = "jwt"
jwt_provider = "ec"
"#
    .to_owned()
        + ED_ROUTE;
    let upstream = Upstream::start("api");
    let (gateway, _, customer, _) = gateway_with(&upstream, &providers, &routes).await;
    let until_ok = |path: &'static str, token: String| {
        let gateway = &gateway;
        async move {
            let started = Instant::now();
            loop {
                let (status, kind, body) = status_and_type(gateway, path, &token).await;
                if status == 200 {
                    return started.elapsed();
                }
                assert_eq!(kind, "invalid-token", "{body}");
                assert!(started.elapsed() < Duration::from_secs(10), "{body}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let es256 = sign(
        Algorithm::ES256,
        Some("k1"),
        &claims(&customer, |_| {}),
        &p256,
    );
    until_ok("/ec", es256.clone()).await;
    let eddsa = sign(
        Algorithm::EdDSA,
        Some("k3"),
        &claims(&customer, |_| {}),
        &ed,
    );
    until_ok("/ed", eddsa).await;

    // The provider publishes a new key: a token naming it is refused until the refresh it
    // asks for, which comes after jwks_min_refresh (1 s) at the latest.
    *idp.ec.lock().unwrap() = json!({"keys": [k1, k2]});
    let before = idp.fetches.load(Ordering::SeqCst);
    let es384 = sign(
        Algorithm::ES384,
        Some("k2"),
        &claims(&customer, |_| {}),
        &p384,
    );
    let took = until_ok("/ec", es384).await;
    assert!(took < Duration::from_secs(3), "the new key took {took:?}");
    assert_eq!(status_and_type(&gateway, "/ec", &es256).await.0, 200);

    // A flood of tokens naming unknown keys costs at most one fetch per interval.
    let fetched = idp.fetches.load(Ordering::SeqCst);
    assert!(fetched > before, "an unknown kid asked for a refresh");
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        let unknown = sign(
            Algorithm::ES256,
            Some("k9"),
            &claims(&customer, |_| {}),
            &p256,
        );
        let (status, kind, _) = status_and_type(&gateway, "/ec", &unknown).await;
        assert_eq!((status, kind.as_str()), (401, "invalid-token"));
        sent += 1;
    }
    let flood_fetches = idp.fetches.load(Ordering::SeqCst) - fetched;
    assert!(sent > 50, "{sent} requests");
    assert!(
        flood_fetches <= 3,
        "{flood_fetches} fetches for {sent} unknown-kid tokens in 2.5 s"
    );
    assert!(
        gateway
            .metrics()
            .await
            .contains("tollgate_jwks_fetches_total{provider=\"ec\",result=\"ok\"}")
    );
}

#[test]
fn a_weak_hmac_secret_stops_the_start_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(
        &path,
        config(
            r#"
[[jwt_providers]]
name = "hs"
issuer = "https://idp.example.test/"
audiences = ["api"]
algorithms = ["HS256"]
secret_env = "TEST_WEAK_SECRET"
"#,
        ),
    )
    .unwrap();
    let output = std::process::Command::new(tollgate_tests::gateway::binary())
        .arg("--config")
        .arg(&path)
        .env("TEST_WEAK_SECRET", "only-12-byte")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "jwt_providers[0].secret_env: TEST_WEAK_SECRET holds 12 bytes; an HMAC secret needs at least 32"
        ),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_key_without_a_kid_checks_tokens_that_name_none_or_an_unknown_one() {
    let (ed, mut only) = generated(&rcgen::PKCS_ED25519, "unused", "EdDSA");
    only.as_object_mut().unwrap().remove("kid");
    let (_, other) = generated(&rcgen::PKCS_ED25519, "k2", "EdDSA");
    // A key for encryption beside it, also without a kid: not a signing key, so not counted.
    let (_, mut encryption) = generated(&rcgen::PKCS_ED25519, "unused", "EdDSA");
    let encryption = encryption.as_object_mut().unwrap();
    encryption.remove("kid");
    encryption.insert("use".into(), json!("enc"));
    let idp = fake_idp(
        json!({"keys": [other]}),
        json!({"keys": [only, encryption]}),
    )
    .await;
    let providers = format!("{HS_AND_RS}\n{}", ed_provider(idp.address));
    let upstream = Upstream::start("api");
    let (gateway, _, customer, _) = gateway_with(&upstream, &providers, ED_ROUTE).await;
    let token = sign(Algorithm::EdDSA, None, &claims(&customer, |_| {}), &ed);
    let started = Instant::now();
    while status_and_type(&gateway, "/ed", &token).await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            status_and_type(&gateway, "/ed", &token).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A token naming a key id no key of the document has is checked with its key without one
    // (as many identity providers name a key in every token), and must verify with it.
    let named = sign(
        Algorithm::EdDSA,
        Some("k1"),
        &claims(&customer, |_| {}),
        &ed,
    );
    assert_eq!(status_and_type(&gateway, "/ed", &named).await.0, 200);
    let (other_key, _) = generated(&rcgen::PKCS_ED25519, "unused", "EdDSA");
    let forged = sign(
        Algorithm::EdDSA,
        Some("k1"),
        &claims(&customer, |_| {}),
        &other_key,
    );
    let (status, kind, body) = status_and_type(&gateway, "/ed", &forged).await;
    assert_eq!((status, kind.as_str()), (401, "invalid-token"), "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("signature"),
        "{body}"
    );
}

/// Failed-authentication throttling counts tokens that may be forged (their signature does not
/// verify, also with a key without a kid tried for an unknown one), not tokens whose signature
/// verified but whose claims do not hold, nor tokens that name a signing key the provider does
/// not hold and has no key without a kid for: a client with the wrong audience, an expired token
/// or a key its provider has just rotated in keeps getting the reason, not 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tokens_whose_signature_fails_count_toward_the_failed_authentication_limit() {
    let upstream = Upstream::start("api");
    let (gateway, _api, customer, _plan, _) = gateway_on(
        Backend::Embedded,
        &upstream,
        &format!("{HS_AND_RS}\n{NAMED_RS}"),
        NAMED_RS_ROUTE,
        3,
    )
    .await;

    let wrong_audience = hmac(&claims(&customer, |c| {
        c["aud"] = json!("https://else.test")
    }));
    let expired = hmac(&claims(&customer, |c| c["exp"] = json!(now() - 3600)));
    for _ in 0..5 {
        let (status, kind, body) = status_and_type(&gateway, "/hs", &wrong_audience).await;
        assert_eq!((status, kind.as_str()), (401, "invalid-token"), "{body}");
        let (status, kind, body) = status_and_type(&gateway, "/hs", &expired).await;
        assert_eq!((status, kind.as_str()), (401, "expired-token"), "{body}");
    }
    // Nor tokens naming a signing key the provider does not hold (yet: a provider that has
    // just rotated its keys) when every key it has is named; nothing was verified.
    let unknown_kid = rsa_named(Some("rotated-since"), &claims(&customer, |_| {}));
    for _ in 0..5 {
        let (status, kind, body) = status_and_type(&gateway, "/named", &unknown_kid).await;
        assert_eq!((status, kind.as_str()), (401, "invalid-token"), "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("unknown key id"),
            "{body}"
        );
    }
    let valid = hmac(&claims(&customer, |_| {}));
    assert_eq!(status_and_type(&gateway, "/hs", &valid).await.0, 200);

    let forged = sign(
        Algorithm::HS256,
        None,
        &claims(&customer, |_| {}),
        &EncodingKey::from_secret(b"another-secret-of-more-than-32-bytes!!"),
    );
    for _ in 0..2 {
        let (status, kind, body) = status_and_type(&gateway, "/hs", &forged).await;
        assert_eq!((status, kind.as_str()), (401, "invalid-token"), "{body}");
    }
    // A made-up kid buys no unthrottled checks: `/rs`'s key has no kid, so it checks the token,
    // and its signature (altered here) fails.
    let token = rsa_named(Some("made-up"), &claims(&customer, |_| {}));
    // A character inside the signature (the last may carry bits base64 leaves unused).
    let inside = token.len() - 10;
    let swapped = if &token[inside..=inside] == "A" {
        "B"
    } else {
        "A"
    };
    let altered = format!("{}{swapped}{}", &token[..inside], &token[inside + 1..]);
    let (status, kind, body) = status_and_type(&gateway, "/rs", &altered).await;
    assert_eq!((status, kind.as_str()), (401, "invalid-token"), "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("key without a kid"),
        "{body}"
    );
    let (status, kind, _) = status_and_type(&gateway, "/hs", &valid).await;
    assert_eq!(
        (status, kind.as_str()),
        (429, "too-many-failed-authentications")
    );
}

/// A JWT route set `metered = false` checks the token as any other and names the caller
/// upstream, but leaves the customer's plan alone: no limit, no limit headers, no usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_route_set_unmetered_checks_the_token_but_applies_no_plan() {
    let upstream = Upstream::start("api");
    let (gateway, api, customer, plan, _) = gateway_on(
        Backend::Embedded,
        &upstream,
        HS_AND_RS,
        r#"
[[routes]]
name = "hs-free"
path_prefix = "/free"
upstream = "api"
auth = "jwt"
jwt_provider = "hs"
metered = false
"#,
        NOT_THROTTLED,
    )
    .await;
    let version = gateway.ready().await["identities"]["version"].clone();
    let (status, body) = api
        .call(
            "PATCH",
            &format!("/v1/plans/{plan}"),
            Some(json!({"rate_limits": [{"requests": 1, "window_seconds": 60}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    while gateway.ready().await["identities"]["version"] == version {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "change never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let token = hmac(&claims(&customer, |_| {}));
    for _ in 0..3 {
        let response = client()
            .get(gateway.url("/free/me"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        for name in tollgate_tests::LIMIT_HEADERS {
            assert!(
                response.headers().get(name).is_none(),
                "{name} on an unmetered route"
            );
        }
        let echo: Value = response.json().await.unwrap();
        let headers = &echo["headers"];
        assert_eq!(headers["x-tollgate-customer-id"], customer.as_str());
        assert_eq!(headers["x-tollgate-plan-id"], plan.as_str());
        assert_eq!(
            headers["x-tollgate-subject"],
            format!("user-of-{customer}").as_str()
        );
        assert!(headers.get("authorization").is_none(), "{headers}");
    }
    // The token is still checked.
    let expired = hmac(&claims(&customer, |c| c["exp"] = json!(now() - 3600)));
    let (status, kind, body) = status_and_type(&gateway, "/free", &expired).await;
    assert_eq!((status, kind.as_str()), (401, "expired-token"), "{body}");
    // The plan's one request a minute is whole on the metered JWT route.
    let (status, _, body) = status_and_type(&gateway, "/hs", &token).await;
    assert_eq!(status, 200, "{body}");
    let (status, kind, body) = status_and_type(&gateway, "/hs", &token).await;
    assert_eq!((status, kind.as_str()), (429, "rate-limited"), "{body}");
    // Only the metered call reaches the ledger.
    let path = format!("/v1/customers/{customer}/usage");
    let started = Instant::now();
    loop {
        let (status, usage) = api.call("GET", &path, None).await;
        assert_eq!(status, 200, "{usage}");
        if usage["used"] == 1 {
            let routes: Vec<&str> = usage["days"]
                .as_array()
                .unwrap()
                .iter()
                .map(|day| day["route"].as_str().unwrap())
                .collect();
            assert_eq!(routes, ["hs"], "{usage}");
            break;
        }
        assert!(
            usage["used"].as_u64().unwrap_or(0) < 1 && started.elapsed() < Duration::from_secs(10),
            "{usage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, usage) = api.call("GET", &path, None).await;
    assert_eq!(usage["used"], 1, "{usage}");
}

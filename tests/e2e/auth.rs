//! Who is calling: API keys checked on the request path against identities followed from the
//! control plane, embedded in the gateway (SQLite) or separate (Postgres).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_tests::control_plane::{AdminApi, ControlPlane, PostgresDatabase, admin_token};
use tollgate_tests::{Gateway, Upstream, client, config};

/// How fast a change made through the admin API must be enforced.
const PROPAGATION: Duration = Duration::from_secs(1);

/// Tests poll new keys before they arrive: each poll is a failed authentication, so the
/// limit is high except where it is under test.
/// A gateway whose `[control_plane]` is `control_plane`, with the key route `/orders` (which also
/// takes the key as `api_key`), a public route `/public` and the key route `/demo` that answers
/// by itself.
fn gateway_config(upstream: &Upstream, control_plane: &str) -> String {
    config(&format!(
        r#"
[auth]
failed_per_minute = 100000

[control_plane]
{control_plane}

[[upstreams]]
name = "orders"
targets = ["{target}"]

[[routes]]
name = "orders"
path_prefix = "/orders"
upstream = "orders"
auth = "key"
key_query_param = "api_key"

[[routes]]
name = "public"
path_prefix = "/public"
upstream = "orders"

[[routes]]
name = "demo"
path_prefix = "/demo"
auth = "key"
respond = {{ status = 200, body = "hello, customer" }}
"#,
        target = upstream.target()
    ))
}

fn standalone_config(upstream: &Upstream) -> String {
    gateway_config(upstream, "embedded = true")
}

async fn standalone(upstream: &Upstream) -> (Gateway, AdminApi) {
    standalone_with(&standalone_config(upstream)).await
}

/// A standalone gateway on the config `text`, and its admin API.
async fn standalone_with(text: &str) -> (Gateway, AdminApi) {
    let token = admin_token();
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        text,
        &[("TOLLGATE_ADMIN_TOKEN", token.as_str())],
    )
    .await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    (gateway, api)
}

/// Sends `GET path` with `key` as a bearer token: the status and the JSON body.
async fn call(gateway: &Gateway, path: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = client().get(gateway.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Polls until `GET path` with `key` answers `status`; returns how long it took.
async fn until_status(gateway: &Gateway, path: &str, key: &str, status: u16) -> Duration {
    let started = Instant::now();
    loop {
        let (got, body) = call(gateway, path, Some(key)).await;
        if got == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still {got} ({body}) instead of {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `GET path` with `key` in X-API-Key and the header `name: value` beside it; asserts
/// 200 and returns what the echoing upstream saw.
async fn echo_beside_x_api_key(
    gateway: &Gateway,
    path: &str,
    key: &str,
    name: &str,
    value: &str,
) -> Value {
    let response = client()
        .get(gateway.url(path))
        .header("x-api-key", key)
        .header(name, value)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn problem_type(body: &Value) -> &str {
    body["type"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("urn:tollgate:problem:")
}

/// Every outcome of a key, through `gateway` following the control plane of `api`: a new key
/// within a second, the upstream's view, the three places a key is taken from, public routes,
/// each refusal with its problem type, scopes, expiry, and a suspension within a second and its
/// end. The key of the customer it made.
async fn enforces_each_outcome(gateway: &Gateway, api: &AdminApi) -> String {
    let (plan, customer, key) = api.customer_with_key("acme").await;
    let key = key["key"].as_str().unwrap().to_owned();
    let customer_id = customer["id"].as_str().unwrap().to_owned();

    // A new key works within a second of its creation.
    let took = until_status(gateway, "/orders/1", &key, 200).await;
    assert!(took < PROPAGATION, "a new key took {took:?}");

    // The upstream learns who calls, never the credential.
    let (status, echo) = call(gateway, "/orders/1?x=1", Some(&key)).await;
    assert_eq!(status, 200);
    let headers = &echo["headers"];
    assert_eq!(headers["x-tollgate-customer-id"], customer_id.as_str());
    assert_eq!(headers["x-tollgate-plan-id"], plan["id"]);
    assert!(
        headers["x-tollgate-key-id"]
            .as_str()
            .unwrap()
            .starts_with("key_")
    );
    assert!(headers.get("authorization").is_none(), "{headers}");
    assert_eq!(echo["path"], "/orders/1?x=1");

    // The same key in X-API-Key and in the route's query parameter.
    let echo = echo_beside_x_api_key(
        gateway,
        "/orders/2",
        &key,
        "x-tollgate-customer-id",
        "cus_forged",
    )
    .await;
    assert!(echo["headers"].get("x-api-key").is_none());
    assert_eq!(
        echo["headers"]["x-tollgate-customer-id"],
        customer_id.as_str()
    );
    // Other copies of the key, in forms not read as the credential, do not reach the upstream
    // either: another scheme in Authorization, another query parameter name.
    let path = format!("/orders/2?API_KEY={key}&keep=1");
    let echo = echo_beside_x_api_key(
        gateway,
        &path,
        &key,
        "authorization",
        &format!("Token {key}"),
    )
    .await;
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");
    assert_eq!(echo["path"], "/orders/2?keep=1");
    assert!(!echo.to_string().contains(&key), "{echo}");
    let (status, echo) = call(gateway, &format!("/orders/3?a=1&api_key={key}&b=2"), None).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        echo["path"], "/orders/3?a=1&b=2",
        "the key is not forwarded"
    );
    // Escaped in the query, as a client's URL encoder may send it: decoded as the upstream's
    // framework would, and removed all the same.
    let escaped = key.replace('_', "%5F");
    let (status, echo) = call(gateway, &format!("/orders/3?api_key={escaped}&b=2"), None).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["path"], "/orders/3?b=2");
    // Base64-encoded in a Basic `Authorization` beside X-API-Key (`curl -u <key>:`).
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    let basic = format!("Basic {basic}");
    let echo = echo_beside_x_api_key(gateway, "/orders/2", &key, "authorization", &basic).await;
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");

    // Public routes stay public; a client cannot forge the identity headers.
    let response = client()
        .get(gateway.url("/public"))
        .header("x-tollgate-customer-id", "cus_forged")
        .header("x-tollgate-plan-id", "plan_forged")
        .header("X_Tollgate_Key_Id", "key_forged")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    assert!(
        echo["headers"].get("x-tollgate-customer-id").is_none(),
        "{echo}"
    );
    assert!(echo["headers"].get("x-tollgate-plan-id").is_none());
    assert!(
        echo["headers"].get("x_tollgate_key_id").is_none(),
        "the underscore spelling (read as the same header by CGI-style upstreams) goes too"
    );

    // The static demo route needs a key too.
    assert_eq!(call(gateway, "/demo", Some(&key)).await.0, 200);

    // Each refusal with its own problem type.
    let response = client().get(gateway.url("/orders")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"tollgate\""
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(problem_type(&body), "missing-credential");
    assert_eq!(
        body["detail"],
        "send an API key as Authorization: Bearer <key>, X-API-Key: <key> or in this route's \
         query parameter"
    );
    assert!(body["request_id"].is_string());
    let (status, body) = call(gateway, "/orders", Some("tg_not-a-key")).await;
    assert_eq!((status, problem_type(&body)), (401, "malformed-key"));
    // Not visible ASCII: sent, so malformed, not missing.
    let response = client()
        .get(gateway.url("/orders"))
        .header(
            "x-api-key",
            reqwest::header::HeaderValue::from_bytes(b"tg_caf\xc3\xa9").unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(problem_type(&body), "malformed-key");
    let mut typo = key.clone();
    let last = if typo.ends_with('A') { "B" } else { "A" };
    typo.replace_range(typo.len() - 1.., last);
    let (status, body) = call(gateway, "/orders", Some(&typo)).await;
    assert_eq!(
        (status, problem_type(&body)),
        (401, "malformed-key"),
        "bad checksum"
    );

    // A credential sent twice in its place is checked in neither: a proxy in front may read the
    // other one (RFC 6750's invalid_request). Even the valid key beside a forged one.
    let twice = [
        ("authorization", format!("Bearer {key}"), "/orders/4"),
        ("x-api-key", key.clone(), "/orders/4"),
    ];
    for (name, value, path) in &twice {
        let response = client()
            .get(gateway.url(path))
            .header(*name, value)
            .header(*name, "tg_forged")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{name} twice");
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer realm=\"tollgate\", error=\"invalid_request\""
        );
        let body: Value = response.json().await.unwrap();
        assert_eq!(problem_type(&body), "repeated-credential", "{body}");
        assert!(
            body["detail"].as_str().unwrap().contains("send one"),
            "{body}"
        );
    }
    let (status, body) = call(
        gateway,
        &format!("/orders/5?api_key={key}&api%5Fkey=x"),
        None,
    )
    .await;
    assert_eq!(
        (status, problem_type(&body)),
        (400, "repeated-credential"),
        "{body}"
    );
    let unknown = tollgate_model::key::from_random([7; 16]); // well formed, never issued
    let unknown = unknown.as_str();
    let (status, body) = call(gateway, "/orders", Some(unknown)).await;
    assert_eq!(
        (status, problem_type(&body)),
        (401, "unknown-key"),
        "{body}"
    );

    // A key scoped to other routes.
    let scoped = api
        .create(
            &format!("/v1/customers/{customer_id}/keys"),
            json!({"name": "scoped", "scopes": ["demo"]}),
        )
        .await;
    let scoped = scoped["key"].as_str().unwrap();
    until_status(gateway, "/demo", scoped, 200).await;
    let response = client()
        .get(gateway.url("/orders"))
        .bearer_auth(scoped)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Bearer realm=\"tollgate\", error=\"insufficient_scope\""
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(problem_type(&body), "key-not-allowed");

    // An expiring key stops at its expiry.
    let expires_at = humantime::format_rfc3339_millis(
        std::time::SystemTime::now() + Duration::from_millis(1500),
    )
    .to_string();
    let expiring = api
        .create(
            &format!("/v1/customers/{customer_id}/keys"),
            json!({"name": "brief", "expires_at": expires_at}),
        )
        .await;
    let expiring = expiring["key"].as_str().unwrap();
    until_status(gateway, "/orders", expiring, 200).await;
    until_status(gateway, "/orders", expiring, 401).await;
    let (_, body) = call(gateway, "/orders", Some(expiring)).await;
    assert_eq!(problem_type(&body), "expired-key");

    // Suspending the customer is enforced within a second, and so is its return.
    let (status, _) = api
        .call(
            "PATCH",
            &format!("/v1/customers/{customer_id}"),
            Some(json!({"status": "suspended"})),
        )
        .await;
    assert_eq!(status, 200);
    let took = until_status(gateway, "/orders", &key, 403).await;
    assert!(took < PROPAGATION, "suspension took {took:?}");
    let (_, body) = call(gateway, "/orders", Some(&key)).await;
    assert_eq!(problem_type(&body), "customer-suspended");
    api.call(
        "PATCH",
        &format!("/v1/customers/{customer_id}"),
        Some(json!({"status": "active"})),
    )
    .await;
    until_status(gateway, "/orders", &key, 200).await;

    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_issues_keys_and_enforces_each_outcome() {
    let upstream = Upstream::start("orders");
    let (gateway, api) = standalone(&upstream).await;
    let key = enforces_each_outcome(&gateway, &api).await;
    let ready = gateway.ready().await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["identities"]["source"], "control plane");
    assert_eq!(
        gateway.metric("tollgate_identity_version").await,
        ready["identities"]["version"].as_f64()
    );
    assert!(
        ready["identities"]["version"].as_i64().unwrap() >= 6,
        "{ready}"
    );
    assert_eq!(ready["identities"]["keys"], 3);
    // Confirmed current by the control plane at least every 5 s (the long poll).
    assert!(ready["identities"]["sync_age_seconds"].as_i64().unwrap() <= 6);
    let metrics = gateway.metrics().await;
    for line in [
        "tollgate_auth_decisions_total{result=\"ok\"}",
        "tollgate_auth_decisions_total{result=\"missing\"}",
        "tollgate_auth_decisions_total{result=\"malformed\"}",
        "tollgate_auth_decisions_total{result=\"unknown\"}",
        "tollgate_auth_decisions_total{result=\"out-of-scope\"}",
        "tollgate_auth_decisions_total{result=\"expired\"}",
        "tollgate_auth_decisions_total{result=\"suspended\"}",
        "tollgate_identity_version ",
        "tollgate_identity_keys 3",
        "tollgate_identity_sync_age_seconds ",
        "tollgate_identity_snapshots_total{result=\"applied\"} 1",
        // The embedded control plane's own metrics are on the same listener.
        "tollgate_control_plane_requests_total",
    ] {
        assert!(metrics.contains(line), "missing {line} in:\n{metrics}");
    }
    assert!(!metrics.contains(&key), "no key in the metrics");
    // The admin API on the admin listener: a 405 names the path's own methods.
    for (method, path, allow) in [
        (reqwest::Method::PUT, "/v1/plans", "GET,HEAD,POST"),
        (reqwest::Method::GET, "/v1/keys/key_x/revoke", "POST"),
        (reqwest::Method::POST, "/health", "GET,HEAD"),
    ] {
        let response = client()
            .request(method.clone(), format!("http://{}{path}", gateway.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 405, "{method} {path}");
        assert_eq!(response.headers()["allow"], allow, "{method} {path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_rotation_and_plan_changes_reach_traffic_in_flight_within_a_second() {
    let upstream = Upstream::start("orders");
    let (gateway, api) = standalone(&upstream).await;
    changes_reach_traffic_in_flight(&gateway, &api).await;
}

/// The embedded gateway's token (role `gateway`, named after the gateway), listed by the admin
/// API of the gateway's own control plane.
async fn embedded_gateway_tokens(api: &AdminApi) -> Vec<Value> {
    let (status, page) = api.call("GET", "/v1/admin-tokens?limit=100", None).await;
    assert_eq!(status, 200, "{page}");
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| {
            t["role"] == "gateway"
                && t["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("embedded gateway "))
        })
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_whose_own_token_an_admin_deletes_makes_another_and_keeps_following() {
    let upstream = Upstream::start("orders");
    let (gateway, api) = standalone(&upstream).await;
    let (_, _, first) = api.customer_with_key("own-token").await;
    let first_key = first["key"].as_str().unwrap().to_owned();
    until_status(&gateway, "/orders", &first_key, 200).await;
    let own = embedded_gateway_tokens(&api).await;
    assert_eq!(own.len(), 1, "{own:?}");
    let (status, body) = api
        .call(
            "DELETE",
            &format!("/v1/admin-tokens/{}", own[0]["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 204, "{body}");

    // A change the feed request in flight (made with the deleted token) carries; then one
    // only a request after the deletion can: each within a second.
    let (_, _, second) = api.customer_with_key("own-token-2").await;
    let second_key = second["key"].as_str().unwrap().to_owned();
    let took = until_status(&gateway, "/orders", &second_key, 200).await;
    assert!(took < PROPAGATION, "a new key took {took:?}");
    api.call(
        "POST",
        &format!("/v1/keys/{}/revoke", first["id"].as_str().unwrap()),
        None,
    )
    .await;
    let took = until_status(&gateway, "/orders", &first_key, 401).await;
    assert!(
        took < PROPAGATION,
        "a revocation after the token was deleted took {took:?}"
    );
    // The deleted token stays deleted: the gateway follows with a new one.
    let renewed = embedded_gateway_tokens(&api).await;
    assert_eq!(renewed.len(), 1, "{renewed:?}");
    assert_ne!(renewed[0]["id"], own[0]["id"]);
    assert_eq!(renewed[0]["name"], own[0]["name"]);
    assert_eq!(gateway.ready().await["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_a_separate_postgres_control_plane_enforces_each_outcome_and_change() {
    let upstream = Upstream::start("orders");
    let (gateway, api, _control_plane, _database) = on_postgres(&upstream).await;
    enforces_each_outcome(&gateway, &api).await;
    changes_reach_traffic_in_flight(&gateway, &api).await;
    let ready = gateway.ready().await;
    assert_eq!(ready["identities"]["source"], "control plane", "{ready}");
}

/// Through `gateway` following the control plane of `api`, while traffic flows: a plan change,
/// a rotation with a grace and a revocation, each enforced within a second.
async fn changes_reach_traffic_in_flight(gateway: &Gateway, api: &AdminApi) {
    let (_, customer, key) = api.customer_with_key("flow").await;
    let key_id = key["id"].as_str().unwrap().to_owned();
    let key = key["key"].as_str().unwrap().to_owned();
    until_status(gateway, "/orders", &key, 200).await;

    // Traffic flows with the key while the admin changes things.
    let traffic = {
        let url = gateway.url("/orders");
        let key = key.clone();
        tokio::spawn(async move {
            let client = client();
            let mut statuses = Vec::new();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(4) {
                let response = client.get(&url).bearer_auth(&key).send().await.unwrap();
                statuses.push(response.status().as_u16());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            statuses
        })
    };

    // A plan change: the upstream sees the new plan within a second.
    let premium = api.create("/v1/plans", json!({"name": "premium"})).await;
    let (status, _) = api
        .call(
            "PATCH",
            &format!("/v1/customers/{}", customer["id"].as_str().unwrap()),
            Some(json!({"plan_id": premium["id"]})),
        )
        .await;
    assert_eq!(status, 200);
    let changed = Instant::now();
    loop {
        let (_, echo) = call(gateway, "/orders", Some(&key)).await;
        if echo["headers"]["x-tollgate-plan-id"] == premium["id"] {
            break;
        }
        assert!(
            changed.elapsed() < PROPAGATION,
            "the plan change took over 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Rotation with a grace: the new key works, the old one until the grace ends.
    let rotated = api
        .create(
            &format!("/v1/keys/{key_id}/rotate"),
            json!({"grace_seconds": 2}),
        )
        .await;
    let new_key = rotated["key"].as_str().unwrap();
    let took = until_status(gateway, "/orders", new_key, 200).await;
    assert!(took < PROPAGATION, "the rotated key took {took:?}");
    assert_eq!(call(gateway, "/orders", Some(&key)).await.0, 200, "grace");

    // Revoking the new key is enforced within a second.
    let new_id = rotated["id"].as_str().unwrap();
    let (status, _) = api
        .call("POST", &format!("/v1/keys/{new_id}/revoke"), None)
        .await;
    assert_eq!(status, 200);
    let took = until_status(gateway, "/orders", new_key, 401).await;
    assert!(took < PROPAGATION, "revocation took {took:?}");
    let (_, body) = call(gateway, "/orders", Some(new_key)).await;
    assert_eq!(problem_type(&body), "revoked-key");

    // The old key stops once its grace is over.
    until_status(gateway, "/orders", &key, 401).await;
    let statuses = traffic.await.unwrap();
    assert!(statuses.len() > 50, "{} requests", statuses.len());
    let at = statuses
        .iter()
        .position(|s| *s != 200)
        .expect("the old key was refused while the traffic ran");
    assert!(
        statuses[at..].iter().all(|s| *s == 401),
        "once refused, always refused: {statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 401),
        "no other status while keys change: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_past_the_rate_are_refused_before_any_lookup() {
    let upstream = Upstream::start("orders");
    let text =
        standalone_config(&upstream).replace("failed_per_minute = 100000", "failed_per_minute = 5");
    let (gateway, api) = standalone_with(&text).await;
    let (_, _, key) = api.customer_with_key("scanner").await;
    let key = key["key"].as_str().unwrap().to_owned();
    // Wait for the key without trying it: each try before it arrives would count.
    gateway.wait_for_keys(1).await;
    assert_eq!(call(&gateway, "/orders", Some(&key)).await.0, 200);

    // A real key that may not be used is not a guess: however often it is tried, its caller
    // gets the reason, and the address is not throttled.
    let (_, _, revoked) = api.customer_with_key("revoked").await;
    api.call(
        "POST",
        &format!("/v1/keys/{}/revoke", revoked["id"].as_str().unwrap()),
        None,
    )
    .await;
    gateway.wait_for_keys(2).await;
    let revoked = revoked["key"].as_str().unwrap();
    until_status(&gateway, "/orders", revoked, 401).await;
    for _ in 0..10 {
        let (status, body) = call(&gateway, "/orders", Some(revoked)).await;
        assert_eq!((status, problem_type(&body)), (401, "revoked-key"));
    }
    assert_eq!(call(&gateway, "/orders", Some(&key)).await.0, 200);

    for i in 0..5 {
        let guess = format!("tg_{i:0>22}AAAAAA");
        let (status, _) = call(&gateway, "/orders", Some(&guess)).await;
        assert_eq!(status, 401, "guess {i}");
    }
    // Past the rate even a valid key from this address waits: no lookup is made.
    let response = client()
        .get(gateway.url("/orders"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=120).contains(&retry_after), "{retry_after}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(problem_type(&body), "too-many-failed-authentications");
    // Public routes are not affected.
    assert_eq!(call(&gateway, "/public", None).await.0, 200);
    assert!(
        gateway
            .metrics()
            .await
            .contains("tollgate_auth_decisions_total{result=\"throttled\"} 1")
    );
    // A reload changes the limit at once, the failures so far held against it: raised past
    // them, the address is let through; lowered under them, it is refused again.
    gateway.write_config(&text.replace("failed_per_minute = 5", "failed_per_minute = 1000"));
    gateway.wait_for_version(2).await;
    assert_eq!(call(&gateway, "/orders", Some(&key)).await.0, 200);
    gateway.write_config(&text.replace("failed_per_minute = 5", "failed_per_minute = 1"));
    gateway.wait_for_version(3).await;
    assert_eq!(call(&gateway, "/orders", Some(&key)).await.0, 429);
}

/// Behind a trusted proxy (here the test itself, on 127.0.0.1), failures count against the
/// client `X-Forwarded-For` names: one client guessing keys is refused, another behind the same
/// proxy is not. Before, the proxy's address counted, so every client behind it was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_failures_count_against_the_forwarded_client() {
    let upstream = Upstream::start("orders");
    let text = standalone_config(&upstream).replace(
        "failed_per_minute = 100000",
        "failed_per_minute = 3\ntrusted_proxies = [\"127.0.0.0/8\"]",
    );
    let (gateway, api) = standalone_with(&text).await;
    let (_, _, key) = api.customer_with_key("behind").await;
    let key = key["key"].as_str().unwrap().to_owned();
    gateway.wait_for_keys(1).await;
    let from = async |client_ip: &str, credential: &str| {
        client()
            .get(gateway.url("/orders"))
            .bearer_auth(credential)
            // What the client wrote itself comes first; the proxy appended the address it saw.
            .header("x-forwarded-for", format!("6.6.6.6, {client_ip}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    for i in 0..3 {
        let guess = format!("tg_{i:0>22}AAAAAA");
        assert_eq!(from("198.51.100.1", &guess).await, 401, "guess {i}");
    }
    assert_eq!(from("198.51.100.1", &key).await, 429);
    // Another client behind the same proxy, and one claiming the guesser's address to its left.
    assert_eq!(from("198.51.100.2", &key).await, 200);
    let spoofed = client()
        .get(gateway.url("/orders"))
        .bearer_auth(&key)
        .header("x-forwarded-for", "198.51.100.1, 198.51.100.3")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), 200);
}

/// A gateway following the control plane at `control_plane` (a `host:port`), with the routes of
/// [`gateway_config`].
fn cluster_config(upstream: &Upstream, control_plane: &str) -> String {
    gateway_config(
        upstream,
        &format!("url = \"http://{control_plane}\"\ntoken_env = \"TOLLGATE_GATEWAY_TOKEN\""),
    )
}

/// A separate control plane on a database of its own, and a gateway following it: (gateway,
/// admin API, control plane, database).
async fn on_postgres(upstream: &Upstream) -> (Gateway, AdminApi, ControlPlane, PostgresDatabase) {
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let api = control_plane.api();
    let token = api.gateway_token().await;
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &cluster_config(upstream, &control_plane.address.to_string()),
        &[("TOLLGATE_GATEWAY_TOKEN", token.as_str())],
    )
    .await;
    (gateway, api, control_plane, database)
}

/// A gateway restarted with the stored snapshot of one store and pointed at another whose
/// version has reached the same number (a store replaced, or restored from a backup that has gone
/// on since) does not follow that store's changes from a state it never had: the version's mark
/// differs, so it takes that store's snapshot, and a key only the first store held stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_pointed_at_another_store_at_the_same_version_takes_its_snapshot() {
    let upstream = Upstream::start("orders");
    let first_database = PostgresDatabase::create().await;
    let first = ControlPlane::start(&first_database.url()).await;
    let first_api = first.api();
    let first_token = first_api.gateway_token().await;
    let (_, _, old) = first_api.customer_with_key("first-store").await;
    let old = old["key"].as_str().unwrap().to_owned();
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &cluster_config(&upstream, &first.address.to_string()),
        &[("TOLLGATE_GATEWAY_TOKEN", first_token.as_str())],
    )
    .await;
    until_status(&gateway, "/orders", &old, 200).await;
    let version = gateway.ready().await["identities"]["version"].clone();
    let dir = gateway.kill();
    first.kill();

    // Another store, as many changes in: the same version number.
    let second_database = PostgresDatabase::create().await;
    let second = ControlPlane::start(&second_database.url()).await;
    let second_api = second.api();
    let second_token = second_api.gateway_token().await;
    let (_, _, new) = second_api.customer_with_key("second-store").await;
    let new = new["key"].as_str().unwrap().to_owned();
    let gateway = Gateway::start_with_env(
        dir,
        &cluster_config(&upstream, &second.address.to_string()),
        &[("TOLLGATE_GATEWAY_TOKEN", second_token.as_str())],
    )
    .await;
    let took = until_status(&gateway, "/orders", &new, 200).await;
    assert!(took < PROPAGATION, "the new store's key took {took:?}");
    let (status, body) = call(&gateway, "/orders", Some(&old)).await;
    assert_eq!(
        (status, problem_type(&body)),
        (401, "unknown-key"),
        "{body}"
    );
    let ready = gateway.ready().await;
    assert_eq!(ready["identities"]["version"], version, "{ready}");
    assert_eq!(ready["identities"]["source"], "control plane", "{ready}");
    // It did start from the first store's snapshot, and replaced it.
    for result in ["restored", "applied"] {
        let name = format!("tollgate_identity_snapshots_total{{result=\"{result}\"}}");
        assert_eq!(gateway.metric(&name).await, Some(1.0), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_a_separate_control_plane_keeps_serving_without_it_and_restarts_from_disk() {
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let api = control_plane.api();
    let gateway_token = api
        .create(
            "/v1/admin-tokens",
            json!({"name": "gateway-1", "role": "gateway"}),
        )
        .await;
    let gateway_token = gateway_token["token"].as_str().unwrap().to_owned();
    let (_, _, key) = api.customer_with_key("pg").await;
    let (key_id, key) = (
        key["id"].as_str().unwrap().to_owned(),
        key["key"].as_str().unwrap().to_owned(),
    );
    let (address, admin_token) = (control_plane.address, control_plane.admin_token.clone());
    let upstream = Upstream::start("orders");
    let text = cluster_config(&upstream, &control_plane.address.to_string());
    let env = [("TOLLGATE_GATEWAY_TOKEN", gateway_token.as_str())];
    let gateway = Gateway::start_with_env(tempfile::tempdir().unwrap(), &text, &env).await;
    until_status(&gateway, "/orders", &key, 200).await;

    // A revocation through the separate control plane arrives within a second.
    let (_, _, second) = api.customer_with_key("pg2").await;
    let second_key = second["key"].as_str().unwrap().to_owned();
    until_status(&gateway, "/orders", &second_key, 200).await;
    api.call(
        "POST",
        &format!("/v1/keys/{}/revoke", second["id"].as_str().unwrap()),
        None,
    )
    .await;
    let took = until_status(&gateway, "/orders", &second_key, 401).await;
    assert!(took < PROPAGATION, "revocation took {took:?}");

    // The control plane goes away: the gateway keeps serving what it knows.
    control_plane.kill();
    for _ in 0..20 {
        assert_eq!(call(&gateway, "/orders", Some(&key)).await.0, 200);
        assert_eq!(call(&gateway, "/orders", Some(&second_key)).await.0, 401);
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        gateway
            .counted("tollgate_identity_sync_failures_total")
            .await
            >= 1.0
    );

    // Restarted while the control plane is still down, it serves from its stored snapshot.
    let dir = gateway.kill();
    assert!(dir.path().join("tollgate-snapshot.json.gz").exists());
    let gateway = Gateway::start_with_env(dir, &text, &env).await;
    assert_eq!(call(&gateway, "/orders", Some(&key)).await.0, 200);
    assert_eq!(
        call(&gateway, "/orders", Some(&second_key)).await.0,
        401,
        "the journaled revocation survives the restart"
    );
    let ready = gateway.ready().await;
    assert_eq!(ready["identities"]["source"], "stored snapshot", "{ready}");
    assert!(
        ready["identities"]["sync_age_seconds"].as_i64().is_some(),
        "the stored snapshot's age is shown: {ready}"
    );
    assert!(
        gateway
            .metric("tollgate_identity_sync_age_seconds")
            .await
            .is_some()
    );

    // Long after it went down (a growing delay between attempts would be past 8 s by now), the
    // control plane comes back: a change made then is enforced within a second all the same.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let _control_plane = ControlPlane::start_at(&database.url(), address, &admin_token).await;
    let (status, _) = api
        .call("POST", &format!("/v1/keys/{key_id}/revoke"), None)
        .await;
    assert_eq!(status, 200);
    let took = until_status(&gateway, "/orders", &key, 401).await;
    assert!(took < PROPAGATION, "revocation took {took:?}");
    let ready = gateway.ready().await;
    assert_eq!(ready["identities"]["source"], "control plane", "{ready}");
}

/// A sync failure is logged as a warning when it starts, and again when its kind changes: a
/// control plane unreachable at first, then up but refusing the gateway's token. Before, only
/// the first was logged, so the 401 and its hint (the token's role) were never seen; and the
/// warning said "the last good identities stay" of a gateway that had none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_failure_is_logged_again_when_its_kind_changes() {
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let (address, admin_token) = (control_plane.address, control_plane.admin_token.clone());
    control_plane.kill();
    let upstream = Upstream::start("orders");
    let wrong_token = format!("tga_{}", "0".repeat(64));
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &cluster_config(&upstream, &address.to_string()),
        &[("TOLLGATE_GATEWAY_TOKEN", wrong_token.as_str())],
    )
    .await;
    let warning = |needle: &'static str| {
        move |line: &Value| {
            line["level"] == "WARN"
                && line["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("cannot sync with the control plane"))
                && line["error"].as_str().is_some_and(|e| e.contains(needle))
        }
    };
    let unreachable = gateway.wait_for_log(warning("unreachable")).await;
    assert_eq!(
        unreachable["message"],
        "cannot sync with the control plane; no identities yet, so authenticated routes answer 503"
    );
    let _control_plane = ControlPlane::start_at(&database.url(), address, &admin_token).await;
    let refused = gateway.wait_for_log(warning("answered 401")).await;
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("with role \"gateway\""),
        "{refused}"
    );
    // Logged once per kind: the attempts after it are at debug level.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let refusals = gateway
        .logs()
        .iter()
        .filter(|line| warning("answered 401")(line))
        .count();
    assert_eq!(refusals, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_had_identities_answers_503_on_authenticated_routes_only() {
    let upstream = Upstream::start("orders");
    let text = cluster_config(&upstream, "127.0.0.1:9");
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &text,
        &[("TOLLGATE_GATEWAY_TOKEN", "tga_unused")],
    )
    .await;
    let well_formed = tollgate_model::key::from_random([7; 16]);
    let response = client()
        .get(gateway.url("/orders"))
        .bearer_auth(&well_formed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(problem_type(&body), "identities-unavailable");
    for credential in [None, Some("tg_malformed")] {
        let (status, body) = call(&gateway, "/orders", credential).await;
        assert_eq!(
            (status, problem_type(&body)),
            (503, "identities-unavailable")
        );
    }
    assert_eq!(call(&gateway, "/public", None).await.0, 200);
    let response = client()
        .get(gateway.admin_url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["status"], "waiting for identities");
}

/// A stand-in control plane that serves a good snapshot once, then only snapshots that do not
/// check (a key of a customer it does not have), and answers every change request with 409 so
/// the gateway keeps asking for snapshots.
async fn fake_control_plane(key: &str) -> std::net::SocketAddr {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::routing::get;
    use sha2::{Digest, Sha256};

    let customer = "cus_00000000000000000000000000000001";
    let record = |customer_id: &str| {
        json!({
            "id": "key_00000000000000000000000000000001",
            "customer_id": customer_id,
            "hash": hex::encode(Sha256::digest(key.as_bytes())),
            "expires_at_ms": null, "revoked_at_ms": null, "scopes": null
        })
    };
    let plan = json!({
        "id": "plan_1", "name": "basic", "rate_limits": [], "quota": null, "price": null,
        "status": "active", "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
    });
    let good = json!({
        "version": 1, "plans": [plan],
        "customers": [{"id": customer, "plan_id": "plan_1", "status": "active"}],
        "keys": [record(customer)]
    })
    .to_string();
    let bad = json!({
        "version": 2, "plans": [plan],
        "customers": [{"id": customer, "plan_id": "plan_1", "status": "active"}],
        "keys": [record("cus_00000000000000000000000000000009")]
    })
    .to_string();
    let served = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/v1/gateway/snapshot",
            get(move || {
                let body = if served.fetch_add(1, Ordering::SeqCst) == 0 {
                    good.clone()
                } else {
                    bad.clone()
                };
                async move { ([("content-type", "application/json")], body) }
            }),
        )
        .route(
            "/v1/gateway/changes",
            get(|| async { (axum::http::StatusCode::CONFLICT, "{}") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_does_not_check_is_refused_and_the_last_good_one_stays() {
    let key = tollgate_model::key::from_random([3; 16]);
    let address = fake_control_plane(&key).await;
    let upstream = Upstream::start("orders");
    let text = cluster_config(&upstream, &address.to_string());
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &text,
        &[("TOLLGATE_GATEWAY_TOKEN", "tga_fake")],
    )
    .await;
    gateway.wait_for_keys(1).await;
    let started = Instant::now();
    while gateway
        .counted("tollgate_identity_snapshots_total{result=\"refused\"}")
        .await
        < 2.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no snapshot refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, echo) = call(&gateway, "/orders", Some(&key)).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(
        echo["headers"]["x-tollgate-customer-id"],
        "cus_00000000000000000000000000000001"
    );
    assert_eq!(gateway.ready().await["identities"]["version"], 1);
    let refused = gateway.wait_for_log(|line| {
        line["fields"]["message"]
            .as_str()
            .or(line["message"].as_str())
            .is_some_and(|m| m.starts_with("refused what the control plane sent"))
    });
    let line = refused.await;
    assert!(
        line.to_string()
            .contains("which the snapshot does not have"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_without_an_admin_token_prints_a_generated_one_once() {
    let upstream = Upstream::start("orders");
    let text = standalone_config(&upstream);
    let gateway = Gateway::start_with_env(tempfile::tempdir().unwrap(), &text, &[]).await;
    let line = gateway
        .wait_for_log(|line| {
            line.as_str()
                .is_some_and(|l| l.starts_with("first admin token (shown once, store it now): "))
        })
        .await;
    let token = line
        .as_str()
        .unwrap()
        .trim_start_matches("first admin token (shown once, store it now): ")
        .to_owned();
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    let (status, _) = api.call("GET", "/v1/plans", None).await;
    assert_eq!(status, 200, "the printed token is an admin token");

    // The next start has an admin already: nothing is printed, the token still works.
    let dir = gateway.kill();
    let gateway = Gateway::start_with_env(dir, &text, &[]).await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    assert_eq!(api.call("GET", "/v1/plans", None).await.0, 200);
    assert!(
        !gateway.logs().iter().any(|l| l
            .as_str()
            .is_some_and(|l| l.starts_with("first admin token"))),
        "printed once only"
    );
}

#[test]
fn a_weak_admin_token_stops_a_standalone_gateway_with_the_setting_named() {
    let upstream = Upstream::start("orders");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, standalone_config(&upstream)).unwrap();
    let output = std::process::Command::new(tollgate_tests::gateway::binary())
        .arg("--config")
        .arg(&path)
        .env("TOLLGATE_ADMIN_TOKEN", "short")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TOLLGATE_ADMIN_TOKEN: too weak: 5 characters, at least 32 are required"),
        "{stderr}"
    );
}

/// A snapshot file the gateway cannot write (its directory is a file) costs only the copy kept
/// for restarts: identities arrive, new keys work and a revocation is enforced within a second.
/// Before, every snapshot was refused for it and the gateway answered 503 for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_file_that_cannot_be_written_leaves_identities_and_changes_working() {
    let upstream = Upstream::start("orders");
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let api = control_plane.api();
    let token = api.gateway_token().await;
    let (_, _, first) = api.customer_with_key("unstored").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("not-a-directory"), "a file").unwrap();
    let text = gateway_config(
        &upstream,
        &format!(
            "url = \"http://{}\"\ntoken_env = \"TOLLGATE_GATEWAY_TOKEN\"\n\
             snapshot_file = \"not-a-directory/identities.json.gz\"",
            control_plane.address
        ),
    );
    let gateway =
        Gateway::start_with_env(dir, &text, &[("TOLLGATE_GATEWAY_TOKEN", token.as_str())]).await;
    let first = first["key"].as_str().unwrap().to_owned();
    until_status(&gateway, "/demo", &first, 200).await;
    // Changes still arrive (their journal cannot be written either).
    let (_, customer, second) = api.customer_with_key("unstored-too").await;
    let second_key = second["key"].as_str().unwrap();
    assert!(until_status(&gateway, "/demo", second_key, 200).await < Duration::from_secs(1));
    let (status, body) = api
        .call(
            "POST",
            &format!("/v1/keys/{}/revoke", second["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body} {customer}");
    assert!(until_status(&gateway, "/demo", second_key, 401).await < Duration::from_secs(1));
    assert_eq!(call(&gateway, "/demo", Some(&first)).await.0, 200);
}

/// A request carrying the upstream's own bearer token beside the product key in `X-API-Key` is
/// checked by the key, and the upstream gets its token back, not the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_that_is_not_a_key_is_the_upstreams_own_beside_x_api_key() {
    let upstream = Upstream::start("orders");
    let (gateway, api) = standalone(&upstream).await;
    let (_, customer, key) = api.customer_with_key("two-tokens").await;
    let key = key["key"].as_str().unwrap().to_owned();
    gateway.wait_for_keys(1).await;
    let response = client()
        .get(gateway.url("/orders/1"))
        .header("authorization", "Bearer user-session-token")
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let echo: Value = response.json().await.unwrap();
    let headers = &echo["headers"];
    assert_eq!(headers["authorization"], "Bearer user-session-token");
    assert!(headers.get("x-api-key").is_none(), "{headers}");
    assert_eq!(headers["x-tollgate-customer-id"], customer["id"]);
    // Without the key the token alone is refused as not a key.
    let (status, body) = call(&gateway, "/orders/1", Some("user-session-token")).await;
    assert_eq!(
        (status, problem_type(&body)),
        (401, "malformed-key"),
        "{body}"
    );
}

/// Key times (revocation, expiry) are the control plane's clock: a gateway whose clock is behind
/// it compares them with the control plane's time as its answers tell it, so a key revoked a
/// minute ago by the control plane's clock is refused though this gateway's clock has not
/// reached that time yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_times_are_compared_with_the_control_planes_clock() {
    use axum::routing::get;
    use sha2::{Digest, Sha256};

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // The control plane's clock is ten minutes ahead of this machine's.
    let ahead = 600_000;
    let customer = "cus_00000000000000000000000000000001";
    let keys: Vec<String> = (1..=3_u8)
        .map(|n| tollgate_model::key::from_random([n; 16]))
        .collect();
    let record = |n: usize, revoked: Option<i64>, expires: Option<i64>| {
        json!({
            "id": format!("key_{:032x}", n + 1),
            "customer_id": customer,
            "hash": hex::encode(Sha256::digest(keys[n].as_bytes())),
            "expires_at_ms": expires, "revoked_at_ms": revoked, "scopes": null
        })
    };
    let snapshot = json!({
        "version": 1,
        "plans": [{
            "id": "plan_1", "name": "basic", "rate_limits": [], "quota": null, "price": null,
            "status": "active", "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z"
        }],
        "customers": [{"id": customer, "plan_id": "plan_1", "status": "active"}],
        "keys": [
            // Revoked a minute ago and expired a minute ago, by the control plane's clock (both
            // still ahead of this gateway's), and one good for another minute by it.
            record(0, Some(now + ahead - 60_000), None),
            record(1, None, Some(now + ahead - 60_000)),
            record(2, None, Some(now + ahead + 60_000)),
        ]
    })
    .to_string();
    let time = move || {
        let server_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            + ahead;
        server_now.to_string()
    };
    let app = axum::Router::new()
        .route(
            "/v1/gateway/snapshot",
            get(move || {
                let body = snapshot.clone();
                let time = time();
                async move {
                    (
                        [
                            ("content-type", "application/json".to_owned()),
                            ("tollgate-time-ms", time),
                        ],
                        body,
                    )
                }
            }),
        )
        .route(
            "/v1/gateway/changes",
            get(move || async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                (
                    [("content-type", "application/json")],
                    json!({"version": 1, "changes": []}).to_string(),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let upstream = Upstream::start("orders");
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &cluster_config(&upstream, &address.to_string()),
        &[("TOLLGATE_GATEWAY_TOKEN", "tgw_any")],
    )
    .await;
    gateway.wait_for_keys(3).await;
    let (status, body) = call(&gateway, "/demo", Some(&keys[0])).await;
    assert_eq!(
        (status, problem_type(&body)),
        (401, "revoked-key"),
        "{body}"
    );
    let (status, body) = call(&gateway, "/demo", Some(&keys[1])).await;
    assert_eq!(
        (status, problem_type(&body)),
        (401, "expired-key"),
        "{body}"
    );
    assert_eq!(call(&gateway, "/demo", Some(&keys[2])).await.0, 200);
    let offset = gateway.ready().await["identities"]["control_plane_clock_offset_ms"]
        .as_i64()
        .unwrap();
    assert!((ahead - 5_000..=ahead).contains(&offset), "{offset}");
}

/// The README's quickstart, step by step, on the shipped `gateway.toml` (its listeners moved to
/// free ports, its log to JSON for the harness): the static route, a 404 problem, readiness and
/// metrics; then a plan, a customer and a key made with the same bodies `curl -d` sends (no JSON
/// content type), the key refused missing and taken, the usage view, and a revocation enforced
/// within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quickstart_works_on_the_shipped_config() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.toml")).unwrap();
    let mut text = shipped.clone();
    for (from, to) in [
        ("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\""),
        (
            "admin_listen = \"127.0.0.1:9090\"",
            "admin_listen = \"127.0.0.1:0\"",
        ),
        ("format = \"text\"", "format = \"json\""),
    ] {
        assert_eq!(
            shipped.matches(from).count(),
            1,
            "the shipped config has {from}"
        );
        text = text.replace(from, to);
    }
    let token = admin_token();
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &text,
        &[("TOLLGATE_ADMIN_TOKEN", token.as_str())],
    )
    .await;
    let hello = client().get(gateway.url("/hello")).send().await.unwrap();
    assert_eq!(hello.status(), 200);
    let nope = client().get(gateway.url("/nope")).send().await.unwrap();
    assert_eq!(nope.status(), 404);
    assert!(
        nope.text()
            .await
            .unwrap()
            .contains("urn:tollgate:problem:no-route")
    );
    let ready = reqwest::get(gateway.admin_url("/health/ready"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(gateway.metrics().await.contains("tollgate_"));

    // As `curl -s -X POST $CP/... -H "$AUTH" -d '...'` sends them.
    let curl = |path: &str, body: &str| {
        client()
            .post(gateway.admin_url(path))
            .bearer_auth(&token)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body.to_owned())
            .send()
    };
    let created = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()
    };
    let plan = created(
        curl(
            "/v1/plans",
            r#"{"name":"starter","rate_limits":[{"requests":10,"window_seconds":1}],"quota":{"requests":1000,"hard":true},"upgrade_url":"https://example.com/pricing"}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    let customer = created(
        curl(
            "/v1/customers",
            &format!(
                r#"{{"name":"Acme","email":"ops@acme.example","plan_id":"{}"}}"#,
                plan["id"].as_str().unwrap()
            ),
        )
        .await
        .unwrap(),
    )
    .await;
    let customer_id = customer["id"].as_str().unwrap();
    let key = created(
        curl(
            &format!("/v1/customers/{customer_id}/keys"),
            r#"{"name":"production"}"#,
        )
        .await
        .unwrap(),
    )
    .await;
    let key = key["key"].as_str().unwrap();

    let missing = client().get(gateway.url("/demo")).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    // A person types the next command later than the key takes to arrive; polling for it here
    // would count failed authentications against the shipped limit.
    gateway.wait_for_keys(1).await;
    assert_eq!(gateway.get_with_key("/demo", key).await.status(), 200);
    let taken = gateway.get_with_key("/demo", key).await;
    let ratelimit = taken.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(ratelimit.starts_with("\"rate-1s\";r="), "{ratelimit}");
    assert!(ratelimit.contains(", \"quota\";r="), "{ratelimit}");
    assert!(taken.headers().contains_key("x-quota-remaining"));
    let started = Instant::now();
    loop {
        let (status, usage) = call(&gateway, "/usage", Some(key)).await;
        assert_eq!(status, 200, "{usage}");
        if usage["used"] == 2 {
            assert_eq!(usage["quota"], 1000);
            assert!(usage["period"]["end"].is_string(), "{usage}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{usage}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let keys: Value = client()
        .get(gateway.admin_url(&format!("/v1/customers/{customer_id}/keys")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = keys["data"][0]["id"].as_str().unwrap();
    let revoked = client()
        .post(gateway.admin_url(&format!("/v1/keys/{key_id}/revoke")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let took = until_status(&gateway, "/demo", key, 401).await;
    assert!(took < PROPAGATION, "the revocation took {took:?}");
    let (_, body) = call(&gateway, "/demo", Some(key)).await;
    assert_eq!(problem_type(&body), "revoked-key");
}

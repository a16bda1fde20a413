//! Request ids, security headers and what the upstream is told about the client.

use serde_json::Value;
use tollgate_tests::{Gateway, Upstream, client, config};

fn headers_config(upstream: &Upstream) -> String {
    config(&format!(
        r#"
[security_headers]
extra = {{ "permissions-policy" = "geolocation=()" }}

[[upstreams]]
name = "echo"
targets = ["{}"]
[[upstreams]]
name = "renamed"
targets = ["{}"]
host_header = "orders.internal"

[[routes]]
name = "echo"
path_prefix = "/"
upstream = "echo"
[[routes]]
name = "framed"
path_prefix = "/framed"
upstream = "echo"
security_headers = {{ frame_options = "SAMEORIGIN", referrer_policy = "" }}
[[routes]]
name = "bare"
path_prefix = "/bare"
upstream = "echo"
security_headers = {{ enabled = false }}
[[routes]]
name = "renamed"
path_prefix = "/renamed"
upstream = "renamed"
"#,
        upstream.target(),
        upstream.target()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_generated_kept_and_forwarded() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&headers_config(&upstream)).await;
    let client = client();

    let response = client.get(gateway.url("/x")).send().await.unwrap();
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["headers"]["x-request-id"], generated,
        "the upstream sees the same id"
    );

    let response = client
        .get(gateway.url("/x"))
        .header("x-request-id", "client-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "client-id-42");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["headers"]["x-request-id"], "client-id-42");

    let response = client
        .get(gateway.url("/x"))
        .header("x-request-id", "bad id with spaces")
        .send()
        .await
        .unwrap();
    let replaced = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(replaced, "bad id with spaces");
    assert_eq!(replaced.len(), 36);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["headers"]["x-request-id"], replaced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_headers_are_added_and_overridden_per_route() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&headers_config(&upstream)).await;
    let client = client();

    let response = client.get(gateway.url("/x")).send().await.unwrap();
    let headers = response.headers();
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["permissions-policy"], "geolocation=()");
    assert!(
        !headers.contains_key("content-security-policy"),
        "no CSP on proxied bodies"
    );
    assert!(
        !headers.contains_key("strict-transport-security"),
        "no HSTS on plain HTTP"
    );

    let response = client.get(gateway.url("/framed")).send().await.unwrap();
    assert_eq!(response.headers()["x-frame-options"], "SAMEORIGIN");
    assert!(!response.headers().contains_key("referrer-policy"));
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");

    let response = client.get(gateway.url("/bare")).send().await.unwrap();
    for name in [
        "x-content-type-options",
        "x-frame-options",
        "referrer-policy",
        "permissions-policy",
    ] {
        assert!(
            !response.headers().contains_key(name),
            "{name} is off on this route"
        );
    }
    assert!(response.headers().contains_key("x-request-id"));

    let response = client
        .get(gateway.url("/nowhere"))
        .header("host", "elsewhere.test")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the catch-all route");
    let response = client.delete(gateway.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 200);

    // Gateway-written bodies also get the CSP.
    let gateway_problem = Gateway::start(&config("")).await;
    let response = client
        .get(gateway_problem.url("/none"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_learns_the_client_and_the_host() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&headers_config(&upstream)).await;
    let client = client();
    let body: Value = client
        .get(gateway.url("/x"))
        .header("host", "api.example.test")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["headers"]["host"], "api.example.test",
        "the client's Host by default"
    );
    assert_eq!(body["headers"]["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(body["headers"]["x-forwarded-proto"], "http");
    assert_eq!(body["headers"]["x-forwarded-host"], "api.example.test");

    let body: Value = client
        .get(gateway.url("/renamed/1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["headers"]["host"], "orders.internal",
        "host_header replaces it"
    );
}

//! Routing (prefix, host, method), prefix stripping, static responses, the no-route problem, and
//! connection reuse towards upstreams.

use serde_json::Value;
use tollgate_tests::{Gateway, Upstream, client, config};

fn two_upstreams(orders: &Upstream, users: &Upstream) -> String {
    format!(
        r#"
[[upstreams]]
name = "orders"
targets = ["{}"]
[[upstreams]]
name = "users"
targets = ["{}"]
"#,
        orders.target(),
        users.target()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_longest_prefix_and_strips_it() {
    let orders = Upstream::start("orders");
    let users = Upstream::start("users");
    let gateway = Gateway::start(&config(&format!(
        r#"{}
[[routes]]
name = "orders"
path_prefix = "/orders"
strip_prefix = true
upstream = "orders"
[[routes]]
name = "order-admin"
path_prefix = "/orders/admin"
upstream = "users"
[[routes]]
name = "users"
path_prefix = "/users"
upstream = "users"
"#,
        two_upstreams(&orders, &users)
    )))
    .await;
    let client = client();
    let get = |path: &str| {
        let request = client.get(gateway.url(path));
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let body = get("/orders/7?x=1").await;
    assert_eq!(
        (body["upstream"].as_str(), body["path"].as_str()),
        (Some("orders"), Some("/7?x=1"))
    );
    let body = get("/orders").await;
    assert_eq!(body["path"], "/");
    let body = get("/orders/admin/1").await;
    assert_eq!(
        (body["upstream"].as_str(), body["path"].as_str()),
        (Some("users"), Some("/orders/admin/1"))
    );
    let body = get("/users/3").await;
    assert_eq!(
        (body["upstream"].as_str(), body["path"].as_str()),
        (Some("users"), Some("/users/3"))
    );

    let response = client.get(gateway.url("/ordersx")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem,
        serde_json::json!({
            "type": "urn:tollgate:problem:no-route",
            "title": "No route matches this request",
            "status": 404,
            "detail": "no route is configured for this host and path",
            "request_id": request_id,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_method() {
    let orders = Upstream::start("orders");
    let users = Upstream::start("users");
    let gateway = Gateway::start(&config(&format!(
        r#"{}
[[routes]]
name = "api-read"
host = "api.test"
path_prefix = "/"
methods = ["GET"]
upstream = "orders"
[[routes]]
name = "api-write"
host = "api.test"
path_prefix = "/"
methods = ["POST", "PUT"]
upstream = "users"
[[routes]]
name = "tenants"
host = "*.tenants.test"
path_prefix = "/"
upstream = "users"
"#,
        two_upstreams(&orders, &users)
    )))
    .await;
    let client = client();
    let send = |method: reqwest::Method, host: &str| {
        client
            .request(method, gateway.url("/things"))
            .header("host", host)
            .send()
    };
    let body: Value = send(reqwest::Method::GET, "api.test")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["upstream"], "orders");
    let body: Value = send(reqwest::Method::POST, "API.test:8080")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["upstream"], "users");
    let body: Value = send(reqwest::Method::GET, "acme.tenants.test")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["upstream"], "users");

    let response = send(reqwest::Method::DELETE, "api.test").await.unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET, POST, PUT");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:method-not-allowed");

    let response = send(reqwest::Method::GET, "other.test").await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(orders.requests() + users.requests(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_route_answers_by_itself() {
    let gateway = Gateway::start(&config(
        r#"
[[routes]]
name = "maintenance"
path_prefix = "/maintenance"
respond = { status = 503, headers = { "content-type" = "text/plain", "retry-after" = "120" }, body = "back soon" }
"#,
    ))
    .await;
    let response = client()
        .get(gateway.url("/maintenance/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-type"], "text/plain");
    assert_eq!(response.headers()["retry-after"], "120");
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.text().await.unwrap(), "back soon");

    let response = client()
        .head(gateway.url("/maintenance"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["content-length"], "9");
    assert_eq!(response.text().await.unwrap(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuses_upstream_connections() {
    let orders = Upstream::start("orders");
    let gateway = Gateway::start(&config(&format!(
        r#"
[[upstreams]]
name = "orders"
targets = ["{}"]
[[routes]]
name = "orders"
path_prefix = "/"
upstream = "orders"
"#,
        orders.target()
    )))
    .await;
    let client = client();
    for _ in 0..20 {
        let response = client.get(gateway.url("/x")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert_eq!(orders.requests(), 20);
    assert_eq!(
        orders.connections(),
        1,
        "sequential requests share one upstream connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_are_refused_before_routing() {
    let orders = Upstream::start("orders");
    let gateway = Gateway::start(&config(&format!(
        r#"
[[upstreams]]
name = "orders"
targets = ["{}"]
[[routes]]
name = "public"
path_prefix = "/public"
strip_prefix = true
upstream = "orders"
"#,
        orders.target()
    )))
    .await;
    for path in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/public/./x",
        "/public/..;/admin",
        "/public/..%2fadmin",
    ] {
        let mut connection = tollgate_tests::raw::RawConnection::connect(gateway.proxy)
            .await
            .unwrap();
        let response = connection.get(path).await.unwrap();
        assert_eq!(response.status, 400, "{path}");
        let problem: Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(problem["type"], "urn:tollgate:problem:invalid-path");
    }
    assert_eq!(orders.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_every_listen_address() {
    let gateway = Gateway::start(
        &config(
            r#"
[[routes]]
name = "hello"
path_prefix = "/"
respond = { body = "hi" }
"#,
        )
        .replace(
            "\nlisten = \"127.0.0.1:0\"",
            "\nlisten = [\"127.0.0.1:0\", \"127.0.0.1:0\"]",
        ),
    )
    .await;
    assert_eq!(gateway.listeners.len(), 2);
    assert_ne!(gateway.listeners[0], gateway.listeners[1]);
    for address in &gateway.listeners {
        let body = client()
            .get(format!("http://{address}/"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "hi");
    }
}

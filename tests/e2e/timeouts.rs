//! Read, whole-request and connect failures: a problem response in bounded time, never a hang.

use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::{Gateway, Upstream, client, config, proxy_route};

fn upstream_config(upstream: &Upstream, timeouts: &str) -> String {
    let upstream_extra = format!("{timeouts}\n[upstreams.passive]\nmax_fails = 0");
    config(&proxy_route(
        "slow",
        &upstream.target(),
        "/",
        &upstream_extra,
        "",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_timeout_is_a_504_problem() {
    let upstream = Upstream::start("slow");
    let gateway = Gateway::start(&upstream_config(&upstream, "read_timeout = \"300ms\"")).await;
    let started = Instant::now();
    let response = client()
        .get(gateway.url("/slow/5000"))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 504);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:upstream-timeout");
    assert_eq!(problem["request_id"], request_id);
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}, not after the upstream's 5 s"
    );

    // A fast request on the same route still works.
    let response = client().get(gateway.url("/slow/1")).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_bounds_the_whole_exchange() {
    let upstream = Upstream::start("slow");
    let gateway = Gateway::start(&upstream_config(
        &upstream,
        "read_timeout = \"10s\"\nrequest_timeout = \"400ms\"",
    ))
    .await;
    let started = Instant::now();
    let response = client()
        .get(gateway.url("/slow/5000"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        504,
        "no header within the request timeout"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // The header comes at once, then a byte every 100 ms for ever: the body is cut at the deadline.
    let started = Instant::now();
    let response = client().get(gateway.url("/drip")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await;
    assert!(body.is_err(), "a body cut at the deadline is incomplete");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "cut after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_a_502_problem() {
    let mut upstream = Upstream::start("gone");
    let gateway = Gateway::start(&upstream_config(&upstream, "connect_timeout = \"500ms\"")).await;
    upstream.stop();
    let response = client().get(gateway.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 502);
    let text = response.text().await.unwrap();
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:upstream-unreachable");
    assert!(
        !text.contains("127.0.0.1"),
        "no internal address leaks: {text}"
    );
    assert!(
        !text.to_lowercase().contains("refused"),
        "no internal message leaks: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_error_closes_the_connection_and_says_so() {
    let mut upstream = Upstream::start("gone");
    let gateway = Gateway::start(&upstream_config(&upstream, "")).await;
    upstream.stop();
    let mut connection = tollgate_tests::raw::RawConnection::connect(gateway.proxy)
        .await
        .unwrap();
    let response = connection.get("/x").await.unwrap();
    assert_eq!(response.status, 502);
    assert_eq!(response.headers["connection"], "close");
    assert!(
        connection.get("/x").await.is_err(),
        "the gateway closed it as announced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_a_504_problem() {
    let blackhole = tollgate_tests::blackhole::Blackhole::start();
    let gateway = Gateway::start(&config(&proxy_route(
        "hole",
        &blackhole.addr.to_string(),
        "/",
        "connect_timeout = \"300ms\"",
        "",
    )))
    .await;
    let started = Instant::now();
    let response = client().get(gateway.url("/x")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:upstream-timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_timeout_is_retried_on_another_target() {
    let blackhole = tollgate_tests::blackhole::Blackhole::start();
    let upstream = Upstream::start("live");
    let gateway = Gateway::start(&config(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = ["{}", "{}"]
connect_timeout = "300ms"
[[routes]]
name = "pool"
path_prefix = "/"
upstream = "pool"
"#,
        blackhole.addr,
        upstream.target()
    )))
    .await;
    for _ in 0..4 {
        let response = client().get(gateway.url("/x")).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(upstream.requests(), 4);
}

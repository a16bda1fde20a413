//! Round robin, passive failure marking, connect retries and active health checks.

use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_tests::{Gateway, Upstream, client, config, gateway::PATIENCE};

fn pool_config(targets: &[&Upstream], extra: &str) -> String {
    let targets: Vec<String> = targets
        .iter()
        .map(|u| format!("\"{}\"", u.target()))
        .collect();
    config(&format!(
        r#"
[[upstreams]]
name = "pool"
targets = [{}]
connect_timeout = "1s"
read_timeout = "5s"
{extra}
[[routes]]
name = "pool"
path_prefix = "/"
upstream = "pool"
"#,
        targets.join(", ")
    ))
}

async fn served_by(gateway: &Gateway, client: &reqwest::Client) -> (u16, Value) {
    let response = client.get(gateway.url("/who")).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn wait_for_target_health(gateway: &Gateway, target: usize, healthy: bool) {
    let started = Instant::now();
    loop {
        let ready = gateway.ready().await;
        if ready["upstreams"][0]["targets"][target]["healthy"] == healthy {
            return;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "target {target} never became healthy={healthy}: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_requests_evenly() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let c = Upstream::start("c");
    let gateway = Gateway::start(&pool_config(&[&a, &b, &c], "")).await;
    let client = client();
    for _ in 0..30 {
        assert_eq!(served_by(&gateway, &client).await.0, 200);
    }
    assert_eq!((a.requests(), b.requests(), c.requests()), (10, 10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_target_gets_no_traffic_and_no_request_fails() {
    let mut a = Upstream::start("a");
    let b = Upstream::start("b");
    let gateway = Gateway::start(&pool_config(
        &[&a, &b],
        "[upstreams.passive]\nmax_fails = 1\nfail_timeout = \"30s\"",
    ))
    .await;
    let client = client();
    for _ in 0..4 {
        assert_eq!(served_by(&gateway, &client).await.0, 200);
    }
    a.stop();
    for _ in 0..20 {
        let (status, body) = served_by(&gateway, &client).await;
        assert_eq!(
            status, 200,
            "the refused connection is retried on the other target"
        );
        assert_eq!(body["upstream"], "b");
    }
    let ready = gateway.ready().await;
    assert_eq!(ready["upstreams"][0]["targets"][0]["healthy"], false);
    assert_eq!(
        ready["upstreams"][0]["targets"][0]["passively_marked_down"],
        true
    );
    assert_eq!(ready["upstreams"][0]["healthy_targets"], 1);
    assert_eq!(
        gateway
            .metric(r#"tollgate_upstream_failures_total{upstream="pool"}"#)
            .await,
        Some(1.0),
        "one failure marks the target down; later requests skip it"
    );
    let retries = gateway
        .metric(r#"tollgate_upstream_retries_total{upstream="pool"}"#)
        .await;
    assert!(retries.is_some_and(|r| r >= 1.0), "retries: {retries:?}");
    assert_eq!(
        gateway
            .metric(r#"tollgate_upstream_target_healthy{target="0",upstream="pool"}"#)
            .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_targets_down_is_a_problem_then_503() {
    let mut a = Upstream::start("a");
    let mut b = Upstream::start("b");
    let gateway = Gateway::start(&pool_config(
        &[&a, &b],
        "[upstreams.passive]\nmax_fails = 1\nfail_timeout = \"30s\"",
    ))
    .await;
    a.stop();
    b.stop();
    let client = client();
    let response = client.get(gateway.url("/who")).send().await.unwrap();
    assert_eq!(
        response.status(),
        502,
        "both targets refused the connection"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["type"], "urn:tollgate:problem:upstream-unreachable");

    let response = client.get(gateway.url("/who")).send().await.unwrap();
    assert_eq!(response.status(), 503, "both targets are now marked down");
    assert_eq!(response.headers()["retry-after"], "1");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem,
        serde_json::json!({
            "type": "urn:tollgate:problem:upstream-unavailable",
            "title": "Upstream unavailable",
            "status": 503,
            "detail": "no healthy upstream target is available; retry later",
            "request_id": request_id,
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_a_target_out_and_bring_it_back() {
    let a = Upstream::start("a");
    let b = Upstream::start("b");
    let gateway = Gateway::start(&pool_config(
        &[&a, &b],
        r#"[upstreams.health_check]
path = "/health"
interval = "50ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2"#,
    ))
    .await;
    let client = client();
    a.set_healthy(false);
    wait_for_target_health(&gateway, 0, false).await;
    assert_eq!(
        gateway
            .metric(r#"tollgate_upstream_target_healthy{target="0",upstream="pool"}"#)
            .await,
        Some(0.0)
    );
    let before = a.requests();
    for _ in 0..10 {
        let (status, body) = served_by(&gateway, &client).await;
        assert_eq!((status, body["upstream"].as_str()), (200, Some("b")));
    }
    assert_eq!(a.requests(), before, "an unhealthy target gets no requests");

    a.set_healthy(true);
    wait_for_target_health(&gateway, 0, true).await;
    let mut seen_a = false;
    for _ in 0..4 {
        seen_a |= served_by(&gateway, &client).await.1["upstream"] == "a";
    }
    assert!(seen_a, "a recovered target is back in rotation");
    assert!(a.health_checks() >= 4, "checks ran: {}", a.health_checks());
    assert_eq!(
        gateway
            .metric(r#"tollgate_upstream_target_healthy{target="0",upstream="pool"}"#)
            .await,
        Some(1.0)
    );
}

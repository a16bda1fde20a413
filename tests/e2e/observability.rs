//! The admin listener: liveness, readiness, Prometheus metrics, and the access log.

use serde_json::Value;
use tollgate_tests::{Gateway, Upstream, client, config, proxy_route};

fn orders_config(upstream: &Upstream) -> String {
    config(&proxy_route(
        "orders",
        &upstream.target(),
        "/orders",
        "",
        "strip_prefix = true",
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_latency_and_health() {
    let upstream = Upstream::start("orders");
    let gateway = Gateway::start(&orders_config(&upstream)).await;
    let client = client();
    for _ in 0..3 {
        assert_eq!(
            client
                .get(gateway.url("/orders/1"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(
        client
            .post(gateway.url("/orders/status/503"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        client
            .get(gateway.url("/missing"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    // Requests are counted in their logging phase, just after the response went out.
    for (series, count) in [
        (
            r#"tollgate_requests_total{method="GET",route="orders",status_class="2xx"}"#,
            3.0,
        ),
        (
            r#"tollgate_requests_total{method="POST",route="orders",status_class="5xx"}"#,
            1.0,
        ),
        (
            r#"tollgate_requests_total{method="GET",route="(none)",status_class="4xx"}"#,
            1.0,
        ),
        (
            r#"tollgate_request_duration_seconds_count{route="orders"}"#,
            4.0,
        ),
    ] {
        gateway.wait_for_metric(series, count).await;
    }

    let response = client
        .get(gateway.admin_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = response.text().await.unwrap();
    let value = |series: &str| -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    };
    assert_eq!(
        value(r#"tollgate_requests_total{method="GET",route="orders",status_class="2xx"}"#),
        Some(3.0)
    );
    assert_eq!(
        value(r#"tollgate_requests_total{method="POST",route="orders",status_class="5xx"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(r#"tollgate_requests_total{method="GET",route="(none)",status_class="4xx"}"#),
        Some(1.0)
    );
    assert_eq!(
        value(r#"tollgate_request_duration_seconds_count{route="orders"}"#),
        Some(4.0)
    );
    assert_eq!(
        value(r#"tollgate_upstream_duration_seconds_count{upstream="orders"}"#),
        Some(4.0)
    );
    assert_eq!(
        value(r#"tollgate_upstream_target_healthy{target="0",upstream="orders"}"#),
        Some(1.0)
    );
    assert_eq!(value("tollgate_config_version"), Some(1.0));
    assert_eq!(
        value(r#"tollgate_config_reloads_total{result="ok"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(r#"tollgate_config_reloads_total{result="failed"}"#),
        Some(0.0)
    );
    assert!(value("tollgate_config_loaded_timestamp_seconds").is_some_and(|t| t > 1.7e9));
    assert!(!text.contains("127.0.0.1"), "no address in any label");
    gateway
        .wait_for_metric("tollgate_requests_in_flight", 0.0)
        .await;

    let slow = tokio::spawn({
        let url = gateway.url("/orders/slow/1000");
        async move {
            tollgate_tests::client()
                .get(url)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    upstream.wait_for_requests(5).await;
    assert_eq!(
        gateway.metric("tollgate_requests_in_flight").await,
        Some(1.0)
    );
    assert_eq!(slow.await.unwrap(), 200);
    gateway
        .wait_for_metric("tollgate_requests_in_flight", 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_describe_the_gateway() {
    let upstream = Upstream::start("orders");
    let gateway = Gateway::start(&orders_config(&upstream)).await;
    let client = client();
    let response = client
        .get(gateway.admin_url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        serde_json::json!({"status": "ok"})
    );

    let response = client
        .get(gateway.admin_url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let ready: Value = response.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["config"]["version"], 1);
    assert!(ready["config"]["loaded_at_unix"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(ready["upstreams"][0]["name"], "orders");
    assert_eq!(ready["upstreams"][0]["healthy_targets"], 1);
    assert_eq!(
        ready["upstreams"][0]["targets"][0]["address"],
        upstream.target()
    );
    assert_eq!(ready["upstreams"][0]["targets"][0]["healthy"], true);

    let response = client.get(gateway.admin_url("/nope")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let response = client
        .post(gateway.admin_url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "GET,HEAD");

    // The proxy listener does not serve admin endpoints.
    let response = client.get(gateway.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_one_structured_access_log_line() {
    let upstream = Upstream::start("orders");
    let gateway = Gateway::start(&orders_config(&upstream)).await;
    let response = client()
        .post(gateway.url("/orders/9?secret=hidden"))
        .header("x-request-id", "log-me-1")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let line = gateway
        .wait_for_log(|l| l["request_id"] == "log-me-1")
        .await;
    assert_eq!(line["target"], "tollgate::access");
    assert_eq!(line["method"], "POST");
    assert_eq!(
        line["path"], "/orders/9",
        "the query string is never logged"
    );
    assert_eq!(line["route"], "orders");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream_target"], upstream.target());
    assert_eq!(line["attempts"], 1);
    assert_eq!(line["bytes_in"], 5);
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(line["upstream_ms"].as_f64().unwrap() > 0.0);
    let lines = gateway
        .logs()
        .iter()
        .filter(|l| l["request_id"] == "log-me-1")
        .count();
    assert_eq!(lines, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pingoras_own_log_records_come_out_as_structured_lines() {
    let gateway = Gateway::start(&config("")).await;
    let line = gateway
        .wait_for_log(|l| {
            l["target"]
                .as_str()
                .is_some_and(|t| t.starts_with("pingora_core"))
        })
        .await;
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(line["message"].is_string(), "{line}");
}

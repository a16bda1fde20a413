//! SIGTERM: stop accepting, finish what is in flight, exit 0.

use std::time::{Duration, Instant};

use tollgate_tests::{Gateway, Upstream, client, config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits_zero() {
    let upstream = Upstream::start("echo");
    let mut gateway = Gateway::start(&config(&format!(
        r#"
[[upstreams]]
name = "echo"
targets = ["{}"]
[[routes]]
name = "echo"
path_prefix = "/"
upstream = "echo"
"#,
        upstream.target()
    )))
    .await;
    let slow = tokio::spawn({
        let url = gateway.url("/slow/1500");
        async move { client().get(url).send().await.unwrap() }
    });
    while upstream.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    gateway.signal("TERM");
    gateway
        .wait_for_log(|l| l["message"] == "SIGTERM: draining")
        .await;

    let ready = reqwest::get(gateway.admin_url("/health/ready")).await;
    if let Ok(ready) = ready {
        assert_eq!(ready.status(), 503, "a draining gateway is not ready");
    }

    let response = slow.await.unwrap();
    assert_eq!(response.status(), 200, "the request in flight completes");
    assert_eq!(response.text().await.unwrap(), "echo slept 1500 ms");
    let status = gateway.wait_exit(Duration::from_secs(9)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(9),
        "exits once drained, not after the whole 10 s grace period"
    );
    assert!(
        tokio::net::TcpStream::connect(gateway.proxy).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_exits_at_once_on_sigterm() {
    let mut gateway = Gateway::start(&config("")).await;
    gateway.signal("TERM");
    let status = gateway.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
}

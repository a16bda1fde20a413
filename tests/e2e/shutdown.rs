//! SIGTERM: stop accepting, finish what is in flight, exit 0.

use std::time::{Duration, Instant};

use tollgate_tests::control_plane::{ControlPlane, PostgresDatabase};
use tollgate_tests::{Gateway, Upstream, client, config, proxy_route};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits_zero() {
    let upstream = Upstream::start("echo");
    let mut gateway = Gateway::start(&config(&proxy_route(
        "echo",
        &upstream.target(),
        "/",
        "",
        "",
    )))
    .await;
    let slow = tokio::spawn({
        let url = gateway.url("/slow/1500");
        async move { client().get(url).send().await.unwrap() }
    });
    upstream.wait_for_requests(1).await;
    let signalled = Instant::now();
    gateway.signal("TERM");
    gateway
        .wait_for_log(|l| l["message"] == "SIGTERM: draining")
        .await;

    // The admin listener stays up during the drain and reports it; the proxy takes no new
    // connections.
    let ready = reqwest::get(gateway.admin_url("/health/ready"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "a draining gateway is not ready");
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["status"], "draining");
    assert!(
        tokio::net::TcpStream::connect(gateway.proxy).await.is_err(),
        "new connections are refused while draining"
    );

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
    let signalled = Instant::now();
    let status = gateway.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "took {:?}",
        signalled.elapsed()
    );
}

fn slow_config(upstream: &Upstream, grace: &str) -> String {
    config(&proxy_route("echo", &upstream.target(), "/", "", "")).replace(
        "grace_period = \"10s\"",
        &format!("grace_period = \"{grace}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_longer_than_the_grace_period_is_cut_and_the_exit_is_still_zero() {
    let upstream = Upstream::start("echo");
    let mut gateway = Gateway::start(&slow_config(&upstream, "1s")).await;
    let slow = tokio::spawn({
        let url = gateway.url("/slow/20000");
        async move { client().get(url).send().await }
    });
    upstream.wait_for_requests(1).await;
    let signalled = Instant::now();
    gateway.signal("TERM");
    let status = gateway.wait_exit(Duration::from_secs(6)).await;
    assert_eq!(status.code(), Some(0));
    let elapsed = signalled.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "waited the grace period: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "grace 1 s + Pingora's 1 s runtime stop: {elapsed:?}"
    );
    assert!(
        slow.await.unwrap().is_err(),
        "the request still running was cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let upstream = Upstream::start("echo");
    let mut gateway = Gateway::start(&slow_config(&upstream, "30s")).await;
    let _slow = tokio::spawn({
        let url = gateway.url("/slow/20000");
        async move { client().get(url).send().await }
    });
    upstream.wait_for_requests(1).await;
    gateway.signal("TERM");
    gateway
        .wait_for_log(|l| l["message"] == "SIGTERM: draining")
        .await;
    let signalled = Instant::now();
    gateway.signal("TERM");
    let status = gateway.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(2));
}

/// A control plane stops on SIGTERM (what service managers send) as on Ctrl-C: it stops
/// listening, lets requests in flight finish, and exits 0, rather than being killed by the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_exits_zero_on_sigterm() {
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let address = control_plane.address;
    let status = control_plane.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
    assert!(
        std::net::TcpStream::connect(address).is_err(),
        "still listening after it exited"
    );
}

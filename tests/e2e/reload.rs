//! Hot reload: new config live, bad config refused, connections and requests in flight unaffected.

use serde_json::Value;
use tollgate_tests::raw::RawConnection;
use tollgate_tests::{Gateway, Upstream, client, config};

fn routes(upstream: &Upstream, extra_route: &str) -> String {
    config(&format!(
        r#"
[[upstreams]]
name = "echo"
targets = ["{}"]
[[routes]]
name = "old"
path_prefix = "/old"
strip_prefix = true
upstream = "echo"
{extra_route}
"#,
        upstream.target()
    ))
}

const NEW_ROUTE: &str = r#"
[[routes]]
name = "new"
path_prefix = "/new"
respond = { status = 200, body = "new route" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_file_is_applied_without_dropping_connections() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&routes(&upstream, "")).await;
    let mut connection = RawConnection::connect(gateway.proxy).await.unwrap();
    assert_eq!(connection.get("/old/1").await.unwrap().status, 200);
    assert_eq!(connection.get("/new").await.unwrap().status, 404);

    gateway.write_config(&routes(&upstream, NEW_ROUTE));
    gateway.wait_for_version(2).await;

    // The same keep-alive connection carries on under the new config.
    let response = connection.get("/new").await.unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"new route");
    assert_eq!(connection.get("/old/2").await.unwrap().status, 200);
    assert_eq!(
        gateway
            .metric(r#"tollgate_config_reloads_total{result="ok"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(gateway.metric("tollgate_config_version").await, Some(2.0));
    gateway
        .wait_for_log(|l| {
            l["message"] == "config reloaded" && l["trigger"] == "file" && l["version"] == 2
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_and_the_running_config_stays() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&routes(&upstream, "")).await;
    gateway.write_config(&routes(
        &upstream,
        "[[routes]]\nname = \"broken\"\npath_prefix = \"/b\"\nupstream = \"missing\"\n",
    ));
    let line = gateway
        .wait_for_log(|l| l["message"] == "config reload refused; the running config stays")
        .await;
    assert!(
        line["problems"]
            .as_str()
            .unwrap()
            .contains("routes[1].upstream: no upstream named \\\"missing\\\" is defined"),
        "{line}"
    );
    assert_eq!(
        gateway
            .metric(r#"tollgate_config_reloads_total{result="failed"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(gateway.ready().await["config"]["version"], 1);
    assert_eq!(
        client()
            .get(gateway.url("/old/1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Fixing the file applies it.
    gateway.write_config(&routes(&upstream, NEW_ROUTE));
    gateway.wait_for_version(2).await;
    assert_eq!(
        client()
            .get(gateway.url("/new"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_when_watching_is_off() {
    let upstream = Upstream::start("echo");
    let unwatched =
        |extra: &str| routes(&upstream, extra).replace("[log]", "watch_config = false\n\n[log]");
    let gateway = Gateway::start(&unwatched("")).await;
    gateway.write_config(&unwatched(NEW_ROUTE));
    assert_eq!(gateway.ready().await["config"]["version"], 1);
    gateway.signal("HUP");
    gateway.wait_for_version(2).await;
    gateway
        .wait_for_log(|l| l["message"] == "config reloaded" && l["trigger"] == "sighup")
        .await;
    assert_eq!(
        client()
            .get(gateway.url("/new"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_under_the_config_it_started_with() {
    let upstream = Upstream::start("echo");
    let gateway = Gateway::start(&routes(&upstream, "")).await;
    let slow = tokio::spawn({
        let url = gateway.url("/old/slow/1500");
        async move { client().get(url).send().await.unwrap() }
    });
    // Wait until the upstream has the request, then remove its route.
    upstream.wait_for_requests(1).await;
    gateway.write_config(&config(NEW_ROUTE));
    gateway.wait_for_version(2).await;
    assert_eq!(
        client()
            .get(gateway.url("/old/1"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let response = slow.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "echo slept 1500 ms");
    let ready: Value = gateway.ready().await;
    assert_eq!(ready["upstreams"].as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_settings_fixed_at_start_says_so() {
    let upstream = Upstream::start("echo");
    let settings = |prefix: &str, batch: u32, refund: bool| {
        format!(
            r#"
[redis]
url = "redis://127.0.0.1:6379"
key_prefix = "{prefix}"
[metering]
batch_size = {batch}
refund_upstream_5xx = {refund}
"#
        )
    };
    let gateway = Gateway::start(&routes(
        &upstream,
        &settings("tollgate-reload-a", 100, true),
    ))
    .await;
    let redis_warning = |l: &Value| {
        l["message"] == "[redis] changed: the shared counters' settings apply after a restart"
    };
    let metering_warning = |l: &Value| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("[metering] changed"))
    };
    // Only refund_upstream_5xx changes: it applies now, nothing to warn about.
    gateway.write_config(&routes(
        &upstream,
        &settings("tollgate-reload-a", 100, false),
    ));
    gateway.wait_for_version(2).await;
    gateway
        .wait_for_log(|l| l["message"] == "config reloaded" && l["version"] == 2)
        .await;
    let logs = gateway.logs();
    assert!(!logs.iter().any(|l| redis_warning(l) || metering_warning(l)));
    // The Redis key prefix and the batch size apply only after a restart: said.
    gateway.write_config(&routes(
        &upstream,
        &settings("tollgate-reload-b", 200, false),
    ));
    gateway.wait_for_version(3).await;
    gateway.wait_for_log(redis_warning).await;
    gateway.wait_for_log(metering_warning).await;
}

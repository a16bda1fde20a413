//! Metering: every admitted request stored once in the usage ledger, whatever crashes; the admin
//! and customer views read it; quota counters are rebuilt from it after a restart or a flushed
//! Redis.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tollgate_tests::control_plane::{AdminApi, admin_token};
use tollgate_tests::redis::RedisServer;
use tollgate_tests::{Gateway, Upstream, client, config};

fn standalone_config(upstream: &Upstream, extra: &str) -> String {
    config(&format!(
        r#"
[control_plane]
embedded = true

[metering]
flush_interval = "200ms"

{extra}

[[upstreams]]
name = "api"
targets = ["{target}"]

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "api"
auth = "key"

[[routes]]
name = "status"
path_prefix = "/status"
upstream = "api"
auth = "key"

[[routes]]
name = "me"
path_prefix = "/me"
auth = "key"
usage = true
"#,
        target = upstream.target()
    ))
}

/// A standalone gateway of `config`, its embedded control plane given an admin token of the
/// test's own, and that control plane's admin API.
async fn standalone(config: &str) -> (Gateway, AdminApi) {
    let token = admin_token();
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        config,
        &[("TOLLGATE_ADMIN_TOKEN", token.as_str())],
    )
    .await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    (gateway, api)
}

struct Customer {
    id: String,
    key: String,
}

async fn customer_on(api: &AdminApi, plan: Value) -> Customer {
    let (id, key) = api.customer_on_plan(plan).await;
    Customer { id, key }
}

async fn get(gateway: &Gateway, path: &str, key: &str) -> reqwest::Response {
    gateway.get_with_key(path, key).await
}

/// Polls the admin usage view until `used` is `expected`; the view.
async fn wait_for_used(api: &AdminApi, customer: &str, expected: u64) -> Value {
    let started = Instant::now();
    loop {
        let (status, usage) = api
            .call("GET", &format!("/v1/customers/{customer}/usage"), None)
            .await;
        assert_eq!(status, 200, "{usage}");
        if usage["used"].as_u64() == Some(expected) {
            return usage;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "used is {} and not {expected}",
            usage["used"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn header(response: &reqwest::Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map_or(String::new(), |v| v.to_str().unwrap().to_owned())
}

/// A response still streaming when the spool segment of its pending record is closed: its
/// final record lands in a later segment. The request is stored once, with its final size, and
/// the segment kept for it is deleted once it is settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_records_span_two_segments_is_stored_once_with_its_final_size() {
    let upstream = Upstream::start("api");
    let stream_route = r#"
[[routes]]
name = "stream"
path_prefix = "/stream"
upstream = "api"
auth = "key"
"#;
    let (gateway, api) = standalone(&standalone_config(&upstream, stream_route)).await;
    let customer = customer_on(&api, json!({"quota": {"requests": 100, "hard": true}})).await;
    gateway.wait_for_keys(1).await;
    let mut response = get(&gateway, "/stream", &customer.key).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.chunk().await.unwrap().unwrap(), "first\n");
    // Five flush intervals: the segment holding the pending record is closed and read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(gateway.metric("tollgate_usage_spool_bytes").await > Some(0.0));
    upstream.release();
    assert_eq!(response.chunk().await.unwrap().unwrap(), "last\n");
    assert!(response.chunk().await.unwrap().is_none());

    let usage = wait_for_used(&api, &customer.id, 1).await;
    let days = usage["days"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{usage}");
    assert_eq!(
        (
            &days[0]["route"],
            &days[0]["requests"],
            &days[0]["bytes_out"]
        ),
        (&json!("stream"), &json!(1), &json!(11)),
        "stored once, with the size of the whole response"
    );
    gateway
        .wait_for_metric("tollgate_usage_spool_bytes", 0.0)
        .await;
    assert_eq!(
        gateway
            .metric("tollgate_usage_events_stored_total{result=\"inserted\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admitted_request_is_stored_once_and_both_usage_views_read_it() {
    let upstream = Upstream::start("api");
    let (gateway, api) = standalone(&standalone_config(&upstream, "")).await;
    let customer = customer_on(
        &api,
        json!({"quota": {"requests": 100, "hard": true}, "upgrade_url": "https://example.test/upgrade"}),
    )
    .await;
    gateway.wait_for_keys(1).await;
    for _ in 0..5 {
        assert_eq!(get(&gateway, "/api/ok", &customer.key).await.status(), 200);
    }
    // Upstream 5xx are stored with 0 units; a 4xx counts.
    for _ in 0..2 {
        assert_eq!(
            get(&gateway, "/status/503", &customer.key).await.status(),
            503
        );
    }
    assert_eq!(
        get(&gateway, "/status/404", &customer.key).await.status(),
        404
    );

    let usage = wait_for_used(&api, &customer.id, 6).await;
    assert_eq!(usage["quota"], 100);
    assert_eq!(usage["remaining"], 94);
    let mut days: Vec<(String, u64, u64, u64)> = usage["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["route"].as_str().unwrap().to_owned(),
                d["requests"].as_u64().unwrap(),
                d["units"].as_u64().unwrap(),
                d["errors"].as_u64().unwrap(),
            )
        })
        .collect();
    days.sort();
    assert_eq!(
        days,
        [("api".to_owned(), 5, 5, 0), ("status".to_owned(), 3, 1, 2)]
    );
    assert_eq!(
        gateway
            .metric("tollgate_usage_events_stored_total{result=\"inserted\"}")
            .await,
        Some(8.0)
    );

    // The customer reads the same with its own key; the view itself is not metered. Twenty
    // views asked at once (a customer asking in a loop) cost the ledger one read, which the
    // views of the next second share.
    let reads = || gateway.metric("tollgate_usage_view_reads_total");
    assert_eq!(reads().await, Some(0.0));
    let views = join_all((0..20).map(|_| get(&gateway, "/me", &customer.key))).await;
    for view in views {
        assert_eq!(view.status(), 200);
        assert_eq!(view.json::<Value>().await.unwrap()["used"], 6);
    }
    assert_eq!(reads().await, Some(1.0));
    let me = get(&gateway, "/me", &customer.key).await;
    assert_eq!(me.status(), 200);
    // One customer's usage: no shared cache keeps it.
    assert_eq!(me.headers()["cache-control"], "private, no-store");
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["customer_id"], customer.id.as_str());
    assert_eq!(
        (me["used"].as_u64(), me["remaining"].as_u64()),
        (Some(6), Some(94))
    );
    assert_eq!(me["period"]["end"], usage["period"]["end"]);
    assert_eq!(me["upgrade_url"], "https://example.test/upgrade");

    // A key scoped to one route calls only that one, and reads its customer's usage all the
    // same: its scopes name the routes it may call.
    let scoped = api
        .create(
            &format!("/v1/customers/{}/keys", customer.id),
            json!({"name": "api-only", "scopes": ["api"]}),
        )
        .await;
    let scoped = scoped["key"].as_str().unwrap();
    gateway.wait_for_keys(2).await;
    let refused = get(&gateway, "/status/200", scoped).await;
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:key-not-allowed");
    let me = get(&gateway, "/me", scoped).await;
    assert_eq!(me.status(), 200);
    assert_eq!(
        me.json::<Value>().await.unwrap()["customer_id"],
        customer.id.as_str()
    );
}

/// The usage of requests that end while the gateway drains is in the ledger when it exits: the
/// flusher's last pass waits for the drain (before, it ran at SIGTERM, and what the drained
/// requests wrote stayed in the spool, lost with a disk that does not outlive the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_drained_at_sigterm_are_in_the_ledger_when_the_gateway_exits() {
    let upstream = Upstream::start("api");
    let slow_route = r#"
[[routes]]
name = "slow"
path_prefix = "/slow"
upstream = "api"
auth = "key"
"#;
    // A flush interval longer than the test: only the last pass can send the usage.
    let text = standalone_config(&upstream, slow_route)
        .replace("flush_interval = \"200ms\"", "flush_interval = \"60s\"");
    let (mut gateway, api) = standalone(&text).await;
    let customer = customer_on(&api, json!({"quota": {"requests": 100, "hard": true}})).await;
    gateway.wait_for_keys(1).await;

    let slow = tokio::spawn({
        let url = gateway.url("/slow/1000");
        let key = customer.key.clone();
        async move { client().get(url).bearer_auth(key).send().await.unwrap() }
    });
    upstream.wait_for_requests(1).await;
    gateway.signal("TERM");
    gateway
        .wait_for_log(|l| l["message"] == "SIGTERM: draining")
        .await;
    assert_eq!(slow.await.unwrap().status(), 200);
    assert_eq!(
        gateway.wait_exit(Duration::from_secs(9)).await.code(),
        Some(0)
    );

    // Read the ledger the gateway left, without starting it again (a start sends the spool).
    let database = format!(
        "sqlite://{}",
        gateway.dir.path().join("tollgate.db").display()
    );
    let pool = sqlx::SqlitePool::connect(&database).await.unwrap();
    let stored: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT route, status, units FROM usage_events WHERE customer_id = ?")
            .bind(&customer.id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored, [("slow".to_owned(), 200, 1)]);
}

/// An upstream that answers every request with `100 Continue`, then (once it has the body)
/// `final_answer`, or closes the connection when there is none: its address.
async fn continue_then(final_answer: Option<&'static str>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line.trim_end().is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let answer = async |stream: &mut tokio::io::BufReader<_>, text: &str| {
                        AsyncWriteExt::write_all(stream.get_mut(), text.as_bytes()).await
                    };
                    if answer(&mut stream, "HTTP/1.1 100 Continue\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let mut body = vec![0; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let Some(final_answer) = final_answer else {
                        return;
                    };
                    if answer(&mut stream, final_answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    address
}

/// A standalone gateway in front of [`continue_then`]`(final_answer)`, a customer with a quota
/// of 100, and its `POST` with `Expect: 100-continue` through the gateway: (gateway, admin API,
/// customer, response).
async fn post_after_continue(
    final_answer: Option<&'static str>,
) -> (Gateway, AdminApi, Customer, reqwest::Response) {
    let placeholder = Upstream::start("api");
    let text = standalone_config(&placeholder, "")
        .replace(&placeholder.target(), &continue_then(final_answer).await);
    let (gateway, api) = standalone(&text).await;
    let customer = customer_on(&api, json!({"quota": {"requests": 100, "hard": true}})).await;
    gateway.wait_for_keys(1).await;
    let response = client()
        .post(gateway.url("/api/upload"))
        .bearer_auth(&customer.key)
        .header("expect", "100-continue")
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    (gateway, api, customer, response)
}

/// In standalone mode the flusher stores up to 5000 events per transaction into the embedded
/// store (a control plane's ingest takes 1000 per request): 2,500 requests sent well within one
/// flush interval reach the ledger in one or two batches (two when a segment closed while they
/// were sent), where batches of 1000 would take at least three. (A machine so slow that the
/// sending outlasts the interval closes a segment more per interval; it is allowed for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_gateway_stores_up_to_5000_events_per_batch() {
    let upstream = Upstream::start("api");
    let text = standalone_config(&upstream, "")
        .replace("flush_interval = \"200ms\"", "flush_interval = \"10s\"");
    let (gateway, api) = standalone(&text).await;
    let customer = customer_on(&api, json!({})).await;
    gateway.wait_for_keys(1).await;
    let client = client();
    let sending = Instant::now();
    for _ in 0..100 {
        let responses = join_all((0..25).map(|_| {
            client
                .get(gateway.url("/api/batched"))
                .bearer_auth(&customer.key)
                .send()
        }))
        .await;
        for response in responses {
            assert_eq!(response.unwrap().status(), 200);
        }
    }
    let intervals_sending = sending.elapsed().as_secs() / 10;
    let inserted = r#"tollgate_usage_events_stored_total{result="inserted"}"#;
    let started = Instant::now();
    while gateway.metric(inserted).await != Some(2500.0) {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "stored: {:?}",
            gateway.metric(inserted).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let batches = gateway
        .metric("tollgate_usage_batches_stored_total")
        .await
        .unwrap();
    let most = 2 + intervals_sending;
    assert!(
        batches >= 1.0 && batches <= most as f64,
        "{batches} batches, at most {most}"
    );
    wait_for_used(&api, &customer.id, 2500).await;
}

/// A `100 Continue` on the way is not the response: the request is stored and settled by its
/// final status (here an upstream 503: stored, its unit refunded, counted as an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_100_continue_leaves_the_request_to_its_final_status() {
    let unavailable = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
    let (gateway, api, customer, response) = post_after_continue(Some(unavailable)).await;
    assert_eq!(response.status(), 503);
    // Refunded: its headers already show the unit given back.
    assert_eq!(header(&response, "x-quota-remaining"), "100");

    let started = Instant::now();
    let stored = r#"tollgate_usage_events_stored_total{result="inserted"}"#;
    while gateway.metric(stored).await != Some(1.0) {
        assert!(started.elapsed() < Duration::from_secs(15), "never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let usage = wait_for_used(&api, &customer.id, 0).await;
    let day = &usage["days"][0];
    assert_eq!(
        (
            &day["route"],
            &day["requests"],
            &day["units"],
            &day["errors"]
        ),
        (&json!("api"), &json!(1), &json!(0), &json!(1)),
        "{usage}"
    );
    assert_eq!(usage["remaining"], 100);
}

/// An upstream that fails after a `100 Continue` went to the client: the gateway still answers
/// with its own problem, and the request is refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failing_after_100_continue_gets_the_gateways_problem() {
    let (_gateway, api, customer, response) = post_after_continue(None).await;
    assert_eq!(response.status(), 502);
    assert_eq!(
        header(&response, "content-type"),
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], 502, "{body}");
    let usage = wait_for_used(&api, &customer.id, 0).await;
    assert_eq!(usage["remaining"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_quota_names_the_plans_upgrade_url() {
    let upstream = Upstream::start("api");
    let (gateway, api) = standalone(&standalone_config(&upstream, "")).await;
    let customer = customer_on(
        &api,
        json!({"quota": {"requests": 1, "hard": true}, "upgrade_url": "https://example.test/upgrade"}),
    )
    .await;
    gateway.wait_for_keys(1).await;
    assert_eq!(get(&gateway, "/api/ok", &customer.key).await.status(), 200);
    let refused = get(&gateway, "/api/ok", &customer.key).await;
    assert_eq!(refused.status(), 429);
    assert!(header(&refused, "retry-after").parse::<u64>().unwrap() >= 1);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:quota-exceeded");
    assert_eq!(body["upgrade_url"], "https://example.test/upgrade");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_under_load_stores_exactly_the_requests_that_got_a_response() {
    let upstream = Upstream::start("api");
    let token = admin_token();
    let env = [("TOLLGATE_ADMIN_TOKEN", token.as_str())];
    let text = standalone_config(&upstream, "");
    let gateway = Gateway::start_with_env(tempfile::tempdir().unwrap(), &text, &env).await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    let customer = customer_on(&api, json!({"quota": {"requests": 1000000, "hard": true}})).await;
    gateway.wait_for_keys(1).await;

    let url = gateway.url("/api/load");
    let until = Instant::now() + Duration::from_millis(1500);
    let workers = (0..8).map(|_| {
        let url = url.clone();
        let key = customer.key.clone();
        async move {
            let client = client();
            let mut answered = 0u64;
            loop {
                match client.get(&url).bearer_auth(&key).send().await {
                    // A response is counted once its header arrives: the body may be cut by
                    // the kill.
                    Ok(response) if response.status() == 200 => {
                        answered += 1;
                        let _ = response.bytes().await;
                    }
                    Ok(response) => panic!("unexpected {}", response.status()),
                    // The gateway is gone.
                    Err(_) => return answered,
                }
                if Instant::now() > until + Duration::from_secs(10) {
                    return answered;
                }
            }
        }
    });
    let killer = async {
        tokio::time::sleep_until(until.into()).await;
        gateway.kill()
    };
    let (answered, dir) = tokio::join!(join_all(workers), killer);
    let answered: u64 = answered.into_iter().sum();
    assert!(answered > 50, "only {answered} requests before the kill");

    let gateway = Gateway::start_with_env(dir, &text, &env).await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    gateway.wait_for_keys(1).await;
    // Every response a client received is stored. A response the gateway had started to send
    // when it was killed counts too, even when the kill's reset kept it from the client: at most
    // one per worker in flight, never one less than what was received.
    let started = Instant::now();
    let usage = loop {
        let (status, usage) = api
            .call("GET", &format!("/v1/customers/{}/usage", customer.id), None)
            .await;
        assert_eq!(status, 200);
        let used = usage["used"].as_u64().unwrap();
        if used >= answered {
            break usage;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{used} stored, {answered} answered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Whatever was left to send is sent within a pass: the count is settled.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, usage_after) = api
        .call("GET", &format!("/v1/customers/{}/usage", customer.id), None)
        .await;
    assert_eq!(usage_after["used"], usage["used"]);
    let used = usage["used"].as_u64().unwrap();
    assert!(
        (answered..=answered + 8).contains(&used),
        "{used} stored for {answered} answered"
    );
    let requests: u64 = usage["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(
        requests, used,
        "one stored event per counted request, no duplicate"
    );
    // What the killed process had not sent was sent by this one, and counted as such.
    assert!(
        gateway
            .metric("tollgate_usage_events_replayed_total")
            .await
            .unwrap()
            >= 1.0
    );
    // The quota counter starts from the stored count, not from nothing.
    let next = get(&gateway, "/api/after", &customer.key).await;
    assert_eq!(next.status(), 200);
    assert_eq!(
        header(&next, "x-quota-remaining"),
        (1000000 - used - 1).to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_redis_continues_the_quota_from_the_ledger() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let extra = format!("[redis]\nurl = \"{}\"\ntimeout = \"1s\"", redis.url());
    let (gateway, api) = standalone(&standalone_config(&upstream, &extra)).await;
    let customer = customer_on(&api, json!({"quota": {"requests": 50, "hard": true}})).await;
    gateway.wait_for_keys(1).await;
    for _ in 0..30 {
        assert_eq!(get(&gateway, "/api/ok", &customer.key).await.status(), 200);
    }
    wait_for_used(&api, &customer.id, 30).await;
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");

    let next = get(&gateway, "/api/ok", &customer.key).await;
    assert_eq!(next.status(), 200);
    assert_eq!(header(&next, "x-quota-remaining"), "19");
    for _ in 0..19 {
        assert_eq!(get(&gateway, "/api/ok", &customer.key).await.status(), 200);
    }
    assert_eq!(get(&gateway, "/api/ok", &customer.key).await.status(), 429);
    assert_eq!(
        gateway
            .metric("tollgate_limit_decisions_total{counted=\"fallback\",result=\"allowed\"}")
            .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_outage_delays_usage_and_a_full_spool_refuses_rather_than_forgets() {
    use tollgate_tests::control_plane::{ControlPlane, PostgresDatabase};

    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let (address, admin) = (control_plane.address, control_plane.admin_token.clone());
    let api = control_plane.api();
    let token = api.gateway_token().await;
    let customer = customer_on(&api, json!({})).await;
    let upstream = Upstream::start("api");
    let text = config(&format!(
        r#"
[control_plane]
url = "http://{address}"

[metering]
flush_interval = "200ms"
spool_max_bytes = 1048576

[[upstreams]]
name = "api"
targets = ["{target}"]

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "api"
auth = "key"

[[routes]]
name = "whoami"
path_prefix = "/whoami"
upstream = "api"
auth = "key"
metered = false

[[routes]]
name = "me"
path_prefix = "/me"
auth = "key"
usage = true
"#,
        target = upstream.target()
    ));
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &text,
        &[("TOLLGATE_GATEWAY_TOKEN", token.as_str())],
    )
    .await;
    gateway.wait_for_keys(1).await;
    for _ in 0..10 {
        assert_eq!(get(&gateway, "/api/ok", &customer.key).await.status(), 200);
    }
    wait_for_used(&api, &customer.id, 10).await;
    let view = get(&gateway, "/me", &customer.key).await;
    assert_eq!(view.status(), 200);
    assert_eq!(header(&view, "content-type"), "application/json");

    // The control plane goes away: requests are still served and their usage waits in the
    // spool, until the spool is full and metered requests are refused.
    control_plane.kill();
    // The customer's usage view cannot be read: a problem to retry, like every other refusal.
    let started = Instant::now();
    let view = loop {
        let view = get(&gateway, "/me", &customer.key).await;
        if view.status() != 200 {
            break view;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the usage view still answers"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(view.status(), 503);
    assert_eq!(header(&view, "content-type"), "application/problem+json");
    assert_eq!(header(&view, "retry-after"), "5");
    assert_eq!(header(&view, "cache-control"), "no-store");
    let body: Value = view.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:usage-unavailable");
    assert_eq!(body["status"], 503);
    let mut served = 10u64;
    let client = client();
    let started = Instant::now();
    let refused = loop {
        let statuses = join_all((0..16).map(|_| {
            client
                .get(gateway.url("/api/outage"))
                .bearer_auth(&customer.key)
                .send()
        }))
        .await;
        let mut refused = None;
        for response in statuses {
            let response = response.unwrap();
            match response.status().as_u16() {
                200 => served += 1,
                503 => refused = Some(response),
                other => panic!("unexpected {other}"),
            }
        }
        if let Some(refused) = refused {
            break refused;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the spool never filled"
        );
    };
    assert_eq!(header(&refused, "retry-after"), "5");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:metering-unavailable");
    assert!(
        gateway
            .metric("tollgate_usage_spool_full_refusals_total")
            .await
            .unwrap()
            >= 1.0
    );
    assert!(
        gateway
            .metric("tollgate_usage_send_failures_total")
            .await
            .unwrap()
            >= 1.0
    );
    assert!(gateway.metric("tollgate_usage_spool_bytes").await.unwrap() >= 1_048_576.0);
    // A route that meters nothing is not refused: it writes nothing to the spool.
    assert_eq!(get(&gateway, "/whoami", &customer.key).await.status(), 200);

    // Back: the spool drains into the ledger, every served request once, and requests pass again.
    let control_plane = ControlPlane::start_at(&database.url(), address, &admin).await;
    let api = control_plane.api();
    wait_for_used(&api, &customer.id, served).await;
    assert!(
        gateway
            .metric("tollgate_usage_events_replayed_total")
            .await
            .unwrap()
            >= 1.0,
        "the batches the ledger did not take were sent again"
    );
    let started = Instant::now();
    while get(&gateway, "/api/again", &customer.key).await.status() != 200 {
        assert!(started.elapsed() < Duration::from_secs(30), "still refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `gateway --replay-rejected` sends the usage kept in `rejected/` to the ledger, once, and
/// deletes what was stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_set_aside_is_replayed_into_the_ledger_once_by_the_command() {
    let upstream = Upstream::start("api");
    let (gateway, api) = standalone(&standalone_config(&upstream, "")).await;
    let customer = customer_on(&api, json!({})).await;
    gateway.wait_for_keys(1).await;
    assert_eq!(get(&gateway, "/api/ok", &customer.key).await.status(), 200);
    wait_for_used(&api, &customer.id, 1).await;

    // Two events a ledger once refused, in the spool's format (README, "Metering").
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let line = |n: u8| {
        format!(
            "e\tevt_{:032x}\t{now_ms}\t{}\t\tapi\tGET\t200\t1\t0\t812\t0\t17\treplayed-{n}\n",
            u128::from(n) + 7,
            customer.id
        )
    };
    let rejected = gateway.dir.path().join("tollgate-spool").join("rejected");
    std::fs::create_dir_all(&rejected).unwrap();
    let file = rejected.join("evt_replayed.tsv");
    std::fs::write(&file, format!("{}{}", line(1), line(2))).unwrap();
    let replay = || {
        std::process::Command::new(tollgate_tests::gateway::binary())
            .arg("--config")
            .arg(&gateway.config_path)
            .arg("--replay-rejected")
            .output()
            .unwrap()
    };
    let output = replay();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{printed} {output:?}");
    assert!(
        printed
            .contains("1 file(s) stored (2 event(s) new to the ledger, 0 it had already), 0 kept"),
        "{printed}"
    );
    assert!(!file.exists());
    wait_for_used(&api, &customer.id, 3).await;

    // The same file again: nothing counts twice.
    std::fs::write(&file, format!("{}{}", line(1), line(2))).unwrap();
    let output = replay();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(0), "{printed}");
    assert!(
        printed.contains("1 file(s) stored (0 event(s) new to the ledger, 2 it had already)"),
        "{printed}"
    );
    wait_for_used(&api, &customer.id, 3).await;

    // A file that is not usage is kept, and the command says so with status 1.
    std::fs::write(&file, "not usage\n").unwrap();
    let output = replay();
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "{printed}");
    assert!(printed.contains("0 file(s) stored"), "{printed}");
    assert!(printed.contains("kept"), "{printed}");
    assert!(file.exists());
}

/// In cluster mode `gateway --replay-rejected` sends the usage kept in `rejected/` through the
/// control plane's ingest: what it stores goes, what it still refuses stays (alone, with the
/// reason printed, status 1), and a control plane that is down stops the replay (status 2) with
/// the file untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_set_aside_in_cluster_mode_is_replayed_through_the_control_plane() {
    use tollgate_tests::control_plane::{ControlPlane, PostgresDatabase};

    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let api = control_plane.api();
    let token = api.gateway_token().await;
    let customer = customer_on(&api, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("gateway.toml");
    std::fs::write(
        &config_path,
        config(&format!(
            r#"
[control_plane]
url = "http://{}"

[[routes]]
name = "api"
path_prefix = "/api"
auth = "key"
usage = true
"#,
            control_plane.address
        )),
    )
    .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    // The second event's method is longer than the control plane takes (32 bytes).
    let line = |n: u8, method: &str| {
        format!(
            "e\tevt_{:032x}\t{now_ms}\t{}\t\tapi\t{method}\t200\t1\t0\t812\t0\t17\treplayed-{n}\n",
            u128::from(n) + 7,
            customer.id
        )
    };
    let refused = line(2, &"X".repeat(40));
    let rejected = dir.path().join("tollgate-spool").join("rejected");
    std::fs::create_dir_all(&rejected).unwrap();
    let file = rejected.join("evt_replayed.tsv");
    std::fs::write(
        &file,
        format!("{}{refused}{}", line(1, "GET"), line(3, "POST")),
    )
    .unwrap();
    let replay = |token: &str| {
        std::process::Command::new(tollgate_tests::gateway::binary())
            .arg("--config")
            .arg(&config_path)
            .arg("--replay-rejected")
            .env("TOLLGATE_GATEWAY_TOKEN", token)
            .output()
            .unwrap()
    };

    // Without the gateway's token nothing is sent, and the command says which setting.
    let output = replay("");
    let printed = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{printed}");
    assert!(printed.contains("control_plane.token_env"), "{printed}");

    let output = replay(&token);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "{printed} {output:?}");
    assert!(
        printed
            .contains("0 file(s) stored (2 event(s) new to the ledger, 0 it had already), 1 kept"),
        "{printed}"
    );
    assert!(printed.contains("1 event(s) refused again"), "{printed}");
    assert!(printed.contains("method"), "{printed}");
    wait_for_used(&api, &customer.id, 2).await;
    // Only the refused event is left (its numbers now written at full width).
    let left = std::fs::read_to_string(&file).unwrap();
    assert_eq!(left.lines().count(), 1, "{left}");
    assert!(left.contains(&format!("evt_{:032x}", 9)), "{left}");
    assert!(left.contains(&"X".repeat(40)), "{left}");

    // The control plane gone: the replay stops, says why, and leaves the file as it was.
    drop(control_plane);
    let output = replay(&token);
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(2), "{printed} {output:?}");
    assert!(printed.contains("unavailable"), "{printed}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), left);
}

//! Plans on the hot path: rate limits and quotas of the real gateway, counted in process
//! (standalone, embedded control plane on SQLite), told to the client in headers.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::Response;
use serde_json::{Value, json};
use tollgate_tests::control_plane::{AdminApi, admin_token};
use tollgate_tests::redis::RedisServer;
use tollgate_tests::{Gateway, LIMIT_HEADERS, Upstream, client, config};

fn standalone_config(upstream: &Upstream, metering: &str) -> String {
    config(&format!(
        r#"
[control_plane]
embedded = true

{metering}

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
name = "demo"
path_prefix = "/demo"
auth = "key"
respond = {{ status = 200, body = "hello, customer" }}

[[routes]]
name = "whoami"
path_prefix = "/whoami"
upstream = "api"
auth = "key"
metered = false
"#,
        target = upstream.target()
    ))
}

/// A standalone gateway, and a customer on a plan made of `plan` (name added) with a key the
/// gateway already knows: (gateway, admin API, customer, key).
async fn customer_on(upstream: &Upstream, metering: &str, plan: Value) -> Setup {
    let token = admin_token();
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &standalone_config(upstream, metering),
        &[("TOLLGATE_ADMIN_TOKEN", token.as_str())],
    )
    .await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    let mut body = plan;
    body["name"] = json!("tested");
    let plan = api.create("/v1/plans", body).await;
    let customer = api
        .create(
            "/v1/customers",
            json!({"name": "acme", "email": "acme@example.test", "plan_id": plan["id"]}),
        )
        .await;
    let customer_id = customer["id"].as_str().unwrap().to_owned();
    let key = api
        .create(
            &format!("/v1/customers/{customer_id}/keys"),
            json!({"name": "main"}),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    gateway.wait_for_keys(1).await;
    Setup {
        gateway,
        api,
        plan_id: plan["id"].as_str().unwrap().to_owned(),
        customer_id,
        key,
    }
}

struct Setup {
    gateway: Gateway,
    api: AdminApi,
    plan_id: String,
    customer_id: String,
    key: String,
}

impl Setup {
    async fn get(&self, path: &str) -> Response {
        client()
            .get(self.gateway.url(path))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap()
    }

    /// Sends `count` requests at once; the statuses, in any order.
    async fn burst(&self, path: &str, count: usize) -> Vec<u16> {
        let client = client();
        let requests = (0..count).map(|_| {
            client
                .get(self.gateway.url(path))
                .bearer_auth(&self.key)
                .send()
        });
        join_all(requests)
            .await
            .into_iter()
            .map(|r| r.unwrap().status().as_u16())
            .collect()
    }

    /// Waits until the ledger holds `used` units of the customer's current period.
    async fn until_stored(&self, used: u64) {
        let started = Instant::now();
        loop {
            let (status, usage) = self
                .api
                .call(
                    "GET",
                    &format!("/v1/customers/{}/usage", self.customer_id),
                    None,
                )
                .await;
            if status == 200 && usage["used"] == used {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the ledger never held {used}: {usage}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Changes the plan and waits until the gateway has the change.
    async fn patch_plan(&self, body: Value) {
        self.patch(&format!("/v1/plans/{}", self.plan_id), body)
            .await;
    }

    /// Changes the customer and waits until the gateway has the change.
    async fn patch_customer(&self, body: Value) {
        self.patch(&format!("/v1/customers/{}", self.customer_id), body)
            .await;
    }

    /// `PATCH path` with `body`, then waits until the gateway has the change.
    async fn patch(&self, path: &str, body: Value) {
        let version = identity_version(&self.gateway).await;
        let (status, answer) = self.api.call("PATCH", path, Some(body)).await;
        assert_eq!(status, 200, "{answer}");
        let started = Instant::now();
        while identity_version(&self.gateway).await <= version {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "change never arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn identity_version(gateway: &Gateway) -> i64 {
    gateway.ready().await["identities"]["version"]
        .as_i64()
        .unwrap_or(0)
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .map_or("", |v| v.to_str().unwrap())
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_20_of_25_sequential_requests_pass_and_the_headers_count_down() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({"rate_limits": [{"requests": 20, "window_seconds": 3600}]}),
    )
    .await;
    let mut statuses = Vec::new();
    let mut remaining = Vec::new();
    let mut ratelimit = Vec::new();
    for _ in 0..25 {
        let response = setup.get("/api/items").await;
        statuses.push(response.status().as_u16());
        remaining.push(
            header(&response, "x-ratelimit-remaining")
                .parse::<u64>()
                .unwrap(),
        );
        // The earlier drafts' fields say the same.
        assert_eq!(
            header(&response, "ratelimit-remaining"),
            header(&response, "x-ratelimit-remaining")
        );
        assert_eq!(header(&response, "ratelimit-limit"), "20");
        assert_eq!(
            header(&response, "ratelimit-reset"),
            header(&response, "x-ratelimit-reset")
        );
        ratelimit.push(header(&response, "ratelimit").to_owned());
        assert_eq!(
            header(&response, "ratelimit-policy"),
            "\"rate-3600s\";q=20;w=3600"
        );
        assert_eq!(header(&response, "x-ratelimit-limit"), "20");
        let reset: u64 = header(&response, "x-ratelimit-reset").parse().unwrap();
        // The first unit comes back one window (plus at most one 3-minute bucket) after it.
        assert!((3420..=3780).contains(&reset), "reset {reset}");
        if response.status() == 429 {
            assert!(header(&response, "retry-after").parse::<u64>().unwrap() >= 3420);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["type"], "urn:tollgate:problem:rate-limited");
            assert_eq!(body["status"], 429);
        }
    }
    let expected_statuses: Vec<u16> = [200; 20].into_iter().chain([429; 5]).collect();
    assert_eq!(statuses, expected_statuses);
    let expected_remaining: Vec<u64> = (0..20).rev().chain([0; 5]).collect();
    assert_eq!(remaining, expected_remaining);
    assert!(
        ratelimit[0].starts_with("\"rate-3600s\";r=19;t="),
        "{}",
        ratelimit[0]
    );
    assert_eq!(upstream.requests(), 20);
    assert_eq!(
        setup
            .gateway
            .metric("tollgate_limit_decisions_total{counted=\"local\",result=\"rate-limited\"}")
            .await,
        Some(5.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_concurrent_requests_admits_exactly_the_limit_of_100() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({"rate_limits": [{"requests": 100, "window_seconds": 3600}]}),
    )
    .await;
    let statuses = setup.burst("/api/burst", 500).await;
    assert_eq!(count(&statuses, 200), 100, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 400);
    assert_eq!(upstream.requests(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_quota_of_1000_admits_exactly_1000_of_1500_concurrent_requests() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({"quota": {"requests": 1000, "hard": true}}),
    )
    .await;
    let statuses = setup.burst("/api/quota", 1500).await;
    assert_eq!(count(&statuses, 200), 1000);
    assert_eq!(count(&statuses, 429), 500);

    let refused = setup.get("/api/after").await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-quota-limit"), "1000");
    assert_eq!(header(&refused, "x-quota-remaining"), "0");
    // The calendar month ends within 31 days; Retry-After says when.
    let retry_after: u64 = header(&refused, "retry-after").parse().unwrap();
    assert_eq!(header(&refused, "x-quota-reset"), retry_after.to_string());
    assert!((1..=31 * 86_400).contains(&retry_after));
    assert!(
        header(&refused, "ratelimit-policy").starts_with("\"quota\";q=1000;w="),
        "{}",
        header(&refused, "ratelimit-policy")
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:quota-exceeded");
    assert_eq!(upstream.requests(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_quota_lets_requests_through_and_counts_the_excess_as_overage() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({"quota": {"requests": 3, "hard": false}}),
    )
    .await;
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let response = setup.get("/demo").await;
        assert_eq!(response.status(), 200);
        remaining.push(header(&response, "x-quota-remaining").to_owned());
    }
    assert_eq!(remaining, ["2", "1", "0", "0", "0"]);
    assert_eq!(
        setup
            .gateway
            .metric("tollgate_quota_overage_units_total")
            .await,
        Some(2.0)
    );
    // The ledger, which billing reads, records the two as overage.
    let path = format!("/v1/customers/{}/usage", setup.customer_id);
    let started = Instant::now();
    loop {
        let (status, usage) = setup.api.call("GET", &path, None).await;
        assert_eq!(status, 200);
        if usage["used"] == 5 {
            assert_eq!(usage["overage"], 2, "{usage}");
            assert_eq!(usage["remaining"], 0, "{usage}");
            assert_eq!(usage["hard"], false, "{usage}");
            assert_eq!(usage["days"][0]["overage"], 2, "{usage}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{usage}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_fail_upstream_give_their_quota_unit_back() {
    let mut upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({"quota": {"requests": 2, "hard": true}}),
    )
    .await;
    // An upstream 5xx is refunded by default, once the request is over (its logging phase may
    // come after the client has the response).
    assert_eq!(setup.get("/status/503").await.status(), 503);
    setup
        .gateway
        .wait_for_metric("tollgate_quota_refunds_total", 1.0)
        .await;
    // A 4xx is the customer's own: it counts.
    assert_eq!(setup.get("/status/404").await.status(), 404);
    let last = setup.get("/api/ok").await;
    assert_eq!(last.status(), 200);
    assert_eq!(header(&last, "x-quota-remaining"), "0");
    assert_eq!(setup.get("/api/ok").await.status(), 429);
    assert_eq!(
        setup.gateway.metric("tollgate_quota_refunds_total").await,
        Some(1.0)
    );
    // Refunds show on the next response: raise the quota, then fail to reach the upstream.
    setup
        .patch_plan(json!({"quota": {"requests": 3, "hard": true}}))
        .await;
    upstream.stop();
    assert_eq!(setup.get("/api/down").await.status(), 502);
    setup
        .gateway
        .wait_for_metric("tollgate_quota_refunds_total", 2.0)
        .await;
    let after = setup.get("/demo").await;
    assert_eq!(after.status(), 200);
    assert_eq!(header(&after, "x-quota-remaining"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_5xx_counts_when_refunds_are_turned_off() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "[metering]\nrefund_upstream_5xx = false",
        json!({"quota": {"requests": 1, "hard": true}}),
    )
    .await;
    assert_eq!(setup.get("/status/500").await.status(), 500);
    assert_eq!(setup.get("/api/ok").await.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_keeps_what_was_already_counted() {
    plan_change_keeps_what_was_counted("").await;
}

/// The same with the counters in Redis: the shared counts are keyed by customer too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_keeps_what_was_already_counted_in_redis() {
    let redis = tollgate_tests::redis::RedisServer::start();
    let setup =
        plan_change_keeps_what_was_counted(&format!("[redis]\nurl = \"{}\"", redis.url())).await;
    assert_eq!(
        setup
            .gateway
            .counted("tollgate_limit_decisions_total{counted=\"fallback\",result=\"allowed\"}")
            .await,
        0.0
    );
    assert!(
        setup
            .gateway
            .counted("tollgate_limit_decisions_total{counted=\"redis\",result=\"allowed\"}")
            .await
            >= 8.0
    );
}

/// Upgrade, then downgrade below what was counted, on a gateway configured with `extra`.
async fn plan_change_keeps_what_was_counted(extra: &str) -> Setup {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        extra,
        json!({"rate_limits": [{"requests": 5, "window_seconds": 3600}],
               "quota": {"requests": 100, "hard": true}}),
    )
    .await;
    if extra.contains("[redis]") {
        let started = Instant::now();
        while setup.gateway.ready().await["counters"]["counting"] != "redis" {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never counted in redis"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for _ in 0..5 {
        assert_eq!(setup.get("/demo").await.status(), 200);
    }
    assert_eq!(setup.get("/demo").await.status(), 429);
    // Upgrade: the 5 counted stay counted against the new limit of 8.
    setup
        .patch_plan(json!({"rate_limits": [{"requests": 8, "window_seconds": 3600}]}))
        .await;
    let statuses = setup.burst("/demo", 5).await;
    assert_eq!(count(&statuses, 200), 3);
    let response = setup.get("/demo").await;
    assert_eq!(header(&response, "x-ratelimit-remaining"), "0");
    // 8 admitted in all: the quota says so too.
    assert_eq!(header(&response, "x-quota-remaining"), "92");
    // Downgrade below what was counted: refused until enough units expire.
    setup
        .patch_plan(json!({"rate_limits": [{"requests": 2, "window_seconds": 3600}]}))
        .await;
    assert_eq!(setup.get("/demo").await.status(), 429);
    assert_eq!(setup.customer_id.len(), 36);
    setup
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_and_a_downgrade_under_load_keep_the_count_exact() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({"rate_limits": [{"requests": 300, "window_seconds": 3600}]}),
    )
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let url = setup.gateway.url("/api/load");
            let key = setup.key.clone();
            let stop = std::sync::Arc::clone(&stop);
            tokio::spawn(async move {
                let client = client();
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let response = client.get(&url).bearer_auth(&key).send().await.unwrap();
                    statuses.push(response.status().as_u16());
                }
                statuses
            })
        })
        .collect();
    // Refused at 300; then upgraded to 600 while requests flow, then downgraded to 400 (below
    // what is counted), all under load.
    let started = Instant::now();
    while upstream.requests() < 300 || started.elapsed() < Duration::from_millis(300) {
        assert!(started.elapsed() < Duration::from_secs(20), "load too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    setup
        .patch_plan(json!({"rate_limits": [{"requests": 600, "window_seconds": 3600}]}))
        .await;
    while upstream.requests() < 600 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "upgrade never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    setup
        .patch_plan(json!({"rate_limits": [{"requests": 400, "window_seconds": 3600}]}))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = Vec::new();
    for worker in workers {
        statuses.extend(worker.await.unwrap());
    }
    assert_eq!(count(&statuses, 200), 600, "exactly the upgraded limit");
    assert_eq!(
        count(&statuses, 200) + count(&statuses, 429),
        statuses.len()
    );
    assert_eq!(upstream.requests(), 600);
}

/// An RFC 3339 time `offset` from now (negative: before).
fn rfc3339_from_now(offset: i64) -> (String, std::time::SystemTime) {
    let now = std::time::SystemTime::now();
    let at = if offset >= 0 {
        now + Duration::from_secs(offset.unsigned_abs())
    } else {
        now - Duration::from_secs(offset.unsigned_abs())
    };
    (humantime::format_rfc3339_seconds(at).to_string(), at)
}

/// Seconds from now to `at`.
fn seconds_to(at: std::time::SystemTime) -> i64 {
    at.duration_since(std::time::SystemTime::now())
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_counts_in_the_customers_billing_period_and_a_new_period_starts_afresh() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({"quota": {"requests": 5, "hard": true}}),
    )
    .await;
    const DAY: i64 = 86_400;
    let (start, _) = rfc3339_from_now(-DAY);
    let (end, end_at) = rfc3339_from_now(2 * DAY);
    setup
        .patch_customer(json!({"billing_period": {"start": start, "end": end}}))
        .await;
    for remaining in (0..5).rev() {
        let response = setup.get("/demo").await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, "x-quota-remaining"),
            remaining.to_string()
        );
        // A plan without windows: the older fields describe its quota.
        assert_eq!(header(&response, "x-ratelimit-limit"), "5");
        assert_eq!(
            header(&response, "x-ratelimit-remaining"),
            remaining.to_string()
        );
        assert_eq!(
            header(&response, "x-ratelimit-reset"),
            header(&response, "x-quota-reset")
        );
        // Reset: the end of the billing period, not of the month.
        let reset: i64 = header(&response, "x-quota-reset").parse().unwrap();
        assert!((seconds_to(end_at) - reset).abs() <= 2, "{reset}");
    }
    let refused = setup.get("/demo").await;
    assert_eq!(refused.status(), 429);
    let retry: i64 = header(&refused, "retry-after").parse().unwrap();
    assert!((seconds_to(end_at) - retry).abs() <= 2, "{retry}");
    // The admin view reads the same period.
    let (status, usage) = setup
        .api
        .call(
            "GET",
            &format!("/v1/customers/{}/usage", setup.customer_id),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        usage["period"]["end"].as_str().unwrap()[..19],
        end[..19],
        "{usage}"
    );
    assert_eq!(usage["quota"], 5);

    // Billing moves the customer to a new period, starting after those calls: its quota is
    // whole again, and ends with the new period.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (start, _) = rfc3339_from_now(0);
    let (end, end_at) = rfc3339_from_now(30 * DAY);
    setup
        .patch_customer(json!({"billing_period": {"start": start, "end": end}}))
        .await;
    let statuses = setup.burst("/demo", 8).await;
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 3);
    let refused = setup.get("/demo").await;
    assert_eq!(header(&refused, "x-quota-remaining"), "0");
    let reset: i64 = header(&refused, "x-quota-reset").parse().unwrap();
    assert!((seconds_to(end_at) - reset).abs() <= 2, "{reset}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_period_set_after_calls_it_covers_counts_them_once_they_reach_the_ledger() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "[metering]\nflush_interval = \"2s\"",
        json!({"quota": {"requests": 5, "hard": true}}),
    )
    .await;
    for _ in 0..2 {
        assert_eq!(setup.get("/demo").await.status(), 200);
    }
    // A period that began a day ago covers the two calls, whose usage may still be in the
    // spool when the gateway counts the new period from the ledger: it reads the ledger again
    // two flush intervals and a second later.
    const DAY: i64 = 86_400;
    let (start, _) = rfc3339_from_now(-DAY);
    let (end, _) = rfc3339_from_now(2 * DAY);
    setup
        .patch_customer(json!({"billing_period": {"start": start, "end": end}}))
        .await;
    assert_eq!(setup.get("/demo").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let statuses: Vec<u16> = {
        let mut statuses = Vec::new();
        for _ in 0..4 {
            statuses.push(setup.get("/demo").await.status().as_u16());
        }
        statuses
    };
    assert_eq!(statuses, [200, 200, 429, 429]);
}

/// A billing period set and then taken away (a subscription started and cancelled within the
/// month): the calendar month counts again with every call made in it, also those counted in
/// the billing period meanwhile. Counted in process, and in Redis, whose count of the month is
/// still there from before: found stale (the customer was counted in another period since), it
/// is rebuilt from the ledger. Before, Redis went on from it: a hard quota of 10 admitted 14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_period_set_then_taken_away_counts_the_month_whole_again() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    for section in [String::new(), format!("[redis]\nurl = \"{}\"", redis.url())] {
        let setup = customer_on(
            &upstream,
            &format!("{section}\n[metering]\nflush_interval = \"200ms\""),
            json!({"quota": {"requests": 10, "hard": true}}),
        )
        .await;
        for _ in 0..6 {
            assert_eq!(setup.get("/demo").await.status(), 200, "{section}");
        }
        setup.until_stored(6).await;
        const DAY: i64 = 86_400;
        let (start, _) = rfc3339_from_now(-DAY);
        let (end, _) = rfc3339_from_now(10 * DAY);
        setup
            .patch_customer(json!({"billing_period": {"start": start, "end": end}}))
            .await;
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(setup.get("/demo").await.status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "{section}");
        setup.until_stored(10).await;
        setup.patch_customer(json!({"billing_period": null})).await;
        // The month holds the 10 calls: none more.
        let statuses = setup.burst("/demo", 4).await;
        assert_eq!(statuses, [429, 429, 429, 429], "{section}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_set_unmetered_checks_the_caller_but_leaves_the_plan_and_the_ledger_alone() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        "",
        json!({
            "rate_limits": [{"requests": 2, "window_seconds": 60}],
            "quota": {"requests": 2, "hard": true}
        }),
    )
    .await;
    // Five calls on a plan of two: all through, none told of limits, the caller named upstream
    // and the key (in either header) not.
    for call in 0..5 {
        let request = client().get(setup.gateway.url("/whoami"));
        let request = if call % 2 == 0 {
            request.bearer_auth(&setup.key)
        } else {
            request.header("x-api-key", &setup.key)
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        for name in LIMIT_HEADERS {
            assert_eq!(header(&response, name), "", "{name} on an unmetered route");
        }
        let echoed: Value = response.json().await.unwrap();
        let seen = &echoed["headers"];
        assert_eq!(seen["x-tollgate-customer-id"], setup.customer_id.as_str());
        assert_eq!(seen["x-tollgate-plan-id"], setup.plan_id.as_str());
        assert!(
            seen["x-tollgate-key-id"]
                .as_str()
                .is_some_and(|id| id.starts_with("key_")),
            "{seen}"
        );
        assert!(seen.get("authorization").is_none(), "{seen}");
        assert!(seen.get("x-api-key").is_none(), "{seen}");
    }
    // The caller is still checked.
    let stranger = client()
        .get(setup.gateway.url("/whoami"))
        .bearer_auth("tg_not_a_key")
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status(), 401);
    // The plan's two units are all still there on a metered route.
    let statuses: Vec<u16> = [
        setup.get("/api").await.status().as_u16(),
        setup.get("/api").await.status().as_u16(),
        setup.get("/api").await.status().as_u16(),
    ]
    .to_vec();
    assert_eq!(statuses, [200, 200, 429]);
    // The ledger holds the two metered calls and nothing of the five free ones.
    let path = format!("/v1/customers/{}/usage", setup.customer_id);
    let started = Instant::now();
    loop {
        let (status, usage) = setup.api.call("GET", &path, None).await;
        assert_eq!(status, 200);
        if usage["used"] == 2 {
            let routes: Vec<&str> = usage["days"]
                .as_array()
                .unwrap()
                .iter()
                .map(|day| day["route"].as_str().unwrap())
                .collect();
            assert_eq!(routes, ["api"], "{usage}");
            break;
        }
        assert!(
            usage["used"].as_u64().unwrap_or(0) < 2 && started.elapsed() < Duration::from_secs(10),
            "{usage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let another flush pass run: still only the two.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, usage) = setup.api.call("GET", &path, None).await;
    assert_eq!(usage["used"], 2, "{usage}");
    // A suspended customer is refused here too.
    setup.patch_customer(json!({"status": "suspended"})).await;
    let refused = setup.get("/whoami").await;
    assert_eq!(refused.status(), 403);
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("customer-suspended"),
        "{problem}"
    );
}

/// Every response of a metered route carries the limit headers, whoever answered it: an
/// upstream 5xx, the gateway's 502 for an upstream it cannot reach, a HEAD request, and a 429
/// for a window, which also tells of the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_of_a_metered_route_carries_the_limit_headers() {
    let upstream = Upstream::start("api");
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = unreachable.local_addr().unwrap();
    drop(unreachable);
    let setup = customer_on(
        &upstream,
        &format!(
            r#"
[[upstreams]]
name = "dead"
targets = ["{dead}"]

[[routes]]
name = "dead"
path_prefix = "/dead"
upstream = "dead"
auth = "key"
"#
        ),
        json!({
            "rate_limits": [{"requests": 3, "window_seconds": 3600}],
            "quota": {"requests": 100, "hard": true}
        }),
    )
    .await;
    let names = LIMIT_HEADERS;
    let upstream_503 = setup.get("/status/503").await;
    let head = client()
        .head(setup.gateway.url("/api/items"))
        .bearer_auth(&setup.key)
        .send()
        .await
        .unwrap();
    let bad_gateway = setup.get("/dead/items").await;
    let rate_limited = setup.get("/api/items").await;
    for (response, status) in [
        (&upstream_503, 503),
        (&head, 200),
        (&bad_gateway, 502),
        (&rate_limited, 429),
    ] {
        assert_eq!(response.status(), status);
        for name in names {
            assert_ne!(header(response, name), "", "{name} missing on the {status}");
        }
        assert_eq!(header(response, "x-ratelimit-limit"), "3");
        assert_eq!(header(response, "x-quota-limit"), "100");
    }
    assert_eq!(
        [&upstream_503, &head, &bad_gateway, &rate_limited]
            .map(|r| header(r, "x-ratelimit-remaining")),
        ["2", "1", "0", "0"]
    );
    assert!(header(&rate_limited, "retry-after").parse::<u64>().unwrap() >= 1);
    // A response that will not count shows the quota with its unit given back (the first
    // request: nothing else counted yet); its window keeps it.
    assert_eq!(header(&upstream_503, "x-quota-remaining"), "100");
    assert!(
        header(&upstream_503, "ratelimit").contains("\"quota\";r=100;"),
        "{}",
        header(&upstream_503, "ratelimit")
    );
    // The 5xx were refunded: only the HEAD counts against the quota, and the refused ones not.
    // A refund is settled in `logging`, just after its response went out, so a request sent at
    // once may not see it yet (a loaded machine widens that moment): further refused requests
    // read the count until it settles, and it must settle at 99.
    let mut remaining = header(&rate_limited, "x-quota-remaining").to_owned();
    let deadline = Instant::now() + Duration::from_secs(2);
    while remaining != "99" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let again = setup.get("/api/items").await;
        assert_eq!(again.status(), 429);
        remaining = header(&again, "x-quota-remaining").to_owned();
    }
    assert_eq!(remaining, "99");
    let policy = header(&rate_limited, "ratelimit-policy");
    assert!(
        policy.contains("\"rate-3600s\";q=3;w=3600") && policy.contains("\"quota\";q=100;w="),
        "{policy}"
    );
}

/// On a metered route the limit headers are the gateway's: an upstream's own (of the gateway's
/// names or others) are removed, and only the plan's figures sent (here no quota's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_own_limit_headers_give_way_to_the_plans() {
    let upstream = Upstream::start("api");
    let setup = customer_on(
        &upstream,
        r#"
[[routes]]
name = "limited"
path_prefix = "/own-limit-headers"
upstream = "api"
auth = "key"
"#,
        json!({"rate_limits": [{"requests": 5, "window_seconds": 60}]}),
    )
    .await;
    let response = client()
        .get(setup.gateway.url("/own-limit-headers"))
        .bearer_auth(&setup.key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "x-ratelimit-limit"), "5");
    assert_eq!(header(&response, "x-ratelimit-remaining"), "4");
    assert!(
        header(&response, "ratelimit").starts_with("\"rate-60s\";r=4;t="),
        "{}",
        header(&response, "ratelimit")
    );
    for name in ["x-quota-limit", "x-quota-remaining", "x-quota-reset"] {
        assert_eq!(header(&response, name), "", "{name}: the plan has no quota");
    }
    for name in LIMIT_HEADERS {
        assert_eq!(
            response.headers().get_all(name).iter().count(),
            usize::from(!name.starts_with("x-quota")),
            "{name}"
        );
    }
    for name in tollgate_tests::upstream::OTHER_LIMIT_HEADERS {
        assert_eq!(header(&response, name), "", "{name}: the upstream's");
    }
}

/// A route with a CORS policy: the gateway answers preflights from the origins it names without
/// asking for a key or counting them, and puts the policy's headers on every response, its own
/// 401 too, in place of the upstream's. Other routes are left as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cors_route_answers_preflights_and_lets_its_origins_read_every_answer() {
    let upstream = Upstream::start("api");
    let routes = r#"
[[routes]]
name = "browser"
path_prefix = "/browser"
upstream = "api"
auth = "key"
methods = ["GET", "POST"]
cors = { allowed_origins = ["https://app.example.com", "https://*.partner.example"], allowed_headers = ["x-trace"], max_age = "10m" }

[[routes]]
name = "own-cors"
path_prefix = "/own-cors"
upstream = "api"
auth = "key"
cors = { allowed_origins = ["https://app.example.com"] }

[[routes]]
name = "open"
path_prefix = "/open"
upstream = "api"
cors = { allowed_origins = ["*"] }
"#;
    let setup = customer_on(
        &upstream,
        routes,
        json!({"quota": {"requests": 100, "hard": true}}),
    )
    .await;
    let app = "https://app.example.com";
    let preflight = |path: &str, origin: &str, method: &str| {
        client()
            .request(reqwest::Method::OPTIONS, setup.gateway.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization, x-trace")
            .send()
    };
    let from_app = |path: &str| {
        client()
            .get(setup.gateway.url(path))
            .header("origin", app)
            .bearer_auth(&setup.key)
            .send()
    };

    let first = from_app("/browser/orders").await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "access-control-allow-origin"), app);
    let exposed = header(&first, "access-control-expose-headers");
    for name in [
        "ratelimit",
        "x-quota-remaining",
        "retry-after",
        "x-request-id",
    ] {
        assert!(
            exposed.split(", ").any(|n| n == name),
            "{name} in {exposed}"
        );
    }
    assert!(header(&first, "vary").contains("Origin"));
    assert_eq!(header(&first, "x-quota-remaining"), "99");

    // The preflight: answered by the gateway, no key asked for, nothing counted or forwarded.
    let before = upstream.requests();
    let answer = preflight("/browser/orders", app, "POST").await.unwrap();
    assert_eq!(answer.status(), 204);
    assert_eq!(header(&answer, "access-control-allow-origin"), app);
    assert_eq!(header(&answer, "access-control-allow-methods"), "GET, POST");
    let allowed = header(&answer, "access-control-allow-headers");
    assert!(
        allowed.contains("authorization") && allowed.contains("x-trace"),
        "{allowed}"
    );
    assert_eq!(header(&answer, "access-control-max-age"), "600");
    let vary: Vec<&str> = answer
        .headers()
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        vary,
        [
            "Access-Control-Request-Method, Access-Control-Request-Headers",
            "Origin"
        ]
    );
    assert!(answer.text().await.unwrap().is_empty());
    // From an origin the policy does not name: refused, and nothing opens it.
    let refused = preflight("/browser/orders", "https://evil.test", "POST")
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    assert_eq!(header(&refused, "access-control-allow-origin"), "");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["type"], "urn:tollgate:problem:origin-not-allowed");
    // A wildcard names every subdomain of its domain, each answered as itself, and not the
    // domain itself.
    let shop = "https://shop.eu.partner.example";
    let subdomain = preflight("/browser/orders", shop, "GET").await.unwrap();
    assert_eq!(subdomain.status(), 204);
    assert_eq!(header(&subdomain, "access-control-allow-origin"), shop);
    let bare = preflight("/browser/orders", "https://partner.example", "GET")
        .await
        .unwrap();
    assert_eq!(bare.status(), 403);
    // A method the route does not take is no preflight of it: the OPTIONS itself is refused.
    let other = preflight("/browser/orders", app, "DELETE").await.unwrap();
    assert_eq!(other.status(), 405);
    assert_eq!(
        upstream.requests(),
        before,
        "no preflight reached the upstream"
    );
    let second = from_app("/browser/orders").await.unwrap();
    assert_eq!(
        header(&second, "x-quota-remaining"),
        "98",
        "preflights count nothing"
    );

    // The gateway's own refusal can be read by the page.
    let unauthenticated = client()
        .get(setup.gateway.url("/browser/orders"))
        .header("origin", app)
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(header(&unauthenticated, "access-control-allow-origin"), app);
    assert!(!header(&unauthenticated, "access-control-expose-headers").is_empty());

    // The upstream's own CORS headers give way to the policy: it does not open the route to
    // another origin, nor add credentials.
    let own = from_app("/own-cors").await.unwrap();
    assert_eq!(own.status(), 200);
    assert_eq!(header(&own, "access-control-allow-origin"), app);
    assert_eq!(header(&own, "access-control-allow-credentials"), "");
    assert_ne!(header(&own, "access-control-expose-headers"), "*");
    let foreign = client()
        .get(setup.gateway.url("/own-cors"))
        .header("origin", "https://evil.test")
        .bearer_auth(&setup.key)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 200, "CORS guards browsers, not the API");
    assert_eq!(header(&foreign, "access-control-allow-origin"), "");

    // Open to every origin: `*`, for any page.
    let open = client()
        .get(setup.gateway.url("/open"))
        .header("origin", "https://anyone.test")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&open, "access-control-allow-origin"), "*");
    let without_origin = client()
        .get(setup.gateway.url("/open"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&without_origin, "access-control-allow-origin"),
        "*",
        "the same answer without an Origin: a cache may hand it to any page"
    );

    // The gateway's own 429, and its Retry-After, can be read by the page too (four calls
    // counted so far: two on /browser, two on /own-cors).
    setup
        .patch_plan(json!({"quota": {"requests": 4, "hard": true}}))
        .await;
    let spent = from_app("/browser/orders").await.unwrap();
    assert_eq!(spent.status(), 429);
    assert_eq!(header(&spent, "access-control-allow-origin"), app);
    assert!(header(&spent, "access-control-expose-headers").contains("retry-after"));
    assert!(!header(&spent, "retry-after").is_empty());

    // A route without a policy: an OPTIONS is a request like any other (here, without a key),
    // and no CORS header is added.
    let plain = preflight("/api/orders", app, "GET").await.unwrap();
    assert_eq!(plain.status(), 401);
    assert_eq!(header(&plain, "access-control-allow-origin"), "");
}

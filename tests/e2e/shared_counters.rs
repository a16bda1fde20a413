//! Plans counted in Redis: several gateways admit exactly what one would, and a Redis that is
//! slow, down or back is handled without a 5xx of the gateway's own.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Value, json};
use tollgate_tests::control_plane::{AdminApi, ControlPlane, PostgresDatabase, admin_token};
use tollgate_tests::redis::RedisServer;
use tollgate_tests::relay::Relay;
use tollgate_tests::{Gateway, Upstream, client, config};

fn routes(upstream: &Upstream) -> String {
    format!(
        r#"
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
"#,
        target = upstream.target()
    )
}

/// A plan made of `plan`, a customer on it and a key: the key.
async fn customer_with_key(api: &AdminApi, plan: Value) -> String {
    api.customer_on_plan(plan).await.1
}

/// Waits until the gateway counts in Redis.
async fn wait_for_redis(gateway: &Gateway) {
    let started = Instant::now();
    while gateway.ready().await["counters"]["counting"] != "redis" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never connected to redis: {}",
            gateway.ready().await["counters"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `count` requests with `key`, up to 100 in flight: the statuses. A request's Redis call
/// waits behind the others in flight on the debug build (all at once, 750 on each of two made
/// calls of 0.4 s on average; 250 in flight still 0.45 s, with two past the 1 s timeout, counted
/// in process instead), so the bound keeps calls well inside the timeout while a burst still
/// races on each count.
async fn burst(gateway: &Gateway, key: &str, count: usize) -> Vec<u16> {
    burst_to(gateway, key, "/api/burst", count).await
}

/// [`burst`] to `path`.
async fn burst_to(gateway: &Gateway, key: &str, path: &str, count: usize) -> Vec<u16> {
    let client = client();
    futures_util::stream::iter(0..count)
        .map(|_| client.get(gateway.url(path)).bearer_auth(key).send())
        .buffer_unordered(100)
        .map(|r| r.unwrap().status().as_u16())
        .collect()
        .await
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|&&s| s == status).count()
}

/// Two gateways following `control_plane` with `token`, counting in `redis`, with `extra` in
/// their config, once they have `keys` keys and count in Redis.
async fn two_gateways(
    control_plane: &ControlPlane,
    token: &str,
    redis: &RedisServer,
    upstream: &Upstream,
    extra: &str,
    keys: u64,
) -> (Gateway, Gateway) {
    let text = config(&format!(
        r#"
[control_plane]
url = "http://{cp}"

[redis]
url = "{redis}"
{extra}

{routes}
"#,
        cp = control_plane.address,
        redis = redis.url(),
        routes = routes(upstream)
    ));
    let env = [("TOLLGATE_GATEWAY_TOKEN", token)];
    let first = Gateway::start_with_env(tempfile::tempdir().unwrap(), &text, &env).await;
    let second = Gateway::start_with_env(tempfile::tempdir().unwrap(), &text, &env).await;
    for gateway in [&first, &second] {
        gateway.wait_for_keys(keys).await;
        wait_for_redis(gateway).await;
    }
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_admit_exactly_the_limit_of_a_concurrent_burst() {
    let redis = RedisServer::start();
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let api = control_plane.api();
    let token = api.gateway_token().await;
    let rate_key = customer_with_key(
        &api,
        json!({"rate_limits": [{"requests": 100, "window_seconds": 3600}]}),
    )
    .await;
    let (quota_customer, quota_key) = api
        .customer_on_plan(json!({"quota": {"requests": 1000, "hard": true}}))
        .await;
    let upstream = Upstream::start("api");
    // Generous (the most allowed): this test is about exactness, on two debug builds.
    let (first, second) = two_gateways(
        &control_plane,
        &token,
        &redis,
        &upstream,
        "timeout = \"1s\"",
        2,
    )
    .await;

    let (a, b) = tokio::join!(
        burst(&first, &rate_key, 250),
        burst(&second, &rate_key, 250)
    );
    let statuses: Vec<u16> = a.into_iter().chain(b).collect();
    assert_eq!(count(&statuses, 200), 100, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 400);

    let (a, b) = tokio::join!(
        burst(&first, &quota_key, 750),
        burst(&second, &quota_key, 750)
    );
    let statuses: Vec<u16> = a.into_iter().chain(b).collect();
    for gateway in [&first, &second] {
        assert_eq!(
            decisions(gateway, "fallback").await,
            0.0,
            "{}",
            gateway.metrics().await
        );
    }
    assert_eq!(count(&statuses, 200), 1000);
    assert_eq!(count(&statuses, 429), 500);
    assert_eq!(upstream.requests(), 1100);
    // Both gateways' usage reaches the control plane's ledger, each request once.
    let started = Instant::now();
    loop {
        let (status, usage) = api
            .call(
                "GET",
                &format!("/v1/customers/{quota_customer}/usage"),
                None,
            )
            .await;
        assert_eq!(status, 200);
        if usage["used"] == 1000 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "used {}",
            usage["used"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for gateway in [&first, &second] {
        assert_eq!(
            gateway
                .metric("tollgate_limit_decisions_total{counted=\"fallback\",result=\"allowed\"}")
                .await,
            Some(0.0)
        );
    }
}

/// A standalone gateway counting in `redis`, and a key on a plan of 1,000,000 requests a minute.
async fn standalone_on(redis: &RedisServer, upstream: &Upstream) -> (Gateway, String) {
    standalone_with_plan(
        redis,
        upstream,
        json!({"rate_limits": [{"requests": 1_000_000, "window_seconds": 60}]}),
    )
    .await
}

/// A standalone gateway counting in `redis`, and a key on `plan`.
async fn standalone_with_plan(
    redis: &RedisServer,
    upstream: &Upstream,
    plan: Value,
) -> (Gateway, String) {
    let section = format!(
        "url = \"{}\"\ntimeout = \"50ms\"\nretry_after = \"200ms\"",
        redis.url()
    );
    standalone_counting(&section, upstream, plan).await
}

/// A standalone gateway with `redis_section` as its `[redis]`, and a key on `plan`.
async fn standalone_counting(
    redis_section: &str,
    upstream: &Upstream,
    plan: Value,
) -> (Gateway, String) {
    let token = admin_token();
    let text = config(&format!(
        r#"
[control_plane]
embedded = true

[redis]
{redis_section}

{routes}
"#,
        routes = routes(upstream)
    ));
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &text,
        &[("TOLLGATE_ADMIN_TOKEN", token.as_str())],
    )
    .await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    let key = customer_with_key(&api, plan).await;
    gateway.wait_for_keys(1).await;
    wait_for_redis(&gateway).await;
    (gateway, key)
}

/// Sends requests with 8 in flight until `stop` says so; every status seen.
async fn load(gateway: &Gateway, key: &str, until: Instant) -> Vec<u16> {
    let client = client();
    let workers = (0..8).map(|_| {
        let client = client.clone();
        let url = gateway.url("/api/load");
        let key = key.to_owned();
        async move {
            let mut statuses = Vec::new();
            while Instant::now() < until {
                let status = client
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                statuses.push(status);
            }
            statuses
        }
    });
    join_all(workers).await.into_iter().flatten().collect()
}

async fn decisions(gateway: &Gateway, counted: &str) -> f64 {
    gateway
        .counted(&format!(
            "tollgate_limit_decisions_total{{counted=\"{counted}\",result=\"allowed\"}}"
        ))
        .await
}

/// The one customer's quota count in `redis`: its key.
fn quota_key(redis: &RedisServer) -> String {
    let keys = redis.cli(&["KEYS", "*:q:*"]);
    let key = keys.trim();
    assert!(!key.is_empty() && !key.contains('\n'), "{keys}");
    key.to_owned()
}

/// Units used in the quota count `key` of `redis`, as Redis prints them.
fn used_in_redis(redis: &RedisServer, key: &str) -> String {
    redis.cli(&["HGET", key, "u"]).trim().to_owned()
}

/// Waits until the quota count `key` of `redis` has `used` units, at most `within`.
async fn until_used_in_redis(redis: &RedisServer, key: &str, used: &str, within: Duration) {
    let started = Instant::now();
    while used_in_redis(redis, key) != used {
        assert!(
            started.elapsed() < within,
            "the count stayed at {}",
            used_in_redis(redis, key)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_costs_no_request_and_counting_returns_to_it() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_on(&redis, &upstream).await;
    let started = Instant::now();
    let traffic = load(&gateway, &key, started + Duration::from_secs(4));
    let chaos = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        redis.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        redis.restart();
    };
    let (statuses, ()) = tokio::join!(traffic, chaos);
    assert!(statuses.len() > 100, "{} requests", statuses.len());
    let mut seen = std::collections::BTreeMap::new();
    for status in &statuses {
        *seen.entry(status).or_insert(0) += 1;
    }
    assert_eq!(
        count(&statuses, 200),
        statuses.len(),
        "every request served; statuses seen: {seen:?}"
    );
    assert!(decisions(&gateway, "fallback").await > 0.0);
    assert!(
        gateway
            .counted("tollgate_redis_errors_total{kind=\"error\"}")
            .await
            + gateway
                .counted("tollgate_redis_errors_total{kind=\"timeout\"}")
                .await
            > 0.0
    );
    // Back on Redis by itself.
    let before = decisions(&gateway, "redis").await;
    let started = Instant::now();
    loop {
        let response = client()
            .get(gateway.url("/api/after"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        if decisions(&gateway, "redis").await > before {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never counted in redis again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_costs_at_most_its_timeout_then_requests_count_in_process() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_on(&redis, &upstream).await;
    // Warm: the connection is up and counting in Redis.
    let response = client()
        .get(gateway.url("/api/warm"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    redis.freeze();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let response = client()
            .get(gateway.url("/api/frozen"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        slowest = slowest.max(started.elapsed());
    }
    // One request waits the 50 ms timeout; the rest skip Redis for retry_after.
    assert!(slowest < Duration::from_millis(1000), "{slowest:?}");
    assert!(
        gateway
            .counted("tollgate_redis_errors_total{kind=\"timeout\"}")
            .await
            >= 1.0
    );
    assert!(decisions(&gateway, "fallback").await >= 19.0);
    redis.thaw();
}

/// Redis stopped and started again between requests: the gateway's `PING`s find it gone (the
/// health and `tollgate_redis_up` say so, and a request is counted in process without trying
/// it), then back, and counting returns to Redis at once, long before `retry_after` (30 s here):
/// the requests after are all counted there. Before, the first request after the restart found
/// the broken connection and sent counting in process for `retry_after`: two gateways admitted
/// twice the limit with Redis up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_between_requests_counts_the_first_request_after() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let section = format!(
        "url = \"{}\"\ntimeout = \"50ms\"\nretry_after = \"30s\"",
        redis.url()
    );
    let (gateway, key) = standalone_counting(
        &section,
        &upstream,
        json!({"rate_limits": [{"requests": 5, "window_seconds": 60}]}),
    )
    .await;
    let counters = |ready: Value| ready["counters"].clone();
    assert_eq!(status_of(&gateway, &key, "/api/before").await, 200);
    assert_eq!(
        counters(gateway.ready().await),
        json!({"store": "redis", "redis_connected": true, "counting": "redis"})
    );
    assert_eq!(gateway.metric("tollgate_redis_up").await, Some(1.0));

    redis.kill();
    gateway.wait_for_metric("tollgate_redis_up", 0.0).await;
    assert_eq!(
        counters(gateway.ready().await),
        json!({"store": "redis", "redis_connected": false, "counting": "in_process_fallback"})
    );
    let (error, timeout) = (
        r#"tollgate_redis_errors_total{kind="error"}"#,
        r#"tollgate_redis_errors_total{kind="timeout"}"#,
    );
    let tried = async || (gateway.counted(error).await, gateway.counted(timeout).await);
    let before = tried().await;
    assert_eq!(status_of(&gateway, &key, "/api/down").await, 200);
    assert_eq!(decisions(&gateway, "fallback").await, 1.0);
    // Not tried: Redis refused the last `PING`.
    assert_eq!(tried().await, before);

    redis.restart();
    wait_for_redis(&gateway).await;
    assert_eq!(gateway.metric("tollgate_redis_up").await, Some(1.0));
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(status_of(&gateway, &key, "/api/after").await);
    }
    // The restarted Redis has fresh windows, each request decided there; the request admitted
    // in process while it was down counts in the window too, as Redis' windows never take it
    // (before, 5 of 7 passed here: 6 in a minute with a limit of 5).
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429]);
    assert_eq!(decisions(&gateway, "fallback").await, 1.0);
    assert_eq!(decisions(&gateway, "redis").await, 5.0);
    assert_eq!(tried().await, before);
}

/// A connection whose reconnection Redis refused with an error answer (the gateway's password,
/// changed in Redis meanwhile) is never made again by redis-rs itself: before, counting stayed
/// in process for good, even once Redis took the password again. The probe now makes a new
/// connection, and counting returns to Redis, without waiting out `retry_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_refused_while_reconnecting_then_taken_again_brings_counting_back_to_redis() {
    let redis = RedisServer::start();
    let password = |secret: &str| {
        let user = ["ACL", "SETUSER", "tollgate", "on", "resetpass"];
        let rights = ["~*", "&*", "+@all"];
        let set = format!(">{secret}");
        let args: Vec<&str> = user
            .into_iter()
            .chain([set.as_str()])
            .chain(rights)
            .collect();
        assert_eq!(redis.cli(&args), "OK");
    };
    password("first-secret");
    let url = redis
        .url()
        .replace("redis://", "redis://tollgate:first-secret@");
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_counting(
        &format!("url = \"{url}\"\ntimeout = \"50ms\"\nretry_after = \"30s\""),
        &upstream,
        json!({"rate_limits": [{"requests": 100, "window_seconds": 60}]}),
    )
    .await;
    assert_eq!(status_of(&gateway, &key, "/api/before").await, 200);
    assert_eq!(decisions(&gateway, "redis").await, 1.0);

    // The password changes in Redis, and the gateway's connections are cut: each reconnection is
    // refused (`WRONGPASS`).
    password("second-secret");
    assert_ne!(redis.cli(&["CLIENT", "KILL", "USER", "tollgate"]), "0");
    gateway.wait_for_metric("tollgate_redis_up", 0.0).await;
    assert_eq!(status_of(&gateway, &key, "/api/refused").await, 200);
    assert_eq!(decisions(&gateway, "fallback").await, 1.0);

    // The old password is taken again: a new connection answers within a few probes, and
    // requests are decided in Redis again, long before `retry_after`.
    password("first-secret");
    gateway.wait_for_metric("tollgate_redis_up", 1.0).await;
    wait_for_redis(&gateway).await;
    for _ in 0..3 {
        assert_eq!(status_of(&gateway, &key, "/api/after").await, 200);
    }
    assert_eq!(decisions(&gateway, "redis").await, 4.0);
    assert_eq!(decisions(&gateway, "fallback").await, 1.0);
}

/// A Redis that stalls now and then during a burst answers some calls in time while others time
/// out and are counted in process: a hard quota still admits no more than it allows. Before, each
/// answer in time set the gateway's count back to Redis' own, without the units counted in
/// process meanwhile, which were admitted again (a walkthrough saw 1,483 of 1,500 admitted on a
/// quota of 1,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stalling_during_a_burst_admits_no_more_than_a_hard_quota() {
    let stalled = Stalled::burst(json!({"quota": {"requests": 300, "hard": true}})).await;
    let (gateway, key, admitted) = (&stalled.gateway, &stalled.key, stalled.admitted);
    assert!(admitted <= 299, "{admitted} admitted");
    // Units counted in process whose calls may still run in Redis count beyond its answers
    // until it answers a call sent after theirs: meanwhile the gateway may refuse early, never
    // late. Counting in Redis again, what is left of the quota passes, exactly.
    let later = admitted_until_refused(gateway, key, 300).await;
    assert_eq!(1 + admitted + later, 300, "{admitted} then {later}");
}

/// Requests admitted in process because their calls to a stalling Redis timed out, and then
/// answered 5xx by the upstream, are given back where Redis' answers to those calls put their
/// units: in the end Redis counts none of them. Before, the refund was sent to Redis at once,
/// and dropped while Redis was failing; the units Redis counted when it ran the calls stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_given_back_while_their_calls_are_awaited_cost_nothing_in_redis() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_with_plan(
        &redis,
        &upstream,
        json!({"quota": {"requests": 1_000, "hard": true}}),
    )
    .await;
    assert_eq!(status_of(&gateway, &key, "/status/200").await, 200);
    let quota = quota_key(&redis);
    let stalls = stall_redis(&redis, 8);
    let statuses = burst_to(&gateway, &key, "/status/500", 600).await;
    stalls.join().unwrap();
    assert_eq!(count(&statuses, 500), 600);
    let timed_out = gateway
        .counted("tollgate_redis_errors_total{kind=\"timeout\"}")
        .await;
    assert!(timed_out >= 2.0, "{timed_out} calls timed out");
    assert!(decisions(&gateway, "fallback").await >= 1.0);
    // Only the first request counts.
    until_used_in_redis(&redis, &quota, "1", Duration::from_secs(10)).await;
}

/// A gateway counting in a Redis that stalled 80 ms eight times during a burst of 900 requests
/// of one customer, on `plan`; the gateway's `timeout` is 50 ms.
struct Stalled {
    _redis: RedisServer,
    _upstream: Upstream,
    gateway: Gateway,
    key: String,
    /// Requests of the burst admitted (one more was before it).
    admitted: usize,
    /// Calls that timed out.
    timed_out: f64,
}

impl Stalled {
    async fn burst(plan: Value) -> Self {
        let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
        let upstream = Upstream::start("api");
        let (gateway, key) = standalone_with_plan(&redis, &upstream, plan).await;
        assert_eq!(status_of(&gateway, &key, "/api/before").await, 200);
        let stalls = stall_redis(&redis, 8);
        let statuses = burst(&gateway, &key, 900).await;
        stalls.join().unwrap();
        // Calls timed out while others were answered in time: both ways decided.
        let timed_out = gateway
            .counted("tollgate_redis_errors_total{kind=\"timeout\"}")
            .await;
        assert!(timed_out >= 2.0, "{timed_out} calls timed out");
        assert!(decisions(&gateway, "redis").await > 1.0);
        let admitted = count(&statuses, 200);
        assert_eq!(admitted + count(&statuses, 429), 900, "no other status");
        // Counting in Redis again; admission calls that timed out were answered in the end
        // (other calls, adding batches, time out too).
        tokio::time::sleep(Duration::from_millis(300)).await;
        wait_for_redis(&gateway).await;
        let mut late = 0.0;
        for redis in ["counted", "not_counted", "unknown"] {
            for decided in ["admitted", "refused"] {
                late += gateway
                    .counted(&format!(
                        "tollgate_redis_late_answers_total{{gateway=\"{decided}\",redis=\"{redis}\"}}"
                    ))
                    .await;
            }
        }
        assert!(late >= 1.0 && late <= timed_out, "{late} late answers");
        Self {
            _redis: redis,
            _upstream: upstream,
            gateway,
            key,
            admitted,
            timed_out,
        }
    }
}

/// The same for a rate-limit window: one gateway admits no more than the limit while Redis
/// answers some calls in time and others time out. Before, each answer in time set the
/// gateway's window to Redis' count alone, without the units it had counted in process (which
/// never reach Redis' windows), and a walkthrough saw 198 of a burst of 500 admitted on a limit
/// of 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_stalling_during_a_burst_admits_no_more_than_a_window_allows() {
    let stalled =
        Stalled::burst(json!({"rate_limits": [{"requests": 300, "window_seconds": 3600}]})).await;
    let (gateway, key, admitted) = (&stalled.gateway, &stalled.key, stalled.admitted);
    let timed_out = stalled.timed_out;
    assert!(admitted <= 299, "{admitted} admitted");
    // Counting in Redis again, the window has room for what is left of it, but for the units
    // of calls that timed out and that Redis counted in its window all the same for requests
    // refused here (a window, unlike a quota, does not give units back): nothing the gateway
    // counted is kept beyond that.
    let later = admitted_until_refused(gateway, key, 300).await;
    let total = 1 + admitted + later;
    assert!(
        total <= 300 && total + timed_out as usize >= 300,
        "{admitted} then {later}, {timed_out} timed out"
    );
}

/// Stalls `redis` for 80 ms `times` times, 60 ms apart, from a thread of its own.
fn stall_redis(redis: &RedisServer, times: usize) -> std::thread::JoinHandle<()> {
    let url = redis.url();
    std::thread::spawn(move || {
        let port = url.rsplit(':').next().unwrap().to_owned();
        for _ in 0..times {
            std::thread::sleep(Duration::from_millis(60));
            let _ = std::process::Command::new("redis-cli")
                .args(["-p", &port, "DEBUG", "SLEEP", "0.08"])
                .output();
        }
    })
}

/// A gateway started again while Redis does not answer knows no count of the customer's period
/// in Redis: the units it counts in process meanwhile are still added to Redis' count, which was
/// made before them, once Redis answers. Before, they were left out ("unplaced") and a hard
/// quota of 10 admitted 13.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_counted_by_a_gateway_restarted_while_redis_was_away_reach_its_count() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_with_plan(
        &redis,
        &upstream,
        json!({"quota": {"requests": 10, "hard": true}}),
    )
    .await;
    for _ in 0..4 {
        assert_eq!(status_of(&gateway, &key, "/api/before").await, 200);
    }
    let text = std::fs::read_to_string(&gateway.config_path).unwrap();
    redis.freeze();
    let dir = gateway.kill();
    let gateway = Gateway::start_in(dir, &text).await;
    gateway.wait_for_keys(1).await;
    for _ in 0..3 {
        assert_eq!(status_of(&gateway, &key, "/api/away").await, 200);
    }
    assert_eq!(decisions(&gateway, "fallback").await, 3.0);
    redis.thaw();
    wait_for_redis(&gateway).await;
    gateway
        .wait_for_metric(
            "tollgate_quota_fallback_units_total{outcome=\"shared\"}",
            3.0,
        )
        .await;
    let mut admitted = 0;
    for _ in 0..6 {
        if status_of(&gateway, &key, "/api/after").await == 200 {
            admitted += 1;
        }
    }
    assert_eq!(4 + 3 + admitted, 10, "exactly the quota");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_counts_in_a_redis_it_reaches_over_tls() {
    let redis = RedisServer::start_tls();
    assert!(redis.url().starts_with("rediss://"));
    let upstream = Upstream::start("api");
    let section = format!(
        "url = \"{}\"\ntls_ca_file = \"{}\"\ntimeout = \"200ms\"",
        redis.url(),
        redis.ca_file().display()
    );
    let (gateway, key) = standalone_counting(
        &section,
        &upstream,
        json!({"rate_limits": [{"requests": 5, "window_seconds": 60}]}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(status_of(&gateway, &key, "/api/tls").await);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429]);
    assert_eq!(decisions(&gateway, "redis").await, 5.0);
    assert_eq!(decisions(&gateway, "fallback").await, 0.0);
    // The counters are in that server (read over TLS by redis-cli).
    assert!(redis.cli(&["DBSIZE"]).parse::<u64>().unwrap() >= 2);
}

/// Sends one request; its status.
async fn status_of(gateway: &Gateway, key: &str, path: &str) -> u16 {
    gateway.get_with_key(path, key).await.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_units_counted_in_process_while_redis_was_frozen_are_added_to_its_count() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_with_plan(
        &redis,
        &upstream,
        json!({"quota": {"requests": 30, "hard": true}}),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(status_of(&gateway, &key, "/api/shared").await, 200);
    }
    assert_eq!(decisions(&gateway, "redis").await, 5.0);
    redis.freeze();
    for _ in 0..10 {
        assert_eq!(status_of(&gateway, &key, "/api/frozen").await, 200);
    }
    assert_eq!(decisions(&gateway, "fallback").await, 10.0);
    redis.thaw();
    // Past retry_after: the next request goes to Redis again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut after = 0;
    loop {
        match status_of(&gateway, &key, "/api/after").await {
            200 => after += 1,
            429 => break,
            other => panic!("status {other}"),
        }
        assert!(after <= 30, "the quota never ran out");
    }
    // A call that timed out was still queued in the frozen Redis, which counted it when it
    // woke (one, unless the machine took longer than retry_after for the ten requests); the
    // requests that did not call Redis had their units added to its count.
    let timed_out = gateway
        .counted("tollgate_redis_errors_total{kind=\"timeout\"}")
        .await;
    let shared = gateway
        .counted("tollgate_quota_fallback_units_total{outcome=\"shared\"}")
        .await;
    assert!(timed_out >= 1.0 && shared >= 1.0, "{timed_out} {shared}");
    assert_eq!(timed_out + shared, 10.0);
    assert_eq!(5 + 10 + after, 30, "exactly the quota, outage or not");
}

/// A gateway in standalone mode counting on `cluster`, and its admin API.
async fn on_cluster(
    cluster: &tollgate_tests::redis::RedisCluster,
    upstream: &Upstream,
) -> (Gateway, AdminApi) {
    let token = admin_token();
    let urls = cluster
        .urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let text = config(&format!(
        r#"
[control_plane]
embedded = true

[redis]
cluster_urls = [{urls}]
timeout = "1s"

{routes}
"#,
        routes = routes(upstream)
    ));
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &text,
        &[("TOLLGATE_ADMIN_TOKEN", token.as_str())],
    )
    .await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    (gateway, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_counts_each_customer_exactly_on_its_own_slot() {
    let cluster = tollgate_tests::redis::RedisCluster::start();
    let upstream = Upstream::start("api");
    let (gateway, api) = on_cluster(&cluster, &upstream).await;
    let mut keys = Vec::new();
    for _ in 0..6 {
        keys.push(
            customer_with_key(
                &api,
                json!({"rate_limits": [{"requests": 20, "window_seconds": 3600}],
                       "quota": {"requests": 15, "hard": true}}),
            )
            .await,
        );
    }
    gateway.wait_for_keys(6).await;
    wait_for_redis(&gateway).await;
    let bursts = join_all(keys.iter().map(|key| burst(&gateway, key, 40))).await;
    for statuses in &bursts {
        // The quota (15) is the tighter limit: exactly 15 of each customer's 40 pass.
        assert_eq!(count(statuses, 200), 15, "{statuses:?}");
        assert_eq!(count(statuses, 429), 25);
    }
    assert_eq!(decisions(&gateway, "fallback").await, 0.0);
    // Six customers' keys are spread over the three masters.
    let spread = cluster.key_counts();
    assert_eq!(spread.len(), 3);
    assert!(
        spread.iter().filter(|&&n| n > 0).count() >= 2,
        "keys on one node only: {spread:?}"
    );
}

/// One master of a cluster lost: `tollgate_redis_up` and `/health/ready` say so (before, the
/// `PING` went only to the masters the gateway was connected to, and both stayed up), and back
/// once it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_lost_shows_as_redis_down_until_it_is_back() {
    let mut cluster = tollgate_tests::redis::RedisCluster::start();
    let upstream = Upstream::start("api");
    let (gateway, api) = on_cluster(&cluster, &upstream).await;
    let key = customer_with_key(
        &api,
        json!({"rate_limits": [{"requests": 20, "window_seconds": 3600}]}),
    )
    .await;
    gateway.wait_for_keys(1).await;
    wait_for_redis(&gateway).await;
    assert_eq!(status_of(&gateway, &key, "/api/before").await, 200);
    assert_eq!(gateway.metric("tollgate_redis_up").await, Some(1.0));

    cluster.node(1).kill();
    gateway.wait_for_metric("tollgate_redis_up", 0.0).await;
    assert_eq!(
        gateway.ready().await["counters"]["redis_connected"],
        json!(false)
    );

    cluster.node(1).restart();
    gateway.wait_for_metric("tollgate_redis_up", 1.0).await;
    assert_eq!(
        gateway.ready().await["counters"]["redis_connected"],
        json!(true)
    );
    assert_eq!(status_of(&gateway, &key, "/api/after").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_without_limits_asks_redis_once_and_its_units_reach_the_shared_count_in_batches() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_with_plan(&redis, &upstream, json!({})).await;
    for _ in 0..20 {
        assert_eq!(status_of(&gateway, &key, "/api/free").await, 200);
    }
    // The first request made the customer's count in Redis; the others had nothing to decide
    // and were counted in the gateway, without a call.
    assert_eq!(decisions(&gateway, "redis").await, 1.0);
    assert_eq!(decisions(&gateway, "batched").await, 19.0);
    let quota_key = quota_key(&redis);
    // The gateway adds their units to that count in the background, every 100 ms.
    until_used_in_redis(&redis, &quota_key, "20", Duration::from_secs(5)).await;
    assert_eq!(
        gateway
            .metric("tollgate_quota_fallback_units_total{outcome=\"shared\"}")
            .await,
        Some(19.0)
    );
    assert_eq!(upstream.requests(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_gateway_adds_its_batched_units_to_redis_before_it_exits() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (mut gateway, key) = standalone_with_plan(&redis, &upstream, json!({})).await;
    for _ in 0..10 {
        assert_eq!(status_of(&gateway, &key, "/api/last").await, 200);
    }
    // Signalled straight after the last response: the drain's last pass adds what the
    // background pass (every 100 ms) has not.
    gateway.signal("TERM");
    assert!(gateway.wait_exit(Duration::from_secs(10)).await.success());
    assert_eq!(used_in_redis(&redis, &quota_key(&redis)), "10");
}

/// Waits until `gateway` counted `count` Redis calls that timed out.
async fn until_timeouts(gateway: &Gateway, count: f64) {
    let started = Instant::now();
    while gateway
        .counted("tollgate_redis_errors_total{kind=\"timeout\"}")
        .await
        < count
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fewer than {count} calls timed out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `gateway` added `units` batched units to Redis, then checks that several passes
/// later they were added once: Redis' count is `used`.
async fn added_once(gateway: &Gateway, redis: &RedisServer, units: f64, used: &str) {
    let shared = "tollgate_quota_fallback_units_total{outcome=\"shared\"}";
    let quota_key = quota_key(redis);
    let started = Instant::now();
    while gateway.metric(shared).await != Some(units) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the batch was never added; the count is {}",
            used_in_redis(redis, &quota_key)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(used_in_redis(redis, &quota_key), used);
    assert_eq!(gateway.metric(shared).await, Some(units));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_units_whose_calls_time_out_in_a_frozen_redis_are_added_once_when_it_wakes() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_with_plan(&redis, &upstream, json!({})).await;
    assert_eq!(status_of(&gateway, &key, "/api/first").await, 200);
    assert_eq!(decisions(&gateway, "redis").await, 1.0);
    redis.freeze();
    // Nothing to decide: counted in the gateway while Redis sleeps, without a wait.
    for _ in 0..10 {
        assert_eq!(status_of(&gateway, &key, "/api/frozen").await, 200);
    }
    assert_eq!(decisions(&gateway, "batched").await, 10.0);
    // The background pass sends the batch, times out (50 ms), and sends it again with the same
    // token after `retry_after` (200 ms): Redis holds each call it was sent, unanswered.
    until_timeouts(&gateway, 2.0).await;
    redis.thaw();
    // Redis wakes and runs every queued call; the batch's units count once.
    added_once(&gateway, &redis, 10.0, "11").await;
}

/// Batched units whose calls never reached Redis (held on the way, then dropped with their
/// connection) are sent again once Redis answers, and count once. (That a copy which arrives
/// after all adds nothing is the frozen-Redis test's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_units_whose_calls_were_lost_on_the_way_are_added_once_when_redis_answers() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.addr());
    let upstream = Upstream::start("api");
    let section = format!(
        "url = \"{}\"\ntimeout = \"50ms\"\nretry_after = \"200ms\"",
        relay.redis_url()
    );
    let (gateway, key) = standalone_counting(&section, &upstream, json!({})).await;
    assert_eq!(status_of(&gateway, &key, "/api/first").await, 200);
    assert_eq!(decisions(&gateway, "redis").await, 1.0);
    relay.hold();
    for _ in 0..10 {
        assert_eq!(status_of(&gateway, &key, "/api/held").await, 200);
    }
    assert_eq!(decisions(&gateway, "batched").await, 10.0);
    // Sent, and sent again after `retry_after`: both held, neither reaches Redis.
    until_timeouts(&gateway, 2.0).await;
    relay.cut();
    assert_eq!(used_in_redis(&redis, &quota_key(&redis)), "1");
    added_once(&gateway, &redis, 10.0, "11").await;
}

/// Requests with `key` through `gateway` until one is refused (at most `most`): how many passed.
async fn admitted_until_refused(gateway: &Gateway, key: &str, most: usize) -> usize {
    for passed in 0..=most {
        match status_of(gateway, key, "/api/more").await {
            200 => {}
            429 => return passed,
            other => panic!("status {other}"),
        }
    }
    panic!("more than {most} passed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_before_the_ledger_has_the_requests_goes_on_from_the_gateways_own_count() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    // The ledger is written every 5 s: when Redis is flushed, it has none of the 30 requests.
    let section = format!(
        "url = \"{}\"\ntimeout = \"1s\"\n\n[metering]\nflush_interval = \"5s\"",
        redis.url()
    );
    let (gateway, key) = standalone_counting(
        &section,
        &upstream,
        json!({"quota": {"requests": 50, "hard": true}}),
    )
    .await;
    for _ in 0..30 {
        assert_eq!(status_of(&gateway, &key, "/api/first").await, 200);
    }
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    // The count Redis makes again starts from what this gateway counted, not from the ledger's
    // nothing: exactly 20 more.
    assert_eq!(admitted_until_refused(&gateway, &key, 50).await, 20);
    assert_eq!(decisions(&gateway, "fallback").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_redis_rebuilt_on_another_gateway_takes_the_requests_the_ledger_had_yet_to_store() {
    let redis = RedisServer::start();
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let api = control_plane.api();
    let token = api.gateway_token().await;
    let key = customer_with_key(&api, json!({"quota": {"requests": 50, "hard": true}})).await;
    let upstream = Upstream::start("api");
    let (first, second) = two_gateways(
        &control_plane,
        &token,
        &redis,
        &upstream,
        "timeout = \"1s\"\n\n[metering]\nflush_interval = \"2s\"",
        1,
    )
    .await;
    for _ in 0..30 {
        assert_eq!(status_of(&first, &key, "/api/first").await, 200);
    }
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    // The second gateway never counted this customer: it rebuilds the count from a ledger that
    // may lack the first gateway's requests until its next flush.
    for _ in 0..10 {
        assert_eq!(status_of(&second, &key, "/api/second").await, 200);
    }
    // It reads the ledger again once every gateway has flushed (2 flush intervals and 1 s):
    // the count is then the 40 requests, once each.
    let quota_key = quota_key(&redis);
    until_used_in_redis(&redis, &quota_key, "40", Duration::from_secs(15)).await;
    assert_eq!(admitted_until_refused(&second, &key, 50).await, 10);
    assert_eq!(status_of(&first, &key, "/api/first").await, 429);
    assert_eq!(used_in_redis(&redis, &quota_key), "50");
}

/// After Redis lost its data, a burst on a gateway that never counted the customer waits for
/// the count rebuilt from the ledger: no request passes a hard quota the ledger shows spent,
/// however many arrive while the first of them reads the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_after_redis_lost_its_data_waits_for_the_count_rebuilt_from_the_ledger() {
    let redis = RedisServer::start();
    let database = PostgresDatabase::create().await;
    let control_plane = ControlPlane::start(&database.url()).await;
    let api = control_plane.api();
    let token = api.gateway_token().await;
    let (customer, key) = api
        .customer_on_plan(json!({"quota": {"requests": 20, "hard": true}}))
        .await;
    let upstream = Upstream::start("api");
    let (first, second) = two_gateways(
        &control_plane,
        &token,
        &redis,
        &upstream,
        "timeout = \"1s\"\n\n[metering]\nflush_interval = \"200ms\"",
        1,
    )
    .await;
    for _ in 0..20 {
        assert_eq!(status_of(&first, &key, "/api/first").await, 200);
    }
    // The ledger holds all twenty.
    let started = Instant::now();
    loop {
        let (status, usage) = api
            .call("GET", &format!("/v1/customers/{customer}/usage"), None)
            .await;
        assert_eq!(status, 200, "{usage}");
        if usage["used"] == 20 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{usage}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(redis.cli(&["FLUSHALL"]), "OK");
    let statuses = burst(&second, &key, 200).await;
    assert_eq!(count(&statuses, 200), 0, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 200, "{statuses:?}");
    assert_eq!(used_in_redis(&redis, &quota_key(&redis)), "20");
}

/// A gateway counting in Redis at `redis_url` (50 ms timeout, 2 s `retry_after`) whose upstream
/// is answered 504 past 600 ms, and the key of a customer with a hard quota of 10.
async fn refunding_gateway(redis_url: &str, upstream: &Upstream) -> (Gateway, String) {
    let token = admin_token();
    let text = config(&format!(
        r#"
[control_plane]
embedded = true

[redis]
url = "{redis_url}"
timeout = "50ms"
retry_after = "2s"

[[upstreams]]
name = "api"
targets = ["{target}"]
read_timeout = "600ms"

[[routes]]
name = "api"
path_prefix = "/api"
upstream = "api"
auth = "key"
strip_prefix = true
"#,
        target = upstream.target()
    ));
    let gateway = Gateway::start_with_env(
        tempfile::tempdir().unwrap(),
        &text,
        &[("TOLLGATE_ADMIN_TOKEN", token.as_str())],
    )
    .await;
    let api = AdminApi::new(&format!("http://{}", gateway.admin), &token);
    let key = customer_with_key(&api, json!({"quota": {"requests": 10, "hard": true}})).await;
    gateway.wait_for_keys(1).await;
    wait_for_redis(&gateway).await;
    (gateway, key)
}

/// A request the upstream answers in 3 s, so the gateway answers 504 at 600 ms: its status.
fn too_slow(gateway: &Gateway, key: &str) -> tokio::task::JoinHandle<u16> {
    let url = gateway.url("/api/slow/3000");
    let key = key.to_owned();
    tokio::spawn(async move {
        client()
            .get(url)
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

/// A unit to give back in Redis while Redis is failing (here: within `retry_after` of a call that
/// timed out) is given back once Redis answers again, not lost: Redis' count stays the
/// customer's true one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_due_while_redis_fails_is_made_once_it_answers() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = refunding_gateway(&redis.url(), &upstream).await;

    // Counted in Redis, then answered 504 by the gateway at 600 ms: its unit is given back.
    let slow = too_slow(&gateway, &key);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(used_in_redis(&redis, &quota_key(&redis)), "1");
    // A call that times out puts Redis aside for `retry_after`, past the 504's refund.
    redis.freeze();
    assert_eq!(status_of(&gateway, &key, "/api/frozen").await, 200);
    redis.thaw();
    assert_eq!(decisions(&gateway, "fallback").await, 1.0);
    assert_eq!(slow.await.unwrap(), 504);
    // The call that timed out ran once Redis woke (documented), and the 504's unit waits: 2.
    let quota = quota_key(&redis);
    until_used_in_redis(&redis, &quota, "2", Duration::from_secs(5)).await;
    // Once Redis is asked again, the 504's unit is given back: it counts the one request
    // that stays counted, and only once.
    until_used_in_redis(&redis, &quota, "1", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(used_in_redis(&redis, &quota), "1");
}

/// A unit given back in Redis whose call got no answer within the timeout is given back again
/// once Redis answers, and counts once, whether that first call was lost on the way (its
/// connection broke before Redis read it) or ran after all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_whose_call_got_no_answer_is_made_again_and_counts_once() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.addr());
    let upstream = Upstream::start("api");
    let (gateway, key) = refunding_gateway(&relay.redis_url(), &upstream).await;
    let timeouts = r#"tollgate_redis_errors_total{kind="timeout"}"#;
    let answered = "tollgate_redis_call_duration_seconds_count";
    for lost in [true, false] {
        let slow = too_slow(&gateway, &key);
        let started = Instant::now();
        while redis.cli(&["KEYS", "*:q:*"]).is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "no quota count");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let quota = quota_key(&redis);
        until_used_in_redis(&redis, &quota, "1", Duration::from_secs(5)).await;
        // Redis is sent the 504's refund, and sees nothing of it until the call timed out.
        let timed_out = gateway.counted(timeouts).await;
        relay.hold();
        assert_eq!(slow.await.unwrap(), 504);
        gateway.wait_for_metric(timeouts, timed_out + 1.0).await;
        let calls = gateway.counted(answered).await;
        if lost {
            relay.cut();
            assert_eq!(used_in_redis(&redis, &quota), "1");
        } else {
            // The held call runs now, long before Redis is asked again (`retry_after`).
            relay.release();
            until_used_in_redis(&redis, &quota, "0", Duration::from_secs(1)).await;
            assert_eq!(gateway.counted(answered).await, calls);
        }
        // Once Redis is asked again (`retry_after` after the timeout), the refund is made
        // again: given back if it was lost, nothing more if it ran.
        let started = Instant::now();
        while gateway.counted(answered).await <= calls {
            assert!(started.elapsed() < Duration::from_secs(10), "no call again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        until_used_in_redis(&redis, &quota, "0", Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(used_in_redis(&redis, &quota), "0", "lost: {lost}");
    }
}

/// When Redis fails, counting in the gateway starts from the windows as Redis last told them,
/// not from empty ones: a customer who had used its window gets no fresh one (the documented
/// "at most N x limit across N gateways" holds from the first request on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_redis_had_filled_stays_full_when_counting_falls_back_to_the_gateway() {
    let redis = RedisServer::start();
    let upstream = Upstream::start("api");
    let (gateway, key) = standalone_with_plan(
        &redis,
        &upstream,
        json!({"rate_limits": [{"requests": 5, "window_seconds": 3600}]}),
    )
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(status_of(&gateway, &key, "/api/shared").await);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    redis.freeze();
    let mut frozen = Vec::new();
    for _ in 0..5 {
        let response = gateway.get_with_key("/api/frozen", &key).await;
        frozen.push((
            response.status().as_u16(),
            response.headers()["x-ratelimit-remaining"]
                .to_str()
                .unwrap()
                .to_owned(),
        ));
    }
    redis.thaw();
    assert_eq!(frozen, vec![(429, "0".to_owned()); 5]);
    assert_eq!(
        gateway
            .metric(r#"tollgate_limit_decisions_total{counted="fallback",result="rate-limited"}"#)
            .await,
        Some(5.0)
    );
}

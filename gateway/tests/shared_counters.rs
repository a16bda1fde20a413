//! The Redis counters against a real Redis (127.0.0.1:6379, each test under its own key
//! prefix), on an injected clock: the script must decide exactly as the in-process counters do.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tollgate_gateway::config::{Redis, RedisNodes};
use tollgate_gateway::limits::local::{LocalCounters, Taken, UNKNOWN_GENERATION};
use tollgate_gateway::limits::period::Period;
use tollgate_gateway::limits::quota::QuotaLimit;
use tollgate_gateway::limits::redis::{Known, Rebuild, RedisCounters, Sharing, VIA_BACKGROUND};
use tollgate_gateway::limits::{Decision, Policy, Verdict};
use tollgate_gateway::metrics::Metrics;
use tollgate_model::plan::RateLimit;

const PERIOD: Period = Period {
    start_ms: 1_700_000_000_000,
    end_ms: 1_702_592_000_000,
};

async fn counters() -> RedisCounters {
    counters_under(&format!("tollgate-test-{}", rand::random::<u64>())).await
}

async fn counters_under(prefix: &str) -> RedisCounters {
    let prefix = prefix.to_owned();
    let counters = RedisCounters::new(
        Redis {
            nodes: RedisNodes::Single("redis://127.0.0.1:6379".to_owned()),
            timeout: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
            key_prefix: prefix,
            tls_ca_file: None,
        },
        &Metrics::new(),
    )
    .unwrap();
    counters.connect().await.unwrap();
    counters
}

/// What the headers are made of, without where it was counted.
fn shape(decision: &Decision) -> (Verdict, Vec<(u64, i64)>, u64, Option<u64>) {
    (
        decision.verdict,
        decision
            .windows
            .iter()
            .map(|w| (w.remaining, w.reset_ms))
            .collect(),
        decision.used,
        decision.reservation.map(|r| r.overage),
    )
}

#[tokio::test]
async fn exactly_20_of_25_sequential_requests_pass_with_remaining_counting_down() {
    let redis = counters().await;
    let limits = [RateLimit {
        requests: 20,
        window_seconds: 60,
    }];
    let policy = Policy {
        rate_limits: &limits,
        quota: None,
    };
    let mut remaining = Vec::new();
    let mut admitted = 0;
    for i in 0..25 {
        let decision = redis
            .admit(
                &[1; 16],
                &policy,
                PERIOD,
                1,
                PERIOD.start_ms + i,
                Rebuild::default(),
            )
            .await
            .unwrap();
        admitted += usize::from(decision.verdict == Verdict::Admitted);
        remaining.push(decision.windows[0].remaining);
    }
    assert_eq!(admitted, 20);
    let expected: Vec<u64> = (0..20).rev().chain([0; 5]).collect();
    assert_eq!(remaining, expected);
}

#[tokio::test]
async fn a_unit_comes_back_exactly_one_window_after_its_bucket_ends() {
    let redis = counters().await;
    let limits = [RateLimit {
        requests: 1,
        window_seconds: 60,
    }];
    let policy = Policy {
        rate_limits: &limits,
        quota: None,
    };
    // 60 s in 3 s buckets, the first starting at `start` (a multiple of 3 s): a request at
    // +1 s is in the bucket ending at +3 s.
    let start: i64 = 1_700_000_001_000;
    assert_eq!(start % 3_000, 0);
    let at = |ms: i64| start + ms;
    let customer = [2; 16];
    assert_eq!(
        redis
            .admit(&customer, &policy, PERIOD, 1, at(1_000), Rebuild::default())
            .await
            .unwrap()
            .verdict,
        Verdict::Admitted
    );
    let refused = redis
        .admit(
            &customer,
            &policy,
            PERIOD,
            1,
            at(62_999),
            Rebuild::default(),
        )
        .await
        .unwrap();
    assert_eq!(refused.verdict, Verdict::RateLimited);
    assert_eq!(refused.windows[0].reset_ms, 1);
    assert_eq!(
        redis
            .admit(
                &customer,
                &policy,
                PERIOD,
                1,
                at(63_000),
                Rebuild::default()
            )
            .await
            .unwrap()
            .verdict,
        Verdict::Admitted
    );
}

#[tokio::test]
async fn the_script_decides_every_request_as_the_in_process_counters_do() {
    let redis = counters().await;
    let local = LocalCounters::default();
    let limits = [
        RateLimit {
            requests: 5,
            window_seconds: 1,
        },
        RateLimit {
            requests: 40,
            window_seconds: 60,
        },
    ];
    let quotas = [
        Some(QuotaLimit {
            limit: 120,
            hard: true,
        }),
        Some(QuotaLimit {
            limit: 90,
            hard: false,
        }),
    ];
    let mut random = rand::rngs::StdRng::seed_from_u64(7);
    for (n, quota) in quotas.into_iter().enumerate() {
        let customer = [10 + n as u8; 16];
        let policy = Policy {
            rate_limits: &limits,
            quota,
        };
        let mut now = PERIOD.start_ms;
        for _ in 0..600 {
            now += random.random_range(0..400);
            let shared = redis
                .admit(&customer, &policy, PERIOD, 1, now, Rebuild::default())
                .await
                .unwrap();
            let own = local.admit(&customer, &policy, PERIOD, 1, now);
            assert_eq!(shape(&shared), shape(&own), "at {now}");
            // Some requests fail upstream and are given back.
            if let (Some(a), Some(b)) = (shared.reservation, own.reservation)
                && random.random_ratio(1, 10)
            {
                assert!(
                    redis
                        .refund(&customer, &a, rand::random(), &[], now, false)
                        .await
                        .is_ok()
                );
                local.refund(&customer, &b);
            }
        }
    }
}

#[tokio::test]
async fn the_script_decides_as_the_in_process_counters_do_across_plan_changes_sizes_and_late_calls()
{
    let redis = counters().await;
    let local = LocalCounters::default();
    // An upgrade and a downgrade of the same window lengths: a window may hold more than its new
    // limit, and requests of several units need more than one unit to come back.
    let plans = [
        [
            RateLimit {
                requests: 12,
                window_seconds: 1,
            },
            RateLimit {
                requests: 60,
                window_seconds: 60,
            },
        ],
        [
            RateLimit {
                requests: 4,
                window_seconds: 1,
            },
            RateLimit {
                requests: 25,
                window_seconds: 60,
            },
        ],
    ];
    let quota = Some(QuotaLimit {
        limit: 400,
        hard: true,
    });
    let customer = [12; 16];
    let mut random = rand::rngs::StdRng::seed_from_u64(11);
    let mut now = PERIOD.start_ms + 10_000;
    let mut plan = 0;
    for _ in 0..1_500 {
        if random.random_ratio(1, 60) {
            plan = 1 - plan;
        }
        // Mostly busy, now and then a pause past a whole window.
        now += if random.random_ratio(1, 80) {
            random.random_range(0..130_000)
        } else {
            random.random_range(0..120)
        };
        // Now and then a call behind the newest one (another gateway's clock, or a late call):
        // it counts at the newest bucket, in both.
        let at = if random.random_ratio(1, 12) {
            now - random.random_range(0..3_000)
        } else {
            now
        };
        let units = random.random_range(1..=4);
        let policy = Policy {
            rate_limits: &plans[plan],
            quota,
        };
        let shared = redis
            .admit(&customer, &policy, PERIOD, units, at, Rebuild::default())
            .await
            .unwrap();
        let own = local.admit(&customer, &policy, PERIOD, units, at);
        assert_eq!(shape(&shared), shape(&own), "at {at}, {units} units");
    }
}

#[tokio::test]
async fn numbers_past_what_a_lua_number_prints_whole_come_back_exact() {
    let redis = counters().await;
    let limits = [RateLimit {
        requests: 1_000_000_000_000_000,
        window_seconds: 1,
    }];
    let policy = Policy {
        rate_limits: &limits,
        quota: Some(QuotaLimit {
            limit: 1_000_000_000_000_000,
            hard: true,
        }),
    };
    let decision = redis
        .admit(
            &[13; 16],
            &policy,
            PERIOD,
            1,
            PERIOD.start_ms,
            Rebuild::default(),
        )
        .await
        .unwrap();
    assert_eq!(decision.verdict, Verdict::Admitted);
    assert_eq!(decision.windows[0].remaining, 999_999_999_999_999);
    assert_eq!(decision.used, 1);
}

#[tokio::test]
async fn concurrent_requests_from_many_tasks_are_admitted_exactly_up_to_the_limit() {
    let redis = Arc::new(counters().await);
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let redis = Arc::clone(&redis);
            tokio::spawn(async move {
                let limits = [RateLimit {
                    requests: 100,
                    window_seconds: 3600,
                }];
                let policy = Policy {
                    rate_limits: &limits,
                    quota: Some(QuotaLimit {
                        limit: 1_000,
                        hard: true,
                    }),
                };
                redis
                    .admit(
                        &[3; 16],
                        &policy,
                        PERIOD,
                        1,
                        PERIOD.start_ms + 5,
                        Rebuild::default(),
                    )
                    .await
                    .unwrap()
                    .verdict
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap() == Verdict::Admitted);
    }
    assert_eq!(admitted, 100);
}

#[tokio::test]
async fn a_hard_quota_admits_exactly_its_limit_and_a_refund_gives_one_back_once() {
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let redis = counters_under(&prefix).await;
    let policy = Policy {
        rate_limits: &[],
        quota: Some(QuotaLimit {
            limit: 3,
            hard: true,
        }),
    };
    let customer = [4; 16];
    let mut reservations = Vec::new();
    for i in 0..5 {
        let decision = redis
            .admit(
                &customer,
                &policy,
                PERIOD,
                1,
                PERIOD.start_ms + i,
                Rebuild::default(),
            )
            .await
            .unwrap();
        reservations.extend(decision.reservation);
    }
    assert_eq!(reservations.len(), 3);
    // Sent twice (a call that timed out and ran after all, then made again): one unit back.
    let token: u128 = rand::random();
    for _ in 0..2 {
        assert!(
            redis
                .refund(
                    &customer,
                    &reservations[0],
                    token,
                    &[],
                    PERIOD.start_ms,
                    false
                )
                .await
                .is_ok()
        );
    }
    let admit = |at: i64| redis.admit(&customer, &policy, PERIOD, 1, at, Rebuild::default());
    let again = admit(PERIOD.start_ms + 10).await.unwrap();
    assert_eq!(again.verdict, Verdict::Admitted);
    assert_eq!(again.used, 3);
    assert_eq!(
        admit(PERIOD.start_ms + 11).await.unwrap().verdict,
        Verdict::QuotaExceeded
    );
    // The next refund's call deletes the first one's mark, answered: its own stays.
    let mark = |token: u128| format!("g{token:032x}");
    let key = quota_key_of(&prefix, &customer, PERIOD);
    assert_eq!(hget(&key, &mark(token)).await, Some(1));
    let next: u128 = rand::random();
    redis
        .refund(
            &customer,
            &reservations[1],
            next,
            &[token],
            PERIOD.start_ms + 12,
            false,
        )
        .await
        .unwrap();
    assert_eq!(hget(&key, &mark(token)).await, None);
    assert_eq!(hget(&key, &mark(next)).await, Some(1));
    assert_eq!(hget(&key, "u").await, Some(2));
}

/// Units a gateway counted in process that Redis' count may not hold yet (`pending`) count
/// against a hard quota as if they were in it, and are not added to it; a soft quota is not
/// affected.
#[tokio::test]
async fn a_hard_quota_refuses_as_if_the_units_pending_in_process_were_counted() {
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let redis = counters_under(&prefix).await;
    let quota = |hard| Policy {
        rate_limits: &[],
        quota: Some(QuotaLimit { limit: 5, hard }),
    };
    let customer = [8; 16];
    let with_pending = |pending| Rebuild {
        known: Known {
            pending,
            ..Known::default()
        },
        ledger: None,
    };
    let verdict = async |hard, pending, i| {
        let decision = redis
            .admit(
                &customer,
                &quota(hard),
                PERIOD,
                1,
                PERIOD.start_ms + i,
                with_pending(pending),
            )
            .await
            .unwrap();
        (decision.verdict, decision.used)
    };
    for i in 0..3 {
        assert_eq!(verdict(true, 0, i).await, (Verdict::Admitted, i as u64 + 1));
    }
    // 3 in Redis and 2 pending: the quota of 5 is spent.
    assert_eq!(verdict(true, 2, 3).await.0, Verdict::QuotaExceeded);
    assert_eq!(verdict(true, 1, 4).await, (Verdict::Admitted, 4));
    assert_eq!(verdict(false, 9, 5).await.0, Verdict::Admitted);
}

#[tokio::test]
async fn units_counted_in_process_are_added_once_and_only_to_the_count_they_belong_in() {
    use tollgate_gateway::limits::{Counted, Reservation};

    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let redis = counters_under(&prefix).await;
    let connection = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Two windows, so the generation is read past their numbers in the script's reply.
    let policy = Policy {
        rate_limits: &[
            RateLimit {
                requests: 1000,
                window_seconds: 1,
            },
            RateLimit {
                requests: 1000,
                window_seconds: 60,
            },
        ],
        quota: Some(QuotaLimit {
            limit: 100,
            hard: true,
        }),
    };
    let customer = [9; 16];
    let admit = |at: i64| redis.admit(&customer, &policy, PERIOD, 1, at, Rebuild::default());
    // A command of the test's own, straight to Redis.
    let raw = |args: &[&str]| {
        let mut command = redis::cmd(args[0]);
        command.arg(&args[1..]);
        let mut connection = connection.clone();
        async move {
            let () = command.query_async(&mut connection).await.unwrap();
        }
    };
    let quota_key = format!(
        "{prefix}:{{cus_{}}}:q:{}",
        hex::encode(customer),
        PERIOD.start_ms
    );
    let now = PERIOD.start_ms;
    let local = LocalCounters::default();
    let fallback = Reservation {
        period: PERIOD,
        at_ms: PERIOD.start_ms,
        units: 7,
        overage: 0,
        counted: Counted::Fallback,
        fallback: None,
    };
    // The call that creates the quota count and rebuilds it from the ledger (nothing) sees its
    // generation; so does the next one.
    let first = admit(now).await.unwrap();
    let mut second = admit(now + 1).await.unwrap();
    assert!(first.generation.is_some());
    assert_eq!(second.generation, first.generation);
    local.follow(&customer, &mut second, VIA_BACKGROUND);
    local.note_unshared(&customer, &fallback);
    let batch = local.take_unshared(&customer).remove(0);
    let added = Ok(Sharing::Added);
    assert_eq!(
        redis
            .share(&customer, &batch, &[], now + 2)
            .await
            .map(|(sharing, _)| sharing),
        added
    );
    // Sent again (a call that timed out and ran after all): added once.
    assert_eq!(
        redis
            .share(&customer, &batch, &[], now + 3)
            .await
            .map(|(sharing, _)| sharing),
        added
    );
    let next = admit(now + 4).await.unwrap();
    assert_eq!(next.used, 2 + 7 + 1);
    // Redis loses the count; a new one is made and rebuilt from the ledger, which may hold units
    // counted in process before it: a batch of the old generation is not added to it.
    local.note_unshared(&customer, &fallback);
    let stale = local.take_unshared(&customer).remove(0);
    raw(&["DEL", &quota_key]).await;
    assert_eq!(
        redis
            .share(&customer, &stale, &[], now + 5)
            .await
            .map(|(sharing, _)| sharing),
        Ok(Sharing::Refused)
    );
    let rebuilt = admit(now + 6).await.unwrap();
    assert!(rebuilt.generation.is_some());
    assert_ne!(rebuilt.generation, first.generation);
    // A batch begun before the count was made again is refused by it: its events are the
    // ledger's.
    assert_eq!(
        redis
            .share(&customer, &stale, &[], now + 7)
            .await
            .map(|(sharing, _)| sharing),
        Ok(Sharing::Refused)
    );
    assert_eq!(admit(now + 8).await.unwrap().used, 2);
    // A batch of the old count begun after the new one was made: the new one holds none of its
    // units, in either part, so they are added to it (once).
    let after = Reservation {
        at_ms: now + 6,
        ..fallback
    };
    local.note_unshared(&customer, &after);
    let late = local.take_unshared(&customer).remove(0);
    assert_eq!(Some(late.generation), first.generation);
    for at in [now + 8, now + 9] {
        assert_eq!(
            redis
                .share(&customer, &late, &[], at)
                .await
                .map(|(sharing, _)| sharing),
            Ok(Sharing::AddedToLater)
        );
    }
    // A count made before generations existed (no `n`), seeded: units go to it.
    raw(&["HDEL", &quota_key, "n"]).await;
    let mut legacy = admit(now + 9).await.unwrap();
    assert_eq!(legacy.generation, Some(-1));
    local.follow(&customer, &mut legacy, VIA_BACKGROUND);
    local.note_unshared(&customer, &fallback);
    let batch = local.take_unshared(&customer).remove(0);
    assert_eq!(
        redis
            .share(&customer, &batch, &[], now + 10)
            .await
            .map(|(sharing, _)| sharing),
        added
    );
    assert_eq!(admit(now + 11).await.unwrap().used, 3 + 7 + 7 + 1);
    // A process that knows no count of the period (started while Redis was away) batches for
    // an unknown generation: added, once, to a count made before the batch's first unit, and
    // left to the ledger by one made after it.
    let unknowing = LocalCounters::default();
    unknowing.admit(&customer, &policy, PERIOD, 1, now + 12);
    for (at_ms, shared) in [
        (now + 12, Ok(Sharing::AddedToLater)),
        (now + 1, Ok(Sharing::Refused)),
    ] {
        unknowing.note_unshared(&customer, &Reservation { at_ms, ..fallback });
        let batch = unknowing.take_unshared(&customer).remove(0);
        assert_eq!(batch.generation, UNKNOWN_GENERATION);
        for at in [now + 13, now + 14] {
            assert_eq!(
                redis
                    .share(&customer, &batch, &[], at)
                    .await
                    .map(|(sharing, _)| sharing),
                shared
            );
        }
        let taken = (shared == Ok(Sharing::AddedToLater)).then_some(Taken {
            at_ms: now + 14,
            version: 1,
        });
        unknowing.settle_unshared(&customer, &batch, taken);
    }
    assert_eq!(admit(now + 15).await.unwrap().used, 3 + 7 + 7 + 1 + 7 + 1);
}

#[tokio::test]
async fn a_window_hash_never_holds_more_than_one_window_of_buckets() {
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let redis = counters_under(&prefix).await;
    let limits = [RateLimit {
        requests: 1_000_000,
        window_seconds: 1,
    }];
    let policy = Policy {
        rate_limits: &limits,
        quota: None,
    };
    let customer = [20; 16];
    let mut random = rand::rngs::StdRng::seed_from_u64(3);
    let mut now = PERIOD.start_ms;
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}:{{cus_{}}}:r:1000", "14".repeat(16));
    let mut largest = 0;
    for _ in 0..2_000 {
        // Mostly steady traffic, now and then a pause of up to three windows.
        now += if random.random_ratio(1, 50) {
            random.random_range(0..3_000)
        } else {
            random.random_range(0..40)
        };
        redis
            .admit(&customer, &policy, PERIOD, 1, now, Rebuild::default())
            .await
            .unwrap();
        let fields: usize = redis::cmd("HLEN")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        largest = largest.max(fields);
    }
    // 21 buckets and the fields h, t and f at most.
    assert!(largest > 10, "the test did not fill the window: {largest}");
    assert!(largest <= 24, "{largest} fields");
}

#[tokio::test]
async fn keys_live_as_long_as_what_they_count_and_are_extended_only_by_a_new_bucket() {
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let redis = counters_under(&prefix).await;
    let limits = [RateLimit {
        requests: 1_000,
        window_seconds: 1,
    }];
    let policy = Policy {
        rate_limits: &limits,
        quota: Some(QuotaLimit {
            limit: 1_000,
            hard: true,
        }),
    };
    let customer = [21; 16];
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let window = format!("{prefix}:{{cus_{}}}:r:1000", "15".repeat(16));
    let quota = format!("{prefix}:{{cus_{}}}:q:{}", "15".repeat(16), PERIOD.start_ms);
    let reader = connection.clone();
    let pttl = async |key: &str| -> i64 {
        let mut connection = reader.clone();
        redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await
            .unwrap()
    };
    // Buckets of 50 ms: the first write of one sets the lifetime to a window and a bucket.
    let start = PERIOD.start_ms + 1_000;
    redis
        .admit(&customer, &policy, PERIOD, 1, start, Rebuild::default())
        .await
        .unwrap();
    let first = pttl(&window).await;
    assert!((1_000..=1_050).contains(&first), "{first}");
    // The quota key lives until its period ends, and a grace.
    let quota_ttl = pttl(&quota).await;
    assert!(quota_ttl > PERIOD.end_ms - start, "{quota_ttl}");
    // Mark both lifetimes far longer: a write in the same bucket leaves them alone.
    let marked = 4 * quota_ttl;
    for key in [&window, &quota] {
        let _: () = redis::cmd("PEXPIRE")
            .arg(key)
            .arg(marked)
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    redis
        .admit(
            &customer,
            &policy,
            PERIOD,
            1,
            start + 49,
            Rebuild::default(),
        )
        .await
        .unwrap();
    assert!(pttl(&window).await > 3 * quota_ttl);
    assert!(pttl(&quota).await > 3 * quota_ttl);
    // The next bucket's first write sets both again (a billing period may have moved its end).
    let decision = redis
        .admit(
            &customer,
            &policy,
            PERIOD,
            1,
            start + 50,
            Rebuild::default(),
        )
        .await
        .unwrap();
    assert_eq!(decision.used, 3);
    assert_eq!(decision.windows[0].remaining, 997);
    let again = pttl(&window).await;
    assert!((1_000..=1_050).contains(&again), "{again}");
    let quota_again = pttl(&quota).await;
    assert!(quota_again <= quota_ttl, "{quota_again}");
    assert!(quota_again > PERIOD.end_ms - start - 1_000, "{quota_again}");
}

#[test]
fn requests_call_redis_through_a_connection_their_own_runtime_drives() {
    // The background connection, made on a runtime of its own whose workers drive it, as the
    // gateway's background service does.
    let background = tokio::runtime::Runtime::new().unwrap();
    let redis = background.block_on(counters());
    assert!(redis.is_connected());
    assert!(!redis.is_near());
    let requests = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let policy = Policy {
        rate_limits: &[],
        quota: Some(QuotaLimit {
            limit: 10,
            hard: true,
        }),
    };
    let customer = [9; 16];
    let admit = |at: i64| {
        requests.block_on(redis.admit(
            &customer,
            &policy,
            PERIOD,
            1,
            PERIOD.start_ms + at,
            Rebuild::default(),
        ))
    };
    // Until the near connection is made, calls go through the background one.
    assert_eq!(admit(0).unwrap().used, 1);
    requests.block_on(async {
        redis.connect_near(PERIOD.start_ms);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !redis.is_near() {
            assert!(std::time::Instant::now() < deadline, "no near connection");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // With the background runtime gone its connection has no driver, so calls answered now
    // went through the connection the requests' runtime drives.
    background.shutdown_background();
    for at in 1..5 {
        assert_eq!(admit(at).unwrap().used, 1 + at as u64);
    }
    // When that runtime ends too, the next one to call makes its own.
    drop(requests);
    assert!(!redis.is_near());
    // An attempt whose runtime ends before its task first runs is not left in the way.
    let doomed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    doomed.block_on(async { redis.connect_near(PERIOD.start_ms + 5) });
    drop(doomed);
    assert!(!redis.is_near());
    let later = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    later.block_on(async {
        redis.connect_near(PERIOD.start_ms + 5);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !redis.is_near() {
            assert!(std::time::Instant::now() < deadline, "no near connection");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let decision = redis
            .admit(
                &customer,
                &policy,
                PERIOD,
                1,
                PERIOD.start_ms + 5,
                Rebuild::default(),
            )
            .await
            .unwrap();
        assert_eq!(decision.used, 6);
    });
}

#[tokio::test]
async fn a_plan_without_limits_counts_in_batches_that_reach_redis_once_and_keep_the_count() {
    use tollgate_gateway::limits::clock::ManualClock;
    use tollgate_gateway::limits::metrics::LimitMetrics;
    use tollgate_gateway::limits::{Counted, Limiter};
    use tollgate_model::plan::{Plan, PlanStatus, Quota};

    let plan = |quota: Option<Quota>| Plan {
        id: "plan_test".into(),
        name: "test".into(),
        rate_limits: Vec::new(),
        quota,
        price: None,
        upgrade_url: None,
        status: PlanStatus::Active,
        created_at: String::new(),
        updated_at: String::new(),
    };
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let metrics = Metrics::new();
    // 2026-11-26T00:00:00Z: the quota counts in November (no billing period).
    let clock = Arc::new(ManualClock::at(1_795_651_200_000));
    let limiter = Limiter::shared(
        clock.clone(),
        LimitMetrics::new(&metrics).unwrap(),
        counters_under(&prefix).await,
    );
    let customer = [11; 16];
    let month = tollgate_model::period::calendar_month(limiter.now_ms());
    let quota_key = format!(
        "{prefix}:{{cus_{}}}:q:{}",
        hex::encode(customer),
        month.start_ms
    );
    let connection = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let used_in_redis = || {
        let mut connection = connection.clone();
        let command = redis::cmd("HGET").arg(&quota_key).arg("u").clone();
        async move {
            command
                .query_async::<Option<u64>>(&mut connection)
                .await
                .unwrap()
                .unwrap_or(0)
        }
    };
    let fields_in_redis = || {
        let mut connection = connection.clone();
        let command = redis::cmd("HLEN").arg(&quota_key).clone();
        async move { command.query_async::<u64>(&mut connection).await.unwrap() }
    };
    let unlimited = plan(None);

    // The first request asks Redis, which makes the count and says its generation.
    let first = limiter.admit(&customer, &unlimited, None, 1).await;
    assert_eq!(first.counted, Counted::Redis);
    // The next ones are counted here, into one batch, without a call.
    let mut last = None;
    for _ in 0..9 {
        let decision = limiter.admit(&customer, &unlimited, None, 1).await;
        assert_eq!(decision.counted, Counted::Batched);
        last = decision.reservation;
    }
    assert_eq!(used_in_redis().await, 1);
    // A unit refunded before its batch is sent leaves the batch: Redis is not touched.
    limiter.refund(&customer, &last.unwrap()).await;
    assert_eq!(used_in_redis().await, 1);
    limiter.share_pending().await;
    assert_eq!(used_in_redis().await, 1 + 9 - 1);
    // Sent once: another pass has nothing to add.
    limiter.share_pending().await;
    assert_eq!(used_in_redis().await, 9);
    // A refund after its batch was added is given back in Redis.
    let sent = limiter.admit(&customer, &unlimited, None, 1).await;
    limiter.share_pending().await;
    assert_eq!(used_in_redis().await, 10);
    limiter.refund(&customer, &sent.reservation.unwrap()).await;
    assert_eq!(used_in_redis().await, 9);

    // Three more in a batch not yet sent; then the plan changes to a quota of 13. Its first
    // request adds this gateway's batch before Redis decides it: the count goes on exactly.
    for _ in 0..3 {
        let decision = limiter.admit(&customer, &unlimited, None, 1).await;
        assert_eq!(decision.counted, Counted::Batched);
    }
    let capped = plan(Some(Quota {
        requests: 13,
        hard: true,
    }));
    let at_limit = limiter.admit(&customer, &capped, None, 1).await;
    assert_eq!(at_limit.counted, Counted::Redis);
    assert_eq!(at_limit.verdict, Verdict::Admitted);
    assert_eq!(at_limit.used, 13);
    let over = limiter.admit(&customer, &capped, None, 1).await;
    assert_eq!(over.verdict, Verdict::QuotaExceeded);
    assert_eq!(used_in_redis().await, 13);
    // Three batches were added; each call deleted the mark the one before had left, so the
    // count holds its eight fields, its version (`v`), and the last mark.
    assert_eq!(fields_in_redis().await, 10);

    // Back without limits. Redis then loses the count: the batch counted for the old one is not
    // added to the new one, and the next request asks Redis again rather than batching for a
    // count that is gone. The count Redis makes again goes on from this gateway's own (13 and
    // the refused batch's unit; this test has no ledger to read).
    let batched = limiter.admit(&customer, &unlimited, None, 1).await;
    assert_eq!(batched.counted, Counted::Batched);
    let () = redis::cmd("DEL")
        .arg(&quota_key)
        .query_async(&mut connection.clone())
        .await
        .unwrap();
    limiter.share_pending().await;
    assert_eq!(used_in_redis().await, 0);
    let asked = limiter.admit(&customer, &unlimited, None, 1).await;
    assert_eq!(asked.counted, Counted::Redis);
    assert_eq!(asked.used, 15);
    assert_eq!(used_in_redis().await, 15);
    let batched = limiter.admit(&customer, &unlimited, None, 1).await;
    assert_eq!(batched.counted, Counted::Batched);
    limiter.share_pending().await;
    assert_eq!(used_in_redis().await, 16);

    // A batch counted just before the month ends reaches November's count in December.
    let batched = limiter.admit(&customer, &unlimited, None, 1).await;
    assert_eq!(batched.counted, Counted::Batched);
    clock.set(month.end_ms + 1);
    limiter.share_pending().await;
    assert_eq!(used_in_redis().await, 17);
}

#[tokio::test]
async fn a_count_redis_makes_again_takes_the_ledgers_earlier_events_once_and_what_it_counted_since()
{
    use tollgate_gateway::limits::Reservation;
    use tollgate_gateway::metering::ledger::Ledger;

    let (_dir, ledger) = sqlite_ledger().await;
    let customer = [21; 16];
    let mut stored = 0u8;
    let mut store_events = async |at: &[i64]| {
        let events: Vec<_> = at
            .iter()
            .map(|&at_ms| {
                stored += 1;
                usage_event(&customer, stored, at_ms)
            })
            .collect();
        ledger.record(&events).await.unwrap();
    };
    let policy = HARD_QUOTA;
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let redis = counters_under(&prefix).await;
    let quota_key = quota_key_of(&prefix, &customer, PERIOD);
    let hget = |field: &'static str| hget(&quota_key, field);
    // A refund of its own (a new mark) at `at_ms`.
    let refund = async |reservation: Reservation, at_ms: i64, late: bool| {
        redis
            .refund(&customer, &reservation, rand::random(), &[], at_ms, late)
            .await
    };
    let rebuild = |known: Known| Rebuild {
        known,
        ledger: Some(&ledger),
    };

    // Ten events in the ledger from the period's first hour.
    let start = PERIOD.start_ms;
    store_events(&(0..10).map(|i| start + 1_000 + i).collect::<Vec<_>>()).await;
    // An hour in, the key is made (Redis lost it, say): seeded with the ten.
    let made = start + 3_600_000;
    let first = redis
        .admit(
            &customer,
            &policy,
            PERIOD,
            1,
            made,
            rebuild(Known::default()),
        )
        .await
        .unwrap();
    assert_eq!(first.used, 11);
    // A late call, decided before the key was made: in the count, but its event is one the
    // ledger's events before `made` will hold.
    let late = redis
        .admit(
            &customer,
            &policy,
            PERIOD,
            1,
            made - 50,
            rebuild(Known::default()),
        )
        .await
        .unwrap();
    assert_eq!(late.used, 12);
    // Of the count, the part from before the key: the ten, and the late call.
    assert_eq!(hget("p").await, Some(11));
    // A gateway that never knew a seeded count of this period tells what it counted (the
    // count's own numbers, maybe): nothing is raised. One that knew another generation (lost
    // with Redis' data) raises the count to its own.
    let unknown = Known {
        used: 500,
        overage: 0,
        generation: None,
        pending: 0,
    };
    let same = redis
        .admit(&customer, &policy, PERIOD, 1, made + 1, rebuild(unknown))
        .await
        .unwrap();
    assert_eq!(same.used, 13);
    refund(same.reservation.unwrap(), made + 2, false)
        .await
        .unwrap();
    assert_eq!(hget("u").await, Some(12));
    assert_eq!(hget("p").await, Some(11));

    // The spools reach the ledger: three more events from before `made`, the late call's, and
    // the first call's (at `made`, so not among them).
    store_events(&[start + 2_000, start + 2_001, start + 2_002, made - 50, made]).await;
    // A pass before the second read is due does nothing; when due, the count takes the
    // ledger's 14 events before `made` and the one it counted since: 15, each once.
    redis.reseed_due(&ledger, made + 2_999).await;
    assert_eq!(hget("u").await, Some(12));
    redis.reseed_due(&ledger, made + 3_000).await;
    assert_eq!(hget("u").await, Some(15));
    redis.reseed_due(&ledger, made + 10_000).await;
    assert_eq!(hget("u").await, Some(15));
    assert_eq!(hget("p").await, Some(14));
    // A refund made late (Redis failed when it was due) of a unit counted before the count
    // was made again is not made: the ledger's part holds the refund already.
    refund(late.reservation.unwrap(), made + 10_001, true)
        .await
        .unwrap();
    assert_eq!((hget("u").await, hget("p").await), (Some(15), Some(14)));
    // Refunds: the late call's unit leaves the count and its part from before; the first
    // call's only the count.
    refund(late.reservation.unwrap(), made + 10_001, false)
        .await
        .unwrap();
    refund(first.reservation.unwrap(), made + 10_002, false)
        .await
        .unwrap();
    assert_eq!((hget("u").await, hget("p").await), (Some(13), Some(13)));

    let lost = Known {
        used: 40,
        overage: 0,
        generation: Some(first.generation.unwrap() + 1),
        pending: 0,
    };
    let raised = redis
        .admit(&customer, &policy, PERIOD, 1, made + 10_003, rebuild(lost))
        .await
        .unwrap();
    assert_eq!(raised.used, 41);
    assert_eq!(hget("p").await, Some(40));
}

/// A plan of a hard quota of 1,000 and no windows.
const HARD_QUOTA: Policy<'static> = Policy {
    rate_limits: &[],
    quota: Some(QuotaLimit {
        limit: 1_000,
        hard: true,
    }),
};

/// The quota key of `customer` in `period` under `prefix`.
fn quota_key_of(prefix: &str, customer: &[u8; 16], period: Period) -> String {
    format!(
        "{prefix}:{{cus_{}}}:q:{}",
        hex::encode(customer),
        period.start_ms
    )
}

/// Ten events of `customer` in the ledger, from the first milliseconds of [`PERIOD`].
async fn record_ten_events(
    ledger: &tollgate_gateway::metering::ledger::StoreLedger,
    customer: &[u8; 16],
) {
    use tollgate_gateway::metering::ledger::Ledger;
    let events: Vec<_> = (1..=10)
        .map(|n| usage_event(customer, n, PERIOD.start_ms + i64::from(n)))
        .collect();
    ledger.record(&events).await.unwrap();
}

/// A ledger in a SQLite store of its own.
async fn sqlite_ledger() -> (
    tempfile::TempDir,
    tollgate_gateway::metering::ledger::StoreLedger,
) {
    let dir = tempfile::tempdir().unwrap();
    let store = tollgate_control_plane::store::Store::connect(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("ledger.db").display()
    ))
    .await
    .unwrap();
    store.migrate().await.unwrap();
    (dir, tollgate_gateway::metering::ledger::StoreLedger(store))
}

/// The `n`th usage event of `customer`: one unit at `at_ms`.
fn usage_event(customer: &[u8; 16], n: u8, at_ms: i64) -> tollgate_model::usage::UsageEvent {
    tollgate_model::usage::UsageEvent {
        id: format!("evt_{}", hex::encode([n; 16])),
        request_id: format!("req-{n}"),
        customer_id: format!("cus_{}", hex::encode(customer)),
        key_id: None,
        route: "api".into(),
        method: "GET".into(),
        status: 200,
        latency_us: 1,
        bytes_in: 0,
        bytes_out: 0,
        at_ms,
        units: 1,
        overage: 0,
    }
}

/// A field of a hash, as a number.
async fn hget(key: &str, field: &str) -> Option<i64> {
    let mut connection = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async::<Option<i64>>(&mut connection)
        .await
        .unwrap()
}

/// A count Redis made again whose reading of the ledger fails (the control plane unreachable)
/// is marked so: calls on every gateway count in it at once instead of waiting, none is counted
/// elsewhere or lost, and a later call takes the claim and raises it from the ledger.
#[tokio::test]
async fn a_rebuild_whose_ledger_cannot_be_read_keeps_no_call_waiting_and_loses_no_unit() {
    use tollgate_gateway::limits::redis::{Known, SEED_AGAIN_AFTER_FAILURE};
    use tollgate_gateway::metering::ledger::HttpLedger;

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable =
        HttpLedger::new(&format!("http://{}", closed.local_addr().unwrap()), "token").unwrap();
    drop(closed);
    let (_dir, ledger) = sqlite_ledger().await;
    let customer = [22; 16];
    let policy = HARD_QUOTA;
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let (first, second) = (counters_under(&prefix).await, counters_under(&prefix).await);
    let quota_key = quota_key_of(&prefix, &customer, PERIOD);
    let made = PERIOD.start_ms + 3_600_000;
    let cannot_read = Rebuild {
        known: Known::default(),
        ledger: Some(&unreachable),
    };
    let made_again = first
        .admit(&customer, &policy, PERIOD, 1, made, cannot_read)
        .await
        .unwrap();
    assert_eq!((made_again.used, made_again.generation), (1, None));
    assert_eq!(hget(&quota_key, "f").await, Some(1));
    assert_eq!(hget(&quota_key, "s").await, Some(0));
    // The other gateway's calls count in the key at once: a wait would be its claim's 2 s.
    let started = std::time::Instant::now();
    for i in 0..5 {
        let decision = second
            .admit(&customer, &policy, PERIOD, 1, made + 1 + i, cannot_read)
            .await
            .unwrap();
        assert_eq!(decision.verdict, Verdict::Admitted);
        assert_eq!(decision.used, 2 + u64::try_from(i).unwrap());
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(hget(&quota_key, "u").await, Some(6));
    // The ledger comes back holding ten events from before the key was made. Until the
    // failed claim's retry is due, calls go on counting on the key; then one reads the ledger.
    record_ten_events(&ledger, &customer).await;
    let readable = Rebuild {
        known: Known::default(),
        ledger: Some(&ledger),
    };
    let retry_ms = i64::try_from(SEED_AGAIN_AFTER_FAILURE.as_millis()).unwrap();
    let before = second
        .admit(&customer, &policy, PERIOD, 1, made + retry_ms - 1, readable)
        .await
        .unwrap();
    assert_eq!((before.used, before.generation), (7, None));
    let seeded = second
        .admit(&customer, &policy, PERIOD, 1, made + retry_ms + 1, readable)
        .await
        .unwrap();
    assert_eq!(seeded.used, 18);
    assert!(seeded.generation.is_some());
    assert_eq!(hget(&quota_key, "s").await, Some(1));
    assert_eq!(hget(&quota_key, "u").await, Some(18));
}

/// A claim to rebuild a count that its caller does not honour (its gateway died before reading
/// the ledger) passes, once it ends, to a call that waited for it; a claim made by a clock far
/// ahead is waited for no longer than a call's longest wait, after which calls count on what
/// the key holds.
#[tokio::test]
async fn a_claim_left_unhonoured_passes_to_a_waiting_call_which_rebuilds_the_count() {
    use tollgate_gateway::limits::redis::{Known, SEED_CLAIM};

    let (_dir, ledger) = sqlite_ledger().await;
    let customer = [23; 16];
    record_ten_events(&ledger, &customer).await;
    let policy = HARD_QUOTA;
    let prefix = format!("tollgate-test-{}", rand::random::<u64>());
    let redis = counters_under(&prefix).await;
    let quota_key = quota_key_of(&prefix, &customer, PERIOD);
    let made = PERIOD.start_ms + 3_600_000;
    let mut connection = redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Made and claimed by a gateway that died then.
    let _: () = redis::cmd("HSET")
        .arg(&quota_key)
        .arg(&["u", "0", "o", "0", "p", "0", "q", "0", "s", "0", "n", "77"])
        .arg(&[
            "c",
            made.to_string().as_str(),
            "a",
            made.to_string().as_str(),
        ])
        .query_async(&mut connection)
        .await
        .unwrap();
    let readable = Rebuild {
        known: Known::default(),
        ledger: Some(&ledger),
    };
    let started = std::time::Instant::now();
    let decision = redis
        .admit(&customer, &policy, PERIOD, 1, made + 1, readable)
        .await
        .unwrap();
    assert!(started.elapsed() >= SEED_CLAIM, "{:?}", started.elapsed());
    assert_eq!((decision.used, decision.generation), (11, Some(77)));
    assert_eq!(hget(&quota_key, "s").await, Some(1));

    // A claim whose clock is a minute ahead: the call waits its longest, then counts on what
    // the key holds, unseeded.
    let ahead = format!(
        "{prefix}:{{cus_{}}}:q:{}",
        hex::encode(customer),
        PERIOD.end_ms
    );
    let next = Period {
        start_ms: PERIOD.end_ms,
        end_ms: PERIOD.end_ms + 86_400_000,
    };
    let at = next.start_ms + 1_000;
    let _: () = redis::cmd("HSET")
        .arg(&ahead)
        .arg(&["u", "4", "o", "0", "p", "0", "q", "0", "s", "0", "n", "78"])
        .arg(&[
            "c",
            (at + 60_000).to_string().as_str(),
            "a",
            at.to_string().as_str(),
        ])
        .query_async(&mut connection)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let decision = redis
        .admit(&customer, &policy, next, 1, at, readable)
        .await
        .unwrap();
    assert!(started.elapsed() >= SEED_CLAIM, "{:?}", started.elapsed());
    assert_eq!((decision.used, decision.generation), (5, None));
    assert_eq!(hget(&ahead, "s").await, Some(0));
}

/// A customer counted in another period overlapping this one (a billing period set, then taken
/// away) returns to a count made again: from what the stale one held, raised by the ledger's
/// count, never reset (here the ledger cannot be read: the stale count is the floor), and not
/// again for a period that follows another, as at a month's end.
#[tokio::test]
async fn a_period_returned_to_is_counted_again_from_its_stale_count_at_least() {
    let redis = counters().await;
    let customer = [31; 16];
    let policy = HARD_QUOTA;
    let day = 86_400_000;
    let billing = Period {
        start_ms: PERIOD.start_ms + 3 * day,
        end_ms: PERIOD.start_ms + 6 * day,
    };
    let admit = |period: Period, at: i64| {
        redis.admit(&customer, &policy, period, 1, at, Rebuild::default())
    };
    let month = PERIOD.start_ms + 4 * day;
    for i in 0..3 {
        admit(PERIOD, month + i).await.unwrap();
    }
    let first = admit(PERIOD, month + 3).await.unwrap();
    assert_eq!(first.used, 4);
    assert_eq!(admit(billing, month + 10).await.unwrap().used, 1);
    // Back to the month: a new count (another generation), from the 4 the stale one held.
    let back = admit(PERIOD, month + 20).await.unwrap();
    assert_eq!(back.used, 5);
    assert_ne!(back.counted_in, first.counted_in);
    // The next period follows the month: nothing made again.
    let next = Period {
        start_ms: PERIOD.end_ms,
        end_ms: PERIOD.end_ms + 30 * day,
    };
    assert_eq!(admit(next, PERIOD.end_ms).await.unwrap().used, 1);
    let late = admit(PERIOD, PERIOD.end_ms - 1).await.unwrap();
    assert_eq!((late.used, late.counted_in), (6, back.counted_in));
}

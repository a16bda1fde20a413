//! The usage ledger in the store, on SQLite and on the real Postgres: each event counted once
//! however batches are replayed, overlap or race; the daily roll-up per UTC day and route; a
//! period's sums with its start included and its end excluded; pruning that keeps the roll-up.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;
#[macro_use]
mod support;

use std::time::Duration;

use sqlx::Row;
use support::Db;
use tollgate_control_plane::store::now_ms;
use tollgate_control_plane::store::usage::DailyUsage;
use tollgate_model::usage::{PeriodUsage, UsageEvent, UsageStored};

/// 2026-11-30T23:59:59.999Z, the last millisecond of November.
const LAST_OF_NOVEMBER: i64 = 1_796_083_199_999;
/// 2026-12-01T00:00:00.000Z.
const FIRST_OF_DECEMBER: i64 = 1_796_083_200_000;

fn customer(n: u64) -> String {
    format!("cus_{n:032x}")
}

/// Event `n`: one unit, 10 bytes in, 100 out, 1000 + n µs, status 200.
fn event(n: u64, customer_id: &str, route: &str, at_ms: i64) -> UsageEvent {
    UsageEvent {
        id: format!("evt_{n:032x}"),
        request_id: format!("req-{n}"),
        customer_id: customer_id.to_owned(),
        key_id: Some(format!("key_{n:032x}")),
        route: route.to_owned(),
        method: "GET".into(),
        status: 200,
        latency_us: 1000 + n,
        bytes_in: 10,
        bytes_out: 100,
        at_ms,
        units: 1,
        overage: 0,
    }
}

/// Rows in `usage_events`.
async fn stored_events(db: &Db) -> i64 {
    let sql = db.sql().await;
    let n = sqlx::query("SELECT COUNT(*) AS n FROM usage_events")
        .fetch_one(&sql)
        .await
        .unwrap()
        .try_get("n")
        .unwrap();
    sql.close().await;
    n
}

/// Units of `customer_id`'s events still in `usage_events` with `start_ms <= at_ms < end_ms`
/// (what pruning leaves; a period's sum also counts the roll-up of pruned days).
async fn raw_units(db: &Db, customer_id: &str, start_ms: i64, end_ms: i64) -> i64 {
    let sql = db.sql().await;
    let units = sqlx::query(
        "SELECT CAST(COALESCE(SUM(units), 0) AS BIGINT) AS units FROM usage_events \
         WHERE customer_id = $1 AND at_ms >= $2 AND at_ms < $3",
    )
    .bind(customer_id)
    .bind(start_ms)
    .bind(end_ms)
    .fetch_one(&sql)
    .await
    .unwrap()
    .try_get("units")
    .unwrap();
    sql.close().await;
    units
}

fn stored(inserted: u64, duplicates: u64) -> UsageStored {
    UsageStored {
        inserted,
        duplicates,
    }
}

async fn a_batch_is_stored_once_however_often_it_is_sent(db: &Db) {
    let store = &db.store;
    let alice = customer(1);
    let at = FIRST_OF_DECEMBER + 1000;
    let first: Vec<UsageEvent> = (1..=3).map(|n| event(n, &alice, "orders", at)).collect();
    assert_eq!(store.record_usage(&first).await.unwrap(), stored(3, 0));
    assert_eq!(store.record_usage(&first).await.unwrap(), stored(0, 3));
    // Overlapping: 2 and 3 are stored already, 4 and 5 are new; 5 is also repeated.
    let overlapping: Vec<UsageEvent> = [2, 3, 4, 5, 5]
        .iter()
        .map(|&n| event(n, &alice, "orders", at))
        .collect();
    assert_eq!(
        store.record_usage(&overlapping).await.unwrap(),
        stored(2, 3)
    );
    // A replay with different content is still the same event: nothing changes.
    let mut altered = event(1, &alice, "orders", at);
    altered.units = 1000;
    assert_eq!(store.record_usage(&[altered]).await.unwrap(), stored(0, 1));

    assert_eq!(stored_events(db).await, 5);
    assert_eq!(
        store.period_usage(&alice, at, at + 1).await.unwrap(),
        PeriodUsage {
            start_ms: at,
            end_ms: at + 1,
            units: 5,
            overage: 0
        }
    );
    let days = store
        .daily_usage(&alice, "2026-12-01", "2026-12-01")
        .await
        .unwrap();
    assert_eq!(
        days,
        vec![DailyUsage {
            day: "2026-12-01".into(),
            route: "orders".into(),
            requests: 5,
            units: 5,
            overage: 0,
            errors: 0,
            bytes_in: 50,
            bytes_out: 500,
        }]
    );
    let sql = db.sql().await;
    let latency: i64 = sqlx::query("SELECT latency_us_sum FROM usage_daily")
        .fetch_one(&sql)
        .await
        .unwrap()
        .try_get("latency_us_sum")
        .unwrap();
    assert_eq!(latency, 1001 + 1002 + 1003 + 1004 + 1005);
    sql.close().await;
}

async fn the_rollup_sums_each_utc_day_and_route(db: &Db) {
    let store = &db.store;
    let (alice, bob) = (customer(1), customer(2));
    let mut events = Vec::new();
    // Alice, last millisecond of November: two calls to orders (one a 500), one to users.
    let mut failed = event(1, &alice, "orders", LAST_OF_NOVEMBER);
    (failed.status, failed.units, failed.bytes_out) = (500, 0, 0);
    events.push(failed);
    events.push(event(2, &alice, "orders", LAST_OF_NOVEMBER - 5000));
    events.push(event(3, &alice, "users", LAST_OF_NOVEMBER));
    // Alice, first millisecond of December: orders, one 503 and one soft-quota overage of 3
    // units out of 4, and a 499 that is not an error.
    let mut unavailable = event(4, &alice, "orders", FIRST_OF_DECEMBER);
    (unavailable.status, unavailable.units) = (503, 0);
    events.push(unavailable);
    let mut heavy = event(5, &alice, "orders", FIRST_OF_DECEMBER + 1);
    (heavy.units, heavy.overage, heavy.bytes_in) = (4, 3, 1_000_000);
    events.push(heavy);
    let mut gone = event(6, &alice, "orders", FIRST_OF_DECEMBER + 2);
    gone.status = 499;
    events.push(gone);
    // Bob, same day: never in Alice's rows.
    events.push(event(7, &bob, "orders", FIRST_OF_DECEMBER));
    events.reverse();
    assert_eq!(store.record_usage(&events).await.unwrap(), stored(7, 0));

    let row = |day: &str, route: &str, counts: [u64; 6]| DailyUsage {
        day: day.into(),
        route: route.into(),
        requests: counts[0],
        units: counts[1],
        overage: counts[2],
        errors: counts[3],
        bytes_in: counts[4],
        bytes_out: counts[5],
    };
    assert_eq!(
        store
            .daily_usage(&alice, "2026-11-01", "2026-12-31")
            .await
            .unwrap(),
        vec![
            row("2026-11-30", "orders", [2, 1, 0, 1, 20, 100]),
            row("2026-11-30", "users", [1, 1, 0, 0, 10, 100]),
            row("2026-12-01", "orders", [3, 5, 3, 1, 1_000_020, 300]),
        ]
    );
    // Both ends of the day range are included.
    assert_eq!(
        store
            .daily_usage(&alice, "2026-12-01", "2026-12-01")
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        store
            .daily_usage(&bob, "2026-11-30", "2026-12-01")
            .await
            .unwrap(),
        vec![row("2026-12-01", "orders", [1, 1, 0, 0, 10, 100])]
    );
    // A later batch adds to the same rows.
    let later = event(8, &alice, "users", LAST_OF_NOVEMBER - 1);
    assert_eq!(store.record_usage(&[later]).await.unwrap(), stored(1, 0));
    assert_eq!(
        store
            .daily_usage(&alice, "2026-11-30", "2026-11-30")
            .await
            .unwrap()[1],
        row("2026-11-30", "users", [2, 2, 0, 0, 20, 200])
    );
}

async fn a_period_counts_events_from_its_start_to_before_its_end(db: &Db) {
    let store = &db.store;
    let alice = customer(1);
    let (start, end) = (FIRST_OF_DECEMBER, FIRST_OF_DECEMBER + 31 * 86_400_000);
    let mut events = Vec::new();
    for (n, at, units, overage) in [
        (1, start - 1, 1, 0),
        (2, start, 2, 0),
        (3, start + 86_400_000, 4, 1),
        (4, end - 1, 8, 8),
        (5, end, 16, 0),
    ] {
        let mut e = event(n, &alice, "orders", at);
        (e.units, e.overage) = (units, overage);
        events.push(e);
    }
    events.push(event(6, &customer(2), "orders", start));
    store.record_usage(&events).await.unwrap();
    let period = |start_ms, end_ms, units, overage| PeriodUsage {
        start_ms,
        end_ms,
        units,
        overage,
    };
    assert_eq!(
        store.period_usage(&alice, start, end).await.unwrap(),
        period(start, end, 2 + 4 + 8, 1 + 8)
    );
    assert_eq!(
        store.period_usage(&alice, start - 1, start).await.unwrap(),
        period(start - 1, start, 1, 0)
    );
    assert_eq!(
        store.period_usage(&alice, end, end + 1).await.unwrap(),
        period(end, end + 1, 16, 0)
    );
    assert_eq!(
        store.period_usage(&customer(3), start, end).await.unwrap(),
        period(start, end, 0, 0),
        "nothing stored: zeros"
    );
}

/// A period that starts and ends mid-day (a billing period of 14:37:12.345 UTC): its whole days
/// are read from the roll-up, the parts of days at either end from the events. Events of a whole
/// day taken out of `usage_events` (as pruning would, were they old) still count.
async fn a_period_sums_its_whole_days_from_the_rollup_and_its_ends_from_events(db: &Db) {
    const DAY: i64 = 86_400_000;
    let store = &db.store;
    let alice = customer(1);
    let start = FIRST_OF_DECEMBER + 14 * 3_600_000 + 37 * 60_000 + 12_345;
    let end = start + 3 * DAY;
    let mut events = Vec::new();
    for (n, at, units, overage) in [
        (1, start - 1, 1, 0),
        (2, start, 2, 0),
        (3, FIRST_OF_DECEMBER + DAY - 1, 4, 0),
        (4, FIRST_OF_DECEMBER + DAY, 8, 1),
        (5, FIRST_OF_DECEMBER + 2 * DAY + 5, 16, 0),
        (6, FIRST_OF_DECEMBER + 3 * DAY, 32, 2),
        (7, end - 1, 64, 0),
        (8, end, 128, 0),
    ] {
        let mut e = event(n, &alice, if n % 2 == 0 { "orders" } else { "users" }, at);
        (e.units, e.overage) = (units, overage);
        events.push(e);
    }
    events.push(event(9, &customer(2), "orders", start + DAY));
    store.record_usage(&events).await.unwrap();
    let expected = PeriodUsage {
        start_ms: start,
        end_ms: end,
        units: 2 + 4 + 8 + 16 + 32 + 64,
        overage: 1 + 2,
    };
    assert_eq!(
        store.period_usage(&alice, start, end).await.unwrap(),
        expected
    );
    // The whole days (December 2 and 3) no longer have their events: the roll-up still counts
    // them; the ends still count theirs.
    let sql = db.sql().await;
    sqlx::query("DELETE FROM usage_events WHERE at_ms >= $1 AND at_ms < $2")
        .bind(FIRST_OF_DECEMBER + DAY)
        .bind(FIRST_OF_DECEMBER + 3 * DAY)
        .execute(&sql)
        .await
        .unwrap();
    sql.close().await;
    assert_eq!(
        store.period_usage(&alice, start, end).await.unwrap(),
        expected
    );
    // Within one day, or across a single midnight: events only.
    assert_eq!(
        store
            .period_usage(&alice, start, FIRST_OF_DECEMBER + DAY)
            .await
            .unwrap()
            .units,
        2 + 4
    );
    assert_eq!(
        store
            .period_usage(&alice, start - 1, start + 1)
            .await
            .unwrap()
            .units,
        1 + 2
    );
    // From the epoch to the end of time: every event, the roll-up's days bounded to year 9999.
    assert_eq!(
        store.period_usage(&alice, 0, i64::MAX).await.unwrap().units,
        1 + 2 + 4 + 8 + 16 + 32 + 64 + 128
    );
}

async fn pruning_deletes_old_events_and_keeps_the_rollup(db: &Db) {
    let store = &db.store;
    let alice = customer(1);
    let events: Vec<UsageEvent> = (0..25)
        .map(|n| event(n, &alice, "orders", FIRST_OF_DECEMBER - 10 + n as i64))
        .collect();
    store.record_usage(&events).await.unwrap();
    let rollup = store
        .daily_usage(&alice, "2026-11-30", "2026-12-01")
        .await
        .unwrap();
    // The 10 events of November go, the 15 of December stay.
    assert_eq!(store.prune_usage(FIRST_OF_DECEMBER).await.unwrap(), 10);
    assert_eq!(store.prune_usage(FIRST_OF_DECEMBER).await.unwrap(), 0);
    assert_eq!(raw_units(db, &alice, 0, i64::MAX).await, 15);
    // A period's sum still counts the pruned day, from the roll-up.
    let all = store.period_usage(&alice, 0, i64::MAX).await.unwrap();
    assert_eq!(all.units, 25);
    assert_eq!(
        store
            .daily_usage(&alice, "2026-11-30", "2026-12-01")
            .await
            .unwrap(),
        rollup,
        "the roll-up stays"
    );
    assert_eq!(
        (rollup[0].requests, rollup[1].requests),
        (10, 15),
        "{rollup:?}"
    );
    // A pruned event replayed later is stored again (the ledger cannot tell it from a new one):
    // this is why the retention is longer than any replay window.
    assert_eq!(
        store.record_usage(&events[..1]).await.unwrap(),
        stored(1, 0)
    );
}

/// A billing period longer than the retention (a yearly plan): pruning stops at the start of
/// the earliest current period, so that period's sum stays whole. A period that ended without a
/// new one continues in periods of its length and holds nothing back.
async fn pruning_keeps_every_event_of_a_current_billing_period(db: &Db) {
    const DAY: i64 = 86_400_000;
    let store = &db.store;
    let now = FIRST_OF_DECEMBER;
    let retention = 62 * DAY;
    assert_eq!(
        store.prune_cutoff(retention, now).await.unwrap(),
        now - retention,
        "no billing period: the retention decides"
    );
    let sql = db.sql().await;
    sqlx::query(
        "INSERT INTO plans (id, name, rate_limits, status, created_at, updated_at) \
         VALUES ('plan_yearly', 'yearly', '[]', 'active', 0, 0)",
    )
    .execute(&sql)
    .await
    .unwrap();
    let yearly_start = now - 200 * DAY;
    let yearly_end = yearly_start + 365 * DAY;
    for (id, start, end) in [
        ("cus_yearly", yearly_start, yearly_end),
        ("cus_lapsed", now - 400 * DAY, now - 370 * DAY),
    ] {
        sqlx::query(
            "INSERT INTO customers (id, name, email, plan_id, status, period_start, period_end, \
             created_at, updated_at) VALUES ($1, $2, $3, 'plan_yearly', 'active', $4, $5, 0, 0)",
        )
        .bind(id)
        .bind(id)
        .bind(format!("{id}@example.test"))
        .bind(start)
        .bind(end)
        .execute(&sql)
        .await
        .unwrap();
    }
    sql.close().await;
    let cutoff = store.prune_cutoff(retention, now).await.unwrap();
    assert_eq!(cutoff, yearly_start);
    // Events 150 days old, inside the yearly period and past the retention: they stay.
    let events: Vec<UsageEvent> = (0..4)
        .map(|n| event(n, "cus_yearly", "orders", now - 150 * DAY + n as i64))
        .collect();
    store.record_usage(&events).await.unwrap();
    assert_eq!(store.prune_usage(cutoff).await.unwrap(), 0);
    let period = store
        .period_usage("cus_yearly", yearly_start, yearly_end)
        .await
        .unwrap();
    assert_eq!(period.units, 4);
    // Once that period is over (and a year has passed), they go.
    let later = yearly_end + 100 * DAY;
    let cutoff = store.prune_cutoff(retention, later).await.unwrap();
    assert!(cutoff > now - 150 * DAY, "{cutoff}");
    assert_eq!(store.prune_usage(cutoff).await.unwrap(), 4);
}

async fn pruning_deletes_in_chunks_until_nothing_old_is_left(db: &Db) {
    let store = &db.store;
    let alice = customer(1);
    for batch in 0..3_u64 {
        let events: Vec<UsageEvent> = (batch * 5000..(batch + 1) * 5000)
            .map(|n| event(n, &alice, "orders", FIRST_OF_DECEMBER - 1 - n as i64))
            .collect();
        store.record_usage(&events).await.unwrap();
    }
    store
        .record_usage(&[event(15_000, &alice, "orders", FIRST_OF_DECEMBER)])
        .await
        .unwrap();
    // 15,000 old events: more than one chunk of 10,000.
    assert_eq!(store.prune_usage(FIRST_OF_DECEMBER).await.unwrap(), 15_000);
    assert_eq!(raw_units(db, &alice, 0, i64::MAX).await, 1);
}

async fn pruning_goes_through_every_customer(db: &Db) {
    let store = &db.store;
    // Four customers' events in one batch, not in customer order: bob has only new events, and
    // the last customer id is one no customer row has (its usage is kept, and pruned alike).
    let (alice, bob, carol) = (customer(1), customer(2), customer(7));
    let unknown = "cus_zzzz".to_owned();
    let mut events = Vec::new();
    let mut n = 0;
    for (who, old, new) in [
        (&carol, 3, 2),
        (&alice, 5, 1),
        (&bob, 0, 4),
        (&unknown, 2, 0),
    ] {
        for i in 0..old + new {
            let at = if i < old {
                LAST_OF_NOVEMBER - i
            } else {
                FIRST_OF_DECEMBER + i
            };
            events.push(event(n, who, "orders", at));
            n += 1;
        }
    }
    store.record_usage(&events).await.unwrap();
    assert_eq!(
        store.prune_usage(FIRST_OF_DECEMBER).await.unwrap(),
        3 + 5 + 2
    );
    for (who, left) in [(&alice, 1), (&bob, 4), (&carol, 2), (&unknown, 0)] {
        assert_eq!(raw_units(db, who, 0, i64::MAX).await, left, "{who}");
    }
    assert_eq!(stored_events(db).await, 7);
}

async fn the_pruning_job_applies_the_retention_right_away(db: &Db) {
    let store = &db.store;
    let alice = customer(1);
    let day = 86_400_000;
    let now = now_ms();
    let events = vec![
        event(1, &alice, "orders", now - 36 * day),
        event(2, &alice, "orders", now - 34 * day),
    ];
    store.record_usage(&events).await.unwrap();
    let job = tollgate_control_plane::spawn_usage_pruning(
        store.clone(),
        Duration::from_secs(35 * 86_400),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while raw_units(db, &alice, 0, now).await != 1 {
        assert!(std::time::Instant::now() < deadline, "not pruned in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    job.abort();
    assert_eq!(
        raw_units(db, &alice, now - 35 * day, now).await,
        1,
        "the event inside the retention stays"
    );
}

async fn a_full_batch_of_5000_is_stored_in_one_call(db: &Db) {
    let store = &db.store;
    let customers: Vec<String> = (1..=7).map(customer).collect();
    let events: Vec<UsageEvent> = (0..5000_u64)
        .map(|n| {
            let route = ["orders", "users", "search"][(n % 3) as usize];
            let mut e = event(
                n,
                &customers[(n % 7) as usize],
                route,
                FIRST_OF_DECEMBER + n as i64,
            );
            e.units = n % 5;
            e
        })
        .collect();
    assert_eq!(store.record_usage(&events).await.unwrap(), stored(5000, 0));
    assert_eq!(store.record_usage(&events).await.unwrap(), stored(0, 5000));
    let mut units = 0;
    let mut requests = 0;
    for customer_id in &customers {
        units += store
            .period_usage(customer_id, FIRST_OF_DECEMBER, FIRST_OF_DECEMBER + 5000)
            .await
            .unwrap()
            .units;
        for row in store
            .daily_usage(customer_id, "2026-12-01", "2026-12-01")
            .await
            .unwrap()
        {
            requests += row.requests;
        }
    }
    assert_eq!(units, (0..5000_u64).map(|n| n % 5).sum::<u64>());
    assert_eq!(requests, 5000);
}

/// A batch of 5000 goes in as several statements; one event of its last statement is stored
/// already. The statements before it, inserted without asking which rows went in, are taken
/// back, and the batch is stored again row by row: each event once, the roll-up counting the
/// 4999 new ones.
async fn a_stored_event_in_the_last_statement_takes_the_whole_batch_back(db: &Db) {
    let store = &db.store;
    let alice = customer(1);
    let events: Vec<UsageEvent> = (0..5000_u64)
        .map(|n| event(n, &alice, "orders", FIRST_OF_DECEMBER + n as i64))
        .collect();
    assert_eq!(
        store.record_usage(&events[4999..]).await.unwrap(),
        stored(1, 0)
    );
    assert_eq!(store.record_usage(&events).await.unwrap(), stored(4999, 1));
    assert_eq!(stored_events(db).await, 5000);
    let days = store
        .daily_usage(&alice, "2026-12-01", "2026-12-01")
        .await
        .unwrap();
    assert_eq!(days.len(), 1);
    assert_eq!((days[0].requests, days[0].units), (5000, 5000));
    assert_eq!(
        days[0].bytes_out, 500_000,
        "every event added to the roll-up once"
    );
}

/// Eight batches of 1000 events stored at once, each overlapping the next by half and sent in
/// its own order: every event is inserted by exactly one of them, and nothing deadlocks.
async fn overlapping_batches_stored_at_once_count_each_event_once(db: &Db) {
    let alice = customer(1);
    let mut tasks = Vec::new();
    for batch in 0..8_u64 {
        let store = db.store.clone();
        let mut events: Vec<UsageEvent> = (batch * 500..batch * 500 + 1000)
            .map(|n| {
                let route = if n % 2 == 0 { "orders" } else { "users" };
                event(
                    n,
                    &alice,
                    route,
                    FIRST_OF_DECEMBER + (n % 3) as i64 * 43_200_000,
                )
            })
            .collect();
        if batch % 2 == 1 {
            events.reverse();
        }
        tasks.push(tokio::spawn(
            async move { store.record_usage(&events).await },
        ));
    }
    let mut total = stored(0, 0);
    for task in tasks {
        let outcome = task.await.unwrap().unwrap();
        total.inserted += outcome.inserted;
        total.duplicates += outcome.duplicates;
    }
    // Ids 0 to 4499: 4500 distinct events out of 8000 sent.
    assert_eq!(total, stored(4500, 3500));
    let store = &db.store;
    assert_eq!(
        store
            .period_usage(
                &alice,
                FIRST_OF_DECEMBER,
                FIRST_OF_DECEMBER + 2 * 86_400_000
            )
            .await
            .unwrap()
            .units,
        4500
    );
    let rows = store
        .daily_usage(&alice, "2026-12-01", "2026-12-02")
        .await
        .unwrap();
    let requests: u64 = rows.iter().map(|r| r.requests).sum();
    assert_eq!(requests, 4500);
    // At 0 h and 12 h on December 1st, at 0 h on December 2nd (n % 3 == 2).
    let on = |day: &str| -> u64 {
        rows.iter()
            .filter(|r| r.day == day)
            .map(|r| r.requests)
            .sum()
    };
    assert_eq!((on("2026-12-01"), on("2026-12-02")), (3000, 1500));
}

on_both_backends!(
    a_batch_is_stored_once_however_often_it_is_sent,
    the_rollup_sums_each_utc_day_and_route,
    a_period_counts_events_from_its_start_to_before_its_end,
    a_period_sums_its_whole_days_from_the_rollup_and_its_ends_from_events,
    pruning_deletes_old_events_and_keeps_the_rollup,
    pruning_deletes_in_chunks_until_nothing_old_is_left,
    pruning_goes_through_every_customer,
    the_pruning_job_applies_the_retention_right_away,
    a_full_batch_of_5000_is_stored_in_one_call,
    a_stored_event_in_the_last_statement_takes_the_whole_batch_back,
    pruning_keeps_every_event_of_a_current_billing_period,
);

/// The race on Postgres, where batches really are stored at the same time (16 connections), with
/// a multi-threaded runtime so the tasks also run in parallel; and on SQLite, which serializes
/// them.
mod concurrent {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_overlapping_batches_stored_at_once_count_each_event_once() {
        let db = super::Db::postgres().await;
        for _ in 0..3 {
            super::overlapping_batches_stored_at_once_count_each_event_once(&db).await;
            let sql = db.sql().await;
            sqlx::query("DELETE FROM usage_events")
                .execute(&sql)
                .await
                .unwrap();
            sqlx::query("DELETE FROM usage_daily")
                .execute(&sql)
                .await
                .unwrap();
            sql.close().await;
        }
        db.drop_database().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite_overlapping_batches_stored_at_once_count_each_event_once() {
        let db = super::Db::sqlite().await;
        super::overlapping_batches_stored_at_once_count_each_event_once(&db).await;
        db.drop_database().await;
    }
}

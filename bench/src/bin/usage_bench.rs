//! `usage_bench`: how many usage events a second the ledger stores, measured through the
//! control plane's own store and API code, on one store (SQLite file or Postgres database).
//!
//! ```text
//! cargo build --release -p tollgate-bench --bin usage_bench
//! usage_bench <DATABASE_URL> <label> [--customers N]
//! ```
//!
//! Stores batches of 5000 new events (100 customers unless `--customers` says otherwise, 10
//! routes, three days, ids in creation order) through `Store::record_usage`, then the same batches again (all duplicates), then new
//! batches from four tasks at once, then batches through `POST /v1/gateway/usage` (JSON,
//! validation and store), then batches of random ids, and prints events per second for each,
//! with the time the endpoint spends reading and checking the JSON alone. Each phase adds
//! 200,000 events. The database must be empty (a new SQLite file, or a new Postgres database).

use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tollgate_control_plane::api::AppState;
use tollgate_control_plane::store::Store;
use tollgate_model::usage::{UsageBatch, UsageEvent};
use tower::ServiceExt;

const BATCH: u64 = 5000;
const BATCHES: u64 = 40;

/// How many customers the events are spread over (`--customers`). The index of a customer's
/// events takes each batch's events at as many places as there are customers in it.
static CUSTOMERS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn customers() -> u64 {
    *CUSTOMERS.get().unwrap_or(&100)
}

/// The customer of event `n`: scattered, as callers interleave, so that a batch's events of one
/// customer are not next to each other (nor customers in order) when there are many.
fn customer(n: u64) -> u64 {
    (n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % customers()
}

/// Batch `number`: event ids in creation order (as a gateway making them from the time, like
/// UUIDv7s, would) or scattered (random ids).
fn batch_of(number: u64, ordered: bool) -> Vec<UsageEvent> {
    (number * BATCH..(number + 1) * BATCH)
        .map(|n| UsageEvent {
            id: if ordered {
                format!("evt_{n:032x}")
            } else {
                format!("evt_{:032x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            },
            request_id: format!("0192f0c4-e1a3-7f4c-8d2b-{n:012x}"),
            customer_id: format!("cus_{:032x}", customer(n)),
            key_id: Some(format!("key_{:032x}", customer(n) * 3 + n % 3)),
            route: format!("route-{}", n % 10),
            method: "GET".into(),
            status: if n % 50 == 0 { 502 } else { 200 },
            latency_us: 800 + n % 5000,
            bytes_in: n % 2048,
            bytes_out: 512 + n % 4096,
            at_ms: 1_796_083_200_000 + (n % 3) as i64 * 86_400_000 + (n % 86_400_000) as i64,
            units: 1,
            overage: 0,
        })
        .collect()
}

fn batch(number: u64) -> Vec<UsageEvent> {
    batch_of(number, true)
}

fn rate(events: u64, started: Instant) -> String {
    let seconds = started.elapsed().as_secs_f64();
    format!(
        "{events} events in {seconds:.2} s: {:.0} events/s",
        events as f64 / seconds
    )
}

async fn measure(store: &Store, backend: &str) -> anyhow::Result<()> {
    let batches: Vec<Vec<UsageEvent>> = (0..BATCHES).map(batch).collect();

    let started = Instant::now();
    for events in &batches {
        assert_eq!(store.record_usage(events).await?.inserted, BATCH);
    }
    println!(
        "{backend}: new, one writer:        {}",
        rate(BATCHES * BATCH, started)
    );

    let started = Instant::now();
    for events in &batches {
        assert_eq!(store.record_usage(events).await?.duplicates, BATCH);
    }
    println!(
        "{backend}: replayed, one writer:   {}",
        rate(BATCHES * BATCH, started)
    );

    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for number in 0..BATCHES / 4 {
                let events = batch(BATCHES + task * BATCHES / 4 + number);
                assert_eq!(store.record_usage(&events).await?.inserted, BATCH);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    println!(
        "{backend}: new, four writers:      {}",
        rate(BATCHES * BATCH, started)
    );

    let gateway = tollgate_control_plane::embedded_gateway_token(
        store,
        "usage_bench",
        tollgate_control_plane::OtherTokens::Replaced,
    )
    .await?
    .expose()
    .to_owned();
    let app = tollgate_control_plane::api::app(AppState::new(store.clone()));
    let bodies: Vec<String> = (2 * BATCHES..3 * BATCHES)
        .map(|number| {
            serde_json::to_string(&UsageBatch {
                events: batch(number),
            })
        })
        .collect::<Result<_, _>>()?;
    println!(
        "{backend}: one batch of {BATCH} is {} bytes of JSON",
        bodies[0].len()
    );
    let started = Instant::now();
    for body in &bodies {
        let fields = serde_json::from_str(body)?;
        let events = tollgate_control_plane::api::usage::batch::events(fields)
            .map_err(|errors| anyhow::anyhow!("{} invalid fields", errors.len()))?;
        assert_eq!(events.len() as u64, BATCH);
    }
    println!(
        "{backend}: JSON read and checked:  {}",
        rate(BATCHES * BATCH, started)
    );
    let started = Instant::now();
    for body in bodies {
        let request = Request::builder()
            .method("POST")
            .uri("/v1/gateway/usage")
            .header("authorization", format!("Bearer {gateway}"))
            .body(Body::from(body))?;
        let response = app.clone().oneshot(request).await?;
        assert_eq!(response.status(), StatusCode::OK);
    }
    println!(
        "{backend}: new, through HTTP:      {}",
        rate(BATCHES * BATCH, started)
    );

    let batches: Vec<Vec<UsageEvent>> = (3 * BATCHES..4 * BATCHES)
        .map(|number| batch_of(number, false))
        .collect();
    let started = Instant::now();
    for events in &batches {
        assert_eq!(store.record_usage(events).await?.inserted, BATCH);
    }
    println!(
        "{backend}: new, random ids:        {}",
        rate(BATCHES * BATCH, started)
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: usage_bench <DATABASE_URL> <label> [--customers N]";
    let (Some(url), Some(label)) = (args.next(), args.next()) else {
        anyhow::bail!(usage);
    };
    match (args.next().as_deref(), args.next()) {
        (None, _) => {}
        (Some("--customers"), Some(n)) => {
            let n: u64 = n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                anyhow::anyhow!("--customers takes a number of customers, at least 1")
            })?;
            let _ = CUSTOMERS.set(n);
        }
        _ => anyhow::bail!(usage),
    }
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    measure(&store, &label).await
}

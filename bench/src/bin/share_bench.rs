//! `share_bench`: what counting plans without limits in batches costs with many customers, on a
//! real Redis: how long a gateway's background pass ([`Limiter::share_pending`]) takes to add
//! one batch for each of N customers, and how many Redis calls it makes.
//!
//! ```text
//! cargo build --release -p tollgate-bench --bin share_bench
//! share_bench redis://127.0.0.1:6379 [--customers N] [--passes P]
//! ```
//!
//! Each customer's first request asks Redis (making its quota count); then every pass counts
//! `UNITS` requests of every customer in process and times one `share_pending`. Keys go under a
//! prefix of their own, deleted at the end. Only loopback Redis URLs are accepted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_gateway::config::{Redis, RedisNodes};
use tollgate_gateway::limits::clock::SystemClock;
use tollgate_gateway::limits::metrics::LimitMetrics;
use tollgate_gateway::limits::redis::RedisCounters;
use tollgate_gateway::limits::{Counted, Limiter};
use tollgate_gateway::metrics::Metrics;
use tollgate_model::plan::{Plan, PlanStatus};

/// Requests of each customer counted in process before each pass.
const UNITS: u64 = 10;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    anyhow::ensure!(
        url.starts_with("redis://127.0.0.1"),
        "share_bench only talks to a Redis on 127.0.0.1"
    );
    let (mut customers, mut passes) = (10_000_u32, 5_u32);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--customers" => customers = value.parse()?,
            "--passes" => passes = value.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(run(url, customers, passes))
}

async fn run(url: String, customers: u32, passes: u32) -> anyhow::Result<()> {
    let prefix = format!("share-bench-{}", std::process::id());
    let metrics = Metrics::new();
    let redis = RedisCounters::new(
        Redis {
            nodes: RedisNodes::Single(url.clone()),
            timeout: Duration::from_secs(1),
            retry_after: Duration::from_secs(1),
            key_prefix: prefix.clone(),
            tls_ca_file: None,
        },
        &metrics,
    )?;
    redis.connect().await?;
    let limiter = Limiter::shared(Arc::new(SystemClock), LimitMetrics::new(&metrics)?, redis);
    let plan = Plan {
        id: "plan_bench".into(),
        name: "pay per call".into(),
        rate_limits: Vec::new(),
        quota: None,
        price: None,
        upgrade_url: None,
        status: PlanStatus::Active,
        created_at: String::new(),
        updated_at: String::new(),
    };
    let ids: Vec<[u8; 16]> = (0..customers)
        .map(|n| {
            let mut id = [0_u8; 16];
            id[..4].copy_from_slice(&n.to_le_bytes());
            id[4..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9).to_le_bytes());
            id
        })
        .collect();
    let started = Instant::now();
    for id in &ids {
        let decision = limiter.admit(id, &plan, None, 1).await;
        anyhow::ensure!(
            decision.counted == Counted::Redis,
            "first request not in redis"
        );
    }
    println!(
        "{customers} customers: first requests (one admission call each) {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );
    limiter.share_pending().await;
    for pass in 1..=passes {
        let counting = Instant::now();
        for id in &ids {
            for _ in 0..UNITS {
                let decision = limiter.admit(id, &plan, None, 1).await;
                anyhow::ensure!(decision.counted == Counted::Batched, "not batched");
            }
        }
        let counted = counting.elapsed();
        let sharing = Instant::now();
        limiter.share_pending().await;
        let shared = sharing.elapsed();
        println!(
            "pass {pass}: {} requests counted in process in {:.1} ms ({:.0} ns each); one pass adding {customers} batches: {:.1} ms ({:.1} us per customer)",
            u64::from(customers) * UNITS,
            counted.as_secs_f64() * 1000.0,
            counted.as_secs_f64() * 1e9 / (f64::from(customers) * UNITS as f64),
            shared.as_secs_f64() * 1000.0,
            shared.as_secs_f64() * 1e6 / f64::from(customers),
        );
    }
    let rendered = String::from_utf8(metrics.render())?;
    let shared_units: f64 = rendered
        .lines()
        .find_map(|line| {
            line.strip_prefix("tollgate_quota_fallback_units_total{outcome=\"shared\"} ")
        })
        .map_or(Ok(0.0), str::parse)?;
    println!(
        "units added to redis: {shared_units} of {}",
        u64::from(customers) * UNITS * u64::from(passes)
    );
    // Clean up this run's keys.
    let client = redis::Client::open(url.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut connection)
        .await?;
    for chunk in keys.chunks(1000) {
        let () = redis::cmd("DEL")
            .arg(chunk)
            .query_async(&mut connection)
            .await?;
    }
    Ok(())
}

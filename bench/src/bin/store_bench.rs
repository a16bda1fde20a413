//! `store_bench`: key creation rate and the size and cost of a 1,000,000-key snapshot, on one
//! store (SQLite file or Postgres database), measured through the control plane's own store code.
//!
//! ```text
//! store_bench <DATABASE_URL> [--keys 1000000] [--timed-keys 2000]
//! ```
//!
//! 1. Creates one plan and 100 customers.
//! 2. Creates `--timed-keys` keys one by one with `Store::create_key` (a transaction each, with
//!    its audit entry and change-log row, as the API does): keys per second.
//! 3. Bulk-loads the rest up to `--keys` with multi-row inserts (reported, not a creation rate).
//! 4. Builds the gateway snapshot file as the API serves it (`SnapshotFile::build`: one
//!    consistent read, streamed into gzip) and streams it back as plain JSON: build time, gzip
//!    and JSON sizes, and the process's resident memory before, after and at its peak.
//!
//! The database must be empty (a new SQLite file, or a new Postgres database).

use std::time::Instant;

use tollgate_control_plane::snapshot::SnapshotFile;
use tollgate_control_plane::store::Store;
use tollgate_control_plane::store::audit::Actor;
use tollgate_control_plane::store::customers::NewCustomer;
use tollgate_control_plane::store::keys::NewKey;
use tollgate_control_plane::store::plans::NewPlan;

fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().ok_or_else(|| {
        anyhow::anyhow!("usage: store_bench <DATABASE_URL> [--keys N] [--timed-keys M]")
    })?;
    let (mut total, mut timed) = (1_000_000u64, 2_000u64);
    while let Some(flag) = args.next() {
        let value: u64 = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?
            .parse()?;
        match flag.as_str() {
            "--keys" => total = value,
            "--timed-keys" => timed = value,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let store = Store::connect(&url).await?;
    store.migrate().await?;
    let actor = Actor {
        id: "bench".into(),
        request_id: None,
    };
    let plan = store
        .create_plan(
            NewPlan {
                name: "bench".into(),
                rate_limits: Vec::new(),
                quota: None,
                price: None,
                upgrade_url: None,
            },
            &actor,
        )
        .await?;
    let mut customers = Vec::new();
    for i in 0..100 {
        let customer = store
            .create_customer(
                NewCustomer {
                    name: format!("customer {i}"),
                    email: format!("c{i}@bench.example"),
                    plan_id: plan.id.clone(),
                },
                &actor,
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        customers.push(customer.id);
    }

    let started = Instant::now();
    for i in 0..timed {
        let customer = &customers[(i % 100) as usize];
        let key = NewKey {
            name: format!("k{i}"),
            expires_at_ms: None,
            scopes: None,
        };
        store.create_key(customer, key, &actor).await?;
    }
    let elapsed = started.elapsed();
    println!(
        "key creation (one transaction each, audited): {timed} keys in {:.2} s = {:.0} keys/s",
        elapsed.as_secs_f64(),
        timed as f64 / elapsed.as_secs_f64()
    );

    let started = Instant::now();
    let loaded = store
        .bulk_load_keys_for_benchmark(&customers, total.saturating_sub(timed))
        .await?;
    println!(
        "bulk load: {loaded} keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let before = rss_mib("VmRSS:");
    let file = SnapshotFile::build(&store).await?;
    println!(
        "snapshot of {total} keys: built in {:.2} s into {:.1} MiB of gzip ({:.1} MiB of JSON, {:.0} bytes per key)",
        file.build_time.as_secs_f64(),
        file.gzip_bytes as f64 / 1_048_576.0,
        file.json_bytes as f64 / 1_048_576.0,
        file.json_bytes as f64 / total.max(1) as f64
    );
    let after_build = rss_mib("VmRSS:");
    let started = Instant::now();
    let mut chunks = file.stream(false);
    let mut streamed = 0u64;
    while let Some(chunk) = chunks.recv().await {
        streamed += chunk?.len() as u64;
    }
    anyhow::ensure!(
        streamed == file.json_bytes,
        "streamed {streamed} of {} bytes",
        file.json_bytes
    );
    println!(
        "streamed as plain JSON in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "resident memory: {before:.0} MiB before, {after_build:.0} MiB after the build, {:.0} MiB after streaming (peak {:.0} MiB)",
        rss_mib("VmRSS:"),
        rss_mib("VmHWM:")
    );
    Ok(())
}

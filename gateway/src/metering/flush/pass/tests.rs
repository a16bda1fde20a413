use tollgate_control_plane::store::Store;

use super::*;
use crate::metering::ledger::{HttpLedger, StoreLedger};
use crate::metering::metrics::MeteringMetrics;
use crate::metering::record::{self, Kind, Usage};
use crate::metering::spool::Spool;
use crate::metering::spool::tests::event;
use crate::metrics::Metrics;

const CUSTOMER: &str = "cus_01010101010101010101010101010101";

/// A spool of `segments` closed segments of `per_segment` final records each.
/// A spool in `dir` holding `segments`, each a closed segment of these final records.
fn spool_of(dir: &std::path::Path, segments: &[Vec<UsageEvent>]) -> Arc<Meter> {
    let meter = Meter {
        spool: Spool::open(dir, u64::MAX, 0).unwrap(),
        metrics: MeteringMetrics::new(&Metrics::new()).unwrap(),
    };
    for (at, events) in segments.iter().enumerate() {
        for usage in events {
            let mut line = Vec::new();
            record::encode(Kind::Final, &Usage::of(usage), &mut line);
            meter.spool.append(&line).unwrap();
        }
        meter.spool.tick(at as i64 + 1, 0).unwrap();
    }
    Arc::new(meter)
}

/// `segments` closed segments of `per_segment` events each, numbered from 0.
fn backlog(dir: &std::path::Path, segments: u8, per_segment: u8) -> Arc<Meter> {
    let segments: Vec<Vec<UsageEvent>> = (0..segments)
        .map(|segment| {
            (0..per_segment)
                .map(|n| event(segment * per_segment + n, 1))
                .collect()
        })
        .collect();
    spool_of(dir, &segments)
}

/// A sender of `meter`'s spool in batches of `batch`, whose segments close only when a test
/// ticks them.
fn sender(meter: Arc<Meter>, batch: usize) -> Sender {
    Sender {
        meter,
        interval: Duration::from_secs(3600),
        batch: AtomicUsize::new(batch),
    }
}

/// A new SQLite store in `dir`, migrated.
async fn sqlite_store(dir: &std::path::Path) -> Store {
    let url = format!("sqlite://{}?mode=rwc", dir.join("ledger.db").display());
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    store
}

/// Event `n`, with a method longer than the control plane takes when `refused`.
fn event_refused_if(n: u8, refused: bool) -> UsageEvent {
    let mut usage = event(n, 1);
    if refused {
        usage.method = "X".repeat(40);
    }
    usage
}

#[tokio::test]
async fn a_request_left_pending_counts_as_its_final_record_says_however_long_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    // An earlier process: seven segments of three requests; before them, a request admitted
    // (pending, 1 unit) whose final record, refunded for an upstream 503, is in the last.
    let refunded = 200;
    {
        let earlier = Spool::open(&spool_dir, u64::MAX, 0).unwrap();
        let write = |kind: Kind, usage: &UsageEvent| {
            let mut line = Vec::new();
            record::encode(kind, &Usage::of(usage), &mut line);
            earlier.append(&line).unwrap();
        };
        write(Kind::Pending, &event(refunded, 1));
        for segment in 0..7u8 {
            for n in 0..3 {
                write(Kind::Final, &event(segment * 3 + n, 1));
            }
            if segment == 6 {
                let mut settled = event(refunded, 0);
                settled.status = 503;
                write(Kind::Final, &settled);
            }
            earlier.tick(i64::from(segment) + 1, 0).unwrap();
        }
    }
    // This process reads at most MAX_UNSENT_SEGMENTS of them at a time: the pending record
    // must wait for the last one rather than count as left unsettled.
    let sender = sender(spool_of(&spool_dir, &[]), 2);
    assert!(sender.meter.spool.closed(u64::MAX).unwrap().len() > MAX_UNSENT_SEGMENTS + 1);
    let store = sqlite_store(dir.path()).await;
    let ledger = StoreLedger(store.clone());
    let mut segments = BTreeMap::new();
    let passed = sender.pass_all(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::AllSent);
    let stored = store.period_usage(CUSTOMER, 0, i64::MAX).await.unwrap();
    assert_eq!(
        stored.units, 21,
        "the 21 requests, and the refunded one at 0 units"
    );
    assert_eq!(
        sender.meter.metrics.replayed_so_far(),
        22,
        "every event an earlier process spooled is sent again"
    );
}

#[tokio::test]
async fn a_backlog_is_read_a_few_segments_at_a_time_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let sender = sender(backlog(&dir.path().join("spool"), 10, 3), 2);
    assert_eq!(sender.meter.spool.closed(u64::MAX).unwrap().len(), 11);

    // The ledger cannot be reached (nothing listens on port 1): no more than
    // MAX_UNSENT_SEGMENTS are read into memory, however long the backlog.
    let unreachable = HttpLedger::new("http://127.0.0.1:1", "tgw_token").unwrap();
    let mut segments = BTreeMap::new();
    for _ in 0..3 {
        let passed = sender.pass(&mut segments, &unreachable).await.unwrap();
        assert_eq!(passed, Passed::NotTaken);
        assert_eq!(segments.len(), MAX_UNSENT_SEGMENTS);
    }

    // The ledger back: a pass sends what it read and says more is left; the rest follows.
    let store = sqlite_store(dir.path()).await;
    let ledger = StoreLedger(store.clone());
    assert_eq!(sender.meter.metrics.replayed_so_far(), 0);
    let passed = sender.pass(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::MoreToRead);
    let stored = store.period_usage(CUSTOMER, 0, i64::MAX).await.unwrap();
    assert_eq!(stored.units, 3 * MAX_UNSENT_SEGMENTS as u64);
    // Only the first segment's first batch (2 events) was offered while the ledger was
    // away: those were sent again; every other event's first sending was now.
    assert_eq!(sender.meter.metrics.replayed_so_far(), 2);
    let passed = sender.pass_all(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::AllSent);
    let stored = store.period_usage(CUSTOMER, 0, i64::MAX).await.unwrap();
    assert_eq!(stored.units, 30, "every event, once");
    assert!(segments.is_empty());
    assert_eq!(
        sender.meter.spool.closed(u64::MAX).unwrap().len(),
        1,
        "only the active segment is left"
    );
}

/// Stands in for a proxy in front of the control plane that takes request bodies of at
/// most two events (413 above), and the control plane behind it: the ids it was given.
async fn two_events_at_most() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    let given = Arc::new(std::sync::Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/v1/gateway/usage",
        axum::routing::post({
            let given = Arc::clone(&given);
            move |axum::Json(batch): axum::Json<tollgate_model::usage::UsageBatch>| async move {
                if batch.events.len() > 2 {
                    return Err(axum::http::StatusCode::PAYLOAD_TOO_LARGE);
                }
                let mut given = given.lock().unwrap();
                given.extend(batch.events.iter().map(|e| e.id.clone()));
                Ok(axum::Json(serde_json::json!({
                    "inserted": batch.events.len(),
                    "duplicates": 0
                })))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), given)
}

/// The control plane's usage ingest as far as validation goes: each batch checked by the
/// control plane's own code and refused with its own 422 when an event is invalid; valid
/// batches stored; call number `unavailable_on` (counting from 1; 0: none) answered 503:
/// (URL, ids stored, calls made).
async fn validating(
    unavailable_on: usize,
) -> (String, Arc<std::sync::Mutex<Vec<String>>>, Arc<AtomicUsize>) {
    use axum::response::IntoResponse;
    use tollgate_control_plane::api::error::ApiError;
    use tollgate_control_plane::api::usage::batch;
    let given = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let app =
        axum::Router::new().route(
            "/v1/gateway/usage",
            axum::routing::post({
                let (given, calls) = (Arc::clone(&given), Arc::clone(&calls));
                move |axum::Json(fields): axum::Json<
                    serde_json::Map<String, serde_json::Value>,
                >| async move {
                    if calls.fetch_add(1, Ordering::Relaxed) + 1 == unavailable_on {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    match batch::events(fields) {
                        Err(errors) => ApiError::Invalid(errors).into_response(),
                        Ok(events) => {
                            let mut given = given.lock().unwrap();
                            given.extend(events.iter().map(|e| e.id.clone()));
                            axum::Json(serde_json::json!({
                                "inserted": events.len(),
                                "duplicates": 0
                            }))
                            .into_response()
                        }
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), given, calls)
}

#[tokio::test]
async fn events_the_ledger_refuses_are_set_aside_alone_and_the_rest_of_their_batch_stored() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    // Seven events in one segment; two with a method longer than the control plane takes.
    let bad = [2, 5];
    let events = (0..7)
        .map(|n| event_refused_if(n, bad.contains(&n)))
        .collect();
    let sender = sender(spool_of(&spool, &[events]), 1000);
    let (url, given, calls) = validating(0).await;
    let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
    let mut segments = BTreeMap::new();
    let passed = sender.pass(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::AllSent);
    let mut given = given.lock().unwrap().clone();
    given.sort();
    let expected: Vec<String> = [0, 1, 3, 4, 6].map(|n| event(n, 1).id).to_vec();
    assert_eq!(given, expected, "every other event, once");
    assert_eq!(
        calls.load(Ordering::Relaxed),
        2,
        "refused once, then stored"
    );
    // The two refused events are kept together for an operator, and only they.
    let kept: Vec<String> = std::fs::read_dir(spool.join("rejected"))
        .unwrap()
        .map(|entry| std::fs::read_to_string(entry.unwrap().path()).unwrap())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].lines().count(), 2, "{kept:?}");
    for n in bad {
        assert!(kept[0].contains(&event(n, 1).id), "{n} not kept: {kept:?}");
    }
    // The segment is done with: nothing is sent again.
    assert_eq!(
        sender.pass(&mut segments, &ledger).await.unwrap(),
        Passed::AllSent
    );
    assert_eq!(calls.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn events_set_aside_are_not_refused_again_when_their_segment_is_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let events = (0..7).map(|n| event_refused_if(n, n == 1)).collect();
    let sender = sender(spool_of(&spool, &[events]), 3);
    // Call 1 refuses event 1 of the first batch; call 2, the rest of it, meets an outage.
    let (url, given, calls) = validating(2).await;
    let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
    let mut segments = BTreeMap::new();
    let passed = sender.pass(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::NotTaken);
    // The next pass sends the segment again, without the event set aside.
    let passed = sender.pass(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::AllSent);
    let mut given = given.lock().unwrap().clone();
    given.sort();
    let expected: Vec<String> = [0, 2, 3, 4, 5, 6].map(|n| event(n, 1).id).to_vec();
    assert_eq!(given, expected);
    assert_eq!(
        calls.load(Ordering::Relaxed),
        4,
        "refused, outage, then two batches"
    );
    let kept = std::fs::read_dir(spool.join("rejected")).unwrap().count();
    assert_eq!(kept, 1, "set aside once");
    // Offered before the outage: events 0 and 2 (1 was set aside); they alone are replayed.
    assert_eq!(sender.meter.metrics.replayed_so_far(), 2);
}

#[tokio::test]
async fn a_segment_sent_again_after_a_disk_error_counts_what_it_had_offered_as_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let events = (0..7).map(|n| event_refused_if(n, n == 4)).collect();
    let sender = sender(spool_of(&spool, &[events]), 2);
    let (url, given, _) = validating(0).await;
    let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
    // Event 4 cannot be set aside: a file stands where its directory goes.
    std::fs::write(spool.join("rejected"), b"").unwrap();
    let mut segments = BTreeMap::new();
    assert!(sender.pass(&mut segments, &ledger).await.is_err());
    assert_eq!(given.lock().unwrap().len(), 4, "events 0 to 3 stored");
    std::fs::remove_file(spool.join("rejected")).unwrap();
    let passed = sender.pass(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::AllSent);
    // Sent again: events 0 to 3 (stored) and 5 (in the batch refused for event 4); 6 for
    // the first time.
    assert_eq!(sender.meter.metrics.replayed_so_far(), 5);
    assert_eq!(given.lock().unwrap().len(), 4 + 6);
}

#[tokio::test]
async fn a_batch_too_large_for_a_proxy_is_sent_in_halves_and_nothing_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let sender = sender(backlog(&spool, 1, 7), 1000);
    let (url, given) = two_events_at_most().await;
    let ledger = HttpLedger::new(&url, "tgw_token").unwrap();
    let mut segments = BTreeMap::new();
    let passed = sender.pass(&mut segments, &ledger).await.unwrap();
    assert_eq!(passed, Passed::AllSent);
    let mut given = given.lock().unwrap().clone();
    given.sort();
    let expected: Vec<String> = (0..7).map(|n| event(n, 1).id).collect();
    assert_eq!(given, expected, "every event, once");
    assert!(!spool.join("rejected").exists(), "nothing set aside");
    let size = sender.batch.load(Ordering::Relaxed);
    assert!(
        (1..=2).contains(&size),
        "later batches are no larger than what passes: {size}"
    );
}

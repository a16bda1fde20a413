use std::sync::Arc;

use tollgate_model::plan::RateLimit;

use super::*;
use crate::limits::quota::QuotaLimit;
use crate::limits::redis::LateAnswer;

/// Redis took a batch (when, and at which version of its count, does not matter here).
const TAKEN: Option<Taken> = Some(Taken {
    at_ms: 0,
    version: 1,
});

const PERIOD: Period = Period {
    start_ms: 0,
    end_ms: 1_000_000_000,
};

/// The connection the calls of these tests go through.
const VIA: Via = 1;

/// A call sent at `at_ms` through [`VIA`].
fn sent(at_ms: i64) -> Sent {
    Sent { at_ms, via: VIA }
}

fn policy(rate_limits: &[RateLimit], quota: Option<QuotaLimit>) -> Policy<'_> {
    Policy { rate_limits, quota }
}

/// What Redis told of a customer's count in `PERIOD` (no windows), as `follow` takes it.
fn told(used: u64, generation: Option<i64>, counted_in: Option<i64>) -> Decision {
    told_with(used, generation, counted_in, Vec::new(), 0)
}

fn told_with(
    used: u64,
    generation: Option<i64>,
    counted_in: Option<i64>,
    windows: Vec<WindowState>,
    at_ms: i64,
) -> Decision {
    Decision {
        verdict: Verdict::Admitted,
        windows,
        quota: None,
        period: PERIOD,
        at_ms,
        used,
        reservation: None,
        counted: Counted::Redis,
        generation,
        counted_in,
        count_version: None,
    }
}

#[test]
fn a_window_redis_had_filled_is_full_here_when_counting_falls_back() {
    let counters = LocalCounters::default();
    let customer = [9; 16];
    let limits = [RateLimit {
        requests: 5,
        window_seconds: 3600,
    }];
    let window_ms = 3_600_000;
    // Redis admitted five: none left in the window.
    let full = WindowState {
        limit: 5,
        window_ms,
        remaining: 0,
        reset_ms: window_ms,
    };
    counters.follow(
        &customer,
        &mut told_with(5, None, None, vec![full], 1_000),
        VIA,
    );
    let decision = counters.admit(&customer, &policy(&limits, None), PERIOD, 1, 2_000);
    assert_eq!(decision.verdict, Verdict::RateLimited);
    assert_eq!(decision.windows[0].remaining, 0);
    // Redis said two left: three counted here, two admitted.
    let other = [10; 16];
    let partly = WindowState {
        remaining: 2,
        ..full
    };
    counters.follow(
        &other,
        &mut told_with(3, None, None, vec![partly], 1_000),
        VIA,
    );
    let verdicts: Vec<Verdict> = (0..3)
        .map(|i| {
            counters
                .admit(&other, &policy(&limits, None), PERIOD, 1, 2_000 + i)
                .verdict
        })
        .collect();
    assert_eq!(
        verdicts,
        [Verdict::Admitted, Verdict::Admitted, Verdict::RateLimited]
    );
}

#[test]
fn customers_made_together_spread_over_the_shards() {
    let shards: std::collections::HashSet<usize> = (0..256)
        .map(|_| shard_index(&uuid::Uuid::now_v7().into_bytes()))
        .collect();
    // 256 random bytes modulo 64 miss a given shard with odds of (63/64)^256, about 2%.
    assert!(shards.len() >= 48, "{} shards used", shards.len());
}

#[test]
fn a_quota_refusal_counts_in_no_window() {
    let limits = [RateLimit {
        requests: 10,
        window_seconds: 60,
    }];
    let quota = Some(QuotaLimit {
        limit: 2,
        hard: true,
    });
    let counters = LocalCounters::default();
    let customer = [1; 16];
    let verdicts: Vec<Verdict> = (0..4)
        .map(|i| {
            counters
                .admit(&customer, &policy(&limits, quota), PERIOD, 1, 1_000 + i)
                .verdict
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            Verdict::Admitted,
            Verdict::Admitted,
            Verdict::QuotaExceeded,
            Verdict::QuotaExceeded
        ]
    );
    let decision = counters.admit(&customer, &policy(&limits, None), PERIOD, 1, 2_000);
    assert_eq!(decision.verdict, Verdict::Admitted);
    // Two admitted before, one now: the refusals counted nothing.
    assert_eq!(decision.windows[0].remaining, 7);
}

#[test]
fn a_plan_change_keeps_the_counts_of_windows_of_the_same_length() {
    let counters = LocalCounters::default();
    let customer = [2; 16];
    let small = [RateLimit {
        requests: 5,
        window_seconds: 60,
    }];
    for t in 0..3 {
        counters.admit(&customer, &policy(&small, None), PERIOD, 1, t);
    }
    let large = [RateLimit {
        requests: 100,
        window_seconds: 60,
    }];
    let decision = counters.admit(&customer, &policy(&large, None), PERIOD, 1, 10);
    assert_eq!(decision.windows[0].remaining, 96);
}

#[test]
fn concurrent_requests_of_one_customer_are_admitted_exactly_up_to_the_limit() {
    let counters = Arc::new(LocalCounters::default());
    let limits = [RateLimit {
        requests: 100,
        window_seconds: 3600,
    }];
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let counters = Arc::clone(&counters);
            std::thread::spawn(move || {
                (0..100)
                    .filter(|_| {
                        counters
                            .admit(&[3; 16], &policy(&limits, None), PERIOD, 1, 5_000)
                            .verdict
                            == Verdict::Admitted
                    })
                    .count()
            })
        })
        .collect();
    let admitted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(admitted, 100);
}

#[test]
fn a_refund_gives_the_unit_back_to_the_quota() {
    let counters = LocalCounters::default();
    let customer = [4; 16];
    let quota = Some(QuotaLimit {
        limit: 1,
        hard: true,
    });
    let first = counters.admit(&customer, &policy(&[], quota), PERIOD, 1, 0);
    counters.refund(&customer, &first.reservation.unwrap());
    let second = counters.admit(&customer, &policy(&[], quota), PERIOD, 1, 1);
    assert_eq!(second.verdict, Verdict::Admitted);
    assert_eq!(counters.used(&customer, PERIOD), (1, 0));
}

#[test]
fn seeded_units_count_against_the_quota_once() {
    let counters = LocalCounters::default();
    let customer = [5; 16];
    assert!(counters.needs_seed(&customer, PERIOD));
    let read = |used| LedgerRead {
        until_ms: 0,
        used,
        overage: 0,
    };
    counters.seed(&customer, PERIOD, read(8));
    counters.seed(&customer, PERIOD, read(8));
    assert!(!counters.needs_seed(&customer, PERIOD));
    // The ledger read again has one more of the same events (it was in a spool): added once.
    counters.reseed(&customer, PERIOD, read(9));
    counters.reseed(&customer, PERIOD, read(9));
    // A read of other events (another seed's) adds nothing.
    counters.reseed(
        &customer,
        PERIOD,
        LedgerRead {
            until_ms: 5,
            used: 100,
            overage: 0,
        },
    );
    let quota = Some(QuotaLimit {
        limit: 10,
        hard: true,
    });
    assert_eq!(
        counters
            .admit(&customer, &policy(&[], quota), PERIOD, 1, 0)
            .verdict,
        Verdict::Admitted
    );
    assert_eq!(
        counters
            .admit(&customer, &policy(&[], quota), PERIOD, 1, 0)
            .verdict,
        Verdict::QuotaExceeded
    );
}

#[test]
fn the_count_told_to_redis_names_the_generation_it_was_last_told_of_seeded_or_not() {
    let counters = LocalCounters::default();
    let customer = [7; 16];
    assert_eq!(counters.known(&customer, PERIOD).generation, None);
    // Counted in a count not yet seeded: known as that count's, so a call to it does not
    // raise it (refunds since would come back).
    counters.follow(&customer, &mut told(3, None, Some(12)), VIA);
    assert_eq!(counters.known(&customer, PERIOD).generation, Some(12));
    // Not seeded: no batching for it.
    assert!(
        counters
            .admit_batched(&customer, &policy(&[], None), PERIOD, 1, 0)
            .is_none()
    );
    // Seeded: batching may use it; forgotten for batching (Redis lost it), still the
    // generation this process's count was last told of.
    counters.follow(&customer, &mut told(4, Some(12), Some(12)), VIA);
    // Units in a batch not yet settled are not told: the batch may still be added to a
    // count made again. Once Redis refused it, they are.
    let batched = counters
        .admit_batched(&customer, &policy(&[], None), PERIOD, 1, 0)
        .unwrap();
    assert_eq!(batched.used, 5);
    assert_eq!(counters.known(&customer, PERIOD).used, 4);
    let batch = counters.take_unshared(&customer).remove(0);
    assert_eq!(counters.known(&customer, PERIOD).used, 4);
    counters.restore_unshared(&customer, batch, true);
    assert_eq!(counters.known(&customer, PERIOD).used, 4);
    let batch = counters.take_unshared(&customer).remove(0);
    counters.settle_unshared(&customer, &batch, None);
    assert_eq!(counters.known(&customer, PERIOD).used, 5);
    counters.forget_generation(&customer, PERIOD, 12);
    let known = counters.known(&customer, PERIOD);
    assert_eq!((known.used, known.generation), (5, Some(12)));
    // Another period knows nothing.
    let next = Period {
        start_ms: PERIOD.end_ms,
        end_ms: PERIOD.end_ms + 1_000,
    };
    assert_eq!(counters.known(&customer, next).generation, None);
}

#[test]
fn a_second_read_of_the_ledger_adds_what_was_in_a_spool_and_nothing_twice() {
    let counters = LocalCounters::default();
    let customer = [6; 16];
    let quota = Some(QuotaLimit {
        limit: 100,
        hard: true,
    });
    let read = |until_ms, used| LedgerRead {
        until_ms,
        used,
        overage: 0,
    };
    // Seeded at 1,000 with the 5 events the ledger held from before then.
    counters.seed(&customer, PERIOD, read(1_000, 5));
    // A request decided at 999 (before the seed's read) but counted after it: its event
    // will be in the second read.
    let early = counters.admit(&customer, &policy(&[], quota), PERIOD, 1, 999);
    let at = counters.admit(&customer, &policy(&[], quota), PERIOD, 1, 1_000);
    let later = counters.admit(&customer, &policy(&[], quota), PERIOD, 1, 1_001);
    assert_eq!(later.used, 8);
    counters.refund(&customer, &later.reservation.unwrap());
    // Read again: 2 more events from before 1,000 that were in a spool, and the early one.
    counters.reseed(&customer, PERIOD, read(1_000, 8));
    // 5 + 2 + early + at: each once.
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    counters.reseed(&customer, PERIOD, read(1_000, 8));
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // A read of other events (another seed's) changes nothing.
    counters.reseed(&customer, PERIOD, read(5_000, 50));
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // Refunds after the second read come off the count as before.
    counters.refund(&customer, &at.reservation.unwrap());
    counters.refund(&customer, &early.reservation.unwrap());
    assert_eq!(counters.used(&customer, PERIOD), (7, 0));
}

fn fallback(units: u64, overage: u64, period: Period) -> Reservation {
    Reservation {
        period,
        at_ms: period.start_ms,
        units,
        overage,
        counted: Counted::Fallback,
        fallback: None,
    }
}

/// Units counted while no count of the period in Redis is known here (a process started
/// while Redis was away, or one that forgot the count Redis made again) are batched all the
/// same, for Redis to place by when its count was made.
#[test]
fn units_counted_with_no_count_known_in_redis_are_batched_for_an_unknown_generation() {
    let counters = LocalCounters::default();
    let customer = [7; 16];
    counters.admit(&customer, &policy(&[], None), PERIOD, 1, 1_000);
    let token = counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    let taken = counters.take_unshared(&customer);
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].token, taken[0].units, taken[0].generation),
        (token, 1, UNKNOWN_GENERATION)
    );
}

/// A unit counted here because Redis' call never ran is in a batch for Redis as soon as it is
/// counted: what this process holds beyond Redis' count (`known`, which a rebuild of Redis'
/// count adds) never includes it, so it cannot reach Redis both ways. One whose call may have
/// run is not batched, and is left out of it too: Redis may hold it already.
#[test]
fn a_unit_counted_in_fallback_is_batched_under_the_lock_it_is_counted_under() {
    let counters = LocalCounters::default();
    let customer = [5; 16];
    counters.follow(&customer, &mut told(5, Some(42), Some(42)), VIA);
    let never_ran = counters.admit_fallback(&customer, &policy(&[], None), PERIOD, 1, 1_000, None);
    let reservation = never_ran.reservation.expect("admitted");
    assert_eq!(never_ran.counted, Counted::Fallback);
    let Some(FallbackUnit::Batch(token)) = reservation.fallback else {
        panic!("not batched: {:?}", reservation.fallback);
    };
    assert_eq!(counters.used(&customer, PERIOD), (6, 0));
    assert_eq!(counters.known(&customer, PERIOD).used, 5);

    let may_have_run = counters.admit_fallback(
        &customer,
        &policy(&[], None),
        PERIOD,
        1,
        1_000,
        Some(sent(1_000)),
    );
    assert_eq!(
        may_have_run.reservation.expect("admitted").fallback,
        Some(FallbackUnit::MaybeInRedis)
    );
    assert_eq!(counters.used(&customer, PERIOD), (7, 0));
    assert_eq!(counters.known(&customer, PERIOD).used, 5);

    let taken = counters.take_unshared(&customer);
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].token, taken[0].units, taken[0].generation),
        (token, 1, 42)
    );
}

/// What Redis says a customer used does not take out of this process's count the units it
/// counted that Redis may not hold yet: before, a slow Redis answering some calls in time set the
/// count back to its own, and the units counted here for calls that timed out meanwhile were
/// admitted again (a hard quota of 1,000 admitted 1,483 of a burst of 1,500).
#[test]
fn redis_answering_keeps_the_units_counted_here_that_it_may_not_hold_yet() {
    let counters = LocalCounters::default();
    let customer = [4; 16];
    let none = policy(&[], None);
    counters.follow(&customer, &mut told(5, Some(42), Some(42)), VIA);
    // Its call never ran: batched for Redis.
    counters.admit_fallback(&customer, &none, PERIOD, 1, 1_000, None);
    // Its call, sent by 1,050, timed out: it may still run there.
    counters.admit_fallback(&customer, &none, PERIOD, 2, 1_000, Some(sent(1_050)));
    assert_eq!(counters.used(&customer, PERIOD), (8, 0));
    // Answers to calls sent at `sent_ms`, decided at the count's `version`.
    let answered = |used, sent_ms, version| Decision {
        count_version: Some(version),
        ..told_with(used, Some(42), Some(42), Vec::new(), sent_ms)
    };
    // A call that left before the timed-out one: neither the batch nor those units are in it.
    counters.follow(&customer, &mut answered(6, 1_020, 1), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // On its way to Redis, the batch still counts.
    let batch = counters.take_unshared(&customer);
    assert_eq!(batch.len(), 1);
    counters.follow(&customer, &mut answered(6, 1_040, 1), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // Taken by Redis, its count at version 3 then: an answer decided at version 2 lacks it,
    // one decided at 3 holds it.
    let third = Taken {
        at_ms: 1_045,
        version: 3,
    };
    counters.settle_unshared(&customer, &batch[0], Some(third));
    counters.follow(&customer, &mut answered(6, 1_045, 2), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    counters.follow(&customer, &mut answered(7, 1_046, 3), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // A call sent after the timed-out one: Redis ran that one first (here, it counted it), or
    // never will.
    counters.follow(&customer, &mut answered(9, 1_100, 4), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // An answer older than one followed already (their calls overtook one another) does not
    // take the count back.
    counters.follow(&customer, &mut answered(7, 1_047, 3), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // Units whose call may still run count until an answer to a call sent after theirs.
    counters.admit_fallback(&customer, &none, PERIOD, 1, 2_000, Some(sent(2_000)));
    counters.follow(&customer, &mut answered(9, 1_990, 5), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (10, 0));
    counters.follow(&customer, &mut answered(9, 2_001, 6), VIA);
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
}

/// A request Redis admitted that this process refuses (units counted here while its call was on
/// its way left no room) is refused here; the units counted here stay in the count.
#[test]
fn units_whose_calls_left_after_the_answered_one_stay_beyond_its_answer() {
    let counters = LocalCounters::default();
    let customer = [3; 16];
    let none = policy(&[], None);
    counters.follow(&customer, &mut told(9, Some(42), Some(42)), VIA);
    // Sent at 1,050, timed out, counted here: 10.
    counters.admit_fallback(&customer, &none, PERIOD, 1, 1_000, Some(sent(1_050)));
    // The answer to a call sent at 1,000, which Redis admitted (10 there too): 11 here.
    let mut answer = Decision {
        count_version: Some(7),
        ..told_with(10, Some(42), Some(42), Vec::new(), 1_000)
    };
    let followed = counters.follow(&customer, &mut answer, VIA);
    assert_eq!(
        followed,
        Followed {
            used: 11,
            window_full: false
        }
    );
    // Through another connection, an answer to a call sent later may still lack it.
    let mut other = Decision {
        count_version: Some(8),
        ..told_with(11, Some(42), Some(42), Vec::new(), 1_100)
    };
    assert_eq!(counters.follow(&customer, &mut other, VIA + 1).used, 12);
    // Through the same one, it holds it.
    let mut same = Decision {
        count_version: Some(9),
        ..told_with(12, Some(42), Some(42), Vec::new(), 1_100)
    };
    assert_eq!(counters.follow(&customer, &mut same, VIA).used, 12);
}

/// The reservation of one unit `customer` (on a plan without limits) is admitted in process
/// for at `at_ms`, its call `sent` and timed out.
fn admitted_unit(counters: &LocalCounters, customer: &Id, at_ms: i64, sent: Sent) -> Reservation {
    counters
        .admit_fallback(customer, &policy(&[], None), PERIOD, 1, at_ms, Some(sent))
        .reservation
        .expect("admitted")
}

/// Redis counted the unit of a call followed to its end.
const COUNTED: LateAnswer = LateAnswer::Admitted { overage: 0 };

/// A call followed to its end ([`VIA_AWAITING`]) at 1,000 + `ms`.
fn awaiting(ms: i64) -> Sent {
    Sent {
        at_ms: 1_000 + ms,
        via: VIA_AWAITING,
    }
}

/// An answer of Redis to a call sent at `sent_ms`, `used` there, at `version`.
fn answer_at(used: u64, sent_ms: i64, version: i64) -> Decision {
    Decision {
        count_version: Some(version),
        ..told_with(used, Some(42), Some(42), Vec::new(), sent_ms)
    }
}

/// What Redis in the end answers a call that timed out settles where the unit of the request
/// admitted here in its stead is: one Redis counted is held beyond answers to calls sent before
/// its answer came (through any connection), and no longer; one Redis refused (no room left,
/// or a window full) joins a batch for Redis, so that its count comes to hold it.
#[test]
fn a_late_answer_settles_where_a_unit_admitted_here_is_counted() {
    let counters = LocalCounters::default();
    let customer = [4; 16];
    counters.follow(&customer, &mut told(9, Some(42), Some(42)), VIA);
    // Two calls time out, sent at 1,050 and 1,060: both admitted here, 11.
    let first = admitted_unit(&counters, &customer, 1_000, awaiting(50));
    let second = admitted_unit(&counters, &customer, 1_000, awaiting(60));
    assert!(matches!(first.fallback, Some(FallbackUnit::Awaiting(_))));
    assert_eq!(counters.used(&customer, PERIOD), (11, 0));
    // Until their answers come, no answer holds them, whatever its order or connection.
    assert_eq!(
        counters
            .follow(&customer, &mut answer_at(9, 1_100, 8), VIA)
            .used,
        11
    );
    // Redis counted the first (its answer came at 1,200) and refused the second.
    assert_eq!(
        counters.late_answer(&customer, &first, awaiting(50), COUNTED, 1_200),
        None
    );
    assert_eq!(
        counters.late_answer(
            &customer,
            &second,
            awaiting(60),
            LateAnswer::NotCounted,
            1_210
        ),
        None
    );
    assert_eq!(counters.used(&customer, PERIOD), (11, 0));
    let batch = counters.take_unshared(&customer);
    assert_eq!(
        batch
            .iter()
            .map(|b| (b.units, b.generation))
            .collect::<Vec<_>>(),
        [(1, 42)]
    );
    // An answer to a call sent at 1,150 may lack the first (9 there, whatever the connection):
    // 9 + the first + the batch.
    assert_eq!(
        counters
            .follow(&customer, &mut answer_at(9, 1_150, 9), VIA + 1)
            .used,
        11
    );
    // One to a call sent at 1,300, through any connection, holds it: 10 + the batch.
    assert_eq!(
        counters
            .follow(&customer, &mut answer_at(10, 1_300, 10), VIA + 1)
            .used,
        11
    );
    // A unit an answer through the call's own connection let go of (a call that broke, taken
    // to have run), which Redis in the end says it did not count, is put back, in a batch.
    let broke = admitted_unit(&counters, &customer, 1_400, sent(1_400));
    assert_eq!(
        counters
            .follow(&customer, &mut answer_at(10, 1_500, 11), VIA)
            .used,
        11
    );
    let as_awaited = Reservation {
        fallback: Some(FallbackUnit::Awaiting(7)),
        ..broke
    };
    {
        let mut shard = counters.shard(&customer);
        let fallback = shard.get_mut(&customer).unwrap().fallback.as_mut().unwrap();
        fallback.awaiting.push((7, 1_400, false));
    }
    counters.late_answer(
        &customer,
        &as_awaited,
        sent(1_400),
        LateAnswer::NotCounted,
        1_600,
    );
    assert_eq!(counters.used(&customer, PERIOD), (12, 0));
    // Refunds go where the answers put the units: Redis' count, and the batch.
    let token = |r: &Reservation| match r.fallback {
        Some(FallbackUnit::Awaiting(token)) => token,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        counters.refund_awaiting(&customer, &first, token(&first)),
        Some(Settled::InRedis { overage: 0 })
    );
    assert_eq!(
        counters.refund_awaiting(&customer, &second, token(&second)),
        Some(Settled::Batch(batch[0].token))
    );
}

/// A request admitted here whose call is awaited and whose unit is given back meanwhile (an
/// upstream 5xx): its refund waits for the answer, which says where it goes. Before, it was
/// sent to Redis at once, and dropped if Redis did not answer: a unit Redis counted stayed.
#[test]
fn a_unit_given_back_while_its_call_is_awaited_is_given_back_where_redis_put_it() {
    let counters = LocalCounters::default();
    let customer = [5; 16];
    counters.follow(&customer, &mut told(9, Some(42), Some(42)), VIA);
    let admit = |ms: i64| admitted_unit(&counters, &customer, 1_000, awaiting(ms));
    let (counted, refused) = (admit(10), admit(20));
    for reservation in [&counted, &refused] {
        let Some(FallbackUnit::Awaiting(token)) = reservation.fallback else {
            panic!("not awaited");
        };
        assert_eq!(
            counters.refund_awaiting(&customer, reservation, token),
            None
        );
        counters.refund(&customer, reservation);
    }
    assert_eq!(counters.used(&customer, PERIOD), (9, 0));
    // They left the count here: an answer meanwhile does not bring them back.
    assert_eq!(
        counters
            .follow(&customer, &mut answer_at(9, 1_050, 7), VIA)
            .used,
        9
    );
    // Redis counted the first: give it back there. It refused the second: nothing to do.
    assert_eq!(
        counters.late_answer(&customer, &counted, awaiting(10), COUNTED, 1_100),
        Some(0)
    );
    assert_eq!(
        counters.late_answer(
            &customer,
            &refused,
            awaiting(20),
            LateAnswer::NotCounted,
            1_110
        ),
        None
    );
    assert!(counters.take_unshared(&customer).is_empty());
    // Nothing of theirs is left beyond an answer.
    assert_eq!(
        counters
            .follow(&customer, &mut answer_at(9, 900, 8), VIA)
            .used,
        9
    );
}

/// However many calls time out, the units admitted here are kept in a few entries, one
/// connection's never merged into another's (a unit awaiting its answer merged into the
/// entry of a call that has run would be let go of before its answer; one merged into an
/// awaited entry would wait for an answer that never takes it); and a call whose answer is
/// never heard of (the task following it ended) is let go of after 30 s.
#[test]
fn units_of_different_connections_are_kept_apart_and_awaited_ones_not_for_ever() {
    let counters = LocalCounters::default();
    let customer = [6; 16];
    let roomy = [RateLimit {
        requests: 1_000_000,
        window_seconds: 3_600,
    }];
    let limits = policy(&roomy, None);
    counters.follow(&customer, &mut told(0, Some(42), Some(42)), VIA);
    for i in 0..500 {
        let at_ms = 1_000 + 50 * i;
        let sent = if i % 2 == 0 {
            awaiting(50 * i)
        } else {
            sent(at_ms)
        };
        counters.admit_fallback(&customer, &limits, PERIOD, 1, at_ms, Some(sent));
    }
    let (maybe, windows) = {
        let shard = counters.shard(&customer);
        let fallback = shard[&customer].fallback.as_ref().unwrap();
        (fallback.maybe.clone(), fallback.in_windows.clone())
    };
    assert!(maybe.len() <= unshared::MAYBE_KEPT + 1, "{}", maybe.len());
    assert!(windows.len() <= unshared::IN_WINDOWS_KEPT + 1);
    let units_of = |via| {
        maybe
            .iter()
            .filter(|m| m.sent.via == via)
            .map(|m| m.units)
            .sum::<u64>()
    };
    assert_eq!((units_of(VIA_AWAITING), units_of(VIA)), (250, 250));
    // An answer to a call sent after them all through VIA holds VIA's units, not the others.
    let last = 1_000 + 50 * 500;
    let mut answer = told_with(
        250,
        Some(42),
        Some(42),
        vec![WindowState {
            limit: 1_000_000,
            window_ms: 3_600_000,
            remaining: 1_000_000 - 250,
            reset_ms: 0,
        }],
        last,
    );
    assert_eq!(counters.follow(&customer, &mut answer, VIA).used, 500);
    assert_eq!(answer.windows[0].remaining, 1_000_000 - 500);
    // Thirty seconds after the last was sent, none is awaited any more.
    let mut answer = told_with(250, Some(42), Some(42), Vec::new(), last + 30_001);
    assert_eq!(counters.follow(&customer, &mut answer, VIA).used, 250);
}

/// Batches Redis took are remembered a call timeout at most, and never more than a few entries,
/// whatever follows them: before, a customer whose answers were not followed (a plan without
/// limits) kept one per batch until its period ended.
#[test]
fn batches_redis_took_are_kept_a_few_entries_for_a_call_timeout() {
    let counters = LocalCounters::default();
    let customer = [2; 16];
    counters.follow(&customer, &mut told(0, Some(42), Some(42)), VIA);
    for i in 0..1_000 {
        counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
        let batch = counters.take_unshared(&customer).remove(0);
        let taken = Taken {
            at_ms: i64::from(i),
            version: i64::from(i) + 1,
        };
        counters.settle_unshared(&customer, &batch, Some(taken));
    }
    let kept = counters.shard(&customer)[&customer]
        .fallback
        .as_ref()
        .unwrap()
        .landed
        .len();
    assert!(kept <= 64, "{kept}");
    // An answer decided before the last of them lacks them; one after holds them all.
    let answered = |version| Decision {
        count_version: Some(version),
        ..told_with(1_000, Some(42), Some(42), Vec::new(), 1_000)
    };
    assert!(counters.follow(&customer, &mut answered(900), VIA).used > 1_000);
    assert_eq!(
        counters.follow(&customer, &mut answered(1_000), VIA).used,
        1_000
    );
}

#[test]
fn units_counted_while_redis_failed_are_taken_once_each_for_their_own_period() {
    let counters = LocalCounters::default();
    let customer = [6; 16];
    assert!(counters.take_unshared(&customer).is_empty());
    // Last counted in Redis in generation 42 of its quota count.
    counters.follow(&customer, &mut told(5, Some(42), Some(42)), VIA);
    let token = counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    // Into the same batch.
    assert_eq!(
        counters.note_unshared(&customer, &fallback(2, 1, PERIOD)),
        token
    );
    assert_eq!(counters.take_pending(), vec![customer]);
    // A refund of one of them takes it back from the batch while it is unsent.
    assert!(counters.refund_unshared(&customer, &fallback(1, 0, PERIOD), token));
    let taken = counters.take_unshared(&customer);
    assert_eq!(taken.len(), 1);
    assert_eq!(
        (taken[0].units, taken[0].overage, taken[0].generation),
        (2, 1, 42)
    );
    assert!(counters.take_unshared(&customer).is_empty());
    // Added to Redis since: a refund now belongs in Redis, and the batch's mark may go with
    // the next call to that period's count.
    counters.settle_unshared(&customer, &taken[0], TAKEN);
    assert!(!counters.refund_unshared(&customer, &fallback(1, 0, PERIOD), token));
    let next = Period {
        start_ms: PERIOD.end_ms,
        end_ms: PERIOD.end_ms * 2,
    };
    assert!(counters.take_answered(&customer, next).is_empty());
    assert_eq!(counters.take_answered(&customer, PERIOD), vec![token]);
    assert!(counters.take_answered(&customer, PERIOD).is_empty());
    // A batch sent twice (its first call timed out) keeps its mark: that call may still
    // arrive.
    counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    let first = counters.take_unshared(&customer).remove(0);
    counters.restore_unshared(&customer, first, true);
    let again = counters.take_unshared(&customer).remove(0);
    counters.settle_unshared(&customer, &again, TAKEN);
    assert!(counters.take_answered(&customer, PERIOD).is_empty());
    // Refused by Redis (its count was rebuilt from the ledger): a refund goes nowhere.
    let refused = counters.note_unshared(&customer, &fallback(4, 0, PERIOD));
    let batch = counters.take_unshared(&customer).remove(0);
    counters.settle_unshared(&customer, &batch, None);
    assert!(counters.refund_unshared(&customer, &fallback(1, 0, PERIOD), refused));
    // Units of a period that has ended are kept while Redis keeps its count, and taken for
    // it; a sweep past that drops them.
    counters.note_unshared(&customer, &fallback(3, 0, PERIOD));
    counters.sweep(PERIOD.end_ms + QUOTA_KEY_GRACE_MS - 1);
    let late = counters.take_unshared(&customer);
    assert_eq!((late.len(), late[0].units, late[0].period), (1, 3, PERIOD));
    counters.note_unshared(&customer, &fallback(5, 0, PERIOD));
    counters.sweep(PERIOD.end_ms + QUOTA_KEY_GRACE_MS);
    assert!(counters.take_unshared(&customer).is_empty());
    assert_eq!(counters.unshared.load(Ordering::Relaxed), 0);
}

#[test]
fn refunds_go_where_their_units_went() {
    let counters = LocalCounters::default();
    let customer = [8; 16];
    // Counted in Redis, but its count there was not rebuilt from the ledger yet: the batch is
    // for an unknown generation, which Redis places by when its count was made.
    counters.follow(&customer, &mut told(5, None, None), VIA);
    counters.note_unshared(&customer, &fallback(2, 0, PERIOD));
    assert_eq!(
        counters.take_unshared(&customer)[0].generation,
        UNKNOWN_GENERATION
    );
    counters.follow(&customer, &mut told(5, Some(1), Some(1)), VIA);
    let refused = counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    let batch = counters.take_unshared(&customer).remove(0);
    // Redis did not take that batch (its count is newer): a refund of its unit is nobody's.
    counters.settle_unshared(&customer, &batch, None);
    assert!(counters.refund_unshared(&customer, &fallback(1, 0, PERIOD), refused));
    // A batch sent without an answer: the refund is Redis'.
    let sent = counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    let batch = counters.take_unshared(&customer).remove(0);
    counters.restore_unshared(&customer, batch, true);
    assert!(!counters.refund_unshared(&customer, &fallback(1, 0, PERIOD), sent));
    // A batch long forgotten: Redis' too.
    assert!(!counters.refund_unshared(&customer, &fallback(1, 0, PERIOD), 7));
    // A batch on its way to Redis: its refunds wait for the answer. Refused, they are nobody's;
    // taken, they are Redis' to give.
    for shared in [false, true] {
        let token = counters.note_unshared(&customer, &fallback(2, 0, PERIOD));
        let batch = counters.take_unshared(&customer).remove(0);
        assert!(counters.refund_unshared(&customer, &fallback(1, 0, PERIOD), token));
        let refunds =
            counters.settle_unshared(&customer, &batch, if shared { TAKEN } else { None });
        let expected = if shared {
            vec![fallback(1, 0, PERIOD)]
        } else {
            Vec::new()
        };
        assert_eq!(refunds, expected, "shared: {shared}");
    }
}

#[test]
fn a_batch_put_back_unanswered_takes_no_more_units() {
    let counters = LocalCounters::default();
    let customer = [7; 16];
    counters.follow(&customer, &mut told(0, Some(7), Some(7)), VIA);
    counters.note_unshared(&customer, &fallback(4, 0, PERIOD));
    let sent = counters.take_unshared(&customer).remove(0);
    counters.restore_unshared(&customer, sent, true);
    // Redis may have counted the first batch already: new units make a batch of their own.
    let newer = counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    assert_ne!(newer, sent.token);
    counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    // A batch that was never sent stays open.
    let mut batches = counters.take_unshared(&customer);
    assert_eq!(batches.len(), 2);
    assert_eq!((batches[0].units, batches[0].token), (4, sent.token));
    assert_eq!((batches[1].units, batches[1].token), (2, newer));
    let unsent = batches.remove(1);
    counters.restore_unshared(&customer, unsent, false);
    counters.note_unshared(&customer, &fallback(3, 0, PERIOD));
    let batches = counters.take_unshared(&customer);
    assert_eq!(batches.len(), 1);
    assert_eq!((batches[0].units, batches[0].token), (5, unsent.token));
    // Counted in a new generation (Redis rebuilt the count): a batch of its own.
    counters.follow(&customer, &mut told(0, Some(8), Some(8)), VIA);
    counters.note_unshared(&customer, &fallback(1, 0, PERIOD));
    assert_eq!(counters.take_unshared(&customer)[0].generation, 8);
    assert_eq!(counters.unshared.load(Ordering::Relaxed), 0);
}

#[test]
fn a_sweep_forgets_empty_windows_then_customers_whose_period_is_over() {
    let counters = LocalCounters::default();
    let limits = [RateLimit {
        requests: 10,
        window_seconds: 1,
    }];
    let quota = Some(QuotaLimit {
        limit: 100,
        hard: true,
    });
    let (busy, idle) = ([10; 16], [11; 16]);
    counters.admit(&idle, &policy(&limits, quota), PERIOD, 1, 1_000);
    counters.admit(&busy, &policy(&limits, quota), PERIOD, 1, 1_000);
    counters.follow(&busy, &mut told(1, Some(3), Some(3)), VIA);
    counters.note_unshared(&busy, &fallback(1, 0, PERIOD));
    // Within the window: everything counts.
    assert_eq!(counters.sweep(1_500), 2);
    let windows = |customer: &Id| counters.shard(customer)[customer].windows.len();
    assert_eq!((windows(&idle), windows(&busy)), (1, 1));
    // The window is empty, the period is not over: the quota counts stay.
    assert_eq!(counters.sweep(3_000), 2);
    assert_eq!((windows(&idle), windows(&busy)), (0, 0));
    assert_eq!(counters.used(&idle, PERIOD), (1, 0));
    // The period is over: the idle customer goes; the busy one stays while it has units
    // to add to Redis, whose count of that period lives a day longer, then goes too.
    assert_eq!(counters.unshared.load(Ordering::Relaxed), 1);
    assert_eq!(counters.sweep(PERIOD.end_ms), 1);
    assert_eq!(counters.used(&idle, PERIOD), (0, 0));
    assert_eq!(counters.unshared.load(Ordering::Relaxed), 1);
    assert_eq!(counters.sweep(PERIOD.end_ms + QUOTA_KEY_GRACE_MS), 0);
    assert_eq!(counters.unshared.load(Ordering::Relaxed), 0);
    let next = Period {
        start_ms: PERIOD.end_ms,
        end_ms: PERIOD.end_ms * 2,
    };
    // A customer forgotten starts again from nothing in the new period.
    let decision = counters.admit(&idle, &policy(&limits, quota), next, 1, PERIOD.end_ms);
    assert_eq!((decision.verdict, decision.used), (Verdict::Admitted, 1));
}

/// Redis' answer about a window of 10 per minute: `remaining` left, this request counted.
fn window_told(remaining: u64, sent_ms: i64) -> Decision {
    let state = WindowState {
        limit: 10,
        window_ms: 60_000,
        remaining,
        reset_ms: 1_000,
    };
    told_with(0, None, None, vec![state], sent_ms)
}

const TEN_A_MINUTE: [RateLimit; 1] = [RateLimit {
    requests: 10,
    window_seconds: 60,
}];

/// Units admitted here never reach Redis' windows: an answer holds them only if their call ran
/// before the answered one. Before, each answer set the window here to Redis' count alone, and
/// one gateway admitted about twice a window's limit while Redis answered some calls and not
/// others.
#[test]
fn requests_admitted_here_stay_in_the_windows_beyond_what_redis_answers() {
    let counters = LocalCounters::default();
    let customer = [6; 16];
    let limits = policy(&TEN_A_MINUTE, None);
    // Redis counted 4. Then three calls time out (sent by 1,100) and two are not made (Redis
    // known to be failing): five admitted here.
    let mut first = window_told(6, 1_000);
    assert!(!counters.follow(&customer, &mut first, VIA).window_full);
    for _ in 0..3 {
        let decision =
            counters.admit_fallback(&customer, &limits, PERIOD, 1, 1_100, Some(sent(1_100)));
        assert_eq!(decision.verdict, Verdict::Admitted);
    }
    for _ in 0..2 {
        let decision = counters.admit_fallback(&customer, &limits, PERIOD, 1, 1_150, None);
        assert_eq!(decision.verdict, Verdict::Admitted);
    }
    // Redis answers a call sent at 1,050, before the three: 6 counted there (a unit of another
    // gateway, and this request's). None of the five is in it: 11 of 10, so this request gets
    // no room, and the window says none is left.
    let mut late = window_told(4, 1_050);
    let followed = counters.follow(&customer, &mut late, VIA);
    assert!(followed.window_full);
    assert_eq!(late.windows[0].remaining, 0);
    // A call sent at 1,200, after the three, ran after them: Redis holds them (it counted 8
    // with this request), but not the two never sent: 10 of 10, this request fits exactly.
    let mut after = window_told(2, 1_200);
    let followed = counters.follow(&customer, &mut after, VIA);
    assert!(!followed.window_full);
    assert_eq!(after.windows[0].remaining, 0);
    // Counting here again: the window is full.
    let decision = counters.admit_fallback(&customer, &limits, PERIOD, 1, 1_300, None);
    assert_eq!(decision.verdict, Verdict::RateLimited);
}

/// Units admitted here leave the windows as they would have in Redis: a minute (and a bucket)
/// later, an answer does not count them any more; and however many requests fall back, only a
/// few entries are kept.
#[test]
fn units_admitted_here_leave_the_windows_in_time_and_take_little_memory() {
    let counters = LocalCounters::default();
    let customer = [7; 16];
    let limits = policy(&TEN_A_MINUTE, None);
    // Ten requests 200 ms apart, no call made for any: ten entries.
    for i in 0..10 {
        counters.admit_fallback(&customer, &limits, PERIOD, 1, 1_000 + 200 * i, None);
    }
    let entries = |counters: &LocalCounters| {
        counters.shard(&customer)[&customer]
            .fallback
            .as_ref()
            .map_or(0, |f| f.in_windows.len())
    };
    assert_eq!(entries(&counters), 10);
    // At 62,999 they all still count (their bucket is [0, 3,000)): Redis' 9 plus 10 is over.
    let mut answer = window_told(1, 62_999);
    assert!(counters.follow(&customer, &mut answer, VIA).window_full);
    assert_eq!(entries(&counters), 10);
    // At 63,000 they are out of the window, and forgotten.
    let mut answer = window_told(1, 63_000);
    assert!(!counters.follow(&customer, &mut answer, VIA).window_full);
    assert_eq!(answer.windows[0].remaining, 1);
    assert_eq!(entries(&counters), 0);

    let roomy = [RateLimit {
        requests: 1_000_000,
        window_seconds: 60,
    }];
    for i in 0..1_000 {
        let at_ms = 100_000 + 150 * i;
        counters.admit_fallback(
            &customer,
            &policy(&roomy, None),
            PERIOD,
            1,
            at_ms,
            Some(sent(at_ms)),
        );
    }
    assert_eq!(entries(&counters), unshared::IN_WINDOWS_KEPT);
    // All 1,000 count beyond an answer to a call sent before them.
    let mut answer = told_with(
        0,
        None,
        None,
        vec![WindowState {
            limit: 1_000_000,
            window_ms: 60_000,
            remaining: 1_000_000,
            reset_ms: 0,
        }],
        100_000,
    );
    counters.follow(&customer, &mut answer, VIA);
    assert_eq!(answer.windows[0].remaining, 1_000_000 - 1_000);
}

/// A unit whose call is followed to its end stays beyond every answer until its own comes,
/// whatever the order of the calls: Redis may refuse it, and admit a call sent after it in a
/// unit given back meanwhile.
#[test]
fn a_unit_awaiting_its_own_answer_stays_beyond_every_other_answer() {
    let counters = LocalCounters::default();
    let customer = [8; 16];
    counters.follow(&customer, &mut told(9, Some(42), Some(42)), VIA);
    let awaiting = Sent {
        at_ms: 1_050,
        via: VIA_AWAITING,
    };
    let reservation = admitted_unit(&counters, &customer, 1_000, awaiting);
    let answer_at = |sent_ms: i64, version: i64| Decision {
        count_version: Some(version),
        ..told_with(9, Some(42), Some(42), Vec::new(), sent_ms)
    };
    for via in [VIA, VIA + 1, VIA_ANY] {
        assert_eq!(
            counters
                .follow(&customer, &mut answer_at(2_000, 8), via)
                .used,
            10
        );
    }
    // Redis refused it: it joins a batch, and stays in the count.
    counters.late_answer(
        &customer,
        &reservation,
        awaiting,
        LateAnswer::NotCounted,
        2_100,
    );
    assert_eq!(
        counters
            .follow(&customer, &mut answer_at(2_200, 9), VIA)
            .used,
        10
    );
    assert_eq!(counters.take_unshared(&customer)[0].units, 1);
}

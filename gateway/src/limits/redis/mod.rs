//! Shared counters in Redis (or a Redis Cluster): one script call per request decides and counts
//! every window and the quota of a customer atomically, so N gateways admit exactly what one
//! would. (A plan with neither has nothing to decide: its units reach the quota count in batches,
//! [`super::Limiter::share_pending`].)
//!
//! Every key of a customer carries the customer's id as its hash tag (`prefix:{cus_…}:r:60000`,
//! `prefix:{cus_…}:q:<period start>`), so one call touches one cluster slot. Windows are hashes of
//! bucket counts and their running total (the arithmetic of [`super::window`], in `admit.lua`);
//! the quota is a hash of units used and overage, kept until a day after its period ends. (Window
//! keys were named `…:w:<ms>` before they carried the running total; a gateway of that version
//! sharing Redis with this one counts apart from it until it is upgraded.)
//!
//! A quota key that does not exist (a new period, or Redis lost its data) is created and the
//! caller that created it is told to *seed* it: it reads from the usage ledger the customer's
//! count of the events before the key was made, and raises the key to that count plus what the
//! key counted since. So a flushed Redis never resets a quota. Two things the ledger lacks then
//! are made good:
//! - events still in the gateways' spools (a flush interval's worth): each gateway tells the new
//!   key its own count of the period (what Redis last told it, and what it counted since), and
//!   the key takes the highest it is told; and the creator reads the ledger once more
//!   ([`RedisCounters::reseed_due`]) when the spools have been flushed;
//! - requests counted between the key's creation and the seed (one ledger read, bounded by a
//!   timeout): they are in the key, and stay.
//!
//! Every count the key is raised to is one the customer has reached, so a rebuild never counts
//! a request twice.
//!
//! Two connections: the background service makes one at start (it loads the scripts, and
//! [`RedisCounters::is_connected`] reports it), and the first requests make a second on the
//! runtime that serves them, which every call goes through once made. A call through the first
//! crosses to the background runtime's thread and back (BENCHMARKS.md has what the second saves).
//!
//! A call that fails or takes longer than `timeout` is not retried on the request path: the
//! request is counted in process instead (see [`super::Limiter`]), and for `retry_after` every
//! request is, without waiting on Redis; then the next request tries Redis again. An admission
//! call that timed out is not dropped ([`Unanswered::late`]), but in a cluster: Redis runs it
//! all the same, and what it answers settles the request decided in process meanwhile. Between
//! requests, a `PING` every 250 ms (`watch`) finds a connection Redis broke before a request
//! needs it, and ends that wait as soon as Redis answers when it began with a broken connection
//! (Redis gone or restarted, not slow or answering errors).
//!
//! # Layout
//! - here: the admission call and its decision.
//! - `connection`: the two connections, and a call within the timeout.
//! - `watch`: the background service: connecting at start, then the `PING`s between requests.
//! - `marked`: adding batches and giving units back, once per mark.
//! - `seed`: rebuilding a lost quota count from the ledger, and waiting for another's rebuild.

mod connection;
mod marked;
mod seed;
mod watch;

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use redis::Script;

use connection::{Connection, Near};
pub use connection::{Failure, Late, Unanswered, VIA_BACKGROUND, Via};
pub use marked::{HeldRefund, RefundHolder, Sharing};
use marked::{REFUND_SCRIPT, SHARE_SCRIPT};
use seed::{Reseed, SEED_SCRIPT, UNSEEDED_SCRIPT, Unseeded};
pub use seed::{SEED_AGAIN_AFTER_FAILURE, SEED_CLAIM};
pub use watch::Connector;

use super::period::Period;
use super::window::WindowState;
use super::{Counted, Decision, Policy, ReseedQueue, Reservation, Verdict};
use crate::config::Redis;
use crate::identity::index::{Id, IdText};
use crate::metering::ledger::Ledger;
use crate::metrics::{Metrics, REDIS_CALL_DURATION, REDIS_ERRORS_TOTAL, REDIS_UP};

/// How long a quota key outlives its period.
pub const QUOTA_KEY_GRACE_MS: i64 = 86_400_000;

/// What this gateway knows of a customer's count in a period, told to the shared count so that
/// one Redis rebuilt goes on from there (see the module's documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Known {
    /// Units used, as Redis last said plus what this process counted since.
    pub used: u64,
    /// Of them, overage.
    pub overage: u64,
    /// The generation of the count they were last counted in, if known.
    pub generation: Option<i64>,
    /// Units counted in this process that Redis' count may not hold yet: batches not added to it
    /// yet or on their way (one that lands before this call runs is counted twice by it, so
    /// refusing early rather than late). A hard quota refuses as if they were in it.
    pub pending: u64,
}

/// What a call rebuilds a missing quota count from: this gateway's own count, and the ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rebuild<'a> {
    /// This gateway's count of the customer's period.
    pub known: Known,
    /// The usage ledger, when reachable.
    pub ledger: Option<&'a dyn Ledger>,
}

/// One request's call to the admit script, whatever the time it is made at.
#[derive(Clone, Copy)]
struct AdmitCall<'a> {
    customer: &'a Id,
    policy: &'a Policy<'a>,
    period: Period,
    units: u64,
    known: Known,
    /// The generation of a quota hash the call creates.
    token: i64,
}

/// The shared counters.
#[derive(Debug)]
pub struct RedisCounters {
    settings: Redis,
    /// Made at start by the background service, which drives it on its own runtime: readiness,
    /// and every call until `near` is made.
    connection: ArcSwapOption<Connection>,
    /// A second connection, made by the first requests on the runtime that serves them, whose
    /// workers then drive it themselves. Through `connection`, every call crosses to the
    /// background runtime's thread and back (by its design two thread wake-ups per request; what
    /// that cost was measured as a whole, in BENCHMARKS.md); through this one it does not.
    near: Arc<Near>,
    /// The certificate authorities the background connection was made with, once made.
    certificates: OnceLock<Option<redis::TlsCertificates>>,
    /// Shared with the calls that outlive their request ([`Connection::eval`]).
    admit: Arc<Script>,
    seed: Script,
    unseeded: Script,
    refund: Script,
    share: Script,
    /// Unix ms before which calls are not tried (after a failure).
    down_until_ms: AtomicI64,
    /// Whether that failure was a broken or refused connection, not a slow answer.
    broken: AtomicBool,
    /// Keys this gateway seeded, to seed once more.
    reseeds: ReseedQueue<Reseed>,
    /// Refunds whose call got no answer (the admission's own, and the requests' through
    /// [`super::Limiter::refund`]), for [`super::Limiter::share_pending`] to make again.
    held_refunds: RefundHolder,
    errors: IntCounterVec,
    duration: Histogram,
    /// 1 while Redis answers the probes' `PING`s.
    up: IntGauge,
}

impl RedisCounters {
    /// Counters at `settings`, not yet connected ([`connect`](Self::connect) does).
    pub fn new(settings: Redis, metrics: &Metrics) -> prometheus::Result<Self> {
        let errors = IntCounterVec::new(
            Opts::new(
                REDIS_ERRORS_TOTAL,
                "Counter calls to Redis that failed, by kind (timeout, error, unavailable).",
            ),
            &["kind"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                REDIS_CALL_DURATION,
                "Time of answered counter calls to Redis.",
            )
            // Up to the longest `timeout` (1 s): how close calls come to it shows.
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
        )?;
        let up = IntGauge::new(
            REDIS_UP,
            "1 while Redis answers the PING sent every 250 ms within 1 s, 0 otherwise.",
        )?;
        metrics.register(Box::new(errors.clone()))?;
        metrics.register(Box::new(duration.clone()))?;
        metrics.register(Box::new(up.clone()))?;
        for kind in ["timeout", "error", "unavailable"] {
            errors.with_label_values(&[kind]);
        }
        Ok(Self {
            settings,
            connection: ArcSwapOption::empty(),
            near: Arc::new(Near::default()),
            certificates: OnceLock::new(),
            admit: Arc::new(Script::new(ADMIT_SCRIPT)),
            seed: Script::new(SEED_SCRIPT),
            unseeded: Script::new(UNSEEDED_SCRIPT),
            refund: Script::new(REFUND_SCRIPT),
            share: Script::new(SHARE_SCRIPT),
            down_until_ms: AtomicI64::new(0),
            broken: AtomicBool::new(false),
            reseeds: ReseedQueue::default(),
            held_refunds: RefundHolder::default(),
            errors,
            duration,
            up,
        })
    }

    /// `prefix:{cus_…}:kind:n`, without `format!` (three of them per request).
    fn key(&self, customer: &Id, kind: &str, n: i64) -> String {
        let mut number = itoa::Buffer::new();
        let n = number.format(n);
        let prefix = &self.settings.key_prefix;
        let mut key = String::with_capacity(prefix.len() + kind.len() + n.len() + 44);
        key.push_str(prefix);
        key.push_str(":{");
        key.push_str(IdText::new(b"cus", customer).as_str());
        key.push_str("}:");
        key.push_str(kind);
        key.push(':');
        key.push_str(n);
        key
    }

    /// Sets how long after seeding a quota key from the ledger it is seeded again: longer than
    /// it takes a request's usage event to reach the ledger (the flush interval, and more).
    pub fn reseed_after(&self, after: Duration) {
        self.reseeds.set_after(after);
    }

    /// [`decide`](Self::decide), the decision alone: a call that times out is dropped.
    pub async fn admit(
        &self,
        customer: &Id,
        policy: &Policy<'_>,
        period: Period,
        units: u64,
        now_ms: i64,
        rebuild: Rebuild<'_>,
    ) -> Result<Decision, Failure> {
        self.decide(customer, policy, period, units, now_ms, rebuild)
            .await
            .map(|(decision, _)| decision)
            .map_err(|not_decided| not_decided.failure)
    }

    /// Decides a request in Redis; a quota key this call finds missing is made again from
    /// `rebuild`. Also says which connection decided.
    pub async fn decide(
        &self,
        customer: &Id,
        policy: &Policy<'_>,
        period: Period,
        units: u64,
        now_ms: i64,
        rebuild: Rebuild<'_>,
    ) -> Result<(Decision, Via), NotDecided> {
        let Rebuild { known, ledger } = rebuild;
        let call = AdmitCall {
            customer,
            policy,
            period,
            units,
            known,
            // The generation of a quota hash this call creates: 1 to 2^53 - 1, whole in Lua.
            token: (uuid::Uuid::new_v4().as_u128() as i64 & ((1 << 53) - 1)).max(1),
        };
        // Decided later than asked when it waited for another caller's seed.
        let (reply, now_ms, via) = self
            .call_seeded(&call, now_ms)
            .await
            .map_err(|unanswered| unanswered.map_late(late_answer))?;
        let value = |i: usize| reply.get(i).copied().unwrap_or(0);
        let as_u64 = |i: usize| u64::try_from(value(i)).unwrap_or(0);
        let verdict = match value(0) {
            0 => Verdict::Admitted,
            1 => Verdict::RateLimited,
            _ => Verdict::QuotaExceeded,
        };
        let mut verdict = verdict;
        let mut used = as_u64(1);
        let mut reserved_overage = as_u64(3);
        let tail = 5 + 2 * policy.rate_limits.len();
        let mut generation = (value(tail) == 1).then_some(value(tail + 1));
        if value(4) > 0 {
            let made_ms = value(4);
            let seeded = self
                .seed(customer, period, made_ms, value(tail + 1), now_ms, ledger)
                .await;
            if seeded == Err(Unseeded::Failed) {
                self.mark_unseeded(customer, period, value(tail + 1), now_ms)
                    .await;
            }
            if ledger.is_some() {
                let reseed = Reseed {
                    customer: *customer,
                    period,
                    made_ms,
                    generation: value(tail + 1),
                };
                self.reseeds.push(period, made_ms, reseed);
            }
            if seeded.is_ok() {
                generation = Some(value(tail + 1));
            }
            used += seeded.unwrap_or(0);
            // Admitted on the count before the seed: the seeded count decides.
            if let Some(quota) = policy.quota
                && verdict == Verdict::Admitted
                && used > quota.limit
            {
                if quota.hard {
                    let reservation = Reservation {
                        period,
                        at_ms: now_ms,
                        units,
                        overage: reserved_overage,
                        counted: Counted::Redis,
                        fallback: None,
                    };
                    // Rare (the call that made the count, over its quota once seeded): its
                    // mark stays until the count expires. Refused whatever Redis answers: a
                    // refund that got no answer is made again, once.
                    let token = uuid::Uuid::new_v4().as_u128();
                    if let Err(failure) = self
                        .refund(customer, &reservation, token, &[], now_ms, false)
                        .await
                    {
                        self.hold_refund(HeldRefund {
                            customer: *customer,
                            reservation,
                            token,
                            sealed: failure.may_have_run(),
                        });
                    }
                    verdict = Verdict::QuotaExceeded;
                    used -= units;
                } else {
                    reserved_overage = units.min(used - quota.limit);
                }
            }
        }
        let windows = policy
            .rate_limits
            .iter()
            .enumerate()
            .map(|(i, window)| WindowState {
                limit: window.requests,
                window_ms: super::window_ms(window.window_seconds),
                remaining: as_u64(5 + 2 * i),
                reset_ms: value(6 + 2 * i),
            })
            .collect();
        Ok((
            Decision {
                verdict,
                windows,
                quota: policy.quota,
                period,
                at_ms: now_ms,
                used,
                reservation: (verdict == Verdict::Admitted).then_some(Reservation {
                    period,
                    at_ms: now_ms,
                    units,
                    overage: reserved_overage,
                    counted: Counted::Redis,
                    fallback: None,
                }),
                counted: Counted::Redis,
                generation,
                counted_in: Some(value(tail + 1)),
                count_version: Some(value(tail + 2)),
            },
            via,
        ))
    }
}

/// What Redis in the end answered an admission call that timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LateAnswer {
    /// It admitted the request and counted its units, `overage` of them past a soft quota.
    Admitted { overage: u64 },
    /// It counted nothing (it refused the request, or waited for a rebuild of the count).
    NotCounted,
    /// Nothing: the connection gave up on the call, which ran before then or never will.
    Unknown,
}

impl LateAnswer {
    /// Whether Redis counted the call's units; `None` when that is not known.
    pub fn counted(self) -> Option<bool> {
        match self {
            LateAnswer::Admitted { .. } => Some(true),
            LateAnswer::NotCounted => Some(false),
            LateAnswer::Unknown => None,
        }
    }
}

/// An admission Redis did not decide in time; when its call timed out, the call, coming to
/// what Redis answered it in the end.
pub type NotDecided = Unanswered<LateAnswer>;

/// What Redis' answer to an admission call that timed out comes to.
fn late_answer(answer: redis::RedisResult<seed::Numbers>) -> LateAnswer {
    match answer {
        Ok(seed::Numbers(reply)) if reply.first() == Some(&0) => LateAnswer::Admitted {
            overage: reply.get(3).map_or(0, |&o| u64::try_from(o).unwrap_or(0)),
        },
        Ok(_) => LateAnswer::NotCounted,
        Err(error) => {
            tracing::debug!(%error, "an admission call that timed out got no answer");
            LateAnswer::Unknown
        }
    }
}

/// Decides and counts one request.
const ADMIT_SCRIPT: &str = include_str!("admit.lua");

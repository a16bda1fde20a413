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
//! request is, without waiting on Redis; then the next request tries Redis again.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisResult, Script, ScriptInvocation};

use super::local::Unshared;
use super::period::Period;
use super::window::{SLOTS, WindowState};
use super::{Counted, Decision, Policy, ReseedQueue, Reservation, Verdict};
use crate::config::{Redis, RedisNodes};
use crate::identity::index::{Id, IdText};
use crate::metering::ledger::Ledger;
use crate::metrics::{Metrics, REDIS_CALL_DURATION, REDIS_ERRORS_TOTAL};

/// How long a quota key outlives its period.
pub const QUOTA_KEY_GRACE_MS: i64 = 86_400_000;
/// The admit script's verdict while another caller seeds the quota from the ledger.
const SEEDING: i64 = 3;
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the connection waits for an answer before it counts as broken.
const CONNECTION_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first and the longest wait between two attempts at the near connection.
const NEAR_RETRY_MIN: Duration = Duration::from_millis(250);
const NEAR_RETRY_MAX: Duration = Duration::from_secs(10);

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
}

/// What a call rebuilds a missing quota count from: this gateway's own count, and the ledger.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rebuild<'a> {
    /// This gateway's count of the customer's period.
    pub known: Known,
    /// The usage ledger, when reachable.
    pub ledger: Option<&'a dyn Ledger>,
}

/// A quota key this gateway seeded, to seed again from the ledger once the gateways' spools
/// have been flushed into it.
#[derive(Debug, Clone, Copy)]
struct Reseed {
    customer: Id,
    period: Period,
    /// When the key was made: the ledger's events before then.
    made_ms: i64,
    generation: i64,
}

/// What became of a batch sent to Redis ([`RedisCounters::share`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Added to the count it was counted for (now, or by an earlier call).
    Added,
    /// Added to a count Redis made again after losing that one, before any of its units was
    /// decided: the new count held them in no part.
    AddedToLater,
    /// Not added: the count it was counted for is gone and the one made since may hold some
    /// of its units (in the ledger's part), or there is none.
    Refused,
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

/// How long a caller that makes a quota key again holds its claim to seed it from the ledger:
/// its reading ([`SEED_TIMEOUT`](super::SEED_TIMEOUT)) and the seed's call. Other callers of a
/// plan with a quota wait for it meanwhile; past it, the next caller takes the claim.
pub const SEED_CLAIM: Duration = Duration::from_secs(2);
/// How long after a claim whose reading failed the next caller tries again (the background
/// reseed also does); meanwhile no caller waits.
pub const SEED_AGAIN_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// The longest a call waits for another caller's seed: its claim, and a second for clocks apart.
const SEED_WAIT_LONGEST: Duration = Duration::from_secs(3);

/// Why a quota key was not seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unseeded {
    /// The key is gone, or is another generation's.
    Gone,
    /// The ledger or Redis could not be read or reached.
    Failed,
}

/// A connection to the counters: one server (reconnecting by itself) or a cluster.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Connection::Single(_) => "Connection::Single",
            Connection::Cluster(_) => "Connection::Cluster",
        })
    }
}

impl Connection {
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> RedisResult<T> {
        match self.clone() {
            Connection::Single(mut connection) => invocation.invoke_async(&mut connection).await,
            Connection::Cluster(mut connection) => invocation.invoke_async(&mut connection).await,
        }
    }
}

/// Why a call was not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection yet, or still within `retry_after` of a failure.
    Unavailable,
    /// No answer within the timeout: Redis may still run the call.
    Timeout,
    /// The connection broke during the call: Redis may have run it.
    Error,
    /// Refused without running: an error reply, or no connection to be had.
    Refused,
}

impl Failure {
    /// Whether Redis may have run (or may still run) the call.
    pub fn may_have_run(self) -> bool {
        matches!(self, Self::Timeout | Self::Error)
    }
}

/// The request path's own connection, and the making of it.
#[derive(Debug, Default)]
struct Near {
    made: ArcSwapOption<Made>,
    /// Whether an attempt at making it runs (one at a time).
    trying: AtomicBool,
    /// When the next attempt may start.
    retry: Mutex<Retry>,
}

impl Near {
    fn retry(&self) -> std::sync::MutexGuard<'_, Retry> {
        self.retry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection, when made and its runtime still runs.
    fn alive(&self) -> Option<Arc<Made>> {
        self.made
            .load_full()
            .filter(|made| !made.runtime.is_finished())
    }

    fn is_alive(&self) -> bool {
        self.alive().is_some()
    }
}

/// A connection made on a request path's runtime.
#[derive(Debug)]
struct Made {
    connection: Connection,
    /// A task of that runtime that never ends by itself: finished once the runtime is gone.
    runtime: tokio::task::JoinHandle<()>,
}

impl Drop for Made {
    fn drop(&mut self) {
        self.runtime.abort();
    }
}

/// When the next attempt at the near connection may start, and the wait before it.
#[derive(Debug)]
struct Retry {
    at: Instant,
    delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            at: Instant::now(),
            delay: Duration::ZERO,
        }
    }
}

/// Marks the end of an attempt at the near connection when dropped, also when its task is
/// dropped unfinished (its runtime shutting down).
struct Trying(Arc<Near>);

impl Drop for Trying {
    fn drop(&mut self) {
        self.0.trying.store(false, Ordering::Release);
    }
}

/// The admission script's reply: integers in one string, separated by spaces.
struct Numbers(Vec<i64>);

impl redis::FromRedisValue for Numbers {
    fn from_redis_value(value: redis::Value) -> Result<Self, redis::ParsingError> {
        let text = String::from_redis_value(value)?;
        text.split_ascii_whitespace()
            .map(|n| n.parse::<i64>())
            .collect::<Result<Vec<_>, _>>()
            .map(Numbers)
            .map_err(|_| format!("the admission script answered {text:?}").into())
    }
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
    admit: Script,
    seed: Script,
    unseeded: Script,
    refund: Script,
    share: Script,
    /// Unix ms before which calls are not tried (after a failure).
    down_until_ms: AtomicI64,
    /// Keys this gateway seeded, to seed once more.
    reseeds: ReseedQueue<Reseed>,
    errors: IntCounterVec,
    duration: Histogram,
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
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
        )?;
        metrics.register(Box::new(errors.clone()))?;
        metrics.register(Box::new(duration.clone()))?;
        for kind in ["timeout", "error", "unavailable"] {
            errors.with_label_values(&[kind]);
        }
        Ok(Self {
            settings,
            connection: ArcSwapOption::empty(),
            near: Arc::new(Near::default()),
            certificates: OnceLock::new(),
            admit: Script::new(ADMIT_SCRIPT),
            seed: Script::new(SEED_SCRIPT),
            unseeded: Script::new(UNSEEDED_SCRIPT),
            refund: Script::new(REFUND_SCRIPT),
            share: Script::new(SHARE_SCRIPT),
            down_until_ms: AtomicI64::new(0),
            reseeds: ReseedQueue::default(),
            errors,
            duration,
        })
    }

    /// Connects and loads the scripts, so that the first requests do not pay for either. Until
    /// then every request is counted in process; after, a single server's connection reconnects
    /// by itself, and a cluster's follows its slots.
    pub async fn connect(&self) -> RedisResult<()> {
        let certificates = self.tls_certificates()?;
        let connection = open(&self.settings, certificates.clone()).await?;
        // Loaded everywhere up front: a script call is then one EVALSHA.
        for (script, source) in [
            (&self.admit, ADMIT_SCRIPT),
            (&self.seed, SEED_SCRIPT),
            (&self.refund, REFUND_SCRIPT),
            (&self.share, SHARE_SCRIPT),
        ] {
            match connection.clone() {
                Connection::Single(mut c) => {
                    script.prepare_invoke().load_async(&mut c).await?;
                }
                Connection::Cluster(mut c) => {
                    let mut load = redis::cmd("SCRIPT");
                    load.arg("LOAD").arg(source);
                    c.route_command(
                        load,
                        redis::cluster_routing::RoutingInfo::MultiNode((
                            redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                            None,
                        )),
                    )
                    .await?;
                }
            }
        }
        self.connection.store(Some(Arc::new(connection)));
        let _ = self.certificates.set(certificates);
        Ok(())
    }

    /// Starts making the request path's own connection on the runtime this is called from,
    /// once the background one is made (so the scripts are loaded) and while Redis is not
    /// failing: one attempt at a time, waiting 250 ms after a failed one, doubling up to 10 s.
    /// Until it is made, and again if the runtime that made it ends, calls go through the
    /// background connection.
    pub fn connect_near(&self, now_ms: i64) {
        let near = &self.near;
        // A guard, not a count: this runs before every admission call.
        let made = near.made.load();
        if let Some(alive) = &*made {
            if !alive.runtime.is_finished() {
                return;
            }
            // Its runtime is gone, and with it whatever drove the connection. Only that one is
            // taken out: another request may have made the next already.
            near.made.compare_and_swap(&made, None::<Arc<Made>>);
        }
        let Some(certificates) = self.certificates.get() else {
            return;
        };
        // The flag before the lock: while an attempt runs, requests take no lock here.
        if self.is_failing(now_ms) || near.trying.swap(true, Ordering::Acquire) {
            return;
        }
        // From here the attempt is this call's: the flag goes down when `trying` drops, even if
        // the task is dropped before it first runs (its runtime shutting down).
        let trying = Trying(Arc::clone(near));
        // Not due yet after a failure, or made by an attempt that ended between the first look
        // and the flag.
        if Instant::now() < near.retry().at || near.is_alive() {
            return;
        }
        let settings = self.settings.clone();
        let certificates = certificates.clone();
        let near = Arc::clone(near);
        tokio::spawn(async move {
            let _trying = trying;
            match open(&settings, certificates).await {
                Ok(connection) => {
                    near.made.store(Some(Arc::new(Made {
                        connection,
                        runtime: tokio::spawn(std::future::pending()),
                    })));
                    *near.retry() = Retry::default();
                }
                Err(error) => {
                    let mut retry = near.retry();
                    retry.delay = (retry.delay * 2).clamp(NEAR_RETRY_MIN, NEAR_RETRY_MAX);
                    retry.at = Instant::now() + retry.delay;
                    tracing::warn!(%error, retry_ms = retry.delay.as_millis() as u64, "shared counters: cannot make the request path's connection; calls go through the background one");
                }
            }
        });
    }

    /// Whether the request path's own connection is made.
    pub fn is_near(&self) -> bool {
        self.near.is_alive()
    }

    /// The certificate authorities of `tls_ca_file`, when set (a `rediss://` URL without it
    /// trusts the system's).
    fn tls_certificates(&self) -> RedisResult<Option<redis::TlsCertificates>> {
        let Some(path) = &self.settings.tls_ca_file else {
            return Ok(None);
        };
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(path)?),
        }))
    }

    /// Whether a call failed within the last `retry_after`: requests are counted in process.
    pub fn is_failing(&self, now_ms: i64) -> bool {
        now_ms < self.down_until_ms.load(Ordering::Relaxed)
    }

    /// Whether the connection is made (a call may still fail).
    pub fn is_connected(&self) -> bool {
        self.connection.load().is_some()
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

    /// The admit script's reply, once the quota it decides on is seeded, and the time it was
    /// decided at: while another caller reads the ledger for a count Redis lost, the script
    /// counts nothing and says so, and is asked again, the time moving on as it waits, until
    /// that caller's claim ends ([`SEED_CLAIM`]: then this caller takes it and seeds itself).
    /// A wait longer than that (clocks apart) ends in a call that counts on what the hash holds.
    async fn call_seeded(
        &self,
        call: &AdmitCall<'_>,
        now_ms: i64,
    ) -> Result<(Vec<i64>, i64), Failure> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        let mut at_ms = now_ms;
        let mut wait = true;
        loop {
            let invocation = self.admit_invocation(call, at_ms, wait);
            let Numbers(reply) = self.call(&invocation, at_ms).await?;
            if reply.first() != Some(&SEEDING) {
                return Ok((reply, at_ms));
            }
            if started.elapsed() + pause > SEED_WAIT_LONGEST {
                tracing::warn!(
                    "a quota count Redis lost is still being rebuilt from the ledger past the \
                     rebuilding caller's claim; counting on what Redis holds"
                );
                wait = false;
            } else {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            // Within the period the request was placed in: its usage event is too.
            let waited = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
            at_ms = now_ms
                .saturating_add(waited)
                .min(call.period.end_ms - 1)
                .max(now_ms);
        }
    }

    /// The admit script's call for `call` at `now_ms`.
    fn admit_invocation(
        &self,
        call: &AdmitCall<'_>,
        now_ms: i64,
        wait: bool,
    ) -> ScriptInvocation<'_> {
        let AdmitCall {
            customer,
            policy,
            period,
            units,
            known,
            token,
        } = *call;
        let mut invocation = self.admit.prepare_invoke();
        for window_ms in policy.window_ms() {
            invocation.key(self.key(customer, "r", window_ms));
        }
        invocation.key(self.key(customer, "q", period.start_ms));
        let (quota_limit, hard) = policy.quota.map_or((-1, false), |q| {
            (i64::try_from(q.limit).unwrap_or(i64::MAX), q.hard)
        });
        invocation
            .arg(now_ms)
            .arg(units)
            .arg(policy.rate_limits.len())
            .arg(SLOTS)
            .arg(quota_limit)
            .arg(u8::from(hard))
            .arg(period.end_ms.saturating_sub(now_ms).max(0) + QUOTA_KEY_GRACE_MS);
        for window in policy.rate_limits {
            invocation
                .arg(window.requests)
                .arg(super::window_ms(window.window_seconds));
        }
        invocation
            .arg(token)
            .arg(known.used)
            .arg(known.overage)
            .arg(known.generation.unwrap_or(-2))
            .arg(SEED_CLAIM.as_millis() as u64)
            .arg(SEED_AGAIN_AFTER_FAILURE.as_millis() as u64)
            .arg(u8::from(wait));
        invocation
    }

    /// Runs `invocation` within the timeout, recording its duration or failure.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
        now_ms: i64,
    ) -> Result<T, Failure> {
        let near = self.near.alive();
        let far = match near {
            Some(_) => None,
            None => self.connection.load_full(),
        };
        let connection = near
            .as_ref()
            .map(|made| &made.connection)
            .or(far.as_deref());
        let Some(connection) =
            connection.filter(|_| now_ms >= self.down_until_ms.load(Ordering::Relaxed))
        else {
            self.errors.with_label_values(&["unavailable"]).inc();
            return Err(Failure::Unavailable);
        };
        let started = Instant::now();
        let failure = match tokio::time::timeout(
            self.settings.timeout,
            connection.invoke(invocation),
        )
        .await
        {
            Ok(Ok(value)) => {
                self.duration.observe(started.elapsed().as_secs_f64());
                return Ok(value);
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "redis counter call failed; counting in process");
                if error.is_io_error() && !error.is_connection_refusal() {
                    Failure::Error
                } else {
                    Failure::Refused
                }
            }
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.settings.timeout.as_millis() as u64,
                    "redis counter call timed out; counting in process"
                );
                Failure::Timeout
            }
        };
        let kind = if failure == Failure::Timeout {
            "timeout"
        } else {
            "error"
        };
        self.errors.with_label_values(&[kind]).inc();
        let retry_ms = i64::try_from(self.settings.retry_after.as_millis()).unwrap_or(i64::MAX);
        self.down_until_ms
            .store(now_ms.saturating_add(retry_ms), Ordering::Relaxed);
        Err(failure)
    }

    /// Sets how long after seeding a quota key from the ledger it is seeded again: longer than
    /// it takes a request's usage event to reach the ledger (the flush interval, and more).
    pub fn reseed_after(&self, after: Duration) {
        self.reseeds.set_after(after);
    }

    /// Decides a request in Redis; a quota key this call finds missing is made again from
    /// `rebuild`.
    pub async fn admit(
        &self,
        customer: &Id,
        policy: &Policy<'_>,
        period: Period,
        units: u64,
        now_ms: i64,
        rebuild: Rebuild<'_>,
    ) -> Result<Decision, Failure> {
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
        let (reply, now_ms) = self.call_seeded(&call, now_ms).await?;
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
                    if self
                        .refund(customer, &reservation, now_ms, false)
                        .await
                        .is_ok()
                    {
                        verdict = Verdict::QuotaExceeded;
                        used -= units;
                    }
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
        Ok(Decision {
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
        })
    }

    /// Raises the quota key of `generation`, made at `made_ms`, to the ledger's count of the
    /// events of `period` before then plus what the key counted since; returns the units added.
    async fn seed(
        &self,
        customer: &Id,
        period: Period,
        made_ms: i64,
        generation: i64,
        now_ms: i64,
        ledger: Option<&dyn Ledger>,
    ) -> Result<u64, Unseeded> {
        let base = match ledger {
            Some(ledger) => {
                let until_ms = made_ms.min(period.end_ms);
                let read = super::read_ledger(ledger, customer, period, until_ms)
                    .await
                    .ok_or(Unseeded::Failed)?;
                (read.used, read.overage)
            }
            None => (0, 0),
        };
        let mut invocation = self.seed.prepare_invoke();
        invocation
            .key(self.key(customer, "q", period.start_ms))
            .arg(base.0)
            .arg(base.1)
            .arg(generation);
        match self.call::<i64>(&invocation, now_ms).await {
            Ok(added) => u64::try_from(added).map_err(|_| Unseeded::Gone),
            Err(_) => Err(Unseeded::Failed),
        }
    }

    /// Tells the other callers that the seed of the quota key of `generation` failed, so that
    /// they count on what it holds instead of waiting for it (the background reseed, and a
    /// caller now and then, try again).
    async fn mark_unseeded(&self, customer: &Id, period: Period, generation: i64, now_ms: i64) {
        let mut invocation = self.unseeded.prepare_invoke();
        invocation
            .key(self.key(customer, "q", period.start_ms))
            .arg(generation);
        if self.call::<i64>(&invocation, now_ms).await.is_ok() {
            tracing::warn!(
                "a quota count Redis lost could not be rebuilt from the ledger; it counts on \
                 what the gateways knew until a later reading succeeds"
            );
        }
    }

    /// Seeds again, from the ledger, the quota keys this gateway seeded long enough ago that
    /// every gateway's usage events from before the key was made have reached the ledger:
    /// those that were still in a spool at the first seed are counted now. Run in the
    /// background ([`super::Limiter::reseed_due`]).
    pub async fn reseed_due(&self, ledger: &dyn Ledger, now_ms: i64) {
        futures_util::stream::iter(self.reseeds.take_due(now_ms))
            .for_each_concurrent(super::RESEED_CONCURRENCY, |(attempts, reseed)| async move {
                let Reseed {
                    customer,
                    period,
                    made_ms,
                    generation,
                } = reseed;
                let seeded = self
                    .seed(&customer, period, made_ms, generation, now_ms, Some(ledger))
                    .await;
                if seeded == Err(Unseeded::Failed) {
                    self.reseeds.retry(attempts + 1, now_ms, reseed);
                }
            })
            .await;
    }

    /// Adds to the shared quota count a batch of units this gateway counted in process without
    /// asking Redis, while it failed or for a plan without limits, and deletes from that count
    /// the marks of `forget`, batches it took before:
    /// - to the quota hash the batch's customer was last counted in, seeded then (its rebuild
    ///   from the ledger was over before those units were counted, so they are not in it):
    ///   [`Sharing::Added`], also when an earlier call that timed out added it already;
    /// - to a hash made since (Redis lost its data meanwhile), when it was made before the
    ///   batch's first unit was decided: that hash holds none of them, neither in the ledger's
    ///   part (events before it was made) nor in its own ([`Sharing::AddedToLater`]);
    /// - to no hash otherwise ([`Sharing::Refused`]): a hash made after some of its units were
    ///   decided reads their events from the ledger, and adding them would count them twice.
    pub async fn share(
        &self,
        customer: &Id,
        batch: &Unshared,
        forget: &[u128],
        now_ms: i64,
    ) -> Result<Sharing, Failure> {
        let mut invocation = self.share.prepare_invoke();
        invocation
            .key(self.key(customer, "q", batch.period.start_ms))
            .arg(batch.units)
            .arg(batch.overage)
            .arg(batch.generation)
            .arg(mark(batch.token))
            .arg(batch.first_ms);
        for &token in forget {
            invocation.arg(mark(token));
        }
        Ok(match self.call::<i64>(&invocation, now_ms).await? {
            1 => Sharing::Added,
            2 => Sharing::AddedToLater,
            _ => Sharing::Refused,
        })
    }

    /// Gives back a reservation counted in Redis; false if Redis could not be reached.
    pub async fn refund(
        &self,
        customer: &Id,
        reservation: &Reservation,
        now_ms: i64,
        late: bool,
    ) -> Result<(), Failure> {
        let mut invocation = self.refund.prepare_invoke();
        invocation
            .key(self.key(customer, "q", reservation.period.start_ms))
            .arg(-i64::try_from(reservation.units).unwrap_or(i64::MAX))
            .arg(-i64::try_from(reservation.overage).unwrap_or(i64::MAX))
            .arg(reservation.at_ms)
            .arg(u8::from(late));
        self.call::<i64>(&invocation, now_ms).await.map(drop)
    }
}

/// Decides and counts one request.
const ADMIT_SCRIPT: &str = include_str!("admit.lua");

/// Raises a quota hash of generation ARGV[3] to the ledger's count of the events before it was
/// made (ARGV: units, overage) plus what it counted since, where that is higher, and marks it
/// seeded: its part from before (`p`, `q`) becomes the ledger's count where that is higher. A
/// ledger that lacks events still in the gateways' spools gives a lower count; a later call with
/// more gives a higher one; neither is ever added twice. The units it added (0 or more), or -1
/// when the hash is gone or of another generation. (A hash made before `p` existed counts all
/// of its units as from before: the ledger's count raises it only past them.)
const SEED_SCRIPT: &str = r"
local state = redis.call('HMGET', KEYS[1], 'n', 'u', 'o', 'p', 'q')
if not state[2] or (tonumber(state[1]) or -1) ~= tonumber(ARGV[3]) then
  return -1
end
local used, overage = tonumber(state[2]), tonumber(state[3])
local before, before_overage = tonumber(state[4]) or used, tonumber(state[5]) or overage
local ledger, ledger_overage = tonumber(ARGV[1]), tonumber(ARGV[2])
local added = 0
if ledger > before then
  added = ledger - before
  redis.call('HSET', KEYS[1], 'u', used + added, 'p', ledger)
end
if ledger_overage > before_overage then
  redis.call('HSET', KEYS[1], 'o', overage + ledger_overage - before_overage, 'q', ledger_overage)
end
redis.call('HSET', KEYS[1], 's', 1)
return added
";

/// Marks a quota hash of generation ARGV[1] whose seed failed, while it is not seeded: the
/// admit script's calls stop waiting for its seed.
const UNSEEDED_SCRIPT: &str = r"
local state = redis.call('HMGET', KEYS[1], 's', 'n')
if state[1] == '0' and tonumber(state[2]) == tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'f', 1)
  return 1
end
return 0
";

/// Adds a batch of units counted in process (ARGV: units, overage, the generation of the hash
/// they belong in, the batch's mark, when its earliest unit was decided) to a quota hash seeded
/// from the ledger (`s` = 1) of that generation (`n`, absent in a hash made before generations:
/// -1), or to one made since (Redis lost theirs) before any of its units was decided: that hash
/// holds them in no part. Once per mark, which stays in the hash until a later call deletes it.
/// ARGV 6 on: marks to delete first, of batches sent once and answered, of which no other copy
/// can arrive. 1 if it added the batch (now or before) to its own hash, 2 to a later one, 0 if
/// the hash is of another generation and made after the batch began, not seeded, or gone.
const SHARE_SCRIPT: &str = r"
if #ARGV > 5 then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 6))
end
local state = redis.call('HMGET', KEYS[1], 's', 'n', 'a')
local own = state[1] == '1' and (tonumber(state[2]) or -1) == tonumber(ARGV[3])
local later = not own and state[3] and tonumber(ARGV[5]) >= tonumber(state[3])
if not own and not later then
  return 0
end
if redis.call('HSETNX', KEYS[1], ARGV[4], 1) == 1 then
  redis.call('HINCRBY', KEYS[1], 'u', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'o', ARGV[2])
end
if own then
  return 1
end
return 2
";

/// The field a batch's call leaves in its quota hash.
fn mark(token: u128) -> String {
    format!("g{token:032x}")
}

/// Gives back units of a quota hash that still exists (ARGV: units and overage, negated, when
/// they were counted, and 1 for a refund made late), and of its part from before it was made
/// when they were in it. A refund made late (Redis failed when it was due) is not made in a
/// hash made after its units were counted: that hash's count came from the ledger and from
/// gateways' counts that had given them back already.
const REFUND_SCRIPT: &str = r"
local state = redis.call('HMGET', KEYS[1], 'u', 'a')
if state[1] and ARGV[4] == '1' and state[2] and tonumber(ARGV[3]) < tonumber(state[2]) then
  return 0
end
if state[1] then
  redis.call('HINCRBY', KEYS[1], 'u', ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'o', ARGV[2])
  if state[2] and tonumber(ARGV[3]) < tonumber(state[2]) then
    redis.call('HINCRBY', KEYS[1], 'p', ARGV[1])
    redis.call('HINCRBY', KEYS[1], 'q', ARGV[2])
  end
  return 1
end
return 0
";

/// Opens a connection to the counters, driven by the runtime this is called on: one server's
/// reconnects by itself, a cluster's follows its slots.
async fn open(
    settings: &Redis,
    certificates: Option<redis::TlsCertificates>,
) -> RedisResult<Connection> {
    // The request path gives up after `timeout`; the connection itself waits longer, so a slow
    // answer is not mistaken for a broken connection.
    Ok(match &settings.nodes {
        RedisNodes::Single(url) => {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(CONNECTION_RESPONSE_TIMEOUT))
                .set_number_of_retries(3)
                .set_max_delay(Duration::from_secs(1));
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(url.as_str(), certificates)?,
                None => redis::Client::open(url.as_str())?,
            };
            Connection::Single(ConnectionManager::new_with_config(client, config).await?)
        }
        RedisNodes::Cluster(urls) => {
            let mut builder = ClusterClient::builder(urls.iter().map(String::as_str))
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(CONNECTION_RESPONSE_TIMEOUT);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            Connection::Cluster(builder.build()?.get_async_connection().await?)
        }
    })
}

/// Connects the shared counters in the background, retrying until it can, then holds its runtime
/// (which drives the connection) until shutdown.
#[derive(Debug)]
pub struct Connector {
    gateway: Arc<crate::state::Gateway>,
}

impl Connector {
    /// A connector for the gateway's shared counters.
    pub fn new(gateway: Arc<crate::state::Gateway>) -> Self {
        Self { gateway }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for Connector {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let Some(redis) = self.gateway.limiter.redis() else {
            return;
        };
        let mut delay = Duration::from_millis(250);
        loop {
            match redis.connect().await {
                Ok(()) => {
                    tracing::info!("shared counters: connected to redis");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_ms = delay.as_millis() as u64, "shared counters: cannot connect to redis; counting in process");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        let _ = shutdown.changed().await;
    }
}

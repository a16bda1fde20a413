//! Rebuilding a quota count Redis lost: the caller that makes the key again seeds it from the
//! ledger, the others wait for it, and the seed is made again once the spools are flushed.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::connection::{Unanswered, Via};
use super::{AdmitCall, QUOTA_KEY_GRACE_MS, RedisCounters};
use crate::identity::index::Id;
use crate::limits::period::Period;
use crate::limits::window::SLOTS;
use crate::metering::ledger::Ledger;

/// The admit script's verdict while another caller seeds the quota from the ledger.
const SEEDING: i64 = 3;

/// A quota key this gateway seeded, to seed again from the ledger once the gateways' spools
/// have been flushed into it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reseed {
    pub(super) customer: Id,
    pub(super) period: Period,
    /// When the key was made: the ledger's events before then.
    pub(super) made_ms: i64,
    pub(super) generation: i64,
}

/// How long a caller that makes a quota key again holds its claim to seed it from the ledger:
/// its reading ([`SEED_TIMEOUT`](crate::limits::SEED_TIMEOUT)) and the seed's call. Other
/// callers of a plan with a quota wait for it meanwhile; past it, the next caller takes the
/// claim.
pub const SEED_CLAIM: Duration = Duration::from_secs(2);
/// How long after a claim whose reading failed the next caller tries again (the background
/// reseed also does); meanwhile no caller waits.
pub const SEED_AGAIN_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// The longest a call waits for another caller's seed: its claim, and a second for clocks apart.
const SEED_WAIT_LONGEST: Duration = Duration::from_secs(3);

/// Why a quota key was not seeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unseeded {
    /// The key is gone, or is another generation's.
    Gone,
    /// The ledger or Redis could not be read or reached.
    Failed,
}

/// The admission script's reply: integers in one string, separated by spaces.
pub(super) struct Numbers(pub(super) Vec<i64>);

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

impl RedisCounters {
    /// The admit script's reply, once the quota it decides on is seeded, and the time it was
    /// decided at: while another caller reads the ledger for a count Redis lost, the script
    /// counts nothing and says so, and is asked again, the time moving on as it waits, until
    /// that caller's claim ends ([`SEED_CLAIM`]: then this caller takes it and seeds itself).
    /// A wait longer than that (clocks apart) ends in a call that counts on what the hash holds.
    /// Also says which connection the call that decided went through.
    pub(super) async fn call_seeded(
        &self,
        call: &AdmitCall<'_>,
        now_ms: i64,
    ) -> Result<(Vec<i64>, i64, Via), Unanswered<redis::RedisResult<Numbers>>> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        let mut at_ms = now_ms;
        let mut wait = true;
        loop {
            let command = self.admit_command(call, at_ms, wait);
            let (Numbers(reply), via) = self.call_to_the_end(command, &self.admit, at_ms).await?;
            if reply.first() != Some(&SEEDING) {
                return Ok((reply, at_ms, via));
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

    /// The admit script's call for `call` at `now_ms`: an `EVALSHA` of its own, which a call
    /// that outlives its request owns.
    fn admit_command(&self, call: &AdmitCall<'_>, now_ms: i64, wait: bool) -> redis::Cmd {
        let AdmitCall {
            customer,
            policy,
            period,
            units,
            known,
            token,
        } = *call;
        let mut command = redis::cmd("EVALSHA");
        command
            .arg(self.admit.get_hash())
            .arg(policy.rate_limits.len() + 2);
        for window_ms in policy.window_ms() {
            command.arg(self.key(customer, "r", window_ms));
        }
        command.arg(self.key(customer, "q", period.start_ms));
        // The period the customer was last counted in (see `admit.lua`).
        command.arg(self.key(customer, "p", 0));
        let (quota_limit, hard) = policy.quota.map_or((-1, false), |q| {
            (i64::try_from(q.limit).unwrap_or(i64::MAX), q.hard)
        });
        command
            .arg(now_ms)
            .arg(units)
            .arg(policy.rate_limits.len())
            .arg(SLOTS)
            .arg(quota_limit)
            .arg(u8::from(hard))
            .arg(period.end_ms.saturating_sub(now_ms).max(0) + QUOTA_KEY_GRACE_MS);
        for window in policy.rate_limits {
            command
                .arg(window.requests)
                .arg(crate::limits::window_ms(window.window_seconds));
        }
        command
            .arg(token)
            .arg(known.used)
            .arg(known.overage)
            .arg(known.generation.unwrap_or(-2))
            .arg(SEED_CLAIM.as_millis() as u64)
            .arg(SEED_AGAIN_AFTER_FAILURE.as_millis() as u64)
            .arg(u8::from(wait))
            .arg(period.start_ms)
            .arg(period.end_ms)
            .arg(known.pending);
        command
    }

    /// Raises the quota key of `generation`, made at `made_ms`, to the ledger's count of the
    /// events of `period` before then plus what the key counted since; returns the units added.
    pub(super) async fn seed(
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
                let read = crate::limits::read_ledger(ledger, customer, period, until_ms)
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
    pub(super) async fn mark_unseeded(
        &self,
        customer: &Id,
        period: Period,
        generation: i64,
        now_ms: i64,
    ) {
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
    /// background ([`crate::limits::Limiter::reseed_due`]).
    pub async fn reseed_due(&self, ledger: &dyn Ledger, now_ms: i64) {
        futures_util::stream::iter(self.reseeds.take_due(now_ms))
            .for_each_concurrent(
                crate::limits::RESEED_CONCURRENCY,
                |(attempts, reseed)| async move {
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
                },
            )
            .await;
    }
}

/// Raises a quota hash of generation `ARGV[3]` to the ledger's count of the events before it
/// was made (ARGV: units, overage) plus what it counted since, where that is higher, and marks it
/// seeded: its part from before (`p`, `q`) becomes the ledger's count where that is higher. A
/// ledger that lacks events still in the gateways' spools gives a lower count; a later call with
/// more gives a higher one; neither is ever added twice. The units it added (0 or more), or -1
/// when the hash is gone or of another generation. (A hash made before `p` existed counts all
/// of its units as from before: the ledger's count raises it only past them.)
pub(super) const SEED_SCRIPT: &str = r"
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
  redis.call('HINCRBY', KEYS[1], 'v', 1)
end
if ledger_overage > before_overage then
  redis.call('HSET', KEYS[1], 'o', overage + ledger_overage - before_overage, 'q', ledger_overage)
end
redis.call('HSET', KEYS[1], 's', 1)
return added
";

/// Marks a quota hash of generation `ARGV[1]` whose seed failed, while it is not seeded: the
/// admit script's calls stop waiting for its seed.
pub(super) const UNSEEDED_SCRIPT: &str = r"
local state = redis.call('HMGET', KEYS[1], 's', 'n')
if state[1] == '0' and tonumber(state[2]) == tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'f', 1)
  return 1
end
return 0
";

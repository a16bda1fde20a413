//! Units counted in process for Redis (while it failed, or for a plan without limits): the
//! batches they are kept in until Redis takes them, and what becomes of a batch it took,
//! refused or did not answer.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use super::{Counts, LocalCounters, counts, decide};
use crate::identity::index::Id;
use crate::limits::period::Period;
use crate::limits::redis::{LateAnswer, Via};
use crate::limits::window;
use crate::limits::{Counted, Decision, FallbackUnit, Policy, Reservation};

/// A customer's quota units counted in process without asking Redis.
#[derive(Debug, Default)]
pub(super) struct Fallback {
    /// Batches not yet added to Redis.
    pub(super) unshared: Vec<Unshared>,
    /// Batches taken to be added to Redis and not yet settled or put back.
    pub(super) in_flight: Vec<Unshared>,
    /// Refunds of units of batches in flight, by batch: Redis' to give if it takes the batch,
    /// nobody's if it refuses it.
    pub(super) held: Vec<(u128, Reservation)>,
    /// The last batches Redis did not take (their count was rebuilt from the ledger since): a
    /// refund of one of their units is nobody's to give. Those it took are Redis' to refund,
    /// as are units of batches not found here.
    pub(super) refused: Vec<u128>,
    /// Units counted here whose call may still run in Redis (it timed out or broke): when and
    /// through which connection the call had been sent, period, units; one entry per 100 ms
    /// and connection, at most [`MAYBE_KEPT`]. An answer to a call sent later through the same
    /// connection holds them if they ran, since Redis runs a connection's calls in order: they
    /// are kept until then.
    pub(super) maybe: Vec<Maybe>,
    /// Batches Redis took within the longest call timeout (1 s): kept until, period, units, and
    /// the count's version once it held it. An answer decided at a lower version lacks it.
    pub(super) landed: Vec<(i64, Period, u64, i64)>,
    /// Batches and refunds Redis took on their first and only call, by period: the marks their
    /// calls left in the count (so that a call made again adds or gives back nothing) are no
    /// longer needed, and the customer's next call to that count deletes them. One sent more
    /// than once (its first call timed out) keeps its mark until the count expires: the first
    /// call may still arrive, over another connection.
    pub(super) answered: Vec<(Period, u128)>,
    /// Requests admitted here, for the rate-limit windows: Redis' windows never take their
    /// units (a window is over before they could be added), so an answer holds them only if
    /// their own call ran before the answered one. One entry per 100 ms, at most
    /// [`IN_WINDOWS_KEPT`]; forgotten once out of the customer's longest window.
    pub(super) in_windows: Vec<InWindows>,
    /// Units admitted here whose call is followed to its end ([`FallbackUnit::Awaiting`]),
    /// until Redis answers it: token, when admitted (let go of after [`AWAITING_KEPT_MS`], as
    /// their units are), and whether the unit was given back meanwhile (what Redis answers
    /// then says where the refund goes).
    pub(super) awaiting: Vec<(u128, i64, bool)>,
    /// Where the units of calls followed to their end went once Redis answered them, by token,
    /// for a refund that comes after: the newest [`SETTLED_KEPT`].
    pub(super) settled: Vec<(u128, Settled)>,
}

/// Where the unit of a call followed to its end went, once Redis answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Redis counted it, `overage` of it past a soft quota.
    InRedis { overage: u64 },
    /// Redis did not: into the batch of this token.
    Batch(u128),
    /// The connection gave up on the call: it ran, or never will. Its unit is not given back
    /// in Redis (it may never have been counted there).
    Unknown,
}

/// Units counted here whose call may still run in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Maybe {
    pub(super) sent: Sent,
    pub(super) period: Period,
    pub(super) units: u64,
}

/// When a call had been sent by, and through which connection; [`VIA_ANY`] once the call has
/// run (or never will) by then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub at_ms: i64,
    pub via: Via,
}

/// The [`Sent::via`] of a call known to have run by its time, or never to run, whatever
/// connection it went through: its answer came, or its connection gave up on it.
pub const VIA_ANY: Via = Via::MAX;
/// The [`Sent::via`] of a call that timed out and is followed to its end: whether Redis counts
/// it is learnt from its own answer ([`LocalCounters::late_answer`]), not from the order of
/// calls (Redis may refuse it, and admit a call sent after it once a unit was given back), so
/// no other answer is taken to hold it meanwhile.
pub const VIA_AWAITING: Via = Via::MAX - 1;

impl Sent {
    /// Whether a call sent as `self` has run (or never will) when Redis runs one sent as
    /// `answered`: it was sent first, through the same connection (or has run by its time).
    pub(super) fn ran_before(self, answered: Sent) -> bool {
        self.at_ms < answered.at_ms && (self.via == answered.via || self.via == VIA_ANY)
    }

    /// Whether a call followed to its end ([`VIA_AWAITING`]) is taken, at `now_ms`, to have
    /// run or never to run without its answer being heard of: past [`AWAITING_KEPT_MS`] (the
    /// connection gives up on a call after 5 s; the task following it ended with its runtime).
    fn given_up(self, now_ms: i64) -> bool {
        self.via == VIA_AWAITING && now_ms.saturating_sub(self.at_ms) > AWAITING_KEPT_MS
    }
}

/// How long a call followed to its end is waited for ([`Sent::given_up`]).
const AWAITING_KEPT_MS: i64 = 30_000;

/// Units admitted in process at about the same time, counted in the rate-limit windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct InWindows {
    /// When (the latest of them) were counted, Unix ms.
    pub(super) at_ms: i64,
    /// When and through which connection their call had been sent by (the latest of them): it
    /// may have run in Redis. `None` when no call was made for one of them (Redis was known
    /// to be failing), or Redis counted none of them.
    pub(super) sent: Option<Sent>,
    pub(super) units: u64,
}

impl Fallback {
    /// Units counted here in `period` that an answer of Redis may not hold, for a call `sent`
    /// and decided at the count's `version`: batches not added to it yet or on their way,
    /// batches it took at a later version, and units whose call may still run there, not
    /// [`ran_before`](Sent::ran_before) the answered one. Batches taken more than
    /// [`LANDED_KEPT_MS`] ago, and units whose call ran before the answered one (or never
    /// will), are forgotten.
    pub(super) fn beyond_answer(&mut self, period: Period, version: i64, sent: Sent) -> u64 {
        self.maybe
            .retain(|m| !m.sent.ran_before(sent) && !m.sent.given_up(sent.at_ms));
        self.landed
            .retain(|&(until_ms, _, _, _)| until_ms > sent.at_ms);
        let (batched, _) = self.batched(period);
        let maybe = self.maybe_units(period);
        let landed: u64 = self
            .landed
            .iter()
            .filter(|&&(_, p, _, with)| p == period && with > version)
            .map(|&(_, _, units, _)| units)
            .sum();
        batched + maybe + landed
    }

    /// Takes up to `units` units of `period` whose call went through `via` and may still run in
    /// Redis out of the oldest such entries (a call's answer comes before those of calls sent
    /// after it through the same connection); how many it took.
    fn take_maybe_via(&mut self, period: Period, via: Via, units: u64) -> u64 {
        take_oldest(
            &mut self.maybe,
            units,
            |m| m.period == period && m.sent.via == via,
            |m| &mut m.units,
        )
        .iter()
        .map(|&(_, taken)| taken)
        .sum()
    }

    /// Units, and of them overage, of `period`'s batches not added to Redis yet or on their way.
    pub(super) fn batched(&self, period: Period) -> (u64, u64) {
        self.unshared
            .iter()
            .chain(&self.in_flight)
            .filter(|u| u.period == period)
            .fold((0, 0), |(units, overage), u| {
                (units + u.units, overage + u.overage)
            })
    }

    /// Units counted here in `period` whose call may still run in Redis, whenever sent.
    pub(super) fn maybe_units(&self, period: Period) -> u64 {
        self.maybe
            .iter()
            .filter(|m| m.period == period)
            .map(|m| m.units)
            .sum()
    }

    /// Notes `units` counted here in `period` whose call, `sent`, may still run in Redis: into
    /// the newest entry of the same period and connection when it is less than 100 ms older,
    /// or when [`MAYBE_KEPT`] are kept (so the entries are at most that many, and one per
    /// period and connection beyond).
    fn note_maybe(&mut self, sent: Sent, period: Period, units: u64) {
        let full = self.maybe.len() >= MAYBE_KEPT;
        let same = self
            .maybe
            .iter_mut()
            .rev()
            .find(|m| m.period == period && m.sent.via == sent.via)
            .filter(|m| full || (sent.at_ms - m.sent.at_ms).abs() < 100);
        match same {
            Some(same) => {
                // The later time: resolved only by an answer to a call sent after both.
                same.sent.at_ms = same.sent.at_ms.max(sent.at_ms);
                same.units += units;
            }
            None => self.maybe.push(Maybe {
                sent,
                period,
                units,
            }),
        }
    }

    /// Redis has answered a call `via` a connection, which this process had timed out on and
    /// admitted `units` of `period` for, at `now_ms`: the call has run by now (`answer` says
    /// whether it counted them) or never will. Its units are held beyond an answer until a call
    /// sent after now answers, whatever its connection; those Redis did not count are never in
    /// its answers, nor in its windows. `kept`: whether the unit still counts here (it was not
    /// given back meanwhile). Returns, when Redis did not count them, the units to add to its
    /// count, and of them those the count here had let go of (an answer to a later call
    /// through the same connection was taken to hold them).
    pub(super) fn ran(
        &mut self,
        period: Period,
        units: u64,
        sent: Sent,
        answer: LateAnswer,
        kept: bool,
        now_ms: i64,
    ) -> (u64, u64) {
        let now = Sent {
            at_ms: now_ms,
            via: VIA_ANY,
        };
        let counted = answer.counted();
        // In the windows, the oldest entries of that connection: held until an answer to a
        // call sent after now if Redis counted them (or may have), for their whole window
        // otherwise.
        let moved = take_oldest(
            &mut self.in_windows,
            units,
            |u| u.sent.is_some_and(|s| s.via == sent.via),
            |u| &mut u.units,
        );
        for (entry, taken) in moved {
            let held = (counted != Some(false)).then_some(now);
            self.note_in_windows(entry.at_ms, held, taken);
        }
        if !kept {
            // Its unit left the count here when it was given back.
            return (0, 0);
        }
        let taken = self.take_maybe_via(period, sent.via, units);
        if counted != Some(false) && taken > 0 {
            self.note_maybe(now, period, taken);
        }
        if counted == Some(false) {
            (units, units - taken)
        } else {
            (0, 0)
        }
    }

    /// Notes `units` admitted here at `at_ms` and counted in the windows, whose call was `sent`
    /// (`None`: none was, or Redis did not count it): into the newest entry of the same
    /// connection (or of no call) when both times are less than 100 ms apart, or when
    /// [`IN_WINDOWS_KEPT`] are kept.
    pub(super) fn note_in_windows(&mut self, at_ms: i64, sent: Option<Sent>, units: u64) {
        let full = self.in_windows.len() >= IN_WINDOWS_KEPT;
        let via = sent.map(|s| s.via);
        let same = self
            .in_windows
            .iter_mut()
            .rev()
            .find(|u| u.sent.map(|s| s.via) == via)
            .filter(|u| {
                let close = |a: i64, b: i64| (a - b).abs() < 100;
                full || (close(at_ms, u.at_ms)
                    && u.sent
                        .zip(sent)
                        .is_none_or(|(own, new)| close(own.at_ms, new.at_ms)))
            });
        match same {
            Some(same) => {
                // The later times: held beyond any answer for at least as long as each.
                same.at_ms = same.at_ms.max(at_ms);
                if let (Some(own), Some(sent)) = (&mut same.sent, sent) {
                    own.at_ms = own.at_ms.max(sent.at_ms);
                }
                same.units += units;
            }
            None => self.in_windows.push(InWindows { at_ms, sent, units }),
        }
    }

    /// Forgets the units admitted here that an answer to a call `sent` holds (their call ran
    /// before it, or never will) and those out of a window of `longest_ms` at `now_ms`.
    pub(super) fn forget_in_windows(&mut self, sent: Sent, longest_ms: i64, now_ms: i64) {
        self.in_windows.retain(|u| {
            u.sent
                .is_none_or(|own| !own.ran_before(sent) && !own.given_up(now_ms))
                && window::still_counted(u.at_ms, longest_ms, now_ms)
        });
    }

    /// Units admitted here that Redis' answer does not hold and that still count in a window of
    /// `window_ms` at `now_ms` (after [`forget_in_windows`](Self::forget_in_windows)).
    pub(super) fn in_window(&self, window_ms: i64, now_ms: i64) -> u64 {
        self.in_windows
            .iter()
            .filter(|u| window::still_counted(u.at_ms, window_ms, now_ms))
            .map(|u| u.units)
            .sum()
    }

    fn note_answered(&mut self, period: Period, token: u128) {
        if self.answered.len() == ANSWERED_KEPT {
            self.answered.remove(0);
        }
        self.answered.push((period, token));
    }
}

/// Quota units a clustered gateway counted in process without asking Redis (while it failed, or
/// for a plan without limits): they belong in the shared count, or the customer would have had
/// them for free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unshared {
    /// The period they were counted in.
    pub period: Period,
    /// Units, overage included.
    pub units: u64,
    /// Of them, units past a soft quota.
    pub overage: u64,
    /// The generation of the Redis quota count they belong in.
    pub generation: i64,
    /// Names this batch in Redis, so that a call adding it that timed out but ran after all
    /// makes the next attempt add nothing.
    pub token: u128,
    /// When its earliest unit was decided, Unix ms: a count Redis made again after then holds
    /// none of its units, in any part.
    pub first_ms: i64,
    /// Sent to Redis once without an answer: it may be counted there already, so it takes no
    /// more units (they go into a batch of their own).
    pub(super) sealed: bool,
}

/// Takes up to `units` units out of the oldest of `entries` that `matches` (their units in
/// `units_of`), dropping those left empty; each entry taken from, as it was, and the units
/// taken from it.
fn take_oldest<T: Copy>(
    entries: &mut Vec<T>,
    units: u64,
    matches: impl Fn(&T) -> bool,
    units_of: impl Fn(&mut T) -> &mut u64,
) -> Vec<(T, u64)> {
    let mut left = units;
    let mut taken = Vec::new();
    for entry in entries.iter_mut().filter(|e| matches(e)) {
        if left == 0 {
            break;
        }
        let before = *entry;
        let own = units_of(entry);
        let now = (*own).min(left);
        *own -= now;
        left -= now;
        taken.push((before, now));
    }
    entries.retain_mut(|e| *units_of(e) > 0);
    taken
}

/// Entries of units whose call may still run in Redis kept per customer; past this many, units
/// join the newest entry.
pub(super) const MAYBE_KEPT: usize = 64;
/// Calls followed to their end whose unit's place is remembered per customer, for refunds.
const SETTLED_KEPT: usize = 256;
/// Entries of units admitted here kept per customer for the windows; past this many, units join
/// the newest entry.
pub(super) const IN_WINDOWS_KEPT: usize = 64;
/// How long a batch Redis took is taken to be possibly missing from answers: the longest call
/// timeout.
const LANDED_KEPT_MS: i64 = 1_000;
/// Entries of batches Redis took kept per customer; past this many, a batch joins the newest.
const LANDED_KEPT: usize = 64;

/// When Redis took a batch, and the version of its count with it ([`Decision::count_version`]).
///
/// [`Decision::count_version`]: crate::limits::Decision::count_version
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// When the answer came, Unix ms.
    pub at_ms: i64,
    /// The count's version once it held the batch.
    pub version: i64,
}
/// Batches Redis refused remembered per customer, for refunds of their units.
const REFUSED_KEPT: usize = 16;
/// Marks of batches Redis took remembered per customer for deletion; past this many (the
/// customer's count could not be reached for that long), the oldest stay in the count until it
/// expires.
const ANSWERED_KEPT: usize = 256;
/// Most marks one call deletes.
pub const FORGET_PER_CALL: usize = 64;
/// The generation of a batch counted while this process knew no count of its period in Redis:
/// no count's (theirs are 1 to 2^53 - 1, and -1 for a count made before generations).
pub const UNKNOWN_GENERATION: i64 = -3;

impl LocalCounters {
    /// Notes that `reservation`, counted here because Redis could not be asked, is not in
    /// Redis' count, as [`admit_fallback`](Self::admit_fallback) does; the token of the batch it
    /// joins.
    pub fn note_unshared(&self, customer: &Id, reservation: &Reservation) -> u128 {
        let mut shard = self.shard(customer);
        let counts = counts(&mut shard, customer, reservation.period);
        self.batch_unshared(counts, customer, reservation)
    }

    /// Adds `reservation` to a batch for Redis; the batch's token. The batch is for the count of
    /// the generation this process knows for the period, or, when it knows none (it has not
    /// seen the customer's count rebuilt from the ledger this period, or forgot it when Redis
    /// made another), [`UNKNOWN_GENERATION`]: Redis then adds it to a count made before its
    /// first unit was decided, which holds none of its units, and leaves it to the ledger
    /// otherwise (a count made later reads the ledger, which holds its events).
    fn batch_unshared(
        &self,
        counts: &mut Counts,
        customer: &Id,
        reservation: &Reservation,
    ) -> u128 {
        let generation = counts
            .generation_of(reservation.period)
            .unwrap_or(UNKNOWN_GENERATION);
        self.add_unshared(counts, customer, reservation, generation)
    }

    /// [`admit`](Self::admit) for a request Redis could not decide, counted here: when
    /// admitted, its unit joins the customer's batch for Redis under the same lock as its
    /// count, so that no call reading what this process holds beyond Redis' count
    /// ([`known`](Self::known)) sees the unit counted and not batched, and puts it in Redis a
    /// second time. A unit whose call may have run in Redis (`maybe_sent`: the call timed out
    /// or broke, sent by then) is not batched; it counts beyond what Redis says until Redis
    /// answers a call sent later.
    pub fn admit_fallback(
        &self,
        customer: &Id,
        policy: &Policy<'_>,
        period: Period,
        units: u64,
        now_ms: i64,
        maybe_sent: Option<Sent>,
    ) -> Decision {
        let mut shard = self.shard(customer);
        let counts = counts(&mut shard, customer, period);
        let mut decision = decide(counts, policy, period, units, now_ms);
        decision.counted = Counted::Fallback;
        if let Some(reservation) = &mut decision.reservation {
            reservation.counted = Counted::Fallback;
            if !policy.rate_limits.is_empty() {
                counts
                    .fallback()
                    .note_in_windows(now_ms, maybe_sent, reservation.units);
            }
            let unit = if let Some(sent) = maybe_sent {
                counts
                    .fallback()
                    .note_maybe(sent, period, reservation.units);
                if sent.via == VIA_AWAITING {
                    let token = uuid::Uuid::new_v4().as_u128();
                    let awaiting = &mut counts.fallback().awaiting;
                    awaiting.retain(|&(_, at_ms, _)| now_ms - at_ms <= AWAITING_KEPT_MS);
                    awaiting.push((token, now_ms, false));
                    FallbackUnit::Awaiting(token)
                } else {
                    FallbackUnit::MaybeInRedis
                }
            } else {
                FallbackUnit::Batch(self.batch_unshared(counts, customer, reservation))
            };
            reservation.fallback = Some(unit);
        }
        decision
    }

    /// Redis answered, in the end, the call of a request admitted here in its stead after the
    /// call timed out (`reservation`, counted here as [`FallbackUnit::Awaiting`], `sent` as
    /// said). From now on an answer to any call sent later holds what Redis counted; what it
    /// did not count joins the customer's batch for Redis, so that its count comes to hold it.
    /// A unit given back meanwhile is nowhere here any more; returns, when Redis counted it,
    /// its overage there: the unit is to be given back in Redis.
    pub fn late_answer(
        &self,
        customer: &Id,
        reservation: &Reservation,
        sent: Sent,
        answer: LateAnswer,
        now_ms: i64,
    ) -> Option<u64> {
        let Some(FallbackUnit::Awaiting(token)) = reservation.fallback else {
            return None;
        };
        let in_redis = match answer {
            LateAnswer::Admitted { overage } => Some(overage),
            _ => None,
        };
        let mut shard = self.shard(customer);
        let counts = counts(&mut shard, customer, reservation.period);
        let fallback = counts.fallback();
        let given_back = match fallback.awaiting.iter().position(|&(t, _, _)| t == token) {
            Some(i) => fallback.awaiting.swap_remove(i).2,
            None => false,
        };
        let (batch, dropped) = fallback.ran(
            reservation.period,
            reservation.units,
            sent,
            answer,
            !given_back,
            now_ms,
        );
        if given_back {
            return in_redis;
        }
        let settled = if batch > 0 {
            if counts.quota.period == reservation.period {
                counts.quota.used += dropped;
            }
            let unit = Reservation {
                units: batch,
                ..*reservation
            };
            Settled::Batch(self.batch_unshared(counts, customer, &unit))
        } else if let Some(overage) = in_redis {
            Settled::InRedis { overage }
        } else {
            Settled::Unknown
        };
        let kept = &mut counts.fallback().settled;
        if kept.len() >= SETTLED_KEPT {
            kept.remove(0);
        }
        kept.push((token, settled));
        None
    }

    /// Where the refund of `reservation`, counted here as [`FallbackUnit::Awaiting`] with
    /// `token`, goes: `None` while Redis has not answered its call (the unit leaves the count
    /// here now, and the answer says whether Redis' count is to give it back), else where the
    /// answer put the unit ([`Settled::Unknown`] also when that is no longer remembered).
    pub fn refund_awaiting(
        &self,
        customer: &Id,
        reservation: &Reservation,
        token: u128,
    ) -> Option<Settled> {
        let mut shard = self.shard(customer);
        let Some(fallback) = shard
            .get_mut(customer)
            .and_then(|counts| counts.fallback.as_mut())
        else {
            return Some(Settled::Unknown);
        };
        if let Some(awaited) = fallback.awaiting.iter_mut().find(|(t, _, _)| *t == token) {
            if !awaited.2 {
                awaited.2 = true;
                fallback.take_maybe_via(reservation.period, VIA_AWAITING, reservation.units);
            }
            return None;
        }
        match fallback.settled.iter().position(|&(t, _)| t == token) {
            Some(i) => Some(fallback.settled.remove(i).1),
            None => Some(Settled::Unknown),
        }
    }

    /// Adds `reservation` to the customer's open batch for the count of `generation` (the one
    /// this process knows for the reservation's period); the batch's token.
    pub(super) fn add_unshared(
        &self,
        counts: &mut Counts,
        customer: &Id,
        reservation: &Reservation,
        generation: i64,
    ) -> u128 {
        let was_empty = counts.unshared().is_empty();
        let batches = &mut counts.fallback().unshared;
        let open = batches
            .iter_mut()
            .find(|u| u.period == reservation.period && u.generation == generation && !u.sealed);
        match open {
            Some(batch) => {
                batch.units += reservation.units;
                batch.overage += reservation.overage;
                batch.first_ms = batch.first_ms.min(reservation.at_ms);
                batch.token
            }
            None => {
                if was_empty {
                    self.now_unshared(customer);
                }
                let token = uuid::Uuid::new_v4().as_u128();
                batches.push(Unshared {
                    period: reservation.period,
                    units: reservation.units,
                    overage: reservation.overage,
                    generation,
                    token,
                    first_ms: reservation.at_ms,
                    sealed: false,
                });
                token
            }
        }
    }

    /// Takes back a refunded reservation whose unit went into the batch `token`: from that
    /// batch while it is unsent (`true`), nowhere when Redis did not take the batch (`true`), or
    /// later while the batch is sent and not answered yet (`true`: held until it is settled,
    /// [`settle_unshared`](Self::settle_unshared)). `false` when the refund is Redis' to give:
    /// the batch was added there, or it was sent without an answer (sealed: Redis may have it,
    /// and if not, the refund and the batch add up the same whatever their order), or it is
    /// forgotten.
    pub fn refund_unshared(&self, customer: &Id, reservation: &Reservation, token: u128) -> bool {
        let mut shard = self.shard(customer);
        let Some(fallback) = shard.get_mut(customer).and_then(|c| c.fallback.as_mut()) else {
            return false;
        };
        if let Some(batch) = fallback.unshared.iter_mut().find(|u| u.token == token) {
            if batch.sealed || batch.units < reservation.units {
                return false;
            }
            batch.units -= reservation.units;
            batch.overage = batch.overage.saturating_sub(reservation.overage);
            return true;
        }
        if fallback.in_flight.iter().any(|u| u.token == token) {
            fallback.held.push((token, *reservation));
            return true;
        }
        fallback.refused.contains(&token)
    }

    /// Remembers that `batch` was sent and whether Redis took it (`shared`): a refused batch
    /// for the refunds of its units, a taken one sent only this once for deleting its mark. The
    /// refunds of its units held while it was in flight: to give back in Redis when it took the
    /// batch (returned), nobody's when it refused it.
    pub fn settle_unshared(
        &self,
        customer: &Id,
        batch: &Unshared,
        taken: Option<Taken>,
    ) -> Vec<Reservation> {
        let shared = taken.is_some();
        let mut shard = self.shard(customer);
        let Some(counts) = shard.get_mut(customer) else {
            return Vec::new();
        };
        let fallback = counts.fallback();
        fallback.in_flight.retain(|u| u.token != batch.token);
        let mut refunds: Vec<Reservation> = fallback
            .held
            .extract_if(.., |(token, _)| *token == batch.token)
            .map(|(_, reservation)| reservation)
            .collect();
        if !shared {
            if fallback.refused.len() == REFUSED_KEPT {
                fallback.refused.remove(0);
            }
            fallback.refused.push(batch.token);
            refunds.clear();
        } else if let Some(Taken { at_ms, version }) = taken {
            // Pruned here too: a customer whose answers are not followed (a plan without
            // limits, batched) would keep one per batch.
            fallback
                .landed
                .retain(|&(until_ms, _, _, _)| until_ms > at_ms);
            let until_ms = at_ms.saturating_add(LANDED_KEPT_MS);
            let full = fallback.landed.len() >= LANDED_KEPT;
            match fallback.landed.last_mut() {
                // Full: into the newest, with the later version and end (counted for answers
                // below that version: early rather than late).
                Some(last) if full && last.1 == batch.period => {
                    last.0 = last.0.max(until_ms);
                    last.2 += batch.units;
                    last.3 = last.3.max(version);
                }
                _ => fallback
                    .landed
                    .push((until_ms, batch.period, batch.units, version)),
            }
            if !batch.sealed {
                fallback.note_answered(batch.period, batch.token);
            }
        }
        refunds
    }

    /// Remembers that Redis answered the first and only call that left the mark `token` in the
    /// customer's count of `period` (a refund's): the customer's next call to that count
    /// deletes it.
    pub fn note_answered(&self, customer: &Id, period: Period, token: u128) {
        if let Some(counts) = self.shard(customer).get_mut(customer) {
            counts.fallback().note_answered(period, token);
        }
    }

    /// Takes up to [`FORGET_PER_CALL`] tokens of batches and refunds of `period` Redis took,
    /// whose marks the next call to that count may delete.
    pub fn take_answered(&self, customer: &Id, period: Period) -> Vec<u128> {
        let mut shard = self.shard(customer);
        let Some(fallback) = shard.get_mut(customer).and_then(|c| c.fallback.as_mut()) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        fallback.answered.retain(|&(of, token)| {
            if of == period && taken.len() < FORGET_PER_CALL {
                taken.push(token);
                false
            } else {
                true
            }
        });
        taken
    }

    /// Puts back tokens [`take_answered`](Self::take_answered) took, whose call did not answer.
    pub fn restore_answered(&self, customer: &Id, period: Period, tokens: Vec<u128>) {
        if tokens.is_empty() {
            return;
        }
        if let Some(counts) = self.shard(customer).get_mut(customer) {
            let answered = &mut counts.fallback().answered;
            answered.extend(tokens.into_iter().map(|token| (period, token)));
            let over = answered.len().saturating_sub(ANSWERED_KEPT);
            answered.drain(..over);
        }
    }

    /// Takes the customer's unshared units, to add them to Redis, each batch to the count of its
    /// own period (Redis keeps a count a day past its period's end, so a batch of a period that
    /// has just ended still reaches it). Costs one atomic load while no customer has any.
    pub fn take_unshared(&self, customer: &Id) -> Vec<Unshared> {
        if self.unshared.load(Ordering::Relaxed) == 0 {
            return Vec::new();
        }
        let mut shard = self.shard(customer);
        let Some(fallback) = shard
            .get_mut(customer)
            .and_then(|c| c.fallback.as_mut())
            .filter(|f| !f.unshared.is_empty())
        else {
            return Vec::new();
        };
        self.unshared.fetch_sub(1, Ordering::Relaxed);
        let mut taken = std::mem::take(&mut fallback.unshared);
        taken.retain(|u| u.units > 0);
        fallback.in_flight.extend_from_slice(&taken);
        taken
    }

    /// Counts a customer that has just come to hold unshared units, and lists it for the task
    /// that adds them to Redis.
    fn now_unshared(&self, customer: &Id) {
        self.unshared.fetch_add(1, Ordering::Relaxed);
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(*customer);
    }

    /// Puts back a batch [`take_unshared`](Self::take_unshared) took and Redis did not answer
    /// for: `sent`, it may still be counted there, so it is sealed (it takes no more units and
    /// gives none back).
    pub fn restore_unshared(&self, customer: &Id, batch: Unshared, sent: bool) {
        let mut shard = self.shard(customer);
        let counts = counts(&mut shard, customer, batch.period);
        if counts.unshared().is_empty() {
            self.now_unshared(customer);
        }
        let fallback = counts.fallback();
        fallback.in_flight.retain(|u| u.token != batch.token);
        fallback.unshared.push(Unshared {
            sealed: batch.sealed || sent,
            ..batch
        });
    }
}

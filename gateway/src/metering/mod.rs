//! Metering: one usage event per admitted request, in the usage ledger exactly once, whatever
//! crashes.
//!
//! The event is written to the [`spool`] as the response header goes out (a *pending* record: the
//! client is getting a response, so the request counts), and made *final* when the request is over
//! with its final latency and sizes: rewritten where it lies, or appended when its segment was
//! closed in between. The [`flush`]er sends closed segments to the ledger in batches
//! (the embedded store, or the control plane's `POST /v1/gateway/usage`); the store keeps each
//! event id once, so what is sent twice counts once. A store outage only delays the sending; the
//! spool is bounded, and a full spool refuses new metered requests (503) rather than lose their
//! usage.
//!
//! # Layout
//! - [`record`]: a usage record as a line of the spool.
//! - [`spool`]: the append-only segments on local disk.
//! - [`segment`]: the segment being written, a file mapped into memory.
//! - [`flush`]: the background service that sends and deletes them.
//! - [`ledger`]: the ledger in the embedded store, or behind the control plane's API.
//! - [`metrics`]: spool fill and events written, stored and recovered.

pub mod flush;
pub mod ledger;
pub mod metrics;
pub mod record;
pub mod replay;
pub mod segment;
pub mod spool;

use std::sync::Arc;

use metrics::MeteringMetrics;
use record::{Kind, Measures, Record, Usage};
use spool::{Place, Spool};

/// The spool and its metrics: what the request path writes usage through.
#[derive(Debug)]
pub struct Meter {
    /// The spool.
    pub spool: Spool,
    /// Its metrics.
    pub metrics: MeteringMetrics,
}

impl Meter {
    /// Appends the pending record of `usage`; returns what the final one is written from.
    pub fn append_pending(&self, usage: &Usage<'_>) -> Written {
        let mut line = Vec::with_capacity(256);
        let measures = record::encode(Kind::Pending, usage, &mut line);
        let place = self.append(&line);
        Written {
            units: usage.units,
            line,
            measures,
            place,
            answered: None,
        }
    }

    /// Writes the final record of `written`, with the request's final latency and sizes: over
    /// the pending record where it lies while its segment is open (nearly always: one record per
    /// request reaches the flusher), else appended (the flusher then settles the pending record
    /// in an earlier segment with it; or the pending record could not be written at all).
    pub fn write_final(&self, written: &Written, latency_us: u64, bytes_in: u64, bytes_out: u64) {
        if let Some(status) = written.answered
            && self.write_answered(written, status, latency_us, bytes_in, bytes_out)
        {
            return;
        }
        let finish = |line: &mut [u8]| {
            record::finish_in_place(line, written.measures, latency_us, bytes_in, bytes_out);
        };
        let rewritten = written
            .place
            .is_some_and(|place| self.spool.rewrite(place, &written.line, finish));
        if rewritten {
            self.metrics.spooled();
            return;
        }
        let mut line = written.line.clone();
        finish(&mut line);
        if self.append(&line).is_some() {
            self.metrics.spooled();
        }
    }

    /// The final record of a request the gateway answered itself with `status` after the
    /// upstream's response header was recorded, before that header went out: appended (it
    /// settles the pending record of its id wherever that lies) with the gateway's status and
    /// no units. `false` when the pending line cannot be read back, which cannot happen for a
    /// line this process encoded; the request then counts as recorded.
    fn write_answered(
        &self,
        written: &Written,
        status: u16,
        latency_us: u64,
        bytes_in: u64,
        bytes_out: u64,
    ) -> bool {
        let line = written.line.strip_suffix(b"\n").unwrap_or(&written.line);
        let Some(Record::Pending(pending)) = record::decode(line) else {
            return false;
        };
        let Some(mut event) = pending.event() else {
            return false;
        };
        event.status = status;
        event.units = 0;
        event.overage = 0;
        event.latency_us = latency_us;
        event.bytes_in = bytes_in;
        event.bytes_out = bytes_out;
        let mut line = Vec::with_capacity(written.line.len());
        record::encode(Kind::Final, &Usage::of(&event), &mut line);
        if self.append(&line).is_some() {
            self.metrics.spooled();
        }
        true
    }

    /// Appends a record; where it went, or `None` when the disk refused it, which is logged
    /// and counted (the request was already answered, so there is nothing else to do with it).
    fn append(&self, line: &[u8]) -> Option<Place> {
        match self.spool.append(line) {
            Ok(place) => Some(place),
            Err(error) => {
                self.metrics.spool_error();
                tracing::error!(%error, "cannot write a usage record to the spool");
                None
            }
        }
    }
}

/// A metered request's usage, from its admission to its end.
#[derive(Debug)]
pub struct Metered {
    /// Where its records go.
    pub meter: Arc<Meter>,
    /// Its pending record, once the response header went out.
    pub written: Option<Written>,
}

/// A request's pending record, as written when its response header went out: the final record
/// repeats it with the final latency and sizes.
#[derive(Debug)]
pub struct Written {
    /// The billable units it counts (0 when refunded).
    pub units: u64,
    line: Vec<u8>,
    measures: Measures,
    /// Where the pending record went; `None` when the disk refused it.
    place: Option<Place>,
    /// The status the gateway answered with instead of the recorded upstream header's, which
    /// never went out.
    answered: Option<u16>,
}

impl Written {
    /// The gateway answered `status` for a failed upstream after the upstream's response header
    /// was recorded but before it went out: the client got the gateway's answer, so the request
    /// does not count, and its final record says so.
    pub fn answered_instead(&mut self, status: u16) {
        self.answered = Some(status);
        self.units = 0;
    }
}

#[cfg(test)]
mod tests {
    use tollgate_model::usage::UsageEvent;

    use super::record::Record;
    use super::spool::SEGMENT_BYTES;
    use super::*;
    use crate::metrics::Metrics;

    fn meter(dir: &std::path::Path) -> Meter {
        Meter {
            spool: Spool::open(dir, 1 << 30, 0).unwrap(),
            metrics: MeteringMetrics::new(&Metrics::new()).unwrap(),
        }
    }

    fn event(n: u8) -> UsageEvent {
        UsageEvent {
            id: format!("evt_{}", hex::encode([n; 16])),
            request_id: format!("req-{n}"),
            customer_id: format!("cus_{}", hex::encode([1; 16])),
            key_id: None,
            route: "api".into(),
            method: "GET".into(),
            status: 200,
            latency_us: 5,
            bytes_in: 3,
            bytes_out: 0,
            at_ms: 1,
            units: 1,
            overage: 0,
        }
    }

    fn finished(mut event: UsageEvent) -> UsageEvent {
        event.latency_us = 900;
        event.bytes_in = 4;
        event.bytes_out = 17;
        event
    }

    /// The records of every closed segment, by segment (torn lines left out).
    fn closed(meter: &Meter) -> Vec<Vec<Record>> {
        let active = meter.spool.tick(i64::MAX, 0).unwrap();
        meter
            .spool
            .closed(active)
            .unwrap()
            .iter()
            .map(|(_, path)| spool::read(path).unwrap().0)
            .collect()
    }

    #[test]
    fn a_request_that_ends_while_its_segment_is_open_leaves_one_final_record() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let first = meter.append_pending(&Usage::of(&event(1)));
        let second = meter.append_pending(&Usage::of(&event(2)));
        meter.write_final(&second, 900, 4, 17);
        meter.write_final(&first, 900, 4, 17);
        assert_eq!(
            closed(&meter),
            [vec![
                Record::Final(finished(event(1))),
                Record::Final(finished(event(2)))
            ]]
        );
    }

    #[test]
    fn a_request_whose_segment_closed_first_appends_its_final_record_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let written = meter.append_pending(&Usage::of(&event(1)));
        let pending = closed(&meter);
        meter.write_final(&written, 900, 4, 17);
        let mut segments = pending;
        segments.extend(closed(&meter).into_iter().skip(1));
        let [earlier, later] = segments.as_slice() else {
            panic!("two segments: {segments:?}");
        };
        assert!(matches!(earlier.as_slice(), [Record::Pending(p)] if p.id == event(1).id));
        assert_eq!(later, &[Record::Final(finished(event(1)))]);
    }

    #[test]
    fn a_request_the_gateway_answered_after_its_header_was_recorded_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let mut written = meter.append_pending(&Usage::of(&event(1)));
        written.answered_instead(504);
        assert_eq!(written.units, 0);
        meter.write_final(&written, 900, 4, 17);
        let mut answered = finished(event(1));
        answered.status = 504;
        answered.units = 0;
        // The pending record stays as it was; the final one after it settles it.
        let segments = closed(&meter);
        let [records] = segments.as_slice() else {
            panic!("one segment: {segments:?}");
        };
        assert!(
            matches!(records.as_slice(), [Record::Pending(p), Record::Final(e)] if p.id == event(1).id && *e == answered),
            "{records:?}"
        );
    }

    #[test]
    fn a_full_segment_not_yet_closed_is_still_finished_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let meter = meter(dir.path());
        let written = meter.append_pending(&Usage::of(&event(1)));
        // Filled to the brim: the next record starts segment 2, and segment 1 waits for the
        // flusher's tick, still mapped.
        let filler = vec![b'#'; usize::try_from(SEGMENT_BYTES).unwrap() - written.line.len()];
        meter.spool.append(&filler).unwrap();
        meter.append_pending(&Usage::of(&event(2)));
        meter.write_final(&written, 900, 4, 17);
        let segments = closed(&meter);
        assert_eq!(segments.len(), 2);
        assert_eq!(segments[0][0], Record::Final(finished(event(1))));
        assert!(matches!(segments[1].as_slice(), [Record::Pending(_)]));
    }
}

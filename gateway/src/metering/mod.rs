//! Metering: one usage event per admitted request, in the usage ledger exactly once, whatever
//! crashes.
//!
//! The event is written to the [`spool`] as the response header goes out (a *pending* record: the
//! client is getting a response, so the request counts), and again when the request is over with
//! its final latency and sizes. The [`flush`]er sends closed segments to the ledger in batches
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
pub mod segment;
pub mod spool;

use std::sync::Arc;

use metrics::MeteringMetrics;
use record::{Kind, Measures, Usage};
use spool::Spool;

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
        self.append(&line, Kind::Pending);
        Written {
            units: usage.units,
            line,
            measures,
        }
    }

    /// Appends the final record of `written`, with the request's final latency and sizes.
    pub fn append_final(&self, written: &Written, latency_us: u64, bytes_in: u64, bytes_out: u64) {
        let mut line = Vec::with_capacity(written.line.len() + 16);
        record::finish(
            &written.line,
            written.measures,
            latency_us,
            bytes_in,
            bytes_out,
            &mut line,
        );
        self.append(&line, Kind::Final);
    }

    /// Appends a record; a refusal of the disk is logged and counted (the request was already
    /// answered, so there is nothing else to do with it).
    fn append(&self, line: &[u8], kind: Kind) {
        match self.spool.append(line) {
            Ok(()) => {
                if kind == Kind::Final {
                    self.metrics.spooled();
                }
            }
            Err(error) => {
                self.metrics.spool_error();
                tracing::error!(%error, "cannot write a usage record to the spool");
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
}
